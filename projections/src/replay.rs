//! `orderflow replay PROJECTION`: rebuilds a projection's tables from the beginning of the log
//! into fresh tables and swaps them in atomically, while the live writer and the queries keep
//! running.
//!
//! 1. A scratch space gets the full schema (migrations): on PostgreSQL a schema
//!    `orderflow_replay_<projection>` (a connection whose `search_path` is that schema), on
//!    SQLite a database file next to the live one.
//! 2. The projection's own writer code folds the log into it from offset 0, with its own
//!    positions, up to the live writer's stored positions (repeated while the live writer moves
//!    on, so the last step has little left to do).
//! 3. One transaction on the live database takes the live writer's lock (PostgreSQL: `LOCK
//!    TABLE projection_offsets`; SQLite: the write lock), reads the live positions, folds the
//!    last records up to exactly them into the scratch space, then replaces every table of the
//!    projection with the scratch copy and commits. The live positions stay as they are and
//!    now describe the new tables exactly, so the live writer simply goes on; readers see the
//!    old tables until the commit and the new ones after (MVCC on PostgreSQL, WAL on SQLite).
//!
//! A crash anywhere before the commit leaves the live tables untouched (the scratch space is
//! dropped at the next replay); the commit itself is atomic. Dead letters are not written again
//! (the live writer wrote them).

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use orderflow_platform::{
    config::ProjectionSettings,
    kafka::{KafkaClients, ReaderContext},
};
use orderflow_schemas::Codec;
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    message::{Message, OwnedMessage},
    Offset, TopicPartitionList,
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Column, Connection, Row};
use tracing::info;

use crate::{
    cache::{CHANNEL, RESET},
    db::{Backend, Database, DbError},
    metrics::ProjectionMetrics,
    writer::{Projection, ProjectionWriter, WriterError},
};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    LogStart(#[from] crate::log_start::LogStartError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "reading the log did not reach offset {target} of {topic}/{partition} within {waited:?}"
    )]
    Timeout {
        topic: String,
        partition: i32,
        target: i64,
        waited: Duration,
    },
    #[error("schemas: {0}")]
    Codec(#[from] orderflow_schemas::CodecError),
    #[error("a replay of projection {0} is already running")]
    AlreadyRunning(String),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("the replay lock {path}: {source}")]
    LockFile {
        path: String,
        source: std::io::Error,
    },
}

impl From<sqlx::Error> for ReplayError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplayFrom {
    /// From the latest snapshot ([`take_snapshot`]) when there is one, else from the beginning.
    #[default]
    LatestSnapshot,
    /// From the beginning of the log, whatever snapshot there is (after a change to the
    /// projection's fold: a snapshot holds the old fold's rows).
    Beginning,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub projection: String,
    /// When the snapshot it started from was taken (ms since the epoch), if it used one.
    pub from_snapshot: Option<i64>,
    /// Records folded: from the snapshot's positions, or from the beginning.
    pub records: usize,
    /// Rows per table swapped in.
    pub rows: BTreeMap<String, i64>,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.from_snapshot {
            Some(taken_at) => writeln!(
                f,
                "replayed projection {} from its snapshot taken at {taken_at} (ms since the \
                 epoch) and the {} records after it; swapped in:",
                self.projection, self.records
            )?,
            None => writeln!(
                f,
                "replayed projection {} from {} records; swapped in:",
                self.projection, self.records
            )?,
        }
        for (table, rows) in &self.rows {
            writeln!(f, "  {table}: {rows} rows")?;
        }
        Ok(())
    }
}

type Positions = BTreeMap<(String, i32), i64>;

/// The live writer's stored positions for `projection`.
async fn live_positions<'c, E>(executor: E, projection: &str) -> Result<Positions, ReplayError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    live_positions_in(executor, "", projection).await
}

