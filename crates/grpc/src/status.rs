//! Errors across the wire: each r3map error becomes a gRPC status with a clear code and
//! message, plus a [`WireError`] in the status details so an r3map peer gets the same typed
//! error back (a leecher must tell a stale session from a lost connection). A Go peer sees the
//! code and message.

use std::time::Duration;

use prost::Message;
use r3map_core::Error;
use r3map_migration::{MigrationError, SessionId};
use tonic::{Code, Status};

use crate::pb::ext::WireError;

fn status(code: Code, message: String, wire: WireError) -> Status {
    Status::with_details(code, message, wire.encode_to_vec().into())
}

fn wire(kind: &str) -> WireError {
    WireError {
        kind: kind.to_owned(),
        ..WireError::default()
    }
}

/// The status for a backend error.
pub fn from_core(err: &Error) -> Status {
    let message = err.to_string();
    match err {
        Error::OutOfBounds { offset, len, size } => status(
            Code::OutOfRange,
            message,
            WireError {
                offset: *offset,
                length: *len,
                limit: *size,
                ..wire("out-of-bounds")
            },
        ),
        Error::Unaligned {
            offset,
            len,
            alignment,
        } => status(
            Code::InvalidArgument,
            message,
            WireError {
                offset: *offset,
                length: *len,
                limit: *alignment,
                ..wire("unaligned")
            },
        ),
        Error::TooLarge { len, max } => status(
            Code::InvalidArgument,
            message,
            WireError {
                length: *len,
                limit: *max,
                ..wire("too-large")
            },
        ),
        Error::InvalidConfig(detail) => status(
            Code::InvalidArgument,
            message,
            WireError {
                detail: detail.clone(),
                ..wire("invalid-config")
            },
        ),
        Error::ReadOnly => status(Code::PermissionDenied, message, wire("read-only")),
        Error::Closed => status(Code::Unavailable, message, wire("closed")),
        Error::Timeout(limit) => status(
            Code::DeadlineExceeded,
            message,
            WireError {
                limit: limit.as_nanos() as u64,
                ..wire("timeout")
            },
        ),
        Error::Remote(detail) => status(
            Code::Unknown,
            message,
            WireError {
                detail: detail.clone(),
                ..wire("remote")
            },
        ),
        Error::Io(io) => status(
            Code::Internal,
            message,
            WireError {
                detail: io.to_string(),
                offset: io.raw_os_error().unwrap_or(0) as u64,
                ..wire("io")
            },
        ),
    }
}

/// The status for a migration error.
pub fn from_migration(err: &MigrationError) -> Status {
    let message = err.to_string();
    match err {
        MigrationError::Backend(err) => from_core(err),
        MigrationError::StaleSession { session } => status(
            Code::FailedPrecondition,
            message,
            WireError {
                session: session.0,
                ..wire("stale-session")
            },
        ),
        MigrationError::WrongPhase { call, phase } => status(
            Code::FailedPrecondition,
            message,
            WireError {
                call: (*call).to_owned(),
                detail: phase.clone(),
                ..wire("wrong-phase")
            },
        ),
        MigrationError::HandedOff { session } => status(
            Code::FailedPrecondition,
            message,
            WireError {
                session: session.0,
                ..wire("handed-off")
            },
        ),
        MigrationError::Application { action, reason } => status(
            Code::Internal,
            message,
            WireError {
                call: (*action).to_owned(),
                detail: reason.clone(),
                ..wire("application")
            },
        ),
        MigrationError::Incomplete { missing, total } => status(
            Code::DataLoss,
            message,
            WireError {
                chunks: missing.clone(),
                total: *total,
                ..wire("incomplete")
            },
        ),
        MigrationError::VerificationFailed { differing } => status(
            Code::DataLoss,
            message,
            WireError {
                chunks: differing.clone(),
                ..wire("verification-failed")
            },
        ),
        MigrationError::Timeout { step, limit } => status(
            Code::DeadlineExceeded,
            message,
            WireError {
                call: (*step).to_owned(),
                limit: limit.as_nanos() as u64,
                ..wire("migration-timeout")
            },
        ),
        MigrationError::InvalidConfig(detail) => status(
            Code::InvalidArgument,
            message,
            WireError {
                detail: detail.clone(),
                ..wire("migration-invalid-config")
            },
        ),
    }
}

