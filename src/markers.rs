//! Partition markers (`NS:{pNN}:marker`): the proof, checked inside every
//! script, that this Redis still holds a partition and has not rolled back
//! (fields and rules in scripts/layout.lua; every write goes through
//! scripts/marker.lua).
//!
//! [`Markers`] is this instance's view of them: for each partition the
//! newest flushed entry id it has seen in the marker (from script replies
//! and the watchdog) or flushed itself (its own flusher, at the Postgres
//! commit: before the marker write, which a dying master never takes).
//! Scripts are handed that id and refuse when the marker is behind it and
//! the stream lacks that entry: a Redis that rolled back (a restart from an
//! older snapshot, a failover to a lagging replica). A refusal sounds the
//! alarm, which wakes the watchdog at once; so does a ledger fork the
//! flusher found (a rollback noticed only once Redis gave out a version
//! Postgres had), which marks the partition rolled back for the watchdog.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

pub use crate::events::EntryId;
use crate::keys::{Keyspace, Partition};
use crate::redis_conn::{CommandBatch, RedisConn};
use crate::scripts;

/// A marker as it stands in Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkerState {
    /// The deployment epoch; `None`: the partition is lost.
    pub epoch: Option<String>,
    pub flushed: Option<EntryId>,
    /// Refusing everything until then (ms), while a rollback is healed.
    pub heal_until_ms: Option<i64>,
    pub gate: bool,
    /// A 'flushed' write was refused: the marker is behind the entry and
    /// this Redis lacks it (see scripts/marker.lua).
    pub unheld: bool,
}

impl redis::FromRedisValue for MarkerState {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        let (epoch, flushed, heal, gate, unheld): (String, String, String, String, String) =
            redis::FromRedisValue::from_redis_value(value)?;
        Ok(MarkerState {
            epoch: (!epoch.is_empty()).then_some(epoch),
            flushed: EntryId::parse(&flushed),
            heal_until_ms: heal.parse().ok(),
            gate: gate == "1",
            unheld: unheld == "1",
        })
    }
}

/// The watchdog's full checks, as [`Markers::fresh_check`] waits for them.
#[derive(Debug, Clone, Copy, Default)]
struct Checks {
    began: u64,
    ended: Option<(u64, bool)>,
}

/// A Bloom filter of the ids Postgres knew when a partition was
/// re-established, and until when it applies.
pub struct SeenFilter {
    pub until_ms: i64,
    pub bits: u64,
    pub bytes: Vec<u8>,
}

impl SeenFilter {
    /// A filter sized for `ids` (at least one byte).
    pub fn of<'a>(ids: impl ExactSizeIterator<Item = &'a str>, until_ms: i64) -> Self {
        let bits = (ids.len() as u64 * scripts::BLOOM_BITS_PER_ID).max(64);
        let mut bytes = vec![0u8; bits.div_ceil(8) as usize];
        for id in ids {
            for position in scripts::bloom_positions(id, bits) {
                // GETBIT numbers the bits of a byte from the most significant.
                bytes[(position / 8) as usize] |= 0x80 >> (position % 8);
            }
        }
        Self {
            until_ms,
            bits,
            bytes,
        }
    }
}

#[derive(Clone)]
pub struct Markers {
    keys: Keyspace,
    /// Per partition, the newest flushed id seen, packed (`EntryId::pack`).
    seen: Arc<[AtomicU64]>,
    /// Per partition: the flusher found it rolled back (a ledger fork, or
    /// a Redis lacking an entry it flushed); the watchdog heals it.
    rolled_back: Arc<[AtomicBool]>,
    alarm: Arc<Notify>,
    /// The watchdog's full checks: how many began, and the last one that
    /// ended (its number and whether it found every partition sound).
    checks: Arc<tokio::sync::watch::Sender<Checks>>,
    /// Held shared by this instance's flusher from a read to its ack, and
    /// exclusively by a restore while it reads Postgres: a batch read from
    /// a Redis before its loss that commits after the restore read Postgres
    /// would hold versions the restored Redis gives out again (forks).
    flushing: Arc<tokio::sync::RwLock<()>>,
}

impl Markers {
    pub fn new(keys: Keyspace) -> Self {
        let seen = keys.partitions().map(|_| AtomicU64::new(0)).collect();
        let rolled_back = keys.partitions().map(|_| AtomicBool::new(false)).collect();
        Self {
            keys,
            seen,
            rolled_back,
            alarm: Arc::new(Notify::new()),
            checks: Arc::new(tokio::sync::watch::channel(Checks::default()).0),
            flushing: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// The flusher's hold from a read to its ack (see `flushing`).
    pub fn flush_in_progress(
        &self,
    ) -> impl Future<Output = tokio::sync::OwnedRwLockReadGuard<()>> + Send + 'static {
        self.flushing.clone().read_owned()
    }

    /// A restore's wait for the batch in hand to be written (or `limit`,
    /// after which it goes on: a batch that cannot be written then is one
    /// Postgres does not take, and its forks are still caught).
    pub async fn wait_for_flushes(
        &self,
        limit: std::time::Duration,
    ) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        tokio::time::timeout(limit, self.flushing.clone().write_owned())
            .await
            .ok()
    }

