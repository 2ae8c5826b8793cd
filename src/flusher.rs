//! The write-behind flusher: partition streams → Postgres.
//!
//! Every stockd instance runs one, as a consumer of the consumer group
//! `flusher` on each partition stream, so instances share the work and none
//! is special. Per partition, a loop reads as `consumer::GroupReader` does:
//! its own pending entries first (read but not acknowledged before a crash),
//! then entries claimed from consumers that died, then new ones.
//!
//! Each batch is written in ONE Postgres transaction (`Store::write_batch`)
//! and acknowledged (XACK) only after the commit: a crash in between replays
//! the batch, which the idempotent writes make harmless. Postgres failing
//! means retrying the batch in hand with capped exponential backoff and
//! jitter; the entries wait in Redis. Entries that can never be written go
//! to the partition's dead-letter stream and are acknowledged.
//!
//! Housekeeping, about once a second per partition: the backlog metrics, the
//! backlog gate (closed while the unflushed entries are over the limit, which
//! makes the scripts refuse new demand), and trimming the stream below the
//! oldest unflushed entry and the retention kept for `Watch`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use redis::Value;
use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamInfoGroupsReply, StreamPendingReply};
use tokio_util::sync::CancellationToken;

pub use crate::consumer::Source;
use crate::consumer::{Backoff, GroupReader, StepError};

use crate::events::{ChangeEvent, parse_entry_id};
use crate::keys::{Keyspace, Partition};
use crate::store::Store;

/// The consumer group every instance joins on every partition stream.
pub const GROUP: &str = "flusher";

#[derive(Debug, Clone)]
pub struct FlusherSettings {
    /// This instance's consumer name; stable across restarts so that a
    /// restarted instance replays its own pending entries.
    pub consumer: String,
    /// Most entries in one batch (one Postgres transaction).
    pub batch_size: usize,
    /// How long a read waits for new entries before it returns empty.
    pub interval: Duration,
    /// Entries pending this long with another consumer are taken over.
    pub claim_idle: Duration,
    /// Unflushed entries in a partition past which new demand is refused.
    pub max_unflushed: u64,
    /// How far back the stream is kept, below the oldest unflushed entry,
    /// for `Watch` resumption.
    pub retention: Duration,
}

/// What one `flush_once` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Entries written to Postgres.
    pub flushed: usize,
    /// Entries sent to the dead-letter stream.
    pub dead: usize,
}

impl FlushOutcome {
    pub fn is_empty(&self) -> bool {
        self.flushed == 0 && self.dead == 0
    }
}

/// A partition's write-behind state, for FlushStatus, metrics, the gate and
/// trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    pub partition: Partition,
    pub stream_length: u64,
    /// Entries not yet in Postgres: delivered but unacknowledged, plus not
    /// yet delivered.
    pub unflushed: u64,
    pub oldest_unflushed_id: Option<String>,
    pub oldest_unflushed_age_ms: i64,
    pub dead_letters: u64,
    /// Redis clock when this was read.
    pub now_ms: i64,
}

/// Errors of one step; the run loop logs them and retries.
pub type FlushError = StepError;

/// A batch read from a stream: events to write, entries to dead-letter.
struct Batch {
    events: Vec<ChangeEvent>,
    dead: Vec<(String, String, HashMap<String, Value>)>,
}

#[derive(Clone)]
pub struct Flusher {
    redis: ConnectionManager,
    reader: GroupReader,
    store: Store,
    keys: Keyspace,
    settings: Arc<FlusherSettings>,
}

