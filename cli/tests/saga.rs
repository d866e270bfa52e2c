//! The saga through the running pipeline (embedded broker, SQLite): fraud review decided over
//! HTTP, customer cancellation before and after confirmation, and a faulty payment gateway —
//! retries, the circuit breaker opening and closing, no order charged twice, every order ends.

use std::time::Duration;

use orderflow::pipeline::{self, Role};
use orderflow_gateway::{protocol::Faults, GatewayClient};
use orderflow_testkit::{
    apply_topics, eventually, place_order, restock, test_settings_with, wait_final, wait_status,
    Broker, Database,
};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

fn settings(db: &Database, extra: &[(&str, &str)]) -> orderflow_platform::Settings {
    test_settings_with(Some(&db.url), extra)
}

fn order(customer: &str, unit_price_minor: i64) -> Value {
    json!({
        "customer_id": customer,
        "currency": "EUR",
        "lines": [{"sku": "SKU-S1", "quantity": 1, "unit_price_minor": unit_price_minor}],
        "shipping_address": {"name": "Test", "line1": "1 Road", "city": "Town", "postal_code": "12345", "country": "DE"},
        "payment_token": "tok_ok",
        "shipping_minor": 0,
        "total_minor": unit_price_minor
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn place(client: &reqwest::Client, ingest: &str, body: &Value) -> (String, String) {
    let accepted = place_order(client, ingest, body).await;
    (
        accepted["order_id"].as_str().expect("id").to_owned(),
        accepted["status_url"].as_str().expect("url").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_decisions_and_cancellations_over_http() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = settings(&db, &[]);
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    let gateway = GatewayClient::new(
        &format!("http://{}", running.gateway_addr.expect("gateway")),
        &Default::default(),
    )
    .expect("gateway client");
    let client = reqwest::Client::new();
    restock(&client, &admin, &[("SKU-S1", 10)]).await;

    // An order at the review amount is held; an admin approves it.
    let big = settings.fraud.review_amount_minor;
    let query = format!("http://{}", running.query_addr.expect("query"));
    let (held, held_url) = place(&client, &ingest, &order("c-review-1", big)).await;
    wait_status(&client, &held_url, "fraud_review").await;
    // It is in the review queue, with the fraud check's score and reasons.
    let queue: Value = client
        .get(format!("{query}/v1/reviews?status=pending"))
        .send()
        .await
        .expect("queue")
        .json()
        .await
        .expect("json");
    let queued = &queue["reviews"][0];
    assert_eq!(queued["order_id"], held.as_str(), "{queue}");
    assert_eq!(queued["total_minor"], big);
    assert!(queued["score"].as_f64().is_some(), "{queue}");
    assert!(!queued["reasons"].as_array().expect("reasons").is_empty());
    let (status, body) = post(
        &client,
        &format!("{admin}/v1/orders/{held}/review"),
        &json!({"decision": "maybe", "reviewer": "ops"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "decision");
    let (status, _) = post(
        &client,
        &format!("{admin}/v1/orders/{held}/review"),
        &json!({"decision": "approve", "reviewer": "ops", "note": "known customer"}),
    )
    .await;
    assert_eq!(status, 202);
    let view = wait_final(&client, &held_url).await;
    assert_eq!(view["status"], "confirmed", "{view}");
    let review = |status: &'static str| {
        let (client, query) = (client.clone(), query.clone());
        async move {
            let page: Value = client
                .get(format!("{query}/v1/reviews?status={status}"))
                .send()
                .await
                .expect("queue")
                .json()
                .await
                .expect("json");
            page["reviews"].as_array().cloned().unwrap_or_default()
        }
    };
    let approved = review("approved").await;
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!(approved[0]["order_id"], held.as_str());
    assert_eq!(approved[0]["reviewer"], "ops");
    assert_eq!(approved[0]["note"], "known customer");

    // Another is rejected on review; a decision on an order not under review is a conflict.
    let (held2, held2_url) = place(&client, &ingest, &order("c-review-2", big)).await;
    wait_status(&client, &held2_url, "fraud_review").await;
    let (status, _) = post(
        &client,
        &format!("{admin}/v1/orders/{held2}/review"),
        &json!({"decision": "reject", "reviewer": "ops"}),
    )
    .await;
    assert_eq!(status, 202);
    let view = wait_final(&client, &held2_url).await;
    assert_eq!(view["status"], "rejected", "{view}");
    let (status, body) = post(
        &client,
        &format!("{admin}/v1/orders/{held}/review"),
        &json!({"decision": "reject", "reviewer": "ops"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    // Cancelled while held for review: cancelled, nothing charged.
    let (held3, held3_url) = place(&client, &ingest, &order("c-review-3", big)).await;
    wait_status(&client, &held3_url, "fraud_review").await;
    let (status, _) = post(
        &client,
        &format!("{ingest}/v1/orders/{held3}/cancel"),
        &json!({"reason": "changed my mind"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(wait_final(&client, &held3_url).await["status"], "cancelled");
    let ids = |reviews: Vec<Value>| -> Vec<String> {
        reviews
            .iter()
            .filter_map(|r| r["order_id"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(ids(review("rejected").await), vec![held2.clone()]);
    assert_eq!(ids(review("cancelled").await), vec![held3.clone()]);
    assert!(review("pending").await.is_empty(), "the queue is empty");

    // Cancelled after confirmation: refunded, stock released, cancelled.
    let (normal, normal_url) = place(&client, &ingest, &order("c-cancel", 2500)).await;
    assert_eq!(
        wait_final(&client, &normal_url).await["status"],
        "confirmed"
    );
    let reserved = |units: i64| {
        let (client, query) = (client.clone(), query.clone());
        async move {
            eventually(DEADLINE, &format!("SKU-S1 to hold {units}"), || async {
                let level: Value = client
                    .get(format!("{query}/v1/inventory/SKU-S1"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (level["reserved"] == units).then_some(level)
            })
            .await
        }
    };
    // Stock: 10 restocked; the approved order and this one hold a unit each.
    let level = reserved(2).await;
    assert_eq!(level["restocked"], 10, "{level}");
    assert_eq!(level["available"], 8, "{level}");
    let (status, _) = post(
        &client,
        &format!("{ingest}/v1/orders/{normal}/cancel"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 202);
    wait_status(&client, &normal_url, "cancelled").await;
    // The refunded order gave its unit back.
    let level = reserved(1).await;
    assert_eq!(level["available"], 9, "{level}");
    let (status, _) = (
        client
            .get(format!("{query}/v1/inventory/no-such-sku"))
            .send()
            .await
            .expect("get")
            .status()
            .as_u16(),
        (),
    );
    assert_eq!(status, 404);
    // Nothing left to cancel now; an order nobody placed is not found.
    let (status, _) = post(
        &client,
        &format!("{ingest}/v1/orders/{normal}/cancel"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 409);
    let (status, body) = post(
        &client,
        &format!("{ingest}/v1/orders/{}/cancel", uuid::Uuid::new_v4()),
        &json!({}),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let report = gateway
        .report(Duration::from_secs(5))
        .await
        .expect("report");
    let status_of = |key: &str| {
        report
            .charges
            .iter()
            .find(|c| c.idempotency_key == key)
            .map(|c| (c.status.clone(), c.charges))
    };
    assert_eq!(status_of(&held), Some(("authorized".to_owned(), 1)));
    assert_eq!(status_of(&normal), Some(("refunded".to_owned(), 1)));
    assert_eq!(status_of(&held2), None, "a rejected order is never charged");
    assert_eq!(
        status_of(&held3),
        None,
        "an order cancelled in review is never charged"
    );
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

/// The value of a sample from a text exposition, summed over label sets that match.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_gateway_is_retried_and_broken_off_and_every_order_ends() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = settings(
        &db,
        &[
            ("gateway.failure_rate", "0.3"),
            ("gateway.slow_rate", "0.1"),
            ("gateway.slow_ms", "1500"),
            ("payment.attempt_timeout_ms", "300"),
            ("payment.backoff_initial_ms", "10"),
            ("payment.backoff_max_ms", "100"),
            ("payment.breaker_failures", "3"),
            ("payment.breaker_open_ms", "500"),
        ],
    );
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    let metrics_url = format!("http://{}/metrics", running.ops_addr);
    let gateway = GatewayClient::new(
        &format!("http://{}", running.gateway_addr.expect("gateway")),
        &Default::default(),
    )
    .expect("gateway client");
    let client = reqwest::Client::new();
    restock(&client, &admin, &[("SKU-S1", 100)]).await;

    // Errors and slow answers: retried until answered.
    let mut urls = Vec::new();
    for i in 0..10 {
        urls.push(place(&client, &ingest, &order(&format!("c-fault-{i}"), 1000)).await);
    }
    for (_, url) in &urls {
        assert_eq!(wait_final(&client, url).await["status"], "confirmed");
    }

    // A gateway that fails every call: the breaker opens and the orders wait.
    let broken = Faults {
        latency_ms: 1,
        decline_rate: 0.0,
        failure_rate: 1.0,
        slow_rate: 0.0,
        slow_ms: 0,
    };
    gateway
        .set_faults(&broken, Duration::from_secs(5))
        .await
        .expect("faults");
    let (_, waiting_url) = place(&client, &ingest, &order("c-fault-wait", 1000)).await;
    eventually(DEADLINE, "the circuit breaker to open", || async {
        let text = client
            .get(&metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metric(&text, "orderflow_payment_gateway_circuit_open") == 1.0).then_some(())
    })
    .await;
    let view: Value = client
        .get(&waiting_url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(view["final"], false, "no answer, no outcome: {view}");

    // Healed: the breaker closes and the order ends.
    gateway
        .set_faults(
            &Faults {
                failure_rate: 0.0,
                ..broken
            },
            Duration::from_secs(5),
        )
        .await
        .expect("faults");
    assert_eq!(
        wait_final(&client, &waiting_url).await["status"],
        "confirmed"
    );
    let text = eventually(DEADLINE, "the breaker to close", || async {
        let text = client
            .get(&metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metric(&text, "orderflow_payment_gateway_circuit_open") == 0.0).then_some(text)
    })
    .await;
    assert!(
        metric(&text, "orderflow_payment_gateway_retries_total") > 0.0,
        "retries happened"
    );

    // No order charged twice, though keys were asked again and again.
    let report = gateway
        .report(Duration::from_secs(5))
        .await
        .expect("report");
    assert_eq!(report.charges.len(), 11);
    assert!(report
        .charges
        .iter()
        .all(|c| c.charges == 1 && c.status == "authorized"));
    assert!(
        report.charges.iter().any(|c| c.attempts > 1),
        "some charge was retried: {:?}",
        report.charges
    );
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
