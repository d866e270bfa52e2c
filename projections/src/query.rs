//! The query API over the projection tables. Role `reader`.
//!
//! - `GET /v1/orders/{id}`: one order with its status and version, read through the
//!   [`OrderCache`] (crate::cache); `ETag` is the version, so `If-None-Match` answers `304`
//!   without a body. Read-your-writes: `?wait_for=final` or `?min_version=N` waits (up to
//!   `wait_ms`, at most 5 s) until the projection has the order in that state, reading the
//!   store itself, then answers; `orderflow-wait: timeout` says it answered without it.
//! - `GET /v1/customers/{id}/orders`: a customer's orders, newest first, with keyset
//!   pagination (`limit`, `after` = the previous page's `next`).
//! - `GET /v1/analytics/status-counts`: orders per status.
//! - `GET /v1/analytics/sales?from=&to=[&sku=]`: confirmed sales per product per hour over a
//!   range (ms since the epoch, `to` exclusive, at most 31 days).
//! - `GET /v1/analytics/top-products?from=&to=[&limit=]`: products by revenue over a range.
//! - `GET /v1/inventory/{sku}`: a SKU's stock (restocked, reserved, available); `GET
//!   /v1/inventory?limit=&after=`: every SKU's, by SKU.
//! - `GET /v1/reviews?status=pending[&limit=&after=]`: the fraud review queue, oldest first.

use std::time::Duration;

