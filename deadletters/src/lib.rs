//! Dead letters: what the dead-letter topics hold, and what operators decide about it.
//!
//! A consumer that can never process a record (it does not decode, or a step calls it poison)
//! writes it unchanged to its dead-letter topic with the reason, the consumer and the source
//! topic, partition and offset in headers (`orderflow_platform::kafka::dead_letter_headers`),
//! and carries on. This module reads those topics and resolves their letters:
//!
//! - **redrive** puts the record back on its source topic, as it was or corrected (an event
//!   given as JSON, the way [`DeadLetter::event`] shows it), with the original key and headers,
//!   a new event id derived from the original (below) and a [`headers::REDRIVEN_FROM`] header
//!   naming the letter;
//! - **discard** parks it for good, with a note.
//!
//! Each decision is a record on [`names::DLQ_RESOLUTIONS`], keyed by the letter
//! (`TOPIC/PARTITION/OFFSET`); a letter without one is pending. A resolved letter is not
//! resolved again.
//!
//! **Nothing lost, nothing doubled.** A redrive writes the event, waits for its
//! acknowledgement, then writes the resolution. A crash between the two leaves the letter
//! pending and the event on its topic; redriving the letter again writes an event with the
//! same id, because the id depends only on the source record: the original event's id where it
//! decodes (`derived_event_id(original, "dlq/redrive")`), else the source topic, partition and
//! offset. Every orderflow consumer drops a repeat of an id it has seen (docs/architecture.md,
//! rule 1), so the second copy changes nothing. The same holds when one poisoned record was
//! dead-lettered by several consumers (the saga and the orders projection both read
//! `orders.events`) and each letter is redriven: one event id, applied once. A corrected
//! redrive of a letter that crashed half-way should carry the same correction; if it does not,
//! the first copy written is the one consumers keep. A discard writes only its resolution.
//!
//! **Sequenced letters** (`orderflow_processors::sequence`, docs/architecture.md): the letters
//! of a parked key form a chain (`dlq.chain`, `dlq.sequence`, `dlq.held`). They are resolved in
//! order: a letter with an unresolved one before it is refused ([`DeadLetterError::OutOfTurn`]).
//! A redrive goes to the partition the record came from, with the release headers; a discard
//! writes a release marker there (the key and release headers, no value), so the consumer
//! moves past the letter. After either, the held letters behind it are released — redriven as
//! they were, in order, up to the next letter that failed ([`DeadLetters::release_ready`], which
//! the admin listener also runs every few seconds). A release writes every event, then every
//! resolution: a crash between them releases the letters again later under the same event ids,
//! and the consumer holds the copies behind the chain and drops them as repeats.
//!
//! **Bounds.** A listing reads one dead-letter topic and the resolutions whole: both keep 30
//! days (topics/catalog.toml), and a listing holds at most [`MAX_LISTED`] letters, newest last,
//! saying how many it left out.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use orderflow_platform::kafka::{log_end, read_to_ends, KafkaClients, Reader};
use orderflow_schemas::{headers, ids::derived_event_id, Codec, EventKind, OrderEvent};
use orderflow_topics::names;
use rdkafka::{
    consumer::Consumer,
    error::KafkaError,
    message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders},
    producer::{
        future_producer::{Delivery, DeliveryFuture},
        FutureProducer, FutureRecord,
    },
    Offset, TopicPartitionList,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The most letters one listing returns (the newest).
pub const MAX_LISTED: usize = 10_000;

/// The role a redriven event's id is derived with.
const REDRIVE_ROLE: &str = "dlq/redrive";

/// The most held letters one release pass puts back per topic; the next pass goes on.
pub const MAX_RELEASED: usize = 1_000;

/// Who a release of held letters is recorded as made by.
pub const RELEASED_BY: &str = "orderflow (release behind a resolved letter)";

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(
        "{topic:?} is not a dead-letter topic; the dead-letter topics are: {}",
        names::DEAD_LETTER_TOPICS.join(", ")
    )]
    NotADeadLetterTopic { topic: String },
    #[error("{0:?} does not name a dead letter: expected PARTITION/OFFSET, e.g. 0/17")]
    BadLetter(String),
    #[error("{0} holds no record (its partition ends before that offset, or it expired)")]
    NoSuchLetter(LetterId),
    #[error("{letter} is already {}: {}", .resolution.action(), .resolution.summary())]
    AlreadyResolved {
        letter: LetterId,
        resolution: Box<Resolution>,
    },
    #[error("{letter} does not say where it came from (header {header} is missing or invalid)")]
    NoSource {
        letter: LetterId,
        header: &'static str,
    },
    #[error(
        "{letter}'s value does not decode ({reason}); redrive it with the corrected event: \
         `orderflow dlq show --json` writes the document to start from, with `event_type` and \
         `event` to fill in"
    )]
    NeedsCorrection { letter: LetterId, reason: String },
    #[error(
        "{letter} waits behind {first}, the first unresolved letter of its chain: resolve that \
         one first (the letters of a parked key are released in order)"
    )]
    OutOfTurn { letter: LetterId, first: LetterId },
    #[error("the corrected event: {0}")]
    BadCorrection(String),
    #[error("encoding the event: {0}")]
    Encode(#[from] orderflow_schemas::CodecError),
    #[error("{what}: {source}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error("{what} did not finish within {within:?}")]
    Timeout { what: String, within: Duration },
    #[error("a resolution does not serialise: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a blocking read was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

type Result<T, E = DeadLetterError> = std::result::Result<T, E>;

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> DeadLetterError {
    let what = what.into();
    move |source| DeadLetterError::Kafka { what, source }
}

/// Checks that `topic` is one of the dead-letter topics.
pub fn dead_letter_topic(topic: &str) -> Result<&'static str> {
    names::DEAD_LETTER_TOPICS
        .iter()
        .find(|t| **t == topic)
        .copied()
        .ok_or_else(|| DeadLetterError::NotADeadLetterTopic {
            topic: topic.to_owned(),
        })
}

