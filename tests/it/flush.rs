//! The write-behind flusher, in process: Postgres ends up holding exactly
//! what Redis holds, whatever the load; malformed entries are set aside;
//! a cut Postgres only grows the backlog, and past its limit new demand is
//! refused until it drains; a Postgres gone silent is given up on in time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::load::{background_load, random_load, seed_catalogue};
use crate::support::metrics;
use crate::support::process::Stockd;
use crate::support::proxy::FaultProxy;
use crate::support::*;
use stockd::keys::Keyspace;
use stockd::redis_conn::RedisConn;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_load_from_many_clients_converges_in_postgres() {
    let app = spawn_app().await;
    let skus = seed_catalogue(&app, "load", 24, 40).await;
    random_load(&app.clients(), &skus, 16, 40, 1).await;

    let pool = app.postgres().await;
    app.converged_within(&pool, Duration::from_secs(30)).await;

    // Reservation rows: every reserved id of the ledger has a row per
    // partition, and its state follows the last event.
    let (rows, held): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE state = 'held') FROM reservations")
            .fetch_one(&pool)
            .await
            .unwrap();
    let expected_rows: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT (ref, partition)) FROM stock_ledger WHERE op = 'reserve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, expected_rows);
    let still_held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT ref, partition FROM stock_ledger WHERE op IN ('reserve','commit','release','expire')
          GROUP BY ref, partition HAVING bool_and(op = 'reserve')) AS t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(held, still_held);
    let with_expiry: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE expires_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(with_expiry, rows, "reserve events carry the expiry");
    pool.close().await;

    // FlushStatus agrees: nothing pending, checkpoints set where events were.
    let status = app.flush_status().await.unwrap();
    assert_eq!(status.partitions.len(), 16);
    for p in &status.partitions {
        assert_eq!(p.pending, 0, "partition {}", p.partition);
        assert_eq!(p.oldest_unflushed_age_ms, 0);
        assert_eq!(
            p.last_flushed_id.is_empty(),
            p.stream_length == 0,
            "partition {}",
            p.partition
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_is_dead_lettered_and_the_partition_keeps_flushing() {
    let app = spawn_app().await;
    app.seed("good", "", 10).await;
    let partition = app.keys.partition_of("good");
    let mut conn = app.redis.clone();
    let planted: String = redis::cmd("XADD")
        .arg(app.keys.events(partition))
        .arg("*")
        .arg(&["sku", "good", "loc", "default", "op", "steal", "ver", "x"])
        .query_async(&mut conn)
        .await
        .unwrap();
    app.decrement("after", vec![line("good", "", 3)])
        .await
        .unwrap();

    let pool = app.postgres().await;
    assert_converged(&mut conn, &app.namespace, &pool, Duration::from_secs(20)).await;
    let dead: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(app.keys.dead_letters(partition))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["entry"], planted);
    assert!(
        dead[0].1["reason"].contains("unknown op"),
        "{:?}",
        dead[0].1
    );
    assert_eq!(dead[0].1["f.op"], "steal");
    let status = app.flush_status().await.unwrap();
    let p = &status.partitions[partition.0 as usize];
    assert_eq!((p.dead_letters, p.pending), (1, 0));
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_off_grows_the_backlog_then_everything_converges() {
    let (proxy, app) = app_behind_a_postgres_proxy("cut", &["--max-unflushed", "60"]).await;
    let skus = seed_catalogue(&app, "cut", 1, 1000).await;
    let sku = &skus[0];
    let rpc = app.clients();
    app.reserve("held-before", vec![line(sku, "", 1)], 600)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&postgres_url(&app.database))
        .await
        .unwrap();
    app.converged(&pool).await;

    proxy.cut();
    // Checkout keeps answering while Postgres is away...
    for i in 0..40 {
        app.decrement(&format!("d{i}"), vec![line(sku, "", 1)])
            .await
            .unwrap();
    }
    // ...and the backlog shows in FlushStatus (answered without Postgres).
    let status = app.flush_status().await.unwrap();
    let p = &status.partitions[app.keys.partition_of(sku).0 as usize];
    assert!(p.pending >= 40, "backlog {p:?}");

    // Past the limit, new demand on the partition is refused and changes nothing.
    let refused = eventually(Duration::from_secs(10), "the backlog gate to close", || {
        let rpc = rpc.clone();
        let sku = sku.clone();
        async move {
            let id = format!("gate-{}", unique_namespace("g"));
            match rpc.decrement(&id, vec![line(&sku, "", 1)]).await {
                Err(s) if s.code() == Code::Unavailable => {
                    assert_eq!(reason(&s), "BACKLOG");
                    assert!(retry_delay(&s).is_some(), "worth retrying: {s:?}");
                    Some(id)
                }
                Ok(_) => None,
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await;
    let before = app.snapshot().await;
    assert_eq!(
        code_of(app.decrement(&refused, vec![line(sku, "", 1)]).await),
        Code::Unavailable
    );
    assert_eq!(
        app.snapshot().await,
        before,
        "a refused write changes nothing"
    );
    // Holds can still be finished: that is bounded by what is held.
    app.commit("held-before").await.unwrap();

    proxy.restore();
    eventually(Duration::from_secs(30), "the gate to open again", || {
        let rpc = rpc.clone();
        let sku = sku.clone();
        async move {
            let id = format!("after-{}", unique_namespace("a"));
            rpc.decrement(&id, vec![line(&sku, "", 1)]).await.ok()
        }
    })
    .await;
    app.converged_within(&pool, Duration::from_secs(30)).await;
    pool.close().await;
    app.stop().await;
}

/// A Postgres connection that goes silent mid-transaction (a partition: no
/// answer, no reset) holds up the flush only until the call timeout: stockd
/// closes that connection, never returns it to the pool, and writes the
/// batch on a new one once Postgres answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_connection_gone_silent_mid_flush_is_dropped_and_the_flush_goes_on() {
    let (proxy, app) =
        app_behind_a_postgres_proxy("silent", &["--database-call-timeout-ms", "1000"]).await;
    let skus = seed_catalogue(&app, "silent", 1, 1000).await;
    let sku = &skus[0];
    let pool = sqlx::PgPool::connect(&postgres_url(&app.database))
        .await
        .unwrap();
    app.converged(&pool).await;

    proxy.freeze_transactions();
    for i in 0..5 {
        app.decrement(&format!("silent-{i}"), vec![line(sku, "", 1)])
            .await
            .unwrap();
    }
    // The flush's transaction went silent, and stockd gave up on it.
    eventually(
        Duration::from_secs(15),
        "a silent connection to be closed by stockd",
        || async {
            let (frozen, released) = proxy.frozen();
            (frozen >= 1 && released >= 1).then_some(())
        },
    )
    .await;
    let written: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM stock")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(written, 1, "nothing of the silent flush was written yet");

    proxy.thaw();
    app.converged_within(&pool, Duration::from_secs(30)).await;
    // Every connection that went silent was closed, none kept in the pool.
    eventually(
        Duration::from_secs(15),
        "every silent connection to be closed",
        || async {
            let (frozen, released) = proxy.frozen();
            (frozen == released).then_some(())
        },
    )
    .await;
    pool.close().await;
    app.stop().await;
}

/// A stockd whose Postgres connections go through a fault proxy (the
/// test's own Postgres client does not).
async fn app_behind_a_postgres_proxy(prefix: &str, extra_args: &[&str]) -> (FaultProxy, TestApp) {
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let namespace = unique_namespace(prefix);
    let database = namespace.replace('-', "_");
    let via_proxy = format!("postgres://postgres@{}/{database}", proxy.addr);
    let app = spawn_app_with(Options {
        namespace,
        database_url: Some(via_proxy),
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..Options::default()
    })
    .await;
    (proxy, app)
}

/// Names and pending counts of the flusher group's consumers on `stream`.
async fn flusher_consumers(redis: &RedisConn, stream: &str) -> Vec<(String, i64)> {
    let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg("flusher")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let mut consumers: Vec<(String, i64)> = info
        .consumers
        .into_iter()
        .map(|c| (c.name, c.pending as i64))
        .collect();
    consumers.sort();
    consumers
}

/// Adds a copy of `stream`'s last entry and delivers it to `consumer` of the
/// flusher group in one transaction, so that the live flusher cannot read
/// it first: as if `consumer` had read it and then lost it.
async fn deliver_a_copy_of_the_last_entry(redis: &RedisConn, stream: &str, consumer: &str) {
    let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let fields: Vec<(String, String)> = last.ids[0]
        .map
        .iter()
        .map(|(k, v)| (k.clone(), redis::from_redis_value_ref(v).unwrap()))
        .collect();
    let _: redis::Value = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(&fields)
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("flusher")
        .arg(consumer)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
}

/// A read delivered to this instance's own consumer whose reply never
/// reached it without an error (a cluster client retrying a read after a
/// failover does that) is found and handled within seconds, not left for
/// the claim timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_reply_was_lost_is_handled_within_seconds() {
    let app = spawn_app_with(Options::with_args(&["--flush-claim-idle-ms", "120000"])).await;
    app.seed("lost-reply", "", 7).await;
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let stream = app.keys.events(app.keys.partition_of("lost-reply"));
    let own = flusher_consumers(&app.redis, &stream).await;
    assert_eq!(own.len(), 1, "{own:?}");
    let own = own[0].0.clone();

    deliver_a_copy_of_the_last_entry(&app.redis, &stream, &own).await;
    assert_eq!(
        flusher_consumers(&app.redis, &stream).await,
        [(own.clone(), 1)]
    );
    eventually(
        Duration::from_secs(10),
        "the lost read to be handled and acknowledged",
        || async {
            let now = flusher_consumers(&app.redis, &stream).await;
            (now == [(own.clone(), 0)]).then_some(())
        },
    )
    .await;
    app.converged(&pool).await;
    pool.close().await;
    app.stop().await;
}

/// Consumers of gone instances are removed once they own nothing and were
/// idle past the threshold; what one still owned is taken over and flushed
/// first; the instance's own consumer stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_consumers_are_removed_once_they_own_nothing() {
    let app = spawn_app_with(Options::with_args(&[
        "--stale-consumer-idle-secs",
        "1",
        "--flush-claim-idle-ms",
        "300",
    ]))
    .await;
    app.seed("stale", "", 7).await;
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let stream = app.keys.events(app.keys.partition_of("stale"));
    let own = flusher_consumers(&app.redis, &stream).await;
    assert_eq!(own.len(), 1, "{own:?}");

    // A gone pod that owns nothing, and one that read an entry and died
    // before flushing it (a copy of the seed's event, added and read in one
    // transaction so that the live flusher cannot read it first).
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg("flusher")
        .arg("gone-pod-a")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    deliver_a_copy_of_the_last_entry(&app.redis, &stream, "gone-pod-b").await;
    let consumers = flusher_consumers(&app.redis, &stream).await;
    let names: Vec<&str> = consumers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"gone-pod-a"), "{consumers:?}");
    assert!(
        consumers.contains(&("gone-pod-b".to_owned(), 1)),
        "{consumers:?}"
    );

    let left = eventually(
        Duration::from_secs(15),
        "the gone pods to be removed",
        || async {
            let now = flusher_consumers(&app.redis, &stream).await;
            (!now.iter().any(|(n, _)| n.starts_with("gone-"))).then_some(now)
        },
    )
    .await;
    assert_eq!(
        left.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        own.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "the instance's own consumer stays"
    );
    // gone-pod-b's entry was taken over and acknowledged, not dropped.
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("flusher")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(pending.count(), 0);
    app.converged(&pool).await;
    pool.close().await;
    app.stop().await;
}

