//! Metrics: one prometheus-client [`Registry`] per process, shared by every role in it and
//! served at `/metrics` (text exposition format). Each crate defines its own typed metrics in
//! its `metrics` module and registers them here at start; names follow Prometheus conventions
//! (`orderflow_` prefix, base units, `_total` on counters) and no label takes unbounded values
//! (never an order or customer id).
//!
//! This module owns the metrics every role shares: HTTP requests (a middleware for any axum
//! router) and Kafka consumer lag (from librdkafka's statistics, see [`GroupContext`]).
//!
//! [`GroupContext`]: crate::kafka::GroupContext

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::MetricType,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry},
};

/// The process's registry; clone freely.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
    /// Every registered family's full name and type, for [`Self::sample_names`].
    families: Arc<Mutex<Vec<(String, MetricType)>>>,
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Registry::with_prefix("orderflow"))),
            families: Arc::default(),
        }
    }

    /// Registers `metric` as `orderflow_<name>`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut families) = self.families.lock() {
            families.push((format!("orderflow_{name}"), metric.metric_type()));
        }
        if let Ok(mut registry) = self.inner.lock() {
            registry.register(name, help, metric);
        }
    }

    /// Every sample name `/metrics` can show, samples or not yet: counters as `_total`,
    /// histograms as `_bucket`, `_sum` and `_count`, the rest as registered. Rules and
    /// dashboards are checked against it.
    pub fn sample_names(&self) -> std::collections::BTreeSet<String> {
        let families = self.families.lock().map(|f| f.clone()).unwrap_or_default();
        let mut names = std::collections::BTreeSet::new();
        for (name, kind) in families {
            match kind {
                MetricType::Counter => {
                    names.insert(format!("{name}_total"));
                }
                MetricType::Histogram => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name);
                }
            }
        }
        names
    }

    /// The text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.inner.lock() {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &registry);
        }
        out
    }
}

/// `/metrics` for a router.
pub fn metrics_routes(registry: MetricsRegistry) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(registry)
}

async fn serve_metrics(State(registry): State<MetricsRegistry>) -> Response {
    let mut response = (StatusCode::OK, registry.encode()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Latency buckets for HTTP handlers, seconds: 1 ms to 10 s.
pub const HTTP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Which server: `ingest` or `query`.
    pub server: String,
    /// The route template (`/v1/orders/{order_id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub server: String,
    pub route: String,
    pub method: String,
}

/// HTTP request counts and latencies of one server.
#[derive(Clone)]
pub struct HttpMetrics {
    server: &'static str,
    requests: Family<HttpLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
}

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

impl HttpMetrics {
    /// Registers `http_requests` and `http_request_duration_seconds` (once per process).
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            server: "",
            requests: Family::default(),
            duration: Family::new_with_constructor(http_histogram),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by server, route template, method and status",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by server, route template and method",
            metrics.duration.clone(),
        );
        metrics
    }

    /// The same families, labelled `server` (`ingest`, `query`).
    pub fn for_server(&self, server: &'static str) -> Self {
        Self {
            server,
            ..self.clone()
        }
    }

    /// Wraps every route of `router` (call after the routes are added).
    pub fn layer(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), track))
    }
}

async fn track(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Unmatched paths share one label value: raw paths would be unbounded.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    metrics
        .duration
        .get_or_create(&RouteLabels {
            server: metrics.server.to_owned(),
            route: route.clone(),
            method: method.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&HttpLabels {
            server: metrics.server.to_owned(),
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProducerLabels {
    /// The producing role, e.g. `ingest`.
    pub producer: String,
}

/// Records waiting in a producer's queue (not yet acknowledged), from librdkafka's statistics.
#[derive(Clone, Default)]
pub struct ProducerMetrics {
    pub queue_messages: Family<ProducerLabels, Gauge>,
}

impl ProducerMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kafka_producer_queue_messages",
            "Records in the producer's queue, waiting to be sent or acknowledged",
            metrics.queue_messages.clone(),
        );
        metrics
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// Consumer lag and position per assigned partition, from librdkafka's statistics.
#[derive(Clone, Default)]
pub struct ConsumerMetrics {
    pub lag: Family<PartitionLabels, Gauge>,
    pub position: Family<PartitionLabels, Gauge>,
}

impl ConsumerMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kafka_consumer_lag_records",
            "Records between the consumer's position and the partition's end, per assigned partition",
            metrics.lag.clone(),
        );
        registry.register(
            "kafka_consumer_position",
            "Next offset the consumer will read, per assigned partition",
            metrics.position.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_are_encoded_with_the_prefix() {
        let registry = MetricsRegistry::new();
        let counter: Counter = Counter::default();
        registry.register("things", "Things", counter.clone());
        counter.inc_by(3);
        let text = registry.encode();
        assert!(text.contains("orderflow_things_total 3"), "{text}");
        assert!(text.contains("# HELP orderflow_things Things."), "{text}");
    }
}
