//! nodeplane-agent: the per-node daemon.
//!
//! Sources ([`source`]) feed one [`model::Model`]; [`policy`] compiles the
//! model's NetworkPolicies for this node's pods into rule groups, and
//! [`nft`] keeps nodeplane's nftables table equal to them, one atomic
//! transaction per change. The CNI plugin reaches the agent through the
//! local API in [`api`]. The data path never waits for the agent: the
//! plugin adds and deletes pods without it.

pub mod error;
pub mod model;
pub mod source;

pub use error::{Error, Result};
