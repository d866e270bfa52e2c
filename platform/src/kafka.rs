//! Kafka client setup: the one place that decides client properties, so every role talks to
//! the broker the same way. Also [`MockBroker`], librdkafka's mock cluster, for tests that inject
//! broker faults (never for data a user keeps: it drops the oldest records past 5 MiB or 100,000
//! message sets per partition).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use orderflow_schemas::{codec::CONTENT_TYPE, headers, EventKind};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage},
    mocking::MockCluster,
    producer::{DefaultProducerContext, FutureProducer, Producer},
    ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    health::Readiness,
    metrics::{ConsumerMetrics, PartitionLabels, ProducerLabels, ProducerMetrics},
};

use crate::config::KafkaSettings;

/// librdkafka's mock cluster, in this process: for tests that inject broker faults (brokers
/// down, request errors, latency).
///
/// Not a broker to keep data in: it keeps its log in memory only, dies with the process, and
/// silently drops the oldest message sets of a partition past 5 MiB or 100,000 of them
/// (`rd_kafka_mock_msgset_new`). It is not `Send`: keep it in the task that started it.
pub struct MockBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
}

impl MockBroker {
    pub fn start(brokers: u8) -> Result<Self, rdkafka::error::KafkaError> {
        let cluster = MockCluster::new(i32::from(brokers.max(1)))?;
        let bootstrap = cluster.bootstrap_servers();
        Ok(Self { cluster, bootstrap })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The mock cluster, for topic creation and fault injection (brokers down, errors, latency).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

/// The shortest `message.timeout.ms` of any idempotent producer: a minute, longer than a broker
/// restart, a frozen process or the embedded broker's maintenance takes.
///
/// When librdkafka times a record out, an idempotent producer bumps its own epoch and goes on
/// sending with it (KIP-360); the embedded broker (Tansu 0.6) panics on an epoch it did not
/// hand out (docs/architecture.md, "Embedded mode"). No producer may reach that timeout while
/// the broker is merely slow. A caller with a tighter deadline — the ingest edge answers within
/// `kafka.message_timeout_ms` — enforces it itself and retires the producer
/// (`orderflow_ingest::publish`): a purge, never a timeout inside librdkafka.
pub const MESSAGE_TIMEOUT_FLOOR_MS: u32 = 60_000;

/// What one consumer (group member or reader) may hold of records it has fetched and not yet
/// handed over, in KiB (`queued.max.messages.kbytes`); librdkafka bounds one fetch's size
/// (`fetch.max.bytes`) by it too, unless `message.max.bytes` is larger.
///
/// librdkafka's defaults (64 MiB queued, a fetch of up to 50 MiB) let each consumer prefetch up
/// to 64 MiB of a backlog: a processor restoring a long changelog, or any group catching up
/// after a stall, would hold that much per client (measured: 40 MiB of a 40 MiB backlog,
/// `processors/tests/prefetch.rs`). A batch is at most a few hundred records
/// (`processor.batch_max_records`), so a few MiB keep every consumer busy; a record set larger
/// than a fetch is still returned whole (librdkafka's rule), so nothing is ever too large to
/// read.
pub const CONSUMER_QUEUE_KBYTES: u32 = 4 * 1024;

/// Builds client configs from [`KafkaSettings`] for a given bootstrap list.
#[derive(Debug, Clone)]
pub struct KafkaClients {
    settings: KafkaSettings,
    bootstrap: String,
}

impl KafkaClients {
    pub fn new(settings: &KafkaSettings, bootstrap: impl Into<String>) -> Self {
        Self {
            settings: settings.clone(),
            bootstrap: bootstrap.into(),
        }
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    fn base(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", format!("{}-{role}", self.settings.client_id))
            // Broker-side topic auto-creation would hide a missing `topics apply`.
            .set("allow.auto.create.topics", "false");
        self.secure(&mut config);
        config
    }

    /// The connection's security (`kafka.security_protocol`, `kafka.tls`, `kafka.sasl`) and
    /// the pass-through `kafka.properties`: every client of every role gets the same. The SASL
    /// password leaves its secret here, into librdkafka's own copy (which rdkafka redacts in
    /// `Debug`). Settings validation has refused properties that would override orderflow's.
    fn secure(&self, config: &mut ClientConfig) {
        let settings = &self.settings;
        let protocol = settings.security_protocol;
        config.set("security.protocol", protocol.as_librdkafka());
        if protocol.uses_tls() {
            let tls = &settings.tls;
            for (key, path) in [
                ("ssl.ca.location", &tls.ca_file),
                ("ssl.certificate.location", &tls.cert_file),
                ("ssl.key.location", &tls.key_file),
            ] {
                if !path.is_empty() {
                    config.set(key, path);
                }
            }
            config.set(
                "ssl.endpoint.identification.algorithm",
                if tls.verify_hostname { "https" } else { "none" },
            );
        }
        if protocol.uses_sasl() {
            let sasl = &settings.sasl;
            config
                .set("sasl.mechanism", sasl.mechanism.as_librdkafka())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose().unwrap_or_default());
        }
        // Validation refused what does not flatten; nothing is left to fail here.
        for (key, value) in settings.properties.flattened().unwrap_or_default() {
            config.set(key, value);
        }
    }

    /// Idempotent producer, `acks=all`: a send resolves only once every in-sync replica has it,
    /// and librdkafka's retries never duplicate or reorder a record. Its message timeout is
    /// [`KafkaClients::message_timeout_ms`]: never short enough for librdkafka to time a record
    /// out (and bump the epoch) while the broker is only slow.
    pub fn idempotent_producer(&self, role: &str) -> ClientConfig {
        let mut config = self.base(role);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", self.message_timeout_ms().to_string());
        config.remove("allow.auto.create.topics");
        config
    }

    /// [`KafkaClients::idempotent_producer`] that emits librdkafka's statistics, for a
    /// [`ProducerStatsContext`] to turn into the queue-depth gauge. Other producers emit none:
    /// each report is a JSON document that the client builds, then wakes its polling thread to
    /// parse, every [`STATISTICS_INTERVAL_MS`], for nothing when no context reads it.
    pub fn stats_producer(&self, role: &str) -> ClientConfig {
        let mut config = self.idempotent_producer(role);
        config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
        config
    }

    /// The `message.timeout.ms` of every producer without a transaction: the configured
    /// `kafka.message_timeout_ms`, the transaction timeout or [`MESSAGE_TIMEOUT_FLOOR_MS`],
    /// whichever is longest.
    pub fn message_timeout_ms(&self) -> u32 {
        self.settings
            .message_timeout_ms
            .max(self.settings.transaction_timeout_ms)
            .max(MESSAGE_TIMEOUT_FLOOR_MS)
    }

    /// Transactional producer for a processor; `transactional_id` must be stable per instance.
    pub fn transactional_producer(&self, role: &str, transactional_id: &str) -> ClientConfig {
        let mut config = self.idempotent_producer(role);
        config
            .set("transactional.id", transactional_id)
            .set(
                "transaction.timeout.ms",
                self.settings.transaction_timeout_ms.to_string(),
            )
            // Inside a transaction the deadline is the transaction's, not the message's.
            .set(
                "message.timeout.ms",
                self.settings.transaction_timeout_ms.to_string(),
            );
        config
    }

    /// Idempotent producer for a processor's changelog when it runs without transactions: the
    /// records it is given are held (a linger of 100 ms, far longer than queueing a batch's
    /// records takes) until the caller flushes, and then each
    /// partition's records leave as one message set (counts and bytes far above a batch's), so
    /// a broker that stores a message set atomically — Tansu's SQLite engine writes each one in
    /// one SQL transaction — never holds part of a batch's state changes. That matters because
    /// such a broker compacts the whole log, its tail included: half a batch there could
    /// outlive the earlier values of its keys (docs/architecture.md, "Transactions are
    /// optional").
    pub fn changelog_producer(&self, role: &str) -> ClientConfig {
        let mut config = self.idempotent_producer(role);
        // The caller enqueues a batch's records in one go and flushes at once: the linger only
        // has to outlast the enqueueing; the deadline is any producer's (no epoch bump).
        let timeout = self.message_timeout_ms();
        config
            .set("message.timeout.ms", timeout.to_string())
            .set("linger.ms", (timeout / 2).min(100).to_string())
            .set("batch.num.messages", "1000000")
            .set("batch.size", "100000000")
            .set("message.max.bytes", "100000000");
        config
    }

    /// Group consumer reading `read_committed`, offsets committed only by our code.
    pub fn consumer(&self, role: &str, group_id: &str) -> ClientConfig {
        let mut config = self.base(role);
        config
            .set("group.id", group_id)
            .set("isolation.level", &self.settings.isolation_level)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "queued.max.messages.kbytes",
                CONSUMER_QUEUE_KBYTES.to_string(),
            )
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                self.settings.fetch_wait_ms().to_string(),
            )
            .set(
                "session.timeout.ms",
                self.settings.session_timeout_ms.to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.settings.session_timeout_ms / 3).max(100).to_string(),
            )
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Feeds the lag and position gauges (GroupContext::stats).
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
        config
    }

    /// A consumer without a group that reads assigned partitions to their end
    /// (`read_committed`, end-of-partition events on): restoring state from a changelog, and
    /// tools that read the log.
    /// A [`Reader`] of [`KafkaClients::reader`]'s configuration.
    pub fn open_reader(&self, role: &str) -> Result<Reader, KafkaError> {
        self.reader(role).create_with_context(ReaderContext)
    }

    pub fn reader(&self, role: &str) -> ClientConfig {
        let mut config = self.base(role);
        config
            .set(
                "group.id",
                format!("{}-{role}-reader", self.settings.client_id),
            )
            .set("isolation.level", &self.settings.isolation_level)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set(
                "queued.max.messages.kbytes",
                CONSUMER_QUEUE_KBYTES.to_string(),
            )
            .set(
                "fetch.wait.max.ms",
                self.settings.fetch_wait_ms().to_string(),
            );
        config
    }

    /// Admin and metadata client.
    pub fn admin(&self) -> ClientConfig {
        self.base("admin")
    }

    /// How long admin and metadata calls may take.
    pub fn admin_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// Sends every record `producer` holds now, without waiting out its linger, and blocks until
