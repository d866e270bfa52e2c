//! The embedded broker keeps every record, across restarts; what reads the log from its start
//! refuses a log that no longer has it; `dev` refuses tables from another log.
//!
//! - `orderflow broker --data DIR` takes 150,000 single-record produces into one partition
//!   (past both limits of librdkafka's mock cluster, 5 MiB and 100,000 message sets per
//!   partition, past which the mock drops the oldest): the low watermark stays 0 and every
//!   record reads back, in order — and the same after a restart on the same directory.
//! - `replay` and `reconcile` refuse a log whose low watermark is above 0, naming the partition
//!   (cut on the mock cluster, the one broker here that drops records: the embedded broker's
//!   DeleteRecords is unimplemented and its retention is kept forever).
//! - `dev`'s start check refuses a database whose positions lie past the end of the log.
//!
//! - The broker's supervisor restarts it on its log when it is killed or reports a panic, with
//!   a producer writing throughout: nothing lost, nothing doubled.
//!
//! - A fetch answers as soon as a record arrives, not at the end of its wait (orderflow's
//!   patch to Tansu, `orderflow_broker::install`): a consumer waiting up to 30 s per fetch gets
//!   a record produced while it waits within 10 s. Stock Tansu 0.6 holds every fetch for its
//!   whole wait.
//!
//! - The broker's maintenance (orderflow's storage patch: in slices, each partition from where
//!   its last pass stopped) still does what Tansu's did: after a restart, which runs it, a
//!   compacted topic of 3 × 3,000 records keeps exactly the latest record of each of its 3,000
//!   keys, and a `delete` topic loses its expired start and nothing within retention.
//!
//! `dev` itself restarting onto its log and tables, with `reconcile` clean, is in binary.rs.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use orderflow::embedded::check_database_matches_log;
use orderflow_platform::kafka::KafkaClients;
use orderflow_projections::{
    orders::OrdersProjection,
    replay::{replay, take_snapshot, ReplayFrom},
    Database,
};
use orderflow_schemas::Codec;
use orderflow_testkit::{
    apply_topics, eventually, free_port,
    log::{order_placed, short_timeline},
    test_settings, test_settings_with, Broker, BrokerProcess, TempDir, EMBEDDED_OVERRIDES,
};
use orderflow_topics::names;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message, Offset, TopicPartitionList,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
/// Past the mock cluster's 100,000 message sets and, at this payload size, its 5 MiB.
const RECORDS: i64 = 150_000;

fn payload(i: i64) -> String {
    // 64 bytes: 150,000 of them are 9.6 MB before any framing.
    format!("record {i:>12} of the log that must never lose its start.......")
}

/// Produces `RECORDS` records into `orders.events` partition 0, each in its own message set
/// (`batch.num.messages = 1`), five requests in flight.
async fn produce_single_record_batches(bootstrap: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer");
    let mut pending = std::collections::VecDeque::new();
    for i in 0..RECORDS {
        let body = payload(i);
        let mut record = FutureRecord::to(names::ORDERS_EVENTS)
            .partition(0)
            .key("k")
            .payload(body.as_bytes());
        // A bounded window of deliveries in flight; a full local queue waits for the oldest.
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((_, returned)) => {
                    record = returned;
                    let oldest = pending
                        .pop_front()
                        .expect("a full queue has deliveries in flight");
                    await_delivery(oldest).await;
                }
            }
        }
        if pending.len() >= 2_000 {
            await_delivery(pending.pop_front().expect("non-empty")).await;
        }
    }
    for delivery in pending {
        await_delivery(delivery).await;
    }
}

async fn await_delivery(delivery: rdkafka::producer::DeliveryFuture) {
    delivery
        .await
        .expect("delivery not cancelled")
        .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
}

/// The low watermark is 0, the high one `records`, and every record reads back in order.
fn assert_whole_log(bootstrap: &str, records: i64, when: &str) {
    let (low, high, read) = read_partition(
        bootstrap,
        names::ORDERS_EVENTS,
        Duration::from_secs(300),
        when,
    );
    assert_eq!(low, 0, "{when}: the log no longer starts at 0");
    assert_eq!(high, records, "{when}: high watermark");
    assert_eq!(read.len() as i64, records, "{when}: records read");
    for (next, record) in (0..).zip(&read) {
        assert_eq!(record.offset, next, "{when}: offsets run without gaps");
        assert_eq!(
            record.value,
            payload(next).as_bytes(),
            "{when}: record {next} reads back as written"
        );
    }
}

