//! The ingest HTTP surfaces, errors as problem+json: the edge ([`router`]: orders, batches,
//! cancellations; role producer) and the admin listener ([`admin_router`]: API keys, review
//! decisions, restocks; role admin). Every request is authenticated, then rate limited (per IP
//! and per principal), then authorized per route; the POSTs that create honour
//! `Idempotency-Key` ([`crate::idempotency`]).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    Json, Router,
};
use orderflow_platform::openapi;
use orderflow_platform::{
    http::{health_routes, not_found_fallback, FieldError, Problem},
    telemetry::{continue_trace, current_traceparent, has_trace, new_traceparent},
};
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::request::OrderRequest;
use tracing::{debug, debug_span, warn, Instrument};
use uuid::Uuid;

use orderflow_auth::{http::require, limits::RateLimits, Authenticator, Permission};

use crate::{
    idempotency::{self, IdempotencyStore, Seed},
    metrics::{IngestMetrics, PublishErrorLabels, RefusedLabels},
    publish::{PublishError, Publisher},
    request::{self, RequestError},
};

#[derive(Clone)]
pub struct IngestState {
    /// The operational switches: `switches.accept_orders = false` refuses new orders (503).
    pub switches: orderflow_platform::switches::Switches,
    pub publisher: Publisher,
    /// Base URL of the query API, for the status URL in responses (e.g. `http://host:8081`).
    pub status_base_url: String,
    pub metrics: IngestMetrics,
    /// Most orders one batch request may carry.
    pub max_batch_orders: usize,
    pub limits: RateLimits,
    /// Finds an order's customer for commands on it (the orders projection).
    pub directory: Option<crate::commands::SharedDirectory>,
    pub orders_topic: &'static str,
    pub inventory_topic: &'static str,
    pub auth: Authenticator,
    /// Stored `Idempotency-Key` answers; `None` without a database (keys are then refused).
    pub idempotency: Option<IdempotencyStore>,
    /// Projection replays started over the admin API; `None` without a database.
    pub replays: Option<crate::replays::Replays>,
    /// The dead-letter topics, for the admin API; `None` serves `503` there.
    pub dead_letters: Option<orderflow_deadletters::DeadLetters>,
}

/// The answer to an accepted order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub order_id: String,
    pub status: &'static str,
    /// Where to read the order's status (query API). Read-your-writes: add `?wait_for=final`
    /// (or `?min_version=N`) and the query waits, up to 5 s, until the order is there.
    pub status_url: String,
    /// Read-your-writes, ready to use: `status_url?min_version=1` answers as soon as the
    /// projection has this order (waiting up to 5 s, `orderflow-wait: satisfied|timeout`).
    pub wait_url: String,
    /// The order's version as accepted: `OrderPlaced` is version 1.
    pub version: i64,
}

/// Wraps routes in what every route of an edge listener has: the body limit, authentication
/// (outermost, so the rate limiter knows the principal) and rate limits; serves `/healthz` and
/// the listener's OpenAPI document at `/openapi.json`.
fn guarded(
    routes: OpenApiRouter<IngestState>,
    state: IngestState,
    max_body_bytes: usize,
    title: &str,
) -> Router {
    let (router, api) = routes.split_for_parts();
    let api = openapi::finish(api, title, true);
    router
        .layer(from_fn_with_state(
            state.limits.clone(),
            orderflow_auth::limits::limit,
        ))
        .layer(from_fn_with_state(
            state.auth.clone(),
            orderflow_auth::http::authenticate,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
        .merge(health_routes())
        .merge(openapi::document_routes(&api))
        .fallback(not_found_fallback)
}

/// The ingest edge: what producers call.
pub fn router(state: IngestState, max_body_bytes: usize) -> Router {
    let idempotent = from_fn_with_state(state.idempotency.clone(), idempotency::guard);
    let routes = OpenApiRouter::new()
        .routes(routes!(post_order))
        .routes(routes!(post_batch))
        .routes(routes!(crate::commands::cancel))
        .route_layer(idempotent)
        .route_layer(from_fn_with_state(Permission::PlaceOrders, require));
    guarded(routes, state, max_body_bytes, "orderflow ingest edge")
}

/// The admin listener: what operators call.
pub fn admin_router(state: IngestState, max_body_bytes: usize) -> Router {
    let routes = OpenApiRouter::new()
        .routes(routes!(crate::commands::review))
        .routes(routes!(crate::commands::restock))
        .routes(routes!(crate::keys::list, crate::keys::create))
        .routes(routes!(crate::keys::revoke))
        .routes(routes!(crate::replays::start, crate::replays::status))
        .routes(routes!(crate::deadletters::overview))
        .routes(routes!(crate::deadletters::list))
        .routes(routes!(crate::deadletters::show))
        .routes(routes!(crate::deadletters::redrive))
        .routes(routes!(crate::deadletters::discard))
        .routes(routes!(crate::deadletters::release))
        .route_layer(from_fn_with_state(Permission::Administer, require));
    guarded(routes, state, max_body_bytes, "orderflow admin")
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Counts an answer for one order in the metrics.
fn count(state: &IngestState, answer: &Result<Accepted, Problem>) {
    match answer {
        Ok(_) => {
            state.metrics.accepted.inc();
        }
        Err(problem) => {
            let reason = problem
                .kind
                .rsplit(':')
                .next()
                .unwrap_or("unknown")
                .to_owned();
            state
                .metrics
                .refused
                .get_or_create(&RefusedLabels { reason })
                .inc();
        }
    }
}

/// The caller's `traceparent`, when it is one.
fn incoming_traceparent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55)
        .map(str::to_owned)
}

/// One order's trace span: it starts the order's trace, or continues the producer's. Also
/// returns the `traceparent` to pass on when the span makes no context of its own (spans not
/// exported): the producer's, or a new one, so every hop's logs name the same trace.
fn order_span(headers: &HeaderMap, incoming: Option<&str>) -> (tracing::Span, Option<String>) {
    let span = debug_span!(
        "ingest.order",
        otel.kind = "server",
        order_id = tracing::field::Empty,
        request_id = headers
            .get(orderflow_platform::http::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        trace_id = tracing::field::Empty
    );
    let passed_on = if has_trace(&span) || incoming.is_some() {
        incoming.map(str::to_owned)
    } else {
        Some(new_traceparent())
    };
    continue_trace(&span, passed_on.as_deref());
    (span, passed_on)
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(status, "body-too-large", "Request body too large")
        } else {
            Problem::new(status, "unreadable-body", "Request body could not be read")
        }
    })
}

