//! The projections killed mid-batch: `orderflow project` runs as its own OS process against
//! `orderflow broker` and is SIGKILLed again and again while the test writes events — with
//! duplicates and older events delivered after newer ones — and restarted. Afterwards the
//! tables equal a fold of the log the test computes itself from what it wrote: each order's
//! status and version from its newest event, each customer's counters, each SKU's stock. On
//! SQLite and on PostgreSQL.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::{
    Codec, InventoryLineReleased, InventoryLineReserved, OrderEvent, OrderPlaced,
};
use orderflow_testkit::{
    log::{next_envelope, now_ms, order_placed, restocked, short_timeline},
    test_settings, BrokerProcess, Database, TempDir,
};
use orderflow_topics::names;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::Row;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const ORDERS: usize = 3000;
const SKUS: usize = 10;

fn start_projection(bootstrap: &str, database_url: &str) -> Child {
    Command::new(BIN)
        .args([
            "--kafka-brokers",
            bootstrap,
            "--set",
            "telemetry.listen=\"127.0.0.1:0\"",
            "--set",
            &format!("database.url={database_url:?}"),
            "--set",
            "kafka.session_timeout_ms=3000",
            // Small batches: more transactions for the kills to land in.
            "--set",
            "projection.batch_max_records=50",
            "project",
        ])
        .env_remove("RUST_LOG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("orderflow project starts")
}

/// What the test expects of one order: its newest event decides status and version.
struct Expected {
    customer: String,
    status: &'static str,
    version: i64,
}

/// The events of one order (placed, validated, confirmed or rejected), with, for confirmed
/// ones, the inventory's line answer before the confirmation: reserved, and sometimes released
/// (as on a later cancellation).
fn order_events(
    placed: &OrderPlaced,
    confirm: bool,
    sku: &str,
    release: bool,
) -> (Vec<OrderEvent>, Expected) {
    let e = &placed.envelope;
    let mut events = short_timeline(placed, confirm);
    if confirm {
        let last = events.pop().expect("three events");
        events.push(OrderEvent::InventoryLineReserved(InventoryLineReserved {
            envelope: next_envelope(e, 0),
            sku: sku.to_owned(),
            quantity: 1,
            available_after: 0,
        }));
        if release {
            events.push(OrderEvent::InventoryLineReleased(InventoryLineReleased {
                envelope: next_envelope(e, 0),
                sku: sku.to_owned(),
                quantity: 1,
                available_after: 0,
            }));
        }
        events.push(last);
    }
    (
        events,
        Expected {
            customer: e.customer_id.clone(),
            status: if confirm { "confirmed" } else { "rejected" },
            version: 3,
        },
    )
}

/// Every stored position at the end of its partition, for both projections.
async fn caught_up(db: &orderflow_projections::Database, consumer: &BaseConsumer) -> bool {
    for (projection, topics) in [
        ("orders", &[names::ORDERS_EVENTS][..]),
        (
            "inventory",
            &[names::ORDERS_EVENTS, names::INVENTORY_COMMANDS][..],
        ),
    ] {
        for topic in topics {
            for p in 0..6 {
                let Ok((_, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))
                else {
                    return false;
                };
                if high == 0 {
                    continue;
                }
                let at: Option<i64> = sqlx::query_scalar(
                    "SELECT next_offset FROM projection_offsets \
                     WHERE projection = $1 AND topic = $2 AND partition_id = $3",
                )
                .bind(projection)
                .bind(*topic)
                .bind(i64::from(p))
                .fetch_optional(db.pool())
                .await
                .ok()
                .flatten();
                // Transaction markers take the last offsets on some brokers: within 1.
                if at.is_none_or(|at| at + 1 < high) {
                    return false;
                }
            }
        }
    }
    true
}

async fn killed_mid_batch(db: Database) {
    let dir = TempDir::new();
    let Some(broker) = BrokerProcess::start(BIN, &dir) else {
        return;
    };
    let bootstrap = broker.bootstrap();
    let settings: Settings = test_settings(Some(&db.url));
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let codec = Codec::new().expect("codec");
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    // The schema first, so that the first projection process does not race the test for it.
    let live = orderflow_projections::Database::connect(db.url.as_str(), 2)
        .await
        .expect("database");
    live.migrate().await.expect("migrate");

    let mut rng = StdRng::seed_from_u64(5);
    let now = now_ms();
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let mut restocked_units: BTreeMap<String, i64> = BTreeMap::new();
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    let mut projection = start_projection(&bootstrap, &db.url);
    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(500..1500));

    for s in 0..SKUS {
        let sku = format!("SKU-{s:03}");
        let bytes = codec.encode(&restocked(&sku, 10_000, now)).expect("encode");
        // Written twice: a retried restock with the same id counts once.
        for _ in 0..2 {
            producer
                .send(
                    FutureRecord::to(names::INVENTORY_COMMANDS)
                        .key(&sku)
                        .payload(&bytes),
                    Duration::from_secs(10),
                )
                .await
                .expect("restock");
        }
        *restocked_units.entry(sku).or_default() += 10_000;
    }
    let mut deliveries = Vec::new();
    for i in 0..ORDERS {
        let sku = format!("SKU-{:03}", i % SKUS);
        let customer = format!("customer-{}", i % 97);
        let placed = order_placed(&customer, &[(sku.as_str(), 1)], "tok_ok", now + i as i64);
        let confirm = i % 4 != 0;
        let release = confirm && i % 5 == 0;
        let (mut events, want) = order_events(&placed, confirm, &sku, release);
        if confirm {
            *held.entry(sku.clone()).or_default() += if release { 0 } else { 1 };
        }
        // Duplicates, and an older event delivered again after the newest.
        if i % 3 == 0 {
            events.push(events[0].clone());
        }
        if i % 7 == 0 {
            events.push(events[1].clone());
        }
        expected.insert(placed.envelope.order_id.clone(), want);
        for event in &events {
            let bytes = codec.encode(event).expect("encode");
            deliveries.push(
                producer
                    .send_result(
                        FutureRecord::to(names::ORDERS_EVENTS)
                            .key(&customer)
                            .payload(&bytes),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
        if deliveries.len() >= 500 {
            for d in deliveries.drain(..) {
                d.await.expect("delivered").expect("written");
            }
            // Pace the writing so the projection works while it is killed.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if Instant::now() >= next_kill {
            projection.kill().expect("SIGKILL");
            projection.wait().expect("reaped");
            kills += 1;
            projection = start_projection(&bootstrap, &db.url);
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(500..1500));
        }
    }
    for d in deliveries {
        d.await.expect("delivered").expect("written");
    }
    // Keep killing for a while as the projection works through the backlog.
    let consumer: BaseConsumer = clients.reader("test").create().expect("reader");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !caught_up(&live, &consumer).await {
        assert!(Instant::now() < deadline, "the projection never caught up");
        if Instant::now() >= next_kill && kills < 15 {
            projection.kill().expect("SIGKILL");
            projection.wait().expect("reaped");
            kills += 1;
            projection = start_projection(&bootstrap, &db.url);
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(500..1500));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    projection.kill().expect("SIGKILL");
    projection.wait().expect("reaped");
    assert!(kills >= 3, "only {kills} kills: the run was too short");

    // Orders: status and version from each order's newest event.
    let rows = sqlx::query("SELECT order_id, status, version, customer_id FROM orders")
        .fetch_all(live.pool())
        .await
        .expect("orders");
    assert_eq!(rows.len(), expected.len(), "one row per order");
    for row in &rows {
        let id: String = row.get(0);
        let want = &expected[&id];
        let (status, version): (String, i64) = (row.get(1), row.get(2));
        assert_eq!(
            (status.as_str(), version),
            (want.status, want.version),
            "order {id}"
        );
    }
    // Customers: every order counted once, whatever was redelivered or re-applied.
    let mut per_customer: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for want in expected.values() {
        let c = per_customer.entry(&want.customer).or_default();
        c.0 += 1;
        match want.status {
            "confirmed" => c.1 += 1,
            _ => c.2 += 1,
        }
    }
    let stats = sqlx::query(
        "SELECT customer_id, orders_placed, orders_confirmed, orders_rejected FROM customer_stats",
    )
    .fetch_all(live.pool())
    .await
    .expect("customer_stats");
    assert_eq!(stats.len(), per_customer.len());
    for row in &stats {
        let customer: String = row.get(0);
        let have: (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        assert_eq!(have, per_customer[customer.as_str()], "customer {customer}");
    }
    // Stock: restocked once each, reserved minus released.
    let levels = sqlx::query("SELECT sku, restocked, reserved, available FROM inventory_levels")
        .fetch_all(live.pool())
        .await
        .expect("inventory_levels");
    assert_eq!(levels.len(), SKUS);
    for row in &levels {
        let sku: String = row.get(0);
        let have: (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        let (restock, reserved) = (restocked_units[&sku], held[&sku]);
        assert_eq!(have, (restock, reserved, restock - reserved), "sku {sku}");
    }
    eprintln!(
        "{kills} SIGKILLs; {} orders, tables equal the fold",
        rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_killed_mid_batch_on_sqlite() {
    killed_mid_batch(Database::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_killed_mid_batch_on_postgres() {
    let Some(db) = Database::postgres().await else {
        return;
    };
    killed_mid_batch(db).await;
}
