//! Records Redis forgot and Postgres still knows: after Redis lost its data
//! (or rolled back), a retry of a request whose outcome was flushed must
//! replay that outcome, not apply again. The scripts say when an id may be
//! such a one ('check', from the partition's Bloom filter of ids Postgres
//! knew); the engine then looks it up here and puts its records back with
//! `restore_*.lua`, which never overwrite a record Redis has.
//!
//! The re-warm after a data loss restores held reservations the same way
//! ([`restore_reservation`]), so the record layout is written in Lua only.

use std::time::Duration;

use serde_json::json;

use super::Engine;
use super::plan::{Kind, Plan};
use crate::error::Error;
use crate::keys::{Keyspace, Partition};
use crate::redis_conn::{CommandBatch, RedisConn};
use crate::scripts;
use crate::store::{LevelRow, ReservationRow};

/// How much longer than its hold a separate locator is kept (as
/// reserve.lua does), so that replays within the window still find it.
const LOCATOR_SLACK: Duration = Duration::from_secs(3600);

impl Engine {
    /// Puts `plan`'s id back into Redis from Postgres when Postgres knows it.
    pub(super) async fn recall(&self, plan: &Plan) -> Result<(), Error> {
        match plan.kind {
            Kind::Reservation | Kind::Part => self.recall_reservation(&plan.id).await.map(|_| ()),
            Kind::Request => self.recall_request(plan).await,
        }
    }

    /// Puts the reservation `id` back from Postgres; false when Postgres
    /// does not know it either.
    pub(super) async fn recall_reservation(&self, id: &str) -> Result<bool, Error> {
        let Some(warmer) = &self.inner.warmer else {
            return Ok(false);
        };
        let rows = warmer.store().reservation_rows(id).await?;
        if rows.is_empty() {
            return Ok(false);
        }
        restore_reservation(
            &self.inner.conn,
            &self.inner.keys,
            id,
            &rows,
            self.inner.settings.idempotency_window,
        )
        .await?;
        Ok(true)
    }

    async fn recall_request(&self, plan: &Plan) -> Result<(), Error> {
        let Some(warmer) = &self.inner.warmer else {
            return Ok(());
        };
        let rows = warmer.store().request_outcomes(&plan.id).await?;
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let keys = &self.inner.keys;
        // Where the first request kept its outcome: its one partition, or
        // the id's own partition when it spanned partitions.
        let coordinator = match rows.as_slice() {
            [only] => Partition(only.partition),
            _ => plan.home,
        };
        let mut levels: Vec<&LevelRow> = rows.iter().flat_map(|r| &r.levels).collect();
        // In the order of this request's lines where they match (a retry
        // has the same lines), then the rest.
        levels.sort_by_key(|l| {
            plan.lines
                .iter()
                .position(|(line, _)| line.sku == l.0 && line.location == l.1)
                .unwrap_or(usize::MAX)
        });
        let out = json!({ "levels": levels }).to_string();
        let window = self.inner.settings.idempotency_window.as_millis() as u64;
        let mut records = vec![Kind::Request.record(keys, coordinator, &plan.id)];
        if coordinator != plan.home {
            records.push(Kind::Request.record(keys, plan.home, &plan.id));
        }
        let mut batch = CommandBatch::new();
        for record in records {
            let mut inv = scripts::RESTORE_REQUEST.prepare_invoke();
            inv.key(&record)
                .arg(&first.fingerprint)
                .arg(&out)
                .arg("")
                .arg("")
                .arg(window);
            batch.script(record, &scripts::RESTORE_REQUEST, inv);
        }
        batch.query(&self.inner.conn).await?;
        tracing::debug!(request_id = ?plan.id.to_string(), "request outcome recalled from Postgres");
        Ok(())
    }
}

/// Writes every record of the reservation `id` from its Postgres rows (one
/// per partition holding lines): each partition's record and expiry entry,
/// the coordinator's outcomes, and the locator. Records Redis has are left
/// alone.
pub(crate) async fn restore_reservation(
    conn: &RedisConn,
    keys: &Keyspace,
    id: &str,
    rows: &[ReservationRow],
    window: Duration,
) -> Result<u64, Error> {
    let plan = RestorePlan::of(keys, id, rows, conn.is_cluster());
    let mut batch = CommandBatch::new();
    for record in plan.records(keys, id, window) {
        let mut inv = scripts::RESTORE_RESERVATION.prepare_invoke();
        inv.key(&record.key).key(record.rexp);
        for arg in record.args {
            inv.arg(arg);
        }
        batch.script(record.key, &scripts::RESTORE_RESERVATION, inv);
    }
    let mut written = 0;
    for reply in batch.query(conn).await? {
        let n: u64 = redis::from_redis_value(reply)
            .map_err(|e| Error::Internal(format!("restore_reservation.lua: {e}")))?;
        written += u64::from(n > 0);
    }
    Ok(written)
}