/// The flusher reads its next batch while it writes the one in hand. Under
/// a steady load, where a batch is always read ahead, it still looks at its
/// own pending entries every second: a read whose reply was lost is found
/// while the load goes on, not after it. And every entry is handled exactly
/// once: none is written twice, nor taken for a lost read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ahead_under_steady_load_still_finds_a_lost_read_and_handles_every_entry_once() {
    let namespace = unique_namespace("read-ahead");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let database_url = postgres_url(&database);
    let metrics_port = free_port();
    let args = [
        "--metrics-addr".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
        "--flush-claim-idle-ms".into(),
        "120000".into(),
    ];
    let mut stockd = Stockd::start_with(&namespace, &database_url, "reader", false, &args).await;
    let skus: Vec<String> = (0..32).map(|i| format!("ahead-{i}")).collect();
    stockd.clients().seed_each(&skus, 1_000_000).await;
    let redis = shared_redis().await;
    let keys = Keyspace::new(namespace.clone(), 16);
    let stream = keys.events(keys.partition_of(&skus[0]));
    let flusher_sample = |page: &str, name: &str| {
        metrics::sample(page, name, &["group=\"flusher\""]).unwrap_or(0.0) as u64
    };

    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(stockd.channel(), skus.clone(), stop.clone());
    eventually(Duration::from_secs(30), "20 flushed batches", || async {
        let page = metrics::scrape(metrics_port).await;
        (flusher_sample(&page, "stockd_consumer_batches_total") >= 20).then_some(())
    })
    .await;
    let own = flusher_consumers(&redis, &stream).await;
    assert_eq!(own.len(), 1, "{own:?}");
    deliver_a_copy_of_the_last_entry(&redis, &stream, &own[0].0).await;
    let found = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the lost read to be found",
        || async {
            let page = metrics::scrape(metrics_port).await;
            (flusher_sample(&page, "stockd_consumer_undelivered_reads_total") == 1).then_some(())
        },
    )
    .await;
    let found = found.elapsed();
    let load_ran = !load.is_finished();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        load_ran,
        "the load was still running when the lost read was found"
    );
    assert!(found < Duration::from_secs(5), "found after {found:?}");

    // Each change is one entry; the copy delivered above is one more.
    let levels = levels_in_redis(&mut redis.clone(), &namespace).await;
    let entries = 1 + levels.values().map(|&(_, _, v)| v as u64).sum::<u64>();
    let page = eventually(
        Duration::from_secs(30),
        "every entry to be flushed",
        || async {
            let page = metrics::scrape(metrics_port).await;
            (flusher_sample(&page, "stockd_consumer_entries_total") >= entries).then_some(page)
        },
    )
    .await;
    assert_eq!(
        flusher_sample(&page, "stockd_consumer_entries_total"),
        entries,
        "each of the {entries} entries handled exactly once"
    );
    assert_eq!(
        flusher_sample(&page, "stockd_consumer_undelivered_reads_total"),
        1,
        "no batch read ahead was taken for a lost read"
    );
    assert_eq!(flusher_sample(&page, "stockd_consumer_retries_total"), 0);

    assert_eq!(stockd.terminate().await.code(), Some(0));
    leftovers.remove().await;
}
