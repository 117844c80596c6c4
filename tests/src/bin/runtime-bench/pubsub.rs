//! Section 6: pub/sub publish → deliver through the runtime, per broker
//! (`pubsub.embedded`, `pubsub.redis` on a real redis-server,
//! `pubsub.jetstream` on a real nats-server -js, both in the node
//! namespace), 1 KB messages.
//!
//! Pod `pub` publishes through the runtime (`POST /v1.0/publish/...`) at a
//! fixed open-loop rate from a few kept-alive connections; pod `sub` is
//! served by this process: it answers `/dapr/subscribe` and takes the
//! deliveries. Every message carries its send time (CLOCK_MONOTONIC, ns),
//! read again on arrival by the same process, so publish → deliver is
//! measured on one clock. After the run the bench waits for stragglers;
//! a message the runtime accepted (204) and never delivered is lost.
//!
//! The baseline, measured in the same run: the same broker through the
//! nodeplane-pubsub crate in this process (publish → `Subscription::next`
//! → ack), the same rate and messages, without the runtime's HTTP, its
//! CloudEvent envelope and the app call. There is no Dapr here to compare
//! with.

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeplane_tests::http1::{read_msg, write_response};
use serde_json::{json, Value};

use crate::guard::{Dir, Proc};
use crate::stats::{us, Dist};
use crate::world::{self, spawn_in, ProcSample, World, APP_PORT};
use crate::{Opts, Report};

const TOPIC: &str = "bench";
const MSG_LEN: usize = 1024;
const REDIS_PORT: u16 = 6393;
const NATS_PORT: u16 = 14233;
/// Publishing before the timed window (connections, consumer groups,
/// caches warm); its messages are checked for loss but not timed.
const WARMUP: Duration = Duration::from_secs(2);
/// Kept-alive publisher connections of the open-loop run.
const CONNS: usize = 8;
/// Connections and seconds of the closed-loop (max throughput) run.
const MAX_CONNS: usize = 8;
const MAX_SECS: u64 = 3;
/// How long deliveries may stop coming before the rest count as lost.
const QUIET: Duration = Duration::from_secs(5);

/// One broker under test: its component (name in the runtime, spec for
/// the direct baseline) and the subscriber's route for it.
struct Broker {
    label: &'static str,
    component: &'static str,
    route: &'static str,
    /// (type, metadata) for the baseline's own broker.
    direct: (&'static str, Vec<(&'static str, String)>),
}

fn brokers() -> Vec<Broker> {
    vec![
        Broker {
            label: "pubsub.embedded",
            component: "pubsub",
            route: "/sub/embedded",
            direct: ("pubsub.embedded", vec![]),
        },
        Broker {
            label: "pubsub.redis",
            component: "redis-bus",
            route: "/sub/redis",
            direct: (
                "pubsub.redis",
                vec![("redisHost", format!("127.0.0.1:{REDIS_PORT}"))],
            ),
        },
        Broker {
            label: "pubsub.jetstream",
            component: "js-bus",
            route: "/sub/jetstream",
            direct: (
                "pubsub.jetstream",
                vec![("natsURL", format!("nats://127.0.0.1:{NATS_PORT}"))],
            ),
        },
    ]
}

pub fn section(opts: &Opts, report: &mut Report) {
    println!("\n== 6. pub/sub publish -> deliver: embedded, Redis, JetStream ==");
    if let Err(e) = run(opts, report) {
        println!("  ERROR: {e}");
        report.errors.push(format!("pubsub: {e}"));
    }
}

