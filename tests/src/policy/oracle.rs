//! An independent reference implementation of `networking.k8s.io/v1`
//! NetworkPolicy semantics, written to be read, not to be fast.
//!
//! It answers one question: may pod A open a connection to pod B on
//! (port, protocol)? Every rule below quotes the API documentation it
//! implements (the field docs of `k8s.io/api/networking/v1`, as carried by
//! k8s-openapi, and the apiserver's defaulting in
//! `pkg/apis/networking/v1/defaults.go`).
//!
//! Nothing here shares code with `node-agent`; it is the oracle the agent's
//! datapath is checked against.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Labels of a pod or a namespace.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries, set by the apiserver to the
/// namespace's own name ("The control plane sets an immutable label
/// `kubernetes.io/metadata.name` on all namespaces").
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A transport protocol a NetworkPolicyPort can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The API spelling: "TCP", "UDP" or "SCTP".
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }

    /// Parses the API spelling (case-sensitive, as the apiserver is).
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pod's identity: namespace and name. Displays (and parses) as `ns/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// Parses `ns/name`; panics on anything else (test input only).
    pub fn parse(s: &str) -> PodRef {
        let (ns, name) = s
            .split_once('/')
            .unwrap_or_else(|| panic!("pod reference {s:?} is not ns/name"));
        PodRef::new(ns, name)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A named container port (`spec.containers[].ports[]` with a name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
}

/// A pod as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub ports: Vec<NamedPort>,
}

impl Pod {
    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(&self.namespace, &self.name)
    }
}

/// The cluster facts policy depends on: namespaces with their labels, and
/// pods. Pods are kept in insertion order, which is the matrix order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Namespace name → its labels as written (without the implicit
    /// [`NAMESPACE_NAME_LABEL`]; [`Cluster::namespace_labels`] adds it).
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<Pod>,
}

/// The six named ports every pod of the x/y/z world serves (e2e naming).
pub const STANDARD_PORTS: [(&str, u16, Proto); 6] = [
    ("serve-80-tcp", 80, Proto::Tcp),
    ("serve-81-tcp", 81, Proto::Tcp),
    ("serve-80-udp", 80, Proto::Udp),
    ("serve-81-udp", 81, Proto::Udp),
    ("serve-80-sctp", 80, Proto::Sctp),
    ("serve-81-sctp", 81, Proto::Sctp),
];

/// Namespaces and pod names of the e2e world.
pub const XYZ_NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const XYZ_PODS: [&str; 3] = ["a", "b", "c"];

