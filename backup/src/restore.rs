//! `orderflow restore DIR`: a backup chain (the last full set and the incremental ones after
//! it) into an empty cluster and database, with every position set to match.
//!
//! 1. **Check** every file against its checksum in the manifest, and the target: every topic
//!    of the backup exists (the topic catalog applied) and holds no records, and the database
//!    is empty — unless `force`, which appends after what the topics hold and replaces the
//!    database. Nothing is written before both checks pass.
//! 2. **Drop what the cut orphaned.** The topics' ends are read one after another while the
//!    pipeline writes, so the last set can hold an event whose cause lies past its topic's
//!    cut: the saga's payment request in `payments.requests` whose reservation reply came after
//!    `orders.events` was cut. Restored, the saga would redo that order from the reply on, and a
//!    reply arriving in another order (replies come from several inventory partitions) makes
//!    another request, with another id: a second charge. So an event of the last set that was
//!    written after the backup started and whose cause is in no restored record is left out,
//!    repeatedly, until every restored event's cause is restored too. Nothing a restored state,
//!    table or group offset depends on is ever left out: those were read before every topic's
//!    end, so their records and those records' causes precede every cut. What is left out is
//!    made again by the resumed pipeline, as after a crash at the cut.
//! 3. **Map** the offsets ([`crate::offsets`]): where each record will land.
//! 4. **The database**, from the last set's copy, then the projections' positions rewritten
//!    through the map.
//! 5. **The records**, each partition in its original order through one idempotent producer,
//!    with their keys, headers and timestamps. What refers to an offset is rewritten through the
//!    map: a processor state's position record (`__position`, a position on the processor's
//!    input), a dead letter's `dlq.source.*` headers, a redriven record's `redriven.from`, and a
//!    resolution's key and redrive position. Every acknowledged offset is checked against the
//!    map; a broker that assigns another one (something else wrote meanwhile) stops the restore.
//! 6. **The processors' consumer groups' offsets**, mapped and committed. (The saga and
//!    inventory processors resume from their changelogs' positions whatever the group says; the
//!    payment worker, which has no state, resumes from its group's.)
//!
//! A restore that failed half-way leaves a target that is not empty: empty it (a new broker
//! data directory or cluster, a new database) and restore again; `force` would append the
//! records a second time.

use std::{
    collections::{HashSet, VecDeque},
    path::Path,
};

use orderflow_platform::kafka::{log_end, KafkaClients, Reader, ReaderContext};
use orderflow_processors::{state::POSITION_KEY, PROCESSORS};
use orderflow_schemas::{headers, Codec};
use orderflow_topics::names;
use rdkafka::{
    consumer::{CommitMode, Consumer},
    message::{Header, OwnedHeaders},
    producer::{future_producer::OwnedDeliveryResult, FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};
use secrecy::SecretString;

use crate::{
    database,
    format::{read_partition, sha256_file, Record},
    manifest::{BackupSet, GroupOffset, Manifest, PartitionFile, ProjectionPosition},
    offsets::{OffsetMap, PartitionMap},
    BackupError, Result,
};

/// How a restore is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Restore into topics that hold records (appending) and over a database that has tables.
    pub force: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub sets: usize,
    pub records: u64,
    /// Events the cut orphaned (module docs, 2).
    pub left_out: u64,
    pub positions: Vec<ProjectionPosition>,
    pub groups: Vec<GroupOffset>,
}

/// How far before the backup's start an event may have been written and still count as written
/// during it: clocks of the producing hosts and of the backup's may differ by this much.
const ORPHAN_CLOCK_MARGIN_MS: i64 = 60_000;

/// Acknowledgements awaited at most at once.
const IN_FLIGHT: usize = 20_000;

