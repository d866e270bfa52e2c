//! Logging setup: `tracing` with a human or JSON format, chosen by `telemetry.format`, filtered
//! by `telemetry.filter` (or `RUST_LOG` when set).

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global subscriber. A second call (tests) keeps the first and returns `false`.
pub fn init(settings: &TelemetrySettings) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
            .is_ok(),
        LogFormat::Human => builder.compact().try_init().is_ok(),
    }
}
