//! Logs and traces: `tracing` with a human or JSON format (`telemetry.format`), filtered by
//! `telemetry.filter` (or `RUST_LOG`), and OpenTelemetry spans exported over OTLP/HTTP when
//! `telemetry.otlp_endpoint` is set.
//!
//! One order is one trace: the ingest edge starts (or continues, from an incoming
//! `traceparent`) a span per order and writes its W3C trace context into the Kafka headers of
//! the event; each processor and projection continues the trace from the headers of the
//! record it handles ([`continue_trace`]) and passes it on ([`current_traceparent`]). The
//! per-record spans are DEBUG spans with a `trace_id` field: exported whenever an OTLP endpoint
//! is set, and naming the trace in the logs written inside them when the filter shows DEBUG.
//! Without export the context still travels hop to hop in the headers.

use std::collections::HashMap;

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter, fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

use crate::config::{LogFormat, TelemetrySettings};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_traceparents_are_well_formed_and_yield_their_trace_id() {
        let tp = new_traceparent();
        assert_eq!(tp.len(), 55, "{tp}");
        let trace_id = trace_id_of(&tp).expect("trace id");
        assert_eq!(&tp[3..35], trace_id);
        assert_eq!(trace_id_of("00-xyz-1-01"), None);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("telemetry.otlp_tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
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
    // OpenTelemetry spans cost CPU on every record of every hop (measured: the embedded
    // pipeline's sustained rate halved), so they are made only when they go somewhere. Without
    // an endpoint the trace context still travels: each hop passes its input's `traceparent`
    // on, and logs carry its trace id.
    if settings.otlp_endpoint.is_empty() {
        init_with_provider(settings, None);
        return Ok(TelemetryGuard { provider: None });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(otlp_client(settings)?)
        .with_endpoint(settings.otlp_endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: settings.otlp_endpoint.clone(),
            source,
        })?;
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .with_batch_exporter(exporter)
        .build();
    init_with_provider(settings, Some(provider.clone()));
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// The exporter's blocking HTTP client, built on a thread of its own: reqwest's blocking client
/// refuses to start inside a Tokio runtime, where `init` runs.
fn otlp_client(
    settings: &TelemetrySettings,
) -> Result<reqwest_otlp::blocking::Client, TelemetryError> {
    let tls = settings.otlp_tls.clone();
    std::thread::spawn(move || crate::tls::otlp_http_client(&tls))
        .join()
        .map_err(|_| {
            TelemetryError::Tls(crate::tls::TlsError::Http(
                "the OTLP client's setup thread panicked".to_owned(),
            ))
        })?
        .map_err(TelemetryError::Tls)
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
    }
    .with_filter(filter);
    // Per-record spans are DEBUG (nothing per event above DEBUG): the log filter leaves them
    // off, and they cost nothing, unless spans are exported, where this layer takes every
    // orderflow span whatever the log level.
    let traces = provider.map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("orderflow"))
            .with_filter(filter::filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("orderflow")
            }))
    });
    tracing_subscriber::registry()
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
    } else if let Some(trace_id) = traceparent.and_then(trace_id_of) {
        // Spans are not exported: the trace id still names the order's trace in the logs.
        span.record("trace_id", trace_id);
    }
}

/// Whether `span` carries an OpenTelemetry context (spans are being exported).
pub fn has_trace(span: &tracing::Span) -> bool {
    span.context().span().span_context().is_valid()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
}

/// A new W3C `traceparent` for a trace that starts here (an order from a producer that sent
/// none), used when spans are not exported and so make no context of their own.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
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