/// CLOCK_MONOTONIC in ns: the clock both ends of every message read.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec passed to it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The 1 KB JSON message `seq` of run `run`, sent at `sent`.
fn message(run: &str, seq: u64, sent: u64) -> Vec<u8> {
    let mut b = format!(r#"{{"run":"{run}","seq":{seq},"sent":{sent},"pad":""#).into_bytes();
    let pad = MSG_LEN.saturating_sub(b.len() + 2);
    b.extend(std::iter::repeat_n(b'x', pad));
    b.extend_from_slice(b"\"}");
    b
}

/// (run, seq, sent) of a message, from its JSON or a CloudEvent of it.
fn parse_message(body: &[u8]) -> Option<(String, u64, u64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let m = match v.get("data") {
        Some(Value::String(s)) if v.get("specversion").is_some() => serde_json::from_str(s).ok()?,
        Some(d) if v.get("specversion").is_some() => d.clone(),
        _ => v,
    };
    Some((
        m["run"].as_str()?.to_string(),
        m["seq"].as_u64()?,
        m["sent"].as_u64()?,
    ))
}

/// What arrived for one run.
#[derive(Debug, Default)]
struct RunInbox {
    /// seq → publish → deliver latency (first delivery).
    got: HashMap<u64, Duration>,
    dups: usize,
    /// When the latest delivery came (mono ns).
    last: u64,
}

type Inbox = Arc<Mutex<HashMap<String, RunInbox>>>;

fn record(inbox: &Inbox, run: &str, seq: u64, sent: u64, now: u64) {
    let mut all = inbox.lock().unwrap_or_else(|e| e.into_inner());
    let r = all.entry(run.to_string()).or_default();
    r.last = r.last.max(now);
    let lat = Duration::from_nanos(now.saturating_sub(sent));
    if r.got.insert(seq, lat).is_some() {
        r.dups += 1;
    }
}

/// The app of pod `sub`, served by this process on APP_PORT in its
/// namespace. Stops (listener and every connection) on drop.
struct Subscriber {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
    /// Requests that were neither /dapr/subscribe nor a parsable delivery.
    strange: Arc<Mutex<Vec<String>>>,
}

impl Subscriber {
    fn start(pod: &Path, subscribe: String, inbox: Inbox) -> Result<Subscriber, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let strange: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop2, conns2, strange2) = (stop.clone(), conns.clone(), strange.clone());
        let accept = spawn_in(pod, move || {
            let l = match TcpListener::bind(("0.0.0.0", APP_PORT)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("subscriber: bind {APP_PORT}: {e}")));
                    return;
                }
            };
            // Non-blocking accept so that the stop flag is seen.
            if let Err(e) = l.set_nonblocking(true) {
                let _ = tx.send(Err(format!("subscriber: {e}")));
                return;
            }
            let _ = tx.send(Ok(()));
            let subscribe = Arc::new(subscribe);
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        if let Ok(c) = s.try_clone() {
                            conns2.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                        }
                        let (subscribe, inbox, strange) =
                            (subscribe.clone(), inbox.clone(), strange2.clone());
                        std::thread::spawn(move || serve(s, &subscribe, &inbox, &strange));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        rx.recv()
            .map_err(|_| "subscriber thread ended".to_string())??;
        Ok(Subscriber {
            stop,
            conns,
            accept: Some(accept),
            strange,
        })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// One connection from the runtime: `/dapr/subscribe`, then deliveries,
