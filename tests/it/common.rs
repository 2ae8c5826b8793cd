//! `spawn_app()`: a real stockd on port 0 with its own key namespace, gRPC
//! clients for it, and helpers to look at Redis directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use stockd::app::{self, Application, StartError};
use stockd::config::Config;
use stockd::keys::Keyspace;
use stockd::markers::Markers;
use stockd::pb::admin_client::AdminClient;
use stockd::pb::inventory_client::InventoryClient;
use stockd::pb::{self};
use stockd::redis_conn::RedisConn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The Postgres server the tests use; each test gets its own database on it.
pub fn postgres_url(database: &str) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL ends in /<database>");
    format!("{server}/{database}")
}

/// Pause between two looks at a state a test waits for (always under a deadline).
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

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

pub struct TestApp {
    pub addr: SocketAddr,
    /// The HTTP API (on port 0 like gRPC).
    pub http_addr: SocketAddr,
    pub namespace: String,
    /// This test's own Postgres database (stockd creates it).
    pub database: String,
    pub database_url: String,
    pub keys: Keyspace,
    pub inventory: InventoryClient<Channel>,
    pub admin: AdminClient<Channel>,
    pub redis: RedisConn,
    shutdown: CancellationToken,
    /// Taken by `stop` / `stop_keep_data`.
    server: Option<JoinHandle<Result<(), StartError>>>,
    /// Where this app's keys live, for the cleanup on drop.
    redis_target: (String, bool),
    /// Stopped (and cleaned up, or kept on purpose): nothing left to do on drop.
    stopped: bool,
}

/// Settings a test may change before the server starts.
pub struct Options {
    pub namespace: String,
    /// Defaults to a database named after the namespace.
    pub database_url: Option<String>,
    pub partitions: u32,
    /// Another Redis than the shared test one (a fault test's own).
    pub redis_url: Option<String>,
    /// `redis_url` is a Redis Cluster's seed list (a test's own cluster).
    pub own_cluster: bool,
    pub extra_args: Vec<String>,
    /// How the test's own clients reach a server that serves TLS.
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: unique_namespace("app"),
            database_url: None,
            partitions: 16,
            redis_url: None,
            own_cluster: false,
            extra_args: Vec::new(),
            client_tls: None,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub fn config_for(options: &Options) -> Config {
    let mut args = vec![
        "stockd".to_owned(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--namespace".into(),
        options.namespace.clone(),
        "--partitions".into(),
        options.partitions.to_string(),
        "--redis-url".into(),
        options.redis_url.clone().unwrap_or_else(redis_url),
        "--database-url".into(),
        options.database_url(),
        "--database-max-connections".into(),
        "4".into(),
        "--flush-claim-idle-ms".into(),
        "1000".into(),
        "--reaper-interval-ms".into(),
        "50".into(),
        // Tests stop servers all the time; those about the drain set it.
        "--shutdown-drain-ms".into(),
        "0".into(),
    ];
    if options.cluster() {
        args.push("--redis-cluster".into());
    }
    args.extend(options.extra_args.iter().cloned());
    Config::try_parse_from(args).expect("test config parses")
}

impl Options {
    /// Whether the server's Redis is a cluster.
    pub fn cluster(&self) -> bool {
        match self.redis_url {
            None => redis_cluster(),
            Some(_) => self.own_cluster,
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| postgres_url(&self.namespace.replace('-', "_")))
    }
}

/// Logs of the servers a test starts go to the test's own output (shown
/// when it fails): warnings and errors, or what `STOCKD_TEST_LOG` says.
fn init_test_logs() {
    let filter = std::env::var("STOCKD_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    init_test_logs();
    let config = config_for(&options);
    let application = Application::build(config).await.expect("stockd starts");
    let addr = application.grpc_addr();
    let http_addr = application.http_addr().expect("the HTTP API is on");
    let shutdown = CancellationToken::new();
    let mut server = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let endpoint = match &options.client_tls {
        None => Channel::from_shared(format!("http://{addr}")).unwrap(),
        Some(tls) => Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap(),
    };
    let channel = endpoint
        .connect()
        .await
        .expect("connect to the test server");
    // Serving once the health service answers; a server that failed to start
    // says why.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        tokio::select! {
            result = &mut server => panic!("stockd stopped while starting: {:?}", result.unwrap()),
            answer = probe => if answer.is_ok() { break },
        }
        assert!(
            Instant::now() < deadline,
            "stockd did not start within 30 s"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let redis_url = options.redis_url.clone().unwrap_or_else(redis_url);
    let redis_target = (redis_url.clone(), options.cluster());
    let redis = app::connect_redis(&redis_url, options.cluster(), Duration::from_secs(5))
        .await
        .expect("test redis");
    let database_url = options.database_url();
    TestApp {
        addr,
        http_addr,
        database: database_url.rsplit_once('/').unwrap().1.to_owned(),
        database_url,
        keys: Keyspace::new(options.namespace.clone(), options.partitions),
        namespace: options.namespace,
        inventory: InventoryClient::new(channel.clone()),
        admin: AdminClient::new(channel),
        redis,
        shutdown,
        server: Some(server),
        redis_target,
        stopped: false,
    }
}

impl Drop for TestApp {
    /// A test that failed before `stop` leaves no database or keys behind:
    /// the server is told to stop and the cleanup runs on a thread and
    /// runtime of its own (the test's runtime may be unwinding, or single
    /// threaded and blocked here).
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.shutdown.cancel();
        let namespace = self.namespace.clone();
        let database = self.database.clone();
        let (redis_url, cluster) = self.redis_target.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            runtime.block_on(async move {
                let redis = app::connect_redis(&redis_url, cluster, Duration::from_secs(5)).await;
                if let Ok(redis) = redis {
                    let keys = stockd::keys::Keyspace::new(namespace.as_str(), 1);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(20),
                        stockd::keys::delete_namespace(&redis, &keys),
                    )
                    .await;
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(20), drop_database(&database)).await;
            });
        });
        let _ = cleanup.join();
    }
}

