//! One bench node: a node namespace (the tests' fixture) running a
//! nodeplane-agent in standalone mode, pods ADDed through nodeplane-cni,
//! np-app serving in them, and the agent's CPU and memory read from /proc.
//!
//! The agent is started here rather than with `nodeplane_tests::agent::Agent`
//! so that its pid is registered with the guard the moment it exists: the
//! release profile aborts on panic, and an agent left running would keep a
//! deleted namespace alive.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nodeplane_tests::agent::http_get_in;
use nodeplane_tests::fixture::{ip_of, Node};
use nodeplane_tests::http1::{Conn, Msg, RUNTIME};
use serde_json::Value;

use crate::guard::{self, Dir, Ns, Reg};

pub const CIDR: &str = "10.244.0.0/24";
pub const APP_PORT: u16 = 8080;
/// The Kubernetes namespace of every bench pod.
pub const K8S_NS: &str = "bench";
/// Where the agent serves /status, /readyz, /metrics inside its namespace.
const AGENT_PORT: u16 = 9651;

pub fn bin(name: &str) -> Result<PathBuf, String> {
    let p = nodeplane_tests::target_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            // With --bin, cargo builds only the bins named, so all four are.
            "{} is missing: build it with `cargo build --release -p nodeplane-agent -p nodeplane-cni -p nodeplane-tests \
             --bin nodeplane-agent --bin nodeplane-cni --bin np-app --bin runtime-bench`",
            p.display()
        ))
    }
}

/// A pod manifest with app id `app` (None: no app id) on APP_PORT.
/// Whether `bin` is on the PATH.
pub fn tool(bin: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn pod_yaml(name: &str, app: Option<&str>) -> String {
    let ann = app
        .map(|a| format!("dapr.io/app-id: {a}, dapr.io/app-port: \"{APP_PORT}\""))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {K8S_NS}, labels: {{pod: {name}}}, annotations: {{{ann}}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\n---\n"
    )
}

pub fn namespace_yaml() -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {K8S_NS}}}\n---\n")
}

/// A node namespace with its agent. Field order is drop order: pods go
/// first (np-app ends, namespaces deleted), then the agent, then the node.
pub struct World {
    pub pods: Vec<Pod>,
    pub agent: BenchAgent,
    pub node: Node,
    _reg: Reg,
}

impl World {
    /// A node and a running, ready agent with `manifests` in force.
    pub fn new(manifests: &[(&str, String)]) -> Result<World, String> {
        World::with(CIDR, &[], manifests)
    }

    /// A node with pod CIDR `cidr` whose agent gets `extra` flags.
    pub fn with(
        cidr: &str,
        extra: &[String],
        manifests: &[(&str, String)],
    ) -> Result<World, String> {
        let mut node = Node::new(&[cidr]);
        let reg = Reg::new(&node.ns.name, node.state.path());
        let mut agent = BenchAgent::new(&node, cidr, extra)?;
        node.base["agentSocket"] = Value::String(agent.socket.display().to_string());
        agent.start(&node)?;
        agent.wait_ready(Duration::from_secs(20))?;
        agent.apply(manifests)?;
        Ok(World {
            pods: Vec::new(),
            agent,
            node,
            _reg: reg,
        })
    }

    /// ADDs pod `name` through nodeplane-cni and starts np-app in it.
    pub fn add_pod(&mut self, name: &str) -> Result<usize, String> {
        self.add_pod_with(name, true)
    }

    /// ADDs pod `name` with nothing serving in it: the bench itself serves
    /// the app port there (pubsub: a subscriber that timestamps deliveries
    /// on the publisher's clock).
    pub fn add_bare_pod(&mut self, name: &str) -> Result<usize, String> {
        self.add_pod_with(name, false)
    }

    fn add_pod_with(&mut self, name: &str, np_app: bool) -> Result<usize, String> {
        let ns = Ns::new("nprb");
        let res = self
            .node
            .add_pod(&format!("bench-{name}"), &ns, K8S_NS, name);
        let ip = ip_of(&res, 0);
        let app = if np_app { Some(start_app(&ns)?) } else { None };
        self.pods.push(Pod {
            app,
            ns,
            ip,
            name: name.to_string(),
        });
        Ok(self.pods.len() - 1)
    }

    /// Waits until the runtime knows pod `caller` by its address (its
    /// attachment reached the agent) with app id `app`, and can invoke
    /// every app in `targets`.
    pub fn wait_known(&self, caller: usize, app: &str, targets: &[&str]) -> Result<(), String> {
        let p = &self.pods[caller];
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(30) {
            let m = p.call("GET", "/v1.0/metadata", b"");
            let known = m.as_ref().is_ok_and(|m| m.json()["id"] == app);
            if known
                && targets.iter().all(|t| {
                    p.call("GET", &format!("/v1.0/invoke/{t}/method/ping"), b"")
                        .is_ok_and(|m| m.status() == 200)
                })
            {
                return Ok(());
            }
            last = match m {
                Ok(m) => m.text(),
                Err(e) => e.to_string(),
            };
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "the runtime did not learn pod {} ({app}) and its targets {targets:?} within 30 s; last metadata: {last}; agent log:\n{}",
            p.name,
            self.agent.log_tail()
        ))
    }
}

/// A pod running np-app on APP_PORT.
pub struct Pod {
    app: Option<Child>,
    pub ns: Ns,
    pub ip: String,
    pub name: String,
}

impl Pod {
    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// One request to the runtime from inside this pod (fresh connection).
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Msg> {
        nodeplane_tests::http1::runtime_in(&self.path(), method, path, &[], body)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut c) = self.app.take() {
            let _ = c.kill();
            let _ = c.wait();
            guard::unwatch(c.id());
        }
    }
}

