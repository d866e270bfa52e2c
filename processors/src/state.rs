//! State stores: a processor's state for one input partition, in memory, backed by a compacted
//! changelog topic partition with the same number.
//!
//! A step's state type implements [`PartitionState`]: it says which entries changed since the
//! last batch ([`PartitionState::changes`]) and rebuilds itself from changelog records
//! ([`PartitionState::restore`]). [`Store`] is the building block: a typed map that remembers
//! which keys changed. Values travel as JSON; a `None` value is a tombstone.
//!
//! ## Bounded
//!
//! Every changelog value is small and O(1) in its key's history: no value accumulates what its
//! key saw over time. What a step keeps only to recognise duplicates is dropped, with a
//! tombstone, once it is older than `state.retention_ms` in *event time* ([`Horizon`]): the
//! cut-off is the event time of the input being handled minus the horizon, so a re-run of the
//! same inputs from the same state drops the same entries (rule 1 holds for expiry too).
//!
//! ## Framed and fenced
//!
//! Besides the step's entries, every changelog partition holds:
//!
//! - [`POSITION_KEY`] records: the input offset the state reflects (the next offset to
//!   process). The runtime writes one after each batch's state changes, once the batch's outputs
//!   were acknowledged (rule 3). It also *closes* the batch: [`Restorer`] applies a batch's
//!   entries only when the position record after them arrives, so a batch whose writes failed
//!   half-way (or whose transaction was aborted, which these brokers still show) leaves no trace
//!   in the restored state. A re-run then starts from exactly the state the first run had, and
//!   emits exactly its bytes.
//! - [`CLAIM_KEY`] records: written when an instance takes a partition over, with the new
//!   writer's generation.
//!
//! Every record carries its writer's generation in the [`GENERATION_HEADER`] header: one more
//! than the highest generation in the changelog when the writer restored. A restore ignores a
//! record of an older generation found after a newer one: the late writes of a thawed zombie,
//! which restored (and so took its generation) before its successor did, never win, whatever the
//! broker fences. Records without the header (written before generations existed) count as
//! generation 0.

use std::collections::{BTreeSet, HashMap};

use serde::{de::DeserializeOwned, Serialize};

/// Changelog key of the input position; no step key starts with `__`.
pub const POSITION_KEY: &str = "__position";
/// Changelog key of a generation claim, written when an instance takes a partition over.
pub const CLAIM_KEY: &str = "__claim";
/// Header carrying the writer's generation (decimal) on every changelog record.
pub const GENERATION_HEADER: &str = "orderflow.generation";
/// The largest changelog value a step may write: far below Kafka's default 1 MB message limit.
/// Tests drive hot keys past where an unbounded value would cross it.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

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
    /// Called once after the last restored record: rebuild indexes kept beside the entries.
    fn restored(&mut self) {}
    /// Entries held now, for the state-size gauges and the bounded-state tests.
    fn entries(&self) -> usize {
        0
    }
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

    /// Removes the entry; a tombstone is written with the batch.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        let removed = self.entries.remove(key);
        if removed.is_some() {
            self.dirty.insert(key.to_owned());
            self.written_at.remove(key);
        }
        removed
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

    /// Applies one changelog record of this store (see [`Store::owns`]). Returns the entry's
    /// key without the prefix.
    pub fn restore<'k>(
        &mut self,
        changelog_key: &'k str,
        value: Option<&[u8]>,
    ) -> Result<&'k str, String> {
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
        Ok(key)
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

/// The expiry queue of entries kept only until a horizon in event time.
///
/// Each entry is queued once, when it is created, under its event time. When its turn comes
/// and the entry has changed since (its time moved on), it is queued again under its new time
/// instead of being dropped; so the queue holds about one item per entry, and an entry goes at
/// the first input whose cut-off passes its *current* time — the same input on a re-run from a
/// restored state (which queues every entry under its current time), as rule 1 wants.
#[derive(Debug, Default)]
pub struct Horizon {
    queue: BTreeSet<(i64, String)>,
}

impl Horizon {
    /// Queues `key`, whose entry has event time `at`.
    pub fn note(&mut self, key: String, at: i64) {
        self.queue.insert((at, key));
    }

