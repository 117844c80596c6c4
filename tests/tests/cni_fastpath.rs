//! The same-node fast path (nodeplane-fastpath) as the plugin sets it up:
//! which traffic it takes, which it must leave to the routed path, and that
//! DEL, GC, `fastPath: false` and a policed network are honoured.

use std::net::IpAddr;
use std::path::PathBuf;

use nodeplane_fastpath::{Instance, PodEntry};
use nodeplane_tests::agent::in_netns;
use nodeplane_tests::fixture::{ip_of, ping, tcp_roundtrip, tcp_roundtrip_via, Node};
use nodeplane_tests::Netns;
use serde_json::json;

const V4: &str = "10.244.0.0/24";
const V6: &str = "fd00:10:244::/64";

/// The pod entry for `ip` in the node's instance, read from inside the node
/// namespace (an instance belongs to one namespace).
fn entry(node: &Node, ip: &str) -> Option<PodEntry> {
    let dir = node.state.path().join(&node.network);
    let ip: IpAddr = ip.parse().expect("ip");
    in_netns(&node.ns.path(), move || {
        Instance::find(&dir)
            .expect("find instance")
            .and_then(|i| i.pod(ip).expect("lookup"))
    })
}

/// The (opener, listener) pairs of the flows the program took.
fn flows(node: &Node) -> Vec<(IpAddr, IpAddr)> {
    let dir = node.state.path().join(&node.network);
    in_netns(&node.ns.path(), move || {
        Instance::find(&dir)
            .expect("find instance")
            .map(|i| i.flows().expect("flows"))
            .unwrap_or_default()
            .iter()
            .map(|f| (f.src, f.dst))
            .collect()
    })
}

fn forwarding(node: &Node, on: bool) {
    let v = if on { "1" } else { "0" };
    node.ns.sh(&format!(
        "sysctl -qw net.ipv4.ip_forward={v} net.ipv6.conf.all.forwarding={v}"
    ));
}

