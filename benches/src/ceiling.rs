//! The broker's ceiling, measured on the same broker in the same run, with the same client
//! settings and message size as the pipeline:
//! - raw produce: an idempotent producer (`acks=all`) writing `n` records as fast as it can;
//! - raw consume: a `read_committed` consumer reading them back;
//! - consume → produce: orderflow's own processor runtime with a step that only passes each
//!   event on (decode, encode, outputs, offsets), timed from the first to the last record a
//!   `read_committed` reader sees on its output (the first batch is outside the timing; with
//!   the default 20 000 records and batches of at most 500 that overstates the rate by at most
//!   ~2.5 %) — once without transactions (`kafka.transactions = off`), and once with one
//!   transaction per batch where the broker has transactions. `pipeline_rate` is the one of the
//!   mode the pipeline runs in on this broker (`auto`), which the efficiency divides by;
//! - produce → consume latency: [`LATENCY_ROUNDS`] records written one at a time, each timed
//!   from its send to a waiting reader's receipt — the broker's own cost of one hop, which an
//!   order's end-to-end latency (six consumer hops) is to be read beside.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use orderflow_platform::{
    config::{Overrides, Transactions},
    kafka::KafkaClients,
    Settings,
};
use orderflow_processors::{
    runtime::StepError, state::NoState, Outputs, ProcessorIo, ProcessorRuntime, Step,
};
use orderflow_schemas::{Codec, OrderEvent};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::{latency_histogram, record, summarize, LatencySummary};

/// Partitions of the benchmark topics, as `orders.events`.
const PARTITIONS: i32 = 6;

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub messages: u64,
    pub message_bytes: usize,
    /// Records per second.
    pub produce_rate: f64,
    pub consume_rate: f64,
    /// Consume → produce through the runtime without transactions.
    pub idempotent_rate: f64,
    /// The same with transactions; `None` where the broker has none.
    pub transactional_rate: Option<f64>,
    /// The rate of the mode the pipeline runs in on this broker.
    pub pipeline_rate: f64,
    /// One record's produce → consume latency, with nothing else on the broker.
    pub produce_to_consume: LatencySummary,
}

/// Records timed one at a time for the produce → consume latency.
pub const LATENCY_ROUNDS: u32 = 200;

/// Passes every event on unchanged: the cheapest possible processor.
struct PassThrough {
    output: &'static str,
}

impl Step for PassThrough {
    type State = NoState;

    fn handle(
        &mut self,
        _state: &mut NoState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        out.push(
            self.output,
            event.envelope().customer_id.clone(),
            event.clone(),
        );
        Ok(())
    }
}

fn leak(name: String) -> &'static str {
    // A handful of names per harness run; the processor runtime wants 'static topic names.
    Box::leak(name.into_boxed_str())
}

/// Creates the topics through the admin API; a broker without CreateTopics (the mock cluster)
/// creates them on first use instead.
async fn create_topics(clients: &KafkaClients, names: &[&str]) {
    let Ok(admin) = clients
        .admin()
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    // The mock cluster never answers CreateTopics: bound the request, not just the op.
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    let _ = admin.create_topics(topics.iter(), &options).await;
}

fn reader(clients: &KafkaClients, topic: &str) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = clients
        .consumer(
            "bench-reader",
            &format!("bench-reader-{}", uuid::Uuid::new_v4()),
        )
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} has no partitions");
    }
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Reads `n` records; returns the times of the first and the last.
fn read_n(
    consumer: &BaseConsumer,
    n: u64,
    timeout: Duration,
) -> Result<(std::time::Instant, std::time::Instant)> {
    let deadline = std::time::Instant::now() + timeout;
    let mut first: Option<std::time::Instant> = None;
    let mut seen = 0;
    while seen < n {
        if std::time::Instant::now() > deadline {
            bail!("read {seen} of {n} records before the deadline");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            first.get_or_insert_with(std::time::Instant::now);
            seen += 1;
        }
    }
    let last = std::time::Instant::now();
    Ok((first.unwrap_or(last), last))
}

