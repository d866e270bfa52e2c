//! The ingest edge over HTTP against the embedded broker (and the mock cluster, where the broker
//! goes down): what is accepted, what is refused and how, and that a broker outage answers 503
//! instead of hanging or lying.

use std::{sync::Arc, time::Duration};

use orderflow_ingest::{IngestState, Publisher};
use orderflow_platform::{config::Overrides, http::Server, kafka::KafkaClients, Settings};
use orderflow_schemas::Codec;
use orderflow_testkit::Broker;
use orderflow_topics::{
    apply::{apply, Provisioner},
    names, Catalog,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Edge {
    url: String,
    clients: KafkaClients,
    cancel: CancellationToken,
    limits: orderflow_ingest::RateLimits,
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(broker: &Broker) -> Edge {
    start_with(broker, &[]).await
}

async fn start_with(broker: &Broker, extra: &[(&str, &str)]) -> Edge {
    let mut overrides = Overrides::default();
    for (key, value) in extra {
        overrides.set(*key, value);
    }
    overrides.set("ingest.max_body_bytes", "4096");
    let settings = Settings::from_defaults(&overrides).expect("settings");
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let provisioner = match broker.as_mock() {
        Some(mock) => Provisioner::Mock(mock),
        None => Provisioner::Admin,
    };
    apply(&Catalog::load().expect("catalog"), &clients, provisioner)
        .await
        .expect("topics");
    let codec = Arc::new(Codec::new().expect("codec"));
    let limits = orderflow_ingest::RateLimits::new(&settings.ingest.limits());
    let publisher = Publisher::new(&clients, codec, names::ORDERS_EVENTS, None).expect("publisher");
    let state = IngestState {
        switches: orderflow_platform::switches::Switches::new(
            &settings,
            &orderflow_platform::metrics::MetricsRegistry::new(),
        ),
        replays: None,
        publisher,
        status_base_url: "http://query.example".into(),
        metrics: orderflow_ingest::IngestMetrics::unregistered(),
        max_batch_orders: 5,
        limits: limits.clone(),
        directory: None,
        orders_topic: names::ORDERS_EVENTS,
        inventory_topic: names::INVENTORY_COMMANDS,
        // Authentication, idempotency and per-principal limits: cli/tests/edge.rs.
        auth: orderflow_auth::Authenticator::disabled(),
        idempotency: None,
        dead_letters: None,
    };
    let router = orderflow_ingest::router(state, settings.ingest.max_body_bytes);
    let server = Server::bind("127.0.0.1:0".parse().expect("addr"), router)
        .await
        .expect("bind");
    let url = format!("http://{}", server.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(cancel.clone()));
    Edge {
        url,
        clients,
        cancel,
        limits,
    }
}

fn order() -> Value {
    orderflow_testkit::order_json("c-1")
}

fn records_on_orders_topic(clients: &KafkaClients) -> i64 {
    let consumer: BaseConsumer = clients
        .consumer("test", "test-count")
        .create()
        .expect("consumer");
    (0..6)
        .map(|p| {
            consumer
                .fetch_watermarks(names::ORDERS_EVENTS, p, Duration::from_secs(10))
                .map(|(low, high)| high - low)
                .expect("watermarks")
        })
        .sum()
}

async fn post(
    edge: &Edge,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/orders", edge.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

#[tokio::test]
async fn accepted_orders_are_on_the_topic() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let edge = start(&broker).await;
    let (status, headers, body) =
        post(&edge, "application/json", order().to_string().into_bytes()).await;
    assert_eq!(status, 202, "{body}");
    let order_id = body["order_id"].as_str().expect("order id");
    assert_eq!(
        body["status_url"],
        format!("http://query.example/v1/orders/{order_id}")
    );
    assert_eq!(
        headers["location"],
        body["status_url"].as_str().expect("url")
    );
    assert_eq!(body["version"], 1);
    assert_eq!(records_on_orders_topic(&edge.clients), 1);
}

/// Everything every test of this binary logs, at every level.
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct Sink(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut logs) = self.0.lock() {
                    logs.extend_from_slice(buf);
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Sink(logs))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
}

#[tokio::test]
async fn card_numbers_never_reach_the_log() {
    let logs = captured_logs();
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let edge = start(&broker).await;
    let mut in_token = order();
    in_token["payment_token"] = json!("4111111111111111");
    let mut in_name = order();
    in_name["shipping_address"]["name"] = json!("pay with 5555 5555 5555 4444 please");
    for body in [&in_token, &in_name] {
        let (status, _, problem) =
            post(&edge, "application/json", body.to_string().into_bytes()).await;
        assert_eq!(status, 422, "{problem}");
    }
    let batch = format!("{in_token}\n{}\n", order());
    let (status, answer) = post_batch(&edge, "application/x-ndjson", batch).await;
    assert_eq!(status, 200);
    assert_eq!(answer["results"][0]["status"], 422);
    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    // The capture works: the refusal itself is logged (naming the field)...
    assert!(text.contains("card data"), "nothing captured: {text}");
    // ...and no form of either number is.
    for digits in [
        "4111111111111111",
        "5555555555554444",
        "5555 5555 5555 4444",
        "41111111",
    ] {
        assert!(!text.contains(digits), "{digits} reached the log");
    }
}

#[tokio::test]
async fn bad_requests_are_problems_and_write_nothing() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let edge = start(&broker).await;
    let mut missing = order();
    missing.as_object_mut().expect("object").remove("currency");
    let mut card = order();
    card["payment_token"] = json!("4111 1111 1111 1111");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "text/plain",
            order().to_string().into_bytes(),
            415,
            "unsupported-media-type",
        ),
        (
            "application/json",
            b"{\"customer_id\":".to_vec(),
            400,
            "malformed-json",
        ),
        (
            "application/json",
            missing.to_string().into_bytes(),
            422,
            "invalid-order",
        ),
        (
            "application/json",
            card.to_string().into_bytes(),
            422,
            "card-data-refused",
        ),
        (
            "application/json",
            vec![b' '; 10_000],
            413,
            "body-too-large",
        ),
    ];
    for (content_type, body, want, kind) in cases {
        let (status, headers, problem) = post(&edge, content_type, body).await;
        assert_eq!(status, want, "{problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(problem["type"], format!("urn:orderflow:problem:{kind}"));
        assert_eq!(problem["status"], want);
        assert!(
            !problem.to_string().contains("4111"),
            "card number echoed: {problem}"
        );
    }
    let mut invalid = order();
    invalid["customer_id"] = json!("");
    invalid["lines"] = json!([]);
    let (status, _, problem) =
        post(&edge, "application/json", invalid.to_string().into_bytes()).await;
    assert_eq!(status, 422);
    let fields: Vec<_> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(fields, ["customer_id", "lines"]);
    assert_eq!(records_on_orders_topic(&edge.clients), 0);

    let unknown = reqwest::get(format!("{}/v2/nothing", edge.url))
        .await
        .expect("get");
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );
}

