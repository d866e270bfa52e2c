//! Shadow runs: `orderflow process --shadow NAME` beside a live pipeline, and `orderflow
//! shadow diff NAME`. A shadow of the same build and configuration decides every order as the
//! live saga did (no difference); a shadow with a lower review amount shows exactly the orders
//! it would decide differently (held for review instead of reserved and paid).

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::Duration,
};

use orderflow::pipeline::{self, Role};
use orderflow_testkit::{
    apply_topics, eventually, order_json, place_order, restock, test_settings, wait_final, Broker,
    Database,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// A child process killed when dropped.
struct Shadow(Child);

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(bootstrap: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--kafka-brokers", bootstrap])
        .args(["--set", "telemetry.listen=\"127.0.0.1:0\""])
        .args(args);
    command
}

fn start_shadow(bootstrap: &str, name: &str, settings: &[&str]) -> Shadow {
    let mut args = Vec::new();
    for s in settings {
        args.extend(["--set", s]);
    }
    args.extend(["process", "--shadow", name]);
    Shadow(
        command(bootstrap, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("shadow starts"),
    )
}

/// `shadow diff NAME` once every one of `orders` orders is compared: (exit success, output).
async fn diff_when_caught_up(bootstrap: &str, name: &str, orders: usize) -> (bool, String) {
    let done = format!("orders compared: {orders};");
    eventually(
        Duration::from_secs(120),
        &format!("shadow {name} to consume every order"),
        || async {
            let output = command(bootstrap, &["shadow", "diff", name])
                .output()
                .expect("diff runs");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            stdout
                .contains(&done)
                .then_some((output.status.success(), stdout))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_shows_exactly_the_orders_it_would_decide_differently() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let bootstrap = broker.bootstrap();
    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("live pipeline");
    let client = reqwest::Client::new();
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    restock(&client, &admin, &[("SKU-00001", 100)]).await;

    // Six orders, the odd ones over 50.00; all confirmed live (the live review amount is far
    // higher).
    let mut big = BTreeSet::new();
    for i in 0..6 {
        let mut body = order_json(&format!("c-shadow-{i}"));
        if i % 2 == 1 {
            body["lines"][0]["quantity"] = 4.into();
            body["total_minor"] = 5499.into();
        }
        let accepted = place_order(&client, &ingest, &body).await;
        let view = wait_final(&client, accepted["status_url"].as_str().expect("url")).await;
        assert_eq!(view["status"], "confirmed", "{view}");
        if i % 2 == 1 {
            big.insert(accepted["order_id"].as_str().expect("id").to_owned());
        }
    }

    let _same = start_shadow(&bootstrap, "same", &[]);
    let _strict = start_shadow(&bootstrap, "strict", &["fraud.review_amount_minor=5000"]);

    let (clean, report) = diff_when_caught_up(&bootstrap, "same", 6).await;
    assert!(clean, "an identical shadow differs:\n{report}");
    assert!(report.contains("differing: 0"), "{report}");

    let (clean, report) = diff_when_caught_up(&bootstrap, "strict", 6).await;
    assert!(!clean, "the strict shadow shows no difference:\n{report}");
    let listed: BTreeSet<String> = report
        .lines()
        .filter_map(|l| l.strip_prefix("order "))
        .map(|l| l.trim_end_matches(':').to_owned())
        .collect();
    assert_eq!(listed, big, "{report}");
    // Each differs where the decision is: the score event changed, what followed it live is
    // missing from the shadow.
    assert!(report.contains("changed FraudScored"), "{report}");
    assert!(report.contains("missing OrderConfirmed"), "{report}");
    assert!(!report.contains("extra"), "{report}");

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
