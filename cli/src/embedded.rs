//! What `orderflow dev` and `orderflow broker` add to the pipeline: the embedded broker (Tansu
//! with SQLite storage, its log in `<dev.data_dir>/broker`, crate `orderflow-broker`), and the
//! check that the tables in the database describe that log.
//!
//! [`watch_free_space`] puts the data directory's free space on `/readyz`: the broker's log and
//! the SQLite file both stop taking writes when it is full.
//!
//! The embedded broker keeps its log across restarts, and the SQLite file beside it keeps the
//! tables and the positions they reflect, so a restarted `dev` carries on where it stopped.
//! The one way the two can disagree is by hand: a broker directory removed or replaced while
//! the database stayed. Positions past the end of the log would make the projections skip
//! every new event up to them, so [`check_database_matches_log`] refuses to start then, naming
//! what differs and what to do.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use orderflow_broker::{BrokerOptions, DurableBroker, Install};
use orderflow_platform::{
    health::Readiness,
    kafka::{log_end, KafkaClients, MockBroker},
    Settings,
};
use orderflow_projections::Database;
use orderflow_topics::{
    apply::{apply, ApplyReport, Provisioner},
    Catalog,
};
use secrecy::ExposeSecret;
use sqlx::Row;

/// The `/readyz` component of the embedded broker's supervisor.
const EMBEDDED_COMPONENT: &str = "embedded broker";
/// The `/readyz` component of the data directory's free space.
const DATA_DIR_COMPONENT: &str = "data directory";
/// Below this much free space the data directory is reported not ready: a produce the broker
/// cannot write fails (the edge answers `503`), and the projections' writes fail and retry.
pub const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;
/// How often the free space is read.
const FREE_SPACE_EVERY: Duration = Duration::from_secs(1);

/// The bytes an unprivileged process can still write under `dir`.
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Reports the free space of `dir` on `/readyz` (component `data directory`) every second until
/// `cancel`: not ready, saying how much is left, below [`MIN_FREE_BYTES`]. Each change is
/// logged: an error when space runs low, then when it is back.
pub async fn watch_free_space(
    dir: std::path::PathBuf,
    readiness: Readiness,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut low = false;
    loop {
        match free_bytes(&dir) {
            Ok(free) if free < MIN_FREE_BYTES => {
                let reason = format!(
                    "{} has {} KiB free (below {} MiB): the broker's log and the database \
                     cannot grow; free space there",
                    dir.display(),
                    free / 1024,
                    MIN_FREE_BYTES / (1024 * 1024)
                );
                if !low {
                    tracing::error!(dir = %dir.display(), free, "The data directory is running out of space.");
                }
                low = true;
                readiness.set_not_ready(DATA_DIR_COMPONENT, reason);
            }
            Ok(_) => {
                if low {
                    tracing::info!(dir = %dir.display(), "The data directory has space again.");
                }
                low = false;
                readiness.set_ready(DATA_DIR_COMPONENT);
            }
            Err(e) => readiness.set_not_ready(
                DATA_DIR_COMPONENT,
                format!("reading the free space of {}: {e}", dir.display()),
            ),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(FREE_SPACE_EVERY) => {}
        }
    }
}

/// Where the pipeline's broker is.
pub enum Broker {
    /// The embedded broker, a child process; stopped when this value drops.
    Embedded(DurableBroker),
    /// librdkafka's mock cluster in this process (tests that inject broker faults).
    Mock(MockBroker),
    External(String),
}

