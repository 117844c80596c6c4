//! The plugins under test, each set up the way a node would run it: its own
//! "node" namespace with forwarding on, its own state directory, and pods
//! that are network namespaces created before any timing starts.

use std::io::Write;
use std::time::{Duration, Instant};

use nodeplane_tests::{CniCall, CniOutput, Plugin};
use serde_json::{json, Value};

use crate::guard::{self, Dir, Ns};

/// The conflist a runtime would find in /etc/cni/net.d; nodeplane's bench
/// config is derived from it as a runtime would, so the bench follows it.
const NODEPLANE_CONFLIST: &str = include_str!("../../../../deploy/cni/10-nodeplane.conflist");

/// Pod range used by the latency sections for every plugin: a /16 so 250
/// pods fit, IPv4 only so all three chains do the same work.
pub const V4_CIDR: &str = "10.244.0.0/16";

/// A plugin invocation that takes longer than this is hung; the watchdog
/// kills it and the call is reported as failed.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bridge,
    Ptp,
    Nodeplane,
    /// nodeplane with the conflist's own dual-stack podCIDRs.
    NodeplaneDual,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Bridge => "bridge+host-local",
            Kind::Ptp => "ptp+host-local",
            Kind::Nodeplane => "nodeplane-cni",
            Kind::NodeplaneDual => "nodeplane-cni dual-stack",
        }
    }
}

/// One plugin set up in its own node namespace.
#[derive(Debug)]
pub struct Subject {
    pub kind: Kind,
    plugin: Plugin,
    config: String,
    pub node: Ns,
    // Held for its Drop: host-local's dataDir or nodeplane's stateDir.
    _state: Dir,
}

/// A pod: a namespace plus the container id the runtime would use for it.
#[derive(Debug)]
pub struct Pod {
    pub ns: Ns,
    pub id: String,
    pub name: String,
    /// The ADD result while the pod is attached (libcni hands it back to DEL
    /// as prevResult, so DEL is timed with the same input a runtime gives).
    pub result: Option<Value>,
}

impl Pod {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // 64 hex digits like a real sandbox id, unique per process.
        let id = format!("{:032x}{:032x}", std::process::id(), n);
        Pod {
            ns: Ns::new("npbp"),
            id,
            name: format!("pod-{n}"),
            result: None,
        }
    }

    /// Waits until eth0 has left the pod namespace and returns when that was
    /// seen. A plugin may return from DEL before the kernel has finished
    /// removing the veth (an RCU grace period) and leave that to a detached
    /// process; this is the point where the teardown is really over.
    pub fn wait_gone(&self) -> Result<Instant, String> {
        let ns = self.ns.open();
        // A thread of its own enters the pod namespace so the interface can be
        // looked up without spawning `ip` (fine-grained, and cheap to poll).
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on a valid fd changes only this thread's netns.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(format!(
                            "setns {}: {}",
                            self.ns.name,
                            std::io::Error::last_os_error()
                        ));
                    }
                    let start = Instant::now();
                    loop {
                        // SAFETY: a NUL-terminated name; the call only reads it.
                        if unsafe { libc::if_nametoindex(c"eth0".as_ptr()) } == 0 {
                            return Ok(Instant::now());
                        }
                        if start.elapsed() > GONE_LIMIT {
                            return Err(format!(
                                "eth0 still in {} {GONE_LIMIT:?} after DEL",
                                self.ns.name
                            ));
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
                .join()
                .unwrap_or_else(|_| Err("wait_gone thread panicked".into()))
        })
    }

    /// The pod's first IP address (without prefix length) from its ADD result.
    pub fn ip(&self) -> Option<String> {
        let addr = self.result.as_ref()?["ips"][0]["address"].as_str()?;
        Some(addr.split('/').next().unwrap_or(addr).to_string())
    }
}

/// How long a pod's interface may outlive its DEL before the bench calls
/// it a leak.
const GONE_LIMIT: Duration = Duration::from_secs(10);

