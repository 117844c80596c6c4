//! Self-checks of the NetworkPolicy truth-table harness, with no policy
//! engine involved: the oracle against hand-computed tables, the scenarios'
//! well-formedness, and the prober on nine real pods wired by nodeplane-cni
//! (everything allowed; then drops made by hand with nft in the node
//! namespace, to show the prober sees denials and the report shows them).

use std::path::Path;
use std::time::Duration;

use nodeplane_tests::fixture::Node;
use nodeplane_tests::policy::matrix::{self, Cell, Matrix, Probe, Reachability, DEFAULT_PROBES};
use nodeplane_tests::policy::oracle::{
    self, allowed, cidr_contains, labels, selector_matches, Cluster, Direction, PodRef, Proto,
};
use nodeplane_tests::policy::scenarios::{self, parse_policies, Scenario};
use nodeplane_tests::policy::{probe, world::World};

fn cluster() -> Cluster {
    Cluster::xyz_synthetic()
}

fn scenario(c: &Cluster, name: &str) -> Scenario {
    scenarios::by_name(c, name).unwrap_or_else(|| panic!("no scenario {name}"))
}

fn r(s: &str) -> PodRef {
    PodRef::parse(s)
}

/// Asserts the expected table for `probe` equals a hand-written grid.
fn assert_grid(exp: &Reachability, probe: Probe, grid: &str) {
    let want = Matrix::from_grid(probe, exp.pods.clone(), grid);
    let got = exp.matrix(probe).expect("probe in table");
    assert_eq!(got, &want, "{probe}: oracle\n{got}\nhand-computed\n{want}");
}

const ALL: &str = "
    x/a | + + + + + + + + +
    x/b | + + + + + + + + +
    x/c | + + + + + + + + +
    y/a | + + + + + + + + +
    y/b | + + + + + + + + +
    y/c | + + + + + + + + +
    z/a | + + + + + + + + +
    z/b | + + + + + + + + +
    z/c | + + + + + + + + +
";

const ONLY_SELF: &str = "
    x/a | + - - - - - - - -
    x/b | - + - - - - - - -
    x/c | - - + - - - - - -
    y/a | - - - + - - - - -
    y/b | - - - - + - - - -
    y/c | - - - - - + - - -
    z/a | - - - - - - + - -
    z/b | - - - - - - - + -
    z/c | - - - - - - - - +
";

// ---------------------------------------------------------------------------
// (a) the oracle against hand-computed tables
// ---------------------------------------------------------------------------

#[test]
fn no_policies_allow_everything() {
    let c = cluster();
    let exp = scenario(&c, "no-policies").expected(&c);
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, ALL);
    }
}

#[test]
fn default_deny_ingress_leaves_only_self_into_x() {
    let c = cluster();
    let exp = scenario(&c, "default-deny-ingress").expected(&c);
    let grid = "
        x/a | + - - + + + + + +
        x/b | - + - + + + + + +
        x/c | - - + + + + + + +
        y/a | - - - + + + + + +
        y/b | - - - + + + + + +
        y/c | - - - + + + + + +
        z/a | - - - + + + + + +
        z/b | - - - + + + + + +
        z/c | - - - + + + + + +
    ";
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, grid);
    }
    // The implied-policyTypes and `ingress: []` forms mean the same.
    for name in [
        "default-deny-ingress-implied-types",
        "empty-ingress-list-denies",
    ] {
        assert_eq!(scenario(&c, name).expected(&c), exp, "{name}");
    }
}

#[test]
fn default_deny_everywhere_leaves_only_self() {
    let c = cluster();
    let exp = scenario(&c, "default-deny-all-namespaces").expected(&c);
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, ONLY_SELF);
    }
}

#[test]
fn default_deny_egress_stops_x_sending() {
    let c = cluster();
    let exp = scenario(&c, "default-deny-egress").expected(&c);
    let grid = "
        x/a | + - - - - - - - -
        x/b | - + - - - - - - -
        x/c | - - + - - - - - -
        y/a | + + + + + + + + +
        y/b | + + + + + + + + +
        y/c | + + + + + + + + +
        z/a | + + + + + + + + +
        z/b | + + + + + + + + +
        z/c | + + + + + + + + +
    ";
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, grid);
    }
}

