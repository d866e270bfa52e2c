//! Projection replays on the admin listener: `POST /v1/projections/{projection}/replay` starts
//! one in the background (`202`), `GET /v1/projections/{projection}/replay` says how the latest
//! one started here went. The same operation as `orderflow replay PROJECTION`, over the same
//! code ([`ProjectionReplayer`], implemented over the projections crate by the binary).
//!
//! A replay takes as long as reading the log from the beginning, so the request does not wait
//! for it. One replay of a projection runs at a time: here a second request is `409`; across
//! processes (another instance, the CLI) the replay's own lock refuses it, and the run ends
//! `failed` with that reason. Runs are remembered by this process only, and a replay cut short
//! by a restart leaves the live tables as they were (the swap is one transaction).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use orderflow_platform::http::Problem;
use serde::Serialize;
use tracing::{info, warn};

use crate::routes::{now_ms, IngestState};

/// What a finished replay reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Log records folded.
    pub records: usize,
    /// Rows per table swapped in.
    pub rows: BTreeMap<String, i64>,
}

/// Rebuilds projections from the log (implemented over the projections crate).
pub trait ProjectionReplayer: Send + Sync + 'static {
    /// The projections it can rebuild.
    fn projections(&self) -> &'static [&'static str];

    fn replay(
        &self,
        projection: &str,
    ) -> Pin<Box<dyn Future<Output = Result<ReplaySummary, String>> + Send + '_>>;
}

/// Where a replay run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
}

/// One replay run.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplayRun {
    pub projection: String,
    pub state: RunState,
    /// Unix milliseconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Log records folded (when succeeded).
    pub records: Option<usize>,
    /// Rows per table swapped in (when succeeded).
    pub rows: BTreeMap<String, i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Where to follow it on this listener.
    pub status_url: String,
}

/// The replays this process started, by projection.
#[derive(Clone)]
pub struct Replays {
    replayer: Arc<dyn ProjectionReplayer>,
    runs: Arc<Mutex<HashMap<String, ReplayRun>>>,
}

impl Replays {
    pub fn new(replayer: Arc<dyn ProjectionReplayer>) -> Self {
        Self {
            replayer,
            runs: Arc::default(),
        }
    }

    /// The runs; a panic elsewhere while holding them leaves plain data, still usable.
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplayRun>> {
        self.runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn latest(&self, projection: &str) -> Option<ReplayRun> {
        self.runs().get(projection).cloned()
    }

    /// Starts a run unless one of `projection` is running here (then: when that one started).
    fn start(&self, projection: &str) -> Result<ReplayRun, i64> {
        let mut runs = self.runs();
        if let Some(run) = runs.get(projection) {
            if run.state == RunState::Running {
                return Err(run.started_at);
            }
        }
        let run = ReplayRun {
            projection: projection.to_owned(),
            state: RunState::Running,
            started_at: now_ms(),
            finished_at: None,
            records: None,
            rows: BTreeMap::new(),
            error: None,
            status_url: status_path(projection),
        };
        runs.insert(projection.to_owned(), run.clone());
        drop(runs);
        let this = self.clone();
        let name = projection.to_owned();
        tokio::spawn(async move {
            info!(projection = %name, "Replay started over the admin API.");
            let outcome = this.replayer.replay(&name).await;
            if let Some(run) = this.runs().get_mut(&name) {
                run.finished_at = Some(now_ms());
                match outcome {
                    Ok(summary) => {
                        info!(projection = %name, records = summary.records, "Replay succeeded.");
                        run.state = RunState::Succeeded;
                        run.records = Some(summary.records);
                        run.rows = summary.rows;
                    }
                    Err(e) => {
                        warn!(projection = %name, error = %e, "Replay failed.");
                        run.state = RunState::Failed;
                        run.error = Some(e);
                    }
                }
            }
        });
        Ok(run)
    }
}

fn status_path(projection: &str) -> String {
    format!("/v1/projections/{projection}/replay")
}

fn replays<'a>(state: &'a IngestState, projection: &str) -> Result<&'a Replays, Problem> {
    let replays = state
        .replays
        .as_ref()
        .ok_or_else(|| Problem::unavailable("projection replays (no database configured)"))?;
    if !replays.replayer.projections().contains(&projection) {
        return Err(
            Problem::not_found(&format!("projection {projection}")).detail(format!(
                "no projection {projection}: expected one of {}",
                replays.replayer.projections().join(", ")
            )),
        );
    }
    Ok(replays)
}

/// Rebuild a projection from the beginning of the log and swap it in; runs in the background.
#[utoipa::path(
    post,
    path = "/v1/projections/{projection}/replay",
    tag = "admin",
    params(("projection" = String, Path, description = "orders or inventory")),
    responses(
        (status = 202, description = "Started; follow it at `status_url`.", body = ReplayRun),
        (status = 404, description = "No such projection.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A replay of this projection is running.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn start(
    State(state): State<IngestState>,
    Path(projection): Path<String>,
) -> Result<Response, Problem> {
    let replays = replays(&state, &projection)?;
    match replays.start(&projection) {
        Ok(run) => {
            let mut response = (StatusCode::ACCEPTED, Json(run)).into_response();
            if let Ok(location) = HeaderValue::from_str(&status_path(&projection)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
        Err(started_at) => Err(Problem::new(
            StatusCode::CONFLICT,
            "replay-running",
            "A replay is running",
        )
        .detail(format!(
            "a replay of projection {projection} started at {started_at} is still running; \
             follow it at {}",
            status_path(&projection)
        ))),
    }
}

/// The latest replay of a projection started on this instance.
#[utoipa::path(
    get,
    path = "/v1/projections/{projection}/replay",
    tag = "admin",
    params(("projection" = String, Path, description = "orders or inventory")),
    responses(
        (status = 200, description = "The latest run.", body = ReplayRun),
        (status = 404, description = "No such projection, or no replay of it started here.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn status(
    State(state): State<IngestState>,
    Path(projection): Path<String>,
) -> Result<Json<ReplayRun>, Problem> {
    replays(&state, &projection)?
        .latest(&projection)
        .map(Json)
        .ok_or_else(|| {
            Problem::not_found(&format!("replay of {projection}")).detail(format!(
                "no replay of projection {projection} was started on this instance"
            ))
        })
}
