//! Security of the outbound connections, against real TLS endpoints on this machine:
//!
//! - Kafka over TLS: the whole pipeline against a broker reachable only through TLS (Tansu
//!   behind stunnel, advertising the TLS port), and a wrong CA refused with a clear error;
//! - Kafka over SASL/SCRAM and TLS: a broker that requires SASL takes a client with the right
//!   password, and refuses a wrong password and a client without SASL, saying why;
//! - PostgreSQL over TLS: a cluster of the test's own with `ssl = on`; `verify-full` with the
//!   right CA connects encrypted and migrates, a wrong CA is refused;
//! - `orderflow review` over HTTPS to an admin listener that requires client certificates.

use std::{process::Command, time::Duration};

use orderflow::pipeline::{self, Role};
use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_testkit::{
    eventually, place_order, restock,
    secure::{tls_fixture, SecureBroker, TlsPostgres, SCRAM_PASSWORD, SCRAM_USER},
    test_settings_with, wait_final, wait_status, Broker, Database, TANSU_OVERRIDES,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    Message,
};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);
/// The `--set` that makes clients speak TLS to the brokers.
const SSL: &str = "kafka.security_protocol=\"ssl\"";

fn quoted(path: &str) -> String {
    format!("{path:?}")
}

/// Settings for the TLS broker: Tansu's, plus `extra`.
fn broker_settings(db: &Database, extra: &[(&str, &str)]) -> Settings {
    let mut all: Vec<(&str, &str)> = TANSU_OVERRIDES.to_vec();
    all.extend_from_slice(extra);
    test_settings_with(Some(&db.url), &all)
}

async fn apply_catalog(settings: &Settings, bootstrap: &str) {
    use orderflow_topics::apply::{apply, Provisioner};
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let catalog = orderflow_topics::Catalog::load().expect("catalog");
    let report = apply(&catalog, &clients, Provisioner::Admin)
        .await
        .unwrap_or_else(|e| panic!("topics apply over TLS: {e}"));
    assert!(!report.has_drift(), "{report}");
}

fn order(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "currency": "EUR",
        "lines": [{"sku": "SKU-T1", "quantity": 1, "unit_price_minor": 1500}],
        "shipping_address": {"name": "Test", "line1": "1 Road", "city": "Town", "postal_code": "12345", "country": "DE"},
        "payment_token": "tok_ok",
        "shipping_minor": 0,
        "total_minor": 1500
    })
}

/// `orderflow topics apply` against `bootstrap` with each `KEY=VALUE` of `sets`: whether it
/// succeeded, and what it printed.
fn topics_apply(bootstrap: &str, sets: &[String]) -> (bool, String) {
    let mut args = vec!["topics", "apply", "--kafka-brokers", bootstrap];
    for set in sets {
        args.extend(["--set", set.as_str()]);
    }
    orderflow(&args)
}

