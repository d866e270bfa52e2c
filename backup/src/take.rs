//! `orderflow backup DIR`: one backup set, full or incremental, taken while the pipeline runs.
//!
//! ## Consistent while everything writes
//!
//! The pieces are read in an order that makes every reference in the backup point inside it:
//!
//! 1. **The database** first (one snapshot): the projections' positions in it can only be at
//!    or below the logs' ends read later, so the tables reflect a prefix of the backed-up log.
//! 2. **The processors' consumer groups' offsets**: a group commits only after the batch's
//!    outputs and state were acknowledged, so what its offset promises is in the logs read
//!    later.
//! 3. **The changelogs' ends**, then **every other topic's ends**: a state's position record
//!    names an input position already written before the changelog end was read, and the
//!    batch's outputs were acknowledged before that record; reading the inputs' and outputs'
//!    ends afterwards keeps them inside the set.
//!
//! Records past the ends (orders accepted during the backup) belong to the next set. After a
//! restore the pipeline resumes as after a crash at the moment of the cut: processors re-run
//! what their state had not yet recorded and re-emit byte-identical events, which consumers
//! drop (docs/architecture.md, "Exactly once").
//!
//! ## Incremental
//!
//! A directory that already holds sets gets an incremental one: each partition from the
//! previous set's end to its end now. Retention that deleted records the previous set did not
//! reach makes an incremental set impossible (it would have a hole); the backup says so and
//! `--full` starts a new chain in the same directory.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use orderflow_db::Database;
use orderflow_platform::kafka::{log_end, KafkaClients, Reader, ReaderContext};
use orderflow_processors::PROCESSORS;
use orderflow_topics::Catalog;
use rdkafka::{
    consumer::Consumer,
    error::KafkaError,
    message::{Headers, Message},
    Offset, TopicPartitionList,
};

use crate::{
    database,
    format::{sha256_file, PartitionWriter, Record},
    manifest::{BackupSet, DatabaseDump, GroupOffset, Manifest, PartitionFile},
    BackupError, Result, READ_STALL,
};

/// How a backup run is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupOptions {
    /// A full set even when the directory holds sets (a new chain).
    pub full: bool,
}

/// What one run wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub set: String,
    pub incremental: bool,
    pub records: u64,
    pub bytes: u64,
    pub partitions: usize,
}

/// Takes one backup set into `dir` (module docs), reporting progress through `progress`.
pub async fn backup(
    dir: &Path,
    clients: &KafkaClients,
    db: &Database,
    catalog: &Catalog,
    options: BackupOptions,
    progress: &dyn Fn(String),
) -> Result<BackupReport> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut manifest = match Manifest::load(dir)? {
        Some(manifest) => manifest,
        None => {
            let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
            if entries.next().is_some() {
                return Err(BackupError::Target(format!(
                    "{} holds files but no manifest.json: back up into an empty directory or \
                     into an earlier backup's",
                    dir.display()
                )));
            }
            Manifest::new()
        }
    };
    let incremental = !options.full && !manifest.sets.is_empty();
    let set_name = format!("set-{:04}", manifest.sets.len() + 1);
    let set_dir = dir.join(&set_name);
    if set_dir.exists() {
        // Left by a run that stopped before its manifest: never listed, so never read.
        std::fs::remove_dir_all(&set_dir).map_err(io(&set_dir))?;
    }
    std::fs::create_dir_all(set_dir.join("topics")).map_err(io(&set_dir))?;
    let started_at_ms = now_ms();

    // 1. The database.
    let db_file = match db.backend() {
        orderflow_db::Backend::Sqlite => "database.sqlite",
        orderflow_db::Backend::Postgres => "database.pgdump",
    };
    let db_path = set_dir.join(db_file);
    progress(format!("database: copying into {}", db_path.display()));
    let (kind, positions) = database::snapshot(db, &db_path).await?;
    let (sha256, bytes) = sha256_file(&db_path)?;
    progress(format!(
        "database: {} ({}), {} projection positions",
        db_file,
        human_bytes(bytes),
        positions.len()
    ));
    let database = DatabaseDump {
        kind,
        file: format!("{set_name}/{db_file}"),
        sha256,
        bytes,
        positions,
    };

    // 2.-4. Groups, ends, records: blocking client calls, off the runtime.
    let previous = incremental.then(|| manifest.clone());
    let (groups, partitions) = tokio::task::block_in_place(|| {
        take_logs(
            clients,
            catalog,
            previous.as_ref(),
            dir,
            &set_name,
            progress,
        )
    })?;
    let records = partitions.iter().map(|p| p.records).sum();
    let bytes = partitions.iter().map(|p| p.bytes).sum::<u64>() + database.bytes;
    let report = BackupReport {
        set: set_name.clone(),
        incremental,
        records,
        bytes,
        partitions: partitions.len(),
    };
    manifest.sets.push(BackupSet {
        dir: set_name,
        started_at_ms,
        finished_at_ms: now_ms(),
        incremental,
        partitions,
        groups,
        database,
    });
    manifest.save(dir)?;
    Ok(report)
}

