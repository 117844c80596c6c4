//! The agent's in-memory picture of the cluster, fed by [`crate::source`]
//! events and by the CNI plugin's attachments. Only the fields policy needs
//! are kept, so two sources that deliver the same objects produce equal
//! models (`Model: PartialEq`), whatever else the objects carried.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};

use crate::source::{Event, Kind, Object, ObjectRef};

/// Labels as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// (namespace, name).
pub type PodKey = (String, String);

/// A container port that a named port in a policy can resolve to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    /// "TCP", "UDP" or "SCTP".
    pub protocol: String,
    pub port: u16,
}

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub labels: Labels,
    pub node_name: Option<String>,
    /// status.podIPs (or podIP); host-network pods are left out of peer
    /// sets, since their address is the node's.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<NamedPort>,
}

/// What the app runtime needs of a pod beyond policy: its `dapr.io/*`
/// annotations, whether it is ready, its addresses and its node's address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppMeta {
    pub annotations: BTreeMap<String, String>,
    pub ready: bool,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
}

/// A pod interface on this node, as the CNI plugin reported it (or as the
/// agent found it in the plugin's state after a restart).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub pod: Option<PodKey>,
    pub host_ifname: String,
    pub ips: Vec<IpAddr>,
}

/// (network, container ID, ifname).
pub type AttachmentKey = (String, String, String);

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<PodKey, PodInfo>,
    pub policies: BTreeMap<PodKey, NetworkPolicySpec>,
    /// This node's spec.podCIDRs, when the source delivers the Node.
    pub node_pod_cidrs: Vec<String>,
    pub attachments: BTreeMap<AttachmentKey, Attachment>,
    /// Kinds whose current list has completed.
    pub synced: BTreeSet<Kind>,
    /// Objects seen since the last `Reset` of a kind, while it relists.
    relisting: BTreeMap<Kind, BTreeSet<ObjectRef>>,
    node_name: String,
    /// The last [`Event::Revision`] applied.
    pub revision: String,
    /// Pods' app runtime facts; `apps_generation` counts their changes.
    pub apps: BTreeMap<PodKey, AppMeta>,
    pub apps_generation: u64,
    /// What changed since the compiler last took them.
    changes: Changes,
}

/// What changed in a model since [`Model::take_changes`] was last called:
/// what an incremental compile needs to know to recompile only the rule
/// groups a change can affect. Attachments are not tracked here (the agent
/// replaces them wholesale); the compiler compares them itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Each changed pod with its state before its first change (None: it
    /// did not exist).
    pub pods: BTreeMap<PodKey, Option<PodInfo>>,
    /// Policies added, changed or removed.
    pub policies: BTreeSet<PodKey>,
    /// A namespace's labels changed (or a namespace came or went).
    pub namespaces: bool,
}

/// Two models are equal when they hold the same cluster state, whichever
/// source built them and whatever revision markers it sent.
impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.namespaces == other.namespaces
            && self.pods == other.pods
            && self.policies == other.policies
            && self.node_pod_cidrs == other.node_pod_cidrs
            && self.attachments == other.attachments
            && self.synced == other.synced
    }
}

impl Model {
    /// A model for the node called `node_name` (only that Node's podCIDRs
    /// are taken).
    pub fn new(node_name: &str) -> Self {
        Model {
            node_name: node_name.to_string(),
            ..Model::default()
        }
    }

    /// Adds a pod the sources have not delivered yet, as the CRI shim
    /// reported it at RunPodSandbox (labels before the CNI ADD), so its
    /// policy is in place for its first packet. A source's own version
    /// replaces it when it comes; a relist without it removes it. False if
    /// the sources already know the pod.
    pub fn provisional_pod(&mut self, key: PodKey, info: PodInfo) -> bool {
        if self.pods.contains_key(&key) {
            return false;
        }
        self.changes.pods.entry(key.clone()).or_insert(None);
        self.pods.insert(key, info);
        true
    }

    /// Hands over what changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// True while a source is between `Reset` and `Synced` of some kind:
    /// the model then mixes the old list with part of the new one.
    pub fn is_relisting(&self) -> bool {
        !self.relisting.is_empty()
    }

