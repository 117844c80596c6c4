//! The embedded broker's in-memory state: per topic an index of its
//! records in the log, per (topic, group) a cursor and the pending set.
//! This is what deliveries are picked from; the checkpointer copies the
//! changed parts to redb.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::log::Loc;

#[derive(Debug)]
pub(crate) struct State {
    /// The next sequence the writer assigns; every record below it is in
    /// the log and indexed.
    pub next_seq: u64,
    pub topics: HashMap<String, Topic>,
    /// Oldest first; the last is the one being appended to.
    pub segments: VecDeque<Segment>,
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Highest sequence per topic in this segment (for retention).
    pub topics: HashMap<String, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Topic {
    /// The topic's records, ascending by sequence.
    pub index: VecDeque<Loc>,
    pub groups: HashMap<String, Group>,
}

#[derive(Debug)]
pub(crate) struct Pending {
    /// Deliveries so far.
    pub attempt: u32,
    /// When it may be delivered (again).
    pub due: Instant,
    /// Set by nack: `due` is a not-before kept across restarts. Unset: an
    /// ack deadline, which a restart makes due at once (every consumer of
    /// the old process is gone).
    pub delayed: bool,
}

#[derive(Debug)]
pub(crate) struct Group {
    /// Every record of the topic below this was delivered at least once
    /// (or predates the group).
    pub cursor: u64,
    /// Delivered or nacked, not acked.
    pub pending: BTreeMap<u64, Pending>,
    /// (due, seq) of every pending entry.
    pub timers: BTreeSet<(Instant, u64)>,
    /// Pending seqs changed since the last checkpoint.
    pub dirty: HashSet<u64>,
    /// The cursor changed (or the group is new) since the last checkpoint.
    pub row_dirty: bool,
    /// The group's row is in redb.
    pub persisted: bool,
    /// The lowest sequence the durable (checkpointed) state may still
    /// need; retention keeps everything from here on.
    pub durable_low: u64,
    /// Woken on publish to the topic and on nack.
    pub notify: Arc<Notify>,
}

impl Group {
    pub fn new(cursor: u64) -> Group {
        Group {
            cursor,
            pending: BTreeMap::new(),
            timers: BTreeSet::new(),
            dirty: HashSet::new(),
            row_dirty: true,
            persisted: false,
            durable_low: cursor,
            notify: Arc::new(Notify::new()),
        }
    }

    /// The lowest sequence this group's current state needs.
    pub fn low(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.cursor)
            .min(self.cursor)
    }

    pub fn insert(&mut self, seq: u64, p: Pending) {
        self.timers.insert((p.due, seq));
        if let Some(old) = self.pending.insert(seq, p) {
            self.timers.remove(&(old.due, seq));
        }
        self.dirty.insert(seq);
    }

    pub fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        self.timers.remove(&(p.due, seq));
        self.dirty.insert(seq);
        Some(p)
    }
}

/// What a subscription should do next.
#[derive(Debug)]
pub(crate) enum Pick {
    /// Deliver this record (`attempt` counts this delivery).
    Deliver {
        loc: Loc,
        attempt: u32,
        file: Arc<File>,
        path: PathBuf,
    },
    /// Nothing now; look again at this time (or when notified).
    Wait(Option<Instant>),
}

impl State {
    fn segment(&self, id: u64) -> Option<&Segment> {
        let i = self.segments.partition_point(|s| s.id < id);
        self.segments.get(i).filter(|s| s.id == id)
    }

    /// Takes the next delivery for (topic, group): a due redelivery first,
    /// then the next new record.
    pub fn pick(&mut self, topic: &str, group: &str, ack_timeout: Duration) -> Pick {
        let now = Instant::now();
        let Some(t) = self.topics.get_mut(topic) else {
            return Pick::Wait(None);
        };
        let Some(g) = t.groups.get_mut(group) else {
            return Pick::Wait(None);
        };
        let chosen = loop {
            if let Some(&(due, seq)) = g.timers.first() {
                if due <= now {
                    let attempt = g.pending.get(&seq).map_or(0, |p| p.attempt);
                    let i = t.index.partition_point(|l| l.seq < seq);
                    match t.index.get(i).filter(|l| l.seq == seq) {
                        Some(loc) => {
                            let attempt = attempt.saturating_add(1);
                            let loc = *loc;
                            g.insert(
                                seq,
                                Pending {
                                    attempt,
                                    due: now + ack_timeout,
                                    delayed: false,
                                },
                            );
                            break Some((loc, attempt));
                        }
                        None => {
                            // Its record is gone (lost with an unsynced
                            // tail): nothing left to deliver.
                            g.remove(seq);
                            continue;
                        }
                    }
                }
            }
            let i = t.index.partition_point(|l| l.seq < g.cursor);
            match t.index.get(i) {
                Some(loc) => {
                    let loc = *loc;
                    g.cursor = loc.seq + 1;
                    g.row_dirty = true;
                    g.insert(
                        loc.seq,
                        Pending {
                            attempt: 1,
                            due: now + ack_timeout,
                            delayed: false,
                        },
                    );
                    break Some((loc, 1));
                }
                None => break None,
            }
        };
        match chosen {
            Some((loc, attempt)) => match self.segment(loc.seg) {
                Some(seg) => Pick::Deliver {
                    loc,
                    attempt,
                    file: seg.file.clone(),
                    path: seg.path.clone(),
                },
                // Retention never removes what a group still needs.
                None => Pick::Wait(Some(now + Duration::from_millis(10))),
            },
            None => {
                let next = self
                    .topics
                    .get(topic)
                    .and_then(|t| t.groups.get(group))
                    .and_then(|g| g.timers.first().map(|(d, _)| *d));
                Pick::Wait(next)
            }
        }
    }

    /// Removes the oldest segments whose every record no durable group
    /// state still needs. Returns their paths (to delete outside the lock).
    pub fn trim(&mut self) -> Vec<PathBuf> {
        let mut gone = Vec::new();
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            let needed = seg.topics.iter().any(|(name, max)| {
                self.topics.get(name).is_some_and(|t| {
                    t.groups
                        .values()
                        .any(|g| *max >= g.durable_low.min(g.low()))
                })
            });
            if needed {
                break;
            }
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            for name in seg.topics.keys() {
                if let Some(t) = self.topics.get_mut(name) {
                    while t.index.front().is_some_and(|l| l.seg == seg.id) {
                        t.index.pop_front();
                    }
                    if t.index.is_empty() && t.groups.is_empty() {
                        self.topics.remove(name);
                    }
                }
            }
            gone.push(seg.path);
        }
        gone
    }
}
