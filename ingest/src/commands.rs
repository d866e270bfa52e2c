//! Commands on orders already placed, and stock: `POST /v1/orders/{id}/cancel`,
//! `POST /v1/orders/{id}/review` and `POST /v1/inventory`. Each becomes one event (several for a
//! restock of several SKUs), answered `202` once the broker acknowledged it.
//!
//! The saga keys an order's events by customer, so a command about an order needs its customer:
//! the [`OrderDirectory`] (the orders projection) says who it is and where the order stands. An
//! order not yet projected is `404` (retry shortly); one whose state refuses the command is
//! `409`. The saga decides for good: a cancellation that races with the order's last step is
//! applied or ignored by the saga, never both.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use orderflow_platform::http::{FieldError, Problem};
use orderflow_schemas::{
    Envelope, EventKind, FraudReviewDecided, InventoryRestocked, OrderCancellationRequested,
    OrderEvent, ReviewDecision,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::routes::{now_ms, read_body, IngestState};

/// Where an order stands, as far as the read model knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLocation {
    pub customer_id: String,
    pub status: String,
}

/// Finds orders (implemented over the orders projection).
pub trait OrderDirectory: Send + Sync + 'static {
    fn locate(
        &self,
        order_id: &str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<OrderLocation>, String>> + Send + '_>,
    >;
}

pub type SharedDirectory = Arc<dyn OrderDirectory>;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelBody {
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReviewBody {
    /// approve or reject
    decision: String,
    reviewer: String,
    #[serde(default)]
    note: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockItem {
    pub sku: String,
    pub quantity: i32,
}

/// The answer to an accepted command.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandAccepted {
    pub order_id: String,
    pub status: &'static str,
    pub status_url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RestockAccepted {
    pub restocked: usize,
    pub event_ids: Vec<String>,
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-command",
        "The command is invalid",
    )
    .errors(vec![FieldError {
        field: field.to_owned(),
        message: message.into(),
    }])
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        invalid(
            if path == "." { "body" } else { &path },
            e.inner().to_string(),
        )
    })
}

async fn locate(state: &IngestState, order_id: &str) -> Result<OrderLocation, Problem> {
    if Uuid::parse_str(order_id).is_err() {
        return Err(invalid("order_id", "expected a UUID"));
    }
    let Some(directory) = &state.directory else {
        return Err(Problem::unavailable("the order directory"));
    };
    match directory.locate(order_id).await {
        Ok(Some(location)) => Ok(location),
        Ok(None) => Err(
            Problem::not_found(&format!("order {order_id}")).detail(format!(
                "order {order_id} is not known (yet): an order just accepted appears within moments"
            )),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Order lookup failed.");
            Err(Problem::unavailable("the order directory"))
        }
    }
}

fn conflict(order_id: &str, status: &str, what: &str) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "order-state-conflict",
        "Not possible now",
    )
    .detail(format!("order {order_id} is {status}: {what}"))
}

fn envelope(order_id: &str, customer_id: &str, kind: EventKind) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4().to_string(),
        order_id: order_id.to_owned(),
        customer_id: customer_id.to_owned(),
        occurred_at: now_ms(),
        causation_id: None,
        sequence: 0,
        schema_version: kind.schema_version(),
    }
}

async fn publish(
    state: &IngestState,
    topic: &str,
    key: &str,
    event: &OrderEvent,
) -> Result<(), Problem> {
    state
        .publisher
        .publish_to(topic, key, event, None)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "Command not published.");
            Problem::unavailable("the order log").retry_after(1)
        })
}

