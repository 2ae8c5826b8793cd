//! The one loop of every stream consumer: the write-behind flusher and the
//! broker exporters each are a consumer group on the partition streams, and
//! a small [`Handler`] of batches; this module owns everything else.
//!
//! Schedule: a consumer first replays its own pending entries (delivered to
//! it before a crash, or before a read that failed or timed out: such a read
//! may have been delivered without the reply arriving), then claims entries
//! idle past the claim timeout from silent consumers (XAUTOCLAIM), then
//! reads new ones, going back to claiming every claim timeout.
//!
//! Batching by time: a read takes what arrived in every partition this
//! instance serves (up to `batch_size` per partition) in one round trip
//! (one XREADGROUP over every stream on a standalone Redis), hands it to the
//! handler as ONE batch, acknowledges it only after the handler succeeded,
//! and then waits out the rest of the interval before it reads again, unless
//! a partition had more waiting. So under any load a consumer makes about
//! 1000 / interval batches per second (one Postgres transaction each, for
//! the flusher), and an entry waits at most one interval. While a batch of
//! new entries is handled and acknowledged, the next one is read (the
//! read-ahead, see `run`): handling stays serial and in stream order.
//!
//! A failing handler is retried with the batch in hand, with capped
//! exponential backoff and jitter; the entries wait in Redis. At shutdown the
//! batch in hand is finished, then one last pass (bounded in time, without
//! retries) handles what the instance's last requests wrote; what is left
//! stays for the next start or another instance.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics::counter;
use rand::Rng;
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::events::{self, EntryId, RawEntry, StreamEntry};
use crate::keys::{Keyspace, Partition};
use crate::redis_conn::{self, RedisConn};

/// Where a read takes its entries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This consumer's pending entries (after a restart or a failed read).
    OwnPending,
    /// Entries idle past the claim timeout with other consumers.
    Claimed,
    /// New entries.
    New,
}

/// Where a new consumer group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// Every entry the streams hold (the flusher: nothing may be missed).
    Beginning,
    /// Entries written from now on (exporters of a new deployment).
    End,
}

/// Errors of one step of a stream consumer; the loop logs them and retries.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("{0}")]
    Handler(String),
}

impl From<StepError> for Error {
    fn from(err: StepError) -> Self {
        match err {
            StepError::Redis(e) => e.into(),
            StepError::Postgres(e) => e.into(),
            StepError::Handler(detail) => Error::Unavailable(detail),
        }
    }
}

impl From<redis::ParsingError> for StepError {
    fn from(err: redis::ParsingError) -> Self {
        StepError::Redis(err.into())
    }
}

impl StepError {
    /// The group (or the stream) is gone: Redis lost its data.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, StepError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// An entry of a partition stream, parsed once.
#[derive(Debug, Clone)]
pub struct Entry {
    pub partition: Partition,
    pub id: EntryId,
    pub parsed: Result<StreamEntry, Malformed>,
}

/// An entry that can never be handled, with why and its raw fields.
#[derive(Debug, Clone)]
pub struct Malformed {
    pub reason: String,
    /// `[name, value, ...]` as read.
    pub fields: Vec<Value>,
}

/// One batch: entries of any number of partitions, in stream order within
/// each partition.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    /// More entries may be waiting: some partition filled its share of the
    /// read, or the batch replays pending or claimed entries. A handler
    /// then works as fast as it can rather than pacing itself.
    pub behind: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest entry of each partition in the batch.
    pub fn newest_per_partition(&self) -> Vec<(Partition, EntryId)> {
        let mut newest: HashMap<Partition, EntryId> = HashMap::new();
        for e in &self.entries {
            let slot = newest.entry(e.partition).or_insert(e.id);
            *slot = (*slot).max(e.id);
        }
        let mut out: Vec<_> = newest.into_iter().collect();
        out.sort();
        out
    }
}

/// What a consumer does with a batch. Succeeding means the entries may be
/// acknowledged: the handler must have made them durable (or deliberately
/// skipped them) first.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, batch: &Batch) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Held from before a read until its batch is acknowledged (the
    /// flusher's, so that a restore does not read Postgres in between).
    fn hold(&self) -> impl Future<Output = Option<tokio::sync::OwnedRwLockReadGuard<()>>> + Send {
        async { None }
    }
}

