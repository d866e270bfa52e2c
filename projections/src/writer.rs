//! The projection writer: one consumer group per projection, batched, exactly once into the
//! database.
//!
//! Why a crash at any point neither loses nor doubles a row: each batch is one database
//! transaction that (1) reads the projection's stored positions from `projection_offsets`,
//! (2) skips every record below them — already applied by an earlier run or another replica —
//! (3) applies the rest and (4) moves the positions, with a compare-and-set so two writers
//! cannot both move the same partition. Rows and positions commit together or not at all.
//! Only after the commit is the group offset committed, as a starting hint, coalesced over
//! batches (`orderflow_platform::group_commits`); it can lag the database (a crash in between,
//! or offsets not yet sent) but never lead it, and anything re-read is skipped by (2). On
//! assignment the writer seeks each new partition to its stored position.
//!
//! Every order the batch changed is announced with its new version for the query caches
//! (crate::cache): on PostgreSQL by `NOTIFY` inside the transaction (delivered only if it
//! commits), and in-process on the [`ChangeFeed`] after the commit. A crash after the commit and
//! before the in-process announcement loses nothing: that process's cache is gone with it.
//!
//! Poison records (undecodable) are written to the projection's dead-letter topic and
//! acknowledged before the batch commits; a crash between the two can repeat a dead letter
//! (consumers of dead letters key them by source topic/partition/offset), never lose one.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use orderflow_platform::{
    config::ProjectionSettings,
    gaps::GapGuard,
    group_commits::GroupCommits,
    health::Readiness,
    kafka::{
        collect_batch_within, dead_letter_headers, header_value, is_release_marker, next_offsets,
        off_runtime, retain_assigned, BatchBounds, GroupContext, KafkaClients,
    },
    restart::Restarts,
    telemetry::continue_trace,
};
use orderflow_schemas::{headers, Codec, OrderEvent};
use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
    message::{Message, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, info, warn, Instrument};

use crate::{
    cache::{notify_payloads, ChangeFeed, OrderChange, CHANNEL},
    db::{Backend, Database, DbError},
    metrics::{FinalLabels, ProjectionLabels, ProjectionMetrics},
};

/// The final status an event puts its order in, if it is a final event.
fn final_status(event: &OrderEvent) -> Option<&'static str> {
    match event {
        OrderEvent::OrderConfirmed(_) => Some("confirmed"),
        OrderEvent::OrderRejected(_) => Some("rejected"),
        OrderEvent::OrderCancelled(_) => Some("cancelled"),
        _ => None,
    }
}

/// One projection: which topics it folds and how one event changes its tables.
pub trait Projection: Send + Sync + 'static {
    /// Name in `projection_offsets`, the consumer group and logs.
    fn name(&self) -> &'static str;
    fn topics(&self) -> Vec<&'static str>;
    fn dead_letter_topic(&self) -> &'static str;
    /// The tables this projection writes (and only it): what a replay rebuilds and swaps in.
    fn tables(&self) -> &'static [&'static str];
    /// Applies one event inside the batch's transaction. Must be idempotent by itself too
    /// (version checks), so a replay over existing rows changes nothing. `written_at` is the
    /// writer's wall clock for this batch (ms), for freshness columns outside the fold.
    /// Returns whether the tables changed (`false` for an event they already reflect).
    fn apply(
        &self,
        conn: &mut AnyConnection,
        event: &OrderEvent,
        written_at: i64,
    ) -> impl Future<Output = Result<bool, DbError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for WriterError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

/// What a committed batch did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: usize,
    pub skipped: usize,
    pub dead_lettered: usize,
}

/// How often the writer looks for new assignments while its input is idle.
const ASSIGNMENT_CHECK: Duration = Duration::from_millis(200);

pub struct ProjectionWriter<P: Projection> {
    projection: Arc<P>,
    db: Database,
    clients: KafkaClients,
    settings: ProjectionSettings,
    codec: Arc<Codec>,
    metrics: ProjectionMetrics,
    labels: ProjectionLabels,
    readiness: Option<Readiness>,
    changes: Option<ChangeFeed>,
}

impl<P: Projection> ProjectionWriter<P> {
    pub fn new(
        projection: P,
        db: Database,
        clients: KafkaClients,
        settings: &ProjectionSettings,
        codec: Arc<Codec>,
        metrics: ProjectionMetrics,
    ) -> Self {
        let labels = ProjectionLabels {
            projection: projection.name().to_owned(),
        };
        Self {
            projection: Arc::new(projection),
            db,
            clients,
            settings: settings.clone(),
            codec,
            metrics,
            labels,
            readiness: None,
            changes: None,
        }
    }

