//! nodeplane-agent: the per-node daemon.
//!
//! Sources ([`source`]) feed one [`model::Model`]; [`policy`] compiles the
//! model's NetworkPolicies for this node's pods into rule groups, and
//! [`nft`] keeps nodeplane's nftables table equal to them, one atomic
//! transaction per change ([`agent`] runs that loop; [`conntrack`] cuts
//! connections a change denies). The CNI plugin reaches the agent through
//! the local API in [`api`]; [`http`] serves health and metrics;
//! [`lifecycle`] keeps the pods the CRI shim reports; [`runtime`] serves
//! the app runtime (nodeplane-runtime) from the same model, and
//! [`secrets`] its Kubernetes Secrets. The data
//! path never waits for the agent: the plugin adds and deletes pods
//! without it.

pub mod agent;
pub mod api;
pub mod cells;
pub mod compiler;
pub mod config;
pub mod conntrack;
pub mod error;
pub mod http;
pub mod lifecycle;
pub mod model;
pub mod nft;
pub mod nftnl;
pub mod policy;
pub mod run;
pub mod runtime;
pub mod secrets;
pub mod source;

pub use error::{Error, Result};
