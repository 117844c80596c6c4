//! A one-node fixture for CNI tests: a "node" namespace standing in for the
//! host (with a node address on its loopback, as a real node has), a private
//! IPAM state directory, and helpers to ADD/DEL pods through nodeplane-cni.

use serde_json::{json, Value};

use crate::{CniCall, CniOutput, Netns, Plugin, TempDir};

/// The node's own addresses inside the node namespace (private ranges), as a
/// real node has: host-to-pod traffic takes its source address from these.
pub const NODE_IP: &str = "10.10.0.1";
pub const NODE_IP6: &str = "fd00:10:10::1";

#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pub state: TempDir,
    pub plugin: Plugin,
    pub network: String,
    /// Extra config fields merged into every call (podCIDRs, mtu, ...).
    pub base: Value,
}

impl Node {
    /// A node whose network hands out addresses from `cidrs`.
    pub fn new(cidrs: &[&str]) -> Node {
        let ns = Netns::new("npn");
        ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
        ns.ip(&["addr", "add", &format!("{NODE_IP6}/128"), "dev", "lo"]);
        let state = TempDir::new("state");
        let network = "nodeplane".to_string();
        let base = json!({
            "cniVersion": "1.1.0",
            "name": network,
            "type": "nodeplane-cni",
            "podCIDRs": cidrs,
            "stateDir": state.path(),
            // Inside the test's own state: an agent running on the host
            // (its default socket) must not change what the plugin does.
            "agentSocket": state.path().join("agent.sock"),
        });
        Node {
            ns,
            state,
            plugin: Plugin::nodeplane(),
            network,
            base,
        }
    }

    /// The configuration with `extra` fields merged in.
    pub fn config(&self, extra: Value) -> String {
        let mut c = self.base.clone();
        if let (Some(obj), Some(more)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in more {
                obj.insert(k.clone(), v.clone());
            }
        }
        c.to_string()
    }

    /// Runs a verb for `container_id`/eth0 in `pod` with the base config.
    pub fn call(
        &self,
        command: &str,
        container_id: &str,
        pod: Option<&Netns>,
        config: &str,
    ) -> CniOutput {
        let path = pod.map(|p| p.path());
        self.plugin.run(
            &self.ns,
            &CniCall {
                command,
                container_id,
                netns: path.as_deref(),
                ifname: "eth0",
                args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=test",
                config,
            },
        )
    }

    /// ADD for the Kubernetes pod `namespace/name` (CNI_ARGS carry its
    /// name, as the CRI runtime passes them); must succeed.
    pub fn add_pod(&self, container_id: &str, pod: &Netns, namespace: &str, name: &str) -> Value {
        let path = pod.path();
        self.plugin
            .run(
                &self.ns,
                &CniCall {
                    command: "ADD",
                    container_id,
                    netns: Some(&path),
                    ifname: "eth0",
                    args: &format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
                    config: &self.config(json!({})),
                },
            )
            .expect_ok()
            .json()
    }

    /// ADD that must succeed; returns the result JSON.
    pub fn add(&self, container_id: &str, pod: &Netns) -> Value {
        self.call("ADD", container_id, Some(pod), &self.config(json!({})))
            .expect_ok()
            .json()
    }

    /// DEL that must succeed.
    pub fn del(&self, container_id: &str, pod: Option<&Netns>) {
        self.call("DEL", container_id, pod, &self.config(json!({})))
            .expect_ok();
    }

    /// GC keeping exactly `keep` (container IDs with ifname eth0).
    pub fn gc(&self, keep: &[&str]) -> CniOutput {
        let valid: Vec<Value> = keep
            .iter()
            .map(|c| json!({"containerID": c, "ifname": "eth0"}))
            .collect();
        self.call(
            "GC",
            "",
            None,
            &self.config(json!({ "cni.dev/valid-attachments": valid })),
        )
    }

