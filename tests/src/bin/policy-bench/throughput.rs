//! Section 2: pod↔pod TCP throughput with 10,000 allow entries in place,
//! against the same node with no NetworkPolicy, for nodeplane's nftables
//! maps and for the same allows rendered as linear iptables rules.
//!
//! Every case is its own "node" namespace with two pods wired by
//! nodeplane-cni (client a, server b, same node), so the cases exist side
//! by side and their iperf3 runs are interleaved:
//! - no rules at all: nodeplane-cni without the agent (the iptables
//!   cases' own no-policy baseline, and the cost of nodeplane's base table).
//! - nodeplane, no policy: the agent runs with its table, no NetworkPolicy.
//! - nodeplane, 10,000 entries: one policy selects b and allows TCP 5201
//!   from 9,999 distinct /32 ipBlocks (172.16.0.1, .3, .5, ...: never
//!   adjacent, so no two merge into one range) plus pod a by podSelector.
//! - iptables (nft and/or legacy backend), no agent: the same 10,000 allows
//!   as `-A NP-B -s <addr>/32 -p tcp --dport 5201 -j ACCEPT`, pod a's rule
//!   last (rule order in such chains follows policy and peer order, so the
//!   matching rule can be anywhere; last is the worst case), then DROP;
//!   FORWARD jumps to NP-B for traffic to b. Two variants: with a conntrack
//!   ESTABLISHED,RELATED accept first (as kube-router- and Calico-style
//!   chains have; only a connection's first packet walks the list), and
//!   without it (every packet walks the list: the linear cost itself).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nodeplane_agent::nft::{self, Existing};
use nodeplane_agent::policy;
use nodeplane_tests::fixture::Node;
use nodeplane_tests::{CniCall, Netns};
use serde_json::{json, Value};

use crate::agent::{put_file, BenchAgent};
use crate::guard::{Dir, Ns, Proc, Reg};
use crate::stats::{median_f64, ms};
use crate::{inproc, workload, Opts, Report};

const CIDR: &str = "10.244.0.0/24";
const ENTRIES: usize = 10_000;
const PORT: u16 = 5201;
const TARGET: f64 = 0.90;

/// The i-th decoy source address: 172.16.0.1 + 2i.
fn decoy(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + 2 * i as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Plain,
    NoPolicy,
    Nodeplane,
    Iptables { legacy: bool, established: bool },
}

impl Case {
    fn label(self) -> String {
        match self {
            Case::Plain => "no rules at all (nodeplane-cni, no agent)".into(),
            Case::NoPolicy => "nodeplane, no NetworkPolicy (baseline)".into(),
            Case::Nodeplane => "nodeplane, 10,000 allow entries (nft maps)".into(),
            Case::Iptables {
                legacy,
                established,
            } => format!(
                "iptables-{}, 10,000 linear rules, {}",
                if legacy { "legacy" } else { "nft" },
                if established {
                    "ESTABLISHED first"
                } else {
                    "no ESTABLISHED rule"
                }
            ),
        }
    }
}

/// One case: a node namespace with pods a (client) and b (server).
#[derive(Debug)]
struct Host {
    case: Case,
    // Field order is drop order: the agent stops before its namespace goes.
    agent: Option<BenchAgent>,
    _agent_dir: Option<Dir>,
    a: Ns,
    b: Ns,
    a_ip: String,
    b_ip: String,
    node: Node,
    _reg: Reg,
}

fn pods_manifest() -> Result<String, String> {
    let pod = |name: &str, role: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "bench", "labels": {"role": role}},
            "spec": {"nodeName": crate::agent::NODE_NAME, "containers": [{"name": "iperf", "image": "local/iperf3"}]}})
    };
    workload::yaml(&[
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}),
        pod("client", "client"),
        pod("server", "server"),
    ])
}

/// The policy with 10,000 allow entries: 9,999 decoy /32 blocks and pod a.
fn policy_manifest() -> Result<String, String> {
    let mut from: Vec<Value> = (0..ENTRIES - 1)
        .map(|i| json!({"ipBlock": {"cidr": format!("{}/32", decoy(i))}}))
        .collect();
    from.push(json!({"podSelector": {"matchLabels": {"role": "client"}}}));
    workload::yaml(&[json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-10k", "namespace": "bench"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": from, "ports": [{"protocol": "TCP", "port": PORT}]}],
        },
    })])
}

