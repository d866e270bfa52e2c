//! The inventory projection: stock per SKU for queries and analysts (`inventory_levels`), from
//! the restocks on `inventory.commands` and the inventory processor's per-line answers on
//! `orders.events`, with every movement kept once (`inventory_movements`).
//!
//! Exactly once like every projection (crate::writer): positions commit with the rows. On top
//! of that each movement is keyed by its event id and the levels move only when the movement
//! row was new, so a re-emitted answer (same id, same bytes) changes nothing even when it sits
//! at a new offset.

use orderflow_schemas::OrderEvent;
use orderflow_topics::names;
use sqlx::{AnyConnection, Row};

use crate::{db::Result, writer::Projection};

/// One movement of stock, as the projection records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement<'a> {
    pub event_id: &'a str,
    pub sku: &'a str,
    pub order_id: Option<&'a str>,
    pub kind: &'static str,
    pub quantity: i64,
    pub occurred_at: i64,
}

/// The movement an event records, if it moves stock. Pure: shared with `reconcile`.
pub fn movement(event: &OrderEvent) -> Option<Movement<'_>> {
    let envelope = event.envelope();
    let order = Some(envelope.order_id.as_str());
    let (sku, order_id, kind, quantity) = match event {
        OrderEvent::InventoryRestocked(e) => (&e.sku, None, "restocked", e.quantity),
        OrderEvent::InventoryLineReserved(e) => (&e.sku, order, "reserved", e.quantity),
        OrderEvent::InventoryLineReleased(e) => (&e.sku, order, "released", e.quantity),
        OrderEvent::InventoryLineRejected(e) => (&e.sku, order, "rejected", e.requested),
        _ => return None,
    };
    Some(Movement {
        event_id: &envelope.event_id,
        sku,
        order_id,
        kind,
        quantity: i64::from(quantity),
        occurred_at: envelope.occurred_at,
    })
}

/// Stock of one SKU as `inventory_levels` has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Level {
    pub sku: String,
    pub restocked: i64,
    pub reserved: i64,
    pub available: i64,
    pub rejected_lines: i64,
    pub updated_at: i64,
}

impl Level {
    /// Applies one movement (the fold `reconcile` recomputes from the log).
    pub fn apply(&mut self, m: &Movement<'_>) {
        match m.kind {
            "restocked" => self.restocked += m.quantity,
            "reserved" => self.reserved += m.quantity,
            "released" => self.reserved -= m.quantity,
            _ => self.rejected_lines += 1,
        }
        self.available = self.restocked - self.reserved;
        self.updated_at = self.updated_at.max(m.occurred_at);
    }
}

pub struct InventoryProjection;

impl Projection for InventoryProjection {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn topics(&self) -> Vec<&'static str> {
        vec![names::ORDERS_EVENTS, names::INVENTORY_COMMANDS]
    }

    fn dead_letter_topic(&self) -> &'static str {
        names::PROJECTION_INVENTORY_DLQ
    }

    fn tables(&self) -> &'static [&'static str] {
        &["inventory_movements", "inventory_levels"]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        event: &OrderEvent,
        _written_at: i64,
    ) -> Result<bool> {
        let Some(m) = movement(event) else {
            return Ok(false);
        };
        let new = sqlx::query(
            "INSERT INTO inventory_movements (event_id, sku, order_id, kind, quantity, \
             occurred_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(m.event_id)
        .bind(m.sku)
        .bind(m.order_id.map(str::to_owned))
        .bind(m.kind)
        .bind(m.quantity)
        .bind(m.occurred_at)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        if !new {
            return Ok(false);
        }
        let (restocked, reserved, rejected) = match m.kind {
            "restocked" => (m.quantity, 0, 0),
            "reserved" => (0, m.quantity, 0),
            "released" => (0, -m.quantity, 0),
            _ => (0, 0, 1),
        };
        sqlx::query(
            "INSERT INTO inventory_levels (sku, restocked, reserved, available, rejected_lines, \
             updated_at) VALUES ($1, $2, $3, $2 - $3, $4, $5) \
             ON CONFLICT (sku) DO UPDATE SET \
             restocked = inventory_levels.restocked + excluded.restocked, \
             reserved = inventory_levels.reserved + excluded.reserved, \
             available = inventory_levels.available + excluded.available, \
             rejected_lines = inventory_levels.rejected_lines + excluded.rejected_lines, \
             updated_at = CASE WHEN excluded.updated_at > inventory_levels.updated_at \
               THEN excluded.updated_at ELSE inventory_levels.updated_at END",
        )
        .bind(m.sku)
        .bind(restocked)
        .bind(reserved)
        .bind(rejected)
        .bind(m.occurred_at)
        .execute(&mut *conn)
        .await?;
        Ok(true)
    }
}

fn level_from(r: &sqlx::any::AnyRow) -> Result<Level> {
    Ok(Level {
        sku: r.try_get(0)?,
        restocked: r.try_get(1)?,
        reserved: r.try_get(2)?,
        available: r.try_get(3)?,
        rejected_lines: r.try_get(4)?,
        updated_at: r.try_get(5)?,
    })
}

const LEVEL_COLUMNS: &str = "sku, restocked, reserved, available, rejected_lines, updated_at";

/// One SKU's level.
pub async fn level(pool: &sqlx::AnyPool, sku: &str) -> Result<Option<Level>> {
    let row = sqlx::query(&format!(
        "SELECT {LEVEL_COLUMNS} FROM inventory_levels WHERE sku = $1"
    ))
    .bind(sku)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(level_from).transpose()
}

/// Every SKU's level, by SKU.
pub async fn levels(pool: &sqlx::AnyPool) -> Result<Vec<Level>> {
    let rows = sqlx::query(&format!(
        "SELECT {LEVEL_COLUMNS} FROM inventory_levels ORDER BY sku"
    ))
    .fetch_all(pool)
    .await?;
    rows.iter().map(level_from).collect()
}

/// SKUs after `after` (keyset), `limit` at a time.
pub async fn level_page(
    pool: &sqlx::AnyPool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Level>> {
    let rows = sqlx::query(&format!(
        "SELECT {LEVEL_COLUMNS} FROM inventory_levels WHERE sku > $1 ORDER BY sku LIMIT $2"
    ))
    .bind(after.unwrap_or(""))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(level_from).collect()
}
