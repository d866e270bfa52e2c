//! End to end: the whole pipeline in one process, on the embedded broker with SQLite and on a
//! separate Tansu broker with PostgreSQL. Orders go in over HTTP and are read back, final, from
//! the query API; the event log is then checked for exactly one event of each kind per order,
//! and the consumer groups' committed positions for the end of the log after a graceful stop.

use std::{collections::BTreeMap, time::Duration};

use orderflow::pipeline::{self, Role};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::{Codec, EventKind};
use orderflow_testkit::{
    apply_topics, eventually, log::read_dead_letters, restock, test_settings_with, Broker, Database,
};
use orderflow_topics::names;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    Offset, TopicPartitionList,
};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);
/// Stands for "undecodable records" in the log summary.
const POISON: &str = "poison";

/// Writes records that are not orderflow events to orders.events, as a broken producer would,
/// under keys no order of the test uses: a poison record parks its key, whose later records
/// wait behind it until an operator acts (cli/tests/dlq.rs); other keys keep flowing.
async fn inject_poison(bootstrap: &str, settings: &Settings) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let producer: FutureProducer = clients
        .idempotent_producer("test-poison")
        .create()
        .expect("producer");
    for (key, payload) in [
        ("broken-producer-1", &b"{\"not\": \"avro\"}"[..]),
        ("broken-producer-2", &[0u8, 0, 0, 0, 1][..]),
    ] {
        producer
            .send(
                FutureRecord::to(names::ORDERS_EVENTS)
                    .key(key)
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .expect("poison written");
    }
}

fn order(customer: usize, valid: bool) -> Value {
    json!({
        "customer_id": format!("customer-{customer}"),
        "currency": if valid { "EUR" } else { "XXX" },
        "lines": [
            {"sku": "SKU-00001", "quantity": 2, "unit_price_minor": 1250},
            {"sku": "SKU-00002", "quantity": 1, "unit_price_minor": 500}
        ],
        "shipping_address": {"name": "Test", "line1": "1 Road", "city": "Town", "postal_code": "12345", "country": "DE"},
        "payment_token": "tok_test",
        "shipping_minor": 499,
        "tax_minor": 0,
        "total_minor": 3499
    })
}

