//! Transition detection: the change events of a flush → the
//! `webhook_deliveries` outbox, in the flusher's own transaction.
//!
//! Detection needs nothing but the events and the subscriptions, so it runs
//! where the events are written to Postgres anyway: one more statement in
//! the flusher's transaction, no consumer group, no commit of its own. A
//! batch replayed after a crash inserts nothing new (unique key per
//! subscription and transition). Matching is against the subscriptions as
//! they are when the batch is flushed.

use sqlx::PgConnection;

use crate::events::ChangeEvent;

/// Whether `events` may queue a delivery at all: one of them moved
/// `available` and some subscription exists. Most deployments have none:
/// one look at the (small) table costs a round trip, while matching decodes
/// eleven arrays of the whole batch and was about a tenth of a flush's
/// time in Postgres.
pub(crate) async fn any_subscription(
    tx: &mut PgConnection,
    events: &[ChangeEvent],
) -> Result<bool, sqlx::Error> {
    if !events.iter().any(|e| e.d_available != 0) {
        return Ok(false);
    }
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_subscriptions)")
        .fetch_one(&mut *tx)
        .await
}

/// Queues the deliveries of every transition in `events` for every
/// subscription that wants it, in one statement; returns how many.
pub(crate) async fn queue_transitions(
    tx: &mut PgConnection,
    events: &[&ChangeEvent],
) -> Result<u64, sqlx::Error> {
    let mut c = Candidates::default();
    for e in events.iter().filter(|e| e.d_available != 0) {
        c.push(e);
    }
    if c.sku.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(QUEUE_SQL)
        .bind(&c.sku)
        .bind(&c.location)
        .bind(&c.version)
        .bind(&c.previous)
        .bind(&c.available)
        .bind(&c.reserved)
        .bind(&c.op)
        .bind(&c.reference)
        .bind(&c.entry_id)
        .bind(&c.ts)
        .bind(&c.partition)
        .execute(&mut *tx)
        .await?
        .rows_affected())
}

/// One statement per batch: every (event, subscription, kind) that fired,
/// with its payload, in version order; an existing (subscription, item,
/// version, kind) is left alone.
const QUEUE_SQL: &str = "
INSERT INTO webhook_deliveries (subscription_id, sku, location, version, kind, idempotency_key, payload)
SELECT s.id, e.sku, e.location, e.version, k.kind,
       format('%s/%s/%s/%s/%s', e.sku, e.location, e.version, k.kind, s.id),
       jsonb_build_object(
           'id', format('%s/%s/%s/%s/%s', e.sku, e.location, e.version, k.kind, s.id),
           'type', k.kind,
           'subscription_id', s.id,
           'sku', e.sku,
           'location', e.location,
           'available', e.available,
           'previous_available', e.previous,
           'reserved', e.reserved,
           'version', e.version,
           'low_stock_threshold', s.low_stock_threshold,
           'op', e.op,
           'reference', e.ref,
           'event_id', e.entry_id,
           'partition', e.partition,
           'occurred_at_ms', e.ts)
FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[])
     AS e(sku, location, version, previous, available, reserved, op, ref, entry_id, ts, partition)
JOIN webhook_subscriptions s ON s.skus IS NULL OR e.sku = ANY (s.skus)
CROSS JOIN LATERAL (VALUES
    ('out_of_stock', e.previous > 0 AND e.available = 0),
    -- The event that creates an item (version 1) is no transition.
    ('back_in_stock', e.previous = 0 AND e.available > 0 AND e.version > 1),
    ('low_stock', s.low_stock_threshold IS NOT NULL
                  AND e.previous >= s.low_stock_threshold
                  AND e.available < s.low_stock_threshold)
) AS k(kind, fired)
WHERE k.fired AND k.kind = ANY (s.events)
ORDER BY s.id, e.sku, e.location, e.version, k.kind
ON CONFLICT (subscription_id, sku, location, version, kind) DO NOTHING";

/// Events whose `available` moved, as column arrays for `UNNEST`.
#[derive(Default)]
struct Candidates {
    sku: Vec<String>,
    location: Vec<String>,
    version: Vec<i64>,
    previous: Vec<i64>,
    available: Vec<i64>,
    reserved: Vec<i64>,
    op: Vec<&'static str>,
    reference: Vec<String>,
    entry_id: Vec<String>,
    ts: Vec<i64>,
    partition: Vec<i64>,
}

impl Candidates {
    fn push(&mut self, e: &ChangeEvent) {
        self.sku.push(e.sku.clone());
        self.location.push(e.location.clone());
        self.version.push(e.version);
        self.previous.push(e.available - e.d_available);
        self.available.push(e.available);
        self.reserved.push(e.reserved);
        self.op.push(e.op.as_str());
        self.reference.push(e.reference.clone());
        self.entry_id.push(e.entry_id.to_string());
        self.ts.push(e.ts_ms);
        self.partition.push(i64::from(e.partition));
    }
}
