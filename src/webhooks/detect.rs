//! The transition detector: partition streams → the `webhook_deliveries`
//! outbox, through the consumer group `webhooks`.
//!
//! Like the flusher (the same `consumer::GroupReader`, its own group): per
//! partition a loop that first replays this consumer's pending entries, then
//! claims entries idle past the claim timeout from silent consumers, then
//! reads new ones. A
//! batch's deliveries are written in ONE statement, and the entries are
//! acknowledged only after it committed; a replay after a crash in between
//! inserts nothing new (unique key per subscription and transition).

use std::time::Instant;

use metrics::counter;
use redis::aio::ConnectionManager;
use redis::streams::StreamId;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Backoff, Wakeup, WebhookError, WebhookSettings};
use crate::consumer::GroupReader;
pub use crate::consumer::Source;
use crate::events::ChangeEvent;
use crate::keys::{Keyspace, Partition};

/// The detector's consumer group on every partition stream.
pub const GROUP: &str = "webhooks";

/// What one `detect_once` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DetectOutcome {
    /// Stream entries read and acknowledged.
    pub entries: usize,
    /// Deliveries queued (one per subscription and transition).
    pub queued: u64,
}

#[derive(Clone)]
pub struct Detector {
    reader: GroupReader,
    pool: PgPool,
    keys: Keyspace,
    settings: WebhookSettings,
    wakeup: Wakeup,
}

impl Detector {
    pub fn new(
        redis: ConnectionManager,
        blocking: deadpool_redis::Pool,
        pool: PgPool,
        keys: Keyspace,
        settings: WebhookSettings,
        wakeup: Wakeup,
    ) -> Self {
        let reader = GroupReader::new(
            redis,
            blocking,
            keys.clone(),
            GROUP,
            settings.consumer.clone(),
            settings.batch_size,
            settings.read_block,
            settings.claim_idle,
        );
        Self {
            reader,
            pool,
            keys,
            settings,
            wakeup,
        }
    }

    /// Creates the group where missing, at the END of each stream: a new
    /// deployment's subscriptions hear of changes from now on, not of the
    /// retained history.
    pub async fn ensure_groups(&self) -> Result<(), WebhookError> {
        self.create_groups("$").await
    }

    async fn create_groups(&self, start: &str) -> Result<(), WebhookError> {
        self.reader.ensure_groups(start).await
    }

    /// Reads one batch of `partition` from `source`, queues its
    /// transitions' deliveries and acknowledges it.
    pub async fn detect_once(
        &self,
        partition: Partition,
        source: Source,
    ) -> Result<DetectOutcome, WebhookError> {
        let entries = self.reader.read(partition, source, &mut None).await?;
        if entries.is_empty() {
            return Ok(DetectOutcome::default());
        }
        let queued = self.queue(partition, &entries).await?;
        self.ack(partition, &entries).await?;
        Ok(DetectOutcome {
            entries: entries.len(),
            queued,
        })
    }

    /// Every partition until nothing is left to read. For tests and tools.
    pub async fn drain(&self) -> Result<DetectOutcome, WebhookError> {
        let mut total = DetectOutcome::default();
        for p in self.keys.partitions() {
            for source in [Source::OwnPending, Source::Claimed, Source::New] {
                loop {
                    let outcome = self.detect_once(p, source).await?;
                    total.entries += outcome.entries;
                    total.queued += outcome.queued;
                    if outcome.entries == 0 {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }

    /// One loop per partition until `shutdown`; each finishes the batch in
    /// hand (queue and XACK) before it stops.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(err) = self.ensure_groups().await {
            tracing::error!(error = %err, "cannot create the webhook detector's consumer groups; retrying in the loops");
        }
        let loops: Vec<_> = self
            .keys
            .partitions()
            .map(|p| tokio::spawn(self.clone().run_partition(p, shutdown.clone())))
            .collect();
        for handle in loops {
            if let Err(err) = handle.await {
                tracing::error!(error = %err, "webhook detector loop panicked");
            }
        }
        tracing::debug!("webhook detector stopped");
    }

    async fn run_partition(self, partition: Partition, shutdown: CancellationToken) {
        let mut source = Source::OwnPending;
        let mut last_claim = Instant::now();
        let mut backoff = Backoff::default();
        let mut blocking = None;
        while !shutdown.is_cancelled() {
            if source == Source::New && last_claim.elapsed() >= self.settings.claim_idle {
                source = Source::Claimed;
            }
            let entries = match self.reader.read(partition, source, &mut blocking).await {
                Ok(entries) => entries,
                Err(err) if err.is_missing_group() => {
                    // The stream was lost (Redis data loss) and made again:
                    // everything in the new one is new.
                    tracing::warn!(%partition, "webhook consumer group missing; creating it again");
                    if let Err(err) = self.create_groups("0").await {
                        tracing::warn!(error = %err, "creating the webhook consumer groups failed");
                    }
                    backoff.wait(&shutdown).await;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%partition, error = %err, "webhook detector: reading the stream failed; backing off");
                    backoff.wait(&shutdown).await;
                    continue;
                }
            };
            if entries.is_empty() {
                if source == Source::Claimed {
                    last_claim = Instant::now();
                }
                source = source.after_empty();
                continue;
            }
            // The batch in hand is finished even when shutdown comes
            // meanwhile, unless Postgres or Redis keep failing.
            loop {
                match self.queue(partition, &entries).await {
                    Ok(_) => break,
                    Err(err) => {
                        tracing::warn!(%partition, entries = entries.len(), error = %err,
                            "webhook detector: queueing deliveries failed; retrying with backoff");
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                    }
                }
            }
            while let Err(err) = self.ack(partition, &entries).await {
                tracing::warn!(%partition, error = %err, "webhook detector: XACK failed; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
            backoff.reset();
        }
    }

    /// Inserts the deliveries of every transition in `entries` for every
    /// subscription that wants it, in one statement. Entries that do not
    /// parse are skipped (the flusher dead-letters them).
    async fn queue(&self, partition: Partition, entries: &[StreamId]) -> Result<u64, WebhookError> {
        let mut c = Candidates::default();
        for entry in entries {
            let Ok(e) = ChangeEvent::parse(partition.0, &entry.id, &entry.map) else {
                continue;
            };
            if e.d_available == 0 {
                continue; // a commit: available did not move
            }
            c.push(&e);
        }
        if c.sku.is_empty() {
            return Ok(0);
        }
        let inserted = sqlx::query(QUEUE_SQL)
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
            .bind(partition.0 as i64)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if inserted > 0 {
            counter!("stockd_webhook_deliveries_queued_total").increment(inserted);
            self.wakeup.wake();
        }
        Ok(inserted)
    }

    async fn ack(&self, partition: Partition, entries: &[StreamId]) -> Result<(), WebhookError> {
        self.reader
            .ack(partition, entries.iter().map(|e| e.id.as_str()))
            .await
    }
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
           'partition', $11::bigint,
           'occurred_at_ms', e.ts)
FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::bigint[])
     AS e(sku, location, version, previous, available, reserved, op, ref, entry_id, ts)
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
        self.entry_id.push(e.entry_id.clone());
        self.ts.push(e.ts_ms);
    }
}
