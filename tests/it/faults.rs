//! Faults: stockd against a Redis that goes away. The test owns that Redis
//! (a redis-server on a free local port) and stops it.

use std::time::Duration;

use tonic::Code;

use crate::support::own_redis::OwnRedis;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_is_unavailable() {
    let mut redis = OwnRedis::start().await;
    let app = spawn_app_with(redis.options(&["--redis-timeout-ms", "500"])).await;
    app.seed("sku", "", 3).await;
    redis.kill();

    let status = app
        .reserve("r", vec![line("sku", "", 1)], 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "REDIS_UNAVAILABLE");
    assert!(retry_delay(&status).is_some(), "worth retrying: {status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "no infrastructure detail leaks: {status:?}"
    );
    let status = app.get(&[("sku", "")]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    app.stop_on_own_redis().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_turned_replica_is_unavailable_and_changes_nothing() {
    let redis = OwnRedis::start().await;
    let app = spawn_app_with(redis.options(&[])).await;
    app.seed("ro", "", 5).await;
    let config = |name: &'static str, value: &'static str| {
        let redis = &redis;
        async move {
            let () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut redis.connection().await)
                .await
                .unwrap();
        }
    };
    let replica_of = |target: Vec<&'static str>| {
        let redis = &redis;
        async move {
            let () = redis::cmd("REPLICAOF")
                .arg(target)
                .query_async(&mut redis.connection().await)
                .await
                .unwrap();
        }
    };
    // A replica of a master that does not answer: it keeps its data,
    // refuses writes (READONLY), then, told not to serve stale data,
    // everything (MASTERDOWN).
    replica_of(vec!["127.0.0.1", "1"]).await;
    let before = app.stock_and_streams().await;
    let sale = || app.decrement("ro-1", vec![line("ro", "", 1)]);
    for (n, serve_stale) in ["yes", "no"].into_iter().enumerate() {
        config("replica-serve-stale-data", serve_stale).await;
        let status = sale().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "round {n}: {status:?}");
        assert_eq!(reason(&status), "REDIS_UNAVAILABLE");
    }
    config("replica-serve-stale-data", "yes").await;
    assert_eq!(app.stock_and_streams().await, before, "nothing changed");
    replica_of(vec!["NO", "ONE"]).await;
    let sold = definite(Duration::from_secs(10), "the sale", sale)
        .await
        .unwrap();
    assert!(!sold.replayed);
    assert_eq!(sold.levels[0].available, 4);
    app.stop_on_own_redis().await;
}
