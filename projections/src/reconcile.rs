//! `orderflow reconcile`: checks the invariants the tables must hold against the event log —
//! the orders projection equals a fold of the log; every order is final or still within its
//! SLO; a confirmed order was paid exactly once and no other order has a charge standing; stock
//! never went negative and `inventory_levels` equals the restocks minus what is reserved,
//! folded from the log. Each breach names the order or SKU and what differs; the binary exits
//! non-zero when there is any.
//!
//! The log is read from the beginning to the end it had when the check started, with
//! `read_committed`; events the projection has not reached yet (its stored positions) are left
//! out of the fold, so a running pipeline does not show up as a breach.
//!
//! Where the beginning of a topic is gone (deleted by retention), the fold starts from the
//! projection's latest snapshot (`orderflow snapshot`, [`crate::replay::open_snapshot`]): its
//! rows seed the fold, and the log is read from its positions. What happened before the
//! snapshot is then taken from it: payments are checked for the orders placed after it, and
//! stock is folded on from the snapshot's levels, its recorded movements counting as seen.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use orderflow_platform::kafka::KafkaClients;
use orderflow_schemas::{Codec, OrderEvent};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    Offset, TopicPartitionList,
};
use sqlx::Row;

use crate::{
    db::{Database, DbError},
    orders::{change_for, Change, OrderRow, FINAL_STATUSES},
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    LogStart(#[from] crate::log_start::LogStartError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("reading {topic} did not reach its end within {waited:?}")]
    Timeout { topic: String, waited: Duration },
    #[error("schemas: {0}")]
    Codec(#[from] orderflow_schemas::CodecError),
    #[error("the log reader stopped unexpectedly")]
    Join,
    #[error("the projection's snapshot: {0}")]
    Snapshot(String),
}

impl From<sqlx::Error> for ReconcileError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// When the orders projection's snapshot the fold started from was taken (ms since the
    /// epoch), if the log's beginning is gone.
    pub from_snapshot: Option<i64>,
    pub events_read: usize,
    pub orders_checked: usize,
    /// One line per breach, naming what and where.
    pub breaches: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.breaches.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "read {} events, checked {} orders: {}",
            self.events_read,
            self.orders_checked,
            if self.is_clean() {
                "every invariant holds".to_owned()
            } else {
                format!("{} breaches", self.breaches.len())
            }
        )?;
        if let Some(taken_at) = self.from_snapshot {
            writeln!(
                f,
                "(the log's beginning is gone: folded from the orders projection's snapshot taken \
                 at {taken_at} ms since the epoch; payments checked for the orders placed after it)"
            )?;
        }
        for breach in &self.breaches {
            writeln!(f, "BREACH    {breach}")?;
        }
        Ok(())
    }
}

/// Folds events exactly as the orders projection does (insert if absent, advance when newer).
pub fn fold<'a>(events: impl IntoIterator<Item = &'a OrderEvent>) -> BTreeMap<String, OrderRow> {
    let mut orders: BTreeMap<String, OrderRow> = BTreeMap::new();
    fold_into(&mut orders, events);
    orders
}

/// [`fold`] onto rows already folded (a snapshot's).
fn fold_into<'a>(
    orders: &mut BTreeMap<String, OrderRow>,
    events: impl IntoIterator<Item = &'a OrderEvent>,
) {
    for event in events {
        match change_for(event) {
            Change::Insert(row) => {
                orders.entry(row.order_id.clone()).or_insert(row);
            }
            Change::Advance {
                order_id,
                version,
                status,
                reasons,
                updated_at,
                event_id,
            } => {
                if let Some(row) = orders.get_mut(&order_id) {
                    if row.version < version {
                        row.version = version;
                        if let Some(status) = status {
                            row.status = status.to_owned();
                        }
                        if reasons.is_some() {
                            row.reasons = reasons;
                        }
                        row.updated_at = updated_at;
                        row.last_event_id = event_id;
                    }
                }
            }
        }
    }
}

