//! Concurrency and crash safety of nodeplane-cni's IPAM and wiring: parallel
//! ADDs never share an address, and kill -9 at any instant leaks nothing that
//! GC (or a repeated DEL) does not reclaim.

use std::collections::HashSet;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use nodeplane_tests::fixture::{ip_of, ping, Node};
use nodeplane_tests::{CniCall, Netns};
use serde_json::json;

#[test]
fn fifty_concurrent_adds_get_fifty_distinct_reachable_addresses() {
    let node = Node::new(&["10.244.0.0/24", "fd00:10:244::/64"]);
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("npc")).collect();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || node.add(&format!("conc-{i}"), p))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let v4: HashSet<String> = results.iter().map(|r| ip_of(r, 0)).collect();
    let v6: HashSet<String> = results.iter().map(|r| ip_of(r, 1)).collect();
    assert_eq!(v4.len(), 50, "distinct IPv4 addresses");
    assert_eq!(v6.len(), 50, "distinct IPv6 addresses");
    assert_eq!(node.state_files("ips").len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert!(ping(&node.ns, &ip_of(r, 0)), "pod {i} reachable over IPv4");
    }
    assert!(
        ping(&pods[0], &ip_of(&results[49], 1)),
        "pod to pod over IPv6"
    );

    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let node = &node;
            s.spawn(move || node.del(&format!("conc-{i}"), Some(p)));
        }
    });
    assert!(node.state_files("ips").is_empty());
    assert!(node.wait_no_veths().is_empty());
}

/// Starts an ADD and SIGKILLs it after `delay`, wherever it is.
fn killed_add(node: &Node, cid: &str, pod: &Netns, delay: Duration) {
    let config = node.config(json!({}));
    let path = pod.path();
    let call = CniCall {
        command: "ADD",
        container_id: cid,
        netns: Some(&path),
        ifname: "eth0",
        args: "",
        config: &config,
    };
    let mut child = node
        .plugin
        .command(&node.ns, &call)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // The plugin reads all of stdin before doing anything; write it first so
    // the kill lands inside the work, not while it waits for input.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes());
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sigkill_during_add_then_gc_leaks_nothing() {
    let node = Node::new(&["10.244.0.0/24", "fd00:10:244::/64"]);
    let keeper = Netns::new("npk");
    let kept = node.add("keeper", &keeper);
    // Sweep the kill across the whole ADD (a few hundred µs to a few ms).
    for step in 0..40u64 {
        let pod = Netns::new("npk");
        killed_add(
            &node,
            &format!("victim-{step}"),
            &pod,
            Duration::from_micros(step * 150),
        );
    }
    node.gc(&["keeper"]).expect_ok();
    assert_eq!(
        node.state_files("attachments"),
        vec!["keeper:eth0".to_string()]
    );
    assert_eq!(
        node.state_files("ips").len(),
        2,
        "{:?}",
        node.state_files("ips")
    );
    assert_eq!(node.host_veths().len(), 1, "{:?}", node.host_veths());
    assert!(
        ping(&node.ns, &ip_of(&kept, 0)),
        "the live pod is untouched"
    );

    // The pool is whole again: every address can be handed out once more.
    let pod = Netns::new("npk");
    let r = node.add("after", &pod);
    assert!(!node.state_files("ips").is_empty());
    node.del("after", Some(&pod));
    node.del("keeper", Some(&keeper));
    let _ = r;
}

#[test]
fn sigkill_during_add_then_del_releases_the_address() {
    // The runtime's path (DEL after a failed ADD) must clean up as well as GC.
    let node = Node::new(&["10.244.1.0/24"]);
    for step in 0..20u64 {
        let pod = Netns::new("npd");
        let cid = format!("d-{step}");
        killed_add(&node, &cid, &pod, Duration::from_micros(step * 200));
        node.del(&cid, Some(&pod));
    }
    assert!(
        node.state_files("ips").is_empty(),
        "{:?}",
        node.state_files("ips")
    );
    assert!(node.state_files("attachments").is_empty());
    assert!(node.wait_no_veths().is_empty());
}
