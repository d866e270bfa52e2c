//! The crash test: the broker and the processors run as separate OS processes; the processor
//! process is SIGKILLed at random moments, again and again, while 10 000 orders flow, and
//! restarted. Afterwards the test reads the log itself (not the projections) and checks:
//!
//! - every order ended confirmed, rejected or cancelled, with exactly one final event;
//! - the distinct events of each order form one valid saga path, numbered 1..n;
//! - an event id that appears more than once is byte-identical each time (a re-emission);
//! - stock never went negative, and what is left is the restocks minus what confirmed orders
//!   hold (every other reservation was released);
//! - the gateway saw exactly one successful charge per confirmed order and none standing for
//!   the others.
//!
//! On the in-process broker (`orderflow broker` in its own process) and on Tansu.
//! `CRASH_TEST_ORDERS` changes the number of orders (default 10 000).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_gateway::{simulator::Simulator, GatewayClient};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::{
    Address, Codec, Envelope, InventoryRestocked, OrderEvent, OrderLine, OrderPlaced,
};
use orderflow_testkit::{apply_topics, test_settings, Broker};
use orderflow_topics::names;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    producer::{FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const SKUS: usize = 20;
/// Units per SKU: less than the demand, so stock runs out and orders are rejected for it.
const STOCK: i32 = 600;

fn order_count() -> usize {
    std::env::var("CRASH_TEST_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// `orderflow broker` in its own process; killed on drop.
struct BrokerProcess(Child, String);

impl BrokerProcess {
    fn start() -> Self {
        let mut child = Command::new(BIN)
            .args(["--set", "telemetry.listen=\"127.0.0.1:0\"", "broker"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("orderflow broker starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let bootstrap = lines
            .next()
            .and_then(Result::ok)
            .expect("orderflow broker prints its address first");
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self(child, bootstrap.trim().to_owned())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `orderflow process` in its own process.
fn start_processor(bootstrap: &str, gateway: &str) -> Child {
    Command::new(BIN)
        .args([
            "--kafka-brokers",
            bootstrap,
            "--set",
            "telemetry.listen=\"127.0.0.1:0\"",
            "--set",
            &format!("payment.gateway_url={gateway:?}"),
            // A stable identity: a restarted instance fences its predecessor where the broker
            // supports it (Tansu).
            "--set",
            "processor.instance_id=\"crash\"",
            // A killed member holds its partitions until its session times out: keep it short.
            "--set",
            "kafka.session_timeout_ms=3000",
            "process",
        ])
        .env_remove("RUST_LOG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("orderflow process starts")
}

fn envelope(event_id: String, order_id: String, customer_id: String, at: i64) -> Envelope {
    Envelope {
        event_id,
        order_id,
        customer_id,
        occurred_at: at,
        causation_id: None,
        sequence: 0,
        schema_version: 1,
    }
}

/// Orders of 1–2 lines over the SKU pool; some pay with a token the gateway declines.
fn orders(n: usize, now: i64) -> Vec<OrderPlaced> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..n)
        .map(|i| {
            let mut skus: Vec<usize> = (0..rng.random_range(1..=2))
                .map(|_| rng.random_range(0..SKUS))
                .collect();
            skus.sort_unstable();
            skus.dedup();
            let lines: Vec<OrderLine> = skus
                .iter()
                .map(|s| OrderLine {
                    sku: format!("SKU-{s:03}"),
                    quantity: rng.random_range(1..=2),
                    unit_price_minor: 500,
                })
                .collect();
            let subtotal: i64 = lines
                .iter()
                .map(|l| i64::from(l.quantity) * l.unit_price_minor)
                .sum();
            let mut e = envelope(
                uuid::Uuid::new_v4().to_string(),
                uuid::Uuid::new_v4().to_string(),
                format!("customer-{}", i % (n / 2).max(1)),
                now + i as i64,
            );
            e.sequence = 1;
            OrderPlaced {
                envelope: e,
                currency: "EUR".into(),
                lines,
                shipping_address: Address {
                    name: "Test".into(),
                    line1: "1 Road".into(),
                    line2: None,
                    city: "Town".into(),
                    postal_code: "12345".into(),
                    country: "DE".into(),
                },
                payment_token: if i % 10 == 3 {
                    "tok_decline_crash".into()
                } else {
                    "tok_ok".into()
                },
                subtotal_minor: subtotal,
                shipping_minor: 0,
                tax_minor: 0,
                total_minor: subtotal,
            }
        })
        .collect()
}

/// Everything read from orders.events so far: payloads by event id, events by order.
#[derive(Default)]
struct Log {
    bytes: HashMap<String, Vec<u8>>,
    conflicts: Vec<String>,
    by_order: HashMap<String, BTreeMap<String, OrderEvent>>,
    finals: HashMap<String, BTreeSet<String>>,
}

impl Log {
    fn add(&mut self, codec: &Codec, payload: &[u8]) {
        let Ok(event) = codec.decode(payload) else {
            return;
        };
        let envelope = event.envelope().clone();
        match self.bytes.get(&envelope.event_id) {
            Some(first) if first != payload => {
                self.conflicts
                    .push(format!("{} ({})", envelope.event_id, event.kind().name()))
            }
            Some(_) => return,
            None => {
                self.bytes
                    .insert(envelope.event_id.clone(), payload.to_vec());
            }
        }
        if matches!(
            event,
            OrderEvent::OrderConfirmed(_)
                | OrderEvent::OrderRejected(_)
                | OrderEvent::OrderCancelled(_)
        ) {
            self.finals
                .entry(envelope.order_id.clone())
                .or_default()
                .insert(envelope.event_id.clone());
        }
        self.by_order
            .entry(envelope.order_id)
            .or_default()
            .insert(envelope.event_id, event);
    }
}

fn reader(settings: &Settings, bootstrap: &str) -> BaseConsumer {
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let consumer: BaseConsumer = clients
        .consumer("crash-reader", &format!("crash-{}", uuid::Uuid::new_v4()))
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition_offset(names::ORDERS_EVENTS, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

fn poll_into(consumer: &BaseConsumer, codec: &Codec, log: &mut Log, for_at_most: Duration) {
    let until = Instant::now() + for_at_most;
    while Instant::now() < until {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            log.add(codec, message.payload().unwrap_or_default());
        }
    }
}

/// Reservations still held by orders whose final event is not `OrderConfirmed`.
fn unreleased(log: &Log) -> Vec<(String, String, i64)> {
    let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (order_id, events) in &log.by_order {
        if events
            .values()
            .any(|e| matches!(e, OrderEvent::OrderConfirmed(_)))
        {
            continue;
        }
        for event in events.values() {
            match event {
                OrderEvent::InventoryLineReserved(r) => {
                    *held.entry((order_id.clone(), r.sku.clone())).or_default() +=
                        i64::from(r.quantity)
                }
                OrderEvent::InventoryLineReleased(r) => {
                    *held.entry((order_id.clone(), r.sku.clone())).or_default() -=
                        i64::from(r.quantity)
                }
                _ => {}
            }
        }
    }
    held.into_iter()
        .filter(|(_, units)| *units != 0)
        .map(|((order, sku), units)| (order, sku, units))
        .collect()
}

/// The valid paths: the distinct timeline kinds of an order, in sequence order.
fn valid_paths() -> Vec<Vec<&'static str>> {
    let head = ["OrderPlaced", "OrderValidated", "FraudScored"];
    let reserve = ["InventoryReservationRequested"];
    let with = |parts: &[&[&'static str]]| parts.concat();
    vec![
        with(&[
            &head,
            &reserve,
            &[
                "InventoryReserved",
                "PaymentRequested",
                "PaymentAuthorized",
                "OrderConfirmed",
            ],
        ]),
        with(&[
            &head,
            &reserve,
            &[
                "InventoryReserved",
                "PaymentRequested",
                "PaymentDeclined",
                "InventoryReleased",
                "OrderCancelled",
            ],
        ]),
        with(&[&head, &reserve, &["InventoryRejected", "OrderRejected"]]),
        with(&[
            &head,
            &reserve,
            &["InventoryRejected", "InventoryReleased", "OrderRejected"],
        ]),
        with(&[&head, &["OrderRejected"]]),
        // The inventory step's deadline passed (a processor down for longer than it).
        with(&[&head, &reserve, &["InventoryReleased", "OrderCancelled"]]),
    ]
}

async fn crash_test(broker_name: &str, bootstrap: String, settings: Settings) {
    let n = order_count();
    let codec = Codec::new().expect("codec");

    // The gateway: in this process (the processors are what gets killed).
    let mut gateway_settings = settings.gateway.clone();
    gateway_settings.listen = "127.0.0.1:0".parse().expect("addr");
    gateway_settings.latency_ms = 1;
    let simulator = Simulator::bind(&gateway_settings).await.expect("gateway");
    let gateway_url = format!("http://{}", simulator.local_addr().expect("addr"));
    let stop_gateway = tokio_util::sync::CancellationToken::new();
    tokio::spawn(simulator.run(stop_gateway.clone()));

    // Stock, then the orders, straight onto the topics.
    let clients = KafkaClients::new(&settings.kafka, &bootstrap);
    let producer: FutureProducer = clients
        .idempotent_producer("crash-test")
        .create()
        .expect("producer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    for s in 0..SKUS {
        let id = uuid::Uuid::new_v4().to_string();
        let sku = format!("SKU-{s:03}");
        let event = OrderEvent::InventoryRestocked(InventoryRestocked {
            envelope: envelope(id.clone(), id, String::new(), now),
            sku: sku.clone(),
            quantity: STOCK,
            source: "crash test".into(),
        });
        let bytes = codec.encode(&event).expect("encode");
        producer
            .send(
                FutureRecord::to(names::INVENTORY_COMMANDS)
                    .key(&sku)
                    .payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .expect("restock written");
    }
    let placed = orders(n, now);
    let mut deliveries = Vec::with_capacity(n);
    for order in &placed {
        let bytes = codec
            .encode(&OrderEvent::OrderPlaced(order.clone()))
            .expect("encode");
        loop {
            let record = FutureRecord::to(names::ORDERS_EVENTS)
                .key(&order.envelope.customer_id)
                .payload(&bytes);
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                // The local queue is full: let it drain.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in deliveries {
        d.await.expect("delivered").expect("order written");
    }

    // Run the processors, killing them at random moments until every order is final.
    let consumer = reader(&settings, &bootstrap);
    let mut log = Log::default();
    let mut rng = StdRng::seed_from_u64(11);
    let mut processor = start_processor(&bootstrap, &gateway_url);
    let mut kills = 0;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(3000..8000));
    loop {
        poll_into(&consumer, &codec, &mut log, Duration::from_millis(200));
        let done = placed
            .iter()
            .all(|o| log.finals.contains_key(&o.envelope.order_id));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{broker_name}: only {} of {n} orders final after {kills} kills",
            log.finals.len()
        );
        if Instant::now() >= next_kill && kills < 40 {
            processor.kill().expect("SIGKILL");
            processor.wait().expect("reaped");
            kills += 1;
            processor = start_processor(&bootstrap, &gateway_url);
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(3000..8000));
        }
    }
    // A final order's compensations (stock releases) are answered by the inventory after the
    // saga's final event: let the processor finish them — until every reservation of an order
    // that did not confirm is released, or the deadline (then the checks below name the rest).
    let settle = Instant::now() + Duration::from_secs(120);
    while Instant::now() < settle && !unreleased(&log).is_empty() {
        poll_into(&consumer, &codec, &mut log, Duration::from_millis(500));
    }
    // And the last batches' re-emissions.
    poll_into(&consumer, &codec, &mut log, Duration::from_secs(2));
    processor.kill().expect("SIGKILL");
    processor.wait().expect("reaped");
    poll_into(&consumer, &codec, &mut log, Duration::from_secs(1));
    eprintln!(
        "{broker_name}: {n} orders final in {:.1} s with {kills} SIGKILLs",
        started.elapsed().as_secs_f64()
    );
    assert!(
        kills >= 3,
        "{broker_name}: the run was too short to kill the processor"
    );

    // Re-emissions are byte-identical.
    assert!(
        log.conflicts.is_empty(),
        "{broker_name}: conflicting events: {:?}",
        log.conflicts
    );

    // One final event per order, one valid path, sequences 1..n.
    let paths = valid_paths();
    let mut confirmed = BTreeSet::new();
    let mut confirmed_units: BTreeMap<String, i64> = BTreeMap::new();
    for order in &placed {
        let id = &order.envelope.order_id;
        assert_eq!(
            log.finals[id].len(),
            1,
            "{broker_name}: {id} has several final events"
        );
        let events = &log.by_order[id];
        let mut timeline: Vec<(i64, &'static str)> = events
            .values()
            .filter(|e| e.envelope().sequence > 0)
            .map(|e| (e.envelope().sequence, e.kind().name()))
            .collect();
        timeline.sort();
        let kinds: Vec<&str> = timeline.iter().map(|(_, k)| *k).collect();
        assert!(
            paths.contains(&kinds),
            "{broker_name}: {id} took no valid path: {kinds:?}"
        );
        let sequences: Vec<i64> = timeline.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            sequences,
            (1..=sequences.len() as i64).collect::<Vec<_>>(),
            "{broker_name}: {id}"
        );
        if kinds.last() == Some(&"OrderConfirmed") {
            confirmed.insert(id.clone());
            for line in &order.lines {
                *confirmed_units.entry(line.sku.clone()).or_default() += i64::from(line.quantity);
            }
        }
    }

    // Stock: never negative; what is left is the restocks minus what confirmed orders hold.
    let mut reserved: BTreeMap<String, i64> = BTreeMap::new();
    let mut holding: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (order_id, events) in &log.by_order {
        for event in events.values() {
            match event {
                OrderEvent::InventoryLineReserved(r) => {
                    *holding
                        .entry((r.sku.clone(), order_id.clone()))
                        .or_default() += i64::from(r.quantity)
                }
                OrderEvent::InventoryLineReleased(r) => {
                    *holding
                        .entry((r.sku.clone(), order_id.clone()))
                        .or_default() -= i64::from(r.quantity)
                }
                _ => {}
            }
        }
    }
    let stuck: Vec<String> = holding
        .iter()
        .filter(|((_, order_id), held)| **held != 0 && !confirmed.contains(order_id))
        .map(|((sku, order_id), held)| {
            let mut kinds: Vec<(i64, &str, String)> = log.by_order[order_id]
                .values()
                .map(|e| {
                    (
                        e.envelope().sequence,
                        e.kind().name(),
                        e.envelope().event_id.clone(),
                    )
                })
                .collect();
            kinds.sort();
            format!("{order_id} holds {held} of {sku}: {kinds:?}")
        })
        .collect();
    for events in log.by_order.values() {
        for event in events.values() {
            match event {
                OrderEvent::InventoryLineReserved(r) => {
                    assert!(r.available_after >= 0, "{broker_name}: stock went negative");
                    *reserved.entry(r.sku.clone()).or_default() += i64::from(r.quantity);
                }
                OrderEvent::InventoryLineReleased(r) => {
                    *reserved.entry(r.sku.clone()).or_default() -= i64::from(r.quantity);
                }
                _ => {}
            }
        }
    }
    for s in 0..SKUS {
        let sku = format!("SKU-{s:03}");
        let held = reserved.get(&sku).copied().unwrap_or(0);
        let sold = confirmed_units.get(&sku).copied().unwrap_or(0);
        assert_eq!(
            held, sold,
            "{broker_name}: {sku}: reservations left {held}, confirmed {sold}; not released: {stuck:#?}"
        );
        assert!(
            sold <= i64::from(STOCK),
            "{broker_name}: {sku} oversold: {sold}"
        );
    }
    assert!(
        confirmed.len() < n && !confirmed.is_empty(),
        "{broker_name}: the run should confirm some orders and reject or cancel others"
    );

    // The gateway: one standing charge per confirmed order, none for the others.
    let report = GatewayClient::new(&gateway_url)
        .report(Duration::from_secs(10))
        .await
        .expect("gateway report");
    let mut charged = BTreeSet::new();
    for record in &report.charges {
        assert!(
            record.charges <= 1,
            "{broker_name}: {} charged twice",
            record.idempotency_key
        );
        if record.status == "authorized" {
            charged.insert(record.idempotency_key.clone());
        }
    }
    assert_eq!(
        charged, confirmed,
        "{broker_name}: standing charges differ from confirmed orders"
    );
    stop_gateway.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_again_and_again_on_the_in_process_broker() {
    let broker = BrokerProcess::start();
    let settings = test_settings(None);
    crash_test("in-process broker", broker.1.clone(), settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_again_and_again_on_tansu() {
    let Some(broker) = Broker::tansu() else {
        return;
    };
    let settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    crash_test("tansu", broker.bootstrap(), settings).await;
}