/// Restores the backup in `dir` (module docs). The topics must exist (apply the catalog
/// first); `database_url` is the database to restore into.
pub async fn restore(
    dir: &Path,
    clients: &KafkaClients,
    database_url: &SecretString,
    options: RestoreOptions,
    progress: &dyn Fn(String),
) -> Result<RestoreReport> {
    let manifest = Manifest::load(dir)?.ok_or_else(|| {
        BackupError::Manifest(format!(
            "{} has no manifest.json: not an orderflow backup",
            dir.display()
        ))
    })?;
    let chain = chain(&manifest)?;
    let last = chain
        .last()
        .copied()
        .ok_or_else(|| BackupError::Manifest(format!("{} holds no backup set", dir.display())))?;

    // 1. Checks.
    let mut checked = 0;
    for (file, expected) in chain
        .iter()
        .flat_map(|set| set.partitions.iter().map(|p| (&p.file, &p.sha256)))
        .chain([(&last.database.file, &last.database.sha256)])
    {
        let path = dir.join(file);
        let (sum, _) = sha256_file(&path)?;
        if &sum != expected {
            return Err(BackupError::Checksum {
                file: path,
                expected: expected.clone(),
                found: sum,
            });
        }
        checked += 1;
    }
    progress(format!(
        "{checked} files match their checksums ({} sets from {})",
        chain.len(),
        chain[0].dir
    ));
    let partitions = partitions_of(&chain);
    let bases = tokio::task::block_in_place(|| target_bases(clients, &partitions, options))?;
    database::check_target(last.database.kind, database_url, options.force).await?;

    // 2. What the cut orphaned.
    let orphans = orphans(
        dir,
        &partitions,
        last.started_at_ms - ORPHAN_CLOCK_MARGIN_MS,
    )?;
    if !orphans.is_empty() {
        progress(format!(
            "{} events written during the backup whose cause is not in it are left out (the \
             pipeline makes them again)",
            orphans.len()
        ));
    }

    // 3. The map.
    let mut map = OffsetMap::default();
    for ((topic, partition), files) in &partitions {
        let mut partition_map = PartitionMap::new(bases[&(topic.clone(), *partition)]);
        for file in files {
            for record in read_partition(&dir.join(&file.file), topic, *partition)? {
                let offset = record?.offset;
                if orphans.contains(&(topic.clone(), *partition, offset)) {
                    continue;
                }
                partition_map
                    .push(offset)
                    .map_err(|e| BackupError::Manifest(format!("{}: {e}", file.file)))?;
            }
        }
        map.insert(topic, *partition, partition_map);
    }

    // 4. The database.
    progress(format!("database: restoring {}", last.database.file));
    database::restore(
        last.database.kind,
        &dir.join(&last.database.file),
        database_url,
        options.force,
    )
    .await?;
    let positions = database::remap_positions(database_url, &map).await?;
    progress(format!(
        "database: restored, {} projection positions mapped",
        positions.len()
    ));

    // 5. The records.
    let producer: FutureProducer = clients.idempotent_producer("restore").create()?;
    let mut records = 0u64;
    for ((topic, partition), files) in &partitions {
        let partition_map = map.get(topic, *partition).ok_or_else(|| {
            BackupError::Manifest(format!("no offset map for {topic}/{partition}"))
        })?;
        let mut pending: VecDeque<(i64, rdkafka::producer::DeliveryFuture)> = VecDeque::new();
        let mut i = 0usize;
        for file in files {
            for record in read_partition(&dir.join(&file.file), topic, *partition)? {
                let record = record?;
                if orphans.contains(&(topic.clone(), *partition, record.offset)) {
                    continue;
                }
                let record = rewrite(topic, *partition, record, &map);
                let expected = partition_map.expected(i);
                i += 1;
                let mut out = FutureRecord::to(topic)
                    .partition(*partition)
                    .headers(owned_headers(&record));
                if let Some(key) = &record.key {
                    out = out.key(key.as_slice());
                }
                if let Some(value) = &record.value {
                    out = out.payload(value.as_slice());
                }
                if let Some(timestamp) = record.timestamp {
                    out = out.timestamp(timestamp);
                }
                let delivery = producer.send_result(out).map_err(|(e, _)| e)?;
                pending.push_back((expected, delivery));
                if pending.len() >= IN_FLIGHT {
                    if let Some((expected, delivery)) = pending.pop_front() {
                        check_delivery(topic, *partition, expected, delivery.await)?;
                    }
                }
            }
        }
        while let Some((expected, delivery)) = pending.pop_front() {
            check_delivery(topic, *partition, expected, delivery.await)?;
        }
        records += i as u64;
        if i > 0 {
            progress(format!(
                "{topic}/{partition}: {i} records restored at [{}, {})",
                partition_map.expected(0),
                partition_map.expected(i)
            ));
        }
    }

    // 6. The groups.
    let groups = mapped_groups(&last.groups, &map);
    tokio::task::block_in_place(|| commit_groups(clients, &groups))?;
    progress(format!(
        "consumer groups: {} offsets committed",
        groups.len()
    ));

    Ok(RestoreReport {
        sets: chain.len(),
        records,
        left_out: orphans.len() as u64,
        positions,
        groups,
    })
}