/// each answered SUCCESS once recorded.
fn serve(s: TcpStream, subscribe: &str, inbox: &Inbox, strange: &Mutex<Vec<String>>) {
    let _ = s.set_nodelay(true);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let json = [("content-type".to_string(), "application/json".to_string())];
    while let Ok(Some(req)) = read_msg(&mut r, false) {
        // The whole request is in: this is the delivery instant.
        let now = mono_ns();
        let path = req
            .start
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let (status, body): (u16, &[u8]) = if path == "/dapr/subscribe" {
            (200, subscribe.as_bytes())
        } else if path.starts_with("/sub/") {
            match parse_message(&req.body) {
                Some((run, seq, sent)) => {
                    record(inbox, &run, seq, sent, now);
                    (200, br#"{"status":"SUCCESS"}"#)
                }
                None => {
                    note(strange, format!("{path}: unparsable delivery"));
                    (200, br#"{"status":"DROP"}"#)
                }
            }
        } else {
            note(strange, format!("unexpected {}", req.start));
            (404, b"")
        };
        if write_response(&mut w, status, &json, body).is_err() {
            return;
        }
    }
}

fn note(list: &Mutex<Vec<String>>, what: String) {
    let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
    if l.len() < 5 {
        l.push(what);
    }
}

/// The publisher's side of one run.
#[derive(Debug, Default)]
struct Published {
    /// seqs the runtime (or broker) accepted.
    accepted: Vec<u64>,
    /// Publish call latency (send → 204), timed window only.
    ack: Vec<Duration>,
    /// Sends more than 1 ms after their scheduled instant.
    late: usize,
    errors: usize,
    error_samples: Vec<String>,
}

impl Published {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 && !self.error_samples.contains(&e) {
            self.error_samples.push(e);
        }
    }

    fn merge(&mut self, o: Published) {
        self.accepted.extend(o.accepted);
        self.ack.extend(o.ack);
        self.late += o.late;
        self.errors += o.errors;
        for e in o.error_samples {
            if self.error_samples.len() < 5 && !self.error_samples.contains(&e) {
                self.error_samples.push(e);
            }
        }
    }
}

/// One publish through the runtime on the kept-alive connection `conn`.
fn publish(
    conn: &mut Option<nodeplane_tests::http1::Conn<TcpStream>>,
    uri: &str,
    run: &str,
    seq: u64,
    out: &mut Published,
) -> Option<Duration> {
    let mut errors = Vec::new();
    let Some(c) = world::runtime_conn(conn, &mut errors) else {
        for e in errors {
            out.error(e);
        }
        return None;
    };
    let t = Instant::now();
    let body = message(run, seq, mono_ns());
    match c.request("POST", uri, &[("content-type", "application/json")], &body) {
        Ok(m) if m.status() == 204 => {
            out.accepted.push(seq);
            Some(t.elapsed())
        }
        Ok(m) => {
            out.error(format!(
                "publish: {} {}",
                m.status(),
                m.text().chars().take(160).collect::<String>()
            ));
            None
        }
        Err(e) => {
            *conn = None;
            out.error(format!("publish: {e}"));
            None
        }
    }
}

/// Open loop from pod `pod`: message `seq` is due at t0 + seq / rate, sent
/// by connection seq % CONNS; seqs below `warm` are the warm-up.
fn open_loop(
    pod: &Path,
    uri: &str,
    run: &str,
    rate: u32,
    n: u64,
    warm: u64,
    t0: Instant,
) -> Vec<std::thread::JoinHandle<Published>> {
    (0..CONNS as u64)
        .map(|c| {
            let (uri, run) = (uri.to_string(), run.to_string());
            spawn_in(pod, move || {
                // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's slack.
                unsafe {
                    libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
                }
                let mut out = Published::default();
                let mut conn = None;
                let mut seq = c;
                while seq < n {
                    let due = t0 + Duration::from_secs_f64(seq as f64 / rate as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(1) {
                        out.late += 1;
                    }
                    if let Some(took) = publish(&mut conn, &uri, &run, seq, &mut out) {
                        if seq >= warm {
                            out.ack.push(took);
                        }
                    }
                    seq += CONNS as u64;
                }
                out
            })
        })
        .collect()
}

/// Closed loop: MAX_CONNS connections publishing back to back for `secs`.
fn closed_loop(pod: &Path, uri: &str, run: &str, secs: Duration) -> Published {
    let deadline = Instant::now() + secs;
    let handles: Vec<_> = (0..MAX_CONNS as u64)
        .map(|c| {
            let (uri, run) = (uri.to_string(), run.to_string());
            spawn_in(pod, move || {
                let mut out = Published::default();
                let mut conn = None;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let seq = (c << 40) | i;
                    if let Some(took) = publish(&mut conn, &uri, &run, seq, &mut out) {
                        out.ack.push(took);
                    }
                    i += 1;
                }
                out
            })
        })
        .collect();
    join(handles)
}

fn join(handles: Vec<std::thread::JoinHandle<Published>>) -> Published {
    let mut all = Published::default();
    for h in handles {
        match h.join() {
            Ok(p) => all.merge(p),
            Err(_) => all.error("a publisher thread panicked".into()),
        }
    }
    all
}

/// Waits until every accepted message of `run` arrived, or none arrived
/// for QUIET; returns (latencies of seqs ≥ `warm`, lost, dups, last
/// delivery instant).
fn collect(
    inbox: &Inbox,
    run: &str,
    accepted: &[u64],
    warm: u64,
) -> (Vec<Duration>, usize, usize, u64) {
    let mut seen = 0;
    let mut progress = Instant::now();
    loop {
        let n = {
            let all = inbox.lock().unwrap_or_else(|e| e.into_inner());
            all.get(run).map_or(0, |r| {
                accepted.iter().filter(|s| r.got.contains_key(s)).count()
            })
        };
        if n == accepted.len() || progress.elapsed() > QUIET {
            break;
        }
        if n > seen {
            seen = n;
            progress = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = inbox.lock().unwrap_or_else(|e| e.into_inner());
    let Some(r) = all.get(run) else {
        return (Vec::new(), accepted.len(), 0, 0);
    };
    let lost = accepted.iter().filter(|s| !r.got.contains_key(s)).count();
    let lat = accepted
        .iter()
        .filter(|s| **s >= warm)
        .filter_map(|s| r.got.get(s).copied())
        .collect();
    (lat, lost, r.dups, r.last)
}

/// One open-loop run's figures.
#[derive(Debug)]
struct Row {
    lat: Dist,
    ack: Dist,
    /// Timed-window deliveries per second.
    rate: f64,
    published: usize,
    lost: usize,
    dups: usize,
    late: usize,
    errors: usize,
    error_samples: Vec<String>,
    /// Agent CPU seconds over the window, window seconds, peak VmRSS (KiB).
    cpu: Option<(f64, f64)>,
    rss_peak: u64,
    hwm: u64,
}

/// One broker's figures: (label, through the runtime, direct, max throughput).
type Results = (
    &'static str,
    Result<Row, String>,
    Result<Row, String>,
    Option<MaxRow>,
);

/// A max-throughput (closed-loop) run's figures.
#[derive(Debug)]
struct MaxRow {
    publish_rate: f64,
    deliver_rate: f64,
    ack_p50: Option<Duration>,
    lost: usize,
    dups: usize,
    errors: usize,
}

fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let mut manifests = world::namespace_yaml();
    manifests.push_str(&world::pod_yaml("pub", Some("pub")));
    manifests.push_str(&world::pod_yaml("sub", Some("sub")));
    let mut w = World::new(&[("pods.yaml", manifests)])?;

    // The shared brokers first, so their components open at once.
    let redis = crate::state::start_redis(&w, REDIS_PORT);
    let nats_dir = Dir::new("rtbench-nats");
    let nats = start_nats(&w, nats_dir.path());
    let mut bus = String::new();
    let mut skipped: BTreeMap<&str, String> = BTreeMap::new();
    match &redis {
        Ok(_) => bus.push_str(&format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: redis-bus}}\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n  - {{name: redisHost, value: \"127.0.0.1:{REDIS_PORT}\"}}\n---\n"
        )),
        Err(e) => {
            skipped.insert("pubsub.redis", e.clone());
        }
    }
    match &nats {
        Ok(_) => bus.push_str(&format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: js-bus}}\nspec:\n  type: pubsub.jetstream\n  version: v1\n  metadata:\n  - {{name: natsURL, value: \"nats://127.0.0.1:{NATS_PORT}\"}}\n---\n"
        )),
        Err(e) => {
            skipped.insert("pubsub.jetstream", e.clone());
        }
    }
    w.agent.apply(&[("bus.yaml", bus)])?;

    let p = w.add_pod("pub")?;
    let s = w.add_bare_pod("sub")?;
    let all = brokers();
    let active: Vec<&Broker> = all
        .iter()
        .filter(|b| !skipped.contains_key(b.label))
        .collect();
    let subscribe: Vec<Value> = active
        .iter()
        .map(|b| json!({"pubsubname": b.component, "topic": TOPIC, "route": b.route}))
        .collect();
    let inbox: Inbox = Arc::default();
    let sub = Subscriber::start(
        &w.pods[s].path(),
        Value::Array(subscribe).to_string(),
        inbox.clone(),
    )?;
    w.wait_known(p, "pub", &[])?;
    wait_subscribed(&w, s, active.len())?;

    let rate = opts.pubsub_rate;
    let secs = opts.pubsub_secs;
    println!(
        "  pod pub publishes {MSG_LEN} B JSON messages through the runtime at {rate} msg/s (open loop, {CONNS} kept-alive \
         connections, {} s warm-up then {secs} s timed); pod sub's app (served by this bench) gets them as CloudEvents \
         and answers SUCCESS; publish -> deliver = the subscriber's receive time - the send time in the message (one CLOCK_MONOTONIC)",
        WARMUP.as_secs()
    );
    println!(
        "  baseline: the same broker through the nodeplane-pubsub crate in this process (publish -> Subscription::next -> ack), \
         same rate and messages, no runtime; redis-server without persistence, nats-server -js with its file store"
    );

    let mut rows: Vec<Results> = Vec::new();
    for b in &active {
        let uri = format!("/v1.0/publish/{}/{TOPIC}", b.component);
        let via = runtime_run(&w, p, &uri, b.label, &inbox, rate, secs);
        let direct = direct_run(&w, b, rate, secs);
        let max = if opts.pubsub_max {
            Some(max_run(&w, p, &uri, &format!("{}-max", b.label), &inbox))
        } else {
            None
        };
        rows.push((b.label, via, direct, max));
    }
    let strange = sub
        .strange
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    drop(sub);

    println!(
        "\n  {:<17} {:<8} {:>10} {:>10} {:>10} {:>9} {:>6} {:>5} {:>5} {:>10} {:>9}",
        "broker", "path", "p50", "p99", "max", "msg/s", "lost", "dups", "late", "pub p99", "errors"
    );
    let line = |label: &str, path: &str, r: &Row| {
        println!(
            "  {:<17} {:<8} {:>10} {:>10} {:>10} {:>9.0} {:>6} {:>5} {:>5} {:>10} {:>9}",
            label,
            path,
            us(r.lat.q(0.5)),
            us(r.lat.q(0.99)),
            us(r.lat.max()),
            r.rate,
            r.lost,
            r.dups,
            r.late,
            us(r.ack.q(0.99)),
            r.errors
        );
    };
    for (label, via, direct, _) in &rows {
        match via {
            Ok(r) => line(label, "runtime", r),
            Err(e) => println!("  {label:<17} runtime  ERROR: {e}"),
        }
        match direct {
            Ok(r) => line("", "direct", r),
            Err(e) => println!("  {:<17} direct   ERROR: {e}", ""),
        }
    }
    for (label, why) in &skipped {
        println!("  {label:<17} not run: {why}");
        report
            .errors
            .push(format!("pubsub {label}: not run: {why}"));
    }
    println!("\n  runtime / direct (publish -> deliver):");
    for (label, via, direct, _) in &rows {
        if let (Ok(v), Ok(d)) = (via, direct) {
            let ratio = |q: f64| match (v.lat.q(q), d.lat.q(q)) {
                (Some(a), Some(b)) if b > Duration::ZERO => {
                    format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64())
                }
                _ => "-".into(),
            };
            println!(
                "  {label:<17} p50 {} ({} vs {}), p99 {} ({} vs {})",
                ratio(0.5),
                us(v.lat.q(0.5)),
                us(d.lat.q(0.5)),
                ratio(0.99),
                us(v.lat.q(0.99)),
                us(d.lat.q(0.99))
            );
        }
    }
    println!("\n  the agent during each runtime run (timed window):");
    for (label, via, _, _) in &rows {
        let Ok(r) = via else { continue };
        match r.cpu {
            Some((cpu, wall)) => println!(
                "  {label:<17} CPU {:.2} s over {:.1} s ({:.1}% of a core), {:.1} µs per message; peak VmRSS {}, VmHWM {}",
                cpu,
                wall,
                100.0 * cpu / wall.max(1e-9),
                1e6 * cpu / (r.rate * wall).max(1.0),
                crate::stats::mib(r.rss_peak),
                crate::stats::mib(r.hwm)
            ),
            None => println!("  {label:<17} CPU: the agent could not be sampled"),
        }
    }
    if opts.pubsub_max {
        println!(
            "\n  max throughput through the runtime: {MAX_CONNS} connections publishing back to back for {MAX_SECS} s \
             (closed loop), the subscriber answering at once"
        );
        println!(
            "  {:<17} {:>12} {:>12} {:>10} {:>6} {:>5} {:>7}",
            "broker", "publish/s", "delivered/s", "pub p50", "lost", "dups", "errors"
        );
        for (label, _, _, max) in &rows {
            if let Some(m) = max {
                println!(
                    "  {:<17} {:>12.0} {:>12.0} {:>10} {:>6} {:>5} {:>7}",
                    label,
                    m.publish_rate,
                    m.deliver_rate,
                    us(m.ack_p50),
                    m.lost,
                    m.dups,
                    m.errors
                );
            }
        }
    }

    for (label, via, direct, max) in &rows {
        for (path, r) in [("runtime", via), ("direct", direct)] {
            if let Ok(r) = r {
                if r.errors > 0 {
                    report.errors.push(format!(
                        "pubsub {label} {path}: {} publish errors, e.g. {:?}",
                        r.errors, r.error_samples
                    ));
                }
            }
        }
        if let Err(e) = via {
            report.errors.push(format!("pubsub {label}: {e}"));
        }
        if let Ok(r) = via {
            let lost = r.lost + max.as_ref().map_or(0, |m| m.lost);
            report.target(
                &format!("{label}: no accepted message lost"),
                format!("{lost} lost of {} published", r.published),
                lost == 0,
            );
        }
    }
    let embedded = rows
        .iter()
        .find(|r| r.0 == "pubsub.embedded")
        .and_then(|r| r.1.as_ref().ok());
    if let Some(r) = embedded {
        let p99 = r.lat.q(0.99).unwrap_or(Duration::MAX);
        report.target(
            &format!("embedded p99 <= 2 ms at {rate} msg/s"),
            format!("p99 {:.3} ms", p99.as_secs_f64() * 1e3),
            p99 <= Duration::from_millis(2) && rate >= 1000,
        );
    }
    for l in strange {
        println!("  subscriber: {l}");
        report.errors.push(format!("pubsub subscriber: {l}"));
    }
    let warnings = w.agent.log_warnings();
    if !warnings.is_empty() {
        println!("  agent warnings ({}), first few:", warnings.len());
        for l in warnings.iter().take(5) {
            println!("    {l}");
        }
    }
    println!("  load average after the section: {}", crate::loadavg());
    drop(redis);
    drop(nats);
    Ok(())
}

