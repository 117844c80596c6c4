//! nodeplane-cni on real namespaces: every verb, connectivity, and the spec's
//! lifecycle rules (repeated DEL, DEL without netns or ADD, GC, STATUS).

use nodeplane_tests::fixture::{ip_of, ping, tcp_roundtrip, Node, NODE_IP};
use nodeplane_tests::Netns;
use serde_json::json;

const V4: &str = "10.244.0.0/24";
const V6: &str = "fd00:10:244::/64";

#[test]
fn ipv4_pods_reach_each_other_and_the_host_over_icmp_and_tcp() {
    let node = Node::new(&[V4]);
    let (a, b) = (Netns::new("npa"), Netns::new("npb"));
    let ra = node.add("pod-a", &a);
    let rb = node.add("pod-b", &b);
    let (ipa, ipb) = (ip_of(&ra, 0), ip_of(&rb, 0));
    assert_ne!(ipa, ipb);
    assert!(ipa.starts_with("10.244.0."), "{ra}");
    assert_eq!(ra["ips"][0]["address"], format!("{ipa}/32"));
    assert_eq!(ra["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(
        ra["interfaces"][1]["sandbox"],
        a.path().display().to_string()
    );

    assert!(ping(&a, &ipb), "pod a -> pod b");
    assert!(ping(&b, &ipa), "pod b -> pod a");
    assert!(ping(&node.ns, &ipa), "host -> pod a");
    assert!(ping(&a, NODE_IP), "pod a -> host");
    assert!(ping(&a, &ipa), "pod a -> itself");
    assert!(tcp_roundtrip(&b, &a, &ipb, 8080), "TCP pod a -> pod b");
    assert!(tcp_roundtrip(&a, &node.ns, &ipa, 8081), "TCP host -> pod a");

    // The pod side is what the design says: /32, link-local gateway, default route.
    let routes = a.ip(&["route"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let link = node.ns.ip(&[
        "-o",
        "link",
        "show",
        ra["interfaces"][0]["name"].as_str().expect("host if"),
    ]);
    assert!(
        link.contains("alias nodeplane:nodeplane:pod-a:eth0"),
        "{link}"
    );
    let host_if = ra["interfaces"][0]["name"].as_str().expect("name");
    let host_addrs = node.ns.ip(&["-o", "addr", "show", "dev", host_if]);
    assert!(
        !host_addrs.contains("inet ") && !host_addrs.contains("scope global"),
        "host side is unnumbered: {host_addrs}"
    );

    node.del("pod-a", Some(&a));
    node.del("pod-b", Some(&b));
    assert!(node.wait_no_veths().is_empty());
    assert!(node.host_routes().is_empty(), "{:?}", node.host_routes());
    assert!(node.state_files("ips").is_empty());
    assert!(node.state_files("attachments").is_empty());
}

#[test]
fn ipv6_only_pods_are_reachable() {
    let node = Node::new(&[V6]);
    let (a, b) = (Netns::new("npa"), Netns::new("npb"));
    let ra = node.add("v6-a", &a);
    let rb = node.add("v6-b", &b);
    let (ipa, ipb) = (ip_of(&ra, 0), ip_of(&rb, 0));
    assert!(ipa.starts_with("fd00:10:244::"), "{ra}");
    assert_eq!(ra["ips"][0]["gateway"], "fe80::1");
    assert!(ping(&a, &ipb), "pod a -> pod b over IPv6");
    assert!(tcp_roundtrip(&b, &a, &ipb, 8082), "TCP over IPv6");
    node.del("v6-a", Some(&a));
    node.del("v6-b", Some(&b));
    assert!(node.wait_no_veths().is_empty());
}

#[test]
fn dual_stack_pods_get_one_address_per_family() {
    let node = Node::new(&[V4, V6]);
    let (a, b) = (Netns::new("npa"), Netns::new("npb"));
    let ra = node.add("ds-a", &a);
    let rb = node.add("ds-b", &b);
    assert_eq!(ra["ips"].as_array().expect("ips").len(), 2);
    assert!(ping(&a, &ip_of(&rb, 0)), "IPv4");
    assert!(ping(&a, &ip_of(&rb, 1)), "IPv6");
    assert!(ping(&node.ns, &ip_of(&ra, 1)), "host -> pod over IPv6");
    node.del("ds-a", Some(&a));
    node.del("ds-b", Some(&b));
    assert!(
        node.state_files("ips").is_empty(),
        "{:?}",
        node.state_files("ips")
    );
}

#[test]
fn mtu_is_configurable() {
    let node = Node::new(&[V4]);
    let a = Netns::new("npa");
    let r = node
        .call("ADD", "mtu-a", Some(&a), &node.config(json!({"mtu": 1400})))
        .expect_ok()
        .json();
    assert!(a.ip(&["link", "show", "eth0"]).contains("mtu 1400"));
    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    assert!(node.ns.ip(&["link", "show", &host_if]).contains("mtu 1400"));
    node.del("mtu-a", Some(&a));
}

#[test]
fn check_passes_after_add_and_names_what_drifted() {
    let node = Node::new(&[V4, V6]);
    let a = Netns::new("npa");
    let r = node.add("chk-a", &a);
    let with_prev = node.config(json!({ "prevResult": r }));
    node.call("CHECK", "chk-a", Some(&a), &with_prev)
        .expect_ok();

    a.ip(&["route", "del", "default"]);
    a.ip(&["link", "set", "eth0", "mtu", "1300"]);
    let out = node.call("CHECK", "chk-a", Some(&a), &with_prev);
    assert_eq!(out.error_code(), 103, "{out:?}");
    let details = out.json()["details"].as_str().expect("details").to_string();
    assert!(
        details.contains("default route via 169.254.1.1"),
        "{details}"
    );
    assert!(details.contains("MTU 1300"), "{details}");

    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    node.ns.ip(&["link", "del", &host_if]);
    let out = node.call("CHECK", "chk-a", Some(&a), &with_prev);
    assert!(
        out.json()["details"]
            .as_str()
            .expect("details")
            .contains("missing"),
        "{out:?}"
    );

    // CHECK is not defined before 0.4.0.
    let old = node.config(json!({ "cniVersion": "0.3.1", "prevResult": r }));
    assert_eq!(node.call("CHECK", "chk-a", Some(&a), &old).error_code(), 1);
    node.del("chk-a", Some(&a));
}

#[test]
fn del_is_idempotent_and_works_without_netns_or_add() {
    let node = Node::new(&[V4]);
    let a = Netns::new("npa");
    node.add("del-a", &a);
    node.del("del-a", Some(&a));
    node.del("del-a", Some(&a)); // repeated
    node.del("never-added", Some(&a)); // DEL without ADD
    node.del("never-added", None); // and without CNI_NETNS
    assert!(node.state_files("ips").is_empty());

    // The pod's namespace is deleted before DEL (pod killed, node rebooted).
    let b = Netns::new("npb");
    node.add("del-b", &b);
    let b_path = b.path();
    drop(b);
    let cfg = node.config(json!({}));
    let out = node.plugin.run(
        &node.ns,
        &nodeplane_tests::CniCall {
            command: "DEL",
            container_id: "del-b",
            netns: Some(&b_path),
            ifname: "eth0",
            args: "",
            config: &cfg,
        },
    );
    assert!(
        out.success(),
        "DEL after netns deletion must succeed: {out:?}"
    );
    assert!(node.state_files("ips").is_empty(), "address released");
    assert!(node.wait_no_veths().is_empty());
}

#[test]
fn add_twice_fails_but_a_retried_add_after_a_crash_keeps_its_address() {
    let node = Node::new(&[V4]);
    let a = Netns::new("npa");
    let first = node.add("twice", &a);
    let again = node.call("ADD", "twice", Some(&a), &node.config(json!({})));
    assert_eq!(again.error_code(), 100, "{again:?}");
    assert!(
        again.json()["details"]
            .as_str()
            .expect("details")
            .contains("DEL"),
        "{again:?}"
    );
    assert_eq!(
        node.state_files("ips").len(),
        1,
        "the failed ADD must not release the live pod's address"
    );

    // Simulate a runtime retrying ADD after the wiring vanished (crash mid-ADD).
    let host_if = first["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    node.ns.ip(&["link", "del", &host_if]);
    let retry = node.add("twice", &a);
    assert_eq!(ip_of(&retry, 0), ip_of(&first, 0), "same address on retry");
    node.del("twice", Some(&a));
}

#[test]
fn gc_releases_stale_attachments_and_their_interfaces() {
    let node = Node::new(&[V4, V6]);
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("npg")).collect();
    let results: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.add(&format!("gc-{i}"), p))
        .collect();
    assert_eq!(node.state_files("ips").len(), 8);

    node.gc(&["gc-0", "gc-2"]).expect_ok();
    assert_eq!(
        node.state_files("attachments"),
        vec!["gc-0:eth0".to_string(), "gc-2:eth0".to_string()]
    );
    assert_eq!(node.state_files("ips").len(), 4);
    let veths = node.host_veths();
    assert_eq!(veths.len(), 2, "{veths:?}");
    assert!(
        ping(&pods[0], &ip_of(&results[2], 0)),
        "kept pods still talk"
    );
    assert!(
        !ping(&node.ns, &ip_of(&results[1], 0)),
        "stale pod is cut off"
    );
    assert_eq!(node.host_routes().len(), 4, "{:?}", node.host_routes());

    node.gc(&[]).expect_ok();
    assert!(node.state_files("ips").is_empty());
    assert!(node.host_veths().is_empty());
    assert!(node.host_routes().is_empty());

    // GC needs the list, and cniVersion 1.1.0.
    let out = node.call("GC", "", None, &node.config(json!({})));
    assert_eq!(out.error_code(), 7);
    let out = node.call(
        "GC",
        "",
        None,
        &node.config(json!({"cniVersion": "1.0.0", "cni.dev/valid-attachments": []})),
    );
    assert_eq!(out.error_code(), 1);
}

#[test]
fn status_reports_50_when_pods_cannot_be_added() {
    // A /30 has two assignable addresses.
    let node = Node::new(&["10.244.9.0/30"]);
    let cfg = node.config(json!({}));
    node.call("STATUS", "", None, &cfg).expect_ok();
    let (a, b, c) = (Netns::new("nps"), Netns::new("nps"), Netns::new("nps"));
    node.add("st-a", &a);
    node.add("st-b", &b);
    let out = node.call("STATUS", "", None, &cfg);
    assert_eq!(out.error_code(), 50, "{out:?}");
    assert!(out.json()["details"]
        .as_str()
        .expect("details")
        .contains("10.244.9.0/30"));
    let full = node.call("ADD", "st-c", Some(&c), &cfg);
    assert_eq!(full.error_code(), 101, "{full:?}");
    node.del("st-a", Some(&a));
    node.call("STATUS", "", None, &cfg).expect_ok();

    // Unusable state directory: a file where the directory should be.
    let file = node.state.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let out = node.call("STATUS", "", None, &node.config(json!({"stateDir": file})));
    assert_eq!(out.error_code(), 50, "{out:?}");
    node.del("st-b", Some(&b));
}

#[test]
fn answers_in_the_requested_version() {
    let node = Node::new(&[V4, V6]);
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let p = Netns::new("npv");
        let cid = format!("ver-{i}");
        let out = node
            .call(
                "ADD",
                &cid,
                Some(&p),
                &node.config(json!({"cniVersion": v})),
            )
            .expect_ok()
            .json();
        assert_eq!(out["cniVersion"], *v);
        let has_version = out["ips"][0].get("version").is_some();
        assert_eq!(has_version, v.starts_with("0."), "{v}: {out}");
        assert_eq!(
            out["interfaces"][0].get("mtu").is_some(),
            *v == "1.1.0",
            "{v}: {out}"
        );
        node.call(
            "DEL",
            &cid,
            Some(&p),
            &node.config(json!({"cniVersion": v})),
        )
        .expect_ok();
    }
}

#[test]
fn never_deletes_a_host_interface_it_does_not_own() {
    // A link already holds the host name this attachment would get (say,
    // another tool's, or a hash collision): ADD must fail and leave it alone.
    let node = Node::new(&[V4]);
    let a = Netns::new("npa");
    let name = nodeplane_cni::wiring::host_ifname("np", &node.network, "foreign", "eth0");
    node.ns.ip(&[
        "link",
        "add",
        &name,
        "type",
        "veth",
        "peer",
        "name",
        "foreign-peer",
    ]);
    let out = node.call("ADD", "foreign", Some(&a), &node.config(json!({})));
    assert_eq!(out.error_code(), 100, "{out:?}");
    assert!(out.json()["details"]
        .as_str()
        .expect("details")
        .contains("hostInterfacePrefix"));
    assert!(
        node.ns.ip(&["link", "show", &name]).contains(&name),
        "the foreign link survives"
    );
    assert!(
        node.state_files("ips").is_empty(),
        "the failed ADD released its address"
    );
    // The runtime follows a failed ADD with DEL, and GC runs later: neither
    // may take the link that is not ours.
    node.del("foreign", Some(&a));
    node.gc(&[]).expect_ok();
    assert!(
        node.ns.ip(&["link", "show", &name]).contains(&name),
        "still there after DEL and GC"
    );
}

#[test]
fn writes_the_optional_log_file() {
    let node = Node::new(&[V4]);
    let a = Netns::new("npl");
    let log = node.state.path().join("cni.log");
    let cfg = node.config(json!({"logFile": log, "logLevel": "info"}));
    node.call("ADD", "log-a", Some(&a), &cfg).expect_ok();
    node.call("ADD", "log-a", Some(&a), &cfg); // fails: already attached
    node.call("DEL", "log-a", Some(&a), &cfg).expect_ok();
    let text = std::fs::read_to_string(&log).expect("log file written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("Add log-a/eth0 ok"), "{text}");
    assert!(
        lines[1].contains("Error") && lines[1].contains("already"),
        "{text}"
    );
    assert!(lines[2].contains("Del log-a/eth0 ok"), "{text}");
    let bad = node.config(json!({"logFile": log, "logLevel": "chatty"}));
    assert_eq!(node.call("STATUS", "", None, &bad).error_code(), 7);
}

#[test]
fn an_add_right_after_del_keeps_its_veth() {
    // DEL leaves the old veth to a detached child; an ADD for the same
    // attachment straight after must not lose its new veth to that child.
    let node = Node::new(&[V4]);
    for round in 0..5 {
        let old = Netns::new("npr");
        node.add("reuse", &old);
        node.del("reuse", Some(&old));
        let new = Netns::new("npr");
        let r = node.add("reuse", &new);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            ping(&node.ns, &ip_of(&r, 0)),
            "round {round}: the new pod is reachable"
        );
        assert_eq!(
            node.host_veths().len(),
            1,
            "round {round}: {:?}",
            node.host_veths()
        );
        node.del("reuse", Some(&new));
    }
}
