//! Reading a refusal: its code, the `ErrorInfo` reason and `RetryInfo`
//! delay stockd attaches, and whether the call may have been applied
//! (then the client retries it under the same id until the answer is
//! definite).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::POLL_INTERVAL;

/// The code of a failed rpc, or a panic when it succeeded.
pub fn code_of<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => status.code(),
    }
}

/// The status's ErrorInfo reason, after checking its domain.
pub fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "stockd.v1", "{status:?}");
    info.reason
}

/// The RetryInfo delay of a refusal worth retrying.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// Whether a failed call may or may not have been applied: the client must
/// retry it with the same id until it gets a definite answer.
pub fn ambiguous(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Calls `call` until its answer is definite (what a client does after
/// UNAVAILABLE: the same request, same id, again), for `deadline` at most.
pub async fn definite<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = std::time::Instant::now();
    loop {
        match call().await {
            Err(status) if ambiguous(&status) => {
                assert!(
                    start.elapsed() < deadline,
                    "no definite answer to {what} within {deadline:?}: {status:?}"
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            answer => return answer,
        }
    }
}
