//! The runtime against real brokers (the embedded broker, without transactions; Tansu, with
//! them) and the mock cluster where a test needs upstream transactions the embedded broker
//! lacks:
//!
//! - backpressure: a batch whose step work is slow pauses every partition until it commits,
//!   and every record is still processed exactly once;
//! - group commits: one-record batches cost about one group offset commit a second, not one
//!   each, and the group has every processed offset once the input goes quiet;
//! - duplicate and aborted delivery: the full saga fed a batch from an aborted upstream
//!   transaction (which `read_committed` readers on these brokers see) and then the same inputs
//!   committed, one of them twice — state and outputs are as if each input came once; poison
//!   records on the inventory and payment inputs go to their dead-letter topics and the records
//!   behind them are processed;
//! - fencing (Tansu): a new producer with an instance's transactional id fences the old one.
//! - offset gaps: with `kafka.recheck_offset_gaps`, each transaction marker in the input is read
//!   twice before it is passed, and every record is still handled once, in order.
//! - readiness: a processor reports "restoring" on `/readyz` while its state restores, and
//!   ready after.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use orderflow_gateway::{simulator::Simulator, GatewayClient};
use orderflow_platform::{
    health::{readiness_routes, Readiness},
    http::Server,
    kafka::KafkaClients,
    metrics::{ConsumerMetrics, MetricsRegistry},
    Settings,
};
use orderflow_processors::{
    metrics::ProcessorLabels,
    processors,
    runtime::{ProcessorIo, StepError},
    saga::{OrderState, Stage},
    state::{ChangelogRecord, NoState, PartitionState, GENERATION_HEADER, POSITION_KEY},
    Outputs, ProcessorDeps, ProcessorMetrics, ProcessorRuntime, SagaRules, Step,
};
use orderflow_schemas::{Codec, OrderEvent};
use orderflow_testkit::{
    apply_topics, eventually,
    log::{envelope, now_ms, order_placed, read_dead_letters, restocked, Log, LogReader},
    run, run_on, test_settings, test_settings_with, Broker,
};
use orderflow_topics::names;
use rdkafka::{
    consumer::Consumer,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Records every input it handles; `prepare` waits for a permit of `gate` per batch.
struct Gated {
    gate: Arc<Semaphore>,
    batches: Arc<Mutex<Vec<usize>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Step for Gated {
    type State = NoState;

    fn prepare(
        &mut self,
        inputs: &[OrderEvent],
    ) -> impl std::future::Future<Output = Result<(), StepError>> + Send {
        let gate = self.gate.clone();
        let batches = self.batches.clone();
        let size = inputs.len();
        async move {
            batches.lock().expect("lock").push(size);
            let permit = gate
                .acquire()
                .await
                .map_err(|_| StepError::Retry("gate closed".into()))?;
            permit.forget();
            Ok(())
        }
    }

    fn handle(
        &mut self,
        _state: &mut NoState,
        event: &OrderEvent,
        _out: &mut Outputs,
    ) -> Result<(), StepError> {
        self.seen
            .lock()
            .expect("lock")
            .push(event.envelope().event_id.clone());
        Ok(())
    }
}

/// A stateless processor over `payments.requests` running `step`, with its metrics and labels.
fn gated_processor(
    name: &'static str,
    step: Gated,
    clients: KafkaClients,
    settings: &Settings,
    codec: Arc<Codec>,
) -> (ProcessorRuntime<Gated>, ProcessorMetrics, ProcessorLabels) {
    let metrics = ProcessorMetrics::register(&MetricsRegistry::new(), ConsumerMetrics::default());
    let io = ProcessorIo {
        name,
        input_topic: names::PAYMENTS_REQUESTS,
        dead_letter_topic: names::PAYMENTS_DLQ,
        changelog_topic: None,
    };
    let runtime = ProcessorRuntime::new(
        io,
        step,
        clients,
        &settings.processor,
        codec,
        metrics.clone(),
    );
    let labels = ProcessorLabels {
        processor: name.to_owned(),
    };
    (runtime, metrics, labels)
}

async fn write(producer: &FutureProducer, topic: &str, key: &str, bytes: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(bytes),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("write to {topic}: {e}"));
}

async fn backpressure(broker: Broker) {
    let mut settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    settings.processor.batch_max_records = 10;
    settings.processor.pause_after_ms = 50;
    // Long enough that the first batch fills up from the records already written.
    settings.processor.batch_max_ms = 5000;
    settings.processor.batch_idle_ms = 1000;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let codec = Arc::new(Codec::new().expect("codec"));

    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let mut written = BTreeSet::new();
    for i in 0..40 {
        let event = restocked(&format!("SKU-{i:03}"), 1, now_ms());
        written.insert(event.envelope().event_id.clone());
        let bytes = codec.encode(&event).expect("encode");
        write(
            &producer,
            names::PAYMENTS_REQUESTS,
            &format!("k{i}"),
            &bytes,
        )
        .await;
    }

    let gate = Arc::new(Semaphore::new(0));
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (runtime, metrics, labels) = gated_processor(
        "backpressure-test",
        Gated {
            gate: gate.clone(),
            batches: batches.clone(),
            seen: seen.clone(),
        },
        clients,
        &settings,
        codec,
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runtime.run(cancel.clone()));

    // The first batch is full and held in `prepare`: every partition is paused meanwhile.
    let first = eventually(Duration::from_secs(60), "the first batch", || async {
        batches.lock().expect("lock").first().copied()
    })
    .await;
    assert_eq!(first, 10, "the first batch is full");
    // Its step work runs past pause_after_ms: all six input partitions pause.
    eventually(Duration::from_secs(10), "the partitions paused", || async {
        (metrics.paused_partitions.get_or_create(&labels).get() == 6).then_some(())
    })
    .await;
    assert_eq!(metrics.pauses.get_or_create(&labels).get(), 1);

    // Let the batches through: partitions resume, and every record is processed once.
    gate.add_permits(1000);
    eventually(
        Duration::from_secs(60),
        "every record committed",
        || async { (metrics.records.get_or_create(&labels).get() == 40).then_some(()) },
    )
    .await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 40, "no record was handled twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), written);
    assert_eq!(metrics.paused_partitions.get_or_create(&labels).get(), 0);
    assert_eq!(
        metrics.pauses.get_or_create(&labels).get(),
        1,
        "fast batches never pause"
    );
    cancel.cancel();
    running.await.expect("runtime ends");
}

#[test]
fn a_slow_batch_pauses_the_partitions_on_the_embedded_broker() {
    run_on(Broker::embedded(), backpressure);
}

#[test]
fn a_slow_batch_pauses_the_partitions_on_tansu() {
    run_on(Broker::tansu(), backpressure);
}

/// One-record batches, one after the other, as at low load: the group offset is committed at
/// most once a second while they keep coming and once when the input goes quiet
/// (`orderflow_platform::group_commits`), not once per batch, and the group still ends up with
/// every processed offset before the processor stops.
async fn group_commits_coalesce(broker: Broker) {
    const RECORDS: i64 = 60;
    let settings = test_settings_with(None, broker.overrides());
    apply_topics(&broker, &settings).await;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let codec = Arc::new(Codec::new().expect("codec"));
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let (runtime, metrics, labels) = gated_processor(
        "group-commit-test",
        Gated {
            gate: Arc::new(Semaphore::new(10_000)),
            batches: Arc::new(Mutex::new(Vec::new())),
            seen: Arc::new(Mutex::new(Vec::new())),
        },
        clients.clone(),
        &settings,
        codec.clone(),
    );
    let group = runtime.group_id().to_owned();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runtime.run(cancel.clone()));

    // Each record is handled before the next is written: every batch holds one record.
    let started = std::time::Instant::now();
    for i in 0..RECORDS {
        let event = restocked(&format!("SKU-{i:03}"), 1, now_ms());
        write(
            &producer,
            names::PAYMENTS_REQUESTS,
            &format!("k{i}"),
            &codec.encode(&event).expect("encode"),
        )
        .await;
        eventually(Duration::from_secs(60), "the record handled", || async {
            (metrics.records.get_or_create(&labels).get() == i as u64 + 1).then_some(())
        })
        .await;
    }
    let busy = started.elapsed();

    // Quiet now: the next empty poll commits what is left, without a shutdown.
    let reader: rdkafka::consumer::BaseConsumer = clients
        .consumer("group-commit-check", &group)
        .create()
        .expect("a consumer of the processor's group");
    eventually(
        Duration::from_secs(30),
        "every processed offset committed to the group",
        || async {
            let mut partitions = rdkafka::TopicPartitionList::new();
            for partition in 0..6 {
                partitions.add_partition(names::PAYMENTS_REQUESTS, partition);
            }
            let committed = reader
                .committed_offsets(partitions, Duration::from_secs(5))
                .ok()?;
            let sum: i64 = committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(next) => Some(next),
                    _ => None,
                })
                .sum();
            (sum == RECORDS).then_some(())
        },
    )
    .await;

    // While busy: at most one commit a second, plus one per empty poll (at most one per tick, a
    // second). Once per batch would be RECORDS commits.
    let commits = metrics.group_commits.get_or_create(&labels).get();
    let bound = 2 * busy.as_secs() + 4;
    assert!(
        commits <= bound && commits < RECORDS as u64 / 2,
        "{commits} group commits for {RECORDS} one-record batches in {busy:?} (at most {bound})"
    );
    cancel.cancel();
    running.await.expect("runtime ends");
}

