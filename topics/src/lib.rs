//! The topic catalog — one declarative file, `catalog.toml` — and everything derived from it:
//! the topic names the roles use ([`names`]), provisioning through the admin API ([`apply`]), and
//! the topic documentation ([`docs`]). Nothing else decides a topic's name or shape.

pub mod apply;
pub mod docs;

use std::collections::BTreeSet;

use serde::Deserialize;

/// The catalog source, compiled in.
pub const CATALOG_TOML: &str = include_str!("../catalog.toml");

/// Names of the topics the roles read and write. A test checks each is in the catalog.
pub mod names {
    pub const ORDERS_EVENTS: &str = "orders.events";
    pub const SAGA_DLQ: &str = "orderflow.saga.dlq";
    pub const PROJECTION_ORDERS_DLQ: &str = "orderflow.projection.orders.dlq";
    pub const PROJECTION_INVENTORY_DLQ: &str = "orderflow.projection.inventory.dlq";
    pub const SAGA_CHANGELOG: &str = "orderflow.saga.changelog";
    pub const INVENTORY_COMMANDS: &str = "inventory.commands";
    pub const INVENTORY_CHANGELOG: &str = "orderflow.inventory.changelog";
    pub const INVENTORY_DLQ: &str = "orderflow.inventory.dlq";
    pub const PAYMENTS_REQUESTS: &str = "payments.requests";
    pub const PAYMENTS_DLQ: &str = "orderflow.payments.dlq";
    /// What operators decided about each dead letter (redriven or discarded), keyed by the
    /// letter (`orderflow dlq`).
    pub const DLQ_RESOLUTIONS: &str = "orderflow.dlq.resolutions";

    /// The topics whose records are orderflow events, each with its own id and its cause's
    /// (the dead-letter topics hold copies of them).
    pub const EVENT_TOPICS: [&str; 3] = [ORDERS_EVENTS, INVENTORY_COMMANDS, PAYMENTS_REQUESTS];

    /// Every dead-letter topic, where `orderflow dlq` looks.
    pub const DEAD_LETTER_TOPICS: [&str; 5] = [
        SAGA_DLQ,
        INVENTORY_DLQ,
        PAYMENTS_DLQ,
        PROJECTION_ORDERS_DLQ,
        PROJECTION_INVENTORY_DLQ,
    ];

    /// The dead-letter topics whose consumers park keys (the processors with a changelog:
    /// `orderflow_processors::sequence`), where held letters wait to be released. A test in
    /// `orderflow_processors` checks the list against the processors.
    pub const SEQUENCED_DEAD_LETTER_TOPICS: [&str; 2] = [SAGA_DLQ, INVENTORY_DLQ];

    /// What a shadow saga (`orderflow process --shadow NAME`) writes, each as
    /// [`shadow_topic`]`(NAME, topic)`: its timeline, its commands, its state.
    pub const SHADOW_OUTPUTS: [&str; 5] = [
        ORDERS_EVENTS,
        INVENTORY_COMMANDS,
        PAYMENTS_REQUESTS,
        SAGA_CHANGELOG,
        SAGA_DLQ,
    ];

    /// The shadow `name`'s copy of `topic`: `NAME.topic`.
    pub fn shadow_topic(name: &str, topic: &str) -> String {
        format!("{name}.{topic}")
    }

    /// Whether `name` can name a shadow: 1–32 of `a-z`, `0-9`, `-`, starting with a letter
    /// (it becomes part of topic names and consumer group ids).
    pub fn check_shadow_name(name: &str) -> Result<(), String> {
        let ok = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(())
        } else {
            Err(format!(
                "shadow name {name:?}: expected 1-32 of a-z, 0-9 and -, starting with a letter"
            ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("topic catalog does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("topic catalog is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    Delete,
    Compact,
}

impl CleanupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Compact => "compact",
        }
    }
}

/// The retention of a topic kept forever: the largest `retention.ms`. Kafka reads it as no
/// time limit, as it does `-1`; Tansu 0.6 reads `-1` as "older than -1 ms" and deletes every
/// record at its next maintenance (its `policy_delete.sql`), so the catalog never says `-1`.
pub const FOREVER: i64 = i64::MAX;

/// One topic as the catalog declares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub description: String,
    pub key: String,
    pub value: String,
    /// Avro record names that may appear as values.
    pub schemas: Vec<String>,
    pub partitions: i32,
    /// Production replication; capped at the cluster's broker count when applied.
    pub replication: i32,
    pub cleanup_policy: CleanupPolicy,
    /// Retention of a `delete` topic; [`FOREVER`] (or `-1`, on brokers that read it as Kafka
    /// does) keeps every record.
    pub retention_ms: Option<i64>,
    /// Why the retention is what it is, where that matters (rendered in docs/topics.md).
    #[serde(default)]
    pub retention_why: Option<String>,
    pub producers: Vec<String>,
    pub consumers: Vec<String>,
}

