//! nodeplane-cni as the first plugin of a conflist, chained with the
//! reference `portmap` and `bandwidth` plugins exactly as libcni runs them:
//! each later plugin gets the previous result as `prevResult`, DEL runs in
//! reverse order with the final result, and nodeplane passes a `prevResult`
//! it is given through untouched.

use nodeplane_tests::fixture::{ip_of, tcp_roundtrip_via, Node, NODE_IP};
use nodeplane_tests::{CniCall, CniOutput, Netns, Plugin};
use serde_json::{json, Value};

/// Runs one plugin of the chain as libcni derives its configuration.
fn chained(node: &Node, plugin: &Plugin, verb: &str, pod: &Netns, conf: Value) -> CniOutput {
    let config = conf.to_string();
    let path = pod.path();
    plugin.run(
        &node.ns,
        &CniCall {
            command: verb,
            container_id: "chain-1",
            netns: Some(&path),
            ifname: "eth0",
            args: "",
            config: &config,
        },
    )
}

#[test]
fn chains_with_portmap_and_bandwidth() {
    nodeplane_tests::require_tool("iptables", "iptables");
    let node = Node::new(&["10.244.0.0/24"]);
    let pod = Netns::new("npch");
    let portmap = Plugin::reference("portmap");
    let bandwidth = Plugin::reference("bandwidth");
    // Debian 12's reference plugins speak up to 1.0.0; the chain uses that.
    let header = json!({"cniVersion": "1.0.0", "name": "nodeplane"});
    let with = |extra: Value, prev: Option<&Value>| {
        let mut c = header.clone();
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    let limits = json!({"ingressRate": 100000000, "ingressBurst": 1000000, "egressRate": 100000000, "egressBurst": 1000000});
    // nodeplane's entry declares the bandwidth capability (as the deploy
    // conflist does), so libcni hands it the same limits: the pod then stays
    // off the fast path, which would skip the shaping.
    let ours = serde_json::from_str::<Value>(&node.config(json!({
        "cniVersion": "1.0.0",
        "capabilities": {"bandwidth": true},
        "runtimeConfig": {"bandwidth": limits},
    })))
    .expect("json");
    let pm_conf = json!({"type": "portmap", "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}});
    let bw_conf = json!({"type": "bandwidth", "runtimeConfig": {"bandwidth": limits}});

    let r1 = chained(&node, &node.plugin, "ADD", &pod, with(ours.clone(), None))
        .expect_ok()
        .json();
    let r2 = chained(
        &node,
        &portmap,
        "ADD",
        &pod,
        with(pm_conf.clone(), Some(&r1)),
    )
    .expect_ok()
    .json();
    let r3 = chained(
        &node,
        &bandwidth,
        "ADD",
        &pod,
        with(bw_conf.clone(), Some(&r2)),
    )
    .expect_ok()
    .json();
    assert_eq!(
        ip_of(&r3, 0),
        ip_of(&r1, 0),
        "the chain keeps nodeplane's address"
    );

    // portmap's DNAT reaches the pod through nodeplane's host route.
    assert!(
        tcp_roundtrip_via(&pod, 8080, &node.ns, NODE_IP, 18080),
        "hostPort 18080 -> pod:8080 via portmap"
    );
    // bandwidth found our host veth from the result and shaped it, both
    // ways: tbf for traffic into the pod, its ingress qdisc (mirred to an
    // ifb) for traffic out of it. The fast path's filter is not there.
    let host_if = r1["interfaces"][0]["name"].as_str().expect("host if");
    let qdiscs = node.ns.sh(&format!("tc qdisc show dev {host_if}"));
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout).to_string();
    assert!(qdiscs.contains("qdisc tbf"), "{qdiscs}");
    assert!(qdiscs.contains("qdisc ingress"), "{qdiscs}");
    let filters = node.ns.sh(&format!("tc filter show dev {host_if} ingress"));
    let filters = String::from_utf8_lossy(&filters.stdout).to_string();
    assert!(!filters.contains("np_fastpath"), "{filters}");

    // CHECK with the final result. Debian 12's portmap (v1.1.1) fails its own
    // CHECK on IPv4-only results (it looks for an IPv6 chain it never made),
    // so the chain check runs nodeplane's and bandwidth's.
    for (p, c) in [(&node.plugin, ours.clone()), (&bandwidth, bw_conf.clone())] {
        chained(&node, p, "CHECK", &pod, with(c, Some(&r3))).expect_ok();
    }
    // DEL in reverse order, each with the final result.
    for (p, c) in [
        (&bandwidth, bw_conf),
        (&portmap, pm_conf),
        (&node.plugin, ours),
    ] {
        chained(&node, p, "DEL", &pod, with(c, Some(&r3))).expect_ok();
    }
    assert!(node.state_files("ips").is_empty());
    assert!(node.wait_no_veths().is_empty());
}

#[test]
fn passes_a_previous_result_through() {
    let node = Node::new(&["10.244.0.0/24"]);
    let pod = Netns::new("npch");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "other0", "mac": "02:00:00:00:00:09", "sandbox": pod.path()}],
        "ips": [{"address": "192.168.50.2/24", "interface": 0}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let out = node
        .call(
            "ADD",
            "prev-1",
            Some(&pod),
            &node.config(json!({"cniVersion": "1.0.0", "prevResult": prev})),
        )
        .expect_ok()
        .json();
    assert_eq!(out["interfaces"][0]["name"], "other0", "{out}");
    assert_eq!(out["ips"][0]["address"], "192.168.50.2/24");
    assert_eq!(
        out["ips"][1]["interface"], 2,
        "our IP points at our pod interface, after the previous ones"
    );
    assert_eq!(out["dns"]["nameservers"][0], "10.96.0.10");
    node.del("prev-1", Some(&pod));
}
