//! The processor runtime: consume → step → produce, effectively once on any broker.
//!
//! Each batch is one Kafka transaction on a transactional producer: the outputs, any dead
//! letters and the consumed offsets (`send_offsets_to_transaction` with the group metadata, so a
//! zombie of an old generation is fenced where the broker supports it, KIP-447). Consumers read
//! `read_committed`.
//!
//! The brokers used here show aborted records to `read_committed` readers and one of them never
//! stores transactional offsets (DESIGN.md), so correctness does not rest on the transaction:
//!
//! 1. **Deterministic outputs**: steps derive ids, sequences and times from the input only, so
//!    re-processing re-emits byte-identical events.
//! 2. **Idempotent consumers**: every consumer downstream drops an event it already applied.
//! 3. **Positions after outputs**: the group offset is committed (again, outside the
//!    transaction) only after `commit_transaction` returned, i.e. after every output of the
//!    batch was acknowledged. A crash anywhere before that re-processes the batch — duplicates
//!    that rule 2 drops; a crash after it loses nothing, because the outputs are durable.
//!
//! On any error inside a batch the transaction is aborted and the session restarts: new
//! producer (re-initialising after an ambiguous commit, rather than guessing its outcome), new
//! consumer, resuming from the last committed position. A record that cannot be decoded, or that
//! a step declares poison, goes to the dead-letter topic with the reason, source topic,
//! partition and offset in headers, and the partition keeps moving.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use orderflow_platform::{
    config::BatchSettings,
    health::Readiness,
    kafka::{
        collect_batch, dead_letter_headers, event_headers, header_value, next_offsets,
        retain_assigned, BatchBounds, GroupContext, KafkaClients,
    },
    telemetry::{continue_trace, current_traceparent},
};
use orderflow_schemas::{headers, Codec, OrderEvent};
use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
    message::{Message, OwnedMessage},
    producer::{FutureProducer, FutureRecord, Producer},
    TopicPartitionList,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, info, warn};

use crate::{
    metrics::{OutputLabels, ProcessorLabels, ProcessorMetrics},
    ProcessorSpec,
};

/// A saga step or any other stateless-by-contract transformation. Plain code: no Kafka, no
/// clock, no randomness — outputs must be a function of the input (rule 1).
pub trait Step: Send + 'static {
    fn handle(&mut self, event: &OrderEvent, out: &mut Outputs) -> Result<(), StepError>;
}

/// Why a step gave up on an input. Any variant sends the input to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The input can never be processed (retrying cannot help).
    #[error("{0}")]
    Poison(String),
}

/// An event a step wants written.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub topic: &'static str,
    pub key: String,
    pub event: OrderEvent,
}

/// Where a step puts its outputs, in order.
#[derive(Debug, Default)]
pub struct Outputs {
    records: Vec<OutputRecord>,
}