/// each is acknowledged or `timeout` has passed: the end of a batch's changelog write without
/// transactions (`KafkaClients::changelog_producer` holds a batch's records until this call).
///
/// librdkafka sends a partition's queue at once only while a flush call runs. rdkafka's
/// `flush` calls `rd_kafka_flush` with a zero timeout and then polls in steps of up to 100 ms,
/// so the records mostly waited out their linger (100 ms) and the flush its poll step: about
/// 0.2 s per stateful hop, most of an order's end-to-end time on the embedded broker. One call
/// with the whole timeout keeps the flush on for the whole wait, and the records leave at once.
/// Blocking: call it off the async workers.
#[allow(unsafe_code)]
pub fn flush_now(producer: &FutureProducer, timeout: Duration) -> Result<(), KafkaError> {
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `native_ptr` is the handle `producer` owns, alive while it is borrowed here;
    // librdkafka's producer calls, `rd_kafka_flush` included, may be made from any thread
    // while its own threads (and rdkafka's polling thread, which serves the delivery reports
    // the flush waits for) run.
    let code =
        unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), timeout_ms) };
    match code {
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        code => Err(KafkaError::Flush(code.into())),
    }
}

/// The context of the readers ([`KafkaClients::reader`]): end-of-partition events are how a
/// reader knows it has read a partition to its end, and one that reaches librdkafka's main
/// queue (a partition no longer assigned, or reached while the client polls for something
/// else) is a global "error" to rdkafka's default context, logged at ERROR level. Here it is
/// what it is, an end of partition: logged at TRACE. Every other error is logged as by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
            | KafkaError::PartitionEOF(_) => {
                tracing::trace!(%reason, "librdkafka: end of partition");
            }
            _ => tracing::error!("librdkafka: {error}: {reason}"),
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A reader: a consumer of [`KafkaClients::reader`]'s configuration with [`ReaderContext`].
pub type Reader = BaseConsumer<ReaderContext>;

