//! The embedded broker's three threads: the writer (batches publishes
//! into one `pwrite` and wakes subscribers), the syncer (fdatasync, then
//! answers publishers) and the checkpointer (group state to redb, then
//! retention).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;

use super::log::{self, Loc, HEADER};
use super::state::{Segment, State};
use super::store;
use super::{lock, Core, WriteReq, BATCH, BATCH_BYTES, CHECKPOINT_INTERVAL};
use crate::{Error, Result};

/// The segment the writer appends to.
pub(super) struct Active {
    pub id: u64,
    pub file: Arc<std::fs::File>,
    pub len: u64,
}

pub(super) fn writer(core: &Core, rx: &mpsc::Receiver<WriteReq>, mut active: Active) {
    let mut buf = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        while batch.len() < BATCH && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.body.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        // On failure every publisher of the batch was answered with the
        // error already; the writer goes on answering later ones.
        let _ = write_batch(core, &mut active, &mut buf, batch);
    }
}

fn reply_all(batch: Vec<WriteReq>, e: &Error) {
    for r in batch {
        let _ = r.reply.send(Err(e.clone()));
    }
}

fn write_batch(
    core: &Core,
    active: &mut Active,
    buf: &mut Vec<u8>,
    batch: Vec<WriteReq>,
) -> Result<()> {
    if let Some(e) = core.failed() {
        reply_all(batch, &e);
        return Err(e);
    }
    let bytes: usize = batch.iter().map(|r| r.body.len() + HEADER).sum();
    if active.len > 0 && active.len + bytes as u64 > core.segment_bytes {
        if let Err(e) = rotate(core, active) {
            reply_all(batch, &e);
            return Err(e);
        }
    }
    let first_seq = lock(&core.state).next_seq;
    buf.clear();
    let mut locs = Vec::with_capacity(batch.len());
    for (i, r) in batch.iter().enumerate() {
        let seq = first_seq + i as u64;
        let offset = active.len + buf.len() as u64 + HEADER as u64;
        log::frame(seq, &r.body, buf);
        locs.push(Loc {
            seq,
            seg: active.id,
            offset,
            len: r.body.len() as u32,
        });
    }
    if let Err(e) = active.file.write_all_at(buf, active.len) {
        let e = core.fail(format!(
            "component {}: cannot write to {}: {e}",
            core.name,
            log::segment_path(&core.dir, active.id).display()
        ));
        reply_all(batch, &e);
        return Err(e);
    }
    active.len += buf.len() as u64;

    let mut wake = Vec::new();
    {
        let mut st = lock(&core.state);
        let State {
            topics,
            segments,
            next_seq,
        } = &mut *st;
        let seg = segments.back_mut();
        let mut seg_topics = seg.map(|s| &mut s.topics);
        for (r, loc) in batch.iter().zip(&locs) {
            let t = topics.entry(r.topic.clone()).or_default();
            t.index.push_back(*loc);
            if let Some(st) = seg_topics.as_deref_mut() {
                st.insert(r.topic.clone(), loc.seq);
            }
        }
        *next_seq = first_seq + batch.len() as u64;
        let mut seen: Vec<&str> = Vec::new();
        for r in &batch {
            if seen.contains(&r.topic.as_str()) {
                continue;
            }
            seen.push(&r.topic);
            if let Some(t) = topics.get(&r.topic) {
                wake.extend(t.groups.values().map(|g| g.notify.clone()));
            }
        }
    }
    for n in wake {
        n.notify_waiters();
    }
    let mut q = lock(&core.sync.q);
    q.waiters.extend(batch.into_iter().map(|r| r.reply));
    core.sync.cv.notify_all();
    Ok(())
}

