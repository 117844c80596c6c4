//! Where the desired state comes from. Two interchangeable sources emit the
//! same [`Event`]s into one channel: the Kubernetes API through kube-rs
//! watches ([`kube`]), or a directory of YAML manifests ([`manifests`]) in
//! standalone mode. The [`crate::model::Model`] applies the events; it never
//! knows which source sent them.
//!
//! [`dapr`] is the API side of the app runtime's components: Dapr's
//! Components and Configurations, which the model does not hold.

pub mod dapr;
pub mod kube;
pub mod manifests;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// The kinds of object the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy, Kind::Node];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
        }
    }
}

/// One object as a source delivers it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
        }
    }

    /// (namespace, name); the namespace is empty for cluster-scoped kinds.
    pub fn key(&self) -> ObjectRef {
        let meta = match self {
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        };
        ObjectRef {
            kind: self.kind(),
            namespace: match self.kind() {
                Kind::Namespace | Kind::Node => String::new(),
                _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Identifies an object of a kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    /// Empty for Namespace and Node.
    pub namespace: String,
    pub name: String,
}

/// What a source tells the model. A (re)list of a kind is `Reset(kind)`,
/// then `Apply` for every object, then `Synced(kind)`: objects of that kind
/// not applied between the two are deleted at `Synced`. Between lists,
/// `Apply` and `Delete` are single changes.
#[derive(Debug, Clone)]
pub enum Event {
    Reset(Kind),
    Apply(Object),
    Delete(ObjectRef),
    Synced(Kind),
    /// A marker: everything the source has read up to this revision has
    /// been sent. The agent reports the last revision it has programmed
    /// into the kernel (`/status`), so a caller that changed the source can
    /// wait for its change to be in force. The manifests source sends a
    /// digest of the directory ([`manifests::digest_dir`]).
    Revision(String),
}