/// Polls `consumer`, assigned to `topic` where reading starts, until its position on every
/// partition of `ends` has reached that partition's end offset, calling `f` with each record
/// below its partition's end. Judged by position, not by the last record seen: transaction
/// markers take offsets but are never delivered. `Ok(false)` when `within` passed first.
pub fn read_to_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    ends: &HashMap<i32, i64>,
    within: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>),
) -> Result<bool, KafkaError> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let position = consumer.position()?;
        let behind = ends.iter().any(|(p, end)| {
            let at = position
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            at < *end
        });
        if !behind {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() < *end)
        {
            f(&message);
        }
    }
}

/// Headers of an event record: its type, its content type and, when known, the trace context.
pub fn event_headers(kind: EventKind, traceparent: Option<&str>) -> OwnedHeaders {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: headers::EVENT_TYPE,
            value: Some(kind.name()),
        })
        .insert(Header {
            key: headers::CONTENT_TYPE,
            value: Some(CONTENT_TYPE),
        });
    match traceparent {
        Some(tp) => headers.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(tp),
        }),
        None => headers,
    }
}

/// Consumer context of every group member: logs assignments and revocations and turns
/// librdkafka's statistics into consumer lag and position gauges. (The batch loops drop revoked
/// partitions' records from the batch in hand, see [`retain_assigned`].)
pub struct GroupContext {
    role: &'static str,
    group: String,
    metrics: Option<ConsumerMetrics>,
    /// Marked ready once the group assigned this member its partitions (maybe none).
    readiness: Option<(Readiness, String)>,
    /// Pause partitions as they are assigned, before anything is fetched (the owner seeks them
    /// to positions it keeps elsewhere and resumes them).
    pause_on_assign: bool,
    /// The assignment epoch of each partition this member holds.
    epochs: AssignmentEpochs,
}