/// The events of the event topics the cut orphaned (module docs, 2): written at or after
/// `since_ms`, with a cause in no restored record, repeatedly.
fn orphans(
    dir: &Path,
    partitions: &[((String, i32), Vec<&PartitionFile>)],
    since_ms: i64,
) -> Result<HashSet<(String, i32, i64)>> {
    struct Event {
        at: (String, i32, i64),
        id: String,
        cause: Option<String>,
        late: bool,
    }
    let codec = Codec::new().map_err(|e| BackupError::Manifest(format!("schemas: {e}")))?;
    let mut events = Vec::new();
    for ((topic, partition), files) in partitions {
        if !names::EVENT_TOPICS.contains(&topic.as_str()) {
            continue;
        }
        for file in files {
            for record in read_partition(&dir.join(&file.file), topic, *partition)? {
                let record = record?;
                let Some(event) = record.value.as_deref().and_then(|v| codec.decode(v).ok()) else {
                    continue;
                };
                let envelope = event.envelope();
                events.push(Event {
                    at: (topic.clone(), *partition, record.offset),
                    id: envelope.event_id.clone(),
                    cause: envelope.causation_id.clone(),
                    late: record.timestamp.is_some_and(|t| t >= since_ms),
                });
            }
        }
    }
    let mut left_out = vec![false; events.len()];
    loop {
        let present: HashSet<&str> = events
            .iter()
            .zip(&left_out)
            .filter(|(_, out)| !**out)
            .map(|(e, _)| e.id.as_str())
            .collect();
        let mut more = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if !left_out[i]
                && event.late
                && event
                    .cause
                    .as_deref()
                    .is_some_and(|cause| !present.contains(cause))
            {
                more.push(i);
            }
        }
        if more.is_empty() {
            break;
        }
        for i in more {
            left_out[i] = true;
        }
    }
    Ok(events
        .into_iter()
        .zip(left_out)
        .filter(|(_, out)| *out)
        .map(|(e, _)| e.at)
        .collect())
}

/// The sets a restore reads: the last full one and the incremental ones after it.
fn chain(manifest: &Manifest) -> Result<Vec<&BackupSet>> {
    let start = manifest
        .sets
        .iter()
        .rposition(|s| !s.incremental)
        .ok_or_else(|| BackupError::Manifest("no full backup set to start from".into()))?;
    Ok(manifest.sets[start..].iter().collect())
}

/// Each partition's files, oldest set first, partitions in a stable order.
fn partitions_of<'a>(chain: &[&'a BackupSet]) -> Vec<((String, i32), Vec<&'a PartitionFile>)> {
    let mut out: Vec<((String, i32), Vec<&PartitionFile>)> = Vec::new();
    for set in chain {
        for file in &set.partitions {
            let key = (file.topic.clone(), file.partition);
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some((_, files)) => files.push(file),
                None => out.push((key, vec![file])),
            }
        }
    }
    out
}

