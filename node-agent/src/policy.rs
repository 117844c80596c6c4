//! NetworkPolicy (networking.k8s.io/v1) semantics, compiled for the pods
//! on this node.
//!
//! For each local pod and direction the result is either "not isolated"
//! (no policy with that direction selects it: everything passes) or a rule
//! *group*: the disjoint cells (peer address × protocol × port → policy)
//! that the union of all selecting policies allows. Pods whose compiled
//! rules are equal share a group; a group's id is a digest of its contents,
//! so an unchanged group keeps its name, and a changed one is a new group
//! (see [`crate::nft`] for why that makes incremental updates simple).
//!
//! Semantics, field by field (the API reference's wording, condensed):
//! - A pod is isolated for ingress (egress) when a policy in its namespace
//!   selects it and that policy's `policyTypes` contains Ingress (Egress).
//!   Unset `policyTypes` means Ingress, plus Egress when `egress` is non-empty
//!   (the API server's defaulting).
//! - Allowed traffic is the union of all rules of all selecting policies;
//!   an empty rule list allows nothing.
//! - A rule with no peers (`from`/`to` absent or empty) matches every
//!   address; with no `ports`, every protocol and port.
//! - Peer `podSelector` alone: pods of the policy's namespace;
//!   `namespaceSelector` alone: all pods of matching namespaces; both: pods
//!   matching the pod selector in matching namespaces. `{}` matches all.
//! - `ipBlock` matches by address, minus `except`. Pod addresses inside a
//!   block match like any other address (as in Calico and Cilium): a block
//!   that covers the pod CIDR admits those pods.
//! - Ports: protocol defaults to TCP; a number (with `endPort`, a range);
//!   a name resolves against the destination pod's named container ports
//!   (ingress: the selected pod; egress: each peer pod, including pods whose
//!   address lies in an ipBlock peer, as Calico does); an address that is no
//!   known pod never matches a named port; no port means every port of the
//!   protocol.
//! - Host-network pods have the node's address and are never peers by
//!   selector (they can still match an ipBlock).
//! - A pod reaching itself never leaves its namespace, so policy never
//!   applies to it; the node reaching its own pods is allowed elsewhere
//!   (the output hook is not filtered).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cells::{self, Cell, Entry};
pub use crate::compiler::Compiler;
use crate::model::{AttachmentKey, Labels, Model, NamedPort, PodKey};

/// Traffic direction relative to the selected pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    Ingress,
    Egress,
}

/// The compiled rules one or more pods share for one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub dir: Dir,
    /// Cells' `policy` indexes [`Compiled::policies`].
    pub v4: Vec<Cell<u32>>,
    pub v6: Vec<Cell<u128>>,
}

impl Group {
    /// A group that allows nothing (a spare chain's contents).
    pub fn empty(dir: Dir) -> Group {
        Group {
            dir,
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

/// A pod interface on this node with its groups (None: not isolated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    pub attachment: AttachmentKey,
    pub pod: Option<PodKey>,
    pub host_ifname: String,
    pub ips: Vec<IpAddr>,
    pub ingress: Option<String>,
    pub egress: Option<String>,
}

/// Everything the datapath needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub pods: Vec<PodRules>,
    /// Rule groups by name. A group's name stands for what shapes its
    /// contents (direction, selecting policies, the pod's named ports where
    /// they matter), not for the contents: when a peer changes, the group
    /// keeps its name and the datapath updates only the changed elements.
    pub groups: BTreeMap<String, Arc<Group>>,
    /// Counter name of each policy the compiler has seen, by the index
    /// cells carry (indexes stay put while policies come and go; only
    /// [`Compiled::counters`] lists the live ones); see [`counter_name`].
    pub policies: Vec<String>,
    /// Counter name → the policy it counts for.
    pub counters: BTreeMap<String, PodKey>,
}

impl Compiled {
    /// Would a new connection from `src` to `dst` (protocol, destination
    /// port) pass? Used to decide which conntrack entries a change cuts.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        let group_of = |ip: IpAddr, dir: Dir| {
            self.pods
                .iter()
                .find(|p| p.ips.contains(&ip))
                .map(|p| match dir {
                    Dir::Ingress => p.ingress.as_ref(),
                    Dir::Egress => p.egress.as_ref(),
                })
        };
        let check = |local: IpAddr, peer: IpAddr, dir: Dir| match group_of(local, dir) {
            // Not a local pod, or not isolated in this direction.
            None | Some(None) => true,
            Some(Some(id)) => self
                .groups
                .get(id)
                .is_some_and(|g| g.admits(peer, proto, port)),
        };
        check(src, dst, Dir::Egress) && check(dst, src, Dir::Ingress)
    }
}