/// The stored positions of `projection` in the `projection_offsets` table named with `prefix`
/// (a snapshot's schema, or nothing).
async fn live_positions_in<'c, E>(
    executor: E,
    prefix: &str,
    projection: &str,
) -> Result<Positions, ReplayError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let rows = sqlx::query(&format!(
        "SELECT topic, partition_id, next_offset FROM {prefix}projection_offsets \
         WHERE projection = $1"
    ))
    .bind(projection)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                (r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as i32),
                r.try_get::<i64, _>(2)?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// A space next to the live tables with the full schema: a replay's scratch tables, a snapshot
/// being taken, the latest snapshot. On PostgreSQL the schema `orderflow_<space>_<projection>`,
/// on SQLite the file `<database>.<space>-<projection>` (attached under the space's name).
struct Scratch {
    db: Database,
    /// PostgreSQL: the schema; SQLite: the file.
    place: String,
    /// SQLite: the name it is attached under to a live connection.
    alias: String,
}

/// The spaces ([`Scratch`]).
const REPLAY_SPACE: &str = "replay";
const SNAPSHOT_SPACE: &str = "snapshot";
const NEXT_SNAPSHOT_SPACE: &str = "snapshot-next";
/// The table of a snapshot saying when it was taken.
const SNAPSHOT_TAKEN: &str = "snapshot_taken";

fn place_of(live: &Database, space: &str, projection: &str) -> String {
    match live.backend() {
        Backend::Postgres => format!("orderflow_{}_{projection}", space.replace('-', "_")),
        Backend::Sqlite => format!(
            "{}.{space}-{projection}",
            sqlite_path(live.url().expose_secret())
        ),
    }
}

impl Scratch {
    /// A new, empty space with the full schema (what was there is dropped).
    async fn create(live: &Database, space: &str, projection: &str) -> Result<Self, ReplayError> {
        let place = place_of(live, space, projection);
        let alias = space.replace('-', "_");
        match live.backend() {
            Backend::Postgres => {
                let schema = place;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(live.pool())
                    .await?;
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(live.pool())
                    .await?;
                let db = Database::connect(in_schema(live, &schema), 2).await?;
                db.migrate().await?;
                Ok(Self {
                    db,
                    place: schema,
                    alias,
                })
            }
            Backend::Sqlite => {
                let file = place;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{file}{suffix}"));
                }
                let db = Database::connect(format!("sqlite://{file}?mode=rwc"), 2).await?;
                db.migrate().await?;
                Ok(Self {
                    db,
                    place: file,
                    alias,
                })
            }
        }
    }

    /// How a live connection names `table` of the space.
    fn table(&self, backend: Backend, table: &str) -> String {
        match backend {
            Backend::Postgres => format!("{}.{table}", self.place),
            Backend::Sqlite => format!("{}.{table}", self.alias),
        }
    }

    /// Attaches the space to a live SQLite connection (nothing on PostgreSQL).
    async fn attach(
        &self,
        conn: &mut sqlx::AnyConnection,
        backend: Backend,
    ) -> Result<(), ReplayError> {
        if backend == Backend::Sqlite {
            sqlx::query(&format!("ATTACH DATABASE $1 AS {}", self.alias))
                .bind(&self.place)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Detaches it again; `false` when that failed (the connection must not go back to the
    /// pool with the space attached).
    async fn detach(&self, conn: &mut sqlx::AnyConnection, backend: Backend) -> bool {
        backend != Backend::Sqlite
            || sqlx::query(&format!("DETACH DATABASE {}", self.alias))
                .execute(&mut *conn)
                .await
                .is_ok()
    }

    async fn drop(self, live: &Database) {
        self.db.pool().close().await;
        match live.backend() {
            Backend::Postgres => {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.place))
                    .execute(live.pool())
                    .await;
            }
            Backend::Sqlite => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.place));
                }
            }
        }
    }
}

