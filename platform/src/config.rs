//! Configuration: one [`Settings`] tree, loaded with figment in a documented order.
//!
//! 1. `default.toml`, compiled in (every key has a default and a comment there);
//! 2. the config file: `--config FILE` (must exist) or `./orderflow.toml` (if present);
//! 3. `ORDERFLOW_`-prefixed environment variables, `__` between levels
//!    (`ORDERFLOW_KAFKA__BROKERS=host:9092` sets `kafka.brokers`);
//! 4. command-line flags, passed in as key/value overrides.
//!
//! Type errors name the key and what was expected (figment's messages), and [`Settings::validate`]
//! collects every semantic error before failing. Secrets are [`Secret`]s: they print as
//! `[redacted]`, including in `orderflow config show`.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

mod transport;
pub use transport::{
    ClientTlsSettings, DatabaseTlsSettings, KafkaProperties, KafkaTlsSettings, SaslMechanism,
    SaslSettings, SecurityProtocol, MANAGED_PROPERTIES,
};

/// The compiled-in defaults: the first layer.
pub const DEFAULT_TOML: &str = include_str!("default.toml");
/// The config file read when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "orderflow.toml";
/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "ORDERFLOW_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value of the wrong type or an unknown key; the message names the key and the source.
    #[error("{0}")]
    Load(Box<figment::Error>),
    #[error("config file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("cannot read secret file {path} (named by {key}): {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error("flag --set {0:?} is not KEY=VALUE")]
    BadOverride(String),
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        Self::Load(Box::new(error))
    }
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// A secret string: deserializes from a plain string, never prints or serializes its value.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        Self((!value.is_empty()).then(|| SecretString::from(value)))
    }

    /// The value, for the one place that must use it (e.g. opening the connection).
    pub fn expose(&self) -> Option<&str> {
        self.0
            .as_ref()
            .map(|s| s.expose_secret())
            .filter(|s| !s.is_empty())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.expose().is_some() {
            "[redacted]"
        } else {
            "\"\""
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.expose().is_some() {
            "[redacted]"
        } else {
            ""
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    pub ingest: IngestSettings,
    pub query: QuerySettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
    pub processor: BatchSettings,
    pub projection: ProjectionSettings,
    pub validation: ValidationSettings,
    pub saga: SagaSettings,
    pub state: StateSettings,
    pub fraud: FraudSettings,
    pub payment: PaymentSettings,
    pub gateway: GatewaySettings,
    pub telemetry: TelemetrySettings,
    pub dev: DevSettings,
    pub switches: SwitchSettings,
}

/// The processors' names (`processors/src/lib.rs`): what `switches.paused_processors` may name.
pub const PROCESSOR_NAMES: [&str; 3] = ["saga", "inventory", "payments"];

/// Operational switches: applied without a restart (SIGHUP, or an edit of the watched config
/// file), logged when they change and exported as `orderflow_switch_on`. The switches that
/// change outcomes (holding every order, the fraud model in force) are `[fraud]` keys instead:
/// they travel through the log with the saga's rules.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSettings {
    /// false: the edge refuses new orders (maintenance) with 503 and `Retry-After`; status,
    /// cancellation and every other endpoint keep working.
    pub accept_orders: bool,
    /// The `Retry-After` of those refusals, seconds.
    pub retry_after_secs: u64,
    /// Processors (of PROCESSOR_NAMES) that stop consuming; their partitions stay assigned and
    /// their state kept, and they resume where they stopped.
    pub paused_processors: Vec<String>,
}

/// Processor state stores: how long what is kept only to recognise duplicates is kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Horizon in event time: finished orders, released or refused reservations, seen
    /// restocks, reservations of long-finished orders and idle customers older than this
    /// (behind the newest input of their partition) are dropped from the state.
    pub retention_ms: i64,
}

/// Step deadlines of the saga. A step with no answer by then cancels the order.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SagaSettings {
    pub review_timeout_ms: i64,
    pub inventory_timeout_ms: i64,
    /// A payment or refund request still unanswered this long after it was made is sent to
    /// the payment worker again (byte-identical), and again every as long.
    pub payment_resend_ms: i64,
    /// A payment with no answer this long after it was requested cancels the order (stock
    /// released; an authorization that comes later is refunded).
    pub payment_deadline_ms: i64,
    /// A refund with no answer this long after it was requested ends the order (stock
    /// released; reconcile reports the payment still standing, for an operator).
    pub refund_deadline_ms: i64,
}

/// The fraud model: a logistic score over the order's features plus hard rules. Reloadable.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FraudSettings {
    pub bias: f64,
    pub weight_amount: f64,
    pub weight_velocity: f64,
    pub weight_first_order: f64,
    pub weight_items: f64,
    pub weight_country_change: f64,
    pub velocity_window_ms: i64,
    pub review_threshold: f64,
    pub reject_threshold: f64,
    pub max_orders_per_window: u32,
    pub review_amount_minor: i64,
    /// Hold every order for a reviewer's decision, whatever its score (an operational switch
    /// that changes outcomes, hence in the saga's rules and through the log).
    #[serde(default)]
    pub hold_all_for_review: bool,
    /// The model version in force: "baseline" (the weights above) or a key of `models`.
    #[serde(default = "baseline_model")]
    pub model: String,
    /// Other model versions: each replaces what it sets of the weights and thresholds above.
    #[serde(default)]
    pub models: BTreeMap<String, FraudModel>,
}

