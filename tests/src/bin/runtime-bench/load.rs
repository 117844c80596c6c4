//! An open-loop HTTP/1.1 load generator for two paths measured in the same
//! run (a baseline and the path under test), from inside one pod.
//!
//! Requests go out at fixed instants: `conns` kept-alive connections per
//! path, each sending every `conns / rate` seconds, phase-shifted so the
//! sends of all connections are evenly spaced at `1 / rate`. Latency is
//! taken from the request's *scheduled* instant to the end of its response,
//! so a stall that delays later sends is charged to them (no coordinated
//! omission); the time from the actual send is kept as well.
//!
//! The two paths alternate in blocks (`block` long, with a quiet `gap`
//! between blocks), in the order A B B A A B ..., so both see the same
//! machine load and drift; the agent's CPU time is sampled in the middle of
//! every gap, which attributes it to the block on either side.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::world::{connect, spawn_in, ProcSample};

/// One path: where to connect and what to request.
#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    pub addr: String,
    pub uri: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub rate: u32,
    /// Blocks per path.
    pub blocks: usize,
    pub block: Duration,
    pub gap: Duration,
    pub conns: usize,
    pub body_len: usize,
    /// Requests per connection before the timed run (connections, pools
    /// and caches warm).
    pub warmup: usize,
}

/// What one path measured.
#[derive(Debug, Default)]
pub struct PathResult {
    /// Scheduled instant → response end.
    pub from_schedule: Vec<Duration>,
    /// Actual send → response end.
    pub from_send: Vec<Duration>,
    /// Sends that left more than 1 ms after their scheduled instant.
    pub late_sends: usize,
    pub errors: usize,
    /// The first few distinct error descriptions.
    pub error_samples: Vec<String>,
    /// Agent CPU seconds (of which in the kernel) and wall seconds over
    /// this path's blocks.
    pub agent_cpu: f64,
    pub agent_sys: f64,
    pub agent_wall: f64,
    /// Scheduled-instant latencies per block (block index, samples), for
    /// per-pair comparisons that shrug off bursts of outside load.
    pub blocks: Vec<(usize, Vec<Duration>)>,
}

impl PathResult {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < 8 && !self.error_samples.contains(&what) {
            self.error_samples.push(what);
        }
    }

    fn merge(&mut self, o: PathResult) {
        for (k, v) in o.blocks {
            match self.blocks.iter_mut().find(|(b, _)| *b == k) {
                Some((_, mine)) => mine.extend(v),
                None => self.blocks.push((k, v)),
            }
        }
        self.from_schedule.extend(o.from_schedule);
        self.from_send.extend(o.from_send);
        self.late_sends += o.late_sends;
        self.errors += o.errors;
        for e in o.error_samples {
            if self.error_samples.len() < 8 && !self.error_samples.contains(&e) {
                self.error_samples.push(e);
            }
        }
    }
}

/// Which path block `k` runs: pairs alternate their order (A B, B A, ...).
pub fn path_of_block(k: usize) -> usize {
    let (pair, second) = (k / 2, k % 2);
    if pair % 2 == 0 {
        second
    } else {
        1 - second
    }
}

/// The 1 KB body of request `seq` on connection `conn`: distinct per
/// request so an answer mixed up with another's is caught.
fn body(len: usize, conn: usize, seq: usize) -> Vec<u8> {
    let mut b = format!("c{conn}s{seq}:").into_bytes();
    b.extend((b.len()..len).map(|i| b'a' + ((i * 7 + seq) % 26) as u8));
    b.truncate(len);
    b
}

