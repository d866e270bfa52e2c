//! TLS (rustls, ring provider) of the HTTP listeners and of the outbound HTTPS clients.
//!
//! A listener: a server certificate and key from PEM files and, when `client_ca_file` is set,
//! mutual TLS — every client must present a certificate signed by one of those CAs, or the
//! handshake fails before any HTTP is read.
//!
//! A client (payment gateway, OTLP exporter, `orderflow review`): the Mozilla roots, or only the
//! CAs of `ca_file` when set, and a client certificate when `cert_file` is set. Kafka's TLS is
//! librdkafka's (OpenSSL), set up in [`crate::kafka`]; PostgreSQL's is sqlx's, from the URL.

use std::{path::Path, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{ClientTlsSettings, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA ({path}): {reason}")]
    ClientCa { path: String, reason: String },
    #[error("CA ({path}): {reason}")]
    Ca { path: String, reason: String },
    #[error("HTTP client: {0}")]
    Http(String),
}

fn file_error(path: &str, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The rustls server configuration `tls` describes (HTTP/1.1 and HTTP/2 by ALPN).
pub fn server_config(tls: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(Path::new(&tls.key_file))
        .map_err(|e| file_error(&tls.key_file, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if tls.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&tls.client_ca_file)? {
            roots.add(cert).map_err(|e| TlsError::ClientCa {
                path: tls.client_ca_file.clone(),
                reason: e.to_string(),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::ClientCa {
                path: tls.client_ca_file.clone(),
                reason: e.to_string(),
            })?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls client configuration `tls` describes, speaking HTTP/1.1.
pub fn client_config(tls: &ClientTlsSettings) -> Result<ClientConfig, TlsError> {
    let mut config = client_base(tls, true)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The configuration of the transactions probe's TLS connection to a Kafka broker
/// ([`crate::transactions`]): the same CAs, client certificate and host-name check
/// (`kafka.tls.verify_hostname`) as librdkafka's own connections.
pub fn kafka_probe_config(
    tls: &ClientTlsSettings,
    verify_hostname: bool,
) -> Result<ClientConfig, TlsError> {
    client_base(tls, verify_hostname)
}

fn client_base(tls: &ClientTlsSettings, verify_hostname: bool) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if tls.ca_file.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        for cert in certificates(&tls.ca_file)? {
            roots.add(cert).map_err(|e| TlsError::Ca {
                path: tls.ca_file.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if verify_hostname {
        builder.with_root_certificates(roots)
    } else {
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::Ca {
                path: tls.ca_file.clone(),
                reason: e.to_string(),
            })?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
    };
    if tls.cert_file.is_empty() {
        Ok(builder.with_no_client_auth())
    } else {
        let certs = certificates(&tls.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(Path::new(&tls.key_file))
            .map_err(|e| file_error(&tls.key_file, e))?;
        Ok(builder.with_client_auth_cert(certs, key)?)
    }
}

/// Checks the chain as the WebPKI verifier does, but accepts a certificate for another name:
/// what `kafka.tls.verify_hostname = false` asks of librdkafka, asked of rustls.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A reqwest client builder that speaks TLS as `tls` says (for https URLs; http stays plain).
pub fn http_client(tls: &ClientTlsSettings) -> Result<reqwest::ClientBuilder, TlsError> {
    Ok(reqwest::Client::builder().use_preconfigured_tls(client_config(tls)?))
}

/// The OTLP exporter's HTTP client (reqwest 0.13, which opentelemetry-http takes), with the
/// same TLS as every other client. Blocking: the SDK's batch processor exports from a thread
/// of its own, outside any Tokio runtime.
pub fn otlp_http_client(
    tls: &ClientTlsSettings,
) -> Result<reqwest_otlp::blocking::Client, TlsError> {
    reqwest_otlp::blocking::Client::builder()
        .tls_backend_preconfigured(client_config(tls)?)
        .build()
        .map_err(|e| TlsError::Http(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_without_its_key_names_the_file() {
        let dir = std::env::temp_dir();
        let tls = ClientTlsSettings {
            ca_file: String::new(),
            cert_file: dir.join("no-such-client.pem").display().to_string(),
            key_file: dir.join("no-such-client-key.pem").display().to_string(),
        };
        let err = client_config(&tls).expect_err("missing file").to_string();
        assert!(err.contains("no-such-client.pem"), "{err}");
    }

    #[test]
    fn the_default_roots_are_mozillas() {
        let config = client_config(&ClientTlsSettings::default()).expect("builds");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
