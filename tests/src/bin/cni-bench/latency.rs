//! The three CNI-call sections: single pod ADD/DEL, ADD with a growing
//! number of pods, and a burst of pods with concurrent invocations.
//!
//! A plugin that fails keeps its error (the exact output) and drops out of
//! the section; the others go on. Pods are deleted before a section ends so
//! the plugin's own DEL is exercised; dropping the namespaces then removes
//! whatever a failing plugin left behind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::subject::{Pod, Subject};

/// Untimed ADD/DEL rounds per plugin first, so page cache and lazily
/// created objects (the bridge, state files) do not land in the figures.
const WARMUP: usize = 3;

#[derive(Debug, Default)]
pub struct AddDel {
    pub add: Vec<Duration>,
    /// DEL call, spawn to exit.
    pub del: Vec<Duration>,
    /// DEL spawn until the teardown is over, deferred work included.
    pub gone: Vec<Duration>,
}

/// ADD then DEL of the same pod namespace, `iterations` times. Plugins are
/// interleaved call by call so load from elsewhere on the machine (builds on
/// 2 cores) hits all of them alike.
pub fn single(subjects: &[Subject], iterations: usize) -> Vec<Result<AddDel, String>> {
    let mut pods: Vec<Pod> = subjects.iter().map(|_| Pod::new()).collect();
    let mut res: Vec<Result<AddDel, String>> =
        subjects.iter().map(|_| Ok(AddDel::default())).collect();
    for i in 0..WARMUP + iterations {
        for ((s, pod), r) in subjects.iter().zip(&mut pods).zip(&mut res) {
            let Ok(acc) = r else { continue };
            let step = s.add(pod).and_then(|a| Ok((a, s.del_settled(pod)?)));
            match step {
                Ok((a, (d, g))) if i >= WARMUP => {
                    acc.add.push(a);
                    acc.del.push(d);
                    acc.gone.push(g);
                }
                Ok(_) => {}
                Err(e) => {
                    // Best effort: release what the failed ADD may hold.
                    let _ = s.del_settled(pod);
                    *r = Err(e);
                }
            }
        }
    }
    res
}

/// ADD latency against the number of pods already present (index k = k
/// pods present), measured in two passes.
#[derive(Debug, Default)]
pub struct Growth {
    /// Pods 1..=count added in sequence.
    pub up: Vec<Duration>,
    /// Then from `count` pods down: delete to k pods, time one ADD, for k =
    /// count-1 down to 0. Load from elsewhere drifts with time; this pass
    /// walks the pod counts in the opposite time order, so a drift that tilts
    /// one pass's slope tilts the other's the other way and pooling both
    /// cancels it (on this shared machine a drift alone can fake ±20 µs/pod).
    pub down: Vec<Duration>,
}

/// Runs both passes of [`Growth`], interleaved across plugins pod by pod,
/// then deletes every pod.
pub fn growth(subjects: &[Subject], count: usize) -> Vec<Result<Growth, String>> {
    let mut pods: Vec<Vec<Pod>> = subjects
        .iter()
        .map(|_| (0..count).map(|_| Pod::new()).collect())
        .collect();
    warm_up(subjects, &mut pods);
    let mut res: Vec<Result<Growth, String>> =
        subjects.iter().map(|_| Ok(Growth::default())).collect();
    for k in 0..count {
        for ((s, pods), r) in subjects.iter().zip(&mut pods).zip(&mut res) {
            let Ok(acc) = r else { continue };
            match s.add(&mut pods[k]) {
                Ok(d) => acc.up.push(d),
                Err(e) => *r = Err(format!("pod {}: {e}", k + 1)),
            }
        }
    }
    for k in (0..count).rev() {
        for ((s, pods), r) in subjects.iter().zip(&mut pods).zip(&mut res) {
            let Ok(acc) = r else { continue };
            // Delete the highest-numbered pods so that pods[..k] stay.
            let step = |pods: &mut [Pod]| {
                for pod in pods[k..].iter_mut().filter(|p| p.result.is_some()) {
                    s.del_settled(pod)?;
                }
                s.add(&mut pods[k])
            };
            match step(pods) {
                Ok(d) => acc.down.push(d),
                Err(e) => *r = Err(format!("down to {k} pods: {e}")),
            }
        }
    }
    for ((s, pods), r) in subjects.iter().zip(&mut pods).zip(&mut res) {
        for pod in pods.iter_mut().filter(|p| p.result.is_some()) {
            if let Err(e) = s.del_settled(pod) {
                if r.is_ok() {
                    *r = Err(e);
                }
            }
        }
        if let Ok(g) = r {
            g.down.reverse();
        }
    }
    res
}