/// Runs the plan from inside the network namespace `pod`, sampling the
/// agent (`agent_pid`) between blocks.
pub fn run(pod: &Path, paths: [Target; 2], plan: &Plan, agent_pid: u32) -> [PathResult; 2] {
    let ready = Arc::new(Barrier::new(plan.conns + 1));
    let t0_cell: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let go = Arc::new(Barrier::new(plan.conns + 1));
    let paths = Arc::new(paths);
    let workers: Vec<_> = (0..plan.conns)
        .map(|c| {
            let (ready, go, t0_cell, paths, plan) = (
                ready.clone(),
                go.clone(),
                t0_cell.clone(),
                paths.clone(),
                plan.clone(),
            );
            spawn_in(pod, move || worker(c, &paths, &plan, &ready, &go, &t0_cell))
        })
        .collect();
    ready.wait();
    // Start a little later so every worker is asleep on its first send.
    let t0 = Instant::now() + Duration::from_millis(100);
    *t0_cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0);
    go.wait();

    // Agent CPU per block, sampled mid-gap before and after each block.
    let mut cpu = [(0.0f64, 0.0f64, 0.0f64); 2];
    let slot = plan.block + plan.gap;
    let sample = || ProcSample::of(agent_pid).ok();
    sleep_until(t0 - plan.gap / 2);
    let mut before = sample();
    for k in 0..plan.blocks * 2 {
        let end = t0 + slot * k as u32 + plan.block + plan.gap / 2;
        sleep_until(end);
        let after = sample();
        if let (Some(b), Some(a)) = (before, after) {
            let p = path_of_block(k);
            cpu[p].0 += a.cpu - b.cpu;
            cpu[p].1 += a.sys - b.sys;
            cpu[p].2 += (a.at - b.at).as_secs_f64();
        }
        before = after;
    }
    let mut out = [PathResult::default(), PathResult::default()];
    for w in workers {
        match w.join() {
            Ok(r) => {
                let [a, b] = r;
                out[0].merge(a);
                out[1].merge(b);
            }
            Err(_) => out[0].error("a load worker panicked".into()),
        }
    }
    for (p, (c, s, w)) in cpu.into_iter().enumerate() {
        out[p].agent_cpu = c;
        out[p].agent_sys = s;
        out[p].agent_wall = w;
        out[p].blocks.sort_by_key(|(k, _)| *k);
    }
    out
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

type Conn = nodeplane_tests::http1::Conn<std::net::TcpStream>;

fn worker(
    c: usize,
    paths: &[Target; 2],
    plan: &Plan,
    ready: &Barrier,
    go: &Barrier,
    t0_cell: &Mutex<Option<Instant>>,
) -> [PathResult; 2] {
    // Wake-ups within a few µs of the scheduled instant instead of the
    // default 50 µs timer slack.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let mut res = [PathResult::default(), PathResult::default()];
    let mut conns: [Option<Conn>; 2] = [None, None];
    for (p, path) in paths.iter().enumerate() {
        for seq in 0..plan.warmup {
            let _ = request(&mut conns[p], path, &body(plan.body_len, c, seq));
        }
    }
    ready.wait();
    go.wait();
    let t0 = t0_cell
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expect("t0 set before go");
    let period = Duration::from_secs_f64(plan.conns as f64 / plan.rate as f64);
    let phase = Duration::from_secs_f64(c as f64 / plan.rate as f64);
    let per_block = (plan.block.as_secs_f64() / period.as_secs_f64()).floor() as usize;
    let slot = plan.block + plan.gap;
    let mut seq = plan.warmup;
    for k in 0..plan.blocks * 2 {
        let p = path_of_block(k);
        let start = t0 + slot * k as u32 + phase;
        let mut mine = Vec::with_capacity(per_block);
        for i in 0..per_block {
            let sched = start + period * i as u32;
            sleep_until(sched);
            let sent = Instant::now();
            if sent > sched + Duration::from_millis(1) {
                res[p].late_sends += 1;
            }
            let b = body(plan.body_len, c, seq);
            seq += 1;
            match request(&mut conns[p], &paths[p], &b) {
                Ok(()) => {
                    let done = Instant::now();
                    res[p].from_schedule.push(done - sched);
                    mine.push(done - sched);
                    res[p].from_send.push(done - sent);
                }
                Err(e) => res[p].error(e),
            }
        }
        res[p].blocks.push((k, mine));
    }
    res
}

/// One POST on the path's kept-alive connection (opened if needed, dropped
/// after an error); checks status 200 and the body echoed intact.
fn request(conn: &mut Option<Conn>, path: &Target, body: &[u8]) -> Result<(), String> {
    if conn.is_none() {
        *conn = Some(connect(&path.addr).map_err(|e| format!("connect {}: {e}", path.addr))?);
    }
    let c = conn.as_mut().ok_or("no connection")?;
    let got = c.request(
        "POST",
        &path.uri,
        &[("content-type", "application/octet-stream")],
        body,
    );
    let m = match got {
        Ok(m) => m,
        Err(e) => {
            *conn = None;
            return Err(format!("{}: {e}", path.label));
        }
    };
    if m.status() != 200 {
        return Err(format!(
            "{}: status {} {}",
            path.label,
            m.status(),
            m.text().chars().take(200).collect::<String>()
        ));
    }
    if m.body != body {
        return Err(format!(
            "{}: body changed ({} bytes back, {} sent)",
            path.label,
            m.body.len(),
            body.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_alternate_in_pairs() {
        let v: Vec<usize> = (0..8).map(path_of_block).collect();
        assert_eq!(v, [0, 1, 1, 0, 0, 1, 1, 0]);
        assert_eq!(body(1024, 3, 7).len(), 1024);
        assert_ne!(body(1024, 3, 7), body(1024, 3, 8));
    }
}