#[test]
fn group_commits_coalesce_on_the_embedded_broker() {
    run_on(Broker::embedded(), group_commits_coalesce);
}

#[test]
fn group_commits_coalesce_on_tansu() {
    run_on(Broker::tansu(), group_commits_coalesce);
}

/// Input written in committed transactions, each leaving a marker (an offset no record holds)
/// in the partition on Tansu: with `kafka.recheck_offset_gaps` the runtime reads such gaps a
/// second time before passing them, and still handles every record exactly once and in order.
async fn offset_gaps_are_read_twice(broker: Broker) {
    let mut settings = test_settings_with(None, broker.overrides());
    settings.kafka.recheck_offset_gaps = true;
    apply_topics(&broker, &settings).await;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let codec = Arc::new(Codec::new().expect("codec"));

    let upstream: FutureProducer = clients
        .transactional_producer("test", "test-gaps")
        .create()
        .expect("producer");
    let timeout = Duration::from_secs(30);
    upstream.init_transactions(timeout).expect("init");
    let mut written = Vec::new();
    for t in 0..4 {
        upstream.begin_transaction().expect("begin");
        for i in 0..5 {
            let event = restocked(&format!("SKU-{t}-{i}"), 1, now_ms());
            written.push(event.envelope().event_id.clone());
            let bytes = codec.encode(&event).expect("encode");
            upstream
                .send(
                    FutureRecord::to(names::PAYMENTS_REQUESTS)
                        .partition(0)
                        .key("k")
                        .payload(&bytes),
                    timeout,
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("write: {e}"));
        }
        upstream.commit_transaction(timeout).expect("commit");
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let (runtime, metrics, labels) = gated_processor(
        "gaps-test",
        Gated {
            gate: Arc::new(Semaphore::new(10_000)),
            batches: Arc::new(Mutex::new(Vec::new())),
            seen: seen.clone(),
        },
        clients,
        &settings,
        codec,
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runtime.run(cancel.clone()));
    eventually(
        Duration::from_secs(60),
        "every record committed",
        || async { (metrics.records.get_or_create(&labels).get() == 20).then_some(()) },
    )
    .await;
    cancel.cancel();
    running.await.expect("runtime ends");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, written, "every record once, in log order");
    // On Tansu the markers after the first three transactions have records behind them: the
    // gaps were read a second time, at least once and at most once each (one seek covers every
    // gap of a batch; the last marker ends the partition, so nothing jumps over it). The
    // mock cluster stores no markers: its offsets have no gaps to read again.
    let rereads = metrics.gap_rereads.get_or_create(&labels).get();
    match broker {
        Broker::Mock(_) => assert_eq!(rereads, 0, "no gaps on the mock cluster"),
        Broker::Embedded(_) => unreachable!("no upstream transactions on the embedded broker"),
        Broker::Tansu(_) => assert!(
            (1..=3).contains(&rereads),
            "tansu: three markers behind records, read again with 1 to 3 seeks, not {rereads}"
        ),
    }
}

#[test]
fn offset_gaps_are_read_twice_on_the_mock_cluster() {
    // Upstream transactions: the embedded broker has none.
    run_on(Some(Broker::mock()), offset_gaps_are_read_twice);
}

#[test]
fn offset_gaps_are_read_twice_on_tansu() {
    run_on(Broker::tansu(), offset_gaps_are_read_twice);
}

/// Runs the three processors in this process until cancelled.
async fn run_processors(
    settings: &Settings,
    bootstrap: &str,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    run_some_processors(settings, bootstrap, cancel, ALL_PROCESSORS).await
}