/// One reservation's records as Postgres describes them.
struct RestorePlan<'a> {
    rows: &'a [ReservationRow],
    fingerprint: String,
    state: &'a str,
    expires_at_ms: Option<i64>,
    /// Partitions in the order of `all`.
    parts: Vec<Partition>,
    /// On a cluster, a reservation spanning partitions is a coordinator in
    /// the id's partition and a `part` record in each of the others.
    coordinated: bool,
    /// Every line, JSON.
    all: String,
    /// The reserve outcome, and the finish outcome once finished.
    out: String,
    fin: String,
    home: Partition,
}

/// One `restore_reservation.lua` call.
struct RestoreRecord {
    key: String,
    rexp: String,
    args: Vec<String>,
}

impl<'a> RestorePlan<'a> {
    fn of(keys: &Keyspace, id: &str, rows: &'a [ReservationRow], cluster: bool) -> Self {
        let mut parts = Vec::new();
        let mut all = Vec::new();
        let mut reserve_levels = Vec::new();
        let mut finish_levels = Vec::new();
        for row in rows {
            parts.push(Partition(row.partition));
            all.extend(row.lines.iter().cloned());
            reserve_levels.extend(row.reserve_levels.iter().cloned());
            finish_levels.extend(row.finish_levels.iter().cloned());
        }
        // The most advanced state of the parts: one script moved them all,
        // so they agree unless a flush is partway.
        let state = rows
            .iter()
            .map(|r| r.state.as_str())
            .find(|s| *s != "held")
            .unwrap_or("held");
        let expires_at_ms = rows.iter().filter_map(|r| r.expires_at_ms).max();
        let out = json!({ "exp": expires_at_ms.unwrap_or_default(), "levels": reserve_levels })
            .to_string();
        let fin = if state == "held" {
            String::new()
        } else {
            json!({ "levels": finish_levels }).to_string()
        };
        Self {
            rows,
            fingerprint: rows
                .iter()
                .find_map(|r| r.fingerprint.clone())
                // Flushed before fingerprints were recorded: a replay of
                // the Reserve answers ALREADY_EXISTS, the rest works.
                .unwrap_or_else(|| format!("restored:{id}")),
            state,
            expires_at_ms,
            coordinated: cluster && parts.len() > 1,
            parts,
            all: serde_json::to_string(&all).expect("lines serialise"),
            out,
            fin,
            home: keys.partition_of(id),
        }
    }

    fn coordinator(&self) -> Partition {
        match self.parts.as_slice() {
            [only] => *only,
            _ => self.home,
        }
    }