use axum::{
    extract::{rejection::QueryRejection, FromRef, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json, Router,
};
use orderflow_platform::http::{health_routes, not_found_fallback, Problem};
use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tracing::error;

use axum::middleware::from_fn_with_state;
use orderflow_auth::{
    http::{authenticate, require},
    limits::RateLimits,
    Authenticator, Permission,
};
use orderflow_platform::openapi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{cache::OrderCache, db::Database, inventory, orders};

/// What the query handlers share.
#[derive(Clone)]
pub struct QueryState {
    pub db: Database,
    pub cache: OrderCache,
}

impl FromRef<QueryState> for Database {
    fn from_ref(state: &QueryState) -> Self {
        state.db.clone()
    }
}

/// An order as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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
/// Every route needs a caller allowed to read: an order's status (`reader`, and the
/// `producer` that placed it follows its status URL), or anything else (`reader`).
/// Every request is authenticated, then rate limited ([`RateLimits`], `query.rate_limit_*`).
pub fn router(db: Database, cache: OrderCache, auth: Authenticator, limits: RateLimits) -> Router {
    let status = OpenApiRouter::new()
        .routes(routes!(get_order))
        .route_layer(from_fn_with_state(Permission::ReadOrderStatus, require));
    let (router, api) = OpenApiRouter::new()
        .routes(routes!(customer_orders))
        .routes(routes!(status_counts))
        .routes(routes!(sales))
        .routes(routes!(top_products))
        .routes(routes!(inventory_levels))
        .routes(routes!(inventory_level))
        .routes(routes!(review_queue))
        .route_layer(from_fn_with_state(Permission::Query, require))
        .merge(status)
        .split_for_parts();
    let api = openapi::finish(api, "orderflow query API", false);
    router
        .layer(from_fn_with_state(limits, orderflow_auth::limits::limit))
        .layer(from_fn_with_state(auth, authenticate))
        .with_state(QueryState { db, cache })
        .merge(health_routes())
        .merge(openapi::document_routes(&api))
        .fallback(not_found_fallback)
}

/// The longest a read may wait for the projection.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often a waiting read looks again.
const WAIT_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OrderQuery {
    /// `final`: wait until the order is confirmed, rejected or cancelled.
    wait_for: Option<String>,
    /// Wait until the order's version is at least this.
    min_version: Option<i64>,
    /// How long to wait, ms (default and maximum 5000).
    wait_ms: Option<u64>,
}

fn invalid_query(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query").detail(detail)
}

fn store_unavailable(e: crate::db::DbError) -> Problem {
    error!(error = %e, "Order query failed.");
    Problem::unavailable("the order store")
}

/// An order's current state. `ETag` is its version: `If-None-Match` answers `304` while it is
/// unchanged. Read-your-writes: `min_version` or `wait_for=final` wait (up to `wait_ms`, at
/// most 5 s) for the projection; `orderflow-wait` says whether the wait was satisfied.
#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}",
    tag = "queries",
    params(
        ("order_id" = String, Path, description = "The order's id (a UUID)."),
        OrderQuery,
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer."),
    ),
    responses(
        (status = 200, description = "The order.", body = OrderView, headers(
            ("ETag" = String, description = "The order's version, quoted."),
            ("Cache-Control" = String, description = "no-cache: revalidate with If-None-Match."),
        )),
        (status = 304, description = "Unchanged since the given ETag."),
        (status = 400, description = "Not a UUID, or invalid query parameters.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order (yet).", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_order(
    State(QueryState { db, cache }): State<QueryState>,
    Path(order_id): Path<String>,
    query: Result<Query<OrderQuery>, QueryRejection>,
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
    let Query(query) = query.map_err(|e| invalid_query(e.body_text()))?;
    let wait_final = match query.wait_for.as_deref() {
        None => false,
        Some("final") => true,
        Some(other) => return Err(invalid_query(format!("wait_for={other}: expected final"))),
    };
    let waiting = wait_final || query.min_version.is_some();
    let satisfied = |row: &orders::OrderRow| {
        (!wait_final || orders::FINAL_STATUSES.contains(&row.status.as_str()))
            && query.min_version.is_none_or(|v| row.version >= v)
    };
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(5_000)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let read = || async {
        let row = orders::get(db.pool(), &order_id)
            .await
            .map_err(store_unavailable)?;
        if let Some(row) = &row {
            cache.fill(row);
        }
        Ok::<_, Problem>(row)
    };
    // A cached row serves a plain read, and a waiting one it already satisfies.
    let mut row = match cache.get(&order_id) {
        Some(cached) if !waiting || satisfied(&cached) => Some((*cached).clone()),
        _ => read().await?,
    };
    while waiting && !row.as_ref().is_some_and(satisfied) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(WAIT_POLL).await;
        row = read().await?;
    }
    let timed_out = waiting && !row.as_ref().is_some_and(satisfied);
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
    let mut response = (
        [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)],
        Json(OrderView::from(row)),
    )
        .into_response();
    if waiting {
        let outcome = if timed_out { "timeout" } else { "satisfied" };
        response
            .headers_mut()
            .insert("orderflow-wait", HeaderValue::from_static(outcome));
    }
    Ok(response)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Orders per page, 1–100 (default 20).
    limit: Option<i64>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// One page of a customer's orders.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    pub orders: Vec<OrderView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `after` cursors are `<placed_at ms>.<order id>`: opaque to clients, readable in logs.
fn parse_cursor(text: &str) -> Option<orders::PageCursor> {
    let (at, id) = text.split_once('.')?;
    uuid::Uuid::parse_str(id).ok()?;
    Some(orders::PageCursor {
        placed_at: at.parse().ok()?,
        order_id: id.to_owned(),
    })
}

/// A customer's orders, newest first, in pages stable while orders arrive (keyset pagination:
/// pass `next` as `after`).
#[utoipa::path(
    get,
    path = "/v1/customers/{customer_id}/orders",
    tag = "queries",
    params(("customer_id" = String, Path, description = "The customer's id."), PageQuery),
    responses(
        (status = 200, description = "One page.", body = OrderPage),
        (status = 400, description = "Invalid limit or cursor.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn customer_orders(
    State(db): State<Database>,
    Path(customer_id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<OrderPage>, Problem> {
    let Query(query) = query.map_err(|e| invalid_query(e.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(invalid_query("limit: expected 1 to 100"));
    }
    let cursor = match query.after.as_deref() {
        None => None,
        Some(text) => Some(
            parse_cursor(text).ok_or_else(|| invalid_query("after: not a cursor from `next`"))?,
        ),
    };
    let rows = orders::customer_page(db.pool(), &customer_id, cursor.as_ref(), limit)
        .await
        .map_err(store_unavailable)?;
    let next = (rows.len() as i64 == limit)
        .then(|| {
            rows.last()
                .map(|r| format!("{}.{}", r.placed_at, r.order_id))
        })
        .flatten();
    Ok(Json(OrderPage {
        orders: rows.into_iter().map(OrderView::from).collect(),
        next,
    }))
}

fn page_limit(limit: Option<i64>) -> Result<i64, Problem> {
    let limit = limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(invalid_query("limit: expected 1 to 100"));
    }
    Ok(limit)
}

/// Stock of one SKU.
#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}",
    tag = "queries",
    params(("sku" = String, Path, description = "1-64 ASCII letters, digits, '-' and '_'.")),
    responses(
        (status = 200, description = "The SKU's stock.", body = inventory::Level),
        (status = 400, description = "Not a SKU.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No stock movement for this SKU yet.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn inventory_level(
    State(db): State<Database>,
    Path(sku): Path<String>,
) -> Result<Json<inventory::Level>, Problem> {
    if !orderflow_schemas::is_valid_sku(&sku) {
        return Err(
            Problem::new(StatusCode::BAD_REQUEST, "invalid-sku", "Invalid SKU")
                .detail("a SKU is 1-64 ASCII letters, digits, '-' and '_'"),
        );
    }
    inventory::level(db.pool(), &sku)
        .await
        .map_err(store_unavailable)?
        .map(Json)
        .ok_or_else(|| Problem::not_found(&format!("SKU {sku}")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LevelPageQuery {
    limit: Option<i64>,
    /// The `next` of the previous page (a SKU).
    after: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LevelPage {
    pub levels: Vec<inventory::Level>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Stock of every SKU, by SKU, in pages (pass `next` as `after`).
#[utoipa::path(
    get,
    path = "/v1/inventory",
    tag = "queries",
    params(LevelPageQuery),
    responses(
        (status = 200, description = "One page.", body = LevelPage),
        (status = 400, description = "Invalid limit.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn inventory_levels(
    State(db): State<Database>,
    query: Result<Query<LevelPageQuery>, QueryRejection>,
) -> Result<Json<LevelPage>, Problem> {
    let Query(query) = query.map_err(|e| invalid_query(e.body_text()))?;
    let limit = page_limit(query.limit)?;
    let levels = inventory::level_page(db.pool(), query.after.as_deref(), limit)
        .await
        .map_err(store_unavailable)?;
    let next = (levels.len() as i64 == limit)
        .then(|| levels.last().map(|l| l.sku.clone()))
        .flatten();
    Ok(Json(LevelPage { levels, next }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReviewQuery {
    /// pending (default), approved, rejected or cancelled.
    status: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewPage {
    pub reviews: Vec<orders::Review>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The fraud review queue, oldest first, in pages (pass `next` as `after`).
#[utoipa::path(
    get,
    path = "/v1/reviews",
    tag = "queries",
    params(ReviewQuery),
    responses(
        (status = 200, description = "One page.", body = ReviewPage),
        (status = 400, description = "Invalid status, limit or cursor.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn review_queue(
    State(db): State<Database>,
    query: Result<Query<ReviewQuery>, QueryRejection>,
) -> Result<Json<ReviewPage>, Problem> {
    let Query(query) = query.map_err(|e| invalid_query(e.body_text()))?;
    let status = query.status.unwrap_or_else(|| "pending".to_owned());
    if !["pending", "approved", "rejected", "cancelled"].contains(&status.as_str()) {
        return Err(invalid_query(format!(
            "status={status}: expected pending, approved, rejected or cancelled"
        )));
    }
    let limit = page_limit(query.limit)?;
    let cursor = match query.after.as_deref() {
        None => None,
        Some(text) => Some(
            parse_cursor(text).ok_or_else(|| invalid_query("after: not a cursor from `next`"))?,
        ),
    };
    let reviews = orders::reviews(db.pool(), &status, cursor.as_ref(), limit)
        .await
        .map_err(store_unavailable)?;
    let next = (reviews.len() as i64 == limit)
        .then(|| {
            reviews
                .last()
                .map(|r| format!("{}.{}", r.queued_at, r.order_id))
        })
        .flatten();
    Ok(Json(ReviewPage { reviews, next }))
}

/// The longest range an analytics query may cover.
const MAX_RANGE_MS: i64 = 31 * 24 * 3_600_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SalesQuery {
    /// Start, ms since the epoch (inclusive).
    from: i64,
    /// End, ms since the epoch (exclusive).
    to: i64,
    sku: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopProductsQuery {
    from: i64,
    to: i64,
    /// Products to list, 1–100 (default 10).
    limit: Option<i64>,
}

fn check_range(from: i64, to: i64) -> Result<(), Problem> {
    // `to - from` can overflow for extreme inputs: checked, an overflow is out of range too.
    if to <= from || to.checked_sub(from).is_none_or(|span| span > MAX_RANGE_MS) {
        return Err(invalid_query(
            "from/to: expected from < to, at most 31 days apart",
        ));
    }
    Ok(())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SalesAnswer {
    pub from: i64,
    pub to: i64,
    pub rows: Vec<orders::SalesRow>,
}

/// Sales per product per hour, `from <= hour < to` (at most 31 days), optionally of one SKU.
#[utoipa::path(
    get,
    path = "/v1/analytics/sales",
    tag = "analytics",
    params(SalesQuery),
    responses(
        (status = 200, description = "Rows by hour.", body = SalesAnswer),
        (status = 400, description = "Invalid range.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn sales(
    State(db): State<Database>,
    query: Result<Query<SalesQuery>, QueryRejection>,
) -> Result<Json<SalesAnswer>, Problem> {
    let Query(q) = query.map_err(|e| invalid_query(e.body_text()))?;
    check_range(q.from, q.to)?;
    let rows = orders::sales(db.pool(), q.from, q.to, q.sku.as_deref())
        .await
        .map_err(store_unavailable)?;
    Ok(Json(SalesAnswer {
        from: q.from,
        to: q.to,
        rows,
    }))
}

/// The best-selling products by revenue over a range (at most 31 days).
#[utoipa::path(
    get,
    path = "/v1/analytics/top-products",
    tag = "analytics",
    params(TopProductsQuery),
    responses(
        (status = 200, description = "One row per product.", body = SalesAnswer),
        (status = 400, description = "Invalid range or limit.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn top_products(
    State(db): State<Database>,
    query: Result<Query<TopProductsQuery>, QueryRejection>,
) -> Result<Json<SalesAnswer>, Problem> {
    let Query(q) = query.map_err(|e| invalid_query(e.body_text()))?;
    check_range(q.from, q.to)?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(invalid_query("limit: expected 1 to 100"));
    }
    let rows = orders::top_products(db.pool(), q.from, q.to, limit)
        .await
        .map_err(store_unavailable)?;
    Ok(Json(SalesAnswer {
        from: q.from,
        to: q.to,
        rows,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusCounts {
    pub counts: std::collections::BTreeMap<String, i64>,
}

/// How many orders are in each status.
#[utoipa::path(
    get,
    path = "/v1/analytics/status-counts",
    tag = "analytics",
    responses((status = 200, description = "Counts by status.", body = StatusCounts))
)]
async fn status_counts(State(db): State<Database>) -> Result<Json<StatusCounts>, Problem> {
    let counts = orders::status_counts(db.pool())
        .await
        .map_err(store_unavailable)?;
    Ok(Json(StatusCounts {
        counts: counts.into_iter().collect(),
    }))
}
