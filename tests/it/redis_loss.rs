//! Issue 11, the failures Redis really has: two items that once shared a
//! key, a Redis that rolls back to an older snapshot, a Redis that comes
//! back empty while clients retry. Each fault test owns its redis-server.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use stockd::keys::Keyspace;
use stockd::pb::{self};
use stockd::redis_conn::RedisConn;
use tonic::Code;

use crate::support::metrics::{sample, scrape};
use crate::support::own_redis::OwnRedis;
use crate::support::process::Stockd;
use crate::support::*;

/// How long a test waits for a definite answer across a fault.
const SETTLE: Duration = Duration::from_secs(30);

/// `(sku, location)` pairs that once met in one key, `stock:wh:P:X`:
/// (`P:X`, `wh`) and (`X`, `wh:P`), with both SKUs in one partition.
fn aliasing_pair(keys: &Keyspace, base: &str) -> [(String, String); 2] {
    let prefix = (0..)
        .map(|i| format!("Z{i}"))
        .find(|p| keys.partition_of(&format!("{p}:{base}")) == keys.partition_of(base))
        .unwrap();
    [
        (format!("{prefix}:{base}"), "wh".to_owned()),
        (base.to_owned(), format!("wh:{prefix}")),
    ]
}

fn lines_of(lines: &[(&str, &str, i64)]) -> Vec<pb::Line> {
    lines.iter().map(|(s, l, q)| line(s, l, *q)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_whose_names_once_shared_a_key_stay_apart() {
    let app = spawn_app().await;
    for (present, absent, base) in [(0, 1, "X"), (1, 0, "Y")] {
        let pair = aliasing_pair(&app.keys, base);
        let (p_sku, p_loc) = &pair[present];
        let (a_sku, a_loc) = &pair[absent];
        app.seed(p_sku, p_loc, 3).await;
        // In one request, both orders: the absent item is unknown and
        // nothing is taken.
        for (n, lines) in [
            [(a_sku, a_loc), (p_sku, p_loc)],
            [(p_sku, p_loc), (a_sku, a_loc)],
        ]
        .into_iter()
        .enumerate()
        {
            let before = app.stock_and_streams().await;
            let lines: Vec<_> = lines
                .iter()
                .map(|(s, l)| (s.as_str(), l.as_str(), 1))
                .collect();
            let status = app
                .decrement(&format!("both-{present}-{n}"), lines_of(&lines))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            let status = app
                .reserve(&format!("hold-{present}-{n}"), lines_of(&lines), 60)
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert_eq!(
                app.stock_and_streams().await,
                before,
                "a refusal changes nothing"
            );
        }
        // In two requests, both orders: only the present one loses a unit.
        for n in 0..2 {
            let absent_first = n == 0;

            let order = if absent_first {
                [(a_sku, a_loc, "a"), (p_sku, p_loc, "p")]
            } else {
                [(p_sku, p_loc, "p"), (a_sku, a_loc, "a")]
            };
            for (sku, loc, tag) in order {
                let id = format!("one-{present}-{n}-{tag}");
                let result = app.decrement(&id, vec![line(sku, loc, 1)]).await;
                if tag == "a" {
                    assert_eq!(code_of(result), Code::NotFound);
                } else {
                    result.unwrap();
                }
            }
        }
        let level = app.level(p_sku, p_loc).await.unwrap();
        assert_eq!((level.available, level.reserved), (1, 0), "two sales of 3");
        let missing = app.get(&[(a_sku, a_loc)]).await.unwrap();
        assert!(missing.levels.is_empty(), "the absent item stays absent");
        let pool = app.postgres().await;
        app.converged(&pool).await;
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT sku, location FROM stock")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(!rows.contains(&(a_sku.clone(), a_loc.clone())), "{rows:?}");
        pool.close().await;
    }
    app.stop().await;
}

/// A stockd process on a test-owned Redis, its clients, and what a test
/// looks at: that Redis and the process' own database and metrics.
struct Rig {
    stockd: Stockd,
    namespace: String,
    metrics: u16,
    rpc: Clients,
    conn: RedisConn,
    pool: sqlx::PgPool,
    /// The database (the keys go with the test's own Redis); the last
    /// field, so that the process is gone first.
    leftovers: Leftovers,
}

impl Rig {
    async fn start(redis: &OwnRedis, tag: &str) -> Self {
        let namespace = unique_namespace(tag);
        let database = namespace.replace('-', "_");
        let metrics = free_port();
        let stockd = Stockd::start_on_redis(
            &redis.url(),
            &namespace,
            &postgres_url(&database),
            tag,
            &[
                "--metrics-addr".into(),
                format!("127.0.0.1:{metrics}"),
                "--epoch-check-ms".into(),
                "100".into(),
                "--reaper-interval-ms".into(),
                "50".into(),
            ],
        )
        .await;
        let rpc = stockd.clients();
        let conn = stockd::app::connect_redis(&redis.url(), false, Duration::from_secs(5))
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&postgres_url(&database))
            .await
            .unwrap();
        Self {
            stockd,
            namespace,
            metrics,
            rpc,
            conn,
            pool,
            leftovers: Leftovers::database(&database),
        }
    }

    async fn set(&self, sku: &str, available: i64) {
        self.rpc.seed_each(&[sku.to_owned()], available).await;
    }

    async fn sell(&self, id: &str, sku: &str, quantity: i64) -> pb::DecrementResponse {
        definite(SETTLE, id, || {
            self.rpc.decrement(id, vec![line(sku, "", quantity)])
        })
        .await
        .unwrap()
    }

    async fn converged(&self) {
        assert_converged(
            &mut self.conn.clone(),
            &self.namespace,
            &self.pool,
            Duration::from_secs(20),
        )
        .await;
    }

    async fn rollbacks(&self) -> f64 {
        sample(
            &scrape(self.metrics).await,
            "stockd_redis_rollbacks_total",
            &[],
        )
        .unwrap_or(0.0)
    }

    /// How often each ref is in the ledger, per op.
    async fn ledger_refs(&self) -> BTreeMap<(String, String), i64> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT op, ref, count(*) FROM stock_ledger GROUP BY op, ref")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter().map(|(op, r, n)| ((op, r), n)).collect()
    }

    async fn forks(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ledger_forks")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        let status = self.stockd.terminate().await;
        assert!(status.success(), "{status}");
        self.pool.close().await;
        self.leftovers.remove().await;
    }
}

