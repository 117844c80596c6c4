//! Generated code for the `.proto` files nodeplane owns.
//!
//! `agent`: the node agent's local API between nodeplane-cni and
//! nodeplane-agent (proto/agent.proto). The CSI wire contract (issue 5)
//! will be compiled here too. Nothing else belongs in this crate.

/// nodeplane.agent.v1: see proto/agent.proto for the framing.
#[allow(missing_debug_implementations, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/nodeplane.agent.v1.rs"));
}

pub use prost;
