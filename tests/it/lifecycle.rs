//! Reservations end to end: all-or-nothing carts across partitions and
//! locations, the state machine of commit/release/extend/expiry, and the
//! server's start-up checks.

use std::time::Duration;

use stockd::app::{Application, StartError};
use stockd::meta::MetaError;
use stockd::store::StoreError;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::*;

#[tokio::test]
async fn carts_across_partitions_are_all_or_nothing() {
    let app = spawn_app().await;
    let skus = skus_in_distinct_partitions(&app.keys, "cart", 3);
    app.seed(&skus[0], "", 10).await;
    app.seed(&skus[1], "", 2).await;
    app.seed(&skus[2], "berlin", 10).await;
    let before = app.stock_and_streams().await;
    // One line short of stock.
    let cart_1 = || {
        let lines = vec![
            line(&skus[0], "", 1),
            line(&skus[1], "", 5),
            line(&skus[2], "berlin", 1),
        ];
        app.reserve("cart-1", lines, 60)
    };

    let status = cart_1().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let failure = status
        .get_details_precondition_failure()
        .expect("PreconditionFailure detail");
    assert_eq!(
        failure.violations.len(),
        1,
        "only the short line: {failure:?}"
    );
    assert_eq!(
        failure.violations[0].subject,
        format!("default/{}", skus[1])
    );
    assert_eq!(
        failure.violations[0].description,
        "requested 5, available 2"
    );
    assert_eq!(
        app.stock_and_streams().await,
        before,
        "a refused cart changes no stock and writes no event"
    );
    // One outcome per id: the refusal is the answer of cart-1 from now on,
    // to a late copy of the request as to a retry; another cart under the
    // same id is another request.
    let again = cart_1().await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(
        format!("{:?}", again.get_details_precondition_failure()),
        format!("{:?}", Some(failure)),
        "the stored refusal is replayed"
    );
    // Another cart under the id: refused in the same script on a
    // standalone Redis (on a cluster only when it reaches the partition
    // that coordinated cart-1: see the idempotency tests).
    let home = app.keys.partition_of("cart-1");
    if !redis_cluster() || app.keys.partition_of(&skus[0]) == home {
        let other = app
            .reserve("cart-1", vec![line(&skus[0], "", 1)], 60)
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::AlreadyExists);
        assert_eq!(app.stock_and_streams().await, before);
    }

    // The same cart fits, under a new id, once the short line asks for what
    // is there.
    let ok = app
        .reserve(
            "cart-2",
            vec![
                line(&skus[0], "", 1),
                line(&skus[1], "", 2),
                line(&skus[2], "berlin", 1),
            ],
            60,
        )
        .await
        .unwrap();
    let summary: Vec<_> = ok
        .levels
        .iter()
        .map(|l| (l.available, l.reserved, l.version))
        .collect();
    assert_eq!(summary, vec![(9, 1, 2), (0, 2, 2), (9, 1, 2)]);

    let committed = app.commit("cart-2").await.unwrap();
    let summary: Vec<_> = committed
        .levels
        .iter()
        .map(|l| (l.available, l.reserved, l.version))
        .collect();
    assert_eq!(summary, vec![(9, 0, 3), (0, 0, 3), (9, 0, 3)]);
    app.stop().await;
}

#[tokio::test]
async fn reservation_state_machine() {
    let app = spawn_app().await;
    app.seed("item", "", 10).await;

    app.reserve("c", vec![line("item", "", 2)], 60)
        .await
        .unwrap();
    app.reserve("r", vec![line("item", "", 3)], 60)
        .await
        .unwrap();
    app.commit("c").await.unwrap();
    let released = app.release("r").await.unwrap();
    assert!(!released.replayed);
    assert_eq!(released.levels[0].available, 8, "3 units came back");
    let before = app.snapshot().await;

    assert_eq!(code_of(app.release("c").await), Code::FailedPrecondition);
    assert_eq!(code_of(app.commit("r").await), Code::FailedPrecondition);
    assert_eq!(code_of(app.extend("c", 60).await), Code::FailedPrecondition);
    let again = app.release("r").await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.levels, released.levels);
    assert_eq!(
        app.snapshot().await,
        before,
        "refusals and replays change nothing"
    );

    let level = app.level("item", "").await.unwrap();
    assert_eq!((level.available, level.reserved), (8, 0));
    app.stop().await;
}

