//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The etag given does not match the stored one (Dapr answers 409).
    #[error(
        "possible etag mismatch for key {key}: the item was changed or deleted since it was read"
    )]
    EtagMismatch { key: String },
    /// The etag given is not one this store could have issued (Dapr answers 400).
    #[error("invalid etag {etag:?} for key {key}")]
    EtagInvalid { key: String, etag: String },
    /// The component's configuration is unusable; the message names the field.
    #[error("{0}")]
    Config(String),
    /// The backing engine failed or is unreachable.
    #[error("{0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
