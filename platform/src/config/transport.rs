//! Settings of the outbound connections' security: how every Kafka client reaches the brokers
//! (TLS, SASL, any other librdkafka property), how the database connection is encrypted, and
//! the TLS of the HTTPS clients (payment gateway, OTLP exporter).
//!
//! Only the settings and their checks live here; [`crate::kafka::KafkaClients`] turns the Kafka
//! ones into client properties, [`crate::config::Settings::database_url`] the database ones into
//! the connection URL, and [`crate::tls::client_config`] the HTTPS ones into a rustls config.

use std::{collections::BTreeMap, fmt, path::Path};

use serde::{Deserialize, Serialize, Serializer};

use super::Secret;

/// How Kafka clients talk to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The value of librdkafka's `security.protocol`.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// TLS towards the brokers (with `security_protocol` `ssl` or `sasl_ssl`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTlsSettings {
    /// PEM bundle of the CAs that sign the brokers' certificates; empty: the system's store.
    pub ca_file: String,
    /// Client certificate (PEM), for brokers that authenticate clients by certificate.
    pub cert_file: String,
    /// The client certificate's private key (PEM).
    pub key_file: String,
    /// Check that the broker's certificate names the host connected to.
    pub verify_hostname: bool,
}

/// A SASL mechanism librdkafka has built in (GSSAPI and OAUTHBEARER need more than a setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL towards the brokers (with `security_protocol` `sasl_plaintext` or `sasl_ssl`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
    /// Path of a file whose first line is the password; read by `Settings::load` into
    /// `password`.
    pub password_file: String,
}

/// Any other librdkafka property, for every client: `[kafka.properties]` in the config file,
/// `--set kafka.properties.socket.keepalive.enable=true` on the command line. Nested tables
/// flatten to dotted keys, so both TOML spellings of a dotted key work. Values whose key names a
/// password or secret print as `[redacted]`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(BTreeMap<String, toml::Value>);

/// Properties orderflow decides itself: set them through their own settings (or not at all), so
/// that each is decided in one place.
pub const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "group.id",
    "group.instance.id",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "queued.max.messages.kbytes",
    "auto.offset.reset",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.endpoint.identification.algorithm",
    "fetch.wait.max.ms",
    "session.timeout.ms",
    "message.timeout.ms",
    "transaction.timeout.ms",
    "allow.auto.create.topics",
    "auto.offset.reset",
    "batch.num.messages",
    "batch.size",
    "enable.partition.eof",
    "linger.ms",
    "message.max.bytes",
    "partition.assignment.strategy",
    "statistics.interval.ms",
];

fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password") || key.contains("secret") || key.ends_with(".pem")
}

impl KafkaProperties {
    /// `(key, value)` with nested tables flattened to dotted keys; values as librdkafka takes
    /// them (strings, numbers and booleans as written). Arrays and dates are errors, named.
    pub fn flattened(&self) -> Result<Vec<(String, String)>, String> {
        self.entries().into_iter().collect()
    }

    /// Each flattened entry, or why it cannot be one.
    fn entries(&self) -> Vec<Result<(String, String), String>> {
        fn walk(
            prefix: &str,
            value: &toml::Value,
            out: &mut Vec<Result<(String, String), String>>,
        ) {
            let scalar = match value {
                toml::Value::Table(table) => {
                    for (key, value) in table {
                        walk(&format!("{prefix}.{key}"), value, out);
                    }
                    return;
                }
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                toml::Value::Float(n) => Ok(n.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(format!(
                    "kafka.properties.{prefix}: expected a string, number or boolean, found {}",
                    other.type_str()
                )),
            };
            out.push(scalar.map(|value| (prefix.to_owned(), value)));
        }
        let mut out = Vec::new();
        for (key, value) in &self.0 {
            walk(key, value, &mut out);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in self.flattened().unwrap_or_default() {
            if is_sensitive(&key) {
                map.entry(&key, &"[redacted]");
            } else {
                map.entry(&key, &value);
            }
        }
        map.finish()
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let flat: BTreeMap<String, String> = self
            .flattened()
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| {
                let value = if is_sensitive(&key) {
                    "[redacted]".to_owned()
                } else {
                    value
                };
                (key, value)
            })
            .collect();
        flat.serialize(serializer)
    }
}

/// TLS of an outbound HTTPS client (rustls). All empty: the Mozilla roots, no client
/// certificate.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// PEM CA certificates to trust instead of the Mozilla roots (a private CA).
    pub ca_file: String,
    /// Client certificate chain (PEM), for servers that require mutual TLS.
    pub cert_file: String,
    /// The client certificate's private key (PEM).
    pub key_file: String,
}

/// How the PostgreSQL connection is encrypted; added to `database.url` as libpq's `sslmode`,
/// `sslrootcert`, `sslcert` and `sslkey` (empty: as the URL says).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseTlsSettings {
    /// disable, prefer, require, verify-ca or verify-full; empty: the URL's (libpq's default,
    /// prefer, when the URL says nothing).
    pub mode: String,
    /// PEM CA certificates the server's certificate must chain to (verify-ca, verify-full).
    pub ca_file: String,
    /// Client certificate and key (PEM), for servers that authenticate clients by certificate.
    pub cert_file: String,
    pub key_file: String,
}

/// The libpq `sslmode` values sqlx understands.
const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