/// Closes the full segment (synced here, so only the last segment can
/// ever have a torn tail) and starts the next.
fn rotate(core: &Core, active: &mut Active) -> Result<()> {
    let old = log::segment_path(&core.dir, active.id);
    active.file.sync_data().map_err(|e| {
        core.fail(format!(
            "component {}: cannot sync {}: {e}",
            core.name,
            old.display()
        ))
    })?;
    let id = lock(&core.state).next_seq;
    let path = log::segment_path(&core.dir, id);
    let file = Arc::new(log::open_segment(&path, true)?);
    log::sync_dir(&core.dir).map_err(|e| core.fail(e.to_string()))?;
    lock(&core.state).segments.push_back(Segment {
        id,
        path,
        file: file.clone(),
        topics: HashMap::new(),
    });
    lock(&core.sync.q).file = Some(file.clone());
    *active = Active { id, file, len: 0 };
    Ok(())
}

pub(super) fn syncer(core: &Core) {
    loop {
        let (file, waiters) = {
            let mut q = lock(&core.sync.q);
            while q.waiters.is_empty() && !q.shutdown {
                q = core.sync.cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.waiters.is_empty() {
                return;
            }
            (q.file.clone(), std::mem::take(&mut q.waiters))
        };
        let r = match file {
            Some(f) => f.sync_data().map_err(|e| {
                core.fail(format!(
                    "component {}: fdatasync of the log in {} failed: {e}",
                    core.name,
                    core.dir.display()
                ))
            }),
            None => Ok(()),
        };
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
}

pub(super) fn checkpointer(core: &Core) {
    let mut done = 0u64;
    loop {
        let (target, shutdown) = {
            let mut q = lock(&core.ckpt.q);
            if q.requested <= done && !q.shutdown {
                q = core
                    .ckpt
                    .cv
                    .wait_timeout(q, CHECKPOINT_INTERVAL)
                    .map(|(q, _)| q)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            (q.requested, q.shutdown)
        };
        match checkpoint(core) {
            Ok(()) => {
                lock(&core.ckpt.q).last_error = None;
                done = target;
                core.ckpt.done.send_replace(done);
            }
            Err(e) => {
                lock(&core.ckpt.q).last_error = Some(e.to_string());
                if !shutdown {
                    std::thread::sleep(CHECKPOINT_INTERVAL);
                }
            }
        }
        let gone = lock(&core.state).trim();
        for path in gone {
            let _ = std::fs::remove_file(path);
        }
        if shutdown {
            return;
        }
    }
}

/// Copies what changed to redb; on failure the changes stay marked.
fn checkpoint(core: &Core) -> Result<()> {
    let (changes, next_seq) = {
        let mut st = lock(&core.state);
        let next_seq = st.next_seq;
        let mut changes = Vec::new();
        for (topic, t) in st.topics.iter_mut() {
            for (group, g) in t.groups.iter_mut() {
                if !g.row_dirty && g.dirty.is_empty() {
                    continue;
                }
                let pending = g
                    .dirty
                    .drain()
                    .map(|seq| {
                        let row = g.pending.get(&seq).map(|p| store::Row {
                            attempt: p.attempt,
                            delayed: p.delayed,
                            due_ms: store::to_ms(p.due),
                        });
                        (seq, row)
                    })
                    .collect();
                let cursor = g.row_dirty.then_some(g.cursor);
                g.row_dirty = false;
                changes.push(store::GroupChanges {
                    topic: topic.clone(),
                    group: group.clone(),
                    cursor,
                    pending,
                    low: g.low(),
                });
            }
        }
        (changes, next_seq)
    };
    if changes.is_empty() {
        return Ok(());
    }
    match store::write(&core.db, &core.db_path, &changes, next_seq) {
        Ok(()) => {
            let mut st = lock(&core.state);
            for c in &changes {
                if let Some(g) = st
                    .topics
                    .get_mut(&c.topic)
                    .and_then(|t| t.groups.get_mut(&c.group))
                {
                    g.durable_low = c.low;
                    if c.cursor.is_some() {
                        g.persisted = true;
                    }
                }
            }
            Ok(())
        }
        Err(e) => {
            let mut st = lock(&core.state);
            for c in changes {
                if let Some(g) = st
                    .topics
                    .get_mut(&c.topic)
                    .and_then(|t| t.groups.get_mut(&c.group))
                {
                    g.row_dirty |= c.cursor.is_some();
                    g.dirty.extend(c.pending.iter().map(|(s, _)| *s));
                }
            }
            Err(e)
        }
    }
}
