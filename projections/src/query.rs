//! The query API over the projection tables. Role `reader`. Today: one order by id, with its
//! status and version; `ETag` is the version, so `If-None-Match` answers `304` without a body.

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use orderflow_platform::http::{health_routes, not_found_fallback, Problem};
use serde::Serialize;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tracing::error;

use crate::{db::Database, orders};

/// An order as the API shows it.
#[derive(Debug, Serialize)]
pub struct OrderView {
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    /// The sequence of the last event applied; grows with every change of the order.
    pub version: i64,
    /// Whether the status is final (confirmed, rejected, cancelled).
    #[serde(rename = "final")]
    pub is_final: bool,
    pub currency: String,
    pub total_minor: i64,
    pub line_count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasons: Option<serde_json::Value>,
    pub placed_at: String,
    pub updated_at: String,
}

fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

impl From<orders::OrderRow> for OrderView {
    fn from(row: orders::OrderRow) -> Self {
        Self {
            is_final: orders::FINAL_STATUSES.contains(&row.status.as_str()),
            reasons: row
                .reasons
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            placed_at: rfc3339(row.placed_at),
            updated_at: rfc3339(row.updated_at),
            order_id: row.order_id,
            customer_id: row.customer_id,
            status: row.status,
            version: row.version,
            currency: row.currency,
            total_minor: row.total_minor,
            line_count: row.line_count,
        }
    }
}

/// The query API's routes.
pub fn router(db: Database) -> Router {
    Router::new()
        .route("/v1/orders/{order_id}", get(get_order))
        .with_state(db)
        .merge(health_routes())
        .fallback(not_found_fallback)
}

async fn get_order(
    State(db): State<Database>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if uuid::Uuid::parse_str(&order_id).is_err() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-order-id",
            "Invalid order id",
        )
        .detail("an order id is a UUID"));
    }
    let row = orders::get(db.pool(), &order_id).await.map_err(|e| {
        error!(error = %e, "Order query failed.");
        Problem::unavailable("the order store")
    })?;
    let row = row.ok_or_else(|| Problem::not_found(&format!("order {order_id}")))?;
    let etag = format!("\"{}\"", row.version);
    let etag_value =
        HeaderValue::from_str(&etag).map_err(|_| Problem::unavailable("the order store"))?;
    let cache = HeaderValue::from_static("no-cache");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)],
        )
            .into_response());
    }
    Ok((
        [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)],
        Json(OrderView::from(row)),
    )
        .into_response())
}