impl Group {
    fn admits(&self, peer: IpAddr, proto: u8, port: u16) -> bool {
        fn hit<A: Ord + Copy>(cells: &[Cell<A>], a: A, proto: u8, port: u16) -> bool {
            cells.iter().any(|c| {
                c.addr.0 <= a
                    && a <= c.addr.1
                    && c.proto.0 <= proto
                    && proto <= c.proto.1
                    && c.port.0 <= port
                    && port <= c.port.1
            })
        }
        match peer {
            IpAddr::V4(a) => hit(&self.v4, u32::from(a), proto, port),
            IpAddr::V6(a) => hit(&self.v6, u128::from(a), proto, port),
        }
    }
}

/// The nftables counter that counts traffic a policy admitted.
pub fn counter_name(namespace: &str, name: &str) -> String {
    let mut h = Fnv::new();
    h.str(namespace);
    h.str("/");
    h.str(name);
    format!("p{:016x}", h.0)
}

pub(crate) struct Fnv(pub u64);
impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn str(&mut self, s: &str) {
        for &b in s.as_bytes() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Does `labels` satisfy `sel`? matchLabels and matchExpressions are ANDed;
/// an empty selector matches everything; an unknown operator matches
/// nothing (the API server rejects such policies anyway).
pub fn selects(sel: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        let value = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// A peer pod as a rule sees it.
struct PeerPod<'a> {
    ips: &'a [IpAddr],
    ports: &'a [NamedPort],
}

/// One addressable pod in the index.
struct Indexed<'m> {
    ns: &'m str,
    labels: &'m Labels,
    ips: Vec<IpAddr>,
    ports: &'m [NamedPort],
}

/// The pods and addresses known to this compile, indexed so that a
/// selector with matchLabels looks only at pods carrying its first label.
pub(crate) struct Book<'m> {
    model: &'m Model,
    pods: Vec<Indexed<'m>>,
    /// (key, value) → pods carrying that label.
    by_label: HashMap<(&'m str, &'m str), Vec<usize>>,
    /// namespace → its pods.
    by_ns: HashMap<&'m str, Vec<usize>>,
    ns_labels: HashMap<&'m str, Labels>,
    /// Resolved selector peers, by (policy namespace, peer) identity.
    peers: std::cell::RefCell<PeerCache>,
}

/// Selector peer (by address of policy namespace and peer) → matching pods.
type PeerCache = HashMap<(usize, usize), std::rc::Rc<Vec<usize>>>;

static NO_LABELS: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();

impl<'m> Book<'m> {
    pub(crate) fn new(model: &'m Model) -> Self {
        let no_labels = NO_LABELS.get_or_init(Labels::new);
        // Pod → addresses: the source's status IPs plus this node's attachments.
        let mut ips: BTreeMap<&'m PodKey, Vec<IpAddr>> = BTreeMap::new();
        for (k, p) in &model.pods {
            if !p.host_network && !p.ips.is_empty() {
                ips.insert(k, p.ips.clone());
            }
        }
        for a in model.attachments.values() {
            if let Some(k) = &a.pod {
                let v = ips.entry(k).or_default();
                for ip in &a.ips {
                    if !v.contains(ip) {
                        v.push(*ip);
                    }
                }
            }
        }
        let mut book = Book {
            model,
            pods: Vec::with_capacity(ips.len()),
            by_label: HashMap::new(),
            by_ns: HashMap::new(),
            ns_labels: HashMap::new(),
            peers: Default::default(),
        };
        for (k, ips) in ips {
            let pod = model.pods.get(k);
            let e = Indexed {
                ns: &k.0,
                labels: pod.map(|p| &p.labels).unwrap_or(no_labels),
                ips,
                ports: pod.map(|p| p.ports.as_slice()).unwrap_or_default(),
            };
            let i = book.pods.len();
            for (lk, lv) in e.labels {
                book.by_label
                    .entry((lk.as_str(), lv.as_str()))
                    .or_default()
                    .push(i);
            }
            book.by_ns.entry(e.ns).or_default().push(i);
            if !book.ns_labels.contains_key(e.ns) {
                book.ns_labels.insert(e.ns, model.namespace_labels(e.ns));
            }
            book.pods.push(e);
        }
        book
    }

