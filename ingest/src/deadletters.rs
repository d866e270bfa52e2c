//! Dead letters on the admin listener: the same operations as `orderflow dlq`, over the same
//! code (`orderflow_deadletters`). A resolution records the authenticated caller's name as who
//! made it.
//!
//! - `GET /v1/dead-letters`: each dead-letter topic's pending and resolved counts;
//! - `GET /v1/dead-letters/{topic}?all=true`: its letters (pending only by default);
//! - `GET /v1/dead-letters/{topic}/{partition}/{offset}`: one letter;
//! - `POST …/{offset}/redrive`: put it back on its source topic, as it was (no body) or as the
//!   corrected event in the body (`{"event_type", "event"}`, what the letter shows);
//! - `POST …/{offset}/discard`: park it for good (`{"note"}`);
//! - `POST /v1/dead-letters/{topic}/release`: put back the held letters whose earlier letters
//!   are all resolved (what [`release_held`] does every [`RELEASE_INTERVAL`]).
//!
//! [`census`] counts the pending letters every minute for the gauges
//! `orderflow_dead_letters_pending` and `orderflow_dead_letters_oldest_pending_age_seconds`
//! (alert `DeadLettersWaiting`).

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, QueryRejection},
        Path, Query, State,
    },
    http::StatusCode,
    Extension, Json,
};
use orderflow_auth::Caller;
use orderflow_deadletters::{Correction, DeadLetterError, DeadLetters, LetterId};
use orderflow_platform::http::Problem;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    metrics::{IngestMetrics, TopicLabels},
    routes::{read_body, IngestState},
};

/// How often [`census`] counts.
pub const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counts each dead-letter topic's pending letters and the age of its oldest, into `metrics`,
/// every `every` (the first count after one interval: the pipeline has just started, and its
/// topics may be being created), until `cancel`. A count that fails keeps the last figures and
/// is logged.
pub async fn census(
    dead_letters: DeadLetters,
    metrics: IngestMetrics,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let summaries = match dead_letters.summaries().await {
            Ok(summaries) => summaries,
            Err(e) => {
                tracing::warn!(error = %e, "Counting the dead letters failed; retrying later.");
                continue;
            }
        };
        let now = crate::routes::now_ms();
        for summary in summaries {
            let labels = TopicLabels {
                topic: summary.topic.to_owned(),
            };
            metrics
                .dead_letters_pending
                .get_or_create(&labels)
                .set(i64::try_from(summary.pending).unwrap_or(i64::MAX));
            metrics
                .dead_letters_oldest_pending_age
                .get_or_create(&labels)
                .set(
                    summary
                        .oldest_pending_ms
                        .map_or(0, |at| (now - at).max(0) / 1000),
                );
        }
    }
}

/// How often [`release_held`] releases.
pub const RELEASE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Releases the held letters whose chains' earlier letters are resolved, every `every`, until
/// `cancel` (`DeadLetters::release_ready`): a key parked behind a letter an operator resolved
/// catches up by itself, however many records it kept receiving meanwhile. A pass that fails is
/// logged and the next one tries again; a release repeated after a crash is harmless (its
/// consumer holds the copy and drops it once it comes through).
pub async fn release_held(
    dead_letters: DeadLetters,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = dead_letters.release_ready().await {
            tracing::warn!(error = %e, "Releasing held dead letters failed; retrying later.");
        }
    }
}

/// `?all=true` lists resolved letters too.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Resolved letters too.
    #[serde(default)]
    pub all: bool,
}

/// A discard's reason.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardBody {
    /// Why the letter is discarded.
    pub note: String,
}

fn dead_letters(state: &IngestState) -> Result<&DeadLetters, Problem> {
    state.dead_letters.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dead-letters-unavailable",
            "Dead letters are not served by this instance",
        )
    })
}

