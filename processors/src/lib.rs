//! Processors: the runtime that runs a step exactly once per input on any broker
//! ([`runtime`]), and the order saga's steps ([`saga`]).
//!
//! A step is plain code ([`runtime::Step`]): it sees one decoded event and pushes output events;
//! it never touches Kafka, so it is unit-tested without a broker. The runtime owns consuming,
//! batching, transactions, offsets and dead letters. [`registry`] lists the processors the
//! binary can run — the one place that decides which exist.

pub mod metrics;
pub mod runtime;
pub mod saga;

use orderflow_platform::config::Settings;

pub use metrics::ProcessorMetrics;
pub use runtime::{Outputs, ProcessorError, ProcessorRuntime, Step};

/// A processor the binary can run: a consumer group, its input topics, its dead-letter topic
/// and its step.
pub struct ProcessorSpec {
    /// Role name, used in the consumer group, the transactional id, logs and metrics.
    pub name: &'static str,
    pub input_topics: Vec<&'static str>,
    pub dead_letter_topic: &'static str,
    pub step: Box<dyn Step>,
}

/// Every processor, built from the settings.
pub fn registry(settings: &Settings) -> Vec<ProcessorSpec> {
    use orderflow_topics::names;
    vec![ProcessorSpec {
        name: "saga",
        input_topics: vec![names::ORDERS_EVENTS],
        dead_letter_topic: names::SAGA_DLQ,
        step: Box::new(saga::Saga::new(
            saga::validation::Rules::from_settings(&settings.validation),
            names::ORDERS_EVENTS,
        )),
    }]
}
