//! The projection writer against real databases (SQLite and PostgreSQL): a batch applied twice
//! is applied once, an older event never overwrites a newer row, poison goes to the dead-letter
//! topic once, and the stored positions move with the rows.

use std::{sync::Arc, time::Duration};

use orderflow_platform::kafka::KafkaClients;
use orderflow_projections::{orders, orders::OrdersProjection, Database, ProjectionWriter};
use orderflow_schemas::{
    Address, Codec, Envelope, OrderConfirmed, OrderEvent, OrderLine, OrderPlaced, OrderValidated,
};
use orderflow_testkit::{run, Broker};
use orderflow_topics::names;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{OwnedMessage, Timestamp},
    producer::FutureProducer,
};
use sqlx::Row;

fn envelope(order: &str, sequence: i64) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::new_v4().to_string(),
        order_id: order.to_owned(),
        customer_id: "customer-1".into(),
        occurred_at: 1_764_000_000_000 + sequence,
        causation_id: None,
        sequence,
        schema_version: 1,
    }
}

fn placed(order: &str) -> OrderEvent {
    OrderEvent::OrderPlaced(OrderPlaced {
        envelope: envelope(order, 1),
        currency: "EUR".into(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_minor: 100,
        }],
        shipping_address: Address {
            name: "n".into(),
            line1: "l".into(),
            line2: None,
            city: "c".into(),
            postal_code: "p".into(),
            country: "DE".into(),
        },
        payment_token: "tok".into(),
        subtotal_minor: 100,
        shipping_minor: 0,
        tax_minor: 0,
        total_minor: 100,
    })
}

fn validated(order: &str) -> OrderEvent {
    OrderEvent::OrderValidated(OrderValidated {
        envelope: envelope(order, 2),
        currency: "EUR".into(),
        total_minor: 100,
    })
}

fn confirmed(order: &str) -> OrderEvent {
    OrderEvent::OrderConfirmed(OrderConfirmed {
        envelope: envelope(order, 3),
        total_minor: 100,
        currency: "EUR".into(),
    })
}

fn message(codec: &Codec, payload: Option<&OrderEvent>, offset: i64) -> OwnedMessage {
    let bytes = match payload {
        Some(event) => codec.encode(event).expect("encodes"),
        None => b"not an event".to_vec(),
    };
    OwnedMessage::new(
        Some(bytes),
        Some(b"customer-1".to_vec()),
        names::ORDERS_EVENTS.to_owned(),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    )
}

async fn stored_offset(db: &Database) -> Option<i64> {
    sqlx::query(
        "SELECT next_offset FROM projection_offsets WHERE projection = 'orders' AND partition_id = 0",
    )
    .fetch_optional(db.pool())
    .await
    .expect("query")
    .map(|r| r.try_get(0).expect("i64"))
}

/// An orders projection writer on a migrated database, with the embedded broker for its
/// dead letters; `None` (skip) when the embedded broker is not installed.
struct Fixture {
    broker: Broker,
    clients: KafkaClients,
    db: Database,
    codec: Arc<Codec>,
    writer: ProjectionWriter<OrdersProjection>,
    dlq: FutureProducer,
}

async fn fixture(db_url: &str) -> Option<Fixture> {
    let broker = Broker::embedded()?;
    let settings = orderflow_testkit::test_settings(None);
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    orderflow_testkit::apply_topics(&broker, &settings).await;
    let db = Database::connect(db_url, 2).await.expect("connect");
    db.migrate().await.expect("migrate");
    let codec = Arc::new(Codec::new().expect("codec"));
    let writer = ProjectionWriter::new(
        OrdersProjection,
        db.clone(),
        clients.clone(),
        &settings.projection,
        codec.clone(),
        orderflow_projections::ProjectionMetrics::unregistered(),
    );
    let dlq: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    Some(Fixture {
        broker,
        clients,
        db,
        codec,
        writer,
        dlq,
    })
}

