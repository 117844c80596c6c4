//! The crate's one error type and its mapping to the gRPC codes the CSI
//! spec requires per RPC.

use tonic::{Code, Status};

/// Every failure of the driver. The variant decides the gRPC code; the
/// message names the volume, field or path and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a value is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or source does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name exists with incompatible parameters, or an incompatible
    /// re-publish/re-stage.
    #[error("{0}")]
    AlreadyExists(String),
    /// A capacity the driver cannot provide (below the minimum, above the
    /// limit, a shrink).
    #[error("{0}")]
    OutOfRange(String),
    /// The pool has no room for it, or the topology cannot be met.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The call is valid but the volume is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume (or name) is in progress.
    #[error("{0}")]
    Aborted(String),
    /// Not offered by this driver.
    #[error("{0}")]
    Unimplemented(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// An external tool (mkfs, losetup, btrfs, ...) failed.
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    /// A metadata file that cannot be read back.
    #[error("metadata {path}: {message}")]
    Metadata { path: String, message: String },
    /// A bad flag or configuration value.
    #[error("{0}")]
    Config(String),
    /// The gRPC server could not start or stopped with an error.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A call made by the client ([`crate::client`]) was answered with an
    /// error.
    #[error("{call}: {code}: {message}")]
    Rpc {
        call: &'static str,
        code: String,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            // A full pool discovered while writing is still "does not fit".
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Code::ResourceExhausted
            }
            Error::Io { .. } | Error::Command { .. } | Error::Metadata { .. } => Code::Internal,
            Error::Config(_) | Error::Transport(_) | Error::Rpc { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