/// The assignment epoch of each partition a member holds: a number that changes every time the
/// partition is assigned to it, so an owner that checks now and then can tell a partition it
/// kept from one revoked and assigned back in between (another member may have moved it on).
#[derive(Debug, Default)]
pub struct AssignmentEpochs {
    held: Mutex<HashMap<(String, i32), u64>>,
    assignments: AtomicU64,
}

impl AssignmentEpochs {
    /// `partitions` were assigned: each gets a new epoch.
    pub fn assigned<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let epoch = self.assignments.fetch_add(1, Ordering::SeqCst) + 1;
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, partition) in partitions {
            held.insert((topic.to_owned(), partition), epoch);
        }
    }

    /// `partitions` were revoked.
    pub fn revoked<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, partition) in partitions {
            held.remove(&(topic.to_owned(), partition));
        }
    }

    /// The epoch of the partition's current assignment; `None` while not assigned.
    pub fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(topic.to_owned(), partition))
            .copied()
    }
}

impl GroupContext {
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            group: String::new(),
            metrics: None,
            readiness: None,
            pause_on_assign: false,
            epochs: AssignmentEpochs::default(),
        }
    }

    /// The epoch of `partition`'s current assignment to this member (`None`: not assigned).
    /// It differs from an earlier reading whenever the partition was revoked and assigned
    /// again since: whatever the owner kept of the partition is then stale.
    pub fn assignment_epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        self.epochs.epoch(topic, partition)
    }

    /// Assigned partitions start paused; the caller resumes each once it has seeked it.
    pub fn pause_on_assign(mut self) -> Self {
        self.pause_on_assign = true;
        self
    }

    /// Reports `component` not ready until the group's first assignment reaches this member.
    pub fn with_readiness(mut self, readiness: &Readiness, component: &str) -> Self {
        readiness.set_not_ready(component, "joining the consumer group");
        self.readiness = Some((readiness.clone(), component.to_owned()));
        self
    }

    /// Reports lag and position of `group`'s partitions to `metrics`.
    pub fn with_metrics(mut self, group: &str, metrics: ConsumerMetrics) -> Self {
        self.group = group.to_owned();
        self.metrics = Some(metrics);
        self
    }

    fn labels(&self, topic: &str, partition: i32) -> PartitionLabels {
        PartitionLabels {
            group: self.group.clone(),
            topic: topic.to_owned(),
            partition,
        }
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        let Some(metrics) = &self.metrics else { return };
        for (topic, t) in &statistics.topics {
            for (id, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; lag -1 means unknown.
                if *id < 0 || !p.desired {
                    continue;
                }
                let labels = self.labels(topic, *id);
                if p.consumer_lag >= 0 {
                    metrics.lag.get_or_create(&labels).set(p.consumer_lag);
                }
                if p.app_offset >= 0 {
                    metrics.position.get_or_create(&labels).set(p.app_offset);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.epochs
                    .assigned(tpl.elements().iter().map(|e| (e.topic(), e.partition())));
                if self.pause_on_assign && tpl.count() > 0 {
                    if let Err(e) = consumer.pause(tpl) {
                        warn!(role = self.role, error = %e, "Pausing assigned partitions failed.");
                    }
                }
                info!(
                    role = self.role,
                    partitions = tpl.count(),
                    "Partitions assigned."
                );
                if let Some((readiness, component)) = &self.readiness {
                    readiness.set_ready(component);
                }
            }
            Rebalance::Revoke(tpl) => {
                self.epochs
                    .revoked(tpl.elements().iter().map(|e| (e.topic(), e.partition())));
                info!(
                    role = self.role,
                    partitions = tpl.count(),
                    "Partitions revoked."
                );
                // Another member reports these now.
                if let Some(metrics) = &self.metrics {
                    for e in tpl.elements() {
                        let labels = self.labels(e.topic(), e.partition());
                        metrics.lag.remove(&labels);
                        metrics.position.remove(&labels);
                    }
                }
            }
            Rebalance::Error(e) => warn!(role = self.role, error = %e, "Rebalance failed."),
        }
    }
}

