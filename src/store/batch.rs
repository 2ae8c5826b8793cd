//! One flush: the entries an instance read from every partition it serves
//! in one tick, written in ONE transaction.
//!
//! Every statement is set-based (arrays through `UNNEST`) and idempotent,
//! so a batch replayed after a crash between the commit and the XACK
//! changes nothing:
//!
//! 1. ledger rows, `ON CONFLICT (sku, location, version) DO NOTHING`; a row
//!    that meets an existing one with other content is a fork (Redis gave
//!    out a version Postgres had): returned, recorded in `ledger_forks`,
//!    and left out of every later statement;
//! 2. the newest state per item, under the version guard;
//! 3. reservation rows per (reservation, partition): state (terminal states
//!    never revert), lines, expiry (reserve and extend), fingerprint and the
//!    levels of the reserve and of its end;
//! 4. request outcomes per (request, partition): fingerprint and levels;
//! 5. webhook deliveries for the transitions of `available`;
//! 6. each partition's checkpoint, only ever moved forward, announced to
//!    every instance at the commit (NOTIFY, see `checkpoint_feed`).
//!
//! Ledger rows, and the rows of reservations whose reserve is in the batch,
//! are new unless the batch is a replay (or a fork, or an extend was
//! flushed first): they go as a binary `COPY` in a savepoint first
//! (`copy.rs`), and through the statements above only when a row existed.
//! Both ways write the same rows; the copy costs Postgres about half.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;
use sqlx::{PgConnection, Row};

use super::copy::{BinaryRows, copy_new_rows};
use crate::events::{ChangeEvent, EntryId, ExtendRecord, Op};

/// What one flush writes.
#[derive(Debug, Default)]
pub struct FlushBatch {
    pub changes: Vec<ChangeEvent>,
    pub extends: Vec<ExtendRecord>,
    /// The newest entry of each partition in the batch.
    pub checkpoints: Vec<(u32, EntryId)>,
    /// Spread the writes so that they end around this instant rather than
    /// in one burst (see `write`); `None` writes as fast as it can.
    pub spread_until: Option<Instant>,
}

/// Changes per chunk of a spread flush. A chunk costs Postgres a few
/// milliseconds of one core on the project's 2-core machine.
const SPREAD_CHUNK: usize = 64;
/// Most chunks per flush: each costs five more statements.
const MAX_CHUNKS: usize = 8;

/// What a flush found besides writing.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Changes that met another change under their (sku, location,
    /// version): not written, to be dead-lettered.
    pub forks: Vec<ChangeEvent>,
    /// Webhook deliveries queued.
    pub deliveries: u64,
}

impl FlushBatch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.extends.is_empty() && self.checkpoints.is_empty()
    }
}

/// Writes `batch` in the transaction `tx`, in chunks of changes in stream
/// order. With `spread_until`, each chunk waits for its share of the time
/// left: Postgres then works a few milliseconds at a time through the
/// batching window instead of one burst per tick, a burst that took a core
/// away from the request path for long enough to be the p99 at half load
/// (docs/benchmarks.md). A chunk behind its schedule does not wait, so a
/// flush that is slower than the window runs flat out. Every statement is
/// idempotent and order-safe (version guards, terminal states that never
/// revert, merged levels), so chunks of one transaction end like one
/// statement would.
pub(super) async fn write(
    tx: &mut PgConnection,
    batch: &FlushBatch,
) -> Result<FlushReport, sqlx::Error> {
    let started = Instant::now();
    let chunk_size = match batch.spread_until {
        Some(_) => SPREAD_CHUNK.max(batch.changes.len().div_ceil(MAX_CHUNKS)),
        None => batch.changes.len(),
    }
    .max(1);
    let chunks: Vec<&[ChangeEvent]> = batch.changes.chunks(chunk_size).collect();
    let mut report = FlushReport::default();
    let subscribed = crate::webhooks::any_subscription(tx, &batch.changes).await?;
    for (i, chunk) in chunks.iter().enumerate() {
        if let Some(until) = batch.spread_until
            && i > 0
        {
            let share = until
                .saturating_duration_since(started)
                .mul_f64(i as f64 / chunks.len() as f64);
            tokio::time::sleep_until((started + share).into()).await;
        }
        let forks = insert_ledger(tx, chunk).await?;
        let forked = |e: &&ChangeEvent| {
            forks
                .iter()
                .any(|f| f.partition == e.partition && f.entry_id == e.entry_id)
        };
        let kept: Vec<&ChangeEvent> = chunk.iter().filter(|e| !forked(e)).collect();
        upsert_stock(tx, &kept).await?;
        upsert_reservations(tx, &kept).await?;
        upsert_outcomes(tx, &kept).await?;
        if subscribed {
            report.deliveries += crate::webhooks::queue_transitions(tx, &kept).await?;
        }
        report.forks.extend(forks);
    }
    // After every change of the batch, as a reserve flushed in the same
    // batch as its extend must be.
    if !batch.extends.is_empty() {
        apply_extends(tx, &batch.extends).await?;
    }
    advance_checkpoints(tx, &batch.checkpoints).await?;
    Ok(report)
}

