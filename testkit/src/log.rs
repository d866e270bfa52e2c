//! Reading `orders.events` the way an auditor would, independently of the projections: every
//! event by order, byte-level conflicts between repeats of one event id, and each order's final
//! events. Plus builders for the events tests put on the topics themselves.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use orderflow_platform::{kafka::KafkaClients, Settings};
use orderflow_schemas::{
    Address, Codec, Envelope, InventoryRestocked, OrderEvent, OrderLine, OrderPlaced,
};
use orderflow_topics::names;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    Offset, TopicPartitionList,
};

/// An envelope for an event entering from outside (sequence 0 unless the caller sets it).
pub fn envelope(event_id: String, order_id: String, customer_id: String, at: i64) -> Envelope {
    Envelope {
        event_id,
        order_id,
        customer_id,
        occurred_at: at,
        causation_id: None,
        sequence: 0,
        schema_version: 1,
    }
}

/// A valid `OrderPlaced` (sequence 1, fresh ids) with `lines` as (sku, quantity) at 5.00 each.
pub fn order_placed(
    customer: &str,
    lines: &[(&str, i32)],
    payment_token: &str,
    at: i64,
) -> OrderPlaced {
    let lines: Vec<OrderLine> = lines
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).to_owned(),
            quantity: *quantity,
            unit_price_minor: 500,
        })
        .collect();
    let subtotal: i64 = lines
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_minor)
        .sum();
    let mut envelope = envelope(
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        customer.to_owned(),
        at,
    );
    envelope.sequence = 1;
    OrderPlaced {
        envelope,
        currency: "EUR".into(),
        lines,
        shipping_address: Address {
            name: "Test".into(),
            line1: "1 Road".into(),
            line2: None,
            city: "Town".into(),
            postal_code: "12345".into(),
            country: "DE".into(),
        },
        payment_token: payment_token.to_owned(),
        subtotal_minor: subtotal,
        shipping_minor: 0,
        tax_minor: 0,
        total_minor: subtotal,
    }
}

/// The next event's envelope of the order `envelope` belongs to, at `sequence` (0: an event
/// outside the order's timeline, like the inventory's per-line answers).
pub fn next_envelope(envelope: &Envelope, sequence: i64) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::new_v4().to_string(),
        causation_id: Some(envelope.event_id.clone()),
        sequence,
        occurred_at: envelope.occurred_at + sequence,
        ..envelope.clone()
    }
}

/// An order's timeline as a projection sees it, short: placed, validated, then confirmed
/// (`confirm`) or rejected — sequences 1 to 3.
pub fn short_timeline(placed: &OrderPlaced, confirm: bool) -> Vec<OrderEvent> {
    use orderflow_schemas::{OrderConfirmed, OrderRejected, OrderValidated, Reason};
    let e = &placed.envelope;
    let last = if confirm {
        OrderEvent::OrderConfirmed(OrderConfirmed {
            envelope: next_envelope(e, 3),
            total_minor: placed.total_minor,
            currency: placed.currency.clone(),
        })
    } else {
        OrderEvent::OrderRejected(OrderRejected {
            envelope: next_envelope(e, 3),
            stage: "validation".into(),
            reasons: vec![Reason {
                code: "test".into(),
                field: None,
                message: "rejected by the test".into(),
            }],
        })
    };
    vec![
        OrderEvent::OrderPlaced(placed.clone()),
        OrderEvent::OrderValidated(OrderValidated {
            envelope: next_envelope(e, 2),
            currency: placed.currency.clone(),
            total_minor: placed.total_minor,
        }),
        last,
    ]
}

/// A restock of `sku` entering from outside (for `inventory.commands`, keyed by SKU).
pub fn restocked(sku: &str, quantity: i32, at: i64) -> OrderEvent {
    let id = uuid::Uuid::new_v4().to_string();
    OrderEvent::InventoryRestocked(InventoryRestocked {
        envelope: envelope(id.clone(), id, String::new(), at),
        sku: sku.to_owned(),
        quantity,
        source: "test".into(),
    })
}

