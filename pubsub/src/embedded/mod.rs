//! `pubsub.embedded`: a durable log on local disk, for one node.
//!
//! Layout under `<state dir>/<component>.pubsub/`: the message log
//! (`<first seq>.log` segments, see [`log`]) and `state.redb` with every
//! group's cursor and pending set (see [`store`]). The redb file's lock
//! makes the directory one process's at a time, so competing consumers of
//! a group are subscriptions within that process.
//!
//! Three threads:
//! - the **writer** takes queued publishes in batches, gives them
//!   sequence numbers, writes them with one `pwrite` and wakes the topic's
//!   subscribers (tokio `Notify`, no polling) — a message is deliverable as
//!   soon as it is in the page cache, which kill -9 does not lose;
//! - the **syncer** fdatasyncs the log and only then answers the
//!   publishers whose records that sync covered (one fsync per batch);
//! - the **checkpointer** copies changed cursors and pending entries to
//!   redb every 100 ms (one fsync'd transaction) and trims the log.
//!
//! # Guarantees and their limits
//! - `publish` returns `Ok` after the fdatasync that covers its record.
//!   A message may reach a subscriber a few ms before that; if the machine
//!   loses power in between, it is gone from the log although a subscriber
//!   saw it — its publisher got no `Ok`, so nothing acknowledged is lost.
//! - A new group (first `subscribe` of a (topic, group)) sees messages
//!   published from then on, never older ones (Dapr's default for a new
//!   subscriber); `subscribe` returns once the group itself is durable,
//!   so a restart never forgets it.
//! - Deliveries, acks and ack deadlines reach disk with the next
//!   checkpoint (≤ 100 ms). A crash before that forgets them: the messages
//!   are delivered again (attempt counted from what was durable), never
//!   lost. A `nack` returns only once it is durable, so even a crash does
//!   not bring a nacked message back before its delay.
//! - After a restart, deliveries that were in flight are due at once
//!   (their consumers died with the process); nacked ones keep their delay.
//! - Retention: a segment file is deleted when every record in it is
//!   acked by every group of its topic, as of the last checkpoint (records
//!   of topics without groups are never delivered and go with their
//!   segment). A group that never acks keeps the log growing.
//! - Order: records are handed out in sequence order; a redelivery that
//!   is due goes first.

mod log;
mod state;
mod store;
mod threads;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::config::EmbeddedConfig;
use crate::{wire, AckToken, Broker, Delivery, Error, Message, Result, Settle, Subscription};
use state::{Group, Pending, Pick, Segment, State, Topic};
use threads::{checkpointer, syncer, writer, Active};

/// How often changed group state is written to redb.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// How long a `nack` or a new group waits for its checkpoint.
const DURABLE_WAIT: Duration = Duration::from_secs(10);
/// Publishes per writer batch, and bytes.
const BATCH: usize = 512;
const BATCH_BYTES: usize = 4 << 20;

/// The broker handle `open` returns.
#[derive(Debug)]
pub(crate) struct Embedded {
    inner: Arc<Inner>,
}

/// Owns the threads; dropped when the broker and every subscription and
/// token from it are gone, which stops the threads and releases the
/// directory.
#[derive(Debug)]
struct Inner {
    core: Arc<Core>,
    writer: Option<mpsc::Sender<WriteReq>>,
    threads: Vec<JoinHandle<()>>,
}

/// What the threads share.
#[derive(Debug)]
struct Core {
    name: String,
    dir: PathBuf,
    db_path: PathBuf,
    ack_timeout: Duration,
    segment_bytes: u64,
    consumer_id: Option<String>,
    db: redb::Database,
    state: Mutex<State>,
    sync: SyncQueue,
    ckpt: Checkpoints,
    /// Set by the first failed write or fsync: after that nothing more is
    /// acknowledged (the tail is repaired on the next open).
    failed: Mutex<Option<String>>,
}

#[derive(Debug)]
struct WriteReq {
    topic: String,
    body: Vec<u8>,
    reply: oneshot::Sender<Result<()>>,
}

#[derive(Debug, Default)]
struct SyncQueue {
    q: Mutex<SyncState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The segment being appended to (older ones are synced when closed).
    file: Option<Arc<File>>,
    waiters: Vec<oneshot::Sender<Result<()>>>,
    shutdown: bool,
}