/// Inserts the ledger rows; returns the changes that are forks.
async fn insert_ledger(
    tx: &mut PgConnection,
    changes: &[ChangeEvent],
) -> Result<Vec<ChangeEvent>, sqlx::Error> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    // Every row new, the common case: copied, no fork possible.
    let mut rows = BinaryRows::new(12);
    for e in changes {
        rows.row()
            .text(&e.sku)
            .text(&e.location)
            .int8(e.version)
            .text(e.op.as_str())
            .int8(e.d_available)
            .int8(e.d_reserved)
            .int8(e.available)
            .int8(e.reserved)
            .text(&e.reference)
            .int4(e.partition as i32)
            .text(&e.entry_id.to_string())
            .timestamp_ms(e.ts_ms);
    }
    if copy_new_rows(
        tx,
        "COPY stock_ledger (sku, location, version, op, d_available, d_reserved, available,
                            reserved, ref, partition, entry_id, occurred_at)
         FROM STDIN (FORMAT BINARY)",
        rows,
    )
    .await?
    {
        return Ok(Vec::new());
    }
    let c = Columns::of(changes.iter());
    // Only the rows the insert skipped are looked up again (`collided`,
    // materialised so that the common case, where every row is new, costs
    // no second index probe per row). The lookup reads the table as it was
    // before this statement, so it sees exactly the rows this batch's rows
    // collided with; a collision with the very same change (a replayed
    // batch) is no fork.
    let rows = sqlx::query(
        "WITH incoming AS (
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                                  $6::bigint[], $7::bigint[], $8::bigint[], $9::text[],
                                  $10::integer[], $11::text[], $12::bigint[])
                 AS t(sku, location, version, op, d_available, d_reserved, available, reserved,
                      ref, partition, entry_id, ts)
         ), inserted AS (
             INSERT INTO stock_ledger (sku, location, version, op, d_available, d_reserved,
                                       available, reserved, ref, partition, entry_id, occurred_at)
             SELECT sku, location, version, op, d_available, d_reserved, available, reserved,
                    ref, partition, entry_id, to_timestamp(ts / 1000.0)
             FROM incoming
             ON CONFLICT (sku, location, version) DO NOTHING
             RETURNING sku, location, version
         ), collided AS MATERIALIZED (
             SELECT i.* FROM incoming i
             WHERE NOT EXISTS (SELECT 1 FROM inserted n
                               WHERE (n.sku, n.location, n.version) = (i.sku, i.location, i.version))
         )
         SELECT i.partition, i.entry_id
         FROM collided i
         JOIN stock_ledger l USING (sku, location, version)
         WHERE (l.op, l.d_available, l.d_reserved, l.available, l.reserved, l.ref)
               IS DISTINCT FROM
               (i.op, i.d_available, i.d_reserved, i.available, i.reserved, i.ref)",
    )
    .bind(&c.sku)
    .bind(&c.location)
    .bind(&c.version)
    .bind(&c.op)
    .bind(&c.d_available)
    .bind(&c.d_reserved)
    .bind(&c.available)
    .bind(&c.reserved)
    .bind(&c.reference)
    .bind(&c.partition)
    .bind(&c.entry_id)
    .bind(&c.ts)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let forked: Vec<(i32, String)> = rows
        .into_iter()
        .map(|r| (r.get("partition"), r.get("entry_id")))
        .collect();
    let forks: Vec<ChangeEvent> = changes
        .iter()
        .filter(|e| {
            forked
                .iter()
                .any(|(p, id)| *p as u32 == e.partition && *id == e.entry_id.to_string())
        })
        .cloned()
        .collect();
    let f = Columns::of(forks.iter());
    sqlx::query(
        "INSERT INTO ledger_forks (sku, location, version, op, d_available, d_reserved,
                                   available, reserved, ref, partition, entry_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                              $6::bigint[], $7::bigint[], $8::bigint[], $9::text[],
                              $10::integer[], $11::text[])
         ON CONFLICT (partition, entry_id) DO NOTHING",
    )
    .bind(&f.sku)
    .bind(&f.location)
    .bind(&f.version)
    .bind(&f.op)
    .bind(&f.d_available)
    .bind(&f.d_reserved)
    .bind(&f.available)
    .bind(&f.reserved)
    .bind(&f.reference)
    .bind(&f.partition)
    .bind(&f.entry_id)
    .execute(&mut *tx)
    .await?;
    Ok(forks)
}