fn sqlite_path(url: &str) -> String {
    url.trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Reads the projection's topics from the beginning, handing records below a target on.
struct LogCursor {
    consumer: StreamConsumer<ReaderContext>,
    /// A record read past the current target, kept for the next one.
    held: Vec<OwnedMessage>,
    records: usize,
    /// Where reading started, per partition (absent: at its beginning): a target there is
    /// reached without a record (the consumer reports no position before its first).
    starts: Positions,
}

impl LogCursor {
    /// Reads `topics` from `start` (a snapshot's positions), or from their beginning; a
    /// partition must still hold every record from where reading starts.
    fn open(
        clients: &KafkaClients,
        topics: &[&'static str],
        start: Option<&Positions>,
    ) -> Result<Self, ReplayError> {
        let consumer: StreamConsumer<ReaderContext> = clients
            .reader("replay")
            .create_with_context(ReaderContext)?;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(topic), clients.admin_timeout())?;
            for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let from = start.and_then(|s| s.get(&((*topic).to_owned(), p.id())).copied());
                match from {
                    Some(from) => {
                        crate::log_start::require_from(
                            &consumer,
                            topic,
                            p.id(),
                            from,
                            clients.admin_timeout(),
                        )?;
                        tpl.add_partition_offset(topic, p.id(), Offset::Offset(from))?;
                    }
                    None => {
                        crate::log_start::require_whole(
                            &consumer,
                            topic,
                            p.id(),
                            clients.admin_timeout(),
                        )?;
                        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                    }
                }
            }
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            held: Vec::new(),
            records: 0,
            starts: start.cloned().unwrap_or_default(),
        })
    }

    fn reached(&self, targets: &Positions) -> Result<bool, ReplayError> {
        if self.held.iter().any(|m| {
            targets
                .get(&(m.topic().to_owned(), m.partition()))
                .is_some_and(|t| m.offset() < *t)
        }) {
            return Ok(false);
        }
        let position = self.consumer.position()?;
        Ok(targets.iter().all(|((topic, partition), target)| {
            *target
                <= self
                    .starts
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .unwrap_or(0)
                || position
                    .find_partition(topic, *partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .is_some_and(|at| at >= *target)
        }))
    }

    /// Applies every record below `targets` (per partition; partitions without a target are
    /// not applied) into the scratch space through `writer`.
    async fn advance<P: Projection>(
        &mut self,
        writer: &ProjectionWriter<P>,
        targets: &Positions,
        batch_size: usize,
    ) -> Result<(), ReplayError> {
        let below = |m: &OwnedMessage| {
            targets
                .get(&(m.topic().to_owned(), m.partition()))
                .is_some_and(|t| m.offset() < *t)
        };
        let waited = Duration::from_secs(300);
        let deadline = Instant::now() + waited;
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|m| below(m));
        self.held = held;
        batch.extend(ready);
        loop {
            if batch.len() >= batch_size || (self.reached(targets)? && !batch.is_empty()) {
                self.records += batch.len();
                writer.write(&batch, None).await?;
                batch.clear();
            }
            if self.reached(targets)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                let ((topic, partition), target) = targets
                    .iter()
                    .next()
                    .map(|(k, v)| (k.clone(), *v))
                    .unwrap_or_default();
                return Err(ReplayError::Timeout {
                    topic,
                    partition,
                    target,
                    waited,
                });
            }
            // Nothing within 100 ms, or the end of a partition: look at the positions again.
            if let Ok(Ok(message)) =
                tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await
            {
                let message = message.detach();
                if below(&message) {
                    batch.push(message);
                } else {
                    self.held.push(message);
                }
            }
        }
    }
}

/// Held while a replay of one projection runs, by whichever process runs it: two replays of
/// one projection would share (and drop) one scratch space. On PostgreSQL a session advisory
/// lock (`hashtext('orderflow_replay_<projection>')`), on SQLite an exclusive lock on the file
/// `<database>.replay-<projection>.lock`. Released by [`ReplayLock::release`] (at once), when
/// dropped (PostgreSQL: when the server notices the closed session, a moment later), and by the
/// database or the operating system when the process dies. An operator's tool may hold it to
/// keep replays out.
pub enum ReplayLock {
    /// A session-level advisory lock on a connection of its own, which is closed with the lock.
    Postgres {
        session: sqlx::AnyConnection,
        key: String,
    },
    /// An exclusive lock on a file next to the database.
    Sqlite { _file: std::fs::File },
}

