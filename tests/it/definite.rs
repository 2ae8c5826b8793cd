//! Issue 11: a Redis that stalls (`CLIENT PAUSE` longer than stockd's Redis
//! timeout). A request that timed out may still run later; every definite
//! answer its id ever gets is the same one, and a stall followed by a loss
//! leaves no hole in the ledger.

use std::time::Duration;

use futures::future::join_all;
use stockd::pb;
use tonic::Code;

use crate::support::own_redis::OwnRedis;
use crate::support::*;

const SETTLE: Duration = Duration::from_secs(30);

fn stalling_options(namespace: &str, redis: &OwnRedis) -> Options {
    Options {
        namespace: namespace.to_owned(),
        redis_url: Some(redis.url()),
        extra_args: vec![
            "--redis-timeout-ms".into(),
            "300".into(),
            "--epoch-check-ms".into(),
            "100".into(),
        ],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_request_has_one_outcome_across_instances() {
    let redis = OwnRedis::start().await;
    let namespace = unique_namespace("oneid");
    let apps = [
        spawn_app_with(stalling_options(&namespace, &redis)).await,
        spawn_app_with(stalling_options(&namespace, &redis)).await,
    ];
    let pool = apps[0].postgres().await;
    for round in 0..3 {
        let sku = format!("once-{round}");
        let id = format!("sale-{round}");
        apps[0].seed(&sku, "", 1).await;
        let sale = |rpc: Clients| {
            let (id, lines) = (id.clone(), vec![line(&sku, "", 2)]);
            async move { rpc.decrement(&id, lines).await }
        };
        redis.pause(1_500).await;
        let first = sale(apps[0].clients()).await;
        let first = first.expect_err("Redis is paused");
        assert!(ambiguous(&first), "{first:?}");
        // The retry on the other instance and a restock race the original,
        // which is still queued in Redis.
        let retry = |n: usize| {
            let rpc = apps[n % 2].clients();
            async move {
                definite(SETTLE, "the sale", || sale(rpc.clone()))
                    .await
                    .map(|r| r.levels)
                    .map_err(|s| s.code())
            }
        };
        let restock = definite(SETTLE, "the restock", || {
            let rpc = apps[1].clients();
            let sku = sku.clone();
            async move { rpc.adjust(&format!("restock-{sku}"), &sku, "", 5, "").await }
        });
        let (answers, restocked) = tokio::join!(join_all((1..5).map(retry)), restock);
        restocked.unwrap();
        let late = retry(0).await;
        let answers: Vec<_> = answers.into_iter().chain([late]).collect();
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "round {round}: one id, several outcomes: {answers:?}"
        );
        if let Err(code) = &answers[0] {
            assert_eq!(*code, Code::FailedPrecondition, "{answers:?}");
        }
        let sold = i64::from(answers[0].is_ok());
        apps[0].converged(&pool).await;
        let level = apps[0].level(&sku, "").await.unwrap();
        assert_eq!(
            level.available,
            1 + 5 - 2 * sold,
            "round {round}: the stock matches the answer {answers:?}"
        );
        let in_ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_ledger WHERE ref = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(in_ledger, sold, "round {round}");
        if let Ok(levels) = &answers[0] {
            assert_eq!(levels[0].available, level.available, "{answers:?}");
        }
    }
    pool.close().await;
    let [first, second] = apps;
    second.stop_keep_data().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stall_then_a_loss_leaves_no_hole_in_the_ledger() {
    let mut redis = OwnRedis::start().await;
    let mut options = stalling_options(&unique_namespace("stall"), &redis);
    // Entries stuck with a consumer would wait this long to be claimed:
    // longer than the test.
    options
        .extra_args
        .extend(["--flush-claim-idle-ms".into(), "120000".into()]);
    let app = spawn_app_with(options).await;
    let skus: Vec<String> = (0..32).map(|i| format!("st-{i}")).collect();
    for sku in &skus {
        app.seed(sku, "", 1_000).await;
    }
    // The items themselves are in Postgres before the faults: what Redis
    // loses unflushed is its durability window (a seed lost with it would
    // rightly make its item unknown); the test is about the sales.
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let sales = |from: usize, to: usize| {
        join_all((from..to).map(|n| {
            let (rpc, id) = (app.clients(), format!("w{n}"));
            let lines = vec![
                line(&skus[n % 32], "", 1),
                line(&skus[(n * 7 + 3) % 32], "", 1),
            ];
            async move {
                definite(SETTLE, "a sale", || rpc.decrement(&id, lines.clone()))
                    .await
                    .unwrap();
            }
        }))
    };
    sales(0, 100).await;
    // A stall with sales under way: reads of the flusher time out.
    let stall = async {
        redis.pause(1_000).await;
    };
    tokio::join!(stall, sales(100, 200));
    sales(200, 300).await;
    // Redis comes back empty before the flusher caught up.
    redis.restart().await;
    reconnected(&app.redis).await;
    sales(300, 350).await;

    // Versions 1..v of every item once each, deltas summing to the row.
    app.converged(&pool).await;
    let report = app.reconcile_all(pb::ReconcileMode::Report).await.unwrap();
    assert_eq!(report.checked, 32, "{report:?}");
    assert_eq!(report.ledger_mismatch, 0, "{report:?}");
    assert_eq!(report.in_sync, 32, "{report:?}");
    // The last sales were made after the loss: they are all in.
    let after: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT ref) FROM stock_ledger WHERE ref ~ '^w3[0-4][0-9]$'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(after, 50);
    pool.close().await;
    app.stop().await;
}