/// One dead letter: a record of a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LetterId {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl LetterId {
    /// `PARTITION/OFFSET` of a dead-letter topic.
    pub fn parse(topic: &str, letter: &str) -> Result<Self> {
        let topic = dead_letter_topic(topic)?;
        let bad = || DeadLetterError::BadLetter(letter.to_owned());
        let (partition, offset) = letter.trim().split_once('/').ok_or_else(bad)?;
        let partition = i32::from_str(partition).map_err(|_| bad())?;
        let offset = i64::from_str(offset).map_err(|_| bad())?;
        if partition < 0 || offset < 0 {
            return Err(bad());
        }
        Ok(Self {
            topic: topic.to_owned(),
            partition,
            offset,
        })
    }
}

impl fmt::Display for LetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

impl Serialize for LetterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a dead letter was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What an operator decided about a letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Resolution {
    /// Put back on its source topic as the event `event_id`, at `topic`/`partition`/`offset`.
    Redriven {
        event_id: String,
        topic: String,
        partition: i32,
        offset: i64,
        corrected: bool,
        by: String,
        at_ms: i64,
    },
    /// Parked for good.
    Discarded {
        note: String,
        by: String,
        at_ms: i64,
    },
}

impl Resolution {
    pub fn action(&self) -> &'static str {
        match self {
            Self::Redriven { .. } => "redriven",
            Self::Discarded { .. } => "discarded",
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        match self {
            Self::Redriven {
                event_id,
                topic,
                partition,
                offset,
                corrected,
                by,
                ..
            } => format!(
                "by {by}{} as event {event_id} at {topic}/{partition}/{offset}",
                if *corrected { ", corrected," } else { "" }
            ),
            Self::Discarded { note, by, .. } => format!("by {by}: {note}"),
        }
    }
}

/// One dead-letter topic at a glance ([`DeadLetters::summaries`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSummary {
    pub topic: &'static str,
    pub pending: usize,
    pub resolved: usize,
    /// Letters past [`MAX_LISTED`], not read.
    pub older_not_read: usize,
    /// When the oldest pending letter was parked, ms since the epoch.
    #[serde(skip)]
    pub oldest_pending_ms: Option<i64>,
}

/// A dead letter as read from its topic, with its resolution if it has one.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub letter: LetterId,
    /// When the consumer gave up on it (the dead letter's timestamp), ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub reason: Option<String>,
    /// The processor or projection that gave up on it.
    pub consumer: Option<String>,
    pub source: Option<Source>,
    /// A sequenced letter's chain (the source position of the record that parked its key) and
    /// place in it; `None` for a letter of a consumer that does not sequence.
    pub chain: Option<String>,
    pub sequence: Option<u64>,
    /// Held only because its key was parked behind an earlier letter of its chain: released
    /// (redriven as it is) once every earlier letter is resolved.
    pub held: bool,
    /// The key, as text (lossy where it is not UTF-8).
    pub key: Option<String>,
    /// Every header but the `dlq.` ones above, as text.
    pub headers: BTreeMap<String, String>,
    /// The event's kind and fields where the value decodes, else why it does not.
    pub event_type: Option<String>,
    pub event: Option<serde_json::Value>,
    pub undecodable: Option<String>,
    pub value_len: usize,
    /// The first 64 bytes of a value that does not decode, in hex.
    pub value_prefix_hex: Option<String>,
    pub resolution: Option<Resolution>,
    #[serde(skip)]
    raw: Raw,
}

#[derive(Debug, Clone, Default)]
struct Raw {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    decoded: Option<OrderEvent>,
}

impl DeadLetter {
    pub fn is_pending(&self) -> bool {
        self.resolution.is_none()
    }

    /// Where the letter was read from; an error naming the header when it does not say.
    fn source_or_err(&self) -> Result<Source> {
        self.source
            .clone()
            .ok_or_else(|| DeadLetterError::NoSource {
                letter: self.letter.clone(),
                header: headers::DLQ_SOURCE_TOPIC,
            })
    }

