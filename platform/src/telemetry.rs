//! Logs and traces: `tracing` with a human or JSON format (`telemetry.format`), filtered by
//! `telemetry.filter` (or `RUST_LOG`), and OpenTelemetry spans exported over OTLP/HTTP when
//! `telemetry.otlp_endpoint` is set.
//!
//! One order is one trace: the ingest edge starts (or continues, from an incoming
//! `traceparent`) a span per order and writes its W3C trace context into the Kafka headers of
//! the event; each processor and projection continues the trace from the headers of the
//! record it handles ([`continue_trace`]) and passes it on ([`current_traceparent`]). Spans carry
//! a `trace_id` field, so JSON logs written inside them name the trace.

use std::collections::HashMap;

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::config::{LogFormat, TelemetrySettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps span export alive; dropping it flushes what is buffered.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs logging, and span export when configured. A second call keeps the first setup.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    // Spans are always made, so trace context flows through HTTP and Kafka headers and logs
    // carry trace ids; they leave the process only when an endpoint is configured.
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build(),
    );
    if !settings.otlp_endpoint.is_empty() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(settings.otlp_endpoint.clone())
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: settings.otlp_endpoint.clone(),
                source,
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    init_with_provider(settings, Some(provider.clone()));
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// Installs logging with spans going to `provider` (tests pass an in-memory exporter).
/// Returns `false` if a subscriber was already installed.
pub fn init_with_provider(
    settings: &TelemetrySettings,
    provider: Option<SdkTracerProvider>,
) -> bool {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match settings.format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Human => fmt::layer().compact().with_writer(std::io::stderr).boxed(),
    };
    let traces = provider.map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer("orderflow"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok()
}

/// Makes `span` a child of the trace in `traceparent` (a W3C header value), if any, and
/// records its trace id on the span's `trace_id` field (declare it `Empty`).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent {
        let carrier = HashMap::from([("traceparent".to_owned(), value.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// The W3C `traceparent` of the current span, to pass the trace on; `None` when tracing is
/// not recording.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}