#[derive(Debug)]
struct Checkpoints {
    q: Mutex<CkptState>,
    cv: Condvar,
    /// The last request number a finished checkpoint covered.
    done: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct CkptState {
    requested: u64,
    shutdown: bool,
    last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    fn fail(&self, msg: String) -> Error {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(msg.clone());
        }
        Error::Backend(msg)
    }

    fn failed(&self) -> Option<Error> {
        lock(&self.failed).clone().map(|m| {
            Error::Backend(format!(
                "component {}: embedded pubsub stopped accepting publishes after an earlier failure: {m}",
                self.name
            ))
        })
    }

    /// Asks for a checkpoint; the number to wait for.
    fn request_checkpoint(&self) -> u64 {
        let mut q = lock(&self.ckpt.q);
        q.requested += 1;
        self.ckpt.cv.notify_all();
        q.requested
    }

    async fn wait_checkpoint(&self, n: u64) -> Result<()> {
        let mut rx = self.ckpt.done.subscribe();
        let waited = tokio::time::timeout(DURABLE_WAIT, rx.wait_for(|d| *d >= n))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Closed(format!(
                "component {}: embedded pubsub is closing",
                self.name
            ))),
            Err(_) => Err(Error::Backend(format!(
                "component {}: group state in {} not durable after {DURABLE_WAIT:?}: {}",
                self.name,
                self.db_path.display(),
                lock(&self.ckpt.q)
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "checkpoint too slow".into())
            ))),
        }
    }

    fn group_name<'a>(&'a self, group: &'a str) -> &'a str {
        self.consumer_id.as_deref().unwrap_or(group)
    }
}

impl Embedded {
    pub(crate) async fn open(name: &str, cfg: EmbeddedConfig, state_dir: &Path) -> Result<Self> {
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(Error::Config(format!(
                "component {name:?}: metadata.name must be a non-empty file name (it names {}/<name>.pubsub)",
                state_dir.display()
            )));
        }
        let dir = state_dir.join(format!("{name}.pubsub"));
        let name = name.to_owned();
        let inner = tokio::task::spawn_blocking(move || Inner::open(name, cfg, dir))
            .await
            .map_err(|e| Error::Backend(format!("embedded pubsub open task failed: {e}")))??;
        Ok(Embedded {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    /// Recovery: group state from redb, the log from its segments (a torn
    /// tail of the last one is cut off), then the threads.
    fn open(name: String, cfg: EmbeddedConfig, dir: PathBuf) -> Result<Inner> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Backend(format!(
                "component {name}: cannot create {}: {e}",
                dir.display()
            ))
        })?;
        // The lock first: a second process must not touch the segments.
        let db_path = dir.join("state.redb");
        let db = store::open(&db_path)?;
        let loaded = store::load(&db, &db_path)?;

        let ids = log::list_segments(&dir)?;
        let mut segments = VecDeque::new();
        let mut topics: HashMap<String, Topic> = HashMap::new();
        let mut last_seq: Option<u64> = None;
        let mut active_len = 0u64;
        for (i, id) in ids.iter().enumerate() {
            let path = log::segment_path(&dir, *id);
            let scanned = log::scan(&path, *id, last_seq)?;
            let is_last = i + 1 == ids.len();
            if scanned.torn && !is_last {
                return Err(Error::Backend(format!(
                    "component {name}: embedded pubsub log {} is damaged at byte {} (not its last segment, so not a torn write); move the directory {} aside to start empty",
                    path.display(),
                    scanned.valid_len,
                    dir.display()
                )));
            }
            let file = log::open_segment(&path, false)?;
            if scanned.torn {
                // A write cut short by a crash: never acknowledged.
                file.set_len(scanned.valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| {
                        Error::Backend(format!(
                            "component {name}: cannot repair {}: {e}",
                            path.display()
                        ))
                    })?;
            }
            let mut seg_topics = HashMap::new();
            for (seq, topic, loc) in scanned.records {
                seg_topics.insert(topic.clone(), seq);
                topics.entry(topic).or_default().index.push_back(loc);
                last_seq = Some(seq);
            }
            if is_last {
                active_len = scanned.valid_len;
            }
            segments.push_back(Segment {
                id: *id,
                path,
                file: Arc::new(file),
                topics: seg_topics,
            });
        }