/// The consumer groups' offsets, the ends, and every partition's records (module docs, 2-4).
fn take_logs(
    clients: &KafkaClients,
    catalog: &Catalog,
    previous: Option<&Manifest>,
    dir: &Path,
    set: &str,
    progress: &dyn Fn(String),
) -> Result<(Vec<GroupOffset>, Vec<PartitionFile>)> {
    let timeout = clients.admin_timeout();
    let partitions_of = |topic: &str| {
        catalog
            .get(topic)
            .map(|spec| spec.partitions)
            .ok_or_else(|| BackupError::Manifest(format!("{topic} is not in the topic catalog")))
    };

    // 2. Group offsets.
    let mut groups = Vec::new();
    for processor in PROCESSORS {
        let group = processor.group_id();
        let mut config = clients.reader("backup");
        config.set("group.id", &group);
        let consumer: Reader = config.create_with_context(ReaderContext)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions_of(processor.input_topic)? {
            tpl.add_partition(processor.input_topic, p);
        }
        for entry in consumer.committed_offsets(tpl, timeout)?.elements() {
            if let Offset::Offset(offset) = entry.offset() {
                groups.push(GroupOffset {
                    group: group.clone(),
                    topic: entry.topic().to_owned(),
                    partition: entry.partition(),
                    offset,
                });
            }
        }
    }
    progress(format!(
        "consumer groups: {} committed offsets",
        groups.len()
    ));

    // 3. Ends: the changelogs first.
    let changelogs: Vec<&str> = PROCESSORS
        .iter()
        .filter_map(|p| p.changelog_topic)
        .collect();
    let mut topics: Vec<&str> = changelogs.clone();
    topics.extend(
        catalog
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .filter(|t| !changelogs.contains(t)),
    );
    let reader = clients.open_reader("backup")?;
    let mut bounds = Vec::new();
    for topic in &topics {
        for partition in 0..partitions_of(topic)? {
            let (low, end) = log_end(&reader, topic, partition, timeout)?;
            bounds.push((topic.to_string(), partition, low, end));
        }
    }

    // 4. Records.
    let mut files = Vec::new();
    for (topic, partition, low, end) in bounds {
        let from = match previous.and_then(|m| m.last_end(&topic, partition)) {
            Some(last) if low > last => {
                return Err(BackupError::Gap(format!(
                    "{topic}/{partition} starts at {low} but the previous set ended at {last}: \
                     retention deleted records no set holds; take a full backup (--full)"
                )))
            }
            Some(last) => last,
            None => low,
        };
        let relative = format!("{set}/topics/{topic}/{partition}.avro");
        let path: PathBuf = dir.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| BackupError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let mut writer = PartitionWriter::create(&path, &topic, partition)?;
        read_range(&reader, &topic, partition, from, end, |record| {
            writer.append(&record)
        })?;
        let records = writer.finish()?;
        let (sha256, bytes) = sha256_file(&path)?;
        if records > 0 {
            progress(format!(
                "{topic}/{partition}: {records} records [{from}, {end}), {}",
                human_bytes(bytes)
            ));
        }
        files.push(PartitionFile {
            topic,
            partition,
            log_start: low,
            from,
            to: end,
            records,
            file: relative,
            sha256,
            bytes,
        });
    }
    Ok((groups, files))
}

/// Reads `[from, to)` of one partition in order, handing each record to `f`. Fails when the
/// broker delivers nothing for [`READ_STALL`].
pub(crate) fn read_range(
    reader: &Reader,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    mut f: impl FnMut(Record) -> Result<()>,
) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&tpl)?;
    let mut last_progress = Instant::now();
    let mut last_offset = -1;
    loop {
        let at = reader
            .position()?
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(from);
        if at >= to {
            break;
        }
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                if message.offset() >= to || message.offset() <= last_offset {
                    continue;
                }
                last_offset = message.offset();
                f(Record {
                    offset: message.offset(),
                    timestamp: message.timestamp().to_millis(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers: message
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                })?;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => last_progress = Instant::now(),
            Some(Err(e)) => return Err(e.into()),
            None if last_progress.elapsed() > READ_STALL => {
                return Err(BackupError::Timeout(format!(
                    "reading {topic}/{partition}: nothing for {}s at offset {at} of [{from}, {to})",
                    READ_STALL.as_secs()
                )))
            }
            None => {}
        }
    }
    reader.unassign()?;
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} B"),
    }
}
