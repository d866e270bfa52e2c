//! Deterministic event ids (docs/architecture.md, rule 1): an output's id is a UUIDv5 of the causing event's
//! id and the output's role, so re-processing an input re-emits byte-identical events and every
//! consumer can drop the repeat by id.

use uuid::Uuid;

/// Namespace of all orderflow UUIDv5 ids. Never change it: every derived id depends on it.
const ORDERFLOW_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_4c6f_8000_0000_0000_0001);

/// The id of the event that `role` (e.g. `"validation/validated"`) emits because of `cause`.
pub fn derived_event_id(cause: Uuid, role: &str) -> Uuid {
    let mut name = Vec::with_capacity(16 + role.len());
    name.extend_from_slice(cause.as_bytes());
    name.extend_from_slice(role.as_bytes());
    Uuid::new_v5(&ORDERFLOW_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_cause_and_role_give_the_same_id() {
        let cause = Uuid::from_u128(42);
        assert_eq!(derived_event_id(cause, "a"), derived_event_id(cause, "a"));
    }

    #[test]
    fn role_and_cause_both_change_the_id() {
        let cause = Uuid::from_u128(42);
        assert_ne!(derived_event_id(cause, "a"), derived_event_id(cause, "b"));
        assert_ne!(
            derived_event_id(cause, "a"),
            derived_event_id(Uuid::from_u128(43), "a")
        );
    }
}
