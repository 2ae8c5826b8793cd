//! Crashes of the real `stockd` binary: kill -9 at random moments under
//! load, a crash between the Postgres commit and the XACK (fail point), a
//! dead instance whose pending entries another takes over, and a graceful
//! SIGTERM. After each, Postgres must end up equal to Redis, with every
//! version in the ledger exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use stockd::redis_conn::RedisConn;

use crate::support::load::background_load;
use crate::support::metrics;
use crate::support::process::Stockd;
use crate::support::*;

async fn pending_of(conn: &mut RedisConn, namespace: &str, partitions: u32, consumer: &str) -> u64 {
    let keys = stockd::keys::Keyspace::new(namespace, partitions);
    let mut total = 0;
    for p in keys.partitions() {
        let entries: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(keys.events(p))
            .arg("flusher")
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(consumer)
            .query_async(conn)
            .await
            .unwrap();
        total += entries.len() as u64;
    }
    total
}

struct Fixture {
    namespace: String,
    database_url: String,
    redis: RedisConn,
    skus: Vec<String>,
    leftovers: Leftovers,
}

impl Fixture {
    async fn new(tag: &str) -> Self {
        let namespace = unique_namespace(tag);
        let database = namespace.replace('-', "_");
        Self {
            database_url: postgres_url(&database),
            leftovers: Leftovers::new(&namespace, &database),
            redis: shared_redis().await,
            skus: (0..12).map(|i| format!("{tag}-{i}")).collect(),
            namespace,
        }
    }

    async fn assert_converged(&self) {
        let pool = sqlx::PgPool::connect(&self.database_url).await.unwrap();
        assert_converged(
            &mut self.redis.clone(),
            &self.namespace,
            &pool,
            Duration::from_secs(60),
        )
        .await;
        pool.close().await;
    }

    /// Waits until `consumer` (a dead instance) holds no entry pending:
    /// another instance claimed and flushed them.
    async fn taken_over_from(&self, consumer: &str) {
        eventually(
            Duration::from_secs(30),
            &format!("the entries pending for {consumer} to be taken over"),
            || {
                let mut conn = self.redis.clone();
                async move {
                    let pending = pending_of(&mut conn, &self.namespace, 16, consumer).await;
                    (pending == 0).then_some(())
                }
            },
        )
        .await;
    }

    async fn cleanup(self) {
        self.leftovers.remove().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_under_load_loses_nothing() {
    let fx = Fixture::new("kill").await;
    for round in 0..6 {
        let mut stockd = Stockd::start(&fx.namespace, &fx.database_url, "crashy", false).await;
        if round == 0 {
            stockd.clients().seed_each(&fx.skus, 10_000).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let load = background_load(stockd.channel(), fx.skus.clone(), stop.clone());
        // The moment of the crash is the point of the test: chosen at random.
        let chaos = Duration::from_millis(rand::rng().random_range(150..700));
        tokio::time::sleep(chaos).await;
        stockd.kill9();
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
    }
    // A restart replays what the killed instance had read but not acknowledged.
    let mut stockd = Stockd::start(&fx.namespace, &fx.database_url, "crashy", false).await;
    fx.assert_converged().await;
    assert_eq!(
        stockd.terminate().await.code(),
        Some(0),
        "graceful stop exits 0; log {:?}",
        stockd.log
    );
    assert_eq!(
        pending_of(&mut fx.redis.clone(), &fx.namespace, 16, "crashy").await,
        0
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_commit_and_xack_is_replayed_by_the_surviving_instance() {
    let fx = Fixture::new("window").await;
    {
        let seeder = Stockd::start(&fx.namespace, &fx.database_url, "seeder", false).await;
        seeder.clients().seed_each(&fx.skus, 10_000).await;
        let mut seeder = seeder;
        assert_eq!(seeder.terminate().await.code(), Some(0));
    }
    // Instance "a" aborts right after its first batch commits in Postgres,
    // before the XACK: the batch is in Postgres AND still pending in Redis.
    let mut a = Stockd::start(&fx.namespace, &fx.database_url, "a", true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(a.channel(), fx.skus.clone(), stop.clone());
    let status = a.wait_exit(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(!status.success(), "the fail point aborts the process");
    let stranded = pending_of(&mut fx.redis.clone(), &fx.namespace, 16, "a").await;
    assert!(
        stranded > 0,
        "the aborted batch is still pending with consumer a"
    );
    let committed: i64 = {
        let pool = sqlx::PgPool::connect(&fx.database_url).await.unwrap();
        let n = sqlx::query_scalar("SELECT count(*) FROM stock_ledger")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    };
    assert!(committed > 0, "the batch was committed before the crash");

    // Instance "b" claims a's entries once they are idle past the claim
    // timeout and writes them again, harmlessly.
    let metrics_port = free_port();
    let args = [
        "--metrics-addr".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let mut b = Stockd::start_with(&fx.namespace, &fx.database_url, "b", false, &args).await;
    fx.assert_converged().await;
    fx.taken_over_from("a").await;
    // The replay met its own ledger rows: the COPY gave way to the
    // idempotent statements, and that is counted.
    let page = metrics::scrape(metrics_port).await;
    let fallbacks = metrics::sample(
        &page,
        "stockd_flush_copy_fallbacks_total",
        &["table=\"stock_ledger\""],
    );
    assert!(fallbacks >= Some(1.0), "{fallbacks:?}");
    assert_eq!(b.terminate().await.code(), Some(0));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_the_flush_and_survive_losing_one() {
    let fx = Fixture::new("pair").await;
    let mut a = Stockd::start(&fx.namespace, &fx.database_url, "a", false).await;
    let mut b = Stockd::start(&fx.namespace, &fx.database_url, "b", false).await;
    a.clients().seed_each(&fx.skus, 10_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        background_load(a.channel(), fx.skus.clone(), stop.clone()),
        background_load(b.channel(), fx.skus.clone(), stop.clone()),
    ];
    let chaos = Duration::from_millis(rand::rng().random_range(300..900));
    tokio::time::sleep(chaos).await;
    a.kill9();
    stop.store(true, Ordering::Relaxed);
    for load in loads {
        load.await.unwrap();
    }
    fx.assert_converged().await;
    fx.taken_over_from("a").await;
    assert_eq!(b.terminate().await.code(), Some(0));
    fx.cleanup().await;
}