impl Flusher {
    pub fn new(
        redis: ConnectionManager,
        blocking: deadpool_redis::Pool,
        store: Store,
        keys: Keyspace,
        settings: FlusherSettings,
    ) -> Self {
        let reader = GroupReader::new(
            redis.clone(),
            blocking,
            keys.clone(),
            GROUP,
            settings.consumer.clone(),
            settings.batch_size,
            settings.interval,
            settings.claim_idle,
        );
        Self {
            redis,
            reader,
            store,
            keys,
            settings: Arc::new(settings),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates the consumer group on every partition stream (and the stream
    /// itself) where missing. The group starts at the stream's beginning, so
    /// events written before the first flusher started are flushed too.
    pub async fn ensure_groups(&self) -> Result<(), FlushError> {
        self.reader.ensure_groups("0").await
    }

    /// Reads one batch of `partition` from `source`, writes it to Postgres
    /// in one transaction and acknowledges it. No retry: the caller decides.
    pub async fn flush_once(
        &self,
        partition: Partition,
        source: Source,
    ) -> Result<FlushOutcome, FlushError> {
        let batch = self.read(partition, source, &mut None).await?;
        let dead = self.dead_letter(partition, &batch.dead).await?;
        if batch.events.is_empty() {
            return Ok(FlushOutcome { flushed: 0, dead });
        }
        self.write(partition, &batch.events).await?;
        self.ack(partition, &batch.events).await?;
        Ok(FlushOutcome {
            flushed: batch.events.len(),
            dead,
        })
    }

    /// Flushes every partition until nothing is left to read: own pending
    /// entries, claimable ones, and new ones. For tests and tools.
    pub async fn drain(&self) -> Result<FlushOutcome, FlushError> {
        let mut total = FlushOutcome::default();
        for p in self.keys.partitions() {
            for source in [Source::OwnPending, Source::Claimed, Source::New] {
                loop {
                    let outcome = self.flush_once(p, source).await?;
                    total.flushed += outcome.flushed;
                    total.dead += outcome.dead;
                    if outcome.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }

    /// Runs one loop per partition until `shutdown`; each finishes the batch
    /// in hand before it stops.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(err) = self.ensure_groups().await {
            tracing::error!(error = %err, "cannot create the flusher's consumer groups; retrying in the loops");
        }
        let mut loops: Vec<_> = self
            .keys
            .partitions()
            .map(|p| tokio::spawn(self.clone().run_partition(p, shutdown.clone())))
            .collect();
        // Apart from the partition loops, which may be stuck retrying a
        // batch while Postgres is down: that is when the gate matters.
        loops.push(tokio::spawn(
            self.clone().run_housekeeping(shutdown.clone()),
        ));
        for handle in loops {
            if let Err(err) = handle.await {
                tracing::error!(error = %err, "flusher loop panicked");
            }
        }
        tracing::debug!("flusher stopped");
    }

    /// Every second: metrics, gate and trimming of every partition.
    async fn run_housekeeping(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            for p in self.keys.partitions() {
                // With Redis gone each partition takes its retries: stop
                // between partitions rather than after all of them.
                if shutdown.is_cancelled() {
                    return;
                }
                if let Err(err) = self.housekeeping(p).await {
                    tracing::warn!(partition = %p, error = %err, "flusher housekeeping failed");
                }
            }
        }
    }

    async fn run_partition(self, partition: Partition, shutdown: CancellationToken) {
        let mut blocking = None;
        let mut source = Source::OwnPending;
        let mut last_claim = Instant::now();
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            if source == Source::New && last_claim.elapsed() >= self.settings.claim_idle {
                source = Source::Claimed;
            }
            let batch = match self.read(partition, source, &mut blocking).await {
                Ok(batch) => batch,
                Err(err) if err.is_missing_group() => {
                    // Redis lost its data (or someone deleted the stream):
                    // the group starts again with the stream.
                    tracing::warn!(%partition, "consumer group missing; creating it again");
                    if let Err(err) = self.ensure_groups().await {
                        tracing::warn!(error = %err, "creating the consumer groups failed");
                    }
                    backoff.wait(&shutdown).await;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%partition, error = %err, "reading the stream failed; backing off");
                    backoff.wait(&shutdown).await;
                    continue;
                }
            };
            if batch.events.is_empty() && batch.dead.is_empty() {
                if source == Source::Claimed {
                    last_claim = Instant::now();
                }
                source = source.after_empty();
                continue;
            }
            // The batch in hand is finished even when shutdown is requested
            // meanwhile; only a failing Postgres or Redis makes us give up on
            // it at shutdown (it stays pending and is replayed at restart).
            while let Err(err) = self.dead_letter(partition, &batch.dead).await {
                tracing::warn!(%partition, error = %err, "dead-lettering failed; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
            if batch.events.is_empty() {
                continue;
            }
            loop {
                match self.write(partition, &batch.events).await {
                    Ok(()) => break,
                    Err(err) => {
                        counter!("stockd_flush_retries_total").increment(1);
                        tracing::warn!(%partition, entries = batch.events.len(), error = %err,
                            "writing the batch to Postgres failed; retrying with backoff");
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                    }
                }
            }
            failpoint_after_commit();
            while let Err(err) = self.ack(partition, &batch.events).await {
                tracing::warn!(%partition, error = %err, "XACK failed; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
            backoff.reset();
        }
    }

    /// Reads up to a batch of entries from `source`.
    /// Reads up to a batch and sorts it into events and entries that can
    /// never be written.
    async fn read(
        &self,
        partition: Partition,
        source: Source,
        held: &mut Option<deadpool_redis::Connection>,
    ) -> Result<Batch, StepError> {
        let entries: Vec<StreamId> = self.reader.read(partition, source, held).await?;
        let mut batch = Batch {
            events: Vec::with_capacity(entries.len()),
            dead: Vec::new(),
        };
        for entry in entries {
            match ChangeEvent::parse(partition.0, &entry.id, &entry.map) {
                Ok(event) => batch.events.push(event),
                Err(reason) => batch.dead.push((entry.id, reason, entry.map)),
            }
        }
        Ok(batch)
    }

    async fn write(&self, partition: Partition, events: &[ChangeEvent]) -> Result<(), FlushError> {
        let started = Instant::now();
        self.store.write_batch(partition.0, events).await?;
        histogram!("stockd_flush_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        histogram!("stockd_flush_batch_size").record(events.len() as f64);
        counter!("stockd_flush_batches_total").increment(1);
        counter!("stockd_flushed_events_total").increment(events.len() as u64);
        Ok(())
    }

    async fn ack(&self, partition: Partition, events: &[ChangeEvent]) -> Result<(), FlushError> {
        self.reader
            .ack(partition, events.iter().map(|e| e.entry_id.as_str()))
            .await
    }

    /// Moves entries that can never be written to `NS:{pNN}:dead` (with the
    /// reason and the original fields) and acknowledges them, in one MULTI.
    async fn dead_letter(
        &self,
        partition: Partition,
        dead: &[(String, String, HashMap<String, Value>)],
    ) -> Result<usize, FlushError> {
        if dead.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (id, reason, fields) in dead {
            tracing::error!(%partition, entry = %id, %reason, "dead-lettering an entry that can never be written");
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.keys.dead_letters(partition))
                .arg("*")
                .arg("entry")
                .arg(id)
                .arg("reason")
                .arg(reason);
            for (name, value) in fields {
                cmd.arg(format!("f.{name}")).arg(value_text(value));
            }
            pipe.add_command(cmd).ignore();
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(self.keys.events(partition)).arg(GROUP);
        for (id, _, _) in dead {
            ack.arg(id);
        }
        pipe.add_command(ack).ignore();
        let () = pipe.query_async(&mut self.redis.clone()).await?;
        counter!("stockd_dead_letters_total").increment(dead.len() as u64);
        Ok(dead.len())
    }

    /// The write-behind state of one partition, in one pipelined round trip
    /// (two when the oldest unflushed entry is not pending yet).
    pub async fn backlog(&self, partition: Partition) -> Result<Backlog, FlushError> {
        let stream = self.keys.events(partition);
        let mut conn = self.redis.clone();
        let ((secs, micros), length, groups, pending, dead): (
            (i64, i64),
            u64,
            StreamInfoGroupsReply,
            StreamPendingReply,
            u64,
        ) = redis::pipe()
            .cmd("TIME")
            .cmd("XLEN")
            .arg(&stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .cmd("XPENDING")
            .arg(&stream)
            .arg(GROUP)
            .cmd("XLEN")
            .arg(self.keys.dead_letters(partition))
            .query_async(&mut conn)
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        let group = groups.groups.into_iter().find(|g| g.name == GROUP);
        let pending_count = pending.count() as u64;
        let (lag, last_delivered) = match &group {
            // No group yet: everything in the stream is unflushed.
            None => (length, None),
            Some(g) => (
                g.lag.map(|l| l as u64).unwrap_or(0),
                Some(g.last_delivered_id.clone()),
            ),
        };
        let oldest_unflushed_id = match (&pending, last_delivered) {
            (StreamPendingReply::Data(data), _) => Some(data.start_id.clone()),
            (_, _) if lag == 0 => None,
            (_, last) => {
                // The first entry the group has not delivered yet.
                let start = last
                    .map(|id| format!("({id}"))
                    .unwrap_or_else(|| "-".into());
                let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                first.into_iter().next().map(|(id, _)| id)
            }
        };
        let oldest_unflushed_age_ms = oldest_unflushed_id
            .as_deref()
            .and_then(parse_entry_id)
            .map(|(ms, _)| (now_ms - ms as i64).max(0))
            .unwrap_or(0);
        Ok(Backlog {
            partition,
            stream_length: length,
            unflushed: pending_count + lag,
            oldest_unflushed_id,
            oldest_unflushed_age_ms,
            dead_letters: dead,
            now_ms,
        })
    }

    /// Metrics, the backlog gate and trimming for one partition.
    pub async fn housekeeping(&self, partition: Partition) -> Result<Backlog, FlushError> {
        let backlog = self.backlog(partition).await?;
        let label = partition.to_string();
        gauge!("stockd_unflushed_events", "partition" => label.clone())
            .set(backlog.unflushed as f64);
        gauge!("stockd_oldest_unflushed_age_seconds", "partition" => label)
            .set(backlog.oldest_unflushed_age_ms as f64 / 1000.0);

        let mut conn = self.redis.clone();
        let gate = self.keys.backlog_gate(partition);
        if backlog.unflushed >= self.settings.max_unflushed {
            let opened: bool = redis::cmd("SET")
                .arg(&gate)
                .arg(backlog.unflushed)
                .arg("NX")
                .query_async::<Option<String>>(&mut conn)
                .await?
                .is_some();
            if opened {
                tracing::warn!(%partition, unflushed = backlog.unflushed, limit = self.settings.max_unflushed,
                    "flush backlog over its limit: refusing new demand on this partition until it drains");
            }
        } else {
            let removed: i64 = redis::cmd("DEL").arg(&gate).query_async(&mut conn).await?;
            if removed > 0 {
                tracing::info!(%partition, unflushed = backlog.unflushed, "flush backlog drained: accepting demand again");
            }
        }

        // Keep everything from the oldest unflushed entry on, and the
        // retention window before it.
        let retention_floor = backlog.now_ms - self.settings.retention.as_millis() as i64;
        let floor = match backlog
            .oldest_unflushed_id
            .as_deref()
            .and_then(parse_entry_id)
        {
            Some((ms, _)) => retention_floor.min(ms as i64),
            None => retention_floor,
        };
        if floor > 0 {
            let _: i64 = redis::cmd("XTRIM")
                .arg(self.keys.events(partition))
                .arg("MINID")
                .arg("~")
                .arg(format!("{floor}-0"))
                .query_async(&mut conn)
                .await?;
        }
        Ok(backlog)
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// Test-only fail point: with `STOCKD_FAILPOINT=crash-after-commit` the
/// process aborts between a batch's Postgres commit and its XACK, the window
/// the crash tests must cover. Compiled out of release builds.
fn failpoint_after_commit() {
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        static ARMED: OnceLock<bool> = OnceLock::new();
        if *ARMED.get_or_init(|| {
            std::env::var("STOCKD_FAILPOINT").is_ok_and(|v| v == "crash-after-commit")
        }) {
            eprintln!("failpoint crash-after-commit: aborting between commit and XACK");
            std::process::abort();
        }
    }
}
