//! Delivery of lifecycle events to the node agent, fail-open.
//!
//! Events go into one bounded, ordered queue; one task delivers them in
//! order (the agent sees a pod's STARTING before its READY and STOPPED),
//! one connection per event as the agent's local API expects. A caller
//! that needs its event in the agent before it proceeds (RunPodSandbox:
//! labels before the CNI ADD) waits for it, but never longer than its time
//! box, and not at all while the agent is known to be unreachable. An event
//! that could not be delivered stays queued and is replayed, in order, when
//! the agent answers again; if the queue is full the oldest is dropped. All
//! three outcomes are counted and logged.
//!
//! An event whose content is not known yet (READY needs the sandbox's
//! status) takes its place in the queue when the call returns
//! ([`Hooks::reserve`]) and is filled in later ([`Hooks::fill`]): delivery
//! waits for it, so a StopPodSandbox sent right after RunPodSandbox
//! returned still reaches the agent after that sandbox's READY.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeplane_proto::agent::{request::What, PodLifecycle, Reply, Request};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use crate::{Error, Result};

/// Retry pacing while the agent is unreachable.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Outcome counters (exported on /metrics).
#[derive(Debug, Default)]
pub struct HookStats {
    pub delivered: AtomicU64,
    /// Delivered after at least one failed attempt.
    pub replayed: AtomicU64,
    pub failed_attempts: AtomicU64,
    /// Calls that stopped waiting for their hook at the time box.
    pub late: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// The agent answered with an error (it got the event and refused it).
    pub rejected: AtomicU64,
    pub queued: AtomicU64,
}

#[derive(Debug)]
struct Pending {
    event: PodLifecycle,
    done: Option<oneshot::Sender<()>>,
    /// Reserved and not filled yet: delivery waits for it until then.
    held_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Hooks {
    path: PathBuf,
    attempt_timeout: Duration,
    capacity: usize,
    queue: Mutex<VecDeque<Pending>>,
    wake: Notify,
    /// False after a failed attempt until one succeeds: callers then do not
    /// wait at all, so a dead agent adds no latency to pod starts.
    agent_up: AtomicBool,
    sequence: AtomicU64,
    /// Signalled when the agent answers after failed attempts (it may be a
    /// new process that knows nothing: see [`crate::resync`]).
    pub recovered: Notify,
    pub stats: HookStats,
}

impl Hooks {
    /// Starts the delivery task.
    pub fn start(path: &Path, attempt_timeout: Duration, capacity: usize) -> Arc<Self> {
        let hooks = Arc::new(Hooks {
            path: path.to_path_buf(),
            attempt_timeout,
            capacity,
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            agent_up: AtomicBool::new(true),
            sequence: AtomicU64::new(0),
            recovered: Notify::new(),
            stats: HookStats::default(),
        });
        tokio::spawn(hooks.clone().run());
        hooks
    }

    pub fn agent_up(&self) -> bool {
        self.agent_up.load(Ordering::Relaxed)
    }

    /// Queues an event; returns at once.
    pub fn send(&self, event: PodLifecycle) {
        self.push(event, None);
    }

