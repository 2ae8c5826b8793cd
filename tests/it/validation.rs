//! Every malformed input of DESIGN.md is INVALID_ARGUMENT naming the field,
//! and leaves Redis (stock, versions, streams, records) exactly as it was.

use stockd::pb;
use tonic::Code;

use crate::support::*;

type Check = (&'static str, Result<(), tonic::Status>);

/// Each case failed with INVALID_ARGUMENT whose message names its field;
/// `input` tells the cases of a loop apart.
fn assert_each_names_its_field(cases: Vec<Check>, input: &str) {
    for (field, result) in cases {
        let status = result.expect_err(field);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{input:?} {field}: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("invalid {field}:")),
            "{input:?}: message {:?} should name {field}",
            status.message()
        );
    }
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_changes_nothing() {
    let app = spawn_app().await;
    app.seed("ok", "", 10).await;
    app.reserve("held", vec![line("ok", "", 1)], 60)
        .await
        .unwrap();
    let before = app.snapshot().await;
    let long = |n: usize| "x".repeat(n);
    let ok = || line("ok", "", 1);
    let many = |n: usize| {
        (0..n)
            .map(|i| line(&format!("s{i}"), "", 1))
            .collect::<Vec<_>>()
    };

    let cases: Vec<Check> = vec![
        (
            "reservation_id",
            app.reserve("", vec![ok()], 0).await.map(drop),
        ),
        (
            "reservation_id",
            app.reserve(&long(129), vec![ok()], 0).await.map(drop),
        ),
        (
            "reservation_id",
            app.reserve("a b", vec![ok()], 0).await.map(drop),
        ),
        ("lines", app.reserve("r", vec![], 0).await.map(drop)),
        ("lines", app.reserve("r", many(101), 0).await.map(drop)),
        (
            "lines[0].quantity",
            app.reserve("r", vec![line("ok", "", 0)], 0).await.map(drop),
        ),
        (
            "lines[0].quantity",
            app.reserve("r", vec![line("ok", "", -1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[0].quantity",
            app.reserve("r", vec![line("ok", "", 1_000_001)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[1].sku",
            app.reserve("r", vec![ok(), line("", "", 1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[0].sku",
            app.reserve("r", vec![line(&long(129), "", 1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[0].sku",
            app.reserve("r", vec![line("a\tb", "", 1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[0].location",
            app.reserve("r", vec![line("ok", &long(65), 1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[0].location",
            app.reserve("r", vec![line("ok", "x\u{1}", 1)], 0)
                .await
                .map(drop),
        ),
        (
            "lines[1]",
            app.reserve("r", vec![ok(), line("ok", "default", 2)], 0)
                .await
                .map(drop),
        ),
        (
            "ttl_seconds",
            app.reserve("r", vec![ok()], 86_401).await.map(drop),
        ),
        ("reservation_id", app.commit("").await.map(drop)),
        ("reservation_id", app.release(" ").await.map(drop)),
        ("ttl_seconds", app.extend("held", 0).await.map(drop)),
        ("ttl_seconds", app.extend("held", 86_401).await.map(drop)),
        ("request_id", app.decrement("", vec![ok()]).await.map(drop)),
        (
            "lines[0].quantity",
            app.decrement("d", vec![line("ok", "", 0)]).await.map(drop),
        ),
        ("lines", app.decrement("d", vec![]).await.map(drop)),
        ("delta", app.adjust("adj", "ok", "", 0, "").await.map(drop)),
        (
            "delta",
            app.adjust("adj", "ok", "", 1_000_001, "").await.map(drop),
        ),
        (
            "delta",
            app.adjust("adj", "ok", "", -1_000_001, "").await.map(drop),
        ),
        ("sku", app.adjust("adj", "", "", 1, "").await.map(drop)),
        (
            "reason",
            app.adjust("adj", "ok", "", 1, "two\nlines").await.map(drop),
        ),
        (
            "reason",
            app.adjust("adj", "ok", "", 1, &long(257)).await.map(drop),
        ),
        ("items", app.get(&[]).await.map(drop)),
        ("items[0].sku", app.get(&[("", "")]).await.map(drop)),
        ("available", app.set("s", "ok", "", -1).await.map(drop)),
        (
            "available",
            app.set("s", "ok", "", 1_000_000_001).await.map(drop),
        ),
        (
            "expected_version",
            app.set_if_version("s", "ok", "", 1, -1).await.map(drop),
        ),
        ("request_id", app.set("", "ok", "", 1).await.map(drop)),
        ("sku", app.set("s", &long(129), "", 1).await.map(drop)),
    ];
    assert_each_names_its_field(cases, "");
    assert_eq!(
        app.snapshot().await,
        before,
        "rejected requests changed Redis"
    );
    app.stop().await;
}

#[tokio::test]
async fn unknown_items_and_reservations_are_not_found_and_change_nothing() {
    let app = spawn_app().await;
    app.seed("known", "", 5).await;
    let before = app.snapshot().await;

    let status = app
        .reserve("r", vec![line("known", "", 1), line("ghost", "", 1)], 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("default/ghost"), "{status:?}");
    assert_eq!(
        code_of(app.decrement("d", vec![line("ghost", "", 1)]).await),
        Code::NotFound
    );
    assert_eq!(
        code_of(app.adjust("adj", "ghost", "", 1, "").await),
        Code::NotFound
    );
    assert_eq!(code_of(app.commit("nope").await), Code::NotFound);
    assert_eq!(code_of(app.release("nope").await), Code::NotFound);
    assert_eq!(code_of(app.extend("nope", 5).await), Code::NotFound);
    assert_eq!(app.snapshot().await, before);

    let got = app
        .get(&[("known", ""), ("ghost", "berlin")])
        .await
        .unwrap();
    assert_eq!(got.levels.len(), 1);
    assert_eq!(got.levels[0].location, "default");
    assert_eq!(
        got.missing,
        vec![pb::ItemRef {
            sku: "ghost".into(),
            location: "berlin".into()
        }]
    );
    app.stop().await;
}

#[tokio::test]
async fn compare_and_set_mismatch_is_aborted_and_changes_nothing() {
    let app = spawn_app().await;
    // expected_version 0: create only if new
    let created = app.set_if_version("c1", "cas", "", 4, 0).await.unwrap();
    assert_eq!(created.level.unwrap().version, 1);
    let before = app.stock_and_streams().await;
    let status = app.set_if_version("c2", "cas", "", 9, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("current 1"), "{status:?}");
    assert_eq!(
        code_of(app.set_if_version("c3", "cas", "", 9, 2).await),
        Code::Aborted
    );
    assert_eq!(app.stock_and_streams().await, before);
    let level = app
        .set_if_version("c4", "cas", "", 9, 1)
        .await
        .unwrap()
        .level
        .unwrap();
    assert_eq!((level.available, level.version), (9, 2));
    // The mismatch is c2's outcome: a late copy of it replays the refusal
    // (with the version it met) instead of comparing again.
    let late = app.set_if_version("c2", "cas", "", 9, 0).await.unwrap_err();
    assert_eq!(late.code(), Code::Aborted);
    assert!(late.message().contains("current 1"), "{late:?}");
    app.stop().await;
}

/// Identifiers that print like another identifier (issue 16, found by
/// black-box probing): each is INVALID_ARGUMENT naming the field, in every
/// rpc that takes it, and nothing changes.
#[tokio::test]
async fn identifiers_that_do_not_print_as_themselves_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    app.seed("ok", "", 10).await;
    app.reserve("order-1001", vec![line("ok", "", 1)], 60)
        .await
        .unwrap();
    let before = app.snapshot().await;

    let disguised = [
        "order-1001\u{200B}", // zero width space (Cf)
        "default\u{FEFF}",    // byte order mark (Cf)
        "\u{202E}1001-redro", // right-to-left override (Cf)
        "order\u{2060}1001",  // word joiner (Cf)
        "order-\u{E000}",     // private use (Co)
        "order-\u{378}",      // unassigned (Cn)
        "order\u{2028}1001",  // line separator (Zl)
        "order\u{2029}1001",  // paragraph separator (Zp)
        "cafe\u{301}",        // not NFC: e + combining acute
    ];
    for bad in disguised {
        let cases: Vec<Check> = vec![
            (
                "reservation_id",
                app.reserve(bad, vec![line("ok", "", 1)], 0).await.map(drop),
            ),
            (
                "lines[0].sku",
                app.reserve("r", vec![line(bad, "", 1)], 0).await.map(drop),
            ),
            (
                "lines[0].location",
                app.reserve("r", vec![line("ok", bad, 1)], 0)
                    .await
                    .map(drop),
            ),
            ("reservation_id", app.commit(bad).await.map(drop)),
            ("reservation_id", app.release(bad).await.map(drop)),
            ("reservation_id", app.extend(bad, 60).await.map(drop)),
            (
                "request_id",
                app.decrement(bad, vec![line("ok", "", 1)]).await.map(drop),
            ),
            (
                "request_id",
                app.adjust(bad, "ok", "", 1, "").await.map(drop),
            ),
            (
                "location",
                app.adjust("adj", "ok", bad, 1, "").await.map(drop),
            ),
            ("items[0].sku", app.get(&[(bad, "")]).await.map(drop)),
            ("request_id", app.set(bad, "ok", "", 1).await.map(drop)),
            ("sku", app.set("s", bad, "", 1).await.map(drop)),
            ("skus[0]", app.preload_skus(&[bad]).await.map(drop)),
        ];
        assert_each_names_its_field(cases, bad);
    }
    assert_eq!(
        app.snapshot().await,
        before,
        "rejected requests changed Redis"
    );
    app.stop().await;
}