/// Runs the named processors in this process until cancelled; returns their tasks.
async fn run_some_processors(
    settings: &Settings,
    bootstrap: &str,
    cancel: &CancellationToken,
    names: &[&str],
) -> Vec<tokio::task::JoinHandle<()>> {
    let deps = ProcessorDeps {
        runtime: orderflow_processors::RuntimeDeps {
            clients: KafkaClients::new(&settings.kafka, bootstrap),
            codec: Arc::new(Codec::new().expect("codec")),
            metrics: ProcessorMetrics::unregistered(),
            readiness: None,
        },
        gateway: GatewayClient::new(&settings.payment.gateway_url, &settings.payment.tls)
            .expect("gateway client"),
        switches: None,
    };
    processors(settings, &deps, cancel)
        .into_iter()
        .filter(|(name, _)| names.contains(name))
        .map(|(_, task)| tokio::spawn(task))
        .collect()
}

/// Processors started by [`Scene::run`].
struct Running {
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops them and waits until each has committed and left its group: a restart, not an
    /// overlap of two owners.
    async fn stop(self) {
        self.token.cancel();
        stopped(self.tasks).await;
    }
}

/// How long cancelled processors may take to commit, close and return.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// Waits for cancelled processor tasks to return, failing the test after [`STOP_DEADLINE`]. A
/// test stops its processors this way before its broker goes: a processor's last commit waits
/// for the broker without limit, and one left running when the broker stops never returns.
async fn stopped(tasks: Vec<tokio::task::JoinHandle<()>>) {
    tokio::time::timeout(STOP_DEADLINE, async {
        for task in tasks {
            task.await.expect("processor task");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("cancelled processors still running after {STOP_DEADLINE:?}"));
}

async fn aborted_and_duplicate_delivery(broker: Broker) {
    let mut settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    let mut gateway = settings.gateway.clone();
    gateway.latency_ms = 1;
    let simulator = Simulator::bind(&gateway).await.expect("gateway");
    settings.payment.gateway_url = format!("http://{}", simulator.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    tokio::spawn(simulator.run(cancel.clone()));
    let bootstrap = broker.bootstrap();
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let codec = Codec::new().expect("codec");

    // 5 units of one SKU; three orders of 2 units each: exactly two can be confirmed.
    let now = now_ms();
    let restock = codec.encode(&restocked("SKU-ABC", 5, now)).expect("encode");
    let placed: Vec<_> = (0..3)
        .map(|i| {
            order_placed(
                &format!("customer-{i}"),
                &[("SKU-ABC", 2)],
                "tok_ok",
                now + i,
            )
        })
        .collect();
    let orders: Vec<Vec<u8>> = placed
        .iter()
        .map(|o| {
            codec
                .encode(&OrderEvent::OrderPlaced(o.clone()))
                .expect("encode")
        })
        .collect();

    // An upstream transaction with the restock and the first two orders, aborted. These
    // brokers show its records to `read_committed` readers anyway.
    let upstream: FutureProducer = clients
        .transactional_producer("test", "test-upstream")
        .create()
        .expect("transactional producer");
    let timeout = Duration::from_secs(30);
    upstream.init_transactions(timeout).expect("init");
    upstream.begin_transaction().expect("begin");
    write(&upstream, names::INVENTORY_COMMANDS, "SKU-ABC", &restock).await;
    for (order, bytes) in placed.iter().zip(&orders).take(2) {
        write(
            &upstream,
            names::ORDERS_EVENTS,
            &order.envelope.customer_id,
            bytes,
        )
        .await;
    }
    upstream.abort_transaction(timeout).expect("abort");

    // The upstream's retry, committed: the same records, the second order twice, then the third.
    // And a poison record ahead of each processor's later work: on the SKU's partition of
    // inventory.commands (the reservations come after it), under a key of its own — a poison
    // record parks its key, whose later records wait behind it (`processors::sequence`;
    // cli/tests/dlq.rs), while the partition keeps moving — and on each order's partition of
    // payments.requests (its payment request comes after it; the payment worker keeps no state
    // and parks nothing).
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    let (sku_partition, _) = producer
        .send(
            FutureRecord::to(names::INVENTORY_COMMANDS)
                .key("SKU-ABC")
                .payload(&restock),
            Duration::from_secs(30),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .unwrap_or_else(|(e, _)| panic!("restock: {e}"));
    producer
        .send(
            FutureRecord::to(names::INVENTORY_COMMANDS)
                .key("SKU-POISON")
                .partition(sku_partition)
                .payload(b"not avro"),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("poison: {e}"));
    for order in &placed {
        let key = &order.envelope.order_id;
        write(&producer, names::PAYMENTS_REQUESTS, key, b"not avro either").await;
    }
    for i in [0, 1, 1, 2] {
        let customer = &placed[i].envelope.customer_id;
        write(&producer, names::ORDERS_EVENTS, customer, &orders[i]).await;
    }

    let processors = run_processors(&settings, &bootstrap, &cancel).await;
    let mut reader = LogReader::new(&settings, &bootstrap);
    reader.poll_until(Duration::from_secs(120), "every order final", |log| {
        placed
            .iter()
            .all(|o| log.finals.contains_key(&o.envelope.order_id))
    });
    // Any late re-emission too.
    reader.poll_for(Duration::from_secs(2));
    let log = &reader.log;
    assert!(
        log.conflicts.is_empty(),
        "conflicting events: {:?}",
        log.conflicts
    );
    // The processors really were fed the aborted records: a `read_committed` reader sees the
    // first order twice and the second three times.
    let copies: Vec<usize> = placed
        .iter()
        .map(|o| log.copies[&o.envelope.event_id])
        .collect();
    assert_eq!(
        copies,
        vec![2, 3, 1],
        "copies of each OrderPlaced on the log"
    );

    let head = ["OrderPlaced", "OrderValidated", "FraudScored"];
    let confirmed_path: Vec<&str> = [
        &head[..],
        &[
            "InventoryReservationRequested",
            "InventoryReserved",
            "PaymentRequested",
            "PaymentAuthorized",
            "OrderConfirmed",
        ],
    ]
    .concat();
    let rejected_path: Vec<&str> = [
        &head[..],
        &[
            "InventoryReservationRequested",
            "InventoryRejected",
            "OrderRejected",
        ],
    ]
    .concat();
    let mut confirmed = BTreeSet::new();
    for order in &placed {
        let id = &order.envelope.order_id;
        assert_eq!(log.finals[id].len(), 1, "{id}: one final event");
        let path = log.path(id);
        let kinds: Vec<&str> = path.iter().map(|(_, k)| *k).collect();
        let sequences: Vec<i64> = path.iter().map(|(s, _)| *s).collect();
        assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
        if kinds == confirmed_path {
            confirmed.insert(id.clone());
        } else {
            assert_eq!(kinds, rejected_path, "{id}: neither confirmed nor rejected");
        }
    }
    // The restock counted once (twice would confirm all three); no order reserved twice.
    assert_eq!(confirmed.len(), 2, "5 units, 2 per order: two confirmed");
    let mut left: Vec<i32> = log
        .by_order
        .values()
        .flat_map(|events| events.values())
        .filter_map(|e| match e {
            OrderEvent::InventoryLineReserved(r) => Some(r.available_after),
            _ => None,
        })
        .collect();
    left.sort_unstable();
    assert_eq!(left, vec![1, 3], "one reservation per confirmed order");

    // One charge per confirmed order at the gateway.
    let report = GatewayClient::new(&settings.payment.gateway_url, &settings.payment.tls)
        .expect("gateway client")
        .report(Duration::from_secs(10))
        .await
        .expect("gateway report");
    let charged: BTreeSet<String> = report
        .charges
        .iter()
        .inspect(|r| assert!(r.charges <= 1, "{} charged twice", r.idempotency_key))
        .filter(|r| r.status == "authorized")
        .map(|r| r.idempotency_key.clone())
        .collect();
    assert_eq!(charged, confirmed);

    // The poison records are in the dead-letter topics with their reason and source, and the
    // records behind them were processed (the orders above completed).
    for (dlq, source, count) in [
        (names::INVENTORY_DLQ, names::INVENTORY_COMMANDS, 1),
        (names::PAYMENTS_DLQ, names::PAYMENTS_REQUESTS, 3),
    ] {
        for headers in read_dead_letters(&settings, &bootstrap, dlq, count) {
            assert!(
                headers["dlq.reason"].starts_with("undecodable"),
                "{dlq}: {headers:?}"
            );
            assert_eq!(headers["dlq.source.topic"], source, "{dlq}: {headers:?}");
        }
    }
    cancel.cancel();
    stopped(processors).await;
}

#[test]
fn aborted_and_duplicate_delivery_count_once_on_the_mock_cluster() {
    // An aborted upstream transaction: the embedded broker has none.
    run_on(Some(Broker::mock()), aborted_and_duplicate_delivery);
}

#[test]
fn aborted_and_duplicate_delivery_count_once_on_tansu() {
    run_on(Broker::tansu(), aborted_and_duplicate_delivery);
}

/// Tansu only (the mock cluster fences nothing): a second producer with the same transactional
/// id — a restarted instance — fences the first, whose open transaction can then never commit.
#[test]
fn a_new_producer_with_the_same_transactional_id_fences_the_old_one_on_tansu() {
    run(async {
        let Some(broker) = Broker::tansu() else {
            return;
        };
        let settings = test_settings(None);
        apply_topics(&broker, &settings).await;
        let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
        let codec = Codec::new().expect("codec");
        let bytes = codec
            .encode(&restocked("SKU-ABC", 1, now_ms()))
            .expect("encode");
        let timeout = Duration::from_secs(10);
        let transactional = || -> FutureProducer {
            clients
                .transactional_producer("test", "orderflow-saga-fenced")
                .create()
                .expect("transactional producer")
        };

        let old = transactional();
        let (old, bytes_old) = tokio::task::spawn_blocking({
            let bytes = bytes.clone();
            move || {
                old.init_transactions(timeout).expect("init");
                old.begin_transaction().expect("begin");
                (old, bytes)
            }
        })
        .await
        .expect("join");
        write(&old, names::INVENTORY_COMMANDS, "SKU-ABC", &bytes_old).await;

        let new = transactional();
        let new = tokio::task::spawn_blocking(move || {
            new.init_transactions(timeout)
                .expect("the successor initialises");
            new
        })
        .await
        .expect("join");

        let fenced = tokio::task::spawn_blocking(move || old.commit_transaction(timeout))
            .await
            .expect("join");
        assert!(
            fenced.is_err(),
            "the fenced producer's commit must not succeed: {fenced:?}"
        );

        // The successor works normally.
        let new = tokio::task::spawn_blocking(move || {
            new.begin_transaction().expect("begin");
            new
        })
        .await
        .expect("join");
        write(&new, names::INVENTORY_COMMANDS, "SKU-ABC", &bytes).await;
        tokio::task::spawn_blocking(move || new.commit_transaction(timeout))
            .await
            .expect("join")
            .expect("the successor commits");
    });
}

/// Restoring blocks until `RESTORE_MAY_FINISH` is set (restores run on blocking threads).
static RESTORE_MAY_FINISH: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct SlowState;

impl PartitionState for SlowState {
    fn restore(&mut self, _key: &str, _value: Option<&[u8]>) -> Result<(), String> {
        while !RESTORE_MAY_FINISH.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        Vec::new()
    }
}

struct Stateful;

impl Step for Stateful {
    type State = SlowState;

    fn handle(
        &mut self,
        _state: &mut SlowState,
        _event: &OrderEvent,
        _out: &mut Outputs,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// The changelog producer holds a batch's records (its linger) until the runtime flushes. With
/// the linger at librdkafka's maximum (15 minutes), `flush_now` must return only once every
/// record is acknowledged, each partition's records in order and none missing, well before the
/// linger. What this cannot show is the speed-up over rdkafka's own `flush`, which also gets the
/// records out in most runs here, only sometimes after seconds (its brief flush windows race the
/// broker threads): that is measured, not asserted (BENCHMARKS.md, "After the changelog flush":
/// a stateful batch from ~210 ms to 8–9 ms).
#[test]
fn the_changelog_flush_sends_at_once_whatever_the_linger() {
    run(async {
        let Some(broker) = Broker::embedded() else {
            return;
        };
        let settings = test_settings(None);
        apply_topics(&broker, &settings).await;
        let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
        let producer: FutureProducer = clients
            .changelog_producer("test")
            .set("linger.ms", "900000")
            .set("message.timeout.ms", "1000000")
            .create()
            .expect("changelog producer");
        let mut deliveries = Vec::new();
        for i in 0..200 {
            let key = format!("key-{i}");
            let record = FutureRecord::to(names::SAGA_CHANGELOG)
                .partition(i % 2)
                .key(&key)
                .payload("{}");
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("enqueue"),
            );
        }
        let flushing = producer.clone();
        tokio::task::spawn_blocking(move || {
            orderflow_platform::kafka::flush_now(&flushing, Duration::from_secs(60))
        })
        .await
        .expect("flush task")
        .expect("every record acknowledged within the flush's timeout, not after the linger");
        let mut per_partition = [Vec::new(), Vec::new()];
        for delivery in deliveries {
            let delivered = delivery
                .await
                .expect("delivery report")
                .unwrap_or_else(|(e, _)| panic!("delivery failed: {e}"));
            per_partition[usize::try_from(delivered.partition).expect("partition")]
                .push(delivered.offset);
        }
        for (partition, offsets) in per_partition.iter().enumerate() {
            let first = offsets[0];
            let expected: Vec<i64> = (first..first + 100).collect();
            assert_eq!(
                offsets, &expected,
                "partition {partition}: in order, none missing"
            );
        }
    });
}

#[test]
fn not_ready_while_the_state_restores_and_ready_after() {
    run(async {
        let Some(broker) = Broker::embedded() else {
            return;
        };
        let settings = test_settings(None);
        apply_topics(&broker, &settings).await;
        let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
        // A changelog entry in every partition, so every assigned partition has state to restore.
        let producer: FutureProducer = clients
            .idempotent_producer("test")
            .create()
            .expect("producer");
        // (An entry applies once the position record after it closes its batch.)
        for partition in 0..6 {
            for (key, value) in [("entry", "{}"), (POSITION_KEY, "0")] {
                producer
                    .send(
                        FutureRecord::to(names::SAGA_CHANGELOG)
                            .partition(partition)
                            .key(key)
                            .payload(value),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("changelog write: {e}"));
            }
        }
        let io = ProcessorIo {
            name: "restore-test",
            input_topic: names::ORDERS_EVENTS,
            dead_letter_topic: names::SAGA_DLQ,
            changelog_topic: Some(names::SAGA_CHANGELOG),
        };
        let readiness = Readiness::new();
        let runtime = ProcessorRuntime::new(
            io,
            Stateful,
            clients,
            &settings.processor,
            Arc::new(Codec::new().expect("codec")),
            ProcessorMetrics::unregistered(),
        )
        .with_readiness(readiness.clone());
        let component = "processor restore-test state";
        // `/readyz` served as every role serves it.
        let server = Server::bind(
            "127.0.0.1:0".parse().expect("addr"),
            readiness_routes(readiness.clone()),
        )
        .await
        .expect("bind");
        let readyz = format!("http://{}/readyz", server.local_addr().expect("addr"));
        let cancel = CancellationToken::new();
        tokio::spawn(server.run(cancel.clone()));
        let client = reqwest::Client::new();
        let get = || async {
            let response = client.get(&readyz).send().await.ok()?;
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.ok()?;
            Some((status, body))
        };
        assert_eq!(
            get().await.map(|(s, _)| s),
            Some(503),
            "not ready before it starts"
        );
        let running = tokio::spawn(runtime.run(cancel.clone()));

        // The restore reports its progress: which partition, how many of its records were read.
        let (status, body) = eventually(Duration::from_secs(60), "a restoring report", || async {
            let (status, body) = get().await?;
            let report = body["components"][component].as_str()?;
            (report.starts_with("restoring partition ") && report.ends_with("of 2 records read"))
                .then_some((status, body))
        })
        .await;
        assert_eq!(status, 503, "/readyz is not ready while restoring: {body}");

        RESTORE_MAY_FINISH.store(true, Ordering::SeqCst);
        let body = eventually(
            Duration::from_secs(60),
            "ready after the restore",
            || async {
                let (status, body) = get().await?;
                (status == 200).then_some(body)
            },
        )
        .await;
        assert_eq!(body["components"][component], "ready");
        cancel.cancel();
        running.await.expect("runtime ends");
    });
}

/// What the saga scenarios below start from: the catalog's topics on `broker`, a simulated
/// gateway (1 ms latency) the settings point at, a producer, and a root token that stops the
/// gateway and whatever runs under it.
struct Scene {
    settings: Settings,
    bootstrap: String,
    clients: KafkaClients,
    codec: Arc<Codec>,
    producer: FutureProducer,
    root: CancellationToken,
}

impl Scene {
    /// `tweak` adjusts the settings (deadlines, ticks) before anything starts.
    async fn new(broker: &Broker, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings_with(None, broker.overrides());
        tweak(&mut settings);
        settings.validate().expect("valid settings");
        apply_topics(broker, &settings).await;
        let mut gateway = settings.gateway.clone();
        gateway.latency_ms = 1;
        let simulator = Simulator::bind(&gateway).await.expect("gateway");
        settings.payment.gateway_url = format!("http://{}", simulator.local_addr().expect("addr"));
        let root = CancellationToken::new();
        tokio::spawn(simulator.run(root.clone()));
        let bootstrap = broker.bootstrap();
        let clients = KafkaClients::new(&settings.kafka, &bootstrap);
        let producer: FutureProducer = clients
            .idempotent_producer("test")
            .create()
            .expect("producer");
        Self {
            settings,
            bootstrap,
            clients,
            codec: Arc::new(Codec::new().expect("codec")),
            producer,
            root,
        }
    }

    /// Writes `event` to orders.events, keyed by its customer.
    async fn send(&self, event: &OrderEvent) {
        let bytes = self.codec.encode(event).expect("encode");
        let key = &event.envelope().customer_id;
        write(&self.producer, names::ORDERS_EVENTS, key, &bytes).await;
    }

    async fn restock(&self, sku: &str, quantity: i32) {
        let bytes = self
            .codec
            .encode(&restocked(sku, quantity, now_ms()))
            .expect("encode");
        write(&self.producer, names::INVENTORY_COMMANDS, sku, &bytes).await;
    }

    /// Runs the named processors (all three by default) under a child of the root token.
    async fn run(&self, names: &[&str]) -> Running {
        let token = self.root.child_token();
        let tasks = run_some_processors(&self.settings, &self.bootstrap, &token, names).await;
        Running { token, tasks }
    }

    /// Reads orders.events afresh, from the start to its end, until `done` holds (or panics
    /// after two minutes); returns what the last read saw. A fresh read each time, because on
    /// Tansu a read that runs while records are written can pass over some of them for good
    /// (docs/architecture.md): what one read missed, the next finds.
    fn wait_for(&self, what: &str, done: impl Fn(&Log) -> bool) -> Log {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let mut reader = LogReader::new(&self.settings, &self.bootstrap);
            reader.poll_to_end(Duration::from_secs(60), what);
            if done(&reader.log) {
                return reader.log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after 120 s waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

const ALL_PROCESSORS: &[&str] = &["saga", "inventory", "payments"];

/// A thawed zombie's late state write never wins (docs/architecture.md, "Processor
/// state"): an order confirms; the processors restart (a new owner, generation 2, claims the
/// changelog); then a record of the first owner's generation lands in every saga changelog
/// partition, putting the order back in `Reserving` as a frozen instance would. The saga restarts
/// again, alone (no inventory processor: a canary order placed now waits in `Reserving` until its
/// deadline cancels it). Once the canary is cancelled the stale order's deadline has passed too,
/// and the confirmed order still has its one final event: the stale record was ignored.
async fn a_zombies_state_write_never_wins(broker: Broker) {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ =
            orderflow_platform::telemetry::init(&orderflow_platform::config::TelemetrySettings {
                filter: "info".into(),
                ..test_settings_with(None, &[]).telemetry
            });
    }
    let scene = Scene::new(&broker, |s| {
        s.saga.inventory_timeout_ms = 1500;
        s.processor.tick_ms = 100;
    })
    .await;
    let now = now_ms();
    scene.restock("SKU-Z", 10).await;
    let order = order_placed("customer-z", &[("SKU-Z", 1)], "tok_ok", now);
    let order_id = order.envelope.order_id.clone();
    scene.send(&OrderEvent::OrderPlaced(order.clone())).await;

    // First owner (generation 1): the order confirms.
    let first = scene.run(ALL_PROCESSORS).await;
    scene.wait_for("the order confirmed", |log| {
        log.outcome(&order_id) == Some("OrderConfirmed")
    });
    // Stopped before the next owner starts: on Tansu a member that joins while another is
    // still leaving its group could wait for an assignment that never came (seen here).
    first.stop().await;
    // Second owner (generation 2) restores and claims every partition. Its claims are written
    // before it processes anything; a canary order through the whole saga shows it is running.
    let second = scene.run(ALL_PROCESSORS).await;
    let canary = order_placed("customer-y", &[("SKU-Z", 1)], "tok_ok", now_ms());
    scene.send(&OrderEvent::OrderPlaced(canary.clone())).await;
    scene.wait_for("the canary confirmed", |log| {
        log.outcome(&canary.envelope.order_id) == Some("OrderConfirmed")
    });
    second.stop().await;

    // The zombie: generation 1 writes the order as it stood before the reservation answered,
    // and a position, to every saga changelog partition.
    let stale = OrderState {
        customer_id: "customer-z".into(),
        currency: order.currency.clone(),
        total_minor: order.total_minor,
        lines: vec![("SKU-Z".into(), 1)],
        payment_token: "tok_ok".into(),
        sequence: 4,
        since: now,
        stage: Stage::Reserving {
            request_id: uuid::Uuid::new_v4().to_string(),
            pending: [("SKU-Z".to_owned(), uuid::Uuid::new_v4().to_string())]
                .into_iter()
                .collect(),
            reserved: Default::default(),
            shortages: Vec::new(),
        },
        cancel_requested: None,
        timed_out_payment: None,
    };
    let stale = serde_json::to_vec(&stale).expect("json");
    for partition in 0..6 {
        for (key, value) in [
            (format!("o:{order_id}"), stale.clone()),
            // An old position: behind the state, as a frozen instance's would be.
            (POSITION_KEY.to_owned(), b"0".to_vec()),
        ] {
            let headers = OwnedHeaders::new().insert(Header {
                key: GENERATION_HEADER,
                value: Some("1"),
            });
            scene
                .producer
                .send(
                    FutureRecord::to(names::SAGA_CHANGELOG)
                        .partition(partition)
                        .key(&key)
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("changelog write: {e}"));
        }
    }

    // The saga alone: a new canary waits in Reserving and times out.
    let third = scene.run(&["saga"]).await;
    let timed_out = order_placed("customer-x", &[("SKU-Z", 1)], "tok_ok", now_ms());
    scene
        .send(&OrderEvent::OrderPlaced(timed_out.clone()))
        .await;
    scene.wait_for("the canary timed out", |log| {
        log.outcome(&timed_out.envelope.order_id) == Some("OrderCancelled")
    });
    // Any late event of the confirmed order too.
    third.stop().await;
    scene.root.cancel();
    let log = &scene.wait_for("the log", |_| true);
    assert!(log.conflicts.is_empty(), "conflicts: {:?}", log.conflicts);
    assert_eq!(
        log.finals.get(&order_id).map(|f| f.len()),
        Some(1),
        "the confirmed order has one final event: {:?}",
        log.path(&order_id)
    );
    assert_eq!(log.outcome(&order_id), Some("OrderConfirmed"));
    let kinds: Vec<&str> = log.by_order[&order_id]
        .values()
        .map(|e| e.kind().name())
        .collect();
    assert!(
        !kinds
            .iter()
            .any(|kind| *kind == "OrderStepTimedOut" || *kind == "InventoryReleased"),
        "nothing happened to the confirmed order: {kinds:?}"
    );
}

#[test]
fn a_zombies_state_write_never_wins_on_the_embedded_broker() {
    run_on(Broker::embedded(), a_zombies_state_write_never_wins);
}

/// Was ignored as flaky (2 of 5 runs): the second owner's saga never got an assignment. It
/// had started while the first owner's was still leaving the group, and Tansu then left the
/// joining member waiting. The test now stops each owner before the next starts (a restart,
/// as the scenario says); 6 of 6 runs passed after that, each in about 20 s.
#[test]
fn a_zombies_state_write_never_wins_on_tansu() {
    run_on(Broker::tansu(), a_zombies_state_write_never_wins);
}

/// Every order ends, whatever the gateway answers, each key on its own: a charge refused with
/// `422` is declined with the gateway's reason (stock released); one throttled with `429` is
/// retried and authorized; one whose every charge and void answers `409` ends at the saga's
/// payment deadline (stock released); and an ordinary order among them is confirmed.
async fn every_order_ends_whatever_the_gateway_answers(broker: Broker) {
    let scene = Scene::new(&broker, |s| {
        s.payment.payment_timeout_ms = 300;
        s.saga.payment_resend_ms = 600;
        s.saga.payment_deadline_ms = 4000;
        s.processor.tick_ms = 100;
    })
    .await;
    let now = now_ms();
    scene.restock("SKU-G", 100).await;
    let orders: Vec<_> = ["tok_invalid_1", "tok_throttle_1", "tok_busy_1", "tok_ok"]
        .iter()
        .enumerate()
        .map(|(i, token)| {
            order_placed(
                &format!("customer-g{i}"),
                &[("SKU-G", 1)],
                token,
                now + i as i64,
            )
        })
        .collect();
    for order in &orders {
        scene.send(&OrderEvent::OrderPlaced(order.clone())).await;
    }
    let processors = scene.run(ALL_PROCESSORS).await;
    scene.wait_for("every order final", |log| {
        orders
            .iter()
            .all(|o| log.outcome(&o.envelope.order_id).is_some())
    });
    let report = GatewayClient::new(
        &scene.settings.payment.gateway_url,
        &scene.settings.payment.tls,
    )
    .expect("gateway client")
    .report(Duration::from_secs(10))
    .await
    .expect("gateway report");
    processors.stop().await;
    scene.root.cancel();
    let log = &scene.wait_for("the log", |_| true);
    assert!(log.conflicts.is_empty(), "conflicts: {:?}", log.conflicts);
    let cancelled = |order: &orderflow_schemas::OrderPlaced| {
        log.by_order[&order.envelope.order_id]
            .values()
            .find_map(|e| match e {
                OrderEvent::OrderCancelled(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} not cancelled", order.payment_token))
    };
    let released = |order: &orderflow_schemas::OrderPlaced| {
        log.by_order[&order.envelope.order_id]
            .values()
            .any(|e| matches!(e, OrderEvent::InventoryReleased(_)))
    };
    let [invalid, throttled, busy, ordinary] = &orders[..] else {
        panic!("four orders");
    };
    let refused = cancelled(invalid);
    assert!(
        refused.reason.contains("refused by the payment gateway") && refused.reason.contains("422"),
        "{}",
        refused.reason
    );
    assert_eq!(refused.initiated_by, "payment");
    assert!(released(invalid), "the refused order's stock is released");
    assert_eq!(
        log.outcome(&throttled.envelope.order_id),
        Some("OrderConfirmed")
    );
    let timed_out = cancelled(busy);
    assert_eq!(timed_out.initiated_by, "timeout", "{}", timed_out.reason);
    assert!(timed_out.reason.contains("payment"), "{}", timed_out.reason);
    assert!(released(busy), "the timed-out order's stock is released");
    assert_eq!(
        log.outcome(&ordinary.envelope.order_id),
        Some("OrderConfirmed")
    );
    // Only the two confirmed orders were charged, once each.
    let charged: BTreeSet<String> = report
        .charges
        .iter()
        .inspect(|r| assert!(r.charges <= 1, "{} authorized twice", r.idempotency_key))
        .filter(|r| r.charges == 1)
        .map(|r| r.idempotency_key.clone())
        .collect();
    let confirmed: BTreeSet<String> = [throttled, ordinary]
        .iter()
        .map(|o| o.envelope.order_id.clone())
        .collect();
    assert_eq!(charged, confirmed);
}

#[test]
fn every_order_ends_whatever_the_gateway_answers_on_the_embedded_broker() {
    run_on(
        Broker::embedded(),
        every_order_ends_whatever_the_gateway_answers,
    );
}

#[test]
fn every_order_ends_whatever_the_gateway_answers_on_tansu() {
    run_on(
        Broker::tansu(),
        every_order_ends_whatever_the_gateway_answers,
    );
}

/// A reload's rules go through the log: published to every orders.events partition, they decide
/// the orders behind them, while the orders before them kept their outcome.
async fn rules_published_to_the_log_decide_from_there_on(broker: Broker) {
    let scene = Scene::new(&broker, |_| {}).await;
    scene.restock("SKU-R", 10).await;
    let processors = scene.run(ALL_PROCESSORS).await;
    let place = |customer: &str| order_placed(customer, &[("SKU-R", 1)], "tok_ok", now_ms());
    let before = place("customer-r1");
    scene.send(&OrderEvent::OrderPlaced(before.clone())).await;
    scene.wait_for("the first order confirmed", |log| {
        log.outcome(&before.envelope.order_id) == Some("OrderConfirmed")
    });

    // The reload: a model that rejects every order, published to the log.
    let mut strict = SagaRules::from_settings(&scene.settings);
    strict.fraud.review_threshold = 0.000_001;
    strict.fraud.reject_threshold = 0.000_001;
    let partitions = orderflow_processors::saga::rules::publish(
        &scene.clients,
        &scene.codec,
        names::ORDERS_EVENTS,
        &strict,
        now_ms(),
    )
    .await
    .expect("published");
    assert_eq!(partitions, 6);
    let after = place("customer-r2");
    scene.send(&OrderEvent::OrderPlaced(after.clone())).await;
    scene.wait_for("the second order final", |log| {
        log.outcome(&after.envelope.order_id).is_some()
    });
    processors.stop().await;
    scene.root.cancel();
    let log = &scene.wait_for("the log", |_| true);
    assert_eq!(log.outcome(&after.envelope.order_id), Some("OrderRejected"));
    assert_eq!(
        log.outcome(&before.envelope.order_id),
        Some("OrderConfirmed")
    );
    assert!(log.conflicts.is_empty(), "conflicts: {:?}", log.conflicts);
}

#[test]
fn rules_published_to_the_log_decide_from_there_on_on_the_embedded_broker() {
    run_on(
        Broker::embedded(),
        rules_published_to_the_log_decide_from_there_on,
    );
}

#[test]
fn rules_published_to_the_log_decide_from_there_on_on_tansu() {
    run_on(
        Broker::tansu(),
        rules_published_to_the_log_decide_from_there_on,
    );
}

/// A cancellation request for `order`, as the ingest edge writes it.
fn cancellation(order: &orderflow_schemas::OrderPlaced, round: u8) -> OrderEvent {
    OrderEvent::OrderCancellationRequested(orderflow_schemas::OrderCancellationRequested {
        envelope: orderflow_schemas::Envelope {
            event_id: uuid::Uuid::new_v4().to_string(),
            order_id: order.envelope.order_id.clone(),
            customer_id: order.envelope.customer_id.clone(),
            occurred_at: now_ms(),
            causation_id: None,
            sequence: 0,
            schema_version: 1,
        },
        reason: format!("round {round}"),
    })
}

/// Partitions move to a second saga instance and back: whatever the second one did to their
/// orders meanwhile is in the state the first restores when it gets them back (its assignment
/// epoch changed, so the state it held before is dropped). Orders are confirmed; a second
/// instance joins; every order is cancelled (refunded, released) — some by the second instance;
/// it leaves; a second cancellation of every order must then change nothing. A first instance
/// that kept its stale state would see those orders still confirmed and refund them again.
async fn a_partition_handed_back_brings_its_state(broker: Broker) {
    let scene = Scene::new(&broker, |_| {}).await;
    scene.restock("SKU-H", 1000).await;
    let processors = scene.run(ALL_PROCESSORS).await;
    let orders: Vec<_> = (0..24)
        .map(|i| {
            order_placed(
                &format!("customer-h{i}"),
                &[("SKU-H", 1)],
                "tok_ok",
                now_ms(),
            )
        })
        .collect();
    for order in &orders {
        scene.send(&OrderEvent::OrderPlaced(order.clone())).await;
    }
    scene.wait_for("every order confirmed", |log| {
        orders
            .iter()
            .all(|o| log.outcome(&o.envelope.order_id) == Some("OrderConfirmed"))
    });

    // A second saga instance joins the group and takes some partitions.
    let second = scene.root.child_token();
    let metrics = ProcessorMetrics::register(&MetricsRegistry::new(), ConsumerMetrics::default());
    let labels = ProcessorLabels {
        processor: "saga".to_owned(),
    };
    let mut instance = scene.settings.processor.clone();
    instance.instance_id = "second".into();
    let runtime = ProcessorRuntime::new(
        orderflow_processors::SAGA,
        orderflow_processors::saga_step(&scene.settings),
        scene.clients.clone(),
        &instance,
        scene.codec.clone(),
        metrics.clone(),
    );
    let running = tokio::spawn(runtime.run(second.clone()));
    // Once it handles inputs, the group has moved partitions to it: cancel every order (a
    // batch of cancellations until the second instance has handled some of them).
    let mut round = 0;
    eventually(
        Duration::from_secs(120),
        "the second instance at work",
        || {
            round += 1;
            let batch: Vec<OrderEvent> = orders.iter().map(|o| cancellation(o, 1)).collect();
            let scene = &scene;
            let handled = metrics.records.get_or_create(&labels).get();
            async move {
                if handled > 0 {
                    return Some(());
                }
                for event in batch {
                    scene.send(&event).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        },
    )
    .await;
    scene.wait_for("every order cancelled", |log| {
        orders.iter().all(|o| {
            log.by_order[&o.envelope.order_id]
                .values()
                .any(|e| matches!(e, OrderEvent::OrderCancelled(_)))
        })
    });
    // It leaves; its partitions go back to the first instance.
    second.cancel();
    running.await.expect("second instance stops");

    // Cancel every order again, then place one more order per customer behind it: once those
    // are confirmed, the first instance has handled the second cancellations.
    for order in &orders {
        scene.send(&cancellation(order, 2)).await;
    }
    let markers: Vec<_> = (0..24)
        .map(|i| {
            order_placed(
                &format!("customer-h{i}"),
                &[("SKU-H", 1)],
                "tok_ok",
                now_ms(),
            )
        })
        .collect();
    for order in &markers {
        scene.send(&OrderEvent::OrderPlaced(order.clone())).await;
    }
    scene.wait_for("the markers confirmed", |log| {
        markers
            .iter()
            .all(|o| log.outcome(&o.envelope.order_id) == Some("OrderConfirmed"))
    });
    processors.stop().await;
    scene.root.cancel();
    let log = &scene.wait_for("the log", |_| true);
    assert!(log.conflicts.is_empty(), "conflicts: {:?}", log.conflicts);
    assert!(
        metrics.records.get_or_create(&labels).get() > 0,
        "the second instance handled some partitions"
    );
    for order in &orders {
        let id = &order.envelope.order_id;
        let kinds: Vec<&str> = log.by_order[id].values().map(|e| e.kind().name()).collect();
        let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
        assert_eq!(
            count("PaymentRefundRequested"),
            1,
            "{id}: refunded once: {kinds:?}"
        );
        assert_eq!(
            count("OrderCancelled"),
            1,
            "{id}: cancelled once: {kinds:?}"
        );
        assert_eq!(
            log.finals[id].len(),
            2,
            "{id}: confirmed, then cancelled: {kinds:?}"
        );
    }
}

#[test]
fn a_partition_handed_back_brings_its_state_on_the_embedded_broker() {
    run_on(Broker::embedded(), a_partition_handed_back_brings_its_state);
}

#[test]
fn a_partition_handed_back_brings_its_state_on_tansu() {
    run_on(Broker::tansu(), a_partition_handed_back_brings_its_state);
}

/// A restarted processor restores every record of its changelog's last message set. Without a
/// transaction a batch's state changes go out as one message set per partition, the position
/// record last; Tansu's memory engine reports as high watermark the offset after that set's
/// *first* record, and a restore that stopped at the high watermark lost the rest of the set —
/// its position record included, so the whole batch, or the whole state when the batch was the
/// partition's first (the crash tests without transactions re-scored orders from an empty
/// state). Here the state is written as a processor writes it: SKU-L has 3 units and nothing of
/// the input is applied yet, in one message set per partition. A reservation of 2 units must be
/// granted from those 3; a restore that kept only the first record would know no stock and
/// refuse it.
async fn a_restore_reads_the_last_message_set_whole(broker: Broker) {
    let scene = Scene::new(&broker, |_| {}).await;
    let changelog: FutureProducer = scene
        .clients
        .changelog_producer("test")
        .create()
        .expect("producer");
    let mut deliveries = Vec::new();
    for partition in 0..6 {
        for (key, value) in [
            ("s:SKU-L", r#"{"available":3}"#),
            ("s:SKU-OTHER", r#"{"available":7}"#),
            (POSITION_KEY, "0"),
        ] {
            let record = FutureRecord::to(names::INVENTORY_CHANGELOG)
                .partition(partition)
                .key(key)
                .payload(value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: GENERATION_HEADER,
                    value: Some("1"),
                }));
            deliveries.push(
                changelog
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
    }
    changelog.flush(Duration::from_secs(30)).expect("flushed");
    for delivery in deliveries {
        delivery.await.expect("delivered").expect("written");
    }

    let processors = scene.run(&["inventory"]).await;
    let order_id = uuid::Uuid::new_v4().to_string();
    let request = OrderEvent::InventoryReservationRequested(
        orderflow_schemas::InventoryReservationRequested {
            envelope: envelope(
                uuid::Uuid::new_v4().to_string(),
                order_id.clone(),
                "customer-l".to_owned(),
                now_ms(),
            ),
            lines: vec![orderflow_schemas::SkuQuantity {
                sku: "SKU-L".to_owned(),
                quantity: 2,
            }],
        },
    );
    let bytes = scene.codec.encode(&request).expect("encode");
    write(&scene.producer, names::INVENTORY_COMMANDS, "SKU-L", &bytes).await;
    let log = scene.wait_for("the inventory's answer", |log| {
        log.by_order.get(&order_id).is_some_and(|e| !e.is_empty())
    });
    processors.stop().await;
    scene.root.cancel();
    let answers: Vec<&OrderEvent> = log.by_order[&order_id].values().collect();
    match answers.as_slice() {
        [OrderEvent::InventoryLineReserved(reserved)] => {
            assert_eq!(
                (reserved.quantity, reserved.available_after),
                (2, 1),
                "granted from the restored 3 units"
            );
        }
        other => panic!("expected the 2 units reserved from the restored 3, got {other:?}"),
    }
}

#[test]
fn a_restore_reads_the_last_message_set_whole_on_the_embedded_broker() {
    run_on(
        Broker::embedded(),
        a_restore_reads_the_last_message_set_whole,
    );
}

#[test]
fn a_restore_reads_the_last_message_set_whole_on_tansu() {
    run_on(Broker::tansu(), a_restore_reads_the_last_message_set_whole);
}