fn request_problem(e: RequestError) -> Problem {
    match e {
        RequestError::Syntax(detail) => {
            Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON").detail(detail)
        }
        RequestError::CardData { field } => {
            warn!(%field, "Rejected a request carrying card data.");
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "card-data-refused",
                "Card data refused",
            )
            .detail("card numbers must never be sent; send the payment provider's token")
            .errors(vec![FieldError {
                field,
                message: "looks like a card number".to_owned(),
            }])
        }
        RequestError::Invalid(errors) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-order",
            "The order is invalid",
        )
        .errors(errors),
    }
}

/// Place an order: `202` once the `OrderPlaced` event is durable on the broker.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body(content = OrderRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body get the first answer again; 1-255 visible ASCII characters."),
    ),
    responses(
        (status = 202, description = "Accepted: the event is durable. `Location` is the status URL.", body = Accepted,
            headers(("Location" = String, description = "The order's status URL."))),
        (status = 400, description = "Malformed JSON, or an invalid Idempotency-Key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with the same Idempotency-Key is still in progress.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than ingest.max_body_bytes.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a valid order (every field error listed), card data, or an Idempotency-Key used for another request.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn post_order(
    State(state): State<IngestState>,
    seed: Option<axum::Extension<Seed>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let seed = seed.map(|s| (s.0.order_id, s.0.occurred_at));
    let incoming = incoming_traceparent(&headers);
    let (span, passed_on) = order_span(&headers, incoming.as_deref());
    state.switches.orders_accepted()?;
    let answer = async {
        if !content_type_is(&headers, "application/json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .detail("send the order as application/json"));
        }
        let body = read_body(body)?;
        let value = request::parse_json(&body).map_err(request_problem)?;
        accept(&state, value, seed, passed_on.as_deref()).await
    }
    .instrument(span)
    .await;
    count(&state, &answer);
    let accepted = answer?;
    let location = HeaderValue::from_str(&accepted.status_url).ok();
    let mut response = (StatusCode::ACCEPTED, Json(accepted)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Checks one order and publishes it; `Ok` only once the broker acknowledged it. Runs inside
/// the order's span.
/// `seed`: the order id and time to use (from an `Idempotency-Key`), else new ones.
async fn accept(
    state: &IngestState,
    value: serde_json::Value,
    seed: Option<(Uuid, i64)>,
    passed_on: Option<&str>,
) -> Result<Accepted, Problem> {
    let order = request::parse_value(value).map_err(request_problem)?;
    let (order_id, occurred_at) = seed.unwrap_or_else(|| (Uuid::now_v7(), now_ms()));
    tracing::Span::current().record("order_id", tracing::field::display(order_id));
    // The event carries this span's context (falling back to the producer's header when
    // tracing is not recording), so the processors continue the same trace.
    let traceparent = current_traceparent().or_else(|| passed_on.map(str::to_owned));
    let event = order.into_event(order_id, occurred_at);
    let publishing = std::time::Instant::now();
    let published = state
        .publisher
        .publish(&event, traceparent.as_deref())
        .await;
    state
        .metrics
        .publish_seconds
        .observe(publishing.elapsed().as_secs_f64());
    published.map_err(|e| {
        let kind = match &e {
            PublishError::QueueFull => "queue_full",
            PublishError::Timeout(_) => "timeout",
            PublishError::Kafka(_) => "broker",
            PublishError::Codec(_) => "encoding",
        };
        state
            .metrics
            .publish_errors
            .get_or_create(&PublishErrorLabels {
                kind: kind.to_owned(),
            })
            .inc();
        warn!(error = %e, "Order not published.");
        match e {
            PublishError::Codec(_) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-order",
                "The order is invalid",
            ),
            _ => Problem::unavailable("the order log").retry_after(1),
        }
    })?;
    debug!(order_id = %order_id, "Order accepted.");
    let status_url = format!("{}/v1/orders/{order_id}", state.status_base_url);
    Ok(Accepted {
        wait_url: format!("{status_url}?min_version=1"),
        status_url,
        order_id: order_id.to_string(),
        status: "accepted",
        version: 1,
    })
}

/// The answer for one order of a batch: the same body as `POST /v1/orders` gives, with its
/// HTTP status and position.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchItem {
    /// Position of the order in the request, from 0.
    pub index: usize,
    /// What `POST /v1/orders` would have answered for this order alone.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchAnswer {
    pub accepted: usize,
    pub refused: usize,
    pub results: Vec<BatchItem>,
}

/// `POST /v1/orders/batch`: a JSON array of orders (`application/json`) or one order per line
/// (`application/x-ndjson`), at most `ingest.max_batch_orders`. Each order is checked and
/// published on its own, concurrently, with its own trace; the answer is `200` with one result
/// per order, in order. An order's `202` means the same as for a single order: it is durable.
/// Place up to `ingest.max_batch_orders` orders at once: a JSON array, or one order per line
/// (NDJSON). The answer lists each order's own result, in order.
#[utoipa::path(
    post,
    path = "/v1/orders/batch",
    tag = "orders",
    request_body(content(
        (Vec<OrderRequest> = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body get the first answer again."),
    ),
    responses(
        (status = 200, description = "One result per order.", body = BatchAnswer),
        (status = 400, description = "Malformed JSON, or an invalid Idempotency-Key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with the same Idempotency-Key is still in progress.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than ingest.max_body_bytes.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Neither application/json nor application/x-ndjson.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a batch of 1 to ingest.max_batch_orders orders, or an Idempotency-Key used for another request.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn post_batch(
    State(state): State<IngestState>,
    seed: Option<axum::Extension<Seed>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    state.switches.orders_accepted()?;
    let ndjson = content_type_is(&headers, "application/x-ndjson");
    if !ndjson && !content_type_is(&headers, "application/json") {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        )
        .detail("send a JSON array (application/json) or NDJSON (application/x-ndjson)"));
    }
    let body = read_body(body)?;
    let items: Vec<Result<serde_json::Value, RequestError>> = if ndjson {
        body.split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(request::parse_json)
            .collect()
    } else {
        match request::parse_json(&body).map_err(request_problem)? {
            serde_json::Value::Array(items) => items.into_iter().map(Ok).collect(),
            _ => {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-batch",
                    "The batch is invalid",
                )
                .detail("a batch is a JSON array of orders"))
            }
        }
    };
    if items.is_empty() || items.len() > state.max_batch_orders {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-batch",
            "The batch is invalid",
        )
        .detail(format!(
            "a batch holds 1 to {} orders; this one holds {}",
            state.max_batch_orders,
            items.len()
        )));
    }
    let incoming = incoming_traceparent(&headers);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let state = state.clone();
        let (span, passed_on) = order_span(&headers, incoming.as_deref());
        let seed = seed.as_ref().map(|s| (s.0.item(index), s.0.occurred_at));
        tasks.spawn(
            async move {
                let answer = match item {
                    Ok(value) => accept(&state, value, seed, passed_on.as_deref()).await,
                    Err(e) => Err(request_problem(e)),
                };
                count(&state, &answer);
                (index, answer)
            }
            .instrument(span),
        );
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, answer) = joined.map_err(|_| Problem::unavailable("the ingest edge"))?;
        results.push(match answer {
            Ok(accepted) => BatchItem {
                index,
                status: StatusCode::ACCEPTED.as_u16(),
                accepted: Some(accepted),
                problem: None,
            },
            Err(problem) => BatchItem {
                index,
                status: problem.status,
                accepted: None,
                problem: Some(problem),
            },
        });
    }
    results.sort_by_key(|r| r.index);
    let accepted = results.iter().filter(|r| r.accepted.is_some()).count();
    Ok((
        StatusCode::OK,
        Json(BatchAnswer {
            accepted,
            refused: results.len() - accepted,
            results,
        }),
    )
        .into_response())
}
