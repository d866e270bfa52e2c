//! Dead letters, end to end, on the embedded broker and SQLite: a producer writes an order the
//! consumers cannot read (its schema id is unknown) and a record that is no event at all. The
//! saga and the orders projection each park the order in their dead-letter topic, and the
//! pipeline keeps running. An operator then works through them with the `orderflow dlq`
//! binary:
//! - `list` and `show` name the reason, the consumer and the source;
//! - a redrive without a correction is refused, saying why;
//! - a redrive with the corrected event, once from each letter, puts the order back once: one
//!   event id, one order row, one reservation, one charge, `reconcile` clean;
//! - `discard` parks the other record for good;
//! - a resolved letter is not resolved again, and bad input names what is wrong.

use std::{collections::BTreeMap, process::Output, sync::Arc, time::Duration};

use orderflow::pipeline::{self, Role};
use orderflow_deadletters::DeadLetters;
use orderflow_platform::kafka::{event_headers, KafkaClients};
use orderflow_schemas::{Codec, EventKind, OrderEvent};
use orderflow_testkit::{
    apply_topics, eventually, log::order_placed, reconcile_until_clean, restock, show_warnings,
    test_settings_with, Broker, Database,
};
use orderflow_topics::names;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_orderflow");
const SKU: &str = "SKU-DLQ";

