//! The ingest HTTP surface: `POST /v1/orders` and `/healthz`, errors as problem+json.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use orderflow_platform::{
    http::{health_routes, not_found_fallback, FieldError, Problem},
    telemetry::{continue_trace, current_traceparent},
};
use serde::Serialize;
use tracing::{debug, info_span, warn, Instrument};
use uuid::Uuid;

use crate::{
    metrics::{IngestMetrics, PublishErrorLabels, RefusedLabels},
    publish::{PublishError, Publisher},
    request::{self, RequestError},
};

#[derive(Clone)]
pub struct IngestState {
    pub publisher: Publisher,
    /// Base URL of the query API, for the status URL in responses (e.g. `http://host:8081`).
    pub status_base_url: String,
    pub metrics: IngestMetrics,
}

/// The answer to an accepted order.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub order_id: String,
    pub status: &'static str,
    /// Where to read the order's status (query API). Add `?wait_for=final` to wait, bounded,
    /// once the query API supports read-your-writes.
    pub status_url: String,
    /// The order's version as accepted: `OrderPlaced` is version 1.
    pub version: i64,
}

pub fn router(state: IngestState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/orders", post(post_order))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
        .merge(health_routes())
        .fallback(not_found_fallback)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

async fn post_order(
    State(state): State<IngestState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    // The order's trace starts here, or continues the producer's (`traceparent` header).
    let span = info_span!(
        "ingest.order",
        otel.kind = "server",
        order_id = tracing::field::Empty,
        request_id = headers
            .get(orderflow_platform::http::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        trace_id = tracing::field::Empty
    );
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55);
    continue_trace(&span, incoming);
    let answer = place_order(&state, &headers, body).instrument(span).await;
    match &answer {
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
    answer
}

async fn place_order(
    state: &IngestState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        )
        .detail("send the order as application/json"));
    }
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(status, "body-too-large", "Request body too large")
        } else {
            Problem::new(status, "unreadable-body", "Request body could not be read")
        }
    })?;
    let order = request::parse(&body).map_err(|e| match e {
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
    })?;

    let order_id = Uuid::now_v7();
    tracing::Span::current().record("order_id", tracing::field::display(order_id));
    // The event carries this span's context (falling back to the producer's header when
    // tracing is not recording), so the processors continue the same trace.
    let traceparent = current_traceparent().or_else(|| {
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() == 55)
            .map(str::to_owned)
    });
    let event = order.into_event(order_id, now_ms());
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
    let location = HeaderValue::from_str(&status_url).ok();
    let mut response = (
        StatusCode::ACCEPTED,
        Json(Accepted {
            order_id: order_id.to_string(),
            status: "accepted",
            status_url,
            version: 1,
        }),
    )
        .into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}
