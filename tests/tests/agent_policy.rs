//! nodeplane-agent enforcing NetworkPolicy on real namespaces, veths and
//! nftables: lifecycle of a policy, labels, cutting denied connections,
//! policy from the first packet, the fail mode, and kill -9 of the agent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeplane_tests::agent::{in_netns, Agent};
use nodeplane_tests::fixture::{ip_of, Node};
use nodeplane_tests::{prereq, Netns};

const CIDR: &str = "10.244.0.0/24";

/// A pod: its namespace, name and netns, ADDed with CNI_ARGS naming it.
struct Pod {
    ns: Netns,
    ip: String,
    server: Option<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn add(node: &Node, namespace: &str, name: &str, netns: Netns) -> Pod {
    let mut pod = add_bare(node, namespace, name, netns);
    pod.server = Some(serve(&pod.ns));
    pod
}

/// ADD without starting a server in the pod.
fn add_bare(node: &Node, namespace: &str, name: &str, netns: Netns) -> Pod {
    let res = node.add_pod(&format!("{namespace}-{name}"), &netns, namespace, name);
    let ip = ip_of(&res, 0)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    Pod {
        ns: netns,
        ip,
        server: None,
    }
}

/// np-probe-server on 80 and 81 (TCP answers a line, UDP echoes).
fn serve(ns: &Netns) -> Child {
    let mut c = ns
        .command(env!("CARGO_BIN_EXE_np-probe-server"))
        .args(["--exit-on-stdin-eof", "80", "81"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn np-probe-server");
    let mut line = [0u8; 6];
    if let Some(out) = c.stdout.as_mut() {
        let _ = out.read_exact(&mut line);
    }
    if &line != b"ready\n" {
        let mut err = String::new();
        if let Some(e) = c.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("np-probe-server did not start in {}: {err}", ns.name);
    }
    c
}

/// Can `from` open a TCP connection to `ip:port` and read the greeting?
fn tcp(from: &Netns, ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
    in_netns(&from.path(), move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(400)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(400)));
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    })
}

fn ns_yaml(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )
}

fn pod_yaml(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c, image: i, ports: [{{name: http, containerPort: 80}}]}}]}}\n---\n"
    )
}

const DENY_B: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: x}
spec: {podSelector: {matchLabels: {pod: b}}}
---
";

const ALLOW_A_TO_B_HTTP: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: http}]
---
";

fn setup() -> (Node, Agent) {
    setup_with(&[CIDR])
}

/// A node whose pods get an IPv4 and an IPv6 address.
fn setup_dual_stack() -> (Node, Agent) {
    setup_with(&[CIDR, "fd00:10:244::/64"])
}

fn setup_with(cidrs: &[&str]) -> (Node, Agent) {
    prereq::require_root();
    let mut node = Node::new(cidrs);
    let agent = Agent::start(&mut node, cidrs, &[]);
    (node, agent)
}

#[test]
fn policy_lifecycle_labels_and_deletion() {
    let (node, agent) = setup();
    let cluster = |a_labels: &str| {
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", a_labels) + &pod_yaml("x", "b", "pod: b")
    };
    agent.apply(&[("cluster.yaml", cluster("pod: a"))]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    let b = add(&node, "x", "b", Netns::new("npb"));
    assert!(tcp(&a.ns, &b.ip, 80), "no policy: a → b:80 must pass");

    agent.apply(&[
        ("cluster.yaml", cluster("pod: a")),
        ("p.yaml", DENY_B.into()),
    ]);
    assert!(
        !tcp(&a.ns, &b.ip, 80),
        "deny-b in force: a → b:80 must be dropped"
    );
    assert!(
        tcp(&b.ns, &a.ip, 80),
        "deny-b is ingress only: b → a must pass"
    );

    let both = DENY_B.to_string() + ALLOW_A_TO_B_HTTP;
    agent.apply(&[
        ("cluster.yaml", cluster("pod: a")),
        ("p.yaml", both.clone()),
    ]);
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "allow-a (named port http = 80): a → b:80 must pass"
    );
    assert!(
        !tcp(&a.ns, &b.ip, 81),
        "allow-a covers only http: a → b:81 must be dropped"
    );

    // Relabel a: it no longer matches allow-a's peer selector.
    agent.apply(&[
        ("cluster.yaml", cluster("pod: other")),
        ("p.yaml", both.clone()),
    ]);
    assert!(
        !tcp(&a.ns, &b.ip, 80),
        "a relabelled: a → b:80 must be dropped"
    );

    // Deleting the policies restores reachability.
    agent.apply(&[("cluster.yaml", cluster("pod: other"))]);
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "policies deleted: a → b:80 must pass again"
    );
    drop((a, b));
    drop(agent);
    drop(node);
}