/// Cancel an order: before confirmation its reservations are released; after, it is refunded
/// and released. The saga decides; the status URL shows the outcome.
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/cancel",
    tag = "orders",
    params(
        ("order_id" = String, Path, description = "The order's id (a UUID)."),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body get the first answer again."),
    ),
    request_body(content = Option<CancelBody>, content_type = "application/json"),
    responses(
        (status = 202, description = "The cancellation request is durable.", body = CommandAccepted),
        (status = 400, description = "Unreadable body, or an invalid Idempotency-Key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order (yet).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order cannot be cancelled any more, or a request with the same Idempotency-Key is in progress.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body or order id, or an Idempotency-Key used for another request.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<IngestState>,
    seed: Option<axum::Extension<crate::idempotency::Seed>>,
    Path(order_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = read_body(body)?;
    let request: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        parse(&body)?
    };
    let location = locate(&state, &order_id).await?;
    if matches!(
        location.status.as_str(),
        "rejected" | "cancelled" | "refund_pending"
    ) {
        return Err(conflict(
            &order_id,
            &location.status,
            "there is nothing to cancel",
        ));
    }
    let mut envelope = envelope(
        &order_id,
        &location.customer_id,
        EventKind::OrderCancellationRequested,
    );
    // With an Idempotency-Key, a retry after a 503 writes the very same event.
    if let Some(axum::Extension(seed)) = seed {
        envelope.event_id = seed.order_id.to_string();
        envelope.occurred_at = seed.occurred_at;
    }
    let event = OrderEvent::OrderCancellationRequested(OrderCancellationRequested {
        envelope,
        reason: request.reason.chars().take(500).collect(),
    });
    publish(&state, state.orders_topic, &location.customer_id, &event).await?;
    Ok(accepted(&state, order_id, "cancellation_requested"))
}

/// Decide an order held for fraud review (`{"decision": "approve"|"reject", "reviewer", "note"}`).
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/review",
    tag = "admin",
    params(("order_id" = String, Path, description = "The order's id (a UUID).")),
    request_body(content = ReviewBody, content_type = "application/json"),
    responses(
        (status = 202, description = "The decision is durable.", body = CommandAccepted),
        (status = 404, description = "No such order (yet).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order is not held for review.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid decision, reviewer or order id.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn review(
    State(state): State<IngestState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let _ = headers;
    let body = read_body(body)?;
    let request: ReviewBody = parse(&body)?;
    let decision = match request.decision.as_str() {
        "approve" => ReviewDecision::Approve,
        "reject" => ReviewDecision::Reject,
        other => {
            return Err(invalid(
                "decision",
                format!("expected \"approve\" or \"reject\", found {other:?}"),
            ))
        }
    };
    if request.reviewer.trim().is_empty() {
        return Err(invalid("reviewer", "name who decided"));
    }
    let location = locate(&state, &order_id).await?;
    if location.status != "fraud_review" {
        return Err(conflict(
            &order_id,
            &location.status,
            "only an order held for review can be decided",
        ));
    }
    let event = OrderEvent::FraudReviewDecided(FraudReviewDecided {
        envelope: envelope(
            &order_id,
            &location.customer_id,
            EventKind::FraudReviewDecided,
        ),
        decision,
        reviewer: request.reviewer.chars().take(200).collect(),
        note: request.note.chars().take(1000).collect(),
    });
    publish(&state, state.orders_topic, &location.customer_id, &event).await?;
    Ok(accepted(&state, order_id, "review_decided"))
}

/// Stock arriving: `[{"sku", "quantity"}, ...]`, one `InventoryRestocked` event per item.
#[utoipa::path(
    post,
    path = "/v1/inventory",
    tag = "admin",
    request_body(content = Vec<RestockItem>, content_type = "application/json"),
    responses(
        (status = 202, description = "Every restock is durable.", body = RestockAccepted),
        (status = 422, description = "Invalid items (every one listed).", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn restock(
    State(state): State<IngestState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = read_body(body)?;
    let items: Vec<RestockItem> = parse(&body)?;
    let events = restock_events(&items, "POST /v1/inventory").map_err(|errors| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-command",
            "The restock is invalid",
        )
        .errors(errors)
    })?;
    let mut ids = Vec::new();
    for (sku, event) in &events {
        publish(&state, state.inventory_topic, sku, event).await?;
        ids.push(event.envelope().event_id.clone());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(RestockAccepted {
            restocked: ids.len(),
            event_ids: ids,
        }),
    )
        .into_response())
}

/// One `InventoryRestocked` per item, keyed by SKU; every invalid item is listed.
pub fn restock_events(
    items: &[RestockItem],
    source: &str,
) -> Result<Vec<(String, OrderEvent)>, Vec<FieldError>> {
    let mut errors = Vec::new();
    if items.is_empty() {
        errors.push(FieldError {
            field: "body".to_owned(),
            message: "expected at least one item".to_owned(),
        });
    }
    for (i, item) in items.iter().enumerate() {
        if !orderflow_schemas::is_valid_sku(&item.sku) {
            errors.push(FieldError {
                field: format!("[{i}].sku"),
                message: "a SKU is 1-64 letters, digits, '-' or '_'".to_owned(),
            });
        }
        if item.quantity <= 0 {
            errors.push(FieldError {
                field: format!("[{i}].quantity"),
                message: format!("expected a positive quantity, found {}", item.quantity),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(items
        .iter()
        .map(|item| {
            let mut envelope = envelope("", "", EventKind::InventoryRestocked);
            envelope.order_id = envelope.event_id.clone();
            (
                item.sku.clone(),
                OrderEvent::InventoryRestocked(InventoryRestocked {
                    envelope,
                    sku: item.sku.clone(),
                    quantity: item.quantity,
                    source: source.to_owned(),
                }),
            )
        })
        .collect())
}

fn accepted(state: &IngestState, order_id: String, status: &'static str) -> Response {
    let status_url = format!("{}/v1/orders/{order_id}", state.status_base_url);
    (
        StatusCode::ACCEPTED,
        Json(CommandAccepted {
            order_id,
            status,
            status_url,
        }),
    )
        .into_response()
}
