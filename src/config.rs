//! Typed configuration: every setting is a flag and an environment variable
//! (DESIGN.md, "Running it"), grouped by the part of stockd it configures.
//!
//! Secrets (tokens, the webhook secret, passwords inside URLs) are wrapped
//! in [`Secret`] and [`ServiceUrl`], whose `Debug` never shows them, so the
//! whole configuration can be logged at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// stockd: real-time inventory server (gRPC, Redis, write-behind to Postgres).
#[derive(Debug, Clone, Parser)]
#[command(name = "stockd", version, about, args_override_self = true)]
pub struct Config {
    #[command(flatten, next_help_heading = "Server")]
    pub server: ServerConfig,
    #[command(flatten, next_help_heading = "Deployment")]
    pub deployment: DeploymentConfig,
    #[command(flatten, next_help_heading = "Redis")]
    pub redis: RedisConfig,
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresConfig,
    #[command(flatten, next_help_heading = "Write-behind flusher")]
    pub flusher: FlusherConfig,
    #[command(flatten, next_help_heading = "Reservations and idempotency")]
    pub reservations: ReservationConfig,
    #[command(flatten, next_help_heading = "Watch")]
    pub watch: WatchConfig,
    #[command(flatten, next_help_heading = "Webhooks")]
    pub webhooks: WebhookConfig,
    #[command(flatten, next_help_heading = "Event export")]
    pub export: ExportConfig,
    #[command(flatten, next_help_heading = "HTTP API")]
    pub http: HttpConfig,
    #[command(flatten, next_help_heading = "Security")]
    pub security: SecurityConfig,
    #[command(flatten, next_help_heading = "Logging")]
    pub logging: LogConfig,
}

/// Listeners and request limits.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "STOCKD_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the Prometheus endpoint (`/metrics`); empty = none.
    #[arg(long, env = "STOCKD_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,

    /// Largest request accepted, in bytes; larger ones are refused.
    #[arg(long, env = "STOCKD_MAX_REQUEST_BYTES", default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,

    /// Requests served at once; past it requests are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[arg(long, env = "STOCKD_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// On SIGTERM or SIGINT, how long to keep serving while the health
    /// service already answers NOT_SERVING (so that load balancers and
    /// clients move away first), in milliseconds; then requests in flight
    /// finish, the flusher commits its batch, and stockd exits 0.
    #[arg(long, env = "STOCKD_SHUTDOWN_DRAIN_MS", default_value_t = 5_000)]
    pub shutdown_drain_ms: u64,

    /// Interval of HTTP/2 keepalive pings on gRPC connections, in
    /// milliseconds (0 = none): finds dead clients and keeps idle
    /// connections (long Watch streams) open through proxies.
    #[arg(long, env = "STOCKD_KEEPALIVE_INTERVAL_MS", default_value_t = 30_000)]
    pub keepalive_interval_ms: u64,

    /// A connection whose keepalive ping is not answered within this many
    /// milliseconds is closed.
    #[arg(long, env = "STOCKD_KEEPALIVE_TIMEOUT_MS", default_value_t = 20_000)]
    pub keepalive_timeout_ms: u64,

    /// Longest life of a gRPC connection, in seconds (0 = unlimited): past
    /// it the server sends GOAWAY and the client reconnects, so that
    /// connections spread again over instances after a rollout or scale-up.
    /// Requests in flight finish; an open Watch keeps its connection until
    /// it ends.
    #[arg(long, env = "STOCKD_MAX_CONNECTION_AGE_SECS", default_value_t = 1_800)]
    pub max_connection_age_secs: u64,
}

impl ServerConfig {
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }

    /// `None` when keepalive pings are off.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive_interval_ms > 0).then(|| Duration::from_millis(self.keepalive_interval_ms))
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_timeout_ms)
    }

    /// `None` when connections may live for ever.
    pub fn max_connection_age(&self) -> Option<Duration> {
        (self.max_connection_age_secs > 0)
            .then(|| Duration::from_secs(self.max_connection_age_secs))
    }
}

/// What identifies a deployment and this instance in it.
#[derive(Debug, Clone, Args)]
pub struct DeploymentConfig {
    /// Prefix of every Redis key of this deployment.
    #[arg(long, env = "STOCKD_NAMESPACE", default_value = "stockd")]
    pub namespace: String,

