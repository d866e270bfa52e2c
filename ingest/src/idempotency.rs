//! `Idempotency-Key` on the ingest edge's POSTs.
//!
//! A key is scoped to its principal. The first request with a key claims it (a row in
//! `idempotency_keys`, `in_flight`) and records the order id and time it will use; its answer is
//! stored, and the same key with the same request (method, path, body) gets that answer again
//! (`idempotent-replayed: true`), a different request `422`. A concurrent duplicate waits up to
//! `ingest.idempotency_wait_ms` for the first to finish, then is answered `409`. Keys expire
//! after `ingest.idempotency_ttl_secs`.
//!
//! Why nothing is doubled: a `503` (the broker did not acknowledge in time — the event may still
//! have been written) is not stored; the key goes back to `failed` with its order id and time,
//! so the retry publishes the very same event (same ids, same bytes) which every consumer drops
//! as a duplicate. A process that crashes mid-request leaves `in_flight`, which another request
//! may take over after [`STALE_AFTER`] — again with the recorded ids. A stored `2xx`/`4xx` is
//! written only after the handler finished, so a crash before it is the same as a `503`.

use std::time::Duration;

use axum::{
    body::{to_bytes, Body},
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use orderflow_auth::Caller;
use orderflow_db::Database;
use orderflow_platform::http::Problem;
use sha2::{Digest, Sha256};
use tracing::warn;
use uuid::Uuid;

/// Header of the key, in requests.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header marking a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// An `in_flight` claim older than this was left by a crashed process and may be taken over.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// Largest answer stored (a full batch answer fits many times over).
const MAX_STORED_BODY: usize = 4 << 20;

/// What the first request of a key chose, handed to the handler in the request's extensions:
/// the order id (a batch derives one per item) and the event time.
#[derive(Debug, Clone, Copy)]
pub struct Seed {
    pub order_id: Uuid,
    pub occurred_at: i64,
}

impl Seed {
    /// The order id of item `index` of a batch.
    pub fn item(&self, index: usize) -> Uuid {
        Uuid::new_v5(&self.order_id, &(index as u64).to_be_bytes())
    }
}

/// A stored answer.
#[derive(Debug, Clone)]
struct Stored {
    status: u16,
    content_type: Option<String>,
    location: Option<String>,
    body: String,
}

enum Claim {
    Fresh(Seed),
    Replay(Stored),
    Conflict,
    InFlight,
}

#[derive(Clone)]
pub struct IdempotencyStore {
    db: Database,
    ttl: Duration,
    wait: Duration,
    max_body_bytes: usize,
}

fn now_ms() -> i64 {
    crate::routes::now_ms()
}

type Row = (
    String,
    String,
    i64,
    String,
    i64,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl IdempotencyStore {
    pub fn new(db: Database, ttl: Duration, wait: Duration, max_body_bytes: usize) -> Self {
        Self {
            db,
            ttl,
            wait,
            max_body_bytes,
        }
    }

    async fn claim(&self, principal: &str, key: &str, fingerprint: &str) -> sqlx::Result<Claim> {
        let pool = self.db.pool();
        let now = now_ms();
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 AND expires_at < $3",
        )
        .bind(principal)
        .bind(key)
        .bind(now)
        .execute(pool)
        .await?;
        let seed = Seed {
            order_id: Uuid::now_v7(),
            occurred_at: now,
        };
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys \
             (principal, key, fingerprint, seed, occurred_at, state, claimed_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, $7) \
             ON CONFLICT (principal, key) DO NOTHING",
        )
        .bind(principal)
        .bind(key)
        .bind(fingerprint)
        .bind(seed.order_id.to_string())
        .bind(seed.occurred_at)
        .bind(now)
        .bind(now + self.ttl.as_millis() as i64)
        .execute(pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Fresh(seed));
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let row: Option<Row> = sqlx::query_as(
                "SELECT fingerprint, seed, occurred_at, state, claimed_at, status, content_type, \
                 location, body FROM idempotency_keys WHERE principal = $1 AND key = $2",
            )
            .bind(principal)
            .bind(key)
            .fetch_optional(pool)
            .await?;
            let Some((stored_fp, seed, occurred_at, state, claimed_at, status, ct, loc, body)) =
                row
            else {
                // Expired and deleted by a concurrent request in between: start over.
                return Box::pin(self.claim(principal, key, fingerprint)).await;
            };
            if stored_fp != fingerprint {
                return Ok(Claim::Conflict);
            }
            let now = now_ms();
            let stale = now - claimed_at > STALE_AFTER.as_millis() as i64;
            match state.as_str() {
                "done" => {
                    return Ok(Claim::Replay(Stored {
                        status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                        content_type: ct,
                        location: loc,
                        body: body.unwrap_or_default(),
                    }))
                }
                "failed" | "in_flight" if state == "failed" || stale => {
                    let taken = sqlx::query(
                        "UPDATE idempotency_keys SET state = 'in_flight', claimed_at = $1 \
                         WHERE principal = $2 AND key = $3 AND state = $4 AND claimed_at = $5",
                    )
                    .bind(now)
                    .bind(principal)
                    .bind(key)
                    .bind(&state)
                    .bind(claimed_at)
                    .execute(pool)
                    .await?;
                    if taken.rows_affected() == 1 {
                        let order_id = Uuid::parse_str(&seed).unwrap_or_else(|_| Uuid::now_v7());
                        return Ok(Claim::Fresh(Seed {
                            order_id,
                            occurred_at,
                        }));
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Claim::InFlight);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn complete(&self, principal: &str, key: &str, answer: &Stored) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', status = $1, content_type = $2, \
             location = $3, body = $4 WHERE principal = $5 AND key = $6",
        )
        .bind(i32::from(answer.status))
        .bind(&answer.content_type)
        .bind(&answer.location)
        .bind(&answer.body)
        .bind(principal)
        .bind(key)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    async fn release(&self, principal: &str, key: &str) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'failed' WHERE principal = $1 AND key = $2",
        )
        .bind(principal)
        .bind(key)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Deletes expired keys; returns how many.
    pub async fn purge_expired(&self) -> sqlx::Result<u64> {
        Ok(
            sqlx::query("DELETE FROM idempotency_keys WHERE expires_at < $1")
                .bind(now_ms())
                .execute(self.db.pool())
                .await?
                .rows_affected(),
        )
    }
}

fn problem(status: StatusCode, code: &str, title: &str, detail: &str) -> Response {
    Problem::new(status, code, title)
        .detail(detail)
        .into_response()
}

fn valid_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Route middleware over the POSTs that honour `Idempotency-Key`; `None` store: keys are
/// refused with `400` (this edge keeps no database).
pub async fn guard(
    State(store): State<Option<IdempotencyStore>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = request.headers().get(IDEMPOTENCY_KEY) else {
        return next.run(request).await;
    };
    let Some(key) = key
        .to_str()
        .ok()
        .filter(|k| valid_key(k))
        .map(str::to_owned)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "an Idempotency-Key is 1 to 255 visible ASCII characters",
        );
    };
    let Some(store) = store else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "this edge runs without a database and cannot honour Idempotency-Key",
        );
    };
    let principal = request
        .extensions()
        .get::<Caller>()
        .and_then(Caller::principal)
        .map(|p| p.id.clone())
        .unwrap_or_else(|| "anonymous".to_owned());
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, store.max_body_bytes).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            "the request body is larger than ingest.max_body_bytes",
        );
    };
    let mut hash = Sha256::new();
    hash.update(parts.method.as_str());
    hash.update(b" ");
    hash.update(parts.uri.path());
    hash.update(b"\n");
    hash.update(&bytes);
    let fingerprint: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let claim = match store.claim(&principal, &key, &fingerprint).await {
        Ok(claim) => claim,
        Err(e) => {
            warn!(error = %e, "Idempotency store unavailable.");
            return Problem::unavailable("the idempotency store").into_response();
        }
    };
    match claim {
        Claim::Conflict => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different request",
        ),
        Claim::InFlight => Problem::new(
            StatusCode::CONFLICT,
            "idempotency-key-in-flight",
            "Request in progress",
        )
        .detail("a request with this Idempotency-Key is still being processed; retry later")
        .retry_after(1)
        .into_response(),
        Claim::Replay(stored) => replay(stored),
        Claim::Fresh(seed) => {
            parts.extensions.insert(seed);
            let response = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            if response.status().is_server_error() {
                if let Err(e) = store.release(&principal, &key).await {
                    warn!(error = %e, "Idempotency key not released; it frees itself when stale.");
                }
                return response;
            }
            let (parts, body) = response.into_parts();
            let Ok(body) = to_bytes(body, MAX_STORED_BODY).await else {
                let _ = store.release(&principal, &key).await;
                return Problem::unavailable("the ingest edge").into_response();
            };
            let header_text = |name: header::HeaderName| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let stored = Stored {
                status: parts.status.as_u16(),
                content_type: header_text(header::CONTENT_TYPE),
                location: header_text(header::LOCATION),
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            if let Err(e) = store.complete(&principal, &key, &stored).await {
                // The effect happened; a retry would repeat the same event (same ids), so the
                // answer may still go out.
                warn!(error = %e, "Idempotent answer not stored.");
                let _ = store.release(&principal, &key).await;
            }
            Response::from_parts(parts, Body::from(body))
        }
    }
}

fn replay(stored: Stored) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, stored.body).into_response();
    let headers = response.headers_mut();
    if let Some(ct) = stored
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(location) = stored.location.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