/// How one consumer reads.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub group: &'static str,
    pub start: GroupStart,
    /// This instance's consumer name: stable across restarts, so that a
    /// restarted instance replays its own pending entries.
    pub consumer: String,
    /// Most entries per partition in one batch.
    pub batch_size: usize,
    /// The batching window: the least time between two reads that are not
    /// catching up.
    pub interval: Duration,
    /// Entries pending this long with another consumer are taken over.
    pub claim_idle: Duration,
    /// Other consumers of the group that own nothing and have been idle
    /// this long are removed (gone instances: one consumer per pod name per
    /// rollout would pile up otherwise). Never less than `claim_idle`.
    pub remove_idle: Duration,
}

/// What one `consume_once` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeOutcome {
    /// Entries handled and acknowledged.
    pub entries: usize,
    /// Whether some partition had a full batch (more may be waiting).
    pub full: bool,
}

/// A consumer group's reader on every partition stream, with its handler.
pub struct Consumer<H> {
    redis: RedisConn,
    keys: Keyspace,
    settings: ConsumerSettings,
    handler: H,
}

impl<H: Handler> Consumer<H> {
    pub fn new(redis: RedisConn, keys: Keyspace, settings: ConsumerSettings, handler: H) -> Self {
        Self {
            redis,
            keys,
            settings,
            handler,
        }
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Creates the group on every partition stream (and the stream itself)
    /// where missing. After a data loss the streams are new, so a group made
    /// again starts at their beginning whatever its usual start.
    pub async fn ensure_groups(&self, after_loss: bool) -> Result<(), StepError> {
        let start = match (self.settings.start, after_loss) {
            (GroupStart::Beginning, _) | (GroupStart::End, true) => "0",
            (GroupStart::End, false) => "$",
        };
        let mut batch = redis_conn::CommandBatch::new();
        for p in self.keys.partitions() {
            let stream = self.keys.events(p);
            let mut create = redis::cmd("XGROUP");
            create
                .arg("CREATE")
                .arg(&stream)
                .arg(self.settings.group)
                .arg(start)
                .arg("MKSTREAM");
            batch.cmd(stream, create);
        }
        for reply in batch.query_each(&self.redis).await? {
            match reply {
                Ok(_) => {}
                // The group exists: the answer we expect most.
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads up to a batch per partition from `source`, hands it to the
    /// handler once and acknowledges it. No retry: the caller decides.
    pub async fn consume_once(&self, source: Source) -> Result<ConsumeOutcome, StepError> {
        let (batch, full) = self.read(source).await?;
        if batch.is_empty() {
            return Ok(ConsumeOutcome::default());
        }
        self.handler.handle(&batch).await?;
        self.ack(&batch).await?;
        Ok(ConsumeOutcome {
            entries: batch.entries.len(),
            full,
        })
    }

    /// Handles everything there is: own pending entries, entries idle past
    /// the claim timeout, and new ones, until a read finds nothing. The
    /// driver of tests and tools (no polling with deadlines).
    pub async fn drain(&self) -> Result<usize, StepError> {
        let mut total = 0;
        for source in [Source::OwnPending, Source::Claimed, Source::New] {
            loop {
                let outcome = self.consume_once(source).await?;
                total += outcome.entries;
                if outcome.entries == 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Consumes until `shutdown`, finishing the batch in hand.
    pub async fn run(&self, shutdown: CancellationToken) {
        let group = self.settings.group;
        if let Err(err) = self.ensure_groups(false).await {
            tracing::warn!(group, error = %err, "cannot create the consumer groups yet; retrying in the loop");
        }
        let mut source = Source::OwnPending;
        let mut last_claim = Instant::now();
        let mut last_own_check = Instant::now();
        // Whether the own-pending read in hand is the periodic look (then
        // an empty one leads back to new entries, not to a claim).
        let mut periodic = false;
        let mut backoff = Backoff::default();
        let mut next_read = Instant::now();
        // The next batch of new entries, read while the one before was
        // being written (see `read_ahead`).
        let mut ahead: Option<ReadAhead> = None;
        while !shutdown.is_cancelled() {
            let ReadAhead {
                read,
                started,
                held,
            } = match ahead.take() {
                Some(read) => read,
                None => {
                    if source == Source::New && last_claim.elapsed() >= self.settings.claim_idle {
                        source = Source::Claimed;
                    }
                    if source == Source::New && last_own_check.elapsed() >= OWN_PENDING_EVERY {
                        source = Source::OwnPending;
                        periodic = true;
                    }
                    if source == Source::OwnPending {
                        last_own_check = Instant::now();
                    }
                    if source == Source::New {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep_until(next_read.into()) => {}
                        }
                    }
                    self.read_held(source).await
                }
            };
            tracing::trace!(group, ?source, read = ?read.as_ref().map(|(b, f)| (b.entries.len(), *f)), "consumer read");
            let (batch, full) = match read {
                Ok(read) => read,
                Err(err) => {
                    drop(held);
                    if err.is_missing_group() {
                        tracing::warn!(
                            group,
                            "consumer group missing (Redis lost its data); creating it again"
                        );
                        if let Err(err) = self.ensure_groups(true).await {
                            tracing::warn!(group, error = %err, "creating the consumer groups failed");
                        }
                    } else {
                        tracing::warn!(group, ?source, error = %err, "reading the streams failed; backing off");
                    }
                    // A failed read may have been delivered: re-read our own
                    // pending entries before anything new (then a claim, as
                    // after any failed read, not the periodic look).
                    source = Source::OwnPending;
                    periodic = false;
                    backoff.wait(&shutdown).await;
                    continue;
                }
            };
            if batch.is_empty() {
                if source == Source::Claimed {
                    last_claim = Instant::now();
                    self.remove_silent_consumers().await;
                }
                source = match source {
                    Source::OwnPending if !periodic => Source::Claimed,
                    _ => Source::New,
                };
                periodic = false;
                next_read = started + self.settings.interval;
                continue;
            }
            if periodic {
                // Between batches our own pending list is empty, unless a
                // read was delivered whose reply never reached us without an
                // error (a cluster client retrying a read after a failover).
                counter!("stockd_consumer_undelivered_reads_total", "group" => group)
                    .increment(batch.entries.len() as u64);
                tracing::warn!(
                    group,
                    entries = batch.entries.len(),
                    "entries delivered to this consumer never reached it (a lost read reply); handling them now"
                );
                periodic = false;
            }
            // Pending and claimed entries are read until none are left; new
            // ones wait out the batching window unless more are waiting.
            next_read = if full {
                Instant::now()
            } else {
                started + self.settings.interval
            };
            // Read-ahead: while this batch of new entries is written, the
            // next one is read, so that Redis' reply and its parsing are
            // not on the write path (under load they were a third of it).
            // Only new entries, and only when no look at pending entries is
            // due: such a look must find the pipeline empty, or it would
            // take the batch in hand for one whose reply was lost.
            let read_ahead = source == Source::New
                && last_claim.elapsed() < self.settings.claim_idle
                && last_own_check.elapsed() < OWN_PENDING_EVERY;
            let next = async {
                if !read_ahead {
                    return None;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep_until(next_read.into()) => {}
                }
                Some(self.read_held(Source::New).await)
            };
            // The batch in hand is finished even when shutdown comes
            // meanwhile; only a failing Postgres or Redis makes us give up
            // on it at shutdown (it stays pending and is replayed).
            let (finished, next) =
                tokio::join!(self.finish(&batch, held, &mut backoff, &shutdown), next);
            if !finished {
                return;
            }
            counter!("stockd_consumer_entries_total", "group" => group)
                .increment(batch.entries.len() as u64);
            counter!("stockd_consumer_batches_total", "group" => group).increment(1);
            backoff.reset();
            ahead = next;
        }
        // A batch read ahead when shutdown came is this consumer's pending
        // entries: the final pass handles it (without the hold).
        drop(ahead);
        self.final_pass().await;
        tracing::debug!(group, "consumer stopped");
    }

    /// Reads from `source` under the handler's hold, which the batch keeps
    /// until it is acknowledged.
    async fn read_held(&self, source: Source) -> ReadAhead {
        let held = self.handler.hold().await;
        let started = Instant::now();
        ReadAhead {
            read: self.read(source).await,
            started,
            held,
        }
    }

    /// Handles and acknowledges `batch`, retrying each with backoff, then
    /// releases its hold; false when shutdown came while Postgres or Redis
    /// was failing (the batch stays pending and is replayed).
    async fn finish(
        &self,
        batch: &Batch,
        held: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        let group = self.settings.group;
        while let Err(err) = self.handler.handle(batch).await {
            counter!("stockd_consumer_retries_total", "group" => group).increment(1);
            tracing::warn!(group, entries = batch.entries.len(), error = %err,
                "handling a batch failed; retrying it with backoff");
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
        while let Err(err) = self.ack(batch).await {
            tracing::warn!(group, error = %err, "XACK failed; retrying");
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
        drop(held);
        true
    }

    /// At shutdown, once this instance serves no more requests: what its
    /// last requests wrote is handled now rather than by the next start or
    /// another instance. Bounded in time, no retries: what is left stays in
    /// the streams, as safe as ever.
    async fn final_pass(&self) {
        let group = self.settings.group;
        let pass = async {
            let mut total = 0;
            for source in [Source::OwnPending, Source::New] {
                loop {
                    match self.consume_once(source).await {
                        Ok(outcome) if outcome.entries > 0 => total += outcome.entries,
                        Ok(_) => break,
                        Err(err) => {
                            tracing::warn!(group, error = %err, "final pass at shutdown failed; the rest stays in the streams");
                            return total;
                        }
                    }
                }
            }
            total
        };
        match tokio::time::timeout(FINAL_PASS_LIMIT, pass).await {
            Ok(entries) => tracing::debug!(group, entries, "final pass at shutdown"),
            Err(_) => tracing::warn!(
                group,
                "final pass at shutdown ran out of time; the rest stays in the streams"
            ),
        }
    }

    /// Reads up to `batch_size` entries per partition from `source`; says
    /// whether some partition filled its share.
    async fn read(&self, source: Source) -> Result<(Batch, bool), StepError> {
        let count = self.settings.batch_size;
        let raw: Vec<(Partition, Vec<RawEntry>)> = match source {
            Source::Claimed => self.claim().await?,
            Source::OwnPending => self.read_group("0").await?,
            Source::New => self.read_group(">").await?,
        };
        let mut batch = Batch::default();
        let mut full = false;
        for (partition, ids) in raw {
            full |= ids.len() >= count;
            batch.behind |= full || source != Source::New;
            for entry in ids {
                let Some(id) = EntryId::parse(&entry.id) else {
                    tracing::error!(%partition, entry = %entry.id, "skipping a stream entry with an unreadable id");
                    continue;
                };
                let parsed = if entry.fields.is_empty() {
                    // A pending entry deleted from the stream (trimmed by hand).
                    Err("the entry was deleted from the stream".to_owned())
                } else {
                    StreamEntry::parse(partition.0, id, &entry.fields)
                };
                batch.entries.push(Entry {
                    partition,
                    id,
                    parsed: parsed.map_err(|reason| Malformed {
                        reason,
                        fields: entry.fields,
                    }),
                });
            }
        }
        Ok((batch, full))
    }

    /// Reads every partition stream from `id` (`0`: own pending entries,
    /// `>`: new ones): one XREADGROUP over all of them on a standalone
    /// Redis; on a cluster, where one command may not span slots, one per
    /// partition, in one batch.
    async fn read_group(&self, id: &str) -> Result<Vec<(Partition, Vec<RawEntry>)>, StepError> {
        let partitions: Vec<Partition> = self.keys.partitions().collect();
        let streams: HashMap<String, Partition> = partitions
            .iter()
            .map(|&p| (self.keys.events(p), p))
            .collect();
        let read = |of: &[Partition]| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(self.settings.group)
                .arg(&self.settings.consumer)
                .arg("COUNT")
                .arg(self.settings.batch_size)
                .arg("STREAMS");
            for p in of {
                cmd.arg(self.keys.events(*p));
            }
            for _ in of {
                cmd.arg(id);
            }
            cmd
        };
        let replies: Vec<Value> = if self.redis.is_cluster() {
            let mut batch = redis_conn::CommandBatch::new();
            for &p in &partitions {
                batch.cmd(self.keys.events(p), read(&[p]));
            }
            batch.query(&self.redis).await?
        } else {
            vec![
                read(&partitions)
                    .query_async(&mut self.redis.clone())
                    .await?,
            ]
        };
        let mut out = Vec::new();
        for reply in replies {
            for (key, entries) in events::read_reply(reply)? {
                if let Some(&p) = streams.get(&key) {
                    out.push((p, entries));
                }
            }
        }
        Ok(out)
    }

    /// XAUTOCLAIM of entries idle past the claim timeout, every partition in
    /// one pipelined round trip.
    async fn claim(&self) -> Result<Vec<(Partition, Vec<RawEntry>)>, StepError> {
        let mut batch = redis_conn::CommandBatch::new();
        for p in self.keys.partitions() {
            let stream = self.keys.events(p);
            let mut claim = redis::cmd("XAUTOCLAIM");
            claim
                .arg(&stream)
                .arg(self.settings.group)
                .arg(&self.settings.consumer)
                .arg(self.settings.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.settings.batch_size);
            batch.cmd(stream, claim);
        }
        let mut claimed = Vec::new();
        for (p, reply) in self.keys.partitions().zip(batch.query(&self.redis).await?) {
            // [next cursor, [[id, fields], ...], deleted ids]
            let Value::Array(parts) = reply else {
                return Err(
                    redis::ParsingError::from(format!("XAUTOCLAIM replied {reply:?}")).into(),
                );
            };
            let entries = events::range_reply(parts.into_iter().nth(1).unwrap_or(Value::Nil))?;
            if !entries.is_empty() {
                claimed.push((p, entries));
            }
        }
        for (partition, ids) in &claimed {
            tracing::info!(%partition, group = self.settings.group, entries = ids.len(),
                "took over entries of a silent consumer");
        }
        Ok(claimed)
    }

    /// Acknowledges a handled batch, every partition in one pipeline.
    async fn ack(&self, batch: &Batch) -> Result<(), StepError> {
        let mut by_partition: HashMap<Partition, Vec<String>> = HashMap::new();
        for e in &batch.entries {
            by_partition
                .entry(e.partition)
                .or_default()
                .push(e.id.to_string());
        }
        let mut acks = redis_conn::CommandBatch::new();
        for (p, ids) in by_partition {
            let stream = self.keys.events(p);
            let mut ack = redis::cmd("XACK");
            ack.arg(&stream).arg(self.settings.group).arg(ids);
            acks.cmd(stream, ack);
        }
        acks.query(&self.redis).await?;
        Ok(())
    }

    /// Removes consumers of this group that own nothing and have been idle
    /// past `remove_idle` (instances that are gone: one per pod name per
    /// rollout otherwise piles up). Runs after a claim found nothing, so a
    /// dead consumer's entries were taken over first. Best effort.
    async fn remove_silent_consumers(&self) {
        let silent_for = self.settings.remove_idle.max(self.settings.claim_idle);
        for p in self.keys.partitions() {
            let stream = self.keys.events(p);
            let consumers: Result<redis::streams::StreamInfoConsumersReply, _> =
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream)
                    .arg(self.settings.group)
                    .query_async(&mut self.redis.clone())
                    .await;
            let Ok(consumers) = consumers else {
                return;
            };
            for c in consumers.consumers {
                let silent = Duration::from_millis(c.idle as u64) >= silent_for;
                if c.pending == 0 && silent && c.name != self.settings.consumer {
                    // DELCONSUMER drops what the consumer owns: it owns
                    // nothing (and a claim would have taken it before).
                    let removed: Result<i64, _> = redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(&stream)
                        .arg(self.settings.group)
                        .arg(&c.name)
                        .query_async(&mut self.redis.clone())
                        .await;
                    if removed.is_ok() {
                        tracing::info!(partition = %p, group = self.settings.group, consumer = %c.name,
                            "removed a consumer that owned nothing and was silent");
                    }
                }
            }
        }
    }
}

/// A read with when it started and the handler's hold it was made under.
struct ReadAhead {
    read: Result<(Batch, bool), StepError>,
    started: Instant,
    held: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

/// How long the final pass at shutdown may take.
const FINAL_PASS_LIMIT: Duration = Duration::from_secs(10);

/// How often the loop looks at its own pending entries besides after a
/// failed read: a read whose reply was lost without an error would wait
/// for the claim timeout otherwise. Between batches the list is empty, so
/// the look is one cheap read.
const OWN_PENDING_EVERY: Duration = Duration::from_secs(1);

/// Capped exponential backoff with full jitter, for the background loops
/// (by default 100 ms doubling to 5 s).
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            attempt: 0,
            base,
            cap,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps the next delay; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let ceiling = retry_ceiling(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let delay = rand::rng().random_range(Duration::ZERO..=ceiling);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// `base * 2^attempt`, at most `cap`.
pub fn retry_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(20)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_ceiling_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        let ceilings: Vec<u128> = (0..6)
            .map(|a| retry_ceiling(base, cap, a).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_ceiling(base, cap, u32::MAX), cap);
    }

    #[test]
    fn a_batch_knows_its_newest_entry_per_partition() {
        let entry = |p: u32, ms: u64| Entry {
            partition: Partition(p),
            id: EntryId { ms, seq: 0 },
            parsed: Err(Malformed {
                reason: String::new(),
                fields: Vec::new(),
            }),
        };
        let batch = Batch {
            entries: vec![entry(1, 5), entry(0, 7), entry(1, 9), entry(1, 6)],
            behind: false,
        };
        assert_eq!(
            batch.newest_per_partition(),
            vec![
                (Partition(0), EntryId { ms: 7, seq: 0 }),
                (Partition(1), EntryId { ms: 9, seq: 0 })
            ]
        );
    }
}