/// An echo over one TCP connection: true if `msg` comes back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg
}

/// A TCP echo server (busybox nc -e cat) on `port` in `ns`.
fn echo_server(ns: &Netns, port: u16) -> Child {
    prereq::require_tool("busybox", "busybox-static");
    let c = ns
        .command("busybox")
        .args(["nc", "-l", "-p", &port.to_string(), "-e", "cat"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn echo server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let out = ns.command("busybox").args(["netstat", "-ltn"]).output();
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(":{port} "))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

fn connect(from: &Netns, ip: &str, port: u16) -> TcpStream {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
    let s = in_netns(&from.path(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .expect("connect to echo server");
    s.set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    s
}

#[test]
fn a_denied_established_connection_is_cut() {
    let (node, agent) = setup();
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    agent.apply(&[("cluster.yaml", cluster.clone())]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    let b = add(&node, "x", "b", Netns::new("npb"));
    let mut server = echo_server(&b.ns, 82);
    let mut conn = connect(&a.ns, &b.ip, 82);
    assert!(echo(&mut conn, b"before"), "echo before the policy");
    agent.apply(&[("cluster.yaml", cluster), ("p.yaml", DENY_B.into())]);
    assert!(
        !echo(&mut conn, b"after"),
        "the established connection must be cut by deny-b"
    );
    let cut = agent.get("/metrics").map(|(_, m)| m).unwrap_or_default();
    assert!(
        cut.lines()
            .any(|l| l.starts_with("nodeplane_conntrack_cut_total ") && !l.ends_with(" 0")),
        "metrics should count the cut connection:\n{cut}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// An echo server on `[::]:port` in `ns` (dual-stack), one thread per
/// connection, for as long as the test runs.
fn dual_stack_echo(ns: &Netns, port: u16) {
    let listener = in_netns(&ns.path(), move || {
        std::net::TcpListener::bind(("::", port))
    })
    .expect("bind the echo server");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[test]
fn a_denied_connection_is_cut_over_ipv4_and_ipv6_alike() {
    // Dual-stack pods: the cut dumps both families in one conntrack dump.
    let (node, agent) = setup_dual_stack();
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    agent.apply(&[("cluster.yaml", cluster.clone())]);
    let a = add_bare(&node, "x", "a", Netns::new("npa"));
    let (b_ns, b_res) = {
        let ns = Netns::new("npb");
        let res = node.add_pod("x-b", &ns, "x", "b");
        (ns, res)
    };
    let (v4, v6) = (ip_of(&b_res, 0), format!("[{}]", ip_of(&b_res, 1)));
    assert!(v6.contains(':'), "b has no IPv6 address: {b_res}");
    dual_stack_echo(&b_ns, 84);
    let mut conns = [connect(&a.ns, &v4, 84), connect(&a.ns, &v6, 84)];
    for (c, ip) in conns.iter_mut().zip([&v4, &v6]) {
        assert!(echo(c, b"before"), "echo to {ip} before the policy");
    }
    agent.apply(&[("cluster.yaml", cluster), ("p.yaml", DENY_B.into())]);
    for (c, ip) in conns.iter_mut().zip([&v4, &v6]) {
        assert!(
            !echo(c, b"after"),
            "the established connection to {ip} must be cut by deny-b"
        );
    }
}

#[test]
fn a_new_pod_under_default_deny_is_never_reachable() {
    let (node, agent) = setup();
    let deny_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec: {podSelector: {}}\n";
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("y", "c", "pod: c");
    agent.apply(&[("cluster.yaml", cluster), ("p.yaml", deny_all.into())]);
    // The prober lives in namespace y (not under the policy).
    let prober = add(&node, "y", "c", Netns::new("npc"));
    // The new pod's namespace exists and serves before ADD, so any moment
    // in which its address is reachable would show.
    let new_ns = Netns::new("npa");
    let mut server = serve(&new_ns);
    let stop = Arc::new(AtomicBool::new(false));
    let (hits, tries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let path = prober.ns.path();
    let skip = prober.ip.clone();
    let probing = {
        let (stop, hits, tries) = (stop.clone(), hits.clone(), tries.clone());
        std::thread::spawn(move || {
            in_netns(&path, move || {
                while !stop.load(Ordering::Relaxed) {
                    for host in 1..=6 {
                        let ip = format!("10.244.0.{host}");
                        if ip == skip {
                            continue;
                        }
                        let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
                        if let Ok(mut s) =
                            TcpStream::connect_timeout(&addr, Duration::from_millis(50))
                        {
                            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                            let mut buf = [0u8; 8];
                            if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let a = add_bare(&node, "x", "a", new_ns);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    probing.join().expect("prober");
    assert!(tries.load(Ordering::Relaxed) > 20, "the prober barely ran");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "a pod under default deny answered a probe (from before its ADD returned)"
    );
    // Sanity: the probe would have seen it without the policy.
    agent.apply(&[(
        "cluster.yaml",
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("y", "c", "pod: c"),
    )]);
    assert!(
        tcp(&prober.ns, &a.ip, 80),
        "without the policy the new pod must be reachable"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn with_the_agent_down_a_new_pod_is_isolated_until_programmed() {
    let (node, mut agent) = setup();
    agent.apply(&[(
        "cluster.yaml",
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b"),
    )]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    agent.kill9();
    let started = Instant::now();
    let b = add(&node, "x", "b", Netns::new("npb"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ADD must not wait for a dead agent"
    );
    assert!(
        !tcp(&a.ns, &b.ip, 80),
        "fail mode isolate: an unprogrammed pod must be unreachable"
    );
    agent.restart(&node.ns);
    agent.wait_revision();
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "after the agent reconciled, b must be reachable"
    );
}

#[test]
fn agent_kill9_and_restart_keeps_allowed_connections_and_converges() {
    let (node, mut agent) = setup();
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    let allow_82 = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-82, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}], ports: [{port: 82}, {port: 80}]}]\n";
    agent.apply(&[
        ("cluster.yaml", cluster.clone()),
        ("p.yaml", allow_82.into()),
    ]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    let b = add(&node, "x", "b", Netns::new("npb"));
    let mut server = echo_server(&b.ns, 82);
    let mut conn = connect(&a.ns, &b.ip, 82);
    let mut lost = 0;
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_millis(600);
    let mut restarted = false;
    while Instant::now() < deadline || !restarted {
        if !restarted && sent == 20 {
            agent.kill9();
            agent.restart(&node.ns);
            restarted = true;
        }
        sent += 1;
        if !echo(&mut conn, format!("m{sent:06}").as_bytes()) {
            lost += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        lost, 0,
        "{lost} of {sent} echoes lost across kill -9 and restart of the agent"
    );
    // And the restarted agent follows a change.
    agent.apply(&[("cluster.yaml", cluster), ("p.yaml", DENY_B.into())]);
    assert!(
        !tcp(&a.ns, &b.ip, 80),
        "after restart, a policy change must be enforced"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// A TCP listener on `[::]:port` (dual stack) in `ns` that greets every
/// connection; it lives on a background thread until the test ends.
fn greet_server(ns: &Netns, port: u16) {
    let listener = in_netns(&ns.path(), move || {
        std::net::TcpListener::bind(("::", port)).expect("bind [::]")
    });
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hi\n");
        }
    });
}

#[test]
fn policy_applies_to_ipv6_as_to_ipv4() {
    let (node, agent) = setup_dual_stack();
    let cluster = ns_yaml("x", "ns: x")
        + &pod_yaml("x", "a", "pod: a")
        + &pod_yaml("x", "b", "pod: b")
        + &pod_yaml("x", "c", "pod: c");
    agent.apply(&[("cluster.yaml", cluster.clone())]);
    let v6 = |node: &Node, name: &str, ns: &Netns| {
        let res = node.add_pod(&format!("x-{name}"), ns, "x", name);
        let ips = res["ips"].as_array().cloned().unwrap_or_default();
        ips.iter()
            .filter_map(|i| i["address"].as_str())
            .find(|a| a.contains(':'))
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .expect("an IPv6 address")
    };
    let (a, b, c) = (Netns::new("npa"), Netns::new("npb"), Netns::new("npc"));
    let (_ia, ib, _ic) = (v6(&node, "a", &a), v6(&node, "b", &b), v6(&node, "c", &c));
    greet_server(&b, 8080);
    let bracket = format!("[{ib}]");
    assert!(
        tcp(&a, &bracket, 8080),
        "no policy: a → b over IPv6 must pass"
    );
    let allow_a = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}], ports: [{port: 8080}]}]\n";
    agent.apply(&[("cluster.yaml", cluster), ("p.yaml", allow_a.into())]);
    assert!(
        tcp(&a, &bracket, 8080),
        "allow-a: a → b over IPv6 must pass"
    );
    assert!(
        !tcp(&c, &bracket, 8080),
        "allow-a: c → b over IPv6 must be dropped"
    );
}

#[test]
fn a_pod_cannot_send_from_an_address_that_is_not_its_own() {
    let (node, agent) = setup();
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    agent.apply(&[("cluster.yaml", cluster)]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    let b = add(&node, "x", "b", Netns::new("npb"));
    // Pod a claims another address (in the pod CIDR, not allocated to it).
    a.ns.ip(&["addr", "add", "10.244.0.200/32", "dev", "eth0"]);
    prereq::require_tool("busybox", "busybox-static");
    let ping_from = |src: &str| {
        a.ns.command("busybox")
            .args(["ping", "-c", "2", "-W", "1", "-I", src, &b.ip])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let spoofed = ping_from("10.244.0.200");
    assert!(ping_from(&a.ip), "from its own address pod a pings b");
    assert!(
        !spoofed,
        "a connection from a forged source address got through"
    );
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "from its own address pod a still reaches b"
    );
    let m = agent.get("/metrics").map(|(_, m)| m).unwrap_or_default();
    let spoofed_drops = m
        .lines()
        .find(|l| l.starts_with("nodeplane_dropped_packets_total{reason=\"spoofed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        spoofed_drops > 0,
        "the spoofed packets should be counted:\n{m}"
    );
}

#[test]
fn del_and_gc_reach_the_agent_at_once() {
    let (node, agent) = setup();
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    agent.apply(&[("cluster.yaml", cluster)]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    let _b = add(&node, "x", "b", Netns::new("npb"));
    assert_eq!(
        agent.status()["pods"],
        2,
        "both ADDs programmed before they returned"
    );
    node.del("x-a", Some(&a.ns));
    // DEL returns after the agent programmed the change: no 10 s resync wait.
    assert_eq!(
        agent.status()["pods"],
        1,
        "DEL must reach the agent: {}",
        agent.status()
    );
    node.gc(&[]).expect_ok();
    assert_eq!(
        agent.status()["pods"],
        0,
        "GC must reach the agent: {}",
        agent.status()
    );
}

#[test]
fn the_nodes_pod_cidrs_feed_ipam() {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    // The plugin's configuration names no CIDR: the agent supplies the Node's.
    if let Some(obj) = node.base.as_object_mut() {
        obj.remove("podCIDRs");
    }
    let agent = Agent::start(&mut node, &[], &["--node-name", "node-7"]);
    let node_yaml =
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-7}\nspec: {podCIDRs: [10.245.3.0/24]}\n";
    agent.apply(&[("node.yaml", node_yaml.into())]);
    let a = add_bare(&node, "x", "a", Netns::new("npa"));
    assert!(
        a.ip.starts_with("10.245.3."),
        "the pod's address {} should come from Node.spec.podCIDRs",
        a.ip
    );
}

#[test]
fn fail_mode_open_lets_an_unprogrammed_pod_through() {
    prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let mut agent = Agent::start(&mut node, &[CIDR], &["--fail-mode", "open"]);
    let cluster =
        ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b");
    agent.apply(&[("cluster.yaml", cluster)]);
    let a = add(&node, "x", "a", Netns::new("npa"));
    agent.kill9();
    let b = add(&node, "x", "b", Netns::new("npb"));
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "fail mode open: an unprogrammed pod is reachable"
    );
    assert!(
        tcp(&b.ns, &a.ip, 80),
        "fail mode open: an unprogrammed pod can send"
    );
}

/// Sends one request to the agent's local API and returns its reply.
/// The CRI shim reports a pod's labels at RunPodSandbox, before the CNI
/// ADD. A pod the sources do not know yet gets its policy from those
/// labels at once: here the allow rule for `pod: b` only matches if the
/// agent took `pod: b` from the shim's report.
#[test]
fn labels_from_the_cri_shim_select_a_pod_the_sources_do_not_know_yet() {
    use nodeplane_proto::agent::{pod_lifecycle::Kind, request::What, PodLifecycle, Request};
    let (node, agent) = setup();
    let both = DENY_B.to_string() + ALLOW_A_TO_B_HTTP;
    // The namespace and client a are known; b is not (its Pod object has
    // not reached the agent yet), and neither is c.
    agent.apply(&[
        (
            "cluster.yaml",
            ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a"),
        ),
        ("p.yaml", both),
    ]);
    let reply = agent.request(Request {
        what: Some(What::Lifecycle(PodLifecycle {
            kind: Kind::SandboxStarting as i32,
            pod_namespace: "x".into(),
            pod_name: "b".into(),
            pod_uid: "uid-b".into(),
            labels: [("pod".to_string(), "b".to_string())].into(),
            ..Default::default()
        })),
    });
    assert!(
        reply.error.is_empty(),
        "lifecycle event refused: {}",
        reply.error
    );
    let a = add(&node, "x", "a", Netns::new("npa"));
    let c = add(&node, "x", "c", Netns::new("npc"));
    let b = add(&node, "x", "b", Netns::new("npb"));
    // Named port `http` is unknown without the Pod object: allow-a can
    // only admit b's port 80 once the source delivers b's ports, so the
    // shim's labels show in deny-b: b is isolated, c is not.
    assert!(
        !tcp(&c.ns, &b.ip, 81),
        "b carries pod: b from the shim, so deny-b isolates it: c → b:81 must be dropped"
    );
    assert!(
        tcp(&b.ns, &c.ip, 80),
        "c is selected by nothing: b → c must pass"
    );
    // When the source delivers b, its own labels and ports take over.
    agent.apply(&[
        (
            "cluster.yaml",
            ns_yaml("x", "ns: x") + &pod_yaml("x", "a", "pod: a") + &pod_yaml("x", "b", "pod: b"),
        ),
        ("p.yaml", DENY_B.to_string() + ALLOW_A_TO_B_HTTP),
    ]);
    assert!(
        tcp(&a.ns, &b.ip, 80),
        "b delivered by the source: a → b:http must pass"
    );
    assert!(
        !tcp(&c.ns, &b.ip, 80),
        "c is no client: c → b:80 must be dropped"
    );
    drop((a, b, c));
    drop(agent);
    drop(node);
}