#[test]
fn allow_all_rule_overrides_deny_all_by_union() {
    let c = cluster();
    let exp = scenario(&c, "allow-all-ingress-empty-rule").expected(&c);
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, ALL);
    }
}

#[test]
fn named_port_resolves_to_its_number_and_protocol() {
    let c = cluster();
    let exp = scenario(&c, "ingress-named-port-tcp").expected(&c);
    // serve-81-tcp: everything reaches x/a on 81/TCP, nothing else does.
    assert_grid(&exp, Probe::tcp(81), ALL);
    let only_self_into_xa = "
        x/a | + + + + + + + + +
        x/b | - + + + + + + + +
        x/c | - + + + + + + + +
        y/a | - + + + + + + + +
        y/b | - + + + + + + + +
        y/c | - + + + + + + + +
        z/a | - + + + + + + + +
        z/b | - + + + + + + + +
        z/c | - + + + + + + + +
    ";
    for p in [Probe::tcp(80), Probe::udp(80), Probe::udp(81)] {
        assert_grid(&exp, p, only_self_into_xa);
    }
    // A named port with the wrong protocol, or one no pod has, matches nothing.
    for name in [
        "ingress-named-port-protocol-mismatch",
        "ingress-named-port-missing",
    ] {
        let e = scenario(&c, name).expected(&c);
        for p in DEFAULT_PROBES {
            assert_grid(&e, p, only_self_into_xa);
        }
    }
}

#[test]
fn ip_block_except_cuts_out_one_pod() {
    let c = cluster();
    let exp = scenario(&c, "ingress-ip-block-except").expected(&c);
    let grid = "
        x/a | + + + + + + + + +
        x/b | + + + + + + + + +
        x/c | + + + + + + + + +
        y/a | + + + + + + + + +
        y/b | + + + + + + + + +
        y/c | + + + + + + + + +
        z/a | + + + + + + + + +
        z/b | + + + + + + + + +
        z/c | - - - + + + + + +
    ";
    for p in DEFAULT_PROBES {
        assert_grid(&exp, p, grid);
    }
    // The excepted pod is let back in by a selector peer of the same rule.
    let e = scenario(&c, "ingress-ip-block-or-selector").expected(&c);
    assert!(allowed(
        &c,
        &e_policies(&c, "ingress-ip-block-or-selector"),
        &r("y/a"),
        &r("x/a"),
        80,
        Proto::Tcp
    ));
    assert_eq!(
        e.matrix(Probe::tcp(80))
            .expect("80/TCP")
            .get(&r("z/b"), &r("x/a")),
        Cell::Denied
    );
}

fn e_policies(c: &Cluster, name: &str) -> Vec<k8s_openapi::api::networking::v1::NetworkPolicy> {
    scenario(c, name).policies
}

#[test]
fn sctp_only_policy_denies_tcp_and_udp() {
    let c = cluster();
    let s = scenario(&c, "ingress-sctp-only");
    let exp = s.expected(&c);
    let into_xa_only_sctp80 = |p: Probe| {
        let m = exp.matrix(p).expect("probe");
        m.get(&r("y/b"), &r("x/a"))
    };
    assert_eq!(into_xa_only_sctp80(Probe::sctp(80)), Cell::Allowed);
    for p in [
        Probe::sctp(81),
        Probe::tcp(80),
        Probe::tcp(81),
        Probe::udp(80),
        Probe::udp(81),
    ] {
        assert_eq!(into_xa_only_sctp80(p), Cell::Denied, "{p}");
    }
}

