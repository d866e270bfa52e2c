//! The processor runtime: consume → step → produce, effectively once on any broker.
//!
//! A batch's writes go out in this order: the outputs and any dead letters, then the state
//! changes (to the processor's compacted changelog, partition for partition with the input)
//! with the input position they reflect, then the consumed offsets. Each step waits for the
//! acknowledgements of the one before. The group offset commit that follows is coalesced over
//! batches (`orderflow_platform::group_commits`). Two modes (`kafka.transactions`, decided per session by
//! `orderflow_platform::transactions`):
//!
//! - **Transactional** (brokers with EndTxn): the batch is one Kafka transaction on a
//!   transactional producer, the offsets go in with `send_offsets_to_transaction` and the group
//!   metadata, so a zombie of an old generation is fenced where the broker supports it (KIP-447).
//! - **Idempotent** (brokers without transactions, such as the embedded Tansu with SQLite
//!   storage): the same writes in the same order through an idempotent producer, no transaction;
//!   the group offset is committed last (coalesced).
//!
//! A batch is bounded by count and time and ends early when the input goes idle.
//!
//! The brokers used here show aborted records to `read_committed` readers and one of them never
//! stores transactional offsets (docs/architecture.md), so correctness does not rest on the
//! transaction, and both modes are exactly-once in effect for the same reasons:
//!
//! 1. **Deterministic outputs**: steps derive ids, sequences and times from the input and the
//!    state only, so re-processing re-emits byte-identical events.
//! 2. **Idempotent application**: every step (and every consumer downstream) drops an input whose
//!    effect its state already holds.
//! 3. **Positions live with the state**: the changelog holds, with the state, the input offset
//!    the state reflects; both are written only after every output of the batch was
//!    acknowledged, and on assignment the partition resumes from there (never later; records
//!    below it are skipped). A crash before that re-processes the batch from the previous
//!    position — duplicates that rule 2 drops; a crash after it loses nothing, because the
//!    outputs are durable. The group offset is committed after the transaction as well (the
//!    only stored position of a stateless processor).
//!
//! Backpressure: a batch is all a processor has in flight. When its step work
//! (`Step::prepare`, the step's I/O) is still running after `processor.pause_after_ms`, every
//! assigned partition is paused, so the client stops fetching behind the slow batch, and resumed
//! once the batch has committed. `prepare` runs before the transaction opens, so slow I/O never
//! holds a transaction open.
//!
//! Rebalances happen only while the runtime polls for a batch, when no transaction is open;
//! revoked partitions drop their state, assigned ones restore it from the changelog before any
//! of their records is processed (`/readyz` reports "restoring" meanwhile). On any error inside
//! a batch the transaction is aborted and the session restarts: new producer (re-initialising
//! after an ambiguous commit, rather than guessing its outcome), new consumer, state restored
//! from the changelog. A record that cannot be decoded, or that a step declares poison, goes to
//! the dead-letter topic with the reason, source topic, partition and offset in headers, and the
//! partition keeps moving.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use orderflow_platform::{
    config::BatchSettings,
    gaps::GapGuard,
    group_commits::GroupCommits,
    health::Readiness,
    kafka::{
        collect_batch_within, dead_letter_headers, event_headers, flush_now, header_value,
        is_release_marker, next_offsets, off_runtime, retain_assigned, BatchBounds, GroupContext,
        KafkaClients,
    },
    restart::Restarts,
    switches::Switches,
    telemetry::{continue_trace, current_traceparent},
    transactions,
};
use orderflow_schemas::{headers, Codec, OrderEvent};
use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
    message::{Header, Headers, Message, OwnedHeaders, OwnedMessage},
    producer::{future_producer::DeliveryFuture, FutureProducer, FutureRecord, Producer},
    Offset, TopicPartitionList,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, info, warn};

use crate::{
    metrics::{OutputLabels, ProcessorLabels, ProcessorMetrics},
    sequence::{Admit, Place, Release, Sequenced},
    state::{PartitionState, Restored, Restorer, CLAIM_KEY, GENERATION_HEADER, POSITION_KEY},
};

/// A processing step: plain code that sees one decoded input at a time, with the state of its
/// partition, and pushes outputs. No Kafka, no clock, no randomness in `handle`: outputs must be
/// a function of the input and the state (rule 1). I/O a step needs (the payment gateway) happens
/// in [`Step::prepare`], whose answers must themselves be repeatable (idempotency keys).
pub trait Step: Send + Sync + 'static {
    /// The state of one input partition, restored from the changelog on assignment.
    type State: PartitionState;

    /// Called once per batch with every decoded input before any `handle`, for I/O.
    fn prepare(
        &mut self,
        _inputs: &[OrderEvent],
    ) -> impl std::future::Future<Output = Result<(), StepError>> + Send {
        async { Ok(()) }
    }

    fn handle(
        &mut self,
        state: &mut Self::State,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError>;

    /// Timers: called about every `processor.tick_ms` per assigned partition with the wall
    /// clock. Outputs go into the next transaction; the state cannot change here, so a timer's
    /// effect is an event that comes back through the input and is applied like any other.
    fn tick(&mut self, _partition: i32, _state: &Self::State, _now_ms: i64, _out: &mut Outputs) {}

    /// Called when `partition`'s state was restored for a new assignment (after every
    /// rebalance that gave it to this instance, and every session restart): whatever the step
    /// remembers of the partition outside its state (timers written, requests resent) is from
    /// before, and may belong to a batch that never committed.
    fn on_assigned(&mut self, _partition: i32) {}
}