/// Runs `orderflow --kafka-brokers BOOTSTRAP dlq ARGS…`.
async fn dlq(bootstrap: &str, args: &[&str]) -> Output {
    let bootstrap = bootstrap.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BINARY)
            .args(["--kafka-brokers", &bootstrap, "dlq"])
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .expect("orderflow dlq runs")
    })
    .await
    .expect("join")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "orderflow dlq failed: {}",
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// The pending letters of `topic` whose source is `orders.events`, `PARTITION/OFFSET` by the
/// source record's key, once there are `count`.
async fn pending_from_orders(
    dead_letters: &DeadLetters,
    topic: &str,
    count: usize,
) -> BTreeMap<String, String> {
    eventually(
        Duration::from_secs(120),
        &format!("{count} letter(s) on {topic}"),
        || async {
            let (letters, _) = dead_letters.list(topic).await.ok()?;
            let found: BTreeMap<String, String> = letters
                .iter()
                .filter(|l| l.is_pending())
                .filter(|l| {
                    l.source
                        .as_ref()
                        .is_some_and(|s| s.topic == names::ORDERS_EVENTS)
                })
                .map(|l| {
                    (
                        l.key.clone().unwrap_or_default(),
                        format!("{}/{}", l.letter.partition, l.letter.offset),
                    )
                })
                .collect();
            (found.len() == count).then_some(found)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_order_is_parked_then_corrected_and_redriven_once_and_ends_confirmed() {
    show_warnings();
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = test_settings_with(Some(&db.url), broker.overrides());
    let bootstrap = broker.bootstrap();
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("pipeline starts");
    let client = reqwest::Client::new();
    restock(
        &client,
        &format!("http://{}", running.admin_addr.expect("admin runs")),
        &[(SKU, 10)],
    )
    .await;

    // What the producer meant to write, and what it wrote: the same event framed with a
    // schema id no consumer knows; then a record that is no event at all.
    let codec = Arc::new(Codec::new().expect("codec"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let placed = order_placed("dlq-customer", &[(SKU, 2)], "tok_visa", now);
    let order_id = placed.envelope.order_id.clone();
    let meant = OrderEvent::OrderPlaced(placed);
    let mut poison = codec.encode(&meant).expect("encode");
    poison[1..5].copy_from_slice(&999_u32.to_be_bytes());
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    for (key, value) in [
        ("dlq-customer", poison.as_slice()),
        ("dlq-other", b"not an event".as_slice()),
    ] {
        producer
            .send(
                FutureRecord::to(names::ORDERS_EVENTS)
                    .key(key)
                    .payload(value)
                    .headers(event_headers(EventKind::OrderPlaced, None)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("written");
    }

    // Both consumers of orders.events park both records, and carry on.
    let dead_letters = DeadLetters::new(clients.clone(), codec.clone(), Duration::from_secs(30));
    let saga_letters = pending_from_orders(&dead_letters, names::SAGA_DLQ, 2).await;
    let projection_letters =
        pending_from_orders(&dead_letters, names::PROJECTION_ORDERS_DLQ, 2).await;
    let (poisoned, garbage) = (&saga_letters["dlq-customer"], &saga_letters["dlq-other"]);

    // The census behind the `DeadLettersWaiting` alert counts them (every 100 ms here).
    let metrics = orderflow_ingest::IngestMetrics::unregistered();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(orderflow_ingest::deadletters::census(
        dead_letters.clone(),
        metrics.clone(),
        Duration::from_millis(100),
        cancel.clone(),
    ));
    let saga_gauge = orderflow_ingest::metrics::TopicLabels {
        topic: names::SAGA_DLQ.to_owned(),
    };
    eventually(Duration::from_secs(30), "the census counting 2", || async {
        (metrics
            .dead_letters_pending
            .get_or_create(&saga_gauge)
            .get()
            == 2)
            .then_some(())
    })
    .await;

    let overview = json(&dlq(&bootstrap, &["list", "--json"]).await);
    let saga_row = overview
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["topic"] == names::SAGA_DLQ))
        .expect("the saga's dead-letter topic is listed");
    assert_eq!(saga_row["pending"], 2, "{overview}");

    let shown = json(&dlq(&bootstrap, &["show", names::SAGA_DLQ, poisoned, "--json"]).await);
    assert_eq!(shown["source"]["topic"], names::ORDERS_EVENTS, "{shown}");
    assert_eq!(shown["consumer"], "saga", "{shown}");
    assert_eq!(shown["key"], "dlq-customer", "{shown}");
    assert!(
        shown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("undecodable")),
        "{shown}"
    );
    assert!(
        shown["undecodable"].is_string() && shown["event"].is_null(),
        "{shown}"
    );
    let table = dlq(&bootstrap, &["show", names::SAGA_DLQ, poisoned]).await;
    assert!(
        stdout(&table).contains("reason:") && stdout(&table).contains("do not decode"),
        "{}",
        stdout(&table)
    );

    // Without a correction the redrive is refused, saying how to give one.
    let refused = dlq(&bootstrap, &["redrive", names::SAGA_DLQ, poisoned]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("does not decode") && stderr(&refused).contains("--json"),
        "{}",
        stderr(&refused)
    );

    // A correction with a field missing is refused, naming the file and the field.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        r#"{"event_type": "OrderPlaced", "event": {"currency": "EUR"}}"#,
    )
    .expect("write");
    let refused = dlq(
        &bootstrap,
        &[
            "redrive",
            names::SAGA_DLQ,
            poisoned,
            "--from",
            broken.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("broken.json") && stderr(&refused).contains("missing field"),
        "{}",
        stderr(&refused)
    );

    // The operator fills in `show --json`'s document with the event that was meant.
    let mut corrected = shown.clone();
    corrected["event_type"] = Value::from("OrderPlaced");
    corrected["event"] = meant.to_json().expect("json");
    let file = dir.path().join("corrected.json");
    std::fs::write(&file, corrected.to_string()).expect("write");
    let file = file.to_str().expect("utf-8 path");
    for (topic, letter) in [
        (names::SAGA_DLQ, poisoned),
        (
            names::PROJECTION_ORDERS_DLQ,
            &projection_letters["dlq-customer"],
        ),
    ] {
        let done = dlq(
            &bootstrap,
            &["redrive", topic, letter, "--from", file, "--by", "test"],
        )
        .await;
        assert!(done.status.success(), "{}", stderr(&done));
        assert!(
            stdout(&done).contains("redriven by test"),
            "{}",
            stdout(&done)
        );
    }

    // The order goes through once.
    let projection_db = orderflow_projections::Database::connect(db.url.as_str(), 2)
        .await
        .expect("database");
    eventually(
        Duration::from_secs(120),
        "the redriven order confirmed",
        || async {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
                    .bind(&order_id)
                    .fetch_optional(projection_db.pool())
                    .await
                    .ok()
                    .flatten();
            (status.as_deref() == Some("confirmed")).then_some(())
        },
    )
    .await;
    let mut event_ids = Vec::new();
    for topic in [names::SAGA_DLQ, names::PROJECTION_ORDERS_DLQ] {
        let letters = json(&dlq(&bootstrap, &["list", topic, "--all", "--json"]).await);
        let redriven: Vec<&Value> = letters
            .as_array()
            .expect("array")
            .iter()
            .filter(|l| l["resolution"]["action"] == "redriven")
            .collect();
        assert_eq!(redriven.len(), 1, "{letters}");
        assert_eq!(redriven[0]["resolution"]["corrected"], true, "{letters}");
        event_ids.push(redriven[0]["resolution"]["event_id"].clone());
    }
    assert_eq!(
        event_ids[0], event_ids[1],
        "both letters of one record redrive as one event"
    );
    let placed_rows: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM order_events WHERE order_id = $1 AND event_type = 'OrderPlaced'",
    )
    .bind(&order_id)
    .fetch_all(projection_db.pool())
    .await
    .expect("history");
    assert_eq!(placed_rows, vec![event_ids[0].as_str().unwrap_or_default()]);
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM inventory_levels WHERE sku = $1")
        .bind(SKU)
        .fetch_one(projection_db.pool())
        .await
        .expect("stock level");
    assert_eq!(reserved, 2, "one reservation of 2 units");
    reconcile_until_clean(std::path::Path::new(BINARY), &bootstrap, &db.url).await;

    // The other record is discarded: from the projection's topic with the binary, from the
    // saga's over the admin API. Then nothing is pending on either.
    let discarded = dlq(
        &bootstrap,
        &[
            "discard",
            names::PROJECTION_ORDERS_DLQ,
            &projection_letters["dlq-other"],
            "--note",
            "not an order",
            "--by",
            "test",
        ],
    )
    .await;
    assert!(discarded.status.success(), "{}", stderr(&discarded));
    let admin = format!("http://{}", running.admin_addr.expect("admin runs"));
    let overview: Value = client
        .get(format!("{admin}/v1/dead-letters"))
        .send()
        .await
        .expect("overview")
        .json()
        .await
        .expect("json");
    let saga_row = overview["topics"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["topic"] == names::SAGA_DLQ))
        .expect("listed");
    assert_eq!(
        (&saga_row["pending"], &saga_row["resolved"]),
        (&Value::from(1), &Value::from(1)),
        "{overview}"
    );
    let letter_url = format!("{admin}/v1/dead-letters/{}/{garbage}", names::SAGA_DLQ);
    let shown: Value = client
        .get(&letter_url)
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json");
    assert_eq!(shown["key"], "dlq-other", "{shown}");
    let no_note = client
        .post(format!("{letter_url}/discard"))
        .json(&serde_json::json!({"note": " "}))
        .send()
        .await
        .expect("discard");
    assert_eq!(no_note.status(), 422);
    let discarded = client
        .post(format!("{letter_url}/discard"))
        .json(&serde_json::json!({"note": "not an order"}))
        .send()
        .await
        .expect("discard");
    assert_eq!(discarded.status(), 200);
    let again = client
        .post(format!("{letter_url}/redrive"))
        .send()
        .await
        .expect("redrive");
    assert_eq!(
        again.status(),
        409,
        "a resolved letter is not resolved again"
    );
    assert_eq!(again.headers()["content-type"], "application/problem+json");
    let unknown = client
        .get(format!("{admin}/v1/dead-letters/orders.events/0/0"))
        .send()
        .await
        .expect("show");
    assert_eq!(unknown.status(), 404);
    let pending = json(&dlq(&bootstrap, &["list", names::SAGA_DLQ, "--json"]).await);
    assert_eq!(pending, Value::Array(vec![]), "nothing pending");
    eventually(Duration::from_secs(30), "the census counting 0", || async {
        let none = metrics
            .dead_letters_pending
            .get_or_create(&saga_gauge)
            .get()
            == 0
            && metrics
                .dead_letters_oldest_pending_age
                .get_or_create(&saga_gauge)
                .get()
                == 0;
        none.then_some(())
    })
    .await;
    cancel.cancel();
    let all = json(&dlq(&bootstrap, &["list", names::SAGA_DLQ, "--all", "--json"]).await);
    let mut actions: Vec<(String, String)> = all
        .as_array()
        .expect("array")
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap_or_default().to_owned(),
                l["resolution"]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [("dlq-customer", "redriven"), ("dlq-other", "discarded")]
            .map(|(k, a)| (k.to_owned(), a.to_owned())),
        "{all}"
    );

    // A resolved letter is not resolved again; bad input names what is wrong.
    let again = dlq(
        &bootstrap,
        &["redrive", names::SAGA_DLQ, garbage, "--from", file],
    )
    .await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already discarded"),
        "{}",
        stderr(&again)
    );
    let not_dlq = dlq(&bootstrap, &["show", names::ORDERS_EVENTS, "0/0"]).await;
    assert!(!not_dlq.status.success());
    assert!(
        stderr(&not_dlq).contains("not a dead-letter topic"),
        "{}",
        stderr(&not_dlq)
    );
    let missing = dlq(&bootstrap, &["show", names::SAGA_DLQ, "0/999999"]).await;
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("holds no record"),
        "{}",
        stderr(&missing)
    );
    let malformed = dlq(&bootstrap, &["show", names::SAGA_DLQ, "seventeen"]).await;
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("PARTITION/OFFSET"),
        "{}",
        stderr(&malformed)
    );

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("graceful stop");
}