/// How often a client that feeds gauges reports librdkafka's statistics: group consumers (lag
/// and position) and [`KafkaClients::stats_producer`] (queue depth).
pub const STATISTICS_INTERVAL_MS: u32 = 5000;

/// Producer context that reports the producer's queue depth (see [`ProducerMetrics`]); its
/// producer comes from [`KafkaClients::stats_producer`].
pub struct ProducerStatsContext {
    producer: String,
    metrics: Option<ProducerMetrics>,
}

impl ProducerStatsContext {
    pub fn new(producer: &str, metrics: Option<ProducerMetrics>) -> Self {
        Self {
            producer: producer.to_owned(),
            metrics,
        }
    }
}

impl ClientContext for ProducerStatsContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(metrics) = &self.metrics {
            metrics
                .queue_messages
                .get_or_create(&ProducerLabels {
                    producer: self.producer.clone(),
                })
                .set(statistics.msg_cnt as i64);
        }
    }
}

/// When a batch is complete.
#[derive(Debug, Clone, Copy)]
pub struct BatchBounds {
    pub max_records: usize,
    /// Longest time from the batch's first record to its end.
    pub max_wait: Duration,
    /// The batch ends once no record arrived for this long: the input went idle.
    pub idle: Duration,
}

/// Waits for a first record (or cancellation: empty batch), then takes more until the batch is
/// full, `max_wait` has passed, or the input is idle for `idle`. At low load a record crosses in
/// milliseconds; at high load batches grow and carry the throughput.
pub async fn collect_batch<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    cancel: &CancellationToken,
    bounds: &BatchBounds,
) -> Vec<OwnedMessage> {
    collect_batch_within(consumer, cancel, bounds, None).await
}

