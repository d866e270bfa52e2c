//! The orders projection: the current state of every order (table `orders`), folded from
//! `orders.events`.
//!
//! A row's `version` is the `sequence` of the last event applied to it. `OrderPlaced`
//! (sequence 1) inserts the row, or does nothing if it exists; every later event updates the
//! row only if its sequence is higher than the row's version. So a duplicate or an older event
//! never overwrites a newer row, and applying the log twice gives the same table as once.

use orderflow_schemas::{FraudDecision, OrderEvent};
use sqlx::AnyConnection;

use crate::{db::Result, writer::Projection};

/// Statuses an order ends in; anything else is in flight.
pub const FINAL_STATUSES: [&str; 3] = ["confirmed", "rejected", "cancelled"];

/// What one event does to the `orders` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `OrderPlaced`: the row as it starts.
    Insert(OrderRow),
    /// A later event: new version, maybe a new status and reasons.
    Advance {
        order_id: String,
        version: i64,
        status: Option<&'static str>,
        reasons: Option<String>,
        updated_at: i64,
        event_id: String,
    },
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderRow {
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub version: i64,
    pub currency: String,
    pub total_minor: i64,
    pub line_count: i64,
    /// JSON array of `{code, field, message}` when the order was rejected.
    pub reasons: Option<String>,
    /// Event time of `OrderPlaced`, ms since the epoch.
    pub placed_at: i64,
    /// Event time of the last applied event, ms since the epoch.
    pub updated_at: i64,
    pub last_event_id: String,
}

/// The status an event moves its order to; `None` leaves the status as is (compensations).
pub fn status_after(event: &OrderEvent) -> Option<&'static str> {
    Some(match event {
        OrderEvent::OrderPlaced(_) => "placed",
        OrderEvent::OrderValidated(_) => "validated",
        OrderEvent::OrderRejected(_) => "rejected",
        OrderEvent::FraudScored(e) => match e.decision {
            FraudDecision::Approve => "fraud_approved",
            FraudDecision::Review => "fraud_review",
            // An OrderRejected follows and sets the final status.
            FraudDecision::Reject => return None,
        },
        OrderEvent::InventoryReservationRequested(_) => "reserving_inventory",
        OrderEvent::InventoryReserved(_) => "inventory_reserved",
        OrderEvent::InventoryRejected(_) => return None,
        OrderEvent::InventoryReleased(_) => return None,
        OrderEvent::PaymentRequested(_) => "payment_pending",
        OrderEvent::PaymentAuthorized(_) => "paid",
        OrderEvent::PaymentDeclined(_) => return None,
        OrderEvent::PaymentRefunded(_) => return None,
        OrderEvent::OrderConfirmed(_) => "confirmed",
        OrderEvent::OrderCancelled(_) => "cancelled",
        OrderEvent::PaymentRefundRequested(_) => "refund_pending",
        // Inputs to the saga from outside it and the inventory processor's per-line replies
        // carry sequence 0: they never move an order's row; the saga's answers do.
        OrderEvent::OrderCancellationRequested(_)
        | OrderEvent::FraudReviewDecided(_)
        | OrderEvent::OrderStepTimedOut(_)
        | OrderEvent::InventoryRestocked(_)
        | OrderEvent::InventoryLineReserved(_)
        | OrderEvent::InventoryLineRejected(_)
        | OrderEvent::InventoryLineReleased(_)
        | OrderEvent::InventoryReleaseRequested(_) => return None,
        // A control record of the saga, not part of any order (its order_id is empty).
        OrderEvent::SagaRulesChanged(_) => return None,
    })
}

