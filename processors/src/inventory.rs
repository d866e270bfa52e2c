//! The inventory processor: owns stock per SKU. It reads `inventory.commands` (keyed by SKU, so
//! one partition decides every change of a SKU, in log order) and answers the saga per line on
//! the orders topic.
//!
//! ## State (changelog keys)
//!
//! - `s:<sku>` — the SKU's counter: units available. O(1) whatever the SKU's traffic.
//! - `r:<order id>/<sku>` — what happened to one order's request for one SKU (reserved, refused,
//!   released), with the partition's event time of that change. One small record per
//!   reservation, never a value that collects them.
//! - `k:<restock event id>` — a restock applied, with its event time.
//! - `t:clock` — the newest event time of the partition's inputs ([`EventClock`]).
//!
//! That makes every command idempotent (rule 2): a second reservation request of an order gets
//! the first answer again, byte for byte, and changes nothing; a release releases once; a restock
//! adds once. A release that arrives for an order whose reservation was refused or never made
//! changes nothing, and blocks a late duplicate of the reservation. Stock never goes negative: a
//! reservation is granted only from what is available.
//!
//! ## Horizon
//!
//! `r:` and `k:` entries are dropped (tombstoned) once the partition's clock is more than
//! `state.retention_ms` past their time. A released or refused reservation and a restock are kept
//! only to recognise duplicates; a reservation still held that long belongs to a confirmed order
//! (every saga step that could release it has a deadline far shorter: the configuration checks
//! it), and its units count as sold. Past the horizon, then: a duplicate restock would add again,
//! a duplicate reservation request would reserve again, and a release (a customer cancelling a
//! confirmed order that long after) returns no units — returns that late are restocked.

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, InventoryLineRejected, InventoryLineReleased,
    InventoryLineReserved, OrderEvent,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    runtime::{Outputs, Step, StepError},
    state::{ChangelogRecord, EventClock, Horizon, PartitionState, Store},
};

/// Roles of the replies, fed into their derived ids. Never rename.
const ROLE_RESERVED: &str = "inventory/reserved";
const ROLE_REJECTED: &str = "inventory/rejected";
const ROLE_RELEASED: &str = "inventory/released";

/// What happened to one order's request for one SKU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Reservation {
    Reserved {
        quantity: i32,
        available_after: i64,
        /// The partition's event time when this changed (horizon).
        at: i64,
    },
    Refused {
        requested: i32,
        available: i64,
        at: i64,
    },
    Released {
        quantity: i32,
        available_after: i64,
        at: i64,
    },
}

impl Reservation {
    fn at(&self) -> i64 {
        match self {
            Self::Reserved { at, .. } | Self::Refused { at, .. } | Self::Released { at, .. } => *at,
        }
    }
}

/// A SKU's stock: counters only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SkuStock {
    pub available: i64,
}

/// Stock of the SKUs of one `inventory.commands` partition.
#[derive(Debug)]
pub struct InventoryState {
    skus: Store<SkuStock>,
    reservations: Store<Reservation>,
    /// Restocks applied, by event id, with the event time they were applied at.
    restocks: Store<i64>,
    clock: EventClock,
    /// `r:`/`k:` keys by event time, for the horizon.
    horizon: Horizon,
}

impl Default for InventoryState {
    fn default() -> Self {
        Self {
            skus: Store::new("s:"),
            reservations: Store::new("r:"),
            restocks: Store::new("k:"),
            clock: EventClock::default(),
            horizon: Horizon::default(),
        }
    }
}

fn reservation_key(order_id: &str, sku: &str) -> String {
    format!("{order_id}/{sku}")
}

impl InventoryState {
    pub fn sku(&self, sku: &str) -> Option<&SkuStock> {
        self.skus.get(sku)
    }

    /// What happened to `order_id`'s request for `sku`, while within the horizon.
    pub fn reservation(&self, order_id: &str, sku: &str) -> Option<&Reservation> {
        self.reservations.get(&reservation_key(order_id, sku))
    }

    /// Reservation and restock entries held (the part that grows with traffic, up to the
    /// horizon).
    pub fn tracked(&self) -> usize {
        self.reservations.len() + self.restocks.len()
    }

    fn set_reservation(&mut self, key: String, reservation: Reservation) {
        if self.reservations.get(&key).is_none() {
            self.horizon.note(format!("r:{key}"), reservation.at());
        }
        self.reservations.put(key, reservation);
    }

