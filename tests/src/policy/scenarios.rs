//! NetworkPolicy scenarios in the manner of the Kubernetes e2e suite
//! (test/e2e/network/netpol): namespaces x, y, z; pods a, b, c in each,
//! labelled `pod=<name>`; namespaces labelled `ns=<name>`; every pod serving
//! the six named ports `serve-{80,81}-{tcp,udp,sctp}`.
//!
//! Each scenario is policies (YAML, as a user would write them), optional
//! label changes to make before probing, and the probes to run. Scenarios
//! are built from a [`Cluster`] because some need its facts (pod IPs for
//! ipBlock).

use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::matrix::{self, Probe, Reachability, DEFAULT_PROBES};
use super::oracle::{self, Cluster, PodRef};

/// A label change made before probing (after the policies are applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Set (`Some`) or remove (`None`) label `key` on a pod.
    PodLabel {
        pod: PodRef,
        key: String,
        value: Option<String>,
    },
    /// Set (`Some`) or remove (`None`) label `key` on a namespace.
    NamespaceLabel {
        namespace: String,
        key: String,
        value: Option<String>,
    },
}

impl Change {
    pub fn apply(&self, c: &mut Cluster) {
        match self {
            Change::PodLabel { pod, key, value } => c.set_pod_label(pod, key, value.as_deref()),
            Change::NamespaceLabel {
                namespace,
                key,
                value,
            } => c.set_namespace_label(namespace, key, value.as_deref()),
        }
    }
}

/// One truth-table case.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique, kebab-case.
    pub name: &'static str,
    /// What the scenario exercises, in a few words.
    pub covers: &'static str,
    /// The policies as YAML (documents separated by `---`), ready for a
    /// manifests directory or `kubectl apply`.
    pub yaml: String,
    /// The same policies, parsed.
    pub policies: Vec<NetworkPolicy>,
    /// Label changes to apply after the policies, before probing.
    pub changes: Vec<Change>,
    /// What to probe. SCTP probes are computed but not observed.
    pub probes: Vec<Probe>,
}

impl Scenario {
    /// The cluster as it is when probing: `base` with [`Scenario::changes`].
    pub fn cluster_after(&self, base: &Cluster) -> Cluster {
        let mut c = base.clone();
        for ch in &self.changes {
            ch.apply(&mut c);
        }
        c
    }

    /// The expected truth tables on `base` after the changes.
    pub fn expected(&self, base: &Cluster) -> Reachability {
        matrix::expected(&self.cluster_after(base), &self.policies, &self.probes)
    }

    /// The expected truth tables on `base` before the changes (for checking
    /// that an engine reacts to the label change, not just to the end state).
    pub fn expected_before_changes(&self, base: &Cluster) -> Reachability {
        matrix::expected(base, &self.policies, &self.probes)
    }

    fn probes(mut self, probes: &[Probe]) -> Scenario {
        self.probes = probes.to_vec();
        self
    }

