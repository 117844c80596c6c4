//! Generated code for the `.proto` files nodeplane owns.
//!
//! Empty for now: the agent's local API (issue 3) and the CSI wire contract
//! (issue 5) will be compiled here. Nothing else belongs in this crate.
