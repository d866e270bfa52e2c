//! A consumer prefetches a bounded amount, however long the backlog.
//!
//! librdkafka fetches ahead of its application up to `queued.max.messages.kbytes` (64 MiB by
//! default) per consumer queue: a processor restoring a long changelog, or a group catching up
//! after a stall, held whole backlogs in memory and kept the memory afterwards. Every consumer
//! that `KafkaClients` configures is bounded by `CONSUMER_QUEUE_KBYTES`. This test writes a
//! backlog ten times that bound to the embedded broker, lets a restore reader fetch without
//! handing it any record, and reads the reader's queued bytes from librdkafka's statistics: it
//! fails if prefetch is unbounded again.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use orderflow_platform::kafka::{KafkaClients, CONSUMER_QUEUE_KBYTES};
use orderflow_testkit::{apply_topics, test_settings, Broker};
use orderflow_topics::names;
use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    producer::{BaseProducer, BaseRecord, Producer},
    ClientContext, Offset, Statistics, TopicPartitionList,
};

const TOPIC: &str = names::ORDERS_EVENTS;

/// The bytes the reader held fetched and not handed over, one entry per statistics snapshot.
#[derive(Clone, Default)]
struct Queued(Arc<Mutex<Vec<u64>>>);

impl Queued {
    fn snapshots(&self) -> Vec<u64> {
        self.0.lock().expect("the statistics lock").clone()
    }
}

impl ClientContext for Queued {
    fn stats(&self, statistics: Statistics) {
        let queued = statistics
            .topics
            .get(TOPIC)
            .and_then(|t| t.partitions.get(&0))
            .map_or(0, |p| p.fetchq_size);
        self.0.lock().expect("the statistics lock").push(queued);
    }
}

impl ConsumerContext for Queued {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reader_holds_at_most_its_bound_of_a_long_backlog() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let settings = test_settings(None);
    apply_topics(&broker, &settings).await;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    tokio::task::spawn_blocking(move || fill_then_prefetch(&clients))
        .await
        .expect("the test's blocking part");
}

fn fill_then_prefetch(clients: &KafkaClients) {
    let bound = u64::from(CONSUMER_QUEUE_KBYTES) * 1024;
    // A backlog ten times the bound, in 10 KiB records, all in partition 0.
    let payload = vec![b'x'; 10 * 1024];
    let records = 10 * bound / payload.len() as u64;
    let backlog = records * payload.len() as u64;
    let producer: BaseProducer = clients
        .idempotent_producer("prefetch-test")
        .create()
        .expect("the producer is created");
    for i in 0..records {
        let key = i.to_string();
        let mut record = BaseRecord::to(TOPIC)
            .partition(0)
            .key(&key)
            .payload(&payload);
        // A full local queue gives the record back: deliver some, then queue it again.
        while let Err((_, back)) = producer.send(record) {
            producer.poll(Duration::from_millis(10));
            record = back;
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("every record is delivered");

    let queued = Queued::default();
    let mut config = clients.reader("prefetch-test");
    // Statistics often enough to watch the queue fill.
    config.set("statistics.interval.ms", "100");
    let reader: Arc<BaseConsumer<Queued>> = Arc::new(
        config
            .create_with_context(queued.clone())
            .expect("the reader is created"),
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Beginning)
        .expect("the partition is added");
    reader.assign(&tpl).expect("the reader is assigned");
    // The partition's records go to a queue of their own that nobody reads, so polling the
    // reader serves its statistics while the fetcher fills that queue as far as it may.
    let _unread = reader
        .split_partition_queue(TOPIC, 0)
        .expect("the partition's queue is split off");

    // Until the fetcher has stopped: the same queued bytes in five snapshots in a row, once
    // they passed a quarter of the bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        assert!(
            Instant::now() < deadline,
            "the reader's queue never settled within 60 s: {:?}",
            queued.snapshots()
        );
        if let Some(Err(e)) = reader.poll(Duration::from_millis(50)) {
            panic!("the reader failed: {e}");
        }
        let seen = queued.snapshots();
        let tail = &seen[seen.len().saturating_sub(5)..];
        if tail.len() == 5 && tail[0] > bound / 4 && tail.iter().all(|q| *q == tail[0]) {
            break tail[0];
        }
    };
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "backlog {:.1} MiB; the reader holds {:.1} MiB (bound {:.1} MiB)",
        mib(backlog),
        mib(settled),
        mib(bound)
    );
    // The fetch in flight when the bound is reached still lands: one fetch past it at most.
    assert!(
        settled <= 2 * bound,
        "the reader holds {:.1} MiB of a {:.1} MiB backlog: prefetch is not bounded by \
         CONSUMER_QUEUE_KBYTES ({:.1} MiB)",
        mib(settled),
        mib(backlog),
        mib(bound)
    );
}
