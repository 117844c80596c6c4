//! nodeplane-cni: the CNI plugin containerd and CRI-O execute for every pod.
//!
//! Routed veth wiring (no bridge), on-disk IPAM, and every verb of CNI spec
//! 1.1.0 (ADD, DEL, CHECK, GC, STATUS, VERSION) for configurations of
//! cniVersion 0.3.0 through 1.1.0.
//!
//! This crate must stay small and fast to start: it runs once per pod
//! operation on the pod start-up path, so it uses no async runtime, and it
//! never waits for the node agent (the data path works with the agent down).

pub mod agent;
pub mod config;
pub mod conflist;
pub mod error;
pub mod fast;
pub mod invocation;
pub mod ipam;
pub mod log;
pub mod netlink;
pub mod plugin;
pub mod result;
pub mod version;
pub mod wiring;

pub use error::{Error, Result};
pub use plugin::{run, Outcome};
