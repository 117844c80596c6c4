//! Pod-to-pod TCP throughput with iperf3, between two pod namespaces wired
//! by a plugin, against a bare veth pair joining two namespaces directly
//! (the best any wiring of two namespaces on one machine can do).

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::guard::{Ns, Proc};
use crate::subject::{Pod, Subject};

/// Two pods whose traffic goes through some wiring.
#[derive(Debug)]
pub struct Path<'a> {
    pub label: String,
    server: &'a Ns,
    client: &'a Ns,
    server_ip: String,
    /// The namespace that routes between the two, if any: its IP forwarding
    /// counter shows whether the transfer took the routed path.
    router: Option<&'a Ns>,
}

/// Two namespaces joined by one veth pair (10.99.0.1/24 ↔ 10.99.0.2/24).
#[derive(Debug)]
pub struct BareVeth {
    a: Ns,
    b: Ns,
}

impl BareVeth {
    pub fn new() -> Self {
        let (a, b) = (Ns::new("npbva"), Ns::new("npbvb"));
        // Same MTU as the plugins are configured with (1500).
        a.ip(&[
            "link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", "eth0", "netns",
            &b.name,
        ]);
        for (ns, addr) in [(&a, "10.99.0.1/24"), (&b, "10.99.0.2/24")] {
            ns.ip(&["addr", "add", addr, "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        BareVeth { a, b }
    }
    pub fn path(&self) -> Path<'_> {
        Path {
            label: "bare veth pair".into(),
            server: &self.a,
            client: &self.b,
            server_ip: "10.99.0.1".into(),
            router: None,
        }
    }
}

/// Two pods ADDed by a plugin; DELed on drop.
#[derive(Debug)]
pub struct PodPair<'a> {
    subject: &'a Subject,
    pods: [Pod; 2],
}

impl<'a> PodPair<'a> {
    pub fn new(subject: &'a Subject) -> Result<Self, String> {
        let mut pair = PodPair {
            subject,
            pods: [Pod::new(), Pod::new()],
        };
        for pod in &mut pair.pods {
            subject.add(pod)?;
        }
        Ok(pair)
    }
    pub fn kind(&self) -> crate::subject::Kind {
        self.subject.kind
    }
    pub fn path(&self) -> Result<Path<'_>, String> {
        let server_ip = self.pods[0].ip().ok_or_else(|| {
            format!(
                "{}: no ips[0].address in the ADD result",
                self.subject.kind.label()
            )
        })?;
        Ok(Path {
            label: format!("pod↔pod via {}", self.subject.kind.label()),
            server: &self.pods[0].ns,
            client: &self.pods[1].ns,
            server_ip,
            router: Some(&self.subject.node),
        })
    }
}

impl Drop for PodPair<'_> {
    fn drop(&mut self) {
        for pod in self.pods.iter_mut().filter(|p| p.result.is_some()) {
            // A failing DEL leaves links in namespaces that are deleted next.
            let _ = self.subject.del(pod);
        }
    }
}

/// One transfer's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bits per second received (end.sum_received).
    pub bps: f64,
    /// Busy CPU time of the whole machine (user, system, irq, softirq) per GB
    /// received, in milliseconds: what the wiring costs, and a figure that is
    /// steadier than throughput on a VM whose vCPUs sit partly idle, waiting
    /// for each other's wake-ups.
    pub cpu_ms_per_gb: f64,
    /// Packets the router namespace IP-forwarded per GB received (IPv4
    /// ForwDatagrams): tens of thousands for a routed path (GRO hands the
    /// router 64 KiB aggregates, not 1448-byte segments), near 0 where
    /// nodeplane's fast path carried the connection. `None` without a router.
    pub forwarded_per_gb: Option<f64>,
}

/// The IPv4 ForwDatagrams counter of `ns` (/proc/net/snmp is per netns).
fn forwarded(ns: &Ns) -> Result<u64, String> {
    let out = ns
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .map_err(|e| format!("read /proc/net/snmp in {}: {e}", ns.name))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        return Err(format!("no Ip: lines in /proc/net/snmp of {}", ns.name));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ForwDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| format!("no ForwDatagrams in /proc/net/snmp of {}", ns.name))
}

/// Runs one iperf3 transfer of `secs` seconds over `path`.
///
/// With `pin`, the server runs on CPU 1 and the client on CPU 0: left to the
/// scheduler, whether the two share a core changes the result by ±30 % from
/// run to run on a 2-core machine, which would drown the difference between
/// wirings; pinned, runs agree within a few per cent.
pub fn measure(path: &Path<'_>, secs: u64, pin: bool) -> Result<Transfer, String> {
    let (server_cpu, client_cpu): (&[&str], &[&str]) = if pin {
        (&["-A", "1"], &["-A", "0"])
    } else {
        (&[], &[])
    };
    let server = path
        .server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .args(server_cpu)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn iperf3 -s: {e}"))?;
    let _server = Proc::new(server, Duration::from_secs(secs + 30));
    wait_listening(path.server)?;
    let fwd_before = path.router.map(forwarded).transpose()?;
    let busy_before = nodeplane_tests::bench::cpu::busy_ticks()?;
    let client = path
        .client
        .command("iperf3")
        .args([
            "-c",
            &path.server_ip,
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .args(client_cpu)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn iperf3 -c: {e}"))?;
    let mut client = Proc::new(client, Duration::from_secs(secs + 20));
    let mut json = String::new();
    if let Some(mut out) = client.0.stdout.take() {
        use std::io::Read;
        out.read_to_string(&mut json)
            .map_err(|e| format!("read iperf3 output: {e}"))?;
    }
    let status = client
        .0
        .wait()
        .map_err(|e| format!("wait iperf3 -c: {e}"))?;
    let busy = nodeplane_tests::bench::cpu::busy_ticks()? - busy_before;
    let fwd = match (path.router, fwd_before) {
        (Some(r), Some(b)) => Some(forwarded(r)?.saturating_sub(b)),
        _ => None,
    };
    let v: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| format!("iperf3 -c ({status}) printed no JSON ({e}): {json}"))?;
    let received = &v["end"]["sum_received"];
    let (Some(bps), Some(bytes)) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) else {
        return Err(format!(
            "iperf3 -c ({status}) over {}: {}",
            path.label, v["error"]
        ));
    };
    let hz = nodeplane_tests::bench::cpu::ticks_per_second();
    let gb = (bytes / 1e9).max(1e-9);
    Ok(Transfer {
        bps,
        cpu_ms_per_gb: busy as f64 * 1000.0 / hz / gb,
        forwarded_per_gb: fwd.map(|f| f as f64 / gb),
    })
}

/// Waits until the iperf3 server listens, so the client's first connect
/// does not race it.
fn wait_listening(ns: &Ns) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let out = ns
            .command("ss")
            .args(["-Hltn", "sport = :5201"])
            .output()
            .map_err(|e| format!("ss: {e}"))?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "iperf3 -s did not listen within 5 s in {}",
        ns.name
    ))
}