    /// Advances the clock to the input's event time and drops what the horizon passed.
    fn advance(&mut self, occurred_at: i64, retention_ms: i64) -> i64 {
        let now = self.clock.advance(occurred_at);
        let (reservations, restocks) = (&mut self.reservations, &mut self.restocks);
        self.horizon
            .expire(now.saturating_sub(retention_ms), |key, queued| {
                if let Some(key) = key.strip_prefix("r:") {
                    let at = reservations.get(key).map(Reservation::at)?;
                    if at > queued {
                        return Some(at);
                    }
                    reservations.remove(key);
                } else if let Some(key) = key.strip_prefix("k:") {
                    restocks.get(key)?;
                    restocks.remove(key);
                }
                None
            });
        now
    }
}

impl PartitionState for InventoryState {
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if self.skus.owns(key) {
            self.skus.restore(key, value).map(|_| ())
        } else if self.reservations.owns(key) {
            self.reservations.restore(key, value).map(|_| ())
        } else if self.restocks.owns(key) {
            self.restocks.restore(key, value).map(|_| ())
        } else if self.clock.owns(key) {
            self.clock.restore(key, value)
        } else {
            Err(format!("unknown inventory state key {key:?}"))
        }
    }

    fn restored(&mut self) {
        let mut horizon = Horizon::default();
        for (key, reservation) in self.reservations.iter() {
            horizon.note(format!("r:{key}"), reservation.at());
        }
        for (key, at) in self.restocks.iter() {
            horizon.note(format!("k:{key}"), *at);
        }
        self.horizon = horizon;
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        let mut out = Vec::new();
        self.skus.changes_into(&mut out);
        self.reservations.changes_into(&mut out);
        self.restocks.changes_into(&mut out);
        self.clock.changes_into(&mut out);
        out
    }

    fn entries(&self) -> usize {
        self.skus.len() + self.tracked() + self.horizon.len()
    }
}

pub struct Inventory {
    /// Where replies go (the orders topic, keyed by the order's customer).
    replies: &'static str,
    /// `state.retention_ms`: the horizon of reservations and restocks.
    retention_ms: i64,
}

impl Inventory {
    pub fn new(replies: &'static str, retention_ms: i64) -> Self {
        Self {
            replies,
            retention_ms,
        }
    }

    fn reply_envelope(
        command: &Envelope,
        role: &str,
        kind: EventKind,
    ) -> Result<Envelope, StepError> {
        let cause = Uuid::parse_str(&command.event_id)
            .map_err(|_| StepError::Poison(format!("malformed event_id {:?}", command.event_id)))?;
        Ok(Envelope {
            event_id: derived_event_id(cause, role).to_string(),
            order_id: command.order_id.clone(),
            customer_id: command.customer_id.clone(),
            occurred_at: command.occurred_at,
            causation_id: Some(command.event_id.clone()),
            sequence: 0,
            schema_version: kind.schema_version(),
        })
    }

    fn answer(
        &self,
        command: &Envelope,
        sku: &str,
        reservation: &Reservation,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let event = match reservation {
            Reservation::Reserved {
                quantity,
                available_after,
                ..
            } => OrderEvent::InventoryLineReserved(InventoryLineReserved {
                envelope: Self::reply_envelope(
                    command,
                    ROLE_RESERVED,
                    EventKind::InventoryLineReserved,
                )?,
                sku: sku.to_owned(),
                quantity: *quantity,
                available_after: clamp(*available_after),
            }),
            Reservation::Refused {
                requested,
                available,
                ..
            } => OrderEvent::InventoryLineRejected(InventoryLineRejected {
                envelope: Self::reply_envelope(
                    command,
                    ROLE_REJECTED,
                    EventKind::InventoryLineRejected,
                )?,
                sku: sku.to_owned(),
                requested: *requested,
                available: clamp(*available),
            }),
            // A reservation request after its release: a late duplicate; nothing to say.
            Reservation::Released { .. } => return Ok(()),
        };
        out.push(self.replies, command.customer_id.clone(), event);
        Ok(())
    }
}

fn clamp(units: i64) -> i32 {
    units.clamp(0, i64::from(i32::MAX)) as i32
}

impl Step for Inventory {
    type State = InventoryState;