/// `tc filter show` of the ingress of the pod's host veth (from its ADD result).
fn ingress_filters(node: &Node, result: &serde_json::Value) -> String {
    let host_if = result["interfaces"][0]["name"].as_str().expect("host if");
    let out = node.ns.sh(&format!("tc filter show dev {host_if} ingress"));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn pod_to_pod_tcp_skips_forwarding_and_everything_else_does_not() {
    let node = Node::new(&[V4, V6]);
    let (a, b) = (Netns::new("fpa"), Netns::new("fpb"));
    let (ra, rb) = (node.add("pod-a", &a), node.add("pod-b", &b));
    let (a4, a6, b4, b6) = (ip_of(&ra, 0), ip_of(&ra, 1), ip_of(&rb, 0), ip_of(&rb, 1));
    let e = entry(&node, &b4).expect("pod b recorded");
    assert!(e.fast, "no agent on this node: the pod may skip netfilter");
    assert_eq!(Some(e), entry(&node, &b6), "both families, one veth");
    let filters = ingress_filters(&node, &rb);
    assert!(
        filters.contains("np_fastpath") && filters.contains("direct-action"),
        "the program sits on pod b's host veth: {filters}"
    );

    // With IP forwarding off in the node, only the fast path can carry a packet.
    forwarding(&node, false);
    assert!(tcp_roundtrip(&b, &a, &b4, 8080), "TCP a -> b over IPv4");
    assert!(tcp_roundtrip(&b, &a, &b6, 8081), "TCP a -> b over IPv6");
    assert!(tcp_roundtrip(&a, &b, &a4, 8082), "TCP b -> a over IPv4");
    assert!(
        !ping(&a, &b4),
        "ICMP must take the routed path (forwarding is off)"
    );
    forwarding(&node, true);
    assert!(ping(&a, &b4), "ICMP over the routed path");
    assert!(ping(&a, &b6), "ICMPv6 over the routed path");

    let f = flows(&node);
    for (src, dst) in [(&a4, &b4), (&b4, &a4), (&a6, &b6)] {
        assert!(
            f.contains(&(ip(src), ip(dst))),
            "flow {src} -> {dst} in {f:?}"
        );
    }

    // DEL forgets the pod: nothing is handed to its veth any more.
    node.del("pod-b", Some(&b));
    assert_eq!(entry(&node, &b4), None);
    assert_eq!(entry(&node, &b6), None);
    assert!(entry(&node, &a4).is_some());
    node.del("pod-a", Some(&a));
    assert!(node.wait_no_veths().is_empty());
}

/// The instance outlives the network's last pod, on its holder veth pair, so
/// a node going from one pod to none and back does not pay for new maps and a
/// new program on the next ADD.
#[test]
fn the_instance_outlives_the_last_pod() {
    let node = Node::new(&[V4]);
    let pod = Netns::new("fpo");
    let dir = node.state.path().join(&node.network);
    let state = || std::fs::read_to_string(dir.join("fastpath")).expect("fastpath state file");
    let r = node.add("pod-1", &pod);
    let first = state();
    node.del("pod-1", Some(&pod));
    assert!(node.wait_no_veths().is_empty());

    let (holder, peer) = nodeplane_fastpath::holder_names(&dir);
    let links = String::from_utf8_lossy(&node.ns.sh("ip -br link").stdout).to_string();
    assert!(
        links.contains(&holder) && links.contains(&peer),
        "holder pair {holder}/{peer} in {links}"
    );
    let out = node.ns.sh(&format!("tc filter show dev {holder} ingress"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("np_fastpath"));
    assert!(
        entry(&node, &ip_of(&r, 0)).is_none(),
        "the instance is alive and has forgotten the pod"
    );

    let r = node.add("pod-2", &pod);
    assert_eq!(state(), first, "the same program serves the next pod");
    assert!(entry(&node, &ip_of(&r, 0)).is_some_and(|e| e.fast));

    // A holder deleted by hand comes back with the next ADD (on the old
    // instance while the kernel still has it, else on a new one).
    node.del("pod-2", Some(&pod));
    assert!(node.wait_no_veths().is_empty());
    node.ns.sh(&format!("ip link del {holder}"));
    let r = node.add("pod-3", &pod);
    let out = node.ns.sh(&format!("tc filter show dev {holder} ingress"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("np_fastpath"));
    assert!(entry(&node, &ip_of(&r, 0)).is_some_and(|e| e.fast));
    node.del("pod-3", Some(&pod));
}

/// A connection to a Service address is translated by conntrack (kube-proxy's
/// DNAT); its replies, pod to pod on the wire, must go back through conntrack
/// or the client would see them come from the wrong address.
#[test]
fn replies_of_a_dnat_connection_keep_their_translation() {
    let node = Node::new(&[V4]);
    let (a, b) = (Netns::new("fpa"), Netns::new("fpb"));
    node.add("pod-a", &a);
    let rb = node.add("pod-b", &b);
    let b4 = ip_of(&rb, 0);
    let svc = "10.96.0.10";
    let nft = format!(
        "table ip svc {{\n chain pre {{\n type nat hook prerouting priority dstnat; policy accept;\n ip daddr {svc} tcp dport 80 dnat to {b4}:8080\n }}\n}}"
    );
    let out = node.ns.sh(&format!("nft -f - <<'EOF'\n{nft}\nEOF"));
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tcp_roundtrip_via(&b, 8080, &a, svc, 80),
        "TCP a -> Service -> b, replies translated back"
    );
    let f = flows(&node);
    assert!(
        f.is_empty(),
        "the DNAT connection must not be in the fast path: {f:?}"
    );
    node.del("pod-a", Some(&a));
    node.del("pod-b", Some(&b));
}

#[test]
fn a_policed_network_records_pods_without_the_fast_flag() {
    let node = Node::new(&[V4]);
    let marker: PathBuf = nodeplane_cni::fast::policed_marker(node.state.path(), &node.network);
    std::fs::create_dir_all(marker.parent().expect("dir")).expect("mkdir");
    std::fs::write(&marker, "test\n").expect("marker");
    let (a, b) = (Netns::new("fpa"), Netns::new("fpb"));
    let (_ra, rb) = (node.add("pod-a", &a), node.add("pod-b", &b));
    let b4 = ip_of(&rb, 0);
    let e = entry(&node, &b4).expect("recorded");
    assert!(!e.fast, "the agent decides; until then the routed path");
    forwarding(&node, false);
    assert!(
        !tcp_roundtrip(&b, &a, &b4, 8084),
        "without the flag TCP must take the routed path (forwarding is off)"
    );
    forwarding(&node, true);
    assert!(tcp_roundtrip(&b, &a, &b4, 8085));
    assert!(flows(&node).is_empty(), "{:?}", flows(&node));
    node.del("pod-a", Some(&a));
    node.del("pod-b", Some(&b));
}

#[test]
fn an_agent_socket_without_the_marker_counts_as_policed() {
    // An agent that predates the fast path never writes the marker and
    // would never clear the flag, so its presence alone keeps pods routed.
    let node = Node::new(&[V4]);
    let socket = node.base["agentSocket"]
        .as_str()
        .expect("the fixture sets agentSocket");
    std::fs::write(socket, "").expect("stand-in for the agent's socket");
    let a = Netns::new("fps");
    let r = node.add("pod-a", &a);
    let e = entry(&node, &ip_of(&r, 0)).expect("recorded");
    assert!(!e.fast, "an agent may be enforcing policy: the routed path");
    node.del("pod-a", Some(&a));
}

#[test]
fn fast_path_false_sets_nothing_up_and_a_bad_value_is_refused() {
    let node = Node::new(&[V4]);
    let a = Netns::new("fpa");
    let conf = node.config(json!({"fastPath": false}));
    let r = node
        .call("ADD", "pod-a", Some(&a), &conf)
        .expect_ok()
        .json();
    assert_eq!(entry(&node, &ip_of(&r, 0)), None);
    node.call("DEL", "pod-a", Some(&a), &conf).expect_ok();

    let bad = node.config(json!({"fastPath": "yes"}));
    let out = node.call("ADD", "pod-a", Some(&a), &bad);
    assert_eq!(out.error_code(), 7, "{:?}", out.json());
    assert!(
        out.json()["details"].to_string().contains("fastPath"),
        "{:?}",
        out.json()
    );
}

/// A pod with bandwidth limits (runtimeConfig.bandwidth, which libcni passes
/// when nodeplane's entry declares the capability) is left to the routed
/// path, where the bandwidth plugin's qdiscs on its host veth shape it.
#[test]
fn a_bandwidth_limited_pod_stays_on_the_routed_path() {
    let node = Node::new(&[V4]);
    let (a, b) = (Netns::new("fpa"), Netns::new("fpb"));
    let ra = node.add("pod-a", &a);
    let limited = node.config(json!({
        "capabilities": {"bandwidth": true},
        "runtimeConfig": {"bandwidth": {"egressRate": 1000000, "egressBurst": 100000}},
    }));
    let rb = node
        .call("ADD", "pod-b", Some(&b), &limited)
        .expect_ok()
        .json();
    assert!(entry(&node, &ip_of(&ra, 0)).is_some());
    assert_eq!(
        entry(&node, &ip_of(&rb, 0)),
        None,
        "limited pod not recorded"
    );
    assert_eq!(ingress_filters(&node, &rb), "", "nothing on its host veth");
    // Unlimited a and limited b still talk, over the routed path.
    assert!(tcp_roundtrip(&b, &a, &ip_of(&rb, 0), 8090), "TCP a -> b");
    assert!(
        !flows(&node).iter().any(|(_, d)| *d == ip(&ip_of(&rb, 0))),
        "no fast flow to the limited pod"
    );
    node.call("DEL", "pod-b", Some(&b), &limited).expect_ok();
    node.del("pod-a", Some(&a));
    assert!(node.wait_no_veths().is_empty());
}

#[test]
fn gc_forgets_the_pods_it_releases() {
    let node = Node::new(&[V4]);
    let (a, b) = (Netns::new("fpa"), Netns::new("fpb"));
    let (ra, rb) = (node.add("pod-a", &a), node.add("pod-b", &b));
    assert!(node.gc(&["pod-a"]).success());
    assert!(entry(&node, &ip_of(&ra, 0)).is_some());
    assert_eq!(entry(&node, &ip_of(&rb, 0)), None);
    node.del("pod-a", Some(&a));
}
