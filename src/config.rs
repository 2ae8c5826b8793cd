//! Typed configuration: every setting is a flag and an environment variable
//! (DESIGN.md, "Running it").

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// stockd: real-time inventory server (gRPC, Redis, write-behind to Postgres).
#[derive(Clone, Parser)]
#[command(name = "stockd", version, about, args_override_self = true)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "STOCKD_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Redis URL (may carry a password; it is never logged).
    #[arg(
        long,
        env = "STOCKD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Prefix of every Redis key of this deployment.
    #[arg(long, env = "STOCKD_NAMESPACE", default_value = "stockd")]
    pub namespace: String,

    /// Partition count; fixed for the life of a deployment (stored in Redis at
    /// first start, a different value later refuses to start).
    #[arg(long, env = "STOCKD_PARTITIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: u32,

    /// When set, every Admin rpc needs `authorization: Bearer <token>`.
    #[arg(long, env = "STOCKD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// How long finished reservations and request outcomes are kept for
    /// replays, in seconds.
    #[arg(long, env = "STOCKD_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,

    /// How often the reaper looks for lapsed reservations, in milliseconds.
    #[arg(long, env = "STOCKD_REAPER_INTERVAL_MS", default_value_t = 250)]
    pub reaper_interval_ms: u64,

    /// Timeout of one Redis command, in milliseconds: past it the request
    /// fails with UNAVAILABLE instead of hanging.
    #[arg(long, env = "STOCKD_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,

    /// Log filter, e.g. `info` or `stockd=debug,tower=warn`.
    #[arg(long, env = "STOCKD_LOG", default_value = "info")]
    pub log: String,

    #[arg(long, env = "STOCKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }

    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
}

impl std::fmt::Debug for Config {
    /// Secrets (the Redis URL may hold a password, the token) stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("idempotency_window_secs", &self.idempotency_window_secs)
            .field("reaper_interval_ms", &self.reaper_interval_ms)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .finish_non_exhaustive()
    }
}