    /// Partition count; fixed for the life of a deployment (recorded in
    /// Redis and Postgres at first start; a different value later refuses
    /// to start).
    #[arg(long, env = "STOCKD_PARTITIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: u32,

    /// This instance's name among the stream consumers; keep it stable
    /// across restarts (default: `<hostname>:<grpc port>`).
    #[arg(long, env = "STOCKD_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// The Redis that holds the live stock.
#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// Redis URL (may carry a password; it is never logged).
    #[arg(
        long,
        env = "STOCKD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: ServiceUrl,

    /// Run on a Redis Cluster: --redis-url is then a comma-separated list
    /// of seed nodes (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`).
    #[arg(long, env = "STOCKD_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Timeout of one Redis command, in milliseconds: past it the request
    /// fails with UNAVAILABLE instead of hanging.
    #[arg(long, env = "STOCKD_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,

    /// How often each instance checks that Redis still holds its data and
    /// has not rolled back (partition markers, Postgres's checkpoints), in
    /// milliseconds.
    #[arg(long, env = "STOCKD_EPOCH_CHECK_MS", default_value_t = 1_000)]
    pub epoch_check_ms: u64,

    /// Start even when Redis may evict keys (`maxmemory-policy` other than
    /// `noeviction`): evicted idempotency records let retries apply twice,
    /// evicted stock is reloaded from older Postgres rows. Only for caches
    /// you accept to lose that way.
    #[arg(long, env = "STOCKD_ALLOW_REDIS_EVICTION")]
    pub allow_redis_eviction: bool,

    /// Before starting, write what the namespace's streams hold to
    /// Postgres, delete every key of the namespace, and warm Redis from
    /// Postgres: moves a deployment to this version's Redis layout (stop
    /// every older stockd first). Idempotency records that were only in
    /// Redis are not carried over.
    #[arg(long)]
    pub reset_redis: bool,
}

impl RedisConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn epoch_check_interval(&self) -> Duration {
        Duration::from_millis(self.epoch_check_ms)
    }
}

/// The Postgres that holds the durable copy.
#[derive(Debug, Clone, Args)]
pub struct PostgresConfig {
    /// Postgres URL; the database is created when missing.
    #[arg(
        long,
        env = "STOCKD_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/stockd",
        hide_env_values = true
    )]
    pub database_url: ServiceUrl,

    /// Postgres connections of this instance.
    #[arg(long, env = "STOCKD_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,

    /// Longest a statement of stockd's may run, in milliseconds (0 = no
    /// limit): a wait on Postgres is never unbounded.
    #[arg(
        long,
        env = "STOCKD_DATABASE_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub database_statement_timeout_ms: u64,

    /// Longest a statement waits for a lock, in milliseconds (0 = no limit).
    #[arg(
        long,
        env = "STOCKD_DATABASE_LOCK_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub database_lock_timeout_ms: u64,

    /// Postgres ends a session of stockd's that stays idle inside a
    /// transaction this long, in milliseconds, releasing its locks: the
    /// open transaction of an instance that died mid-batch cannot stall a
    /// partition for longer.
    #[arg(
        long,
        env = "STOCKD_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub database_idle_in_transaction_timeout_ms: u64,

    /// How long a request waits for a free Postgres connection, in
    /// milliseconds.
    #[arg(
        long,
        env = "STOCKD_DATABASE_ACQUIRE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub database_acquire_timeout_ms: u64,

    /// Longest stockd waits for Postgres' answer to one call (a flush
    /// transaction, a lookup on the request path), in milliseconds,
    /// measured on stockd's side. The server's timeouts cannot end a wait
    /// whose connection stopped carrying packets without a reset (a
    /// network partition, a host gone, a stalled proxy): then stockd drops
    /// that connection and the call fails and is retried on a new one.
    #[arg(
        long,
        env = "STOCKD_DATABASE_CALL_TIMEOUT_MS",
        default_value_t = 60_000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub database_call_timeout_ms: u64,
}

