//! Readiness: every component of a process reports whether it can do its work, and `/readyz`
//! answers `200` only when all can, naming each one that cannot and why. (`/healthz`, in
//! [`crate::http`], only says the process is alive.)
//!
//! Components set their own state: consumers when they join their group (see
//! [`crate::kafka::GroupContext::with_readiness`]), and the binary's watcher for the broker and
//! the database (reachable, migrations applied).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde::Serialize;

/// The readiness of every component of a process; clone freely.
#[derive(Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<String, Option<String>>>>,
}

/// What `/readyz` answers.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    pub ready: bool,
    /// Component → `"ready"` or why not.
    pub components: BTreeMap<String, String>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, component: &str) {
        self.set(component, None);
    }

    pub fn set_not_ready(&self, component: &str, reason: impl Into<String>) {
        self.set(component, Some(reason.into()));
    }

    fn set(&self, component: &str, reason: Option<String>) {
        if let Ok(mut components) = self.components.lock() {
            components.insert(component.to_owned(), reason);
        }
    }

    /// All components and whether the process is ready (it is not with no components at all).
    pub fn report(&self) -> ReadinessReport {
        let components = self
            .components
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        ReadinessReport {
            ready: !components.is_empty() && components.values().all(Option::is_none),
            components: components
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_else(|| "ready".to_owned())))
                .collect(),
        }
    }
}

/// `/readyz`.
pub fn readiness_routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    let report = readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is() {
        let r = Readiness::new();
        assert!(!r.report().ready, "nothing registered is not ready");
        r.set_ready("broker");
        r.set_not_ready("database", "unreachable");
        let report = r.report();
        assert!(!report.ready);
        assert_eq!(report.components["database"], "unreachable");
        assert_eq!(report.components["broker"], "ready");
        r.set_ready("database");
        assert!(r.report().ready);
    }
}
