//! The projections' metrics: events applied, skipped (already applied) and dead-lettered, batch
//! sizes and write latency, and the end-to-end latency of orders (event time of `OrderPlaced`,
//! carried by every later event, to the commit that made the order final), and the query
//! cache's hits, misses and invalidations.

use orderflow_platform::metrics::{ConsumerMetrics, MetricsRegistry};

use crate::cache::CacheMetrics;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinalLabels {
    /// `confirmed`, `rejected` or `cancelled`.
    pub status: String,
}

/// Buckets around the SLO "99.9 % of orders final within 5 s".
pub const END_TO_END_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone)]
pub struct ProjectionMetrics {
    pub applied: Family<ProjectionLabels, Counter>,
    pub skipped: Family<ProjectionLabels, Counter>,
    pub dead_letters: Family<ProjectionLabels, Counter>,
    /// Gaps in the input offsets read a second time (`kafka.recheck_offset_gaps`).
    pub gap_rereads: Family<ProjectionLabels, Counter>,
    /// Offset commits sent to the consumer group (coalesced: `orderflow_platform::group_commits`).
    pub group_commits: Family<ProjectionLabels, Counter>,
    pub batch_records: Family<ProjectionLabels, Histogram>,
    pub write_seconds: Family<ProjectionLabels, Histogram>,
    /// Orders that became final, by final status.
    pub orders_final: Family<FinalLabels, Counter>,
    pub end_to_end_seconds: Histogram,
    /// The query API's cache (crate::cache).
    pub cache: CacheMetrics,
    pub consumer: ConsumerMetrics,
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0])
}

fn write_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ])
}

impl ProjectionMetrics {
    pub fn register(registry: &MetricsRegistry, consumer: ConsumerMetrics) -> Self {
        let m = Self {
            applied: Family::default(),
            skipped: Family::default(),
            dead_letters: Family::default(),
            gap_rereads: Family::default(),
            group_commits: Family::default(),
            batch_records: Family::new_with_constructor(batch_histogram),
            write_seconds: Family::new_with_constructor(write_histogram),
            orders_final: Family::default(),
            end_to_end_seconds: Histogram::new(END_TO_END_BUCKETS),
            cache: CacheMetrics::default(),
            consumer,
        };
        registry.register(
            "query_cache_requests",
            "Lookups in the query API's cache, by cache and result (hit or miss)",
            m.cache.requests.clone(),
        );
        registry.register(
            "query_cache_invalidations",
            "Cache entries dropped because the projection committed a newer version",
            m.cache.invalidations.clone(),
        );
        registry.register(
            "projection_events_applied",
            "Events a projection applied",
            m.applied.clone(),
        );
        registry.register(
            "projection_events_skipped",
            "Events a projection skipped because its stored position is past them",
            m.skipped.clone(),
        );
        registry.register(
            "projection_dead_letters",
            "Records a projection sent to its dead-letter topic",
            m.dead_letters.clone(),
        );
        registry.register(
            "projection_offset_gap_rereads",
            "Gaps in the input offsets read a second time before being passed (kafka.recheck_offset_gaps)",
            m.gap_rereads.clone(),
        );
        registry.register(
            "projection_group_commits",
            "Offset commits a projection sent to its consumer group: at most one a second while batches keep coming, and one when its input goes quiet",
            m.group_commits.clone(),
        );
        registry.register(
            "projection_batch_records",
            "Records per projection write transaction",
            m.batch_records.clone(),
        );
        registry.register(
            "projection_write_duration_seconds",
            "Time to write and commit one projection batch",
            m.write_seconds.clone(),
        );
        registry.register(
            "orders_final",
            "Orders the orders projection saw become final, by status",
            m.orders_final.clone(),
        );
        registry.register(
            "order_end_to_end_seconds",
            "From an order's OrderPlaced event time to the projection commit that made it final",
            m.end_to_end_seconds.clone(),
        );
        m
    }

    /// Metrics that go nowhere, for tools and tests that run a writer outside a pipeline.
    pub fn unregistered() -> Self {
        Self::register(&MetricsRegistry::new(), ConsumerMetrics::default())
    }
}
