//! The one place that decides whether processors commit their batches in Kafka transactions
//! (`kafka.transactions`).
//!
//! `auto` asks the broker: a broker that lists EndTxn (API key 26) in its ApiVersions answer
//! has transactions. Tansu with SQLite or PostgreSQL storage lists InitProducerId but not
//! EndTxn, so `init_transactions` would succeed there and the first `commit_transaction` fail.
//! librdkafka keeps the broker's ApiVersions to itself, so the probe sends the request itself:
//! ApiVersions v0, which every Kafka-protocol broker answers (before SASL authentication too),
//! to the first bootstrap server, over TLS when `kafka.security_protocol` says so, with the
//! same CA, client certificate and host-name check as librdkafka's connections.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::config::{ClientTlsSettings, KafkaSettings, Transactions};

const API_VERSIONS: i16 = 18;
const END_TXN: i16 = 26;
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// An ApiVersions answer lists a few hundred bytes of keys; anything near this is not one.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("kafka.brokers is empty")]
    NoBootstrap,
    #[error("asking {server} for its API versions: {source}")]
    Io {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("asking {0} for its API versions: no answer within 10 s")]
    Timeout(String),
    #[error("{server} answered ApiVersions with something else: {problem}")]
    Malformed { server: String, problem: String },
    #[error("{server} refused ApiVersions (error code {code})")]
    Refused { server: String, code: i16 },
    #[error("asking {server} for its API versions over TLS: {reason}")]
    Tls { server: String, reason: String },
}

/// Whether processors use transactions against `bootstrap`, per `settings.transactions`.
pub async fn decide(settings: &KafkaSettings, bootstrap: &str) -> Result<bool, ProbeError> {
    match settings.transactions {
        Transactions::On => Ok(true),
        Transactions::Off => Ok(false),
        Transactions::Auto => supports_transactions(settings, bootstrap).await,
    }
}

/// Whether the first server in `bootstrap` lists EndTxn among its APIs.
pub async fn supports_transactions(
    settings: &KafkaSettings,
    bootstrap: &str,
) -> Result<bool, ProbeError> {
    let server = bootstrap
        .split(',')
        .map(str::trim)
        .find(|s| !s.is_empty())
        .ok_or(ProbeError::NoBootstrap)?;
    let server = server
        .split_once("://")
        .map_or(server, |(_, address)| address)
        .to_owned();
    let keys = tokio::time::timeout(PROBE_TIMEOUT, api_keys(settings, &server))
        .await
        .map_err(|_| ProbeError::Timeout(server.clone()))??;
    Ok(keys.contains(&END_TXN))
}

async fn api_keys(settings: &KafkaSettings, server: &str) -> Result<Vec<i16>, ProbeError> {
    let io = |source| ProbeError::Io {
        server: server.to_owned(),
        source,
    };
    let tcp = TcpStream::connect(server).await.map_err(io)?;
    if !settings.security_protocol.uses_tls() {
        return exchange(tcp, server).await;
    }
    let tls_error = |reason: String| ProbeError::Tls {
        server: server.to_owned(),
        reason,
    };
    let tls = &settings.tls;
    let config = crate::tls::kafka_probe_config(
        &ClientTlsSettings {
            ca_file: tls.ca_file.clone(),
            cert_file: tls.cert_file.clone(),
            key_file: tls.key_file.clone(),
        },
        tls.verify_hostname,
    )
    .map_err(|e| tls_error(e.to_string()))?;
    let host = server
        .rsplit_once(':')
        .map_or(server, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|e| tls_error(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(e.to_string()))?;
    exchange(stream, server).await
}

/// Sends ApiVersions v0 on `stream` and reads the API keys of the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    server: &str,
) -> Result<Vec<i16>, ProbeError> {
    let io = |source| ProbeError::Io {
        server: server.to_owned(),
        source,
    };
    stream.write_all(&request(1)).await.map_err(io)?;
    let size = stream.read_i32().await.map_err(io)?;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= MAX_RESPONSE_BYTES)
        .ok_or_else(|| ProbeError::Malformed {
            server: server.to_owned(),
            problem: format!("response size {size}"),
        })?;
    let mut body = vec![0; size];
    stream.read_exact(&mut body).await.map_err(io)?;
    parse(&body, 1).map_err(|e| match e {
        Parsed::Malformed(problem) => ProbeError::Malformed {
            server: server.to_owned(),
            problem,
        },
        Parsed::Refused(code) => ProbeError::Refused {
            server: server.to_owned(),
            code,
        },
    })
}