    /// Files in the IPAM store's `sub` directory ("ips" or "attachments").
    pub fn state_files(&self, sub: &str) -> Vec<String> {
        let dir = self.state.path().join(&self.network).join(sub);
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Host-side veths (ours are named np + 12 hex digits).
    pub fn host_veths(&self) -> Vec<String> {
        self.ns
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("np") && n.len() == 14)
            .collect()
    }

    /// Waits (bounded) until no host veth of ours is left: DEL hands the
    /// kernel's slow veth teardown to a detached child, so it may trail DEL
    /// by one RCU grace period.
    pub fn wait_no_veths(&self) -> Vec<String> {
        for _ in 0..200 {
            let left = self.host_veths();
            if left.is_empty() {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.host_veths()
    }

    /// Host routes nodeplane installed (protocol 0x6e), both families.
    pub fn host_routes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ns
            .ip(&["-4", "route", "show", "proto", "110"])
            .lines()
            .map(str::to_string)
            .collect();
        v.extend(
            self.ns
                .ip(&["-6", "route", "show", "proto", "110"])
                .lines()
                .map(str::to_string),
        );
        v
    }
}

/// The address part of `ips[i].address` in a CNI result.
pub fn ip_of(result: &Value, i: usize) -> String {
    let a = result["ips"][i]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no ips[{i}] in {result}"));
    a.split('/').next().unwrap_or(a).to_string()
}

/// Pings `dst` once from inside `from` (busybox, so IPv6 works the same way).
pub fn ping(from: &Netns, dst: &str) -> bool {
    crate::require_tool("busybox", "busybox-static");
    let ok = from
        .command("busybox")
        .args(["ping", "-c", "1", "-W", "2", dst])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        // What the sender's namespace looked like, for the failure report.
        let state = from.sh("ip -br link; ip -br addr; ip route; ip -6 route; ip neigh");
        eprintln!(
            "ping {dst} from {} failed; its state:\n{}{}",
            from.name,
            String::from_utf8_lossy(&state.stdout),
            String::from_utf8_lossy(&state.stderr)
        );
    }
    ok
}

/// Opens a TCP connection from `client` to `server_ip:port` served by a
/// one-shot busybox nc in `server`, and checks the payload arrives.
pub fn tcp_roundtrip(server: &Netns, client: &Netns, server_ip: &str, port: u16) -> bool {
    tcp_roundtrip_via(server, port, client, server_ip, port)
}

/// Like [`tcp_roundtrip`], but the client dials `dst:dst_port` (e.g. a
/// hostPort that DNATs to `listen_port` in the server's namespace).
pub fn tcp_roundtrip_via(
    server: &Netns,
    listen_port: u16,
    client: &Netns,
    dst: &str,
    dst_port: u16,
) -> bool {
    use std::io::Read;
    use std::time::{Duration, Instant};
    crate::require_tool("busybox", "busybox-static");
    let mut srv = server
        .command("busybox")
        .args(["nc", "-l", "-p", &listen_port.to_string()])
        // A stdin that never ends: busybox nc stops when its stdin does, and
        // could otherwise quit before the client's data arrives.
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nc -l");
    // Connect only once the listener is up, so a loaded machine cannot turn
    // a slow listener start into a failed test.
    let listening = format!(":{listen_port} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let out = server.command("busybox").args(["netstat", "-ltn"]).output();
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&listening)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut sent = false;
    let mut last = String::new();
    while !sent && Instant::now() < deadline {
        let out = client.sh(&format!(
            "echo nodeplane-hello | busybox nc -w 2 {dst} {dst_port}"
        ));
        sent = out.status.success();
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !sent {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut got = String::new();
    if sent {
        if let Some(mut s) = srv.stdout.take() {
            let _ = s.read_to_string(&mut got);
        }
    } else {
        eprintln!("tcp {dst}:{dst_port} -> :{listen_port} failed; last client error: {last}");
    }
    let _ = srv.kill();
    let _ = srv.wait();
    got.contains("nodeplane-hello")
}
