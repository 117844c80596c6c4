//! The embedded broker's durable group state in redb (`state.redb`):
//! cursors and pending sets change in place, which a B-tree with atomic
//! commits suits; they are written by the checkpointer, off the publish and
//! delivery paths, so redb's fsync per commit costs no latency there.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::time::Instant;

use crate::{Error, Result};

/// (topic, group) → cursor.
const GROUPS: TableDefinition<(&str, &str), u64> = TableDefinition::new("groups");
/// (topic, group, seq) → (attempt, delayed 0/1, due in ms since the epoch).
const PENDING: TableDefinition<(&str, &str, u64), (u32, u8, u64)> = TableDefinition::new("pending");
/// "next_seq" → a floor for the next sequence: no sequence a checkpoint
/// mentions is ever issued again, even when the log lost its unsynced tail.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(crate) fn backend(path: &Path, e: impl Into<redb::Error>) -> Error {
    Error::Backend(format!("embedded pubsub: {}: {}", path.display(), e.into()))
}

pub(crate) fn open(path: &Path) -> Result<Database> {
    // A broker dropped a moment ago may still be closing (its threads
    // finish their last checkpoint): wait a little before calling it busy.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let db = loop {
        match Database::create(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Backend(format!(
                    "embedded pubsub: {} is already open (another agent, or this component opened twice)",
                    path.display()
                )))
            }
            Err(e) => return Err(backend(path, e)),
        }
    };
    let txn = db.begin_write().map_err(|e| backend(path, e))?;
    txn.open_table(GROUPS).map_err(|e| backend(path, e))?;
    txn.open_table(PENDING).map_err(|e| backend(path, e))?;
    txn.open_table(META).map_err(|e| backend(path, e))?;
    txn.commit().map_err(|e| backend(path, e))?;
    Ok(db)
}

/// One pending entry as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    pub attempt: u32,
    pub delayed: bool,
    pub due_ms: u64,
}

/// Everything `open` reads back.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub groups: Vec<(String, String, u64)>,
    pub pending: Vec<(String, String, u64, Row)>,
    pub next_seq: u64,
}

pub(crate) fn load(db: &Database, path: &Path) -> Result<Loaded> {
    let e = |e: redb::Error| backend(path, e);
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let mut out = Loaded::default();
    let groups = txn.open_table(GROUPS).map_err(|x| e(x.into()))?;
    for row in groups.iter().map_err(|x| e(x.into()))? {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let (topic, group) = k.value();
        out.groups
            .push((topic.to_owned(), group.to_owned(), v.value()));
    }
    let pending = txn.open_table(PENDING).map_err(|x| e(x.into()))?;
    for row in pending.iter().map_err(|x| e(x.into()))? {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let (topic, group, seq) = k.value();
        let (attempt, delayed, due_ms) = v.value();
        out.pending.push((
            topic.to_owned(),
            group.to_owned(),
            seq,
            Row {
                attempt,
                delayed: delayed != 0,
                due_ms,
            },
        ));
    }
    let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
    out.next_seq = meta
        .get("next_seq")
        .map_err(|x| e(x.into()))?
        .map(|g| g.value())
        .unwrap_or(0);
    Ok(out)
}

/// The changes of one group since the last checkpoint.
#[derive(Debug)]
pub(crate) struct GroupChanges {
    pub topic: String,
    pub group: String,
    pub cursor: Option<u64>,
    /// `None` deletes the entry (acked, or its record is gone).
    pub pending: Vec<(u64, Option<Row>)>,
    /// The group's `low()` when the changes were taken.
    pub low: u64,
}

/// Writes one checkpoint in one fsync'd transaction.
pub(crate) fn write(
    db: &Database,
    path: &Path,
    changes: &[GroupChanges],
    next_seq: u64,
) -> Result<()> {
    let e = |e: redb::Error| backend(path, e);
    let mut txn = db.begin_write().map_err(|x| e(x.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|x| e(x.into()))?;
    {
        let mut groups = txn.open_table(GROUPS).map_err(|x| e(x.into()))?;
        let mut pending = txn.open_table(PENDING).map_err(|x| e(x.into()))?;
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        for c in changes {
            if let Some(cursor) = c.cursor {
                groups
                    .insert((c.topic.as_str(), c.group.as_str()), cursor)
                    .map_err(|x| e(x.into()))?;
            }
            for (seq, row) in &c.pending {
                let key = (c.topic.as_str(), c.group.as_str(), *seq);
                match row {
                    Some(r) => {
                        pending
                            .insert(key, (r.attempt, u8::from(r.delayed), r.due_ms))
                            .map_err(|x| e(x.into()))?;
                    }
                    None => {
                        pending.remove(key).map_err(|x| e(x.into()))?;
                    }
                }
            }
        }
        meta.insert("next_seq", next_seq).map_err(|x| e(x.into()))?;
    }
    txn.commit().map_err(|x| e(x.into()))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A monotonic instant as wall-clock ms (what survives a restart).
pub(crate) fn to_ms(due: Instant) -> u64 {
    let now = Instant::now();
    let ahead = due.saturating_duration_since(now).as_millis();
    now_ms().saturating_add(u64::try_from(ahead).unwrap_or(u64::MAX))
}

/// Wall-clock ms back to an instant (now, if already past).
pub(crate) fn from_ms(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms()))
}
