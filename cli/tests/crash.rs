//! The crash tests: the broker and the processors run as separate OS processes, and the
//! processors are disturbed while thousands of orders flow:
//!
//! - **kill**: one processor process SIGKILLed at random moments, again and again, and
//!   restarted (10 000 orders with transactions, 4 000 without), under the same instance id —
//!   and once more with no stable instance id, the default, where every restart is a new
//!   transactional id that fences nothing;
//! - **rebalance**: instances join and leave (gracefully or killed) mid-stream (8 000 orders);
//! - **freeze-thaw**: a processor frozen with SIGSTOP past its session and transaction
//!   timeouts while a successor takes over, then thawed to run alongside it as a zombie.
//!
//! Once every order is final, every processor is killed and restarted once more, and the run
//! goes on past the longest saga deadline that can fire here (`LATE_WINDOW`): a restore that
//! brought back stale state would cancel or release something now, and the checks below would
//! see a second final event or a conflicting one.
//!
//! Afterwards the test reads the log itself (not the projections), every record ever written
//! (`read_uncommitted`: zombies' and aborted transactions' records too), and checks:
//!
//! - every order ended confirmed, rejected or cancelled, with exactly one final event;
//! - the distinct events of each order form one valid saga path, numbered 1..n;
//! - an event id that appears more than once is byte-identical each time (a re-emission, never
//!   a second outcome: a zombie changed nothing its successor decided);
//! - stock never went negative, and what is left is the restocks minus what confirmed orders
//!   hold (every other reservation was released);
//! - the gateway saw exactly one successful charge per confirmed order and none standing for
//!   the others.
//!
//! Every scenario runs on the embedded broker (`orderflow broker --data DIR`, no transactions)
//! and in both commit modes on the memory-only Tansu — with transactions, and with
//! `kafka.transactions = off` — where the processors run as orderflow runs there
//! (`Broker::overrides`: `read_uncommitted`, and offset gaps read twice, since that Tansu can
//! serve a record before an earlier one is readable). The runs without transactions found two
//! faults that the transactional runs hid, both fixed: restores that stopped at the memory-only
//! Tansu's short high watermark (docs/architecture.md), and the embedded broker's SQLite log
//! scanning its whole header table for every record fetched, until it stopped answering
//! (`orderflow_broker::schema`). Each run checks that every log it reads still starts at
//! offset 0.
//! `CRASH_TEST_ORDERS` changes the number of orders.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_gateway::{simulator::Simulator, GatewayClient};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::{Codec, OrderEvent, OrderPlaced};
use orderflow_testkit::{
    apply_topics,
    log::{now_ms, order_placed, restocked, Log, LogReader},
    test_settings, Broker, BrokerProcess, TempDir, TANSU_OVERRIDES,
};
use orderflow_topics::names;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const SKUS: usize = 20;
/// Units per SKU: less than the demand, so stock runs out and orders are rejected for it.
const STOCK: i32 = 600;
/// How long the processors keep running after the last restart: past `saga.inventory_timeout_ms`
/// (30 s, the longest deadline an order of these runs can be waiting on; payments are answered
/// long before their deadline) and a few timer ticks.
const LATE_WINDOW: Duration = Duration::from_secs(35);

/// `orderflow process` in its own process, as instance `instance` (its transactional ids).
fn start_processor(
    bootstrap: &str,
    gateway: &str,
    instance: &str,
    extra: &[(&str, &str)],
) -> Child {
    let mut command = Command::new(BIN);
    command.args([
        "--kafka-brokers",
        bootstrap,
        "--set",
        "telemetry.listen=\"127.0.0.1:0\"",
        "--set",
        &format!("payment.gateway_url={gateway:?}"),
        "--set",
        &format!("processor.instance_id={instance:?}"),
        // A killed member holds its partitions until its session times out: keep it short.
        "--set",
        "kafka.session_timeout_ms=3000",
    ]);
    for (key, value) in extra {
        command.args(["--set", &format!("{key}={value}")]);
    }
    // `CRASH_TEST_LOGS=DIR` keeps every processor's log (info level) in DIR, for diagnosis.
    let (level, stderr) = match std::env::var_os("CRASH_TEST_LOGS") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(format!(
                "{instance}-{}.log",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default()
            ));
            let file = std::fs::File::create(&path).expect("log file");
            ("info", Stdio::from(file))
        }
        None => ("warn", Stdio::null()),
    };
    command
        .arg("process")
        .env_remove("RUST_LOG")
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("orderflow process starts")
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// SIGTERM, then wait for a graceful exit (SIGKILL after 30 s).
fn stop_gracefully(mut child: Child) {
    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

/// What happens to the processor processes while the orders flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// One instance, SIGKILLed every 3–8 s and restarted under the same identity.
    Kill,
    /// As `Kill`, but with no stable `processor.instance_id` (the default): every start is a
    /// new random transactional id, so nothing fences the killed one's open transaction.
    KillWithoutInstanceId,
    /// Instance `a` stays; `b` and `c` join, leave (SIGTERM) or crash and restart (SIGKILL)
    /// every 3–8 s.
    Rebalance,
    /// The running instance is frozen (SIGSTOP) past its session and transaction timeouts, a
    /// successor starts, then the frozen one is thawed and runs alongside before it leaves.
    FreezeThaw,
}

