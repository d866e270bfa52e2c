//! Shadow runs of the saga, a canary for processors: `orderflow process --shadow NAME` runs a
//! candidate build or configuration of the saga on the live input under its own consumer
//! group, writing to `NAME.`-prefixed topics (`orderflow_processors::shadow_saga`), and
//! `orderflow shadow diff NAME` compares its timeline with the live saga's, event id by event
//! id. Every output id is derived from its input and role, so the same decision has the same id
//! and the same bytes; a difference is a decision the candidate would make differently.
//!
//! Bound: `shadow diff` holds the saga's timeline events of both topics in memory (id, order id
//! and payload, a few hundred bytes each): about 2 × 8 events per order of the retained log. A
//! shadow is a canary run over days, not the whole history: delete its topics after each run.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use orderflow_platform::{
    kafka::{read_to_ends, KafkaClients},
    Settings,
};
use orderflow_processors::saga::TIMELINE_KINDS;
use orderflow_schemas::Codec;
use orderflow_topics::{
    apply::{apply, Provisioner},
    names, Catalog,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    Offset, TopicPartitionList,
};

/// Creates the shadow's topics if missing (declared like the topics they shadow).
pub async fn create_topics(settings: &Settings, name: &str) -> Result<()> {
    names::check_shadow_name(name).map_err(anyhow::Error::msg)?;
    let clients = KafkaClients::new(&settings.kafka, &settings.kafka.brokers);
    let catalog = Catalog::load()?.for_shadow(name);
    let report = apply(&catalog, &clients, Provisioner::Admin)
        .await
        .with_context(|| format!("creating the topics of shadow {name}"))?;
    if report.has_drift() {
        eprint!("warning: shadow topics differ from the catalog:\n{report}");
    }
    Ok(())
}

/// The consumer group of the shadow `name` (the processor runtime's `orderflow-<processor>`).
fn group(name: &str) -> String {
    format!("orderflow-shadow-{name}-saga")
}

/// One order's difference between the shadow's timeline and the live one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The same event id with other bytes: the same step, decided otherwise.
    Changed { event_id: String, kind: String },
    /// In the live timeline, not in the shadow's.
    Missing { event_id: String, kind: String },
    /// In the shadow's timeline, not in the live one.
    Extra { event_id: String, kind: String },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Changed { event_id, kind } => write!(f, "changed {kind} {event_id}"),
            Self::Missing { event_id, kind } => write!(f, "missing {kind} {event_id}"),
            Self::Extra { event_id, kind } => write!(f, "extra   {kind} {event_id}"),
        }
    }
}

/// What `shadow diff` found.
#[derive(Debug, Default)]
pub struct DiffReport {
    /// Orders whose whole live history the shadow has consumed.
    pub compared: usize,
    /// Orders with live records past the shadow's position (not compared yet).
    pub pending: usize,
    /// Differences by order id.
    pub differences: BTreeMap<String, Vec<Difference>>,
}

impl DiffReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

impl fmt::Display for DiffReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (order, differences) in &self.differences {
            writeln!(f, "order {order}:")?;
            for d in differences {
                writeln!(f, "  {d}")?;
            }
        }
        writeln!(
            f,
            "orders compared: {}; differing: {}; not yet consumed by the shadow: {}",
            self.compared,
            self.differences.len(),
            self.pending
        )
    }
}

/// One record of a timeline: its order, kind and bytes.
struct Record {
    order_id: String,
    kind: String,
    payload: Vec<u8>,
}

