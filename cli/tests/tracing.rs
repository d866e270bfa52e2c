//! One order is one trace: with an in-memory span exporter, the spans of the ingest edge, of
//! every processor step and of every projection write of one order share one trace id and form
//! one tree rooted at the HTTP request. (Its own test binary: the tracer is process-global.)

use std::{collections::HashSet, time::Duration};

use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orderflow::pipeline::{self, Role};
use orderflow_platform::telemetry;
use orderflow_testkit::{
    apply_topics, eventually, order_json, test_settings, wait_final, Broker, Database,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_from_http_to_projection() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = test_settings(Some(&db.url));
    assert!(
        telemetry::init_with_provider(&settings.telemetry, Some(provider.clone())),
        "the subscriber is installed once per test binary"
    );
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");

    let client = reqwest::Client::new();
    orderflow_testkit::restock(
        &client,
        &format!("http://{}", running.admin_addr.expect("admin")),
        &[("SKU-00001", 10)],
    )
    .await;
    let accepted: Value = client
        .post(format!(
            "http://{}/v1/orders",
            running.ingest_addr.expect("ingest")
        ))
        .json(&order_json("customer-1"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status url")
        .to_owned();
    let view = wait_final(&client, &status_url).await;
    assert_eq!(view["status"], "confirmed");

    // Placed, validated and confirmed each pass the saga and the projection; the reservation
    // passes the inventory processor and the payment request the payment worker.
    let spans: Vec<SpanData> = eventually(DEADLINE, "every span of the order", || {
        let exporter = exporter.clone();
        async move {
            let spans = exporter.get_finished_spans().ok()?;
            let root = spans.iter().find(|s| s.name == "ingest.order")?;
            let trace = root.span_context.trace_id();
            let of_trace: Vec<SpanData> = spans
                .into_iter()
                .filter(|s| s.span_context.trace_id() == trace)
                .collect();
            let count = |name: &str| of_trace.iter().filter(|s| s.name == name).count();
            let processors = processors_of(&of_trace);
            (count("process") >= 3
                && count("project") >= 3
                && ["saga", "inventory", "payments"]
                    .iter()
                    .all(|p| processors.contains(*p)))
            .then_some(of_trace)
        }
    })
    .await;

    let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    let roots: Vec<&SpanData> = spans
        .iter()
        .filter(|s| !ids.contains(&s.parent_span_id))
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "one tree: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(roots[0].name, "ingest.order");
    assert_eq!(roots[0].parent_span_id, SpanId::INVALID);
    // The saga's span for OrderPlaced hangs off the HTTP request.
    let root_id = roots[0].span_context.span_id();
    assert!(
        spans
            .iter()
            .any(|s| s.name == "process" && s.parent_span_id == root_id),
        "a processor span is a child of the ingest span"
    );
    // Projection writes hang off the request (OrderPlaced) or a processor span (later events).
    let process_ids: HashSet<SpanId> = spans
        .iter()
        .filter(|s| s.name == "process")
        .map(|s| s.span_context.span_id())
        .collect();
    for span in spans.iter().filter(|s| s.name == "project") {
        assert!(
            span.parent_span_id == root_id || process_ids.contains(&span.parent_span_id),
            "projection span parented outside the order's tree"
        );
    }
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
    let _ = provider.shutdown();
}

/// The `processor` attribute of every `process` span: which processors the trace crossed.
fn processors_of(spans: &[SpanData]) -> std::collections::BTreeSet<String> {
    spans
        .iter()
        .filter(|s| s.name == "process")
        .filter_map(|s| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "processor")
                .map(|kv| kv.value.to_string())
        })
        .collect()
}
