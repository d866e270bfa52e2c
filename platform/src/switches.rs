//! The operational switches in force in this process (`[switches]`, and the outcome-deciding
//! ones of `[fraud]` for display): set at start and on every reload, read by the edge (are
//! orders accepted?) and the processor runtime (is a processor paused?). Every change is logged
//! and exported as `orderflow_switch_on{switch}` (1 on, 0 off), so a dashboard shows which are
//! thrown and an alert can say for how long.

use std::sync::Arc;

use axum::http::StatusCode;
use prometheus_client::{encoding::EncodeLabelSet, metrics::family::Family, metrics::gauge::Gauge};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::{Settings, SwitchSettings, PROCESSOR_NAMES},
    http::Problem,
    metrics::MetricsRegistry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwitchLabels {
    switch: String,
}

/// What the switches are, shared by every part of the process that obeys one.
#[derive(Clone)]
pub struct Switches {
    current: Arc<watch::Sender<SwitchSettings>>,
    gauge: Family<SwitchLabels, Gauge>,
}

impl Switches {
    /// The switches of `settings`, exported on `registry`.
    pub fn new(settings: &Settings, registry: &MetricsRegistry) -> Self {
        let gauge = Family::<SwitchLabels, Gauge>::default();
        registry.register(
            "switch_on",
            "Operational switches: 1 when thrown (orders refused, a processor paused, every order held, a fraud model version in force), else 0",
            gauge.clone(),
        );
        let switches = Self {
            current: Arc::new(watch::channel(settings.switches.clone()).0),
            gauge,
        };
        switches.export(settings);
        for line in describe(&settings.switches) {
            info!(switch = %line, "Operational switch thrown at start.");
        }
        switches
    }

    /// Applies reloaded settings: logs each switch that changed, exports them all.
    pub fn set(&self, settings: &Settings) {
        let old = self.current.borrow().clone();
        let new = settings.switches.clone();
        if old.accept_orders != new.accept_orders {
            if new.accept_orders {
                info!("Switch: orders are accepted again.");
            } else {
                warn!(retry_after_secs = new.retry_after_secs, "Switch: new orders are refused (503) until switches.accept_orders is true again.");
            }
        }
        for name in PROCESSOR_NAMES {
            let (was, is) = (
                old.paused_processors.iter().any(|p| p == name),
                new.paused_processors.iter().any(|p| p == name),
            );
            match (was, is) {
                (false, true) => warn!(processor = name, "Switch: processor paused."),
                (true, false) => info!(processor = name, "Switch: processor resumed."),
                _ => {}
            }
        }
        self.export(settings);
        self.current.send_replace(new);
    }

    fn export(&self, settings: &Settings) {
        let set = |switch: String, on: bool| {
            self.gauge
                .get_or_create(&SwitchLabels { switch })
                .set(i64::from(on));
        };
        let s = &settings.switches;
        set("refuse_orders".to_owned(), !s.accept_orders);
        for name in PROCESSOR_NAMES {
            set(
                format!("pause_{name}"),
                s.paused_processors.iter().any(|p| p == name),
            );
        }
        // The outcome-deciding switches as configured here; the saga applies them from their
        // place in the log (its rules' control records).
        set(
            "hold_all_for_review".to_owned(),
            settings.fraud.hold_all_for_review,
        );
        set(format!("fraud_model_{}", settings.fraud.model), true);
        for other in settings.fraud.models.keys() {
            if *other != settings.fraud.model {
                set(format!("fraud_model_{other}"), false);
            }
        }
        if settings.fraud.model != crate::config::BASELINE_FRAUD_MODEL {
            set(
                format!("fraud_model_{}", crate::config::BASELINE_FRAUD_MODEL),
                false,
            );
        }
    }

    /// `Err` (503 with `Retry-After`) while new orders are refused.
    pub fn orders_accepted(&self) -> Result<(), Problem> {
        let current = self.current.borrow();
        if current.accept_orders {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "maintenance",
            "Not accepting orders",
        )
        .detail("orders are not accepted during maintenance; retry later")
        .retry_after(u32::try_from(current.retry_after_secs).unwrap_or(u32::MAX)))
    }

    /// Whether `processor` is paused now.
    pub fn paused(&self, processor: &str) -> bool {
        self.current
            .borrow()
            .paused_processors
            .iter()
            .any(|p| p == processor)
    }

    /// Changes of the switches, for a task that waits for one (a paused processor).
    pub fn subscribe(&self) -> watch::Receiver<SwitchSettings> {
        self.current.subscribe()
    }
}

fn describe(switches: &SwitchSettings) -> Vec<String> {
    let mut thrown = Vec::new();
    if !switches.accept_orders {
        thrown.push("orders refused".to_owned());
    }
    for p in &switches.paused_processors {
        thrown.push(format!("processor {p} paused"));
    }
    thrown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let mut overrides = Overrides::default();
        for (k, v) in pairs {
            overrides.set(*k, v);
        }
        Settings::from_defaults(&overrides).expect("settings")
    }

    #[test]
    fn switches_change_on_reload_and_are_exported() {
        let registry = MetricsRegistry::new();
        let switches = Switches::new(&settings(&[]), &registry);
        assert!(switches.orders_accepted().is_ok());
        assert!(!switches.paused("saga"));
        let changes = switches.subscribe();

        switches.set(&settings(&[
            ("switches.accept_orders", "false"),
            ("switches.retry_after_secs", "120"),
            ("switches.paused_processors", "[\"saga\"]"),
            ("fraud.hold_all_for_review", "true"),
        ]));
        assert!(changes.has_changed().expect("open"));
        let refused = switches.orders_accepted().expect_err("refused");
        assert_eq!(refused.status, 503);
        assert_eq!(refused.retry_after, Some(120));
        assert!(switches.paused("saga") && !switches.paused("payments"));
        let text = registry.encode();
        for line in [
            "orderflow_switch_on{switch=\"refuse_orders\"} 1",
            "orderflow_switch_on{switch=\"pause_saga\"} 1",
            "orderflow_switch_on{switch=\"pause_payments\"} 0",
            "orderflow_switch_on{switch=\"hold_all_for_review\"} 1",
            "orderflow_switch_on{switch=\"fraud_model_baseline\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn a_paused_processor_must_exist_and_a_model_version_must_be_defined() {
        let mut overrides = Overrides::default();
        overrides.set("switches.paused_processors", "[\"sagaa\"]");
        overrides.set("fraud.model", "\"strict\"");
        let err = Settings::from_defaults(&overrides)
            .expect_err("invalid")
            .to_string();
        assert!(
            err.contains("switches.paused_processors: \"sagaa\""),
            "{err}"
        );
        assert!(err.contains("fraud.model: \"strict\""), "{err}");

        let s = settings(&[
            ("fraud.model", "\"strict\""),
            ("fraud.models.strict.review_threshold", "0.3"),
        ]);
        let model = s.fraud.in_force();
        assert_eq!(model.review_threshold, 0.3);
        assert_eq!(model.reject_threshold, s.fraud.reject_threshold);
        assert!(model.models.is_empty());
    }
}