/// The same allows as linear iptables rules, for `iptables-restore`.
fn iptables_rules(a_ip: &str, b_ip: &str, established: bool) -> String {
    let mut s = String::with_capacity(ENTRIES * 64);
    s.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:NP-B - [0:0]\n");
    s.push_str(&format!("-A FORWARD -d {b_ip}/32 -j NP-B\n"));
    if established {
        s.push_str("-A NP-B -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    }
    for i in 0..ENTRIES - 1 {
        s.push_str(&format!(
            "-A NP-B -s {}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT\n",
            decoy(i)
        ));
    }
    s.push_str(&format!(
        "-A NP-B -s {a_ip}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT\n-A NP-B -j DROP\nCOMMIT\n"
    ));
    s
}

fn add_pod(node: &Node, pod: &Ns, name: &str) -> Result<String, String> {
    let config = node.config(json!({}));
    let path = pod.path();
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    // 64 hex digits like a real sandbox id, unique per process.
    let id = format!(
        "{:032x}{:032x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let out = node.plugin.run(
        &node.ns,
        &CniCall {
            command: "ADD",
            container_id: &id,
            netns: Some(&path),
            ifname: "eth0",
            args: &format!("K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name}"),
            config: &config,
        },
    );
    if !out.success() {
        return Err(format!("nodeplane-cni ADD {name}: {out:?}"));
    }
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("ADD result: {e}"))?;
    let addr = v["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| format!("no address in {v}"))?;
    Ok(addr.split('/').next().unwrap_or(addr).to_string())
}

/// What setting a case up measured.
#[derive(Debug, Default)]
struct Load {
    /// Source written → programmed (nodeplane) or restore run (iptables).
    took: Option<Duration>,
    reconcile: Option<f64>,
    detail: String,
}

impl Host {
    fn new(case: Case) -> Result<(Host, Load), String> {
        let mut node = Node::new(&[CIDR]);
        let reg = Reg::new(&node.ns.name, node.state.path());
        let mut load = Load::default();
        let (mut agent, mut agent_dir) = (None, None);
        if matches!(case, Case::NoPolicy | Case::Nodeplane) {
            let dir = Dir::new("pbagent");
            let mut ag = BenchAgent::new(&node.ns, dir.path(), node.state.path(), CIDR)?;
            node.base["agentSocket"] = json!(ag.socket.display().to_string());
            std::fs::write(ag.manifests.join("pods.yaml"), pods_manifest()?)
                .map_err(|e| format!("write manifests: {e}"))?;
            ag.start()?;
            ag.wait_ready(Duration::from_secs(30))?;
            agent = Some(ag);
            agent_dir = Some(dir);
        } else {
            // No agent: the plugin's notification is off.
            node.base["agentSocket"] = json!("");
        }
        let (a, b) = (Ns::new("pbpa"), Ns::new("pbpb"));
        let a_ip = add_pod(&node, &a, "client")?;
        let b_ip = add_pod(&node, &b, "server")?;
        let host = Host {
            case,
            agent,
            _agent_dir: agent_dir,
            a,
            b,
            a_ip,
            b_ip,
            node,
            _reg: reg,
        };
        match case {
            Case::Nodeplane => {
                let ag = host.agent.as_ref().ok_or("no agent")?;
                let stage = ag.state.join("stage");
                std::fs::create_dir_all(&stage).map_err(|e| format!("stage: {e}"))?;
                let text = policy_manifest()?;
                // The expected digest: the directory as it will be.
                let shadow = ag.state.join("shadow");
                std::fs::create_dir_all(&shadow).map_err(|e| format!("shadow: {e}"))?;
                std::fs::write(shadow.join("pods.yaml"), pods_manifest()?)
                    .and_then(|_| std::fs::write(shadow.join("policy.yaml"), &text))
                    .map_err(|e| format!("shadow: {e}"))?;
                let want = nodeplane_agent::source::manifests::digest_dir(&shadow)
                    .map_err(|e| e.to_string())?;
                let t0 = Instant::now();
                put_file(&stage, &ag.manifests, "policy.yaml", &text)?;
                let (t1, st) = ag.wait_revision(&want, Duration::from_secs(120))?;
                load.took = Some(t1 - t0);
                load.reconcile = ag.metric("nodeplane_reconcile_last_duration_seconds");
                let elements = st["elements"].as_u64().unwrap_or(0);
                load.detail = format!(
                    "{} pods, {} policy, {} groups, {elements} map elements",
                    st["pods"], st["policies"], st["groups"]
                );
                if elements < ENTRIES as u64 {
                    return Err(format!(
                        "only {elements} map elements in force (want ≥ {ENTRIES}); status {st}"
                    ));
                }
            }
            Case::NoPolicy => {
                let ag = host.agent.as_ref().ok_or("no agent")?;
                let want = ag.digest()?;
                ag.wait_revision(&want, Duration::from_secs(30))?;
            }
            Case::Iptables {
                legacy,
                established,
            } => {
                let rules = iptables_rules(&host.a_ip, &host.b_ip, established);
                let tool = if legacy {
                    "iptables-legacy-restore"
                } else {
                    "iptables-nft-restore"
                };
                load.took = Some(restore(&host.node.ns, tool, &rules)?);
                load.detail = format!(
                    "{} rules in NP-B",
                    rules.lines().filter(|l| l.starts_with("-A NP-B")).count()
                );
            }
            Case::Plain => {}
        }
        Ok((host, load))
    }

    /// How the run's packets met the rules (read after the iperf runs).
    fn evidence(&self) -> String {
        match self.case {
            Case::Nodeplane => {
                let Some(ag) = &self.agent else {
                    return String::new();
                };
                let lines = ag.metric_lines("nodeplane_policy_allowed_packets_total");
                let drops = ag.metric_lines("nodeplane_dropped_packets_total");
                format!(
                    "{}; {}",
                    lines.join(" "),
                    drops
                        .iter()
                        .filter(|l| l.contains("denied_ingress"))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
            Case::Iptables { legacy, .. } => {
                let save = if legacy {
                    "iptables-legacy-save"
                } else {
                    "iptables-nft-save"
                };
                let out = self
                    .node
                    .ns
                    .command(save)
                    .args(["-c", "-t", "filter"])
                    .output();
                let text = out
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let pick = |needle: &str| {
                    text.lines()
                        .find(|l| l.contains(needle))
                        .and_then(|l| l.split(']').next())
                        .map(|c| c.trim_start_matches('[').replace(':', " packets, ") + " bytes")
                };
                let mut parts = Vec::new();
                if let Some(c) = pick("ESTABLISHED") {
                    parts.push(format!("ESTABLISHED rule {c}"));
                }
                if let Some(c) = pick(&format!("-s {}/32", self.a_ip)) {
                    parts.push(format!("pod a's rule (10,000th) {c}"));
                }
                parts.join("; ")
            }
            _ => String::new(),
        }
    }
}

/// Runs `tool` (an iptables-restore) with `rules` inside `ns`; spawn to exit.
fn restore(ns: &Netns, tool: &str, rules: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = ns
        .command(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {tool}: {e} (Debian package iptables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("write to {tool}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {tool}: {e}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(took)
}

pub fn section(opts: &Opts, report: &mut Report) {
    if let Err(e) = run(opts, report) {
        println!("  ERROR: {e}");
        report.errors.push(format!("throughput: {e}"));
    }
}

fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let pin = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    println!(
        "\n== 2. pod↔pod TCP throughput with 10,000 allow entries: iperf3 -t {} a→b on one node, median of {} runs, cases interleaved ==",
        opts.iperf_secs, opts.iperf_runs
    );
    println!(
        "  one TCP stream, MTU 1500, {}; every case is its own node netns with two pods wired by nodeplane-cni",
        if pin {
            "server pinned to CPU 1, client to CPU 0"
        } else {
            "one CPU: no pinning"
        }
    );
    let mut cases = vec![Case::Plain, Case::NoPolicy, Case::Nodeplane];
    for legacy in opts.iptables.iter().map(|b| b == "legacy") {
        for established in [true, false] {
            cases.push(Case::Iptables {
                legacy,
                established,
            });
        }
    }
    let mut hosts = Vec::new();
    println!("  loading the 10,000 allows (informative):");
    for &case in &cases {
        let (host, load) = Host::new(case)?;
        match case {
            Case::Nodeplane => println!(
                "    {:<58} policy file written → programmed {}  [agent's reconcile {}; {}]",
                case.label(),
                load.took.map_or("-".into(), ms),
                load.reconcile
                    .map_or("-".into(), |s| ms(Duration::from_secs_f64(s))),
                load.detail
            ),
            Case::Iptables { .. } => println!(
                "    {:<58} {} (spawn to exit; {})",
                case.label(),
                load.took.map_or("-".into(), ms),
                load.detail
            ),
            _ => {}
        }
        hosts.push(host);
    }
    if let Some(h) = hosts.iter().find(|h| h.case == Case::Nodeplane) {
        let (took, lines) = nft_same(h)?;
        println!(
            "    {:<58} {} (nodeplane's whole table rendered in-process, {lines} lines, into an empty netns)",
            "nft -f of the same",
            ms(took)
        );
        // The policy is in force: a's SYN to b on the allowed port is
        // answered (nothing listens yet, so by a RST), on another port not.
        let allowed = syn_answered(&h.a, &h.b_ip, PORT)?;
        let other = syn_answered(&h.a, &h.b_ip, PORT + 1)?;
        println!(
            "  check: with the 10,000-entry policy, a→b TCP {PORT} is {}, TCP {} is {}",
            if allowed {
                "answered (allowed)"
            } else {
                "NOT ANSWERED"
            },
            PORT + 1,
            if other {
                "ANSWERED (not denied!)"
            } else {
                "dropped (denied)"
            }
        );
        if !allowed || other {
            return Err("the 10,000-entry policy is not in force as written".into());
        }
    }

    let mut results: Vec<Result<Vec<f64>, String>> = hosts.iter().map(|_| Ok(Vec::new())).collect();
    for run in 0..opts.iperf_runs {
        for j in 0..hosts.len() {
            let i = (j + run) % hosts.len();
            let h = &hosts[i];
            if let Ok(acc) = &mut results[i] {
                match iperf(&h.b, &h.a, &h.b_ip, opts.iperf_secs, pin) {
                    Ok(bps) => acc.push(bps),
                    Err(e) => results[i] = Err(e),
                }
            }
        }
    }
    let median_of = |case: Case| {
        hosts
            .iter()
            .zip(&results)
            .find(|(h, _)| h.case == case)
            .and_then(|(_, r)| r.as_ref().ok())
            .and_then(|v| median_f64(v))
    };
    let (no_policy, plain) = (median_of(Case::NoPolicy), median_of(Case::Plain));
    println!(
        "  {:<58} {:>7} {:>12} {:>12}   runs (Gbit/s)",
        "case", "Gbit/s", "vs own base", "vs np-none"
    );
    let mut verdicts = Vec::new();
    for (h, r) in hosts.iter().zip(&results) {
        match r {
            Ok(v) => {
                let m = median_f64(v);
                // Each datapath against itself without policy: nodeplane's
                // 10,000 entries against nodeplane's table with no policy;
                // iptables rules (and nodeplane's bare table) against no
                // rules at all.
                let own = match h.case {
                    Case::Nodeplane => no_policy,
                    _ => plain,
                };
                let rel = m.zip(own).map(|(m, b)| m / b);
                let vs_np = m.zip(no_policy).map(|(m, b)| m / b);
                let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.1} %", r * 100.0));
                let runs: Vec<String> = v.iter().map(|b| format!("{:.2}", b / 1e9)).collect();
                println!(
                    "  {:<58} {:>7} {:>12} {:>12}   {}",
                    h.case.label(),
                    m.map_or("-".into(), |m| format!("{:.2}", m / 1e9)),
                    pct(rel),
                    pct(vs_np),
                    runs.join(" ")
                );
                if !matches!(h.case, Case::NoPolicy | Case::Plain) {
                    verdicts.push((h.case, rel));
                }
            }
            Err(e) => {
                println!("  {:<58} failed: {e}", h.case.label());
                report
                    .errors
                    .push(format!("iperf3 over {}: {e}", h.case.label()));
            }
        }
    }
    println!(
        "  (own base: nodeplane with 10,000 entries vs nodeplane with no policy; everything else vs no rules at all;\n   np-none: nodeplane with no policy)"
    );
    println!("  how the packets met the rules (counters after the runs):");
    for h in &hosts {
        let e = h.evidence();
        if !e.is_empty() {
            println!("    {:<58} {e}", h.case.label());
        }
    }
    for (case, rel) in verdicts {
        let what = if case == Case::Nodeplane {
            "throughput with 10,000 entries ≥ 90 % of no policy, nodeplane (vs nodeplane, no policy)"
                .to_string()
        } else {
            format!("(baseline, same bar) {} (vs no rules)", case.label())
        };
        report.target(
            &what,
            rel.map_or("not measured".into(), |r| format!("ratio {r:.3}")),
            rel.is_some_and(|r| r >= TARGET),
        );
    }
    drop(hosts);
    Ok(())
}

/// `nft -f` of the table nodeplane holds for `h`, rendered in-process
/// from the same manifests and records, into a fresh namespace.
fn nft_same(h: &Host) -> Result<(Duration, usize), String> {
    let ag = h.agent.as_ref().ok_or("no agent")?;
    let records = nodeplane_cni::ipam::Store::open(h.node.state.path(), "nodeplane")
        .and_then(|s| s.records())
        .map_err(|e| e.to_string())?;
    let (model, _) = inproc::model_from(&ag.manifests, &records)?;
    let compiled = policy::compile(&model);
    let script = nft::full(
        &inproc::settings(CIDR)?,
        &Existing::default(),
        &compiled,
        &mut nft::Slots::default(),
    );
    let scratch = Ns::new("pbsx");
    let took = inproc::nft_apply(&scratch, &script)?;
    Ok((took, script.lines().count()))
}

/// One iperf3 transfer of `secs` seconds from `client` to `server_ip`
/// (served in `server`); bits per second received. Pinned as cni-bench
/// pins: server on CPU 1, client on CPU 0.
fn iperf(
    server: &Netns,
    client: &Netns,
    server_ip: &str,
    secs: u64,
    pin: bool,
) -> Result<f64, String> {
    let (server_cpu, client_cpu): (&[&str], &[&str]) = if pin {
        (&["-A", "1"], &["-A", "0"])
    } else {
        (&[], &[])
    };
    let srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", &PORT.to_string()])
        .args(server_cpu)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn iperf3 -s: {e}"))?;
    let _srv = Proc::new(srv, Duration::from_secs(secs + 30));
    wait_listening(server)?;
    let cl = client
        .command("iperf3")
        .args([
            "-c",
            server_ip,
            "-p",
            &PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .args(client_cpu)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn iperf3 -c: {e}"))?;
    let mut cl = Proc::new(cl, Duration::from_secs(secs + 20));
    let mut json = String::new();
    if let Some(mut out) = cl.0.stdout.take() {
        use std::io::Read;
        out.read_to_string(&mut json)
            .map_err(|e| format!("read iperf3 output: {e}"))?;
    }
    let status = cl.0.wait().map_err(|e| format!("wait iperf3 -c: {e}"))?;
    let v: Value = serde_json::from_str(&json)
        .map_err(|e| format!("iperf3 -c ({status}) printed no JSON ({e}): {json}"))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 -c ({status}): {}", v["error"]))
}

/// Does a TCP SYN from `from` to `ip:port` get an answer (accept or RST)
/// within a second? A dropped SYN gets none.
fn syn_answered(from: &Netns, ip: &str, port: u16) -> Result<bool, String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let r = nodeplane_tests::agent::in_netns(&from.path(), move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map(drop)
            .map_err(|e| e.kind())
    });
    use std::io::ErrorKind::{ConnectionRefused, TimedOut, WouldBlock};
    match r {
        Ok(()) | Err(ConnectionRefused) => Ok(true),
        Err(TimedOut | WouldBlock) => Ok(false),
        Err(k) => Err(format!("connect {addr} from {}: {k:?}", from.name)),
    }
}

fn wait_listening(ns: &Netns) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let out = ns
            .command("ss")
            .args(["-Hltn", &format!("sport = :{PORT}")])
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
