//! Real servers for the tests: each test starts its own redis-server or
//! nats-server (with JetStream) on a free 127.0.0.1 port in its own temp
//! dir and kills it on drop (also when the test panics).

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeplane_pubsub::{ComponentSpec, Delivery, Message, Subscription};

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "npps-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

pub fn spec(name: &str, kind: &str, metadata: &[(&str, &str)]) -> ComponentSpec {
    ComponentSpec {
        name: name.into(),
        kind: kind.into(),
        version: "v1".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub fn message(topic: &str, id: &str, data: &str) -> Message {
    Message {
        id: id.into(),
        topic: topic.into(),
        data: Bytes::from(data.to_owned()),
        content_type: "text/plain".into(),
        metadata: BTreeMap::new(),
    }
}

/// The next delivery, or a panic naming what was awaited.
pub async fn next(sub: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(15), sub.next()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!("{what}: next failed: {e}"),
        Err(_) => panic!("{what}: no delivery within 15 s"),
    }
}

/// A delivery if one comes within `wait`.
pub async fn maybe_next(sub: &mut Box<dyn Subscription>, wait: Duration) -> Option<Delivery> {
    match tokio::time::timeout(wait, sub.next()).await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => panic!("next failed: {e}"),
        Err(_) => None,
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Tries a server up to three times, on a fresh free port each time:
/// another process may take the port between our probe and its bind.
const ATTEMPTS: usize = 3;

fn wait_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited during start-up ({status}):\n{}",
                log_tail(log)
            ));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} not ready after 20 s:\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn binary(candidates: &[&str], package: &str) -> PathBuf {
    for c in candidates {
        let p = Path::new(c);
        if p.exists() {
            return p.to_owned();
        }
    }
    panic!(
        "{} not found: install the Debian package {package}",
        candidates.join(" or ")
    );
}

#[derive(Debug)]
pub struct Redis {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let bin = binary(&["/usr/bin/redis-server"], "redis-server");
        let dir = TempDir::new("redis");
        let log = dir.path().join("redis.log");
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(File::create(&log).expect("redis log"))
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn redis-server");
            match wait_ready(&mut child, "redis-server", &log, || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                Ok(()) => return Redis { child, port, dir },
                Err(e) => failures.push(e),
            }
        }
        panic!("{}", failures.join("\n"));
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats-server with JetStream, its store in a temp dir.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let bin = binary(
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
            "nats-server",
        );
        let dir = TempDir::new("nats");
        let log = dir.path().join("nats.log");
        let store = dir.path().join("js");
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                .arg("-sd")
                .arg(&store)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("nats log"))
                .spawn()
                .expect("spawn nats-server");
            match wait_ready(&mut child, "nats-server", &log, || {
                std::fs::read_to_string(&log).is_ok_and(|s| s.contains("Server is ready"))
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                Ok(()) => return Nats { child, port, dir },
                Err(e) => failures.push(e),
            }
        }
        panic!("{}", failures.join("\n"));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