async fn batches_apply_exactly_once(db_url: &str) {
    let Some(Fixture {
        broker: _broker,
        clients,
        db,
        codec,
        writer,
        dlq,
    }) = fixture(db_url).await
    else {
        return;
    };

    let a = uuid::Uuid::new_v4().to_string();
    let batch = vec![
        message(&codec, Some(&placed(&a)), 0),
        message(&codec, Some(&validated(&a)), 1),
        message(&codec, None, 2),
        message(&codec, Some(&confirmed(&a)), 3),
    ];
    let first = writer.write(&batch, Some(&dlq)).await.expect("first write");
    assert_eq!(
        (first.applied, first.skipped, first.dead_lettered),
        (3, 0, 1)
    );
    let row = orders::get(db.pool(), &a).await.expect("get").expect("row");
    assert_eq!((row.status.as_str(), row.version), ("confirmed", 3));
    assert_eq!(stored_offset(&db).await, Some(4));

    // Redelivery of the whole batch (a crash before the group offset was committed).
    let again = writer
        .write(&batch, Some(&dlq))
        .await
        .expect("second write");
    assert_eq!(
        (again.applied, again.skipped, again.dead_lettered),
        (0, 4, 0)
    );
    assert_eq!(
        orders::get(db.pool(), &a).await.expect("get").expect("row"),
        row
    );
    assert_eq!(stored_offset(&db).await, Some(4));

    // The poison record went to the dead-letter topic exactly once.
    let reader: BaseConsumer = clients
        .consumer("test", "test-dlq")
        .create()
        .expect("consumer");
    let (_, high) = reader
        .fetch_watermarks(names::PROJECTION_ORDERS_DLQ, 0, Duration::from_secs(10))
        .expect("watermarks");
    assert_eq!(high, 1);

    // Out of order: a newer event first, then an older one, then a duplicate of the newer.
    let b = uuid::Uuid::new_v4().to_string();
    let confirmed_b = confirmed(&b);
    let batch = vec![
        message(&codec, Some(&placed(&b)), 4),
        message(&codec, Some(&confirmed_b), 5),
        message(&codec, Some(&validated(&b)), 6),
        message(&codec, Some(&confirmed_b), 7),
    ];
    writer.write(&batch, Some(&dlq)).await.expect("write");
    let row = orders::get(db.pool(), &b).await.expect("get").expect("row");
    assert_eq!((row.status.as_str(), row.version), ("confirmed", 3));
    assert_eq!(row.last_event_id, confirmed_b.envelope().event_id);
    assert_eq!(stored_offset(&db).await, Some(8));

    // A batch that starts below the stored position applies only what is new.
    let c = uuid::Uuid::new_v4().to_string();
    let batch = vec![
        message(&codec, Some(&placed(&b)), 7),
        message(&codec, Some(&placed(&c)), 8),
    ];
    let outcome = writer.write(&batch, Some(&dlq)).await.expect("write");
    assert_eq!((outcome.applied, outcome.skipped), (1, 1));
    assert_eq!(
        orders::get(db.pool(), &c)
            .await
            .expect("get")
            .expect("row")
            .status,
        "placed"
    );
}