/// Writes `n` copies of `payload` (keys spread like customers) and waits for every ack.
async fn produce_n(producer: &FutureProducer, topic: &str, payload: &[u8], n: u64) -> Result<()> {
    let mut in_flight = VecDeque::new();
    for i in 0..n {
        let key = format!("customer-{:04}", i % 1000);
        let record = FutureRecord::to(topic).key(key.as_bytes()).payload(payload);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        in_flight.push_back(delivery);
        if in_flight.len() >= 10_000 {
            if let Some(d) = in_flight.pop_front() {
                d.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
            }
        }
    }
    for d in in_flight {
        d.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

/// Measures the three ceilings with `n` records like the pipeline's `OrderPlaced`.
pub async fn measure(bootstrap: &str, n: u64) -> Result<Ceiling> {
    let settings = Settings::from_defaults(&Overrides::default())?;
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let codec = Arc::new(Codec::new()?);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let input = leak(format!("orderflow.bench.{run}.raw"));
    create_topics(&clients, &[input]).await;

    // Raw produce.
    let producer: FutureProducer = clients.idempotent_producer("bench").create()?;
    let event = OrderEvent::OrderPlaced(crate::sample_order(2));
    let payload = codec.encode(&event)?;
    // One acknowledged record first: connection, metadata and producer id are not throughput.
    producer
        .send(
            FutureRecord::to(input)
                .key("warm-up")
                .payload(payload.as_slice()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    let started = Instant::now();
    produce_n(&producer, input, &payload, n).await?;
    let produce_rate = n as f64 / started.elapsed().as_secs_f64();

    // Raw consume: from assignment (fetching starts) to the last record, the warm-up included.
    let consume_rate = {
        let consumer = reader(&clients, input)?;
        let started = std::time::Instant::now();
        let (_, last) =
            tokio::task::spawn_blocking(move || read_n(&consumer, n + 1, Duration::from_secs(300)))
                .await
                .context("consume")??;
        (n + 1) as f64 / (last - started).as_secs_f64().max(1e-9)
    };

    let through = |transactions| {
        through_runtime(
            &settings,
            &clients,
            &codec,
            &producer,
            &payload,
            n,
            transactions,
        )
    };
    let idempotent_rate = through(Transactions::Off).await?;
    let has_transactions =
        orderflow_platform::transactions::supports_transactions(&settings.kafka, bootstrap).await?;
    let transactional_rate = if has_transactions {
        Some(through(Transactions::On).await?)
    } else {
        None
    };
    let pipeline_rate = transactional_rate.unwrap_or(idempotent_rate);
    let produce_to_consume = produce_to_consume(&clients, &payload, LATENCY_ROUNDS).await?;

    Ok(Ceiling {
        messages: n,
        message_bytes: payload.len(),
        produce_rate,
        consume_rate,
        idempotent_rate,
        transactional_rate,
        pipeline_rate,
        produce_to_consume,
    })
}

/// The broker's own latency of one hop: `rounds` records, each produced only after the one
/// before was read, timed from the send to its receipt by a reader already waiting at the end
/// of the topic (orderflow's default client settings, as the rest of the ceiling; on the
/// embedded broker the fetch wait does not add to it, since a fetch answers when a record
/// arrives).
async fn produce_to_consume(
    clients: &KafkaClients,
    payload: &[u8],
    rounds: u32,
) -> Result<LatencySummary> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = leak(format!("orderflow.bench.{run}.latency"));
    create_topics(clients, &[topic]).await;
    let producer: FutureProducer = clients.idempotent_producer("bench-latency").create()?;
    // The topic exists (created, or created by this first record) before the reader assigns.
    producer
        .send(
            FutureRecord::to(topic).key("warm-up").payload(payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    let consumer = reader(clients, topic)?;
    let payload = payload.to_vec();
    tokio::task::spawn_blocking(move || -> Result<LatencySummary> {
        read_n(&consumer, 1, Duration::from_secs(60)).context("the warm-up record")?;
        let mut histogram = latency_histogram();
        for round in 0..rounds {
            let key = format!("latency-{round}");
            let sent = std::time::Instant::now();
            // Not awaited: the reader's receipt is what is timed, the ack comes meanwhile.
            let _delivery = producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(key.as_bytes())
                        .payload(&payload),
                )
                .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
            read_n(&consumer, 1, Duration::from_secs(30))
                .with_context(|| format!("record {round} of the latency rounds"))?;
            record(&mut histogram, sent.elapsed().as_micros() as u64);
        }
        Ok(summarize(&histogram))
    })
    .await
    .context("produce → consume")?
}

/// Consume → produce through the processor runtime, on topics of its own. It is started and
/// warmed up first (group joined, producer initialised, one record through), then timed from
/// the start of producing `n` records to its input to the last of them on its output: the time
/// for `n` records to pass through a running processor.
async fn through_runtime(
    settings: &Settings,
    clients: &KafkaClients,
    codec: &Arc<Codec>,
    producer: &FutureProducer,
    payload: &[u8],
    n: u64,
    transactions: Transactions,
) -> Result<f64> {
    let mut settings = settings.clone();
    settings.kafka.transactions = transactions;
    let clients = KafkaClients::new(&settings.kafka, clients.bootstrap());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let txn_input = leak(format!("orderflow.bench.{run}.in"));
    let txn_output = leak(format!("orderflow.bench.{run}.out"));
    create_topics(&clients, &[txn_input, txn_output]).await;
    let io = ProcessorIo {
        name: leak(format!("bench-{run}")),
        input_topic: txn_input,
        dead_letter_topic: txn_output,
        changelog_topic: None,
    };
    let runtime = ProcessorRuntime::new(
        io,
        PassThrough { output: txn_output },
        clients.clone(),
        &settings.processor,
        codec.clone(),
        orderflow_processors::ProcessorMetrics::unregistered(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(runtime.run(cancel.clone()));
    produce_n(producer, txn_input, payload, 1).await?;
    // The output topic may not exist yet on a broker that creates topics on first use.
    let out_reader = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match reader(&clients, txn_output) {
                Ok(r) => break r,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e),
            }
        }
    };
    let out_reader = tokio::task::spawn_blocking(move || {
        read_n(&out_reader, 1, Duration::from_secs(120)).map(|_| out_reader)
    })
    .await
    .context("consume → produce warm-up")??;
    let started = std::time::Instant::now();
    let reading =
        tokio::task::spawn_blocking(move || read_n(&out_reader, n, Duration::from_secs(600)));
    produce_n(producer, txn_input, payload, n).await?;
    let (_, last) = reading.await.context("consume → produce")??;
    cancel.cancel();
    let _ = task.await;
    Ok(n as f64 / (last - started).as_secs_f64().max(1e-9))
}