/// ApiVersions v0: size, then header v1 (api key, version, correlation id, client id), no body.
fn request(correlation_id: i32) -> Vec<u8> {
    const CLIENT_ID: &[u8] = b"orderflow-probe";
    let mut message = Vec::new();
    message.extend_from_slice(&API_VERSIONS.to_be_bytes());
    message.extend_from_slice(&0i16.to_be_bytes());
    message.extend_from_slice(&correlation_id.to_be_bytes());
    message.extend_from_slice(&(CLIENT_ID.len() as i16).to_be_bytes());
    message.extend_from_slice(CLIENT_ID);
    let mut framed = (message.len() as i32).to_be_bytes().to_vec();
    framed.extend(message);
    framed
}

enum Parsed {
    Malformed(String),
    Refused(i16),
}

/// ApiVersions v0 response: correlation id, error code, then `[api key, min, max]`.
fn parse(body: &[u8], correlation_id: i32) -> Result<Vec<i16>, Parsed> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], Parsed> {
        let slice = body
            .get(at..at + n)
            .ok_or_else(|| Parsed::Malformed(format!("truncated at byte {at}")))?;
        at += n;
        Ok(slice)
    };
    let i16_of = |b: &[u8]| i16::from_be_bytes([b[0], b[1]]);
    let got = take(4)?;
    let got = i32::from_be_bytes([got[0], got[1], got[2], got[3]]);
    if got != correlation_id {
        return Err(Parsed::Malformed(format!(
            "correlation id {got}, expected {correlation_id}"
        )));
    }
    let code = i16_of(take(2)?);
    if code != 0 {
        return Err(Parsed::Refused(code));
    }
    let count = take(4)?;
    let count = i32::from_be_bytes([count[0], count[1], count[2], count[3]]);
    let count =
        usize::try_from(count).map_err(|_| Parsed::Malformed(format!("{count} API keys")))?;
    let mut keys = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let entry = take(6)?;
        keys.push(i16_of(&entry[0..2]));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(correlation_id: i32, code: i16, keys: &[i16]) -> Vec<u8> {
        let mut body = correlation_id.to_be_bytes().to_vec();
        body.extend_from_slice(&code.to_be_bytes());
        body.extend_from_slice(&(keys.len() as i32).to_be_bytes());
        for key in keys {
            body.extend_from_slice(&key.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            body.extend_from_slice(&3i16.to_be_bytes());
        }
        body
    }

    #[test]
    fn the_request_is_a_framed_api_versions_v0() {
        let bytes = request(7);
        let size = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(size, bytes.len() - 4);
        assert_eq!(&bytes[4..6], &API_VERSIONS.to_be_bytes());
        assert_eq!(&bytes[6..8], &0i16.to_be_bytes());
        assert_eq!(&bytes[8..12], &7i32.to_be_bytes());
    }

    #[test]
    fn a_broker_listing_end_txn_has_transactions() {
        let keys = parse(&response(1, 0, &[0, 1, 18, 22, 26]), 1).unwrap_or_default();
        assert!(keys.contains(&END_TXN));
        let keys = parse(&response(1, 0, &[0, 1, 18, 22]), 1).unwrap_or_default();
        assert!(
            !keys.contains(&END_TXN),
            "InitProducerId alone is not enough"
        );
    }

    #[test]
    fn bad_answers_are_errors() {
        assert!(matches!(
            parse(&response(2, 0, &[26]), 1),
            Err(Parsed::Malformed(_))
        ));
        assert!(matches!(
            parse(&response(1, 35, &[]), 1),
            Err(Parsed::Refused(35))
        ));
        let mut truncated = response(1, 0, &[0, 26]);
        truncated.truncate(12);
        assert!(matches!(parse(&truncated, 1), Err(Parsed::Malformed(_))));
    }

    #[tokio::test]
    async fn modes_on_and_off_do_not_ask_the_broker() {
        let mut settings = crate::Settings::from_defaults(&Default::default())
            .expect("defaults")
            .kafka;
        settings.transactions = Transactions::On;
        assert!(decide(&settings, "").await.unwrap_or(false));
        settings.transactions = Transactions::Off;
        assert!(!decide(&settings, "").await.unwrap_or(true));
        settings.transactions = Transactions::Auto;
        assert!(matches!(
            decide(&settings, " ").await,
            Err(ProbeError::NoBootstrap)
        ));
    }
}
