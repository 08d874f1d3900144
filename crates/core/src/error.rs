//! The one error type shared by backends and stages.
//!
//! It is `Clone` because one failure often has several observers: every reader waiting on a
//! shared chunk fetch, every caller of `Puller::wait`.

use std::sync::Arc;
use std::time::Duration;

/// Result alias used across r3map.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with a backend or stage operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request reaches past the end of the resource.
    #[error("request of {len} bytes at offset {offset} reaches past the end of the {size}-byte resource")]
    OutOfBounds { offset: u64, len: u64, size: u64 },

    /// The request does not start and end on chunk (or block) boundaries.
    #[error("request of {len} bytes at offset {offset} is not aligned to {alignment}-byte chunks; put an `Arbitrary` stage in front to accept unaligned I/O")]
    Unaligned { offset: u64, len: u64, alignment: u64 },

    /// The request is larger than the stage or server allows.
    #[error("request of {len} bytes exceeds the maximum of {max} bytes per request")]
    TooLarge { len: u64, max: u64 },

    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The resource does not accept writes.
    #[error("the resource is read-only")]
    ReadOnly,

    /// The stage or backend was closed.
    #[error("the resource has been closed")]
    Closed,

    /// A remote operation did not complete in time.
    #[error("the remote did not answer within {0:?}")]
    Timeout(Duration),

    /// The remote side reported an error or broke the protocol.
    #[error("remote error: {0}")]
    Remote(String),

    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Io(Arc::new(err))
    }
}

impl Error {
    /// Whether the error means the connection to a remote is gone (so reconnecting and retrying
    /// may help), as opposed to the remote refusing the request.
    pub fn is_connection_loss(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            Error::Closed => true,
            Error::Io(err) => matches!(
                err.kind(),
                ConnectionAborted
                    | ConnectionReset
                    | ConnectionRefused
                    | BrokenPipe
                    | UnexpectedEof
                    | NotConnected
            ),
            _ => false,
        }
    }

    /// The errno a kernel-facing frontend (FUSE, NBD, userfaultfd) reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::OutOfBounds { .. } | Error::Unaligned { .. } | Error::InvalidConfig(_) => libc::EINVAL,
            Error::TooLarge { .. } => libc::EOVERFLOW,
            Error::ReadOnly => libc::EPERM,
            Error::Closed => libc::ESHUTDOWN,
            Error::Timeout(_) | Error::Remote(_) => libc::EIO,
            Error::Io(err) => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
