//! State stores: a processor's state for one input partition, in memory, backed by a compacted
//! changelog topic partition with the same number.
//!
//! A step's state type implements [`PartitionState`]: it says which entries changed since the
//! last batch ([`PartitionState::changes`]) and rebuilds itself from changelog records
//! ([`PartitionState::restore`]). [`Store`] is the building block: a typed map that remembers
//! which keys changed. Values travel as JSON; a `None` value is a tombstone.
//!
//! Besides the step's entries, every changelog partition holds one [`POSITION_KEY`] record: the
//! input offset the state reflects (the next offset to process). The runtime writes it with the
//! batch's state changes, after the batch's outputs were acknowledged (DESIGN.md rule 3), and
//! resumes from it on assignment.

use std::collections::{BTreeSet, HashMap};

use serde::{de::DeserializeOwned, Serialize};

/// Changelog key of the input position; no step key starts with `__`.
pub const POSITION_KEY: &str = "__position";

/// One changelog record: key and value (JSON), `None` for a deleted entry.
pub type ChangelogRecord = (String, Option<Vec<u8>>);

/// A processor's state for one partition.
pub trait PartitionState: Default + Send + 'static {
    /// Applies one changelog record while restoring; later records win.
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String>;
    /// Takes the records describing every entry changed since the last call.
    fn changes(&mut self) -> Vec<ChangelogRecord>;
    /// While restoring, after [`PartitionState::restore`] of `key`: when that record was
    /// written (the changelog record's timestamp, wall-clock milliseconds). For timers that
    /// count from when an entry last changed, across restarts; ignored by default.
    fn note_written_at(&mut self, _key: &str, _written_at_ms: i64) {}
}

/// A typed map whose keys carry a prefix in the changelog (`prefix` + key), remembering which
/// keys changed.
#[derive(Debug)]
pub struct Store<V> {
    prefix: &'static str,
    entries: HashMap<String, V>,
    dirty: BTreeSet<String>,
    /// When each restored entry was last written (changelog timestamps), until it changes here.
    written_at: HashMap<String, i64>,
}

impl<V: Serialize + DeserializeOwned> Store<V> {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            entries: HashMap::new(),
            dirty: BTreeSet::new(),
            written_at: HashMap::new(),
        }
    }

    /// When the entry was last written, if it was restored from the changelog and has not
    /// changed since (then the caller's own clock knows better).
    pub fn written_at(&self, key: &str) -> Option<i64> {
        self.written_at.get(key).copied()
    }

    /// Records when the changelog record of `changelog_key` (of this store) was written.
    pub fn note_written_at(&mut self, changelog_key: &str, written_at_ms: i64) {
        if let Some(key) = changelog_key.strip_prefix(self.prefix) {
            if self.entries.contains_key(key) {
                self.written_at.insert(key.to_owned(), written_at_ms);
            } else {
                self.written_at.remove(key);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key)
    }

    /// The entry for writing; it is written to the changelog with the batch.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let entry = self.entries.get_mut(key)?;
        self.dirty.insert(key.to_owned());
        Some(entry)
    }

    pub fn put(&mut self, key: String, value: V) {
        self.dirty.insert(key.clone());
        self.entries.insert(key, value);
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.dirty.insert(key.to_owned());
        self.entries.remove(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.entries.iter()
    }

    /// Whether a changelog key belongs to this store.
    pub fn owns(&self, changelog_key: &str) -> bool {
        changelog_key.starts_with(self.prefix)
    }

    /// Applies one changelog record of this store (see [`Store::owns`]).
    pub fn restore(&mut self, changelog_key: &str, value: Option<&[u8]>) -> Result<(), String> {
        let key = changelog_key
            .strip_prefix(self.prefix)
            .ok_or_else(|| format!("changelog key {changelog_key:?} is not in this store"))?;
        match value {
            None => {
                self.entries.remove(key);
            }
            Some(bytes) => {
                let value = serde_json::from_slice(bytes)
                    .map_err(|e| format!("changelog entry {changelog_key:?}: {e}"))?;
                self.entries.insert(key.to_owned(), value);
            }
        }
        Ok(())
    }

    /// Drains the changed keys into changelog records.
    pub fn changes_into(&mut self, out: &mut Vec<ChangelogRecord>) {
        for key in std::mem::take(&mut self.dirty) {
            self.written_at.remove(&key);
            let value = self.entries.get(&key).map(|v| {
                // Serializing plain data structs to JSON cannot fail.
                serde_json::to_vec(v).unwrap_or_default()
            });
            out.push((format!("{}{key}", self.prefix), value));
        }
    }
}

/// State for processors that keep none.
#[derive(Debug, Default)]
pub struct NoState;

impl PartitionState for NoState {
    fn restore(&mut self, key: &str, _value: Option<&[u8]>) -> Result<(), String> {
        Err(format!(
            "a stateless processor has no changelog entry {key:?}"
        ))
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_written_once_and_restore_rebuilds_the_store() {
        let mut store: Store<u32> = Store::new("s:");
        store.put("a".into(), 1);
        store.put("b".into(), 2);
        if let Some(b) = store.get_mut("b") {
            *b = 3;
        }
        store.remove("a");
        let mut records = Vec::new();
        store.changes_into(&mut records);
        assert_eq!(
            records,
            vec![
                ("s:a".to_owned(), None),
                ("s:b".to_owned(), Some(b"3".to_vec()))
            ]
        );
        let mut again = Vec::new();
        store.changes_into(&mut again);
        assert!(again.is_empty(), "nothing changed since");

        let mut restored: Store<u32> = Store::new("s:");
        restored.restore("s:a", Some(b"1")).expect("restores");
        for (key, value) in &records {
            restored.restore(key, value.as_deref()).expect("restores");
        }
        assert_eq!(restored.get("a"), None);
        assert_eq!(restored.get("b"), Some(&3));
        // When a restored entry was written is known until it changes here.
        restored.note_written_at("s:b", 1000);
        restored.note_written_at("s:a", 1000);
        assert_eq!(restored.written_at("b"), Some(1000));
        assert_eq!(
            restored.written_at("a"),
            None,
            "deleted entries have no time"
        );
        if let Some(b) = restored.get_mut("b") {
            *b = 4;
        }
        restored.changes_into(&mut Vec::new());
        assert_eq!(restored.written_at("b"), None, "changed here since");
        assert!(restored.restore("x:b", Some(b"1")).is_err());
        assert!(restored.restore("s:b", Some(b"not json")).is_err());
    }
}