impl ReplayLock {
    /// Takes the lock, or fails with [`ReplayError::AlreadyRunning`] if someone holds it.
    pub async fn acquire(live: &Database, projection: &str) -> Result<Self, ReplayError> {
        match live.backend() {
            Backend::Postgres => {
                // Detached from the pool: dropping it closes the session, which ends the lock.
                let mut conn = live.pool().acquire().await?.detach();
                let key = format!("orderflow_replay_{projection}");
                let taken: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1)::bigint)")
                        .bind(&key)
                        .fetch_one(&mut conn)
                        .await?;
                if taken {
                    Ok(Self::Postgres { session: conn, key })
                } else {
                    Err(ReplayError::AlreadyRunning(projection.to_owned()))
                }
            }
            Backend::Sqlite => {
                let path = format!(
                    "{}.replay-{projection}.lock",
                    sqlite_path(live.url().expose_secret())
                );
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|source| ReplayError::LockFile {
                        path: path.clone(),
                        source,
                    })?;
                match file.try_lock() {
                    Ok(()) => Ok(Self::Sqlite { _file: file }),
                    Err(std::fs::TryLockError::WouldBlock) => {
                        Err(ReplayError::AlreadyRunning(projection.to_owned()))
                    }
                    Err(std::fs::TryLockError::Error(source)) => {
                        Err(ReplayError::LockFile { path, source })
                    }
                }
            }
        }
    }
}

impl ReplayLock {
    /// Releases the lock now: the next replay, here or anywhere, can take it at once. (Dropping
    /// it releases it too, but on PostgreSQL only once the server has ended the session.)
    pub async fn release(self) -> Result<(), ReplayError> {
        match self {
            Self::Postgres { mut session, key } => {
                sqlx::query("SELECT pg_advisory_unlock(hashtext($1)::bigint)")
                    .bind(&key)
                    .execute(&mut session)
                    .await?;
                sqlx::Connection::close(session).await?;
            }
            Self::Sqlite { .. } => {}
        }
        Ok(())
    }
}