/// Reads `topic` up to the projection's stored positions (or the log end, if lower), from
/// `starts` (a snapshot's positions) where given, else from the beginning.
fn read_log(
    clients: &KafkaClients,
    codec: &Codec,
    topic: &str,
    positions: &HashMap<i32, i64>,
    starts: Option<&HashMap<i32, i64>>,
) -> Result<(Vec<OrderEvent>, usize), ReconcileError> {
    let consumer: BaseConsumer = clients
        .consumer(
            "reconcile",
            &format!("orderflow-reconcile-{}", uuid::Uuid::new_v4()),
        )
        .create()?;
    let timeout = clients.admin_timeout();
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let ends_reader = clients.open_reader("reconcile")?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let start = starts.and_then(|s| s.get(&p.id()).copied());
        let from = start.unwrap_or(0);
        let position = positions.get(&p.id()).copied().unwrap_or(0);
        if position <= from {
            continue; // nothing of it folded into the tables past where reading would start
        }
        let log_end = match start {
            Some(from) => {
                crate::log_start::require_from_to_end(&ends_reader, topic, p.id(), from, timeout)?
            }
            None => crate::log_start::require_whole_to_end(&ends_reader, topic, p.id(), timeout)?,
        };
        let end = log_end.min(position);
        if end > from {
            ends.insert(p.id(), end);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(from))?;
        }
    }
    let mut events = Vec::new();
    let mut undecodable = 0;
    if ends.is_empty() {
        return Ok((events, undecodable));
    }
    consumer.assign(&tpl)?;
    let waited = Duration::from_secs(120);
    let reached = orderflow_platform::kafka::read_to_ends(&consumer, topic, &ends, waited, |m| {
        if orderflow_platform::kafka::is_release_marker(m) {
            return;
        }
        match codec.decode(m.payload().unwrap_or_default()) {
            Ok(event) => events.push(event),
            Err(_) => undecodable += 1,
        }
    })?;
    if !reached {
        return Err(ReconcileError::Timeout {
            topic: topic.to_owned(),
            waited,
        });
    }
    Ok((events, undecodable))
}