/// Why a step gave up on an input.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The input can never be processed (retrying cannot help): it goes to the dead-letter
    /// topic and the partition moves on.
    #[error("{0}")]
    Poison(String),
    /// A dependency failed; the batch is aborted and redone from its start after a backoff.
    #[error("{0}")]
    Retry(String),
}

/// An event a step wants written.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub topic: &'static str,
    pub key: String,
    /// An explicit partition (timers write back to their own input partition); `None`: by key.
    pub partition: Option<i32>,
    pub event: OrderEvent,
}

/// Where a step puts its outputs, in order.
#[derive(Debug, Default)]
pub struct Outputs {
    records: Vec<OutputRecord>,
}

impl Outputs {
    pub fn push(&mut self, topic: &'static str, key: String, event: OrderEvent) {
        self.records.push(OutputRecord {
            topic,
            key,
            partition: None,
            event,
        });
    }

    /// An output for one partition of `topic`, whatever its key hashes to.
    pub fn push_to_partition(
        &mut self,
        topic: &'static str,
        partition: i32,
        key: String,
        event: OrderEvent,
    ) {
        self.records.push(OutputRecord {
            topic,
            key,
            partition: Some(partition),
            event,
        });
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, OutputRecord> {
        self.records.drain(..)
    }

    pub fn records(&self) -> &[OutputRecord] {
        &self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery of an output was cancelled (producer closed)")]
    DeliveryCancelled,
    #[error("a blocking transaction call panicked or was cancelled")]
    Join,
    #[error("the consumer has no group metadata (not in a group)")]
    NoGroupMetadata,
    #[error("schemas: {0}")]
    Codec(#[from] orderflow_schemas::CodecError),
    #[error("restoring partition {partition} from {topic}: {reason}")]
    Restore {
        topic: &'static str,
        partition: i32,
        reason: String,
    },
    #[error("step: {0}")]
    Step(String),
    #[error("deciding kafka.transactions: {0}")]
    Probe(String),
}

type ProcessorConsumer = StreamConsumer<GroupContext>;

/// What the runtime needs to know about a processor besides its step.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorIo {
    /// Role name: consumer group `orderflow-<name>`, transactional id, logs, metrics.
    pub name: &'static str,
    pub input_topic: &'static str,
    pub dead_letter_topic: &'static str,
    /// Compacted topic with the input's partition count; `None` for a stateless processor.
    pub changelog_topic: Option<&'static str>,
}

impl ProcessorIo {
    /// The processor's consumer group: `orderflow-<name>`.
    pub fn group_id(&self) -> String {
        format!("orderflow-{}", self.name)
    }
}

/// One input partition's state and the input position it reflects.
struct Slot<T> {
    state: T,
    /// The next input offset to process, as stored in the changelog; `None`: not stored yet
    /// (the group's committed offset decides).
    position: Option<i64>,
    /// The generation this instance writes the partition's changelog with (module docs of
    /// [`crate::state`]).
    generation: u64,
    /// The consumer's assignment epoch the state was restored for: a different epoch means the
    /// partition was revoked and assigned again since, and the state must be restored anew.
    epoch: Option<u64>,
}

/// How a session's batches are committed (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Transactional,
    Idempotent,
}

/// Runs one processor until cancelled.
pub struct ProcessorRuntime<S: Step> {
    io: ProcessorIo,
    step: S,
    clients: KafkaClients,
    batch: BatchSettings,
    codec: Arc<Codec>,
    group_id: String,
    transactional_id: String,
    metrics: ProcessorMetrics,
    /// This processor's label value, built once.
    labels: ProcessorLabels,
    readiness: Option<Readiness>,
    /// The operational switches (`switches.paused_processors` pauses this processor).
    switches: Option<Switches>,
    /// This session's commit mode, decided when it starts.
    mode: Mode,
}

impl<S: Step> ProcessorRuntime<S> {
    pub fn new(
        io: ProcessorIo,
        step: S,
        clients: KafkaClients,
        batch: &BatchSettings,
        codec: Arc<Codec>,
        metrics: ProcessorMetrics,
    ) -> Self {
        let instance = if batch.instance_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            batch.instance_id.clone()
        };
        Self {
            group_id: io.group_id(),
            transactional_id: format!("{}-{}-{instance}", batch.transactional_id_prefix, io.name),
            io,
            step,
            clients,
            batch: batch.clone(),
            codec,
            labels: ProcessorLabels {
                processor: io.name.to_owned(),
            },
            metrics,
            readiness: None,
            switches: None,
            mode: Mode::Transactional,
        }
    }

    /// Obeys `switches.paused_processors` ([`Self::hold_while_paused`]).
    pub fn with_switches(mut self, switches: Switches) -> Self {
        self.switches = Some(switches);
        self
    }

    /// Reports `processor <name>` (group joined) and `processor <name> state` (every assigned
    /// partition's state restored) on `/readyz`.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        readiness.set_not_ready(&self.state_component(), "state not restored yet");
        self.readiness = Some(readiness);
        self
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    fn state_component(&self) -> String {
        format!("processor {} state", self.io.name)
    }

