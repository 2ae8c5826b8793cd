//! The statuses of requests that tonic refuses while decoding them, before
//! any service sees them, set right in one place.
//!
//! tonic answers a request body that is not a valid message (bad UTF-8 in a
//! string field, a truncated message or frame, no message at all) with
//! INTERNAL, which says "a bug in the server" and fires the errors alert, and
//! a message over `max_decoding_message_size` with OUT_OF_RANGE. They are the
//! client's doing: INVALID_ARGUMENT, and RESOURCE_EXHAUSTED for the size (the
//! code gRPC itself uses for messages over the limit).
//!
//! tonic builds these statuses itself (tonic's `codec/decode.rs`,
//! `server/grpc.rs`, and tonic-prost's `from_decode_error`), so they are
//! recognised by code and message; tests/it/wire.rs sends each kind of
//! malformed request and fails if a tonic upgrade changes the wording.

use percent_encoding::percent_decode;
use tonic::{Code, Status};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";

/// prost's `DecodeError` display, which tonic-prost sends as INTERNAL; what
/// follows names the field (`AdjustRequest.reason: invalid string value...`).
const PROTOBUF_DECODE: &str = "failed to decode Protobuf message: ";
/// The body ended inside a frame.
const TRUNCATED_FRAME: &str = "Unexpected EOF decoding stream.";
/// The body ended before a frame began.
const NO_MESSAGE: &str = "Missing request message.";
/// The frame header announces more than `max_decoding_message_size`.
const TOO_LARGE: &str = "Error, decoded message length too large: ";

/// The status a refusal of tonic's should have had, if it is one.
fn corrected(code: Code, message: &str) -> Option<Status> {
    match code {
        Code::Internal => {
            if let Some(detail) = message.strip_prefix(PROTOBUF_DECODE) {
                Some(Status::invalid_argument(format!(
                    "malformed request message: {detail}"
                )))
            } else if message == TRUNCATED_FRAME {
                Some(Status::invalid_argument(
                    "malformed request: the body ends inside a message",
                ))
            } else if message == NO_MESSAGE {
                Some(Status::invalid_argument(
                    "malformed request: the body holds no message",
                ))
            } else {
                None
            }
        }
        Code::OutOfRange => message
            .strip_prefix(TOO_LARGE)
            .map(|detail| Status::resource_exhausted(format!("request too large: {detail}"))),
        _ => None,
    }
}

/// Rewrites the status of a trailers-only response (where a refused request's
/// status travels) when tonic refused the request while decoding it; every
/// other response passes unchanged.
pub(crate) fn reclassify<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers();
    let Some(code) = headers
        .get(GRPC_STATUS)
        .map(|v| Code::from_bytes(v.as_bytes()))
    else {
        return response;
    };
    if !matches!(code, Code::Internal | Code::OutOfRange) {
        return response;
    }
    let message = headers
        .get(GRPC_MESSAGE)
        .map(|v| {
            percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let Some(status) = corrected(code, &message) else {
        return response;
    };
    tracing::debug!(tonic = %message, "malformed request");
    if let Err(err) = status.add_header(response.headers_mut()) {
        // Our own messages are valid header values; should one not be,
        // the original status stands.
        tracing::error!(error = %err, "cannot rewrite the status of a malformed request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: Status) -> http::Response<()> {
        status.into_http()
    }

    fn status_of(response: &http::Response<()>) -> (Code, String) {
        let headers = response.headers();
        let code = Code::from_bytes(headers[GRPC_STATUS].as_bytes());
        let message = percent_decode(headers[GRPC_MESSAGE].as_bytes())
            .decode_utf8_lossy()
            .into_owned();
        (code, message)
    }

    #[test]
    fn tonic_decode_refusals_become_client_errors() {
        let bad_utf8 = Status::internal(
            "failed to decode Protobuf message: AdjustRequest.reason: \
             invalid string value: data is not UTF-8 encoded",
        );
        assert_eq!(
            status_of(&reclassify(refused(bad_utf8))),
            (
                Code::InvalidArgument,
                "malformed request message: AdjustRequest.reason: \
                 invalid string value: data is not UTF-8 encoded"
                    .to_owned()
            )
        );
        for truncated in [TRUNCATED_FRAME, NO_MESSAGE] {
            let (code, _) = status_of(&reclassify(refused(Status::internal(truncated))));
            assert_eq!(code, Code::InvalidArgument, "{truncated}");
        }
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 307212 bytes, the limit is: 262144 bytes",
        );
        assert_eq!(
            status_of(&reclassify(refused(too_large))),
            (
                Code::ResourceExhausted,
                "request too large: found 307212 bytes, the limit is: 262144 bytes".to_owned()
            )
        );
    }

    #[test]
    fn our_own_statuses_pass_unchanged() {
        for status in [
            Status::internal("internal error"),
            Status::out_of_range("event 1-0 is older than the oldest event partition 0 holds"),
            Status::invalid_argument("invalid sku: must not be empty"),
            Status::not_found("failed to decode Protobuf message: not ours"),
        ] {
            let before = status_of(&refused(status.clone()));
            assert_eq!(status_of(&reclassify(refused(status))), before);
        }
        // A success carries its status in the trailers: no header to read.
        let ok = http::Response::new(());
        assert!(reclassify(ok).headers().get(GRPC_STATUS).is_none());
    }
}
