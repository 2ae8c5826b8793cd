//! What Postgres knows of request ids, for a retry whose record Redis lost
//! (engine/recall.rs) and for the re-warm after a data loss.

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::Store;

/// A level as stored with an outcome: (sku, location, available, reserved,
/// version).
pub type LevelRow = (String, String, i64, i64, i64);

/// A request's outcome in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRow {
    pub partition: u32,
    pub fingerprint: String,
    pub op: String,
    pub levels: Vec<LevelRow>,
}

/// A reservation's row in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    pub reservation_id: String,
    pub partition: u32,
    pub state: String,
    /// This partition's lines (sku, location, quantity).
    pub lines: Vec<(String, String, i64)>,
    pub expires_at_ms: Option<i64>,
    /// Absent on rows flushed before fingerprints were recorded.
    pub fingerprint: Option<String>,
    pub reserve_levels: Vec<LevelRow>,
    pub finish_levels: Vec<LevelRow>,
}

const RESERVATION_COLUMNS: &str = "reservation_id, partition, state, lines::text AS lines,
    (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms, fingerprint,
    reserve_levels::text AS reserve_levels, finish_levels::text AS finish_levels";

fn json<T: serde::de::DeserializeOwned>(row: &PgRow, column: &str) -> Result<T, sqlx::Error> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn reservation_row(row: PgRow) -> Result<ReservationRow, sqlx::Error> {
    Ok(ReservationRow {
        reservation_id: row.try_get("reservation_id")?,
        partition: row.try_get::<i32, _>("partition")? as u32,
        state: row.try_get("state")?,
        lines: json(&row, "lines")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        fingerprint: row.try_get("fingerprint")?,
        reserve_levels: json(&row, "reserve_levels")?,
        finish_levels: json(&row, "finish_levels")?,
    })
}

impl Store {
    /// The outcome of the request `id`, one row per partition of its items.
    pub async fn request_outcomes(&self, id: &str) -> Result<Vec<OutcomeRow>, sqlx::Error> {
        let rows = self
            .bounded("request_outcomes", async |conn| {
                sqlx::query(
                    "SELECT partition, fingerprint, op, levels::text AS levels
                     FROM request_outcomes WHERE request_id = $1 ORDER BY partition",
                )
                .bind(id)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(OutcomeRow {
                    partition: row.try_get::<i32, _>("partition")? as u32,
                    fingerprint: row.try_get("fingerprint")?,
                    op: row.try_get("op")?,
                    levels: json(&row, "levels")?,
                })
            })
            .collect()
    }

    /// The rows of the reservation `id`, one per partition of its lines.
    pub async fn reservation_rows(&self, id: &str) -> Result<Vec<ReservationRow>, sqlx::Error> {
        let rows = self
            .bounded("reservation_rows", async |conn| {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations
                     WHERE reservation_id = $1 ORDER BY partition"
                )))
                .bind(id)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter().map(reservation_row).collect()
    }

    /// Every reservation row still `held`, by reservation and partition.
    pub async fn held_reservations(&self) -> Result<Vec<ReservationRow>, sqlx::Error> {
        let rows = self
            .bounded("held_reservations", async |conn| {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations
                     WHERE state = 'held' ORDER BY reservation_id, partition"
                )))
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter().map(reservation_row).collect()
    }

    /// Held reservation rows whose hold lapsed more than `grace_ms` ago: the
    /// reaper should long have expired them, unless Redis lost their
    /// records (keys deleted, evicted) without losing its markers.
    pub async fn overdue_holds(
        &self,
        grace_ms: i64,
        limit: i64,
    ) -> Result<Vec<ReservationRow>, sqlx::Error> {
        let rows = self
            .bounded("overdue_holds", async |conn| {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations
                     WHERE state = 'held'
                       AND expires_at < now() - make_interval(secs => $1 / 1000.0)
                     ORDER BY expires_at LIMIT $2"
                )))
                .bind(grace_ms)
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter().map(reservation_row).collect()
    }

    /// Reservation rows changed since `since_ms` (Postgres's clock) that
    /// are no longer held: after a rollback, Redis may still hold them.
    pub async fn finished_reservations_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<ReservationRow>, sqlx::Error> {
        let rows = self
            .bounded("finished_reservations_since", async |conn| {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations
                     WHERE state <> 'held' AND updated_at >= to_timestamp($1 / 1000.0)
                     ORDER BY reservation_id, partition"
                )))
                .bind(since_ms)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter().map(reservation_row).collect()
    }

    /// Every request and reservation id Postgres learned within the last
    /// `window_ms`, with the partitions it has rows in: what a partition
    /// re-established from Postgres must look up before it treats an id as
    /// new.
    pub async fn ids_seen_within(&self, window_ms: i64) -> Result<Vec<(String, u32)>, sqlx::Error> {
        let rows = self
            .bounded("ids_seen_within", async |conn| {
                sqlx::query(
                    "SELECT request_id AS id, partition FROM request_outcomes
                     WHERE created_at >= now() - make_interval(secs => $1 / 1000.0)
                    UNION ALL
                    SELECT reservation_id, partition FROM reservations
                     WHERE updated_at >= now() - make_interval(secs => $1 / 1000.0)",
                )
                .bind(window_ms)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get::<i32, _>("partition")? as u32)))
            .collect()
    }

    /// Deletes request outcomes older than the idempotency window.
    pub async fn forget_outcomes_older_than(&self, window_ms: i64) -> Result<u64, sqlx::Error> {
        Ok(self
            .bounded("forget_outcomes_older_than", async |conn| {
                sqlx::query(
                    "DELETE FROM request_outcomes
                     WHERE created_at < now() - make_interval(secs => $1 / 1000.0)",
                )
                .bind(window_ms)
                .execute(conn)
                .await
            })
            .await?
            .rows_affected())
    }

    /// Items with a ledger fork nobody resolved yet.
    pub async fn open_forks(
        &self,
        items: &[(String, String)],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let (skus, locations): (Vec<&str>, Vec<&str>) =
            items.iter().map(|(s, l)| (s.as_str(), l.as_str())).unzip();
        let rows = self
            .bounded("open_forks", async |conn| {
                sqlx::query(
                    "SELECT DISTINCT f.sku, f.location
                     FROM UNNEST($1::text[], $2::text[]) AS t(sku, location)
                     JOIN ledger_forks f ON f.sku = t.sku AND f.location = t.location
                     WHERE f.resolved_at IS NULL",
                )
                .bind(&skus)
                .bind(&locations)
                .fetch_all(conn)
                .await
            })
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get("sku")?, r.try_get("location")?)))
            .collect()
    }
}
