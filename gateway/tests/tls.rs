//! The gateway client over HTTPS: a gateway that requires client certificates (the simulated
//! one, with `gateway.tls`) takes a charge from a client with the operator's certificate and
//! the private CA (`payment.tls`), and refuses the handshake otherwise, with the reason.

use std::time::Duration;

use orderflow_gateway::{simulator::Simulator, ChargeRequest, GatewayClient, GatewayError};
use orderflow_platform::{
    config::{ClientTlsSettings, TlsSettings},
    Settings,
};
use orderflow_testkit::secure::tls_fixture;
use tokio_util::sync::CancellationToken;

fn charge(key: &str) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.to_owned(),
        amount_minor: 1200,
        currency: "EUR".to_owned(),
        payment_token: "tok_ok".to_owned(),
    }
}

#[tokio::test]
async fn charges_go_over_mutual_tls_and_a_wrong_identity_is_refused() {
    let mut settings = Settings::from_defaults(&Default::default())
        .expect("defaults")
        .gateway;
    settings.listen = "127.0.0.1:0".parse().expect("addr");
    settings.decline_rate = 0.0;
    settings.tls = TlsSettings {
        cert_file: tls_fixture("server.pem"),
        key_file: tls_fixture("server-key.pem"),
        client_ca_file: tls_fixture("ca.pem"),
    };
    let simulator = Simulator::bind(&settings).await.expect("bind");
    let url = simulator.base_url().expect("url");
    assert!(url.starts_with("https://"), "{url}");
    let stop = CancellationToken::new();
    tokio::spawn(simulator.run(stop.clone()));
    let timeout = Duration::from_secs(10);

    let operator = ClientTlsSettings {
        ca_file: tls_fixture("ca.pem"),
        cert_file: tls_fixture("client.pem"),
        key_file: tls_fixture("client-key.pem"),
    };
    let client = GatewayClient::new(&url, &operator).expect("client");
    let answer = client
        .charge(&charge("k-tls-1"), timeout)
        .await
        .expect("charge");
    assert!(
        matches!(answer, orderflow_gateway::Answer::Authorized { .. }),
        "{answer:?}"
    );
    let report = client.report(timeout).await.expect("report");
    assert_eq!(report.charges.len(), 1, "{report:?}");

    // No client certificate: the gateway ends the handshake; nothing is charged.
    let anonymous = ClientTlsSettings {
        ca_file: tls_fixture("ca.pem"),
        ..Default::default()
    };
    let err = GatewayClient::new(&url, &anonymous)
        .expect("client")
        .charge(&charge("k-tls-2"), timeout)
        .await
        .expect_err("charged without a client certificate");
    assert!(matches!(err, GatewayError::Unreachable(_)), "{err}");

    // Another CA's certificate: refused.
    let rogue = ClientTlsSettings {
        ca_file: tls_fixture("ca.pem"),
        cert_file: tls_fixture("rogue-client.pem"),
        key_file: tls_fixture("rogue-client-key.pem"),
    };
    let err = GatewayClient::new(&url, &rogue)
        .expect("client")
        .charge(&charge("k-tls-3"), timeout)
        .await
        .expect_err("charged with another CA's certificate");
    assert!(matches!(err, GatewayError::Unreachable(_)), "{err}");

    // Without the private CA, the gateway's certificate is not trusted, and the error says so.
    let default_roots = ClientTlsSettings {
        cert_file: tls_fixture("client.pem"),
        key_file: tls_fixture("client-key.pem"),
        ..Default::default()
    };
    let err = GatewayClient::new(&url, &default_roots)
        .expect("client")
        .charge(&charge("k-tls-4"), timeout)
        .await
        .expect_err("trusted a private CA by default");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    let report = client.report(timeout).await.expect("report");
    assert_eq!(
        report.charges.len(),
        1,
        "only the operator's charge: {report:?}"
    );
    stop.cancel();
}