/// [`collect_batch`], but an empty batch once `first_within` passed without a first record (for
/// callers with timers to run). Records, once received, are always returned: none is dropped.
pub async fn collect_batch_within<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    cancel: &CancellationToken,
    bounds: &BatchBounds,
    first_within: Option<Duration>,
) -> Vec<OwnedMessage> {
    let mut batch = Vec::new();
    let give_up = first_within.map(|d| tokio::time::Instant::now() + d);
    let first = loop {
        let idle_until = async {
            match give_up {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return batch,
            _ = idle_until => return batch,
            received = consumer.recv() => match received {
                Ok(message) => break message.detach(),
                Err(e) => debug!(error = %e, "Consumer error while idle."),
            }
        }
    };
    batch.push(first);
    let deadline = tokio::time::Instant::now() + bounds.max_wait;
    while batch.len() < bounds.max_records {
        let until = deadline.min(tokio::time::Instant::now() + bounds.idle);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message.detach()),
            Ok(Err(e)) => debug!(error = %e, "Consumer error in batch."),
            Err(_elapsed) => break,
        }
    }
    batch
}

/// Drops records of partitions revoked while the batch was being collected.
pub fn retain_assigned<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    mut batch: Vec<OwnedMessage>,
) -> Vec<OwnedMessage> {
    if batch.is_empty() {
        return batch;
    }
    let Ok(assignment) = consumer.assignment() else {
        return batch;
    };
    let before = batch.len();
    batch.retain(|m| {
        assignment
            .find_partition(m.topic(), m.partition())
            .is_some()
    });
    if batch.len() != before {
        debug!(
            dropped = before - batch.len(),
            "Dropped records of revoked partitions."
        );
    }
    batch
}

/// The offsets to commit after `batch`: one past the last record of each partition.
pub fn next_offsets(batch: &[OwnedMessage]) -> Result<TopicPartitionList, KafkaError> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let entry = next.entry((m.topic(), m.partition())).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    Ok(tpl)
}

/// Runs a blocking client call — a synchronous commit, a committed-offsets lookup, a seek — on
/// tokio's blocking pool. A broker that does not answer then stalls the calling task only,
/// never a runtime worker: the workers keep the timers running that bound a drain, and the
/// process can exit without the call (`orderflow`'s runtime leaves blocking work behind).
pub async fn off_runtime<C, T, F>(client: &std::sync::Arc<C>, call: F) -> Result<T, KafkaError>
where
    C: Send + Sync + 'static,
    T: Send + 'static,
    F: FnOnce(&C) -> Result<T, KafkaError> + Send + 'static,
{
    let client = client.clone();
    tokio::task::spawn_blocking(move || call(&client))
        .await
        .map_err(|_| KafkaError::Canceled)?
}

/// A partition's first offset and the offset after its last record: `(low, end)`.
///
/// The end is the high watermark on Kafka and on Tansu's SQLite engine. Tansu's memory engine
/// reports the offset after the *first* record of the partition's last message set instead
/// (measured: three records produced in one set at offsets 6–8 give a high watermark of 7), so
/// whatever trusts the high watermark misses the rest of that set. This reads on from the high
/// watermark to the end-of-partition event: nothing on the brokers that report it right, the
/// tail on the one that does not. `reader` is a consumer of the caller's own, built with
/// [`KafkaClients::reader`] (end-of-partition events on); it is assigned here.
pub fn log_end<C: ConsumerContext>(
    reader: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    let (low, high) = reader.fetch_watermarks(topic, partition, timeout)?;
    if high <= low {
        return Ok((low, high));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(high))?;
    reader.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut end = high;
    loop {
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(message)) if message.topic() == topic && message.partition() == partition => {
                end = end.max(message.offset() + 1)
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break,
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(e),
            None if std::time::Instant::now() >= deadline => {
                return Err(KafkaError::OffsetFetch(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ))
            }
            None => {}
        }
    }
    reader.unassign()?;
    Ok((low, end))
}