impl Outputs {
    pub fn push(&mut self, topic: &'static str, key: String, event: OrderEvent) {
        self.records.push(OutputRecord { topic, key, event });
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, OutputRecord> {
        self.records.drain(..)
    }

    pub fn records(&self) -> &[OutputRecord] {
        &self.records
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
}

type ProcessorConsumer = StreamConsumer<GroupContext>;

/// Runs one processor until cancelled.
pub struct ProcessorRuntime {
    name: &'static str,
    input_topics: Vec<&'static str>,
    dead_letter_topic: &'static str,
    step: Box<dyn Step>,
    clients: KafkaClients,
    batch: BatchSettings,
    codec: Arc<Codec>,
    group_id: String,
    transactional_id: String,
    metrics: ProcessorMetrics,
    /// This processor's label value, built once.
    labels: ProcessorLabels,
    readiness: Option<Readiness>,
}

impl ProcessorRuntime {
    pub fn new(
        spec: ProcessorSpec,
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
            name: spec.name,
            input_topics: spec.input_topics,
            dead_letter_topic: spec.dead_letter_topic,
            step: spec.step,
            group_id: format!("orderflow-{}", spec.name),
            transactional_id: format!("{}-{}-{instance}", batch.transactional_id_prefix, spec.name),
            clients,
            batch: batch.clone(),
            codec,
            labels: ProcessorLabels {
                processor: spec.name.to_owned(),
            },
            metrics,
            readiness: None,
        }
    }

    /// Reports `processor <name>` on `/readyz`: not ready until its group assigned it.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// Runs sessions until `cancel` fires; a failed session is retried with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session(&cancel).await {
                Ok(()) => {
                    info!(processor = self.name, "Processor stopped.");
                    return;
                }
                Err(e) => {
                    warn!(processor = self.name, error = %e, retry_in = ?backoff, "Processor session failed; restarting from the last committed position.");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One consumer and one producer, until cancelled (Ok) or an error (Err).
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), ProcessorError> {
        let consumer: ProcessorConsumer = self
            .clients
            .consumer(self.name, &self.group_id)
            .create_with_context({
                let context = GroupContext::new(self.name)
                    .with_metrics(&self.group_id, self.metrics.consumer.clone());
                match &self.readiness {
                    Some(r) => context.with_readiness(r, &format!("processor {}", self.name)),
                    None => context,
                }
            })?;
        let producer: FutureProducer = self
            .clients
            .transactional_producer(self.name, &self.transactional_id)
            .create()?;
        let timeout = self.transaction_timeout();
        blocking(&producer, move |p| p.init_transactions(timeout)).await?;
        consumer.subscribe(&self.input_topics)?;
        info!(processor = self.name, group = %self.group_id, topics = ?self.input_topics, "Processor started.");

        let mut last_committed = None;
        loop {
            let batch = collect_batch(&consumer, cancel, &self.bounds()).await;
            let batch = retain_assigned(&consumer, batch);
            if !batch.is_empty() {
                match self.process(&consumer, &producer, &batch).await {
                    Ok(offsets) => last_committed = Some(offsets),
                    Err(e) => {
                        abort(&producer, timeout).await;
                        self.metrics.aborts.get_or_create(&self.labels).inc();
                        return Err(e);
                    }
                }
            }
            if cancel.is_cancelled() {
                // The last batch's transaction is committed. Its asynchronous offset commit may
                // still be in flight: repeat it synchronously so the group's position is stored
                // before dropping the consumer leaves the group.
                if let Some(offsets) = last_committed {
                    consumer.commit(&offsets, CommitMode::Sync)?;
                }
                return Ok(());
            }
        }
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

    async fn process(
        &mut self,
        consumer: &ProcessorConsumer,
        producer: &FutureProducer,
        batch: &[OwnedMessage],
    ) -> Result<TopicPartitionList, ProcessorError> {
        let started = Instant::now();
        producer.begin_transaction()?;
        let mut deliveries = Vec::new();
        let mut outputs = Outputs::default();
        let mut emitted: Vec<&'static str> = Vec::new();
        let mut dead = 0usize;
        for message in batch {
            // One span per record, continuing the order's trace from the record's headers; the
            // outputs carry this span's context on. No await inside: the guard never crosses one.
            let incoming = header_value(message, headers::TRACEPARENT);
            let span = debug_span!(
                "process",
                otel.kind = "consumer",
                processor = self.name,
                trace_id = tracing::field::Empty
            );
            continue_trace(&span, incoming.as_deref());
            let _entered = span.enter();
            let traceparent = current_traceparent().or(incoming);
            let handled = match self.codec.decode(message.payload().unwrap_or_default()) {
                Err(e) => Err(format!("undecodable: {e}")),
                Ok(event) => self
                    .step
                    .handle(&event, &mut outputs)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        outputs
                            .records()
                            .iter()
                            .map(|r| self.codec.encode(&r.event).map(|bytes| (r, bytes)))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| format!("output does not encode: {e}"))
                    }),
            };
            let handled = match handled {
                Ok(encoded) => {
                    for (record, bytes) in encoded {
                        emitted.push(record.event.kind().name());
                        let future_record = FutureRecord::to(record.topic)
                            .key(record.key.as_bytes())
                            .payload(bytes.as_slice())
                            .headers(event_headers(record.event.kind(), traceparent.as_deref()));
                        deliveries.push(producer.send_result(future_record).map_err(|(e, _)| e)?);
                    }
                    Ok(())
                }
                Err(reason) => Err(reason),
            };
            outputs.drain();
            if let Err(reason) = handled {
                dead += 1;
                warn!(processor = self.name, topic = message.topic(), partition = message.partition(), offset = message.offset(), %reason, "Record sent to the dead-letter topic.");
                let dlq_headers = dead_letter_headers(message, self.name, &reason);
                let record = FutureRecord::to(self.dead_letter_topic)
                    .payload(message.payload().unwrap_or_default())
                    .headers(dlq_headers);
                let record = match message.key() {
                    Some(key) => record.key(key),
                    None => record,
                };
                deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
            }
        }
        let produced = deliveries.len();
        for delivery in deliveries {
            match delivery.await {
                Err(_canceled) => return Err(ProcessorError::DeliveryCancelled),
                Ok(Err((e, _))) => return Err(e.into()),
                Ok(Ok(_)) => {}
            }
        }
        let offsets = next_offsets(batch)?;
        let group = consumer
            .group_metadata()
            .ok_or(ProcessorError::NoGroupMetadata)?;
        let timeout = self.transaction_timeout();
        let committing = Instant::now();
        {
            let offsets = offsets.clone();
            blocking(producer, move |p| {
                p.send_offsets_to_transaction(&offsets, &group, timeout)
            })
            .await?;
        }
        blocking(producer, move |p| p.commit_transaction(timeout)).await?;
        // Rule 3: the position is written only now that every output is durable. This is also
        // the only place offsets are stored on a broker that ignores transactional offsets.
        consumer.commit(&offsets, CommitMode::Async)?;
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
        for event_type in emitted {
            m.outputs
                .get_or_create(&OutputLabels {
                    processor: self.labels.processor.clone(),
                    event_type: event_type.to_owned(),
                })
                .inc();
        }
        debug!(
            processor = self.name,
            records = batch.len(),
            produced,
            dead,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Batch committed."
        );
        Ok(offsets)
    }
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
