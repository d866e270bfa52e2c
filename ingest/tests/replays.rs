//! Projection replays over the admin API, with a replayer the test controls: a replay runs in
//! the background, a second one of the same projection is `409` while it runs, its status
//! follows it to the end, and unknown projections are `404`. (The real replay over HTTP, on
//! SQLite and PostgreSQL: cli/tests/replay.rs.)

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use orderflow_ingest::{
    replays::{ProjectionReplayer, ReplaySummary, Replays},
    IngestState, Publisher,
};
use orderflow_platform::{http::Server, kafka::KafkaClients, Settings};
use orderflow_schemas::Codec;
use orderflow_testkit::{eventually, Broker};
use orderflow_topics::names;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Each replay waits for a permit, then answers the next scripted outcome.
struct Scripted {
    permits: Arc<Semaphore>,
    outcomes: Mutex<Vec<Result<ReplaySummary, String>>>,
}

impl ProjectionReplayer for Scripted {
    fn projections(&self) -> &'static [&'static str] {
        &["orders", "inventory"]
    }

    fn replay(
        &self,
        _projection: &str,
    ) -> Pin<Box<dyn Future<Output = Result<ReplaySummary, String>> + Send + '_>> {
        Box::pin(async move {
            let permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| "closed".to_owned())?;
            permit.forget();
            self.outcomes
                .lock()
                .map_err(|_| "poisoned".to_owned())?
                .remove(0)
        })
    }
}

async fn call(client: &reqwest::Client, method: &str, url: &str) -> (u16, Value) {
    let request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_runs_in_the_background_once_at_a_time() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let settings = Settings::from_defaults(&Default::default()).expect("settings");
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let codec = Arc::new(Codec::new().expect("codec"));
    let permits = Arc::new(Semaphore::new(0));
    let replayer = Scripted {
        permits: permits.clone(),
        outcomes: Mutex::new(vec![
            Ok(ReplaySummary {
                records: 42,
                rows: BTreeMap::from([("orders".to_owned(), 3)]),
            }),
            Err("a replay of projection orders is already running".to_owned()),
        ]),
    };
    let state = IngestState {
        switches: orderflow_platform::switches::Switches::new(
            &settings,
            &orderflow_platform::metrics::MetricsRegistry::new(),
        ),
        replays: Some(Replays::new(Arc::new(replayer))),
        publisher: Publisher::new(&clients, codec, names::ORDERS_EVENTS, None).expect("publisher"),
        status_base_url: "http://query.example".into(),
        metrics: orderflow_ingest::IngestMetrics::unregistered(),
        max_batch_orders: 5,
        limits: orderflow_ingest::RateLimits::new(&settings.ingest.limits()),
        directory: None,
        orders_topic: names::ORDERS_EVENTS,
        inventory_topic: names::INVENTORY_COMMANDS,
        // Who may call the admin listener: cli/tests/edge.rs.
        auth: orderflow_auth::Authenticator::disabled(),
        idempotency: None,
        dead_letters: None,
    };
    let router = orderflow_ingest::admin_router(state, settings.ingest.max_body_bytes);
    let server = Server::bind("127.0.0.1:0".parse().expect("addr"), router)
        .await
        .expect("bind");
    let base = format!("http://{}", server.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(cancel.clone()));
    let client = reqwest::Client::new();
    let orders = format!("{base}/v1/projections/orders/replay");

    let (status, body) = call(&client, "GET", &orders).await;
    assert_eq!(status, 404, "nothing started yet: {body}");
    let (status, body) = call(
        &client,
        "POST",
        &format!("{base}/v1/projections/nothing/replay"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("orders, inventory")),
        "the answer names the projections there are: {body}"
    );

    let (status, run) = call(&client, "POST", &orders).await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["state"], "running");
    assert_eq!(run["status_url"], "/v1/projections/orders/replay");
    let (status, body) = call(&client, "POST", &orders).await;
    assert_eq!(status, 409, "a second replay while one runs: {body}");
    assert!(body["type"]
        .as_str()
        .is_some_and(|t| t.ends_with("replay-running")));
    let (status, body) = call(&client, "GET", &orders).await;
    assert_eq!((status, body["state"].clone()), (200, "running".into()));

    // Let it finish: its status says what it swapped in.
    permits.add_permits(1);
    let done = eventually(Duration::from_secs(10), "the replay to end", || async {
        let (_, run) = call(&client, "GET", &orders).await;
        (run["state"] != "running").then_some(run)
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["records"], 42);
    assert_eq!(done["rows"]["orders"], 3);
    assert!(done["finished_at"].as_i64() >= done["started_at"].as_i64());

    // A new run once the last ended; a failure is reported with its reason.
    let (status, _) = call(&client, "POST", &orders).await;
    assert_eq!(status, 202);
    permits.add_permits(1);
    let failed = eventually(
        Duration::from_secs(10),
        "the second replay to end",
        || async {
            let (_, run) = call(&client, "GET", &orders).await;
            (run["state"] != "running").then_some(run)
        },
    )
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["error"]
        .as_str()
        .is_some_and(|e| e.contains("already running")));
    cancel.cancel();
}
