//! Postgres: the durable copy, written behind Redis by the flusher.
//!
//! Every write is idempotent (ledger rows keyed by (sku, location, version),
//! stock rows under a version guard, terminal reservation states never
//! reverted), so replaying a batch after a crash between the commit and the
//! XACK changes nothing. Writes are set-based: one statement per table per
//! batch, fed with arrays through `UNNEST`; rows that are new in the common
//! case (ledger rows, reservations made in the batch) are first tried as
//! one binary `COPY` (`copy.rs`), which costs Postgres less.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

mod batch;
mod copy;
mod recall;

pub use batch::{FlushBatch, FlushReport};
pub use recall::{LevelRow, OutcomeRow, ReservationRow};

use crate::config::PostgresConfig;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error(
        "this deployment's Postgres records {stored} partitions but stockd was started with \
         --partitions {configured}; the partition count is fixed for the life of a deployment: \
         start with --partitions {stored} (or use another database)"
    )]
    PartitionMismatch { stored: u32, configured: u32 },
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("running migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Postgres could not be reached (refused, timed out, TLS): nothing
    /// about the deployment was learnt, as opposed to an answer that
    /// refuses it.
    pub fn is_unreachable(&self) -> bool {
        let unreachable = |e: &sqlx::Error| {
            matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
            )
        };
        match self {
            StoreError::Postgres(e) => unreachable(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => unreachable(e),
            _ => false,
        }
    }
}

/// A row of `stock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockRow {
    pub sku: String,
    pub location: String,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

/// A row of `stock_ledger` (the fields the audits need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub version: i64,
    pub op: String,
    pub d_available: i64,
    pub d_reserved: i64,
    pub available: i64,
    pub reserved: i64,
    pub reference: String,
}

/// A partition's flush checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub last_entry_id: String,
    pub flushed_at_ms: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Longest a call waits for Postgres' answer, on stockd's side (see
    /// [`Store::bounded`]).
    call_timeout: Duration,
}