/// Runs every check. `slo` is how long an order may stay in flight; `now_ms` the current time.
pub async fn reconcile(
    db: &Database,
    clients: &KafkaClients,
    topic: &str,
    slo: Duration,
    now_ms: i64,
) -> Result<Report, ReconcileError> {
    let codec = Codec::new()?;
    let positions = stored_positions(db, "orders", topic).await?;
    let snapshot = snapshot_if_truncated(db, clients, "orders", &[(topic, &positions)]).await?;
    let starts = snapshot.as_ref().map(|(_, s)| starts_on(s, topic));
    let (events, _undecodable) = {
        let clients = clients.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            read_log(&clients, &codec, &topic, &positions, starts.as_ref())
        })
        .await
        .map_err(|_| ReconcileError::Join)??
    };
    let mut expected = match &snapshot {
        Some((snapshot_db, _)) => snapshot_orders(snapshot_db).await?,
        None => BTreeMap::new(),
    };
    fold_into(&mut expected, &events);
    let mut report = Report {
        from_snapshot: snapshot.as_ref().map(|(_, s)| s.taken_at_ms),
        events_read: events.len(),
        orders_checked: expected.len(),
        breaches: Vec::new(),
    };
    if snapshot.is_some() {
        // Only orders whose whole history was read: the snapshot does not hold payments.
        let placed: std::collections::HashSet<&str> = events
            .iter()
            .filter(|e| matches!(e, OrderEvent::OrderPlaced(_)))
            .map(|e| e.envelope().order_id.as_str())
            .collect();
        let after: BTreeMap<String, OrderRow> = expected
            .iter()
            .filter(|(id, _)| placed.contains(id.as_str()))
            .map(|(id, row)| (id.clone(), row.clone()))
            .collect();
        check_payments(&events, &after, &mut report);
    } else {
        check_payments(&events, &expected, &mut report);
    }
    if let Some((snapshot_db, _)) = snapshot {
        snapshot_db.pool().close().await;
    }
    check_stock(db, clients, &mut report).await?;

    let mut actual: BTreeMap<String, OrderRow> = BTreeMap::new();
    for order_id in expected.keys() {
        if let Some(row) = crate::orders::get(db.pool(), order_id).await? {
            actual.insert(order_id.clone(), row);
        }
    }
    let table_count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db.pool())
        .await?;
    if table_count as usize > expected.len() {
        report.breaches.push(format!(
            "orders: the table has {table_count} rows, the log folds to {}",
            expected.len()
        ));
    }
    for (order_id, want) in &expected {
        let Some(have) = actual.get(order_id) else {
            report.breaches.push(format!(
                "order {order_id}: in the log, missing from the orders table"
            ));
            continue;
        };
        let mut differences = Vec::new();
        for (column, a, b) in [
            ("status", want.status.clone(), have.status.clone()),
            (
                "version",
                want.version.to_string(),
                have.version.to_string(),
            ),
            (
                "customer_id",
                want.customer_id.clone(),
                have.customer_id.clone(),
            ),
            (
                "total_minor",
                want.total_minor.to_string(),
                have.total_minor.to_string(),
            ),
            ("currency", want.currency.clone(), have.currency.clone()),
            (
                "last_event_id",
                want.last_event_id.clone(),
                have.last_event_id.clone(),
            ),
        ] {
            if a != b {
                differences.push(format!("{column} is {b:?}, the log says {a:?}"));
            }
        }
        if !differences.is_empty() {
            report
                .breaches
                .push(format!("order {order_id}: {}", differences.join("; ")));
        }
        let in_flight_ms = now_ms - want.placed_at;
        if !FINAL_STATUSES.contains(&want.status.as_str()) && in_flight_ms > slo.as_millis() as i64
        {
            report.breaches.push(format!(
                "order {order_id}: still {} after {} s (SLO {} s)",
                want.status,
                in_flight_ms / 1000,
                slo.as_secs()
            ));
        }
    }
    Ok(report)
}

/// Exactly one standing payment per confirmed order, none for any other final order.
fn check_payments(events: &[OrderEvent], orders: &BTreeMap<String, OrderRow>, report: &mut Report) {
    let mut authorized: HashMap<&str, std::collections::BTreeSet<&str>> = HashMap::new();
    let mut refunded: HashMap<&str, std::collections::BTreeSet<&str>> = HashMap::new();
    for event in events {
        let e = event.envelope();
        match event {
            OrderEvent::PaymentAuthorized(_) => {
                authorized
                    .entry(&e.order_id)
                    .or_default()
                    .insert(&e.event_id);
            }
            OrderEvent::PaymentRefunded(_) => {
                refunded.entry(&e.order_id).or_default().insert(&e.event_id);
            }
            _ => {}
        }
    }
    for (order_id, row) in orders {
        if !FINAL_STATUSES.contains(&row.status.as_str()) {
            continue;
        }
        let paid = authorized.get(order_id.as_str()).map_or(0, |s| s.len());
        let back = refunded.get(order_id.as_str()).map_or(0, |s| s.len());
        let standing = paid as i64 - back as i64;
        let want = i64::from(row.status == "confirmed");
        if standing != want || paid > 1 {
            report.breaches.push(format!(
                "order {order_id}: {} with {paid} authorizations and {back} refunds; expected {want} standing payment",
                row.status
            ));
        }
    }
}