/// Rebuilds `projection` from the log and swaps the new tables in. See the module docs. Fails
/// with [`ReplayError::AlreadyRunning`] while another replay of the projection runs anywhere.
pub async fn replay<P: Projection>(
    projection: P,
    live: &Database,
    clients: &KafkaClients,
    settings: &ProjectionSettings,
    from: ReplayFrom,
) -> Result<ReplayReport, ReplayError> {
    let name = projection.name();
    let tables = projection.tables();
    let topics = projection.topics();
    let lock = ReplayLock::acquire(live, name).await?;
    let scratch = Scratch::create(live, REPLAY_SPACE, name).await?;
    let result = async {
        // From a snapshot: its rows and positions are the scratch space's start.
        let snapshot = match from {
            ReplayFrom::LatestSnapshot => latest_snapshot(live, name).await?,
            ReplayFrom::Beginning => None,
        };
        if let Some(snapshot) = &snapshot {
            seed(live, &scratch, name, tables).await?;
            info!(
                projection = name,
                taken_at = snapshot.taken_at_ms,
                "Replaying from the latest snapshot."
            );
        }
        let start = snapshot.as_ref().map(|s| s.positions.clone());
        let writer = ProjectionWriter::new(
            projection,
            scratch.db.clone(),
            clients.clone(),
            settings,
            Arc::new(Codec::new()?),
            ProjectionMetrics::unregistered(),
        );
        // Metadata and watermark lookups: off the async workers.
        let mut cursor = {
            let (clients, topics) = (clients.clone(), topics.clone());
            tokio::task::spawn_blocking(move || LogCursor::open(&clients, &topics, start.as_ref()))
                .await
                .map_err(|_| ReplayError::Kafka(KafkaError::Canceled))??
        };
        let batch = settings.batch_max_records.max(1);

        // Catch up with the live writer, unlocked, until a round finds nothing new.
        let mut rounds = 0;
        loop {
            let targets = live_positions(live.pool(), name).await?;
            cursor.advance(&writer, &targets, batch).await?;
            rounds += 1;
            if live_positions(live.pool(), name).await? == targets {
                break;
            }
            if rounds >= 20 {
                info!(
                    projection = name,
                    rounds, "The live writer keeps moving; finishing under its lock."
                );
                break;
            }
        }
        info!(
            projection = name,
            records = cursor.records,
            "Replayed up to the live writer; swapping."
        );

        // The swap: the live writer waits on its lock meanwhile; readers do not.
        let backend = live.backend();
        let mut conn = live.pool().acquire().await?;
        scratch.attach(&mut conn, backend).await?;
        let swapped = async {
            let mut tx = conn.begin().await?;
            match backend {
                Backend::Postgres => {
                    sqlx::query("LOCK TABLE projection_offsets IN EXCLUSIVE MODE")
                        .execute(&mut *tx)
                        .await?;
                }
                // Any write takes SQLite's one write lock for the rest of the transaction. (Not
                // `BEGIN IMMEDIATE`: that would lock the attached scratch file as well, which the
                // scratch writer still writes to below.)
                Backend::Sqlite => {
                    sqlx::query(
                        "UPDATE projection_offsets SET next_offset = next_offset \
                         WHERE projection = $1",
                    )
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            let targets = live_positions(&mut *tx, name).await?;
            cursor.advance(&writer, &targets, batch).await?;
            let mut rows = BTreeMap::new();
            for table in tables {
                sqlx::query(&format!("DELETE FROM {table}"))
                    .execute(&mut *tx)
                    .await?;
                let copied = sqlx::query(&format!(
                    "INSERT INTO {table} SELECT * FROM {}",
                    scratch.table(backend, table)
                ))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                rows.insert((*table).to_owned(), copied as i64);
            }
            if backend == Backend::Postgres {
                // Delivered with the commit: every query replica drops its cache.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(RESET)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, ReplayError>(rows)
        }
        .await;
        if !scratch.detach(&mut conn, backend).await {
            // Never hand a connection with the scratch file attached back to the pool.
            conn.detach();
        }
        Ok::<_, ReplayError>(ReplayReport {
            projection: name.to_owned(),
            from_snapshot: snapshot.map(|s| s.taken_at_ms),
            records: cursor.records,
            rows: swapped?,
        })
    }
    .await;
    scratch.drop(live).await;
    if let Err(e) = lock.release().await {
        // Dropped instead: the database ends the lock with the session.
        tracing::debug!(error = %e, "Releasing the replay lock failed.");
    }
    result
}

/// A projection's snapshot: when it was taken, and the positions its rows reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub projection: String,
    pub taken_at_ms: i64,
    pub positions: BTreeMap<(String, i32), i64>,
    /// Rows per table.
    pub rows: BTreeMap<String, i64>,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "snapshot of projection {} taken at {} (ms since the epoch), at {} records of the log:",
            self.projection,
            self.taken_at_ms,
            self.positions.values().sum::<i64>()
        )?;
        for (table, rows) in &self.rows {
            writeln!(f, "  {table}: {rows} rows")?;
        }
        Ok(())
    }
}