    fn records(&self, keys: &Keyspace, id: &str, window: Duration) -> Vec<RestoreRecord> {
        let coordinator = self.coordinator();
        let parts = self
            .parts
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let exp = self
            .expires_at_ms
            .map(|e| e.to_string())
            .unwrap_or_default();
        let window_ms = window.as_millis().to_string();
        let record =
            |p: Partition, state: &str, lines: String, coordinates: bool, locates: bool| {
                let pick =
                    |yes: bool, value: &str| if yes { value.to_owned() } else { String::new() };
                // A part of a coordinated reservation: its own record kind,
                // pointing at the coordinator.
                let part = self.coordinated && !lines.is_empty();
                RestoreRecord {
                    key: if part {
                        keys.part(p, id)
                    } else {
                        keys.reservation(p, id)
                    },
                    rexp: keys.reservation_expiry(p),
                    args: vec![
                        id.to_owned(),
                        self.fingerprint.clone(),
                        state.to_owned(),
                        pick(!state.is_empty(), &exp),
                        lines,
                        pick(coordinates, &self.out),
                        pick(coordinates, &self.fin),
                        pick(locates, &self.all),
                        pick(locates || !state.is_empty(), &parts),
                        window_ms.clone(),
                        if part {
                            self.home.to_string()
                        } else {
                            String::new()
                        },
                    ],
                }
            };
        let mut records: Vec<RestoreRecord> = self
            .rows
            .iter()
            .map(|row| {
                let p = Partition(row.partition);
                let lines = serde_json::to_string(&row.lines).expect("lines serialise");
                // Parts of a coordinated reservation locate nothing and
                // hold no outcome of the request: the coordinator does.
                let own = !self.coordinated;
                let mut record = record(
                    p,
                    &row.state,
                    lines,
                    own && p == coordinator,
                    own && p == self.home,
                );
                if self.coordinated && row.state == "held" {
                    // A held part comes back with its provisional expiry
                    // at the latest: what became of its request may be
                    // lost with the Redis it is restored into (a commit
                    // that was never flushed), so the reaper asks the
                    // coordinator soon, which re-dates the part if the
                    // request still holds, rather than the part keeping
                    // its units until the real expiry (minutes, for the
                    // internal hold of a decrement spanning partitions).
                    let provisional = now_ms() + super::steps::PROVISIONAL.as_millis() as i64;
                    let exp = row
                        .expires_at_ms
                        .or(self.expires_at_ms)
                        .map_or(provisional, |e| e.min(provisional));
                    record.args[3] = exp.to_string();
                }
                if self.coordinated {
                    // A part keeps its own reserve outcome (its lines'
                    // levels), as reserve.lua stores it: a retry of the
                    // request replays the part from it.
                    record.args[5] = json!({
                        "exp": row.expires_at_ms.unwrap_or_default(),
                        "levels": row.reserve_levels,
                    })
                    .to_string();
                }
                record
            })
            .collect();
        if self.coordinated || !self.parts.contains(&self.home) {
            // The id's own partition holds no lines: the coordinator of a
            // reservation spanning partitions, or only its locator.
            let mut locator = record(
                self.home,
                if coordinator == self.home {
                    self.state
                } else {
                    ""
                },
                String::new(),
                coordinator == self.home,
                true,
            );
            if coordinator != self.home {
                // A separate locator lives as long as reserve.lua gives it.
                let hold = self
                    .expires_at_ms
                    .map(|e| (e - now_ms()).max(0) as u128)
                    .unwrap_or_default();
                locator.args[9] =
                    (hold + window.as_millis() + LOCATOR_SLACK.as_millis()).to_string();
            }
            records.push(locator);
        }
        records
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(partition: u32, state: &str, expires_at_ms: i64) -> ReservationRow {
        ReservationRow {
            reservation_id: "r1".into(),
            partition,
            state: state.into(),
            lines: vec![(format!("sku-{partition}"), "default".into(), 1)],
            expires_at_ms: Some(expires_at_ms),
            fingerprint: Some("fp".into()),
            reserve_levels: Vec::new(),
            finish_levels: Vec::new(),
        }
    }

    /// The expiry each restored record with lines gets, by key.
    fn expiries(rows: &[ReservationRow], cluster: bool) -> Vec<(String, i64)> {
        let keys = Keyspace::new("t", 16);
        RestorePlan::of(&keys, "r1", rows, cluster)
            .records(&keys, "r1", Duration::from_secs(60))
            .into_iter()
            .filter(|r| !r.args[3].is_empty() && !r.args[4].is_empty())
            .map(|r| (r.key, r.args[3].parse().unwrap()))
            .collect()
    }

    #[test]
    fn held_parts_come_back_due_within_their_provisional_expiry() {
        let far = now_ms() + 300_000;
        let soon = now_ms() + super::super::steps::PROVISIONAL.as_millis() as i64 + 1_000;
        let parts = expiries(&[row(1, "held", far), row(2, "held", far)], true);
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert!(
            parts
                .iter()
                .all(|(key, exp)| key.contains(":part:") && *exp < soon),
            "{parts:?}"
        );
        // An earlier expiry of its own stays.
        let near = now_ms() + 5_000;
        let parts = expiries(&[row(1, "held", near), row(2, "held", far)], true);
        assert!(parts.iter().any(|(_, exp)| *exp == near), "{parts:?}");
        // Not a part (one Redis, or one partition): the real expiry. (The
        // coordinator of parts, which holds no lines, keeps it too: the
        // parts ask it.)
        let own = expiries(&[row(1, "held", far), row(2, "held", far)], false);
        assert!(own.iter().all(|(_, exp)| *exp == far), "{own:?}");
    }
}