        let mut next_seq = last_seq.map_or(0, |s| s + 1).max(loaded.next_seq);
        next_seq = next_seq.max(ids.last().copied().unwrap_or(0));
        for (_, _, cursor) in &loaded.groups {
            next_seq = next_seq.max(*cursor);
        }
        for (_, _, seq, _) in &loaded.pending {
            next_seq = next_seq.max(seq + 1);
        }
        next_seq = next_seq.max(1);

        for (topic, group, cursor) in loaded.groups {
            let mut g = Group::new(cursor);
            g.row_dirty = false;
            g.persisted = true;
            topics.entry(topic).or_default().groups.insert(group, g);
        }
        for (topic, group, seq, row) in loaded.pending {
            let Some(t) = topics.get_mut(&topic) else {
                continue;
            };
            let exists = t.index.binary_search_by_key(&seq, |l| l.seq).is_ok();
            let Some(g) = t.groups.get_mut(&group) else {
                continue;
            };
            if !exists {
                // The record went with an unsynced tail: forget the entry.
                g.dirty.insert(seq);
                continue;
            }
            let due = if row.delayed {
                store::from_ms(row.due_ms)
            } else {
                Instant::now()
            };
            g.insert(
                seq,
                Pending {
                    attempt: row.attempt,
                    due,
                    delayed: row.delayed,
                },
            );
            g.dirty.remove(&seq);
        }
        for t in topics.values_mut() {
            for g in t.groups.values_mut() {
                g.durable_low = g.low();
            }
        }

        if segments.is_empty() {
            let path = log::segment_path(&dir, next_seq);
            let file = log::open_segment(&path, true)?;
            log::sync_dir(&dir)?;
            segments.push_back(Segment {
                id: next_seq,
                path,
                file: Arc::new(file),
                topics: HashMap::new(),
            });
            active_len = 0;
        }
        let active = segments.back().map(|s| (s.id, s.file.clone()));
        let Some((active_id, active_file)) = active else {
            return Err(Error::Backend("embedded pubsub: no segment".into()));
        };

        let (done, _) = watch::channel(0u64);
        let core = Arc::new(Core {
            name,
            dir,
            db_path,
            ack_timeout: cfg.ack_timeout,
            segment_bytes: cfg.segment_bytes,
            consumer_id: cfg.consumer_id,
            db,
            state: Mutex::new(State {
                next_seq,
                topics,
                segments,
            }),
            sync: SyncQueue::default(),
            ckpt: Checkpoints {
                q: Mutex::new(CkptState::default()),
                cv: Condvar::new(),
                done,
            },
            failed: Mutex::new(None),
        });
        lock(&core.sync.q).file = Some(active_file.clone());

