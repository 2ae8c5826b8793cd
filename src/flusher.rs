//! The write-behind flusher: partition streams → Postgres.
//!
//! Every stockd instance is a consumer of the group `flusher` on every
//! partition stream ([`crate::consumer`] owns the loop: own pending entries
//! first, then claims from dead consumers, then new entries, batched by
//! time). Each batch, whatever partitions it spans, is written in ONE
//! Postgres transaction ([`Store::write_batch`]: ledger, stock, reservations,
//! request outcomes, webhook deliveries, checkpoints) and acknowledged only
//! after the commit: a crash in between replays the batch, which the
//! idempotent writes make harmless.
//!
//! After the commit the flusher also moves each partition marker's flushed
//! id forward (so that a Redis that rolls back to before it is noticed by
//! the very next script), dead-letters entries that can never be written
//! (malformed ones, and forks: changes that met another change under the
//! same version in the ledger) to `NS:{pNN}:dead` with the reason, and wakes
//! the webhook dispatcher when it queued deliveries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Batch, Consumer, ConsumerSettings, GroupStart, Handler, StepError};
use crate::events::{ChangeEvent, StreamEntry};
use crate::keys::{Keyspace, Partition};
use crate::markers::Markers;
use crate::redis_conn::{CommandBatch, RedisConn};
use crate::store::{FlushBatch, Store};
use crate::webhooks::Wakeup;

/// The consumer group every instance joins on every partition stream.
pub const GROUP: &str = "flusher";

/// The share of the batching window a batch's Postgres writes are spread
/// over (store::batch, `write`): the entries of one window are written
/// through the next, leaving time for the commit, the marker and the ack
/// before the next read.
const SPREAD_SHARE: f64 = 0.6;

#[derive(Debug, Clone)]
pub struct FlusherSettings {
    /// This instance's consumer name; stable across restarts so that a
    /// restarted instance replays its own pending entries.
    pub consumer: String,
    /// Most entries per partition in one batch.
    pub batch_size: usize,
    /// The batching window.
    pub interval: Duration,
    /// Entries pending this long with another consumer are taken over.
    pub claim_idle: Duration,
    /// Consumers that own nothing and were idle this long are removed.
    pub remove_idle: Duration,
}

/// The flusher of one instance: a consumer of the `flusher` group.
#[derive(Clone)]
pub struct Flusher {
    consumer: Arc<Consumer<FlushHandler>>,
}

impl Flusher {
    pub fn new(
        redis: RedisConn,
        store: Store,
        keys: Keyspace,
        markers: Markers,
        wakeup: Wakeup,
        settings: FlusherSettings,
    ) -> Self {
        let handler = FlushHandler {
            redis: redis.clone(),
            spread: settings.interval.mul_f64(SPREAD_SHARE),
            store,
            keys: keys.clone(),
            markers,
            wakeup,
        };
        let consumer = Consumer::new(
            redis,
            keys,
            ConsumerSettings {
                group: GROUP,
                // Events written before the first flusher ran are flushed too.
                start: GroupStart::Beginning,
                consumer: settings.consumer,
                batch_size: settings.batch_size,
                interval: settings.interval,
                claim_idle: settings.claim_idle,
                remove_idle: settings.remove_idle,
            },
            handler,
        );
        Self {
            consumer: Arc::new(consumer),
        }
    }

    /// Creates the consumer group on every partition stream where missing.
    pub async fn ensure_groups(&self) -> Result<(), StepError> {
        self.consumer.ensure_groups(false).await
    }

    /// Flushes everything the streams hold for this instance: its pending
    /// entries, claimable ones, and new ones. For tests and tools.
    pub async fn drain(&self) -> Result<usize, StepError> {
        self.consumer.drain().await
    }

    /// Flushes until `shutdown`, finishing the batch in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        self.consumer.run(shutdown).await
    }
}

/// An entry to dead-letter: its partition, id, why, and its fields.
type DeadLetter = (Partition, String, String, Vec<(String, String)>);

struct FlushHandler {
    redis: RedisConn,
    /// How long a batch's writes are spread over (`SPREAD_SHARE` of the
    /// batching window).
    spread: Duration,
    store: Store,
    keys: Keyspace,
    markers: Markers,
    wakeup: Wakeup,
}