async fn post_batch(edge: &Edge, content_type: &str, body: String) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/orders/batch", edge.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_batch_answers_each_order_and_publishes_the_valid_ones() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let edge = start(&broker).await;
    let mut invalid = order();
    invalid["lines"] = json!([]);
    let array = json!([order(), invalid, order()]).to_string();
    let (status, answer) = post_batch(&edge, "application/json", array).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["refused"].as_u64()),
        (Some(2), Some(1))
    );
    let statuses: Vec<_> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["index"].as_u64(), r["status"].as_u64()))
        .collect();
    assert_eq!(
        statuses,
        [
            (Some(0), Some(202)),
            (Some(1), Some(422)),
            (Some(2), Some(202))
        ]
    );
    assert_eq!(
        answer["results"][1]["problem"]["type"],
        "urn:orderflow:problem:invalid-order"
    );
    let accepted: Vec<String> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["accepted"]["order_id"].as_str().map(str::to_owned))
        .collect();

    // NDJSON: one order per line, a malformed line answered on its own.
    let ndjson = format!("{}\n{{not json\n\n{}\n", order(), order());
    let (status, answer) = post_batch(&edge, "application/x-ndjson", ndjson).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["refused"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(answer["results"][1]["status"], 400);

    let on_topic = order_ids_on_topic(&edge.clients);
    for id in &accepted {
        assert!(on_topic.contains(id), "accepted {id} is not on the topic");
    }
    assert_eq!(
        on_topic.len(),
        4,
        "exactly the accepted orders were written"
    );

    // Bounds and media type.
    let too_many = serde_json::Value::Array(vec![order(); 6]).to_string();
    let (status, problem) = post_batch(&edge, "application/json", too_many).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["type"], "urn:orderflow:problem:invalid-batch");
    let (status, _) = post_batch(&edge, "application/json", "[]".to_owned()).await;
    assert_eq!(status, 422);
    let (status, _) = post_batch(&edge, "text/csv", "a,b".to_owned()).await;
    assert_eq!(status, 415);
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers_recover_and_reload() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let edge = start_with(
        &broker,
        &[
            ("ingest.rate_limit_per_ip_per_second", "1"),
            ("ingest.rate_limit_burst", "2"),
        ],
    )
    .await;
    let body = || order().to_string().into_bytes();
    // Three at once, so that no token comes back while the broker acknowledges (which on the
    // embedded broker can take a second for a producer's first record): the burst of two
    // passes, the third is refused.
    let (a, b, c) = tokio::join!(
        post(&edge, "application/json", body()),
        post(&edge, "application/json", body()),
        post(&edge, "application/json", body()),
    );
    let mut answers = [a, b, c];
    answers.sort_by_key(|(status, _, _)| *status);
    let [(first, first_headers, _), (second, second_headers, _), (status, headers, problem)] =
        answers;
    assert_eq!((first, second), (202, 202));
    assert_eq!(first_headers["ratelimit-limit"], "2");
    let mut remaining = [
        first_headers["ratelimit-remaining"]
            .to_str()
            .unwrap_or_default(),
        second_headers["ratelimit-remaining"]
            .to_str()
            .unwrap_or_default(),
    ];
    remaining.sort_unstable();
    assert_eq!(remaining, ["0", "1"]);
    assert_eq!(status, 429, "{problem}");
    assert_eq!(problem["type"], "urn:orderflow:problem:rate-limited");
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    assert_eq!(headers["ratelimit-remaining"], "0");

    // The bucket refills at one request per second.
    orderflow_testkit::eventually(
        Duration::from_secs(10),
        "the limit to let a request through",
        || async {
            let (status, _, _) = post(&edge, "application/json", body()).await;
            (status == 202).then_some(())
        },
    )
    .await;

    // A reloaded, larger limit takes effect at once.
    let mut overrides = Overrides::default();
    overrides.set("ingest.rate_limit_per_ip_per_second", "100");
    overrides.set("ingest.rate_limit_burst", "50");
    edge.limits.reload(
        &Settings::from_defaults(&overrides)
            .expect("settings")
            .ingest
            .limits(),
    );
    for _ in 0..5 {
        let (status, headers, _) = post(&edge, "application/json", body()).await;
        assert_eq!(status, 202);
        assert_eq!(headers["ratelimit-limit"], "50");
    }
    // Health checks are never limited.
    let health = reqwest::get(format!("{}/healthz", edge.url))
        .await
        .expect("get");
    assert!(!health.headers().contains_key("ratelimit-limit"));
}