/// The open-loop run through the runtime, with the agent sampled.
fn runtime_run(
    w: &World,
    p: usize,
    uri: &str,
    run: &str,
    inbox: &Inbox,
    rate: u32,
    secs: u64,
) -> Result<Row, String> {
    let warm = WARMUP.as_secs() * rate as u64;
    let n = warm + secs * rate as u64;
    let t0 = Instant::now() + Duration::from_millis(200);
    let workers = open_loop(&w.pods[p].path(), uri, run, rate, n, warm, t0);
    let start = t0 + WARMUP;
    let end = start + Duration::from_secs(secs);
    sleep_until(start);
    let before = w.agent.sample().ok();
    let mut rss_peak = before.map_or(0, |s| s.rss_kib);
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(200).min(end.saturating_duration_since(Instant::now())),
        );
        if let Ok(s) = w.agent.sample() {
            rss_peak = rss_peak.max(s.rss_kib);
        }
    }
    let after = w.agent.sample().ok();
    let published = join(workers);
    let (lat, lost, dups, _) = collect(inbox, run, &published.accepted, warm);
    let timed = lat.len();
    Ok(Row {
        rate: timed as f64 / secs as f64,
        lat: Dist::new(lat),
        ack: Dist::new(published.ack),
        published: published.accepted.len(),
        lost,
        dups,
        late: published.late,
        errors: published.errors,
        error_samples: published.error_samples,
        cpu: match (before, after) {
            (Some(b), Some(a)) => Some((a.cpu - b.cpu, (a.at - b.at).as_secs_f64())),
            _ => None,
        },
        rss_peak,
        hwm: after.map_or(0, |s: ProcSample| s.hwm_kib),
    })
}

