//! Where each record lands in a restore, decided before anything is written.
//!
//! A broker gives restored records new offsets: the log being restored may have gaps (records
//! compacted away or deleted by retention, transaction markers), and a topic that was not empty
//! starts past its end. Records of one partition are produced in their original order through one
//! idempotent producer, and a broker without transactions in between assigns consecutive
//! offsets, so the i-th restored record of a partition lands at `base + i`. The map is built
//! from the backup before the first record is written, every offset the log refers to (the
//! processors' state positions, the projections' positions, the consumer groups' offsets, dead
//! letters' sources and resolutions) is rewritten through it, and the restore checks every
//! acknowledged offset against it.

use std::collections::HashMap;

/// One partition: the old offsets of the records restored, in log order.
#[derive(Debug, Clone, Default)]
pub struct PartitionMap {
    base: i64,
    old: Vec<i64>,
}

impl PartitionMap {
    pub fn new(base: i64) -> Self {
        Self {
            base,
            old: Vec::new(),
        }
    }

    /// Adds the next restored record; offsets must increase.
    pub fn push(&mut self, old: i64) -> Result<(), String> {
        if self.old.last().is_some_and(|last| *last >= old) {
            return Err(format!(
                "offset {old} follows {}: records out of order",
                self.old.last().copied().unwrap_or_default()
            ));
        }
        self.old.push(old);
        Ok(())
    }

    /// The new offset of the record that had offset `old`, if it was restored.
    pub fn record(&self, old: i64) -> Option<i64> {
        self.old
            .binary_search(&old)
            .ok()
            .map(|i| self.base + i as i64)
    }

    /// A position (the next offset to read) in the new log: the new offset of the first
    /// restored record at or after `old_next`, or the new end when there is none.
    pub fn position(&self, old_next: i64) -> i64 {
        self.base + self.old.partition_point(|o| *o < old_next) as i64
    }

    /// The new offset the `i`-th restored record must get.
    pub fn expected(&self, i: usize) -> i64 {
        self.base + i as i64
    }

    pub fn len(&self) -> usize {
        self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.old.is_empty()
    }
}

/// Every partition's map.
#[derive(Debug, Clone, Default)]
pub struct OffsetMap(HashMap<(String, i32), PartitionMap>);

impl OffsetMap {
    pub fn insert(&mut self, topic: &str, partition: i32, map: PartitionMap) {
        self.0.insert((topic.to_owned(), partition), map);
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<&PartitionMap> {
        self.0.get(&(topic.to_owned(), partition))
    }

    /// A position on `topic`/`partition` in the new log; positions on partitions the backup
    /// does not hold map to 0 when the backup holds the topic's records from the start.
    pub fn position(&self, topic: &str, partition: i32, old_next: i64) -> Option<i64> {
        self.get(topic, partition).map(|m| m.position(old_next))
    }

    /// The new offset of a restored record.
    pub fn record(&self, topic: &str, partition: i32, old: i64) -> Option<i64> {
        self.get(topic, partition).and_then(|m| m.record(old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_records_follow_the_gaps_of_the_old_log() {
        // Old log: offsets 3, 4, 7, 8, 12 (0-2 deleted, 5-6 and 9-11 compacted away); restored
        // after 10 records already in the topic.
        let mut map = PartitionMap::new(10);
        for o in [3, 4, 7, 8, 12] {
            map.push(o).expect("in order");
        }
        assert_eq!(map.record(7), Some(12));
        assert_eq!(map.record(5), None, "a compacted record has no new offset");
        // Next offset to read: before everything, inside a gap, at a record, at the end.
        assert_eq!(map.position(0), 10);
        assert_eq!(
            map.position(5),
            12,
            "the first record at or after it: old 7"
        );
        assert_eq!(map.position(7), 12);
        assert_eq!(map.position(9), 14, "old 12, the last record");
        assert_eq!(map.position(13), 15, "past the last record: the new end");
        assert_eq!(map.expected(4), 14);
        assert!(map.push(12).is_err(), "offsets must increase");
    }
}
