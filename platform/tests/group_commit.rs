//! Group offsets are committed by the consumer, coalesced: one request for many batches.
//!
//! Processors and projections store each batch's offsets once its effects are durable
//! (`Consumer::store_offsets`) and never commit per batch; every consumer that
//! `KafkaClients::consumer` configures commits what was stored at most every
//! `GROUP_COMMIT_INTERVAL_MS`, and nothing while nothing new was stored. This test stores after
//! every record, as a pipeline at low load does after every one-record batch, and reads the
//! consumer's own request counts from librdkafka's statistics: it fails if stored offsets are
//! never committed, if they are committed once per store, or if an idle consumer keeps
//! committing.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use orderflow_platform::{
    config::Overrides,
    kafka::{KafkaClients, MockBroker},
    Settings,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    producer::{BaseProducer, BaseRecord, Producer},
    ClientContext, Message, Offset, Statistics, TopicPartitionList,
};

const TOPIC: &str = "group-commit";
const GROUP: &str = "group-commit-test";
const RECORDS: i64 = 40;

/// The OffsetCommit requests the consumer has sent, from its latest statistics.
#[derive(Clone, Default)]
struct Requests(Arc<Mutex<Option<i64>>>);

impl Requests {
    fn offset_commits(&self) -> Option<i64> {
        *self.0.lock().expect("the statistics lock")
    }
}

impl ClientContext for Requests {
    fn stats(&self, statistics: Statistics) {
        let commits = statistics
            .brokers
            .values()
            .filter_map(|b| b.req.get("OffsetCommit"))
            .sum();
        *self.0.lock().expect("the statistics lock") = Some(commits);
    }
}

impl ConsumerContext for Requests {}

/// Polls `consumer` (which serves its statistics callback) until `done` holds or `within` ends.
fn poll_until(
    consumer: &BaseConsumer<Requests>,
    within: Duration,
    mut done: impl FnMut(&BaseConsumer<Requests>) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done(consumer) {
            return true;
        }
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
            panic!("the consumer failed: {e}");
        }
    }
    done(consumer)
}

fn committed(consumer: &BaseConsumer<Requests>) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(TOPIC, 0);
    let stored = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .expect("the committed offsets are read");
    stored.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    })
}

#[test]
fn stored_offsets_are_committed_in_one_request_for_many_batches_and_none_while_idle() {
    let broker = MockBroker::start(1).expect("the in-process mock cluster starts");
    broker
        .cluster()
        .create_topic(TOPIC, 1, 1)
        .expect("the topic is created");
    let settings = Settings::load(None, &Overrides::default()).expect("default settings load");
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap_servers());

    let producer: BaseProducer = clients
        .idempotent_producer("group-commit-test")
        .create()
        .expect("the producer is created");
    for i in 0..RECORDS {
        let key = i.to_string();
        producer
            .send(BaseRecord::to(TOPIC).key(&key).payload("v"))
            .map_err(|(e, _)| e)
            .expect("the record is queued");
    }
    producer
        .flush(Duration::from_secs(10))
        .expect("every record is delivered");

    let requests = Requests::default();
    let mut config = clients.consumer("group-commit-test", GROUP);
    // Statistics often enough to see the counts move within the test.
    config.set("statistics.interval.ms", "100");
    let consumer: BaseConsumer<Requests> = config
        .create_with_context(requests.clone())
        .expect("the consumer is created");
    consumer
        .subscribe(&[TOPIC])
        .expect("the consumer subscribes");

    // One "batch" per record: store its next offset once it is "done", as the runtimes do.
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while read < RECORDS {
        assert!(
            Instant::now() < deadline,
            "only {read} of {RECORDS} records were read within 30 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(TOPIC, 0, Offset::Offset(message.offset() + 1))
                    .expect("the offset is set");
                consumer.store_offsets(&tpl).expect("the offset is stored");
                read += 1;
            }
            Some(Err(e)) => panic!("the consumer failed: {e}"),
            None => {}
        }
    }

    // Nobody commits explicitly: the consumer commits what was stored.
    assert!(
        poll_until(&consumer, Duration::from_secs(15), |c| committed(c)
            == Some(RECORDS)),
        "the stored offset {RECORDS} was not committed within 15 s (committed: {:?}): is \
         enable.auto.commit on in KafkaClients::consumer?",
        committed(&consumer)
    );
    // Statistics taken after the commit count it.
    assert!(
        poll_until(&consumer, Duration::from_secs(10), |_| requests
            .offset_commits()
            .is_some_and(|n| n > 0)),
        "the consumer's statistics never counted an OffsetCommit request"
    );
    let after_commit = requests.offset_commits().unwrap_or_default();
    eprintln!("{RECORDS} stores, {after_commit} OffsetCommit requests");
    assert!(
        after_commit <= RECORDS / 8,
        "{RECORDS} stored batches cost {after_commit} OffsetCommit requests: offsets are \
         committed per batch, not coalesced"
    );

    // Idle: three commit intervals with nothing new stored send no request. The window is the
    // measurement (a request count over time), not a wait for a condition.
    let idle = Duration::from_millis(
        3 * u64::from(orderflow_platform::kafka::GROUP_COMMIT_INTERVAL_MS) + 500,
    );
    poll_until(&consumer, idle, |_| false);
    let after_idle = requests.offset_commits().unwrap_or_default();
    assert_eq!(
        after_idle,
        after_commit,
        "an idle consumer with nothing new stored sent {} OffsetCommit requests",
        after_idle - after_commit
    );
}
