//! Cache warming: Preload writes only where Redis lacks an item or is
//! older; load on miss reads a cold item from Postgres once; after Redis
//! loses its data, stock and held reservations come back from Postgres.

use std::time::Duration;

use futures::future::join_all;
use stockd::domain::{Item, Lines, RequestId, Ttl};
use stockd::engine::{Engine, EngineSettings};
use stockd::error::Error;
use stockd::keys::Keyspace;
use stockd::pb;
use stockd::store::Store;
use stockd::warmer::{Availability, Warmer};
use tonic::Code;

use crate::support::own_redis::OwnRedis;
use crate::support::*;

async fn stream_lengths(app: &TestApp) -> Vec<usize> {
    let mut conn = app.redis.clone();
    let mut out = Vec::new();
    for p in app.keys.partitions() {
        let n: usize = redis::cmd("XLEN")
            .arg(app.keys.events(p))
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_writes_only_missing_or_older_items_and_no_events() {
    let app = spawn_app().await;
    for sku in ["gone", "stale", "ahead", "same"] {
        app.seed(sku, "", 10).await;
    }
    app.seed("gone", "berlin", 4).await;
    app.adjust("a1", "stale", "", 5, "").await.unwrap();
    let pool = app.postgres().await;
    app.converged(&pool).await;

    // Make Redis lack, lag and lead Postgres on purpose.
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(app.keys.stock("gone", "default"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.stock("stale", "default"))
        .arg(&["avail", "10", "ver", "1"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.stock("ahead", "default"))
        .arg(&["avail", "7", "ver", "50"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let streams_before = stream_lengths(&app).await;

    let counts = app
        .preload_skus(&["gone", "stale", "ahead", "same", "ghost"])
        .await
        .unwrap();
    // gone@default loaded, gone@berlin same, stale loaded, ahead newer, same same
    assert_eq!((counts.loaded, counts.skipped, counts.not_found), (2, 3, 1));
    let redis_levels = levels_in_redis(&mut conn, &app.namespace).await;
    let key = |s: &str| (s.to_owned(), "default".to_owned());
    assert_eq!(redis_levels[&key("gone")], (10, 0, 1));
    assert_eq!(
        redis_levels[&key("stale")],
        (15, 0, 2),
        "Postgres's newer state is loaded"
    );
    assert_eq!(
        redis_levels[&key("ahead")],
        (7, 0, 50),
        "a newer Redis state survives"
    );
    assert_eq!(
        stream_lengths(&app).await,
        streams_before,
        "a preload writes no event"
    );

    // The whole catalogue, page by page: nothing left to load.
    let mut cursor = String::new();
    let (mut loaded, mut skipped, mut pages) = (0, 0, 0);
    loop {
        let page = app
            .preload(pb::PreloadRequest {
                page_size: 2,
                cursor,
                ..preload_all_request()
            })
            .await
            .unwrap();
        loaded += page.loaded;
        skipped += page.skipped;
        pages += 1;
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!((loaded, skipped), (0, 5));
    assert_eq!(pages, 3);
    let status = app
        .preload(pb::PreloadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preload_racing_reservations_never_rolls_redis_back() {
    let app = spawn_app().await;
    app.seed("race", "", 100_000).await;
    let mut successes = 0i64;
    for round in 0..12 {
        let reserves = (0..40).map(|i| {
            let rpc = app.clients();
            async move {
                rpc.reserve(&format!("r{round}-{i}"), vec![line("race", "", 1)], 600)
                    .await
                    .is_ok()
            }
        });
        let preloads = (0..4).map(|_| {
            let rpc = app.clients();
            async move { rpc.preload_all().await.unwrap() }
        });
        let (ok, _) = tokio::join!(join_all(reserves), join_all(preloads));
        successes += ok.into_iter().filter(|ok| *ok).count() as i64;
        let level = app.level("race", "").await.unwrap();
        assert_eq!(
            (level.available, level.reserved, level.version),
            (100_000 - successes, successes, 1 + successes),
            "round {round}: a preload rolled Redis back to an older Postgres state"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_item_is_loaded_once_under_100_concurrent_requests() {
    let namespace = unique_namespace("cold");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let store = Store::connect(&postgres_config(&database)).await.unwrap();
    sqlx::query(
        "INSERT INTO stock (sku, location, available, reserved, version) VALUES
         ('cold', 'default', 50, 3, 7), ('cold2', 'default', 5, 0, 4), ('cold3', 'default', 1, 0, 9)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let conn = shared_redis().await;
    let keys = Keyspace::new(namespace.clone(), 16);
    let warmer = Warmer::new(
        conn.clone(),
        store.clone(),
        keys.clone(),
        Availability::new(true),
    );
    let markers = establish_markers(&mut conn.clone(), &keys).await;
    let engine = Engine::new(conn.clone(), keys, markers, EngineSettings::default())
        .with_warmer(warmer.clone());

    let one = |sku: &str| {
        Lines::parse(
            "lines",
            vec![(sku.to_owned(), String::new(), 1)].into_iter(),
        )
        .unwrap()
    };
    let attempts = (0..100).map(|i| {
        let engine = engine.clone();
        let lines = one("cold");
        async move {
            let id = RequestId::parse("id", format!("r{i}")).unwrap();
            engine
                .reserve(&id, &lines, Ttl::parse("ttl", 600).unwrap())
                .await
        }
    });
    let results = join_all(attempts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(_) | Err(Error::InsufficientStock(_)))),
        "{results:?}"
    );
    assert_eq!(ok, 50, "exactly the 50 units Postgres had");
    assert_eq!(
        warmer.loads_on_miss(),
        1,
        "one load for 100 waiting requests"
    );
    let cold = Item::parse("", "cold".into(), String::new()).unwrap();
    let (levels, _) = engine.get(std::slice::from_ref(&cold)).await.unwrap();
    assert_eq!(
        (levels[0].available, levels[0].reserved, levels[0].version),
        (0, 53, 57)
    );

    // Reads and sets load a cold item too; a set continues its version.
    let cold2 = Item::parse("", "cold2".into(), String::new()).unwrap();
    let (levels, missing) = engine.get(std::slice::from_ref(&cold2)).await.unwrap();
    assert!(missing.is_empty());
    assert_eq!(levels[0].version, 4);
    let cold3 = Item::parse("", "cold3".into(), String::new()).unwrap();
    let set = engine
        .set(
            &RequestId::parse("id", "s1").unwrap(),
            &cold3,
            stockd::domain::Level::parse("a", 8).unwrap(),
            Some(9),
        )
        .await
        .unwrap();
    assert_eq!(
        set.levels[0].version, 10,
        "SetStock on a cold item continues its Postgres version"
    );
    assert_eq!(warmer.loads_on_miss(), 3);

    // Only an item in neither store is unknown.
    let ghost = engine
        .reserve(
            &RequestId::parse("id", "g").unwrap(),
            &one("ghost"),
            Ttl::parse("ttl", 0).unwrap(),
        )
        .await;
    assert!(matches!(ghost, Err(Error::UnknownItems(_))), "{ghost:?}");
    let (_, missing) = engine
        .get(&[Item::parse("", "ghost".into(), String::new()).unwrap()])
        .await
        .unwrap();
    assert_eq!(missing.len(), 1);

    store.pool().close().await;
    leftovers.remove().await;
}

/// What Redis losing its data looks like: every key of the namespace gone
/// at once (per partition on a cluster, where each node loses its own). A
/// key-by-key deletion would race the watchdog, which restores partitions
/// as soon as their markers go.
async fn lose_every_key(app: &TestApp) {
    lose_every_key_but(app, &[]).await;
}

/// Three holds (two long, one short) and some sales, all flushed.
async fn holds_then_drain(app: &TestApp) -> i64 {
    let skus = skus_in_distinct_partitions(&app.keys, "loss", 3);
    for sku in &skus {
        app.seed(sku, "", 20).await;
    }
    app.reserve(
        "keep",
        vec![line(&skus[0], "", 2), line(&skus[1], "", 1)],
        600,
    )
    .await
    .unwrap();
    app.reserve("give-back", vec![line(&skus[1], "", 3)], 600)
        .await
        .unwrap();
    let short = app
        .reserve(
            "lapse",
            vec![line(&skus[2], "", 4), line(&skus[0], "", 1)],
            4,
        )
        .await
        .unwrap();
    app.decrement("sale", vec![line(&skus[2], "", 5)])
        .await
        .unwrap();
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'held'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        held, 5,
        "three holds over five (reservation, partition) rows"
    );
    pool.close().await;
    short.expires_at_ms
}

/// After the loss: Redis equals Postgres again, one hold commits, one
/// releases, the short one expires on time.
async fn assert_recovered(app: &TestApp, lapse_at_ms: i64) {
    let pool = app.postgres().await;
    let expected = levels_in_postgres(&pool).await;
    eventually(Duration::from_secs(20), "Redis to be re-warmed", || {
        let mut conn = app.redis.clone();
        let expected = expected.clone();
        let namespace = app.namespace.clone();
        async move { (levels_in_redis(&mut conn, &namespace).await == expected).then_some(()) }
    })
    .await;
    // On a Redis Cluster the partitions come back node by node, and a
    // commit refused UNAVAILABLE by a part not restored yet may already be
    // decided by its coordinator (its retry then replays it, rightly). So
    // the first commit waits until every partition has its marker again
    // and no heal deadline: then it must be a commit, not a replay.
    eventually(
        Duration::from_secs(20),
        "every partition to be restored",
        || {
            let mut conn = app.redis.clone();
            let markers: Vec<String> = app.keys.partitions().map(|p| app.keys.marker(p)).collect();
            async move {
                for marker in markers {
                    let (epoch, heal): (Option<String>, Option<String>) = redis::cmd("HMGET")
                        .arg(&marker)
                        .arg("epoch")
                        .arg("heal")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if epoch.is_none() || heal.is_some() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    let rpc = eventually(Duration::from_secs(20), "stockd to serve again", || {
        let rpc = app.clients();
        async move {
            let r = rpc.commit("keep").await;
            match r {
                Ok(c) => {
                    assert!(!c.replayed);
                    Some(rpc)
                }
                Err(s) if s.code() == Code::Unavailable => None,
                Err(s) => panic!("commit of a restored hold: {s:?}"),
            }
        }
    })
    .await;
    let released = rpc.release("give-back").await.unwrap();
    assert!(!released.replayed);
    // In the ledger rather than the streams: on a slow machine the hold
    // may lapse before the loss, and its event go with the lost streams.
    let expired_at_ms: i64 =
        eventually(Duration::from_secs(20), "the short hold to expire", || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar(
                    "SELECT (extract(epoch FROM occurred_at) * 1000)::bigint FROM stock_ledger
                     WHERE op = 'expire' AND ref = 'lapse' LIMIT 1",
                )
                .fetch_optional(&pool)
                .await
                .unwrap()
            }
        })
        .await;
    let late = expired_at_ms - lapse_at_ms;
    if !(0..3_000).contains(&late) {
        // Seen once (-3 ms) in a CI run and never reproduced: what Postgres
        // holds of the hold, to tell which record's expiry was used.
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT format('ledger p%s v%s %s %s at %s', partition, version, op, entry_id,
                           (extract(epoch FROM occurred_at) * 1000)::bigint)
               FROM stock_ledger WHERE ref = 'lapse'
             UNION ALL
             SELECT format('reservation p%s %s expires %s updated %s', partition, state,
                           (extract(epoch FROM expires_at) * 1000)::bigint,
                           (extract(epoch FROM updated_at) * 1000)::bigint)
               FROM reservations WHERE reservation_id = 'lapse'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        panic!("expired {late} ms after its expiry ({lapse_at_ms}): {rows:#?}");
    }
    app.converged(&pool).await;
    let reserved: i64 = sqlx::query_scalar("SELECT sum(reserved)::bigint FROM stock")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(reserved, 0, "every hold ended");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_every_key_rewarms_stock_and_holds_from_postgres() {
    let app = spawn_app_with(Options::with_args(&["--epoch-check-ms", "100"])).await;
    let lapse_at = holds_then_drain(&app).await;
    lose_every_key(&app).await;
    assert_recovered(&app, lapse_at).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_without_persistence_rewarms_stock_and_holds() {
    let mut redis = OwnRedis::start().await;
    let app = spawn_app_with(redis.options(&["--epoch-check-ms", "100"])).await;
    let lapse_at = holds_then_drain(&app).await;
    redis.restart().await;
    // The test's own connection notices the restart on its first command.
    reconnected(&app.redis).await;
    assert_recovered(&app, lapse_at).await;
    app.stop().await;
}
