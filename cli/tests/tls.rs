//! TLS on the listeners: the ingest edge over TLS, and the admin listener with mutual TLS — a
//! client certificate from the configured CA gets in, no certificate or one of another CA does
//! not, and plain HTTP to a TLS port gets no HTTP answer.

use std::{sync::Arc, time::Duration};

use orderflow::pipeline::{self, Role};
use orderflow_testkit::{apply_topics, test_settings_with, Broker, Database};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use orderflow_testkit::secure::tls_fixture as fixture;

/// `GET path` over TLS, trusting the test CA, optionally with a client certificate; the status
/// code, or why there is none.
async fn get(addr: std::net::SocketAddr, path: &str, client: Option<&str>) -> Result<u16, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let certs = CertificateDer::pem_file_iter(fixture(&format!("{name}.pem")))
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(fixture(&format!("{name}-key.pem")))
                .map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut answer))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&answer[..n]).into_owned();
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_and_a_mutual_tls_admin_listener() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let (cert, key, ca) = (
        format!("{:?}", fixture("server.pem")),
        format!("{:?}", fixture("server-key.pem")),
        format!("{:?}", fixture("ca.pem")),
    );
    let settings = test_settings_with(
        Some(&db.url),
        &[
            ("ingest.tls.cert_file", &cert),
            ("ingest.tls.key_file", &key),
            ("admin.tls.cert_file", &cert),
            ("admin.tls.key_file", &key),
            ("admin.tls.client_ca_file", &ca),
        ],
    );
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &[Role::Ingest])
        .await
        .expect("pipeline");
    let ingest = running.ingest_addr.expect("ingest");
    let admin = running.admin_addr.expect("admin");

    // The ingest edge speaks TLS, with or without a client certificate (it asks for none).
    assert_eq!(get(ingest, "/healthz", None).await, Ok(200));
    assert_eq!(get(ingest, "/openapi.json", None).await, Ok(200));
    // Plain HTTP to it gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{ingest}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // The admin listener needs a client certificate from the configured CA.
    assert_eq!(get(admin, "/v1/keys", Some("client")).await, Ok(200));
    let none = get(admin, "/v1/keys", None).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let rogue = get(admin, "/v1/keys", Some("rogue-client")).await;
    assert!(rogue.is_err(), "another CA's certificate: {rogue:?}");

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let settings = orderflow_platform::config::TlsSettings {
        cert_file: "/nonexistent/cert.pem".to_owned(),
        key_file: fixture("server-key.pem"),
        client_ca_file: String::new(),
    };
    let err = orderflow_platform::tls::server_config(&settings).expect_err("refused");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}
