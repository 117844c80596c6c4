//! App pods for the app runtime's tests and benchmark: a pod namespace
//! wired by nodeplane-cni with np-app serving in it, and the manifests
//! that give it an app id.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{ip_of, Node};
use crate::http1::{runtime_in, Msg};
use crate::Netns;

/// Where np-app listens in every app pod.
pub const APP_PORT: u16 = 8080;

/// A pod running np-app on [`APP_PORT`]; the app is stopped on drop.
#[derive(Debug)]
pub struct AppPod {
    pub ns: Netns,
    pub ip: String,
    app: Option<Child>,
    env: Vec<(String, String)>,
}

impl Drop for AppPod {
    fn drop(&mut self) {
        if let Some(mut c) = self.app.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl AppPod {
    /// ADDs pod `namespace/name` on `node` (CNI_ARGS naming it) and starts np-app in it.
    pub fn add(node: &Node, namespace: &str, name: &str) -> AppPod {
        Self::add_with(node, namespace, name, &[])
    }

    /// [`AppPod::add`] with np-app started with `env` (e.g.
    /// `NP_APP_SUBSCRIBE`).
    pub fn add_with(node: &Node, namespace: &str, name: &str, env: &[(&str, &str)]) -> AppPod {
        let ns = Netns::new(&format!("npr{name}"));
        let res = node.add_pod(&format!("{namespace}-{name}"), &ns, namespace, name);
        let ip = ip_of(&res, 0)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let app = Some(start_app_with(&ns, &env));
        AppPod { ns, ip, app, env }
    }

    /// Stops np-app (the pod stays, its port closed).
    pub fn stop_app(&mut self) {
        if let Some(mut c) = self.app.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts np-app again, with the same environment (its recorded
    /// deliveries start empty).
    pub fn start_app(&mut self) {
        self.stop_app();
        self.app = Some(start_app_with(&self.ns, &self.env));
    }

    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// What np-app has recorded (`GET /deliveries`, asked inside the pod):
    /// pub/sub deliveries and pushed configuration changes.
    pub fn deliveries(&self) -> Vec<serde_json::Value> {
        crate::agent::in_netns(&self.path(), || {
            let s = std::net::TcpStream::connect(("127.0.0.1", APP_PORT)).expect("connect np-app");
            crate::http1::Conn::new(s)
                .request("GET", "/deliveries", &[], b"")
                .expect("GET /deliveries")
                .json()
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
    }

    /// Waits until the runtime knows this pod as `pod NAMESPACE/NAME`
    /// (its `/v1.0/metadata` says so); panics after `limit`, with `log()`
    /// (e.g. the agent's log).
    pub fn wait_known(
        &self,
        namespace: &str,
        name: &str,
        limit: Duration,
        log: impl Fn() -> String,
    ) {
        let start = Instant::now();
        loop {
            let m = self.call("GET", "/v1.0/metadata", &[], b"");
            if m.json()["extended"]["caller"] == format!("pod {namespace}/{name}") {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the runtime did not learn pod {namespace}/{name}: {}; log:\n{}",
                m.text(),
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until this pod's `/v1.0/metadata` lists component `name`;
    /// panics after `limit`, with `log()` (e.g. the agent's log).
    pub fn wait_component(&self, name: &str, limit: Duration, log: impl Fn() -> String) {
        let start = Instant::now();
        loop {
            let m = self.call("GET", "/v1.0/metadata", &[], b"").json();
            let seen = m["components"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"] == name));
            if seen {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "component {name} not seen by {}: {m}; log:\n{}",
                self.ns.name,
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request to the node runtime from this pod; panics on I/O errors.
    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Msg {
        runtime_in(&self.path(), method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} from {}: {e}", self.ns.name))
    }
}

/// The np-app binary next to the running test or bench.
pub fn np_app_bin() -> PathBuf {
    let p = crate::target_dir().join("np-app");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p nodeplane-tests --bin np-app`",
        p.display()
    );
    p
}

/// np-app serving on [`APP_PORT`] in `ns` (returns once it listens).
pub fn start_app(ns: &Netns) -> Child {
    start_app_with(ns, &[])
}

/// [`start_app`] with more environment variables.
pub fn start_app_with(ns: &Netns, env: &[(String, String)]) -> Child {
    let mut c = ns
        .command(np_app_bin())
        .args(["serve", &APP_PORT.to_string(), "--exit-on-stdin-eof"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn np-app");
    let mut line = [0u8; 6];
    if let Some(out) = c.stdout.as_mut() {
        let _ = out.read_exact(&mut line);
    }
    assert_eq!(&line, b"ready\n", "np-app did not start in {}", ns.name);
    c
}

/// A Pod manifest with `dapr.io/app-id` / `dapr.io/app-port` (when `app`
/// is given), more annotations (`k: v, ...` flow-map entries), and the
/// rest of the pod's YAML after `metadata` (e.g. spec and status).
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    app: Option<&str>,
    annotations: &str,
    rest: &str,
) -> String {
    let mut ann = String::new();
    if let Some(a) = app {
        ann = format!("dapr.io/app-id: {a}, dapr.io/app-port: \"{APP_PORT}\"");
    }
    if !annotations.is_empty() {
        if !ann.is_empty() {
            ann.push_str(", ");
        }
        ann.push_str(annotations);
    }
    let rest = if rest.is_empty() {
        "spec: {containers: [{name: c, image: i}]}\n"
    } else {
        rest
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{pod: {name}}}, annotations: {{{ann}}}}}\n{rest}---\n"
    )
}

/// A redis-server for a node namespace, where the agent reaches it on its
/// own loopback: 127.0.0.1:`port`, no persistence, files in `dir`.
pub fn redis_command(ns: &Netns, port: u16, dir: &Path) -> Command {
    redis_command_on(ns, "127.0.0.1", port, dir)
}

/// [`redis_command`] listening on `bind` (e.g. a node's underlay address,
/// for agents of several nodes sharing one redis).
pub fn redis_command_on(ns: &Netns, bind: &str, port: u16, dir: &Path) -> Command {
    let mut c = ns.command("redis-server");
    c.args(["--port", &port.to_string(), "--bind", bind])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Waits until redis answers PING on 127.0.0.1:`port` in the namespace at
/// `ns`; false after `limit`.
pub fn redis_ready(ns: &Path, port: u16, limit: Duration) -> bool {
    redis_ready_at(ns, "127.0.0.1", port, limit)
}

/// [`redis_ready`] for a redis listening on `addr`.
pub fn redis_ready_at(ns: &Path, addr: &str, port: u16, limit: Duration) -> bool {
    let addr = addr.to_string();
    crate::agent::in_netns(ns, move || {
        use std::io::Write;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(mut s) = std::net::TcpStream::connect((addr.as_str(), port)) {
                // A server started with --requirepass answers -NOAUTH:
                // up all the same.
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
}

/// redis-server in a node's namespace on 127.0.0.1:`port` (the agent
/// reaches it on its own loopback), killed on drop. Fails naming the
/// Debian package when redis-server is missing.
#[derive(Debug)]
pub struct NodeRedis {
    child: Child,
    pub port: u16,
    _dir: crate::TempDir,
}

impl NodeRedis {
    pub fn start(ns: &Netns, port: u16) -> NodeRedis {
        Self::start_on(ns, "127.0.0.1", port)
    }

    /// [`NodeRedis::start`] with more server arguments (e.g.
    /// `--requirepass`).
    pub fn start_with(ns: &Netns, port: u16, args: &[&str]) -> NodeRedis {
        Self::start_args(ns, "127.0.0.1", port, args)
    }

    /// A redis-server in `ns` listening on `bind`:`port`.
    pub fn start_on(ns: &Netns, bind: &str, port: u16) -> NodeRedis {
        Self::start_args(ns, bind, port, &[])
    }

    fn start_args(ns: &Netns, bind: &str, port: u16, args: &[&str]) -> NodeRedis {
        crate::prereq::require_tool("redis-server", "redis-server");
        let dir = crate::TempDir::new("redis");
        let child = redis_command_on(ns, bind, port, dir.path())
            .args(args)
            .spawn()
            .expect("spawn redis-server");
        let r = NodeRedis {
            child,
            port,
            _dir: dir,
        };
        assert!(
            redis_ready_at(&ns.path(), bind, port, Duration::from_secs(10)),
            "redis-server did not answer PING on {bind}:{port}"
        );
        r
    }
}

impl Drop for NodeRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats-server with JetStream in a node's namespace on 127.0.0.1:`port`
/// (the agent reaches it on its own loopback), its store in a temp dir,
/// killed on drop. Fails naming the Debian package when it is missing.
#[derive(Debug)]
pub struct NodeNats {
    child: Child,
    pub port: u16,
    _dir: crate::TempDir,
}

impl NodeNats {
    pub fn start(ns: &Netns, port: u16) -> NodeNats {
        crate::prereq::require_tool("nats-server", "nats-server");
        let dir = crate::TempDir::new("nats");
        let log = dir.path().join("nats.log");
        let child = nats_command(ns, port, dir.path())
            .expect("nats log")
            .spawn()
            .expect("spawn nats-server");
        let n = NodeNats {
            child,
            port,
            _dir: dir,
        };
        assert!(
            nats_ready(&log, Duration::from_secs(10)),
            "nats-server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        n
    }
}

/// nats-server with JetStream for a node namespace, where the agent
/// reaches it on its own loopback: 127.0.0.1:`port`, its store under
/// `dir`, its log in `dir`/nats.log (for [`nats_ready`]).
pub fn nats_command(ns: &Netns, port: u16, dir: &Path) -> std::io::Result<Command> {
    let log = std::fs::File::create(dir.join("nats.log"))?;
    let mut c = ns.command("nats-server");
    c.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.join("js"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Ok(c)
}

/// Waits until the nats-server whose log is `log` says it is ready
/// (JetStream included); false after `limit`.
pub fn nats_ready(log: impl AsRef<Path>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::fs::read_to_string(log.as_ref()).is_ok_and(|s| s.contains("Server is ready")) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for NodeNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