fn who(caller: Option<Extension<Caller>>) -> String {
    caller
        .as_ref()
        .and_then(|Extension(c)| c.principal().map(|p| p.name.clone()))
        .unwrap_or_else(|| "admin API".to_owned())
}

/// Maps the tool's errors to problems: what the caller named is 404, a letter already resolved
/// 409, a correction that is needed or invalid 422, the broker 503.
fn problem(error: DeadLetterError) -> Problem {
    let detail = error.to_string();
    let (status, code, title) = match &error {
        DeadLetterError::NotADeadLetterTopic { .. }
        | DeadLetterError::BadLetter(_)
        | DeadLetterError::NoSuchLetter(_) => (
            StatusCode::NOT_FOUND,
            "no-such-dead-letter",
            "No such dead letter",
        ),
        DeadLetterError::AlreadyResolved { .. } => (
            StatusCode::CONFLICT,
            "dead-letter-resolved",
            "The dead letter is already resolved",
        ),
        DeadLetterError::OutOfTurn { .. } => (
            StatusCode::CONFLICT,
            "dead-letter-out-of-turn",
            "An earlier letter of the same key must be resolved first",
        ),
        DeadLetterError::NeedsCorrection { .. }
        | DeadLetterError::BadCorrection(_)
        | DeadLetterError::NoSource { .. }
        | DeadLetterError::Encode(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-redrive",
            "The dead letter cannot be redriven like this",
        ),
        DeadLetterError::Kafka { .. }
        | DeadLetterError::Timeout { .. }
        | DeadLetterError::Json(_)
        | DeadLetterError::Join(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker-unavailable",
            "The dead letters could not be read or written",
        ),
    };
    Problem::new(status, code, title).detail(detail)
}

fn letter(topic: &str, partition: &str, offset: &str) -> Result<LetterId, Problem> {
    LetterId::parse(topic, &format!("{partition}/{offset}")).map_err(problem)
}