#[tokio::test]
async fn a_lapsed_hold_cannot_be_committed_and_its_release_is_a_replay() {
    // The reaper is slowed down so that the lapsed hold is still "held" in
    // Redis when the client comes back: the scripts judge expiry themselves.
    let app = spawn_app_with(Options::with_args(&["--reaper-interval-ms", "3600000"])).await;
    app.seed("item", "", 5).await;
    let held = app
        .reserve("late", vec![line("item", "", 2)], 1)
        .await
        .unwrap();

    // Wait until Redis's clock (the one the scripts use) passes the expiry.
    eventually(Duration::from_secs(5), "the hold to lapse", || {
        let mut conn = app.redis.clone();
        async move {
            let (secs, micros): (i64, i64) =
                redis::cmd("TIME").query_async(&mut conn).await.unwrap();
            (secs * 1000 + micros / 1000 >= held.expires_at_ms).then_some(())
        }
    })
    .await;
    let before = app.snapshot().await;
    assert_eq!(
        code_of(app.extend("late", 60).await),
        Code::FailedPrecondition,
        "a lapsed hold cannot be revived"
    );
    assert_eq!(code_of(app.commit("late").await), Code::FailedPrecondition);
    assert_eq!(app.snapshot().await, before);
    let released = app.release("late").await.unwrap();
    assert!(released.replayed, "release of an expired hold is a replay");
    assert_eq!(
        (released.levels[0].available, released.levels[0].reserved),
        (5, 0)
    );
    let ops: Vec<String> = app
        .events()
        .await
        .iter()
        .map(|e| e.get("op").to_owned())
        .collect();
    assert_eq!(ops, vec!["set", "reserve", "expire"]);
    app.stop().await;
}

#[tokio::test]
async fn extend_moves_the_expiry_of_every_partition() {
    let app = spawn_app().await;
    let skus = skus_in_distinct_partitions(&app.keys, "ext", 2);
    for sku in &skus {
        app.seed(sku, "", 5).await;
    }
    let first = app
        .reserve("e", vec![line(&skus[0], "", 1), line(&skus[1], "", 1)], 2)
        .await
        .unwrap();
    let extended = app.extend("e", 3600).await.unwrap();
    assert!(extended.expires_at_ms >= first.expires_at_ms + 3_590_000);
    let mut conn = app.redis.clone();
    for sku in &skus {
        let p = app.keys.partition_of(sku);
        let score: i64 = redis::cmd("ZSCORE")
            .arg(app.keys.reservation_expiry(p))
            .arg("e")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(score, extended.expires_at_ms);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_different_partition_count_refuses_to_start() {
    let app = spawn_app().await;
    let options = Options {
        namespace: app.namespace.clone(),
        partitions: 8,
        ..Options::default()
    };
    let refused = |result: Result<Application, StartError>| match result.map(|_| ()) {
        Err(StartError::Meta(MetaError::PartitionMismatch {
            stored: 16,
            configured: 8,
        }))
        | Err(StartError::Store(StoreError::PartitionMismatch {
            stored: 16,
            configured: 8,
        })) => {}
        other => panic!("expected a partition mismatch, got {other:?}"),
    };
    refused(Application::build(config_for(&options)).await);
    // Postgres records the count too: a Redis that lost everything
    // (the meta record and all) does not make another count acceptable.
    delete_namespace(&mut app.redis.clone(), &app.namespace).await;
    refused(Application::build(config_for(&options)).await);
    app.stop().await;
}

#[tokio::test]
async fn health_reflection_and_admin_token() {
    let app = spawn_app_with(Options::with_args(&["--admin-token", "s3cret"])).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stockd.v1.Inventory".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let request = || set_request("t", "guarded", "", 1);
    let mut admin = app.admin.clone();
    assert_eq!(
        code_of(admin.set_stock(request()).await),
        Code::Unauthenticated
    );
    let wrong = with_token("nope", request());
    assert_eq!(code_of(admin.set_stock(wrong).await), Code::Unauthenticated);
    assert!(
        app.level("guarded", "").await.is_none(),
        "refused sets change nothing"
    );
    admin
        .set_stock(with_token("s3cret", request()))
        .await
        .unwrap();
    assert_eq!(app.level("guarded", "").await.unwrap().available, 1);
    app.stop().await;
}
