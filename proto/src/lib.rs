//! Generated code for the `.proto` files nodeplane owns.
//!
//! `agent`: the node agent's local API between nodeplane-cni and
//! nodeplane-agent (proto/agent.proto). With the `csi` feature: `csi`, the
//! CSI v1 wire contract (proto/csi.proto), and `pluginregistration`, the
//! kubelet's plugin-registration API, both with tonic clients and servers.
//! Nothing else belongs in this crate.

/// nodeplane.agent.v1: see proto/agent.proto for the framing.
#[allow(missing_debug_implementations, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/nodeplane.agent.v1.rs"));
}

/// csi.v1: the Container Storage Interface (see proto/csi.proto).
#[cfg(feature = "csi")]
#[allow(missing_debug_implementations, clippy::all)]
pub mod csi {
    include!(concat!(env!("OUT_DIR"), "/csi.v1.rs"));
}

/// pluginregistration (kubelet plugin watcher API v1).
#[cfg(feature = "csi")]
#[allow(missing_debug_implementations, clippy::all)]
pub mod pluginregistration {
    include!(concat!(env!("OUT_DIR"), "/pluginregistration.rs"));
}

pub use prost;
#[cfg(feature = "csi")]
pub use prost_types;
#[cfg(feature = "csi")]
pub use tonic;
