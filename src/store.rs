//! Postgres: the durable copy, written behind Redis by the flusher.
//!
//! Every write is idempotent (ledger rows keyed by (sku, location, version),
//! stock rows under a version guard, terminal reservation states never
//! reverted), so replaying a batch after a crash between the commit and the
//! XACK changes nothing. Writes are set-based: one statement per table per
//! batch, fed with arrays through `UNNEST`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Row};

use crate::events::{ChangeEvent, parse_entry_id};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("running migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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

/// A held reservation's row: this partition's lines and the expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRow {
    pub reservation_id: String,
    pub partition: u32,
    /// (sku, location, quantity)
    pub lines: Vec<(String, String, i64)>,
    pub expires_at_ms: Option<i64>,
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
}

impl Store {
    /// Connects, creating the database when it does not exist, and runs the
    /// migrations (sqlx serialises concurrent runs with an advisory lock).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::Url)?;
        create_database_if_missing(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes one batch of a partition's events in ONE transaction: ledger
    /// rows, the latest state per item, the reservations' rows of this
    /// partition, and the partition's checkpoint.
    pub async fn write_batch(
        &self,
        partition: u32,
        events: &[ChangeEvent],
    ) -> Result<(), sqlx::Error> {
        let Some(last) = events
            .iter()
            .max_by_key(|e| parse_entry_id(&e.entry_id))
            .map(|e| e.entry_id.clone())
        else {
            return Ok(());
        };
        let partition = partition as i32;
        let mut tx = self.pool.begin().await?;

        let ledger = Columns::of(events);
        sqlx::query(
            "INSERT INTO stock_ledger (sku, location, version, op, d_available, d_reserved,
                                       available, reserved, ref, partition, entry_id, occurred_at)
             SELECT sku, location, version, op, d_available, d_reserved, available, reserved,
                    ref, $10, entry_id, to_timestamp(ts / 1000.0)
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                         $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $11::text[], $12::bigint[])
                  AS t(sku, location, version, op, d_available, d_reserved, available, reserved,
                       ref, entry_id, ts)
             ON CONFLICT (sku, location, version) DO NOTHING",
        )
        .bind(&ledger.sku)
        .bind(&ledger.location)
        .bind(&ledger.version)
        .bind(&ledger.op)
        .bind(&ledger.d_available)
        .bind(&ledger.d_reserved)
        .bind(&ledger.available)
        .bind(&ledger.reserved)
        .bind(&ledger.reference)
        .bind(partition)
        .bind(&ledger.entry_id)
        .bind(&ledger.ts)
        .execute(&mut *tx)
        .await?;

        // One row per item (an upsert may not touch a row twice), the newest.
        let mut latest: HashMap<(&str, &str), &ChangeEvent> = HashMap::new();
        for e in events {
            let slot = latest
                .entry((e.sku.as_str(), e.location.as_str()))
                .or_insert(e);
            if e.version > slot.version {
                *slot = e;
            }
        }
        let latest: Vec<&ChangeEvent> = latest.into_values().collect();
        let state = Columns::of(latest.iter().copied());
        sqlx::query(
            "INSERT INTO stock (sku, location, available, reserved, version, updated_at)
             SELECT sku, location, available, reserved, version, now()
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
                  AS t(sku, location, available, reserved, version)
             ON CONFLICT (sku, location) DO UPDATE
                SET available = EXCLUDED.available, reserved = EXCLUDED.reserved,
                    version = EXCLUDED.version, updated_at = now()
              WHERE stock.version < EXCLUDED.version",
        )
        .bind(&state.sku)
        .bind(&state.location)
        .bind(&state.available)
        .bind(&state.reserved)
        .bind(&state.version)
        .execute(&mut *tx)
        .await?;

        let reservations = ReservationRows::of(events);
        if !reservations.id.is_empty() {
            sqlx::query(
                "INSERT INTO reservations (reservation_id, partition, state, lines, expires_at, updated_at)
                 SELECT id, $5, state, lines::jsonb,
                        CASE WHEN exp IS NULL THEN NULL ELSE to_timestamp(exp / 1000.0) END, now()
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(id, state, lines, exp)
                 ON CONFLICT (reservation_id, partition) DO UPDATE
                    SET state = CASE WHEN reservations.state = 'held' THEN EXCLUDED.state
                                     ELSE reservations.state END,
                        lines = (SELECT jsonb_agg(DISTINCT l)
                                   FROM jsonb_array_elements(reservations.lines || EXCLUDED.lines) AS l),
                        expires_at = COALESCE(EXCLUDED.expires_at, reservations.expires_at),
                        updated_at = now()",
            )
            .bind(&reservations.id)
            .bind(&reservations.state)
            .bind(&reservations.lines)
            .bind(&reservations.expires_at)
            .bind(partition)
            .execute(&mut *tx)
            .await?;
        }

        sqlx::query(
            "INSERT INTO flush_checkpoint (partition, last_entry_id, flushed_at)
             VALUES ($1, $2, now())
             ON CONFLICT (partition) DO UPDATE
                SET last_entry_id = EXCLUDED.last_entry_id, flushed_at = now()
              WHERE (split_part(flush_checkpoint.last_entry_id, '-', 1)::numeric,
                     split_part(flush_checkpoint.last_entry_id, '-', 2)::numeric)
                  < (split_part(EXCLUDED.last_entry_id, '-', 1)::numeric,
                     split_part(EXCLUDED.last_entry_id, '-', 2)::numeric)",
        )
        .bind(partition)
        .bind(&last)
        .execute(&mut *tx)
        .await?;

