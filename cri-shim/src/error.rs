//! The shim's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value that cannot work; the message names the flag.
    #[error("configuration: {0}")]
    Config(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The runtime's socket did not accept an HTTP/2 connection.
    #[error("runtime endpoint {path}: {reason}")]
    Runtime { path: PathBuf, reason: String },

    /// A message the shim had to decode (a hooked method) did not parse.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// The agent's local API did not take an event.
    #[error("agent {path}: {reason}")]
    Agent { path: PathBuf, reason: String },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Error::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