/// Each dead-letter topic's pending and resolved letters.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "admin",
    responses(
        (status = 200, description = "One entry per dead-letter topic: `topic`, `pending`, `resolved`, `older_not_read`.", body = Object),
        (status = 503, description = "The broker could not be read.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn overview(State(state): State<IngestState>) -> Result<Json<Value>, Problem> {
    let topics = dead_letters(&state)?.summaries().await.map_err(problem)?;
    Ok(Json(json!({ "topics": topics })))
}

/// The letters of one dead-letter topic: pending ones, or all with `?all=true`.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{topic}",
    tag = "admin",
    params(
        ("topic" = String, Path, description = "A dead-letter topic, e.g. orderflow.saga.dlq."),
        ListQuery,
    ),
    responses(
        (status = 200, description = "`letters`: each with its reason, consumer, source, key, headers, event (decoded) and resolution; `older_not_read`.", body = Object),
        (status = 400, description = "Invalid query.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a dead-letter topic.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker could not be read.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<IngestState>,
    Path(topic): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let Query(query) = query.map_err(|e| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query")
            .detail(e.body_text())
    })?;
    let dlq = dead_letters(&state)?;
    let (letters, left_out) = dlq.list(&topic).await.map_err(problem)?;
    let shown: Vec<_> = letters
        .iter()
        .filter(|l| query.all || l.is_pending())
        .collect();
    Ok(Json(
        json!({ "letters": shown, "older_not_read": left_out }),
    ))
}

/// One dead letter.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{topic}/{partition}/{offset}",
    tag = "admin",
    params(
        ("topic" = String, Path, description = "A dead-letter topic."),
        ("partition" = String, Path, description = "The letter's partition."),
        ("offset" = String, Path, description = "The letter's offset."),
    ),
    responses(
        (status = 200, description = "The letter: reason, consumer, source, key, headers, the event decoded (or why it does not decode), resolution.", body = Object),
        (status = 404, description = "No such letter.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker could not be read.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(state): State<IngestState>,
    Path((topic, partition, offset)): Path<(String, String, String)>,
) -> Result<Json<Value>, Problem> {
    let dlq = dead_letters(&state)?;
    let letter = letter(&topic, &partition, &offset)?;
    let dead = dlq.get(&letter).await.map_err(problem)?;
    Ok(Json(
        serde_json::to_value(&dead).map_err(|e| problem(DeadLetterError::Json(e)))?,
    ))
}

/// Put a letter back on its source topic, with a new event id derived from the original: as it
/// was (no body), or as the corrected event in the body.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{topic}/{partition}/{offset}/redrive",
    tag = "admin",
    params(
        ("topic" = String, Path, description = "A dead-letter topic."),
        ("partition" = String, Path, description = "The letter's partition."),
        ("offset" = String, Path, description = "The letter's offset."),
    ),
    request_body(content = Object, content_type = "application/json", description = "Optional: the corrected event, `{\"event_type\": \"OrderPlaced\", \"event\": {...}}` (the letter's own document, edited, will do)."),
    responses(
        (status = 200, description = "Redriven: `letter` and `resolution` (the event's id, topic, partition, offset).", body = Object),
        (status = 404, description = "No such letter.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The letter is already resolved.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The letter does not decode and no correction was given, or the correction is invalid.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker could not be read or written.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn redrive(
    State(state): State<IngestState>,
    Path((topic, partition, offset)): Path<(String, String, String)>,
    caller: Option<Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let dlq = dead_letters(&state)?;
    let letter = letter(&topic, &partition, &offset)?;
    let body = read_body(body)?;
    let correction = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let document: Value = serde_json::from_slice(&body).map_err(|e| {
            problem(DeadLetterError::BadCorrection(format!(
                "the body is not JSON: {e}"
            )))
        })?;
        Some(Correction::from_json(&document).map_err(problem)?)
    };
    let resolution = dlq
        .redrive(&letter, correction, &who(caller))
        .await
        .map_err(problem)?;
    Ok(Json(
        json!({ "letter": letter.to_string(), "resolution": resolution }),
    ))
}

/// Park a letter for good, saying why.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{topic}/{partition}/{offset}/discard",
    tag = "admin",
    params(
        ("topic" = String, Path, description = "A dead-letter topic."),
        ("partition" = String, Path, description = "The letter's partition."),
        ("offset" = String, Path, description = "The letter's offset."),
    ),
    request_body(content = DiscardBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Discarded: `letter` and `resolution`.", body = Object),
        (status = 404, description = "No such letter.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The letter is already resolved.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No note, or an invalid body.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker could not be read or written.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn discard(
    State(state): State<IngestState>,
    Path((topic, partition, offset)): Path<(String, String, String)>,
    caller: Option<Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let dlq = dead_letters(&state)?;
    let letter = letter(&topic, &partition, &offset)?;
    let body = read_body(body)?;
    let request: DiscardBody = crate::commands::parse(&body)?;
    if request.note.trim().is_empty() {
        return Err(crate::commands::invalid(
            "note",
            "say why the letter is discarded",
        ));
    }
    let resolution = dlq
        .discard(&letter, &request.note, &who(caller))
        .await
        .map_err(problem)?;
    Ok(Json(
        json!({ "letter": letter.to_string(), "resolution": resolution }),
    ))
}

/// Put back the held letters of one dead-letter topic whose chains' earlier letters are all
/// resolved, in their order.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{topic}/release",
    tag = "admin",
    params(
        ("topic" = String, Path, description = "A dead-letter topic."),
    ),
    responses(
        (status = 200, description = "`released`: how many held letters were put back.", body = Object),
        (status = 404, description = "Not a dead-letter topic.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker could not be read or written.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn release(
    State(state): State<IngestState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, Problem> {
    let released = dead_letters(&state)?
        .release_in(&topic)
        .await
        .map_err(problem)?;
    Ok(Json(json!({ "released": released })))
}
