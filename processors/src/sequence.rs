//! Sequenced dead letters: once a key has a record on the dead-letter topic, its later records
//! wait behind it, so an order whose event is poisoned is never overtaken by its own later
//! events (docs/architecture.md, "Sequenced dead letters").
//!
//! This module owns the decision, per input record, of a processor with a changelog:
//!
//! - A record that fails (poison, undecodable) **parks** its key: it goes to the dead-letter
//!   topic as the first letter (place 0) of a *chain* named after its source position
//!   (`TOPIC/PARTITION/OFFSET`), and the key gets a [`ParkedKey`] entry in the state.
//! - Every later record of a parked key is **held**: it goes to the dead-letter topic as the
//!   chain's next letter, marked held, without being processed.
//! - Letters are **released** in their order (`orderflow dlq`, `orderflow_deadletters`): a
//!   redrive puts the event back on the source topic with the release headers
//!   ([`headers::RELEASE_CHAIN`], [`headers::RELEASE_SEQUENCE`]); a discard writes a release
//!   marker (the same headers, no value). The consumer processes a release only when it is the
//!   one its key expects next; anything else that arrives for a parked key — a new record, a
//!   release out of turn, a second copy of one already passed — is held again behind the
//!   chain, so nothing overtakes and nothing is lost (a second copy of an event keeps its event
//!   id, and rule 2 drops it when it comes through).
//! - A released event that fails again becomes the chain's newest letter and the key now
//!   expects that one: releases already on their way behind it are held again, in their order.
//! - The key is unparked once every letter of its chain has come through.
//!
//! Every decision is a function of the input record and the state, so a re-run after a crash
//! makes the same letters at the same places (rule 1); a letter written twice that way has the
//! same chain and place, which is how the dead-letter tools recognise the copy.
//!
//! **Bounds.** A parked key is one small entry, whatever the number of records held behind it
//! (those are on the dead-letter topic, whose retention bounds them). At most
//! [`MAX_PARKED_KEYS`] keys per partition are parked; past that a failing record goes to the
//! dead-letter topic unsequenced (its key's later records are not held), logged and counted.

use orderflow_schemas::headers;
use serde::{Deserialize, Serialize};

use crate::state::{ChangelogRecord, PartitionState, Store};

/// Changelog prefix of the parked keys; no step key starts with `__`.
pub const PARKED_PREFIX: &str = "__parked/";

/// The most keys one partition keeps parked (about 100 bytes of state each).
pub const MAX_PARKED_KEYS: usize = 10_000;

/// A parked key: its chain, the place the next letter of the chain gets, and the place whose
/// release the key waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    pub chain: String,
    pub next: u64,
    pub expect: u64,
}

/// A release, as read off a record's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub chain: String,
    pub sequence: u64,
}

impl Release {
    /// The release headers of a record, if it has both and they parse.
    pub fn from_headers(lookup: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let chain = lookup(headers::RELEASE_CHAIN)?;
        let sequence = lookup(headers::RELEASE_SEQUENCE)?.parse().ok()?;
        Some(Self { chain, sequence })
    }
}

/// A letter's place in its chain, written in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub chain: String,
    pub sequence: u64,
    /// Held behind the chain rather than failed.
    pub held: bool,
}

impl Place {
    /// The headers that say so ([`headers::DLQ_CHAIN`] and the rest).
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (headers::DLQ_CHAIN, self.chain.clone()),
            (headers::DLQ_SEQUENCE, self.sequence.to_string()),
            (headers::DLQ_HELD, self.held.to_string()),
        ]
    }
}

/// What to do with an input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Its key is not parked: process it.
    Process,
    /// The release its parked key waits for: process it, then [`Parked::passed`].
    Released,
    /// The release marker its parked key waits for (a discarded letter): [`Parked::passed`].
    Discarded,
    /// Its key is parked and this is not the release it waits for: [`Parked::hold`] it.
    Hold,
    /// A release marker for a key that does not wait for it: nothing to do.
    Skip,
}

/// One partition's parked keys, kept in the changelog under [`PARKED_PREFIX`].
#[derive(Debug)]
pub struct Parked {
    keys: Store<ParkedKey>,
}

impl Default for Parked {
    fn default() -> Self {
        Self {
            keys: Store::new(PARKED_PREFIX),
        }
    }
}