/// A record read back: its offset, key and value.
struct Read {
    offset: i64,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Every record of partition 0 of `topic` from its start, with the low and high watermarks
/// it was read between; `when` names the moment in the failure messages.
fn read_partition(
    bootstrap: &str,
    topic: &str,
    within: Duration,
    when: &str,
) -> (i64, i64, Vec<Read>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("embedded-test-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let mut next = low;
    let deadline = std::time::Instant::now() + within;
    while next < high {
        assert!(
            std::time::Instant::now() < deadline,
            "{when}: read {topic} up to {next} of {low}..{high} within {within:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.unwrap_or_else(|e| panic!("{when}: read error: {e}"));
        next = message.offset() + 1;
        records.push(Read {
            offset: message.offset(),
            key: message.key().unwrap_or_default().to_vec(),
            value: message.payload().unwrap_or_default().to_vec(),
        });
    }
    (low, high, records)
}

/// `orderflow broker` on a new log under `dir`, on a free port: the process, its log directory
/// and its address, to restart it on both.
fn start_on_a_new_log(dir: &TempDir) -> Option<(BrokerProcess, std::path::PathBuf, String)> {
    let log_dir = dir.0.join("broker");
    let listen = format!("127.0.0.1:{}", free_port());
    let broker = BrokerProcess::start_on(BIN, &log_dir, &listen)?;
    Some((broker, log_dir, listen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_keeps_every_record_past_the_mocks_limits_and_across_a_restart() {
    let dir = TempDir::new();
    let Some((mut broker, log_dir, listen)) = start_on_a_new_log(&dir) else {
        return;
    };
    let bootstrap = broker.bootstrap();
    produce_single_record_batches(&bootstrap).await;
    tokio::task::spawn_blocking({
        let bootstrap = bootstrap.clone();
        move || assert_whole_log(&bootstrap, RECORDS, "before the restart")
    })
    .await
    .expect("join");

    assert!(
        broker.interrupt(),
        "orderflow broker stops cleanly on Ctrl-C"
    );
    let Some(again) = BrokerProcess::start_on(BIN, &log_dir, &listen) else {
        return;
    };
    assert_eq!(again.bootstrap(), bootstrap);
    tokio::task::spawn_blocking(move || assert_whole_log(&bootstrap, RECORDS, "after the restart"))
        .await
        .expect("join");
}

#[test]
fn the_tests_embedded_overrides_are_what_dev_gives_the_embedded_broker() {
    let with_overrides = test_settings_with(None, EMBEDDED_OVERRIDES).kafka;
    let mut as_dev = test_settings(None).kafka;
    as_dev.default_for_embedded_broker();
    assert_eq!(with_overrides.fetch_wait_ms(), as_dev.fetch_wait_ms());
    assert_ne!(
        as_dev.fetch_wait_ms(),
        test_settings(None).kafka.fetch_wait_ms(),
        "the embedded broker's wait differs from the default, or this checks nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_on_the_embedded_broker_answers_when_a_record_arrives_not_at_the_end_of_its_wait() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    apply_topics(&broker, &test_settings(None)).await;
    let bootstrap = broker.bootstrap();
    /// Far longer than the deadline below: a fetch held for its wait cannot pass.
    const FETCH_WAIT: Duration = Duration::from_secs(30);
    const DEADLINE: Duration = Duration::from_secs(10);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "fetch-wait-test")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT.as_millis().to_string())
        .create()
        .expect("consumer");
    let (_, high) = consumer
        .fetch_watermarks(names::ORDERS_EVENTS, 1, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(names::ORDERS_EVENTS, 1, Offset::Offset(high))
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    // The consumer's first fetch goes out and finds nothing: it is now waiting.
    let consumer = tokio::task::spawn_blocking(move || {
        assert!(
            consumer.poll(Duration::from_millis(500)).is_none(),
            "nothing to read yet"
        );
        consumer
    })
    .await
    .expect("join");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let produced = std::time::Instant::now();
    await_delivery(
        producer
            .send_result(
                FutureRecord::to(names::ORDERS_EVENTS)
                    .partition(1)
                    .key("k")
                    .payload("arrives while a fetch waits"),
            )
            .map_err(|(e, _)| e)
            .expect("queued"),
    )
    .await;
    let received = tokio::task::spawn_blocking(move || loop {
        assert!(
            produced.elapsed() < DEADLINE,
            "the record was not served within {DEADLINE:?} of its produce: the broker holds a \
             fetch for its whole wait ({FETCH_WAIT:?})"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("read");
            break (message.offset(), message.payload().map(<[u8]>::to_vec));
        }
    })
    .await
    .expect("join");
    assert_eq!(
        received,
        (high, Some(b"arrives while a fetch waits".to_vec()))
    );
}

/// Writes `orders` short order timelines to `orders.events`.
async fn write_orders(clients: &KafkaClients, orders: usize) {
    let codec = Codec::new().expect("codec");
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let now = orderflow_testkit::log::now_ms();
    for i in 0..orders {
        let placed = order_placed(
            &format!("customer-{i}"),
            &[("SKU-00001", 1)],
            "tok_ok",
            now + i as i64,
        );
        for event in short_timeline(&placed, true) {
            let bytes = codec.encode(&event).expect("encode");
            producer
                .send(
                    FutureRecord::to(names::ORDERS_EVENTS)
                        .key(&placed.envelope.customer_id)
                        .payload(&bytes),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("write: {e}"));
        }
    }
}

/// The log is cut the way the mock cluster cuts it (which is what the embedded broker replaced):
/// past 5 MiB in one partition, the oldest records are dropped. Without a snapshot, replay and
/// reconcile refuse, naming the partition; with one taken before the cut, both start from it;
/// a replay from the beginning still refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_reconcile_refuse_a_log_that_no_longer_starts_at_zero() {
    let broker = Broker::mock_that_drops();
    let db = orderflow_testkit::Database::sqlite();
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    write_orders(&clients, 40).await;
    let live = Database::connect(db.url.as_str(), 2)
        .await
        .expect("database");
    live.migrate().await.expect("migrate");
    let reconcile = || {
        orderflow_projections::reconcile::reconcile(
            &live,
            &clients,
            names::ORDERS_EVENTS,
            Duration::from_secs(3600),
            orderflow_testkit::log::now_ms(),
        )
    };
    let report = reconcile().await.expect("reconcile on a whole log");
    assert!(report.is_clean(), "{report}");

    // 4 MiB of records that are no events into partition 2 (the mock keeps 5 MiB).
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let fill = |mib: usize| {
        let filler = vec![b'x'; 1024];
        for _ in 0..mib * 1024 {
            producer
                .send_result(
                    FutureRecord::to(names::ORDERS_EVENTS)
                        .partition(2)
                        .key("filler")
                        .payload(&filler),
                )
                .map_err(|(e, _)| e)
                .expect("queued");
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).expect("flush");
    };
    fill(4);
    let probe: BaseConsumer = clients.admin().create().expect("consumer");
    let watermarks = |partition| {
        probe
            .fetch_watermarks(names::ORDERS_EVENTS, partition, Duration::from_secs(10))
            .expect("watermarks")
    };
    assert_eq!(watermarks(2).0, 0, "nothing dropped yet");

    // The tables folded to the log's end (a replay up to positions set there), and a snapshot.
    for partition in 0..6 {
        sqlx::query(
            "INSERT INTO projection_offsets (projection, topic, partition_id, next_offset) \
             VALUES ('orders', $1, $2, $3)",
        )
        .bind(names::ORDERS_EVENTS)
        .bind(i64::from(partition))
        .bind(watermarks(partition).1)
        .execute(live.pool())
        .await
        .expect("positions");
    }
    replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect("replay of the whole log");
    let snapshot = take_snapshot(&OrdersProjection, &live)
        .await
        .expect("snapshot");
    assert_eq!(snapshot.rows["orders"], 40, "{snapshot}");

    // 2 MiB more: the mock drops that partition's oldest records, orders included.
    fill(2);
    let (low, _) = watermarks(2);
    assert!(low > 0, "the mock kept everything: low watermark {low}");
    let expected = format!("orders.events partition 2 starts at offset {low}");

    // From the snapshot: reconcile and replay work; from the beginning a replay refuses.
    let report = reconcile().await.expect("reconcile from the snapshot");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.orders_checked, 40, "{report}");
    assert_eq!(report.from_snapshot, Some(snapshot.taken_at_ms), "{report}");
    let from_snapshot = replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::LatestSnapshot,
    )
    .await
    .expect("a replay from the snapshot");
    assert_eq!(from_snapshot.rows["orders"], 40, "{from_snapshot}");
    let err = replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect_err("replay refuses");
    assert!(err.to_string().contains(&expected), "replay: {err}");
    let output = orderflow(&broker, &db.url, &["reconcile"]).await;
    assert!(
        output.status.success()
            && output
                .stdout
                .contains("folded from the orders projection's snapshot"),
        "reconcile from the snapshot: {output:?}"
    );

    // Without the snapshot both refuse; so do the operator's commands, exiting non-zero.
    let snapshot_file = format!(
        "{}.snapshot-orders",
        orderflow_db::sqlite_path(&db.url)
            .expect("a SQLite file")
            .display()
    );
    std::fs::remove_file(&snapshot_file).expect("the snapshot removed");
    let err = reconcile().await.expect_err("reconcile refuses");
    assert!(err.to_string().contains(&expected), "reconcile: {err}");
    for command in [
        &["reconcile"][..],
        &["replay", "orders"][..],
        &["replay", "orders", "--from-beginning"][..],
    ] {
        let output = orderflow(&broker, &db.url, command).await;
        assert!(
            !output.status.success(),
            "{command:?} succeeded: {output:?}"
        );
        assert!(output.stderr.contains(&expected), "{command:?}: {output:?}");
    }
}

/// What a run of the `orderflow` binary printed.
#[derive(Debug)]
struct Ran {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// `orderflow COMMAND` against `broker` and the database at `url`.
async fn orderflow(broker: &Broker, url: &str, command: &[&str]) -> Ran {
    let (bootstrap, url) = (broker.bootstrap(), url.to_owned());
    let command: Vec<String> = command.iter().map(|c| (*c).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["--kafka-brokers", &bootstrap, "--database-url", &url])
            .args(&command)
            .env("RUST_LOG", "error")
            .output()
            .expect("orderflow runs")
    })
    .await
    .expect("join");
    Ran {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_refuses_tables_folded_from_another_log() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = orderflow_testkit::Database::sqlite();
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    // Fresh tables of a fresh log: fine.
    check_database_matches_log(&settings, &broker.bootstrap())
        .await
        .expect("an empty database matches any log");
    let live = Database::connect(db.url.as_str(), 1)
        .await
        .expect("connect");
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition_id, next_offset) \
         VALUES ('orders', 'orders.events', 0, 42)",
    )
    .execute(live.pool())
    .await
    .expect("insert");
    let err = check_database_matches_log(&settings, &broker.bootstrap())
        .await
        .expect_err("positions past the end of an empty log");
    let message = err.to_string();
    assert!(
        message.contains("orders.events[0]: tables at offset 42, log ends at 0"),
        "{message}"
    );
    assert!(message.contains("another log"), "{message}");
}

/// Records the supervisor test writes while the broker fails under it, paced at
/// `FAULT_RATE`/s so that records are in flight at each failure.
const FAULT_RECORDS: i64 = 6_000;
const FAULT_RATE: i64 = 1_000;

/// Waits for `done` with a deadline, checking every 20 ms.
async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `FAULT_RECORDS` records to `orders.events` partition 0 at `FAULT_RATE`/s through
/// one idempotent producer, counting acknowledgements in `acked`; every record must be
/// acknowledged (message timeout 2 minutes, far past any restart).
async fn produce_through_failures(bootstrap: String, acked: Arc<AtomicI64>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .expect("producer");
    // Deliveries are awaited in order by a task of their own, so acknowledgements are counted
    // as they come while the writer keeps its pace.
    let (deliveries, mut to_await) = tokio::sync::mpsc::unbounded_channel();
    let counter = tokio::spawn(async move {
        while let Some(delivery) = to_await.recv().await {
            await_delivery(delivery).await;
            acked.fetch_add(1, Ordering::AcqRel);
        }
    });
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let per_tick = FAULT_RATE / 20;
    let mut i = 0;
    while i < FAULT_RECORDS {
        pace.tick().await;
        for _ in 0..per_tick.min(FAULT_RECORDS - i) {
            let body = payload(i);
            let delivery = producer
                .send_result(
                    FutureRecord::to(names::ORDERS_EVENTS)
                        .partition(0)
                        .key("k")
                        .payload(body.as_bytes()),
                )
                .unwrap_or_else(|(e, _)| panic!("queueing record {i}: {e}"));
            deliveries.send(delivery).expect("the counter runs");
            i += 1;
        }
    }
    drop(deliveries);
    counter.await.expect("every record acknowledged");
}

/// The embedded broker's supervisor restarts it on its log when its process dies (SIGKILL)
/// and when it reports a panic but keeps running. Tansu 0.6 can do the latter (its storage
/// panicked under load here and took no produce again); nothing makes this build panic on
/// demand once orderflow's producers stopped triggering it (ingest's `publish` docs), so the
/// test writes the panic into the broker's output as Rust's panic hook would, and the real
/// broker is stopped and restarted on that evidence. A producer writes throughout, with
/// records in flight at each failure: every record is acknowledged and is in the log exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_dies_or_panics_is_restarted_on_its_log_losing_and_doubling_nothing() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let fixture = broker.as_embedded().expect("the embedded broker");
    apply_topics(&broker, &test_settings(None)).await;
    let acked = Arc::new(AtomicI64::new(0));
    let writer = tokio::spawn(produce_through_failures(broker.bootstrap(), acked.clone()));