#[test]
fn peer_selector_combinations() {
    let c = cluster();
    let pol = |n: &str| e_policies(&c, n);
    let into_xa = |pols: &[_], from: &str| allowed(&c, pols, &r(from), &r("x/a"), 80, Proto::Tcp);

    // Both selectors in one peer: y/b only.
    let p = pol("ingress-from-pod-and-namespace-in-one-peer");
    let got: Vec<&str> = ["x/b", "y/a", "y/b", "z/b"]
        .into_iter()
        .filter(|f| into_xa(&p, f))
        .collect();
    assert_eq!(got, ["y/b"]);
    // Two peers: all of y, and b of x (the policy's namespace), not z/b.
    let p = pol("ingress-from-pod-or-namespace-two-peers");
    let got: Vec<&str> = ["x/b", "x/c", "y/a", "y/b", "y/c", "z/b"]
        .into_iter()
        .filter(|f| into_xa(&p, f))
        .collect();
    assert_eq!(got, ["x/b", "y/a", "y/b", "y/c"]);
    // NotIn on namespaces: all but y.
    let p = pol("ingress-deny-from-namespace-notin");
    assert!(into_xa(&p, "x/b") && into_xa(&p, "z/c") && !into_xa(&p, "y/a"));
}

#[test]
fn label_changes_move_pods_in_and_out() {
    let c = cluster();
    let s = scenario(&c, "ingress-allowed-by-pod-label-change");
    let before = s.expected_before_changes(&c);
    let after = s.expected(&c);
    let cell = |t: &Reachability, from: &str| {
        t.matrix(Probe::tcp(80))
            .expect("80/TCP")
            .get(&r(from), &r("x/a"))
    };
    assert_eq!(cell(&before, "y/c"), Cell::Denied);
    assert_eq!(cell(&after, "y/c"), Cell::Allowed);
    assert_eq!(cell(&after, "y/b"), Cell::Denied);

    let s = scenario(&c, "target-exists-after-pod-label-change");
    let after = s.expected(&c);
    let m = after.matrix(Probe::udp(81)).expect("81/UDP");
    assert_eq!(m.get(&r("x/a"), &r("y/b")), Cell::Denied);
    assert_eq!(m.get(&r("y/b"), &r("x/a")), Cell::Denied);
    assert_eq!(m.get(&r("y/b"), &r("y/b")), Cell::Allowed);
    assert_eq!(m.get(&r("x/a"), &r("y/c")), Cell::Allowed);
    assert_eq!(
        s.expected_before_changes(&c),
        matrix::expected(&c, &[], &s.probes)
    );
}

#[test]
fn selector_operators() {
    let sel = |yaml: &str| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        serde_saphyr::from_str(yaml).expect("selector yaml")
    };
    let with = labels(&[("pod", "a"), ("role", "client")]);
    let without = labels(&[("pod", "b")]);
    let notin = sel("matchExpressions: [{key: role, operator: NotIn, values: [server]}]");
    assert!(selector_matches(&notin, &with) && selector_matches(&notin, &without));
    let exists = sel("matchExpressions: [{key: role, operator: Exists}]");
    assert!(selector_matches(&exists, &with) && !selector_matches(&exists, &without));
    let dne = sel("matchExpressions: [{key: role, operator: DoesNotExist}]");
    assert!(!selector_matches(&dne, &with) && selector_matches(&dne, &without));
    let isin = sel("matchExpressions: [{key: pod, operator: In, values: [b, c]}]");
    assert!(!selector_matches(&isin, &with) && selector_matches(&isin, &without));
    let anded = sel("{matchLabels: {pod: a}, matchExpressions: [{key: role, operator: Exists}]}");
    assert!(selector_matches(&anded, &with));
    assert!(!selector_matches(
        &anded,
        &labels(&[("pod", "a"), ("other", "x")])
    ));
    assert!(selector_matches(&sel("{}"), &without));
}

