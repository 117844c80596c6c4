//! The agent library's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("nftables: {0}")]
    Nft(String),
    #[error("conntrack: {0}")]
    Conntrack(String),
    #[error("Kubernetes API: {0}")]
    Kube(String),
    #[error("local API: {0}")]
    Api(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