/// A metric name, labels its sample must have, and the value expected.
type MetricCheck<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// The value of the sample `name` whose labels include `labels`, from a text exposition.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Reads every record of orders.events (read_committed) and counts distinct event ids per
/// order and kind.
fn read_log(
    bootstrap: &str,
    settings: &Settings,
    codec: &Codec,
) -> BTreeMap<(String, EventKind), std::collections::BTreeSet<String>> {
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let consumer: BaseConsumer = clients
        .consumer(
            "test-reader",
            &format!("test-reader-{}", uuid::Uuid::new_v4()),
        )
        .create()
        .expect("reader");
    let metadata = consumer
        .fetch_metadata(Some(names::ORDERS_EVENTS), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(names::ORDERS_EVENTS, p.id(), Offset::Beginning)
            .expect("partition");
        let (_, high) = consumer
            .fetch_watermarks(names::ORDERS_EVENTS, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        ends.insert(p.id(), high);
    }
    consumer.assign(&tpl).expect("assign");
    let mut seen: BTreeMap<(String, EventKind), std::collections::BTreeSet<String>> =
        BTreeMap::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    // Until every partition is read to the end it had when we started. The consumer's position,
    // not the last record's offset: transaction markers take offsets but are never delivered.
    let behind = |consumer: &BaseConsumer| {
        let positions = consumer.position().expect("positions");
        ends.iter().any(|(p, end)| {
            let at = positions
                .find_partition(names::ORDERS_EVENTS, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            at < *end
        })
    };
    while behind(&consumer) {
        assert!(
            std::time::Instant::now() < deadline,
            "reading the log timed out"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("consume");
        let Ok(event) = codec.decode(message.payload().unwrap_or_default()) else {
            // The poison records the test injected.
            seen.entry((POISON.to_owned(), EventKind::OrderPlaced))
                .or_default()
                .insert(format!("{}/{}", message.partition(), message.offset()));
            continue;
        };
        let envelope = event.envelope();
        seen.entry((envelope.order_id.clone(), event.kind()))
            .or_default()
            .insert(envelope.event_id.clone());
    }
    seen
}

/// The group's committed positions leave nothing to redo: reading on from them (read_committed)
/// to the end of the log delivers no record. (Positions are compared by reading, not to the
/// high watermark, because transaction markers take offsets but are never delivered.)
fn assert_group_at_end(bootstrap: &str, settings: &Settings, group: &str) {
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let consumer: BaseConsumer = clients
        .consumer("test-offsets", group)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(names::ORDERS_EVENTS), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(names::ORDERS_EVENTS, p.id());
    }
    let stored = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    // No committed position: the group would start from the beginning (auto.offset.reset),
    // which is "nothing to redo" only if the partition holds no records; reading checks that.
    let mut committed = TopicPartitionList::new();
    for e in stored.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        committed
            .add_partition_offset(names::ORDERS_EVENTS, e.partition(), offset)
            .expect("partition");
    }
    let mut ends = BTreeMap::new();
    for element in committed.elements() {
        let (_, high) = consumer
            .fetch_watermarks(
                names::ORDERS_EVENTS,
                element.partition(),
                Duration::from_secs(10),
            )
            .expect("watermarks");
        let start = match element.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        // Partitions already at their end have nothing to read (and report no position).
        if start < high {
            ends.insert(element.partition(), high);
        }
    }
    // Read on from the committed positions, outside the group.
    let reader: BaseConsumer = clients
        .consumer(
            "test-offsets-reader",
            &format!("test-{}", uuid::Uuid::new_v4()),
        )
        .create()
        .expect("reader");
    reader.assign(&committed).expect("assign");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let positions = reader.position().expect("positions");
        let behind = ends.iter().any(|(p, end)| {
            let at = positions
                .find_partition(names::ORDERS_EVENTS, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            // A position is only known once a fetch returned; before that, keep polling.
            at.is_none_or(|at| at < *end)
        });
        if !behind {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reading past the committed positions timed out"
        );
        if let Some(message) = reader.poll(Duration::from_millis(100)) {
            let message = message.expect("consume");
            panic!(
                "group {group} committed a position before partition {} offset {}: a restart would redo it",
                message.partition(),
                message.offset()
            );
        }
    }
}

async fn orders_flow_end_to_end(broker: Broker, db: Database) {
    let settings = test_settings_with(Some(&db.url), broker.overrides());
    let bootstrap = broker.bootstrap();
    apply_topics(&broker, &settings).await;

    // Bad input from a broken producer must not stop the pipeline.
    inject_poison(&bootstrap, &settings).await;

    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("pipeline starts");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest runs"));
    let client = reqwest::Client::new();
    restock(
        &client,
        &format!("http://{}", running.admin_addr.expect("admin runs")),
        &[("SKU-00001", 100), ("SKU-00002", 100)],
    )
    .await;

    // 12 orders from 4 customers; every third one invalid.
    let mut expected = Vec::new();
    for i in 0..12 {
        let valid = i % 3 != 2;
        let response = client
            .post(format!("{ingest}/v1/orders"))
            .header("x-request-id", format!("test-request-{i}"))
            .json(&order(i % 4, valid))
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 202, "order {i}");
        assert!(response.headers().contains_key("location"));
        // The caller's request id comes back; security headers are on every response.
        let request_id = format!("test-request-{i}");
        assert_eq!(response.headers()["x-request-id"], request_id.as_str());
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let body: Value = response.json().await.expect("json");
        expected.push((
            body["order_id"].as_str().expect("order_id").to_owned(),
            body["status_url"].as_str().expect("status_url").to_owned(),
            valid,
        ));
    }

    for (order_id, url, valid) in &expected {
        let view: Value = eventually(DEADLINE, &format!("order {order_id} to be final"), || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let response = client.get(&url).send().await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                let view: Value = response.json().await.ok()?;
                (view["final"] == true).then_some(view)
            }
        })
        .await;
        let (status, version) = if *valid {
            ("confirmed", 8)
        } else {
            ("rejected", 2)
        };
        assert_eq!(view["status"], status, "{view}");
        assert_eq!(view["version"], version, "{view}");
        assert_eq!(view["order_id"], order_id.as_str());
        assert_eq!(view["total_minor"], 3499);
    }

    // Unknown and malformed ids.
    let query = format!("http://{}", running.query_addr.expect("query runs"));
    let missing = client
        .get(format!("{query}/v1/orders/{}", uuid::Uuid::new_v4()))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(missing.headers()["x-frame-options"], "DENY");
    let generated = missing.headers()["x-request-id"].to_str().expect("ascii");
    assert!(
        uuid::Uuid::parse_str(generated).is_ok(),
        "a request id is made when none is sent"
    );
    let malformed = client
        .get(format!("{query}/v1/orders/nope"))
        .send()
        .await
        .expect("get");
    assert_eq!(malformed.status(), 400);

    // The metrics moved as the run implies.
    let metrics_url = format!("http://{}/metrics", running.ops_addr);
    let valid = expected.iter().filter(|(_, _, valid)| *valid).count() as f64;
    let invalid = expected.len() as f64 - valid;
    let all = expected.len() as f64;
    let checks: Vec<MetricCheck<'_>> = vec![
        ("orderflow_ingest_orders_accepted_total", vec![], all),
        (
            "orderflow_http_requests_total",
            vec![
                ("server", "ingest"),
                ("route", "/v1/orders"),
                ("method", "POST"),
                ("status", "202"),
            ],
            all,
        ),
        (
            "orderflow_processor_outputs_total",
            vec![("event_type", "OrderConfirmed")],
            valid,
        ),
        (
            "orderflow_processor_outputs_total",
            vec![("event_type", "OrderRejected")],
            invalid,
        ),
        (
            "orderflow_orders_final_total",
            vec![("status", "confirmed")],
            valid,
        ),
        (
            "orderflow_orders_final_total",
            vec![("status", "rejected")],
            invalid,
        ),
        ("orderflow_order_end_to_end_seconds_count", vec![], all),
        (
            "orderflow_processor_dead_letters_total",
            vec![("processor", "saga")],
            2.0,
        ),
        (
            "orderflow_projection_dead_letters_total",
            vec![("projection", "orders")],
            2.0,
        ),
    ];
    let text = eventually(DEADLINE, "the metrics to reflect the run", || {
        let client = client.clone();
        let url = metrics_url.clone();
        let checks = &checks;
        async move {
            let text = client.get(&url).send().await.ok()?.text().await.ok()?;
            checks
                .iter()
                .all(|(name, labels, want)| metric(&text, name, labels) == Some(*want))
                .then_some(text)
        }
    })
    .await;
    // Accepted = confirmed + rejected (+ cancelled: none yet).
    let finals: f64 = ["confirmed", "rejected"]
        .iter()
        .filter_map(|s| metric(&text, "orderflow_orders_final_total", &[("status", s)]))
        .sum();
    assert_eq!(
        metric(&text, "orderflow_ingest_orders_accepted_total", &[]),
        Some(finals)
    );
    assert!(
        !text.contains(expected[0].0.as_str()),
        "an order id leaked into a label"
    );

    // The inventory projection (its own group) has the stock of the restocked SKUs.
    eventually(DEADLINE, "inventory levels", || async {
        let page: Value = client
            .get(format!("{query}/v1/inventory"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let levels = page["levels"].as_array()?;
        levels
            .iter()
            .any(|l| l["reserved"].as_i64() > Some(0))
            .then_some(())
    })
    .await;

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("graceful shutdown");

    // The log: per order the saga's whole path, or OrderPlaced and one OrderRejected — as many
    // distinct event ids of each kind as the path has, however often anything was re-processed.
    let codec = Codec::new().expect("codec");
    let seen = read_log(&bootstrap, &settings, &codec);
    for (order_id, _, valid) in &expected {
        let kinds: &[(EventKind, usize)] = if *valid {
            &[
                (EventKind::OrderPlaced, 1),
                (EventKind::OrderValidated, 1),
                (EventKind::FraudScored, 1),
                (EventKind::InventoryReservationRequested, 1),
                // One answer per SKU from the inventory processor.
                (EventKind::InventoryLineReserved, 2),
                (EventKind::InventoryReserved, 1),
                (EventKind::PaymentRequested, 1),
                (EventKind::PaymentAuthorized, 1),
                (EventKind::OrderConfirmed, 1),
            ]
        } else {
            &[(EventKind::OrderPlaced, 1), (EventKind::OrderRejected, 1)]
        };
        for (kind, count) in kinds {
            let ids = seen.get(&(order_id.clone(), *kind));
            assert_eq!(
                ids.map(|s| s.len()),
                Some(*count),
                "{order_id} {kind:?}: {ids:?}"
            );
        }
        let total: usize = seen
            .iter()
            .filter(|((o, _), _)| o == order_id)
            .map(|(_, ids)| ids.len())
            .sum();
        let want: usize = kinds.iter().map(|(_, n)| n).sum();
        assert_eq!(total, want, "{order_id} has unexpected events");
    }

    // Each poison record went to each consumer's dead-letter topic, with its reason and source.
    assert_eq!(
        seen.get(&(POISON.to_owned(), EventKind::OrderPlaced))
            .map(|s| s.len()),
        Some(2)
    );
    for topic in [names::SAGA_DLQ, names::PROJECTION_ORDERS_DLQ] {
        let letters = read_dead_letters(&settings, &bootstrap, topic, 2);
        for headers in &letters {
            assert!(
                headers["dlq.reason"].starts_with("undecodable"),
                "{topic}: {headers:?}"
            );
            assert_eq!(
                headers["dlq.source.topic"],
                names::ORDERS_EVENTS,
                "{topic}: {headers:?}"
            );
            assert!(
                headers["dlq.source.offset"].parse::<i64>().is_ok(),
                "{topic}: {headers:?}"
            );
        }
    }

    // reconcile: the tables are the fold of the log; a tampered row is named.
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let projection_db = orderflow_projections::Database::connect(db.url.as_str(), 2)
        .await
        .expect("database");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let check = || {
        orderflow_projections::reconcile::reconcile(
            &projection_db,
            &clients,
            names::ORDERS_EVENTS,
            Duration::from_secs(300),
            now,
        )
    };
    let report = check().await.expect("reconcile");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.orders_checked, expected.len(), "{report}");
    let (rejected, _, _) = expected
        .iter()
        .find(|(_, _, valid)| !valid)
        .expect("an invalid order");
    sqlx::query("UPDATE orders SET status = 'confirmed' WHERE order_id = $1")
        .bind(rejected)
        .execute(projection_db.pool())
        .await
        .expect("tamper");
    let report = check().await.expect("reconcile");
    assert_eq!(report.breaches.len(), 1, "{report}");
    assert!(
        report.breaches[0].contains(rejected.as_str()) && report.breaches[0].contains("status"),
        "{report}"
    );
    // The command an operator runs says the same and exits non-zero.
    let cli = tokio::task::spawn_blocking({
        let (bootstrap, url) = (bootstrap.clone(), db.url.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
                .args(["--kafka-brokers", &bootstrap, "--database-url", &url])
                .arg("reconcile")
                .env("RUST_LOG", "error")
                .output()
                .expect("orderflow reconcile runs")
        }
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(
        cli.status.code(),
        Some(1),
        "orderflow reconcile: {stdout}{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        stdout.contains(rejected.as_str()) && stdout.contains("status"),
        "orderflow reconcile names the tampered row: {stdout}"
    );
    // A stock level that does not add up is named too.
    let sku: String = sqlx::query_scalar("SELECT MIN(sku) FROM inventory_levels")
        .fetch_one(projection_db.pool())
        .await
        .expect("a stocked SKU");
    sqlx::query("UPDATE inventory_levels SET available = available + 7 WHERE sku = $1")
        .bind(&sku)
        .execute(projection_db.pool())
        .await
        .expect("tamper");
    let report = check().await.expect("reconcile");
    assert_eq!(report.breaches.len(), 2, "{report}");
    assert!(
        report
            .breaches
            .iter()
            .any(|b| b.contains(&format!("sku {sku}")) && b.contains("available")),
        "{report}"
    );

    // Graceful shutdown committed both groups' positions at the end of the log.
    assert_group_at_end(&bootstrap, &settings, "orderflow-saga");
    assert_group_at_end(&bootstrap, &settings, "orderflow-projection-orders");
    drop(broker);
}

mod embedded_sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orders_flow_end_to_end() {
        let Some(broker) = orderflow_testkit::Broker::embedded() else {
            return;
        };
        super::orders_flow_end_to_end(broker, orderflow_testkit::Database::sqlite()).await;
    }
}

mod tansu_postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orders_flow_end_to_end() {
        let Some(broker) = orderflow_testkit::Broker::tansu() else {
            return;
        };
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        super::orders_flow_end_to_end(broker, db).await;
    }
}