impl DatabaseTlsSettings {
    /// `(parameter, value)` for the URL's query string, in libpq's names.
    pub fn url_parameters(&self) -> Vec<(&'static str, &str)> {
        [
            ("sslmode", self.mode.as_str()),
            ("sslrootcert", self.ca_file.as_str()),
            ("sslcert", self.cert_file.as_str()),
            ("sslkey", self.key_file.as_str()),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect()
    }

    pub fn is_set(&self) -> bool {
        !self.url_parameters().is_empty()
    }
}

/// Checks a file setting names a readable file (librdkafka and rustls would otherwise fail
/// later, and less clearly).
pub(super) fn check_file(key: &str, path: &str, errors: &mut Vec<String>) {
    if path.is_empty() {
        return;
    }
    if let Err(e) = std::fs::File::open(Path::new(path)) {
        errors.push(format!("{key}: cannot read {path}: {e}"));
    }
}

/// Checks of the Kafka security settings, appended to `errors`.
pub(super) fn check_kafka(
    protocol: SecurityProtocol,
    tls: &KafkaTlsSettings,
    sasl: &SaslSettings,
    properties: &KafkaProperties,
    errors: &mut Vec<String>,
) {
    check_file("kafka.tls.ca_file", &tls.ca_file, errors);
    check_file("kafka.tls.cert_file", &tls.cert_file, errors);
    check_file("kafka.tls.key_file", &tls.key_file, errors);
    if tls.cert_file.is_empty() != tls.key_file.is_empty() {
        errors.push("kafka.tls: cert_file and key_file go together".to_owned());
    }
    let tls_set = !(tls.ca_file.is_empty() && tls.cert_file.is_empty());
    if tls_set && !protocol.uses_tls() {
        errors.push(format!(
            "kafka.tls: set, but kafka.security_protocol is {:?}; use ssl or sasl_ssl",
            protocol.as_librdkafka()
        ));
    }
    if protocol.uses_sasl() {
        if sasl.username.is_empty() {
            errors.push(format!(
                "kafka.sasl.username: required with kafka.security_protocol = {:?}",
                protocol.as_librdkafka()
            ));
        }
        if sasl.password.expose().is_none() {
            errors.push(format!(
                "kafka.sasl.password (or kafka.sasl.password_file): required with kafka.security_protocol = {:?}",
                protocol.as_librdkafka()
            ));
        }
    } else if !sasl.username.is_empty() || sasl.password.expose().is_some() {
        errors.push(format!(
            "kafka.sasl: credentials set, but kafka.security_protocol is {:?}; use sasl_plaintext or sasl_ssl",
            protocol.as_librdkafka()
        ));
    }
    for entry in properties.entries() {
        match entry {
            Err(why) => errors.push(why),
            Ok((key, _)) if MANAGED_PROPERTIES.contains(&key.as_str()) => errors.push(format!(
                "kafka.properties.{key}: orderflow sets this itself (docs/security.md names the setting for it)"
            )),
            Ok(_) => {}
        }
    }
}

/// Checks of one HTTPS client's TLS, appended to `errors`.
pub(super) fn check_client_tls(key: &str, tls: &ClientTlsSettings, errors: &mut Vec<String>) {
    check_file(&format!("{key}.ca_file"), &tls.ca_file, errors);
    check_file(&format!("{key}.cert_file"), &tls.cert_file, errors);
    check_file(&format!("{key}.key_file"), &tls.key_file, errors);
    if tls.cert_file.is_empty() != tls.key_file.is_empty() {
        errors.push(format!("{key}: cert_file and key_file go together"));
    }
}

/// Checks of the database's TLS, appended to `errors`; `url` is the configured URL.
pub(super) fn check_database_tls(tls: &DatabaseTlsSettings, url: &str, errors: &mut Vec<String>) {
    if !tls.is_set() {
        return;
    }
    if url.starts_with("sqlite:") {
        errors.push("database.tls: set, but database.url is a SQLite file".to_owned());
        return;
    }
    if !tls.mode.is_empty() && !SSL_MODES.contains(&tls.mode.as_str()) {
        errors.push(format!(
            "database.tls.mode: expected one of {}, found {:?}",
            SSL_MODES.join(", "),
            tls.mode
        ));
    }
    check_file("database.tls.ca_file", &tls.ca_file, errors);
    check_file("database.tls.cert_file", &tls.cert_file, errors);
    check_file("database.tls.key_file", &tls.key_file, errors);
    if tls.cert_file.is_empty() != tls.key_file.is_empty() {
        errors.push("database.tls: cert_file and key_file go together".to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_flatten_nested_tables_and_redact_secrets() {
        let props: KafkaProperties = toml::from_str(
            r#"
            "socket.keepalive.enable" = true
            ssl.key.password = "hunter2"
            [reconnect]
            backoff.ms = 250
            "#,
        )
        .expect("parses");
        let flat = props.flattened().expect("flattens");
        assert_eq!(
            flat,
            vec![
                ("reconnect.backoff.ms".to_owned(), "250".to_owned()),
                ("socket.keepalive.enable".to_owned(), "true".to_owned()),
                ("ssl.key.password".to_owned(), "hunter2".to_owned()),
            ]
        );
        let shown = format!("{props:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let rendered = toml::to_string(&props).expect("serializes");
        assert!(!rendered.contains("hunter2"), "{rendered}");
        assert!(rendered.contains("[redacted]"), "{rendered}");
    }

    #[test]
    fn arrays_in_properties_are_refused_by_name() {
        let props: KafkaProperties = toml::from_str("debug = [\"broker\"]").expect("parses");
        let err = props.flattened().expect_err("an array");
        assert!(err.contains("kafka.properties.debug"), "{err}");
    }

    #[test]
    fn database_tls_becomes_libpq_parameters() {
        let tls = DatabaseTlsSettings {
            mode: "verify-full".into(),
            ca_file: "/etc/ca.pem".into(),
            ..Default::default()
        };
        assert_eq!(
            tls.url_parameters(),
            vec![("sslmode", "verify-full"), ("sslrootcert", "/etc/ca.pem")]
        );
    }
}