    wait_for("a third acknowledged", Duration::from_secs(60), || {
        acked.load(Ordering::Acquire) >= FAULT_RECORDS / 3
    })
    .await;
    let killed = fixture.pid().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_for("a restart after SIGKILL", Duration::from_secs(30), || {
        fixture.restarts() == 1 && fixture.pid().is_some_and(|pid| pid != killed)
    })
    .await;
    assert_eq!(fixture.down_reason(), None, "serving again");

    wait_for("two thirds acknowledged", Duration::from_secs(60), || {
        acked.load(Ordering::Acquire) >= 2 * FAULT_RECORDS / 3
    })
    .await;
    let panicked = fixture.pid().expect("running");
    {
        use std::io::Write as _;
        let mut output = std::fs::OpenOptions::new()
            .append(true)
            .open(fixture.output_file())
            .expect("the broker's output file");
        writeln!(
            output,
            "\nthread 'tokio-runtime-worker' panicked at tansu-storage-0.6.0/src/lite.rs:503:13:\n\
             more or less than one row"
        )
        .expect("write");
    }
    wait_for("a restart after a panic", Duration::from_secs(30), || {
        fixture.restarts() == 2 && fixture.pid().is_some_and(|pid| pid != panicked)
    })
    .await;

    tokio::time::timeout(Duration::from_secs(180), writer)
        .await
        .expect("every record acknowledged within 3 minutes")
        .expect("the writer did not fail");
    assert_eq!(acked.load(Ordering::Acquire), FAULT_RECORDS);
    // Nothing lost, nothing doubled: offset i holds record i, and there are exactly as many.
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || {
        assert_whole_log(&bootstrap, FAULT_RECORDS, "after the restarts")
    })
    .await
    .expect("join");
}

