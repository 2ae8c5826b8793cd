//! The one error type at the service boundary, and its one mapping to a gRPC
//! status (DESIGN.md, "Errors").
//!
//! Messages of client-facing variants are written for the client. Internal
//! failures keep their detail in the log and send the client only a generic
//! message, so nothing about our infrastructure (hosts, credentials, script
//! errors) leaks out.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo` domain of every reason stockd sends.
pub const ERROR_DOMAIN: &str = "stockd.v1";

/// A line that could not be served because there is not enough stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub sku: String,
    pub location: String,
    pub requested: i64,
    pub available: i64,
}

/// An item a request names that exists in neither Redis nor Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownItem {
    pub sku: String,
    pub location: String,
}

/// The state of a reservation that no longer holds stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedState {
    Committed,
    Released,
    Expired,
}

impl ClosedState {
    /// The state as the reservation record spells it.
    pub fn parse(state: &str) -> Option<Self> {
        match state {
            "committed" => Some(ClosedState::Committed),
            "released" => Some(ClosedState::Released),
            "expired" => Some(ClosedState::Expired),
            _ => None,
        }
    }
}

impl fmt::Display for ClosedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClosedState::Committed => "committed",
            ClosedState::Released => "released",
            ClosedState::Expired => "expired",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input; `field` names the offending field, e.g. `lines[2].sku`.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    #[error("not enough stock for {} line(s)", .0.len())]
    InsufficientStock(Vec<Shortage>),

    /// Something the request names does not exist (for items and
    /// reservations, the variants below say which).
    #[error("{0}")]
    NotFound(String),

    #[error("unknown item(s): {}", names(.0))]
    UnknownItems(Vec<UnknownItem>),

    #[error("unknown reservation {0}")]
    UnknownReservation(String),

    /// The reservation was committed, released or has expired, and the
    /// operation does not apply to it.
    #[error("reservation {id} is {state}")]
    ReservationClosed { id: String, state: ClosedState },

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

    /// Too many requests in flight on this instance: shed, retry with backoff.
    #[error("too many requests in flight; retry with backoff")]
    Overloaded,

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

/// `location/sku, ...`, the way messages name items.
fn names(items: &[UnknownItem]) -> String {
    let names: Vec<String> = items
        .iter()
        .map(|i| format!("{}/{}", i.location, i.sku))
        .collect();
    names.join(", ")
}

/// How long a client should wait before retrying a refusal that will pass:
/// Redis back, the backlog flushed, another instance taking over.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(1);
const RETRY_BACKLOG: Duration = Duration::from_secs(2);
const RETRY_SHUTTING_DOWN: Duration = Duration::from_millis(100);
const RETRY_OVERLOADED: Duration = Duration::from_millis(200);

/// A status with a `google.rpc.ErrorInfo` (domain [`ERROR_DOMAIN`]) added to
/// `details`, and a `google.rpc.RetryInfo` when the refusal is worth retrying.
fn status(
    code: Code,
    message: impl Into<String>,
    mut details: ErrorDetails,
    reason: &str,
    metadata: &[(&str, String)],
    retry_after: Option<Duration>,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}

/// A status whose only details are the reason (and retry advice).
fn refusal(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, String)],
    retry_after: Option<Duration>,
) -> Status {
    status(
        code,
        message,
        ErrorDetails::new(),
        reason,
        metadata,
        retry_after,
    )
}

/// The reason of an `Unavailable`: which store could not be reached. The
/// conversions above prefix the detail with the store they failed on.
fn unavailable_reason(detail: &str) -> &'static str {
    if detail.starts_with("postgres") {
        "POSTGRES_UNAVAILABLE"
    } else {
        "REDIS_UNAVAILABLE"
    }
}