/// Stock: the inventory projection's levels against the fold of its inputs, and never below 0.
async fn check_stock(
    db: &Database,
    clients: &KafkaClients,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    use crate::inventory::{levels, movement, Level};
    use orderflow_topics::names;
    let mut read = Vec::new();
    for topic in [names::ORDERS_EVENTS, names::INVENTORY_COMMANDS] {
        read.push((topic, stored_positions(db, "inventory", topic).await?));
    }
    let reading: Vec<(&str, &HashMap<i32, i64>)> = read.iter().map(|(t, p)| (*t, p)).collect();
    let snapshot = snapshot_if_truncated(db, clients, "inventory", &reading).await?;
    let mut events = Vec::new();
    for (topic, positions) in read {
        let starts = snapshot.as_ref().map(|(_, s)| starts_on(s, topic));
        let (read, _) = {
            let (clients, topic) = (clients.clone(), topic.to_owned());
            tokio::task::spawn_blocking(move || {
                let codec = Codec::new()?;
                read_log(&clients, &codec, &topic, &positions, starts.as_ref())
            })
            .await
            .map_err(|_| ReconcileError::Join)??
        };
        events.extend(read);
    }
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut expected: BTreeMap<String, Level> = BTreeMap::new();
    if let Some((snapshot_db, _)) = snapshot {
        // The snapshot's levels, and its movements as seen: a repeat of one is not new.
        for level in levels(snapshot_db.pool()).await? {
            expected.insert(level.sku.clone(), level);
        }
        seen.extend(
            sqlx::query_scalar::<_, String>("SELECT event_id FROM inventory_movements")
                .fetch_all(snapshot_db.pool())
                .await?,
        );
        snapshot_db.pool().close().await;
    }
    for event in &events {
        if let OrderEvent::InventoryLineReserved(r) = event {
            if r.available_after < 0 {
                report.breaches.push(format!(
                    "sku {}: stock went negative ({} after reserving for order {})",
                    r.sku, r.available_after, r.envelope.order_id
                ));
            }
        }
        let Some(m) = movement(event) else { continue };
        if !seen.insert(m.event_id.to_owned()) {
            continue;
        }
        let level = expected.entry(m.sku.to_owned()).or_insert_with(|| Level {
            sku: m.sku.to_owned(),
            ..Level::default()
        });
        level.apply(&m);
    }
    let actual: BTreeMap<String, Level> = levels(db.pool())
        .await?
        .into_iter()
        .map(|l| (l.sku.clone(), l))
        .collect();
    for (sku, want) in &expected {
        if want.available < 0 {
            report.breaches.push(format!(
                "sku {sku}: the log folds to {} available",
                want.available
            ));
        }
        let Some(have) = actual.get(sku) else {
            report.breaches.push(format!(
                "sku {sku}: in the log, missing from inventory_levels"
            ));
            continue;
        };
        let mut differences = Vec::new();
        for (column, a, b) in [
            ("restocked", want.restocked, have.restocked),
            ("reserved", want.reserved, have.reserved),
            ("available", want.available, have.available),
            ("rejected_lines", want.rejected_lines, have.rejected_lines),
        ] {
            if a != b {
                differences.push(format!("{column} is {b}, the log says {a}"));
            }
        }
        if !differences.is_empty() {
            report
                .breaches
                .push(format!("sku {sku}: {}", differences.join("; ")));
        }
    }
    for sku in actual.keys().filter(|s| !expected.contains_key(*s)) {
        report
            .breaches
            .push(format!("sku {sku}: in inventory_levels, not in the log"));
    }
    Ok(())
}

/// `projection`'s latest snapshot (and a connection to its tables) when a partition the
/// projection has read from (a stored position above 0 in `read`) no longer starts at 0; the
/// truncation as the error when there is no snapshot.
async fn snapshot_if_truncated(
    db: &Database,
    clients: &KafkaClients,
    projection: &str,
    read: &[(&str, &HashMap<i32, i64>)],
) -> Result<Option<(Database, crate::replay::Snapshot)>, ReconcileError> {
    let truncated = {
        let clients = clients.clone();
        let read: Vec<(String, Vec<i32>)> = read
            .iter()
            .map(|(topic, positions)| {
                let partitions = positions
                    .iter()
                    .filter(|(_, o)| **o > 0)
                    .map(|(p, _)| *p)
                    .collect();
                ((*topic).to_owned(), partitions)
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let consumer = clients.open_reader("reconcile")?;
            let timeout = clients.admin_timeout();
            for (topic, partitions) in &read {
                for partition in partitions {
                    if let Err(e) =
                        crate::log_start::require_whole(&consumer, topic, *partition, timeout)
                    {
                        return Ok::<_, ReconcileError>(Some(e));
                    }
                }
            }
            Ok(None)
        })
        .await
        .map_err(|_| ReconcileError::Join)??
    };
    let Some(truncated) = truncated else {
        return Ok(None);
    };
    match crate::replay::open_snapshot(db, projection)
        .await
        .map_err(|e| ReconcileError::Snapshot(e.to_string()))?
    {
        Some(snapshot) => Ok(Some(snapshot)),
        None => Err(truncated.into()),
    }
}

