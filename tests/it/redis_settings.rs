//! What stockd asks of the Redis it runs on: its layout (a deployment of an
//! older layout is refused, then moved over with --reset-redis), no
//! eviction, and transient Redis states answered as UNAVAILABLE.

use std::time::Duration;

use stockd::app::{Application, StartError};
use stockd::meta::MetaError;
use tonic::Code;

use crate::support::own_redis::OwnRedis;
use crate::support::*;

async fn redis_client(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_older_layout_is_refused_then_moved_over_with_reset_redis() {
    let namespace = unique_namespace("layout");
    let keys = stockd::keys::Keyspace::new(namespace.clone(), 16);
    let mut conn = shared_redis().await;
    // What the first layout left: its meta record, an unencoded stock key,
    // and a change still in its stream, unflushed, read by an old flusher.
    let p = keys.partition_of("old-sku");
    let stream = keys.events(p);
    // The meta record lives in its own slot on a cluster: written apart.
    let () = redis::cmd("HSET")
        .arg(keys.meta())
        .arg(&["partitions", "16", "schema", "1", "epoch", "old"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::pipe()
        .cmd("HSET")
        .arg(format!("{namespace}:{{p{:02}}}:stock:default:old-sku", p.0))
        .arg(&[
            "sku", "old-sku", "loc", "default", "avail", "7", "resv", "0", "ver", "1",
        ])
        .ignore()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("sku", "old-sku"),
            ("loc", "default"),
            ("op", "set"),
            ("d_avail", "7"),
            ("d_resv", "0"),
            ("avail", "7"),
            ("resv", "0"),
            ("ver", "1"),
            ("ref", "old-request"),
            ("ts", "1700000000000"),
        ])
        .ignore()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("flusher")
        .arg("0")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let options = Options {
        namespace: namespace.clone(),
        ..Options::default()
    };
    match Application::build(config_for(&options)).await.map(|_| ()) {
        Err(StartError::Meta(MetaError::SchemaMismatch { stored })) => {
            assert_eq!(stored, "1");
        }
        other => panic!("expected the older layout refused, got {other:?}"),
    }
    let refusal = MetaError::SchemaMismatch { stored: "1".into() }.to_string();
    assert!(refusal.contains("--reset-redis"), "{refusal}");

    let app = spawn_app_with(Options {
        namespace: namespace.clone(),
        extra_args: vec!["--reset-redis".into()],
        ..Options::default()
    })
    .await;
    // The unflushed change reached Postgres before the keys went, and the
    // item is served again from Postgres, in the new layout.
    let level = app
        .level("old-sku", "")
        .await
        .expect("warmed from Postgres");
    assert_eq!((level.available, level.version), (7, 1));
    let (schema, epoch): (String, String) = redis::cmd("HMGET")
        .arg(keys.meta())
        .arg(&["schema", "epoch"])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(schema, stockd::meta::SCHEMA_VERSION.to_string());
    assert_ne!(epoch, "old", "the old deployment record is gone");
    let pool = app.postgres().await;
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_ledger WHERE sku = 'old-sku'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ledger, 1, "the old stream's change was flushed");
    pool.close().await;
    app.stop().await;
}

#[tokio::test]
async fn an_evicting_redis_is_refused_unless_allowed() {
    let redis = OwnRedis::start().await;
    let mut conn = redis_client(&redis.url()).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let options = redis.options(&[]);
    match Application::build(config_for(&options)).await.map(|_| ()) {
        Err(StartError::Meta(MetaError::EvictingPolicy { policy })) => {
            assert_eq!(policy, "allkeys-lru");
        }
        other => panic!("expected an evicting policy refused, got {other:?}"),
    }
    let app = spawn_app_with(Options {
        extra_args: vec!["--allow-redis-eviction".into()],
        ..options
    })
    .await;
    app.seed("evictable", "", 3).await;
    app.stop().await;
}

#[tokio::test]
async fn redis_out_of_memory_answers_unavailable_and_changes_nothing() {
    let redis = OwnRedis::start().await;
    let app = spawn_app_with(redis.options(&[])).await;
    app.seed("oom", "", 5).await;
    let mut conn = redis_client(&redis.url()).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = app.stock_and_streams().await;
    let status = app
        .reserve("oom-1", vec![line("oom", "", 1)], 60)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(app.stock_and_streams().await, before);
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The retry with the same id goes through once Redis has memory again.
    eventually(Duration::from_secs(10), "the reserve to go through", || {
        let rpc = app.clients();
        async move {
            rpc.reserve("oom-1", vec![line("oom", "", 1)], 60)
                .await
                .ok()
        }
    })
    .await;
    app.stop().await;
}
