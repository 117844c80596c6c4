//! The crate's one error type, and its mapping onto the CNI spec's error codes.
//!
//! Every variant carries the context a user needs to act: which variable, which
//! field, which path, and what to do about it. `code()` maps a variant to the
//! well-known code the spec reserves for it (or a plugin-specific code >= 100).

use std::path::PathBuf;

/// Well-known CNI error codes (spec 1.1.0, "Error" result type), plus the
/// plugin-specific ones nodeplane defines (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// nodeplane: the attachment (container ID, ifname) is already wired.
    pub const ALREADY_ATTACHED: u32 = 100;
    /// nodeplane: the pod CIDRs have no free address left.
    pub const POOL_EXHAUSTED: u32 = 101;
    /// nodeplane: a kernel operation (netlink, sysctl) failed.
    pub const KERNEL: u32 = 102;
    /// nodeplane: CHECK found the attachment differs from what ADD made.
    pub const DRIFT: u32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("environment variable {var}: {problem}")]
    Env { var: &'static str, problem: String },

    #[error("cannot read the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),

    #[error("the network configuration is not valid JSON: {0} (check the file the runtime read, e.g. /etc/cni/net.d/*.conflist)")]
    Decode(#[source] serde_json::Error),

    #[error("prevResult cannot be decoded: {0}")]
    PrevResult(String),

    #[error("cniVersion {version:?} is not supported; use one of {supported}")]
    Version { version: String, supported: String },

    #[error("{verb} needs cniVersion {minimum} or later, the configuration says {version}")]
    VerbVersion {
        verb: &'static str,
        minimum: &'static str,
        version: String,
    },

    #[error("invalid configuration field {field:?}: {problem}")]
    Config { field: String, problem: String },

    #[error("container {container_id} already has interface {ifname} in network {network} ({detail}); the runtime must DEL it before adding it again")]
    AlreadyAttached {
        container_id: String,
        ifname: String,
        network: String,
        detail: String,
    },

    #[error("no free address left in {cidr} (network {network}); DEL or GC stale pods, or give the node a larger pod CIDR")]
    PoolExhausted { network: String, cidr: String },

    #[error("IPAM state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "IPAM state {path} is corrupt: {problem}; move the file aside and run GC to rebuild it"
    )]
    CorruptState { path: PathBuf, problem: String },

    #[error("timed out after {waited_ms} ms waiting for the IPAM lock {path}; another invocation holds it, try again")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
    #[error("podCIDRs is not in the configuration and nodeplane-agent has not left the node's pod CIDRs in {path} ({why}); start the agent (it takes them from Node.spec.podCIDRs or --pod-cidr) or set podCIDRs in the configuration")]
    PodCidrsPending { path: PathBuf, why: String },

    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: std::io::Error,
    },

    #[error("sysctl {key}: {source}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },

    #[error("CHECK found drift: {0}")]
    Drift(String),

    #[error("STATUS: {0}")]
    NotAvailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::Env { .. } => code::INVALID_ENV,
            Error::Stdin(_) | Error::State { .. } | Error::CorruptState { .. } => code::IO_FAILURE,
            Error::Decode(_) | Error::PrevResult(_) => code::DECODE,
            Error::Version { .. } | Error::VerbVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::Config { .. } => code::INVALID_CONFIG,
            Error::AlreadyAttached { .. } => code::ALREADY_ATTACHED,
            Error::PoolExhausted { .. } => code::POOL_EXHAUSTED,
            Error::LockTimeout { .. } => code::TRY_AGAIN_LATER,
            Error::PodCidrsPending { .. } => code::TRY_AGAIN_LATER,
            Error::Netns { .. } => code::UNKNOWN_CONTAINER,
            Error::Netlink { .. } | Error::Sysctl { .. } => code::KERNEL,
            Error::Drift(_) => code::DRIFT,
            Error::NotAvailable(_) => code::NOT_AVAILABLE,
        }
    }

    /// The short `msg` of the CNI error object.
    pub fn summary(&self) -> &'static str {
        match self {
            Error::Env { .. } => "invalid environment variables",
            Error::Stdin(_) => "I/O failure",
            Error::State { .. } | Error::CorruptState { .. } => "IPAM state failure",
            Error::Decode(_) | Error::PrevResult(_) => "failed to decode content",
            Error::Version { .. } | Error::VerbVersion { .. } => "incompatible CNI version",
            Error::Config { .. } => "invalid network configuration",
            Error::AlreadyAttached { .. } => "attachment already exists",
            Error::PoolExhausted { .. } => "address pool exhausted",
            Error::LockTimeout { .. } | Error::PodCidrsPending { .. } => "try again later",
            Error::Netns { .. } => "container network namespace unusable",
            Error::Netlink { .. } | Error::Sysctl { .. } => "kernel operation failed",
            Error::Drift(_) => "attachment drifted",
            Error::NotAvailable(_) => "plugin not available",
        }
    }

    /// Shorthand for a configuration error.
    pub fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Shorthand for an IPAM state I/O error.
    pub fn state(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::State {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a netlink error.
    pub fn netlink(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The spec's error object, in the configuration's cniVersion.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.summary(),
            "details": self.to_string(),
        })
    }
}