    fn from_message(message: &BorrowedMessage<'_>, codec: &Codec) -> Self {
        let letter = LetterId {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let mut raw = Raw {
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            ..Raw::default()
        };
        let mut text = BTreeMap::new();
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                raw.headers
                    .push((h.key.to_owned(), h.value.map(<[u8]>::to_vec)));
                text.insert(
                    h.key.to_owned(),
                    h.value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        let mut take = |name: &str| text.remove(name);
        let reason = take(headers::DLQ_REASON);
        let consumer = take(headers::DLQ_CONSUMER);
        let source_topic = take(headers::DLQ_SOURCE_TOPIC);
        let source_partition = take(headers::DLQ_SOURCE_PARTITION).and_then(|p| p.parse().ok());
        let source_offset = take(headers::DLQ_SOURCE_OFFSET).and_then(|o| o.parse().ok());
        let chain = take(headers::DLQ_CHAIN);
        let sequence = take(headers::DLQ_SEQUENCE).and_then(|n| n.parse().ok());
        let held = take(headers::DLQ_HELD).is_some_and(|h| h == "true");
        let source = match (source_topic, source_partition, source_offset) {
            (Some(topic), Some(partition), Some(offset)) => Some(Source {
                topic,
                partition,
                offset,
            }),
            _ => None,
        };
        let value = raw.value.as_deref().unwrap_or_default();
        let (event_type, event, undecodable) = match codec.decode(value) {
            Ok(decoded) => {
                let json = decoded.to_json().ok();
                let kind = decoded.kind().name().to_owned();
                raw.decoded = Some(decoded);
                (Some(kind), json, None)
            }
            Err(e) => (None, None, Some(e.to_string())),
        };
        let value_prefix_hex = undecodable.as_ref().map(|_| {
            value
                .iter()
                .take(64)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        Self {
            letter,
            timestamp_ms: message.timestamp().to_millis(),
            reason,
            consumer,
            source,
            chain,
            sequence,
            held,
            key: raw
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: text,
            event_type,
            event,
            undecodable,
            value_len: value.len(),
            value_prefix_hex,
            resolution: None,
            raw,
        }
    }
}

/// A corrected event for a redrive: its kind and its fields, as [`DeadLetter::event_type`] and
/// [`DeadLetter::event`] show them.
#[derive(Debug, Clone)]
pub struct Correction {
    event: OrderEvent,
}

impl Correction {
    /// From a JSON document with `event_type` and `event` (e.g. `orderflow dlq show --json`,
    /// edited); other fields are ignored. The error names what is missing or wrong.
    pub fn from_json(document: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| DeadLetterError::BadCorrection(m);
        let kind_name = document
            .get("event_type")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad("field `event_type` is missing or not a string".into()))?;
        let kind = EventKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == kind_name)
            .ok_or_else(|| {
                bad(format!(
                    "event_type {kind_name:?} is not an orderflow event"
                ))
            })?;
        let fields = document
            .get("event")
            .filter(|e| e.is_object())
            .ok_or_else(|| bad("field `event` is missing or not an object".into()))?;
        let event = OrderEvent::from_json(kind, fields.clone())
            .map_err(|e| bad(format!("`event` is not a valid {kind_name}: {e}")))?;
        Ok(Self { event })
    }
}

/// Reads and resolves dead letters on one cluster.
#[derive(Clone)]
pub struct DeadLetters {
    clients: KafkaClients,
    codec: Arc<Codec>,
    timeout: Duration,
}

impl DeadLetters {
    /// `timeout` bounds each read of a topic and each acknowledgement.
    pub fn new(clients: KafkaClients, codec: Arc<Codec>, timeout: Duration) -> Self {
        Self {
            clients,
            codec,
            timeout,
        }
    }

    /// Every letter of `topic` (at most [`MAX_LISTED`]: on a one-partition topic the newest),
    /// each with its resolution, in partition and offset order; and how many were left out.
    pub async fn list(&self, topic: &str) -> Result<(Vec<DeadLetter>, usize)> {
        let topic = dead_letter_topic(topic)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.list_blocking(topic)).await?
    }

    /// Each dead-letter topic's pending and resolved letters and its oldest pending one, reading
    /// the resolutions once: what `orderflow dlq list`, `GET /v1/dead-letters` and the census
    /// behind the gauges show.
    pub async fn summaries(&self) -> Result<Vec<TopicSummary>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let reader = this.reader()?;
            let resolutions = this.resolutions(&reader)?;
            names::DEAD_LETTER_TOPICS
                .iter()
                .map(|topic| {
                    let (letters, older_not_read) =
                        this.letters_blocking(&reader, topic, &resolutions)?;
                    let pending: Vec<&DeadLetter> =
                        letters.iter().filter(|l| l.is_pending()).collect();
                    Ok(TopicSummary {
                        topic,
                        pending: pending.len(),
                        resolved: letters.len() - pending.len(),
                        older_not_read,
                        oldest_pending_ms: pending.iter().filter_map(|l| l.timestamp_ms).min(),
                    })
                })
                .collect()
        })
        .await?
    }

    /// One letter, with its resolution.
    pub async fn get(&self, letter: &LetterId) -> Result<DeadLetter> {
        let this = self.clone();
        let letter = letter.clone();
        tokio::task::spawn_blocking(move || this.get_blocking(&letter)).await?
    }

    /// Puts `letter` back on its source topic (see the module's documentation), as it was or
    /// as `correction`; returns the resolution recorded. A sequenced letter must be its chain's
    /// first unresolved one; the held letters behind it are released after it.
    pub async fn redrive(
        &self,
        letter: &LetterId,
        correction: Option<Correction>,
        by: &str,
    ) -> Result<Resolution> {
        let dead = self.unresolved(letter).await?;
        self.in_turn(&dead).await?;
        let redrive = Redrive::of(&dead, correction, &self.codec)?;
        let producer = self.producer()?;
        let delivery = self.write(&producer, &redrive.record()).await?;
        let resolution = redrive.resolution(delivery, by);
        self.record(&producer, letter, &resolution).await?;
        self.release_behind(&dead).await;
        Ok(resolution)
    }

    /// Parks `letter` for good with `note`; returns the resolution recorded. A sequenced letter
    /// must be its chain's first unresolved one: a release marker tells its consumer to move
    /// past it, and the held letters behind it are released after it.
    pub async fn discard(&self, letter: &LetterId, note: &str, by: &str) -> Result<Resolution> {
        let dead = self.unresolved(letter).await?;
        self.in_turn(&dead).await?;
        let producer = self.producer()?;
        if let Some(marker) = release_marker(&dead)? {
            self.write(&producer, &marker).await?;
        }
        let resolution = Resolution::Discarded {
            note: note.to_owned(),
            by: by.to_owned(),
            at_ms: now_ms(),
        };
        self.record(&producer, letter, &resolution).await?;
        self.release_behind(&dead).await;
        Ok(resolution)
    }

    /// Releases, on every dead-letter topic whose consumer parks keys
    /// ([`names::SEQUENCED_DEAD_LETTER_TOPICS`]), the held letters whose chains' earlier
    /// letters are all resolved — at most [`MAX_RELEASED`] per topic and call; returns how
    /// many. The admin listener runs it every few seconds, so records held after an operator's
    /// resolution (a hot key keeps sending) follow by themselves.
    pub async fn release_ready(&self) -> Result<usize> {
        let mut released = 0;
        for topic in names::SEQUENCED_DEAD_LETTER_TOPICS {
            released += self.release_in(topic).await?;
        }
        Ok(released)
    }

    /// [`DeadLetters::release_ready`] on one topic.
    pub async fn release_in(&self, topic: &str) -> Result<usize> {
        let topic = dead_letter_topic(topic)?;
        let this = self.clone();
        let ready = tokio::task::spawn_blocking(move || this.ready_blocking(topic)).await??;
        if ready.is_empty() {
            return Ok(0);
        }
        let producer = self.producer()?;
        let mut redrives = Vec::new();
        for dead in &ready {
            redrives.push(Redrive::of(dead, None, &self.codec)?);
        }
        // In chain order on one idempotent producer: each source partition gets them in that
        // order. Every event first, then every resolution: a crash between the two leaves the
        // letters pending, and the next release writes them again with the same event ids
        // (their consumer holds the copies behind the chain and drops them when they come
        // through, rule 2).
        let mut deliveries = Vec::new();
        for redrive in &redrives {
            deliveries.push(self.send(&producer, &redrive.record())?);
        }
        let mut resolutions = Vec::new();
        for (redrive, delivery) in redrives.iter().zip(deliveries) {
            let delivery = self.acked(delivery, &redrive.topic).await?;
            resolutions.push(redrive.resolution(delivery, RELEASED_BY));
        }
        for (dead, resolution) in ready.iter().zip(&resolutions) {
            self.record(&producer, &dead.letter, resolution).await?;
        }
        tracing::info!(
            topic,
            released = ready.len(),
            "Released held dead letters whose earlier letters were resolved."
        );
        Ok(ready.len())
    }

    /// Releases what became ready behind `dead`'s chain; a failure is logged (the census
    /// releases it later).
    async fn release_behind(&self, dead: &DeadLetter) {
        if dead.chain.is_none() {
            return;
        }
        if let Err(e) = self.release_in(&dead.letter.topic).await {
            tracing::warn!(letter = %dead.letter, error = %e, "Releasing the letters held behind a resolved one failed; the dead-letter census retries.");
        }
    }

    /// Refuses a sequenced letter with an unresolved letter before it in its chain.
    async fn in_turn(&self, dead: &DeadLetter) -> Result<()> {
        let (Some(chain), Some(sequence)) = (&dead.chain, dead.sequence) else {
            return Ok(());
        };
        let topic = dead_letter_topic(&dead.letter.topic)?;
        let this = self.clone();
        let chains = tokio::task::spawn_blocking(move || {
            let reader = this.reader()?;
            let resolutions = this.resolutions(&reader)?;
            this.chains_blocking(&reader, topic, &resolutions)
        })
        .await??;
        let first = chains
            .get(chain)
            .and_then(|c| c.first_unresolved())
            .filter(|(n, _)| *n < sequence);
        match first {
            Some((_, first)) => Err(DeadLetterError::OutOfTurn {
                letter: dead.letter.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    fn producer(&self) -> Result<FutureProducer> {
        self.clients
            .idempotent_producer("dlq")
            .set("message.timeout.ms", self.timeout.as_millis().to_string())
            .create()
            .map_err(kafka("creating the dead letters' producer"))
    }

    fn send(&self, producer: &FutureProducer, record: &OutRecord) -> Result<DeliveryFuture> {
        let mut out = FutureRecord::to(&record.topic)
            .partition(record.partition)
            .headers(record.headers.clone());
        if let Some(key) = record.key.as_deref() {
            out = out.key(key);
        }
        if let Some(value) = record.value.as_deref() {
            out = out.payload(value);
        }
        producer
            .send_result(out)
            .map_err(|(e, _)| e)
            .map_err(kafka(format!("writing to {}", record.topic)))
    }

    async fn acked(&self, delivery: DeliveryFuture, topic: &str) -> Result<Delivery> {
        let within = self.timeout;
        match tokio::time::timeout(within, delivery).await {
            Err(_) => Err(DeadLetterError::Timeout {
                what: format!("the acknowledgement of a write to {topic}"),
                within,
            }),
            Ok(Err(_)) => Err(DeadLetterError::Timeout {
                what: format!("the acknowledgement of a write to {topic} (producer gone)"),
                within,
            }),
            Ok(Ok(Err((e, _)))) => Err(kafka(format!("writing to {topic}"))(e)),
            Ok(Ok(Ok(delivery))) => Ok(delivery),
        }
    }

    async fn write(&self, producer: &FutureProducer, record: &OutRecord) -> Result<Delivery> {
        let delivery = self.send(producer, record)?;
        self.acked(delivery, &record.topic).await
    }

    async fn unresolved(&self, letter: &LetterId) -> Result<DeadLetter> {
        let dead = self.get(letter).await?;
        if let Some(resolution) = dead.resolution.clone() {
            return Err(DeadLetterError::AlreadyResolved {
                letter: letter.clone(),
                resolution: Box::new(resolution),
            });
        }
        Ok(dead)
    }

    async fn record(
        &self,
        producer: &FutureProducer,
        letter: &LetterId,
        resolution: &Resolution,
    ) -> Result<()> {
        let key = letter.to_string();
        let value = serde_json::to_vec(resolution)?;
        producer
            .send(
                FutureRecord::to(names::DLQ_RESOLUTIONS)
                    .key(&key)
                    .payload(&value),
                self.timeout,
            )
            .await
            .map_err(|(e, _)| e)
            .map_err(kafka(format!(
                "recording the resolution of {letter} on {}",
                names::DLQ_RESOLUTIONS
            )))?;
        Ok(())
    }

    fn reader(&self) -> Result<Reader> {
        self.clients
            .open_reader("dlq")
            .map_err(kafka("creating a reader"))
    }

    /// The partitions of `topic` with where reading starts and ends.
    fn bounds(&self, reader: &Reader, topic: &str) -> Result<Vec<(i32, i64, i64)>> {
        let metadata = reader
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(kafka(format!("reading the metadata of {topic}")))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut out = Vec::new();
        for partition in partitions {
            let (low, end) = log_end(reader, topic, partition, self.timeout)
                .map_err(kafka(format!("reading the end of {topic}/{partition}")))?;
            out.push((partition, low, end));
        }
        Ok(out)
    }

    /// Reads `topic` from `starts` to the partitions' ends, calling `f` with each record.
    fn read(
        &self,
        reader: &Reader,
        topic: &str,
        bounds: &[(i32, i64, i64)],
        mut f: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for (partition, start, end) in bounds {
            if start < end {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*start))
                    .map_err(kafka(format!("assigning {topic}/{partition}")))?;
                ends.insert(*partition, *end);
            }
        }
        if ends.is_empty() {
            return Ok(());
        }
        reader
            .assign(&tpl)
            .map_err(kafka(format!("assigning {topic}")))?;
        let done = read_to_ends(reader, topic, &ends, self.timeout, &mut f)
            .map_err(kafka(format!("reading {topic}")))?;
        reader
            .unassign()
            .map_err(kafka(format!("unassigning {topic}")))?;
        if done {
            Ok(())
        } else {
            Err(DeadLetterError::Timeout {
                what: format!("reading {topic} to its end"),
                within: self.timeout,
            })
        }
    }

    /// Every resolution recorded, the first per letter (a letter is resolved once; a second
    /// record can only come from a race of two operators, and the first one is what happened
    /// first).
    fn resolutions(&self, reader: &Reader) -> Result<HashMap<String, Resolution>> {
        let bounds = self.bounds(reader, names::DLQ_RESOLUTIONS)?;
        let mut out = HashMap::new();
        self.read(reader, names::DLQ_RESOLUTIONS, &bounds, |message| {
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let value = message
                .payload()
                .and_then(|v| serde_json::from_slice::<Resolution>(v).ok());
            if let (Some(key), Some(value)) = (key, value) {
                out.entry(key).or_insert(value);
            }
        })?;
        Ok(out)
    }

    /// The chains of sequenced letters on `topic`, read whole (only their places, about 100
    /// bytes a letter: the topic's retention bounds them).
    fn chains_blocking(
        &self,
        reader: &Reader,
        topic: &str,
        resolutions: &HashMap<String, Resolution>,
    ) -> Result<BTreeMap<String, Chain>> {
        let bounds = self.bounds(reader, topic)?;
        let mut chains: BTreeMap<String, Chain> = BTreeMap::new();
        self.read(reader, topic, &bounds, |message| {
            let header = |name: &str| -> Option<String> {
                message
                    .headers()?
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let (Some(chain), Some(sequence)) = (
                header(headers::DLQ_CHAIN),
                header(headers::DLQ_SEQUENCE).and_then(|n| n.parse::<u64>().ok()),
            ) else {
                return;
            };
            let letter = LetterId {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            };
            let resolved = resolutions.contains_key(&letter.to_string());
            chains.entry(chain).or_default().add(
                sequence,
                ChainLetter {
                    letter,
                    held: header(headers::DLQ_HELD).is_some_and(|h| h == "true"),
                    resolved,
                },
            );
        })?;
        Ok(chains)
    }

    /// The held letters of `topic` ready for release, in chain order (at most
    /// [`MAX_RELEASED`]).
    fn ready_blocking(&self, topic: &str) -> Result<Vec<DeadLetter>> {
        let reader = self.reader()?;
        let resolutions = self.resolutions(&reader)?;
        let chains = self.chains_blocking(&reader, topic, &resolutions)?;
        let order: Vec<LetterId> = chains
            .values()
            .flat_map(Chain::ready)
            .take(MAX_RELEASED)
            .collect();
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for letter in &order {
            let range = ranges
                .entry(letter.partition)
                .or_insert((letter.offset, letter.offset + 1));
            range.0 = range.0.min(letter.offset);
            range.1 = range.1.max(letter.offset + 1);
        }
        let wanted: std::collections::HashSet<&LetterId> = order.iter().collect();
        let bounds: Vec<(i32, i64, i64)> =
            ranges.into_iter().map(|(p, (a, b))| (p, a, b)).collect();
        let mut found: HashMap<LetterId, DeadLetter> = HashMap::new();
        self.read(&reader, topic, &bounds, |message| {
            let dead = DeadLetter::from_message(message, &self.codec);
            if wanted.contains(&dead.letter) {
                found.insert(dead.letter.clone(), dead);
            }
        })?;
        // A letter that expired between the two reads is left for the next pass.
        Ok(order.iter().map_while(|l| found.remove(l)).collect())
    }

    fn list_blocking(&self, topic: &str) -> Result<(Vec<DeadLetter>, usize)> {
        let reader = self.reader()?;
        let resolutions = self.resolutions(&reader)?;
        self.letters_blocking(&reader, topic, &resolutions)
    }

    /// The letters of `topic` with their resolutions (see [`DeadLetters::list`]).
    fn letters_blocking(
        &self,
        reader: &Reader,
        topic: &str,
        resolutions: &HashMap<String, Resolution>,
    ) -> Result<(Vec<DeadLetter>, usize)> {
        let mut bounds = self.bounds(reader, topic)?;
        // At most MAX_LISTED: the rest are left out from the start of the lowest partitions
        // (the dead-letter topics have one partition, where those are the oldest).
        let total: i64 = bounds.iter().map(|(_, low, end)| end - low).sum();
        let mut skip = (total - MAX_LISTED as i64).max(0);
        let left_out = skip as usize;
        for (_, low, end) in &mut bounds {
            let here = skip.min(*end - *low);
            *low += here;
            skip -= here;
        }
        let mut letters = Vec::new();
        self.read(reader, topic, &bounds, |message| {
            letters.push(DeadLetter::from_message(message, &self.codec));
        })?;
        for letter in &mut letters {
            letter.resolution = resolutions.get(&letter.letter.to_string()).cloned();
        }
        // A sequenced letter written twice (its consumer re-ran a batch after a crash) is one
        // letter: a copy is resolved with the first copy resolved.
        let mut by_place: HashMap<(String, u64), Resolution> = HashMap::new();
        for letter in &letters {
            if let (Some(chain), Some(n), Some(r)) =
                (&letter.chain, letter.sequence, &letter.resolution)
            {
                by_place
                    .entry((chain.clone(), n))
                    .or_insert_with(|| r.clone());
            }
        }
        for letter in &mut letters {
            if let (None, Some(chain), Some(n)) =
                (&letter.resolution, &letter.chain, letter.sequence)
            {
                letter.resolution = by_place.get(&(chain.clone(), n)).cloned();
            }
        }
        letters.sort_by(|a, b| a.letter.cmp(&b.letter));
        Ok((letters, left_out))
    }

    fn get_blocking(&self, letter: &LetterId) -> Result<DeadLetter> {
        let reader = self.reader()?;
        // A partition the topic does not have holds no letter (not a broker error).
        let bounds = self.bounds(&reader, &letter.topic)?;
        let holds = bounds.iter().any(|(partition, low, end)| {
            *partition == letter.partition && (*low..*end).contains(&letter.offset)
        });
        if !holds {
            return Err(DeadLetterError::NoSuchLetter(letter.clone()));
        }
        let mut found = None;
        self.read(
            &reader,
            &letter.topic,
            &[(letter.partition, letter.offset, letter.offset + 1)],
            |message| {
                if message.offset() == letter.offset {
                    found = Some(DeadLetter::from_message(message, &self.codec));
                }
            },
        )?;
        let mut dead = found.ok_or_else(|| DeadLetterError::NoSuchLetter(letter.clone()))?;
        dead.resolution = self.resolutions(&reader)?.remove(&letter.to_string());
        Ok(dead)
    }
}

/// A record to write: a redriven event or a release marker.
struct OutRecord {
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

fn release_headers(out: OwnedHeaders, chain: &str, sequence: u64) -> OwnedHeaders {
    let sequence = sequence.to_string();
    out.insert(Header {
        key: headers::RELEASE_CHAIN,
        value: Some(chain),
    })
    .insert(Header {
        key: headers::RELEASE_SEQUENCE,
        value: Some(&sequence),
    })
}

/// A letter's event, ready to go back on its source topic.
struct Redrive {
    event_id: Uuid,
    corrected: bool,
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: OwnedHeaders,
}

impl Redrive {
    /// The event `dead` puts back (as it was or as `correction`), to the partition it was read
    /// from — where its consumer keeps its key's state — with the source's headers minus the
    /// dead letter's own, the event's kind (a correction may change it), the letter it came
    /// from and, for a sequenced letter, its release.
    fn of(dead: &DeadLetter, correction: Option<Correction>, codec: &Codec) -> Result<Self> {
        let letter = &dead.letter;
        let source = dead.source_or_err()?;
        let corrected = correction.is_some();
        let mut event = match (correction, &dead.raw.decoded) {
            (Some(c), _) => c.event,
            (None, Some(decoded)) => decoded.clone(),
            (None, None) => {
                return Err(DeadLetterError::NeedsCorrection {
                    letter: letter.clone(),
                    reason: dead.undecodable.clone().unwrap_or_default(),
                })
            }
        };
        let original_id = dead
            .raw
            .decoded
            .as_ref()
            .map(|e| e.envelope().event_id.clone());
        let event_id = redrive_event_id(original_id.as_deref(), &source);
        event.envelope_mut().event_id = event_id.to_string();
        let value = codec.encode(&event)?;

        let kind = event.kind().name();
        let from = letter.to_string();
        let mut out = OwnedHeaders::new();
        for (key, value) in &dead.raw.headers {
            if key.starts_with("dlq.")
                || [
                    headers::EVENT_TYPE,
                    headers::REDRIVEN_FROM,
                    headers::RELEASE_CHAIN,
                    headers::RELEASE_SEQUENCE,
                ]
                .contains(&key.as_str())
            {
                continue;
            }
            out = out.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        out = out
            .insert(Header {
                key: headers::EVENT_TYPE,
                value: Some(kind),
            })
            .insert(Header {
                key: headers::REDRIVEN_FROM,
                value: Some(&from),
            });
        if let (Some(chain), Some(sequence)) = (&dead.chain, dead.sequence) {
            out = release_headers(out, chain, sequence);
        }
        Ok(Self {
            event_id,
            corrected,
            topic: source.topic,
            partition: source.partition,
            key: dead.raw.key.clone(),
            value,
            headers: out,
        })
    }

    fn record(&self) -> OutRecord {
        OutRecord {
            topic: self.topic.clone(),
            partition: self.partition,
            key: self.key.clone(),
            value: Some(self.value.clone()),
            headers: self.headers.clone(),
        }
    }

    fn resolution(&self, delivery: Delivery, by: &str) -> Resolution {
        Resolution::Redriven {
            event_id: self.event_id.to_string(),
            topic: self.topic.clone(),
            partition: delivery.partition,
            offset: delivery.offset,
            corrected: self.corrected,
            by: by.to_owned(),
            at_ms: now_ms(),
        }
    }
}

/// The release marker a discard of a sequenced letter writes to its source partition: its
/// key and release headers, no value. `None` for a letter that is not sequenced.
fn release_marker(dead: &DeadLetter) -> Result<Option<OutRecord>> {
    let (Some(chain), Some(sequence)) = (&dead.chain, dead.sequence) else {
        return Ok(None);
    };
    let source = dead.source_or_err()?;
    Ok(Some(OutRecord {
        topic: source.topic,
        partition: source.partition,
        key: dead.raw.key.clone(),
        value: None,
        headers: release_headers(OwnedHeaders::new(), chain, sequence),
    }))
}

/// One letter of a chain, as [`DeadLetters::chains_blocking`] reads it.
#[derive(Debug, Clone)]
struct ChainLetter {
    letter: LetterId,
    held: bool,
    resolved: bool,
}

/// The letters of one chain by place; a place written twice (a consumer's re-run after a
/// crash) has two copies, and is resolved when either is.
#[derive(Debug, Default)]
struct Chain {
    places: BTreeMap<u64, Vec<ChainLetter>>,
}

impl Chain {
    fn add(&mut self, sequence: u64, letter: ChainLetter) {
        self.places.entry(sequence).or_default().push(letter);
    }

    fn resolved(copies: &[ChainLetter]) -> bool {
        copies.iter().any(|c| c.resolved)
    }

    /// The first place none of whose copies is resolved, with its first copy.
    fn first_unresolved(&self) -> Option<(u64, &LetterId)> {
        self.places
            .iter()
            .find(|(_, copies)| !Self::resolved(copies))
            .and_then(|(n, copies)| copies.first().map(|c| (*n, &c.letter)))
    }

    /// The held letters to release now, in order: from the first unresolved place on, while
    /// places are held (a failed letter waits for an operator; a missing place — its letter
    /// expired — stops the chain, whose consumer waits for that release).
    fn ready(&self) -> Vec<LetterId> {
        let mut out = Vec::new();
        for (expected, (n, copies)) in self.places.iter().enumerate() {
            if *n != expected as u64 {
                break;
            }
            if Self::resolved(copies) {
                continue;
            }
            match copies.first() {
                Some(first) if first.held => out.push(first.letter.clone()),
                _ => break,
            }
        }
        out
    }
}

/// The id of the event a redrive of the record at `source` writes: derived from the original
/// event's id where it has one, else from the source record's position. Either way it is the
/// same for every redrive of that record, from any of its letters.
pub fn redrive_event_id(original: Option<&str>, source: &Source) -> Uuid {
    let cause = original
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| {
            derived_event_id(
                Uuid::nil(),
                &format!(
                    "record/{}/{}/{}",
                    source.topic, source.partition, source.offset
                ),
            )
        });
    derived_event_id(cause, REDRIVE_ROLE)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_parse_and_name_what_is_wrong() {
        let letter = LetterId::parse(names::SAGA_DLQ, "2/17").expect("parses");
        assert_eq!(letter.to_string(), "orderflow.saga.dlq/2/17");
        let err = LetterId::parse("orders.events", "0/1").expect_err("not a dlq");
        assert!(err.to_string().contains("orderflow.saga.dlq"), "{err}");
        for bad in ["17", "a/1", "0/-1", "0/1/2", ""] {
            let err = LetterId::parse(names::SAGA_DLQ, bad).expect_err(bad);
            assert!(err.to_string().contains("PARTITION/OFFSET"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_redrive_id_is_the_same_for_every_letter_of_one_record_and_differs_from_the_original() {
        let source = Source {
            topic: "orders.events".into(),
            partition: 3,
            offset: 40,
        };
        let original = Uuid::from_u128(7).to_string();
        let id = redrive_event_id(Some(&original), &source);
        assert_eq!(id, redrive_event_id(Some(&original), &source));
        assert_ne!(id.to_string(), original);
        // Without a decodable original: the record's position decides.
        let by_position = redrive_event_id(None, &source);
        assert_eq!(by_position, redrive_event_id(Some("not-a-uuid"), &source));
        let elsewhere = Source {
            offset: 41,
            ..source.clone()
        };
        assert_ne!(by_position, redrive_event_id(None, &elsewhere));
    }

    #[test]
    fn corrections_name_what_is_missing() {
        let err = Correction::from_json(&serde_json::json!({"event": {}})).expect_err("no kind");
        assert!(err.to_string().contains("event_type"), "{err}");
        let err = Correction::from_json(&serde_json::json!({"event_type": "Nope", "event": {}}))
            .expect_err("unknown kind");
        assert!(err.to_string().contains("\"Nope\""), "{err}");
        let err =
            Correction::from_json(&serde_json::json!({"event_type": "OrderPlaced", "event": {}}))
                .expect_err("no fields");
        assert!(
            err.to_string().contains("missing field `envelope`"),
            "{err}"
        );
    }

    fn chain(places: &[(u64, bool, bool)]) -> Chain {
        let mut chain = Chain::default();
        for (i, (n, held, resolved)) in places.iter().enumerate() {
            chain.add(
                *n,
                ChainLetter {
                    letter: LetterId {
                        topic: names::SAGA_DLQ.into(),
                        partition: 0,
                        offset: i as i64,
                    },
                    held: *held,
                    resolved: *resolved,
                },
            );
        }
        chain
    }

    fn offsets(letters: &[LetterId]) -> Vec<i64> {
        letters.iter().map(|l| l.offset).collect()
    }

    #[test]
    fn a_chain_releases_its_held_letters_in_order_up_to_the_next_failed_one() {
        // 0 failed and pending: nothing moves; the operator must resolve it first.
        let waiting = chain(&[(0, false, false), (1, true, false), (2, true, false)]);
        assert!(waiting.ready().is_empty());
        assert_eq!(waiting.first_unresolved().map(|(n, _)| n), Some(0));
        // 0 resolved: 1 and 2 go, and stop at 3, a released record that failed again.
        let resolved = chain(&[
            (0, false, true),
            (1, true, false),
            (2, true, false),
            (3, false, false),
            (4, true, false),
        ]);
        assert_eq!(offsets(&resolved.ready()), [1, 2]);
        assert_eq!(resolved.first_unresolved().map(|(n, _)| n), Some(1));
        // A place written twice (a re-run) is released once, and resolved by either copy.
        let copies = chain(&[(0, false, true), (1, true, false), (1, true, false)]);
        assert_eq!(offsets(&copies.ready()), [1]);
        let copies = chain(&[(0, false, true), (1, true, false), (1, true, true)]);
        assert!(copies.ready().is_empty());
        assert_eq!(copies.first_unresolved(), None);
        // A chain whose first letters expired waits (its consumer waits for those releases).
        let expired = chain(&[(2, true, false), (3, true, false)]);
        assert!(expired.ready().is_empty());
    }

    #[test]
    fn resolutions_round_trip_as_tagged_json() {
        let resolution = Resolution::Discarded {
            note: "test order".into(),
            by: "ops".into(),
            at_ms: 1,
        };
        let json = serde_json::to_value(&resolution).expect("json");
        assert_eq!(json["action"], "discarded");
        assert_eq!(
            serde_json::from_value::<Resolution>(json).expect("back"),
            resolution
        );
    }
}