/// The newest state per item (an upsert may not touch a row twice).
async fn upsert_stock(tx: &mut PgConnection, changes: &[&ChangeEvent]) -> Result<(), sqlx::Error> {
    let mut latest: HashMap<(&str, &str), &ChangeEvent> = HashMap::new();
    for e in changes {
        let slot = latest
            .entry((e.sku.as_str(), e.location.as_str()))
            .or_insert(e);
        if e.version > slot.version {
            *slot = e;
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let state = Columns::of(latest.into_values());
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
    Ok(())
}

/// What a batch says about one reservation in one partition.
#[derive(Default)]
struct ReservationSeen<'a> {
    state: Option<&'static str>,
    lines: Vec<(&'a str, &'a str, i64)>,
    expires_at_ms: Option<i64>,
    fingerprint: Option<&'a str>,
    reserve_levels: Vec<serde_json::Value>,
    finish_levels: Vec<serde_json::Value>,
}

impl ReservationSeen<'_> {
    /// `lines`, `reserve_levels` and `finish_levels` as JSON text, the same
    /// for the copy and for the upsert.
    fn json_columns(&self) -> [String; 3] {
        [
            serde_json::to_string(&self.lines),
            serde_json::to_string(&self.reserve_levels),
            serde_json::to_string(&self.finish_levels),
        ]
        .map(|text| text.expect("plain values serialise"))
    }
}

async fn upsert_reservations(
    tx: &mut PgConnection,
    changes: &[&ChangeEvent],
) -> Result<(), sqlx::Error> {
    // In stream order: a later event's state wins; every event of a
    // reservation names one of its lines (|d_resv| is the quantity).
    let mut order: Vec<(&str, u32)> = Vec::new();
    let mut seen: HashMap<(&str, u32), ReservationSeen> = HashMap::new();
    for e in changes {
        let Some(state) = e.op.reservation_state() else {
            continue;
        };
        let key = (e.reference.as_str(), e.partition);
        let row = seen.entry(key).or_insert_with(|| {
            order.push(key);
            ReservationSeen::default()
        });
        // Terminal states never revert (the same rule as the SQL upsert).
        if row.state.is_none_or(|s| s == "held") {
            row.state = Some(state);
        }
        let line = (e.sku.as_str(), e.location.as_str(), e.d_reserved.abs());
        if !row.lines.contains(&line) {
            row.lines.push(line);
        }
        let level = json!([e.sku, e.location, e.available, e.reserved, e.version]);
        if e.op == Op::Reserve {
            row.expires_at_ms = e.expires_at_ms.or(row.expires_at_ms);
            row.fingerprint = e.fingerprint.as_deref().or(row.fingerprint);
            row.reserve_levels.push(level);
        } else {
            row.finish_levels.push(level);
        }
    }
    // A reservation whose reserve is in this batch is new, unless the batch
    // is replayed or an extend flushed first: copied when all are new.
    let (made, seen_before): (Vec<_>, Vec<_>) = order
        .into_iter()
        .partition(|key| !seen[key].reserve_levels.is_empty());
    if !copy_reservations(tx, &made, &seen).await? {
        upsert_reservation_rows(tx, &made, &seen).await?;
    }
    upsert_reservation_rows(tx, &seen_before, &seen).await?;
    Ok(())
}