fn baseline_model() -> String {
    BASELINE_FRAUD_MODEL.to_owned()
}

/// The fraud model made of `[fraud]`'s own weights.
pub const BASELINE_FRAUD_MODEL: &str = "baseline";

/// A fraud model version: the weights and thresholds it changes from `[fraud]`'s.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FraudModel {
    pub bias: Option<f64>,
    pub weight_amount: Option<f64>,
    pub weight_velocity: Option<f64>,
    pub weight_first_order: Option<f64>,
    pub weight_items: Option<f64>,
    pub weight_country_change: Option<f64>,
    pub review_threshold: Option<f64>,
    pub reject_threshold: Option<f64>,
}

impl FraudSettings {
    /// The model in force: `[fraud]` with the selected version's changes applied, and no other
    /// versions (what the saga's rules carry through the log). Unknown versions are refused
    /// by [`Settings::validate`].
    pub fn in_force(&self) -> FraudSettings {
        let mut model = self.clone();
        model.models = BTreeMap::new();
        if let Some(v) = self.models.get(&self.model) {
            let set = |field: &mut f64, value: Option<f64>| {
                if let Some(value) = value {
                    *field = value;
                }
            };
            set(&mut model.bias, v.bias);
            set(&mut model.weight_amount, v.weight_amount);
            set(&mut model.weight_velocity, v.weight_velocity);
            set(&mut model.weight_first_order, v.weight_first_order);
            set(&mut model.weight_items, v.weight_items);
            set(&mut model.weight_country_change, v.weight_country_change);
            set(&mut model.review_threshold, v.review_threshold);
            set(&mut model.reject_threshold, v.reject_threshold);
        }
        model
    }
}

/// The payment worker and its gateway client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    /// Base URL of the payment gateway; empty: `dev` starts the simulated one in-process.
    pub gateway_url: String,
    pub concurrency: usize,
    pub attempt_timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub payment_timeout_ms: i64,
    /// TLS of the gateway client (a private CA, a client certificate for mutual TLS).
    pub tls: ClientTlsSettings,
}

/// The simulated payment gateway (`orderflow gateway`, and in-process in `dev`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub latency_ms: u64,
    pub decline_rate: f64,
    pub failure_rate: f64,
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// HTTPS for the simulated gateway (mutual TLS with `client_ca_file`).
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers; empty means the embedded broker (`dev` only).
    pub brokers: String,
    pub client_id: String,
    /// How long a fetch may wait for data; unset: [`FETCH_WAIT_MAX_MS`], or
    /// [`EMBEDDED_FETCH_WAIT_MAX_MS`] on the embedded broker (see [`KafkaSettings::fetch_wait_ms`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_wait_max_ms: Option<u32>,
    pub session_timeout_ms: u32,
    pub message_timeout_ms: u32,
    pub transaction_timeout_ms: u32,
    /// Whether processors commit each batch in a Kafka transaction: `auto` (when the broker
    /// has them), `on` or `off`. Correctness never rests on them (docs/architecture.md).
    pub transactions: Transactions,
    /// What every consumer reads (`read_committed` or `read_uncommitted`); one level for all,
    /// so every processor, restore and projection sees the same log.
    pub isolation_level: String,
    /// Read every gap in a partition's offsets a second time before passing it (processors and
    /// projections): for brokers that can serve a record before an earlier one is readable
    /// (Tansu). See [`crate::gaps`].
    pub recheck_offset_gaps: bool,
    /// How clients reach the brokers: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: SecurityProtocol,
    pub tls: KafkaTlsSettings,
    pub sasl: SaslSettings,
    /// Any other librdkafka property, for every client (not those orderflow sets itself).
    pub properties: KafkaProperties,
}

/// How long a fetch waits for data when `kafka.fetch_wait_max_ms` is unset, on a broker this
/// process did not start. Low because stock Tansu and librdkafka's mock cluster hold a fetch for
/// its full wait, data or not: one hop costs p50 9 ms at 5 ms, and p50 345–690 ms at
/// librdkafka's default of 500 ms (docs/architecture.md, "Batching and latency"). Kafka answers
/// as soon as data arrives whatever the wait; there a longer one only saves idle fetches.
pub const FETCH_WAIT_MAX_MS: u32 = 5;

/// The same on the embedded broker `dev` starts: its build of Tansu answers a fetch as soon as
/// a record arrives (crate `orderflow-broker`, `install`), so the wait only bounds how often an
/// idle consumer asks, and a longer one costs no latency.
pub const EMBEDDED_FETCH_WAIT_MAX_MS: u32 = 500;

