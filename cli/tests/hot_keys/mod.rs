//! Hot keys, end to end: every order on the same two SKUs, from many customers, through the
//! whole pipeline over HTTP. Before the state stores were bounded, a SKU's changelog value held
//! every reservation it ever saw and passed Kafka's 1 MB message limit after about 9 800 such
//! orders; from then on every inventory batch failed and every later order was cancelled by its
//! deadline. Here 25 000 orders on two SKUs — more than twice that point — must all be
//! confirmed, with stock exact and `reconcile` clean: on the embedded broker + SQLite (the
//! default), and on Tansu + PostgreSQL. The test checks the log still starts at offset 0 on
//! every topic it reads.
//!
//! Each setup is its own test binary (`hot_keys_embedded.rs`, `hot_keys_tansu.rs`), so each
//! runs alone in a fresh process: two runs drive a whole pipeline flat out on the machine's two
//! cores for minutes, and in one process the second could also share it with whatever the first
//! left behind (librdkafka's threads of clients still being dropped, retrying a broker that is
//! gone).

use std::time::Duration;

use orderflow::pipeline::{self, Role};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_testkit::{
    apply_topics, eventually, restock, show_warnings, test_settings_with, Broker, Database,
};
use orderflow_topics::names;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};

const SKUS: [&str; 2] = ["SKU-HOT-1", "SKU-HOT-2"];
const STOCK: i32 = 10_000_000;

fn order(n: usize, customers: usize) -> Value {
    let sku = SKUS[n % 2];
    json!({
        "customer_id": format!("hot-customer-{}", n % customers),
        "currency": "EUR",
        "lines": [{"sku": sku, "quantity": 1, "unit_price_minor": 1000}],
        "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin",
                             "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa",
        "shipping_minor": 0,
        "total_minor": 1000
    })
}

/// The orders projection's orders by status.
async fn statuses(db: &orderflow_projections::Database) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT status, COUNT(*) FROM orders GROUP BY status")
        .fetch_all(db.pool())
        .await
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Runs `orders` hot-key orders through a whole pipeline on `broker` and `db`, and checks them.
pub(crate) async fn hot_keys(broker: Broker, db: Database, orders: usize) {
    // A failure shows the pipeline's warnings, the progress below and (embedded) the broker's
    // restarts and output.
    show_warnings();
    // The orders go in as fast as the edge takes them, 25 000 in a few seconds, while the
    // processors work through them on the same two cores. The edge's
    // 2 s acknowledgement deadline is a latency choice for production traffic, not what this
    // test is about: here it waits as long as the broker needs, so every order goes in once
    // (a 503 would leave the caller to retry, and the count below to be wrong).
    let mut overrides: Vec<(&str, &str)> = broker.overrides().to_vec();
    overrides.push(("kafka.message_timeout_ms", "60000"));
    let settings: Settings = test_settings_with(Some(&db.url), &overrides);
    let bootstrap = broker.bootstrap();
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("pipeline starts");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest runs"));
    let client = reqwest::Client::new();
    restock(
        &client,
        &format!("http://{}", running.admin_addr.expect("admin runs")),
        &SKUS.map(|sku| (sku, STOCK)),
    )
    .await;

    // Many customers, so that no customer's velocity trips the fraud rules: 5 orders each.
    let customers = orders / 5;
    for chunk in (0..orders).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<Value> = chunk.iter().map(|n| order(*n, customers)).collect();
        let response = client
            .post(format!("{ingest}/v1/orders/batch"))
            .json(&batch)
            .send()
            .await
            .expect("post");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        assert!(status.is_success(), "batch answered {status}: {body}");
        assert_eq!(
            body["accepted"].as_u64(),
            Some(chunk.len() as u64),
            "every order of the batch accepted: {body}"
        );
    }

    let projection_db = orderflow_projections::Database::connect(db.url.as_str(), 2)
        .await
        .expect("database");
    let deadline = Duration::from_secs(if matches!(broker, Broker::Tansu(_)) {
        900
    } else {
        600
    });
    let started = std::time::Instant::now();
    let reported = std::sync::Mutex::new(started);
    eventually(deadline, "every order final", || async {
        let statuses = statuses(&projection_db).await;
        let of = |status: &str| statuses.get(status).copied().unwrap_or(0);
        let done = of("confirmed") + of("cancelled") + of("rejected");
        let mut last = reported.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_secs(30) {
            *last = std::time::Instant::now();
            // Every status, so that a slow run shows at which step its orders wait.
            eprintln!(
                "{:>4} s: {done} of {orders} orders final; by status: {statuses:?}",
                started.elapsed().as_secs()
            );
        }
        (done == orders as i64).then_some(())
    })
    .await;
    assert_eq!(
        statuses(&projection_db).await.get("confirmed").copied(),
        Some(orders as i64),
        "every order confirmed (the test gateway declines none)"
    );

    // The tables are the fold of the log, stock included, where the broker kept the whole log.
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let report = orderflow_projections::reconcile::reconcile(
            &projection_db,
            &clients,
            names::ORDERS_EVENTS,
            Duration::from_secs(600),
            now,
        )
        .await
        .expect("reconcile");
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.orders_checked, orders, "{report}");
    }
    let available: Vec<i64> = {
        let mut out = Vec::new();
        for sku in SKUS {
            let level: Value = client
                .get(format!(
                    "http://{}/v1/inventory/{sku}",
                    running.query_addr.expect("query runs")
                ))
                .send()
                .await
                .expect("inventory")
                .json()
                .await
                .expect("json");
            out.push(level["available"].as_i64().unwrap_or(-1));
        }
        out
    };
    let per_sku = (orders / 2) as i64;
    assert_eq!(
        available,
        vec![i64::from(STOCK) - per_sku, i64::from(STOCK) - per_sku]
    );
    let reader: BaseConsumer = clients.reader("hot-keys-test").create().expect("reader");
    for topic in [
        names::ORDERS_EVENTS,
        names::INVENTORY_COMMANDS,
        names::INVENTORY_CHANGELOG,
    ] {
        for partition in 0..6 {
            let (low, _) = reader
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks");
            assert_eq!(
                low, 0,
                "{topic} partition {partition} lost its oldest records: the run wrote past \
                 the broker's limits"
            );
        }
    }
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("graceful stop");
}