/// The write-behind flusher and the streams it reads.
#[derive(Debug, Clone, Args)]
pub struct FlusherConfig {
    /// Most stream entries the flusher writes in one Postgres transaction.
    #[arg(long, env = "STOCKD_FLUSH_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub flush_batch: u32,

    /// How long the flusher waits for new entries before it looks again, in
    /// milliseconds.
    #[arg(long, env = "STOCKD_FLUSH_INTERVAL_MS", default_value_t = 50)]
    pub flush_interval_ms: u64,

    /// Unflushed entries per partition past which new demand on that
    /// partition is refused with UNAVAILABLE until the flusher catches up.
    #[arg(long, env = "STOCKD_MAX_UNFLUSHED", default_value_t = 1_000_000)]
    pub max_unflushed: u64,

    /// Entries pending this long with another flusher (a dead instance) are
    /// taken over, in milliseconds.
    #[arg(long, env = "STOCKD_FLUSH_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub flush_claim_idle_ms: u64,

    /// Stream consumers of other instances that own no pending entries and
    /// have been idle this long are removed from the consumer groups, in
    /// seconds (a rollout leaves one consumer per pod name).
    #[arg(long, env = "STOCKD_STALE_CONSUMER_IDLE_SECS", default_value_t = 600)]
    pub stale_consumer_idle_secs: u64,

    /// How long flushed events stay in the streams for Watch resumption, in
    /// seconds.
    #[arg(long, env = "STOCKD_STREAM_RETENTION_SECS", default_value_t = 300)]
    pub stream_retention_secs: u64,
}

impl FlusherConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.flush_claim_idle_ms)
    }

    pub fn stale_consumer_idle(&self) -> Duration {
        Duration::from_secs(self.stale_consumer_idle_secs)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.stream_retention_secs)
    }
}

/// Holds, their expiry, and how long outcomes are kept for replays.
#[derive(Debug, Clone, Args)]
pub struct ReservationConfig {
    /// How long finished reservations and request outcomes are kept for
    /// replays, in seconds.
    #[arg(long, env = "STOCKD_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,

    /// How often the reaper looks for lapsed reservations, in milliseconds.
    #[arg(long, env = "STOCKD_REAPER_INTERVAL_MS", default_value_t = 250)]
    pub reaper_interval_ms: u64,
}

impl ReservationConfig {
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }

    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms)
    }
}

/// `Inventory.Watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchConfig {
    /// Events a Watch client may have waiting before it is cut off as too
    /// slow (RESOURCE_EXHAUSTED, with the id to resume from).
    #[arg(long, env = "STOCKD_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,
}

/// Stock webhooks.
#[derive(Debug, Clone, Args)]
pub struct WebhookConfig {
    /// Signs webhook deliveries of subscriptions added without a secret of
    /// their own (unset: such subscriptions get a generated secret).
    #[arg(long, env = "STOCKD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,

    /// Attempts of a webhook delivery before it is parked in dead letters.
    #[arg(long, env = "STOCKD_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_max_attempts: u32,

    /// Delay before the first webhook retry, in milliseconds; doubles per
    /// attempt up to --webhook-backoff-max-ms.
    #[arg(long, env = "STOCKD_WEBHOOK_BACKOFF_MS", default_value_t = 1_000)]
    pub webhook_backoff_ms: u64,

    #[arg(long, env = "STOCKD_WEBHOOK_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub webhook_backoff_max_ms: u64,

    /// Timeout of one webhook POST, in milliseconds.
    #[arg(long, env = "STOCKD_WEBHOOK_TIMEOUT_MS", default_value_t = 5_000)]
    pub webhook_timeout_ms: u64,

    /// Webhook POSTs in flight at once from this instance.
    #[arg(long, env = "STOCKD_WEBHOOK_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub webhook_concurrency: u32,

    /// Networks webhooks may be sent to although they are not public
    /// (loopback, private, link-local, ...: refused by default), as
    /// comma-separated CIDRs or addresses, e.g. `10.1.0.0/16,127.0.0.1`.
    #[arg(long, env = "STOCKD_WEBHOOK_ALLOW_NETWORKS", default_value = "",
          value_parser = crate::webhooks::parse_allowlist)]
    pub webhook_allow_networks: crate::webhooks::Destinations,

    /// PEM file of CA certificates trusted for https webhook endpoints, in
    /// addition to the public (webpki) roots, e.g. a private PKI's root.
    #[arg(long, env = "STOCKD_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<PathBuf>,
}