impl KafkaSettings {
    /// The fetch wait every consumer uses: `kafka.fetch_wait_max_ms`, else [`FETCH_WAIT_MAX_MS`].
    pub fn fetch_wait_ms(&self) -> u32 {
        self.fetch_wait_max_ms.unwrap_or(FETCH_WAIT_MAX_MS)
    }

    /// Settings for the embedded broker: an unset fetch wait becomes
    /// [`EMBEDDED_FETCH_WAIT_MAX_MS`]; a configured one is kept.
    pub fn default_for_embedded_broker(&mut self) {
        self.fetch_wait_max_ms
            .get_or_insert(EMBEDDED_FETCH_WAIT_MAX_MS);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    /// Path of a file holding the URL; read by [`Settings::load`] into `url`.
    pub url_file: String,
    pub max_connections: u32,
    /// PostgreSQL's TLS: added to the URL as libpq parameters.
    pub tls: DatabaseTlsSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch_orders: usize,
    /// Requests per second per client IP; 0 turns limiting off.
    pub rate_limit_per_ip_per_second: u32,
    /// Burst per client IP; 0 means the per-second rate.
    pub rate_limit_burst: u32,
    /// Requests per second each authenticated principal may make; 0 turns it off.
    pub rate_limit_per_principal_per_second: u32,
    /// Burst per principal; 0 means the per-second rate.
    pub rate_limit_principal_burst: u32,
    /// Proxies (CIDRs or addresses) whose `Forwarded`/`X-Forwarded-For` names the client;
    /// from any other peer those headers are ignored and the peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Base URL of the query API for status URLs; empty means `http://<query.listen>`.
    pub status_base_url: String,
    /// How long an `Idempotency-Key` is remembered, seconds.
    pub idempotency_ttl_secs: u64,
    /// How long a request waits for a concurrent request with the same key to finish before
    /// it is answered `409`, milliseconds.
    pub idempotency_wait_ms: u64,
    pub tls: TlsSettings,
}

/// TLS of one listener (rustls). Empty files: plain HTTP.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key of the leaf.
    pub key_file: String,
    /// PEM CA certificates: when set, every client must present a certificate one of them
    /// signed (mutual TLS).
    pub client_ca_file: String,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// The admin listener: API keys, review decisions, restocks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub tls: TlsSettings,
}

/// Who may call the HTTP APIs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// false: no credentials needed, every caller acts as an anonymous admin.
    pub enabled: bool,
    /// How long a verified API key is remembered (a revocation takes effect within it), ms.
    pub key_cache_ttl_ms: u64,
    pub jwt: JwtSettings,
}

/// JWT bearer tokens: HS256 with a shared secret, or RS256/ES256 with keys from a JWKS file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    pub hs256_secret: Secret,
    /// A file whose content (trailing newline trimmed) is the HS256 secret; overrides it.
    pub hs256_secret_file: String,
    /// A JWKS file (`{"keys": [...]}`) of RS256/ES256 public keys.
    pub jwks_file: String,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// The claim holding the role: producer, reader or admin.
    pub role_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
}