/// Every order id in a record on orders.events.
fn order_ids_on_topic(clients: &KafkaClients) -> std::collections::BTreeSet<String> {
    use rdkafka::{message::Message, Offset, TopicPartitionList};
    let codec = Codec::new().expect("codec");
    let consumer: BaseConsumer = clients
        .consumer("test", &format!("test-{}", uuid::Uuid::new_v4()))
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..6 {
        let (low, high) = consumer
            .fetch_watermarks(names::ORDERS_EVENTS, p, Duration::from_secs(10))
            .expect("watermarks");
        remaining += high - low;
        tpl.add_partition_offset(names::ORDERS_EVENTS, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut ids = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading the topic timed out"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("record");
            let event = codec
                .decode(message.payload().unwrap_or_default())
                .expect("decodes");
            ids.insert(event.envelope().order_id.clone());
            remaining -= 1;
        }
    }
    ids
}

#[tokio::test]
async fn broker_down_answers_503_and_never_202() {
    let broker = Broker::mock();
    let edge = start(&broker).await;
    let mut accepted = Vec::new();
    let (status, _, body) = post(&edge, "application/json", order().to_string().into_bytes()).await;
    assert_eq!(status, 202);
    accepted.push(body["order_id"].as_str().expect("id").to_owned());

    let cluster = broker.as_mock().expect("mock").cluster();
    cluster.broker_down(1).expect("broker down");
    let (status, headers, problem) =
        post(&edge, "application/json", order().to_string().into_bytes()).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(problem["type"], "urn:orderflow:problem:unavailable");
    assert!(
        !problem.to_string().to_lowercase().contains("kafka"),
        "internals leaked: {problem}"
    );

    // Back up: orders are accepted again once the producer has reconnected.
    cluster.broker_up(1).expect("broker up");
    let id = orderflow_testkit::eventually(
        Duration::from_secs(30),
        "a 202 after the broker is back",
        || async {
            let (status, _, body) =
                post(&edge, "application/json", order().to_string().into_bytes()).await;
            (status == 202).then(|| body["order_id"].as_str().unwrap_or_default().to_owned())
        },
    )
    .await;
    accepted.push(id);

    // Every 202 names an order that is on the topic.
    let on_topic = order_ids_on_topic(&edge.clients);
    for id in &accepted {
        assert!(
            on_topic.contains(id),
            "order {id} was accepted but is not on the topic"
        );
    }
}
