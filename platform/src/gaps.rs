//! Offset gaps: a partition's records read twice before a gap in their offsets is passed over.
//!
//! A consumer moves past whatever offsets a fetch did not return. On Kafka a gap in a
//! partition's offsets is a transaction marker, an aborted record hidden by `read_committed`, or
//! a record compaction removed: nothing to read. Tansu's memory store assigns a batch its
//! offsets (moves the high watermark) before it stores the batch, so a fetch running between the
//! two for one producer and a later producer's completed write serves the later records and
//! skips the earlier ones — and the consumer never comes back for them (measured: the crash
//! tests' readers passed over up to a few hundred records; docs/architecture.md).
//!
//! With `kafka.recheck_offset_gaps` on, the consumers that keep state (processors and
//! projections) put every batch through a [`GapGuard`]: at the first gap of a partition not
//! read before, the records from the gap on are held back and the partition is sought back to
//! the first missing offset; the records come again, with the missing ones if they have been
//! stored since. A gap found on two reads is real (a marker) and is passed. Records are applied
//! in log order either way, so the outputs stay a function of the log (docs/architecture.md, rule 1).
//! The cost is a second fetch of each batch that holds a gap — every transaction leaves a
//! marker — which is why it is off on brokers that never serve a record before an earlier one
//! is readable.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use rdkafka::{
    consumer::Consumer,
    error::KafkaError,
    message::{Message, OwnedMessage},
    Offset,
};
use tracing::debug;

/// A partition: topic and number.
pub type TopicPartition = (String, i32);

/// Where a partition must be read again from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reread {
    pub topic: String,
    pub partition: i32,
    /// The first offset the last read passed over.
    pub from: i64,
}

/// Tracks the next expected offset of each partition and sends every gap back for a second
/// read once. One per consumer session.
#[derive(Debug, Default)]
pub struct GapGuard {
    enabled: bool,
    /// The offset after the last record passed, per partition.
    next: BTreeMap<TopicPartition, i64>,
    /// Gaps read once, per partition: (first missing offset, the record after the gap). A gap
    /// found again on a later read is passed.
    seen: BTreeMap<TopicPartition, BTreeSet<(i64, i64)>>,
    rereads: u64,
}

impl GapGuard {
    /// A guard that checks (`enabled`) or passes every batch through unchanged.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// The partition's next record is expected at `offset` (a position restored on
    /// assignment): a first record above it is a gap too.
    pub fn expect(&mut self, topic: &str, partition: i32, offset: i64) {
        self.next.insert((topic.to_owned(), partition), offset);
    }