const COMPACTED: &str = "maintenance.compacted";
const EXPIRING: &str = "maintenance.expiring";
const KEYS: usize = 3_000;
const ROUNDS: usize = 3;
const EXPIRED: i64 = 1_000;
const RECENT: i64 = 500;

/// Creates the two topics of the maintenance test: compacted, and `delete` with an hour's
/// retention.
async fn create_maintenance_topics(bootstrap: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topics = [
        NewTopic::new(COMPACTED, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact"),
        NewTopic::new(EXPIRING, 1, TopicReplication::Fixed(1))
            .set("cleanup.policy", "delete")
            .set("retention.ms", "3600000"),
    ];
    for result in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        result.unwrap_or_else(|(topic, code)| panic!("create {topic}: {code}"));
    }
}

/// `ROUNDS` rounds of `KEYS` keys into the compacted topic (round `r` of key `k` reads
/// `k=r`), then `EXPIRED` records stamped two hours ago and `RECENT` stamped now into the
/// expiring one.
async fn produce_maintenance_log(bootstrap: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer");
    let mut deliveries = Vec::new();
    for round in 0..ROUNDS {
        for key in 0..KEYS {
            let key = format!("key-{key}");
            let value = format!("{key}={round}");
            let record = FutureRecord::to(COMPACTED)
                .partition(0)
                .key(&key)
                .payload(&value);
            deliveries.push(producer.send_result(record).expect("queued"));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    for i in 0..EXPIRED + RECENT {
        let timestamp = if i < EXPIRED { now - 7_200_000 } else { now };
        let value = format!("{i}");
        let record = FutureRecord::<(), _>::to(EXPIRING)
            .partition(0)
            .timestamp(timestamp)
            .payload(&value);
        deliveries.push(producer.send_result(record).expect("queued"));
    }
    for delivery in deliveries {
        await_delivery(delivery).await;
    }
}

/// Every record of partition 0 of `topic`, from its start: key and value as text.
fn read_text(bootstrap: &str, topic: &str) -> Vec<(String, String)> {
    let (_, _, records) = read_partition(bootstrap, topic, Duration::from_secs(60), "maintenance");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    records
        .iter()
        .map(|record| (text(&record.key), text(&record.value)))
        .collect()
}

/// Reads `topic` from its start until it holds `count` records (the broker's maintenance at
/// work), for at most 120 s.
async fn read_until_it_holds(
    bootstrap: &str,
    topic: &'static str,
    count: usize,
    what: &str,
) -> Vec<(String, String)> {
    eventually(Duration::from_secs(120), what, || {
        let bootstrap = bootstrap.to_owned();
        async move {
            let records = tokio::task::spawn_blocking(move || read_text(&bootstrap, topic))
                .await
                .expect("join");
            (records.len() == count).then_some(records)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_maintenance_compacts_and_expires_in_slices_as_tansus_did() {
    let dir = TempDir::new();
    let Some((mut broker, log_dir, listen)) = start_on_a_new_log(&dir) else {
        return;
    };
    let bootstrap = broker.bootstrap();
    create_maintenance_topics(&bootstrap).await;
    produce_maintenance_log(&bootstrap).await;
    let before = tokio::task::spawn_blocking({
        let bootstrap = bootstrap.clone();
        move || read_text(&bootstrap, COMPACTED)
    })
    .await
    .expect("join");
    assert_eq!(
        before.len(),
        KEYS * ROUNDS,
        "the maintenance ran at the start, on no records, and not since"
    );

    assert!(
        broker.interrupt(),
        "orderflow broker stops cleanly on Ctrl-C"
    );
    // The maintenance runs at every start of the broker.
    let Some(_again) = BrokerProcess::start_on(BIN, &log_dir, &listen) else {
        return;
    };
    let compacted = read_until_it_holds(
        &bootstrap,
        COMPACTED,
        KEYS,
        "the restarted broker's maintenance compacts the topic",
    )
    .await;
    let last = ROUNDS - 1;
    let expected: Vec<(String, String)> = (0..KEYS)
        .map(|key| (format!("key-{key}"), format!("key-{key}={last}")))
        .collect();
    assert_eq!(
        compacted, expected,
        "each key's latest record, in the order written"
    );

    let expiring = read_until_it_holds(
        &bootstrap,
        EXPIRING,
        RECENT as usize,
        "the restarted broker's maintenance expires the topic's start",
    )
    .await;
    let values: Vec<String> = expiring.into_iter().map(|(_, value)| value).collect();
    let recent: Vec<String> = (EXPIRED..EXPIRED + RECENT).map(|i| i.to_string()).collect();
    assert_eq!(
        values, recent,
        "the expired start goes, nothing within retention"
    );
}