/// A header's value as text.
pub fn header_value(message: &OwnedMessage, name: &str) -> Option<String> {
    message.headers().and_then(|hs| {
        hs.iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Whether `message` is a release marker: the record a discard of a sequenced dead letter
/// writes to the letter's source partition so that the consumer that parked the key moves past
/// it ([`headers::RELEASE_CHAIN`], no value). It is not an event: every consumer skips it.
pub fn is_release_marker<M: Message>(message: &M) -> bool {
    message.payload().is_none_or(<[u8]>::is_empty)
        && message
            .headers()
            .is_some_and(|hs| hs.iter().any(|h| h.key == headers::RELEASE_CHAIN))
}

/// The source record's headers plus the dead-letter headers.
pub fn dead_letter_headers(message: &OwnedMessage, consumer: &str, reason: &str) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(hs) = message.headers() {
        for h in hs.iter().filter(|h| !h.key.starts_with("dlq.")) {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    for (key, value) in [
        (headers::DLQ_REASON, reason),
        (headers::DLQ_SOURCE_TOPIC, message.topic()),
        (headers::DLQ_SOURCE_PARTITION, partition.as_str()),
        (headers::DLQ_SOURCE_OFFSET, offset.as_str()),
        (headers::DLQ_CONSUMER, consumer),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statistics cost a JSON document per client and interval: only the clients whose context
    /// turns them into gauges ask for them.
    #[test]
    fn only_clients_that_feed_gauges_emit_statistics() {
        let settings = crate::config::Settings::load(None, &Default::default())
            .expect("default settings load");
        let clients = KafkaClients::new(&settings.kafka, "localhost:9092");
        let interval =
            |config: ClientConfig| config.get("statistics.interval.ms").map(str::to_owned);
        let every = Some(STATISTICS_INTERVAL_MS.to_string());
        assert_eq!(interval(clients.stats_producer("ingest")), every);
        assert_eq!(interval(clients.consumer("saga", "orderflow-saga")), every);
        for quiet in [
            clients.idempotent_producer("dlq"),
            clients.transactional_producer("saga", "orderflow-saga-0"),
            clients.changelog_producer("saga"),
            clients.reader("restore"),
        ] {
            assert_eq!(interval(quiet), None);
        }
    }

    /// Counts the events logged at ERROR.
    #[derive(Clone, Default)]
    struct Errors(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Errors {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::ERROR {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn a_reader_logs_an_end_of_partition_as_no_error_and_anything_else_as_one() {
        use tracing_subscriber::layer::SubscriberExt;
        let errors = Errors::default();
        let subscriber = tracing_subscriber::registry().with(errors.clone());
        tracing::subscriber::with_default(subscriber, || {
            let context = ReaderContext;
            context.error(
                KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF),
                "Fetch from broker 1 reached end of partition at offset 17",
            );
            context.error(KafkaError::PartitionEOF(3), "end");
            assert_eq!(errors.0.load(std::sync::atomic::Ordering::SeqCst), 0);
            context.error(
                KafkaError::Global(rdkafka::types::RDKafkaErrorCode::AllBrokersDown),
                "1/1 brokers are down",
            );
            assert_eq!(errors.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn a_partition_revoked_and_assigned_back_has_a_new_epoch() {
        let epochs = AssignmentEpochs::default();
        assert_eq!(epochs.epoch("t", 0), None);
        epochs.assigned([("t", 0), ("t", 1)]);
        let (first, other) = (epochs.epoch("t", 0), epochs.epoch("t", 1));
        assert!(first.is_some());
        // Between two checks: revoked, then assigned back (another member held it meanwhile).
        epochs.revoked([("t", 0), ("t", 1)]);
        assert_eq!(epochs.epoch("t", 0), None);
        epochs.assigned([("t", 0)]);
        assert_ne!(
            epochs.epoch("t", 0),
            first,
            "an owner can tell it changed hands"
        );
        assert_eq!(epochs.epoch("t", 1), None);
        // An incremental assignment of another partition leaves the kept one's epoch alone.
        let kept = epochs.epoch("t", 0);
        epochs.assigned([("t", 2)]);
        assert_eq!(epochs.epoch("t", 0), kept);
        assert_ne!(epochs.epoch("t", 2), other);
    }
}

/// A client context that remembers the last connection error librdkafka reported (and logs it
/// as the default context does), so that an admin call that fails for a broker-wide reason can
/// say which: `SSL handshake failed: … certificate verify failed`, `SASL authentication
/// error`, `Connection refused`. librdkafka's own error for the call says only "broker
/// transport failure".
#[derive(Debug, Default)]
pub struct BrokerErrors {
    last: Mutex<Option<String>>,
}

impl BrokerErrors {
    /// The last error librdkafka reported on any connection, if any.
    pub fn last(&self) -> Option<String> {
        match self.last.lock() {
            Ok(last) => last.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// `error`, with the last connection error when there is one.
    pub fn explain(&self, error: &KafkaError) -> String {
        match self.last() {
            Some(reason) => format!("{error} (last connection error: {reason})"),
            None => error.to_string(),
        }
    }
}

impl BrokerErrors {
    fn remember(&self, reason: &str) {
        match self.last.lock() {
            Ok(mut last) => *last = Some(reason.to_owned()),
            Err(poisoned) => *poisoned.into_inner() = Some(reason.to_owned()),
        }
    }
}

impl ClientContext for BrokerErrors {
    /// Logs as rdkafka's default context does, and remembers connection failures (`FAIL`):
    /// librdkafka logs them from its broker threads as they happen, where an error callback
    /// would wait for a poll of the main queue that an admin client never makes.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
        }
        if fac == "FAIL" {
            self.remember(log_message);
        }
    }

    /// Remembered only when no connection failure was: "all brokers are down" follows the
    /// failure that says why.
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        if self.last().is_none() {
            self.remember(reason);
        }
    }
}

impl rdkafka::producer::ProducerContext for BrokerErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Reads cluster metadata, and when the broker cannot be reached says why: librdkafka's error
/// for the call is only "broker transport failure", while the reason (a TLS handshake, SASL, a
/// refused connection) is in its logs, which this client reads back. A producer only because
/// librdkafka's producer handle lets its main queue, where those logs wait, be polled; it
/// produces nothing.
pub struct MetadataProbe {
    client: rdkafka::producer::BaseProducer<BrokerErrors>,
}

impl MetadataProbe {
    pub fn new(clients: &KafkaClients) -> Result<Self, KafkaError> {
        Ok(Self {
            client: clients
                .admin()
                .create_with_context(BrokerErrors::default())?,
        })
    }

    /// The whole cluster's metadata, or why it could not be read.
    pub fn fetch(&self, timeout: Duration) -> Result<rdkafka::metadata::Metadata, String> {
        let metadata = self.client.client().fetch_metadata(None, timeout);
        // Serve the queued logs on every call, so the context has seen the connection failures
        // and the queue never grows between calls (a probe that keeps succeeding would
        // otherwise collect librdkafka's notices for as long as the process runs).
        self.client.poll(Duration::ZERO);
        metadata.map_err(|error| {
            self.client.poll(Duration::from_millis(100));
            self.client.context().explain(&error)
        })
    }
}