/// Names the error types hold as `&'static str`, recovered from the wire by value.
const STATIC_NAMES: &[&str] = &[
    "abort",
    "read",
    "track",
    "a pre-copy round",
    "sync",
    "commit",
    "hashes",
    "close",
    "complete",
    "seeding onward",
    "suspend",
    "resume",
    "flush",
];

fn static_name(name: &str) -> &'static str {
    STATIC_NAMES
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or("a call")
}

fn decode(status: &Status) -> Option<WireError> {
    if status.details().is_empty() {
        return None;
    }
    WireError::decode(status.details()).ok()
}

/// The backend error for a failed call. `timeout` is the client's deadline, reported when the
/// call ran out of time.
pub fn to_core(status: &Status, timeout: Duration) -> Error {
    if let Some(wire) = decode(status) {
        if let Some(err) = core_from_wire(&wire) {
            return err;
        }
        if let Some(err) = migration_from_wire(&wire) {
            return err.into();
        }
    }
    let lost = || {
        Error::Io(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            status.message().to_owned(),
        )))
    };
    // A status with a cause was made on this side from a transport failure (the connection
    // broke mid-call: tonic reports it as UNKNOWN "transport error"); a peer's own statuses
    // carry no cause.
    if std::error::Error::source(status).is_some() {
        return lost();
    }
    match status.code() {
        // The connection is gone (or never came up): reconnecting and retrying may help.
        Code::Unavailable | Code::Cancelled | Code::Aborted => lost(),
        Code::DeadlineExceeded => Error::Timeout(timeout),
        Code::Unauthenticated => Error::Remote(format!(
            "the server refused the credentials: {} (check --token-file)",
            status.message()
        )),
        Code::PermissionDenied => Error::ReadOnly,
        Code::Unimplemented => Error::Remote(format!(
            "the server does not offer this call ({}); is it an r3map gRPC server of this version?",
            status.message()
        )),
        _ => Error::Remote(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn core_from_wire(wire: &WireError) -> Option<Error> {
    Some(match wire.kind.as_str() {
        "out-of-bounds" => Error::OutOfBounds {
            offset: wire.offset,
            len: wire.length,
            size: wire.limit,
        },
        "unaligned" => Error::Unaligned {
            offset: wire.offset,
            len: wire.length,
            alignment: wire.limit,
        },
        "too-large" => Error::TooLarge {
            len: wire.length,
            max: wire.limit,
        },
        "invalid-config" => Error::InvalidConfig(wire.detail.clone()),
        "read-only" => Error::ReadOnly,
        "closed" => Error::Closed,
        "timeout" => Error::Timeout(Duration::from_nanos(wire.limit)),
        "remote" => Error::Remote(wire.detail.clone()),
        "io" => Error::Io(std::sync::Arc::new(match wire.offset {
            0 => std::io::Error::other(wire.detail.clone()),
            errno => std::io::Error::from_raw_os_error(errno as i32),
        })),
        _ => return None,
    })
}

fn migration_from_wire(wire: &WireError) -> Option<MigrationError> {
    Some(match wire.kind.as_str() {
        "stale-session" => MigrationError::StaleSession {
            session: SessionId(wire.session),
        },
        "wrong-phase" => MigrationError::WrongPhase {
            call: static_name(&wire.call),
            phase: wire.detail.clone(),
        },
        "handed-off" => MigrationError::HandedOff {
            session: SessionId(wire.session),
        },
        "application" => MigrationError::Application {
            action: static_name(&wire.call),
            reason: wire.detail.clone(),
        },
        "incomplete" => MigrationError::Incomplete {
            missing: wire.chunks.clone(),
            total: wire.total,
        },
        "verification-failed" => MigrationError::VerificationFailed {
            differing: wire.chunks.clone(),
        },
        "migration-timeout" => MigrationError::Timeout {
            step: static_name(&wire.call),
            limit: Duration::from_nanos(wire.limit),
        },
        "migration-invalid-config" => MigrationError::InvalidConfig(wire.detail.clone()),
        _ => return None,
    })
}

/// The migration error for a failed call.
pub fn to_migration(status: &Status, timeout: Duration) -> MigrationError {
    if let Some(err) = decode(status).as_ref().and_then(migration_from_wire) {
        return err;
    }
    MigrationError::Backend(to_core(status, timeout))
}
