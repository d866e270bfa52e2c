//! Span export over HTTPS: `telemetry.otlp_endpoint` on an https collector with a private CA
//! (`telemetry.otlp_tls.ca_file`) receives the process's spans as OTLP/HTTP protobuf. Its own
//! test binary: telemetry installs the process-wide subscriber.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, http::HeaderMap, routing::post, Router};
use orderflow_platform::{config::TlsSettings, http::Server, telemetry, Settings};
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> String {
    format!(
        "{}/../testkit/fixtures/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_that_a_private_ca_signed() {
    // The collector: counts OTLP protobuf posts to /v1/traces.
    let received = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(count): State<Arc<AtomicUsize>>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    if headers
                        .get("content-type")
                        .is_some_and(|v| v == "application/x-protobuf")
                        && !body.is_empty()
                    {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    ""
                },
            ),
        )
        .with_state(received.clone());
    let tls = TlsSettings {
        cert_file: fixture("server.pem"),
        key_file: fixture("server-key.pem"),
        client_ca_file: String::new(),
    };
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = Server::bind_tls(any, router, &tls)
        .await
        .expect("collector");
    let port = server.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));

    let mut settings = Settings::from_defaults(&Default::default())
        .expect("defaults")
        .telemetry;
    settings.otlp_endpoint = format!("https://localhost:{port}/v1/traces");
    settings.otlp_tls.ca_file = fixture("ca.pem");
    let guard = telemetry::init(&settings).expect("telemetry");
    // Only orderflow's own spans are exported.
    tracing::info_span!(target: "orderflow::test", "an exported span")
        .in_scope(|| tracing::info!("inside"));
    // Dropping the guard flushes the batch (on the exporter's own thread).
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .expect("flush");
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no span reached the https collector within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
}

#[test]
fn a_wrong_ca_file_fails_telemetry_setup_by_name() {
    let mut settings = Settings::from_defaults(&Default::default())
        .expect("defaults")
        .telemetry;
    settings.otlp_endpoint = "https://localhost:1/v1/traces".to_owned();
    settings.otlp_tls.ca_file = fixture("no-such-ca.pem");
    let err = match telemetry::init(&settings) {
        Ok(_) => panic!("a missing CA file was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no-such-ca.pem"), "{err}");
}