#[test]
fn cidr_and_policy_type_rules() {
    let ip = |s: &str| s.parse().expect("ip");
    assert_eq!(cidr_contains("10.244.0.0/24", ip("10.244.0.7")), Some(true));
    assert_eq!(
        cidr_contains("10.244.0.7/32", ip("10.244.0.8")),
        Some(false)
    );
    assert_eq!(
        cidr_contains("10.244.0.9/24", ip("10.244.0.200")),
        Some(true)
    );
    assert_eq!(cidr_contains("0.0.0.0/0", ip("1.2.3.4")), Some(true));
    assert_eq!(cidr_contains("fd00::/8", ip("10.0.0.1")), Some(false));
    assert_eq!(cidr_contains("10.0.0.0/33", ip("10.0.0.1")), None);

    let types = |yaml: &str| {
        let p = parse_policies(&format!(
            "metadata: {{name: t, namespace: x}}\nspec:\n{yaml}"
        ));
        oracle::policy_types(&p[0])
    };
    assert_eq!(types("  podSelector: {}"), [Direction::Ingress]);
    assert_eq!(types("  egress: []"), [Direction::Ingress]);
    assert_eq!(
        types("  egress: [{}]"),
        [Direction::Ingress, Direction::Egress]
    );
    assert_eq!(
        types("  policyTypes: [Egress]\n  ingress: [{}]"),
        [Direction::Egress]
    );
    assert_eq!(
        types("  policyTypes: []\n  egress: [{}]"),
        [Direction::Ingress, Direction::Egress]
    );
}

