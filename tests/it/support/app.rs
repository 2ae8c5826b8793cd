//! `spawn_app()`: a real stockd in process on port 0, with a key namespace
//! and a Postgres database of the test's own, gRPC clients for it (see
//! [`super::Rpc`] for the typed calls), and what it holds in Redis. Stopped
//! with `stop` (or dropped after a failure), it leaves nothing behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use stockd::app::{self, Application, StartError};
use stockd::config::Config;
use stockd::keys::Keyspace;
use stockd::pb::admin_client::AdminClient;
use stockd::pb::inventory_client::InventoryClient;
use stockd::pb::{self};
use stockd::redis_conn::RedisConn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::leftovers::Leftovers;
use super::{
    POLL_INTERVAL, Rpc, assert_converged, drop_database, postgres_url, redis_cluster, redis_url,
    snapshot, unique_namespace,
};

/// A stockd of the test's own, serving in this process.
pub struct TestApp {
    /// gRPC.
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
    /// Taken when stopped.
    server: Option<JoinHandle<Result<(), StartError>>>,
    /// The namespace and database, removed when the app drops unless a
    /// `stop_*` took care of them (the last field: dropped after the rest).
    leftovers: Option<Leftovers>,
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

/// A stockd on the shared test Redis and Postgres, with the defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// The configuration a test server starts with: ports 0, the test's
/// namespace and database, short intervals, then `extra_args`.
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
    /// The defaults, plus these command-line arguments.
    pub fn with_args(args: &[&str]) -> Self {
        Self {
            extra_args: args.iter().map(|arg| arg.to_string()).collect(),
            ..Self::default()
        }
    }

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

/// A stockd started with `options`, serving once its health service
/// answers.
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
    let redis = app::connect_redis(&redis_url, options.cluster(), Duration::from_secs(5))
        .await
        .expect("test redis");
    let database_url = options.database_url();
    let database = database_url.rsplit_once('/').unwrap().1.to_owned();
    let leftovers = Leftovers::on(
        &options.namespace,
        &database,
        (redis_url, options.cluster()),
    );
    TestApp {
        addr,
        http_addr,
        database,
        database_url,
        keys: Keyspace::new(options.namespace.clone(), options.partitions),
        namespace: options.namespace,
        inventory: InventoryClient::new(channel.clone()),
        admin: AdminClient::new(channel),
        redis,
        shutdown,
        server: Some(server),
        leftovers: Some(leftovers),
    }
}

impl Drop for TestApp {
    /// A test that failed before a `stop_*` tells the server to stop; the
    /// leftovers go as the fields drop.
    fn drop(&mut self) {
        if self.server.is_some() {
            self.shutdown.cancel();
        }
    }
}

impl TestApp {
    /// Stops the server (graceful), deletes the namespace's keys and drops
    /// the test's database.
    pub async fn stop(mut self) {
        self.stop_server().await;
        self.leftovers
            .take()
            .expect("not stopped yet")
            .remove()
            .await;
    }

    async fn stop_server(&mut self) {
        self.shutdown.cancel();
        let server = self.server.take().expect("not stopped yet");
        server.await.unwrap().expect("server stopped cleanly");
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
        self.converged_within(pool, Duration::from_secs(20)).await;
    }

    /// As [`Self::converged`], for a flush that may take longer.
    pub async fn converged_within(&self, pool: &sqlx::PgPool, deadline: Duration) {
        assert_converged(&mut self.redis.clone(), &self.namespace, pool, deadline).await;
    }

    /// Stops the server and drops the database; the keys stay, on a Redis
    /// of the test's own that goes away with it.
    pub async fn stop_on_own_redis(mut self) {
        self.stop_server().await;
        self.leftovers.take().expect("not stopped yet").keep();
        drop_database(&self.database).await;
    }

    /// Stops the server but keeps the keys and the database (another
    /// instance shares them, or a later one starts on them).
    pub async fn stop_keep_data(mut self) {
        self.stop_server().await;
        self.leftovers.take().expect("not stopped yet").keep();
    }

    /// SetStock through the API: the item exists afterwards with `available`.
    pub async fn seed(&self, sku: &str, location: &str, available: i64) -> pb::StockLevel {
        let id = format!("seed-{sku}-{location}-{}", unique_namespace("s"));
        self.set(&id, sku, location, available)
            .await
            .expect("seed")
            .level
            .unwrap()
    }

    pub async fn level(&self, sku: &str, location: &str) -> Option<pb::StockLevel> {
        let answer = self.get(&[(sku, location)]).await.expect("get_stock");
        answer.levels.into_iter().next()
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