impl Parked {
    /// Decides about a record with `key`, its release headers and whether it is a marker (no
    /// value).
    pub fn admit(&self, key: Option<&str>, release: Option<&Release>, marker: bool) -> Admit {
        let Some(parked) = key.and_then(|k| self.keys.get(k)) else {
            return if marker { Admit::Skip } else { Admit::Process };
        };
        let awaited =
            release.is_some_and(|r| r.chain == parked.chain && r.sequence == parked.expect);
        match (awaited, marker) {
            (true, false) => Admit::Released,
            (true, true) => Admit::Discarded,
            // A marker out of turn carries nothing to hold: its letter was resolved already.
            (false, true) => Admit::Skip,
            (false, false) => Admit::Hold,
        }
    }

    /// A record of parked `key` is held: the place of its letter.
    pub fn hold(&mut self, key: &str) -> Option<Place> {
        let parked = self.keys.get_mut(key)?;
        let place = Place {
            chain: parked.chain.clone(),
            sequence: parked.next,
            held: true,
        };
        parked.next += 1;
        Some(place)
    }

    /// The release parked `key` waited for came through (processed, or a marker): the key
    /// waits for the next one, or is unparked when that was the chain's last letter.
    pub fn passed(&mut self, key: &str) {
        let done = match self.keys.get_mut(key) {
            Some(parked) => {
                parked.expect += 1;
                parked.expect >= parked.next
            }
            None => false,
        };
        if done {
            self.keys.remove(key);
        }
    }

    /// A record with `key` read at `source` (`TOPIC/PARTITION/OFFSET`) failed: the place of its
    /// letter. A parked key's chain grows by it and waits for it next; any other key is parked
    /// with it as the chain's first letter. `None`: it goes unsequenced (no key, or
    /// [`MAX_PARKED_KEYS`] are parked already).
    pub fn failed(&mut self, key: Option<&str>, source: &str) -> Option<Place> {
        let key = key?;
        if let Some(parked) = self.keys.get_mut(key) {
            let place = Place {
                chain: parked.chain.clone(),
                sequence: parked.next,
                held: false,
            };
            parked.expect = parked.next;
            parked.next += 1;
            return Some(place);
        }
        if self.keys.len() >= MAX_PARKED_KEYS {
            return None;
        }
        self.keys.put(
            key.to_owned(),
            ParkedKey {
                chain: source.to_owned(),
                next: 1,
                expect: 0,
            },
        );
        Some(Place {
            chain: source.to_owned(),
            sequence: 0,
            held: false,
        })
    }

    /// Keys parked now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&ParkedKey> {
        self.keys.get(key)
    }
}

/// A step's state with its partition's parked keys beside it, in the same changelog.
#[derive(Debug, Default)]
pub struct Sequenced<T> {
    pub step: T,
    pub parked: Parked,
}

