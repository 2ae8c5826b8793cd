//! The shared test Redis and what a test reads from it directly: its
//! address, a namespace of the test's own, every key and value of a
//! namespace (for "this changed nothing" comparisons), the stock as Redis
//! holds it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stockd::keys::Keyspace;
use stockd::markers::Markers;
use stockd::redis_conn::RedisConn;

use super::{TestApp, eventually};

/// The shared test Redis: `STOCKD_TEST_REDIS_URL`, a comma-separated list
/// of seed nodes when `STOCKD_TEST_REDIS_CLUSTER` says the suite runs on a
/// Redis Cluster.
pub fn redis_url() -> String {
    std::env::var("STOCKD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Whether the shared test Redis is a cluster (`STOCKD_TEST_REDIS_CLUSTER=1`).
pub fn redis_cluster() -> bool {
    std::env::var("STOCKD_TEST_REDIS_CLUSTER").is_ok_and(|v| v == "1" || v == "true")
}

/// A connection to the shared test Redis (cluster or not).
pub async fn shared_redis() -> RedisConn {
    stockd::app::connect_redis(&redis_url(), redis_cluster(), Duration::from_secs(5))
        .await
        .expect("the test Redis")
}

/// A namespace no other test (or earlier run) uses.
pub fn unique_namespace(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test-{tag}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn namespace_keys(conn: &mut RedisConn, namespace: &str) -> Vec<String> {
    let pattern = stockd::keys::Keyspace::new(namespace, 1).pattern("*");
    let mut keys = Vec::new();
    let mut at = Some(stockd::redis_conn::ScanCursor::default());
    while let Some(cursor) = at {
        let (batch, next) = conn.scan_step(cursor, &pattern, 1000).await.unwrap();
        keys.extend(batch);
        at = next;
    }
    keys.sort();
    keys
}

/// Everything a namespace holds in Redis, but the partition markers (the
/// flusher moves their flushed id forward whenever it writes a batch).
pub async fn snapshot(conn: &mut RedisConn, namespace: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in namespace_keys(conn, namespace).await {
        if key.ends_with(":marker") {
            continue;
        }
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let value = match kind.as_str() {
            "hash" => {
                let v: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(conn)
                    .await
                    .unwrap();
                format!("{v:?}")
            }
            "string" => {
                let v: String = redis::cmd("GET").arg(&key).query_async(conn).await.unwrap();
                v
            }
            "zset" => {
                let v: Vec<(String, String)> = redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(conn)
                    .await
                    .unwrap();
                format!("{v:?}")
            }
            "stream" => {
                let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(conn)
                    .await
                    .unwrap();
                format!("{v:?}")
            }
            other => format!("<{other}>"),
        };
        out.insert(key, value);
    }
    out
}

pub async fn delete_namespace(conn: &mut RedisConn, namespace: &str) {
    stockd::keys::delete_namespace(conn, &stockd::keys::Keyspace::new(namespace, 1))
        .await
        .unwrap();
}

/// Establishes every partition marker of `keys` (what a warm stockd does),
/// for tests that drive an engine without a server.
pub async fn establish_markers(conn: &mut RedisConn, keys: &Keyspace) -> Markers {
    let markers = Markers::new(keys.clone());
    for p in keys.partitions() {
        markers
            .establish(conn, p, "test", None, None)
            .await
            .expect("establish a marker");
    }
    markers
}

/// SKUs that land in distinct partitions of `keys`.
pub fn skus_in_distinct_partitions(keys: &Keyspace, prefix: &str, count: usize) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for i in 0.. {
        let sku = format!("{prefix}-{i}");
        if seen.insert(keys.partition_of(&sku)) {
            out.push(sku);
            if out.len() == count {
                break;
            }
        }
    }
    out
}

/// (sku, location) -> (available, reserved, version)
pub type Levels = BTreeMap<(String, String), (i64, i64, i64)>;

/// Every item of the namespace as Redis holds it.
pub async fn levels_in_redis(conn: &mut RedisConn, namespace: &str) -> Levels {
    let mut out = Levels::new();
    for key in namespace_keys(conn, namespace).await {
        if !key.contains(":stock:") {
            continue;
        }
        let (sku, loc, a, r, v): (String, String, i64, i64, i64) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["sku", "loc", "avail", "resv", "ver"])
            .query_async(conn)
            .await
            .unwrap();
        out.insert((sku, loc), (a, r, v));
    }
    out
}

/// What Redis losing its data looks like: every key of the namespace but
/// `keep` (a lock a test holds) gone at once (per partition on a cluster,
/// where each node loses its own). A key-by-key deletion would race the
/// watchdog, which restores partitions as soon as their markers go.
pub async fn lose_every_key_but(app: &TestApp, keep: &[&str]) {
    let mut keys = namespace_keys(&mut app.redis.clone(), &app.namespace).await;
    keys.retain(|key| !keep.contains(&key.as_str()));
    let mut by_tag: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for key in keys {
        let tag = if redis_cluster() {
            stockd::redis_conn::hash_tag(&key).to_owned()
        } else {
            String::new()
        };
        by_tag.entry(tag).or_default().push(key);
    }
    for keys in by_tag.values() {
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
    }
}

/// Waits until a connection of the test's own has found its restarted
/// Redis (it notices the restart on its first command).
pub async fn reconnected(conn: &RedisConn) {
    eventually(
        Duration::from_secs(10),
        "the test's connection to reconnect",
        || {
            let mut conn = conn.clone();
            async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            }
        },
    )
    .await;
}
