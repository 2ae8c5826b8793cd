//! The one error type at the service boundary, and its one mapping to a gRPC
//! status (DESIGN.md, "Errors").
//!
//! Messages of client-facing variants are written for the client. Internal
//! failures keep their detail in the log and send the client only a generic
//! message, so nothing about our infrastructure (hosts, credentials, script
//! errors) leaks out.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A line that could not be served because there is not enough stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub sku: String,
    pub location: String,
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input; `field` names the offending field, e.g. `lines[2].sku`.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    #[error("not enough stock for {} line(s)", .0.len())]
    InsufficientStock(Vec<Shortage>),

    /// Unknown SKU(s) or unknown reservation.
    #[error("{0}")]
    NotFound(String),

    /// The reservation is in a state that does not allow the operation.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The id was used before with a different payload.
    #[error("{0}")]
    AlreadyExists(String),

    /// Compare-and-set on the item's version failed.
    #[error("version mismatch: expected {expected}, current {current}")]
    VersionMismatch { expected: i64, current: i64 },

    /// Redis is unreachable.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// A partition's unflushed backlog is over its limit (Postgres is behind).
    #[error("backlog over its limit: {0}")]
    Backlogged(String),

    #[error("missing or invalid token")]
    Unauthenticated,

    /// A position that is no longer (or never was) available, e.g. a Watch
    /// resume id older than the retained stream.
    #[error("{0}")]
    OutOfRange(String),

    /// A client that cannot keep up, e.g. a watcher whose queue is full.
    #[error("{0}")]
    ResourceExhausted(String),

    /// This instance is stopping; the message says how to go on.
    #[error("{0}")]
    ShuttingDown(String),

    /// Anything else: a bug, a corrupted record, an unexpected reply.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Error codes Redis answers while it cannot serve for now: loading its
/// data after a restart, a replica not (yet) promoted, a master without its
/// replicas, out of memory under `noeviction`, a script or a cluster
/// reconfiguration in the way. Retrying later is the right answer.
const TRANSIENT_REDIS_CODES: [&str; 10] = [
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "OOM",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY",
    "NOREPLICAS",
    "MOVED",
    "ASK",
];

/// Whether a Redis error means "try again later" rather than a bug.
pub fn is_transient_redis_error(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
        || err
            .code()
            .is_some_and(|code| TRANSIENT_REDIS_CODES.contains(&code))
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        // Connection-level failures and Redis' transient states mean "try
        // again later"; anything else the server answered with an error is a
        // bug on our side (a script error, a type mismatch) and must not be
        // retried blindly.
        if is_transient_redis_error(&err) {
            Error::Unavailable(format!("redis: {err}"))
        } else {
            Error::Internal(format!("redis: {err}"))
        }
    }
}

impl From<sqlx::Error> for Error {
    /// Postgres unreachable is "retry later"; anything else (a bug, a
    /// constraint) is internal.
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Error::Unavailable(format!("postgres: {err}")),
            other => Error::Internal(format!("postgres: {other}")),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid {field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::InsufficientStock(shortages) => {
                let mut details = ErrorDetails::new();
                for s in &shortages {
                    details.add_precondition_failure_violation(
                        "STOCK",
                        format!("{}/{}", s.location, s.sku),
                        format!("requested {}, available {}", s.requested, s.available),
                    );
                }
                let subjects: Vec<String> = shortages
                    .iter()
                    .map(|s| format!("{}/{}", s.location, s.sku))
                    .collect();
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("not enough stock: {}", subjects.join(", ")),
                    details,
                )
            }
            Error::NotFound(msg) => Status::not_found(msg),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::AlreadyExists(msg) => Status::already_exists(msg),
            err @ Error::VersionMismatch { .. } => Status::aborted(err.to_string()),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "answering UNAVAILABLE");
                Status::unavailable("stock store unavailable, retry later")
            }
            Error::Backlogged(detail) => {
                tracing::warn!(%detail, "refusing new demand: flush backlog over its limit");
                Status::unavailable("too many changes not yet written to Postgres, retry later")
            }
            Error::Unauthenticated => Status::unauthenticated("missing or invalid token"),
            Error::OutOfRange(msg) => Status::out_of_range(msg),
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
            Error::ShuttingDown(msg) => Status::unavailable(msg),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