    pub(crate) fn labels(&self, k: &PodKey) -> &Labels {
        self.model
            .pods
            .get(k)
            .map(|p| &p.labels)
            .unwrap_or_else(|| NO_LABELS.get_or_init(Labels::new))
    }

    /// Pods (with addresses) that one selector peer matches. Results are
    /// cached per peer object for the length of one compile.
    fn peer_pods(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Vec<PeerPod<'_>> {
        let id = (policy_ns.as_ptr() as usize, peer as *const _ as usize);
        let cached = self.peers.borrow().get(&id).cloned();
        let hits = match cached {
            Some(h) => h,
            None => {
                let h = std::rc::Rc::new(self.select(policy_ns, peer));
                self.peers.borrow_mut().insert(id, h.clone());
                h
            }
        };
        hits.iter()
            .map(|&i| PeerPod {
                ips: &self.pods[i].ips,
                ports: self.pods[i].ports,
            })
            .collect()
    }

    fn select(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Vec<usize> {
        let first_label = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|m| m.iter().next());
        let all: Vec<usize>;
        let candidates: &[usize] = match (first_label, &peer.namespace_selector) {
            (Some((k, v)), _) => self
                .by_label
                .get(&(k.as_str(), v.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default(),
            (None, None) => self
                .by_ns
                .get(policy_ns)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            (None, Some(_)) => {
                all = (0..self.pods.len()).collect();
                &all
            }
        };
        candidates
            .iter()
            .copied()
            .filter(|&i| {
                let p = &self.pods[i];
                let ns_ok = match &peer.namespace_selector {
                    None => p.ns == policy_ns,
                    Some(sel) => self.ns_labels.get(p.ns).is_some_and(|l| selects(sel, l)),
                };
                ns_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|sel| selects(sel, p.labels))
            })
            .collect()
    }
}

/// Which directions a policy applies to.
///
/// Unset (or empty) `policyTypes` is defaulted as the API server does:
/// Ingress, plus Egress when the egress list is non-empty. (The manifests
/// source gets objects the API server never defaulted.)
fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

/// (proto, port range) pairs one port entry allows on a destination pod
/// with `named` ports (None: the destination is not a pod, e.g. ipBlock).
fn port_ranges(p: &NetworkPolicyPort, named: Option<&[NamedPort]>) -> Vec<(u8, (u16, u16))> {
    let Some(proto) = proto_number(p.protocol.as_deref()) else {
        return Vec::new();
    };
    match &p.port {
        None => vec![(proto, (0, u16::MAX))],
        Some(IntOrString::Int(n)) => {
            let Ok(lo) = u16::try_from(*n) else {
                return Vec::new();
            };
            let hi = p.end_port.and_then(|e| u16::try_from(e).ok()).unwrap_or(lo);
            if hi < lo {
                return Vec::new();
            }
            vec![(proto, (lo, hi))]
        }
        Some(IntOrString::String(name)) => named
            .unwrap_or_default()
            .iter()
            .filter(|np| &np.name == name && proto_number(Some(&np.protocol)) == Some(proto))
            .map(|np| (proto, (np.port, np.port)))
            .collect(),
    }
}

fn cidr_ranges(cidr: &str) -> Option<IpNetwork> {
    cidr.parse::<IpNetwork>().ok()
}

/// Address ranges of an ipBlock: the CIDR minus its exceptions.
/// IPv4 and IPv6 address ranges.
type Ranges = (Vec<(u32, u32)>, Vec<(u128, u128)>);

fn block_ranges(cidr: &str, except: &[String]) -> Ranges {
    fn minus<A: cells::Addr>(mut ranges: Vec<(A, A)>, cut: (A, A)) -> Vec<(A, A)> {
        let mut out = Vec::new();
        for (lo, hi) in ranges.drain(..) {
            if cut.1 < lo || hi < cut.0 {
                out.push((lo, hi));
                continue;
            }
            if lo < cut.0 {
                out.push((lo, cut.0.prev()));
            }
            if let Some(n) = cut.1.next() {
                if n <= hi {
                    out.push((n, hi));
                }
            }
        }
        out
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    match cidr_ranges(cidr) {
        Some(IpNetwork::V4(n)) => {
            v4.push((u32::from(n.network()), u32::from(n.broadcast())));
            for e in except {
                if let Some(IpNetwork::V4(x)) = cidr_ranges(e) {
                    v4 = minus(v4, (u32::from(x.network()), u32::from(x.broadcast())));
                }
            }
        }
        Some(IpNetwork::V6(n)) => {
            let lo = u128::from(n.network());
            let hi = lo | (u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            v6.push((lo, hi));
            for e in except {
                if let Some(IpNetwork::V6(x)) = cidr_ranges(e) {
                    let xl = u128::from(x.network());
                    let xh = xl | (u128::MAX.checked_shr(u32::from(x.prefix())).unwrap_or(0));
                    v6 = minus(v6, (xl, xh));
                }
            }
        }
        None => {}
    }
    (v4, v6)
}

/// Collects allow entries for one rule of policy `pi` on the selected pod.
struct Collect {
    v4: Vec<Entry<u32>>,
    v6: Vec<Entry<u128>>,
}

impl Collect {
    fn addr(&mut self, ip: IpAddr, proto: (u8, u8), port: (u16, u16), policy: usize) {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.push(Entry {
                    addr: (a, a),
                    proto,
                    port,
                    policy,
                });
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.push(Entry {
                    addr: (a, a),
                    proto,
                    port,
                    policy,
                });
            }
        }
    }
}

const ANY_PROTO: (u8, u8) = (0, u8::MAX);
const ANY_PORT: (u16, u16) = (0, u16::MAX);

#[allow(clippy::too_many_arguments)] // one rule's whole context; a struct would only rename them
fn rule_entries(
    book: &Book<'_>,
    out: &mut Collect,
    pi: usize,
    policy_ns: &str,
    dir: Dir,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    selected_ports: &[NamedPort],
) {
    let ports = ports.filter(|p| !p.is_empty());
    // The (proto, port) pairs for a destination with `named` ports.
    let pairs = |named: Option<&[NamedPort]>| -> Vec<((u8, u8), (u16, u16))> {
        match ports {
            None => vec![(ANY_PROTO, ANY_PORT)],
            Some(ps) => ps
                .iter()
                .flat_map(|p| port_ranges(p, named))
                .map(|(pr, range)| ((pr, pr), range))
                .collect(),
        }
    };
    // Ingress: the destination is the selected pod; egress: the peer.
    let for_selected = pairs(Some(selected_ports));
    let dest_pairs = |peer_ports: Option<&[NamedPort]>| match dir {
        Dir::Ingress => for_selected.clone(),
        Dir::Egress => pairs(peer_ports),
    };
    let has_named = ports.is_some_and(|ps| {
        ps.iter()
            .any(|p| matches!(p.port, Some(IntOrString::String(_))))
    });
    // Every pod in every namespace, for resolving named ports.
    let any_pod = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        ..Default::default()
    };
    let peers = peers.filter(|p| !p.is_empty());
    let Some(peers) = peers else {
        // Every address. Named ports on egress cannot resolve against an
        // arbitrary address, but do against every known pod.
        for (proto, port) in dest_pairs(None) {
            out.v4.push(Entry {
                addr: (0, u32::MAX),
                proto,
                port,
                policy: pi,
            });
            out.v6.push(Entry {
                addr: (0, u128::MAX),
                proto,
                port,
                policy: pi,
            });
        }
        if dir == Dir::Egress && has_named {
            for pod in book.peer_pods(policy_ns, &any_pod) {
                for (proto, port) in pairs(Some(pod.ports)) {
                    for ip in pod.ips {
                        out.addr(*ip, proto, port, pi);
                    }
                }
            }
        }
        return;
    };
    for peer in peers {
        if let Some(block) = &peer.ip_block {
            let (v4, v6) = block_ranges(&block.cidr, block.except.as_deref().unwrap_or_default());
            for (proto, port) in dest_pairs(None) {
                out.v4.extend(v4.iter().map(|&addr| Entry {
                    addr,
                    proto,
                    port,
                    policy: pi,
                }));
                out.v6.extend(v6.iter().map(|&addr| Entry {
                    addr,
                    proto,
                    port,
                    policy: pi,
                }));
            }
            // A named port on egress resolves on each pod inside the block
            // (as Calico does): the block matches pod addresses anyway.
            if dir == Dir::Egress && has_named {
                let inside = |ip: &IpAddr| match ip {
                    IpAddr::V4(a) => v4
                        .iter()
                        .any(|r| r.0 <= u32::from(*a) && u32::from(*a) <= r.1),
                    IpAddr::V6(a) => v6
                        .iter()
                        .any(|r| r.0 <= u128::from(*a) && u128::from(*a) <= r.1),
                };
                for pod in book.peer_pods(policy_ns, &any_pod) {
                    for ip in pod.ips.iter().filter(|ip| inside(ip)) {
                        for (proto, port) in pairs(Some(pod.ports)) {
                            out.addr(*ip, proto, port, pi);
                        }
                    }
                }
            }
            continue;
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            continue; // an empty peer: rejected by the API server; matches nothing
        }
        for pod in book.peer_pods(policy_ns, peer) {
            for (proto, port) in dest_pairs(Some(pod.ports)) {
                for ip in pod.ips {
                    out.addr(*ip, proto, port, pi);
                }
            }
        }
    }
}

