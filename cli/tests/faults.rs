//! Infrastructure faults under load, on `orderflow dev` as a user runs it (the embedded broker
//! and a SQLite file).
//!
//! - **The embedded broker killed** (SIGKILL) while `loadgen` sends orders: its supervisor
//!   restarts it on its log; meanwhile `/readyz` answers 503 naming the embedded broker and why,
//!   and ready again once it serves. Every accepted order ends, and `orderflow reconcile` finds
//!   the tables equal to the log (no order lost or doubled, stock equal to the fold).
//! - **The embedded broker frozen** (SIGSTOP) past the consumers' session timeout while
//!   `loadgen` sends orders, then thawed: every consumer's session times out, and the groups
//!   must form again with every partition assigned. Tansu 0.6's group coordinator left them
//!   formed with no assignments, or forming around a leader that had left, for good (orderflow
//!   patches it: `broker/tansu/tansu-broker-0.6.0.patch`). Every accepted order ends and
//!   `reconcile` is clean.
//! - **PostgreSQL stopped** (`pg_ctl stop -m fast`, every session cut) for a few seconds while
//!   orders flow, then started again: `/readyz` answers 503 naming the database meanwhile; the
//!   projections and the edge reconnect; every accepted order ends and `reconcile` is clean. The
//!   cluster is one of the test's own (the machine's serves other tests meanwhile).
//! - **The data directory full** (a 128 MiB tmpfs, filled with one file) while orders flow, then
//!   freed: `/readyz` names the data directory and how much is left; the edge answers `503` for
//!   what the broker cannot write; once the file is removed the pipeline carries on by itself,
//!   every accepted order ends and `reconcile` is clean.

use std::{path::Path, process::Command, time::Duration};

use orderflow_testkit::{
    dev::{wait_events, DevProcess},
    embedded_broker_installed, eventually, reconcile_until_clean,
    secure::TlsPostgres,
    TempDir,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// The broker process `dev` runs: its child named `tansu`.
fn broker_pid(dev_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == dev_pid && comm == "tansu").then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_killed_under_load_is_restarted_shown_on_readyz_and_loses_nothing() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let dir = TempDir::new();
    let client = reqwest::Client::new();
    let (mut dev, dev_pid, first_broker) = start_ready_dev(&dir, &client).await;
    let readyz = readyz_url(&dev);

    let loadgen = spawn_loadgen(&dev);

    // Once orders flow, watch /readyz closely and kill the broker.
    let bootstrap = dev.bootstrap.clone();
    wait_events(&bootstrap, 200).await;
    let watcher = tokio::spawn(watch_readiness(client.clone(), readyz.clone()));
    signal(first_broker, "KILL");
    let second_broker = eventually(Duration::from_secs(30), "a new broker process", || async {
        broker_pid(dev_pid).filter(|pid| *pid != first_broker)
    })
    .await;
    assert_ne!(second_broker, first_broker);

    let (not_ready, ready_again) = watcher.await.expect("join");
    assert!(
        not_ready
            .iter()
            .any(|body| body.contains("embedded broker") && body.contains("exited")),
        "/readyz named the embedded broker and why while it was down: {not_ready:?}"
    );
    assert!(
        ready_again,
        "/readyz was ready again once the broker served"
    );

    let broker_output =
        std::fs::read_to_string(dir.0.join("data/broker/tansu.log")).unwrap_or_default();
    let (accepted, report) = every_accepted_order_ended(loadgen, &dir, || {
        format!(
            "broker panics: {}",
            broker_output.matches("panicked at").count()
        )
    })
    .await;
    assert!(
        accepted >= 250,
        "most orders were accepted across a one-second outage: {report}"
    );
    let url = format!("sqlite://{}", dir.0.join("data/orderflow.sqlite").display());
    let checked = reconcile_checked(&bootstrap, &url).await;
    assert!(
        checked >= accepted,
        "reconcile checked every accepted order ({accepted}), found {checked}"
    );

    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
}

/// How long the broker is frozen: well past `kafka.session_timeout_ms` (6 s by default), so
/// that every consumer's session times out on its own side and the broker, once thawed, drops
/// every member for its missed heartbeats.
const FREEZE: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_frozen_past_the_session_timeout_under_load_loses_nothing() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let dir = TempDir::new();
    let (mut dev, dev_pid, broker) = start_ready_dev(&dir, &reqwest::Client::new()).await;

    // 30 s of orders: a few seconds before the freeze, twelve during it, fifteen after.
    let loadgen = spawn_loadgen_of(&dev, 600);
    let bootstrap = dev.bootstrap.clone();
    wait_events(&bootstrap, 200).await;
    signal(broker, "STOP");
    tokio::time::sleep(FREEZE).await;
    signal(broker, "CONT");

    // Orders accepted before, during (answered 503 meanwhile) and after the freeze all end:
    // the groups formed again with every partition assigned.
    let (accepted, report) = every_accepted_order_ended(loadgen, &dir, || {
        format!(
            "session timeouts in dev's log: {}",
            DevProcess::log_tail(&dir.0, 100_000)
                .matches("SESSTMOUT")
                .count()
        )
    })
    .await;
    assert!(
        accepted >= 250,
        "orders were accepted before and after the freeze: {report}"
    );
    assert!(
        DevProcess::log_tail(&dir.0, 100_000).contains("SESSTMOUT"),
        "the freeze outlasted the consumers' sessions (librdkafka logs SESSTMOUT)"
    );
    let url = format!("sqlite://{}", dir.0.join("data/orderflow.sqlite").display());
    let checked = reconcile_checked(&bootstrap, &url).await;
    assert!(
        checked >= accepted,
        "reconcile checked every accepted order ({accepted}), found {checked}"
    );
    assert_eq!(
        broker_pid(dev_pid),
        Some(broker),
        "the broker was frozen and thawed, never restarted"
    );
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
}

