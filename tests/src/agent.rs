//! A nodeplane-agent running in a test node's namespace, in standalone mode
//! (manifests directory), with its own socket, state, table and port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixture::Node;
use crate::{Netns, TempDir};

#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub manifests: TempDir,
    pub state: TempDir,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    ns_path: PathBuf,
    args: Vec<String>,
}

/// Path to the `nodeplane-agent` binary built alongside the running test.
pub fn agent_bin() -> PathBuf {
    let p = crate::target_dir().join("nodeplane-agent");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (cargo test --workspace does this)",
        p.display()
    );
    p
}

/// GET `path` from 127.0.0.1:`port` inside the network namespace `ns`:
/// (status code, body); None if nothing answers within 5 s.
pub fn http_get_in(ns: &Path, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    })
}

/// Runs `f` on a thread that has entered `ns` (only that thread moves).
pub fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}", ns.display());
        f()
    })
    .join()
    .expect("netns thread")
}

impl Agent {
    /// Starts an agent for `node` (whose plugin config is pointed at the
    /// agent's socket) with `extra` flags. Pod CIDRs: `cidrs`.
    pub fn start(node: &mut Node, cidrs: &[&str], extra: &[&str]) -> Agent {
        crate::prereq::require_tool("nft", "nftables");
        crate::prereq::require_tool("conntrack", "conntrack");
        let manifests = TempDir::new("manifests");
        let state = TempDir::new("agentstate");
        let socket = state.path().join("agent.sock");
        node.base["agentSocket"] = Value::String(socket.display().to_string());
        let port = 20000 + (std::process::id() % 20000) as u16;
        let mut args = vec![
            "--manifests-dir".to_string(),
            manifests.path().display().to_string(),
            "--state-dir".into(),
            state.path().display().to_string(),
            "--cni-state-dir".into(),
            node.state.path().display().to_string(),
            "--network".into(),
            node.network.clone(),
            "--socket".into(),
            socket.display().to_string(),
            "--runtime-dir".into(),
            state.path().join("runtime").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--log-level".into(),
            "info".into(),
        ];
        for c in cidrs {
            args.extend(["--pod-cidr".to_string(), c.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = state.path().join("agent.log");
        let mut a = Agent {
            child: None,
            manifests,
            state,
            socket,
            port,
            log,
            ns_path: node.ns.path(),
            args,
        };
        a.spawn(&node.ns);
        a
    }

    fn spawn(&mut self, ns: &Netns) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = ns
            .command(agent_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nodeplane-agent");
        self.child = Some(child);
        self.wait_ready();
    }

    /// One request on the agent's local API socket (as the plugin and the
    /// CRI shim send them), and its reply.
    pub fn request(&self, req: nodeplane_proto::agent::Request) -> nodeplane_proto::agent::Reply {
        use nodeplane_proto::prost::Message;
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("agent socket");
        s.write_all(&req.encode_length_delimited_to_vec())
            .expect("send");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("reply");
        nodeplane_proto::agent::Reply::decode_length_delimited(buf.as_slice())
            .expect("decode reply")
    }

    /// The agent's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the agent's HTTP endpoint: (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.ns_path, self.port, path)
    }

    pub fn status(&self) -> Value {
        self.get("/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if matches!(self.get("/readyz"), Some((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nodeplane-agent not ready within 20 s; log:\n{}",
            self.log_text()
        );
    }

    /// Replaces the manifests directory's contents with `files` (name,
    /// YAML) and waits until the agent has put exactly them in force.
    pub fn apply(&self, files: &[(&str, String)]) {
        let dir = self.manifests.path();
        for entry in std::fs::read_dir(dir).expect("read manifests").flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        for (name, text) in files {
            // Write then rename, as kubectl-like tools do: the agent never
            // reads a half-written file.
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("write manifest");
            std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
        }
        self.wait_revision();
    }

    /// Waits until the agent reports the manifests directory's digest in
    /// force, with the denied connections cut (`flowsRevision`).
    pub fn wait_revision(&self) {
        let want = nodeplane_agent::source::manifests::digest_dir(self.manifests.path())
            .expect("digest manifests");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let s = self.status();
            if s["flowsRevision"] == want.as_str() && s["programmed"] == true {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("State:"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "process gone".into());
        panic!(
            "agent did not put manifests {want} in force within 20 s; status {}; agent pid {pid} {state}; log:\n{}",
            self.status(),
            self.log_text()
        );
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again with the same settings.
    pub fn restart(&mut self, ns: &Netns) {
        self.kill9();
        self.spawn(ns);
    }

    /// The agent's nftables table as `nft list` prints it.
    pub fn ruleset(&self, ns: &Netns) -> String {
        let out = ns
            .command("nft")
            .args(["list", "table", "inet", "nodeplane"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Its table goes away with the test's node namespace.
            crate::terminate(&mut c, Duration::from_secs(3));
        }
    }
}