    /// True once every kind has been listed completely.
    pub fn is_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// Applies one source event; true if the policy-relevant state changed.
    pub fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Reset(kind) => {
                self.relisting.insert(kind, BTreeSet::new());
                false
            }
            Event::Apply(obj) => {
                let key = obj.key();
                if let Some(seen) = self.relisting.get_mut(&key.kind) {
                    seen.insert(key);
                }
                self.put(obj)
            }
            Event::Delete(key) => self.remove(&key),
            Event::Revision(r) => {
                self.revision = r;
                false
            }
            Event::Synced(kind) => {
                let newly = self.synced.insert(kind);
                let mut changed = false;
                if let Some(seen) = self.relisting.remove(&kind) {
                    for key in self.keys(kind) {
                        if !seen.contains(&key) {
                            changed |= self.remove(&key);
                        }
                    }
                }
                changed || newly
            }
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectRef> {
        let r = |namespace: &str, name: &str| ObjectRef {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match kind {
            Kind::Pod => self.pods.keys().map(|(n, p)| r(n, p)).collect(),
            Kind::NetworkPolicy => self.policies.keys().map(|(n, p)| r(n, p)).collect(),
            Kind::Namespace => self.namespaces.keys().map(|n| r("", n)).collect(),
            Kind::Node if self.node_pod_cidrs.is_empty() => Vec::new(),
            Kind::Node => vec![r("", &self.node_name)],
        }
    }

    fn put(&mut self, obj: Object) -> bool {
        let key = obj.key();
        match obj {
            Object::Pod(pod) => {
                let info = pod_info(&pod);
                let key = (key.namespace, key.name);
                let meta = app_meta(&pod, &info);
                if self.apps.get(&key) != Some(&meta) {
                    self.apps.insert(key.clone(), meta);
                    self.apps_generation += 1;
                }
                let old = self.pods.get(&key).cloned();
                if old.as_ref() == Some(&info) {
                    return false;
                }
                self.changes.pods.entry(key.clone()).or_insert(old);
                self.pods.insert(key, info);
                true
            }
            Object::Namespace(ns) => {
                let changed = replace(&mut self.namespaces, key.name, namespace_labels(&ns));
                self.changes.namespaces |= changed;
                changed
            }
            Object::NetworkPolicy(np) => {
                let spec = policy_spec(&np);
                let key = (key.namespace, key.name);
                let changed = replace(&mut self.policies, key.clone(), spec);
                if changed {
                    self.changes.policies.insert(key);
                }
                changed
            }
            Object::Node(node) => {
                if key.name != self.node_name {
                    return false;
                }
                let cidrs = node_pod_cidrs(&node);
                let changed = cidrs != self.node_pod_cidrs;
                self.node_pod_cidrs = cidrs;
                changed
            }
        }
    }

    fn remove(&mut self, key: &ObjectRef) -> bool {
        let k = (key.namespace.clone(), key.name.clone());
        if key.kind == Kind::Pod && self.apps.remove(&k).is_some() {
            self.apps_generation += 1;
        }
        match key.kind {
            Kind::Pod => match self.pods.remove(&k) {
                Some(old) => {
                    self.changes.pods.entry(k).or_insert(Some(old));
                    true
                }
                None => false,
            },
            Kind::NetworkPolicy => {
                let removed = self.policies.remove(&k).is_some();
                if removed {
                    self.changes.policies.insert(k);
                }
                removed
            }
            Kind::Namespace => {
                let removed = self.namespaces.remove(&key.name).is_some();
                self.changes.namespaces |= removed;
                removed
            }
            Kind::Node if key.name == self.node_name => {
                !std::mem::take(&mut self.node_pod_cidrs).is_empty()
            }
            Kind::Node => false,
        }
    }

    /// Labels of a namespace, including the `kubernetes.io/metadata.name`
    /// label the API server sets on every namespace (so selectors by name
    /// work for namespaces a manifests directory does not declare).
    pub fn namespace_labels(&self, name: &str) -> Labels {
        let mut labels = self.namespaces.get(name).cloned().unwrap_or_default();
        labels.insert(NS_NAME_LABEL.into(), name.into());
        labels
    }
}

/// The label the API server puts on every namespace.
pub const NS_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn replace<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    match map.get(&key) {
        Some(old) if *old == value => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}

fn pod_info(pod: &Pod) -> PodInfo {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    // A finished pod no longer owns its address: the IP may already belong
    // to a new pod, so it must not keep matching selectors.
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        ips.clear();
    }
    let mut ports: Vec<NamedPort> = spec
        .map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    Some(NamedPort {
                        name: p.name.clone()?,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        port: u16::try_from(p.container_port).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    PodInfo {
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ports,
    }
}

fn app_meta(pod: &Pod, info: &PodInfo) -> AppMeta {
    let status = pod.status.as_ref();
    // No phase at all: a standalone manifest, whose pod runs once the CNI
    // plugin attached it.
    let running = matches!(
        status.and_then(|s| s.phase.as_deref()),
        None | Some("Running")
    );
    // Ready unless the kubelet says otherwise: standalone manifests often
    // carry a phase and no conditions.
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True");
    AppMeta {
        annotations: pod
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("dapr.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ready: running && ready_condition.unwrap_or(true),
        ips: info.ips.clone(),
        host_ip: status
            .and_then(|s| s.host_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
    }
}

fn namespace_labels(ns: &Namespace) -> Labels {
    ns.metadata.labels.clone().unwrap_or_default()
}

fn policy_spec(np: &NetworkPolicy) -> NetworkPolicySpec {
    np.spec.clone().unwrap_or_default()
}

fn node_pod_cidrs(node: &Node) -> Vec<String> {
    let spec = node.spec.as_ref();
    let mut cidrs = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    cidrs
}