/// The wall clock in milliseconds, for event times of test inputs.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Everything read from `orders.events` so far.
#[derive(Default)]
pub struct Log {
    /// The first payload seen for each event id.
    pub bytes: HashMap<String, Vec<u8>>,
    /// Event ids seen again with different bytes: a conflicting second outcome.
    pub conflicts: Vec<String>,
    /// Distinct events by order id, then event id.
    pub by_order: HashMap<String, BTreeMap<String, OrderEvent>>,
    /// Ids of each order's final events (confirmed, rejected, cancelled).
    pub finals: HashMap<String, BTreeSet<String>>,
    /// Records read per event id, repeats included.
    pub copies: HashMap<String, usize>,
    /// Errors the consumer reported while reading.
    pub errors: Vec<String>,
}

impl Log {
    pub fn add(&mut self, codec: &Codec, payload: &[u8]) {
        let Ok(event) = codec.decode(payload) else {
            return;
        };
        let envelope = event.envelope().clone();
        *self.copies.entry(envelope.event_id.clone()).or_default() += 1;
        match self.bytes.get(&envelope.event_id) {
            Some(first) if first != payload => {
                // The first few in full, both versions, to show what differs.
                let detail = match codec.decode(first) {
                    Ok(earlier) if self.conflicts.len() < 3 => {
                        format!(": first {earlier:?}, then {event:?}")
                    }
                    _ => String::new(),
                };
                self.conflicts.push(format!(
                    "{} ({}){detail}",
                    envelope.event_id,
                    event.kind().name()
                ));
                return;
            }
            Some(_) => return,
            None => {
                self.bytes
                    .insert(envelope.event_id.clone(), payload.to_vec());
            }
        }
        if matches!(
            event,
            OrderEvent::OrderConfirmed(_)
                | OrderEvent::OrderRejected(_)
                | OrderEvent::OrderCancelled(_)
        ) {
            self.finals
                .entry(envelope.order_id.clone())
                .or_default()
                .insert(envelope.event_id.clone());
        }
        self.by_order
            .entry(envelope.order_id)
            .or_default()
            .insert(envelope.event_id, event);
    }

    /// The order's distinct event kinds with a sequence, in sequence order: its saga path.
    pub fn path(&self, order_id: &str) -> Vec<(i64, &'static str)> {
        let mut timeline: Vec<(i64, &'static str)> = self
            .by_order
            .get(order_id)
            .into_iter()
            .flat_map(|events| events.values())
            .filter(|e| e.envelope().sequence > 0)
            .map(|e| (e.envelope().sequence, e.kind().name()))
            .collect();
        timeline.sort();
        timeline
    }

    /// The kind of the order's final event, if it has exactly one so far.
    pub fn outcome(&self, order_id: &str) -> Option<&'static str> {
        let finals = self.finals.get(order_id)?;
        let [id] = finals.iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        Some(self.by_order[order_id][id].kind().name())
    }
}

/// Reads every partition of `orders.events` from the beginning (`read_committed`, no group).
pub struct LogReader {
    consumer: BaseConsumer,
    codec: Codec,
    pub log: Log,
}

impl LogReader {
    /// Reads what a `read_committed` consumer (every orderflow consumer) sees.
    pub fn new(settings: &Settings, bootstrap: &str) -> Self {
        Self::with_isolation(settings, bootstrap, "read_committed")
    }

    /// Reads every record ever written, open and aborted transactions' too: an auditor's view.
    /// On the brokers used here a processor may act on a record whose transaction is aborted
    /// later (docs/architecture.md), so the invariants must hold over everything, not only the committed.
    pub fn everything(settings: &Settings, bootstrap: &str) -> Self {
        Self::with_isolation(settings, bootstrap, "read_uncommitted")
    }

    /// [`LogReader::everything`] with small fetches (a few records per request): a second,
    /// differently chunked read of the same log, to tell a broker's fetch anomalies from
    /// records that are really missing.
    pub fn everything_in_small_fetches(settings: &Settings, bootstrap: &str) -> Self {
        Self::with_config(
            settings,
            bootstrap,
            "read_uncommitted",
            &[
                ("message.max.bytes", "4096"),
                ("fetch.max.bytes", "4096"),
                ("max.partition.fetch.bytes", "1024"),
            ],
        )
    }