/// Available and reserved of every item, both stores, once they agree.
async fn settled_levels(rig: &Rig) -> BTreeMap<String, (i64, i64)> {
    rig.converged().await;
    levels_in_postgres(&rig.pool)
        .await
        .into_iter()
        .map(|((sku, _), (a, r, _))| (sku, (a, r)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_healed_and_every_acknowledged_sale_is_kept() {
    let mut redis = OwnRedis::start_persistent().await;
    let rig = Rig::start(&redis, "rollback").await;
    let keys = Keyspace::new(rig.namespace.clone(), 16);
    let skus = skus_in_distinct_partitions(&keys, "rb", 2);
    let (a, b) = (skus[0].as_str(), skus[1].as_str());
    rig.set(a, 10).await;
    rig.set(b, 10).await;
    rig.converged().await;
    redis.save().await;
    let before = rig.rollbacks().await;

    // Acknowledged and flushed after the snapshot: Redis forgets them.
    rig.sell("s1", a, 1).await;
    rig.sell("s2", b, 2).await;
    rig.sell("s3", a, 1).await;
    rig.converged().await;
    redis.restart_from_snapshot().await;
    reconnected(&rig.conn).await;
    // More sales at once; the first ones meet the rolled-back Redis.
    rig.sell("s4", a, 1).await;
    rig.sell("s5", b, 1).await;
    rig.sell("s6", a, 2).await;

    let levels = settled_levels(&rig).await;
    assert_eq!(levels[a], (10 - 5, 0), "{levels:?}");
    assert_eq!(levels[b], (10 - 3, 0), "{levels:?}");
    let refs = rig.ledger_refs().await;
    for id in ["s1", "s2", "s3", "s4", "s5", "s6"] {
        assert_eq!(
            refs.get(&("decrement".to_owned(), id.to_owned())),
            Some(&1),
            "{id} once in the ledger: {refs:?}"
        );
    }
    assert_eq!(rig.forks().await, 0, "nothing forked");
    assert!(
        rig.rollbacks().await >= before + 1.0,
        "stockd_redis_rollbacks_total moved"
    );
    // A retry of a sale Redis forgot replays it.
    let again = rig.sell("s2", b, 2).await;
    assert!(again.replayed);
    assert_eq!(settled_levels(&rig).await[b], (7, 0));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_with_open_holds_keeps_every_hold() {
    let mut redis = OwnRedis::start_persistent().await;
    let rig = Rig::start(&redis, "rollhold").await;
    let keys = Keyspace::new(rig.namespace.clone(), 16);
    let skus = skus_in_distinct_partitions(&keys, "rh", 2);
    let (a, b) = (skus[0].as_str(), skus[1].as_str());
    rig.set(a, 10).await;
    rig.set(b, 10).await;
    let hold = |id: &'static str, lines: Vec<pb::Line>| rig.rpc.reserve(id, lines, 600);
    hold("h1", vec![line(a, "", 2)]).await.unwrap();
    rig.converged().await;
    redis.save().await;
    let before = rig.rollbacks().await;

    // After the snapshot: h1 committed, h2 and h3 held, a sale.
    rig.rpc.commit("h1").await.unwrap();
    hold("h2", vec![line(b, "", 3)]).await.unwrap();
    hold("h3", vec![line(a, "", 1), line(b, "", 1)])
        .await
        .unwrap();
    rig.sell("s1", a, 1).await;
    rig.converged().await;
    redis.restart_from_snapshot().await;
    reconnected(&rig.conn).await;

    // Redis' snapshot still holds h1, and neither h2 nor h3.
    let again = definite(SETTLE, "commit h1", || rig.rpc.commit("h1"))
        .await
        .unwrap();
    assert!(again.replayed, "h1 was committed before the rollback");
    let committed = definite(SETTLE, "commit h2", || rig.rpc.commit("h2"))
        .await
        .expect("a hold acknowledged before the rollback is live");
    assert!(!committed.replayed);
    let released = definite(SETTLE, "release h3", || rig.rpc.release("h3"))
        .await
        .expect("a hold acknowledged before the rollback is live");
    assert!(!released.replayed);

    let levels = settled_levels(&rig).await;
    assert_eq!(levels[a], (10 - 2 - 1, 0), "{levels:?}");
    assert_eq!(levels[b], (10 - 3, 0), "{levels:?}");
    let refs = rig.ledger_refs().await;
    for (op, id, n) in [
        ("reserve", "h1", 1),
        ("commit", "h1", 1),
        ("reserve", "h2", 1),
        ("commit", "h2", 1),
        ("reserve", "h3", 2),
        ("release", "h3", 2),
        ("decrement", "s1", 1),
    ] {
        assert_eq!(
            refs.get(&(op.to_owned(), id.to_owned())),
            Some(&n),
            "{op} {id}: {refs:?}"
        );
    }
    assert_eq!(rig.forks().await, 0, "nothing forked");
    assert!(rig.rollbacks().await >= before + 1.0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_after_a_loss_replay_their_first_outcome() {
    let mut redis = OwnRedis::start().await;
    let app = spawn_app_with(redis.options(&["--epoch-check-ms", "100"])).await;
    let skus = skus_in_distinct_partitions(&app.keys, "retry", 4);
    for sku in &skus {
        app.seed(sku, "", 10).await;
    }
    // Each call with its quantity: the same one is a retry, another one
    // another payload under the same id.
    let dec = |quantity| app.decrement("dec", vec![line(&skus[0], "", quantity)]);
    let adj = |delta| app.adjust("adj", &skus[1], "", delta, "found");
    let set = |available| app.set("set", &skus[2], "", available);
    let res = |quantity| app.reserve("res", vec![line(&skus[3], "", quantity)], 600);
    let first_dec = dec(2).await.unwrap();
    let first_adj = adj(3).await.unwrap();
    let first_set = set(7).await.unwrap();
    let first_res = res(3).await.unwrap();
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let flushed = levels_in_postgres(&pool).await;

    redis.restart().await;
    reconnected(&app.redis).await;

    let again_dec = definite(SETTLE, "decrement", || dec(2)).await.unwrap();
    assert!(again_dec.replayed);
    assert_eq!(again_dec.levels, first_dec.levels, "the first outcome");
    let again_adj = adj(3).await.unwrap();
    assert!(again_adj.replayed);
    assert_eq!(again_adj.level, first_adj.level);
    let again_set = set(7).await.unwrap();
    assert!(again_set.replayed);
    assert_eq!(again_set.level, first_set.level);
    let again_res = res(3).await.unwrap();
    assert!(again_res.replayed);
    assert_eq!(
        (again_res.levels, again_res.expires_at_ms),
        (first_res.levels, first_res.expires_at_ms)
    );
    assert_eq!(
        levels_in_redis(&mut app.redis.clone(), &app.namespace).await,
        flushed,
        "the retries took nothing more"
    );

    // The same ids with another payload are refused, and change nothing.
    assert_eq!(code_of(dec(1).await), Code::AlreadyExists);
    assert_eq!(code_of(adj(4).await), Code::AlreadyExists);
    assert_eq!(code_of(set(9).await), Code::AlreadyExists);
    assert_eq!(code_of(res(1).await), Code::AlreadyExists);
    assert_eq!(
        levels_in_redis(&mut app.redis.clone(), &app.namespace).await,
        flushed
    );

    // The restored hold is live.
    let committed = app.commit("res").await.unwrap();
    assert!(!committed.replayed);
    assert_eq!(
        (committed.levels[0].available, committed.levels[0].reserved),
        (7, 0)
    );
    app.converged(&pool).await;
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_on_two_instances_right_after_a_loss_find_every_hold() {
    const HOLDS: usize = 40;
    let mut redis = OwnRedis::start().await;
    let namespace = unique_namespace("window");
    let options = || Options {
        namespace: namespace.clone(),
        redis_url: Some(redis.url()),
        extra_args: vec!["--epoch-check-ms".into(), "100".into()],
        ..Options::default()
    };
    let apps = [
        spawn_app_with(options()).await,
        spawn_app_with(options()).await,
    ];
    let skus = skus_in_distinct_partitions(&apps[0].keys, "lw", 8);
    for sku in &skus {
        apps[0].seed(sku, "", 100).await;
    }
    // Holds of two lines each, over every partition.
    let hold = |rpc: Clients, i: usize| {
        let lines = vec![line(&skus[i % 8], "", 1), line(&skus[(i + 3) % 8], "", 2)];
        async move { rpc.reserve(&format!("h{i}"), lines, 600).await }
    };
    let firsts = join_all((0..HOLDS).map(|i| {
        let hold = hold(apps[i % 2].clients(), i);
        async move { hold.await.unwrap() }
    }))
    .await;
    let pool = apps[0].postgres().await;
    apps[0].converged(&pool).await;

    redis.restart().await;
    // At once, on both instances: even holds are committed, odd ones
    // are asked for again (their first answer was lost) and released.
    let answers = join_all((0..HOLDS).map(|i| {
        let rpc = apps[(i + 1) % 2].clients();
        let first = firsts[i].clone();
        async move {
            if i % 2 == 0 {
                let id = format!("h{i}");
                let commit = definite(SETTLE, "commit", || rpc.commit(&id)).await;
                let commit = commit.unwrap_or_else(|s| panic!("commit of live h{i}: {s:?}"));
                assert!(!commit.replayed, "h{i}");
            } else {
                let again = definite(SETTLE, "reserve again", || hold(rpc.clone(), i))
                    .await
                    .unwrap_or_else(|s| panic!("retry of h{i}: {s:?}"));
                assert!(again.replayed, "a retry of h{i} replays");
                assert_eq!(again.expires_at_ms, first.expires_at_ms);
                let id = format!("h{i}");
                let release = definite(SETTLE, "release", || rpc.release(&id)).await;
                let release = release.unwrap_or_else(|s| panic!("release of live h{i}: {s:?}"));
                assert!(!release.replayed, "h{i}");
            }
        }
    }))
    .await;
    assert_eq!(answers.len(), HOLDS);
    reconnected(&apps[0].redis).await;
    apps[0].converged(&pool).await;
    // Every hold ended: nothing stays reserved; each committed hold took
    // its three units once.
    let levels = levels_in_postgres(&pool).await;
    let reserved: i64 = levels.values().map(|(_, r, _)| r).sum();
    let available: i64 = levels.values().map(|(a, _, _)| a).sum();
    assert_eq!(reserved, 0, "{levels:?}");
    assert_eq!(available, 8 * 100 - (HOLDS as i64 / 2) * 3, "{levels:?}");
    pool.close().await;
    let [first, second] = apps;
    second.stop_keep_data().await;
    first.stop().await;
}

// Issue 14, seen in CI: the flusher committed a batch, the master died
// before the marker write, the batch was retried and marked on the lagging
// replica that had taken over; that marker vouched for writes Postgres had
// and every script took writes on the old state (ledger forks). A marker
// only moves to an entry its Redis holds; one it lacks is reported.
#[tokio::test]
async fn a_flush_is_marked_only_in_a_redis_that_holds_its_entry() {
    use stockd::markers::{EntryId, Markers};
    let namespace = unique_namespace("unheld");
    let keys = Keyspace::new(namespace.clone(), 4);
    let markers = Markers::new(keys.clone());
    let mut conn = shared_redis().await;
    let p = stockd::keys::Partition(2);
    markers
        .establish(&mut conn, p, "epoch-1", None, None)
        .await
        .unwrap();
    let flushed_of = |states: Vec<stockd::markers::MarkerState>| states[p.index()].flushed;

    let held: String = redis::cmd("XADD")
        .arg(keys.events(p))
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let held = EntryId::parse(&held).unwrap();
    markers.mark_flushed(&mut conn, &[(p, held)]).await.unwrap();
    assert_eq!(
        flushed_of(markers.read_all(&mut conn).await.unwrap()),
        Some(held)
    );
    assert!(!markers.rolled_back(p));

    // An older entry the stream lacks (trimmed): the marker is past it.
    let older = EntryId {
        ms: held.ms - 1,
        seq: 0,
    };
    markers
        .mark_flushed(&mut conn, &[(p, older)])
        .await
        .unwrap();
    assert_eq!(
        flushed_of(markers.read_all(&mut conn).await.unwrap()),
        Some(held)
    );
    assert!(!markers.rolled_back(p), "nothing is missing");

    // A newer one it lacks: this Redis does not hold what Postgres has.
    let lacking = EntryId {
        ms: held.ms + 1_000,
        seq: 0,
    };
    markers
        .mark_flushed(&mut conn, &[(p, lacking)])
        .await
        .unwrap();
    assert_eq!(
        flushed_of(markers.read_all(&mut conn).await.unwrap()),
        Some(held),
        "not marked"
    );
    assert!(markers.rolled_back(p), "reported for the watchdog to heal");
    assert_eq!(
        markers.seen(p),
        Some(lacking),
        "known, so that every script refuses the partition"
    );
    delete_namespace(&mut conn, &namespace).await;
}

// Issue 14: another instance's flusher committed a batch and its master
// died before the marker write. This instance learns that flush at the
// commit (NOTIFY), so it refuses a Redis that lacks it at once, without
// waiting for its watchdog's next look (here ten minutes away), and the
// watchdog then heals the partition from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_committed_elsewhere_is_known_here_at_its_commit() {
    let app = spawn_app_with(Options::with_args(&["--epoch-check-ms", "600000"])).await;
    let pool = app.postgres().await;
    app.seed("elsewhere", "default", 40).await;
    app.converged(&pool).await;
    let lacking = commit_a_flush_redis_lacks(&app, "elsewhere").await;
    refused_then_healed(&app, "elsewhere", lacking, Duration::from_secs(5)).await;
    app.stop().await;
}

// The same flush committed while this instance's Postgres connections
// were cut: the notification is lost with the connection, and the
// checkpoints read after the reconnection bring the flush in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_committed_while_the_feed_was_cut_is_learned_on_reconnection() {
    use crate::support::proxy::FaultProxy;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let namespace = unique_namespace("feedcut");
    let database = namespace.replace('-', "_");
    let app = spawn_app_with(Options {
        namespace,
        database_url: Some(format!("postgres://postgres@{}/{database}", proxy.addr)),
        extra_args: vec!["--epoch-check-ms".into(), "600000".into()],
        ..Options::default()
    })
    .await;
    let pool = sqlx::PgPool::connect(&postgres_url(&app.database))
        .await
        .unwrap();
    app.seed("cut-off", "default", 40).await;
    app.converged(&pool).await;

    proxy.cut();
    let lacking = commit_a_flush_redis_lacks(&app, "cut-off").await;
    // Nothing told this instance: reads are served while the cut lasts.
    app.level("cut-off", "default")
        .await
        .expect("served during the cut");
    proxy.restore();
    // Reconnected within the feed's backoff (at most 5 s).
    refused_then_healed(&app, "cut-off", lacking, Duration::from_secs(15)).await;
    pool.close().await;
    app.stop().await;
}

/// What another instance's flusher commits when its master dies before
/// the marker write and a lagging replica takes over: a checkpoint of
/// `sku`'s partition past everything this Redis holds (written straight
/// to Postgres, not through the app's connections). Returns its entry id.
async fn commit_a_flush_redis_lacks(app: &TestApp, sku: &str) -> stockd::markers::EntryId {
    use stockd::markers::EntryId;
    let p = app.keys.partition_of(sku);
    let marked: String = redis::cmd("HGET")
        .arg(app.keys.marker(p))
        .arg("flushed")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let marked = EntryId::parse(&marked).expect("the seed was marked");
    let lacking = EntryId {
        ms: marked.ms + 1,
        seq: 0,
    };
    let store = stockd::store::Store::connect(&postgres_config(&app.database))
        .await
        .unwrap();
    store
        .write_batch(&stockd::store::FlushBatch {
            checkpoints: vec![(p.0, lacking)],
            ..Default::default()
        })
        .await
        .unwrap();
    lacking
}

/// Reads of `sku` are refused UNAVAILABLE within `within` (its partition's
/// marker is behind `lacking`, which the stream lacks), then, the watchdog
/// woken by the refusal, served again from Postgres with its marker at
/// `lacking`.
async fn refused_then_healed(
    app: &TestApp,
    sku: &str,
    lacking: stockd::markers::EntryId,
    within: Duration,
) {
    let inventory = app.inventory.clone();
    let refused = eventually(within, "reads of the partition refused", || {
        let mut inventory = inventory.clone();
        async move {
            let answer = inventory.get_stock(get_request(&[(sku, "default")])).await;
            match answer {
                Err(status) if status.code() == Code::Unavailable => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(reason(&refused), "REDIS_UNAVAILABLE");
    let level = eventually(SETTLE, "the partition served again", || {
        let mut inventory = inventory.clone();
        async move {
            inventory
                .get_stock(get_request(&[(sku, "default")]))
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_eq!(level.levels[0].available, 40);
    let healed: String = redis::cmd("HGET")
        .arg(app.keys.marker(app.keys.partition_of(sku)))
        .arg("flushed")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(stockd::markers::EntryId::parse(&healed), Some(lacking));
}