impl JwtSettings {
    /// Whether any JWT key is configured.
    pub fn configured(&self) -> bool {
        self.hs256_secret.expose().is_some() || !self.jwks_file.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    pub listen: SocketAddr,
    pub cache_capacity: u64,
    pub cache_ttl_ms: u64,
    /// Requests per second per client IP; 0 turns limiting off.
    pub rate_limit_per_ip_per_second: u32,
    /// Burst per client IP; 0 means the per-second rate.
    pub rate_limit_burst: u32,
    /// Requests per second each authenticated principal may make; 0 turns it off.
    pub rate_limit_per_principal_per_second: u32,
    /// Burst per principal; 0 means the per-second rate.
    pub rate_limit_principal_burst: u32,
    /// As `ingest.trusted_proxies`, for this listener.
    pub trusted_proxies: Vec<String>,
    pub tls: TlsSettings,
}

/// One listener's rate limits: GCRA quotas per client IP and per principal, and the proxies
/// trusted to name the client ([`IngestSettings::limits`], [`QuerySettings::limits`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitSettings {
    pub per_ip_per_second: u32,
    pub ip_burst: u32,
    pub per_principal_per_second: u32,
    pub principal_burst: u32,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// A trusted proxy entry: a CIDR (`10.0.0.0/8`) or one address (`10.1.2.3`, `::1`).
pub fn parse_proxy(entry: &str) -> std::result::Result<ipnet::IpNet, String> {
    let entry = entry.trim();
    entry
        .parse::<ipnet::IpNet>()
        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{entry:?} is neither a CIDR nor an IP address"))
}

fn proxies(entries: &[String]) -> Vec<ipnet::IpNet> {
    // Validated at load (`Settings::validate`): what does not parse is not there.
    entries.iter().filter_map(|e| parse_proxy(e).ok()).collect()
}

impl RateLimitSettings {
    /// One listener's `rate_limit_*` keys and `trusted_proxies`.
    fn of(
        per_ip_per_second: u32,
        ip_burst: u32,
        per_principal_per_second: u32,
        principal_burst: u32,
        trusted_proxies: &[String],
    ) -> Self {
        Self {
            per_ip_per_second,
            ip_burst,
            per_principal_per_second,
            principal_burst,
            trusted_proxies: proxies(trusted_proxies),
        }
    }
}

impl IngestSettings {
    pub fn limits(&self) -> RateLimitSettings {
        RateLimitSettings::of(
            self.rate_limit_per_ip_per_second,
            self.rate_limit_burst,
            self.rate_limit_per_principal_per_second,
            self.rate_limit_principal_burst,
            &self.trusted_proxies,
        )
    }
}

impl QuerySettings {
    pub fn limits(&self) -> RateLimitSettings {
        RateLimitSettings::of(
            self.rate_limit_per_ip_per_second,
            self.rate_limit_burst,
            self.rate_limit_per_principal_per_second,
            self.rate_limit_principal_burst,
            &self.trusted_proxies,
        )
    }
}

/// Bounds of a processor's transaction batch, and the identity of its transactional producer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub batch_max_records: usize,
    pub batch_max_ms: u64,
    pub batch_idle_ms: u64,
    pub transactional_id_prefix: String,
    pub instance_id: String,
    pub tick_ms: u64,
    /// A batch whose step work (I/O such as payment gateway calls) is still running after this
    /// long pauses the processor's partitions (no more fetching) until the batch commits.
    pub pause_after_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSettings {
    pub batch_max_records: usize,
    pub batch_max_ms: u64,
    pub batch_idle_ms: u64,
}

/// Business rules of the validation step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSettings {
    pub currencies: Vec<String>,
    pub max_lines: usize,
    pub max_quantity_per_line: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The operations listener: `/metrics` and `/healthz` for every role in the process.
    pub listen: SocketAddr,
    pub format: LogFormat,
    /// OTLP/HTTP traces endpoint; empty disables span export.
    pub otlp_endpoint: String,
    /// TLS of the OTLP exporter, for an https endpoint with a private CA or mutual TLS.
    pub otlp_tls: ClientTlsSettings,
    pub service_name: String,
    pub filter: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DevSettings {
    pub data_dir: PathBuf,
    /// Where the embedded broker listens (`host:port`; port 0 picks a free one).
    pub broker_listen: String,
    /// A Tansu binary with SQLite storage to run instead of the one `dev` installs; empty: the
    /// installed one.
    pub broker_bin: String,
    /// The embedded broker's log directory; empty: `<data_dir>/broker`.
    pub broker_data: String,
}

impl DevSettings {
    /// The embedded broker's log directory.
    pub fn broker_dir(&self) -> PathBuf {
        match self.broker_data.trim() {
            "" => self.data_dir.join("broker"),
            dir => PathBuf::from(dir),
        }
    }
}

/// `kafka.transactions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transactions {
    /// Use transactions when the broker supports them (EndTxn in its ApiVersions).
    Auto,
    On,
    Off,
}

/// Command-line overrides, the last layer: `(dotted key, value)` pairs.
#[derive(Debug, Clone, Default)]
pub struct Overrides(Vec<(String, toml::Value)>);

impl Overrides {
    /// Sets `key` to a value given as text: TOML syntax if it parses as a TOML value
    /// (`5`, `true`, `["EUR"]`), else the text as a string.
    pub fn set(&mut self, key: impl Into<String>, value: &str) -> &mut Self {
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()));
        self.0.push((key.into(), parsed));
        self
    }

    /// Parses a `KEY=VALUE` flag.
    pub fn set_pair(&mut self, pair: &str) -> Result<&mut Self> {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError::BadOverride(pair.to_owned()))?;
        Ok(self.set(key.trim(), value))
    }
}

