//! The NetworkPolicy truth table, in the manner of the Kubernetes e2e
//! suite: nine pods (x, y, z × a, b, c) wired by nodeplane-cni on one node,
//! nodeplane-agent enforcing every scenario of `policy::scenarios` from a
//! manifests directory, and for each scenario the observed 9×9 matrix per
//! port and protocol compared with the one the independent oracle computes.
//! A scenario with label changes is probed before and after them, so the
//! agent must react to the change itself.

use nodeplane_tests::agent::Agent;
use nodeplane_tests::fixture::{ip_of, Node};
use nodeplane_tests::policy::oracle::Cluster;
use nodeplane_tests::policy::world::{container_id, World};
use nodeplane_tests::policy::{probe, scenarios};
use serde_json::json;

const CIDR: &str = "10.244.0.0/24";
const NODE: &str = "node-1";

/// The namespaces and pods of `cluster` as one JSON List manifest.
fn cluster_manifest(cluster: &Cluster) -> String {
    let mut items: Vec<serde_json::Value> = Vec::new();
    for ns in cluster.k8s_namespaces() {
        let mut v = serde_json::to_value(&ns).expect("namespace json");
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Namespace");
        items.push(v);
    }
    for pod in cluster.k8s_pods(NODE) {
        let mut v = serde_json::to_value(&pod).expect("pod json");
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Pod");
        items.push(v);
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

#[test]
fn every_scenario_matches_the_oracle() {
    nodeplane_tests::prereq::require_root();
    let mut node = Node::new(&[CIDR]);
    let agent = Agent::start(&mut node, &[CIDR], &["--node-name", NODE]);
    let mut world = World::create(|r, ns| {
        let res = node.add_pod(&container_id(r), ns, &r.namespace, &r.name);
        ip_of(&res, 0)
            .split('/')
            .next()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("pod {r}: no IPv4 address in {res}"))
    });
    world.start_servers(std::path::Path::new(env!("CARGO_BIN_EXE_np-probe-server")));
    let base = world.cluster.clone();
    let all = scenarios::all(&base);
    assert!(all.len() >= 40, "only {} scenarios", all.len());
    let mut failures = Vec::new();
    for s in &all {
        eprintln!("scenario {}", s.name);
        let policies = ("policies.yaml", s.yaml.clone());
        agent.apply(&[("cluster.json", cluster_manifest(&base)), policies.clone()]);
        if !s.changes.is_empty() {
            let observed = probe::observe(&world.probe_pods(), &s.probes);
            if let Err(report) = s.expected_before_changes(&base).compare(&observed) {
                failures.push(format!(
                    "scenario {} (before its label changes):\n{report}",
                    s.name
                ));
            }
            agent.apply(&[
                ("cluster.json", cluster_manifest(&s.cluster_after(&base))),
                policies,
            ]);
        }
        let observed = probe::observe(&world.probe_pods(), &s.probes);
        if let Err(report) = s.expected(&base).compare(&observed) {
            failures.push(format!("scenario {} ({}):\n{report}", s.name, s.covers));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ from the oracle:\n\n{}\n\nagent ruleset:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n"),
        agent.ruleset(&node.ns)
    );
}
