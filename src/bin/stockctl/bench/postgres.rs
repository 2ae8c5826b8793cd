//! The postgres target: the same workload done the way a team without
//! stockd would, one transaction per request against a Postgres table
//! (`bench_stock`), every line a guarded `UPDATE`.
//!
//! A single-line request is one autocommit `UPDATE` (one round trip); a
//! multi-line one is `BEGIN`, one `UPDATE` per line in SKU order (so that
//! concurrent carts cannot deadlock), `COMMIT`, or `ROLLBACK` at the first
//! line that is short. A line that updates no row is short stock:
//! FAILED_PRECONDITION, like stockd.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Row};
use tonic::Code;

use super::Names;
use super::ledger::Level;
use super::workload::{Line, Op};

const CREATE: &str = "CREATE TABLE IF NOT EXISTS bench_stock (
    sku       text   NOT NULL,
    location  text   NOT NULL,
    available bigint NOT NULL CHECK (available >= 0),
    reserved  bigint NOT NULL CHECK (reserved >= 0),
    PRIMARY KEY (sku, location)
)";

const RESERVE: &str = "UPDATE bench_stock SET available = available - $1, reserved = reserved + $1
     WHERE sku = $2 AND location = 'default' AND available >= $1";
const COMMIT: &str = "UPDATE bench_stock SET reserved = reserved - $1
     WHERE sku = $2 AND location = 'default' AND reserved >= $1";
const RELEASE: &str = "UPDATE bench_stock SET reserved = reserved - $1, available = available + $1
     WHERE sku = $2 AND location = 'default' AND reserved >= $1";
const DECREMENT: &str = "UPDATE bench_stock SET available = available - $1
     WHERE sku = $2 AND location = 'default' AND available >= $1";
const ADJUST: &str = "UPDATE bench_stock SET available = available + $1
     WHERE sku = $2 AND location = 'default' AND available + $1 >= 0";

/// Rows inserted per statement while seeding.
const SEED_CHUNK: usize = 10_000;

/// The statement and the (SKU, quantity) of each line of `op`, in SKU
/// order: the order in which rows are locked.
pub fn statements(op: &Op) -> (&'static str, Vec<Line>) {
    let (sql, mut lines) = match op {
        Op::Reserve { lines, .. } => (RESERVE, lines.clone()),
        Op::Commit { lines, .. } => (COMMIT, lines.clone()),
        Op::Release { lines, .. } => (RELEASE, lines.clone()),
        Op::Decrement { lines, .. } => (DECREMENT, lines.clone()),
        Op::Adjust { sku, delta, .. } => (ADJUST, vec![(*sku, *delta)]),
    };
    lines.sort_unstable();
    (sql, lines)
}

/// A pool of `connections`, all opened before the load starts.
pub async fn connect(url: &str, connections: u32) -> Result<PgPool, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await?;
    // Open every connection now, not during the load.
    let mut held = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}

/// Creates `bench_stock` when missing and inserts the run's SKUs.
pub async fn seed(pool: &PgPool, names: &Names, stock: i64) -> Result<(), sqlx::Error> {
    match pool.execute(CREATE).await {
        Ok(_) => {}
        // Two runs creating the table at once: the other one won.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
        Err(e) => return Err(e),
    }
    let all: Vec<String> = (0..names.len() as u32)
        .map(|i| names.sku(i).to_owned())
        .collect();
    for chunk in all.chunks(SEED_CHUNK) {
        sqlx::query(
            "INSERT INTO bench_stock (sku, location, available, reserved)
             SELECT s, 'default', $2, 0 FROM UNNEST($1::text[]) AS s",
        )
        .bind(chunk)
        .bind(stock)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// One client's calls.
pub struct Caller {
    pub pool: PgPool,
    pub names: Names,
}

impl Caller {
    pub async fn call(&mut self, op: &Op) -> Code {
        match self.apply(op).await {
            Ok(true) => Code::Ok,
            Ok(false) => Code::FailedPrecondition,
            Err(e) => code_of(&e),
        }
    }

    /// `Ok(false)` when a line was short (nothing changed).
    async fn apply(&self, op: &Op) -> Result<bool, sqlx::Error> {
        let (sql, lines) = statements(op);
        if let [(sku, qty)] = lines[..] {
            let r = sqlx::query(sql)
                .bind(qty)
                .bind(self.names.sku(sku))
                .execute(&self.pool)
                .await?;
            return Ok(r.rows_affected() == 1);
        }
        let mut tx = self.pool.begin().await?;
        for (sku, qty) in lines {
            let r = sqlx::query(sql)
                .bind(qty)
                .bind(self.names.sku(sku))
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// The gRPC code stockd would answer for a Postgres failure.
fn code_of(e: &sqlx::Error) -> Code {
    match e {
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // deadlock, serialization failure
            Some("40P01" | "40001") => Code::Aborted,
            // check violation: would go negative
            Some("23514") => Code::FailedPrecondition,
            _ => Code::Internal,
        },
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            Code::Unavailable
        }
        _ => Code::Internal,
    }
}

/// The `bench_stock` rows of the run's SKUs.
pub async fn read_levels(pool: &PgPool, names: &Names) -> Result<Vec<Option<Level>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, available, reserved FROM bench_stock
         WHERE location = 'default' AND sku LIKE $1",
    )
    .bind(format!("{}%", names.prefix()))
    .fetch_all(pool)
    .await?;
    let mut levels = vec![None; names.len()];
    for row in rows {
        let sku: String = row.try_get(0)?;
        if let Some(i) = names.index_of(&sku) {
            levels[i as usize] = Some(Level {
                available: row.try_get(1)?,
                reserved: row.try_get(2)?,
                version: None,
            });
        }
    }
    Ok(levels)
}

/// Deletes the run's rows: the table only ever holds runs in progress.
pub async fn clean_up(pool: &PgPool, names: &Names) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM bench_stock WHERE sku LIKE $1")
        .bind(format!("{}%", names.prefix()))
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_locked_in_sku_order() {
        let op = Op::Reserve {
            id: "r".into(),
            lines: vec![(9, 1), (2, 3), (5, 1)],
        };
        let (sql, lines) = statements(&op);
        assert_eq!(sql, RESERVE);
        assert_eq!(lines, [(2, 3), (5, 1), (9, 1)]);
    }

    #[test]
    fn each_operation_has_its_guarded_update() {
        let l = vec![(1, 2)];
        let id = String::new();
        let cases = [
            (
                Op::Commit {
                    id: id.clone(),
                    lines: l.clone(),
                },
                COMMIT,
            ),
            (
                Op::Release {
                    id: id.clone(),
                    lines: l.clone(),
                },
                RELEASE,
            ),
            (
                Op::Decrement {
                    id: id.clone(),
                    lines: l.clone(),
                },
                DECREMENT,
            ),
        ];
        for (op, sql) in cases {
            assert_eq!(statements(&op), (sql, l.clone()));
        }
        let adjust = Op::Adjust {
            id,
            sku: 4,
            delta: -2,
        };
        assert_eq!(statements(&adjust), (ADJUST, vec![(4, -2)]));
        // Every statement refuses to go below zero.
        for sql in [RESERVE, COMMIT, RELEASE, DECREMENT, ADJUST] {
            assert!(sql.contains(">= $1") || sql.contains("+ $1 >= 0"), "{sql}");
        }
    }
}