impl TestApp {
    /// Stops the server (graceful), deletes the namespace's keys and drops
    /// the test's database.
    pub async fn stop(mut self) {
        self.stopped = true;
        self.shutdown.cancel();
        let server = self.server.take().expect("not stopped yet");
        server.await.unwrap().expect("server stopped cleanly");
        delete_namespace(&mut self.redis.clone(), &self.namespace).await;
        drop_database(&self.database).await;
    }

    /// A connection pool on the test's database.
    pub async fn postgres(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("test database")
    }

    /// Waits (20 s at most) until Postgres holds what this app's Redis
    /// holds; panics with the difference otherwise.
    pub async fn converged(&self, pool: &sqlx::PgPool) {
        assert_converged(
            &mut self.redis.clone(),
            &self.namespace,
            pool,
            Duration::from_secs(20),
        )
        .await;
    }

    /// Stops the server and drops the database; the keys stay, on a Redis
    /// of the test's own that goes away with it.
    pub async fn stop_on_own_redis(mut self) {
        self.stopped = true;
        self.shutdown.cancel();
        let server = self.server.take().expect("not stopped yet");
        server.await.unwrap().expect("server stopped cleanly");
        drop_database(&self.database).await;
    }

    /// Stops the server but keeps the keys and the database (another
    /// instance shares them, or a later one starts on them).
    pub async fn stop_keep_data(mut self) {
        self.stopped = true;
        self.shutdown.cancel();
        let server = self.server.take().expect("not stopped yet");
        server.await.unwrap().expect("server stopped cleanly");
    }

    /// SetStock through the API: the item exists afterwards with `available`.
    pub async fn seed(&self, sku: &str, location: &str, available: i64) -> pb::StockLevel {
        self.admin
            .clone()
            .set_stock(pb::SetStockRequest {
                request_id: format!("seed-{sku}-{location}-{}", unique_namespace("s")),
                sku: sku.into(),
                location: location.into(),
                available,
                expected_version: None,
            })
            .await
            .expect("seed")
            .into_inner()
            .level
            .unwrap()
    }

    pub async fn level(&self, sku: &str, location: &str) -> Option<pb::StockLevel> {
        let resp = self
            .inventory
            .clone()
            .get_stock(pb::GetStockRequest {
                items: vec![pb::ItemRef {
                    sku: sku.into(),
                    location: location.into(),
                }],
            })
            .await
            .expect("get_stock")
            .into_inner();
        resp.levels.into_iter().next()
    }