/// The fact tables count each order once, however often its events are delivered.
async fn facts_count_each_order_once(db_url: &str) {
    let Some(Fixture {
        broker: _broker,
        clients: _,
        db,
        codec,
        writer,
        dlq,
    }) = fixture(db_url).await
    else {
        return;
    };

    let a = uuid::Uuid::new_v4().to_string();
    let b = uuid::Uuid::new_v4().to_string();
    let mut placed_a = placed(&a);
    if let OrderEvent::OrderPlaced(p) = &mut placed_a {
        p.lines.push(OrderLine {
            sku: "SKU-2".into(),
            quantity: 3,
            unit_price_minor: 250,
        });
        p.lines.push(OrderLine {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_minor: 100,
        });
        p.total_minor = 1_050;
    }
    let mut confirmed_a = confirmed(&a);
    if let OrderEvent::OrderConfirmed(c) = &mut confirmed_a {
        c.total_minor = 1_050;
    }
    let rejected_b = OrderEvent::OrderRejected(orderflow_schemas::OrderRejected {
        envelope: envelope(&b, 2),
        stage: "validation".into(),
        reasons: vec![],
    });
    let batch = vec![
        message(&codec, Some(&placed_a), 0),
        message(&codec, Some(&placed(&b)), 1),
        message(&codec, Some(&confirmed_a), 2),
        message(&codec, Some(&rejected_b), 3),
        // The saga re-emitted the same events after a retry: new offsets, same events.
        message(&codec, Some(&confirmed_a), 4),
        message(&codec, Some(&placed_a), 5),
    ];
    writer.write(&batch, Some(&dlq)).await.expect("write");

    let one = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query(sql)
                .fetch_all(db.pool())
                .await
                .expect("query")
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            r.try_get::<i64, _>(i)
                                .map(|v| v.to_string())
                                .or_else(|_| r.try_get::<String, _>(i))
                                .expect("column")
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        one("SELECT orders_placed, orders_confirmed, orders_rejected, orders_cancelled FROM customer_stats").await,
        ["2,1,1,0"]
    );
    assert_eq!(
        one("SELECT currency, confirmed_minor FROM customer_spend").await,
        ["EUR,1050"]
    );
    assert_eq!(
        one("SELECT COUNT(*) FROM order_lines").await,
        ["4"],
        "three lines of A, one of B"
    );
    // The history holds each distinct event once, the re-emitted copies not again.
    assert_eq!(one("SELECT COUNT(*) FROM order_events").await, ["4"]);
    // SKU-1 appears on two lines of A (1 + 2 units); SKU-2 once (3 units); B never confirmed.
    assert_eq!(
        one("SELECT sku, units, revenue_minor, orders FROM sales_per_product_hour ORDER BY sku")
            .await,
        ["SKU-1,3,300,1", "SKU-2,3,750,1"]
    );
}

#[tokio::test]
async fn sqlite_facts_count_each_order_once() {
    let db = orderflow_testkit::Database::sqlite();
    facts_count_each_order_once(&db.url).await;
}

#[tokio::test]
async fn postgres_facts_count_each_order_once() {
    let Some(db) = orderflow_testkit::Database::postgres().await else {
        return;
    };
    facts_count_each_order_once(&db.url).await;
}

/// PostgreSQL: the history is partitioned by month, partitions are made ahead of time, and the
/// analyst role reads every table and writes none.
#[tokio::test]
async fn postgres_history_partitions_and_the_analyst_role() {
    let Some(test_db) = orderflow_testkit::Database::postgres().await else {
        return;
    };
    let db = Database::connect(test_db.url.as_str(), 2)
        .await
        .expect("connect");
    db.migrate().await.expect("migrate");
    // 2025-11-24, UTC.
    let now = 1_764_000_000_000;
    let created = db.ensure_event_partitions(now).await.expect("partitions");
    assert_eq!(
        created,
        [
            "order_events_2025_11",
            "order_events_2025_12",
            "order_events_2026_01",
            "order_events_2026_02"
        ]
    );
    assert!(
        db.ensure_event_partitions(now)
            .await
            .expect("again")
            .is_empty(),
        "idempotent"
    );

    let event = placed(&uuid::Uuid::new_v4().to_string());
    let mut conn = db.pool().acquire().await.expect("connection");
    orderflow_projections::orders::record_history(&mut conn, &event)
        .await
        .expect("history");
    drop(conn);
    let partition: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM order_events")
        .fetch_one(db.pool())
        .await
        .expect("partition");
    assert_eq!(partition, "order_events_2025_11");

    let mut analyst = db.pool().begin().await.expect("transaction");
    sqlx::query("SET LOCAL ROLE orderflow_analyst")
        .execute(&mut *analyst)
        .await
        .expect("set role");
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_events")
        .fetch_one(&mut *analyst)
        .await
        .expect("the analyst reads");
    assert_eq!(count, 1);
    let write = sqlx::query("DELETE FROM order_events")
        .execute(&mut *analyst)
        .await;
    let denied = write.expect_err("the analyst cannot write").to_string();
    assert!(denied.contains("permission denied"), "{denied}");
}

