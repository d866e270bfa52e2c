//! The ingest edge's metrics: orders accepted (durable on the topic), orders refused by reason
//! (the problem type, a fixed set), and how long the broker took to acknowledge; and the dead
//! letters waiting for an operator (`deadletters::census`).

use orderflow_platform::metrics::MetricsRegistry;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The problem type's code, e.g. `invalid-order`, `unavailable`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishErrorLabels {
    /// `queue_full`, `timeout`, `broker` or `encoding`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// A dead-letter topic.
    pub topic: String,
}

#[derive(Clone)]
pub struct IngestMetrics {
    pub accepted: Counter,
    /// Dead letters without a decision, per dead-letter topic.
    pub dead_letters_pending: Family<TopicLabels, Gauge>,
    /// Age of the oldest of them, seconds (0 when none).
    pub dead_letters_oldest_pending_age: Family<TopicLabels, Gauge>,
    pub publish_errors: Family<PublishErrorLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub publish_seconds: Histogram,
}

impl IngestMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let m = Self {
            accepted: Counter::default(),
            dead_letters_pending: Family::default(),
            dead_letters_oldest_pending_age: Family::default(),
            publish_errors: Family::default(),
            refused: Family::default(),
            publish_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        };
        registry.register(
            "ingest_orders_accepted",
            "Orders answered 202: acknowledged by the broker",
            m.accepted.clone(),
        );
        registry.register(
            "ingest_publish_errors",
            "OrderPlaced events the broker did not acknowledge, by kind (each answered 503)",
            m.publish_errors.clone(),
        );
        registry.register(
            "ingest_orders_refused",
            "Order requests not accepted, by problem type",
            m.refused.clone(),
        );
        registry.register(
            "ingest_publish_duration_seconds",
            "Time from handing OrderPlaced to the producer to the broker's acknowledgement",
            m.publish_seconds.clone(),
        );
        registry.register(
            "dead_letters_pending",
            "Dead letters without a decision (redrive or discard), per dead-letter topic; \
             counted every minute by each process that serves the admin listener",
            m.dead_letters_pending.clone(),
        );
        registry.register(
            "dead_letters_oldest_pending_age_seconds",
            "Age of the oldest dead letter without a decision, per dead-letter topic (0: none)",
            m.dead_letters_oldest_pending_age.clone(),
        );
        m
    }

    /// Metrics that go nowhere, for tests that build the edge alone.
    pub fn unregistered() -> Self {
        Self::register(&MetricsRegistry::new())
    }
}