/// The rows the upsert below would insert, copied (see `copy`): `Ok(false)`
/// when one existed already and nothing was written.
async fn copy_reservations(
    tx: &mut PgConnection,
    order: &[(&str, u32)],
    seen: &HashMap<(&str, u32), ReservationSeen<'_>>,
) -> Result<bool, sqlx::Error> {
    let mut rows = BinaryRows::new(8);
    for key in order {
        let row = &seen[key];
        let [lines, reserve_levels, finish_levels] = row.json_columns();
        rows.row()
            .text(key.0)
            .int4(key.1 as i32)
            .text(row.state.unwrap_or("held"))
            .jsonb(&lines)
            .opt_timestamp_ms(row.expires_at_ms)
            .opt_text(row.fingerprint)
            .jsonb(&reserve_levels)
            .jsonb(&finish_levels);
    }
    // `updated_at` takes its default, now(), as in the upsert.
    copy_new_rows(
        tx,
        "COPY reservations (reservation_id, partition, state, lines, expires_at, fingerprint,
                            reserve_levels, finish_levels)
         FROM STDIN (FORMAT BINARY)",
        rows,
    )
    .await
}

async fn upsert_reservation_rows(
    tx: &mut PgConnection,
    order: &[(&str, u32)],
    seen: &HashMap<(&str, u32), ReservationSeen<'_>>,
) -> Result<(), sqlx::Error> {
    if order.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut partitions = Vec::new();
    let mut states = Vec::new();
    let mut lines = Vec::new();
    let mut expiries = Vec::new();
    let mut fingerprints = Vec::new();
    let mut reserve_levels = Vec::new();
    let mut finish_levels = Vec::new();
    for key in order {
        let row = &seen[key];
        ids.push(key.0);
        partitions.push(key.1 as i32);
        states.push(row.state.unwrap_or("held"));
        let [row_lines, row_reserve_levels, row_finish_levels] = row.json_columns();
        lines.push(row_lines);
        expiries.push(row.expires_at_ms);
        fingerprints.push(row.fingerprint);
        reserve_levels.push(row_reserve_levels);
        finish_levels.push(row_finish_levels);
    }
    // The reserve's expiry only fills a missing one: an extend flushed
    // before it (by another instance) already set the newer one.
    sqlx::query(
        "INSERT INTO reservations AS r (reservation_id, partition, state, lines, expires_at,
                                        fingerprint, reserve_levels, finish_levels, updated_at)
         SELECT id, partition, state, lines::jsonb,
                CASE WHEN exp IS NULL THEN NULL ELSE to_timestamp(exp / 1000.0) END,
                fp, reserve_levels::jsonb, finish_levels::jsonb, now()
         FROM UNNEST($1::text[], $2::integer[], $3::text[], $4::text[], $5::bigint[],
                     $6::text[], $7::text[], $8::text[])
              AS t(id, partition, state, lines, exp, fp, reserve_levels, finish_levels)
         ON CONFLICT (reservation_id, partition) DO UPDATE
            SET state = CASE WHEN r.state = 'held' AND EXCLUDED.state <> 'held'
                             THEN EXCLUDED.state ELSE r.state END,
                lines = (SELECT jsonb_agg(DISTINCT l)
                           FROM jsonb_array_elements(r.lines || EXCLUDED.lines) AS l),
                expires_at = COALESCE(r.expires_at, EXCLUDED.expires_at),
                fingerprint = COALESCE(r.fingerprint, EXCLUDED.fingerprint),
                reserve_levels = CASE WHEN jsonb_array_length(EXCLUDED.reserve_levels) > 0
                                      THEN (SELECT jsonb_agg(DISTINCT l) FROM jsonb_array_elements(
                                                r.reserve_levels || EXCLUDED.reserve_levels) AS l)
                                      ELSE r.reserve_levels END,
                finish_levels = CASE WHEN jsonb_array_length(EXCLUDED.finish_levels) > 0
                                     THEN (SELECT jsonb_agg(DISTINCT l) FROM jsonb_array_elements(
                                               r.finish_levels || EXCLUDED.finish_levels) AS l)
                                     ELSE r.finish_levels END,
                updated_at = now()",
    )
    .bind(&ids)
    .bind(&partitions)
    .bind(&states)
    .bind(&lines)
    .bind(&expiries)
    .bind(&fingerprints)
    .bind(&reserve_levels)
    .bind(&finish_levels)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The new expiry of extended reservations (a row is made when the
/// reserve has not been flushed yet; its own upsert then fills the rest).
async fn apply_extends(tx: &mut PgConnection, extends: &[ExtendRecord]) -> Result<(), sqlx::Error> {
    // One row per (reservation, partition): the last extend of the batch.
    let mut last: HashMap<(&str, u32), &ExtendRecord> = HashMap::new();
    for x in extends {
        last.insert((x.reservation_id.as_str(), x.partition), x);
    }
    let ids: Vec<&str> = last.keys().map(|k| k.0).collect();
    let partitions: Vec<i32> = last.keys().map(|k| k.1 as i32).collect();
    let expiries: Vec<i64> = last.values().map(|x| x.expires_at_ms).collect();
    let fps: Vec<&str> = last.values().map(|x| x.fingerprint.as_str()).collect();
    sqlx::query(
        "INSERT INTO reservations AS r (reservation_id, partition, state, lines, expires_at,
                                        fingerprint, updated_at)
         SELECT id, partition, 'held', '[]'::jsonb, to_timestamp(exp / 1000.0), fp, now()
         FROM UNNEST($1::text[], $2::integer[], $3::bigint[], $4::text[])
              AS t(id, partition, exp, fp)
         ON CONFLICT (reservation_id, partition) DO UPDATE
            SET expires_at = EXCLUDED.expires_at,
                fingerprint = COALESCE(r.fingerprint, EXCLUDED.fingerprint),
                updated_at = now()",
    )
    .bind(&ids)
    .bind(&partitions)
    .bind(&expiries)
    .bind(&fps)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Outcomes of decrements, adjusts and sets, per (request, partition).
async fn upsert_outcomes(
    tx: &mut PgConnection,
    changes: &[&ChangeEvent],
) -> Result<(), sqlx::Error> {
    let mut order: Vec<(&str, u32)> = Vec::new();
    let mut seen: HashMap<(&str, u32), (&str, &'static str, Vec<serde_json::Value>)> =
        HashMap::new();
    for e in changes {
        // A decrement spanning partitions on a cluster is an internal hold
        // committed at once: its commit events are the decrement's outcome.
        let (request_id, op) = match (e.op, crate::engine::decrement_of_internal(&e.reference)) {
            (Op::Commit, Some(request_id)) => (request_id, "decrement"),
            _ if e.op.reservation_state().is_some() => continue,
            _ => (e.reference.as_str(), e.op.as_str()),
        };
        // Reconcile repairs write `set` events without a request behind them.
        let Some(fp) = e.fingerprint.as_deref() else {
            continue;
        };
        let key = (request_id, e.partition);
        let row = seen.entry(key).or_insert_with(|| {
            order.push(key);
            (fp, op, Vec::new())
        });
        row.2.push(json!([
            e.sku,
            e.location,
            e.available,
            e.reserved,
            e.version
        ]));
    }
    if order.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut partitions = Vec::new();
    let mut fps = Vec::new();
    let mut ops = Vec::new();
    let mut levels = Vec::new();
    for key in order {
        let (fp, op, l) = &seen[&key];
        ids.push(key.0);
        partitions.push(key.1 as i32);
        fps.push(*fp);
        ops.push(*op);
        levels.push(serde_json::Value::from(l.clone()).to_string());
    }
    sqlx::query(
        "INSERT INTO request_outcomes AS o (request_id, partition, fingerprint, op, levels)
         SELECT id, partition, fp, op, levels::jsonb
         FROM UNNEST($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[])
              AS t(id, partition, fp, op, levels)
         ON CONFLICT (request_id, partition) DO UPDATE
            SET levels = (SELECT jsonb_agg(DISTINCT l)
                            FROM jsonb_array_elements(o.levels || EXCLUDED.levels) AS l)",
    )
    .bind(&ids)
    .bind(&partitions)
    .bind(&fps)
    .bind(&ops)
    .bind(&levels)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn advance_checkpoints(
    tx: &mut PgConnection,
    checkpoints: &[(u32, EntryId)],
) -> Result<(), sqlx::Error> {
    if checkpoints.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = checkpoints.iter().map(|(p, _)| *p as i32).collect();
    let ids: Vec<String> = checkpoints.iter().map(|(_, id)| id.to_string()).collect();
    sqlx::query(
        "INSERT INTO flush_checkpoint AS c (partition, last_entry_id, flushed_at)
         SELECT partition, id, now() FROM UNNEST($1::integer[], $2::text[]) AS t(partition, id)
         ON CONFLICT (partition) DO UPDATE
            SET last_entry_id = EXCLUDED.last_entry_id, flushed_at = now()
          WHERE (split_part(c.last_entry_id, '-', 1)::numeric,
                 split_part(c.last_entry_id, '-', 2)::numeric)
              < (split_part(EXCLUDED.last_entry_id, '-', 1)::numeric,
                 split_part(EXCLUDED.last_entry_id, '-', 2)::numeric)",
    )
    .bind(&partitions)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    // Delivered to every instance at the commit (see checkpoint_feed).
    for payload in crate::checkpoint_feed::payloads(checkpoints) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::checkpoint_feed::CHANNEL)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
    }
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
    partition: Vec<i32>,
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
            c.partition.push(e.partition as i32);
            c.entry_id.push(e.entry_id.to_string());
            c.ts.push(e.ts_ms);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::PgPool;

    use super::*;

    /// 150 changes of one item, in stream order: the reserve and then the
    /// commit of 75 reservations (3 chunks when spread), and an extend of
    /// the last reservation.
    fn lifecycle() -> FlushBatch {
        let mut changes = Vec::new();
        let (mut available, mut reserved) = (1000, 0);
        for i in 0..150u64 {
            let (op, d_available, d_reserved) = if i % 2 == 0 {
                (Op::Reserve, -1, 1)
            } else {
                (Op::Commit, 0, -1)
            };
            available += d_available;
            reserved += d_reserved;
            changes.push(ChangeEvent {
                entry_id: EntryId {
                    ms: 1000 + i,
                    seq: 0,
                },
                partition: 3,
                sku: "sku-1".into(),
                location: "default".into(),
                op,
                d_available,
                d_reserved,
                available,
                reserved,
                version: i as i64 + 2,
                reference: format!("r{}", i / 2),
                ts_ms: 1_700_000_000_000,
                expires_at_ms: (op == Op::Reserve).then_some(1_800_000_000_000),
                fingerprint: Some(format!("fp{}", i / 2)),
            });
        }
        FlushBatch {
            changes,
            extends: vec![ExtendRecord {
                entry_id: EntryId { ms: 1150, seq: 0 },
                partition: 3,
                reservation_id: "r74".into(),
                fingerprint: "fp74".into(),
                expires_at_ms: 1_900_000_000_000,
                ts_ms: 1_700_000_000_000,
            }],
            checkpoints: vec![(3, EntryId { ms: 1150, seq: 0 })],
            spread_until: None,
        }
    }

    /// What the batch left in Postgres, as text to compare.
    async fn tables(pool: &PgPool) -> Vec<String> {
        let mut out: Vec<String> = sqlx::query_scalar(
            "SELECT format('stock %s %s %s %s', sku, available, reserved, version) FROM stock
             UNION ALL
             SELECT format('ledger %s %s %s %s %s', version, op, d_available, d_reserved, ref)
               FROM stock_ledger
             UNION ALL
             SELECT format('reservation %s %s %s %s %s', reservation_id, state, lines,
                           (extract(epoch FROM expires_at) * 1000)::bigint, reserve_levels)
               FROM reservations
             UNION ALL
             SELECT format('checkpoint %s %s', partition, last_entry_id) FROM flush_checkpoint",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        out.sort();
        out
    }

    async fn write_in_one_transaction(pool: &PgPool, batch: &FlushBatch) -> FlushReport {
        let mut tx = pool.begin().await.unwrap();
        let report = write(&mut tx, batch).await.unwrap();
        tx.commit().await.unwrap();
        report
    }

    #[sqlx::test]
    async fn a_batch_spread_in_chunks_ends_like_one_written_at_once(pool: PgPool) {
        let at_once = lifecycle();
        let report = write_in_one_transaction(&pool, &at_once).await;
        assert!(report.forks.is_empty());
        let expected = tables(&pool).await;
        assert_eq!(expected.len(), 1 + 150 + 75 + 1, "{expected:#?}");
        assert!(expected.contains(&"stock sku-1 925 0 151".to_owned()));
        assert!(
            expected
                .iter()
                .filter(|row| row.starts_with("reservation"))
                .all(|row| row.contains(" committed ")),
            "{expected:#?}"
        );
        assert!(
            expected
                .iter()
                .any(|row| row.starts_with("reservation r74 ") && row.contains("1900000000000")),
            "the extend comes after the reserve it extends: {expected:#?}"
        );

        // The same batch again, spread: a replay changes nothing, whether
        // written in one statement or in chunks.
        let mut spread = lifecycle();
        spread.spread_until = Some(Instant::now() + Duration::from_millis(30));
        let report = write_in_one_transaction(&pool, &spread).await;
        assert!(report.forks.is_empty());
        assert_eq!(tables(&pool).await, expected);

        // Spread into an empty database: the same rows as at once.
        sqlx::query(
            "TRUNCATE stock, stock_ledger, reservations, flush_checkpoint, request_outcomes",
        )
        .execute(&pool)
        .await
        .unwrap();
        write_in_one_transaction(&pool, &spread).await;
        assert_eq!(tables(&pool).await, expected);

        // Through the idempotent statements rather than `COPY`: the batch's
        // last change (a commit of r74) flushed first makes a ledger row and
        // a reservation row exist, so neither copy can be used. The same rows.
        sqlx::query(
            "TRUNCATE stock, stock_ledger, reservations, flush_checkpoint, request_outcomes",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut last = lifecycle();
        last.changes.drain(..149);
        last.extends.clear();
        write_in_one_transaction(&pool, &last).await;
        let report = write_in_one_transaction(&pool, &lifecycle()).await;
        assert!(report.forks.is_empty());
        assert_eq!(tables(&pool).await, expected);
    }

    #[sqlx::test]
    async fn a_fork_in_a_later_chunk_is_reported_and_left_out(pool: PgPool) {
        write_in_one_transaction(&pool, &lifecycle()).await;
        // Version 140 again, as another change: a Redis that gave out a
        // version Postgres had.
        let mut batch = lifecycle();
        batch.changes[138].reference = "another".into();
        batch.spread_until = Some(Instant::now() + Duration::from_millis(10));
        let report = write_in_one_transaction(&pool, &batch).await;
        assert_eq!(
            report
                .forks
                .iter()
                .map(|f| (f.version, f.reference.as_str()))
                .collect::<Vec<_>>(),
            vec![(140, "another")]
        );
    }
}