#[tokio::test]
async fn sqlite_batches_apply_exactly_once() {
    let db = orderflow_testkit::Database::sqlite();
    batches_apply_exactly_once(&db.url).await;
}

#[tokio::test]
async fn postgres_batches_apply_exactly_once() {
    let Some(db) = orderflow_testkit::Database::postgres().await else {
        return;
    };
    batches_apply_exactly_once(&db.url).await;
}

/// A writer that joins with its group offset behind the stored positions (offsets are
/// committed after the database) seeks to the stored positions: it never even reads, let alone
/// skips, what the tables already hold.
async fn a_new_assignment_starts_at_the_stored_positions(db_url: &str) {
    use rdkafka::producer::FutureRecord;
    let Some(Fixture {
        broker,
        clients,
        db,
        codec,
        writer: _,
        dlq: producer,
    }) = fixture(db_url).await
    else {
        return;
    };
    // 30 events on the log, all of them already in the tables (positions at the end).
    for _ in 0..30 {
        let order = uuid::Uuid::new_v4().to_string();
        let bytes = codec.encode(&placed(&order)).expect("encode");
        producer
            .send(
                FutureRecord::to(names::ORDERS_EVENTS)
                    .partition(0)
                    .key("customer-1")
                    .payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .expect("written");
    }
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition_id, next_offset) \
         VALUES ('orders', $1, 0, 30)",
    )
    .bind(names::ORDERS_EVENTS)
    .execute(db.pool())
    .await
    .expect("positions");

    let metrics = orderflow_projections::ProjectionMetrics::unregistered();
    let settings = orderflow_testkit::test_settings(Some(db_url));
    let writer = ProjectionWriter::new(
        OrdersProjection,
        db.clone(),
        clients.clone(),
        &settings.projection,
        codec.clone(),
        metrics.clone(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(writer.run(cancel.clone()));
    // One new event after them: applied, and nothing before it was read.
    let order = uuid::Uuid::new_v4().to_string();
    let bytes = codec.encode(&placed(&order)).expect("encode");
    producer
        .send(
            FutureRecord::to(names::ORDERS_EVENTS)
                .partition(0)
                .key("customer-1")
                .payload(&bytes),
            Duration::from_secs(10),
        )
        .await
        .expect("written");
    let labels = orderflow_projections::metrics::ProjectionLabels {
        projection: "orders".into(),
    };
    orderflow_testkit::eventually(Duration::from_secs(60), "the new event applied", || async {
        (metrics.applied.get_or_create(&labels).get() == 1).then_some(())
    })
    .await;
    assert_eq!(
        metrics.skipped.get_or_create(&labels).get(),
        0,
        "the writer read records below its stored position"
    );
    assert!(orders::get(db.pool(), &order).await.expect("get").is_some());
    assert_eq!(stored_offset(&db).await, Some(31));
    cancel.cancel();
    running.await.expect("writer ends");
    drop(broker);
}

#[test]
fn sqlite_a_new_assignment_starts_at_the_stored_positions() {
    run(async {
        let db = orderflow_testkit::Database::sqlite();
        a_new_assignment_starts_at_the_stored_positions(&db.url).await;
    });
}

#[test]
fn postgres_a_new_assignment_starts_at_the_stored_positions() {
    run(async {
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        a_new_assignment_starts_at_the_stored_positions(&db.url).await;
    });
}