    /// Queues an event and waits until the agent took it, at most `budget`
    /// (and not at all while the agent is down). True if delivered in time.
    pub async fn send_and_wait(&self, event: PodLifecycle, budget: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let wait = self.agent_up();
        self.push(event, Some(tx));
        if !wait {
            self.stats.late.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match tokio::time::timeout(budget, rx).await {
            Ok(Ok(())) => true,
            _ => {
                self.stats.late.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(agent = %self.path.display(), budget_ms = budget.as_millis() as u64,
                    "hook not delivered within its time box; relaying the call anyway (the event stays queued)");
                false
            }
        }
    }

    /// Takes `event`'s place in the order now; it is delivered once
    /// [`Hooks::fill`]ed, or as it is after `hold` (the filler failed).
    /// Returns the handle for `fill`.
    pub fn reserve(&self, event: PodLifecycle, hold: Duration) -> u64 {
        self.enqueue(event, None, Some(Instant::now() + hold))
    }

    /// Completes a reserved event (`None`: withdraw it). Its sequence and
    /// replay flag stay; a reservation already dropped is ignored.
    pub fn fill(&self, sequence: u64, event: Option<PodLifecycle>) {
        {
            let mut q = lock(&self.queue);
            match event {
                Some(mut ev) => {
                    if let Some(p) = q.iter_mut().find(|p| p.event.sequence == sequence) {
                        ev.sequence = sequence;
                        ev.replayed |= p.event.replayed;
                        p.event = ev;
                        p.held_until = None;
                    }
                }
                None => q.retain(|p| p.event.sequence != sequence),
            }
            self.stats.queued.store(q.len() as u64, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    pub fn queue_len(&self) -> usize {
        lock(&self.queue).len()
    }

    fn push(&self, event: PodLifecycle, done: Option<oneshot::Sender<()>>) {
        self.enqueue(event, done, None);
    }

    fn enqueue(
        &self,
        mut event: PodLifecycle,
        done: Option<oneshot::Sender<()>>,
        held_until: Option<Instant>,
    ) -> u64 {
        event.sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        let sequence = event.sequence;
        // Queued while the agent is unreachable: it will arrive late.
        event.replayed |= !self.agent_up();
        let dropped = {
            let mut q = lock(&self.queue);
            let dropped = if q.len() >= self.capacity {
                q.pop_front()
            } else {
                None
            };
            q.push_back(Pending {
                event,
                done,
                held_until,
            });
            self.stats.queued.store(q.len() as u64, Ordering::Relaxed);
            dropped
        };
        if let Some(d) = dropped {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(kind = ?d.event.kind(), sandbox = %d.event.sandbox_id, pod = %d.event.pod_name,
                "hook queue full: oldest undelivered event dropped");
        }
        self.wake.notify_one();
        sequence
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        let mut failures: u64 = 0;
        loop {
            let head = lock(&self.queue)
                .front()
                .map(|p| (p.event.clone(), p.held_until));
            let Some((mut event, held_until)) = head else {
                self.wake.notified().await;
                continue;
            };
            if let Some(until) = held_until {
                let now = Instant::now();
                if now < until {
                    // Filled (or withdrawn) soon: fill() wakes us.
                    let _ = tokio::time::timeout(until - now, self.wake.notified()).await;
                    continue;
                }
                tracing::warn!(kind = ?event.kind(), sandbox = %event.sandbox_id,
                    "reserved event not completed in time; delivering what is known");
                if let Some(p) = lock(&self.queue).front_mut() {
                    p.held_until = None;
                }
            }
            event.replayed = failures > 0 || event.replayed;
            match self.deliver_once(&event).await {
                Ok(reply) => {
                    let front = {
                        let mut q = lock(&self.queue);
                        // The head may have been dropped (queue full) while
                        // it was in flight: pop only the event delivered.
                        let front = if q
                            .front()
                            .is_some_and(|p| p.event.sequence == event.sequence)
                        {
                            q.pop_front()
                        } else {
                            None
                        };
                        self.stats.queued.store(q.len() as u64, Ordering::Relaxed);
                        front
                    };
                    if !reply.error.is_empty() {
                        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(kind = ?event.kind(), error = %reply.error, "agent refused a lifecycle event");
                    } else {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        if event.replayed {
                            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Some(done) = front.and_then(|p| p.done) {
                        let _ = done.send(());
                    }
                    if failures > 0 {
                        tracing::info!(agent = %self.path.display(), failed_attempts = failures,
                            "agent reachable again; replaying queued events");
                        self.recovered.notify_one();
                    }
                    failures = 0;
                    backoff = BACKOFF_MIN;
                    self.agent_up.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    if failures == 0 {
                        tracing::warn!(error = %e, queued = self.queue_len(),
                            "cannot deliver lifecycle events; keeping them for replay");
                    }
                    failures += 1;
                    // Mark the head so that even a replay after a queue
                    // drop carries the flag.
                    if let Some(p) = lock(&self.queue).front_mut() {
                        p.event.replayed = true;
                    }
                    self.agent_up.store(false, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn deliver_once(&self, event: &PodLifecycle) -> Result<Reply> {
        let request = Request {
            what: Some(What::Lifecycle(event.clone())),
        };
        let exchange = async {
            let mut s = tokio::net::UnixStream::connect(&self.path).await?;
            s.write_all(&request.encode_length_delimited_to_vec())
                .await?;
            read_reply(&mut s).await
        };
        match tokio::time::timeout(self.attempt_timeout, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(self.error(format!("no answer within {:?}", self.attempt_timeout))),
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Agent {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

async fn read_reply(s: &mut tokio::net::UnixStream) -> std::io::Result<Reply> {
    let mut len: usize = 0;
    for shift in (0..35).step_by(7) {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("reply of {len} bytes")));
    }
    let mut buf = vec![0; len];
    s.read_exact(&mut buf).await?;
    Reply::decode(buf.as_slice()).map_err(std::io::Error::other)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeplane_proto::agent::pod_lifecycle::Kind;

    fn ev(name: &str) -> PodLifecycle {
        PodLifecycle {
            kind: Kind::SandboxStarting as i32,
            pod_name: name.into(),
            ..Default::default()
        }
    }

    /// A minimal agent: records pod names in order, answers success.
    async fn agent(path: &Path, seen: Arc<Mutex<Vec<(String, bool)>>>) {
        let l = tokio::net::UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut len = [0u8; 1];
                let Ok(_) = s.read_exact(&mut len).await else {
                    continue;
                };
                let mut buf = vec![0; usize::from(len[0])];
                let Ok(_) = s.read_exact(&mut buf).await else {
                    continue;
                };
                if let Ok(Request {
                    what: Some(What::Lifecycle(e)),
                }) = Request::decode(buf.as_slice())
                {
                    lock(&seen).push((e.pod_name, e.replayed));
                }
                let reply = Reply::default().encode_length_delimited_to_vec();
                let _ = s.write_all(&reply).await;
            }
        });
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_the_rest_replay_in_order() {
        let dir = std::env::temp_dir().join(format!("np-deliver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.sock");
        let hooks = Hooks::start(&path, Duration::from_millis(500), 2);
        // The agent is down: a waiting caller gives up at its time box.
        assert!(
            !hooks
                .send_and_wait(ev("a"), Duration::from_millis(50))
                .await
        );
        hooks.send(ev("b"));
        hooks.send(ev("c"));
        assert_eq!(hooks.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(hooks.queue_len(), 2);
        assert!(!hooks.agent_up());
        // It comes back: b and c, in order, flagged as replayed.
        let seen = Arc::new(Mutex::new(Vec::new()));
        agent(&path, seen.clone()).await;
        for _ in 0..200 {
            if lock(&seen).len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *lock(&seen),
            vec![("b".to_string(), true), ("c".to_string(), true)]
        );
        // Up again: the next caller waits and is delivered in time.
        for _ in 0..100 {
            if hooks.agent_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(hooks.send_and_wait(ev("d"), Duration::from_secs(2)).await);
        assert_eq!(lock(&seen).last(), Some(&("d".to_string(), false)));
        assert_eq!(hooks.stats.replayed.load(Ordering::Relaxed), 2);
        assert!(hooks.stats.late.load(Ordering::Relaxed) >= 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_reserved_event_holds_later_ones_until_filled_or_withdrawn() {
        let dir = std::env::temp_dir().join(format!("np-reserve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        agent(&path, seen.clone()).await;
        let hooks = Hooks::start(&path, Duration::from_millis(500), 16);
        // READY's place is taken; STOPPED comes after it in the queue and
        // must wait, however long the status takes.
        let ready = hooks.reserve(ev("ready-placeholder"), Duration::from_secs(30));
        hooks.send(ev("stopped"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(lock(&seen).is_empty(), "{:?}", lock(&seen));
        hooks.fill(ready, Some(ev("ready")));
        // A withdrawn reservation (sandbox gone) is never delivered.
        let gone = hooks.reserve(ev("gone"), Duration::from_secs(30));
        hooks.send(ev("after"));
        hooks.fill(gone, None);
        for _ in 0..200 {
            if lock(&seen).len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let names: Vec<String> = lock(&seen).iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, ["ready", "stopped", "after"]);
        // One never filled is delivered as it is once its hold ends.
        hooks.reserve(ev("unfilled"), Duration::from_millis(100));
        for _ in 0..200 {
            if lock(&seen).len() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            lock(&seen).last().map(|(n, _)| n.as_str()),
            Some("unfilled")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
