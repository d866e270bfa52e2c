//! The processors' metrics: what each processor consumed, emitted and dead-lettered, its batch
//! sizes and transaction commit latency. Counted after the transaction commits, so a batch that
//! is aborted and redone is counted once.

use orderflow_platform::metrics::{ConsumerMetrics, MetricsRegistry};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessorLabels {
    pub processor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabels {
    pub processor: String,
    /// The output's record name (`OrderConfirmed`, `OrderRejected`, ...): the saga's outcomes.
    pub event_type: String,
}

#[derive(Clone)]
pub struct ProcessorMetrics {
    pub records: Family<ProcessorLabels, Counter>,
    pub outputs: Family<OutputLabels, Counter>,
    pub dead_letters: Family<ProcessorLabels, Counter>,
    /// Records held behind a parked key (crate::sequence); `dead_letters` counts them too.
    pub held_records: Family<ProcessorLabels, Counter>,
    /// Dead letters that parked nothing: too many keys were parked already.
    pub unsequenced_dead_letters: Family<ProcessorLabels, Counter>,
    /// Keys parked now, over the processor's assigned partitions.
    pub parked_keys: Family<ProcessorLabels, Gauge>,
    pub aborts: Family<ProcessorLabels, Counter>,
    /// Gaps in the input offsets read a second time (`kafka.recheck_offset_gaps`).
    pub gap_rereads: Family<ProcessorLabels, Counter>,
    pub batch_records: Family<ProcessorLabels, Histogram>,
    pub commit_seconds: Family<ProcessorLabels, Histogram>,
    pub restore_seconds: Family<ProcessorLabels, Histogram>,
    /// Partitions paused for backpressure right now.
    pub paused_partitions: Family<ProcessorLabels, Gauge>,
    /// Times a processor paused its partitions for backpressure.
    pub pauses: Family<ProcessorLabels, Counter>,
    /// Offset commits sent to the consumer group (coalesced: `orderflow_platform::group_commits`).
    pub group_commits: Family<ProcessorLabels, Counter>,
    pub gateway: GatewayMetrics,
    pub consumer: ConsumerMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayCallLabels {
    /// `charge`, `refund` or `void`.
    pub operation: String,
    /// `authorized`, `declined`, `refunded`, `error` (5xx, timeout, unreachable) or
    /// `rejected` (the circuit breaker was open; no call was made).
    pub outcome: String,
}

/// The payment worker's calls to the gateway.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    pub calls: Family<GatewayCallLabels, Counter>,
    pub call_seconds: Family<GatewayCallLabels, Histogram>,
    pub retries: Counter,
    /// Requests left unanswered for now (no answer after the call's retries): the saga sends
    /// them again.
    pub deferred: Counter,
    /// 1 while the circuit breaker is open (calls rejected without trying), else 0.
    pub circuit_open: Gauge,
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0])
}

fn commit_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ])
}

impl ProcessorMetrics {
    pub fn register(registry: &MetricsRegistry, consumer: ConsumerMetrics) -> Self {
        let m = Self {
            records: Family::default(),
            outputs: Family::default(),
            dead_letters: Family::default(),
            held_records: Family::default(),
            unsequenced_dead_letters: Family::default(),
            parked_keys: Family::default(),
            aborts: Family::default(),
            gap_rereads: Family::default(),
            batch_records: Family::new_with_constructor(batch_histogram),
            commit_seconds: Family::new_with_constructor(commit_histogram),
            restore_seconds: Family::new_with_constructor(commit_histogram),
            paused_partitions: Family::default(),
            pauses: Family::default(),
            group_commits: Family::default(),
            gateway: GatewayMetrics {
                calls: Family::default(),
                call_seconds: Family::new_with_constructor(commit_histogram),
                retries: Counter::default(),
                deferred: Counter::default(),
                circuit_open: Gauge::default(),
            },
            consumer,
        };
        registry.register(
            "processor_records",
            "Input records a processor committed",
            m.records.clone(),
        );
        registry.register(
            "processor_outputs",
            "Events a processor emitted and committed, by event type (the saga's outcomes)",
            m.outputs.clone(),
        );
        registry.register(
            "processor_dead_letters",
            "Input records a processor sent to its dead-letter topic (failed, or held behind a parked key: processor_held_records counts those)",
            m.dead_letters.clone(),
        );
        registry.register(
            "processor_held_records",
            "Input records a processor held on its dead-letter topic because their key was parked behind an earlier dead letter",
            m.held_records.clone(),
        );
        registry.register(
            "processor_unsequenced_dead_letters",
            "Dead letters that parked nothing because the partition had the most parked keys it keeps",
            m.unsequenced_dead_letters.clone(),
        );
        registry.register(
            "processor_parked_keys",
            "Keys whose records wait behind a dead letter, over the processor's partitions",
            m.parked_keys.clone(),
        );
        registry.register(
            "processor_transaction_aborts",
            "Batches aborted and redone from the last committed position",
            m.aborts.clone(),
        );
        registry.register(
            "processor_offset_gap_rereads",
            "Gaps in the input offsets read a second time before being passed (kafka.recheck_offset_gaps)",
            m.gap_rereads.clone(),
        );
        registry.register(
            "processor_batch_records",
            "Input records per committed transaction",
            m.batch_records.clone(),
        );
        registry.register(
            "processor_commit_duration_seconds",
            "Time from the last output's ack to the transaction's commit",
            m.commit_seconds.clone(),
        );
        registry.register(
            "processor_restore_duration_seconds",
            "Time to restore the state of newly assigned partitions from the changelog",
            m.restore_seconds.clone(),
        );
        registry.register(
            "processor_paused_partitions",
            "Input partitions paused: by a batch whose step work ran past processor.pause_after_ms, or by the pause switch (switches.paused_processors)",
            m.paused_partitions.clone(),
        );
        registry.register(
            "processor_pauses",
            "Times a processor paused its input partitions for backpressure",
            m.pauses.clone(),
        );
        registry.register(
            "processor_group_commits",
            "Offset commits a processor sent to its consumer group: at most one a second while batches keep coming, and one when its input goes quiet",
            m.group_commits.clone(),
        );
        registry.register(
            "payment_gateway_calls",
            "Calls of the payment worker to the gateway, by operation and outcome",
            m.gateway.calls.clone(),
        );
        registry.register(
            "payment_gateway_call_duration_seconds",
            "Latency of gateway calls, by operation and outcome",
            m.gateway.call_seconds.clone(),
        );
        registry.register(
            "payment_gateway_retries",
            "Gateway calls retried after an error",
            m.gateway.retries.clone(),
        );
        registry.register(
            "payment_requests_deferred",
            "Payment requests left unanswered for now (the saga sends them again)",
            m.gateway.deferred.clone(),
        );
        registry.register(
            "payment_gateway_circuit_open",
            "1 while the payment gateway's circuit breaker is open",
            m.gateway.circuit_open.clone(),
        );
        m
    }

    /// Metrics that go nowhere, for tools that run a processor outside a pipeline.
    pub fn unregistered() -> Self {
        Self::register(&MetricsRegistry::new(), ConsumerMetrics::default())
    }
}