/// Takes a snapshot of `projection`: its tables and positions, copied in one consistent read
/// of the live database (a repeatable-read transaction on PostgreSQL, one read transaction on
/// SQLite) while the live writer goes on, into a new space that then replaces the previous
/// snapshot in one step (PostgreSQL: a schema renamed in a transaction; SQLite: a file renamed
/// over the old one). Replays start from it ([`ReplayFrom::LatestSnapshot`]); a crash leaves
/// the previous snapshot in place. Holds the replay lock, so a replay never reads a snapshot
/// being replaced.
pub async fn take_snapshot<P: Projection>(
    projection: &P,
    live: &Database,
) -> Result<Snapshot, ReplayError> {
    let name = projection.name();
    let tables = projection.tables();
    let lock = ReplayLock::acquire(live, name).await?;
    let result = async {
        let next = Scratch::create(live, NEXT_SNAPSHOT_SPACE, name).await?;
        let backend = live.backend();
        let taken_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut conn = live.pool().acquire().await?;
        next.attach(&mut conn, backend).await?;
        let copied = async {
            let mut tx = conn.begin().await?;
            if backend == Backend::Postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(&mut *tx)
                    .await?;
            }
            for table in tables {
                sqlx::query(&format!(
                    "INSERT INTO {} SELECT * FROM {table}",
                    next.table(backend, table)
                ))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(&format!(
                "INSERT INTO {} SELECT * FROM projection_offsets WHERE projection = $1",
                next.table(backend, "projection_offsets")
            ))
            .bind(name)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "CREATE TABLE {} (projection TEXT NOT NULL, taken_at BIGINT NOT NULL)",
                next.table(backend, SNAPSHOT_TAKEN)
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "INSERT INTO {} (projection, taken_at) VALUES ($1, $2)",
                next.table(backend, SNAPSHOT_TAKEN)
            ))
            .bind(name)
            .bind(taken_at_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, ReplayError>(())
        }
        .await;
        if !next.detach(&mut conn, backend).await {
            conn.detach();
        }
        copied?;
        // Replace the previous snapshot in one step.
        next.db.pool().close().await;
        let current = place_of(live, SNAPSHOT_SPACE, name);
        match backend {
            Backend::Postgres => {
                let mut tx = live.pool().begin().await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {current} CASCADE"))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&format!("ALTER SCHEMA {} RENAME TO {current}", next.place))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Backend::Sqlite => {
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{current}{suffix}"));
                }
                std::fs::rename(&next.place, &current).map_err(|source| ReplayError::File {
                    path: current.clone(),
                    source,
                })?;
            }
        }
        latest_snapshot(live, name)
            .await?
            .ok_or_else(|| ReplayError::Db(DbError::Sqlx(sqlx::Error::RowNotFound)))
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::debug!(error = %e, "Releasing the replay lock failed.");
    }
    result
}

/// The live database's URL with `schema` as the search path: unqualified names are its tables.
fn in_schema(live: &Database, schema: &str) -> SecretString {
    let live_url = live.url().expose_secret();
    let separator = if live_url.contains('?') { '&' } else { '?' };
    SecretString::from(format!(
        "{live_url}{separator}options=-c%20search_path%3D{schema}"
    ))
}

/// The latest snapshot of `projection` and a connection on which its tables are the
/// unqualified ones (what the projection's own queries read), if one was taken.
pub async fn open_snapshot(
    live: &Database,
    projection: &str,
) -> Result<Option<(Database, Snapshot)>, ReplayError> {
    let Some(snapshot) = latest_snapshot(live, projection).await? else {
        return Ok(None);
    };
    let place = place_of(live, SNAPSHOT_SPACE, projection);
    let db = match live.backend() {
        Backend::Postgres => Database::connect(in_schema(live, &place), 1).await?,
        Backend::Sqlite => Database::connect(format!("sqlite://{place}"), 1).await?,
    };
    Ok(Some((db, snapshot)))
}