impl Cluster {
    /// The e2e world: namespaces x, y, z labelled `ns=<name>`; pods a, b, c
    /// in each, labelled `pod=<name>`, each with the [`STANDARD_PORTS`].
    /// `ip` gives each pod's address.
    pub fn xyz(mut ip: impl FnMut(&PodRef) -> Ipv4Addr) -> Cluster {
        let mut c = Cluster::default();
        for ns in XYZ_NAMESPACES {
            c.namespaces.insert(ns.into(), labels(&[("ns", ns)]));
            for name in XYZ_PODS {
                let r = PodRef::new(ns, name);
                c.pods.push(Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: labels(&[("pod", name)]),
                    ip: ip(&r),
                    ports: STANDARD_PORTS
                        .iter()
                        .map(|&(n, port, proto)| NamedPort {
                            name: n.into(),
                            port,
                            proto,
                        })
                        .collect(),
                });
            }
        }
        c
    }

    /// The e2e world with made-up addresses 10.244.0.10, .11, ... (for
    /// computing expectations without real pods).
    pub fn xyz_synthetic() -> Cluster {
        let mut n = 10u8;
        Cluster::xyz(|_| {
            n += 1;
            Ipv4Addr::new(10, 244, 0, n - 1)
        })
    }

    /// The pod `r`; panics if there is none.
    pub fn pod(&self, r: &PodRef) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.namespace == r.namespace && p.name == r.name)
            .unwrap_or_else(|| panic!("no pod {r} in the cluster"))
    }

    fn pod_mut(&mut self, r: &PodRef) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.namespace == r.namespace && p.name == r.name)
            .unwrap_or_else(|| panic!("no pod {r} in the cluster"))
    }

    /// All pod references, in matrix order.
    pub fn pod_refs(&self) -> Vec<PodRef> {
        self.pods.iter().map(Pod::pod_ref).collect()
    }

    /// The labels a namespace selector sees: the namespace's own labels
    /// plus `kubernetes.io/metadata.name=<name>`, which the apiserver sets
    /// on every namespace and which cannot be changed.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        l
    }

    /// Sets (`Some`) or removes (`None`) one label of a pod.
    pub fn set_pod_label(&mut self, r: &PodRef, key: &str, value: Option<&str>) {
        let p = self.pod_mut(r);
        match value {
            Some(v) => p.labels.insert(key.into(), v.into()),
            None => p.labels.remove(key),
        };
    }

    /// Sets (`Some`) or removes (`None`) one label of a namespace.
    pub fn set_namespace_label(&mut self, ns: &str, key: &str, value: Option<&str>) {
        let l = self
            .namespaces
            .get_mut(ns)
            .unwrap_or_else(|| panic!("no namespace {ns}"));
        match value {
            Some(v) => l.insert(key.into(), v.into()),
            None => l.remove(key),
        };
    }

    /// The namespaces as Kubernetes objects (labels include the implicit
    /// `kubernetes.io/metadata.name`), for feeding a policy engine.
    pub fn k8s_namespaces(&self) -> Vec<k8s_openapi::api::core::v1::Namespace> {
        use k8s_openapi::api::core::v1::Namespace;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        self.namespaces
            .keys()
            .map(|ns| Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    labels: Some(self.namespace_labels(ns)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect()
    }

    /// The pods as Kubernetes objects: labels, one container `main` with the
    /// named ports, phase Running, `status.podIP(s)` set; `node_name` goes
    /// into `spec.nodeName`.
    pub fn k8s_pods(&self, node_name: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
        use k8s_openapi::api::core::v1::{
            Container, ContainerPort, Pod as KPod, PodIP, PodSpec, PodStatus,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        self.pods
            .iter()
            .map(|p| KPod {
                metadata: ObjectMeta {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    labels: Some(p.labels.clone()),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: Some(node_name.to_string()),
                    containers: vec![Container {
                        name: "main".into(),
                        ports: Some(
                            p.ports
                                .iter()
                                .map(|np| ContainerPort {
                                    name: Some(np.name.clone()),
                                    container_port: i32::from(np.port),
                                    protocol: Some(np.proto.as_str().into()),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(p.ip.to_string()),
                    pod_ips: Some(vec![PodIP {
                        ip: p.ip.to_string(),
                    }]),
                    ..Default::default()
                }),
            })
            .collect()
    }
}

/// Builds a label map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// The decision
// ---------------------------------------------------------------------------

/// May `from` open a connection to `to` on (`port`, `proto`) under
/// `policies`?
///
/// NetworkPolicySpec: traffic must be allowed on both ends. Outgoing
/// traffic "is allowed if there are no NetworkPolicies selecting the pod
/// ..., OR if the traffic matches at least one egress rule across all of the
/// NetworkPolicy objects whose podSelector matches the pod"; incoming
/// traffic likewise with ingress rules.
///
/// A pod talking to itself is always allowed: that traffic never leaves the
/// pod's network namespace (it goes over its loopback), and the e2e suite
/// expects it to pass ("loopback logic follows no policy").
pub fn allowed(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    from: &PodRef,
    to: &PodRef,
    port: u16,
    proto: Proto,
) -> bool {
    if from == to {
        return true;
    }
    let src = cluster.pod(from);
    let dst = cluster.pod(to);
    egress_allows(cluster, policies, src, dst, port, proto)
        && ingress_allows(cluster, policies, src, dst, port, proto)
}

/// The direction a policy (or a rule) applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Does `src` (egress side) let the connection out?
fn egress_allows(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    src: &Pod,
    dst: &Pod,
    port: u16,
    proto: Proto,
) -> bool {
    let isolating: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| selects(p, src) && policy_types(p).contains(&Direction::Egress))
        .collect();
    // "Outgoing traffic is allowed if there are no NetworkPolicies selecting
    // the pod" (for egress).
    if isolating.is_empty() {
        return true;
    }
    // "... OR if the traffic matches at least one egress rule across all of
    // the NetworkPolicy objects whose podSelector matches the pod."
    // "If this field is empty then this NetworkPolicy limits all outgoing
    // traffic": an absent or empty egress list contributes no rule.
    isolating.iter().any(|p| {
        let ns = policy_namespace(p);
        spec(p).egress.iter().flatten().any(|rule| {
            // "The traffic must match both ports and to."
            peers_match(cluster, ns, rule.to.as_deref(), dst)
                && ports_match(rule.ports.as_deref(), dst, port, proto)
        })
    })
}

/// Does `dst` (ingress side) let the connection in?
fn ingress_allows(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    src: &Pod,
    dst: &Pod,
    port: u16,
    proto: Proto,
) -> bool {
    let isolating: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| selects(p, dst) && policy_types(p).contains(&Direction::Ingress))
        .collect();
    // "Traffic is allowed to a pod if there are no NetworkPolicies selecting
    // the pod".
    if isolating.is_empty() {
        return true;
    }
    // "... OR if the traffic matches at least one ingress rule across all of
    // the NetworkPolicy objects whose podSelector matches the pod."
    // "If this field is empty then this NetworkPolicy does not allow any
    // traffic": an absent or empty ingress list contributes no rule.
    isolating.iter().any(|p| {
        let ns = policy_namespace(p);
        spec(p).ingress.iter().flatten().any(|rule| {
            // "The traffic must match both ports and from." Ports are those
            // "made accessible on the pods selected": named ports resolve on
            // the destination, which for ingress is the selected pod.
            peers_match(cluster, ns, rule.from.as_deref(), src)
                && ports_match(rule.ports.as_deref(), dst, port, proto)
        })
    })
}

fn spec(p: &NetworkPolicy) -> NetworkPolicySpec {
    p.spec.clone().unwrap_or_default()
}

/// The namespace a policy lives in. A policy without one is treated as in
/// "default", as kubectl would place it ([`validate`] rejects it anyway).
pub fn policy_namespace(p: &NetworkPolicy) -> &str {
    p.metadata.namespace.as_deref().unwrap_or("default")
}

/// Does policy `p` apply to `pod`?
///
/// podSelector "selects the pods to which this NetworkPolicy object
/// applies"; "An empty selector matches all pods in the policy's namespace";
/// "If it is not specified, it defaults to an empty selector." A policy
/// never selects pods of another namespace.
pub fn selects(p: &NetworkPolicy, pod: &Pod) -> bool {
    if pod.namespace != policy_namespace(p) {
        return false;
    }
    let sel = spec(p).pod_selector.unwrap_or_default();
    selector_matches(&sel, &pod.labels)
}

/// The policy's effective policyTypes.
///
/// policyTypes: "If this field is not specified, it will default based on
/// the existence of ingress or egress rules; policies that contain an egress
/// section are assumed to affect egress, and all policies (whether or not
/// they contain an ingress section) are assumed to affect ingress."
///
/// "Contain an egress section" is what the apiserver's defaulting makes of
/// it: `if len(PolicyTypes) == 0 { [Ingress] + (Egress if len(Egress) != 0) }`
/// (pkg/apis/networking/v1/defaults.go). So an unset *or empty* policyTypes
/// is defaulted, and `egress: []` does *not* imply Egress.
pub fn policy_types(p: &NetworkPolicy) -> Vec<Direction> {
    let s = spec(p);
    match s.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut out = Vec::new();
            if types.iter().any(|t| t == "Ingress") {
                out.push(Direction::Ingress);
            }
            if types.iter().any(|t| t == "Egress") {
                out.push(Direction::Egress);
            }
            out
        }
        _ => {
            let mut out = vec![Direction::Ingress];
            if s.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                out.push(Direction::Egress);
            }
            out
        }
    }
}

/// Does a rule's `from` / `to` list admit `other` (the pod at the far end)?
///
/// "Items in this list are combined using a logical OR operation. If this
/// field is empty or missing, this rule matches all sources (traffic not
/// restricted by source)" (resp. destinations).
fn peers_match(
    cluster: &Cluster,
    policy_ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    other: &Pod,
) -> bool {
    match peers {
        None => true,
        Some([]) => true,
        Some(list) => list
            .iter()
            .any(|peer| peer_matches(cluster, policy_ns, peer, other)),
    }
}

/// Does one NetworkPolicyPeer select `other`?
pub fn peer_matches(
    cluster: &Cluster,
    policy_ns: &str,
    peer: &NetworkPolicyPeer,
    other: &Pod,
) -> bool {
    // ipBlock: "If this field is set then neither of the other fields can
    // be." It matches by address; a pod whose IP lies in the block counts.
    if let Some(block) = &peer.ip_block {
        return ip_block_contains(block, other.ip);
    }
    match (&peer.namespace_selector, &peer.pod_selector) {
        // No field at all is rejected by validation; it selects nothing.
        (None, None) => false,
        // podSelector alone: "Otherwise it selects the pods matching
        // podSelector in the policy's own namespace."
        (None, Some(pods)) => other.namespace == policy_ns && selector_matches(pods, &other.labels),
        // namespaceSelector alone: "Otherwise it selects all pods in the
        // namespaces selected by namespaceSelector." "If present but empty,
        // it selects all namespaces."
        (Some(nss), None) => selector_matches(nss, &cluster.namespace_labels(&other.namespace)),
        // Both: "the NetworkPolicyPeer as a whole selects the pods matching
        // podSelector in the namespaces selected by namespaceSelector."
        (Some(nss), Some(pods)) => {
            selector_matches(nss, &cluster.namespace_labels(&other.namespace))
                && selector_matches(pods, &other.labels)
        }
    }
}

/// Does an IPBlock contain `ip`?
///
/// IPBlock: "The except entry describes CIDRs that should not be included
/// within this rule." An IPv6 block never contains an IPv4 address.
pub fn ip_block_contains(block: &IPBlock, ip: Ipv4Addr) -> bool {
    let Some(inside) = cidr_contains(&block.cidr, ip) else {
        return false;
    };
    let excluded = block
        .except
        .iter()
        .flatten()
        .any(|e| cidr_contains(e, ip) == Some(true));
    inside && !excluded
}

/// `Some(true/false)` for an IPv4 CIDR, `Some(false)` for an IPv6 one, and
/// `None` if `cidr` does not parse. Host bits are ignored, as Go's
/// `net.ParseCIDR` does.
pub fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> Option<bool> {
    let (addr, len) = cidr.split_once('/')?;
    let len: u32 = len.parse().ok()?;
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V6(_) => (len <= 128).then_some(false),
        IpAddr::V4(net) => {
            if len > 32 {
                return None;
            }
            // A mask with the top `len` bits set (len 0 → 0).
            let mask: u32 = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(u32::from(net) & mask == u32::from(ip) & mask)
        }
    }
}

