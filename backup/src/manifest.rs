//! `manifest.json`, the index of a backup directory: which backup sets it holds (the first one
//! full, every later one incremental from the previous one's ends), and per set the files with
//! their checksums, each partition's offsets, the consumer groups' offsets and the database dump
//! with the projections' positions it reflects. Written last, atomically (a temporary file
//! renamed over it), so a backup that stopped half-way is not listed and the next run starts
//! that set again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{format::FORMAT, BackupError, Result};

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`]: the layout of this file and of the record files.
    pub format: String,
    /// Oldest first: the first full, the others incremental.
    pub sets: Vec<BackupSet>,
}

/// One run of `orderflow backup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSet {
    /// Directory of the set's files, relative to the backup directory (`set-0001`, ...).
    pub dir: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Whether the records start at the previous set's ends (else at each log's start).
    pub incremental: bool,
    pub partitions: Vec<PartitionFile>,
    /// Committed offsets of the processors' consumer groups, read before the logs' ends.
    pub groups: Vec<GroupOffset>,
    pub database: DatabaseDump,
}

/// The records of one topic partition in one set: `[from, to)` of the log then.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionFile {
    pub topic: String,
    pub partition: i32,
    /// The log's first offset when the set was taken.
    pub log_start: i64,
    /// The first offset this set covers: the log's start, or the previous set's `to`.
    pub from: i64,
    /// The end (exclusive) the set was cut at.
    pub to: i64,
    pub records: u64,
    /// Relative to the backup directory.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// The next offset the group reads.
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    /// A SQLite database file (`VACUUM INTO`).
    Sqlite,
    /// `pg_dump --format=custom`.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseDump {
    pub kind: DatabaseKind,
    /// Relative to the backup directory.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// The projections' stored positions in the dump: the log positions its tables reflect.
    pub positions: Vec<ProjectionPosition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionPosition {
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

impl Manifest {
    pub fn new() -> Self {
        Self {
            format: FORMAT.to_owned(),
            sets: Vec::new(),
        }
    }

    /// The manifest of `dir`, `None` when it has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BackupError::Io { path, source }),
        };
        let manifest: Self = serde_json::from_str(&text).map_err(|e| BackupError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if manifest.format != FORMAT {
            return Err(BackupError::Format {
                path,
                reason: format!("format {:?}, this release reads {FORMAT}", manifest.format),
            });
        }
        Ok(Some(manifest))
    }

    /// Writes the manifest atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let temporary = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| BackupError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| BackupError::Io { path, source }
        };
        std::fs::write(&temporary, text).map_err(io(&temporary))?;
        std::fs::File::open(&temporary)
            .and_then(|f| f.sync_all())
            .map_err(io(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io(&path))?;
        Ok(())
    }

    /// The end (exclusive) the last set reached on a partition: where an incremental set
    /// starts.
    pub fn last_end(&self, topic: &str, partition: i32) -> Option<i64> {
        self.sets.last().and_then(|set| {
            set.partitions
                .iter()
                .find(|p| p.topic == topic && p.partition == partition)
                .map(|p| p.to)
        })
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Self::new()
    }
}