#[test]
fn validation_rejects_what_the_apiserver_would() {
    let bad = [
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{from: [{}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{ports: [{port: serve-80-tcp, endPort: 90}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{ports: [{port: 81, endPort: 80}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {ingress: [{ports: [{protocol: tcp}]}]}}",
        "{metadata: {name: a, namespace: x}, spec: {podSelector: {matchExpressions: [{key: k, operator: In}]}}}",
        "{metadata: {name: a}, spec: {}}",
    ];
    for y in bad {
        let p: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_saphyr::from_str(y).expect("yaml");
        assert!(oracle::validate(&p).is_err(), "accepted: {y}");
    }
}

#[test]
fn scenarios_are_many_distinct_and_well_formed() {
    let c = cluster();
    let all = scenarios::all(&c);
    assert!(all.len() >= 45, "only {} scenarios", all.len());
    let mut names: Vec<&str> = all.iter().map(|s| s.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all.len(), "duplicate scenario names");
    let everything = matrix::expected(&c, &[], &DEFAULT_PROBES);
    for s in &all {
        // The YAML re-parses to the same policies (it is what a user applies).
        assert_eq!(parse_policies_or_empty(&s.yaml), s.policies, "{}", s.name);
        let exp = s.expected(&c);
        // Every probed pair is decided, and a pod always reaches itself.
        for m in &exp.matrices {
            assert_eq!(m.count(Cell::NotProbed), 0, "{}", s.name);
            for p in c.pod_refs() {
                assert_eq!(m.get(&p, &p), Cell::Allowed, "{}: {p} to itself", s.name);
            }
        }
        // Apart from the baseline, every scenario denies something we probe.
        let probed: Vec<Probe> = s
            .probes
            .iter()
            .copied()
            .filter(|p| p.proto != Proto::Sctp)
            .collect();
        let exp_probed = matrix::expected(&s.cluster_after(&c), &s.policies, &probed);
        let all_probed = matrix::expected(&c, &[], &probed);
        // These must allow everything (an engine must not over-deny); every
        // other scenario denies something on TCP/UDP.
        let allow_everything = [
            "no-policies",
            "allow-all-ingress-empty-rule",
            "allow-all-egress-empty-rule",
            "ingress-from-all-namespaces",
            "target-labels-and-expressions-are-anded",
        ];
        assert_eq!(
            exp_probed == all_probed,
            allow_everything.contains(&s.name),
            "{}: denies {}",
            s.name,
            if exp_probed == all_probed {
                "nothing"
            } else {
                "something"
            }
        );
    }
    assert_eq!(
        scenario(&c, "no-policies").expected(&c),
        everything,
        "baseline"
    );
    // Report the coverage in the test log.
    for s in &all {
        eprintln!("{:<48} {}", s.name, s.covers);
    }
}

fn parse_policies_or_empty(yaml: &str) -> Vec<k8s_openapi::api::networking::v1::NetworkPolicy> {
    if yaml.trim().is_empty() {
        Vec::new()
    } else {
        parse_policies(yaml)
    }
}

#[test]
fn compare_reports_each_kind_of_difference() {
    let c = cluster();
    let exp = scenario(&c, "default-deny-ingress").expected(&c);
    let mut obs = exp.clone();
    assert_eq!(exp.compare(&obs), Ok(()));
    let m = obs.matrix_mut(Probe::tcp(80)).expect("80/TCP");
    m.set(&r("y/a"), &r("x/b"), Cell::Allowed); // expected denied
    m.set(&r("z/c"), &r("y/a"), Cell::Denied); // expected allowed
    let rep = exp.compare(&obs).expect_err("must differ");
    assert_eq!(rep.mismatches, 2);
    let text = rep.to_string();
    assert!(
        text.contains("y/a -> x/b 80/TCP: expected denied, observed allowed"),
        "{text}"
    );
    assert!(
        text.contains("z/c -> y/a 80/TCP: expected allowed, observed denied"),
        "{text}"
    );
    assert!(text.contains('!') && text.contains('X'), "{text}");
    eprintln!("{text}");
    // Not-probed cells are never compared.
    let mut obs = exp.clone();
    for m in &mut obs.matrices {
        for f in c.pod_refs() {
            for t in c.pod_refs() {
                m.set(&f, &t, Cell::NotProbed);
            }
        }
    }
    assert_eq!(exp.compare(&obs), Ok(()));
}

// ---------------------------------------------------------------------------
// (b) the prober on real pods, with no policy engine
// ---------------------------------------------------------------------------

/// Adds nft rules to a forward chain of the node namespace (a stand-in for a
/// policy engine, to show the prober sees drops).
fn node_drop(node: &Node, rules: &[String]) {
    nodeplane_tests::require_tool("nft", "nftables");
    let mut script = String::from(
        "add table inet nptest\ndelete table inet nptest\ntable inet nptest {\n chain npfwd {\n  type filter hook forward priority 0; policy accept;\n",
    );
    for r in rules {
        script.push_str(&format!("  {r}\n"));
    }
    script.push_str(" }\n}\n");
    let out = node.ns.sh(&format!("nft -f - <<'EOF'\n{script}EOF"));
    assert!(
        out.status.success(),
        "nft failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prober_matches_the_oracle_on_real_pods() {
    let server = Path::new(env!("CARGO_BIN_EXE_np-probe-server"));
    let mut node = Node::new(&["10.244.0.0/24"]);
    // This test checks the prober against drops written by hand into the
    // node's forward chain. Same-node TCP on the fast path never reaches that
    // chain (only the agent's policy decides it), so these pods take the
    // routed path, where every packet meets the hand-made rules.
    node.base["fastPath"] = serde_json::Value::Bool(false);
    let mut world = World::on_node(&node);
    world.start_servers(server);
    let pods = world.probe_pods();
    for p in &pods {
        assert!(p.ip.to_string().starts_with("10.244.0."), "{p:?}");
    }
    let c = world.cluster.clone();

    // 1. No policy engine: everything is reachable, as the oracle says.
    let s = scenario(&c, "no-policies");
    let expected = s.expected(&c);
    let observed = probe::observe(&pods, &s.probes);
    let t_all = observed.elapsed.expect("elapsed");
    eprintln!("all allowed: 9x9x{} probes in {t_all:?}", s.probes.len());
    if let Err(report) = expected.compare(&observed) {
        panic!("harness disagrees with itself:\n{report}");
    }
    assert!(t_all < Duration::from_secs(2), "took {t_all:?}");

    // 2. A hand-made partial drop: TCP 80 and UDP 81 into x/a. The prober
    //    sees exactly those cells, and the comparison with "everything
    //    allowed" reports them as X.
    let xa = world.cluster.pod(&r("x/a")).ip;
    node_drop(
        &node,
        &[
            format!("ip daddr {xa} tcp dport 80 drop"),
            format!("ip daddr {xa} udp dport 81 drop"),
        ],
    );
    let observed = probe::observe(&pods, &DEFAULT_PROBES);
    eprintln!("partial drop: {:?}", observed.elapsed.expect("elapsed"));
    let report = expected.compare(&observed).expect_err("drops must show");
    assert_eq!(report.mismatches, 2 * 8, "{report}");
    let col = |p: Probe| {
        let m = observed.matrix(p).expect("probe");
        c.pod_refs()
            .iter()
            .filter(|f| m.get(f, &r("x/a")) == Cell::Denied)
            .count()
    };
    assert_eq!(col(Probe::tcp(80)), 8, "{report}");
    assert_eq!(col(Probe::udp(81)), 8, "{report}");
    assert_eq!(col(Probe::tcp(81)), 0, "{report}");
    assert_eq!(col(Probe::udp(80)), 0, "{report}");
    eprintln!("{report}");

    // 3. Drop all forwarded traffic: only a pod to itself gets through, and
    //    that matches the oracle's deny-everything scenario.
    node_drop(&node, &["drop".to_string()]);
    let s = scenario(&c, "default-deny-all-namespaces");
    let observed = probe::observe(&pods, &s.probes);
    let t_none = observed.elapsed.expect("elapsed");
    eprintln!("all denied: 9x9x{} probes in {t_none:?}", s.probes.len());
    if let Err(report) = s.expected(&c).compare(&observed) {
        panic!("drop-all disagrees with deny-all:\n{report}");
    }
    assert!(t_none < Duration::from_millis(1500), "took {t_none:?}");

    // 4. Back to open: the servers are still there and reachable.
    node_drop(&node, &[]);
    let observed = probe::observe(&pods, &DEFAULT_PROBES);
    if let Err(report) = expected.compare(&observed) {
        panic!("after removing the drops:\n{report}");
    }

    // 5. SCTP is reported as not probed, never as a difference.
    let observed = probe::observe(&pods, &[Probe::sctp(80), Probe::tcp(80)]);
    let m = observed.matrix(Probe::sctp(80)).expect("sctp");
    assert_eq!(m.count(Cell::NotProbed), 81);
    let exp = matrix::expected(&c, &[], &[Probe::sctp(80), Probe::tcp(80)]);
    assert_eq!(exp.compare(&observed), Ok(()));
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    // The standard world gives every pod the same port names, so only a
    // custom cluster can tell source from destination resolution: here y/b
    // calls 81/TCP "web" and x/a calls 80/TCP "web".
    use nodeplane_tests::policy::oracle::NamedPort;
    let mut c = cluster();
    for (pod, port) in [("y/b", 81), ("x/a", 80)] {
        let p = c
            .pods
            .iter_mut()
            .find(|p| p.pod_ref() == r(pod))
            .expect("pod");
        p.ports.push(NamedPort {
            name: "web".into(),
            port,
            proto: Proto::Tcp,
        });
    }
    let egress = parse_policies(
        "metadata: {name: e, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{ports: [{port: web}]}]",
    );
    // From x/a: "web" is y/b's 81, not x/a's own 80; other pods have no "web".
    assert!(allowed(&c, &egress, &r("x/a"), &r("y/b"), 81, Proto::Tcp));
    assert!(!allowed(&c, &egress, &r("x/a"), &r("y/b"), 80, Proto::Tcp));
    assert!(!allowed(&c, &egress, &r("x/a"), &r("y/c"), 80, Proto::Tcp));
    let ingress = parse_policies(
        "metadata: {name: i, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: web}]}]",
    );
    // Into x/a: "web" is x/a's own 80, whoever the source is.
    assert!(allowed(&c, &ingress, &r("y/b"), &r("x/a"), 80, Proto::Tcp));
    assert!(!allowed(&c, &ingress, &r("y/b"), &r("x/a"), 81, Proto::Tcp));
}
