//! Backups and restores of a whole orderflow installation: the event topics, the processors'
//! changelogs, the dead letters and their resolutions, the consumer groups' offsets of the
//! processors, and the database (read models, API keys, idempotency records).
//!
//! - [`backup()`](backup): one backup set into a directory, full or incremental from the
//!   previous set's ends, consistent while the pipeline runs ([`take`] says why);
//! - [`restore()`](restore): a chain of sets into an empty cluster and database, with every
//!   offset the data refers to mapped to where the broker puts the records ([`offsets`]).
//!
//! The directory's layout: `manifest.json` ([`manifest`]) and one directory per set with
//! `topics/<topic>/<partition>.avro` ([`format`]: Avro object container files) and the database
//! copy (`database.sqlite` or `database.pgdump`).

pub mod database;
pub mod format;
pub mod manifest;
pub mod offsets;
pub mod restore;
pub mod take;

use std::{path::PathBuf, time::Duration};

pub use restore::{restore, RestoreOptions, RestoreReport};
pub use take::{backup, BackupOptions, BackupReport};

/// How long a read of a partition may receive nothing before it fails.
pub const READ_STALL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a readable backup file: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{}: checksum {found} differs from the manifest's {expected}: the file is damaged", file.display())]
    Checksum {
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("backup manifest: {0}")]
    Manifest(String),
    #[error("an incremental backup is impossible: {0}")]
    Gap(String),
    #[error("the target is not empty: {0}; restore into an empty cluster and database (or pass --force)")]
    NotEmpty(String),
    #[error("{0}")]
    Target(String),
    #[error("the broker put {topic}/{partition}'s record at offset {got} where {expected} was expected: something else writes to the topic; restore into an idle, empty cluster")]
    Offsets {
        topic: String,
        partition: i32,
        expected: i64,
        got: i64,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("{0} failed: {1}")]
    Tool(String, String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Db(#[from] orderflow_db::DbError),
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;
