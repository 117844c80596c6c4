//! nodeplane-cri-shim: a faithful relay between the kubelet and containerd
//! that reports pod and container lifecycle to the node agent and injects
//! the node runtime's socket and the pod's identity into containers.
//!
//! The relay works at the HTTP/2 level: by default ([`frames`]) each kubelet
//! connection's frames are forwarded over a containerd connection of its
//! own, with header blocks only decoded; `--relay h2` ([`relay`]) ends
//! HTTP/2 on both sides and forwards each call by its gRPC path with its
//! metadata, deadline and frames. Either way methods our compiled CRI does
//! not know, and streams, pass as they are.
//! Seven lifecycle methods are decoded to tell the agent ([`deliver`]);
//! only CreateContainer is changed, by appending to its bytes
//! ([`inject`]), never by re-encoding.
//!
//! What it must not do: hold a lock across calls, make a call wait for the
//! agent beyond the hook time box, lose a field of a message it forwards,
//! or keep state that a restart would need (containers belong to the
//! runtime; a shim restart affects none of them).

pub mod body;
pub mod config;
pub mod deliver;
pub mod error;
pub mod frames;
pub mod grpc;
pub mod hpack;
pub mod inject;
pub mod io;
pub mod metrics;
pub mod pods;
pub mod relay;
pub mod resync;
pub mod sched;
pub mod server;
pub mod unary;
pub mod upstream;

pub use config::{Args, Config};
pub use error::{Error, Result};
pub use server::run;