/// Reads `topic` from the beginning to its end as of now; calls `f` with each record's
/// partition, offset and payload.
fn read_to_end(
    clients: &KafkaClients,
    topic: &str,
    mut f: impl FnMut(i32, i64, &[u8]),
) -> Result<()> {
    let consumer: BaseConsumer = clients
        .consumer(
            "shadow-diff",
            &format!("orderflow-shadow-diff-{}", uuid::Uuid::new_v4()),
        )
        .create()?;
    let timeout = clients.admin_timeout();
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        if high > 0 {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    if metadata.topics().iter().all(|t| t.partitions().is_empty()) {
        bail!("topic {topic} does not exist");
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let reached = read_to_ends(&consumer, topic, &ends, Duration::from_secs(300), |m| {
        f(m.partition(), m.offset(), m.payload().unwrap_or_default())
    })?;
    if !reached {
        bail!("reading {topic} to its end took more than 300 s");
    }
    Ok(())
}

/// The saga's timeline events of `topic` by event id, and (for the live topic) each order's
/// partition and highest offset.
fn timeline(
    clients: &KafkaClients,
    codec: &Codec,
    topic: &str,
    mut last: Option<&mut HashMap<String, (i32, i64)>>,
) -> Result<HashMap<String, Record>> {
    let kinds: BTreeSet<&str> = TIMELINE_KINDS.iter().map(|k| k.name()).collect();
    let mut events = HashMap::new();
    read_to_end(clients, topic, |partition, offset, payload| {
        let Ok(event) = codec.decode(payload) else {
            return;
        };
        let envelope = event.envelope();
        if envelope.order_id.is_empty() {
            return; // a control record
        }
        if let Some(last) = last.as_deref_mut() {
            let at = last
                .entry(envelope.order_id.clone())
                .or_insert((partition, offset));
            at.1 = at.1.max(offset);
        }
        if kinds.contains(event.kind().name()) {
            events
                .entry(envelope.event_id.clone())
                .or_insert_with(|| Record {
                    order_id: envelope.order_id.clone(),
                    kind: event.kind().name().to_owned(),
                    payload: payload.to_vec(),
                });
        }
    })?;
    Ok(events)
}

/// Compares the shadow `name`'s timeline with the live one, for every order whose whole live
/// history (all of it in one partition: the topic is keyed by customer) lies before the
/// shadow's committed position.
pub fn diff(settings: &Settings, name: &str) -> Result<DiffReport> {
    names::check_shadow_name(name).map_err(anyhow::Error::msg)?;
    let clients = KafkaClients::new(&settings.kafka, &settings.kafka.brokers);
    let codec = Codec::new()?;

    // The shadow's position on the live topic.
    let consumer: BaseConsumer = clients.consumer("shadow-diff", &group(name)).create()?;
    let metadata = consumer.fetch_metadata(Some(names::ORDERS_EVENTS), clients.admin_timeout())?;
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition(names::ORDERS_EVENTS, p.id());
    }
    let committed = consumer.committed_offsets(tpl, clients.admin_timeout())?;
    let position: HashMap<i32, i64> = committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    if position.is_empty() {
        bail!(
            "shadow {name} has consumed nothing yet (no committed offsets of group {}): is `orderflow process --shadow {name}` running?",
            group(name)
        );
    }

    let mut last = HashMap::new();
    let live = timeline(&clients, &codec, names::ORDERS_EVENTS, Some(&mut last))?;
    let shadow_topic = names::shadow_topic(name, names::ORDERS_EVENTS);
    let shadow = timeline(&clients, &codec, &shadow_topic, None)?;

    let mut report = DiffReport::default();
    let comparable: BTreeSet<&String> = last
        .iter()
        .filter(|(_, (partition, offset))| {
            position
                .get(partition)
                .is_some_and(|consumed| offset < consumed)
        })
        .map(|(order, _)| order)
        .collect();
    report.compared = comparable.len();
    report.pending = last.len() - comparable.len();
    let mut add = |order: &str, difference: Difference| {
        report
            .differences
            .entry(order.to_owned())
            .or_default()
            .push(difference);
    };
    for (id, record) in &live {
        if !comparable.contains(&record.order_id) {
            continue;
        }
        match shadow.get(id) {
            Some(theirs) if theirs.payload != record.payload => add(
                &record.order_id,
                Difference::Changed {
                    event_id: id.clone(),
                    kind: record.kind.clone(),
                },
            ),
            Some(_) => {}
            None => add(
                &record.order_id,
                Difference::Missing {
                    event_id: id.clone(),
                    kind: record.kind.clone(),
                },
            ),
        }
    }
    for (id, record) in &shadow {
        if comparable.contains(&record.order_id) && !live.contains_key(id) {
            add(
                &record.order_id,
                Difference::Extra {
                    event_id: id.clone(),
                    kind: record.kind.clone(),
                },
            );
        }
    }
    for differences in report.differences.values_mut() {
        differences.sort_by_key(ToString::to_string);
    }
    Ok(report)
}