/// One timed plugin invocation.
#[derive(Debug)]
pub struct Timed {
    pub start: Instant,
    pub elapsed: Duration,
    pub out: CniOutput,
}

impl Subject {
    /// Sets up `kind` with `v4_cidr` as its pod range (nodeplane dual-stack
    /// ignores it and keeps the conflist's ranges).
    pub fn new(kind: Kind, v4_cidr: &str) -> Result<Self, String> {
        let state = Dir::new("bench");
        let dir = state.path().display().to_string();
        let ipam = |routes: bool| {
            let mut ipam = json!({
                "type": "host-local",
                "ranges": [[{ "subnet": v4_cidr }]],
                "dataDir": dir,
            });
            if routes {
                ipam["routes"] = json!([{ "dst": "0.0.0.0/0" }]);
            }
            ipam
        };
        // Debian 12's plugins are v1.1.1, which reject cniVersion 1.1.0.
        let (plugin, config) = match kind {
            Kind::Bridge => (
                Plugin::reference("bridge"),
                json!({
                    "cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge",
                    "bridge": "npbr0", "isGateway": true, "ipMasq": false, "mtu": 1500,
                    "ipam": ipam(true),
                }),
            ),
            Kind::Ptp => (
                Plugin::reference("ptp"),
                json!({
                    "cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp",
                    "ipMasq": false, "mtu": 1500, "ipam": ipam(true),
                }),
            ),
            Kind::Nodeplane | Kind::NodeplaneDual => {
                let bin = nodeplane_tests::target_dir().join("nodeplane-cni");
                let bin = std::env::var_os("NODEPLANE_CNI_BIN").map_or(bin, Into::into);
                if !bin.exists() {
                    return Err(format!(
                        "{} is missing: build it with `cargo build --release -p nodeplane-cni` \
                         (same CARGO_TARGET_DIR as the bench)",
                        bin.display()
                    ));
                }
                let mut config = nodeplane_config(&dir);
                // For comparing the wiring without the fast path.
                if std::env::var_os("NODEPLANE_FAST_PATH").is_some_and(|v| v == "off") {
                    config["fastPath"] = json!(false);
                }
                if kind == Kind::Nodeplane {
                    config["podCIDRs"] = json!([v4_cidr]);
                }
                (Plugin::new(bin), config)
            }
        };
        let node = Ns::new("npbn");
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        Ok(Subject {
            kind,
            plugin,
            config: config.to_string(),
            node,
            _state: state,
        })
    }