#[derive(Debug, Default)]
pub struct Burst {
    /// Wall time of all ADDs, then of all DELs, one entry per round.
    pub add: Vec<Duration>,
    pub del: Vec<Duration>,
    /// From the first DEL until the teardown is over: every pod's interface
    /// gone and no process left in the node namespace.
    pub gone: Vec<Duration>,
}

/// `count` pods ADDed by `workers` concurrent invocations, then DELed the
/// same way, timed as a whole. Plugins take turns (whole bursts cannot be
/// interleaved), with the order rotated each round.
pub fn burst(
    subjects: &[Subject],
    count: usize,
    workers: usize,
    rounds: usize,
) -> Vec<Result<Burst, String>> {
    let mut pods: Vec<Vec<Pod>> = subjects
        .iter()
        .map(|_| (0..count).map(|_| Pod::new()).collect())
        .collect();
    warm_up(subjects, &mut pods);
    let mut res: Vec<Result<Burst, String>> =
        subjects.iter().map(|_| Ok(Burst::default())).collect();
    for round in 0..rounds {
        for j in 0..subjects.len() {
            let i = (j + round) % subjects.len();
            let Ok(acc) = &mut res[i] else { continue };
            let s = &subjects[i];
            let add = run_parallel(&mut pods[i], workers, |p| s.add(p).map(drop));
            // DEL whatever was added even if some ADD failed.
            let del_start = Instant::now();
            let del = run_parallel(&mut pods[i], workers, |p| match p.result {
                Some(_) => s.del(p).map(drop),
                None => Ok(()),
            });
            // Deferred teardown must be over before the next plugin's burst.
            let gone = pods[i]
                .iter()
                .map(Pod::wait_gone)
                .chain([s.wait_quiet()])
                .collect::<Result<Vec<_>, _>>()
                .map(|t| t.into_iter().max().unwrap_or(del_start) - del_start);
            match (add, del, gone) {
                (Ok(a), Ok(d), Ok(g)) => {
                    acc.add.push(a);
                    acc.del.push(d);
                    acc.gone.push(g);
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => res[i] = Err(e),
            }
        }
    }
    res
}

/// One untimed ADD+DEL per plugin on its first pod.
fn warm_up(subjects: &[Subject], pods: &mut [Vec<Pod>]) {
    for (s, pods) in subjects.iter().zip(pods) {
        if let Some(p) = pods.first_mut() {
            // Errors show up again, with full output, in the timed part.
            if s.add(p).is_ok() {
                let _ = s.del_settled(p);
            }
        }
    }
}

/// Applies `f` to every pod from `workers` threads pulling from one queue;
/// returns the wall time, or the first error.
fn run_parallel(
    pods: &mut [Pod],
    workers: usize,
    f: impl Fn(&mut Pod) -> Result<(), String> + Sync,
) -> Result<Duration, String> {
    let pods: Vec<Mutex<&mut Pod>> = pods.iter_mut().map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    let first_err = Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(pod) = pods.get(i) else { break };
                let mut pod = pod.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = f(&mut pod) {
                    first_err
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            });
        }
    });
    let wall = start.elapsed();
    match first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(wall),
    }
}