/// Compiles the model's policies for every pod attached on this node,
/// from scratch (the agent keeps a [`Compiler`] instead, which recompiles
/// only what a change can affect).
pub fn compile(model: &Model) -> Compiled {
    Compiler::default().compile(model, None)
}

/// One selecting policy as a group compile sees it.
pub(crate) struct Selecting<'a> {
    /// Index into [`Compiled::policies`].
    pub index: usize,
    pub namespace: &'a str,
    pub spec: &'a NetworkPolicySpec,
}

/// The rules of one direction of a policy: (peers, ports) per rule; None
/// when the policy does not apply to that direction.
type DirRules<'a> = Vec<(
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
)>;

pub(crate) fn dir_rules(spec: &NetworkPolicySpec, dir: Dir) -> Option<DirRules<'_>> {
    let (ing, eg) = policy_types(spec);
    match dir {
        Dir::Ingress if ing => Some(
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                .collect(),
        ),
        Dir::Egress if eg => Some(
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                .collect(),
        ),
        _ => None,
    }
}

fn has_named(ports: Option<&[NetworkPolicyPort]>) -> bool {
    ports.is_some_and(|ps| {
        ps.iter()
            .any(|p| matches!(p.port, Some(IntOrString::String(_))))
    })
}

/// Does an ingress rule of this policy use a named port (which resolves
/// on the selected pod, so the pod's own ports shape its group)?
pub(crate) fn named_ingress(spec: &NetworkPolicySpec) -> bool {
    dir_rules(spec, Dir::Ingress)
        .into_iter()
        .flatten()
        .any(|(_, ports)| has_named(ports))
}