    fn handle(
        &mut self,
        state: &mut InventoryState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let now = state.advance(event.envelope().occurred_at, self.retention_ms);
        match event {
            OrderEvent::InventoryReservationRequested(request) => {
                let command = &request.envelope;
                for line in &request.lines {
                    let key = reservation_key(&command.order_id, &line.sku);
                    let reservation = match state.reservations.get(&key) {
                        Some(existing) => existing.clone(),
                        None => {
                            let mut stock = state.skus.get(&line.sku).copied().unwrap_or_default();
                            let quantity = i64::from(line.quantity);
                            let reservation = if line.quantity > 0 && stock.available >= quantity {
                                stock.available -= quantity;
                                state.skus.put(line.sku.clone(), stock);
                                Reservation::Reserved {
                                    quantity: line.quantity,
                                    available_after: stock.available,
                                    at: now,
                                }
                            } else {
                                Reservation::Refused {
                                    requested: line.quantity,
                                    available: stock.available,
                                    at: now,
                                }
                            };
                            state.set_reservation(key, reservation.clone());
                            reservation
                        }
                    };
                    self.answer(command, &line.sku, &reservation, out)?;
                }
                Ok(())
            }
            OrderEvent::InventoryReleaseRequested(release) => {
                let command = &release.envelope;
                let key = reservation_key(&command.order_id, &release.sku);
                match state.reservations.get(&key).cloned() {
                    Some(Reservation::Released { .. }) | Some(Reservation::Refused { .. }) => {}
                    Some(Reservation::Reserved { quantity, .. }) => {
                        let mut stock = state.skus.get(&release.sku).copied().unwrap_or_default();
                        stock.available += i64::from(quantity);
                        state.skus.put(release.sku.clone(), stock);
                        state.set_reservation(
                            key,
                            Reservation::Released {
                                quantity,
                                available_after: stock.available,
                                at: now,
                            },
                        );
                        out.push(
                            self.replies,
                            command.customer_id.clone(),
                            OrderEvent::InventoryLineReleased(InventoryLineReleased {
                                envelope: Self::reply_envelope(
                                    command,
                                    ROLE_RELEASED,
                                    EventKind::InventoryLineReleased,
                                )?,
                                sku: release.sku.clone(),
                                quantity,
                                available_after: clamp(stock.available),
                            }),
                        );
                    }
                    None => {
                        // Nothing reserved (yet): remember the release so that a late
                        // duplicate of the request is not granted.
                        let available = state.skus.get(&release.sku).map_or(0, |s| s.available);
                        state.set_reservation(
                            key,
                            Reservation::Released {
                                quantity: 0,
                                available_after: available,
                                at: now,
                            },
                        );
                    }
                }
                Ok(())
            }
            OrderEvent::InventoryRestocked(restock) => {
                if restock.quantity <= 0 {
                    return Err(StepError::Poison(format!(
                        "restock of {} with quantity {}: expected a positive quantity",
                        restock.sku, restock.quantity
                    )));
                }
                let id = &restock.envelope.event_id;
                if state.restocks.get(id).is_none() {
                    let mut stock = state.skus.get(&restock.sku).copied().unwrap_or_default();
                    stock.available += i64::from(restock.quantity);
                    state.skus.put(restock.sku.clone(), stock);
                    state.horizon.note(format!("k:{id}"), now);
                    state.restocks.put(id.clone(), now);
                }
                Ok(())
            }
            other => Err(StepError::Poison(format!(
                "{} is not an inventory command",
                other.kind().name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use orderflow_schemas::{InventoryReleaseRequested, InventoryRestocked, SkuQuantity};

    use super::*;
    use crate::state::MAX_VALUE_BYTES;

    const HOUR: i64 = 3_600_000;

    fn envelope(n: u128, order: u128, at: i64) -> Envelope {
        Envelope {
            event_id: Uuid::from_u128(n).to_string(),
            order_id: Uuid::from_u128(order).to_string(),
            customer_id: format!("customer-{}", order % 1000),
            occurred_at: at,
            causation_id: None,
            sequence: 0,
            schema_version: 1,
        }
    }

    fn request(order: u128, sku: &str, quantity: i32, at: i64) -> OrderEvent {
        OrderEvent::InventoryReservationRequested(
            orderflow_schemas::InventoryReservationRequested {
                envelope: envelope(0x1_0000_0000 + order, order, at),
                lines: vec![SkuQuantity {
                    sku: sku.to_owned(),
                    quantity,
                }],
            },
        )
    }

    fn release(order: u128, sku: &str, at: i64) -> OrderEvent {
        OrderEvent::InventoryReleaseRequested(InventoryReleaseRequested {
            envelope: envelope(0x2_0000_0000 + order, order, at),
            sku: sku.to_owned(),
            reason: "cancelled".to_owned(),
        })
    }

    fn restock(n: u128, sku: &str, quantity: i32, at: i64) -> OrderEvent {
        OrderEvent::InventoryRestocked(InventoryRestocked {
            envelope: envelope(0x3_0000_0000 + n, 0x3_0000_0000 + n, at),
            sku: sku.to_owned(),
            quantity,
            source: "test".to_owned(),
        })
    }

    /// 100,000 reservations on one SKU (and a release of every tenth) over more than the
    /// horizon: every changelog value stays small, the state stays bounded by the traffic within
    /// the horizon, and stock is exact.
    #[test]
    fn a_hot_sku_keeps_small_values_and_bounded_state() {
        let retention = HOUR;
        let mut step = Inventory::new("orders.events", retention);
        let mut state = InventoryState::default();
        let mut out = Outputs::default();
        let start = 1_764_000_000_000;
        step.handle(&mut state, &restock(0, "HOT", 10_000_000, start), &mut out)
            .expect("restock");
        // One order every 100 ms of event time: 100,000 orders span 2.8 hours.
        let orders = 100_000u128;
        let mut largest = 0;
        let mut most_entries = 0;
        let mut released = 0i64;
        for n in 0..orders {
            let at = start + n as i64 * 100;
            step.handle(&mut state, &request(n, "HOT", 1, at), &mut out)
                .expect("reserve");
            if n % 10 == 0 {
                step.handle(&mut state, &release(n, "HOT", at), &mut out)
                    .expect("release");
                released += 1;
            }
            // Every 500 inputs is a batch: what the runtime would write.
            if n % 500 == 499 {
                for (key, value) in state.changes() {
                    let size = value.map_or(0, |v| v.len());
                    assert!(size < MAX_VALUE_BYTES, "{key}: {size} bytes");
                    largest = largest.max(size);
                }
                most_entries = most_entries.max(state.entries());
            }
        }
        out.drain();
        assert!(largest < 200, "every value is a few dozen bytes: {largest}");
        // The horizon holds one hour: 36,000 orders of event time, each with one entry (and
        // a queue item per change).
        let per_hour = (retention / 100) as usize;
        assert!(
            state.tracked() <= per_hour + 1,
            "{} entries kept for an hour of {per_hour} orders",
            state.tracked()
        );
        assert!(
            most_entries <= 3 * per_hour,
            "state entries peaked at {most_entries}, bounded by the horizon's traffic"
        );
        let reserved = orders as i64 - released;
        assert_eq!(
            state.sku("HOT").map(|s| s.available),
            Some(10_000_000 - reserved)
        );
        // A duplicate within the horizon gets the first answer again and changes nothing.
        let last = orders - 1;
        let at = start + last as i64 * 100;
        let mut again = Outputs::default();
        step.handle(&mut state, &request(last, "HOT", 1, at), &mut again)
            .expect("repeat");
        assert_eq!(again.records().len(), 1);
        assert_eq!(
            state.sku("HOT").map(|s| s.available),
            Some(10_000_000 - reserved)
        );
    }

    #[test]
    fn a_restored_partition_expires_what_the_first_run_would_have() {
        let mut step = Inventory::new("orders.events", HOUR);
        let mut state = InventoryState::default();
        let mut out = Outputs::default();
        step.handle(&mut state, &restock(1, "A", 10, 0), &mut out)
            .expect("restock");
        step.handle(&mut state, &request(1, "A", 2, 1000), &mut out)
            .expect("reserve");
        step.handle(&mut state, &release(1, "A", 2000), &mut out)
            .expect("release");
        let records = state.changes();

        let mut restored = InventoryState::default();
        for (key, value) in &records {
            restored.restore(key, value.as_deref()).expect("restore");
        }
        restored.restored();
        assert_eq!(restored.sku("A"), state.sku("A"));
        assert_eq!(restored.tracked(), 2);
        // Two hours later both entries are past the horizon, in the original and the restored.
        for s in [&mut state, &mut restored] {
            step.handle(s, &request(2, "A", 1, 2 * HOUR + 3000), &mut out)
                .expect("reserve");
            assert_eq!(s.tracked(), 1, "only the new reservation is kept");
            assert!(s
                .reservation(&Uuid::from_u128(1).to_string(), "A")
                .is_none());
        }
        let tombstones: Vec<String> = state
            .changes()
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(tombstones.len(), 2, "{tombstones:?}");
        assert_eq!(restored.sku("A"), state.sku("A"));
    }
}
