//! The test Postgres: a database of each test's own on it, and the check
//! that the write-behind converged (Postgres holds what Redis holds, and
//! the ledger every version once).

use std::time::{Duration, Instant};

use clap::Parser;
use stockd::config::Config;
use stockd::redis_conn::RedisConn;

use super::{Levels, POLL_INTERVAL, levels_in_redis};

/// The Postgres server the tests use; each test gets its own database on it.
pub fn postgres_url(database: &str) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL ends in /<database>");
    format!("{server}/{database}")
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

/// The Postgres settings of a test (timeouts as in production).
pub fn postgres_config(database: &str) -> stockd::config::PostgresConfig {
    Config::try_parse_from(["stockd", "--database-url", &postgres_url(database)])
        .expect("config parses")
        .postgres
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