impl From<Error> for Status {
    /// The one mapping of an error to what the client sees: the code of
    /// DESIGN.md's "Errors", a message for the client, and an `ErrorInfo`
    /// reason a program can branch on (README, "Errors").
    fn from(err: Error) -> Self {
        // The message of the client-facing variants (the others log their
        // detail and send a generic message).
        let message = err.to_string();
        // Inside the request's span (its id, the rpc); at debug, as a
        // sell-out is business as usual. Quoted: the message may carry what
        // the client sent.
        tracing::debug!(reason = ?message, "refused");
        match err {
            Error::InvalidArgument { field, reason } => status(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field.clone(), reason),
                "INVALID_ARGUMENT",
                &[("field", field)],
                None,
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
                status(
                    Code::FailedPrecondition,
                    format!("not enough stock: {}", subjects.join(", ")),
                    details,
                    "OUT_OF_STOCK",
                    &[("short_lines", shortages.len().to_string())],
                    None,
                )
            }
            Error::NotFound(msg) => refusal(Code::NotFound, msg, "NOT_FOUND", &[], None),
            Error::UnknownItems(items) => {
                let mut metadata = vec![("unknown_items", items.len().to_string())];
                if let Some(first) = items.first() {
                    metadata.push(("sku", first.sku.clone()));
                    metadata.push(("location", first.location.clone()));
                }
                refusal(Code::NotFound, message, "ITEM_NOT_FOUND", &metadata, None)
            }
            Error::UnknownReservation(id) => refusal(
                Code::NotFound,
                message,
                "RESERVATION_NOT_FOUND",
                &[("reservation_id", id)],
                None,
            ),
            Error::ReservationClosed { id, state } => {
                let reason = match state {
                    ClosedState::Committed => "RESERVATION_COMMITTED",
                    ClosedState::Released => "RESERVATION_RELEASED",
                    ClosedState::Expired => "RESERVATION_EXPIRED",
                };
                refusal(
                    Code::FailedPrecondition,
                    message,
                    reason,
                    &[("reservation_id", id)],
                    None,
                )
            }
            Error::FailedPrecondition(msg) => refusal(
                Code::FailedPrecondition,
                msg,
                "FAILED_PRECONDITION",
                &[],
                None,
            ),
            Error::AlreadyExists(msg) => refusal(
                Code::AlreadyExists,
                msg,
                "IDEMPOTENCY_KEY_REUSED",
                &[],
                None,
            ),
            Error::VersionMismatch { expected, current } => refusal(
                Code::Aborted,
                message,
                "VERSION_MISMATCH",
                &[
                    ("expected_version", expected.to_string()),
                    ("current_version", current.to_string()),
                ],
                None,
            ),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "answering UNAVAILABLE");
                refusal(
                    Code::Unavailable,
                    "stock store unavailable, retry later",
                    unavailable_reason(&detail),
                    &[],
                    Some(RETRY_UNAVAILABLE),
                )
            }
            Error::Backlogged(detail) => {
                tracing::warn!(%detail, "refusing new demand: a stream backlog (flusher or exporter) over its limit");
                refusal(
                    Code::Unavailable,
                    "too many changes not yet written to Postgres, retry later",
                    "BACKLOG",
                    &[],
                    Some(RETRY_BACKLOG),
                )
            }
            Error::Unauthenticated => {
                refusal(Code::Unauthenticated, message, "UNAUTHENTICATED", &[], None)
            }
            Error::OutOfRange(msg) => refusal(Code::OutOfRange, msg, "OUT_OF_RANGE", &[], None),
            Error::ResourceExhausted(msg) => refusal(
                Code::ResourceExhausted,
                msg,
                "CLIENT_TOO_SLOW",
                &[],
                Some(RETRY_UNAVAILABLE),
            ),
            Error::Overloaded => refusal(
                Code::ResourceExhausted,
                message,
                "OVERLOADED",
                &[],
                Some(RETRY_OVERLOADED),
            ),
            Error::ShuttingDown(msg) => refusal(
                Code::Unavailable,
                msg,
                "SHUTTING_DOWN",
                &[],
                Some(RETRY_SHUTTING_DOWN),
            ),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                refusal(Code::Internal, "internal error", "INTERNAL", &[], None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(status: &Status) -> String {
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.domain, ERROR_DOMAIN);
        info.reason
    }

    fn retry(status: &Status) -> Option<Duration> {
        status.get_details_retry_info().and_then(|r| r.retry_delay)
    }

    #[test]
    fn unavailable_names_the_store_and_hides_the_detail() {
        let from_redis = Status::from(Error::Unavailable("redis: refused 10.0.0.7".into()));
        let from_postgres = Status::from(Error::Unavailable("postgres: pool timed out".into()));
        assert_eq!(reason(&from_redis), "REDIS_UNAVAILABLE");
        assert_eq!(reason(&from_postgres), "POSTGRES_UNAVAILABLE");
        for s in [&from_redis, &from_postgres] {
            assert_eq!(s.code(), Code::Unavailable);
            assert_eq!(retry(s), Some(RETRY_UNAVAILABLE));
            assert_eq!(s.message(), "stock store unavailable, retry later");
        }
    }

    #[test]
    fn only_refusals_that_will_pass_advise_a_retry() {
        let retryable = [
            Error::Backlogged("p03".into()),
            Error::ShuttingDown("stopping".into()),
            Error::Overloaded,
            Error::ResourceExhausted("too slow".into()),
        ];
        for err in retryable {
            let status = Status::from(err);
            assert!(retry(&status).is_some(), "{status:?}");
        }
        let final_ = [
            Error::Internal("bug".into()),
            Error::Unauthenticated,
            Error::NotFound("webhook 3 does not exist".into()),
            Error::FailedPrecondition("another reconcile is running".into()),
        ];
        for err in final_ {
            let status = Status::from(err);
            assert_eq!(retry(&status), None, "{status:?}");
        }
    }

    #[test]
    fn internal_detail_stays_in_the_log() {
        let status = Status::from(Error::Internal("script error at line 3".into()));
        assert_eq!(status.message(), "internal error");
        assert_eq!(reason(&status), "INTERNAL");
    }

    #[test]
    fn closed_states_parse_from_their_record_spelling() {
        for state in [
            ClosedState::Committed,
            ClosedState::Released,
            ClosedState::Expired,
        ] {
            assert_eq!(ClosedState::parse(&state.to_string()), Some(state));
        }
        assert_eq!(ClosedState::parse("held"), None);
    }
}