fn max_run(w: &World, p: usize, uri: &str, run: &str, inbox: &Inbox) -> MaxRow {
    let first = mono_ns();
    let secs = Duration::from_secs(MAX_SECS);
    let published = closed_loop(&w.pods[p].path(), uri, run, secs);
    let (lat, lost, dups, last) = collect(inbox, run, &published.accepted, 0);
    let span = last.saturating_sub(first) as f64 / 1e9;
    MaxRow {
        publish_rate: published.accepted.len() as f64 / secs.as_secs_f64(),
        deliver_rate: if span > 0.0 {
            lat.len() as f64 / span
        } else {
            0.0
        },
        ack_p50: Dist::new(published.ack).q(0.5),
        lost,
        dups,
        errors: published.errors,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Until pod `s`'s metadata lists `n` subscriptions (joined at the broker).
fn wait_subscribed(w: &World, s: usize, n: usize) -> Result<(), String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(m) = w.pods[s].call("GET", "/v1.0/metadata", b"") {
            let v = m.json();
            if v["subscriptions"].as_array().is_some_and(|a| a.len() == n) {
                return Ok(());
            }
            last = m.text();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "pod sub has not {n} subscriptions after 30 s; metadata {last}; agent log:\n{}",
        w.agent.log_tail()
    ))
}

