//! Where replay and reconcile must start reading: the first offset of each partition.
//!
//! Both fold a topic from its beginning, so a partition whose log no longer starts at offset 0
//! (records deleted by retention, or by a broker that drops old records) cannot give the right
//! answer: a replay would build tables without the deleted orders, a reconcile would compare
//! the tables with part of their history. They refuse instead, naming the partition. The topic
//! catalog keeps the topics they read with no time retention for this reason.

use std::time::Duration;

use rdkafka::{consumer::Consumer, error::KafkaError};

/// A partition whose log no longer starts at 0.
#[derive(Debug, thiserror::Error)]
#[error(
    "{topic} partition {partition} starts at offset {low}, not 0: its first {low} records were \
     deleted, so it cannot be read from its beginning. Take projection snapshots (`orderflow \
     snapshot`) more often than retention deletes, restore the topic from a backup, or use \
     a log that still holds its whole history (the catalog keeps {topic} with no time retention; \
     check its retention.ms with `orderflow topics apply`)"
)]
pub struct LogTruncated {
    pub topic: String,
    pub partition: i32,
    pub low: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogStartError {
    #[error(transparent)]
    Truncated(#[from] LogTruncated),
    #[error(
        "{topic} partition {partition} starts at offset {low}, past the snapshot's position \
         {from}: records the snapshot does not hold were deleted; take snapshots more often than \
         the topic's retention deletes records"
    )]
    GoneSinceSnapshot {
        topic: String,
        partition: i32,
        low: i64,
        from: i64,
    },
    #[error("reading the watermarks of {topic} partition {partition}: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
}

/// The partition's watermarks `(low, high)`, or an error if its log does not start at 0.
pub fn require_whole<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), LogStartError> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(kafka_error(topic, partition))?;
    check(topic, partition, low)?;
    Ok((low, high))
}

/// The partition's watermarks, or an error if its log no longer holds offset `from` on (a
/// snapshot's position: what came before it is in the snapshot).
pub fn require_from<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    from: i64,
    timeout: Duration,
) -> Result<(i64, i64), LogStartError> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(kafka_error(topic, partition))?;
    check_from(topic, partition, low, from)?;
    Ok((low, high))
}

/// The partition's end (the offset after its last record, read past the high watermark where
/// a broker reports that too low: [`orderflow_platform::kafka::log_end`]), or an error if its log
/// does not start at 0. `reader` is assigned here: a consumer of the caller's own.
pub fn require_whole_to_end(
    reader: &orderflow_platform::kafka::Reader,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<i64, LogStartError> {
    let (low, end) = orderflow_platform::kafka::log_end(reader, topic, partition, timeout)
        .map_err(kafka_error(topic, partition))?;
    check(topic, partition, low)?;
    Ok(end)
}

/// [`require_whole_to_end`] for a read that starts at `from` (a snapshot's position): an error
/// only if the log no longer holds `from` on.
pub fn require_from_to_end(
    reader: &orderflow_platform::kafka::Reader,
    topic: &str,
    partition: i32,
    from: i64,
    timeout: Duration,
) -> Result<i64, LogStartError> {
    let (low, end) = orderflow_platform::kafka::log_end(reader, topic, partition, timeout)
        .map_err(kafka_error(topic, partition))?;
    check_from(topic, partition, low, from)?;
    Ok(end)
}

fn kafka_error(topic: &str, partition: i32) -> impl FnOnce(KafkaError) -> LogStartError + '_ {
    move |source| LogStartError::Kafka {
        topic: topic.to_owned(),
        partition,
        source,
    }
}

/// An error if a log starting at `low` no longer holds offset `from` on.
fn check_from(topic: &str, partition: i32, low: i64, from: i64) -> Result<(), LogStartError> {
    if low > from {
        return Err(LogStartError::GoneSinceSnapshot {
            topic: topic.to_owned(),
            partition,
            low,
            from,
        });
    }
    Ok(())
}

fn check(topic: &str, partition: i32, low: i64) -> Result<(), LogTruncated> {
    if low > 0 {
        return Err(LogTruncated {
            topic: topic.to_owned(),
            partition,
            low,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_starts_later_is_refused_naming_the_partition() {
        assert!(check("orders.events", 3, 0).is_ok());
        let err = check("orders.events", 3, 18_042).expect_err("truncated");
        let message = err.to_string();
        assert!(
            message.contains("orders.events partition 3 starts at offset 18042"),
            "{message}"
        );
    }
}
