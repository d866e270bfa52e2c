//! Publishing `OrderPlaced`: an idempotent producer (`acks=all`, so an ack means every in-sync
//! replica has the record, and librdkafka's retries never duplicate it) and a bounded wait.
//!
//! Why nothing is lost or doubled: the edge answers `202` only after the ack, so a `202` always
//! names a durable event. Any failure or timeout answers `503` — the order may or may not have
//! been written (an ack lost in flight); the producer retries a `503` with a new order id, so a
//! client that must not double an order uses `Idempotency-Key` (see the ingest issue).

use std::{sync::Arc, time::Duration};

use orderflow_platform::{
    kafka::{event_headers, KafkaClients, ProducerStatsContext},
    metrics::ProducerMetrics,
};
use orderflow_schemas::{Codec, OrderEvent, OrderPlaced};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

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
    producer: FutureProducer<ProducerStatsContext>,
    codec: Arc<Codec>,
    topic: &'static str,
    /// Hard bound on the wait for an ack, a little over `message.timeout.ms`.
    ack_timeout: Duration,
}

impl Publisher {
    /// `queue_metrics`, when given, receives the producer's queue depth every 5 s.
    pub fn new(
        clients: &KafkaClients,
        codec: Arc<Codec>,
        topic: &'static str,
        queue_metrics: Option<ProducerMetrics>,
    ) -> Result<Self, PublishError> {
        let producer: FutureProducer<ProducerStatsContext> = clients
            .idempotent_producer("ingest")
            .create_with_context(ProducerStatsContext::new("ingest", queue_metrics))?;
        let message_timeout =
            Duration::from_millis(u64::from(clients.settings().message_timeout_ms));
        Ok(Self {
            producer,
            codec,
            topic,
            ack_timeout: message_timeout + Duration::from_millis(500),
        })
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
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    PublishError::QueueFull
                }
                other => PublishError::Kafka(other),
            })?;
        match tokio::time::timeout(self.ack_timeout, delivery).await {
            Err(_) => Err(PublishError::Timeout(self.ack_timeout)),
            Ok(Err(_canceled)) => Err(PublishError::Kafka(KafkaError::Canceled)),
            Ok(Ok(Err((e, _)))) => Err(PublishError::Kafka(e)),
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    /// Connects to the cluster and learns the topic's partitions, so the first order does not
    /// pay for it inside its ack deadline. Blocking; call it off the async workers.
    pub fn warm_up(&self, timeout: Duration) -> Result<(), PublishError> {
        use rdkafka::producer::Producer;
        self.producer
            .client()
            .fetch_metadata(Some(self.topic), timeout)
            .map(|_| ())
            .map_err(PublishError::Kafka)
    }

    /// Waits for every queued record to be acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(Timeout::After(timeout));
    }
}