impl Settings {
    /// The layered figment, before extraction. Exposed for tests and `config show`.
    pub fn figment(config_file: Option<&Path>, overrides: &Overrides) -> Result<Figment> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        match config_file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile {
                    path: path.to_owned(),
                })
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            // `Toml::file` would also search parent directories; only the working directory's
            // file is meant.
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        for (key, value) in &overrides.0 {
            figment = figment.merge(Serialized::default(key, value));
        }
        Ok(figment)
    }

    /// Loads, resolves secret files and validates: the only way roles get settings.
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let mut settings: Settings = Self::figment(config_file, overrides)?.extract()?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Reads each secret named by a `*_file` key into its setting (the file wins).
    fn read_secret_files(&mut self) -> Result<()> {
        fn read(key: &'static str, path: &str) -> Result<Option<String>> {
            if path.is_empty() {
                return Ok(None);
            }
            std::fs::read_to_string(path)
                .map(Some)
                .map_err(|source| ConfigError::SecretFile {
                    key,
                    path: PathBuf::from(path),
                    source,
                })
        }
        // A URL is its file's first line, trimmed; a JWT secret is the whole file but for its
        // trailing line break.
        let first_line = |text: String| text.lines().next().unwrap_or_default().trim().to_owned();
        if let Some(text) = read("database.url_file", &self.database.url_file)? {
            self.database.url = Secret::new(first_line(text));
        }
        if let Some(text) = read("kafka.sasl.password_file", &self.kafka.sasl.password_file)? {
            // Exactly the first line: a password may begin or end with a space.
            self.kafka.sasl.password = Secret::new(text.lines().next().unwrap_or_default());
        }
        if let Some(text) = read(
            "auth.jwt.hs256_secret_file",
            &self.auth.jwt.hs256_secret_file,
        )? {
            self.auth.jwt.hs256_secret = Secret::new(text.trim_end_matches(['\r', '\n']));
        }
        Ok(())
    }

    /// Defaults plus `overrides` only: no file, no environment. For tests and tools that must
    /// not pick up the caller's configuration.
    pub fn from_defaults(overrides: &Overrides) -> Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        for (key, value) in &overrides.0 {
            figment = figment.merge(Serialized::default(key, value));
        }
        let mut settings: Settings = figment.extract()?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types cannot, collecting every error.
    pub fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, message: String| {
            if !ok {
                errors.push(message);
            }
        };
        for (key, entries) in [
            ("ingest.trusted_proxies", &self.ingest.trusted_proxies),
            ("query.trusted_proxies", &self.query.trusted_proxies),
        ] {
            for entry in entries {
                if let Err(why) = parse_proxy(entry) {
                    check(false, format!("{key}: {why}"));
                }
            }
        }
        let k = &self.kafka;
        if let Some(wait) = k.fetch_wait_max_ms {
            check(
                (1..=10_000).contains(&wait),
                format!("kafka.fetch_wait_max_ms: expected 1..=10000, found {wait}"),
            );
        }
        check(
            k.message_timeout_ms >= 100,
            format!(
                "kafka.message_timeout_ms: expected at least 100, found {}",
                k.message_timeout_ms
            ),
        );
        check(
            k.isolation_level == "read_committed" || k.isolation_level == "read_uncommitted",
            format!(
                "kafka.isolation_level: expected read_committed or read_uncommitted, found {:?}",
                k.isolation_level
            ),
        );
        check(
            self.dev
                .broker_listen
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            format!(
                "dev.broker_listen: expected host:port, found {:?}",
                self.dev.broker_listen
            ),
        );
        if let Some(url) = self.database.url.expose() {
            check(
                url.starts_with("sqlite:")
                    || url.starts_with("postgres:")
                    || url.starts_with("postgresql:"),
                "database.url: expected a sqlite:// or postgres:// URL".to_owned(),
            );
        }
        check(
            self.database.max_connections >= 1,
            "database.max_connections: expected at least 1, found 0".to_owned(),
        );
        for (key, batch_max, batch_ms) in [
            (
                "processor",
                self.processor.batch_max_records,
                self.processor.batch_max_ms,
            ),
            (
                "projection",
                self.projection.batch_max_records,
                self.projection.batch_max_ms,
            ),
        ] {
            check(
                batch_max >= 1,
                format!("{key}.batch_max_records: expected at least 1, found 0"),
            );
            check(
                batch_ms >= 1,
                format!("{key}.batch_max_ms: expected at least 1, found 0"),
            );
        }
        check(
            self.processor.pause_after_ms >= 1,
            "processor.pause_after_ms: expected at least 1, found 0".to_owned(),
        );
        for currency in &self.validation.currencies {
            check(
                currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase()),
                format!("validation.currencies: expected ISO 4217 codes like \"EUR\", found {currency:?}"),
            );
        }
        check(
            self.ingest.max_batch_orders >= 1,
            "ingest.max_batch_orders: expected at least 1, found 0".to_owned(),
        );
        check(
            self.validation.max_lines >= 1,
            "validation.max_lines: expected at least 1, found 0".to_owned(),
        );
        check(
            self.fraud.model == BASELINE_FRAUD_MODEL
                || self.fraud.models.contains_key(&self.fraud.model),
            format!(
                "fraud.model: {:?} is neither {BASELINE_FRAUD_MODEL:?} nor a version of [fraud.models] ({:?})",
                self.fraud.model,
                self.fraud.models.keys().collect::<Vec<_>>()
            ),
        );
        for name in &self.switches.paused_processors {
            check(
                PROCESSOR_NAMES.contains(&name.as_str()),
                format!(
                    "switches.paused_processors: {name:?} is not a processor (expected one of {PROCESSOR_NAMES:?})"
                ),
            );
        }
        let f = &self.fraud.in_force();
        check(
            0.0 < f.review_threshold && f.review_threshold <= f.reject_threshold && f.reject_threshold <= 1.0,
            format!(
                "fraud.review_threshold and fraud.reject_threshold: expected 0 < review <= reject <= 1, found {} and {}",
                f.review_threshold, f.reject_threshold
            ),
        );
        check(
            f.velocity_window_ms > 0,
            "fraud.velocity_window_ms: expected a positive duration".to_owned(),
        );
        for (key, rate) in [
            ("gateway.decline_rate", self.gateway.decline_rate),
            ("gateway.failure_rate", self.gateway.failure_rate),
            ("gateway.slow_rate", self.gateway.slow_rate),
        ] {
            check(
                (0.0..=1.0).contains(&rate),
                format!("{key}: expected a rate in 0..=1, found {rate}"),
            );
        }
        let p = &self.payment;
        check(
            p.concurrency >= 1 && p.max_attempts >= 1,
            "payment.concurrency and payment.max_attempts: expected at least 1".to_owned(),
        );
        check(
            self.saga.review_timeout_ms > 0 && self.saga.inventory_timeout_ms > 0,
            "saga.review_timeout_ms and saga.inventory_timeout_ms: expected positive durations"
                .to_owned(),
        );
        check(
            self.saga.payment_deadline_ms > self.saga.payment_resend_ms
                && self.saga.refund_deadline_ms > self.saga.payment_resend_ms,
            format!(
                "saga.payment_deadline_ms and saga.refund_deadline_ms: expected more than saga.payment_resend_ms ({}), found {} and {}",
                self.saga.payment_resend_ms, self.saga.payment_deadline_ms, self.saga.refund_deadline_ms
            ),
        );
        let longest_step = self.saga.inventory_timeout_ms
            + self
                .saga
                .payment_deadline_ms
                .max(self.saga.refund_deadline_ms);
        check(
            self.state.retention_ms > longest_step,
            format!(
                "state.retention_ms: expected more than saga.inventory_timeout_ms + the longer of saga.payment_deadline_ms and saga.refund_deadline_ms ({longest_step}): a reservation must outlive the saga steps that can release it; found {}",
                self.state.retention_ms
            ),
        );
        check(
            self.state.retention_ms >= self.fraud.velocity_window_ms,
            format!(
                "state.retention_ms: expected at least fraud.velocity_window_ms ({}): a customer's velocity must outlive its window; found {}",
                self.fraud.velocity_window_ms, self.state.retention_ms
            ),
        );
        check(
            self.saga.payment_resend_ms > self.payment.payment_timeout_ms,
            format!(
                "saga.payment_resend_ms: expected more than payment.payment_timeout_ms ({}), found {}",
                self.payment.payment_timeout_ms, self.saga.payment_resend_ms
            ),
        );
        transport::check_kafka(
            k.security_protocol,
            &k.tls,
            &k.sasl,
            &k.properties,
            &mut errors,
        );
        transport::check_database_tls(
            &self.database.tls,
            self.database.url.expose().unwrap_or("sqlite:"),
            &mut errors,
        );
        transport::check_client_tls("payment.tls", &self.payment.tls, &mut errors);
        transport::check_client_tls("telemetry.otlp_tls", &self.telemetry.otlp_tls, &mut errors);
        let mut check = |ok: bool, message: String| {
            if !ok {
                errors.push(message);
            }
        };
        for (key, tls) in [
            ("ingest.tls", &self.ingest.tls),
            ("query.tls", &self.query.tls),
            ("admin.tls", &self.admin.tls),
            ("gateway.tls", &self.gateway.tls),
        ] {
            check(
                tls.cert_file.is_empty() == tls.key_file.is_empty(),
                format!("{key}: cert_file and key_file go together"),
            );
            check(
                tls.client_ca_file.is_empty() || tls.enabled(),
                format!("{key}.client_ca_file: mutual TLS needs cert_file and key_file too"),
            );
        }
        let jwt = &self.auth.jwt;
        if jwt.configured() {
            check(
                !jwt.issuer.is_empty() && !jwt.audience.is_empty(),
                "auth.jwt.issuer and auth.jwt.audience: required when JWTs are accepted".to_owned(),
            );
            check(
                jwt.hs256_secret.expose().is_none_or(|s| s.len() >= 32),
                "auth.jwt.hs256_secret: expected at least 32 bytes".to_owned(),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The database URL to use: the configured one, or the SQLite file under `dev.data_dir`.
    /// A secret (it may hold a password) until the connection opens: it never prints in
    /// `Debug` output; show it with [`SecretString::expose_secret`] through a redaction.
    ///
    /// `database.tls` is added to a PostgreSQL URL here, as libpq's `sslmode`, `sslrootcert`,
    /// `sslcert` and `sslkey`, replacing any the URL names itself.
    pub fn database_url(&self) -> SecretString {
        SecretString::from(match self.database.url.expose() {
            Some(url) if self.database.tls.is_set() && !url.starts_with("sqlite:") => {
                with_url_parameters(url, &self.database.tls.url_parameters())
            }
            Some(url) => url.to_owned(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.dev
                    .data_dir
                    .join(crate::config::EMBEDDED_DATABASE_FILE)
                    .display()
            ),
        })
    }
}

/// `url` with each `(name, value)` set in its query string (replacing the same names); values
/// are percent-encoded.
fn with_url_parameters(url: &str, parameters: &[(&str, &str)]) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            !parameters.iter().any(|(n, _)| *n == name)
        })
        .map(str::to_owned)
        .collect();
    for (name, value) in parameters {
        let encoded: String = value
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                    char::from(b).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        pairs.push(format!("{name}={encoded}"));
    }
    format!("{base}?{}", pairs.join("&"))
}

