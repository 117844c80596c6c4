//! The runtime library's one error type (what fails outside a request;
//! a request's failures are Dapr error bodies, see [`crate::dapr`]).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component or configuration manifest is unusable; the message
    /// names the file, the document and the field.
    #[error("{0}")]
    Manifest(String),
    /// The node's TLS material for agent-to-agent calls is unusable.
    #[error("peer TLS: {0}")]
    Tls(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