/// The latest snapshot of `projection`, if one was taken.
pub async fn latest_snapshot(
    live: &Database,
    projection: &str,
) -> Result<Option<Snapshot>, ReplayError> {
    let place = place_of(live, SNAPSHOT_SPACE, projection);
    let (db, prefix) = match live.backend() {
        Backend::Postgres => {
            let exists: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = $1 AND table_name = $2",
            )
            .bind(&place)
            .bind(SNAPSHOT_TAKEN)
            .fetch_one(live.pool())
            .await?;
            if exists == 0 {
                return Ok(None);
            }
            (live.clone(), format!("{place}."))
        }
        Backend::Sqlite => {
            if !std::path::Path::new(&place).exists() {
                return Ok(None);
            }
            (
                Database::connect(format!("sqlite://{place}"), 1).await?,
                String::new(),
            )
        }
    };
    let read = async {
        let taken_at_ms: i64 = sqlx::query_scalar(&format!(
            "SELECT taken_at FROM {prefix}{SNAPSHOT_TAKEN} WHERE projection = $1"
        ))
        .bind(projection)
        .fetch_one(db.pool())
        .await?;
        let positions = live_positions_in(db.pool(), &prefix, projection).await?;
        let tables: &[&str] = match projection {
            "orders" => crate::orders::OrdersProjection.tables(),
            _ => crate::inventory::InventoryProjection.tables(),
        };
        let mut rows = BTreeMap::new();
        for table in tables {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {prefix}{table}"))
                .fetch_one(db.pool())
                .await?;
            rows.insert((*table).to_owned(), n);
        }
        Ok::<_, ReplayError>(Snapshot {
            projection: projection.to_owned(),
            taken_at_ms,
            positions,
            rows,
        })
    }
    .await;
    if live.backend() == Backend::Sqlite {
        db.pool().close().await;
    }
    read.map(Some)
}

/// Fills the scratch space with the latest snapshot's rows and positions.
async fn seed(
    live: &Database,
    scratch: &Scratch,
    projection: &str,
    tables: &[&str],
) -> Result<(), ReplayError> {
    let snapshot = place_of(live, SNAPSHOT_SPACE, projection);
    let mut conn = scratch.db.pool().acquire().await?;
    let prefix = match live.backend() {
        Backend::Postgres => format!("{snapshot}."),
        Backend::Sqlite => {
            sqlx::query("ATTACH DATABASE $1 AS snapshot")
                .bind(&snapshot)
                .execute(&mut *conn)
                .await?;
            "snapshot.".to_owned()
        }
    };
    let copied = async {
        let mut tx = conn.begin().await?;
        for table in tables.iter().chain(&["projection_offsets"]) {
            sqlx::query(&format!(
                "INSERT INTO {table} SELECT * FROM {prefix}{table}"
            ))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok::<_, ReplayError>(())
    }
    .await;
    if live.backend() == Backend::Sqlite
        && sqlx::query("DETACH DATABASE snapshot")
            .execute(&mut *conn)
            .await
            .is_err()
    {
        conn.detach();
    }
    copied
}

/// Columns that record when a row was written, not what the log says: left out of checksums.
const WRITE_TIME_COLUMNS: [&str; 1] = ["projected_at"];

/// Rows and a content hash of `table`, independent of row order and of write times: for
/// comparing a replayed projection with the live one.
pub async fn checksum(db: &Database, table: &str) -> Result<(usize, u64), ReplayError> {
    let rows = sqlx::query(&format!("SELECT * FROM {table}"))
        .fetch_all(db.pool())
        .await?;
    let mut lines: BTreeSet<String> = BTreeSet::new();
    let mut duplicates = 0usize;
    for row in &rows {
        let mut line = String::new();
        for (i, column) in row.columns().iter().enumerate() {
            if WRITE_TIME_COLUMNS.contains(&column.name()) {
                continue;
            }
            let value = if let Ok(v) = row.try_get::<Option<String>, _>(i) {
                format!("{v:?}")
            } else if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                format!("{v:?}")
            } else if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
                format!("{v:?}")
            } else {
                "?".to_owned()
            };
            line.push_str(column.name());
            line.push('=');
            line.push_str(&value);
            line.push('|');
        }
        if !lines.insert(line) {
            duplicates += 1;
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    lines.hash(&mut hasher);
    duplicates.hash(&mut hasher);
    Ok((rows.len(), hasher.finish()))
}