impl Store {
    /// Connects, creating the database when it does not exist, and runs the
    /// migrations (sqlx serialises concurrent runs with an advisory lock).
    /// Every session carries the configured timeouts, and asks Postgres to
    /// notice a vanished client within about a minute (TCP keepalives), so
    /// that no wait on Postgres is unbounded, in either direction.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let options = connect_options(config)?;
        create_database_if_missing(&options).await?;
        let pool = pool_options(config)
            .connect_with(with_session_settings(options, config))
            .await?;
        migrate(&pool).await?;
        Ok(Self {
            pool,
            call_timeout: call_timeout(config),
        })
    }

    /// A store whose connections are made when first needed: for a start
    /// while Postgres does not answer (see `StoreError::is_unreachable`).
    /// Nothing is created or migrated: see [`Store::prepare`] once it answers.
    pub fn connect_later(config: &PostgresConfig) -> Result<Self, StoreError> {
        let options = with_session_settings(connect_options(config)?, config);
        Ok(Self {
            pool: pool_options(config).connect_lazy_with(options),
            call_timeout: call_timeout(config),
        })
    }

    /// The migrations and the partition check of a start, for a store made
    /// by [`Store::connect_later`].
    pub async fn prepare(&self, partitions: u32) -> Result<(), StoreError> {
        migrate(&self.pool).await?;
        self.ensure_partitions(partitions).await
    }

    /// Records the partition count at the first start and refuses another
    /// one later, even when Redis has forgotten it.
    pub async fn ensure_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        let stored: String = sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO deployment (name, value) VALUES ('partitions', $1)
                 ON CONFLICT (name) DO NOTHING RETURNING value)
             SELECT value FROM ins UNION ALL
             SELECT value FROM deployment WHERE name = 'partitions'
             LIMIT 1",
        )
        .bind(partitions.to_string())
        .fetch_one(&self.pool)
        .await?;
        match stored.parse::<u32>() {
            Ok(stored) if stored == partitions => Ok(()),
            Ok(stored) => Err(StoreError::PartitionMismatch {
                stored,
                configured: partitions,
            }),
            Err(_) => Err(StoreError::Postgres(sqlx::Error::Protocol(format!(
                "deployment.partitions holds {stored:?}"
            )))),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes one flush in ONE transaction (see `batch`).
    pub async fn write_batch(&self, batch: &FlushBatch) -> Result<FlushReport, sqlx::Error> {
        if batch.is_empty() {
            return Ok(FlushReport::default());
        }
        self.bounded("write_batch", async |conn| {
            let mut tx = conn.begin().await?;
            let report = batch::write(&mut tx, batch).await?;
            tx.commit().await?;
            Ok(report)
        })
        .await
    }

    /// Whether Postgres holds no stock at all (a new deployment).
    pub async fn is_empty(&self) -> Result<bool, sqlx::Error> {
        self.bounded("is_empty", async |conn| {
            sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM stock) AND NOT EXISTS (SELECT 1 FROM reservations)",
        )
        .fetch_one(conn).await
        })
        .await
    }

    pub async fn checkpoints(&self) -> Result<HashMap<u32, Checkpoint>, sqlx::Error> {
        let rows = self.bounded("checkpoints", async |conn| { sqlx::query(
            "SELECT partition, last_entry_id, (extract(epoch FROM flushed_at) * 1000)::bigint AS at_ms
             FROM flush_checkpoint",
        )
        .fetch_all(conn).await }).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<i32, _>("partition") as u32,
                    Checkpoint {
                        last_entry_id: r.get("last_entry_id"),
                        flushed_at_ms: r.get("at_ms"),
                    },
                )
            })
            .collect())
    }

    /// Every location of each of `skus`.
    pub async fn stock_rows_of(&self, skus: &[String]) -> Result<Vec<StockRow>, sqlx::Error> {
        let rows = self
            .bounded("stock_rows_of", async |conn| {
                sqlx::query(
                    "SELECT sku, location, available, reserved, version FROM stock
                     WHERE sku = ANY($1) ORDER BY sku, location",
                )
                .bind(skus)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(stock_row).collect())
    }

    /// One page of `stock` in key order, after `after` (keyset pagination:
    /// each page costs the same however deep the scan is).
    pub async fn stock_page(
        &self,
        after: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<StockRow>, sqlx::Error> {
        let (sku, location) = after.unwrap_or(("", ""));
        let rows = self
            .bounded("stock_page", async |conn| {
                sqlx::query(
                    "SELECT sku, location, available, reserved, version FROM stock
                     WHERE (sku, location) > ($1, $2) ORDER BY sku, location LIMIT $3",
                )
                .bind(sku)
                .bind(location)
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(stock_row).collect())
    }

    /// The rows of `items` that exist.
    pub async fn stock_rows_for(
        &self,
        items: &[(String, String)],
    ) -> Result<Vec<StockRow>, sqlx::Error> {
        let (skus, locations): (Vec<&str>, Vec<&str>) =
            items.iter().map(|(s, l)| (s.as_str(), l.as_str())).unzip();
        let rows = self
            .bounded("stock_rows_for", async |conn| {
                sqlx::query(
                    "SELECT s.sku, s.location, s.available, s.reserved, s.version
                     FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
                     JOIN stock s ON s.sku = t.sku AND s.location = t.location",
                )
                .bind(&skus)
                .bind(&locations)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(stock_row).collect())
    }

    /// Per item of `items`: (sum of d_available, sum of d_reserved) over its
    /// ledger; items without ledger rows are absent.
    pub async fn ledger_sums(
        &self,
        items: &[(String, String)],
    ) -> Result<HashMap<(String, String), (i64, i64)>, sqlx::Error> {
        let (skus, locations): (Vec<&str>, Vec<&str>) =
            items.iter().map(|(s, l)| (s.as_str(), l.as_str())).unzip();
        let rows = self.bounded("ledger_sums", async |conn| { sqlx::query(
            "SELECT l.sku, l.location, sum(l.d_available)::bigint AS a, sum(l.d_reserved)::bigint AS r
             FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
             JOIN stock_ledger l ON l.sku = t.sku AND l.location = t.location
             GROUP BY l.sku, l.location",
        )
        .bind(&skus)
        .bind(&locations)
        .fetch_all(conn).await }).await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.get("sku"), r.get("location")), (r.get("a"), r.get("r"))))
            .collect())
    }

    /// The items of `items` whose ledger does not hold versions 1..version
    /// exactly once, or whose deltas do not sum to the stock row.
    pub async fn ledger_mismatches(
        &self,
        items: &[(String, String)],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let (skus, locations): (Vec<&str>, Vec<&str>) =
            items.iter().map(|(s, l)| (s.as_str(), l.as_str())).unzip();
        let rows = self
            .bounded("ledger_mismatches", async |conn| {
                sqlx::query(
                    "SELECT s.sku, s.location
                     FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
                     JOIN stock s ON s.sku = t.sku AND s.location = t.location
                     LEFT JOIN LATERAL (
                         SELECT count(*) AS n, min(version) AS lo, max(version) AS hi,
                                coalesce(sum(d_available), 0) AS a, coalesce(sum(d_reserved), 0) AS r
                         FROM stock_ledger l WHERE l.sku = s.sku AND l.location = s.location
                     ) g ON true
                     WHERE NOT (g.n = s.version AND g.lo = 1 AND g.hi = s.version
                                AND g.a = s.available AND g.r = s.reserved)",
                )
                .bind(&skus)
                .bind(&locations)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("sku"), r.get("location")))
            .collect())
    }

    pub async fn stock_row(
        &self,
        sku: &str,
        location: &str,
    ) -> Result<Option<StockRow>, sqlx::Error> {
        let row = self.bounded("stock_row", async |conn| { sqlx::query(
            "SELECT sku, location, available, reserved, version FROM stock WHERE sku = $1 AND location = $2",
        )
        .bind(sku)
        .bind(location)
        .fetch_optional(conn).await }).await?;
        Ok(row.map(stock_row))
    }

    pub async fn ledger(&self, sku: &str, location: &str) -> Result<Vec<LedgerRow>, sqlx::Error> {
        let rows = self
            .bounded("ledger", async |conn| {
                sqlx::query(
                    "SELECT version, op, d_available, d_reserved, available, reserved, ref
                     FROM stock_ledger WHERE sku = $1 AND location = $2 ORDER BY version",
                )
                .bind(sku)
                .bind(location)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| LedgerRow {
                version: r.get("version"),
                op: r.get("op"),
                d_available: r.get("d_available"),
                d_reserved: r.get("d_reserved"),
                available: r.get("available"),
                reserved: r.get("reserved"),
                reference: r.get("ref"),
            })
            .collect())
    }
}