        let (tx, rx) = mpsc::channel::<WriteReq>();
        let spawn = |what: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("pubsub-{what}"))
                .spawn(f)
                .map_err(|e| Error::Backend(format!("cannot start the {what} thread: {e}")))
        };
        let mut threads = Vec::new();
        let c = core.clone();
        let active = Active {
            id: active_id,
            file: active_file,
            len: active_len,
        };
        threads.push(spawn("writer", Box::new(move || writer(&c, &rx, active)))?);
        let c = core.clone();
        threads.push(spawn("syncer", Box::new(move || syncer(&c)))?);
        let c = core.clone();
        threads.push(spawn("checkpoint", Box::new(move || checkpointer(&c)))?);
        Ok(Inner {
            core,
            writer: Some(tx),
            threads,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Writer first (it drains what is queued), then the syncer answers
        // the last publishers, then a last checkpoint.
        drop(self.writer.take());
        let mut threads = std::mem::take(&mut self.threads).into_iter();
        if let Some(w) = threads.next() {
            let _ = w.join();
        }
        {
            lock(&self.core.sync.q).shutdown = true;
            self.core.sync.cv.notify_all();
        }
        if let Some(s) = threads.next() {
            let _ = s.join();
        }
        {
            lock(&self.core.ckpt.q).shutdown = true;
            self.core.ckpt.cv.notify_all();
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

#[async_trait::async_trait]
impl Broker for Embedded {
    async fn publish(&self, msg: Message) -> Result<()> {
        let core = &self.inner.core;
        if msg.topic.is_empty() {
            return Err(Error::Invalid(format!(
                "component {}: the topic name is empty",
                core.name
            )));
        }
        let body = wire::encode_body(&msg);
        if body.len() > log::MAX_RECORD {
            return Err(Error::Invalid(format!(
                "component {}: message of {} bytes is over the embedded log's limit of {} bytes",
                core.name,
                body.len(),
                log::MAX_RECORD
            )));
        }
        if let Some(e) = core.failed() {
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        let closed = || {
            Error::Closed(format!(
                "component {}: embedded pubsub is closing",
                core.name
            ))
        };
        self.inner
            .writer
            .as_ref()
            .ok_or_else(closed)?
            .send(WriteReq {
                topic: msg.topic,
                body,
                reply,
            })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        let core = &self.inner.core;
        let group = core.group_name(group).to_owned();
        if topic.is_empty() || group.is_empty() {
            return Err(Error::Invalid(format!(
                "component {}: subscribe needs a topic and a group (got {topic:?}, {group:?})",
                core.name
            )));
        }
        let (notify, wait) = {
            let mut st = lock(&core.state);
            let next_seq = st.next_seq;
            let g = st
                .topics
                .entry(topic.to_owned())
                .or_default()
                .groups
                .entry(group.clone())
                .or_insert_with(|| Group::new(next_seq));
            (g.notify.clone(), !g.persisted)
        };
        if wait {
            let n = core.request_checkpoint();
            core.wait_checkpoint(n).await?;
        }
        Ok(Box::new(Sub {
            inner: self.inner.clone(),
            topic: topic.to_owned(),
            group,
            notify,
        }))
    }

    async fn ping(&self) -> Result<()> {
        match self.inner.core.failed() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn ack_timeout(&self) -> Option<Duration> {
        Some(self.inner.core.ack_timeout)
    }
}

#[derive(Debug)]
struct Sub {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    notify: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Subscription for Sub {
    async fn next(&mut self) -> Result<Delivery> {
        let core = &self.inner.core;
        loop {
            // Registered before looking, so a publish in between still wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pick = lock(&core.state).pick(&self.topic, &self.group, core.ack_timeout);
            match pick {
                Pick::Deliver {
                    loc,
                    attempt,
                    file,
                    path,
                } => {
                    // The pick and this read run in one poll: no await between
                    // them, so a cancelled `next` never loses a taken record.
                    let msg = log::read(&file, &path, &loc)?;
                    return Ok(Delivery {
                        msg,
                        attempt,
                        token: AckToken::new(Token {
                            inner: self.inner.clone(),
                            topic: self.topic.clone(),
                            group: self.group.clone(),
                            seq: loc.seq,
                            attempt,
                        }),
                    });
                }
                Pick::Wait(Some(at)) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                Pick::Wait(None) => notified.await,
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
struct Token {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    seq: u64,
    attempt: u32,
}

#[async_trait::async_trait]
impl Settle for Token {
    async fn ack(self: Box<Self>) -> Result<()> {
        let core = &self.inner.core;
        let mut st = lock(&core.state);
        if let Some(g) = st
            .topics
            .get_mut(&self.topic)
            .and_then(|t| t.groups.get_mut(&self.group))
        {
            // Also after a redelivery elsewhere: the work is done.
            g.remove(self.seq);
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, retry_after: Duration) -> Result<()> {
        let core = &self.inner.core;
        let notify = {
            let mut st = lock(&core.state);
            let Some(g) = st
                .topics
                .get_mut(&self.topic)
                .and_then(|t| t.groups.get_mut(&self.group))
            else {
                return Ok(());
            };
            // A stale nack (the message was redelivered since) leaves the
            // newer delivery alone.
            match g.pending.get(&self.seq) {
                Some(p) if p.attempt == self.attempt => {}
                _ => return Ok(()),
            }
            g.insert(
                self.seq,
                Pending {
                    attempt: self.attempt,
                    due: Instant::now() + retry_after,
                    delayed: true,
                },
            );
            g.notify.clone()
        };
        notify.notify_waiters();
        let n = core.request_checkpoint();
        core.wait_checkpoint(n).await
    }
}