fn start_app(ns: &Ns) -> Result<Child, String> {
    let mut c = ns
        .command(bin("np-app")?)
        .args(["serve", &APP_PORT.to_string(), "--exit-on-stdin-eof"])
        // Our end of stdin closes when the bench dies, however it dies,
        // and np-app then exits on its own.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn np-app: {e}"))?;
    guard::watch_forever(c.id());
    let mut line = [0u8; 6];
    if let Some(out) = c.stdout.as_mut() {
        let _ = out.read_exact(&mut line);
    }
    if &line != b"ready\n" {
        return Err(format!("np-app did not start in {}", ns.name));
    }
    Ok(c)
}

/// Runs `f` on a new thread that has entered the network namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid fd changes only this thread's netns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}", ns.display());
        f()
    })
}

/// A kept-alive connection to `addr` (from the calling thread's netns).
pub fn connect(addr: &str) -> std::io::Result<Conn<std::net::TcpStream>> {
    let sa: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(Conn::new(s))
}

/// The kept-alive connection to the runtime held in `conn`, opened when
/// there is none; a failed connect is recorded in `errors` and paced, and
/// gives None (the caller skips that request).
pub fn runtime_conn<'a>(
    conn: &'a mut Option<Conn<std::net::TcpStream>>,
    errors: &mut Vec<String>,
) -> Option<&'a mut Conn<std::net::TcpStream>> {
    if conn.is_none() {
        match connect(runtime_addr()) {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                errors.push(format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                return None;
            }
        }
    }
    conn.as_mut()
}

pub fn runtime_addr() -> &'static str {
    RUNTIME
}

/// The agent of one bench node.
pub struct BenchAgent {
    child: Option<Child>,
    pub pid: u32,
    ns_path: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    _root: Dir,
}

impl BenchAgent {
    fn new(node: &Node, cidr: &str, extra: &[String]) -> Result<Self, String> {
        let root = Dir::new("rtbench");
        let manifests = root.path().join("manifests");
        let state = root.path().join("state");
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
            &node.state.path().display().to_string(),
            "--network",
            &node.network,
            "--socket",
            &socket.display().to_string(),
            "--runtime-dir",
            &state.join("runtime").display().to_string(),
            "--listen",
            &format!("127.0.0.1:{AGENT_PORT}"),
            "--pod-cidr",
            cidr,
            "--log-level",
            "info",
        ]
        .map(String::from)
        .into_iter()
        .chain(extra.iter().cloned())
        .collect();
        Ok(BenchAgent {
            child: None,
            pid: 0,
            ns_path: node.ns.path(),
            log: state.join("agent.log"),
            manifests,
            state,
            socket,
            args,
            _root: root,
        })
    }

    fn start(&mut self, node: &Node) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).map_err(|e| format!("agent log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("agent log: {e}"))?;
        let child = node
            .ns
            .command(bin("nodeplane-agent")?)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn nodeplane-agent: {e}"))?;
        guard::watch_forever(child.id());
        self.pid = child.id();
        self.child = Some(child);
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.ns_path, AGENT_PORT, path)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Log lines at WARN or ERROR (for the report).
    pub fn log_warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if matches!(self.get("/readyz"), Some((200, _))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "nodeplane-agent not ready within {limit:?}; log:\n{}",
            self.log_tail()
        ))
    }

    /// Writes `files` (name, YAML) into the manifests directory (write +
    /// rename, so the agent never reads half a file) and waits until the
    /// agent has put the directory's contents in force.
    pub fn apply(&self, files: &[(&str, String)]) -> Result<(), String> {
        for (name, text) in files {
            self.write_manifest(name, text)?;
        }
        let want = nodeplane_agent::source::manifests::digest_dir(&self.manifests)
            .map_err(|e| format!("digest manifests: {e}"))?;
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < Duration::from_secs(30) {
            if let Some((_, b)) = self.get("/status") {
                let s: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
                if s["flowsRevision"] == want.as_str() && s["programmed"] == true {
                    return Ok(());
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the agent did not put manifests {want} in force within 30 s; status {last}; log:\n{}",
            self.log_tail()
        ))
    }

    /// Writes one manifest file (write + rename) without waiting.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<(), String> {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| format!("write {name}: {e}"))?;
        std::fs::rename(&tmp, self.manifests.join(name)).map_err(|e| format!("rename {name}: {e}"))
    }

    /// The agent process's CPU and memory now.
    pub fn sample(&self) -> Result<ProcSample, String> {
        ProcSample::of(self.pid)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nodeplane_tests::terminate(&mut c, Duration::from_secs(3));
            guard::unwatch(c.id());
        }
    }
}

/// CPU time and memory of a process, read from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// utime + stime of all its threads, in seconds (clock-tick resolution).
    pub cpu: f64,
    /// The stime part (in the kernel: syscalls, and the network stack's
    /// work done on the agent's behalf).
    pub sys: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub threads: u64,
}

impl ProcSample {
    pub fn of(pid: u32) -> Result<ProcSample, String> {
        let at = Instant::now();
        use nodeplane_tests::bench::cpu;
        let (user, sys) = cpu::process_ticks(pid)?;
        let hz = cpu::ticks_per_second();
        let cpu = (user + sys) as f64 / hz;
        let sys = sys as f64 / hz;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcSample {
            at,
            cpu,
            sys,
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            threads: field("Threads:"),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "VmRSS {} (anon {}, file {}), VmHWM {}, {} threads",
            crate::stats::mib(self.rss_kib),
            crate::stats::mib(self.anon_kib),
            crate::stats::mib(self.file_kib),
            crate::stats::mib(self.hwm_kib),
            self.threads
        )
    }
}