/// A snapshot's positions on `topic`, by partition.
fn starts_on(snapshot: &crate::replay::Snapshot, topic: &str) -> HashMap<i32, i64> {
    snapshot
        .positions
        .iter()
        .filter(|((t, _), _)| t == topic)
        .map(|((_, p), o)| (*p, *o))
        .collect()
}

/// Every row of a snapshot's `orders` table.
async fn snapshot_orders(
    snapshot: &Database,
) -> Result<BTreeMap<String, OrderRow>, ReconcileError> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT order_id FROM orders")
        .fetch_all(snapshot.pool())
        .await?;
    let mut rows = BTreeMap::new();
    for id in ids {
        if let Some(row) = crate::orders::get(snapshot.pool(), &id).await? {
            rows.insert(id, row);
        }
    }
    Ok(rows)
}

/// A projection's stored positions on `topic`, by partition.
async fn stored_positions(
    db: &Database,
    projection: &str,
    topic: &str,
) -> Result<HashMap<i32, i64>, ReconcileError> {
    Ok(sqlx::query(
        "SELECT partition_id, next_offset FROM projection_offsets \
         WHERE projection = $1 AND topic = $2",
    )
    .bind(projection)
    .bind(topic)
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(|r| Ok((r.try_get::<i64, _>(0)? as i32, r.try_get::<i64, _>(1)?)))
    .collect::<Result<_, sqlx::Error>>()?)
}

#[cfg(test)]
mod tests {
    use orderflow_schemas::{Envelope, OrderConfirmed, OrderValidated};

    use super::*;

    fn envelope(sequence: i64) -> Envelope {
        Envelope {
            event_id: format!("e{sequence}"),
            order_id: "o".into(),
            customer_id: "c".into(),
            occurred_at: sequence,
            causation_id: None,
            sequence,
            schema_version: 1,
        }
    }

    #[test]
    fn the_fold_keeps_the_newest_state_whatever_the_order_of_delivery() {
        let validated = OrderEvent::OrderValidated(OrderValidated {
            envelope: envelope(2),
            currency: "EUR".into(),
            total_minor: 5,
        });
        let confirmed = OrderEvent::OrderConfirmed(OrderConfirmed {
            envelope: envelope(3),
            total_minor: 5,
            currency: "EUR".into(),
        });
        // No OrderPlaced: later events alone make no row, as in the projection.
        assert!(fold([&validated, &confirmed]).is_empty());
        let placed = OrderEvent::OrderPlaced(orderflow_schemas::OrderPlaced {
            envelope: envelope(1),
            currency: "EUR".into(),
            lines: vec![],
            shipping_address: orderflow_schemas::Address {
                name: "n".into(),
                line1: "l".into(),
                line2: None,
                city: "c".into(),
                postal_code: "p".into(),
                country: "DE".into(),
            },
            payment_token: "t".into(),
            subtotal_minor: 5,
            shipping_minor: 0,
            tax_minor: 0,
            total_minor: 5,
        });
        let orders = fold([&placed, &confirmed, &validated, &confirmed]);
        let row = &orders["o"];
        assert_eq!((row.status.as_str(), row.version), ("confirmed", 3));
        assert_eq!(row.last_event_id, "e3");
    }
}