impl TopicSpec {
    /// Topic configs to set at creation and to compare for drift.
    pub fn configs(&self) -> Vec<(&'static str, String)> {
        let mut configs = vec![("cleanup.policy", self.cleanup_policy.as_str().to_owned())];
        if let Some(ms) = self.retention_ms {
            configs.push(("retention.ms", ms.to_string()));
        }
        configs
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "topic")]
    pub topics: Vec<TopicSpec>,
}

impl Catalog {
    /// The compiled-in catalog.
    pub fn load() -> Result<Self, CatalogError> {
        Self::parse(CATALOG_TOML)
    }

    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let catalog: Catalog = toml::from_str(text)?;
        catalog.validate()?;
        Ok(catalog)
    }

    pub fn get(&self, name: &str) -> Option<&TopicSpec> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// The topics of the shadow `name` ([`names::SHADOW_OUTPUTS`]), each declared like the
    /// topic it shadows (partitions, cleanup, retention).
    pub fn for_shadow(&self, name: &str) -> Catalog {
        let topics = names::SHADOW_OUTPUTS
            .iter()
            .filter_map(|topic| self.get(topic))
            .map(|spec| TopicSpec {
                name: names::shadow_topic(name, &spec.name),
                description: format!("Shadow {name}'s copy of {}", spec.name),
                producers: vec![format!("orderflow process --shadow {name}")],
                consumers: vec![format!("orderflow shadow diff {name}")],
                ..spec.clone()
            })
            .collect();
        Catalog { topics }
    }

    fn validate(&self) -> Result<(), CatalogError> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for t in &self.topics {
            if !seen.insert(t.name.as_str()) {
                errors.push(format!("{}: declared twice", t.name));
            }
            if t.partitions < 1 {
                errors.push(format!("{}: partitions must be at least 1", t.name));
            }
            if t.replication < 1 {
                errors.push(format!("{}: replication must be at least 1", t.name));
            }
            if t.retention_ms == Some(-1) {
                errors.push(format!(
                    "{}: retention_ms = -1 deletes everything on Tansu; use {FOREVER} to keep \
                     forever",
                    t.name
                ));
            }
            if t.cleanup_policy == CleanupPolicy::Compact && t.retention_ms.is_some() {
                errors.push(format!(
                    "{}: a compacted topic takes no retention_ms",
                    t.name
                ));
            }
            let valid_name = !t.name.is_empty()
                && t.name.len() <= 249
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid_name {
                errors.push(format!("{}: not a legal Kafka topic name", t.name));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CatalogError::Invalid(errors))
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn what_replay_and_reconcile_read_is_kept_forever() {
        let catalog = Catalog::load().expect("catalog");
        for name in [names::ORDERS_EVENTS, names::INVENTORY_COMMANDS] {
            let topic = catalog.get(name).expect("in the catalog");
            assert_eq!(topic.retention_ms, Some(FOREVER), "{name}");
            assert!(topic.retention_why.is_some(), "{name} says why");
        }
    }
    use super::*;

    #[test]
    fn the_catalog_parses_and_names_every_topic_the_roles_use() {
        let catalog = Catalog::load().expect("catalog is valid");
        for name in [
            names::ORDERS_EVENTS,
            names::SAGA_DLQ,
            names::PROJECTION_ORDERS_DLQ,
            names::PROJECTION_INVENTORY_DLQ,
            names::SAGA_CHANGELOG,
            names::INVENTORY_COMMANDS,
            names::INVENTORY_CHANGELOG,
            names::INVENTORY_DLQ,
            names::PAYMENTS_REQUESTS,
            names::PAYMENTS_DLQ,
            names::DLQ_RESOLUTIONS,
        ] {
            assert!(
                catalog.get(name).is_some(),
                "{name} missing from catalog.toml"
            );
        }
    }

    #[test]
    fn invalid_catalogs_are_rejected_with_every_reason() {
        let text = r#"
[[topic]]
name = "a b"
description = ""
key = ""
value = ""
schemas = []
partitions = 0
replication = 1
cleanup_policy = "compact"
retention_ms = 5
producers = []
consumers = []
"#;
        let err = Catalog::parse(text).expect_err("invalid").to_string();
        assert!(err.contains("partitions"), "{err}");
        assert!(err.contains("retention_ms"), "{err}");
        assert!(err.contains("legal Kafka topic name"), "{err}");
    }
}