/// Where each partition's restored records start: its end now. Refuses a topic that is missing,
/// or holds records (unless `force`).
fn target_bases(
    clients: &KafkaClients,
    partitions: &[((String, i32), Vec<&PartitionFile>)],
    options: RestoreOptions,
) -> Result<std::collections::HashMap<(String, i32), i64>> {
    let reader = clients.open_reader("restore")?;
    let timeout = clients.admin_timeout();
    let metadata = reader.fetch_metadata(None, timeout)?;
    let mut bases = std::collections::HashMap::new();
    for ((topic, partition), _) in partitions {
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.partitions().iter().any(|p| p.id() == *partition));
        if !exists {
            return Err(BackupError::Target(format!(
                "{topic}/{partition} does not exist on the target: apply the topic catalog \
                 first (orderflow topics apply)"
            )));
        }
        let (low, end) = log_end(&reader, topic, *partition, timeout)?;
        if end > low && !options.force {
            return Err(BackupError::NotEmpty(format!(
                "{topic}/{partition} holds records [{low}, {end})"
            )));
        }
        bases.insert((topic.clone(), *partition), end);
    }
    Ok(bases)
}

/// A record as it must be written into the new log: its references to offsets mapped.
fn rewrite(topic: &str, partition: i32, mut record: Record, map: &OffsetMap) -> Record {
    // A processor state's position: a position on the processor's input partition of the same
    // number.
    if let Some(processor) = PROCESSORS.iter().find(|p| p.changelog_topic == Some(topic)) {
        if record.key.as_deref() == Some(POSITION_KEY.as_bytes()) {
            let old = record
                .value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok());
            if let Some(new) =
                old.and_then(|old| map.position(processor.input_topic, partition, old))
            {
                record.value = Some(new.to_string().into_bytes());
            }
        }
    }
    // A dead letter's source.
    if let (Some(source), Some(p), Some(o)) = (
        record.header(headers::DLQ_SOURCE_TOPIC),
        record
            .header(headers::DLQ_SOURCE_PARTITION)
            .and_then(|p| p.parse::<i32>().ok()),
        record
            .header(headers::DLQ_SOURCE_OFFSET)
            .and_then(|o| o.parse::<i64>().ok()),
    ) {
        if let Some(new) = map.record(&source, p, o) {
            record.set_header(headers::DLQ_SOURCE_OFFSET, &new.to_string());
        }
    }
    // A redriven record's letter.
    if let Some(letter) = record.header(headers::REDRIVEN_FROM) {
        if let Some(new) = map_letter(&letter, map) {
            record.set_header(headers::REDRIVEN_FROM, &new);
        }
    }
    // A resolution: keyed by its letter; a redrive names where the event went.
    if topic == names::DLQ_RESOLUTIONS {
        if let Some(new) = record
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| map_letter(k, map))
        {
            record.key = Some(new.into_bytes());
        }
        if let Some(value) = record
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
        {
            let mut value = value;
            let target = (
                value
                    .get("topic")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned),
                value.get("partition").and_then(serde_json::Value::as_i64),
                value.get("offset").and_then(serde_json::Value::as_i64),
            );
            if let (Some(t), Some(p), Some(o)) = target {
                if let Some(new) = i32::try_from(p).ok().and_then(|p| map.record(&t, p, o)) {
                    value["offset"] = new.into();
                    if let Ok(bytes) = serde_json::to_vec(&value) {
                        record.value = Some(bytes);
                    }
                }
            }
        }
    }
    record
}

/// `TOPIC/PARTITION/OFFSET` of a restored record, mapped.
fn map_letter(letter: &str, map: &OffsetMap) -> Option<String> {
    let (rest, offset) = letter.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    let partition: i32 = partition.parse().ok()?;
    let new = map.record(topic, partition, offset.parse().ok()?)?;
    Some(format!("{topic}/{partition}/{new}"))
}

fn owned_headers(record: &Record) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        out = out.insert(Header {
            key,
            value: value.as_deref(),
        });
    }
    out
}