impl Handler for FlushHandler {
    async fn hold(&self) -> Option<tokio::sync::OwnedRwLockReadGuard<()>> {
        Some(self.markers.flush_in_progress().await)
    }

    async fn handle(&self, batch: &Batch) -> Result<(), StepError> {
        let mut flush = FlushBatch::default();
        let mut dead: Vec<DeadLetter> = Vec::new();
        for entry in &batch.entries {
            match &entry.parsed {
                Ok(StreamEntry::Change(change)) => flush.changes.push(change.clone()),
                Ok(StreamEntry::Extend(extend)) => flush.extends.push(extend.clone()),
                Err(malformed) => dead.push((
                    entry.partition,
                    entry.id.to_string(),
                    malformed.reason.clone(),
                    malformed
                        .fields
                        .chunks_exact(2)
                        .map(|pair| (value_text(&pair[0]), value_text(&pair[1])))
                        .collect(),
                )),
            }
        }
        let checkpoints = batch.newest_per_partition();
        flush.checkpoints = checkpoints.iter().map(|(p, id)| (p.0, *id)).collect();

        let started = Instant::now();
        // Spread only a batch that holds all there was: one that leaves
        // entries waiting is written flat out, or pacing would cap the
        // flusher's throughput below a steady load (`hot`'s one partition).
        flush.spread_until = (!batch.behind).then(|| started + self.spread);
        let report = self.store.write_batch(&flush).await?;
        histogram!("stockd_flush_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        histogram!("stockd_flush_batch_size").record(flush.changes.len() as f64);
        counter!("stockd_flush_batches_total").increment(1);
        counter!("stockd_flushed_events_total")
            .increment((flush.changes.len() - report.forks.len()) as u64);
        crate::failpoint::hit("crash-after-commit");

        for fork in &report.forks {
            counter!("stockd_ledger_forks_total").increment(1);
            self.markers.report_rollback(Partition(fork.partition));
            tracing::error!(partition = fork.partition, entry = %fork.entry_id, sku = %fork.sku,
                location = %fork.location, version = fork.version, reference = %fork.reference,
                "ledger fork: this change met another change under the same version in Postgres; \
                 dead-lettered, recorded in ledger_forks (Redis gave out a version Postgres had: \
                 a rollback noticed too late)");
            dead.push((
                Partition(fork.partition),
                fork.entry_id.to_string(),
                format!(
                    "fork: version {} of {}/{} is another change in the ledger",
                    fork.version, fork.location, fork.sku
                ),
                fork_fields(fork),
            ));
        }
        self.dead_letter(&dead).await?;
        self.markers
            .mark_flushed(&mut self.redis.clone(), &checkpoints)
            .await?;
        if report.deliveries > 0 {
            counter!("stockd_webhook_deliveries_queued_total").increment(report.deliveries);
            self.wakeup.wake();
        }
        Ok(())
    }
}

impl FlushHandler {
    /// Copies entries that can never be written to `NS:{pNN}:dead` with the
    /// reason and their fields (`f.<name>`); the consumer loop then
    /// acknowledges them with the rest of the batch.
    async fn dead_letter(&self, dead: &[DeadLetter]) -> Result<(), StepError> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut batch = CommandBatch::new();
        for (partition, id, reason, fields) in dead {
            tracing::error!(%partition, entry = %id, %reason, "dead-lettering an entry that can never be written");
            let stream = self.keys.dead_letters(*partition);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream)
                .arg("*")
                .arg("entry")
                .arg(id)
                .arg("reason")
                .arg(reason);
            for (name, value) in fields {
                cmd.arg(format!("f.{name}")).arg(value);
            }
            batch.cmd(stream, cmd);
        }
        batch.query(&self.redis).await?;
        counter!("stockd_dead_letters_total").increment(dead.len() as u64);
        Ok(())
    }
}

fn fork_fields(e: &ChangeEvent) -> Vec<(String, String)> {
    [
        ("sku", e.sku.clone()),
        ("loc", e.location.clone()),
        ("op", e.op.as_str().to_owned()),
        ("d_avail", e.d_available.to_string()),
        ("d_resv", e.d_reserved.to_string()),
        ("avail", e.available.to_string()),
        ("resv", e.reserved.to_string()),
        ("ver", e.version.to_string()),
        ("ref", e.reference.clone()),
        ("ts", e.ts_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn value_text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}