/// The pending letters of `topic` with `key`, in chain order, once there are `count`.
async fn chain_of(
    dead_letters: &DeadLetters,
    topic: &str,
    key: &str,
    count: usize,
) -> Vec<orderflow_deadletters::DeadLetter> {
    eventually(
        Duration::from_secs(180),
        &format!("{count} letter(s) of {key} on {topic}"),
        || async {
            let (letters, _) = dead_letters.list(topic).await.ok()?;
            let mut chain: Vec<_> = letters
                .into_iter()
                .filter(|l| l.is_pending() && l.key.as_deref() == Some(key))
                .collect();
            chain.sort_by_key(|l| l.sequence);
            (chain.len() == count).then_some(chain)
        },
    )
    .await
}

/// The projected status of each order, once every one of them is in `done`.
async fn statuses_once_in(
    db: &orderflow_projections::Database,
    orders: &[String],
    done: &[&str],
) -> BTreeMap<String, String> {
    eventually(
        Duration::from_secs(300),
        &format!("{} orders ending in {done:?}", orders.len()),
        || async {
            let mut out = BTreeMap::new();
            for order in orders {
                let status: Option<String> =
                    sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
                        .bind(order)
                        .fetch_optional(db.pool())
                        .await
                        .ok()
                        .flatten();
                out.insert(order.clone(), status?);
            }
            out.values()
                .all(|s| done.contains(&s.as_str()))
                .then_some(out)
        },
    )
    .await
}

