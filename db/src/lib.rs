//! The database every role that keeps tables shares: one pool over PostgreSQL or SQLite (sqlx's
//! `Any` driver, so every query is written once in the SQL both accept), and the migrations of
//! each backend (`migrations/{postgres,sqlite}`): the projections' read models, and the edge's
//! API keys and idempotency records.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::{
    any::{AnyPoolOptions, AnyQueryResult},
    AnyPool,
};

pub mod schema;
pub use schema::{Compatible, MigrationId, SchemaError};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("unsupported database URL (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("cannot create the database directory {path}: {source}")]
    Directory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another writer moved projection {projection} on {topic}/{partition} concurrently")]
    Conflict {
        projection: String,
        topic: String,
        partition: i32,
    },
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl FromStr for Backend {
    type Err = DbError;

    fn from_str(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else {
            Err(DbError::UnsupportedUrl)
        }
    }
}

/// A connection pool and which backend it talks to.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// The URL connected to, kept to open a replay's scratch space next to it: a secret (it
    /// may hold a password), so it never shows in `Debug` output or logs.
    url: SecretString,
}

impl Database {
    /// Connects (creating a SQLite file and its directory when needed). Does not migrate. The
    /// URL stays a secret: exposed only to open the connections.
    pub async fn connect(url: impl Into<SecretString>, max_connections: u32) -> Result<Self> {
        let secret: SecretString = url.into();
        let url = secret.expose_secret();
        sqlx::any::install_default_drivers();
        let backend: Backend = url.parse()?;
        let max_connections = match backend {
            Backend::Postgres => max_connections,
            // SQLite has one writer at a time; more connections only queue on its lock.
            Backend::Sqlite => {
                create_sqlite_dir(url)?;
                max_connections.min(4)
            }
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            // A connection still inside a transaction is not handed out again: it is closed and
            // replaced. A COMMIT that failed (SQLite's "database or disk is full") leaves it so,
            // and every later `begin_write` on it failed ("begin_with at non-zero transaction
            // depth") until the process restarted, long after the disk had space again
            // (cli/tests/faults.rs, the full data directory).
            .before_acquire(|conn, _meta| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets the query API read while the projection writes; the busy
                        // timeout makes writers wait for the lock instead of failing.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        Ok(Self {
            pool,
            backend,
            url: secret,
        })
    }

    /// The URL connected to, still a secret.
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A transaction that will write. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`, waiting up to the busy timeout for another writer): a deferred transaction
    /// that read first could only fail when it tries to write after another writer committed
    /// (`SQLITE_BUSY_SNAPSHOT`), which stalled two projections sharing a file.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// PostgreSQL: creates the monthly partitions of `order_events` for the month of `now_ms`
    /// and the next three, if missing (a no-op on SQLite). Returns the partitions created. A
    /// month whose rows already sit in the default partition is skipped with a warning: moving
    /// them is an operator's decision.
    pub async fn ensure_event_partitions(&self, now_ms: i64) -> Result<Vec<String>> {
        let mut created = Vec::new();
        if self.backend != Backend::Postgres {
            return Ok(created);
        }
        let (mut year, mut month) = year_month(now_ms);
        for _ in 0..4 {
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            let name = format!("order_events_{year:04}_{month:02}");
            let from = month_start_ms(year, month);
            let to = month_start_ms(next_year, next_month);
            let exists: Option<String> =
                sqlx::query_scalar("SELECT relname::text FROM pg_class WHERE relname = $1")
                    .bind(&name)
                    .fetch_optional(&self.pool)
                    .await?;
            if exists.is_none() {
                let ddl = format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF order_events \
                     FOR VALUES FROM ({from}) TO ({to})"
                );
                match sqlx::query(&ddl).execute(&self.pool).await {
                    Ok(_) => created.push(name),
                    Err(e) => {
                        tracing::warn!(partition = %name, error = %e, "Partition not created.")
                    }
                }
            }
            (year, month) = (next_year, next_month);
        }
        Ok(created)
    }

    /// Cheap liveness check.
    pub async fn ping(&self) -> Result<AnyQueryResult> {
        Ok(sqlx::query("SELECT 1").execute(&self.pool).await?)
    }

    /// Readiness: the database answers and its schema is one this binary runs on
    /// ([`schema`]). The reason, when not ready, names no credentials.
    pub async fn check_ready(&self) -> std::result::Result<(), String> {
        match self.check_schema().await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("database unreachable".to_owned()),
        }
    }
}

/// Year and month (1–12) of a time in ms since the epoch, UTC.
fn year_month(ms: i64) -> (i32, u8) {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (t.year(), u8::from(t.month()))
}

/// The first instant of a month, ms since the epoch, UTC.
fn month_start_ms(year: i32, month: u8) -> i64 {
    let month = time::Month::try_from(month).unwrap_or(time::Month::January);
    time::Date::from_calendar_date(year, month, 1)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
        .unwrap_or(0)
}

/// The file a `sqlite:` URL names (`None` for an in-memory database or another backend).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| path.into())
}

fn create_sqlite_dir(url: &str) -> Result<()> {
    let Some(path) = sqlite_path(url) else {
        return Ok(());
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DbError::Directory {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}