    /// Runs sessions until `cancel` fires; a failed session is retried with backoff
    /// ([`Restarts`]).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut restarts = Restarts::new(format!("processor {}", self.io.name));
        loop {
            restarts.session_started();
            match self.session(&cancel).await {
                Ok(()) => {
                    info!(processor = self.io.name, "Processor stopped.");
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

    /// One consumer and one producer, until cancelled (Ok) or an error (Err). State lives in
    /// the session: a failed session's half-applied batch is thrown away with it, and the next
    /// session restores from the changelog.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), ProcessorError> {
        let consumer: Arc<ProcessorConsumer> = self
            .clients
            .consumer(self.io.name, &self.group_id)
            .create_with_context({
                let context = GroupContext::new(self.io.name)
                    .with_metrics(&self.group_id, self.metrics.consumer.clone());
                match &self.readiness {
                    Some(r) => context.with_readiness(r, &format!("processor {}", self.io.name)),
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
        &mut self,
        consumer: &Arc<ProcessorConsumer>,
        cancel: &CancellationToken,
    ) -> Result<(), ProcessorError> {
        let settings = self.clients.settings();
        self.mode = match transactions::decide(settings, self.clients.bootstrap())
            .await
            .map_err(|e| ProcessorError::Probe(e.to_string()))?
        {
            true => Mode::Transactional,
            false => Mode::Idempotent,
        };
        let timeout = self.transaction_timeout();
        let producer: FutureProducer = match self.mode {
            Mode::Transactional => {
                let producer: FutureProducer = self
                    .clients
                    .transactional_producer(self.io.name, &self.transactional_id)
                    .create()?;
                // Fences an earlier producer with the same transactional id (a zombie of this
                // instance) and aborts its open transaction, where the broker supports it.
                blocking(&producer, move |p| p.init_transactions(timeout)).await?;
                producer
            }
            // No fencing here: a zombie's late changelog writes carry an older generation and
            // lose on restore (crate::state), its late outputs are byte-identical duplicates.
            Mode::Idempotent => self.clients.idempotent_producer(self.io.name).create()?,
        };
        // Without a transaction a batch's changelog writes must reach each partition whole (see
        // `KafkaClients::changelog_producer`); with one, they ride in the transaction.
        let changelog: Option<FutureProducer> = match (self.mode, self.io.changelog_topic) {
            (Mode::Idempotent, Some(_)) => {
                Some(self.clients.changelog_producer(self.io.name).create()?)
            }
            _ => None,
        };
        consumer.subscribe(&[self.io.input_topic])?;
        let transactional = self.mode == Mode::Transactional;
        info!(processor = self.io.name, group = %self.group_id, topic = self.io.input_topic, transactional, "Processor started.");

        let mut slots: BTreeMap<i32, Slot<Sequenced<S::State>>> = BTreeMap::new();
        let mut gaps = GapGuard::new(self.clients.settings().recheck_offset_gaps);
        let tick = Duration::from_millis(self.batch.tick_ms.max(10));
        let mut last_tick = Instant::now();
        let mut commits = GroupCommits::default();
        loop {
            if self
                .switches
                .as_ref()
                .is_some_and(|s| s.paused(self.io.name))
            {
                // The group has every processed offset before the pause begins. Cancelled
                // while paused: on to the shutdown below (it commits them synchronously).
                self.commit_group(consumer, &mut commits, true)?;
                self.hold_while_paused(consumer, &producer, &mut slots, &mut gaps, cancel)
                    .await?;
            }
            let batch = collect_batch_within(consumer, cancel, &self.bounds(), Some(tick)).await;
            // Rebalances happen inside the consumer's poll, i.e. while collecting: no
            // transaction is open then. Partitions revoked meanwhile lose their records and
            // state here; partitions assigned get their state restored before any of their
            // records is processed.
            let seeked = self
                .sync_assignment(consumer, &producer, &mut slots, &mut gaps, cancel)
                .await?;
            // A revoked partition's offset is never committed over its new owner's.
            commits.retain(|_, partition| slots.contains_key(&partition));
            let batch = retain_assigned(consumer, batch)
                .into_iter()
                .filter(|m| !seeked.contains(&m.partition()))
                .filter(|m| match slots.get(&m.partition()) {
                    // Below the stored position: the state already holds its effect.
                    Some(slot) => slot.position.is_none_or(|p| m.offset() >= p),
                    None => false,
                })
                .collect::<Vec<_>>();
            // A partition whose offsets jump is read again from the jump before its later
            // records are applied (crate docs of `orderflow_platform::gaps`).
            let (batch, rereads) = gaps.check_and_seek(consumer, batch).await?;
            if rereads > 0 {
                self.metrics
                    .gap_rereads
                    .get_or_create(&self.labels)
                    .inc_by(rereads as u64);
            }
            let mut timers = Outputs::default();
            if last_tick.elapsed() >= tick {
                last_tick = Instant::now();
                let now_ms = wall_clock_ms();
                for (partition, slot) in &slots {
                    self.step
                        .tick(*partition, &slot.state.step, now_ms, &mut timers);
                }
            }
            if !batch.is_empty() || !timers.is_empty() {
                match self
                    .process(
                        consumer,
                        &producer,
                        changelog.as_ref(),
                        &batch,
                        timers,
                        &mut slots,
                    )
                    .await
                {
                    Ok(Some(offsets)) => commits.record(&offsets),
                    Ok(None) => {}
                    Err(e) => {
                        if self.mode == Mode::Transactional {
                            abort(&producer, timeout).await;
                        }
                        self.metrics.aborts.get_or_create(&self.labels).inc();
                        self.metrics
                            .paused_partitions
                            .get_or_create(&self.labels)
                            .set(0);
                        return Err(e);
                    }
                }
            }
            // The group offset follows the batches whose effects are durable, coalesced
            // (`orderflow_platform::group_commits`): at most one commit a second while batches
            // keep coming, and one as soon as a poll finds nothing to do.
            self.commit_group(consumer, &mut commits, batch.is_empty())?;
            if cancel.is_cancelled() {
                // Every processed batch is committed. An asynchronous offset commit may still
                // be in flight, or not yet due: commit every offset synchronously so the
                // group's position is stored before dropping the consumer leaves the group.
                let offsets = commits.all()?;
                if offsets.count() > 0 {
                    off_runtime(consumer, move |c| c.commit(&offsets, CommitMode::Sync)).await?;
                }
                return Ok(());
            }
        }
    }

    /// Sends the group the offsets [`GroupCommits::due`] returns, asynchronously.
    fn commit_group(
        &self,
        consumer: &ProcessorConsumer,
        commits: &mut GroupCommits,
        idle: bool,
    ) -> Result<(), ProcessorError> {
        if let Some(offsets) = commits.due(idle)? {
            consumer.commit(&offsets, CommitMode::Async)?;
            self.metrics.group_commits.get_or_create(&self.labels).inc();
        }
        Ok(())
    }

    /// The pause switch (`switches.paused_processors`): every assigned partition is paused and
    /// nothing is processed — no input, no timer — until the switch is off again, then resumed
    /// where it stopped. The consumer keeps polling meanwhile, so the member stays in its group
    /// and follows rebalances (newly assigned partitions get their state restored, then are
    /// paused too). A record that arrives anyway (from a partition assigned since the last
    /// pause) is not processed: its partition is seeked back to it, so it comes again after
    /// the pause, in order. Outputs of earlier batches are all committed before a pause begins
    /// (batches finish before the loop gets here), so a pause never holds a transaction open.
    async fn hold_while_paused(
        &mut self,
        consumer: &Arc<ProcessorConsumer>,
        producer: &FutureProducer,
        slots: &mut BTreeMap<i32, Slot<Sequenced<S::State>>>,
        gaps: &mut GapGuard,
        cancel: &CancellationToken,
    ) -> Result<(), ProcessorError> {
        let Some(switches) = self.switches.clone() else {
            return Ok(());
        };
        let mut changes = switches.subscribe();
        info!(
            processor = self.io.name,
            "Paused by switch: not consuming until switches.paused_processors no longer names it."
        );
        let bounds = BatchBounds {
            max_records: self.batch.batch_max_records,
            max_wait: Duration::from_millis(100),
            idle: Duration::from_millis(100),
        };
        while switches.paused(self.io.name) && !cancel.is_cancelled() {
            let assignment = consumer.assignment()?;
            if assignment.count() > 0 {
                consumer.pause(&assignment)?;
            }
            self.metrics
                .paused_partitions
                .get_or_create(&self.labels)
                .set(assignment.count() as i64);
            let arrived = tokio::select! {
                batch = collect_batch_within(consumer, cancel, &bounds, Some(Duration::from_millis(500))) => batch,
                _ = changes.changed() => Vec::new(),
            };
            let mut first: BTreeMap<i32, i64> = BTreeMap::new();
            for m in &arrived {
                let at = first.entry(m.partition()).or_insert(m.offset());
                *at = (*at).min(m.offset());
            }
            for (partition, offset) in first {
                self.seek_input(consumer, partition, offset).await?;
            }
            self.sync_assignment(consumer, producer, slots, gaps, cancel)
                .await?;
        }
        let assignment = consumer.assignment()?;
        if assignment.count() > 0 {
            consumer.resume(&assignment)?;
        }
        self.metrics
            .paused_partitions
            .get_or_create(&self.labels)
            .set(0);
        info!(
            processor = self.io.name,
            "Resumed: the pause switch is off."
        );
        Ok(())
    }

    /// Drops the state of revoked partitions and restores the state of newly assigned ones —
    /// including partitions revoked and assigned back since the last call (their assignment
    /// epoch changed: another instance may have moved them on meanwhile). Each restored
    /// partition's changelog is then claimed with the new generation before any of its records
    /// is processed. Returns the partitions the consumer was seeked back on: the records of
    /// those already in hand lie past the stored position and must be dropped, to come again in
    /// order.
    async fn sync_assignment(
        &mut self,
        consumer: &Arc<ProcessorConsumer>,
        producer: &FutureProducer,
        slots: &mut BTreeMap<i32, Slot<Sequenced<S::State>>>,
        gaps: &mut GapGuard,
        cancel: &CancellationToken,
    ) -> Result<BTreeSet<i32>, ProcessorError> {
        let input = self.io.input_topic;
        let assigned: BTreeSet<i32> = consumer
            .assignment()?
            .elements_for_topic(input)
            .iter()
            .map(|e| e.partition())
            .collect();
        let context = consumer.context();
        slots.retain(|p, slot| {
            assigned.contains(p) && slot.epoch == context.assignment_epoch(input, *p)
        });
        gaps.retain(|_, p| slots.contains_key(&p));
        let new: Vec<i32> = assigned
            .iter()
            .copied()
            .filter(|p| !slots.contains_key(p))
            .collect();
        let component = self.state_component();
        let mut seeked = BTreeSet::new();
        if new.is_empty() {
            if let Some(r) = &self.readiness {
                r.set_ready(&component);
            }
            return Ok(seeked);
        }
        if let Some(r) = &self.readiness {
            r.set_not_ready(&component, format!("restoring partitions {new:?}"));
        }
        let progress = RestoreProgress {
            readiness: self.readiness.clone(),
            component: component.clone(),
        };
        let started = Instant::now();
        let mut claims = Vec::new();
        for partition in new {
            let epoch = context.assignment_epoch(input, partition);
            let slot = match self.io.changelog_topic {
                None => Slot {
                    state: Sequenced::default(),
                    position: None,
                    generation: 0,
                    epoch,
                },
                Some(topic) => {
                    let Some(restored) = restore::<Sequenced<S::State>>(
                        &self.clients,
                        self.io.name,
                        topic,
                        partition,
                        progress.clone(),
                        cancel.clone(),
                    )
                    .await?
                    else {
                        return Ok(seeked); // cancelled
                    };
                    if restored.stale > 0 || restored.unfinished > 0 {
                        info!(processor = self.io.name, partition, stale = restored.stale, unfinished = restored.unfinished, "Ignored changelog records of older generations and of batches that never finished.");
                    }
                    if let Some(position) = restored.position {
                        if self
                            .seek_back_if_ahead(consumer, partition, position)
                            .await?
                        {
                            seeked.insert(partition);
                        }
                        gaps.expect(input, partition, position);
                    }
                    claims.push((topic, partition, restored.generation));
                    Slot {
                        state: restored.state,
                        position: restored.position,
                        generation: restored.generation,
                        epoch,
                    }
                }
            };
            info!(processor = self.io.name, partition, position = ?slot.position, generation = slot.generation, entries = slot.state.entries(), "Partition state restored.");
            self.step.on_assigned(partition);
            slots.insert(partition, slot);
        }
        if !claims.is_empty() {
            self.claim(producer, &claims).await?;
        }
        self.metrics
            .restore_seconds
            .get_or_create(&self.labels)
            .observe(started.elapsed().as_secs_f64());
        if let Some(r) = &self.readiness {
            r.set_ready(&component);
        }
        Ok(seeked)
    }

    /// Writes a claim record with its new generation to each restored changelog partition (in
    /// a transaction of its own in the transactional mode) and waits for it: from then on,
    /// whatever an earlier owner (a zombie) writes there is of an older generation after a
    /// newer one, and every restore ignores it.
    async fn claim(
        &self,
        producer: &FutureProducer,
        claims: &[(&'static str, i32, u64)],
    ) -> Result<(), ProcessorError> {
        let transactional = self.mode == Mode::Transactional;
        if transactional {
            producer.begin_transaction()?;
        }
        let mut deliveries = Vec::new();
        for (topic, partition, generation) in claims {
            let generation = generation.to_string();
            let record = FutureRecord::to(topic)
                .partition(*partition)
                .key(CLAIM_KEY)
                .payload(self.transactional_id.as_str())
                .headers(generation_headers(&generation));
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        let timeout = self.transaction_timeout();
        if let Err(e) = await_all(deliveries).await {
            if transactional {
                abort(producer, timeout).await;
            }
            return Err(e);
        }
        if transactional {
            blocking(producer, move |p| p.commit_transaction(timeout)).await?;
        }
        Ok(())
    }

    /// Resume never later than the state (rule 3): if the group's committed offset is ahead of
    /// the changelog's position, seek back to the changelog's. (Offsets are committed after the
    /// changelog is written, so this only happens after an operator moved the group.) Returns
    /// whether it seeked.
    async fn seek_back_if_ahead(
        &self,
        consumer: &Arc<ProcessorConsumer>,
        partition: i32,
        position: i64,
    ) -> Result<bool, ProcessorError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.io.input_topic, partition);
        let committed = off_runtime(consumer, move |c| {
            c.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await?;
        let ahead = committed
            .find_partition(self.io.input_topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .is_some_and(|o| o > position);
        if ahead {
            warn!(
                processor = self.io.name,
                partition,
                position,
                "The group's offset is ahead of the state; seeking back to the state's position."
            );
            self.seek_input(consumer, partition, position).await?;
        }
        Ok(ahead)
    }

    /// Seeks an input partition to `offset`: its next record is read from there.
    async fn seek_input(
        &self,
        consumer: &Arc<ProcessorConsumer>,
        partition: i32,
        offset: i64,
    ) -> Result<(), ProcessorError> {
        let topic = self.io.input_topic;
        off_runtime(consumer, move |c| {
            c.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await?;
        Ok(())
    }

    /// Queues `message` for the dead-letter topic with `reason` and, for a sequenced letter,
    /// its place in its chain.
    fn dead_letter(
        &self,
        producer: &FutureProducer,
        message: &OwnedMessage,
        reason: &str,
        place: Option<&Place>,
    ) -> Result<DeliveryFuture, ProcessorError> {
        let mut dlq_headers = dead_letter_headers(message, self.io.name, reason);
        for (key, value) in place.iter().flat_map(|p| p.headers()) {
            dlq_headers = dlq_headers.insert(Header {
                key,
                value: Some(&value),
            });
        }
        let record = FutureRecord::to(self.io.dead_letter_topic)
            .payload(message.payload().unwrap_or_default())
            .headers(dlq_headers);
        let record = match message.key() {
            Some(key) => record.key(key),
            None => record,
        };
        Ok(producer.send_result(record).map_err(|(e, _)| e)?)
    }

    fn bounds(&self) -> BatchBounds {
        BatchBounds {
            max_records: self.batch.batch_max_records,
            max_wait: Duration::from_millis(self.batch.batch_max_ms),
            idle: Duration::from_millis(self.batch.batch_idle_ms),
        }
    }

    fn transaction_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.clients.settings().transaction_timeout_ms))
    }

    /// One batch (one transaction in the transactional mode): the timers' outputs, every
    /// record's outputs (or dead letter), then the state changes and positions, then the
    /// offsets. Returns the offsets committed, if any input was consumed.
    async fn process(
        &mut self,
        consumer: &ProcessorConsumer,
        producer: &FutureProducer,
        changelog_producer: Option<&FutureProducer>,
        batch: &[OwnedMessage],
        mut timers: Outputs,
        slots: &mut BTreeMap<i32, Slot<Sequenced<S::State>>>,
    ) -> Result<Option<TopicPartitionList>, ProcessorError> {
        let started = Instant::now();
        // Decode everything first, so that `prepare` sees the whole batch.
        let decoded: Vec<Result<OrderEvent, String>> = batch
            .iter()
            .map(|m| {
                self.codec
                    .decode(m.payload().unwrap_or_default())
                    .map_err(|e| format!("undecodable: {e}"))
            })
            .collect();
        let inputs: Vec<OrderEvent> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .cloned()
            .collect();
        // Backpressure: a slow `prepare` pauses the partitions until the batch commits.
        let paused = {
            let prepare = self.step.prepare(&inputs);
            tokio::pin!(prepare);
            let pause_after = Duration::from_millis(self.batch.pause_after_ms);
            tokio::select! {
                done = &mut prepare => {
                    done.map_err(|e| ProcessorError::Step(e.to_string()))?;
                    None
                }
                _ = tokio::time::sleep(pause_after) => {
                    let paused = pause_assigned(consumer, &self.metrics, &self.labels)?;
                    prepare.await.map_err(|e| ProcessorError::Step(e.to_string()))?;
                    paused
                }
            }
        };

        // The transaction opens only now: a slow `prepare` (the gateway) keeps no transaction
        // open and cannot run it into its timeout.
        let transactional = self.mode == Mode::Transactional;
        if transactional {
            producer.begin_transaction()?;
        }
        let mut deliveries = Vec::new();
        let mut emitted: Vec<&'static str> = Vec::new();
        for record in timers.drain() {
            let bytes = self.codec.encode(&record.event)?;
            emitted.push(record.event.kind().name());
            deliveries.push(send(producer, &record, &bytes, None)?);
        }

        let mut outputs = Outputs::default();
        let mut dead = 0usize;
        let mut held = 0usize;
        let mut unsequenced = 0usize;
        for (message, event) in batch.iter().zip(decoded) {
            // One span per record, continuing the order's trace from the record's headers; the
            // outputs carry this span's context on. No await inside: the guard never crosses one.
            let incoming = header_value(message, headers::TRACEPARENT);
            let span = debug_span!(
                "process",
                otel.kind = "consumer",
                processor = self.io.name,
                trace_id = tracing::field::Empty
            );
            continue_trace(&span, incoming.as_deref());
            let _entered = span.enter();
            let traceparent = current_traceparent().or(incoming);
            let Some(slot) = slots.get_mut(&message.partition()) else {
                continue;
            };
            // Sequenced dead letters (crate::sequence): a parked key's records wait behind it.
            // A processor without a changelog has nowhere to keep parked keys: its letters go
            // unsequenced, and release markers are skipped.
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let release = Release::from_headers(|name| header_value(message, name));
            let marker = is_release_marker(message);
            let admit = match self.io.changelog_topic {
                Some(_) => slot
                    .state
                    .parked
                    .admit(key.as_deref(), release.as_ref(), marker),
                None if marker => Admit::Skip,
                None => Admit::Process,
            };
            match (admit, key.as_deref()) {
                (Admit::Skip, _) => {
                    debug!(
                        processor = self.io.name,
                        partition = message.partition(),
                        offset = message.offset(),
                        "Skipped a release marker its key does not wait for."
                    );
                    continue;
                }
                (Admit::Discarded, Some(key)) => {
                    slot.state.parked.passed(key);
                    continue;
                }
                (Admit::Hold, Some(key)) => {
                    let place = slot.state.parked.hold(key);
                    held += 1;
                    dead += 1;
                    let reason = format!(
                        "held: key {key} is parked behind {}",
                        place.as_ref().map_or("?", |p| p.chain.as_str())
                    );
                    deliveries.push(self.dead_letter(
                        producer,
                        message,
                        &reason,
                        place.as_ref(),
                    )?);
                    continue;
                }
                _ => {}
            }
            let handled = match event {
                Err(reason) => Err(reason),
                Ok(event) => match self.step.handle(&mut slot.state.step, &event, &mut outputs) {
                    Err(StepError::Retry(reason)) => {
                        return Err(ProcessorError::Step(reason));
                    }
                    Err(StepError::Poison(reason)) => Err(reason),
                    Ok(()) => outputs
                        .records()
                        .iter()
                        .map(|r| self.codec.encode(&r.event).map(|bytes| (r, bytes)))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("output does not encode: {e}")),
                },
            };
            match handled {
                Ok(encoded) => {
                    for (record, bytes) in encoded {
                        emitted.push(record.event.kind().name());
                        deliveries.push(send(producer, record, &bytes, traceparent.as_deref())?);
                    }
                    if let (Admit::Released, Some(key)) = (admit, key.as_deref()) {
                        slot.state.parked.passed(key);
                    }
                }
                Err(reason) => {
                    dead += 1;
                    let place = match self.io.changelog_topic {
                        Some(_) => {
                            let source = format!(
                                "{}/{}/{}",
                                message.topic(),
                                message.partition(),
                                message.offset()
                            );
                            let place = slot.state.parked.failed(key.as_deref(), &source);
                            if place.is_none() && key.is_some() {
                                unsequenced += 1;
                                warn!(processor = self.io.name, partition = message.partition(), limit = crate::sequence::MAX_PARKED_KEYS, "Too many parked keys: this dead letter does not hold its key's later records.");
                            }
                            place
                        }
                        None => None,
                    };
                    warn!(processor = self.io.name, topic = message.topic(), partition = message.partition(), offset = message.offset(), %reason, chain = place.as_ref().map(|p| p.chain.as_str()), "Record sent to the dead-letter topic.");
                    deliveries.push(self.dead_letter(
                        producer,
                        message,
                        &reason,
                        place.as_ref(),
                    )?);
                }
            }
            outputs.drain();
        }
        let produced = deliveries.len();
        await_all(deliveries).await?;

        // Rule 3: the state and its position are written only now that every output of the
        // batch is acknowledged. A crash before this point re-processes the batch from the
        // previous position; its outputs come again, byte-identical, and consumers drop them.
        let offsets = if batch.is_empty() {
            None
        } else {
            Some(next_offsets(batch)?)
        };
        if let Some(topic) = self.io.changelog_topic {
            let mut changelog = Vec::new();
            for (partition, slot) in slots.iter_mut() {
                let mut records = slot.state.changes();
                if let Some(next) = offsets.as_ref().and_then(|o| {
                    o.find_partition(self.io.input_topic, *partition)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(n) => Some(n),
                            _ => None,
                        })
                }) {
                    slot.position = Some(next);
                    records.push((POSITION_KEY.to_owned(), Some(next.to_string().into_bytes())));
                }
                let generation = slot.generation.to_string();
                for (key, value) in records {
                    let mut record = FutureRecord::to(topic)
                        .partition(*partition)
                        .key(key.as_bytes())
                        .headers(generation_headers(&generation));
                    if let Some(value) = &value {
                        record = record.payload(value.as_slice());
                    }
                    let to = changelog_producer.unwrap_or(producer);
                    changelog.push(to.send_result(record).map_err(|(e, _)| e)?);
                }
            }
            if let Some(to) = changelog_producer {
                // Everything is queued: send it now, one message set per partition, waiting
                // as long as the records may take (the changelog producer's message timeout).
                let timeout = self.transaction_timeout().max(Duration::from_secs(2));
                blocking(to, move |p| flush_now(p, timeout)).await?;
            }
            await_all(changelog).await?;
        }

        let timeout = self.transaction_timeout();
        let committing = Instant::now();
        if transactional {
            if let Some(offsets) = &offsets {
                let group = consumer
                    .group_metadata()
                    .ok_or(ProcessorError::NoGroupMetadata)?;
                let offsets = offsets.clone();
                blocking(producer, move |p| {
                    p.send_offsets_to_transaction(&offsets, &group, timeout)
                })
                .await?;
            }
            blocking(producer, move |p| p.commit_transaction(timeout)).await?;
        }
        // The group offset (the only stored position of a stateless processor, and the only
        // one on a broker that ignores transactional offsets or has no transactions) follows
        // the commit: the caller hands `offsets` to its `GroupCommits`. Until they are sent, a
        // crash re-reads the batch from the changelog's position (stateful) or the previous
        // group offset (stateless): the outputs come again, byte-identical, and consumers drop
        // them (rules 1 and 2).
        if let Some(partitions) = paused {
            // The consumer was not polled meanwhile, so no rebalance happened: these are still
            // this member's partitions.
            consumer.resume(&partitions)?;
            self.metrics
                .paused_partitions
                .get_or_create(&self.labels)
                .set(0);
        }
        let m = &self.metrics;
        m.commit_seconds
            .get_or_create(&self.labels)
            .observe(committing.elapsed().as_secs_f64());
        m.batch_records
            .get_or_create(&self.labels)
            .observe(batch.len() as f64);
        m.records
            .get_or_create(&self.labels)
            .inc_by(batch.len() as u64);
        m.dead_letters
            .get_or_create(&self.labels)
            .inc_by(dead as u64);
        m.held_records
            .get_or_create(&self.labels)
            .inc_by(held as u64);
        m.unsequenced_dead_letters
            .get_or_create(&self.labels)
            .inc_by(unsequenced as u64);
        m.parked_keys
            .get_or_create(&self.labels)
            .set(slots.values().map(|s| s.state.parked.len() as i64).sum());
        for event_type in emitted {
            m.outputs
                .get_or_create(&OutputLabels {
                    processor: self.labels.processor.clone(),
                    event_type: event_type.to_owned(),
                })
                .inc();
        }
        debug!(
            processor = self.io.name,
            records = batch.len(),
            produced,
            dead,
            held,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Batch committed."
        );
        Ok(offsets)
    }
}

/// Pauses every assigned partition (backpressure); returns them, to resume after the commit.
fn pause_assigned(
    consumer: &ProcessorConsumer,
    metrics: &ProcessorMetrics,
    labels: &ProcessorLabels,
) -> Result<Option<TopicPartitionList>, ProcessorError> {
    let partitions = consumer.assignment()?;
    if partitions.count() == 0 {
        return Ok(None);
    }
    consumer.pause(&partitions)?;
    debug!(processor = %labels.processor, partitions = partitions.count(), "Slow batch: partitions paused until it commits.");
    metrics.pauses.get_or_create(labels).inc();
    metrics
        .paused_partitions
        .get_or_create(labels)
        .set(partitions.count() as i64);
    Ok(Some(partitions))
}

/// The headers of a changelog record: its writer's generation.
fn generation_headers(generation: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: GENERATION_HEADER,
        value: Some(generation),
    })
}

/// Sends one output inside the open transaction.
fn send(
    producer: &FutureProducer,
    record: &OutputRecord,
    bytes: &[u8],
    traceparent: Option<&str>,
) -> Result<DeliveryFuture, ProcessorError> {
    let mut future_record = FutureRecord::to(record.topic)
        .key(record.key.as_bytes())
        .payload(bytes)
        .headers(event_headers(record.event.kind(), traceparent));
    if let Some(partition) = record.partition {
        future_record = future_record.partition(partition);
    }
    Ok(producer.send_result(future_record).map_err(|(e, _)| e)?)
}

/// Waits for every delivery; the first failure fails the batch.
async fn await_all(deliveries: Vec<DeliveryFuture>) -> Result<(), ProcessorError> {
    for delivery in deliveries {
        match delivery.await {
            Err(_canceled) => return Err(ProcessorError::DeliveryCancelled),
            Ok(Err((e, _))) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

/// Where a restore reports its progress.
#[derive(Clone)]
struct RestoreProgress {
    readiness: Option<Readiness>,
    component: String,
}

impl RestoreProgress {
    fn report(&self, partition: i32, read: i64, total: i64) {
        if let Some(r) = &self.readiness {
            r.set_not_ready(
                &self.component,
                format!("restoring partition {partition}: {read} of {total} records read"),
            );
        }
    }
}

/// Reads changelog partition `partition` to its end into a fresh state (see
/// [`crate::state::Restorer`] for which records count). No time limit: a large state takes as
/// long as it takes, reporting its progress on `/readyz`; it stops when `cancel` fires.
///
/// The end is where the broker says the partition ends (the end-of-partition event), never the
/// high watermark read before: Tansu's memory engine reports as high watermark the offset after
/// the *first* record of the partition's last message set, and a restore that stopped there
/// would miss the rest of the last batch — its position record included, so the state would
/// fall back a batch, or to nothing when that batch was the partition's first (measured: the
/// crash tests without transactions, docs/architecture.md).
async fn restore<T: PartitionState>(
    clients: &KafkaClients,
    role: &'static str,
    topic: &'static str,
    partition: i32,
    progress: RestoreProgress,
    cancel: CancellationToken,
) -> Result<Option<Restored<T>>, ProcessorError> {
    let clients = clients.clone();
    let failed = move |reason: String| ProcessorError::Restore {
        topic,
        partition,
        reason,
    };
    tokio::task::spawn_blocking(move || {
        let reader = clients.open_reader(role)?;
        let timeout = Duration::from_secs(10);
        let (low, high) = reader.fetch_watermarks(topic, partition, timeout)?;
        let mut restorer = Restorer::<T>::default();
        if high <= low {
            return Ok(Some(restorer.finish()));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
        reader.assign(&tpl)?;
        let total = high - low;
        let mut read = 0i64;
        let mut reported = Instant::now();
        let mut last_progress = Instant::now();
        progress.report(partition, 0, total);
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            match reader.poll(Duration::from_millis(200)) {
                None => {
                    if last_progress.elapsed() > Duration::from_secs(30) {
                        warn!(
                            processor = role,
                            topic,
                            partition,
                            read,
                            total,
                            "Restore made no progress for 30 s; still waiting for the broker."
                        );
                        last_progress = Instant::now();
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(message)) => {
                    read += 1;
                    last_progress = Instant::now();
                    let key = message
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .ok_or_else(|| {
                            failed(format!(
                                "record at offset {} has no UTF-8 key",
                                message.offset()
                            ))
                        })?;
                    let generation = header_value_of(&message, GENERATION_HEADER)
                        .map(|g| {
                            g.parse::<u64>().map_err(|_| {
                                failed(format!(
                                    "bad generation {g:?} at offset {}",
                                    message.offset()
                                ))
                            })
                        })
                        .transpose()?
                        .unwrap_or(0);
                    restorer
                        .record(
                            key,
                            message.payload(),
                            generation,
                            message.timestamp().to_millis(),
                        )
                        .map_err(|e| failed(format!("offset {}: {e}", message.offset())))?;
                    if reported.elapsed() > Duration::from_secs(1) {
                        progress.report(partition, read, total);
                        reported = Instant::now();
                    }
                }
            }
        }
        Ok(Some(restorer.finish()))
    })
    .await
    .map_err(|_| ProcessorError::Join)?
}

/// A header's value as text, on a borrowed message.
fn header_value_of<M: Message>(message: &M, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Runs a blocking producer call (transaction control) off the async workers.
async fn blocking<F>(producer: &FutureProducer, call: F) -> Result<(), ProcessorError>
where
    F: FnOnce(&FutureProducer) -> Result<(), KafkaError> + Send + 'static,
{
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || call(&producer))
        .await
        .map_err(|_| ProcessorError::Join)?
        .map_err(ProcessorError::from)
}

async fn abort(producer: &FutureProducer, timeout: Duration) {
    if let Err(e) = blocking(producer, move |p| p.abort_transaction(timeout)).await {
        // The session restarts with a new producer either way; its init fences this one.
        debug!(error = %e, "Abort failed.");
    }
}