/// File name of the embedded-mode SQLite database inside `dev.data_dir`.
pub const EMBEDDED_DATABASE_FILE: &str = "orderflow.sqlite";

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load(overrides: &Overrides) -> Result<Settings> {
        Settings::load(None, overrides)
    }

    #[test]
    fn defaults_load_and_validate() {
        Jail::expect_with(|_jail| {
            let settings = load(&Overrides::default()).expect("defaults are valid");
            assert_eq!(settings.kafka.brokers, "");
            assert_eq!(settings.kafka.fetch_wait_max_ms, None);
            assert_eq!(settings.kafka.fetch_wait_ms(), FETCH_WAIT_MAX_MS);
            let mut embedded = settings.kafka.clone();
            embedded.default_for_embedded_broker();
            assert_eq!(embedded.fetch_wait_ms(), EMBEDDED_FETCH_WAIT_MAX_MS);
            assert_eq!(settings.telemetry.format, LogFormat::Human);
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flag() {
        Jail::expect_with(|jail| {
            jail.create_file(
                DEFAULT_CONFIG_FILE,
                "[kafka]\nbrokers = \"file:9092\"\nclient_id = \"from-file\"\nfetch_wait_max_ms = 7\n",
            )?;
            let s = load(&Overrides::default()).expect("loads");
            assert_eq!(s.kafka.brokers, "file:9092");
            assert_eq!(s.kafka.fetch_wait_max_ms, Some(7));
            let mut embedded = s.kafka.clone();
            embedded.default_for_embedded_broker();
            assert_eq!(embedded.fetch_wait_ms(), 7, "a configured wait is kept");

            jail.set_env("ORDERFLOW_KAFKA__BROKERS", "env:9092");
            jail.set_env("ORDERFLOW_KAFKA__FETCH_WAIT_MAX_MS", "9");
            let s = load(&Overrides::default()).expect("loads");
            assert_eq!(s.kafka.brokers, "env:9092");
            assert_eq!(s.kafka.fetch_wait_max_ms, Some(9));
            assert_eq!(
                s.kafka.client_id, "from-file",
                "untouched keys keep the file value"
            );

            let mut flags = Overrides::default();
            flags.set("kafka.brokers", "flag:9092");
            flags.set_pair("kafka.fetch_wait_max_ms=11").expect("pair");
            let s = load(&flags).expect("loads");
            assert_eq!(s.kafka.brokers, "flag:9092");
            assert_eq!(s.kafka.fetch_wait_max_ms, Some(11));
            Ok(())
        });
    }

    #[test]
    fn explicit_config_file_must_exist() {
        Jail::expect_with(|_jail| {
            let err = Settings::load(Some(Path::new("nope.toml")), &Overrides::default())
                .expect_err("missing file");
            assert!(err.to_string().contains("nope.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_its_key() {
        Jail::expect_with(|jail| {
            jail.set_env("ORDERFLOW_KAFKA__FETCH_WAIT_MAX_MS", "soon");
            let err = load(&Overrides::default())
                .expect_err("not a number")
                .to_string();
            // figment names an environment key in the case it was given.
            assert!(
                err.to_lowercase().contains("kafka.fetch_wait_max_ms"),
                "{err}"
            );
            assert!(err.contains("ORDERFLOW_"), "{err}");
            assert!(err.contains("u32") || err.contains("integer"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file(DEFAULT_CONFIG_FILE, "[telemetry]\nformat = \"xml\"\n")?;
            let err = load(&Overrides::default())
                .expect_err("bad enum")
                .to_string();
            assert!(err.contains("telemetry.format"), "{err}");
            assert!(err.contains("human") && err.contains("json"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file(DEFAULT_CONFIG_FILE, "[kafka]\nbrokres = \"x\"\n")?;
            let err = load(&Overrides::default())
                .expect_err("unknown key")
                .to_string();
            assert!(err.contains("brokres"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn semantic_errors_are_all_listed() {
        Jail::expect_with(|_jail| {
            let mut flags = Overrides::default();
            flags.set("kafka.fetch_wait_max_ms", "0");
            flags.set("validation.currencies", "[\"euro\"]");
            flags.set("database.url", "mysql://x");
            flags.set("kafka.isolation_level", "\"dirty\"");
            flags.set("admin.tls.client_ca_file", "\"ca.pem\"");
            flags.set("auth.jwt.hs256_secret", "\"short\"");
            flags.set(
                "ingest.trusted_proxies",
                "[\"10.0.0.0/8\", \"10.0.0.0/33\"]",
            );
            let err = load(&flags).expect_err("invalid").to_string();
            assert!(
                err.contains("ingest.trusted_proxies: \"10.0.0.0/33\" is neither a CIDR"),
                "{err}"
            );
            assert!(err.contains("kafka.fetch_wait_max_ms"), "{err}");
            assert!(err.contains("validation.currencies"), "{err}");
            assert!(err.contains("database.url"), "{err}");
            assert!(err.contains("kafka.isolation_level"), "{err}");
            assert!(err.contains("admin.tls.client_ca_file"), "{err}");
            assert!(err.contains("auth.jwt.issuer"), "{err}");
            assert!(err.contains("auth.jwt.hs256_secret"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted_and_read_from_files() {
        Jail::expect_with(|jail| {
            jail.create_file("db-url", "postgres://app:hunter2@db/orders\n")?;
            jail.set_env("ORDERFLOW_DATABASE__URL_FILE", "db-url");
            jail.create_file("jwt-secret", "an-hs256-secret-of-at-least-32-bytes!!\n")?;
            jail.set_env("ORDERFLOW_AUTH__JWT__HS256_SECRET_FILE", "jwt-secret");
            jail.set_env("ORDERFLOW_AUTH__JWT__ISSUER", "https://issuer");
            jail.set_env("ORDERFLOW_AUTH__JWT__AUDIENCE", "orderflow");
            let s = load(&Overrides::default()).expect("loads");
            assert_eq!(
                s.database_url().expose_secret(),
                "postgres://app:hunter2@db/orders"
            );
            assert_eq!(
                s.auth.jwt.hs256_secret.expose(),
                Some("an-hs256-secret-of-at-least-32-bytes!!")
            );
            assert!(!s.to_toml().contains("an-hs256-secret"));
            let shown = s.to_toml();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
            assert!(!format!("{s:?}").contains("hunter2"));
            // The URL handed on stays a secret: its Debug output is redacted too.
            assert!(!format!("{:?}", s.database_url()).contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn kafka_security_is_checked_and_its_secrets_redacted() {
        Jail::expect_with(|jail| {
            jail.create_file("kafka-password", " pass word \n")?;
            jail.set_env("ORDERFLOW_KAFKA__SECURITY_PROTOCOL", "sasl_ssl");
            jail.set_env("ORDERFLOW_KAFKA__SASL__USERNAME", "orderflow");
            jail.set_env("ORDERFLOW_KAFKA__SASL__PASSWORD_FILE", "kafka-password");
            let s = load(&Overrides::default()).expect("loads");
            // The first line exactly: a password may begin or end with a space.
            assert_eq!(s.kafka.sasl.password.expose(), Some(" pass word "));
            assert!(!s.to_toml().contains("pass word"));
            assert!(!format!("{s:?}").contains("pass word"));

            // SASL without a password, a property orderflow sets itself, TLS files with a
            // plaintext protocol, database TLS on SQLite: each named.
            jail.set_env("ORDERFLOW_KAFKA__SASL__PASSWORD_FILE", "");
            let mut overrides = Overrides::default();
            overrides
                .set("kafka.properties.enable.idempotence", "false")
                .set("kafka.properties.debug", "[\"broker\"]")
                .set("database.url", "\"sqlite://x.db\"")
                .set("database.tls.mode", "\"verify-full\"");
            let err = load(&overrides).expect_err("invalid").to_string();
            for expected in [
                "kafka.sasl.password (or kafka.sasl.password_file): required",
                "kafka.properties.enable.idempotence: orderflow sets this itself",
                "kafka.properties.debug: expected a string, number or boolean",
                "database.tls: set, but database.url is a SQLite file",
            ] {
                assert!(err.contains(expected), "missing {expected:?} in {err}");
            }
            jail.set_env("ORDERFLOW_KAFKA__SECURITY_PROTOCOL", "plaintext");
            jail.set_env("ORDERFLOW_KAFKA__SASL__USERNAME", "");
            jail.set_env("ORDERFLOW_KAFKA__TLS__CA_FILE", "kafka-password");
            let err = load(&Overrides::default())
                .expect_err("invalid")
                .to_string();
            assert!(
                err.contains("kafka.tls: set, but kafka.security_protocol is \"plaintext\""),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn database_tls_goes_into_the_postgres_url() {
        let mut overrides = Overrides::default();
        overrides
            .set(
                "database.url",
                "\"postgres://app@db/orders?sslmode=disable&application_name=of\"",
            )
            .set("database.tls.mode", "\"verify-full\"")
            .set(
                "database.tls.ca_file",
                &format!("{:?}", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")),
            );
        let s = Settings::from_defaults(&overrides).expect("valid");
        assert_eq!(
            s.database_url().expose_secret(),
            format!(
                "postgres://app@db/orders?application_name=of&sslmode=verify-full&sslrootcert={}/Cargo.toml",
                env!("CARGO_MANIFEST_DIR")
            )
        );
    }
}
