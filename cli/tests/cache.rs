//! Two query replicas on PostgreSQL: replica A runs with the whole pipeline, replica B is a query
//! API alone on the same database. A change the projection writes (in A's process) reaches B's
//! cache through PostgreSQL `NOTIFY` within a bounded time — well inside B's cache time to live,
//! so nothing but the notification can refresh it.

use std::time::Duration;

use orderflow::pipeline::{self, Role};
use orderflow_testkit::{
    apply_topics, eventually, order_json, place_order, restock, test_settings, wait_final, Broker,
    Database,
};
use serde_json::Value;

/// How long a change may take to reach the other replica's cache.
const BOUND: Duration = Duration::from_secs(3);

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(client: &reqwest::Client, ops: std::net::SocketAddr) -> String {
    client
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

async fn view(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_refreshes_the_other_replicas_cache() {
    let Some(db) = Database::postgres().await else {
        return;
    };
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let a = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("replica A with the pipeline");
    let mut b_settings = test_settings(Some(&db.url));
    b_settings.query.cache_ttl_ms = 600_000;
    let b = pipeline::start(&b_settings, &broker.bootstrap(), &[Role::Query])
        .await
        .expect("replica B: query only");
    let client = reqwest::Client::new();
    let ingest = format!("http://{}", a.ingest_addr.expect("ingest"));
    let b_query = format!("http://{}", b.query_addr.expect("query"));

    restock(
        &client,
        &format!("http://{}", a.admin_addr.expect("admin")),
        &[("SKU-00001", 10)],
    )
    .await;
    let accepted = place_order(&client, &ingest, &order_json("cache-customer")).await;
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    let a_url = accepted["status_url"].as_str().expect("url").to_owned();
    // The answer says how to read one's own write: its wait_url answers once the order is there.
    let wait_url = accepted["wait_url"].as_str().expect("wait_url");
    assert_eq!(wait_url, format!("{a_url}?min_version=1"));
    let waited = client.get(wait_url).send().await.expect("wait");
    assert_eq!(waited.status(), 200);
    assert_eq!(waited.headers()["orderflow-wait"], "satisfied");
    let confirmed = wait_final(&client, &a_url).await;
    assert_eq!(confirmed["status"], "confirmed");

    // B caches the confirmed order: a miss, then hits.
    let b_url = format!("{b_query}/v1/orders/{order_id}");
    assert_eq!(view(&client, &b_url).await["status"], "confirmed");
    assert_eq!(view(&client, &b_url).await["status"], "confirmed");
    let metrics = scrape(&client, b.ops_addr).await;
    let hits_label = r#"cache="orders",result="hit""#;
    assert!(
        metric(&metrics, "orderflow_query_cache_requests_total", hits_label) >= 1.0,
        "B served a hit:\n{metrics}"
    );

    // The customer cancels: refund, release, cancelled — written by A's projection.
    let response = client
        .post(format!("{ingest}/v1/orders/{order_id}/cancel"))
        .json(&serde_json::json!({"reason": "changed my mind"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    eventually(
        Duration::from_secs(60),
        "A to show the cancellation",
        || async { (view(&client, &a_url).await["status"] == "cancelled").then_some(()) },
    )
    .await;
    // From the moment A's store has it, B's cache must follow within the bound.
    let cancelled = eventually(BOUND, "B's cache to follow", || async {
        let v = view(&client, &b_url).await;
        (v["status"] == "cancelled").then_some(v)
    })
    .await;
    assert!(cancelled["version"].as_i64() > confirmed["version"].as_i64());
    let metrics = scrape(&client, b.ops_addr).await;
    assert!(
        metric(
            &metrics,
            "orderflow_query_cache_invalidations_total",
            r#"cache="orders""#
        ) >= 1.0,
        "B's cache entry was invalidated by the notification:\n{metrics}"
    );

    b.shutdown(Duration::from_secs(30)).await.expect("B stops");
    a.shutdown(Duration::from_secs(30)).await.expect("A stops");
}