        tx.commit().await
    }

    pub async fn checkpoints(&self) -> Result<HashMap<u32, Checkpoint>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT partition, last_entry_id, (extract(epoch FROM flushed_at) * 1000)::bigint AS at_ms
             FROM flush_checkpoint",
        )
        .fetch_all(&self.pool)
        .await?;
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
        let rows = sqlx::query(
            "SELECT sku, location, available, reserved, version FROM stock
             WHERE sku = ANY($1) ORDER BY sku, location",
        )
        .bind(skus)
        .fetch_all(&self.pool)
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
        let rows = sqlx::query(
            "SELECT sku, location, available, reserved, version FROM stock
             WHERE (sku, location) > ($1, $2) ORDER BY sku, location LIMIT $3",
        )
        .bind(sku)
        .bind(location)
        .bind(limit)
        .fetch_all(&self.pool)
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
        let rows = sqlx::query(
            "SELECT s.sku, s.location, s.available, s.reserved, s.version
             FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
             JOIN stock s ON s.sku = t.sku AND s.location = t.location",
        )
        .bind(&skus)
        .bind(&locations)
        .fetch_all(&self.pool)
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
        let rows = sqlx::query(
            "SELECT l.sku, l.location, sum(l.d_available)::bigint AS a, sum(l.d_reserved)::bigint AS r
             FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
             JOIN stock_ledger l ON l.sku = t.sku AND l.location = t.location
             GROUP BY l.sku, l.location",
        )
        .bind(&skus)
        .bind(&locations)
        .fetch_all(&self.pool)
        .await?;
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
        let rows = sqlx::query(
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
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("sku"), r.get("location")))
            .collect())
    }

    /// Every reservation row still `held`, by reservation and partition.
    pub async fn held_reservations(&self) -> Result<Vec<HeldRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT reservation_id, partition, lines::text AS lines,
                    (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms
             FROM reservations WHERE state = 'held' ORDER BY reservation_id, partition",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let lines: String = r.get("lines");
                Ok(HeldRow {
                    reservation_id: r.get("reservation_id"),
                    partition: r.get::<i32, _>("partition") as u32,
                    lines: serde_json::from_str(&lines)
                        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                    expires_at_ms: r.get("expires_at_ms"),
                })
            })
            .collect()
    }

    pub async fn stock_row(
        &self,
        sku: &str,
        location: &str,
    ) -> Result<Option<StockRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT sku, location, available, reserved, version FROM stock WHERE sku = $1 AND location = $2",
        )
        .bind(sku)
        .bind(location)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(stock_row))
    }

    pub async fn ledger(&self, sku: &str, location: &str) -> Result<Vec<LedgerRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT version, op, d_available, d_reserved, available, reserved, ref
             FROM stock_ledger WHERE sku = $1 AND location = $2 ORDER BY version",
        )
        .bind(sku)
        .bind(location)
        .fetch_all(&self.pool)
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

/// Events as column arrays for `UNNEST`.
#[derive(Default)]
struct Columns {
    sku: Vec<String>,
    location: Vec<String>,
    version: Vec<i64>,
    op: Vec<&'static str>,
    d_available: Vec<i64>,
    d_reserved: Vec<i64>,
    available: Vec<i64>,
    reserved: Vec<i64>,
    reference: Vec<String>,
    entry_id: Vec<String>,
    ts: Vec<i64>,
}

impl Columns {
    fn of<'a>(events: impl IntoIterator<Item = &'a ChangeEvent>) -> Self {
        let mut c = Columns::default();
        for e in events {
            c.sku.push(e.sku.clone());
            c.location.push(e.location.clone());
            c.version.push(e.version);
            c.op.push(e.op.as_str());
            c.d_available.push(e.d_available);
            c.d_reserved.push(e.d_reserved);
            c.available.push(e.available);
            c.reserved.push(e.reserved);
            c.reference.push(e.reference.clone());
            c.entry_id.push(e.entry_id.clone());
            c.ts.push(e.ts_ms);
        }
        c
    }
}

/// The reservation rows a batch implies, one per reservation id.
#[derive(Default)]
struct ReservationRows {
    id: Vec<String>,
    state: Vec<&'static str>,
    lines: Vec<String>,
    expires_at: Vec<Option<i64>>,
}

/// What a batch says about one reservation in this partition.
struct ReservationSeen<'a> {
    state: &'static str,
    lines: Vec<(&'a str, &'a str, i64)>,
    expires_at_ms: Option<i64>,
}

impl ReservationRows {
    fn of(events: &[ChangeEvent]) -> Self {
        // In stream order: a later event's state wins; every event of a
        // reservation names one of its lines (|d_reserved| is the quantity).
        let mut order: Vec<&str> = Vec::new();
        let mut seen: HashMap<&str, ReservationSeen> = HashMap::new();
        for e in events {
            let Some(state) = e.op.reservation_state() else {
                continue;
            };
            let row = seen.entry(e.reference.as_str()).or_insert_with(|| {
                order.push(e.reference.as_str());
                ReservationSeen {
                    state,
                    lines: Vec::new(),
                    expires_at_ms: None,
                }
            });
            // Terminal states never revert (the same rule as the SQL upsert).
            if row.state == "held" {
                row.state = state;
            }
            let line = (e.sku.as_str(), e.location.as_str(), e.d_reserved.abs());
            if !row.lines.contains(&line) {
                row.lines.push(line);
            }
            if e.expires_at_ms.is_some() {
                row.expires_at_ms = e.expires_at_ms;
            }
        }
        let mut out = ReservationRows::default();
        for id in order {
            let row = &seen[id];
            out.id.push(id.to_owned());
            out.state.push(row.state);
            out.lines
                .push(serde_json::to_string(&row.lines).expect("lines serialise"));
            out.expires_at.push(row.expires_at_ms);
        }
        out
    }
}
