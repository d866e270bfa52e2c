//! Publishing `OrderPlaced`: an idempotent producer (`acks=all`, so an ack means every in-sync
//! replica has the record, and librdkafka's retries never duplicate it) and a bounded wait.
//!
//! Why nothing is lost or doubled: the edge answers `202` only after the ack, so a `202` always
//! names a durable event. Any failure or timeout answers `503` — the order may or may not have
//! been written (an ack lost in flight); the producer retries a `503` with a new order id, so a
//! client that must not double an order uses `Idempotency-Key` (see the ingest issue).
//!
//! **A timed-out producer is replaced, before librdkafka times anything out.** When librdkafka
//! times a record out, an idempotent producer bumps its epoch by itself and carries on with the
//! next one (KIP-360). The embedded broker (Tansu 0.6) has no record of an epoch it did not hand
//! out: the first produce with it panics its storage ("more or less than one row"), and its
//! supervisor has to restart it. Retiring the producer when the timeout is reported is too
//! late: librdkafka bumps as it times the records out and sends the records queued behind them
//! with the new epoch before the report reaches this code (seen at the embedded broker's
//! ten-minute maintenance, under 40 orders/s). So librdkafka's own timeout is far away
//! (`KafkaClients::message_timeout_ms`, at least a minute) and the edge keeps its deadline
//! itself: when a record is not acknowledged within `kafka.message_timeout_ms` the request
//! answers `503` and the producer is retired — a new one (a new producer id, epoch 0) takes the
//! next record, and the old one's queued and in-flight records are purged, each answering `503`.
//! A purged record may still have reached the broker: like a lost ack, the `503` says the order
//! may have been written. A record the broker refuses for good (an error answer, e.g. from a
//! full disk) bumps the epoch too, so any delivery error retires the producer the same way. On a
//! broker that takes epoch bumps this costs one reconnect per burst of failures.

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use orderflow_platform::{
    kafka::{event_headers, KafkaClients, ProducerStatsContext},
    metrics::ProducerMetrics,
};
use orderflow_schemas::{Codec, OrderEvent, OrderPlaced};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig},
    util::Timeout,
};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the producer queue is full")]
    QueueFull,
    #[error("the broker did not acknowledge within {0:?}")]
    Timeout(Duration),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("encoding: {0}")]
    Codec(#[from] orderflow_schemas::CodecError),
}

#[derive(Clone)]
pub struct Publisher {
    current: Arc<RwLock<Current>>,
    clients: KafkaClients,
    queue_metrics: Option<ProducerMetrics>,
    codec: Arc<Codec>,
    topic: &'static str,
    /// The edge's deadline for an ack, `kafka.message_timeout_ms` (module docs).
    ack_timeout: Duration,
}

/// The producer in use, and how many have been retired before it.
struct Current {
    producer: Arc<FutureProducer<ProducerStatsContext>>,
    generation: u64,
}

impl Publisher {
    /// `queue_metrics`, when given, receives the producer's queue depth every 5 s.
    pub fn new(
        clients: &KafkaClients,
        codec: Arc<Codec>,
        topic: &'static str,
        queue_metrics: Option<ProducerMetrics>,
    ) -> Result<Self, PublishError> {
        let producer = Self::create_producer(clients, queue_metrics.clone())?;
        let ack_timeout = Duration::from_millis(u64::from(clients.settings().message_timeout_ms));
        Ok(Self {
            current: Arc::new(RwLock::new(Current {
                producer: Arc::new(producer),
                generation: 0,
            })),
            clients: clients.clone(),
            queue_metrics,
            codec,
            topic,
            ack_timeout,
        })
    }

    fn create_producer(
        clients: &KafkaClients,
        queue_metrics: Option<ProducerMetrics>,
    ) -> Result<FutureProducer<ProducerStatsContext>, PublishError> {
        Ok(clients
            .stats_producer("ingest")
            .create_with_context(ProducerStatsContext::new("ingest", queue_metrics))?)
    }