impl<T: PartitionState> PartitionState for Sequenced<T> {
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if self.parked.keys.owns(key) {
            self.parked.keys.restore(key, value).map(|_| ())
        } else {
            self.step.restore(key, value)
        }
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        let mut out = self.step.changes();
        self.parked.keys.changes_into(&mut out);
        out
    }

    fn note_written_at(&mut self, key: &str, written_at_ms: i64) {
        if !self.parked.keys.owns(key) {
            self.step.note_written_at(key, written_at_ms);
        }
    }

    fn restored(&mut self) {
        self.step.restored();
    }

    fn entries(&self) -> usize {
        self.step.entries() + self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(chain: &str, sequence: u64) -> Release {
        Release {
            chain: chain.into(),
            sequence,
        }
    }

    /// Runs records through the rules the way the runtime does: `(key, release, marker,
    /// fails)`; returns what became of each (`P`rocessed, `H`eld at a place, `F`ailed at a
    /// place, `S`kipped, `D`iscard passed).
    fn run(parked: &mut Parked, records: &[(&str, Option<Release>, bool, bool)]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, (key, release, marker, fails)) in records.iter().enumerate() {
            let source = format!("t/0/{i}");
            let admit = parked.admit(Some(key), release.as_ref(), *marker);
            out.push(match admit {
                Admit::Skip => "S".to_owned(),
                Admit::Discarded => {
                    parked.passed(key);
                    "D".to_owned()
                }
                Admit::Hold => {
                    let place = parked.hold(key).expect("parked");
                    assert!(place.held);
                    format!("H{}", place.sequence)
                }
                Admit::Process | Admit::Released => {
                    if *fails {
                        let place = parked.failed(Some(key), &source).expect("room");
                        assert!(!place.held);
                        format!("F{}:{}", place.chain, place.sequence)
                    } else {
                        if admit == Admit::Released {
                            parked.passed(key);
                        }
                        "P".to_owned()
                    }
                }
            });
        }
        out
    }

    #[test]
    fn a_failed_record_parks_its_key_and_its_later_records_wait_in_order() {
        let mut parked = Parked::default();
        let chain = "t/0/0";
        let got = run(
            &mut parked,
            &[
                ("a", None, false, true),  // fails: parks a
                ("b", None, false, false), // other keys flow
                ("a", None, false, false), // held 1
                ("a", None, false, false), // held 2
                // Out of turn: place 2 released before 0 is held again (place 3).
                ("a", Some(release(chain, 2)), false, false),
                ("a", Some(release(chain, 0)), false, false), // the head, corrected
                ("a", Some(release(chain, 1)), false, false),
                ("a", Some(release(chain, 2)), false, false),
                ("a", Some(release(chain, 3)), false, false), // the last: unparks
                ("a", None, false, false),
            ],
        );
        assert_eq!(
            got,
            ["Ft/0/0:0", "P", "H1", "H2", "H3", "P", "P", "P", "P", "P"]
        );
        assert!(parked.is_empty(), "{parked:?}");
    }

    #[test]
    fn a_discard_marker_passes_its_letter_and_stray_markers_are_skipped() {
        let mut parked = Parked::default();
        let chain = "t/0/0";
        let got = run(
            &mut parked,
            &[
                ("a", None, false, true),
                ("a", None, false, false),                   // held 1
                ("a", Some(release(chain, 1)), true, false), // marker out of turn
                ("a", Some(release(chain, 0)), true, false), // discard of the head
                ("a", None, false, false),                   // still waits for 1: held 2
                ("a", Some(release(chain, 1)), false, false),
                ("a", Some(release(chain, 2)), false, false),
                ("b", Some(release(chain, 0)), true, false), // b is not parked
            ],
        );
        assert_eq!(got, ["Ft/0/0:0", "H1", "S", "D", "H2", "P", "P", "S"]);
        assert!(parked.is_empty());
    }

    #[test]
    fn a_release_that_fails_again_holds_the_releases_behind_it() {
        let mut parked = Parked::default();
        let chain = "t/0/0";
        let got = run(
            &mut parked,
            &[
                ("a", None, false, true),
                ("a", None, false, false), // held 1
                // The tool redrives 0 (still bad) and releases 1 right behind it.
                ("a", Some(release(chain, 0)), false, true),
                ("a", Some(release(chain, 1)), false, false),
            ],
        );
        // 0 fails again as place 2, which the key waits for now; 1 is held again behind it.
        assert_eq!(got, ["Ft/0/0:0", "H1", "Ft/0/0:2", "H3"]);
        assert_eq!(
            parked.get("a"),
            Some(&ParkedKey {
                chain: chain.into(),
                next: 4,
                expect: 2
            })
        );
        let got = run(
            &mut parked,
            &[
                ("a", Some(release(chain, 2)), false, false),
                ("a", Some(release(chain, 3)), false, false),
            ],
        );
        assert_eq!(got, ["P", "P"]);
        assert!(parked.is_empty());
    }

    #[test]
    fn a_hot_key_holds_any_number_of_records_in_one_small_entry() {
        let mut parked = Parked::default();
        parked.failed(Some("sku-1"), "t/0/0");
        for _ in 0..50_000 {
            parked.hold("sku-1").expect("parked");
        }
        let mut state = Sequenced::<crate::state::NoState> {
            parked,
            ..Sequenced::default()
        };
        let changes = state.changes();
        assert_eq!(changes.len(), 1);
        let (key, value) = &changes[0];
        assert_eq!(key, "__parked/sku-1");
        let value = value.as_deref().expect("a value");
        assert!(value.len() < 100, "{}", String::from_utf8_lossy(value));
        // And it restores.
        let mut restored = Sequenced::<crate::state::NoState>::default();
        restored.restore(key, Some(value)).expect("restores");
        assert_eq!(restored.parked.get("sku-1").map(|p| p.next), Some(50_001));
    }

    #[test]
    fn parked_keys_are_bounded_and_past_the_bound_letters_go_unsequenced() {
        let mut parked = Parked::default();
        for i in 0..MAX_PARKED_KEYS {
            assert!(parked.failed(Some(&format!("k{i}")), "t/0/0").is_some());
        }
        assert_eq!(parked.failed(Some("one-more"), "t/0/1"), None);
        assert_eq!(parked.len(), MAX_PARKED_KEYS);
        assert_eq!(parked.admit(Some("one-more"), None, false), Admit::Process);
        // A record without a key cannot be sequenced either.
        assert_eq!(parked.failed(None, "t/0/2"), None);
    }
}
