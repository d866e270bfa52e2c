//! Group offset commits, coalesced: one OffsetCommit for many batches.
//!
//! The processors and projections keep their positions with their state (the changelog, the
//! database) and resume from there; the group offset is a starting hint, and the only stored
//! position of a stateless processor, whose re-reads every consumer downstream drops
//! (docs/architecture.md, rules 1 and 2). So it need not be sent after every batch. At low load
//! a batch is one record, and an OffsetCommit per batch was a third of a processor's requests to
//! the broker.
//!
//! A runtime hands every committed batch's next offsets to [`GroupCommits::record`] and sends
//! what [`GroupCommits::due`] returns, asynchronously, after the batch: at most once per
//! [`GROUP_COMMIT_INTERVAL`] while batches keep coming, and at once when a poll comes back empty,
//! so an idle consumer's group offset is never more than one poll behind what it processed. At
//! shutdown the runtime commits [`GroupCommits::all`] synchronously.
//!
//! A commit carries only the partitions that moved since the last one: each partition is a
//! write on the broker (an SQL statement on the embedded one).
//!
//! **Bound.** One offset per assigned partition: [`GroupCommits::retain`] forgets the
//! partitions this member no longer holds, so a stale offset is never sent over a new owner's.
//! The runtimes call it with the assignment they already track (as for `GapGuard::retain`).
//!
//! **Crash.** A crash loses at most the offsets of the last interval: the partition is read
//! again from the previous group offset (or from the state's own position, which is never
//! later), and the repeated records are dropped by the idempotent steps and consumers. Nothing
//! is committed before its batch's effects are durable, so nothing is lost either. The commits
//! are sent by the runtime itself, never by librdkafka's auto-commit: an auto-committing
//! consumer's close commits what it stored and waits for a broker that may be gone
//! (BENCHMARKS.md, "Offset commits coalesced").

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use rdkafka::{error::KafkaError, Offset, TopicPartitionList};

/// How long processed offsets may wait for their group commit while batches keep coming.
pub const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The next offset to read of each partition processed, and which the group does not have yet.
#[derive(Debug)]
pub struct GroupCommits {
    next: BTreeMap<(String, i32), i64>,
    unsent: BTreeSet<(String, i32)>,
    last_sent: Instant,
    interval: Duration,
}

impl Default for GroupCommits {
    fn default() -> Self {
        Self::new(GROUP_COMMIT_INTERVAL)
    }
}

impl GroupCommits {
    /// Commits at most once per `interval` while batches keep coming.
    pub fn new(interval: Duration) -> Self {
        Self {
            next: BTreeMap::new(),
            unsent: BTreeSet::new(),
            last_sent: Instant::now(),
            interval,
        }
    }

    /// A batch whose effects are durable: its next offsets (as [`crate::kafka::next_offsets`]
    /// returns them) are to be committed. An offset never moves back.
    pub fn record(&mut self, offsets: &TopicPartitionList) {
        for element in offsets.elements() {
            if let Offset::Offset(next) = element.offset() {
                let partition = (element.topic().to_owned(), element.partition());
                let entry = self.next.entry(partition.clone()).or_insert(next);
                *entry = (*entry).max(next);
                self.unsent.insert(partition);
            }
        }
    }

    /// Forgets every partition for which `held(topic, partition)` is false (revoked ones).
    pub fn retain(&mut self, mut held: impl FnMut(&str, i32) -> bool) {
        self.next
            .retain(|(topic, partition), _| held(topic, *partition));
        let next = &self.next;
        self.unsent.retain(|key| next.contains_key(key));
    }

    /// The offsets to commit now, if any: those of the partitions that moved since the last
    /// commit, once either `idle` (the last poll came back empty) or the interval has passed
    /// since the last commit. Counts them as sent.
    pub fn due(&mut self, idle: bool) -> Result<Option<TopicPartitionList>, KafkaError> {
        if self.unsent.is_empty() || !(idle || self.last_sent.elapsed() >= self.interval) {
            return Ok(None);
        }
        let mut offsets = TopicPartitionList::new();
        for key in std::mem::take(&mut self.unsent) {
            if let Some(next) = self.next.get(&key) {
                offsets.add_partition_offset(&key.0, key.1, Offset::Offset(*next))?;
            }
        }
        self.last_sent = Instant::now();
        Ok((offsets.count() > 0).then_some(offsets))
    }

    /// Every partition's next offset, sent or not: what a shutdown commits synchronously.
    pub fn all(&self) -> Result<TopicPartitionList, KafkaError> {
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &self.next {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        Ok(offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(entries: &[(&str, i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in entries {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .expect("an offset is set");
        }
        tpl
    }

    fn pairs(tpl: &TopicPartitionList) -> Vec<(String, i32, Offset)> {
        tpl.elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition(), e.offset()))
            .collect()
    }

    #[test]
    fn many_batches_within_the_interval_make_one_commit_of_the_latest_offsets() {
        let mut commits = GroupCommits::new(Duration::from_secs(3600));
        for next in 1..=100 {
            commits.record(&offsets(&[("t", 0, next)]));
            assert!(
                commits.due(false).expect("offsets").is_none(),
                "batch {next} was committed on its own"
            );
        }
        commits.record(&offsets(&[("t", 1, 7)]));
        let sent = commits.due(true).expect("offsets").expect("idle commits");
        assert_eq!(
            pairs(&sent),
            vec![
                ("t".to_owned(), 0, Offset::Offset(100)),
                ("t".to_owned(), 1, Offset::Offset(7))
            ]
        );
        assert!(
            commits.due(true).expect("offsets").is_none(),
            "nothing new, yet committed again"
        );
        // Only what moved is sent again; the shutdown commit has every partition.
        commits.record(&offsets(&[("t", 1, 8)]));
        let sent = commits.due(true).expect("offsets").expect("idle commits");
        assert_eq!(pairs(&sent), vec![("t".to_owned(), 1, Offset::Offset(8))]);
        assert_eq!(
            pairs(&commits.all().expect("offsets")),
            vec![
                ("t".to_owned(), 0, Offset::Offset(100)),
                ("t".to_owned(), 1, Offset::Offset(8))
            ]
        );
    }

    #[test]
    fn the_interval_sends_while_batches_keep_coming() {
        let mut commits = GroupCommits::new(Duration::ZERO);
        commits.record(&offsets(&[("t", 0, 5)]));
        let sent = commits
            .due(false)
            .expect("offsets")
            .expect("interval passed");
        assert_eq!(pairs(&sent), vec![("t".to_owned(), 0, Offset::Offset(5))]);
    }

    #[test]
    fn an_offset_never_moves_back_and_revoked_partitions_are_forgotten() {
        let mut commits = GroupCommits::new(Duration::from_secs(3600));
        commits.record(&offsets(&[("t", 0, 9), ("t", 1, 4)]));
        commits.record(&offsets(&[("t", 0, 3)]));
        commits.retain(|topic, partition| (topic, partition) == ("t", 0));
        let sent = commits.due(true).expect("offsets").expect("idle commits");
        assert_eq!(pairs(&sent), vec![("t".to_owned(), 0, Offset::Offset(9))]);
        assert_eq!(pairs(&commits.all().expect("offsets")), pairs(&sent));
    }

    #[test]
    fn nothing_recorded_commits_nothing() {
        let mut commits = GroupCommits::new(Duration::ZERO);
        assert!(commits.due(true).expect("offsets").is_none());
        commits.record(&offsets(&[("t", 0, 1)]));
        commits.retain(|_, _| false);
        assert!(commits.due(true).expect("offsets").is_none());
    }
}