    fn producer(&self) -> (Arc<FutureProducer<ProducerStatsContext>>, u64) {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (current.producer.clone(), current.generation)
    }

    /// How many producers have been retired after a timeout (module docs).
    pub fn retired_producers(&self) -> u64 {
        self.producer().1
    }

    /// Replaces the producer of `generation` after one of its records missed the edge's
    /// deadline (module docs); a later generation means another request already did.
    fn retire(&self, generation: u64) {
        if self.producer().1 != generation {
            return;
        }
        // Logged before the new client exists: creating one emits librdkafka's own log records
        // on this thread, and under the default `telemetry.filter` (`librdkafka=warn`) the
        // next event on the thread was then dropped (seen under `dev`, not under RUST_LOG=info).
        warn!(
            retired = generation + 1,
            "A record was not acknowledged (in time, or at all): the producer is replaced, so that it never sends with an epoch librdkafka bumped."
        );
        let fresh = match Self::create_producer(&self.clients, self.queue_metrics.clone()) {
            Ok(fresh) => fresh,
            Err(e) => {
                warn!(error = %e, "Creating a producer to replace a timed-out one failed; keeping the old one.");
                return;
            }
        };
        let old = {
            let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
            if current.generation != generation {
                // Another request replaced it meanwhile.
                return;
            }
            current.generation += 1;
            std::mem::replace(&mut current.producer, Arc::new(fresh))
        };
        // Purging does not wait for the broker; dropping the client joins its threads. The
        // purge of in-flight records bumps the old producer's epoch (a sequence gap), but no
        // record is enqueued into it any more (`publish_to` enqueues under the read lock).
        old.purge(PurgeConfig::default().queue().inflight());
        tokio::task::spawn_blocking(move || drop(old));
    }

    /// Writes the order and waits for the broker's ack. Keyed by customer: per-customer order.
    pub async fn publish(
        &self,
        event: &OrderPlaced,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        let wrapped = OrderEvent::OrderPlaced(event.clone());
        self.publish_to(
            self.topic,
            &event.envelope.customer_id,
            &wrapped,
            traceparent,
        )
        .await
    }

    /// Writes any event to `topic` under `key` and waits for the broker's ack.
    pub async fn publish_to(
        &self,
        topic: &str,
        key: &str,
        event: &OrderEvent,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        let payload = self.codec.encode(event)?;
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(event_headers(event.kind(), traceparent));
        // Enqueued under the read lock: once `retire` has swapped the producer (under the write
        // lock), nothing more reaches the old one. Its purge of in-flight records makes
        // librdkafka bump its epoch, and a record enqueued after that would carry it.
        let (delivery, generation) = {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            let delivery = current
                .producer
                .send_result(record)
                .map_err(|(e, _)| match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        PublishError::QueueFull
                    }
                    other => PublishError::Kafka(other),
                })?;
            (delivery, current.generation)
        };
        match tokio::time::timeout(self.ack_timeout, delivery).await {
            Err(_) => {
                // The edge's deadline, long before librdkafka's own (module docs).
                self.retire(generation);
                Err(PublishError::Timeout(self.ack_timeout))
            }
            Ok(Err(_canceled)) => Err(PublishError::Kafka(KafkaError::Canceled)),
            Ok(Ok(Err((e, _)))) => {
                // A record that failed for good (the broker's error, e.g. a full disk, or a
                // timeout) has made librdkafka bump the epoch: retire, as after a deadline.
                self.retire(generation);
                Err(PublishError::Kafka(e))
            }
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    /// Connects to the cluster and learns the topic's partitions, so the first order does not
    /// pay for it inside its ack deadline. Blocking; call it off the async workers.
    pub fn warm_up(&self, timeout: Duration) -> Result<(), PublishError> {
        self.producer()
            .0
            .client()
            .fetch_metadata(Some(self.topic), timeout)
            .map(|_| ())
            .map_err(PublishError::Kafka)
    }

    /// Waits for every queued record to be acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().0.flush(Timeout::After(timeout));
    }
}