    /// Everything the namespace holds in Redis, as text, for "this changed
    /// nothing" comparisons.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        snapshot(&mut self.redis.clone(), &self.namespace).await
    }

    /// What a refused request must leave as it was: everything but the
    /// records of request and reservation ids (a refusal is stored with its
    /// id, so that a late copy of the request replays it).
    pub async fn stock_and_streams(&self) -> BTreeMap<String, String> {
        let mut snapshot = self.snapshot().await;
        snapshot.retain(|key, _| !key.contains(":idem:") && !key.contains(":resv:"));
        snapshot
    }

    /// Every event of the namespace, all partitions, in stream order per partition.
    pub async fn events(&self) -> Vec<Event> {
        let mut conn = self.redis.clone();
        let mut all = Vec::new();
        for p in self.keys.partitions() {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(self.keys.events(p))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            for (id, fields) in entries {
                all.push(Event {
                    id,
                    partition: p.0,
                    fields: fields.into_iter().collect(),
                });
            }
        }
        all
    }
}

/// One stream entry.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub partition: u32,
    pub fields: BTreeMap<String, String>,
}

impl Event {
    pub fn get(&self, field: &str) -> &str {
        self.fields
            .get(field)
            .unwrap_or_else(|| panic!("event {} lacks {field}: {:?}", self.id, self.fields))
    }

    pub fn int(&self, field: &str) -> i64 {
        self.get(field).parse().unwrap()
    }
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

pub async fn drop_database(name: &str) {
    let pool = sqlx::PgPool::connect(&postgres_url("postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
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

/// The Postgres settings of a test (timeouts as in production).
pub fn postgres_config(database: &str) -> stockd::config::PostgresConfig {
    Config::try_parse_from(["stockd", "--database-url", &postgres_url(database)])
        .expect("config parses")
        .postgres
}

/// Polls `check` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub fn line(sku: &str, location: &str, quantity: i64) -> pb::Line {
    pb::Line {
        sku: sku.into(),
        location: location.into(),
        quantity,
    }
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

/// The code of a failed rpc, or a panic when it succeeded.
pub fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => status.code(),
    }
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

/// Every row of `stock`.
pub async fn levels_in_postgres(pool: &sqlx::PgPool) -> Levels {
    let rows: Vec<(String, String, i64, i64, i64)> =
        sqlx::query_as("SELECT sku, location, available, reserved, version FROM stock")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(s, l, a, r, v)| ((s, l), (a, r, v)))
        .collect()
}

/// Waits until Postgres holds exactly what Redis holds, and the ledger
/// holds every version 1..current of every item exactly once with deltas
/// summing to the row; panics with the last difference seen otherwise.
pub async fn assert_converged(
    conn: &mut RedisConn,
    namespace: &str,
    pool: &sqlx::PgPool,
    deadline: Duration,
) {
    let start = Instant::now();
    loop {
        let difference = match convergence(&mut conn.clone(), namespace, pool).await {
            Ok(()) => return,
            Err(difference) => difference,
        };
        if start.elapsed() > deadline {
            panic!("not converged after {deadline:?}: {difference}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn convergence(
    conn: &mut RedisConn,
    namespace: &str,
    pool: &sqlx::PgPool,
) -> Result<(), String> {
    let redis_levels = levels_in_redis(conn, namespace).await;
    if redis_levels.is_empty() {
        return Err("the test wrote nothing".into());
    }
    let postgres_levels = levels_in_postgres(pool).await;
    if postgres_levels != redis_levels {
        let differing: Vec<_> = redis_levels
            .iter()
            .filter(|(k, v)| postgres_levels.get(*k) != Some(*v))
            .take(3)
            .map(|(k, v)| format!("{k:?}: redis {v:?}, postgres {:?}", postgres_levels.get(k)))
            .collect();
        return Err(format!("stock differs: {differing:?}"));
    }
    let audit: Vec<(String, String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT sku, location, count(*), min(version), max(version),
                sum(d_available)::bigint, sum(d_reserved)::bigint
         FROM stock_ledger GROUP BY sku, location",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    if audit.len() != redis_levels.len() {
        return Err(format!(
            "{} ledgers for {} items",
            audit.len(),
            redis_levels.len()
        ));
    }
    for (sku, loc, count, min, max, sum_a, sum_r) in audit {
        let (a, r, v) = redis_levels[&(sku.clone(), loc.clone())];
        if (count, min, max) != (v, 1, v) {
            return Err(format!(
                "{loc}/{sku}: ledger count/min/max {:?}, want versions 1..{v} once",
                (count, min, max)
            ));
        }
        if (sum_a, sum_r) != (a, r) {
            return Err(format!(
                "{loc}/{sku}: ledger deltas sum to {:?}, the row is {:?}",
                (sum_a, sum_r),
                (a, r)
            ));
        }
    }
    Ok(())
}
