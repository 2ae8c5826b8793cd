//! The one mapping from errors to HTTP answers.
//!
//! Every error of the HTTP API is a status code and the JSON body
//! `{"error": {"code": "NOT_FOUND", "message": "..."}}`, with `field` for
//! invalid input and `resume_from` when a live stream was interrupted. The
//! codes are the gRPC code names (the same words clients of the gRPC API
//! see), and each code has the HTTP status that `google.rpc.Code` assigns
//! it. GraphQL errors carry the same `code` (and `field`, `resumeFrom`) in
//! their `extensions`, and an interrupted event stream sends the same body
//! as its last event: all three come from [`Problem::of`].

use async_graphql::ErrorExtensions;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Error;
use crate::watch::Interrupted;

/// What can go wrong answering an HTTP request.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// Anything the domain says (validation, not found, unavailable, ...).
    Domain(Error),
    /// A request body over the configured limit.
    PayloadTooLarge { limit: usize },
    /// The request took longer than the configured time limit.
    Timeout,
    /// No route has this path.
    NoRoute,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// A quantity asked for without full access (GraphQL in public mode).
    Hidden,
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        ApiError::Domain(err)
    }
}

/// An error as the client sees it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Problem {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            resume_from: None,
        }
    }

    /// The client's view of `err`. Internal detail goes to the log only.
    pub fn of(err: ApiError) -> Self {
        use StatusCode as S;
        let err = match err {
            ApiError::PayloadTooLarge { limit } => {
                return Problem::new(
                    S::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    format!("the request body is over {limit} bytes"),
                );
            }
            ApiError::Timeout => {
                return Problem::new(
                    S::GATEWAY_TIMEOUT,
                    "DEADLINE_EXCEEDED",
                    "the request took too long",
                );
            }
            ApiError::NoRoute => return Problem::new(S::NOT_FOUND, "NOT_FOUND", "no such path"),
            ApiError::MethodNotAllowed => {
                return Problem::new(
                    S::METHOD_NOT_ALLOWED,
                    "METHOD_NOT_ALLOWED",
                    "this path does not take that method",
                );
            }
            ApiError::Hidden => {
                return Problem::new(
                    S::FORBIDDEN,
                    "PERMISSION_DENIED",
                    "quantities are shown only with the client token; ask for availability",
                );
            }
            ApiError::Domain(err) => err,
        };
        match err {
            Error::InvalidArgument { field, reason } => Problem {
                field: Some(field.clone()),
                ..Problem::new(
                    S::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    format!("invalid {field}: {reason}"),
                )
            },
            err @ Error::InsufficientStock(_) => {
                Problem::new(S::BAD_REQUEST, "FAILED_PRECONDITION", err.to_string())
            }
            Error::NotFound(msg) => Problem::new(S::NOT_FOUND, "NOT_FOUND", msg),
            err @ (Error::UnknownItems(_) | Error::UnknownReservation(_)) => {
                Problem::new(S::NOT_FOUND, "NOT_FOUND", err.to_string())
            }
            err @ Error::ReservationClosed { .. } => {
                Problem::new(S::BAD_REQUEST, "FAILED_PRECONDITION", err.to_string())
            }
            Error::FailedPrecondition(msg) => {
                Problem::new(S::BAD_REQUEST, "FAILED_PRECONDITION", msg)
            }
            Error::AlreadyExists(msg) => Problem::new(S::CONFLICT, "ALREADY_EXISTS", msg),
            err @ Error::VersionMismatch { .. } => {
                Problem::new(S::CONFLICT, "ABORTED", err.to_string())
            }
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "answering UNAVAILABLE");
                Problem::new(
                    S::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "stock store unavailable, retry later",
                )
            }
            Error::Backlogged(detail) => {
                tracing::warn!(%detail, "refusing: a stream backlog (flusher or exporter) over its limit");
                Problem::new(
                    S::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "too many changes not yet written to Postgres, retry later",
                )
            }
            Error::Unauthenticated => Problem::new(
                S::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "missing or invalid token: send Authorization: Bearer <token>",
            ),
            Error::OutOfRange(msg) => Problem::new(S::BAD_REQUEST, "OUT_OF_RANGE", msg),
            Error::ResourceExhausted(msg) => {
                Problem::new(S::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED", msg)
            }
            Error::ShuttingDown(msg) => Problem::new(S::SERVICE_UNAVAILABLE, "UNAVAILABLE", msg),
            err @ Error::Overloaded => {
                Problem::new(S::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED", err.to_string())
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Problem::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error")
            }
        }
    }

    /// The client's view of a live stream's end, with where to resume.
    pub fn of_interrupted(interrupted: Interrupted) -> Self {
        Problem {
            resume_from: Some(interrupted.resume_from.to_string()),
            ..Problem::of(interrupted.error.into())
        }
    }

    /// The JSON body: `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }

    /// The same as a GraphQL error: the message, and the rest in
    /// `extensions` (`code`, `field`, `resumeFrom`).
    pub fn into_graphql(self) -> async_graphql::Error {
        async_graphql::Error::new(self.message).extend_with(|_, ext| {
            ext.set("code", self.code);
            if let Some(field) = &self.field {
                ext.set("field", field.as_str());
            }
            if let Some(resume_from) = &self.resume_from {
                ext.set("resumeFrom", resume_from.as_str());
            }
        })
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let unauthenticated = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, Json(self.body())).into_response();
        if unauthenticated {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        Problem::of(self).into_response()
    }
}

/// A GraphQL error from a domain error.
pub(crate) fn graphql_error(err: Error) -> async_graphql::Error {
    Problem::of(err.into()).into_graphql()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_follow_the_grpc_names() {
        let cases = [
            (
                Error::invalid("sku", "must not be empty"),
                400,
                "INVALID_ARGUMENT",
            ),
            (Error::NotFound("no item".into()), 404, "NOT_FOUND"),
            (Error::Unauthenticated, 401, "UNAUTHENTICATED"),
            (
                Error::Unavailable("redis: refused".into()),
                503,
                "UNAVAILABLE",
            ),
            (Error::OutOfRange("trimmed".into()), 400, "OUT_OF_RANGE"),
            (
                Error::ResourceExhausted("slow".into()),
                429,
                "RESOURCE_EXHAUSTED",
            ),
            (Error::Internal("secret detail".into()), 500, "INTERNAL"),
        ];
        for (err, status, code) in cases {
            let p = Problem::of(err.into());
            assert_eq!((p.status.as_u16(), p.code), (status, code), "{p:?}");
            assert!(!p.message.contains("secret") && !p.message.contains("refused"));
        }
        let p = Problem::of(Error::invalid("item[2].sku", "too long").into());
        assert_eq!(p.field.as_deref(), Some("item[2].sku"));
        assert_eq!(
            p.body(),
            serde_json::json!({"error": {"code": "INVALID_ARGUMENT",
                "message": "invalid item[2].sku: too long", "field": "item[2].sku"}})
        );
    }
}