    /// Goes through the queued keys older than `cutoff` (the event time of the input being
    /// handled minus the retention), oldest first. `check(key, queued_at)` drops the entry and
    /// returns `None` if its time is still `queued_at` (or it is gone), or returns the entry's
    /// newer time to queue it again.
    pub fn expire(&mut self, cutoff: i64, mut check: impl FnMut(&str, i64) -> Option<i64>) {
        while self.queue.first().is_some_and(|(at, _)| *at < cutoff) {
            let Some((at, key)) = self.queue.pop_first() else {
                break;
            };
            if let Some(newer) = check(&key, at) {
                if newer > at {
                    self.queue.insert((newer, key));
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// A partition's clock in event time: the newest event time among the inputs applied so far.
/// Horizons count back from it, so an input with an early timestamp expires nothing early, and
/// the clock is part of the state (changelog key `t:clock`), so a re-run expires what the first
/// run expired.
#[derive(Debug)]
pub struct EventClock(Store<i64>);

impl Default for EventClock {
    fn default() -> Self {
        Self(Store::new("t:"))
    }
}

impl EventClock {
    const KEY: &'static str = "clock";

    /// Moves the clock to `at` if that is later; returns the clock.
    pub fn advance(&mut self, at: i64) -> i64 {
        let now = self.now();
        if at > now {
            self.0.put(Self::KEY.to_owned(), at);
            at
        } else {
            now
        }
    }

    pub fn now(&self) -> i64 {
        self.0.get(Self::KEY).copied().unwrap_or(i64::MIN)
    }

    pub fn owns(&self, changelog_key: &str) -> bool {
        self.0.owns(changelog_key)
    }

    pub fn restore(&mut self, changelog_key: &str, value: Option<&[u8]>) -> Result<(), String> {
        self.0.restore(changelog_key, value).map(|_| ())
    }

    pub fn changes_into(&mut self, out: &mut Vec<ChangelogRecord>) {
        self.0.changes_into(out);
    }
}

/// A partition's state rebuilt from its changelog.
#[derive(Debug)]
pub struct Restored<T> {
    pub state: T,
    /// The next input offset to process; `None`: none stored (the group's offset decides).
    pub position: Option<i64>,
    /// The generation the new owner writes with: one more than any in the changelog.
    pub generation: u64,
    /// Records ignored because a newer generation had written before them (a zombie's).
    pub stale: u64,
    /// Records of batches that never got their position record (failed or aborted).
    pub unfinished: u64,
}

/// A record of a batch not closed yet by its position record.
#[derive(Debug)]
struct Pending {
    key: String,
    value: Option<Vec<u8>>,
    written_at: Option<i64>,
}

/// Rebuilds a partition's state from its changelog records, in log order (see the module docs):
/// a batch's entries apply only once its position record arrives, and a record of an older
/// generation after a newer one is ignored.
#[derive(Debug)]
pub struct Restorer<T> {
    state: T,
    position: Option<i64>,
    /// The newest generation seen so far.
    generation: u64,
    pending: Vec<Pending>,
    stale: u64,
    unfinished: u64,
}

impl<T: PartitionState> Default for Restorer<T> {
    fn default() -> Self {
        Self {
            state: T::default(),
            position: None,
            generation: 0,
            pending: Vec::new(),
            stale: 0,
            unfinished: 0,
        }
    }
}

impl<T: PartitionState> Restorer<T> {
    /// Feeds the next changelog record.
    pub fn record(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        generation: u64,
        written_at: Option<i64>,
    ) -> Result<(), String> {
        if generation < self.generation {
            self.stale += 1;
            return Ok(());
        }
        if generation > self.generation {
            // A new owner took over: what the old one left unfinished never applies.
            self.unfinished += self.pending.len() as u64;
            self.pending.clear();
            self.generation = generation;
        }
        match key {
            POSITION_KEY => {
                let position = value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or_else(|| format!("bad position value {value:?}"))?;
                for record in std::mem::take(&mut self.pending) {
                    self.state.restore(&record.key, record.value.as_deref())?;
                    if let Some(at) = record.written_at {
                        self.state.note_written_at(&record.key, at);
                    }
                }
                self.position = Some(position);
            }
            CLAIM_KEY => {}
            _ => self.pending.push(Pending {
                key: key.to_owned(),
                value: value.map(<[u8]>::to_vec),
                written_at,
            }),
        }
        Ok(())
    }

    /// The restored state; a trailing batch without its position record is dropped.
    pub fn finish(mut self) -> Restored<T> {
        self.unfinished += self.pending.len() as u64;
        self.state.restored();
        Restored {
            state: self.state,
            position: self.position,
            generation: self.generation + 1,
            stale: self.stale,
            unfinished: self.unfinished,
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

    /// A plain map of `s:` entries, for the restorer tests.
    #[derive(Debug, Default)]
    struct Map(Store<u32>);

    impl Default for Store<u32> {
        fn default() -> Self {
            Store::new("s:")
        }
    }

    impl PartitionState for Map {
        fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
            self.0.restore(key, value).map(|_| ())
        }
        fn changes(&mut self) -> Vec<ChangelogRecord> {
            let mut out = Vec::new();
            self.0.changes_into(&mut out);
            out
        }
    }

    fn feed(records: &[(&str, Option<&str>, u64)]) -> Restored<Map> {
        let mut restorer = Restorer::<Map>::default();
        for (key, value, generation) in records {
            restorer
                .record(key, value.map(str::as_bytes), *generation, None)
                .expect("restores");
        }
        restorer.finish()
    }

    #[test]
    fn a_batch_applies_only_once_its_position_is_written() {
        let restored = feed(&[
            ("s:a", Some("1"), 1),
            (POSITION_KEY, Some("10"), 1),
            // The next batch failed after writing one of its entries: it never happened.
            ("s:a", Some("2"), 1),
            ("s:b", Some("5"), 1),
        ]);
        assert_eq!(restored.state.0.get("a"), Some(&1));
        assert_eq!(restored.state.0.get("b"), None);
        assert_eq!(restored.position, Some(10));
        assert_eq!(restored.unfinished, 2);
        assert_eq!(restored.generation, 2, "the next owner writes generation 2");
    }

    #[test]
    fn a_zombies_late_writes_never_win() {
        // Generation 1 writes a batch; generation 2 takes over (claim), writes its own; then
        // the frozen generation-1 instance wakes up and writes an older value and position.
        let restored = feed(&[
            ("s:order", Some("1"), 1),
            (POSITION_KEY, Some("10"), 1),
            (CLAIM_KEY, Some("instance-b"), 2),
            ("s:order", Some("3"), 2),
            (POSITION_KEY, Some("12"), 2),
            ("s:order", Some("2"), 1),
            (POSITION_KEY, Some("11"), 1),
        ]);
        assert_eq!(restored.state.0.get("order"), Some(&3));
        assert_eq!(restored.position, Some(12));
        assert_eq!(restored.stale, 2);
        assert_eq!(restored.generation, 3);
    }

    #[test]
    fn a_new_owner_drops_what_the_old_one_left_unfinished() {
        let restored = feed(&[
            ("s:a", Some("1"), 1),
            (POSITION_KEY, Some("10"), 1),
            ("s:a", Some("9"), 1), // generation 1 froze before its position
            (CLAIM_KEY, Some("instance-b"), 2),
            (POSITION_KEY, Some("10"), 2),
            (POSITION_KEY, Some("11"), 1), // and thawed
        ]);
        assert_eq!(restored.state.0.get("a"), Some(&1));
        assert_eq!(restored.position, Some(10));
        assert_eq!((restored.unfinished, restored.stale), (1, 1));
    }

    #[test]
    fn records_from_before_generations_restore_as_generation_zero() {
        let restored = feed(&[("s:a", Some("1"), 0), (POSITION_KEY, Some("3"), 0)]);
        assert_eq!(restored.state.0.get("a"), Some(&1));
        assert_eq!(restored.generation, 1);
        let mut restorer = Restorer::<Map>::default();
        assert!(restorer
            .record(POSITION_KEY, Some(b"not a number"), 0, None)
            .is_err());
    }

    #[test]
    fn the_horizon_drops_entries_older_than_the_cutoff_and_requeues_changed_ones() {
        let mut entries: HashMap<String, i64> = [("a".to_owned(), 10), ("b".to_owned(), 50)]
            .into_iter()
            .collect();
        let mut horizon = Horizon::default();
        horizon.note("a".into(), 10);
        horizon.note("b".into(), 50);
        entries.insert("a".into(), 60); // changed since it was queued
        let mut expire = |horizon: &mut Horizon, cutoff: i64| {
            let mut dropped = Vec::new();
            horizon.expire(cutoff, |key, at| match entries.get(key).copied() {
                Some(now) if now > at => Some(now),
                Some(_) => {
                    entries.remove(key);
                    dropped.push(key.to_owned());
                    None
                }
                None => None,
            });
            dropped
        };
        assert!(
            expire(&mut horizon, 10).is_empty(),
            "nothing is older than 10"
        );
        assert!(
            expire(&mut horizon, 50).is_empty(),
            "a moved on to 60: queued again"
        );
        assert_eq!(horizon.len(), 2);
        // Event time going backwards expires nothing.
        assert!(expire(&mut horizon, -100).is_empty());
        assert_eq!(
            expire(&mut horizon, 61),
            vec!["b".to_owned(), "a".to_owned()]
        );
        assert!(horizon.is_empty());
        // An entry changed to a time already past the cut-off goes in the same call.
        let mut horizon = Horizon::default();
        horizon.note("c".into(), 1);
        let mut seen = Vec::new();
        horizon.expire(100, |key, at| {
            seen.push((key.to_owned(), at));
            (at == 1).then_some(5)
        });
        assert_eq!(seen, vec![("c".to_owned(), 1), ("c".to_owned(), 5)]);
    }
}