fn stock_row(r: sqlx::postgres::PgRow) -> StockRow {
    StockRow {
        sku: r.get("sku"),
        location: r.get("location"),
        available: r.get("available"),
        reserved: r.get("reserved"),
        version: r.get("version"),
    }
}

/// The schema's migrations, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Runs the migrations that have not run yet. When all have, nothing is
/// asked of the database but a read, so stockd can run as a role without
/// DDL rights once the schema exists (docs: deploy/postgres-grants.sql).
async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let pending = MIGRATOR
        .iter()
        .any(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version));
    if pending {
        MIGRATOR.run(pool).await?;
    }
    Ok(())
}

/// Creates the database named in `options` when it does not exist, through
/// the server's `postgres` maintenance database.
fn connect_options(config: &PostgresConfig) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(config.database_url.expose()).map_err(StoreError::Url)
}

/// Every session carries the configured timeouts, and asks Postgres to
/// notice a vanished client within about a minute (TCP keepalives), so that
/// no wait on Postgres is unbounded, in either direction.
fn with_session_settings(options: PgConnectOptions, config: &PostgresConfig) -> PgConnectOptions {
    let ms = |v: u64| format!("{v}ms");
    options.options([
        (
            "statement_timeout",
            ms(config.database_statement_timeout_ms),
        ),
        ("lock_timeout", ms(config.database_lock_timeout_ms)),
        (
            "idle_in_transaction_session_timeout",
            ms(config.database_idle_in_transaction_timeout_ms),
        ),
        ("tcp_keepalives_idle", "30".to_owned()),
        ("tcp_keepalives_interval", "10".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
    ])
}

fn pool_options(config: &PostgresConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_millis(config.database_acquire_timeout_ms))
}

async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StoreError> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut conn = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        // The name comes from our own configuration and is quoted as an identifier.
        match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another instance created it in the meantime.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await?;
    Ok(())
}

fn call_timeout(config: &PostgresConfig) -> Duration {
    Duration::from_millis(config.database_call_timeout_ms)
}

impl Store {
    /// Runs one call on a pooled connection, timed
    /// (`stockd_postgres_duration_seconds{call, outcome}`, outcome `ok`,
    /// `error` or `timeout`) and bounded by the call timeout.
    ///
    /// Postgres' own timeouts end a statement that runs too long; they
    /// cannot end a wait on a connection that stopped carrying packets (a
    /// partition, a host gone, a stalled proxy), where the answer never
    /// comes and no reset either. Such a connection is closed rather than
    /// returned to the pool: returning it would ping it, and the ping
    /// would wait on it forever too, holding one of the pool's slots.
    pub(crate) async fn bounded<T>(
        &self,
        call: &'static str,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let started = Instant::now();
        // Err(()) when the call timed out.
        let result = match self.pool.acquire().await {
            Err(err) => Ok(Err(err)),
            Ok(mut conn) => match tokio::time::timeout(self.call_timeout, work(&mut conn)).await {
                Ok(result) => Ok(result),
                Err(_) => {
                    conn.close_on_drop();
                    Err(())
                }
            },
        };
        let (outcome, result) = match result {
            Ok(Ok(value)) => ("ok", Ok(value)),
            Ok(Err(err)) => ("error", Err(err)),
            Err(()) => {
                // No `call` label: a series made at its first increment would
                // hide that increment from `increase()` (the alert); the
                // duration histogram has the call, outcome `timeout`.
                metrics::counter!("stockd_postgres_timeouts_total").increment(1);
                tracing::warn!(
                    call,
                    timeout_ms = self.call_timeout.as_millis() as u64,
                    "Postgres did not answer in time; dropped the connection (the call fails and is retried on a new one)"
                );
                let err = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("Postgres did not answer within {:?}", self.call_timeout),
                );
                ("timeout", Err(sqlx::Error::Io(err)))
            }
        };
        metrics::histogram!("stockd_postgres_duration_seconds", "call" => call, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }
}