    fn call(&self, command: &str, pod: &Pod, config: &str) -> Timed {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            pod.name, pod.id
        );
        let netns = pod.ns.path();
        let call = CniCall {
            command,
            container_id: &pod.id,
            netns: Some(&netns),
            ifname: "eth0",
            args: &args,
            config,
        };
        let mut cmd = self.plugin.command(&self.node, &call);
        // Timed from spawn to exit, as a runtime experiences it.
        let start = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return failed(start, format!("spawn {}: {e}", self.plugin.bin.display())),
        };
        let pid = child.id();
        guard::watch(pid, CALL_LIMIT);
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading stdin closes the pipe; its
            // exit status then tells what happened, so the error is ignored.
            let _ = stdin.write_all(config.as_bytes());
        }
        let out = child.wait_with_output();
        let elapsed = start.elapsed();
        guard::unwatch(pid);
        match out {
            Ok(out) => Timed {
                start,
                elapsed,
                out: CniOutput {
                    code: out.status.code(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                },
            },
            Err(e) => failed(start, format!("wait: {e}")),
        }
    }

    /// ADD `pod`; on success its result is kept for DEL and the pod's IP.
    pub fn add(&self, pod: &mut Pod) -> Result<Duration, String> {
        let t = self.call("ADD", pod, &self.config);
        if !t.out.success() {
            return Err(self.describe("ADD", &t.out));
        }
        pod.result = Some(serde_json::from_str(&t.out.stdout).map_err(|e| {
            format!(
                "{}: ADD result is not JSON ({e}): {:?}",
                self.kind.label(),
                t.out
            )
        })?);
        Ok(t.elapsed)
    }

    /// DEL `pod`, handing back its ADD result as prevResult like libcni does.
    /// Returns when the plugin exits; see [`Pod::wait_gone`] for the veth.
    pub fn del(&self, pod: &mut Pod) -> Result<Timed, String> {
        let config = match pod.result.take() {
            Some(prev) => {
                let mut c: Value = serde_json::from_str(&self.config).expect("own config is JSON");
                c["prevResult"] = prev;
                c.to_string()
            }
            None => self.config.clone(),
        };
        let t = self.call("DEL", pod, &config);
        if !t.out.success() {
            return Err(self.describe("DEL", &t.out));
        }
        Ok(t)
    }

    /// DEL `pod`, then wait until the teardown is really over (see
    /// [`Subject::wait_quiet`]), so deferred work never runs into the next,
    /// maybe another plugin's, timed call. Returns the call's time and the
    /// time from its spawn until the teardown was over.
    pub fn del_settled(&self, pod: &mut Pod) -> Result<(Duration, Duration), String> {
        let t = self.del(pod)?;
        let gone = pod.wait_gone()?.max(self.wait_quiet()?);
        Ok((t.elapsed, gone.duration_since(t.start)))
    }

    /// Waits until no process is left in the node namespace and returns when
    /// that was seen. Only plugins run there, so once every call has returned
    /// a process still inside is work the plugin left running after exiting,
    /// e.g. a detached child that deletes the veth while DEL returns early.
    pub fn wait_quiet(&self) -> Result<Instant, String> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(self.node.path())
            .map_err(|e| format!("stat {}: {e}", self.node.path().display()))?
            .ino();
        let node = format!("net:[{ino}]");
        let start = Instant::now();
        loop {
            let left: Vec<String> = std::fs::read_dir("/proc")
                .map_err(|e| format!("read /proc: {e}"))?
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                // Zombies and vanished processes have no ns link: not running.
                .filter(|e| {
                    std::fs::read_link(e.path().join("ns/net"))
                        .is_ok_and(|l| l.as_os_str() == node.as_str())
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if left.is_empty() {
                return Ok(Instant::now());
            }
            if start.elapsed() > GONE_LIMIT {
                return Err(format!(
                    "{}: processes {left:?} still running in the node netns {GONE_LIMIT:?} after its calls returned",
                    self.kind.label()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn describe(&self, verb: &str, out: &CniOutput) -> String {
        format!(
            "{} {verb} failed (exit {:?})\n  stdout: {}\n  stderr: {}",
            self.kind.label(),
            out.code,
            out.stdout.trim(),
            out.stderr.trim()
        )
    }
}

fn failed(start: Instant, msg: String) -> Timed {
    Timed {
        start,
        elapsed: start.elapsed(),
        out: CniOutput {
            code: None,
            stdout: String::new(),
            stderr: msg,
        },
    }
}

/// nodeplane's single-plugin config as a runtime derives it from the
/// conflist: plugins[0] plus the list's name and cniVersion, with the state
/// directory moved to a temp dir.
fn nodeplane_config(state_dir: &str) -> Value {
    let list: Value =
        serde_json::from_str(NODEPLANE_CONFLIST).expect("10-nodeplane.conflist is JSON");
    let mut config = list["plugins"][0].clone();
    config["name"] = list["name"].clone();
    config["cniVersion"] = list["cniVersion"].clone();
    config["stateDir"] = json!(state_dir);
    // The plugin alone: an agent running on this machine must neither be
    // notified nor make the plugin treat the bench's network as policed.
    config["agentSocket"] = json!("");
    config
}