/// `orderflow dev` on `dir`, once `/readyz` answers 200: the process, its pid and the pid of
/// the embedded broker it runs.
async fn start_ready_dev(dir: &TempDir, client: &reqwest::Client) -> (DevProcess, u32, u32) {
    let dev = DevProcess::start(Path::new(BIN), &dir.0, &[])
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let dev_pid = dev.pid().expect("running");
    wait_ready(client, &readyz_url(&dev)).await;
    let broker = broker_pid(dev_pid).expect("dev runs the embedded broker as its child");
    (dev, dev_pid, broker)
}

/// dev's `/readyz`, beside its metrics.
fn readyz_url(dev: &DevProcess) -> String {
    dev.metrics_url.replace("/metrics", "/readyz")
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Waits until dev's `/readyz` answers 200.
async fn wait_ready(client: &reqwest::Client, readyz: &str) {
    eventually(Duration::from_secs(60), "dev to be ready", || {
        let (client, readyz) = (client.clone(), readyz.to_owned());
        async move {
            let response = client.get(&readyz).send().await.ok()?;
            response.status().is_success().then_some(())
        }
    })
    .await;
}

/// Polls `/readyz` every 20 ms for up to a minute; returns the bodies of the not-ready answers
/// and whether it was ready again after them.
async fn watch_readiness(client: reqwest::Client, readyz: String) -> (Vec<String>, bool) {
    let mut not_ready = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(response) = client.get(&readyz).send().await {
            let ok = response.status().is_success();
            let body = response.text().await.unwrap_or_default();
            if !ok {
                not_ready.push(body);
            } else if !not_ready.is_empty() {
                return (not_ready, true);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (not_ready, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_is_shown_on_readyz_and_every_accepted_order_ends() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let Some(postgres) = TlsPostgres::start() else {
        return;
    };
    let dir = TempDir::new();
    let database_url = postgres.url();
    let mut dev = DevProcess::start(
        Path::new(BIN),
        &dir.0,
        &["--database-url".to_owned(), database_url.clone()],
    )
    .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let readyz = readyz_url(&dev);
    let client = reqwest::Client::new();
    wait_ready(&client, &readyz).await;

    let loadgen = spawn_loadgen(&dev);
    let bootstrap = dev.bootstrap.clone();
    wait_events(&bootstrap, 200).await;

    let watcher = tokio::spawn(watch_readiness(client.clone(), readyz.clone()));
    let stopped = tokio::task::spawn_blocking(move || {
        postgres.stop();
        postgres
    })
    .await
    .expect("join");
    // Down until /readyz has said so (it checks the database every second).
    eventually(
        Duration::from_secs(30),
        "/readyz to name the database",
        || {
            let (client, readyz) = (client.clone(), readyz.clone());
            async move {
                let response = client.get(&readyz).send().await.ok()?;
                (!response.status().is_success()
                    && response.text().await.ok()?.contains("database"))
                .then_some(())
            }
        },
    )
    .await;
    let postgres = tokio::task::spawn_blocking(move || {
        stopped.start_again();
        stopped
    })
    .await
    .expect("join");

    let (not_ready, ready_again) = watcher.await.expect("join");
    assert!(
        not_ready.iter().any(|body| body.contains("database")),
        "/readyz named the database while it was down: {not_ready:?}"
    );
    assert!(
        ready_again,
        "/readyz was ready again once the database was back"
    );

    let (accepted, report) = every_accepted_order_ended(loadgen, &dir, String::new).await;
    assert!(
        accepted >= 200,
        "most orders were accepted across the outage: {report}"
    );
    let checked = reconcile_checked(&bootstrap, &database_url).await;
    assert!(
        checked >= accepted,
        "reconcile checked every accepted order ({accepted}), found {checked}"
    );
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
    drop(postgres);
}

/// A tmpfs mounted for one test; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` (skip, or fail under CI) where this process may not mount.
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).expect("mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        match output {
            Ok(o) if o.status.success() => Some(Self(at.to_owned())),
            Ok(o) => orderflow_testkit::unavailable(
                "a tmpfs mount (root with CAP_SYS_ADMIN)",
                String::from_utf8_lossy(&o.stderr).trim(),
            ),
            Err(e) => orderflow_testkit::unavailable("mount", &e.to_string()),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A Prometheus counter's value summed over its label sets, from `/metrics`.
async fn counter_sum(client: &reqwest::Client, metrics: &str, name: &str) -> f64 {
    let Ok(response) = client.get(metrics).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_is_shown_on_readyz_and_every_accepted_order_ends_once_freed() {
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let dir = TempDir::new();
    let data = dir.0.join("data");
    let Some(_tmpfs) = Tmpfs::mount(&data, "128m") else {
        return;
    };
    let mut dev = DevProcess::start(Path::new(BIN), &dir.0, &[])
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let readyz = readyz_url(&dev);
    let client = reqwest::Client::new();
    wait_ready(&client, &readyz).await;
    let loadgen = spawn_loadgen(&dev);
    let bootstrap = dev.bootstrap.clone();
    wait_events(&bootstrap, 100).await;

    // Fill the data directory, leaving 256 KiB (the broker and the database grow meanwhile:
    // retried on what is free then).
    let filler = data.join("filler");
    eventually(Duration::from_secs(10), "the data directory filled", || {
        let filler = filler.clone();
        let free = orderflow::embedded::free_bytes(&data).expect("statvfs");
        async move {
            Command::new("fallocate")
                .args(["-l", &free.saturating_sub(256 * 1024).to_string()])
                .arg(&filler)
                .status()
                .expect("fallocate runs")
                .success()
                .then_some(())
        }
    })
    .await;
    let refused_before = counter_sum(
        &client,
        &dev.metrics_url,
        "orderflow_ingest_orders_refused_total",
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "/readyz to name the data directory, and an order refused",
        || {
            let (client, readyz, metrics) =
                (client.clone(), readyz.clone(), dev.metrics_url.clone());
            async move {
                let response = client.get(&readyz).send().await.ok()?;
                let named = !response.status().is_success()
                    && response.text().await.ok()?.contains("data directory");
                let refused =
                    counter_sum(&client, &metrics, "orderflow_ingest_orders_refused_total").await
                        > refused_before;
                (named && refused).then_some(())
            }
        },
    )
    .await;

    // Freed: the pipeline carries on by itself.
    std::fs::remove_file(&filler).expect("free the space");
    wait_ready(&client, &readyz).await;
    let broker_output = std::fs::read_to_string(data.join("broker/tansu.log")).unwrap_or_default();
    let (accepted, report) = every_accepted_order_ended(loadgen, &dir, || {
        format!(
            "broker panics: {}",
            broker_output.matches("panicked at").count()
        )
    })
    .await;
    assert!(
        (50..300).contains(&accepted),
        "orders were accepted, and some refused while the disk was full: {report}"
    );
    let url = format!("sqlite://{}", data.join("orderflow.sqlite").display());
    let checked = reconcile_checked(&bootstrap, &url).await;
    assert!(
        checked >= accepted,
        "reconcile checked every accepted order ({accepted}), found {checked}"
    );
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
}

/// The `accepted N (202)` count of a loadgen report.
fn accepted_orders(report: &str) -> u32 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("accepted"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no accepted line in {report}"))
}

/// How many orders `orderflow reconcile` checked once clean (within a minute). An order
/// answered 503 may still have been written (its ack lost), so it is at least every accepted
/// one.
async fn reconcile_checked(bootstrap: &str, database_url: &str) -> u32 {
    let stdout = reconcile_until_clean(Path::new(BIN), bootstrap, database_url).await;
    stdout
        .split("checked ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no order count in {stdout}"))
}

/// `loadgen` against `dev`: 300 orders at 20/s, every one valid.
fn spawn_loadgen(dev: &DevProcess) -> tokio::task::JoinHandle<std::process::Output> {
    spawn_loadgen_of(dev, 300)
}

/// `loadgen` against `dev`: `orders` orders at 20/s, every one valid.
fn spawn_loadgen_of(
    dev: &DevProcess,
    orders: u32,
) -> tokio::task::JoinHandle<std::process::Output> {
    let (ingest, admin) = (dev.ingest_url.clone(), dev.admin_url.clone());
    let orders = orders.to_string();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["loadgen", "--url", &ingest, "--admin-url", &admin])
            .args(["--orders", &orders, "--rate", "20", "--invalid-ratio", "0"])
            .output()
            .expect("loadgen runs")
    })
}

/// Waits for `loadgen` and checks that it succeeded and that every order it had accepted
/// ended; returns the accepted count and the report. A failure shows dev's log and `more`.
/// An order the edge could not write in time was answered 503 (outcome unknown, the client
/// retries): counted as refused, never as accepted.
async fn every_accepted_order_ended(
    loadgen: tokio::task::JoinHandle<std::process::Output>,
    dir: &TempDir,
    more: impl Fn() -> String,
) -> (u32, String) {
    let output = loadgen.await.expect("join");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let context = || {
        format!(
            "dev's log ends:\n{}\n{}",
            DevProcess::log_tail(&dir.0, 40),
            more()
        )
    };
    assert!(
        output.status.success(),
        "loadgen failed:\n{report}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        context()
    );
    assert!(
        report.contains("not final in time: 0"),
        "{report}\n{}",
        context()
    );
    (accepted_orders(&report), report)
}