/// The change an event makes. Pure: the fold the projection and any checker share.
pub fn change_for(event: &OrderEvent) -> Change {
    let envelope = event.envelope();
    match event {
        OrderEvent::OrderPlaced(placed) => Change::Insert(OrderRow {
            order_id: envelope.order_id.clone(),
            customer_id: envelope.customer_id.clone(),
            status: "placed".to_owned(),
            version: envelope.sequence,
            currency: placed.currency.clone(),
            total_minor: placed.total_minor,
            line_count: placed.lines.len() as i64,
            reasons: None,
            placed_at: envelope.occurred_at,
            updated_at: envelope.occurred_at,
            last_event_id: envelope.event_id.clone(),
        }),
        other => Change::Advance {
            order_id: envelope.order_id.clone(),
            version: envelope.sequence,
            status: status_after(other),
            reasons: match other {
                OrderEvent::OrderRejected(r) => serde_json::to_string(
                    &r.reasons
                        .iter()
                        .map(|r| {
                            serde_json::json!({"code": r.code, "field": r.field, "message": r.message})
                        })
                        .collect::<Vec<_>>(),
                )
                .ok(),
                _ => None,
            },
            updated_at: envelope.occurred_at,
            event_id: envelope.event_id.clone(),
        },
    }
}

/// Applies one change inside the caller's transaction; `projected_at` is the writer's clock.
/// Returns whether a row changed (`false`: the row already held this event or a newer one).
pub async fn apply_change(
    conn: &mut AnyConnection,
    change: &Change,
    projected_at: i64,
) -> Result<bool> {
    let result = match change {
        Change::Insert(row) => {
            sqlx::query(
                "INSERT INTO orders (order_id, customer_id, status, version, currency, \
                 total_minor, line_count, reasons, placed_at, updated_at, last_event_id, \
                 projected_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(&row.order_id)
            .bind(&row.customer_id)
            .bind(&row.status)
            .bind(row.version)
            .bind(&row.currency)
            .bind(row.total_minor)
            .bind(row.line_count)
            .bind(row.reasons.clone())
            .bind(row.placed_at)
            .bind(row.updated_at)
            .bind(&row.last_event_id)
            .bind(projected_at)
            .execute(&mut *conn)
            .await?
        }
        Change::Advance {
            order_id,
            version,
            status,
            reasons,
            updated_at,
            event_id,
        } => {
            sqlx::query(
                "UPDATE orders SET status = COALESCE($2, status), version = $3, \
                 reasons = COALESCE($4, reasons), updated_at = $5, last_event_id = $6, \
                 projected_at = $7 WHERE order_id = $1 AND version < $3",
            )
            .bind(order_id)
            .bind(status.map(str::to_owned))
            .bind(*version)
            .bind(reasons.clone())
            .bind(*updated_at)
            .bind(event_id)
            .bind(projected_at)
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(result.rows_affected() > 0)
}

/// Columns of an [`OrderRow`], in the order [`row_from`] reads them.
const ORDER_COLUMNS: &str = "order_id, customer_id, status, version, currency, total_minor, \
     line_count, reasons, placed_at, updated_at, last_event_id";

fn row_from(r: &sqlx::any::AnyRow) -> Result<OrderRow> {
    use sqlx::Row;
    Ok(OrderRow {
        order_id: r.try_get(0)?,
        customer_id: r.try_get(1)?,
        status: r.try_get(2)?,
        version: r.try_get(3)?,
        currency: r.try_get(4)?,
        total_minor: r.try_get(5)?,
        line_count: r.try_get(6)?,
        reasons: r.try_get(7)?,
        placed_at: r.try_get(8)?,
        updated_at: r.try_get(9)?,
        last_event_id: r.try_get(10)?,
    })
}

/// Reads one order.
pub async fn get(pool: &sqlx::AnyPool, order_id: &str) -> Result<Option<OrderRow>> {
    let row = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(row_from).transpose()
}

/// Where a page of a customer's orders ends: the last row's `(placed_at, order_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub placed_at: i64,
    pub order_id: String,
}

/// A customer's orders, newest first, `limit` at a time, after `cursor` (keyset pagination:
/// an order placed while a client pages never shifts the pages it has not read yet).
pub async fn customer_page(
    pool: &sqlx::AnyPool,
    customer_id: &str,
    cursor: Option<&PageCursor>,
    limit: i64,
) -> Result<Vec<OrderRow>> {
    let rows = match cursor {
        None => {
            sqlx::query(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 \
                 ORDER BY placed_at DESC, order_id DESC LIMIT $2"
            ))
            .bind(customer_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        Some(c) => {
            sqlx::query(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 \
                 AND (placed_at < $2 OR (placed_at = $2 AND order_id < $3)) \
                 ORDER BY placed_at DESC, order_id DESC LIMIT $4"
            ))
            .bind(customer_id)
            .bind(c.placed_at)
            .bind(&c.order_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter().map(row_from).collect()
}

/// One row of `sales_per_product_hour`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct SalesRow {
    pub sku: String,
    /// Start of the hour, ms since the epoch.
    pub hour: i64,
    pub currency: String,
    pub units: i64,
    pub revenue_minor: i64,
    pub orders: i64,
}

/// Sales per product per hour with `from <= hour < to`, optionally for one SKU, by hour.
pub async fn sales(
    pool: &sqlx::AnyPool,
    from: i64,
    to: i64,
    sku: Option<&str>,
) -> Result<Vec<SalesRow>> {
    const COLUMNS: &str = "SELECT sku, hour, currency, units, revenue_minor, orders \
         FROM sales_per_product_hour WHERE hour >= $1 AND hour < $2";
    let rows = match sku {
        Some(sku) => {
            sqlx::query(&format!(
                "{COLUMNS} AND sku = $3 ORDER BY hour, sku, currency LIMIT 10000"
            ))
            .bind(from)
            .bind(to)
            .bind(sku)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query(&format!(
                "{COLUMNS} ORDER BY hour, sku, currency LIMIT 10000"
            ))
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter().map(sales_row_from).collect()
}

/// Reads a `SalesRow` from `sku, hour, currency, units, revenue_minor, orders`.
fn sales_row_from(r: &sqlx::any::AnyRow) -> Result<SalesRow> {
    use sqlx::Row;
    Ok(SalesRow {
        sku: r.try_get(0)?,
        hour: r.try_get(1)?,
        currency: r.try_get(2)?,
        units: r.try_get(3)?,
        revenue_minor: r.try_get(4)?,
        orders: r.try_get(5)?,
    })
}

/// The products with the most revenue in `from <= hour < to`, per currency.
pub async fn top_products(
    pool: &sqlx::AnyPool,
    from: i64,
    to: i64,
    limit: i64,
) -> Result<Vec<SalesRow>> {
    let rows = sqlx::query(
        // The range's start stands as the hour; sums cast back to BIGINT (PostgreSQL sums
        // BIGINT into NUMERIC).
        "SELECT sku, CAST($1 AS BIGINT), currency, CAST(SUM(units) AS BIGINT), \
         CAST(SUM(revenue_minor) AS BIGINT), CAST(SUM(orders) AS BIGINT) \
         FROM sales_per_product_hour WHERE hour >= $1 AND hour < $2 \
         GROUP BY sku, currency ORDER BY SUM(revenue_minor) DESC, sku LIMIT $3",
    )
    .bind(from)
    .bind(to)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(sales_row_from).collect()
}

/// How many orders are in each status.
pub async fn status_counts(pool: &sqlx::AnyPool) -> Result<Vec<(String, i64)>> {
    use sqlx::Row;
    let rows = sqlx::query("SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY status")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// The orders projection, for the generic writer.
pub struct OrdersProjection;

impl Projection for OrdersProjection {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn topics(&self) -> Vec<&'static str> {
        vec![orderflow_topics::names::ORDERS_EVENTS]
    }

    fn dead_letter_topic(&self) -> &'static str {
        orderflow_topics::names::PROJECTION_ORDERS_DLQ
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "orders",
            "order_lines",
            "customer_stats",
            "customer_spend",
            "sales_per_product_hour",
            "order_events",
            "fraud_reviews",
        ]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        event: &OrderEvent,
        written_at: i64,
    ) -> Result<bool> {
        // The saga's control records belong to no order: nothing of them is an order's.
        if matches!(event, OrderEvent::SagaRulesChanged(_)) {
            return Ok(false);
        }
        record_history(conn, event).await?;
        if let OrderEvent::FraudReviewDecided(decided) = event {
            record_reviewer(conn, decided).await?;
        }
        let changed = apply_change(conn, &change_for(event), written_at).await?;
        // The orders row is the gate: facts move only with it, so an event the row already
        // reflects (a duplicate, a re-emitted copy) adds nothing.
        if changed {
            apply_facts(conn, event).await?;
        }
        Ok(changed)
    }
}

const HOUR_MS: i64 = 3_600_000;

/// Adds the event to `order_events`, once: a redelivered copy has the same id and changes
/// nothing.
pub async fn record_history(conn: &mut AnyConnection, event: &OrderEvent) -> Result<()> {
    let envelope = event.envelope();
    sqlx::query(
        "INSERT INTO order_events (event_id, order_id, customer_id, sequence, event_type, \
         occurred_at, causation_id) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(&envelope.event_id)
    .bind(&envelope.order_id)
    .bind(&envelope.customer_id)
    .bind(envelope.sequence)
    .bind(event.kind().name())
    .bind(envelope.occurred_at)
    .bind(envelope.causation_id.clone())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Updates the fact tables (`order_lines`, `customer_stats`, `customer_spend`,
/// `sales_per_product_hour`) for an event that just changed its order's row.
pub async fn apply_facts(conn: &mut AnyConnection, event: &OrderEvent) -> Result<()> {
    let envelope = event.envelope();
    match event {
        OrderEvent::OrderPlaced(placed) => {
            for (line_no, line) in placed.lines.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO order_lines (order_id, line_no, sku, quantity, \
                     unit_price_minor, currency) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (order_id, line_no) DO NOTHING",
                )
                .bind(&envelope.order_id)
                .bind(line_no as i64)
                .bind(&line.sku)
                .bind(i64::from(line.quantity))
                .bind(line.unit_price_minor)
                .bind(&placed.currency)
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(
                "INSERT INTO customer_stats (customer_id, orders_placed, orders_confirmed, \
                 orders_rejected, orders_cancelled, first_order_at, last_order_at) \
                 VALUES ($1, 1, 0, 0, 0, $2, $2) \
                 ON CONFLICT (customer_id) DO UPDATE SET \
                 orders_placed = customer_stats.orders_placed + 1, \
                 first_order_at = CASE WHEN excluded.first_order_at < customer_stats.first_order_at \
                   THEN excluded.first_order_at ELSE customer_stats.first_order_at END, \
                 last_order_at = CASE WHEN excluded.last_order_at > customer_stats.last_order_at \
                   THEN excluded.last_order_at ELSE customer_stats.last_order_at END",
            )
            .bind(&envelope.customer_id)
            .bind(envelope.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
        OrderEvent::OrderConfirmed(confirmed) => {
            count_outcome(conn, &envelope.customer_id, "orders_confirmed").await?;
            sqlx::query(
                "INSERT INTO customer_spend (customer_id, currency, confirmed_minor) \
                 VALUES ($1, $2, $3) ON CONFLICT (customer_id, currency) DO UPDATE SET \
                 confirmed_minor = customer_spend.confirmed_minor + excluded.confirmed_minor",
            )
            .bind(&envelope.customer_id)
            .bind(&confirmed.currency)
            .bind(confirmed.total_minor)
            .execute(&mut *conn)
            .await?;
            // One row per line of the order, from the lines it was placed with.
            let hour = envelope.occurred_at - envelope.occurred_at.rem_euclid(HOUR_MS);
            sqlx::query(
                "INSERT INTO sales_per_product_hour (sku, hour, currency, units, revenue_minor, \
                 orders) SELECT sku, $2, currency, SUM(quantity), SUM(quantity * unit_price_minor), 1 \
                 FROM order_lines WHERE order_id = $1 GROUP BY sku, currency \
                 ON CONFLICT (sku, hour, currency) DO UPDATE SET \
                 units = sales_per_product_hour.units + excluded.units, \
                 revenue_minor = sales_per_product_hour.revenue_minor + excluded.revenue_minor, \
                 orders = sales_per_product_hour.orders + 1",
            )
            .bind(&envelope.order_id)
            .bind(hour)
            .execute(&mut *conn)
            .await?;
        }
        OrderEvent::OrderRejected(_) => {
            count_outcome(conn, &envelope.customer_id, "orders_rejected").await?;
            resolve_review(conn, envelope, "rejected").await?;
        }
        OrderEvent::OrderCancelled(_) => {
            count_outcome(conn, &envelope.customer_id, "orders_cancelled").await?;
            resolve_review(conn, envelope, "cancelled").await?;
        }
        OrderEvent::FraudScored(scored) if scored.decision == FraudDecision::Review => {
            // The order's row exists (the event just moved it): its totals come from there.
            sqlx::query(
                "INSERT INTO fraud_reviews (order_id, customer_id, score, reasons, total_minor, \
                 currency, status, queued_at) SELECT order_id, customer_id, $2, $3, total_minor, \
                 currency, 'pending', $4 FROM orders WHERE order_id = $1 \
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(&envelope.order_id)
            .bind(scored.score)
            .bind(serde_json::to_string(&scored.reasons).unwrap_or_else(|_| "[]".to_owned()))
            .bind(envelope.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
        // Approved (by the model or a reviewer): the saga goes on to reserve stock.
        OrderEvent::InventoryReservationRequested(_) => {
            resolve_review(conn, envelope, "approved").await?;
        }
        _ => {}
    }
    Ok(())
}

/// Ends a pending review of the order with `status` (no-op if none is pending).
async fn resolve_review(
    conn: &mut AnyConnection,
    envelope: &orderflow_schemas::Envelope,
    status: &'static str,
) -> Result<()> {
    sqlx::query(
        "UPDATE fraud_reviews SET status = $2, resolved_at = $3 \
         WHERE order_id = $1 AND status = 'pending'",
    )
    .bind(&envelope.order_id)
    .bind(status)
    .bind(envelope.occurred_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Remembers who decided a pending review first (the decision itself shows in how the saga
/// goes on). Applying it again changes nothing.
async fn record_reviewer(
    conn: &mut AnyConnection,
    decided: &orderflow_schemas::FraudReviewDecided,
) -> Result<()> {
    sqlx::query(
        "UPDATE fraud_reviews SET reviewer = $2, note = $3 \
         WHERE order_id = $1 AND reviewer IS NULL",
    )
    .bind(&decided.envelope.order_id)
    .bind(&decided.reviewer)
    .bind(&decided.note)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A review of the queue (`fraud_reviews`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Review {
    pub order_id: String,
    pub customer_id: String,
    pub score: f64,
    pub reasons: Vec<String>,
    pub total_minor: i64,
    pub currency: String,
    pub status: String,
    pub queued_at: i64,
    pub reviewer: Option<String>,
    pub note: Option<String>,
    pub resolved_at: Option<i64>,
}

/// Reviews in `status`, oldest first, after `after` (the previous page's last `queued_at` and
/// order id), `limit` at a time.
pub async fn reviews(
    pool: &sqlx::AnyPool,
    status: &str,
    after: Option<&PageCursor>,
    limit: i64,
) -> Result<Vec<Review>> {
    use sqlx::Row;
    let (at, id) = after.map_or((i64::MIN, String::new()), |c| {
        (c.placed_at, c.order_id.clone())
    });
    let rows = sqlx::query(
        "SELECT order_id, customer_id, score, reasons, total_minor, currency, status, queued_at, \
         reviewer, note, resolved_at FROM fraud_reviews WHERE status = $1 \
         AND (queued_at > $2 OR (queued_at = $2 AND order_id > $3)) \
         ORDER BY queued_at, order_id LIMIT $4",
    )
    .bind(status)
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let reasons: String = r.try_get(3)?;
            Ok(Review {
                order_id: r.try_get(0)?,
                customer_id: r.try_get(1)?,
                score: r.try_get(2)?,
                reasons: serde_json::from_str(&reasons).unwrap_or_default(),
                total_minor: r.try_get(4)?,
                currency: r.try_get(5)?,
                status: r.try_get(6)?,
                queued_at: r.try_get(7)?,
                reviewer: r.try_get(8)?,
                note: r.try_get(9)?,
                resolved_at: r.try_get(10)?,
            })
        })
        .collect()
}

/// Adds one to an outcome column of a customer's stats. `column` is one of three constants.
async fn count_outcome(
    conn: &mut AnyConnection,
    customer_id: &str,
    column: &'static str,
) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE customer_stats SET {column} = {column} + 1 WHERE customer_id = $1"
    ))
    .bind(customer_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