impl Broker {
    /// The configured broker, or the embedded one when `kafka.brokers` is empty (installed on
    /// a first run, with progress on stderr).
    pub fn from_settings(settings: &Settings) -> Result<Self> {
        if !settings.kafka.brokers.trim().is_empty() {
            return Ok(Self::External(settings.kafka.brokers.clone()));
        }
        let dev = &settings.dev;
        let options = BrokerOptions {
            dir: dev.broker_dir(),
            listen: dev.broker_listen.clone(),
            binary: (!dev.broker_bin.trim().is_empty()).then(|| dev.broker_bin.trim().into()),
            install: Install::IfMissing,
        };
        let broker = DurableBroker::start(&options, |command| {
            eprintln!(
                "First run: the embedded broker (Tansu {} with SQLite storage) is not installed \
                 yet. Building it once with\n  {command}\nThis takes about 12 minutes on 2 cores; \
                 cargo's progress follows. Later starts take well under a second.",
                orderflow_broker::install::TANSU_VERSION
            );
        })
        .with_context(|| format!("starting the embedded broker in {}", options.dir.display()))?;
        Ok(Self::Embedded(broker))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(b) => b.bootstrap_servers().to_owned(),
            Self::Mock(b) => b.bootstrap_servers().to_owned(),
            Self::External(s) => s.clone(),
        }
    }

    /// Puts the embedded broker's state on `/readyz` (component `embedded broker`): not ready,
    /// with the reason, from the moment it fails until its supervisor has it serving again.
    pub fn report_on(&self, readiness: &Readiness) {
        if let Self::Embedded(broker) = self {
            let readiness = readiness.clone();
            broker.on_status_change(move |down| match down {
                Some(reason) => readiness.set_not_ready(
                    EMBEDDED_COMPONENT,
                    format!("the embedded broker is restarting: {reason}"),
                ),
                None => readiness.set_ready(EMBEDDED_COMPONENT),
            });
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Self::Embedded(_))
    }

    /// `settings` as the clients of this broker use them: on the embedded broker, which answers
    /// a fetch as soon as a record arrives, an unset `kafka.fetch_wait_max_ms` becomes
    /// [`EMBEDDED_FETCH_WAIT_MAX_MS`](orderflow_platform::config::EMBEDDED_FETCH_WAIT_MAX_MS).
    pub fn client_settings(&self, settings: &Settings) -> Settings {
        let mut settings = settings.clone();
        if self.is_embedded() {
            settings.kafka.default_for_embedded_broker();
        }
        settings
    }

    /// Creates missing topics from the catalog; reports drift.
    pub async fn apply_topics(&self, settings: &Settings) -> Result<ApplyReport> {
        let catalog = Catalog::load()?;
        let clients = KafkaClients::new(&settings.kafka, self.bootstrap());
        let provisioner = match self {
            Self::Mock(b) => Provisioner::Mock(b),
            Self::Embedded(_) | Self::External(_) => Provisioner::Admin,
        };
        Ok(apply(&catalog, &clients, provisioner).await?)
    }
}

/// Refuses a database whose projection positions lie past the end of the log at `bootstrap`
/// (module docs): its tables were folded from another log.
pub async fn check_database_matches_log(settings: &Settings, bootstrap: &str) -> Result<()> {
    let db = Database::connect(settings.database_url(), 1)
        .await
        .context("connecting to the database (database.url)")?;
    let rows = sqlx::query("SELECT topic, partition_id, next_offset FROM projection_offsets")
        .fetch_all(db.pool())
        .await?;
    db.pool().close().await;
    if rows.is_empty() {
        return Ok(());
    }
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let consumer = std::sync::Arc::new(clients.open_reader("dev")?);
    let mut past_end = Vec::new();
    for row in rows {
        let topic: String = row.try_get(0)?;
        let partition: i64 = row.try_get(1)?;
        let position: i64 = row.try_get(2)?;
        let partition = i32::try_from(partition).context("partition_id out of range")?;
        let consumer = consumer.clone();
        let topic_for_call = topic.clone();
        let (_, high) = tokio::task::spawn_blocking(move || {
            log_end(
                &consumer,
                &topic_for_call,
                partition,
                Duration::from_secs(10),
            )
        })
        .await??;
        if position > high {
            past_end.push(format!(
                "{topic}[{partition}]: tables at offset {position}, log ends at {high}"
            ));
        }
    }
    if !past_end.is_empty() {
        bail!(
            "the database ({}) holds projection positions past the end of the broker's log, so \
             its tables were folded from another log:\n  {}\nMove the database aside (or remove \
             {} as a whole) to start afresh, or point kafka.brokers at the broker those tables \
             came from",
            crate::redact_url(settings.database_url().expose_secret()),
            past_end.join("\n  "),
            settings.dev.data_dir.display()
        );
    }
    Ok(())
}
