//! The agent's element updates over netlink (nodeplane_agent::nftnl) leave
//! the kernel exactly as `nft -f` of the full table would: a table is built
//! in one namespace, changed by netlink deltas step by step, and compared
//! map by map with a table written from scratch in another namespace.
//! Groups may live in different chains in the two (spare chains are
//! reused, see `nft::Slots`), so maps and jumps are compared by group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use nodeplane_agent::compiler::Compiler;
use nodeplane_agent::model::{Attachment, Model};
use nodeplane_agent::nft::{self, Existing, FailMode, Settings, Slots};
use nodeplane_agent::policy::Compiled;
use nodeplane_agent::source::manifests::parse_objects;
use nodeplane_agent::source::Event;
use nodeplane_tests::agent::in_netns;
use nodeplane_tests::{require_root, require_tool, Netns};

const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {tier: front}}}]
    ports: [{port: 80}, {port: 8080, endPort: 8090}, {protocol: UDP, port: 53}]
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16]}}]
  - from: [{namespaceSelector: {matchLabels: {team: a}}}]
    ports: [{port: http}]
---
kind: NetworkPolicy
metadata: {name: out, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {tier: front}}}]
  - to: [{ipBlock: {cidr: "fd00::/8"}}]
    ports: [{port: 443}]
"#;