/// `orderflow ARGS…`, its exit status and stderr.
fn orderflow(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env_remove("ORDERFLOW_KAFKA__BROKERS")
        .output()
        .expect("run orderflow");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_kafka_tls_and_a_wrong_ca_is_refused() {
    let Some(broker) = SecureBroker::tls() else {
        return;
    };
    let db = Database::sqlite();
    let ca = quoted(&tls_fixture("ca.pem"));
    let settings = broker_settings(
        &db,
        &[
            ("kafka.security_protocol", "\"ssl\""),
            ("kafka.tls.ca_file", &ca),
        ],
    );
    apply_catalog(&settings, &broker.bootstrap).await;
    let running = pipeline::start(&settings, &broker.bootstrap, &Role::ALL)
        .await
        .expect("pipeline over TLS");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    let client = reqwest::Client::new();
    restock(&client, &admin, &[("SKU-T1", 5)]).await;
    let accepted = place_order(&client, &ingest, &order("c-tls-1")).await;
    let status_url = accepted["status_url"].as_str().expect("status url");
    let view = wait_final(&client, status_url).await;
    assert_eq!(view["status"], "confirmed", "{view}");
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");

    // Plaintext to the TLS port gets nowhere: the broker is only reachable through TLS.
    let (ok, output) = topics_apply(&broker.bootstrap, &[]);
    assert!(!ok, "plaintext to a TLS port: {output}");

    // A CA that did not sign the broker's certificate: refused, and the error says why.
    let rogue = format!("kafka.tls.ca_file={}", quoted(&tls_fixture("rogue-ca.pem")));
    let (ok, output) = topics_apply(&broker.bootstrap, &[SSL.to_owned(), rogue]);
    assert!(!ok, "a wrong CA was accepted: {output}");
    assert!(
        output.contains("certificate verify failed"),
        "the error should name the certificate check: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_scram_and_tls_authenticates_and_refuses_a_wrong_password() {
    let Some(broker) = SecureBroker::tls_and_scram() else {
        return;
    };
    let db = Database::sqlite();
    let dir = orderflow_testkit::TempDir::new();
    let password_file = dir.0.join("kafka-password");
    std::fs::write(&password_file, format!("{SCRAM_PASSWORD}\n")).expect("write password");
    let ca = quoted(&tls_fixture("ca.pem"));
    let password_file = quoted(&password_file.display().to_string());
    let user = quoted(SCRAM_USER);
    let mut settings = test_settings_with(
        Some(&db.url),
        &[
            ("kafka.security_protocol", "\"sasl_ssl\""),
            ("kafka.tls.ca_file", &ca),
            ("kafka.sasl.mechanism", "\"SCRAM-SHA-512\""),
            ("kafka.sasl.username", &user),
            ("kafka.sasl.password_file", &password_file),
            ("kafka.properties.socket.keepalive.enable", "true"),
        ],
    );
    assert_eq!(
        settings.kafka.sasl.password.expose(),
        Some(SCRAM_PASSWORD),
        "the password comes from its file"
    );
    let shown = settings.to_toml();
    assert!(
        !shown.contains(SCRAM_PASSWORD),
        "config show leaks: {shown}"
    );
    // The embedded broker's Tansu has no transactions; `auto` asks it, over TLS.
    settings.kafka.transactions = orderflow_platform::config::Transactions::Auto;
    apply_catalog(&settings, &broker.bootstrap).await;
    assert!(
        !orderflow_platform::transactions::supports_transactions(
            &settings.kafka,
            &broker.bootstrap
        )
        .await
        .expect("the transactions probe speaks TLS"),
        "Tansu with SQLite storage lists no EndTxn"
    );

    // A record through SASL_SSL and back.
    let clients = KafkaClients::new(&settings.kafka, &broker.bootstrap);
    let producer: FutureProducer = clients
        .idempotent_producer("test")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to("inventory.commands")
                .key("SKU-SASL")
                .payload("hello over sasl_ssl"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered over SASL_SSL");
    let consumer: BaseConsumer = clients
        .consumer("test", "transport-test")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&["inventory.commands"])
        .expect("subscribe");
    let payload = eventually(DEADLINE, "the record to come back", || {
        let message = consumer.poll(Duration::from_millis(200));
        let payload = message.and_then(Result::ok).and_then(|m| {
            m.payload_view::<str>()
                .and_then(Result::ok)
                .map(str::to_owned)
        });
        async move { payload }
    })
    .await;
    assert_eq!(payload, "hello over sasl_ssl");

    // A wrong password is refused, and the error says so.
    let wrong = dir.0.join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    let trusted = format!("kafka.tls.ca_file={ca}");
    let (ok, output) = topics_apply(
        &broker.bootstrap,
        &[
            "kafka.security_protocol=\"sasl_ssl\"".to_owned(),
            trusted.clone(),
            "kafka.sasl.mechanism=\"SCRAM-SHA-512\"".to_owned(),
            format!("kafka.sasl.username={user}"),
            format!(
                "kafka.sasl.password_file={}",
                quoted(&wrong.display().to_string())
            ),
        ],
    );
    assert!(!ok, "a wrong password was accepted: {output}");
    assert!(
        output.contains("SASL authentication error"),
        "the error should name SASL: {output}"
    );
    // So is a client that does not authenticate at all.
    let (ok, output) = topics_apply(&broker.bootstrap, &[SSL.to_owned(), trusted]);
    assert!(!ok, "a client without SASL was served: {output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server_and_refuses_a_wrong_ca() {
    let Some(server) = TlsPostgres::start() else {
        return;
    };
    let url = quoted(&server.url());
    let connect = |mode: &str, ca: &str| {
        let ca = if ca.is_empty() {
            String::from("\"\"")
        } else {
            quoted(&tls_fixture(ca))
        };
        let settings = test_settings_with(
            None,
            &[
                ("database.url", &url),
                ("database.tls.mode", &format!("{mode:?}")),
                ("database.tls.ca_file", &ca),
            ],
        );
        async move {
            orderflow_db::Database::connect(settings.database_url(), 2)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let ssl_in_use = |db: orderflow_db::Database| async move {
        // As text: the Any driver maps no PostgreSQL boolean column type it was not told of.
        let row: (String,) = sqlx::query_as(
            "SELECT CASE WHEN ssl THEN 'on' ELSE 'off' END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .fetch_one(db.pool())
        .await
        .expect("pg_stat_ssl");
        row.0 == "on"
    };

    // verify-full with the CA that signed the server's certificate: encrypted, and the
    // pipeline's schema migrates over it.
    let db = connect("verify-full", "ca.pem").await.expect("verify-full");
    db.migrate().await.expect("migrations over TLS");
    assert!(ssl_in_use(db).await, "verify-full connected without TLS");
    // The check is real: without TLS the same server says so.
    let plain = connect("disable", "").await.expect("sslmode=disable");
    assert!(!ssl_in_use(plain).await, "sslmode=disable reported TLS");

    // A CA that did not sign it: refused, naming the certificate.
    let err = connect("verify-full", "rogue-ca.pem")
        .await
        .expect_err("a wrong CA was accepted");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "the error should name the certificate: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_reaches_a_mutual_tls_admin_listener_with_a_client_certificate() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let (cert, key, ca) = (
        quoted(&tls_fixture("server.pem")),
        quoted(&tls_fixture("server-key.pem")),
        quoted(&tls_fixture("ca.pem")),
    );
    let settings = test_settings_with(
        Some(&db.url),
        &[
            ("admin.tls.cert_file", &cert),
            ("admin.tls.key_file", &key),
            ("admin.tls.client_ca_file", &ca),
            // Every order is held for review.
            ("fraud.review_amount_minor", "1"),
        ],
    );
    orderflow_testkit::apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!(
        "https://localhost:{}",
        running.admin_addr.expect("admin").port()
    );
    // Restock over the admin listener, with the client certificate.
    let tls = orderflow_platform::config::ClientTlsSettings {
        ca_file: tls_fixture("ca.pem"),
        cert_file: tls_fixture("client.pem"),
        key_file: tls_fixture("client-key.pem"),
    };
    let admin_client = orderflow_platform::tls::http_client(&tls)
        .expect("client TLS")
        .build()
        .expect("client");
    restock(&admin_client, &admin, &[("SKU-T1", 5)]).await;
    let client = reqwest::Client::new();
    let accepted = place_order(&client, &ingest, &order("c-review-tls")).await;
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    let status_url = accepted["status_url"].as_str().expect("url").to_owned();
    wait_status(&client, &status_url, "fraud_review").await;

    let review = |extra: &[&str]| {
        let mut args = vec![
            "review",
            &order_id,
            "approve",
            "--reviewer",
            "ops",
            "--url",
            &admin,
        ];
        args.extend_from_slice(extra);
        orderflow(&args)
    };
    let (ca_file, client_cert, client_key, rogue_cert, rogue_key) = (
        tls_fixture("ca.pem"),
        tls_fixture("client.pem"),
        tls_fixture("client-key.pem"),
        tls_fixture("rogue-client.pem"),
        tls_fixture("rogue-client-key.pem"),
    );
    // No client certificate, or one of another CA: the listener refuses the handshake.
    let (ok, output) = review(&["--ca-file", &ca_file]);
    assert!(!ok, "reviewed without a client certificate: {output}");
    assert!(output.contains("reaching the admin listener"), "{output}");
    let (ok, output) = review(&[
        "--ca-file",
        &ca_file,
        "--cert-file",
        &rogue_cert,
        "--key-file",
        &rogue_key,
    ]);
    assert!(!ok, "reviewed with another CA's certificate: {output}");
    // Without the private CA the listener's certificate is not trusted.
    let (ok, output) = review(&["--cert-file", &client_cert, "--key-file", &client_key]);
    assert!(
        !ok,
        "trusted a private CA's certificate by default: {output}"
    );
    assert!(
        output.contains("certificate") || output.contains("UnknownIssuer"),
        "{output}"
    );
    // The operator's certificate gets in, and the decision takes effect.
    let (ok, output) = review(&[
        "--ca-file",
        &ca_file,
        "--cert-file",
        &client_cert,
        "--key-file",
        &client_key,
    ]);
    assert!(ok, "review over mutual TLS failed: {output}");
    let view = wait_final(&client, &status_url).await;
    assert_eq!(view["status"], "confirmed", "{view}");

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