    fn with_isolation(settings: &Settings, bootstrap: &str, isolation: &str) -> Self {
        Self::with_config(settings, bootstrap, isolation, &[])
    }

    fn with_config(
        settings: &Settings,
        bootstrap: &str,
        isolation: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let clients = KafkaClients::new(&settings.kafka, bootstrap);
        let mut config = clients.consumer(
            "log-reader",
            &format!("log-reader-{}", uuid::Uuid::new_v4()),
        );
        config.set("isolation.level", isolation);
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let consumer: BaseConsumer = config
            .create()
            .unwrap_or_else(|e| panic!("log reader: {e}"));
        let mut tpl = TopicPartitionList::new();
        for p in 0..6 {
            tpl.add_partition_offset(names::ORDERS_EVENTS, p, Offset::Beginning)
                .unwrap_or_else(|e| panic!("partition {p}: {e}"));
        }
        consumer
            .assign(&tpl)
            .unwrap_or_else(|e| panic!("assign: {e}"));
        Self {
            consumer,
            codec: Codec::new().unwrap_or_else(|e| panic!("codec: {e}")),
            log: Log::default(),
        }
    }

    /// Reads whatever arrives for `for_at_most`.
    pub fn poll_for(&mut self, for_at_most: Duration) {
        let until = Instant::now() + for_at_most;
        while Instant::now() < until {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(message)) => self
                    .log
                    .add(&self.codec, message.payload().unwrap_or_default()),
                Some(Err(e)) => self.log.errors.push(e.to_string()),
                None => {}
            }
        }
    }

    /// Per partition: the reader's position and the partition's high watermark (diagnostics:
    /// a reader behind the end has not seen everything yet).
    pub fn progress(&self) -> Vec<(i32, i64, i64)> {
        let position = self.consumer.position().ok();
        (0..6)
            .map(|p| {
                let at = position
                    .as_ref()
                    .and_then(|tpl| tpl.find_partition(names::ORDERS_EVENTS, p))
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(-1);
                let high = self
                    .consumer
                    .fetch_watermarks(names::ORDERS_EVENTS, p, Duration::from_secs(10))
                    .map(|(_, h)| h)
                    .unwrap_or(-1);
                (p, at, high)
            })
            .collect()
    }

    /// Reads until the reader's position is at the high watermark of every partition, failing
    /// the test after `timeout`. Only meaningful once nothing writes any more: then the log read
    /// is the whole log, not whatever arrived within some fixed time.
    pub fn poll_to_end(&mut self, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let progress = self.progress();
            // An empty partition (end 0) has nothing to read and no position to reach.
            if progress
                .iter()
                .all(|&(_, at, high)| high == 0 || (high > 0 && at >= high))
            {
                // Tansu's memory engine reports the high watermark after the first record of a
                // partition's last message set, so the position can pass it with the rest of
                // that set still queued in the client: take what is queued before returning.
                self.poll_for(Duration::from_millis(500));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} reading {what} to its end: \
                 (partition, read up to, end) {progress:?}"
            );
            self.poll_for(Duration::from_millis(300));
        }
    }

    /// Reads until `done` holds for the log, failing the test with `what` after `timeout`.
    pub fn poll_until(&mut self, timeout: Duration, what: &str, done: impl Fn(&Log) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.log) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            self.poll_for(Duration::from_millis(200));
        }
    }
}

/// Reads a dead-letter topic (one partition) until `expected` records arrived, failing the test
/// after 60 s; returns each record's headers.
pub fn read_dead_letters(
    settings: &Settings,
    bootstrap: &str,
    topic: &str,
    expected: usize,
) -> Vec<BTreeMap<String, String>> {
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let consumer: BaseConsumer = clients
        .consumer("test-dlq", &format!("test-dlq-{}", uuid::Uuid::new_v4()))
        .create()
        .unwrap_or_else(|e| panic!("dead-letter reader: {e}"));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap_or_else(|e| panic!("partition: {e}"));
    consumer
        .assign(&tpl)
        .unwrap_or_else(|e| panic!("assign: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut letters = Vec::new();
    while letters.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} dead letters on {topic}",
            letters.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.unwrap_or_else(|e| panic!("dead letter: {e}"));
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        letters.push(headers);
    }
    letters
}
