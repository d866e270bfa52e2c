//! Operational switches, applied by editing the config file of a running `orderflow dev` (as a
//! ConfigMap edit reaches a pod): no signal, no restart. Each switch is checked by its effect
//! and its metric: refusing orders (503 with Retry-After), pausing the saga (orders wait, then
//! go on where they stopped), holding every order for review, and selecting a fraud model
//! version — the last two through the log, as the saga's rules.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use orderflow_testkit::{
    dev::DevProcess, embedded_broker_installed, eventually, order_json, place_order, restock,
    wait_final, wait_status, TempDir,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// The config file with `switches` and `fraud` lines of the test's choosing.
fn write_config(dir: &TempDir, fraud: &str, switches: &str) {
    let text = format!("[fraud]\n{fraud}\n\n[switches]\n{switches}\n");
    // Written whole, then renamed into place, as the kubelet swaps a ConfigMap's files.
    let tmp = dir.0.join("orderflow.toml.tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, dir.0.join("orderflow.toml")).expect("swap config");
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

async fn until_metric(client: &reqwest::Client, url: &str, line: &str) {
    eventually(Duration::from_secs(30), line, || async {
        metrics(client, url).await.contains(line).then_some(())
    })
    .await;
}

/// Places an order and waits until the saga has decided it: held for review or final.
async fn decided(client: &reqwest::Client, ingest: &str, customer: &str) -> serde_json::Value {
    let accepted = place_order(client, ingest, &order_json(customer)).await;
    let url = accepted["status_url"].as_str().expect("url").to_owned();
    eventually(Duration::from_secs(30), "the order decided", || async {
        let view: serde_json::Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        matches!(
            view["status"].as_str(),
            Some("fraud_review" | "confirmed" | "rejected" | "cancelled")
        )
        .then_some(view)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_apply_from_an_edited_config_file_without_a_restart() {
    if embedded_broker_installed().is_none() {
        return;
    }
    let dir = TempDir::new();
    write_config(&dir, "", "accept_orders = true");
    let mut dev = DevProcess::start(BIN.as_ref(), &dir.0, &[]).expect("dev starts");
    let client = reqwest::Client::new();
    let metrics_url = dev.metrics_url.clone();
    restock(&client, &dev.admin_url, &[("SKU-00001", 100)]).await;
    let first = place_order(&client, &dev.ingest_url, &order_json("c-switch-1")).await;
    let status_url = first["status_url"].as_str().expect("url").to_owned();
    assert_eq!(
        wait_final(&client, &status_url).await["status"],
        "confirmed"
    );

    // Maintenance: new orders refused with Retry-After; reads keep working.
    write_config(&dir, "", "accept_orders = false\nretry_after_secs = 30");
    let refused = eventually(Duration::from_secs(30), "orders refused", || async {
        let response = client
            .post(format!("{}/v1/orders", dev.ingest_url))
            .json(&order_json("c-switch-2"))
            .send()
            .await
            .ok()?;
        (response.status() == 503).then_some(response)
    })
    .await;
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("30")
    );
    let problem: serde_json::Value = refused.json().await.expect("problem");
    assert_eq!(problem["type"], "urn:orderflow:problem:maintenance");
    until_metric(
        &client,
        &metrics_url,
        "orderflow_switch_on{switch=\"refuse_orders\"} 1",
    )
    .await;
    assert_eq!(
        client
            .get(&status_url)
            .send()
            .await
            .expect("status")
            .status(),
        200
    );

    // The saga paused: an order is taken and projected, and goes no further until resumed.
    write_config(
        &dir,
        "",
        "accept_orders = true\npaused_processors = [\"saga\"]",
    );
    until_metric(
        &client,
        &metrics_url,
        "orderflow_switch_on{switch=\"pause_saga\"} 1",
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the saga's partitions paused",
        || async {
            let text = metrics(&client, &metrics_url).await;
            text.lines()
                .any(|l| {
                    l.starts_with("orderflow_processor_paused_partitions{processor=\"saga\"}")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;
    let waiting = eventually(Duration::from_secs(30), "orders accepted again", || async {
        let response = client
            .post(format!("{}/v1/orders", dev.ingest_url))
            .json(&order_json("c-switch-3"))
            .send()
            .await
            .ok()?;
        if response.status() != 202 {
            return None;
        }
        response.json::<serde_json::Value>().await.ok()
    })
    .await;
    let waiting_url = waiting["status_url"].as_str().expect("url").to_owned();
    wait_status(&client, &waiting_url, "placed").await;
    // Unpaused, the saga would validate it within milliseconds; paused, it stays placed.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let view: serde_json::Value = client
            .get(&waiting_url)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        assert_eq!(
            view["status"], "placed",
            "the paused saga handled it: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_config(&dir, "", "accept_orders = true");
    assert_eq!(
        wait_final(&client, &waiting_url).await["status"],
        "confirmed"
    );

    // Hold every order for review (through the log, as the saga's rules).
    write_config(&dir, "hold_all_for_review = true", "accept_orders = true");
    until_metric(
        &client,
        &metrics_url,
        "orderflow_switch_on{switch=\"hold_all_for_review\"} 1",
    )
    .await;
    // Orders placed before the rules' control record reach the saga are decided the old way.
    // Each attempt is a new customer: one customer's many orders would trip the baseline
    // model's velocity rule and be held or rejected by it, not by the switch.
    let attempts = AtomicUsize::new(0);
    let customer = |prefix: &str| format!("{prefix}-{}", attempts.fetch_add(1, Ordering::Relaxed));
    let held = eventually(
        Duration::from_secs(60),
        "an order held for review",
        || async {
            let view = decided(&client, &dev.ingest_url, &customer("c-switch-4")).await;
            (view["status"] == "fraud_review").then_some(view)
        },
    )
    .await;
    assert_eq!(held["status"], "fraud_review");

    // A stricter model version: its weights now decide (everything scores as fraud).
    write_config(
        &dir,
        "model = \"strict\"\n[fraud.models.strict]\nbias = 20.0",
        "accept_orders = true",
    );
    until_metric(
        &client,
        &metrics_url,
        "orderflow_switch_on{switch=\"fraud_model_strict\"} 1",
    )
    .await;
    let rejected = eventually(
        Duration::from_secs(60),
        "an order rejected by the strict model",
        || async {
            let view = decided(&client, &dev.ingest_url, &customer("c-switch-5")).await;
            (view["status"] == "rejected").then_some(view)
        },
    )
    .await;
    assert!(
        rejected.to_string().contains("model strict"),
        "the rejection names the model version: {rejected}"
    );
    dev.interrupt().expect("dev stops");
}