/// Event export to message brokers (each exporter runs when its URL is set).
#[derive(Debug, Clone, Args)]
pub struct ExportConfig {
    /// NATS server to publish every change event to, in the JetStream
    /// stream `STOCKD_<NS>` (created when missing), e.g.
    /// `nats://127.0.0.1:4222`; unset = no NATS export.
    #[arg(long, env = "STOCKD_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<ServiceUrl>,

    /// RabbitMQ (AMQP 0-9-1) server to publish every change event to, on
    /// the durable topic exchange `stockd.<ns>.events`, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`; unset = no AMQP export.
    #[arg(long, env = "STOCKD_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<ServiceUrl>,
}

/// The HTTP API for storefronts: JSON reads, Server-Sent Events, GraphQL
/// (the client token is under Security).
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// Address the HTTP API listens on; empty = no HTTP server.
    #[arg(long, env = "STOCKD_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: ListenAddr,

    /// Public mode: requests without a token are answered, with an
    /// availability bucket (in_stock, low_stock, out_of_stock) instead of
    /// quantities.
    #[arg(long, env = "STOCKD_HTTP_PUBLIC", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub http_public: bool,

    /// An item is `low_stock` when 0 < available <= this (0: never).
    #[arg(long, env = "STOCKD_LOW_STOCK", default_value_t = 5)]
    pub low_stock: u32,

    /// Origins allowed to call the API from a browser (CORS), comma
    /// separated, e.g. `https://shop.example.com`; `*` = any; empty = none.
    #[arg(long, env = "STOCKD_HTTP_CORS_ORIGINS", value_delimiter = ',')]
    pub http_cors_origins: Vec<String>,

    /// Most SKUs one subscription (SSE or GraphQL) may name.
    #[arg(long, env = "STOCKD_HTTP_MAX_SKUS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub http_max_skus: u32,

    /// Most GraphQL subscriptions open at once on one WebSocket connection.
    #[arg(long, env = "STOCKD_HTTP_MAX_SUBSCRIPTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub http_max_subscriptions: u32,

    /// Time limit of one HTTP request (not of the event streams that follow
    /// it), in milliseconds.
    #[arg(long, env = "STOCKD_HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
}

impl HttpConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.http_timeout_ms)
    }

    /// The configured CORS origins, blanks dropped.
    pub fn cors_origins(&self) -> Vec<&str> {
        self.http_cors_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect()
    }
}

/// A listening address that may be switched off with an empty value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl FromStr for ListenAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            Ok(Self(None))
        } else {
            s.trim().parse().map(|addr| Self(Some(addr)))
        }
    }
}

/// Tokens and TLS.
#[derive(Debug, Clone, Args)]
pub struct SecurityConfig {
    /// When set, every Admin rpc needs `authorization: Bearer <token>`.
    #[arg(long, env = "STOCKD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// When set, every Inventory rpc and HTTP API request needs
    /// `authorization: Bearer <token>` (except in --http-public mode).
    #[arg(long, env = "STOCKD_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<Secret>,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "STOCKD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "STOCKD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "STOCKD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs (metrics are configured under Server).
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log filter, e.g. `info` or `stockd=debug,tower=warn`.
    #[arg(long, env = "STOCKD_LOG", default_value = "info")]
    pub log: String,

    #[arg(long, env = "STOCKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// This instance's consumer name: `--instance-id`, else
    /// `<hostname>:<port>`, stable across restarts of the same instance.
    pub fn consumer_name(&self, port: u16) -> String {
        self.deployment.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "stockd".to_owned());
            format!("{host}:{port}")
        })
    }
}

