//! What `orderflow dev` adds to the pipeline: the in-process broker, and a data directory kept
//! consistent with it.
//!
//! The in-process broker keeps its log in memory, so every `dev` start begins with an empty
//! log. Tables (and their stored positions) from an earlier run describe a log that no longer
//! exists, and stored positions past the new log's end would make the projection skip new
//! events. So on a fresh in-process broker:
//! - the default SQLite file of an earlier run is moved aside (kept, not deleted) and a new one
//!   is started, and the user is told;
//! - a configured database that already holds projection positions is refused with an
//!   explanation, rather than silently mixing two logs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use orderflow_platform::{
    config::EMBEDDED_DATABASE_FILE,
    kafka::{EmbeddedBroker, KafkaClients},
    Settings,
};
use orderflow_projections::Database;
use orderflow_topics::{
    apply::{apply, ApplyReport, Provisioner},
    Catalog,
};
use sqlx::Row;

/// Where the pipeline's broker is.
pub enum Broker {
    /// Started in this process; lives as long as this value.
    Embedded(EmbeddedBroker),
    External(String),
}

impl Broker {
    /// The configured broker, or a new in-process one when `kafka.brokers` is empty.
    pub fn from_settings(settings: &Settings) -> Result<Self> {
        if settings.kafka.brokers.trim().is_empty() {
            let broker = EmbeddedBroker::start(settings.kafka.embedded_brokers)
                .context("starting the in-process broker")?;
            Ok(Self::Embedded(broker))
        } else {
            Ok(Self::External(settings.kafka.brokers.clone()))
        }
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(b) => b.bootstrap_servers().to_owned(),
            Self::External(s) => s.clone(),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Self::Embedded(_))
    }

    /// Creates missing topics from the catalog; reports drift.
    pub async fn apply_topics(&self, settings: &Settings) -> Result<ApplyReport> {
        let catalog = Catalog::load()?;
        let clients = KafkaClients::new(&settings.kafka, self.bootstrap());
        let provisioner = match self {
            Self::Embedded(b) => Provisioner::Embedded(b),
            Self::External(_) => Provisioner::Admin,
        };
        Ok(apply(&catalog, &clients, provisioner).await?)
    }
}

/// Makes the database agree with a fresh in-process log (see the module docs). Returns where
/// an earlier run's SQLite file was moved, if it was.
pub async fn prepare_database_for_fresh_log(settings: &Settings) -> Result<Option<PathBuf>> {
    if settings.database.url.expose().is_none() {
        return move_aside(&settings.dev.data_dir.join(EMBEDDED_DATABASE_FILE));
    }
    let db = Database::connect(&settings.database_url(), 1)
        .await
        .context("connecting to the database (database.url)")?;
    db.migrate().await.context("applying database migrations")?;
    let positions: i64 = sqlx::query("SELECT COUNT(*) FROM projection_offsets")
        .fetch_one(db.pool())
        .await?
        .try_get(0)?;
    if positions > 0 {
        bail!(
            "the configured database holds projection positions from another broker's log, and \
             the in-process broker starts with an empty log; point database.url at an empty \
             database, or set kafka.brokers to the broker that log came from"
        );
    }
    Ok(None)
}

fn move_aside(file: &Path) -> Result<Option<PathBuf>> {
    if !file.exists() {
        return Ok(None);
    }
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let target = file.with_extension(format!("sqlite.{stamp}.previous"));
    std::fs::rename(file, &target)
        .with_context(|| format!("moving {} aside to {}", file.display(), target.display()))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", file.display()));
        if side.exists() {
            let side_target = PathBuf::from(format!("{}{suffix}", target.display()));
            std::fs::rename(&side, &side_target)
                .with_context(|| format!("moving {} aside", side.display()))?;
        }
    }
    Ok(Some(target))
}
