//! The restore drill (docs/runbooks/backup-restore.md, its procedure), on the embedded broker
//! with SQLite as `orderflow dev` runs it, and again with PostgreSQL:
//!
//! 1. `orderflow dev` runs with `loadgen` sending orders; the payment gateway answers slowly,
//!    so orders are in flight at any moment;
//! 2. `orderflow backup` twice while the orders flow (a full set, then an incremental one);
//! 3. `dev` stops and its data is destroyed (the broker's log and the SQLite file; on
//!    PostgreSQL a new, empty database stands in for the lost one);
//! 4. `orderflow restore` into an empty data directory, which it refuses to do a second time;
//! 5. a new `dev` resumes on what was restored.
//!
//! Every order of the restored log then ends exactly as it did in the first run (status and
//! version), none is lost or doubled (the table holds exactly the log's orders and `orderflow
//! reconcile` finds the tables equal to the fold: stock, one charge per confirmed order), and
//! the gateway — which outlived the disaster, as a payment provider does — never issued a key a
//! second authorization.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use orderflow_gateway::simulator::Simulator;
use orderflow_testkit::{
    dev::{wait_events, DevProcess},
    embedded_broker_installed, eventually, test_settings_with, Database as TestDb, TempDir,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    ClientConfig, Offset, TopicPartitionList,
};
use sqlx::Row;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const RESTING: [&str; 4] = ["confirmed", "rejected", "cancelled", "fraud_review"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restore_drill_on_sqlite_ends_every_order_as_it_would_have() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    drill(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restore_drill_on_postgres_ends_every_order_as_it_would_have() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let Some(lost) = TestDb::postgres_unmigrated().await else {
        return;
    };
    let Some(target) = TestDb::postgres_unmigrated().await else {
        return;
    };
    drill(Some((lost.url.clone(), target.url.clone()))).await;
}

/// `postgres`: the database the first run uses and the empty one restored into.
async fn drill(postgres: Option<(String, String)>) {
    // The payment provider, outside the disaster: slow enough that orders are always in flight.
    let gateway_settings = test_settings_with(
        None,
        &[
            ("gateway.latency_ms", "300"),
            ("gateway.decline_rate", "0.1"),
        ],
    )
    .gateway;
    let simulator = Simulator::bind(&gateway_settings).await.expect("gateway");
    let gateway_url = simulator.base_url().expect("gateway address");
    let stop_gateway = tokio_util::sync::CancellationToken::new();
    tokio::spawn(simulator.run(stop_gateway.clone()));

    let first = TempDir::new();
    let second = TempDir::new();
    let backups = TempDir::new();
    let backup_dir = backups.0.join("orderflow-backup");
    let sqlite_url = |dir: &TempDir| format!("sqlite://{}/data/orderflow.sqlite", dir.0.display());
    let (first_db, second_db) = match &postgres {
        Some((lost, target)) => (lost.clone(), target.clone()),
        None => (sqlite_url(&first), sqlite_url(&second)),
    };
    let mut dev_args = vec![
        "--set".to_owned(),
        format!("payment.gateway_url={gateway_url:?}"),
    ];
    if let Some((lost, _)) = &postgres {
        dev_args.extend(["--database-url".to_owned(), lost.clone()]);
    }

    // 1-2. The first run, backed up twice while orders flow.
    let mut dev = DevProcess::start(Path::new(BIN), &first.0, &dev_args)
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let bootstrap = dev.bootstrap.clone();
    let (ingest, admin) = (dev.ingest_url.clone(), dev.admin_url.clone());
    let loadgen = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["loadgen", "--url", &ingest, "--admin-url", &admin])
            .args(["--orders", "400", "--rate", "25", "--customers", "40"])
            // Orders held for fraud review never become final by themselves: the test waits on
            // the table instead.
            .args(["--invalid-ratio", "0", "--wait-secs", "0"])
            .output()
            .expect("loadgen runs")
    });
    let mut cli_args = vec!["--kafka-brokers".to_owned(), bootstrap.clone()];
    if postgres.is_some() {
        cli_args.extend(["--database-url".to_owned(), first_db.clone()]);
    }
    for (events, kind) in [(300, "(full)"), (900, "(incremental)")] {
        wait_events(&bootstrap, events).await;
        let output = run(&first.0, &cli_args, &["backup", path(&backup_dir)]).await;
        assert_success(&output, "orderflow backup");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(kind), "a {kind} set: {stdout}");
    }
    let output = loadgen.await.expect("join");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    // (It exits 1 for the orders not final when it stopped waiting, at once.)
    assert!(
        report.contains("accepted  400 "),
        "loadgen:\n{report}\n{}\ndev's log ends:\n{}",
        String::from_utf8_lossy(&output.stderr),
        DevProcess::log_tail(&first.0, 40)
    );
    let before = eventually(
        Duration::from_secs(120),
        "every order of the first run to end",
        || {
            let url = first_db.clone();
            async move {
                let now = statuses(&url).await;
                (now.len() == 400
                    && now
                        .values()
                        .all(|(status, _)| RESTING.contains(&status.as_str())))
                .then_some(now)
            }
        },
    )
    .await;
    for status in RESTING {
        assert!(
            before.values().any(|(s, _)| s == status),
            "the first run has orders {status}: {report}"
        );
    }
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");

    // 3. The disaster.
    std::fs::remove_dir_all(first.0.join("data")).expect("the first run's data destroyed");

    // 4. The restore, into an empty data directory (and database).
    let mut restore_args = vec![
        "--set".to_owned(),
        "dev.broker_listen=\"127.0.0.1:0\"".to_owned(),
    ];
    if postgres.is_some() {
        restore_args.extend(["--database-url".to_owned(), second_db.clone()]);
    }
    let output = run(&second.0, &restore_args, &["restore", path(&backup_dir)]).await;
    assert_success(&output, "orderflow restore");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("restored 2 backup sets"), "{stdout}");
    eprintln!("{stdout}");
    let again = run(&second.0, &restore_args, &["restore", path(&backup_dir)]).await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("not empty"),
        "a second restore onto the restored data is refused: {stderr}"
    );
    let restored = statuses(&second_db).await;
    let in_flight = restored
        .values()
        .filter(|(status, _)| !RESTING.contains(&status.as_str()))
        .count();
    assert!(
        in_flight > 0,
        "the backup caught orders in flight: {restored:?}"
    );

    // 5. The pipeline resumes.
    let mut dev_args = vec![
        "--set".to_owned(),
        format!("payment.gateway_url={gateway_url:?}"),
    ];
    if postgres.is_some() {
        dev_args.extend(["--database-url".to_owned(), second_db.clone()]);
    }
    let mut dev = DevProcess::start(Path::new(BIN), &second.0, &dev_args)
        .unwrap_or_else(|e| panic!("orderflow dev on the restored data: {e}"));
    let bootstrap = dev.bootstrap.clone();
    let in_log = {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || orders_in_log(&bootstrap))
            .await
            .expect("join")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let after = loop {
        let now = statuses(&second_db).await;
        let in_table: BTreeSet<String> = now.keys().cloned().collect();
        let open: Vec<(&String, &(String, i64))> = now
            .iter()
            .filter(|(_, (status, _))| !RESTING.contains(&status.as_str()))
            .collect();
        if in_table == in_log && open.is_empty() {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every order of the restored log ends within 2 minutes: {} orders in the log, {} in \
             the table, missing {:?}, not ended {:?}\ndev's log ends:\n{}",
            in_log.len(),
            in_table.len(),
            in_log.difference(&in_table).take(10).collect::<Vec<_>>(),
            open.iter().take(10).collect::<Vec<_>>(),
            DevProcess::log_tail(&second.0, 60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (order, outcome) in &after {
        assert_eq!(
            Some(outcome),
            before.get(order),
            "order {order} ended as in the first run"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let args = [
            "--kafka-brokers".to_owned(),
            bootstrap.clone(),
            "--database-url".to_owned(),
            second_db.clone(),
        ];
        let output = run(&second.0, &args, &["reconcile", "--slo-secs", "3600"]).await;
        if output.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "orderflow reconcile finds the restored tables equal to the log:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let charges: serde_json::Value = reqwest::get(format!("{gateway_url}/v1/charges"))
        .await
        .expect("gateway report")
        .json()
        .await
        .expect("json");
    let charged_twice: Vec<&serde_json::Value> = charges["charges"]
        .as_array()
        .expect("charges")
        .iter()
        .filter(|c| c["charges"].as_u64().unwrap_or_default() > 1)
        .collect();
    assert!(charged_twice.is_empty(), "charged twice: {charged_twice:?}");
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
    stop_gateway.cancel();
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

async fn run(dir: &Path, global: &[String], args: &[&str]) -> Output {
    let (dir, global) = (dir.to_owned(), global.to_vec());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&global)
            .args(&args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .output()
            .expect("orderflow runs")
    })
    .await
    .expect("join")
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every order's (status, version) in the `orders` table.
async fn statuses(url: &str) -> BTreeMap<String, (String, i64)> {
    let db = orderflow_db::Database::connect(url.to_owned(), 1)
        .await
        .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    let rows = sqlx::query("SELECT order_id, status, version FROM orders")
        .fetch_all(db.pool())
        .await
        .unwrap_or_else(|e| panic!("cannot read the orders of {url}: {e}"));
    db.pool().close().await;
    rows.iter()
        .map(|row| {
            let order: String = row.get(0);
            let status: String = row.get(1);
            let version: i64 = row.get(2);
            (order, (status, version))
        })
        .collect()
}

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "backup-drill-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// The order ids of `orders.events`' events, read to the end. (Its records are keyed by
/// customer.)
fn orders_in_log(bootstrap: &str) -> BTreeSet<String> {
    let codec = orderflow_schemas::Codec::new().expect("codec");
    let consumer = consumer(bootstrap);
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for partition in 0..6 {
        let (low, high) = consumer
            .fetch_watermarks("orders.events", partition, Duration::from_secs(5))
            .expect("watermarks");
        if high > low {
            ends.insert(partition, high);
            tpl.add_partition_offset("orders.events", partition, Offset::Offset(low))
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut orders = BTreeSet::new();
    let mut at: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, end)| at.get(p).copied().unwrap_or(-1) + 1 < *end)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "reading orders.events took over a minute"
        );
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            at.insert(message.partition(), message.offset());
            // (Events of no order, such as restocks, have an empty order id.)
            if let Some(event) = message.payload().and_then(|p| codec.decode(p).ok()) {
                if !event.envelope().order_id.is_empty() {
                    orders.insert(event.envelope().order_id.clone());
                }
            }
        }
    }
    orders
}