/// A value that must never reach a log line: tokens, signing secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A server URL that may carry a password (`redis://:pw@host`,
/// `postgres://user:pw@host/db`); `Debug` shows it with the password
/// replaced, so the host stays visible in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included, for the client that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`. Handles a list of URLs
    /// separated by commas (the seed nodes of a Redis Cluster).
    pub fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // A bare userinfo is a password for Redis (`redis://pw@host`)
                // and a user for Postgres; mask it either way.
                "***".to_owned()
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl FromStr for ServiceUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let config = Config::try_parse_from([
            "stockd",
            "--admin-token",
            "tok-admin-123",
            "--client-token",
            "tok-client-456",
            "--webhook-secret",
            "whs-789",
            "--redis-url",
            "redis://:redispw@10.0.0.1:6379",
            "--database-url",
            "postgres://app:pgpw@db:5432/stockd",
            "--nats-url",
            "nats://natsuser:natspw@nats:4222",
            "--amqp-url",
            "amqp://guest:amqppw@rabbit:5672/%2f",
        ])
        .unwrap();
        let printed = format!("{config:?}");
        for secret in [
            "tok-admin-123",
            "tok-client-456",
            "whs-789",
            "redispw",
            "pgpw",
            "natspw",
            "amqppw",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        assert!(printed.contains("10.0.0.1:6379") && printed.contains("db:5432"));
        assert!(printed.contains("nats:4222") && printed.contains("rabbit:5672"));
    }

    #[test]
    fn urls_are_redacted_one_by_one() {
        let url = ServiceUrl::new("redis://:a@h1:1,redis://u:b@h2:2/0,redis://h3:3");
        assert_eq!(
            url.redacted(),
            "redis://:***@h1:1,redis://u:***@h2:2/0,redis://h3:3"
        );
        assert_eq!(
            ServiceUrl::new("redis://pw@h:1").redacted(),
            "redis://***@h:1"
        );
        assert_eq!(
            ServiceUrl::new("postgres://user@h/db").redacted(),
            "postgres://***@h/db"
        );
    }

    #[test]
    fn flags_keep_their_names_in_sections() {
        let config = Config::try_parse_from([
            "stockd",
            "--grpc-addr",
            "127.0.0.1:1",
            "--partitions",
            "8",
            "--flush-batch",
            "7",
            "--watch-buffer",
            "3",
        ])
        .unwrap();
        assert_eq!(config.server.grpc_addr.port(), 1);
        assert_eq!(config.deployment.partitions, 8);
        assert_eq!(config.flusher.flush_batch, 7);
        assert_eq!(config.watch.watch_buffer, 3);
    }

    #[test]
    fn webhook_allow_networks_are_a_comma_separated_list() {
        let parse = |value: &str| {
            Config::try_parse_from(["stockd", "--webhook-allow-networks", value])
                .map(|c| c.webhooks.webhook_allow_networks.allowed().to_vec())
        };
        let nets = parse("127.0.0.0/8,10.1.2.3/16,::1").unwrap();
        let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["127.0.0.0/8", "10.1.0.0/16", "::1/128"]);
        assert_eq!(parse("").unwrap(), []);
        let err = parse("127.0.0.0/8,intranet").unwrap_err().to_string();
        assert!(err.contains("intranet"), "{err}");
        let none = Config::try_parse_from(["stockd"]).unwrap();
        assert!(none.webhooks.webhook_allow_networks.allowed().is_empty());
        assert!(none.webhooks.webhook_ca_file.is_none());
    }

    #[test]
    fn http_settings_default_on_and_switch_off_when_empty() {
        let config = Config::try_parse_from(["stockd"]).unwrap();
        assert_eq!(
            config.http.http_addr,
            ListenAddr(Some("127.0.0.1:8080".parse().unwrap()))
        );
        assert!(!config.http.http_public);
        assert_eq!(config.http.low_stock, 5);
        assert!(config.http.cors_origins().is_empty());
        let config = Config::try_parse_from([
            "stockd",
            "--http-addr",
            "",
            "--http-public",
            "--http-cors-origins",
            "https://a.example,https://b.example",
        ])
        .unwrap();
        assert_eq!(config.http.http_addr, ListenAddr(None));
        assert!(config.http.http_public);
        assert_eq!(
            config.http.cors_origins(),
            ["https://a.example", "https://b.example"]
        );
        assert!(Config::try_parse_from(["stockd", "--http-addr", "nope"]).is_err());
    }
}