    /// Announces the orders each committed batch changed on `feed` (this process's caches).
    pub fn with_change_feed(mut self, feed: ChangeFeed) -> Self {
        self.changes = Some(feed);
        self
    }

    /// Reports `projection <name>` on `/readyz`: not ready until its group assigned it.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    pub fn group_id(&self) -> String {
        format!("orderflow-projection-{}", self.projection.name())
    }

    /// Runs until cancelled; a failed session restarts from the stored positions, after a
    /// backoff ([`Restarts`]).
    pub async fn run(self, cancel: CancellationToken) {
        let mut restarts = Restarts::new(format!("projection {}", self.projection.name()));
        loop {
            restarts.session_started();
            match self.session(&cancel).await {
                Ok(()) => {
                    info!(projection = self.projection.name(), "Projection stopped.");
                    return;
                }
                Err(e) => {
                    if !restarts.failed(&e, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    async fn session(&self, cancel: &CancellationToken) -> Result<(), WriterError> {
        let name = self.projection.name();
        let consumer: Arc<StreamConsumer<GroupContext>> = self
            .clients
            .consumer(name, &self.group_id())
            .create_with_context({
                let context = GroupContext::new("projection")
                    .with_metrics(&self.group_id(), self.metrics.consumer.clone())
                    .pause_on_assign();
                match &self.readiness {
                    Some(r) => context.with_readiness(r, &format!("projection {name}")),
                    None => context,
                }
            })
            .map(Arc::new)?;
        let result = self.session_on(&consumer, cancel).await;
        // Closing leaves the group: a network round trip that a broker which stopped answering
        // can hold for long. Off the async workers, so a drain's deadline still fires.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        result
    }

    async fn session_on(
        &self,
        consumer: &Arc<StreamConsumer<GroupContext>>,
        cancel: &CancellationToken,
    ) -> Result<(), WriterError> {
        let name = self.projection.name();
        let dead_letters: FutureProducer = self
            .clients
            .idempotent_producer(&format!("projection-{name}-dlq"))
            .create()?;
        consumer.subscribe(&self.projection.topics())?;
        info!(projection = name, group = %self.group_id(), "Projection started.");
        let bounds = BatchBounds {
            max_records: self.settings.batch_max_records,
            max_wait: Duration::from_millis(self.settings.batch_max_ms),
            idle: Duration::from_millis(self.settings.batch_idle_ms),
        };
        let mut commits = GroupCommits::default();
        let mut known: BTreeMap<(String, i32), Option<u64>> = BTreeMap::new();
        let mut gaps = GapGuard::new(self.clients.settings().recheck_offset_gaps);
        loop {
            // Bounded wait, so that newly assigned (paused) partitions are seeked and resumed
            // even while no other partition has records.
            let batch = retain_assigned(
                consumer,
                collect_batch_within(consumer, cancel, &bounds, Some(ASSIGNMENT_CHECK)).await,
            );
            self.seek_new_partitions(consumer, &mut known, &mut gaps)
                .await?;
            // A revoked partition's offset is never committed over its new owner's.
            commits.retain(|topic, partition| known.contains_key(&(topic.to_owned(), partition)));
            // A partition whose offsets jump is read again from the jump before its later
            // records are written (`orderflow_platform::gaps`).
            let (batch, rereads) = gaps.check_and_seek(consumer, batch).await?;
            if rereads > 0 {
                self.metrics
                    .gap_rereads
                    .get_or_create(&self.labels)
                    .inc_by(rereads as u64);
            }
            if !batch.is_empty() {
                let outcome = self.write(&batch, Some(&dead_letters)).await?;
                // A hint for where to resume; the database's positions are the truth.
                commits.record(&next_offsets(&batch)?);
                debug!(projection = name, ?outcome, "Batch committed.");
            }
            // At most one group commit a second while batches keep coming, one as soon as a
            // poll finds nothing.
            if let Some(offsets) = commits.due(batch.is_empty())? {
                consumer.commit(&offsets, CommitMode::Async)?;
                self.metrics.group_commits.get_or_create(&self.labels).inc();
            }
            if cancel.is_cancelled() {
                // Every offset synchronously: an asynchronous commit may still be in flight.
                let offsets = commits.all()?;
                if offsets.count() > 0 {
                    off_runtime(consumer, move |c| c.commit(&offsets, CommitMode::Sync)).await?;
                }
                return Ok(());
            }
        }
    }

    /// Newly assigned partitions arrive paused (see `GroupContext::pause_on_assign`): each is
    /// moved to the position stored with the rows, if there is one, and resumed. (The group
    /// offset is committed after the database and may lag it; records below the stored position
    /// would be skipped anyway, this saves reading them.) A partition revoked and assigned back
    /// since the last call counts as new (its assignment epoch changed): it is paused again.
    async fn seek_new_partitions(
        &self,
        consumer: &Arc<StreamConsumer<GroupContext>>,
        known: &mut BTreeMap<(String, i32), Option<u64>>,
        gaps: &mut GapGuard,
    ) -> Result<(), WriterError> {
        let context = consumer.context();
        let assigned: BTreeMap<(String, i32), Option<u64>> = consumer
            .assignment()?
            .elements()
            .iter()
            .map(|e| {
                let epoch = context.assignment_epoch(e.topic(), e.partition());
                ((e.topic().to_owned(), e.partition()), epoch)
            })
            .collect();
        let new: Vec<(String, i32)> = assigned
            .iter()
            .filter(|(key, epoch)| known.get(*key) != Some(*epoch))
            .map(|(key, _)| key.clone())
            .collect();
        gaps.retain(|topic, partition| {
            let key = (topic.to_owned(), partition);
            assigned.contains_key(&key) && !new.contains(&key)
        });
        *known = assigned;
        for (topic, partition) in new {
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT next_offset FROM projection_offsets \
                 WHERE projection = $1 AND topic = $2 AND partition_id = $3",
            )
            .bind(self.projection.name())
            .bind(&topic)
            .bind(i64::from(partition))
            .fetch_optional(self.db.pool())
            .await?;
            let mut tpl = rdkafka::TopicPartitionList::new();
            match stored {
                Some(stored) => {
                    debug!(
                        projection = self.projection.name(),
                        topic, partition, stored, "Starting at the stored position."
                    );
                    tpl.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(stored))?;
                    let seek = tpl.clone();
                    off_runtime(consumer, move |c| {
                        c.seek_partitions(seek, Duration::from_secs(10)).map(|_| ())
                    })
                    .await?;
                    gaps.expect(&topic, partition, stored);
                }
                None => {
                    tpl.add_partition(&topic, partition);
                }
            }
            consumer.resume(&tpl)?;
        }
        Ok(())
    }

    /// Applies a batch exactly once: see the module docs. Undecodable records go to
    /// `dead_letters`; `None` (a replay, whose live writer dead-lettered them already) only
    /// counts them.
    pub async fn write(
        &self,
        batch: &[OwnedMessage],
        dead_letters: Option<&FutureProducer>,
    ) -> Result<BatchOutcome, WriterError> {
        let name = self.projection.name();
        let started = std::time::Instant::now();
        let mut finals: Vec<(&'static str, i64)> = Vec::new();
        let mut tx = self.db.begin_write().await?;
        let mut stored: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
        for m in batch {
            let key = (m.topic().to_owned(), m.partition());
            if stored.contains_key(&key) {
                continue;
            }
            // On PostgreSQL the positions are read FOR UPDATE: first thing in the batch, the
            // writer takes its lock, so a replay's swap (crate::replay), which locks the table,
            // either waits for this batch or makes it wait before it touches any row.
            let next: Option<i64> = sqlx::query(match self.db.backend() {
                Backend::Postgres => {
                    "SELECT next_offset FROM projection_offsets \
                     WHERE projection = $1 AND topic = $2 AND partition_id = $3 FOR UPDATE"
                }
                Backend::Sqlite => {
                    "SELECT next_offset FROM projection_offsets \
                     WHERE projection = $1 AND topic = $2 AND partition_id = $3"
                }
            })
            .bind(name)
            .bind(m.topic())
            .bind(i64::from(m.partition()))
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
            stored.insert(key, next);
        }

        let written_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut outcome = BatchOutcome::default();
        let mut changes: Vec<OrderChange> = Vec::new();
        let mut reached: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in batch {
            let key = (m.topic().to_owned(), m.partition());
            let from = stored.get(&key).copied().flatten().unwrap_or(0);
            if m.offset() < from {
                outcome.skipped += 1;
                continue;
            }
            let entry = reached.entry(key).or_insert(from);
            *entry = (*entry).max(m.offset() + 1);
            if is_release_marker(m) {
                // A processor's business (sequenced dead letters), not an event.
                outcome.skipped += 1;
                continue;
            }
            match self.codec.decode(m.payload().unwrap_or_default()) {
                Ok(event) => {
                    // The order's trace continues from the record's headers into the write.
                    let span = debug_span!(
                        "project",
                        otel.kind = "consumer",
                        projection = name,
                        event_type = event.kind().name(),
                        trace_id = tracing::field::Empty
                    );
                    continue_trace(&span, header_value(m, headers::TRACEPARENT).as_deref());
                    let changed = self
                        .projection
                        .apply(&mut tx, &event, written_at)
                        .instrument(span)
                        .await?;
                    outcome.applied += 1;
                    // Events without a sequence (the inventory's per-line answers) never move an
                    // order's row, so they change nothing a cache holds.
                    if changed && event.envelope().sequence > 0 {
                        changes.push(OrderChange {
                            order_id: event.envelope().order_id.clone(),
                            version: event.envelope().sequence,
                        });
                    }
                    // A re-emitted copy of a final event changes nothing and is not counted.
                    if let (true, Some(status)) = (changed, final_status(&event)) {
                        finals.push((status, event.envelope().occurred_at));
                    }
                }
                Err(e) => {
                    let reason = format!("undecodable: {e}");
                    if let Some(producer) = dead_letters {
                        warn!(projection = name, topic = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "Record sent to the dead-letter topic.");
                        self.dead_letter(producer, m, &reason).await?;
                    }
                    outcome.dead_lettered += 1;
                }
            }
        }

        for ((topic, partition), next) in &reached {
            let previous = stored.get(&(topic.clone(), *partition)).copied().flatten();
            let moved = match previous {
                Some(previous) => sqlx::query(
                    "UPDATE projection_offsets SET next_offset = $4 WHERE projection = $1 \
                     AND topic = $2 AND partition_id = $3 AND next_offset = $5",
                )
                .bind(name)
                .bind(topic)
                .bind(i64::from(*partition))
                .bind(*next)
                .bind(previous)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
                // A concurrent insert of the same key fails on the primary key: also a conflict.
                None => sqlx::query(
                    "INSERT INTO projection_offsets (projection, topic, partition_id, next_offset) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(name)
                .bind(topic)
                .bind(i64::from(*partition))
                .bind(*next)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
            };
            if moved != 1 {
                return Err(DbError::Conflict {
                    projection: name.to_owned(),
                    topic: topic.clone(),
                    partition: *partition,
                }
                .into());
            }
        }
        if self.db.backend() == Backend::Postgres {
            for payload in notify_payloads(&changes) {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        if let Some(feed) = &self.changes {
            feed.publish(changes);
        }
        // Counted after the commit: a rolled-back batch is redone and counted then.
        let committed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let m = &self.metrics;
        m.applied
            .get_or_create(&self.labels)
            .inc_by(outcome.applied as u64);
        m.skipped
            .get_or_create(&self.labels)
            .inc_by(outcome.skipped as u64);
        m.dead_letters
            .get_or_create(&self.labels)
            .inc_by(outcome.dead_lettered as u64);
        m.batch_records
            .get_or_create(&self.labels)
            .observe(batch.len() as f64);
        m.write_seconds
            .get_or_create(&self.labels)
            .observe(started.elapsed().as_secs_f64());
        for (status, occurred_at) in finals {
            m.orders_final
                .get_or_create(&FinalLabels {
                    status: status.to_owned(),
                })
                .inc();
            m.end_to_end_seconds
                .observe((committed_at - occurred_at).max(0) as f64 / 1000.0);
        }
        Ok(outcome)
    }

    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        message: &OwnedMessage,
        reason: &str,
    ) -> Result<(), WriterError> {
        let headers = dead_letter_headers(message, self.projection.name(), reason);
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(self.projection.dead_letter_topic())
                .payload(message.payload().unwrap_or_default())
                .headers(headers);
        let record = match message.key() {
            Some(key) => record.key(key),
            None => record,
        };
        producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| WriterError::Kafka(e))?;
        Ok(())
    }
}