    /// The watchdog begins comparing Redis with Postgres; the number of
    /// that check, for [`Markers::end_full_check`].
    pub fn begin_full_check(&self) -> u64 {
        let mut n = 0;
        self.checks.send_modify(|c| {
            c.began += 1;
            n = c.began;
        });
        n
    }

    /// Check `n` ended; `sound`: nothing was lost or rolled back.
    pub fn end_full_check(&self, n: u64, sound: bool) {
        self.checks.send_modify(|c| c.ended = Some((n, sound)));
    }

    /// Sounds the alarm and waits (`within` at most) for a full check that
    /// began after this call: `Some(true)` when it found Redis sound.
    pub async fn fresh_check(&self, within: std::time::Duration) -> Option<bool> {
        let mut checks = self.checks.subscribe();
        let before = checks.borrow_and_update().began;
        self.sound_alarm();
        let done = checks.wait_for(|c| c.ended.is_some_and(|(n, _)| n > before));
        match tokio::time::timeout(within, done).await {
            Ok(Ok(checks)) => checks.ended.map(|(_, sound)| sound),
            _ => None,
        }
    }

    /// The newest flushed id seen in `partition`'s marker.
    pub fn seen(&self, partition: Partition) -> Option<EntryId> {
        EntryId::unpack(self.seen[partition.index()].load(Ordering::Relaxed))
    }

    /// Records that `partition`'s marker held `flushed`.
    pub fn learn(&self, partition: Partition, flushed: EntryId) {
        self.seen[partition.index()].fetch_max(flushed.pack(), Ordering::Relaxed);
    }

    /// Forgets what was seen of `partition` (after it was re-established
    /// from Postgres, its marker starts from Postgres's checkpoint).
    pub fn reset(&self, partition: Partition, flushed: Option<EntryId>) {
        self.seen[partition.index()].store(flushed.map_or(0, EntryId::pack), Ordering::Relaxed);
    }

    /// The flusher found `partition` rolled back: a ledger fork (Redis
    /// took writes before anything refused), or a Redis that lacks an
    /// entry the flusher read from it. The watchdog heals it.
    pub fn report_rollback(&self, partition: Partition) {
        self.rolled_back[partition.index()].store(true, Ordering::Relaxed);
        self.sound_alarm();
    }

    /// Whether a rollback was reported in `partition` since it was last
    /// healed.
    pub fn rolled_back(&self, partition: Partition) -> bool {
        self.rolled_back[partition.index()].load(Ordering::Relaxed)
    }

    /// A script found a partition lost or rolled back: the watchdog looks now.
    pub fn sound_alarm(&self) {
        self.alarm.notify_one();
    }

    pub async fn alarmed(&self) {
        self.alarm.notified().await
    }

