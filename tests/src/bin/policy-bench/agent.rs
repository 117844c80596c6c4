//! A nodeplane-agent in a node namespace, driven the way the bench needs:
//! started and stopped on demand, polled through a client that lives in the
//! node namespace (so a poll costs one loopback connection, not a thread),
//! and told about pods over its unix socket exactly as nodeplane-cni does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nodeplane_proto::agent::{request::What, Reply, Request};
use nodeplane_proto::prost::Message;
use nodeplane_tests::Netns;
use serde_json::Value;

use crate::guard;

/// Where the agent answers /status and /metrics inside its namespace.
const PORT: u16 = 9650;

/// The node name every bench agent runs as.
pub const NODE_NAME: &str = "node-1";

/// How often a wait polls /status (`--poll-ms`).
static POLL_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);

/// The agents' log level (`--agent-log-level`).
static LOG_LEVEL: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

pub fn set_poll(d: Duration) {
    POLL_US.store(d.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
}

pub fn poll() -> Duration {
    Duration::from_micros(POLL_US.load(std::sync::atomic::Ordering::Relaxed))
}

pub fn set_log_level(level: &str) {
    *LOG_LEVEL.lock().unwrap_or_else(|e| e.into_inner()) = level.to_string();
}

fn log_level() -> String {
    let l = LOG_LEVEL.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if l.is_empty() {
        "warn".into()
    } else {
        l
    }
}

#[derive(Debug)]
pub struct BenchAgent {
    child: Option<Child>,
    ns_path: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    http: NsHttp,
}

/// The agent binary next to the bench (`cargo build --release -p nodeplane-agent`).
pub fn agent_bin() -> Result<PathBuf, String> {
    let p = nodeplane_tests::target_dir().join("nodeplane-agent");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p nodeplane-agent -p nodeplane-cni`",
            p.display()
        ))
    }
}

impl BenchAgent {
    /// An agent (not started) for the node namespace `ns`, keeping its
    /// manifests and state under `root`, reading the plugin's records in
    /// `cni_state`, with `pod_cidr` as this node's pod range.
    pub fn new(ns: &Netns, root: &Path, cni_state: &Path, pod_cidr: &str) -> Result<Self, String> {
        let manifests = root.join("manifests");
        let state = root.join("state");
        for d in [&manifests, &state] {
            std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let socket = state.join("agent.sock");
        let args = [
            "--manifests-dir",
            &manifests.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--cni-state-dir",
            &cni_state.display().to_string(),
            "--network",
            "nodeplane",
            "--socket",
            &socket.display().to_string(),
            "--runtime-dir",
            &state.join("runtime").display().to_string(),
            "--listen",
            &format!("127.0.0.1:{PORT}"),
            "--pod-cidr",
            pod_cidr,
            "--node-name",
            NODE_NAME,
            "--log-level",
            &log_level(),
        ]
        .map(String::from)
        .to_vec();
        Ok(BenchAgent {
            child: None,
            ns_path: ns.path(),
            log: state.join("agent.log"),
            manifests,
            state,
            socket,
            args,
            http: NsHttp::new(ns)?,
        })
    }

    /// Spawns the agent; returns the instant just before the spawn.
    pub fn start(&mut self) -> Result<Instant, String> {
        let bin = agent_bin()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("agent log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("agent log: {e}"))?;
        let ns = std::fs::File::open(&self.ns_path)
            .map_err(|e| format!("open {}: {e}", self.ns_path.display()))?;
        let mut cmd = std::process::Command::new(bin);
        nodeplane_tests::netns::enter_in_child(&mut cmd, ns);
        let t0 = Instant::now();
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn nodeplane-agent: {e}"))?;
        guard::watch_forever(child.id());
        self.child = Some(child);
        Ok(t0)
    }

    /// SIGTERM (the agent drains and leaves its table), then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nodeplane_tests::terminate(&mut c, Duration::from_secs(5));
            guard::unwatch(c.id());
        }
    }

    /// The agent's whole log (printed when `--agent-log-level` is given).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        self.http.get(path)
    }

    pub fn status(&self) -> Option<Value> {
        self.get("/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
    }

    /// One gauge or counter from /metrics (without labels).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics")?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// (Σ seconds, count) of the agent's reconciles so far: the difference
    /// across a change covers every programming round the change caused.
    pub fn reconcile_totals(&self) -> Option<(f64, u64)> {
        let (_, text) = self.get("/metrics")?;
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        Some((
            value("nodeplane_reconcile_duration_seconds_sum")?,
            value("nodeplane_reconcile_duration_seconds_count")? as u64,
        ))
    }

    /// All lines of one metric family (with labels), for printing.
    pub fn metric_lines(&self, name: &str) -> Vec<String> {
        let Some((_, text)) = self.get("/metrics") else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    /// Polls /status until the agent reports `revision` programmed; returns
    /// the instant the poll saw it, and the status then.
    ///
    /// The poll interval is 5 % of the time waited so far, at least
    /// `--poll-ms` and at most 20 ms: a figure overshoots by about 5 % at
    /// most, while a wait of a second costs ~100 requests instead of 1,000
    /// (on 2 cores, polling every 1 ms measurably slowed the agent down).
    pub fn wait_revision(
        &self,
        revision: &str,
        limit: Duration,
    ) -> Result<(Instant, Value), String> {
        self.wait_field("revision", revision, limit)
    }

    /// As `wait_revision`, for the revision whose denied established
    /// connections the agent has also cut (it sets `flowsRevision` once
    /// the conntrack cut after the rules returned).
    pub fn wait_flows(&self, revision: &str, limit: Duration) -> Result<(Instant, Value), String> {
        self.wait_field("flowsRevision", revision, limit)
    }

    fn wait_field(
        &self,
        field: &str,
        revision: &str,
        limit: Duration,
    ) -> Result<(Instant, Value), String> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < limit {
            if let Some(s) = self.status() {
                if s[field] == revision && s["programmed"] == true {
                    return Ok((Instant::now(), s));
                }
                last = s;
            }
            if let Some(c) = &self.child {
                if std::fs::metadata(format!("/proc/{}", c.id())).is_err() {
                    break;
                }
            }
            let cap = Duration::from_millis(20).max(poll());
            std::thread::sleep((start.elapsed() / 20).clamp(poll(), cap));
        }
        Err(format!(
            "the agent did not report {field} {revision} within {limit:?}; last status {last}; log:\n{}",
            self.log_tail()
        ))
    }

    /// Waits until /readyz says 200.
    pub fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if matches!(self.get("/readyz"), Some((200, _))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!(
            "nodeplane-agent not ready within {limit:?}; log:\n{}",
            self.log_tail()
        ))
    }

    /// The manifests directory's digest, as the agent reports it.
    pub fn digest(&self) -> Result<String, String> {
        nodeplane_agent::source::manifests::digest_dir(&self.manifests).map_err(|e| e.to_string())
    }

    /// One request over the agent's socket, as nodeplane-cni sends it.
    pub fn request(&self, what: What) -> Result<Reply, String> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| format!("agent socket {}: {e}", self.socket.display()))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let request = Request { what: Some(what) };
        s.write_all(&request.encode_length_delimited_to_vec())
            .map_err(|e| format!("send to agent: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .map_err(|e| format!("read agent reply: {e}"))?;
        Reply::decode_length_delimited(buf.as_slice()).map_err(|e| format!("bad agent reply: {e}"))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

type HttpReq = (String, mpsc::Sender<Option<(u16, String)>>);

/// An HTTP/1.1 client on a thread that has entered the node namespace once.
#[derive(Debug)]
struct NsHttp {
    tx: mpsc::Sender<HttpReq>,
}

impl NsHttp {
    fn new(ns: &Netns) -> Result<Self, String> {
        let file = ns.open();
        let (tx, rx) = mpsc::channel::<HttpReq>();
        let (ok_tx, ok_rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid fd changes only this thread's netns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ok_tx.send(Err(std::io::Error::last_os_error().to_string()));
                return;
            }
            let _ = ok_tx.send(Ok(()));
            // Ends when the BenchAgent (the only sender) is dropped. One
            // kept-alive connection: a connection per poll would leave
            // thousands of TIME_WAIT entries in the node's conntrack table,
            // which the agent's conntrack cut then has to read.
            let mut conn: Option<BufReader<TcpStream>> = None;
            for (path, reply) in rx {
                let mut got = http_get(&mut conn, &path);
                if got.is_none() {
                    conn = None; // the agent closed it, or restarted: once more
                    got = http_get(&mut conn, &path);
                }
                let _ = reply.send(got);
            }
        });
        ok_rx
            .recv()
            .map_err(|e| format!("HTTP client thread: {e}"))?
            .map_err(|e| format!("setns for the HTTP client: {e}"))?;
        Ok(NsHttp { tx })
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let (tx, rx) = mpsc::channel();
        self.tx.send((path.to_string(), tx)).ok()?;
        rx.recv().ok().flatten()
    }
}

/// GET `path` on the kept-alive connection `conn` (opened if None; left
/// None after an error).
fn http_get(conn: &mut Option<BufReader<TcpStream>>, path: &str) -> Option<(u16, String)> {
    if conn.is_none() {
        let s = TcpStream::connect(("127.0.0.1", PORT)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.set_nodelay(true).ok()?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut()?;
    let got = (|| {
        write!(r.get_mut(), "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let code = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut len = 0usize;
        loop {
            line.clear();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok()?;
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some((code, String::from_utf8_lossy(&body).into_owned()))
    })();
    if got.is_none() {
        *conn = None;
    }
    got
}

/// Writes `text` to `dir/name` atomically: written in `stage` (a directory
/// on the same filesystem that the agent does not watch), then renamed in,
/// so the agent sees one event and never a half-written file.
pub fn put_file(stage: &Path, dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let tmp = stage.join(name);
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("rename into {}: {e}", dir.display()))
}