    /// Keeps only the partitions `keep` says are still assigned.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, i32) -> bool) {
        self.next.retain(|(t, p), _| keep(t, *p));
        self.seen.retain(|(t, p), _| keep(t, *p));
    }

    /// How many times a partition was sent back for a second read so far.
    pub fn rereads(&self) -> u64 {
        self.rereads
    }

    /// [`GapGuard::check`], then seeks `consumer` back for each partition to read again.
    /// Returns the records to apply now and how many partitions were sent back. The records held
    /// back are neither applied nor counted in the positions stored after the batch, so a crash
    /// before their second read resumes before them: nothing is lost or applied twice.
    /// The seeks run off the async workers ([`crate::kafka::off_runtime`]).
    pub async fn check_and_seek<C, X>(
        &mut self,
        consumer: &std::sync::Arc<C>,
        batch: Vec<OwnedMessage>,
    ) -> Result<(Vec<OwnedMessage>, usize), KafkaError>
    where
        C: Consumer<X> + Send + Sync + 'static,
        X: rdkafka::consumer::ConsumerContext + 'static,
    {
        let (kept, rereads) = self.check(batch);
        let count = rereads.len();
        for reread in rereads {
            debug!(
                topic = %reread.topic,
                partition = reread.partition,
                from = reread.from,
                "Reading a gap in the offsets again."
            );
            crate::kafka::off_runtime(consumer, move |c| {
                c.seek(
                    &reread.topic,
                    reread.partition,
                    Offset::Offset(reread.from),
                    Duration::from_secs(10),
                )
            })
            .await?;
        }
        Ok((kept, count))
    }

    /// Splits a batch: the records to apply now, in their order, and the partitions to seek back.
    /// At a partition's first gap not read before, its records from there on are held back
    /// (they come again after the seek) and every gap among them is noted as read once, so the
    /// second read passes them all: one seek per partition and batch, however many markers the
    /// batch holds. Records below a partition's expected offset pass unchanged: the consumers
    /// drop what they applied already.
    pub fn check(&mut self, batch: Vec<OwnedMessage>) -> (Vec<OwnedMessage>, Vec<Reread>) {
        if !self.enabled {
            return (batch, Vec::new());
        }
        // Partitions held back in this batch, with the offset of the last record held.
        let mut held: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        let mut rereads = Vec::new();
        let mut kept = Vec::with_capacity(batch.len());
        for message in batch {
            let key = (message.topic().to_owned(), message.partition());
            let offset = message.offset();
            if let Some(last) = held.get_mut(&key) {
                if offset > *last + 1 {
                    self.seen
                        .entry(key.clone())
                        .or_default()
                        .insert((*last + 1, offset));
                }
                *last = (*last).max(offset);
                continue;
            }
            match self.next.get(&key).copied() {
                Some(expected) if offset > expected => {
                    let seen = self.seen.entry(key.clone()).or_default();
                    if !seen.remove(&(expected, offset)) {
                        // Not read before: read it again, with what follows.
                        seen.insert((expected, offset));
                        self.rereads += 1;
                        rereads.push(Reread {
                            topic: key.0.clone(),
                            partition: key.1,
                            from: expected,
                        });
                        held.insert(key, offset);
                        continue;
                    }
                    // Read twice, still missing: a transaction marker or a removed record.
                }
                Some(expected) if offset < expected => {
                    kept.push(message);
                    continue;
                }
                _ => {}
            }
            self.next.insert(key, offset + 1);
            kept.push(message);
        }
        // Gaps behind a partition's position will not come again.
        for (key, gaps) in &mut self.seen {
            if let Some(next) = self.next.get(key) {
                gaps.retain(|(from, _)| from >= next);
            }
        }
        (kept, rereads)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::{message::OwnedMessage, Timestamp};

    use super::*;

    fn record(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(vec![]),
            None,
            "t".to_owned(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn offsets(batch: &[OwnedMessage]) -> Vec<(i32, i64)> {
        batch.iter().map(|m| (m.partition(), m.offset())).collect()
    }

    #[test]
    fn contiguous_records_pass_and_a_disabled_guard_passes_everything() {
        let mut guard = GapGuard::new(true);
        let (kept, rereads) = guard.check(vec![record(0, 0), record(0, 1), record(1, 7)]);
        assert_eq!(offsets(&kept), vec![(0, 0), (0, 1), (1, 7)]);
        assert!(rereads.is_empty());

        let mut off = GapGuard::new(false);
        off.expect("t", 0, 0);
        let (kept, rereads) = off.check(vec![record(0, 5)]);
        assert_eq!(offsets(&kept), vec![(0, 5)]);
        assert!(rereads.is_empty());
    }

    #[test]
    fn a_gap_is_read_again_and_a_record_found_there_comes_first() {
        let mut guard = GapGuard::new(true);
        let (kept, rereads) =
            guard.check(vec![record(0, 0), record(0, 2), record(1, 0), record(0, 3)]);
        // Partition 0 holds back from its gap; partition 1 goes on.
        assert_eq!(offsets(&kept), vec![(0, 0), (1, 0)]);
        assert_eq!(
            rereads,
            vec![Reread {
                topic: "t".into(),
                partition: 0,
                from: 1
            }]
        );
        // The second read finds offset 1, stored meanwhile.
        let (kept, rereads) = guard.check(vec![record(0, 1), record(0, 2), record(0, 3)]);
        assert_eq!(offsets(&kept), vec![(0, 1), (0, 2), (0, 3)]);
        assert!(rereads.is_empty());
        assert_eq!(guard.rereads(), 1);
    }

    #[test]
    fn a_gap_still_there_on_the_second_read_is_passed() {
        let mut guard = GapGuard::new(true);
        guard.expect("t", 0, 10);
        let (kept, rereads) = guard.check(vec![record(0, 11)]);
        assert!(kept.is_empty());
        assert_eq!(rereads.len(), 1);
        let (kept, rereads) = guard.check(vec![record(0, 11), record(0, 13)]);
        // 10 is a marker; 12 is a new gap, read again in its turn.
        assert_eq!(offsets(&kept), vec![(0, 11)]);
        assert_eq!(rereads[0].from, 12);
        let (kept, rereads) = guard.check(vec![record(0, 13)]);
        assert_eq!(offsets(&kept), vec![(0, 13)]);
        assert!(rereads.is_empty());
        assert_eq!(guard.rereads(), 2);
    }

    #[test]
    fn every_gap_of_a_batch_is_read_again_with_one_seek() {
        let mut guard = GapGuard::new(true);
        guard.expect("t", 0, 0);
        // Markers at 1, 4 and 7.
        let first = vec![0, 2, 3, 5, 6, 8].into_iter().map(|o| record(0, o));
        let (kept, rereads) = guard.check(first.collect());
        assert_eq!(offsets(&kept), vec![(0, 0)]);
        assert_eq!(rereads.len(), 1);
        assert_eq!(rereads[0].from, 1);
        // The second read finds the same gaps and passes them all.
        let again = vec![2, 3, 5, 6, 8, 10].into_iter().map(|o| record(0, o));
        let (kept, rereads) = guard.check(again.collect());
        assert_eq!(
            offsets(&kept),
            vec![(0, 2), (0, 3), (0, 5), (0, 6), (0, 8)],
            "10 jumps over 9, a gap the first read did not see"
        );
        assert_eq!(rereads[0].from, 9);
        assert_eq!(guard.rereads(), 2);
    }

    #[test]
    fn records_below_the_expected_offset_pass_and_revoked_partitions_are_forgotten() {
        let mut guard = GapGuard::new(true);
        guard.expect("t", 0, 5);
        guard.expect("t", 1, 5);
        let (kept, _) = guard.check(vec![record(0, 3), record(0, 5)]);
        assert_eq!(offsets(&kept), vec![(0, 3), (0, 5)]);
        guard.retain(|_, p| p == 0);
        // Partition 1 was revoked: its next assignment starts without an expectation.
        let (kept, rereads) = guard.check(vec![record(1, 9)]);
        assert_eq!(offsets(&kept), vec![(1, 9)]);
        assert!(rereads.is_empty());
    }
}
