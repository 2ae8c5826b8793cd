//! Every refusal carries a `google.rpc.ErrorInfo` (domain `stockd.v1`) whose
//! reason a program can branch on, and retryable ones a `RetryInfo`; the
//! older details (BadRequest, PreconditionFailure) are still there.

use std::collections::HashMap;
use std::time::Duration;

use stockd::pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::common::*;

/// The status's ErrorInfo reason, after checking its domain.
pub fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "stockd.v1", "{status:?}");
    info.reason
}

fn metadata(status: &Status) -> HashMap<String, String> {
    status.get_details_error_info().unwrap().metadata
}

/// The RetryInfo delay of a refusal worth retrying.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// Checks code, reason, and that no retry is advised.
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, expected: &str) -> Status {
    let status = result.expect_err(expected);
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected, "{status:?}");
    assert_eq!(retry_delay(&status), None, "not retryable: {status:?}");
    status
}

fn reserve(id: &str, lines: Vec<pb::Line>, ttl_seconds: u32) -> pb::ReserveRequest {
    pb::ReserveRequest {
        reservation_id: id.into(),
        lines,
        ttl_seconds,
    }
}

#[tokio::test]
async fn refusals_name_their_reason() {
    let app = spawn_app().await;
    app.seed("mug", "", 2).await;
    let mut inv = app.inventory.clone();
    let mut admin = app.admin.clone();

    let status = refused(
        inv.reserve(reserve("r0", vec![line("mug", "", 0)], 0))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(metadata(&status)["field"], "lines[0].quantity");
    assert!(status.get_details_bad_request().is_some(), "{status:?}");

    let status = refused(
        inv.decrement(pb::DecrementRequest {
            request_id: "d0".into(),
            lines: vec![line("mug", "", 3)],
        })
        .await,
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
        inv.reserve(reserve("r1", vec![line("nope", "berlin", 1)], 0))
            .await,
        Code::NotFound,
        "ITEM_NOT_FOUND",
    );
    let m = metadata(&status);
    assert_eq!(
        (m["sku"].as_str(), m["location"].as_str()),
        ("nope", "berlin")
    );

    let status = refused(
        inv.commit(pb::CommitRequest {
            reservation_id: "never".into(),
        })
        .await,
        Code::NotFound,
        "RESERVATION_NOT_FOUND",
    );
    assert_eq!(metadata(&status)["reservation_id"], "never");

    // Committed: neither released nor extended.
    inv.reserve(reserve("sold", vec![line("mug", "", 1)], 0))
        .await
        .unwrap();
    inv.commit(pb::CommitRequest {
        reservation_id: "sold".into(),
    })
    .await
    .unwrap();
    let status = refused(
        inv.release(pb::ReleaseRequest {
            reservation_id: "sold".into(),
        })
        .await,
        Code::FailedPrecondition,
        "RESERVATION_COMMITTED",
    );
    assert_eq!(metadata(&status)["reservation_id"], "sold");
    refused(
        inv.extend(pb::ExtendRequest {
            reservation_id: "sold".into(),
            ttl_seconds: 60,
        })
        .await,
        Code::FailedPrecondition,
        "RESERVATION_COMMITTED",
    );

    // Released: not committed.
    inv.reserve(reserve("back", vec![line("mug", "", 1)], 0))
        .await
        .unwrap();
    inv.release(pb::ReleaseRequest {
        reservation_id: "back".into(),
    })
    .await
    .unwrap();
    refused(
        inv.commit(pb::CommitRequest {
            reservation_id: "back".into(),
        })
        .await,
        Code::FailedPrecondition,
        "RESERVATION_RELEASED",
    );

    // The same id with another payload.
    let decrement = |quantity| pb::DecrementRequest {
        request_id: "once".into(),
        lines: vec![line("mug", "", quantity)],
    };
    inv.decrement(decrement(1)).await.unwrap();
    refused(
        inv.decrement(decrement(2)).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );

    let status = refused(
        admin
            .set_stock(pb::SetStockRequest {
                request_id: "cas".into(),
                sku: "mug".into(),
                location: String::new(),
                available: 5,
                expected_version: Some(99),
            })
            .await,
        Code::Aborted,
        "VERSION_MISMATCH",
    );
    let m = metadata(&status);
    assert_eq!(m["expected_version"], "99");
    let current = app.level("mug", "").await.unwrap().version;
    assert_eq!(m["current_version"], current.to_string());

    refused(
        admin
            .remove_webhook(pb::RemoveWebhookRequest { id: 999_999 })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    app.stop().await;
}

#[tokio::test]
async fn an_expired_reservation_says_so() {
    let app = spawn_app().await;
    app.seed("tea", "", 1).await;
    let mut inv = app.inventory.clone();
    inv.reserve(reserve("brief", vec![line("tea", "", 1)], 1))
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
        inv.commit(pb::CommitRequest {
            reservation_id: "brief".into(),
        })
        .await,
        Code::FailedPrecondition,
        "RESERVATION_EXPIRED",
    );
    assert_eq!(metadata(&status)["reservation_id"], "brief");
    app.stop().await;
}

#[tokio::test]
async fn a_missing_token_is_unauthenticated() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--admin-token".into(), "adm1n".into()],
        ..Options::default()
    })
    .await;
    refused(
        app.admin
            .clone()
            .flush_status(pb::FlushStatusRequest {})
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    app.stop().await;
}