fn pod(name: &str, ip: &str, labels: &str) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\n\
         spec: {{containers: [{{name: c, image: i, ports: [{{name: http, containerPort: 8000}}]}}]}}\n\
         status: {{podIPs: [{{ip: \"{ip}\"}}]}}\n"
    )
}

fn apply_yaml(m: &mut Model, yaml: &str) {
    for obj in parse_objects(yaml).expect("yaml") {
        m.apply(Event::Apply(obj));
    }
}

fn attach(m: &mut Model, name: &str, ip: &str) {
    let ip: IpAddr = ip.parse().expect("ip");
    m.attachments.insert(
        ("net".into(), name.into(), "eth0".into()),
        Attachment {
            network: "net".into(),
            container_id: name.into(),
            ifname: "eth0".into(),
            pod: Some(("x".into(), name.into())),
            host_ifname: format!("np{name}"),
            ips: vec![ip],
        },
    );
}

/// Every set and map of the table with its elements (as nft prints them).
fn contents(ns: &Netns) -> BTreeMap<String, BTreeSet<String>> {
    let out = ns
        .command("nft")
        .args(["-j", "list", "table", "inet", "nptest"])
        .output()
        .expect("nft list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut m = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for kind in ["set", "map"] {
            if let Some(s) = item.get(kind) {
                let elems = s["elem"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e.to_string())
                    .collect();
                m.insert(s["name"].as_str().unwrap_or("").to_string(), elems);
            }
        }
    }
    m
}

/// `contents` with group chains named by the group they hold; spare
/// chains' maps must be empty and are left out.
fn by_group(
    c: BTreeMap<String, BTreeSet<String>>,
    compiled: &Compiled,
    slots: &Slots,
    step: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let group_of: HashMap<String, String> = compiled
        .groups
        .keys()
        .map(|id| (slots.chain(id).to_string(), id.clone()))
        .collect();
    let rename = |e: &String| {
        let mut e = e.clone();
        for (chain, id) in &group_of {
            e = e.replace(
                &format!("\"target\":\"{chain}\""),
                &format!("\"target\":\"{id}\""),
            );
        }
        e
    };
    let mut out = BTreeMap::new();
    for (name, elems) in c {
        let (chain, shape) = name.rsplit_once('_').unwrap_or((&name, ""));
        let elems: BTreeSet<String> = elems.iter().map(rename).collect();
        if let Some(id) = group_of.get(chain) {
            out.insert(format!("{id}_{shape}"), elems);
        } else if slots.is_spare(chain) {
            assert!(
                elems.is_empty(),
                "step {step}: spare map {name} holds {elems:?}"
            );
        } else {
            out.insert(name, elems);
        }
    }
    out
}

#[test]
fn netlink_deltas_match_a_table_written_from_scratch() {
    // With spare chains: every step, new groups included, is elements only.
    let (netlink_steps, phased) = run_steps(nft::SPARE_GROUPS, true);
    assert_eq!(phased, 0, "with spares no step needs structure");
    assert_eq!(netlink_steps, 8, "every step goes over netlink");
}

#[test]
fn without_spare_chains_new_groups_are_created_around_the_elements() {
    // Spares beyond the wanted 0 are deleted after each step, so the group
    // that comes back in the last step is created with `nft -f`.
    let (netlink_steps, phased) = run_steps(0, true);
    assert!(
        netlink_steps >= 3,
        "only {netlink_steps} steps went over netlink"
    );
    assert!(phased >= 1, "no step had structure around its elements");
}

/// Runs the steps; returns (steps applied over netlink alone, steps with
/// structure around their elements). `spares` chains are kept per
/// direction; with `replenish` they are topped up after each step, as the
/// agent does.
fn run_steps(spares: usize, replenish: bool) -> (usize, usize) {
    require_root();
    require_tool("nft", "nftables");
    let settings = Settings {
        table: "nptest".into(),
        iface_prefix: "np".into(),
        fail_mode: FailMode::Isolate,
        pod_cidrs: vec!["10.244.0.0/24".parse().expect("cidr")],
        runtime: None,
    };
    let mut m = Model::new("n");
    apply_yaml(
        &mut m,
        "kind: Namespace\nmetadata: {name: x, labels: {team: a}}\n",
    );
    apply_yaml(&mut m, POLICIES);
    for (i, tier) in ["front", "back", "front", "back", "front"]
        .iter()
        .enumerate()
    {
        let name = format!("p{i}");
        let ip = format!("10.244.0.{}", 10 + i);
        apply_yaml(&mut m, &pod(&name, &ip, &format!("app: web, tier: {tier}")));
        if i < 3 {
            attach(&mut m, &name, &ip);
        }
    }
    let mut compiler = Compiler::default();
    let mut prev = compiler.compile(&m, Some(m.clone().take_changes()));
    let _ = m.take_changes();

    let live = Netns::new("npnl");
    let s = settings.clone();
    let mut slots = Slots::new(spares);
    let first = nft::full(&s, &Existing::default(), &prev, &mut slots);
    in_netns(&live.path(), move || nft::apply(&first)).expect("full table");

    // Peer changes: a remote pod leaves tier=front, one joins, one's
    // address changes: the groups keep their names, only elements change.
    let steps = [
        pod("p3", "10.244.0.13", "app: web, tier: front"),
        pod("p4", "10.244.0.14", "app: web, tier: back"),
        pod("p4", "10.244.0.24", "app: web, tier: front"),
        pod("p3", "10.244.0.13", "app: web, tier: back"),
        // Local pods leave the web policy one by one (the last takes its
        // group with it), then one comes back (a new group is created):
        // structure around element changes, applied in three runs.
        pod("p0", "10.244.0.10", "app: db, tier: front"),
        pod("p1", "10.244.0.11", "app: db, tier: back"),
        pod("p2", "10.244.0.12", "app: db, tier: front"),
        pod("p1", "10.244.0.11", "app: web, tier: back"),
    ];
    let (mut netlink_steps, mut phased, mut retiring) = (0, 0, 0);
    for (n, yaml) in steps.iter().enumerate() {
        apply_yaml(&mut m, yaml);
        let changes = m.take_changes();
        let next = compiler.compile(&m, Some(changes));
        let delta = nft::delta(&settings, &prev, &next, &mut slots);
        // A removed group's chain is only retired by the change: emptying
        // it is the clean-up's (replenish), off the change's path.
        for step in &delta.steps {
            if let nft::Step::Elements {
                add: false, set, ..
            } = step
            {
                let chain = set.rsplit_once('_').map_or(set.as_str(), |(c, _)| c);
                assert!(
                    !slots.is_retired(chain),
                    "step {n}: the change itself empties retired chain {chain}"
                );
            }
        }
        retiring += usize::from(prev.groups.keys().any(|id| !next.groups.contains_key(id)));
        if delta.elements_only() {
            netlink_steps += 1;
            in_netns(&live.path(), move || nodeplane_agent::nftnl::apply(&delta))
                .unwrap_or_else(|e| panic!("step {n}: netlink refused the delta: {e}"));
        } else {
            if delta.phases().is_some() {
                phased += 1;
            }
            in_netns(&live.path(), move || nft::apply_script(&delta))
                .unwrap_or_else(|e| panic!("step {n}: the delta was refused: {e}"));
        }
        if replenish {
            if let Some((script, topped)) = nft::replenish(&settings, &slots) {
                in_netns(&live.path(), move || nft::apply_script(&script))
                    .unwrap_or_else(|e| panic!("step {n}: spares refused: {e}"));
                slots = topped;
            }
            let (i, e) = slots.spares();
            assert!(i >= spares && e >= spares, "step {n}: spares {i}/{e}");
            assert!(
                slots.chains_retired() == 0,
                "step {n}: retired chains left after the clean-up"
            );
        }
        let scratch = Netns::new("npnf");
        let mut fresh = Slots::new(spares);
        let full = nft::full(&settings, &Existing::default(), &next, &mut fresh);
        in_netns(&scratch.path(), move || nft::apply(&full)).expect("scratch table");
        assert_eq!(
            by_group(contents(&live), &next, &slots, n),
            by_group(contents(&scratch), &next, &fresh, n),
            "step {n}: the table updated in place differs from one written from scratch"
        );
        prev = next;
    }
    assert!(retiring >= 1, "no step removed a group");
    (netlink_steps, phased)
}