fn check_delivery(
    topic: &str,
    partition: i32,
    expected: i64,
    delivery: std::result::Result<OwnedDeliveryResult, impl std::fmt::Display>,
) -> Result<()> {
    let delivery = delivery.map_err(|e| {
        BackupError::Timeout(format!("{topic}/{partition}: no acknowledgement ({e})"))
    })?;
    let delivered = delivery.map_err(|(e, _)| e)?;
    if delivered.partition != partition || delivered.offset != expected {
        return Err(BackupError::Offsets {
            topic: topic.to_owned(),
            partition,
            expected,
            got: delivered.offset,
        });
    }
    Ok(())
}

fn mapped_groups(groups: &[GroupOffset], map: &OffsetMap) -> Vec<GroupOffset> {
    groups
        .iter()
        .filter_map(|g| {
            Some(GroupOffset {
                offset: map.position(&g.topic, g.partition, g.offset)?,
                ..g.clone()
            })
        })
        .collect()
}

fn commit_groups(clients: &KafkaClients, groups: &[GroupOffset]) -> Result<()> {
    let mut names: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
    names.dedup();
    for name in names {
        let mut config = clients.reader("restore");
        config.set("group.id", name);
        let consumer: Reader = config.create_with_context(ReaderContext)?;
        let mut tpl = TopicPartitionList::new();
        for g in groups.iter().filter(|g| g.group == name) {
            tpl.add_partition_offset(&g.topic, g.partition, Offset::Offset(g.offset))?;
        }
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use orderflow_schemas::OrderEvent;

    use super::*;

    fn map() -> OffsetMap {
        let mut map = OffsetMap::default();
        let mut events = PartitionMap::new(0);
        for o in [5, 6, 9] {
            events.push(o).expect("ordered");
        }
        map.insert(names::ORDERS_EVENTS, 2, events);
        let mut dlq = PartitionMap::new(0);
        dlq.push(40).expect("ordered");
        map.insert(names::SAGA_DLQ, 0, dlq);
        map
    }

    fn record(key: &str, value: &str, headers: &[(&str, &str)]) -> Record {
        Record {
            offset: 100,
            timestamp: Some(1),
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn every_reference_to_an_offset_is_mapped() {
        let map = map();
        // The saga's state position on orders.events/2: old next offset 7 (inside a gap) is
        // the new offset of old 9.
        let position = rewrite(
            names::SAGA_CHANGELOG,
            2,
            record(POSITION_KEY, "7", &[]),
            &map,
        );
        assert_eq!(position.value.as_deref(), Some(b"2".as_slice()));
        // Other state records are left alone.
        let entry = rewrite(names::SAGA_CHANGELOG, 2, record("o:1", "7", &[]), &map);
        assert_eq!(entry.value.as_deref(), Some(b"7".as_slice()));
        // A dead letter's source offset.
        let letter = rewrite(
            names::SAGA_DLQ,
            0,
            record(
                "k",
                "v",
                &[
                    (headers::DLQ_SOURCE_TOPIC, names::ORDERS_EVENTS),
                    (headers::DLQ_SOURCE_PARTITION, "2"),
                    (headers::DLQ_SOURCE_OFFSET, "6"),
                ],
            ),
            &map,
        );
        assert_eq!(
            letter.header(headers::DLQ_SOURCE_OFFSET).as_deref(),
            Some("1")
        );
        // A redriven event names its letter.
        let redriven = rewrite(
            names::ORDERS_EVENTS,
            2,
            record(
                "k",
                "v",
                &[(headers::REDRIVEN_FROM, "orderflow.saga.dlq/0/40")],
            ),
            &map,
        );
        assert_eq!(
            redriven.header(headers::REDRIVEN_FROM).as_deref(),
            Some("orderflow.saga.dlq/0/0")
        );
        // A resolution's key and the redriven event's position.
        let resolution = rewrite(
            names::DLQ_RESOLUTIONS,
            0,
            record(
                "orderflow.saga.dlq/0/40",
                r#"{"action":"redriven","topic":"orders.events","partition":2,"offset":9}"#,
                &[],
            ),
            &map,
        );
        assert_eq!(
            resolution.key.as_deref(),
            Some(b"orderflow.saga.dlq/0/0".as_slice())
        );
        let value: serde_json::Value =
            serde_json::from_slice(resolution.value.as_deref().expect("value")).expect("json");
        assert_eq!(value["offset"], 2);
    }

    /// Writes `events` (with their write times) as one partition's file of a set.
    fn file_of(dir: &Path, topic: &str, events: &[(&OrderEvent, i64)]) -> PartitionFile {
        let codec = Codec::new().expect("codec");
        let name = format!("{topic}.avro");
        let mut writer =
            crate::format::PartitionWriter::create(&dir.join(&name), topic, 0).expect("file");
        for (offset, (event, at)) in events.iter().enumerate() {
            writer
                .append(&Record {
                    offset: offset as i64,
                    timestamp: Some(*at),
                    key: None,
                    value: Some(codec.encode(event).expect("encode")),
                    headers: Vec::new(),
                })
                .expect("append");
        }
        let records = writer.finish().expect("finish");
        PartitionFile {
            topic: topic.into(),
            partition: 0,
            log_start: 0,
            from: 0,
            to: records as i64,
            records,
            file: name,
            sha256: String::new(),
            bytes: 0,
        }
    }

    #[test]
    fn events_the_cut_orphaned_are_left_out_and_nothing_older() {
        use orderflow_testkit::log::{order_placed, short_timeline};
        let dir = tempfile::tempdir().expect("temp dir");
        let placed = order_placed("c-1", &[("SKU-1", 1)], "tok_visa", 1_000);
        let placed_event = OrderEvent::OrderPlaced(placed.clone());
        let timeline = short_timeline(&placed, true);
        let with = |event: &OrderEvent, id: &str, cause: &str| {
            let mut event = event.clone();
            event.envelope_mut().event_id = id.into();
            event.envelope_mut().causation_id = Some(cause.into());
            event
        };
        // Written during the backup (at or after 4 000): x's cause was cut off, y is caused by
        // x; written before it: z, whose cause retention deleted long ago.
        let x = with(&timeline[0], "x", "cut-off");
        let y = with(&timeline[1], "y", "x");
        let z = with(&timeline[1], "z", "deleted-by-retention");
        let events = file_of(
            dir.path(),
            names::ORDERS_EVENTS,
            &[
                (&placed_event, 1_000),
                (&timeline[0], 1_000),
                (&z, 1_500),
                (&x, 4_500),
                (&y, 4_600),
                (&timeline[1], 4_700),
            ],
        );
        // The same request x, on the payment worker's topic.
        let requests = file_of(dir.path(), names::PAYMENTS_REQUESTS, &[(&x, 4_500)]);
        let partitions = vec![
            ((names::ORDERS_EVENTS.to_owned(), 0), vec![&events]),
            ((names::PAYMENTS_REQUESTS.to_owned(), 0), vec![&requests]),
        ];
        let orphans = orphans(dir.path(), &partitions, 4_000).expect("orphans");
        let expected: HashSet<(String, i32, i64)> = [
            (names::ORDERS_EVENTS.to_owned(), 0, 3),
            (names::ORDERS_EVENTS.to_owned(), 0, 4),
            (names::PAYMENTS_REQUESTS.to_owned(), 0, 0),
        ]
        .into_iter()
        .collect();
        assert_eq!(orphans, expected);
    }

    #[test]
    fn group_offsets_move_with_the_log() {
        let map = map();
        let groups = mapped_groups(
            &[GroupOffset {
                group: "orderflow-saga".into(),
                topic: names::ORDERS_EVENTS.into(),
                partition: 2,
                offset: 10,
            }],
            &map,
        );
        assert_eq!(groups[0].offset, 3, "past the last record: the new end");
    }
}
