//! Every refusal carries a `google.rpc.ErrorInfo` (domain `stockd.v1`) whose
//! reason a program can branch on, and retryable ones a `RetryInfo`; the
//! older details (BadRequest, PreconditionFailure) are still there.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::*;

fn metadata(status: &Status) -> HashMap<String, String> {
    status.get_details_error_info().unwrap().metadata
}

/// Checks code, reason, and that no retry is advised.
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, expected: &str) -> Status {
    let status = result.expect_err(expected);
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected, "{status:?}");
    assert_eq!(retry_delay(&status), None, "not retryable: {status:?}");
    status
}

#[tokio::test]
async fn refusals_name_their_reason() {
    let app = spawn_app().await;
    app.seed("mug", "", 2).await;

    let status = refused(
        app.reserve("r0", vec![line("mug", "", 0)], 0).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(metadata(&status)["field"], "lines[0].quantity");
    assert!(status.get_details_bad_request().is_some(), "{status:?}");

    let status = refused(
        app.decrement("d0", vec![line("mug", "", 3)]).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    assert_eq!(metadata(&status)["short_lines"], "1");
    let violations = status
        .get_details_precondition_failure()
        .unwrap()
        .violations;
    assert_eq!(violations[0].subject, "default/mug");

    let status = refused(
        app.reserve("r1", vec![line("nope", "berlin", 1)], 0).await,
        Code::NotFound,
        "ITEM_NOT_FOUND",
    );
    let m = metadata(&status);
    assert_eq!(
        (m["sku"].as_str(), m["location"].as_str()),
        ("nope", "berlin")
    );

    let status = refused(
        app.commit("never").await,
        Code::NotFound,
        "RESERVATION_NOT_FOUND",
    );
    assert_eq!(metadata(&status)["reservation_id"], "never");

    // Committed: neither released nor extended.
    app.reserve("sold", vec![line("mug", "", 1)], 0)
        .await
        .unwrap();
    app.commit("sold").await.unwrap();
    let status = refused(
        app.release("sold").await,
        Code::FailedPrecondition,
        "RESERVATION_COMMITTED",
    );
    assert_eq!(metadata(&status)["reservation_id"], "sold");
    refused(
        app.extend("sold", 60).await,
        Code::FailedPrecondition,
        "RESERVATION_COMMITTED",
    );

    // Released: not committed.
    app.reserve("back", vec![line("mug", "", 1)], 0)
        .await
        .unwrap();
    app.release("back").await.unwrap();
    refused(
        app.commit("back").await,
        Code::FailedPrecondition,
        "RESERVATION_RELEASED",
    );

    // The same id with another payload.
    let decrement = |quantity| app.decrement("once", vec![line("mug", "", quantity)]);
    decrement(1).await.unwrap();
    refused(
        decrement(2).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );

    let status = refused(
        app.set_if_version("cas", "mug", "", 5, 99).await,
        Code::Aborted,
        "VERSION_MISMATCH",
    );
    let m = metadata(&status);
    assert_eq!(m["expected_version"], "99");
    let current = app.level("mug", "").await.unwrap().version;
    assert_eq!(m["current_version"], current.to_string());

    refused(
        app.remove_webhook(999_999).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    app.stop().await;
}

#[tokio::test]
async fn an_expired_reservation_says_so() {
    let app = spawn_app().await;
    app.seed("tea", "", 1).await;
    app.reserve("brief", vec![line("tea", "", 1)], 1)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the reaper to expire the hold",
        || {
            let app = &app;
            async move { (app.level("tea", "").await?.reserved == 0).then_some(()) }
        },
    )
    .await;
    let status = refused(
        app.commit("brief").await,
        Code::FailedPrecondition,
        "RESERVATION_EXPIRED",
    );
    assert_eq!(metadata(&status)["reservation_id"], "brief");
    app.stop().await;
}

#[tokio::test]
async fn a_missing_token_is_unauthenticated() {
    let app = spawn_app_with(Options::with_args(&["--admin-token", "adm1n"])).await;
    refused(
        app.flush_status().await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    app.stop().await;
}