impl Scenario {
    /// Orders of a run. The runs without transactions (the embedded broker, and the second
    /// mode on the memory-only Tansu) get fewer: enough for every disturbance to land
    /// mid-stream, less CI time.
    fn orders(self, embedded: bool, without_transactions: bool) -> usize {
        let default = match self {
            _ if embedded || without_transactions => 4_000,
            Self::Kill => 10_000,
            Self::KillWithoutInstanceId => 4_000,
            Self::Rebalance => 8_000,
            Self::FreezeThaw => 5_000,
        };
        std::env::var("CRASH_TEST_ORDERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Time between actions, ms. Membership changes come quicker than kills: each one moves
    /// partitions, and the run must see several before the orders are through.
    fn interval(self) -> std::ops::Range<u64> {
        match self {
            Self::Kill | Self::KillWithoutInstanceId => 3000..8000,
            Self::Rebalance => 1500..4000,
            Self::FreezeThaw => 1500..3000,
        }
    }

    /// Actions a run must have done to count: three kills or membership changes, or one whole
    /// freeze → thaw episode.
    fn min_actions(self) -> usize {
        match self {
            Self::Kill | Self::KillWithoutInstanceId | Self::Rebalance => 3,
            Self::FreezeThaw => 2,
        }
    }

    /// After this many actions the processors are left alone to finish.
    fn max_actions(self) -> usize {
        match self {
            // Until every order is final (the deadline bounds it). Tansu never times out a
            // transaction a killed process left open; the restart's init_transactions under the
            // same id ends it.
            Self::Kill | Self::KillWithoutInstanceId => usize::MAX,
            Self::Rebalance => 20,
            // Three freeze → thaw → leave cycles.
            Self::FreezeThaw => 9,
        }
    }

    /// Settings every processor of the scenario runs with.
    fn extra(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // Frozen for 9 s: past the session (3 s) and transaction (5 s) timeouts.
            Self::FreezeThaw => &[("kafka.transaction_timeout_ms", "5000")],
            Self::Kill | Self::KillWithoutInstanceId | Self::Rebalance => &[],
        }
    }
}

/// The processor processes of one run, driven by a [`Scenario`].
struct Fleet {
    scenario: Scenario,
    /// The broker is Tansu: processors read `read_uncommitted`, as orderflow runs there.
    tansu: bool,
    /// Processors run with `kafka.transactions = off`.
    without_transactions: bool,
    bootstrap: String,
    gateway: String,
    rng: StdRng,
    /// Running (possibly frozen) processes by instance id.
    members: BTreeMap<String, Child>,
    frozen: Option<String>,
    /// Members that are thawed zombies, to be stopped at the next step.
    thawed: Option<String>,
    next_at: Instant,
    /// Final orders seen at the last action, for the kills' pace (see [`Fleet::step`]).
    finals_at_last_action: usize,
    started: usize,
    /// Kills, joins, leaves, freezes: what the scenario did.
    actions: usize,
}

impl Drop for Fleet {
    /// A failed run leaves no processor behind (a frozen one is thawed first, so it can die).
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.members) {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Fleet {
    fn new(
        scenario: Scenario,
        bootstrap: &str,
        gateway: &str,
        tansu: bool,
        without_transactions: bool,
    ) -> Self {
        let mut fleet = Self {
            scenario,
            tansu,
            without_transactions,
            bootstrap: bootstrap.to_owned(),
            gateway: gateway.to_owned(),
            rng: StdRng::seed_from_u64(11),
            members: BTreeMap::new(),
            frozen: None,
            thawed: None,
            next_at: Instant::now(),
            finals_at_last_action: 0,
            started: 0,
            actions: 0,
        };
        let first = match scenario {
            Scenario::Kill | Scenario::KillWithoutInstanceId => "crash".to_owned(),
            Scenario::Rebalance => "a".to_owned(),
            Scenario::FreezeThaw => fleet.fresh_id(),
        };
        fleet.start(&first);
        fleet.schedule(scenario.interval());
        fleet
    }

    fn fresh_id(&mut self) -> String {
        format!("instance-{}", self.started)
    }

    fn start(&mut self, instance: &str) {
        self.started += 1;
        let mut extra = self.scenario.extra().to_vec();
        if self.tansu {
            // As orderflow runs on Tansu (platform/src/default.toml, kafka.isolation_level and
            // kafka.recheck_offset_gaps).
            extra.extend_from_slice(TANSU_OVERRIDES);
        }
        if self.without_transactions {
            extra.push(("kafka.transactions", "\"off\""));
        }
        // Without a stable instance id the process picks a random one at every start.
        let id = match self.scenario {
            Scenario::KillWithoutInstanceId => "",
            _ => instance,
        };
        let child = start_processor(&self.bootstrap, &self.gateway, id, &extra);
        self.members.insert(instance.to_owned(), child);
    }

    fn schedule(&mut self, millis: std::ops::Range<u64>) {
        self.next_at = Instant::now() + Duration::from_millis(self.rng.random_range(millis));
    }

    /// Does the scenario's next thing if it is due: at its time, or, for the kills, once
    /// another `1 / (min_actions + 1)` of the `orders` became final since the last action
    /// (`finals` so far). A pipeline fast enough to finish the orders between two timed kills
    /// still gets its minimum of kills mid-stream, each after the restarted processor made
    /// progress, whatever the machine's speed.
    fn step(&mut self, finals: usize, orders: usize) {
        let kills = matches!(
            self.scenario,
            Scenario::Kill | Scenario::KillWithoutInstanceId
        );
        let share = orders / (self.scenario.min_actions() + 1);
        let paced = kills && finals >= self.finals_at_last_action + share.max(1);
        if (Instant::now() < self.next_at && !paced) || self.actions >= self.scenario.max_actions()
        {
            return;
        }
        self.finals_at_last_action = finals;
        match self.scenario {
            Scenario::Kill | Scenario::KillWithoutInstanceId => {
                let child = self.members.remove("crash").expect("running");
                kill(child);
                self.start("crash");
                self.schedule(3000..8000);
            }
            Scenario::Rebalance => {
                let id = if self.rng.random_bool(0.5) { "b" } else { "c" };
                match self.members.remove(id) {
                    // Leaves for good: gracefully (its batch committed or aborted, the group
                    // left), as a scale-down does.
                    Some(child) if self.rng.random_bool(0.5) => stop_gracefully(child),
                    // Crashes and comes back under its identity, as a StatefulSet pod does:
                    // its init aborts the transaction it left open. (One that never came back
                    // would leave it open for good on Tansu, which has no transaction timeout,
                    // and block `read_committed` readers of its partitions: docs/architecture.md.)
                    Some(child) => {
                        kill(child);
                        self.start(id);
                    }
                    None => self.start(id),
                }
                self.schedule(Scenario::Rebalance.interval());
            }
            Scenario::FreezeThaw => {
                if let Some(id) = self.thawed.take() {
                    // The thawed zombie ran alongside its successor; now it leaves.
                    let child = self.members.remove(&id).expect("thawed member");
                    stop_gracefully(child);
                    // The successor alone for a while: joining a group takes seconds on Tansu.
                    self.schedule(8000..15000);
                } else if let Some(id) = self.frozen.take() {
                    signal(&self.members[&id], "CONT");
                    self.thawed = Some(id);
                    self.schedule(3000..6000);
                } else {
                    let (id, child) = self.members.iter().next().expect("one running");
                    signal(child, "STOP");
                    self.frozen = Some(id.clone());
                    let successor = self.fresh_id();
                    self.start(&successor);
                    self.next_at = Instant::now() + Duration::from_secs(9);
                }
            }
        }
        self.actions += 1;
    }

    /// Thaws a frozen member, so that every member can finish its work.
    fn thaw(&mut self) {
        if let Some(id) = self.frozen.take() {
            signal(&self.members[&id], "CONT");
        }
    }

    /// Kills every member and starts it again (under its id): one more restore of every
    /// partition, after the run.
    fn restart_all(&mut self) {
        self.thaw();
        self.thawed = None;
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            if let Some(child) = self.members.remove(&id) {
                kill(child);
            }
            self.start(&id);
        }
    }

    fn stop(mut self) {
        self.thaw();
        for child in std::mem::take(&mut self.members).into_values() {
            kill(child);
        }
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
            let lines: Vec<(String, i32)> = skus
                .iter()
                .map(|s| (format!("SKU-{s:03}"), rng.random_range(1..=2)))
                .collect();
            let lines: Vec<(&str, i32)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
            let token = if i % 10 == 3 {
                "tok_decline_crash"
            } else {
                "tok_ok"
            };
            let customer = format!("customer-{}", i % (n / 2).max(1));
            order_placed(&customer, &lines, token, now + i as i64)
        })
        .collect()
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

async fn crash_test(scenario: Scenario, broker_name: &str, bootstrap: String, settings: Settings) {
    let n = scenario.orders(
        !broker_name.starts_with("tansu"),
        broker_name.contains("without transactions"),
    );
    let codec = Codec::new().expect("codec");

    // The gateway: in this process (the processors are what gets disturbed).
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
    let now = now_ms();
    for s in 0..SKUS {
        let sku = format!("SKU-{s:03}");
        let bytes = codec.encode(&restocked(&sku, STOCK, now)).expect("encode");
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

    // Run the processors, disturbing them as the scenario says, until every order is final.
    let mut reader = LogReader::everything(&settings, &bootstrap);
    let mut fleet = Fleet::new(
        scenario,
        &bootstrap,
        &gateway_url,
        broker_name.starts_with("tansu"),
        broker_name.contains("without transactions"),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut finals_seen = 0;
    let mut last_progress = Instant::now();
    loop {
        reader.poll_for(Duration::from_millis(200));
        let done = placed
            .iter()
            .all(|o| reader.log.finals.contains_key(&o.envelope.order_id));
        // A pipeline fast enough to finish every order before the scenario's minimum of
        // actions (a freeze is thawed 9 s after it began) still gets them: the thawed zombie
        // then runs into a log its successor completed, which is what it must not change.
        if done && fleet.actions >= scenario.min_actions() {
            break;
        }
        if done {
            // The same deadline as below: a scenario that never reaches its minimum of actions
            // fails, it does not loop for ever.
            assert!(
                Instant::now() < deadline,
                "{broker_name}, {scenario:?}: every order final, but only {} of the {} actions \
                 the scenario needs after {:?}",
                fleet.actions,
                scenario.min_actions(),
                started.elapsed()
            );
            fleet.step(reader.log.finals.len(), n);
            continue;
        }
        if reader.log.finals.len() > finals_seen {
            finals_seen = reader.log.finals.len();
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(30) {
            // No order became final for a while. On Tansu the live read may have passed over
            // the last final events (see below): read the log anew, from the beginning.
            let mut fresh = LogReader::everything(&settings, &bootstrap);
            fresh.poll_to_end(Duration::from_secs(120), "the log (progress check)");
            eprintln!(
                "{broker_name}, {scenario:?}: no progress for 30 s at {finals_seen} final orders; \
                 a fresh read finds {}",
                fresh.log.finals.len()
            );
            reader = fresh;
            finals_seen = reader.log.finals.len();
            last_progress = Instant::now();
            continue;
        }
        if Instant::now() >= deadline {
            let stuck: Vec<String> = placed
                .iter()
                .map(|o| &o.envelope.order_id)
                .filter(|id| !reader.log.finals.contains_key(*id))
                .take(10)
                .map(|id| {
                    let mut events: Vec<(i64, &str)> = reader
                        .log
                        .by_order
                        .get(id)
                        .into_iter()
                        .flat_map(|events| events.values())
                        .map(|e| (e.envelope().sequence, e.kind().name()))
                        .collect();
                    events.sort();
                    format!("{id}: {events:?}")
                })
                .collect();
            panic!(
                "{broker_name}, {scenario:?}: only {} of {n} orders final after {} actions; \
                 not final (timelines): {stuck:#?}",
                reader.log.finals.len(),
                fleet.actions
            );
        }
        fleet.step(reader.log.finals.len(), n);
    }
    fleet.thaw();
    // A final order's compensations (stock releases) are answered by the inventory after the
    // saga's final event: let the processors finish them — until every reservation of an order
    // that did not confirm is released, or the deadline (then the checks below name the rest).
    let settle = Instant::now() + Duration::from_secs(120);
    while Instant::now() < settle && !unreleased(&reader.log).is_empty() {
        reader.poll_for(Duration::from_millis(500));
    }
    // Late damage: one more restart of every processor, then past the longest deadline.
    fleet.restart_all();
    let late_until = Instant::now() + LATE_WINDOW;
    while Instant::now() < late_until {
        reader.poll_for(Duration::from_millis(500));
    }
    let actions = fleet.actions;
    fleet.stop();
    // The checks read the log anew now that nothing writes any more, to the end of every
    // partition. The live read above only followed progress: on Tansu a read that runs while
    // records are being written can pass over some of them for good (a record becomes visible
    // after one at a higher offset was served), so it may lack events the log has. (The test's
    // own readers do not re-read gaps: what they check must not depend on the code under test.)
    let live = reader.log;
    let mut first = LogReader::everything(&settings, &bootstrap);
    first.poll_to_end(Duration::from_secs(120), "the log");
    let progress = first.progress();
    let log = first.log;
    let skipped_live = log
        .bytes
        .keys()
        .filter(|id| !live.bytes.contains_key(*id))
        .count();
    // A second read of the whole log in small fetches must find exactly the same events.
    let mut again = LogReader::everything_in_small_fetches(&settings, &bootstrap);
    again.poll_to_end(Duration::from_secs(120), "the log a second time");
    let only_first: Vec<&String> = log
        .bytes
        .keys()
        .filter(|id| !again.log.bytes.contains_key(*id))
        .collect();
    let only_second: Vec<&String> = again
        .log
        .bytes
        .keys()
        .filter(|id| !log.bytes.contains_key(*id))
        .collect();
    assert!(
        only_first.is_empty() && only_second.is_empty(),
        "{broker_name}, {scenario:?}: two reads of the same log differ: only in the first \
         {only_first:?}, only in the second {only_second:?}"
    );
    eprintln!(
        "{broker_name}, {scenario:?}: {n} orders final in {:.1} s after {actions} actions; \
         {skipped_live} events the live read passed over; \
         {} errors reading the log: {:?}; (partition, read up to, end): {progress:?}",
        started.elapsed().as_secs_f64(),
        log.errors.len(),
        log.errors.iter().take(5).collect::<Vec<_>>()
    );
    // Every record is still there: a broker that dropped the oldest records (as librdkafka's
    // mock cluster does past 5 MiB per partition) would make every check below meaningless.
    let watermarks: rdkafka::consumer::BaseConsumer =
        clients.reader("crash-test").create().expect("reader");
    for topic in [
        names::ORDERS_EVENTS,
        names::INVENTORY_COMMANDS,
        names::SAGA_CHANGELOG,
        names::INVENTORY_CHANGELOG,
    ] {
        for partition in 0..6 {
            let (low, _) = rdkafka::consumer::Consumer::fetch_watermarks(
                &watermarks,
                topic,
                partition,
                Duration::from_secs(10),
            )
            .expect("watermarks");
            assert_eq!(
                low, 0,
                "{broker_name}, {scenario:?}: {topic} partition {partition} lost its oldest \
                 records (the broker's log starts at {low}): the run wrote past its limits"
            );
        }
    }
    assert!(
        actions >= scenario.min_actions(),
        "{broker_name}, {scenario:?}: the run was too short to disturb the processors"
    );

    // Re-emissions are byte-identical.
    assert!(
        log.conflicts.is_empty(),
        "{broker_name}, {scenario:?}: conflicting events: {:?}",
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
            "{broker_name}, {scenario:?}: {id} has several final events"
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
            "{broker_name}, {scenario:?}: {id} took no valid path: {kinds:?}"
        );
        let sequences: Vec<i64> = timeline.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            sequences,
            (1..=sequences.len() as i64).collect::<Vec<_>>(),
            "{broker_name}, {scenario:?}: {id}"
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
                        format!(
                            "{} <- {}",
                            e.envelope().event_id,
                            e.envelope().causation_id.as_deref().unwrap_or("-")
                        ),
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
                    assert!(
                        r.available_after >= 0,
                        "{broker_name}, {scenario:?}: stock went negative"
                    );
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
            "{broker_name}, {scenario:?}: {sku}: reservations left {held}, confirmed {sold}; not released: {stuck:#?}"
        );
        assert!(
            sold <= i64::from(STOCK),
            "{broker_name}, {scenario:?}: {sku} oversold: {sold}"
        );
    }
    assert!(
        confirmed.len() < n && !confirmed.is_empty(),
        "{broker_name}, {scenario:?}: the run should confirm some orders and reject or cancel others"
    );

    // The gateway: one standing charge per confirmed order, none for the others.
    let report = GatewayClient::new(&gateway_url, &Default::default())
        .expect("gateway client")
        .report(Duration::from_secs(10))
        .await
        .expect("gateway report");
    let mut charged = BTreeSet::new();
    for record in &report.charges {
        assert!(
            record.charges <= 1,
            "{broker_name}, {scenario:?}: {} charged twice",
            record.idempotency_key
        );
        if record.status == "authorized" {
            charged.insert(record.idempotency_key.clone());
        }
    }
    assert_eq!(
        charged, confirmed,
        "{broker_name}, {scenario:?}: standing charges differ from confirmed orders"
    );
    stop_gateway.cancel();
}

async fn on_the_embedded_broker(scenario: Scenario) {
    let dir = TempDir::new();
    let Some(broker) = BrokerProcess::start(BIN, &dir) else {
        return;
    };
    let settings = test_settings(None);
    crash_test(scenario, "embedded broker", broker.bootstrap(), settings).await;
}

async fn on_tansu(scenario: Scenario) {
    let Some(broker) = Broker::tansu() else {
        return;
    };
    let settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    crash_test(scenario, "tansu", broker.bootstrap(), settings).await;
}

/// The memory-only Tansu with the processors committing without transactions, as they do on
/// the embedded broker: the idempotent mode on a second broker, with its own quirks.
async fn on_tansu_without_transactions(scenario: Scenario) {
    let Some(broker) = Broker::tansu() else {
        return;
    };
    let settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    crash_test(
        scenario,
        "tansu without transactions",
        broker.bootstrap(),
        settings,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_again_and_again_on_the_embedded_broker() {
    on_the_embedded_broker(Scenario::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_again_and_again_on_tansu() {
    on_tansu(Scenario::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_without_an_instance_id_killed_again_and_again_on_the_embedded_broker() {
    on_the_embedded_broker(Scenario::KillWithoutInstanceId).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_without_an_instance_id_killed_again_and_again_on_tansu() {
    on_tansu(Scenario::KillWithoutInstanceId).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_mid_stream_on_the_embedded_broker() {
    on_the_embedded_broker(Scenario::Rebalance).await;
}

/// Was flaky (2 of 13 runs): orders left waiting for an answer, and "consumed" answers absent
/// from the checks' read. Both came from Tansu passing over records a read runs into while they
/// are written: the checks now read the log once it is quiet, and the saga sends an unanswered
/// payment request again (`saga.payment_resend_ms`; an unanswered reservation already times
/// out). 8 of 8 runs passed after that, each in about 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_mid_stream_on_tansu() {
    on_tansu(Scenario::Rebalance).await;
}

/// Without transactions nothing fences the zombie at all: the changelog's generations alone
/// keep its late writes from winning.
/// Was ignored by default: it passed alone, but in 2 of 3 full test runs the embedded broker
/// stopped answering mid-run. The cause: the zombie's producer timed its records out while
/// frozen, librdkafka bumped its epoch, and the first produce with that epoch panicked Tansu's
/// storage task, after which the broker answered nothing (docs/architecture.md, "Embedded
/// mode"). Output and changelog producers now outwait a freeze
/// (`MESSAGE_TIMEOUT_FLOOR_MS`), and the broker's supervisor restarts a broker that
/// panics. Passed beside the kill scenario afterwards, as the full suite runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_and_thawed_processor_changes_nothing_its_successor_decided_on_the_embedded_broker(
) {
    on_the_embedded_broker(Scenario::FreezeThaw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_and_thawed_processor_changes_nothing_its_successor_decided_on_tansu() {
    on_tansu(Scenario::FreezeThaw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_again_and_again_on_tansu_without_transactions() {
    on_tansu_without_transactions(Scenario::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_without_an_instance_id_killed_again_and_again_on_tansu_without_transactions() {
    on_tansu_without_transactions(Scenario::KillWithoutInstanceId).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_mid_stream_on_tansu_without_transactions() {
    on_tansu_without_transactions(Scenario::Rebalance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_and_thawed_processor_changes_nothing_its_successor_decided_on_tansu_without_transactions(
) {
    on_tansu_without_transactions(Scenario::FreezeThaw).await;
}