    fn pod_label(mut self, pod: &str, key: &str, value: &str) -> Scenario {
        self.changes.push(Change::PodLabel {
            pod: PodRef::parse(pod),
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    fn ns_label(mut self, ns: &str, key: &str, value: &str) -> Scenario {
        self.changes.push(Change::NamespaceLabel {
            namespace: ns.into(),
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }
}

/// Parses YAML policies (one or more documents) and validates each with
/// [`oracle::validate`]; panics with the problem otherwise.
pub fn parse_policies(yaml: &str) -> Vec<NetworkPolicy> {
    let docs: Vec<NetworkPolicy> = serde_saphyr::from_multiple(yaml)
        .unwrap_or_else(|e| panic!("policy YAML does not parse: {e}\n{yaml}"));
    for p in &docs {
        if let Err(errs) = oracle::validate(p) {
            panic!("invalid policy: {}\n{yaml}", errs.join("; "));
        }
    }
    docs
}

/// One policy document: `spec` is the YAML body of `spec:` (any common
/// indentation is removed).
fn np(ns: &str, name: &str, spec: &str) -> String {
    let mut out = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
    );
    let lines: Vec<&str> = spec.lines().filter(|l| !l.trim().is_empty()).collect();
    let indent = lines
        .iter()
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    for l in lines {
        out.push_str("  ");
        out.push_str(&l[indent..]);
        out.push('\n');
    }
    out
}

fn sc(name: &'static str, covers: &'static str, docs: &[String]) -> Scenario {
    let yaml = docs.join("---\n");
    let policies = if docs.is_empty() {
        Vec::new()
    } else {
        parse_policies(&yaml)
    };
    Scenario {
        name,
        covers,
        yaml,
        policies,
        changes: Vec::new(),
        probes: DEFAULT_PROBES.to_vec(),
    }
}

/// The scenario called `name`, if any.
pub fn by_name(cluster: &Cluster, name: &str) -> Option<Scenario> {
    all(cluster).into_iter().find(|s| s.name == name)
}

/// Every scenario, for a cluster of the x/y/z world.
pub fn all(c: &Cluster) -> Vec<Scenario> {
    let ip = |p: &str| -> Ipv4Addr { c.pod(&PodRef::parse(p)).ip };
    let host = |p: &str| format!("{}/32", ip(p));
    // The /24 holding the pods (all nine share it: 10.244.0.0/24 on our nodes).
    let o = ip("x/a").octets();
    let pod_cidr = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let all_probes_sctp = [
        Probe::tcp(80),
        Probe::tcp(81),
        Probe::udp(80),
        Probe::udp(81),
        Probe::sctp(80),
        Probe::sctp(81),
    ];

    vec![
        // ---- No policy, deny-alls, policyTypes ---------------------------
        sc("no-policies", "no policy: everything allowed", &[]),
        sc(
            "default-deny-ingress",
            "podSelector {} + policyTypes [Ingress]",
            &[np("x", "deny-ingress", "
                podSelector: {}
                policyTypes: [Ingress]
            ")],
        ),
        sc(
            "default-deny-ingress-implied-types",
            "policyTypes unset, no ingress: implied [Ingress], deny",
            &[np("x", "deny-ingress", "
                podSelector: {}
            ")],
        ),
        sc(
            "empty-ingress-list-denies",
            "ingress: [] is no rule: deny",
            &[np("x", "deny-ingress", "
                podSelector: {}
                ingress: []
            ")],
        ),
        sc(
            "default-deny-egress",
            "policyTypes [Egress], no egress rules: egress deny",
            &[np("x", "deny-egress", "
                podSelector: {}
                policyTypes: [Egress]
            ")],
        ),
        sc(
            "default-deny-both",
            "policyTypes [Ingress, Egress], no rules",
            &[np("x", "deny-all", "
                podSelector: {}
                policyTypes: [Ingress, Egress]
            ")],
        ),
        sc(
            "default-deny-all-namespaces",
            "deny-all in x, y and z: only a pod to itself",
            &["x", "y", "z"].map(|ns| {
                np(ns, "deny-all", "
                    podSelector: {}
                    policyTypes: [Ingress, Egress]
                ")
            }),
        ),
        sc(
            "allow-all-ingress-empty-rule",
            "ingress: [{}] allows all; union with a deny-all",
            &[
                np("x", "deny-ingress", "
                    podSelector: {}
                    policyTypes: [Ingress]
                "),
                np("x", "allow-all", "
                    podSelector: {}
                    ingress:
                    - {}
                "),
            ],
        ),
        sc(
            "allow-all-egress-empty-rule",
            "egress: [{}] with policyTypes [Egress] allows all",
            &[np("x", "allow-all-egress", "
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - {}
            ")],
        ),
        sc(
            "implied-egress-type-from-egress-rules",
            "policyTypes unset + egress rules: implied [Ingress, Egress]",
            &[np("x", "a-egress-to-y", "
                podSelector:
                  matchLabels: {pod: a}
                egress:
                - to:
                  - namespaceSelector:
                      matchLabels: {ns: y}
            ")],
        ),
        sc(
            "empty-egress-list-does-not-imply-egress",
            "policyTypes unset + egress: [] defaults to [Ingress] only (apiserver: len(egress) != 0)",
            &[np("x", "empty-egress", "
                podSelector: {}
                egress: []
            ")],
        ),
        sc(
            "policy-types-egress-ignores-ingress-rules",
            "policyTypes [Egress]: ingress rules are not in force",
            &[np("x", "egress-only", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Egress]
                ingress:
                - from:
                  - podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "policy-types-ingress-ignores-egress-rules",
            "policyTypes [Ingress]: egress rules are not in force",
            &[np("x", "ingress-only", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Ingress]
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                egress:
                - to:
                  - podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "ingress-and-egress-in-one-policy",
            "policyTypes [Ingress, Egress] with rules for both",
            &[np("x", "a-both", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Ingress, Egress]
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                egress:
                - to:
                  - namespaceSelector:
                      matchLabels: {ns: z}
            ")],
        ),
        // ---- Which pods a policy selects ---------------------------------
        sc(
            "target-pod-match-labels",
            "spec.podSelector matchLabels isolates one pod",
            &[np("x", "deny-a", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Ingress]
            ")],
        ),
        sc(
            "target-match-expressions-in",
            "spec.podSelector matchExpressions In",
            &[np("x", "deny-a-b", "
                podSelector:
                  matchExpressions:
                  - {key: pod, operator: In, values: [a, b]}
                policyTypes: [Ingress]
            ")],
        ),
        sc(
            "target-match-expressions-notin",
            "spec.podSelector matchExpressions NotIn",
            &[np("x", "deny-not-a", "
                podSelector:
                  matchExpressions:
                  - {key: pod, operator: NotIn, values: [a]}
                policyTypes: [Ingress]
            ")],
        ),
        sc(
            "target-exists-after-pod-label-change",
            "spec.podSelector Exists; a pod relabelled into the policy",
            &[np("y", "quarantine", "
                podSelector:
                  matchExpressions:
                  - {key: quarantine, operator: Exists}
                policyTypes: [Ingress, Egress]
            ")],
        )
        .pod_label("y/b", "quarantine", "true"),
        sc(
            "target-doesnotexist-after-pod-label-change",
            "spec.podSelector DoesNotExist; a pod relabelled out of the policy",
            &[np("z", "deny-unlabelled", "
                podSelector:
                  matchExpressions:
                  - {key: exempt, operator: DoesNotExist}
                policyTypes: [Ingress]
            ")],
        )
        .pod_label("z/c", "exempt", "yes"),
        sc(
            "target-labels-and-expressions-are-anded",
            "matchLabels AND matchExpressions; contradictory selector selects nothing",
            &[np("x", "selects-nothing", "
                podSelector:
                  matchLabels: {pod: a}
                  matchExpressions:
                  - {key: pod, operator: NotIn, values: [a]}
                policyTypes: [Ingress, Egress]
            ")],
        ),
        sc(
            "policy-applies-in-own-namespace-only",
            "spec.podSelector pod=a in y isolates y/a, not x/a or z/a",
            &[np("y", "deny-a", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Ingress]
            ")],
        ),
        // ---- Ingress peers -----------------------------------------------
        sc(
            "ingress-from-pod-selector",
            "peer podSelector alone: pods of the policy's namespace only",
            &[np("x", "a-from-b", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "ingress-from-namespace-selector",
            "peer namespaceSelector alone: all pods of matching namespaces",
            &[np("x", "a-from-y", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
            ")],
        ),
        sc(
            "ingress-from-namespace-by-metadata-name",
            "namespaceSelector on the implicit kubernetes.io/metadata.name, In",
            &[np("x", "a-from-y-z", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - key: kubernetes.io/metadata.name
                        operator: In
                        values: [y, z]
            ")],
        ),
        sc(
            "ingress-deny-from-namespace-notin",
            "deny ingress from one namespace: namespaceSelector NotIn",
            &[np("x", "not-from-y", "
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: ns, operator: NotIn, values: [y]}
            ")],
        ),
        sc(
            "ingress-from-pod-and-namespace-in-one-peer",
            "namespaceSelector AND podSelector in the same peer",
            &[np("x", "a-from-y-b", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                    podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "ingress-from-pod-or-namespace-two-peers",
            "namespaceSelector OR podSelector as two peers",
            &[np("x", "a-from-y-or-b", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                  - podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "ingress-from-all-namespaces",
            "namespaceSelector {} selects every pod",
            &[np("x", "from-anywhere", "
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector: {}
            ")],
        ),
        sc(
            "default-deny-allow-same-namespace",
            "deny-all plus allow from podSelector {} (same namespace)",
            &[
                np("x", "deny-ingress", "
                    podSelector: {}
                    policyTypes: [Ingress]
                "),
                np("x", "allow-same-ns", "
                    podSelector: {}
                    ingress:
                    - from:
                      - podSelector: {}
                "),
            ],
        ),
        sc(
            "ingress-from-namespace-with-empty-pod-selector",
            "namespaceSelector + podSelector {} in one peer",
            &[np("x", "a-from-z", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: z}
                    podSelector: {}
            ")],
        ),
        sc(
            "ingress-from-pods-in-any-namespace",
            "namespaceSelector {} + podSelector matchExpressions In",
            &[np("x", "a-from-b-c", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector: {}
                    podSelector:
                      matchExpressions:
                      - {key: pod, operator: In, values: [b, c]}
            ")],
        ),
        sc(
            "ingress-from-pod-notin",
            "peer podSelector NotIn, own namespace",
            &[np("x", "a-not-from-b", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: pod, operator: NotIn, values: [b]}
            ")],
        ),
        sc(
            "ingress-allowed-by-pod-label-change",
            "peer podSelector Exists; a client pod gains the label",
            &[np("x", "a-from-clients", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector: {}
                    podSelector:
                      matchExpressions:
                      - {key: role, operator: Exists}
            ")],
        )
        .pod_label("y/c", "role", "client"),
        sc(
            "ingress-from-pod-doesnotexist",
            "peer podSelector DoesNotExist after a label change",
            &[np("x", "a-not-from-labelled", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector: {}
                    podSelector:
                      matchExpressions:
                      - {key: role, operator: DoesNotExist}
            ")],
        )
        .pod_label("y/c", "role", "client"),
        sc(
            "ingress-from-pod-notin-matches-absent-key",
            "peer podSelector NotIn matches pods without the key",
            &[np("x", "a-not-from-servers", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector: {}
                    podSelector:
                      matchExpressions:
                      - {key: role, operator: NotIn, values: [server]}
            ")],
        )
        .pod_label("y/c", "role", "server")
        .pod_label("z/b", "role", "client"),
        sc(
            "ingress-allowed-by-namespace-label-change",
            "namespaceSelector matchLabels; a namespace gains the label",
            &[np("x", "a-from-blue", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {team: blue}
            ")],
        )
        .ns_label("z", "team", "blue"),
        sc(
            "ingress-from-namespace-exists",
            "namespaceSelector Exists",
            &[np("x", "a-from-env", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: env, operator: Exists}
            ")],
        )
        .ns_label("y", "env", "prod"),
        sc(
            "ingress-from-namespace-doesnotexist",
            "namespaceSelector DoesNotExist",
            &[np("x", "a-not-from-env", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: env, operator: DoesNotExist}
            ")],
        )
        .ns_label("y", "env", "prod"),
        sc(
            "multiple-policies-union",
            "two policies select one pod: their rules add up",
            &[
                np("x", "a-from-y-80", "
                    podSelector:
                      matchLabels: {pod: a}
                    ingress:
                    - from:
                      - namespaceSelector:
                          matchLabels: {ns: y}
                      ports:
                      - {port: 80, protocol: TCP}
                "),
                np("x", "a-from-z-81", "
                    podSelector:
                      matchLabels: {pod: a}
                    ingress:
                    - from:
                      - namespaceSelector:
                          matchLabels: {ns: z}
                      ports:
                      - {port: 81, protocol: TCP}
                "),
            ],
        ),
        sc(
            "ingress-peer-and-port-are-anded",
            "one rule needs both peer and port; two rules are ORed",
            &[np("x", "a-two-rules", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                  ports:
                  - {port: 80}
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: z}
            ")],
        ),
        // ---- Ports and protocols -----------------------------------------
        sc(
            "ingress-port-number",
            "ports: port 81 TCP",
            &[np("x", "a-81", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {port: 81, protocol: TCP}
            ")],
        ),
        sc(
            "ingress-port-protocol-defaults-to-tcp",
            "ports: port 80 without protocol means TCP; UDP 80 denied",
            &[np("x", "a-80", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - port: 80
            ")],
        ),
        sc(
            "ingress-port-udp",
            "ports: UDP 81 only",
            &[np("x", "a-udp-81", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {protocol: UDP, port: 81}
            ")],
        ),
        sc(
            "ingress-protocol-only",
            "ports: protocol UDP without port means all UDP ports",
            &[np("x", "a-all-udp", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - protocol: UDP
            ")],
        ),
        sc(
            "ingress-sctp-only",
            "ports: SCTP 80 only; TCP and UDP must be denied",
            &[np("x", "a-sctp-80", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {protocol: SCTP, port: 80}
            ")],
        )
        .probes(&all_probes_sctp),
        sc(
            "ingress-named-port-tcp",
            "ports: named port serve-81-tcp",
            &[np("x", "a-serve-81-tcp", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - port: serve-81-tcp
            ")],
        ),
        sc(
            "ingress-named-port-udp",
            "ports: named port serve-80-udp with protocol UDP",
            &[np("x", "serve-80-udp", "
                podSelector: {}
                ingress:
                - ports:
                  - {protocol: UDP, port: serve-80-udp}
            ")],
        ),
        sc(
            "ingress-named-port-sctp",
            "ports: named port serve-81-sctp with protocol SCTP; TCP/UDP denied",
            &[np("x", "a-serve-81-sctp", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {protocol: SCTP, port: serve-81-sctp}
            ")],
        )
        .probes(&all_probes_sctp),
        sc(
            "ingress-named-port-protocol-mismatch",
            "ports: serve-80-udp with default protocol TCP matches nothing",
            &[np("x", "a-mismatch", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - port: serve-80-udp
            ")],
        ),
        sc(
            "ingress-named-port-missing",
            "ports: a name no pod has matches nothing",
            &[np("x", "a-missing", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - port: serve-99-tcp
            ")],
        ),
        sc(
            "ingress-port-range",
            "ports: port 80 endPort 81 (TCP)",
            &[np("x", "a-80-81", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {port: 80, endPort: 81}
            ")],
        ),
        sc(
            "ingress-port-range-partial-udp",
            "ports: UDP 81-90 covers 81 but not 80",
            &[np("x", "a-udp-81-90", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - {protocol: UDP, port: 81, endPort: 90}
            ")],
        ),
        sc(
            "ingress-port-range-below",
            "ports: TCP 70-80 covers 80 but not 81",
            &[np("x", "a-70-80", "
                podSelector: {}
                ingress:
                - ports:
                  - {protocol: TCP, port: 70, endPort: 80}
            ")],
        ),
        sc(
            "ingress-ports-mixed-list",
            "ports: a number and a named port, different protocols, ORed",
            &[np("x", "a-mixed", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - ports:
                  - port: 80
                  - {protocol: UDP, port: serve-81-udp}
            ")],
        ),
        sc(
            "ingress-from-namespace-on-named-port",
            "namespaceSelector peer AND named port",
            &[np("x", "a-from-y-81", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - namespaceSelector:
                      matchLabels: {ns: y}
                  ports:
                  - port: serve-81-tcp
            ")],
        ),
        // ---- ipBlock ------------------------------------------------------
        sc(
            "ingress-ip-block-hosts",
            "ipBlock /32 of two pods",
            &[np("x", "a-from-ips", &format!("
                podSelector:
                  matchLabels: {{pod: a}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {}
                  - ipBlock:
                      cidr: {}
            ", host("x/b"), host("y/c")))],
        ),
        sc(
            "ingress-ip-block-except",
            "ipBlock pod CIDR except one pod's /32",
            &[np("x", "from-cidr-but-zc", &format!("
                podSelector: {{}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {pod_cidr}
                      except:
                      - {}
            ", host("z/c")))],
        ),
        sc(
            "ingress-ip-block-outside",
            "ipBlock that holds no pod",
            &[np("x", "a-from-elsewhere", "
                podSelector:
                  matchLabels: {pod: a}
                ingress:
                - from:
                  - ipBlock:
                      cidr: 192.168.0.0/16
            ")],
        ),
        sc(
            "ingress-ip-block-or-selector",
            "ipBlock with except, ORed with a selector peer that re-admits the excepted pod",
            &[np("x", "a-cidr-or-ya", &format!("
                podSelector:
                  matchLabels: {{pod: a}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {pod_cidr}
                      except: [{}, {}]
                  - namespaceSelector:
                      matchLabels: {{ns: y}}
                    podSelector:
                      matchLabels: {{pod: a}}
            ", host("y/a"), host("z/b")))],
        ),
        // ---- Egress -------------------------------------------------------
        sc(
            "egress-to-namespace",
            "egress to namespaceSelector ns=y",
            &[np("x", "a-to-y", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector:
                      matchLabels: {ns: y}
            ")],
        ),
        sc(
            "egress-to-pods-in-any-namespace",
            "egress to namespaceSelector {} + podSelector pod=b",
            &[np("x", "to-b", "
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector: {}
                    podSelector:
                      matchLabels: {pod: b}
            ")],
        ),
        sc(
            "egress-to-pod-selector-own-namespace",
            "egress peer podSelector alone is the policy's namespace",
            &[np("y", "a-to-c", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Egress]
                egress:
                - to:
                  - podSelector:
                      matchLabels: {pod: c}
            ")],
        ),
        sc(
            "egress-port-number",
            "egress ports: TCP 80 to anyone",
            &[np("x", "a-out-80", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Egress]
                egress:
                - ports:
                  - port: 80
            ")],
        ),
        sc(
            "egress-named-port",
            "egress named port resolves on the destination pod",
            &[np("x", "a-out-serve-81-udp", "
                podSelector:
                  matchLabels: {pod: a}
                policyTypes: [Egress]
                egress:
                - ports:
                  - {protocol: UDP, port: serve-81-udp}
            ")],
        ),
        sc(
            "egress-port-range-udp",
            "egress ports: UDP 80-81",
            &[np("z", "out-udp", "
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - ports:
                  - {protocol: UDP, port: 80, endPort: 81}
            ")],
        ),
        sc(
            "egress-sctp-only",
            "egress ports: SCTP only; TCP and UDP must be denied",
            &[np("y", "out-sctp", "
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - ports:
                  - protocol: SCTP
            ")],
        )
        .probes(&all_probes_sctp),
        sc(
            "egress-ip-block-except",
            "egress ipBlock pod CIDR except one pod's /32",
            &[np("x", "a-out-cidr", &format!("
                podSelector:
                  matchLabels: {{pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {pod_cidr}
                      except:
                      - {}
            ", host("y/b")))],
        ),
        sc(
            "egress-ip-block-host-with-named-port",
            "egress ipBlock /32 AND a named port of that pod",
            &[np("x", "a-out-zc-80", &format!("
                podSelector:
                  matchLabels: {{pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {}
                  ports:
                  - port: serve-80-tcp
            ", host("z/c")))],
        ),
        sc(
            "egress-multiple-policies-union",
            "two egress policies on one pod add up",
            &[
                np("x", "a-out-b-80", "
                    podSelector:
                      matchLabels: {pod: a}
                    policyTypes: [Egress]
                    egress:
                    - to:
                      - podSelector:
                          matchLabels: {pod: b}
                      ports:
                      - port: 80
                "),
                np("x", "a-out-z-udp", "
                    podSelector:
                      matchLabels: {pod: a}
                    policyTypes: [Egress]
                    egress:
                    - to:
                      - namespaceSelector:
                          matchLabels: {ns: z}
                      ports:
                      - protocol: UDP
                "),
            ],
        ),
        sc(
            "egress-and-ingress-must-both-allow",
            "x may send only to y; y admits only z: x to y is still denied",
            &[
                np("x", "out-to-y", "
                    podSelector: {}
                    policyTypes: [Egress]
                    egress:
                    - to:
                      - namespaceSelector:
                          matchLabels: {ns: y}
                "),
                np("y", "in-from-z", "
                    podSelector: {}
                    ingress:
                    - from:
                      - namespaceSelector:
                          matchLabels: {ns: z}
                "),
            ],
        ),
        sc(
            "deny-all-with-targeted-allows",
            "deny-all in x and y, then allows per direction and port",
            &[
                np("x", "deny-all", "
                    podSelector: {}
                    policyTypes: [Ingress, Egress]
                "),
                np("y", "deny-all", "
                    podSelector: {}
                    policyTypes: [Ingress, Egress]
                "),
                np("x", "a-to-y-b-81", "
                    podSelector:
                      matchLabels: {pod: a}
                    policyTypes: [Egress]
                    egress:
                    - to:
                      - namespaceSelector:
                          matchLabels: {ns: y}
                        podSelector:
                          matchLabels: {pod: b}
                      ports:
                      - {port: 81, protocol: TCP}
                      - {port: 81, protocol: UDP}
                "),
                np("y", "b-from-x-a", "
                    podSelector:
                      matchLabels: {pod: b}
                    ingress:
                    - from:
                      - namespaceSelector:
                          matchLabels: {ns: x}
                        podSelector:
                          matchLabels: {pod: a}
                      ports:
                      - {port: serve-81-tcp}
                "),
            ],
        ),
    ]
}
