//! The README's run command as a user meets it: `orderflow dev` as a child process on the
//! in-process broker and a SQLite file; an order posted and read back confirmed; `loadgen`
//! against it; Ctrl-C (SIGINT) stops it cleanly; a second start moves the first run's tables
//! aside because the in-process log starts empty.

use std::{path::Path, process::Command};

use orderflow_testkit::{dev::DevProcess, order_json, wait_final, TempDir};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

fn start_dev(dir: &Path) -> DevProcess {
    DevProcess::start(Path::new(BIN), dir, &["--log-format".into(), "json".into()])
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"))
}

/// Ctrl-C: a clean exit.
fn interrupt(dev: &mut DevProcess) {
    let status = dev
        .interrupt()
        .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    assert!(status.success(), "dev exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_serves_and_stops_cleanly() {
    let dir = TempDir::new();
    let mut dev = start_dev(&dir.0);
    assert!(
        dev.banner.iter().any(|l| l.contains("(in-process)")),
        "{:?}",
        dev.banner
    );

    let client = reqwest::Client::new();
    orderflow_testkit::restock(&client, &dev.admin_url, &[("SKU-00001", 10)]).await;
    let accepted: Value = client
        .post(format!("{}/v1/orders", dev.ingest_url))
        .json(&order_json("customer-1"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status_url")
        .to_owned();
    assert!(
        status_url.starts_with(&dev.query_url),
        "{status_url} is not on {}",
        dev.query_url
    );
    let view = wait_final(&client, &status_url).await;
    assert_eq!(view["status"], "confirmed");
    assert_eq!(view["version"], 8, "placed .. confirmed: {view}");

    // loadgen against the running instance: every accepted order reaches a final status.
    let (ingest, admin) = (dev.ingest_url.clone(), dev.admin_url.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "loadgen",
                "--url",
                &ingest,
                "--admin-url",
                &admin,
                "--orders",
                "40",
                "--rate",
                "200",
                "--invalid-ratio",
                "0.2",
            ])
            .output()
            .expect("loadgen runs")
    })
    .await
    .expect("join");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("accepted  40 (202)"), "{report}");
    assert!(report.contains("not final in time: 0"), "{report}");
    assert!(report.contains("confirmed"), "{report}");
    assert!(report.contains("rejected"), "{report}");

    interrupt(&mut dev);
    assert!(dir.0.join("data/orderflow.sqlite").exists());

    // The in-process log is gone; a second start must not keep tables that disagree with it.
    let mut second = start_dev(&dir.0);
    assert!(
        second.banner.iter().any(|l| l.contains("moved aside")),
        "{:?}",
        second.banner
    );
    let moved: Vec<_> = std::fs::read_dir(dir.0.join("data"))
        .expect("data dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".previous"))
        .collect();
    assert_eq!(moved.len(), 1, "the first run's database is kept aside");
    let missing = client
        .get(status_url.replace(&dev.query_url, &second.query_url))
        .send()
        .await
        .expect("get");
    assert_eq!(
        missing.status(),
        404,
        "fresh tables do not know the old order"
    );
    interrupt(&mut second);
}

#[test]
fn config_show_redacts_secrets_and_bad_values_name_their_key() {
    let dir = TempDir::new();
    let shown = Command::new(BIN)
        .args([
            "--database-url",
            "postgres://app:hunter2@db/orders",
            "config",
            "show",
        ])
        .current_dir(&dir.0)
        .output()
        .expect("runs");
    assert!(shown.status.success());
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("[database]"), "{text}");
    assert!(text.contains("[redacted]"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let bad = Command::new(BIN)
        .args(["config", "show"])
        .current_dir(&dir.0)
        .env("ORDERFLOW_KAFKA__FETCH_WAIT_MAX_MS", "soon")
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr).to_lowercase();
    assert!(err.contains("kafka.fetch_wait_max_ms"), "{err}");
}

/// `dev` with authentication on, as the README's first command runs it: the banner's keys are
/// the ones that work, each for its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_a_working_key_per_role() {
    let dir = TempDir::new();
    let mut dev = DevProcess::start(
        Path::new(BIN),
        &dir.0,
        &["--set".into(), "auth.enabled=true".into()],
    )
    .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let keys = dev.api_keys.clone();
    let roles: Vec<&str> = keys.keys().map(String::as_str).collect();
    assert_eq!(roles, ["admin", "producer", "reader"], "{:?}", dev.banner);
    let client = reqwest::Client::new();
    let post = |key: Option<&str>| {
        let mut request = client
            .post(format!("{}/v1/orders", dev.ingest_url))
            .json(&order_json("c-keys"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(post(None).await.expect("post").status(), 401);
    assert_eq!(
        post(Some(&keys["reader"])).await.expect("post").status(),
        403
    );
    let accepted = post(Some(&keys["producer"])).await.expect("post");
    assert_eq!(accepted.status(), 202);
    let body: Value = accepted.json().await.expect("json");
    let status_url = body["status_url"].as_str().expect("status url");
    let read = client
        .get(status_url)
        .bearer_auth(&keys["reader"])
        .query(&[("min_version", "1")])
        .send()
        .await
        .expect("get");
    assert_eq!(read.status(), 200);
    let keys_list = client
        .get(format!("{}/v1/keys", dev.admin_url))
        .bearer_auth(&keys["admin"])
        .send()
        .await
        .expect("keys");
    assert_eq!(keys_list.status(), 200);
    interrupt(&mut dev);
}