/// Could a pod in `pod_ns` with `labels` (its namespace labelled
/// `ns_labels`) be one of the peers of this policy's `dir` rules? Used to
/// decide which cached groups a pod change makes stale; errs on the side
/// of yes (egress named ports resolve on every pod).
pub(crate) fn may_be_peer(
    spec: &NetworkPolicySpec,
    policy_ns: &str,
    dir: Dir,
    pod_ns: &str,
    labels: &Labels,
    ns_labels: &Labels,
) -> bool {
    let Some(rules) = dir_rules(spec, dir) else {
        return false;
    };
    rules.iter().any(|(peers, ports)| {
        let named_egress = dir == Dir::Egress && has_named(*ports);
        match peers.filter(|p| !p.is_empty()) {
            None => named_egress,
            Some(peers) => peers.iter().any(|peer| {
                if peer.ip_block.is_some() {
                    return named_egress;
                }
                if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
                    return false;
                }
                let ns_ok = match &peer.namespace_selector {
                    None => pod_ns == policy_ns,
                    Some(sel) => selects(sel, ns_labels),
                };
                ns_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|sel| selects(sel, labels))
            }),
        }
    })
}

/// Compiles one rule group: the union of the `dir` rules of `selecting`
/// for a pod whose named container ports are `own_ports`.
pub(crate) fn group_cells(
    book: &Book<'_>,
    dir: Dir,
    selecting: &[Selecting<'_>],
    own_ports: &[NamedPort],
) -> Group {
    let mut c = Collect {
        v4: Vec::new(),
        v6: Vec::new(),
    };
    // Entries carry the position in `selecting` (policies in key order),
    // so a cell covered by several policies is attributed the same way
    // however the indexes were assigned; then positions become indexes.
    for (pos, s) in selecting.iter().enumerate() {
        for (peers, ports) in dir_rules(s.spec, dir).into_iter().flatten() {
            rule_entries(book, &mut c, pos, s.namespace, dir, peers, ports, own_ports);
        }
    }
    fn index<A>(mut cells: Vec<Cell<A>>, selecting: &[Selecting<'_>]) -> Vec<Cell<A>> {
        for cell in &mut cells {
            cell.policy = selecting[cell.policy].index;
        }
        cells
    }
    Group {
        dir,
        v4: index(cells::disjoint(&c.v4), selecting),
        v6: index(cells::disjoint(&c.v6), selecting),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attachment, PodInfo};

    fn model_with(policy_yaml: &str) -> Model {
        let mut m = Model::new("n");
        for (i, name) in ["a", "b"].iter().enumerate() {
            let key = ("x".to_string(), name.to_string());
            let ip: IpAddr = format!("10.244.0.{}", i + 1).parse().expect("ip");
            m.pods.insert(
                key.clone(),
                PodInfo {
                    labels: [("pod".to_string(), name.to_string())].into(),
                    ports: vec![
                        NamedPort {
                            name: "serve-80-tcp".into(),
                            protocol: "TCP".into(),
                            port: 80,
                        },
                        NamedPort {
                            name: "serve-80-udp".into(),
                            protocol: "UDP".into(),
                            port: 80,
                        },
                    ],
                    ..PodInfo::default()
                },
            );
            m.attachments.insert(
                ("net".into(), name.to_string(), "eth0".into()),
                Attachment {
                    network: "net".into(),
                    container_id: name.to_string(),
                    ifname: "eth0".into(),
                    pod: Some(key),
                    host_ifname: format!("np{name}"),
                    ips: vec![ip],
                },
            );
        }
        for obj in crate::source::manifests::parse_objects(policy_yaml).expect("yaml") {
            m.apply(crate::source::Event::Apply(obj));
        }
        m
    }

    #[test]
    fn named_udp_port_from_anywhere() {
        let m = model_with(
            "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - {protocol: UDP, port: serve-80-udp}\n",
        );
        let c = compile(&m);
        let a: IpAddr = "10.244.0.1".parse().expect("ip");
        let b: IpAddr = "10.244.0.2".parse().expect("ip");
        assert!(c.allows(a, b, 17, 80));
        assert!(!c.allows(a, b, 6, 80));
        assert!(!c.allows(a, b, 17, 81));
    }
}