    fn invocation(&self, partition: Partition) -> redis::ScriptInvocation<'static> {
        let mut inv = scripts::MARKER.prepare_invoke();
        inv.key(self.keys.marker(partition))
            .key(self.keys.seen(partition))
            .key(self.keys.events(partition));
        inv
    }

    /// The marker script reading `partition`'s marker (for a caller that
    /// batches it with the reads the marker vouches for).
    pub(crate) fn read_invocation(&self, partition: Partition) -> redis::ScriptInvocation<'static> {
        let mut inv = self.invocation(partition);
        inv.arg("read");
        inv
    }

    /// Reads every partition's marker, in one pipelined round trip (the
    /// caller decides what to learn from them).
    pub async fn read_all(
        &self,
        conn: &mut RedisConn,
    ) -> Result<Vec<MarkerState>, redis::RedisError> {
        let mut batch = CommandBatch::new();
        for p in self.keys.partitions() {
            batch.script(
                self.keys.marker(p),
                &scripts::MARKER,
                self.read_invocation(p),
            );
        }
        batch
            .query(conn)
            .await?
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(Into::into))
            .collect()
    }

    /// The partition is (re)established in this Redis: a fresh marker with
    /// `epoch` and `flushed` (Postgres's checkpoint) and, when given, the
    /// filter of ids Postgres knew.
    pub async fn establish(
        &self,
        conn: &mut RedisConn,
        partition: Partition,
        epoch: &str,
        flushed: Option<EntryId>,
        seen: Option<&SeenFilter>,
    ) -> Result<MarkerState, redis::RedisError> {
        let mut inv = self.invocation(partition);
        inv.arg("establish")
            .arg(epoch)
            .arg(flushed.map(|f| f.to_string()).unwrap_or_default());
        match seen {
            Some(filter) => inv.arg(filter.until_ms).arg(&filter.bytes).arg(filter.bits),
            None => inv.arg(0),
        };
        let state: MarkerState = inv.invoke_async(conn).await?;
        self.reset(partition, state.flushed);
        self.rolled_back[partition.index()].store(false, Ordering::Relaxed);
        Ok(state)
    }

    /// The flusher committed `partition` up to `flushed`: pipelined for
    /// every partition of a batch. A Redis that lacks such an entry (a
    /// failover to a lagging replica while the batch was retried) is not
    /// marked: it rolled back, which is reported for the watchdog to heal;
    /// marking it would have let every script take writes on the old state.
    pub async fn mark_flushed(
        &self,
        conn: &mut RedisConn,
        flushed: &[(Partition, EntryId)],
    ) -> Result<(), redis::RedisError> {
        if flushed.is_empty() {
            return Ok(());
        }
        // Learned first: a master that dies now never takes the mark, and
        // its replica must be refused all the same (the scripts accept a
        // marker behind it while the stream still holds the entry).
        for (p, id) in flushed {
            self.learn(*p, *id);
        }
        let mut batch = CommandBatch::new();
        for (p, id) in flushed {
            let mut inv = self.invocation(*p);
            inv.arg("flushed").arg(id.to_string());
            batch.script(self.keys.marker(*p), &scripts::MARKER, inv);
        }
        let replies = batch.query(conn).await?;
        for ((p, id), reply) in flushed.iter().zip(replies) {
            let state: MarkerState = redis::FromRedisValue::from_redis_value(reply)?;
            if state.unheld {
                tracing::error!(partition = %p, entry = %id, marker = ?state.flushed,
                    "Redis lacks an entry the flusher wrote to Postgres and its marker is behind \
                     it: the partition rolled back (a lagging replica took over); refusing it \
                     until it is healed from Postgres");
                self.report_rollback(*p);
            }
        }
        Ok(())
    }

    /// Opens or closes `partition`'s backlog gate.
    pub async fn set_gate(
        &self,
        conn: &mut RedisConn,
        partition: Partition,
        closed: bool,
    ) -> Result<MarkerState, redis::RedisError> {
        let mut inv = self.invocation(partition);
        inv.arg("gate").arg(if closed { "on" } else { "off" });
        inv.invoke_async(conn).await
    }

    /// Refuses everything on `partition` until `until_ms` (0 ends it).
    pub async fn set_heal(
        &self,
        conn: &mut RedisConn,
        partition: Partition,
        until_ms: i64,
    ) -> Result<MarkerState, redis::RedisError> {
        let mut inv = self.invocation(partition);
        inv.arg("heal").arg(until_ms);
        inv.invoke_async(conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fresh_check_is_one_that_began_after_the_call() {
        let markers = Markers::new(Keyspace::new("t", 1));
        let under_way = markers.begin_full_check();
        let waiter = {
            let markers = markers.clone();
            tokio::spawn(async move {
                markers
                    .fresh_check(std::time::Duration::from_secs(10))
                    .await
            })
        };
        // The waiter sounds the alarm once it is listening.
        markers.alarmed().await;
        markers.end_full_check(under_way, true);
        let fresh = markers.begin_full_check();
        markers.end_full_check(fresh, false);
        assert_eq!(waiter.await.unwrap(), Some(false), "the fresh one counts");
    }

    #[test]
    fn seen_only_moves_forward_until_reset() {
        let markers = Markers::new(Keyspace::new("t", 2));
        let p = Partition(1);
        assert_eq!(markers.seen(p), None);
        let a = EntryId { ms: 10, seq: 2 };
        let b = EntryId { ms: 11, seq: 0 };
        markers.learn(p, b);
        markers.learn(p, a);
        assert_eq!(markers.seen(p), Some(b));
        markers.reset(p, Some(a));
        assert_eq!(markers.seen(p), Some(a));
        assert_eq!(markers.seen(Partition(0)), None);
    }

    #[test]
    fn filters_hold_their_ids() {
        let ids = ["r-1", "r-2", "order-77"];
        let filter = SeenFilter::of(ids.iter().copied(), 1);
        let holds = |id: &str| {
            scripts::bloom_positions(id, filter.bits)
                .all(|p| filter.bytes[(p / 8) as usize] & (0x80 >> (p % 8)) != 0)
        };
        assert!(ids.iter().all(|id| holds(id)));
        let strangers = (0..1000).filter(|i| holds(&format!("x-{i}"))).count();
        assert!(strangers < 100, "{strangers} false positives of 1000");
    }
}