/// Does a label selector match `labels`?
///
/// LabelSelector: "The result of matchLabels and matchExpressions are
/// ANDed. An empty label selector matches all objects." (The "null selector
/// matches nothing" case is handled by the callers, where an absent
/// selector means something field-specific.)
pub fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    // matchLabels: "A single {key,value} in the matchLabels map is
    // equivalent to an element of matchExpressions, whose key field is
    // "key", the operator is "In", and the values array contains only
    // "value". The requirements are ANDed."
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    // matchExpressions: "The requirements are ANDed."
    let exprs_ok = sel.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or(&[]);
        match req.operator.as_str() {
            // In: the label is present and its value is one of `values`.
            "In" => value.is_some_and(|v| values.contains(v)),
            // NotIn: true when the label is absent or its value is not one
            // of `values` (apimachinery labels.Selector semantics).
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // Rejected by validation; an unknown operator matches nothing.
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Does a rule's `ports` list admit (`port`, `proto`) towards `dst`?
///
/// "Each item in this list is combined using a logical OR. If this field is
/// empty or missing, this rule matches all ports (traffic not restricted by
/// port)."
fn ports_match(ports: Option<&[NetworkPolicyPort]>, dst: &Pod, port: u16, proto: Proto) -> bool {
    match ports {
        None => true,
        Some([]) => true,
        Some(list) => list.iter().any(|p| port_matches(p, dst, port, proto)),
    }
}

/// Does one NetworkPolicyPort admit (`port`, `proto`) towards `dst`?
pub fn port_matches(p: &NetworkPolicyPort, dst: &Pod, port: u16, proto: Proto) -> bool {
    // protocol: "If not specified, this field defaults to TCP."
    let want = match p.protocol.as_deref() {
        None => Proto::Tcp,
        Some(s) => match Proto::parse(s) {
            Some(pr) => pr,
            None => return false,
        },
    };
    // port: "If present, only traffic on the specified protocol AND port
    // will be matched."
    if want != proto {
        return false;
    }
    match &p.port {
        // port: "If this field is not provided, this matches all port names
        // and numbers."
        None => true,
        Some(IntOrString::Int(n)) => match p.end_port {
            // endPort: "the range of ports from port to endPort if set,
            // inclusive".
            Some(end) => *n <= i32::from(port) && i32::from(port) <= end,
            None => *n == i32::from(port),
        },
        // A named port is "a ... named port on a pod": it resolves on the
        // destination pod to the container port of that name. It matches
        // only if that container port is exactly the traffic's port and
        // protocol; a name the pod does not have matches nothing.
        Some(IntOrString::String(name)) => dst
            .ports
            .iter()
            .any(|np| &np.name == name && np.port == port && np.proto == proto),
    }
}

// ---------------------------------------------------------------------------
// Validation: the subset of apiserver validation the scenarios rely on
// ---------------------------------------------------------------------------

/// Checks a policy the way the apiserver would before accepting it (the
/// parts that matter for semantics): a namespace, valid policyTypes,
/// peers with exactly one kind of field, valid CIDRs with `except` inside
/// `cidr`, protocols, port numbers and names, endPort rules, and selector
/// operators. Returns every problem found.
pub fn validate(p: &NetworkPolicy) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let name = p.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        errs.push("metadata.name is empty".to_string());
    }
    if p.metadata.namespace.is_none() {
        errs.push(format!("{name}: metadata.namespace is not set"));
    }
    let s = spec(p);
    for t in s.policy_types.iter().flatten() {
        if t != "Ingress" && t != "Egress" {
            errs.push(format!("{name}: policyTypes has {t:?}"));
        }
    }
    if let Some(sel) = &s.pod_selector {
        check_selector(&name, "spec.podSelector", sel, &mut errs);
    }
    for (i, r) in s.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        for (j, peer) in r.from.iter().flatten().enumerate() {
            check_peer(&name, &format!("{at}.from[{j}]"), peer, &mut errs);
        }
        for (j, port) in r.ports.iter().flatten().enumerate() {
            check_port(&name, &format!("{at}.ports[{j}]"), port, &mut errs);
        }
    }
    for (i, r) in s.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        for (j, peer) in r.to.iter().flatten().enumerate() {
            check_peer(&name, &format!("{at}.to[{j}]"), peer, &mut errs);
        }
        for (j, port) in r.ports.iter().flatten().enumerate() {
            check_port(&name, &format!("{at}.ports[{j}]"), port, &mut errs);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn check_selector(name: &str, at: &str, sel: &LabelSelector, errs: &mut Vec<String>) {
    for req in sel.match_expressions.iter().flatten() {
        let n = req.values.as_ref().map_or(0, Vec::len);
        match req.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                errs.push(format!("{name}: {at}: {} needs values", req.operator));
            }
            "Exists" | "DoesNotExist" if n != 0 => {
                errs.push(format!("{name}: {at}: {} takes no values", req.operator));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errs.push(format!("{name}: {at}: unknown operator {other:?}")),
        }
    }
}