/// Sequenced dead letters, end to end: a customer's order is poisoned, and what that customer
/// sends next — a cancellation of the poisoned order, then 200 more orders — waits behind it
/// on the saga's dead-letter topic, while another customer's orders flow. A redrive out of turn
/// is refused. The corrected redrive of the first letter releases the rest in order: the
/// cancellation is applied *after* the order it cancels (it would be ignored as a cancellation
/// of an unknown order had it overtaken it, and the order would be confirmed), and every held
/// order ends confirmed, once. A second parked customer is released by a discard over the
/// admin API (a release marker, which the projection skips). Reconcile is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_customers_later_events_wait_behind_the_poisoned_one_and_follow_it_in_order() {
    show_warnings();
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let mut settings = test_settings_with(Some(&db.url), broker.overrides());
    // One customer's 200 orders in a minute are what the fraud model's velocity rule is for;
    // here they stand for any later records of a parked key, so let them all through.
    settings.fraud.weight_velocity = 0.0;
    settings.fraud.max_orders_per_window = 1_000_000;
    let bootstrap = broker.bootstrap();
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("pipeline starts");
    let client = reqwest::Client::new();
    let admin = format!("http://{}", running.admin_addr.expect("admin runs"));
    restock(&client, &admin, &[(SKU, 10_000)]).await;

    let codec = Arc::new(Codec::new().expect("codec"));
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let write = |key: &'static str, kind: EventKind, value: Vec<u8>| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(names::ORDERS_EVENTS)
                        .key(key)
                        .payload(&value)
                        .headers(event_headers(kind, None)),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("written");
        }
    };
    let now = orderflow_testkit::log::now_ms();
    let poisoned = |placed: &orderflow_schemas::OrderPlaced| {
        let mut bytes = codec
            .encode(&OrderEvent::OrderPlaced(placed.clone()))
            .expect("encode");
        bytes[1..5].copy_from_slice(&999_u32.to_be_bytes());
        bytes
    };

    // Customer "seq-hot": the poisoned order, its cancellation, then 200 orders.
    let first = order_placed("seq-hot", &[(SKU, 1)], "tok_visa", now);
    let first_id = first.envelope.order_id.clone();
    write("seq-hot", EventKind::OrderPlaced, poisoned(&first)).await;
    let mut cancel_envelope = orderflow_testkit::log::envelope(
        uuid::Uuid::new_v4().to_string(),
        first_id.clone(),
        "seq-hot".into(),
        now + 1,
    );
    cancel_envelope.causation_id = None;
    let cancel =
        OrderEvent::OrderCancellationRequested(orderflow_schemas::OrderCancellationRequested {
            envelope: cancel_envelope,
            reason: "changed my mind".into(),
        });
    write(
        "seq-hot",
        EventKind::OrderCancellationRequested,
        codec.encode(&cancel).expect("encode"),
    )
    .await;
    const LATER: usize = 200;
    let mut later = Vec::new();
    for i in 0..LATER {
        let placed = order_placed("seq-hot", &[(SKU, 1)], "tok_visa", now + 2 + i as i64);
        later.push(placed.envelope.order_id.clone());
        write(
            "seq-hot",
            EventKind::OrderPlaced,
            codec
                .encode(&OrderEvent::OrderPlaced(placed))
                .expect("encode"),
        )
        .await;
    }
    // Customer "seq-other": a record that is no event, then one order.
    write(
        "seq-other",
        EventKind::OrderPlaced,
        b"not an event".to_vec(),
    )
    .await;
    let other_order = order_placed("seq-other", &[(SKU, 1)], "tok_visa", now);
    let other_id = other_order.envelope.order_id.clone();
    write(
        "seq-other",
        EventKind::OrderPlaced,
        codec
            .encode(&OrderEvent::OrderPlaced(other_order))
            .expect("encode"),
    )
    .await;
    // Another customer's orders flow meanwhile.
    let mut flowing = Vec::new();
    for i in 0..5 {
        let placed = order_placed("seq-free", &[(SKU, 1)], "tok_visa", now + i);
        flowing.push(placed.envelope.order_id.clone());
        write(
            "seq-free",
            EventKind::OrderPlaced,
            codec
                .encode(&OrderEvent::OrderPlaced(placed))
                .expect("encode"),
        )
        .await;
    }

    // The chain: the poisoned order first, then everything after it, held, in order.
    let dead_letters = DeadLetters::new(clients.clone(), codec.clone(), Duration::from_secs(30));
    let chain = chain_of(&dead_letters, names::SAGA_DLQ, "seq-hot", LATER + 2).await;
    let head = &chain[0];
    let chain_id = head.chain.clone().expect("a sequenced letter");
    assert!(!head.held && head.sequence == Some(0), "{head:?}");
    for (i, letter) in chain.iter().enumerate() {
        assert_eq!(letter.chain.as_ref(), Some(&chain_id));
        assert_eq!(letter.sequence, Some(i as u64));
        assert_eq!(letter.held, i > 0, "{letter:?}");
    }
    assert_eq!(
        chain[1].event_type.as_deref(),
        Some("OrderCancellationRequested")
    );
    let held_orders: Vec<String> = chain[2..]
        .iter()
        .map(|l| {
            l.event.as_ref().expect("decoded")["envelope"]["order_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(held_orders, later, "held in the order they were written");
    let other_chain = chain_of(&dead_letters, names::SAGA_DLQ, "seq-other", 2).await;
    let flowing_done = statuses_once_in(&running_db(&db).await, &flowing, &["confirmed"]).await;
    assert_eq!(flowing_done.len(), 5);
    let projection_db = running_db(&db).await;
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM orders WHERE customer_id = 'seq-hot' AND status = 'confirmed'",
    )
    .fetch_one(projection_db.pool())
    .await
    .expect("count");
    assert_eq!(unfinished, 0, "nothing of the parked customer went through");

    // Out of turn: a held letter cannot be resolved before the poisoned one.
    let second = format!("{}/{}", chain[2].letter.partition, chain[2].letter.offset);
    let refused = dlq(&bootstrap, &["redrive", names::SAGA_DLQ, &second]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("waits behind")
            && stderr(&refused).contains("resolve that one first"),
        "{}",
        stderr(&refused)
    );
    let table = stdout(&dlq(&bootstrap, &["list", names::SAGA_DLQ]).await);
    assert!(table.contains(" 0 ") && table.contains("1h"), "{table}");

    // The corrected redrive of the poisoned order releases the rest behind it.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("corrected.json");
    let document = serde_json::json!({
        "event_type": "OrderPlaced",
        "event": OrderEvent::OrderPlaced(first.clone()).to_json().expect("json"),
    });
    std::fs::write(&file, document.to_string()).expect("write");
    let head_letter = format!("{}/{}", head.letter.partition, head.letter.offset);
    let done = dlq(
        &bootstrap,
        &[
            "redrive",
            names::SAGA_DLQ,
            &head_letter,
            "--from",
            file.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(done.status.success(), "{}", stderr(&done));
    let first_status = statuses_once_in(
        &projection_db,
        std::slice::from_ref(&first_id),
        &["cancelled", "confirmed", "rejected"],
    )
    .await;
    assert_eq!(
        first_status[&first_id], "cancelled",
        "the cancellation came after the order it cancels"
    );
    let ended = statuses_once_in(
        &projection_db,
        &later,
        &["confirmed", "rejected", "cancelled", "fraud_review"],
    )
    .await;
    assert!(
        ended.values().all(|s| s == "confirmed"),
        "every held order confirmed: {ended:?}"
    );

    // The other customer: discard the record that is no event over the admin API. Its release
    // marker lets the held order through; the projection skips the marker.
    let other_head = format!(
        "{admin}/v1/dead-letters/{}/{}/{}",
        names::SAGA_DLQ,
        other_chain[0].letter.partition,
        other_chain[0].letter.offset
    );
    let out_of_turn = client
        .post(format!(
            "{admin}/v1/dead-letters/{}/{}/{}/discard",
            names::SAGA_DLQ,
            other_chain[1].letter.partition,
            other_chain[1].letter.offset
        ))
        .json(&serde_json::json!({"note": "too early"}))
        .send()
        .await
        .expect("discard");
    assert_eq!(out_of_turn.status(), 409);
    let discarded = client
        .post(format!("{other_head}/discard"))
        .json(&serde_json::json!({"note": "not an order"}))
        .send()
        .await
        .expect("discard");
    assert_eq!(discarded.status(), 200);
    statuses_once_in(
        &projection_db,
        std::slice::from_ref(&other_id),
        &["confirmed"],
    )
    .await;

    // Nothing pending on the saga's topic; the projection dead-lettered the two poisoned
    // records and nothing else (no marker, no held record: it does not sequence).
    let pending = json(&dlq(&bootstrap, &["list", names::SAGA_DLQ, "--json"]).await);
    assert_eq!(pending, Value::Array(vec![]), "nothing pending");
    let (projection_letters, _) = dead_letters
        .list(names::PROJECTION_ORDERS_DLQ)
        .await
        .expect("list");
    assert_eq!(projection_letters.len(), 2, "{projection_letters:?}");
    let released = dead_letters.release_ready().await.expect("release");
    assert_eq!(released, 0, "nothing left to release");
    reconcile_until_clean(std::path::Path::new(BINARY), &bootstrap, &db.url).await;
}

async fn running_db(db: &Database) -> orderflow_projections::Database {
    orderflow_projections::Database::connect(db.url.as_str(), 2)
        .await
        .expect("database")
}