/// The baseline: broker `b` through the nodeplane-pubsub crate in this
/// process, from the node namespace (where redis and nats listen), at the
/// same rate with the same messages.
fn direct_run(w: &World, b: &Broker, rate: u32, secs: u64) -> Result<Row, String> {
    let dir = Dir::new("rtbench-direct");
    let spec = nodeplane_pubsub::ComponentSpec {
        name: "baseline".into(),
        kind: b.direct.0.into(),
        version: "v1".into(),
        metadata: b
            .direct
            .1
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    };
    let state: PathBuf = dir.path().to_path_buf();
    let label = b.label.to_string();
    let got = spawn_in(&w.node.ns.path(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?;
        rt.block_on(direct_async(spec, state, label, rate, secs))
    })
    .join()
    .map_err(|_| "the baseline thread panicked".to_string())?;
    drop(dir);
    got
}

async fn direct_async(
    spec: nodeplane_pubsub::ComponentSpec,
    state: PathBuf,
    run: String,
    rate: u32,
    secs: u64,
) -> Result<Row, String> {
    let broker = nodeplane_pubsub::open(&spec, &state)
        .await
        .map_err(|e| format!("open {}: {e}", spec.kind))?;
    let topic = "baseline";
    let mut sub = broker
        .subscribe(topic, "baseline")
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let warm = WARMUP.as_secs() * rate as u64;
    let n = warm + secs * rate as u64;
    let accepted: Arc<Mutex<Published>> = Arc::default();
    let (b2, acc, run2) = (broker.clone(), accepted.clone(), run.clone());
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let publisher = tokio::spawn(async move {
        let mut tasks = Vec::with_capacity(n as usize);
        for seq in 0..n {
            let due = t0 + Duration::from_secs_f64(seq as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            let late = tokio::time::Instant::now() - due > Duration::from_millis(1);
            let (b, acc, run) = (b2.clone(), acc.clone(), run2.clone());
            // Not awaited one by one: a slow ack does not lower the rate.
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let msg = nodeplane_pubsub::Message {
                    id: format!("{run}-{seq}"),
                    topic: "baseline".into(),
                    data: bytes::Bytes::from(message(&run, seq, mono_ns())),
                    content_type: "application/json".into(),
                    metadata: BTreeMap::new(),
                };
                let r = b.publish(msg).await;
                let took = t.elapsed();
                let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
                if late {
                    a.late += 1;
                }
                match r {
                    Ok(()) => {
                        a.accepted.push(seq);
                        if seq >= warm {
                            a.ack.push(took);
                        }
                    }
                    Err(e) => a.error(format!("publish: {e}")),
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let mut got: HashMap<u64, Duration> = HashMap::new();
    let mut dups = 0;
    let mut strange = 0;
    loop {
        let done = publisher.is_finished();
        let want = accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accepted
            .len();
        if done && got.len() >= want {
            break;
        }
        match tokio::time::timeout(QUIET, sub.next()).await {
            Ok(Ok(d)) => {
                let now = mono_ns();
                match parse_message(&d.msg.data) {
                    Some((_, seq, sent)) => {
                        if got
                            .insert(seq, Duration::from_nanos(now.saturating_sub(sent)))
                            .is_some()
                        {
                            dups += 1;
                        }
                    }
                    None => strange += 1,
                }
                tokio::spawn(d.token.ack());
            }
            Ok(Err(e)) => return Err(format!("next: {e}")),
            Err(_) if publisher.is_finished() => break,
            Err(_) => {}
        }
    }
    let _ = publisher.await;
    let _ = sub.close().await;
    let p = std::mem::take(&mut *accepted.lock().unwrap_or_else(|e| e.into_inner()));
    let lost = p.accepted.iter().filter(|s| !got.contains_key(s)).count();
    let lat: Vec<Duration> = p
        .accepted
        .iter()
        .filter(|s| **s >= warm)
        .filter_map(|s| got.get(s).copied())
        .collect();
    let mut errors = p.errors;
    let mut error_samples = p.error_samples;
    if strange > 0 {
        errors += strange;
        error_samples.push(format!("{strange} deliveries not parsable"));
    }
    Ok(Row {
        rate: lat.len() as f64 / secs as f64,
        lat: Dist::new(lat),
        ack: Dist::new(p.ack),
        published: p.accepted.len(),
        lost,
        dups,
        late: p.late,
        errors,
        error_samples,
        cpu: None,
        rss_peak: 0,
        hwm: 0,
    })
}

/// nats-server -js on 127.0.0.1:NATS_PORT in the node namespace, its
/// store in `dir`.
fn start_nats(w: &World, dir: &Path) -> Result<Proc, String> {
    if !crate::world::tool("nats-server") {
        return Err("nats-server not found: install the Debian package nats-server".into());
    }
    let child = nodeplane_tests::apps::nats_command(&w.node.ns, NATS_PORT, dir)
        .map_err(|e| format!("nats log: {e}"))?
        .spawn()
        .map_err(|e| format!("spawn nats-server: {e}"))?;
    let proc = Proc::new(child, Duration::from_secs(3600));
    if !nodeplane_tests::apps::nats_ready(dir.join("nats.log"), Duration::from_secs(10)) {
        return Err(format!(
            "nats-server did not get ready within 10 s: {}",
            std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
        ));
    }
    Ok(proc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_1k_and_parse_back_plain_and_enveloped() {
        let m = message("pubsub.redis", 42, 123_456_789);
        assert_eq!(m.len(), MSG_LEN);
        let want = Some(("pubsub.redis".to_string(), 42, 123_456_789));
        assert_eq!(parse_message(&m), want);
        let data: Value = serde_json::from_slice(&m).expect("json");
        let ce = json!({"specversion": "1.0", "data": data});
        assert_eq!(parse_message(ce.to_string().as_bytes()), want);
        let ce = json!({"specversion": "1.0", "data": String::from_utf8(m).expect("utf8")});
        assert_eq!(parse_message(ce.to_string().as_bytes()), want);
    }
}