fn check_peer(name: &str, at: &str, peer: &NetworkPolicyPeer, errs: &mut Vec<String>) {
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match &peer.ip_block {
        Some(_) if selectors => errs.push(format!(
            "{name}: {at}: ipBlock cannot be combined with selectors"
        )),
        None if !selectors => errs.push(format!("{name}: {at}: must specify a peer")),
        Some(b) => {
            let net = parse_cidr(&b.cidr);
            if net.is_none() {
                errs.push(format!("{name}: {at}: bad cidr {:?}", b.cidr));
            }
            for e in b.except.iter().flatten() {
                match (net, parse_cidr(e)) {
                    (_, None) => errs.push(format!("{name}: {at}: bad except {e:?}")),
                    (Some((n, nl)), Some((x, xl))) => {
                        // "Except values will be rejected if they are outside
                        // the cidr range" (a strict subset, same family).
                        // Only IPv4 containment is checked exactly; the
                        // scenarios use IPv4 blocks.
                        let inside = xl > nl
                            && match (n, x) {
                                (IpAddr::V4(_), IpAddr::V4(x4)) => {
                                    cidr_contains(&b.cidr, x4) == Some(true)
                                }
                                (IpAddr::V6(_), IpAddr::V6(_)) => true,
                                _ => false,
                            };
                        if !inside {
                            errs.push(format!(
                                "{name}: {at}: except {e:?} is not inside {:?}",
                                b.cidr
                            ));
                        }
                    }
                    (None, Some(_)) => {}
                }
            }
        }
        None => {}
    }
    if let Some(sel) = &peer.pod_selector {
        check_selector(name, &format!("{at}.podSelector"), sel, errs);
    }
    if let Some(sel) = &peer.namespace_selector {
        check_selector(name, &format!("{at}.namespaceSelector"), sel, errs);
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u32 = l.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn check_port(name: &str, at: &str, p: &NetworkPolicyPort, errs: &mut Vec<String>) {
    if let Some(pr) = &p.protocol {
        if Proto::parse(pr).is_none() {
            errs.push(format!("{name}: {at}: protocol {pr:?}"));
        }
    }
    match (&p.port, p.end_port) {
        (Some(IntOrString::Int(n)), end) => {
            if !(1..=65535).contains(n) {
                errs.push(format!("{name}: {at}: port {n}"));
            }
            // endPort: "The endPort must be equal or greater than port."
            if let Some(e) = end {
                if e < *n || e > 65535 {
                    errs.push(format!("{name}: {at}: endPort {e} < port {n}"));
                }
            }
        }
        (Some(IntOrString::String(s)), end) => {
            // "This field cannot be defined if ... the port field is defined
            // as a named (string) port."
            if end.is_some() {
                errs.push(format!("{name}: {at}: endPort with a named port"));
            }
            // IANA_SVC_NAME: 1-15 of [a-z0-9-], a letter somewhere, no
            // leading/trailing or double hyphen.
            let ok = (1..=15).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && s.bytes().any(|b| b.is_ascii_lowercase())
                && !s.starts_with('-')
                && !s.ends_with('-')
                && !s.contains("--");
            if !ok {
                errs.push(format!("{name}: {at}: bad port name {s:?}"));
            }
        }
        (None, Some(_)) => errs.push(format!("{name}: {at}: endPort without port")),
        (None, None) => {}
    }
}
