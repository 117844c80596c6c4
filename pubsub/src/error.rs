//! The crate's one error type.

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The component's configuration is unusable; the message names the
    /// component, the metadata key and what to write instead.
    #[error("{0}")]
    Config(String),
    /// A topic or group name this backend cannot carry (e.g. a NATS
    /// wildcard); the message names it and the rule.
    #[error("{0}")]
    Invalid(String),
    /// The backing engine failed or is unreachable; the message names the
    /// component and the address or path.
    #[error("{0}")]
    Backend(String),
    /// The subscription or broker was closed.
    #[error("{0}")]
    Closed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
