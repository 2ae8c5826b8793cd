//! Postgres transactions committed during a run, from `pg_stat_database`:
//! what the write-behind costs the database (stockd's target) or what the
//! plain table costs it (the postgres target).
//!
//! Every transaction of the database counts, whoever commits it: stockd's
//! flusher, webhook detection and exporters' bookkeeping, its background
//! checks, and the two reads made here. Run against a database of its own
//! (scripts/bench does) so that nobody else's commits are in the figure.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// How long a backend may hold its statistics before it reports them:
/// PostgreSQL (15+) reports a busy backend's pending statistics at most once
/// a second (`PGSTAT_MIN_INTERVAL`), but an idle one's only after
/// `PGSTAT_IDLE_INTERVAL`, 10 s. Both readings wait this long, so that the
/// first does not miss what was committed just before the load (the seed's
/// loads on miss, one autocommit read per SKU, would otherwise land in the
/// window) and the last sees everything up to the end of the drain.
const STATS_REPORT_DELAY: Duration = Duration::from_millis(10_500);

const COMMITS: &str = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";

/// A counter of the database's commits, started at the beginning of the load.
pub struct Commits {
    conn: PgConnection,
    started: Instant,
    before: i64,
}

impl Commits {
    /// Connects, waits until the commits made so far are reported, and
    /// reads the counter (a failure leaves the figure out of the report;
    /// the run goes on).
    pub async fn start(url: &str) -> Result<Commits, sqlx::Error> {
        let mut conn = PgConnection::connect(url).await?;
        tokio::time::sleep(STATS_REPORT_DELAY).await;
        let before: i64 = sqlx::query_scalar(COMMITS).fetch_one(&mut conn).await?;
        Ok(Commits {
            conn,
            started: Instant::now(),
            before,
        })
    }

    /// Commits per second since `start`, read once the database has the
    /// statistics of the last moment (the wait is part of the window: what
    /// stockd commits while idle, about 1 a second, counts too).
    pub async fn per_second(mut self) -> Result<f64, sqlx::Error> {
        tokio::time::sleep(STATS_REPORT_DELAY).await;
        let after: i64 = sqlx::query_scalar(COMMITS)
            .fetch_one(&mut self.conn)
            .await?;
        let secs = self.started.elapsed().as_secs_f64();
        let _ = self.conn.close().await;
        Ok(super::report::rate(
            (after - self.before).max(0) as u64,
            secs,
        ))
    }
}
