//! The saga's outcome-deciding configuration — validation rules, the fraud model, the step
//! deadlines — is part of the log, so that a re-processed input gets the outcome its first run
//! got, byte for byte, whatever was reloaded in between.
//!
//! - A partition's rules live in its state (changelog key `g:rules`). The first input of a
//!   partition with none adopts the process's configured rules; from then on only the log
//!   changes them.
//! - A change is a [`SagaRulesChanged`] control record that [`publish`] writes to *every*
//!   `orders.events` partition: on a reload (SIGHUP) and when a processor starts (a restart with
//!   a new configuration is a reload). Each partition applies it at its own position, which every
//!   replica and every re-run sees in the same place. Publishing the rules in force again
//!   changes nothing.
//! - So a batch re-run after a crash, with a stricter fraud model reloaded meanwhile, restores
//!   the state of before the batch — rules included — and re-emits exactly what it emitted; the
//!   new model takes effect at its control record, after the batch.

use std::sync::Arc;

use orderflow_platform::{
    config::{FraudSettings, SagaSettings, Settings, ValidationSettings},
    kafka::KafkaClients,
};
use orderflow_schemas::{
    ids::derived_event_id, Codec, Envelope, EventKind, OrderEvent, SagaRulesChanged,
};
use rdkafka::{
    consumer::Consumer,
    producer::{FutureProducer, FutureRecord},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validation;
use crate::runtime::ProcessorError;

/// Role of the control records' ids. Never rename.
const ROLE_RULES: &str = "saga/rules";

/// Everything in the configuration that decides what the saga emits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaRules {
    pub validation: ValidationSettings,
    pub fraud: FraudSettings,
    pub deadlines: SagaSettings,
}

impl SagaRules {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            validation: settings.validation.clone(),
            // Only the model version in force travels (and decides), with its name.
            fraud: settings.fraud.in_force(),
            deadlines: settings.saga.clone(),
        }
    }

    /// The rules as JSON: what travels in the control record and the changelog.
    pub fn to_json(&self) -> String {
        // Plain data: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("saga rules do not parse: {e}"))
    }

    /// A name for this configuration: a UUIDv5 of its JSON.
    pub fn digest(&self) -> Uuid {
        Uuid::new_v5(&Uuid::NAMESPACE_OID, self.to_json().as_bytes())
    }

    /// The control record that puts these rules in force on `partition` from its position on.
    pub fn changed_event(&self, partition: i32, at_ms: i64) -> OrderEvent {
        let digest = self.digest();
        OrderEvent::SagaRulesChanged(SagaRulesChanged {
            envelope: Envelope {
                event_id: derived_event_id(digest, &format!("{ROLE_RULES}/{partition}/{at_ms}"))
                    .to_string(),
                order_id: String::new(),
                customer_id: String::new(),
                occurred_at: at_ms,
                causation_id: None,
                sequence: 0,
                schema_version: EventKind::SagaRulesChanged.schema_version(),
            },
            rules: self.to_json(),
            digest: digest.to_string(),
        })
    }
}

/// Rules in force, with the validation rules compiled.
#[derive(Debug)]
pub struct ActiveRules {
    pub rules: SagaRules,
    pub validation: validation::Rules,
    /// `rules` as JSON, to tell a repeat of the same rules.
    pub json: String,
}

impl ActiveRules {
    pub fn new(rules: SagaRules) -> Arc<Self> {
        Arc::new(Self {
            validation: validation::Rules::from_settings(&rules.validation),
            json: rules.to_json(),
            rules,
        })
    }

    pub fn fraud(&self) -> &FraudSettings {
        &self.rules.fraud
    }

    pub fn deadlines(&self) -> &SagaSettings {
        &self.rules.deadlines
    }
}

/// Writes a [`SagaRulesChanged`] with `rules` to every partition of `topic` and waits for each
/// to be acknowledged. Returns the number of partitions.
pub async fn publish(
    clients: &KafkaClients,
    codec: &Codec,
    topic: &str,
    rules: &SagaRules,
    at_ms: i64,
) -> Result<i32, ProcessorError> {
    let partitions = {
        let clients = clients.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> Result<i32, ProcessorError> {
            let metadata = clients.open_reader("saga-rules")?;
            let metadata = metadata.fetch_metadata(Some(&topic), clients.admin_timeout())?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len() as i32))
        })
        .await
        .map_err(|_| ProcessorError::Join)??
    };
    if partitions == 0 {
        return Err(ProcessorError::Step(format!(
            "{topic} has no partitions to publish the saga rules to"
        )));
    }
    let producer: FutureProducer = clients.idempotent_producer("saga-rules").create()?;
    let mut deliveries = Vec::new();
    for partition in 0..partitions {
        let bytes = codec.encode(&rules.changed_event(partition, at_ms))?;
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key("saga-rules")
            .payload(&bytes)
            .headers(orderflow_platform::kafka::event_headers(
                EventKind::SagaRulesChanged,
                None,
            ));
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for delivery in deliveries {
        match delivery.await {
            Err(_) => return Err(ProcessorError::DeliveryCancelled),
            Ok(Err((e, _))) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
    }
    Ok(partitions)
}
