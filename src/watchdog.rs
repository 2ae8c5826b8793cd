//! The watchdog: notices that Redis lost or rolled back a partition, and
//! restores it from Postgres before it serves again.
//!
//! What it watches, every `--epoch-check-ms`, at once when a script found a
//! marker missing or behind (the engine sounds [`Markers`]' alarm), and
//! fully when Redis' `run_id` changed (a restart, a failover):
//! - **loss**: a partition without its marker (`NS:{pNN}:marker` has no
//!   epoch). The scripts refuse such a partition in the very script that
//!   would have used it, so nothing is answered from an empty Redis.
//! - **rollback**: Postgres has flushed entries the partition's stream no
//!   longer has (its last id is below Postgres's checkpoint, or its marker
//!   is and the checkpoint's entry is not in the stream: new entries may
//!   have moved the last id on since): Redis came back from an older
//!   snapshot or AOF, or a lagging replica took over. The scripts also
//!   refuse a marker whose flushed id went back, and a ledger fork the
//!   flusher met (a version Postgres had, given out again) counts as one.
//!
//! Restoring a partition (one instance at a time, under a lock): refuse it
//! (a rollback: the marker's heal deadline), load every item whose Postgres
//! version is above Redis' (version-guarded, so newer Redis state is kept),
//! restore held reservations, finish in Redis the ones Postgres has
//! finished, give the partition a Bloom filter of the ids Postgres knows
//! (so retries of those replay), move the stream's last id up to
//! Postgres's checkpoint (new versions and entry ids continue above
//! everything Postgres has), and establish a fresh marker. What could not
//! be recovered is what Redis acknowledged but the flusher had not written
//! yet: the durability window of Redis' persistence settings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::engine::recall::restore_reservation;
use crate::error::Error;
use crate::events::EntryId;
use crate::keys::{Keyspace, Partition};
use crate::lock::RedisLock;
use crate::markers::{Markers, SeenFilter};
use crate::meta::SCHEMA_VERSION;
use crate::redis_conn::RedisConn;
use crate::store::{ReservationRow, Store};
use crate::warmer::Warmer;

/// How long the restore lock outlives its holder: the holder renews it
/// (every third of it) while it works, so an instance killed mid-restore
/// holds the others up this long at most.
const RESTORE_LOCK_TTL: Duration = Duration::from_secs(15);
/// How long a partition being healed refuses requests unless the healer
/// extends it (it does, per step): a healer that dies frees it by itself.
const HEAL_DEADLINE: Duration = Duration::from_secs(120);

/// How long a restore waits for the flusher's batch in hand to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Clock difference between Redis and Postgres allowed for when picking the
/// reservations a rolled-back Redis may hold in an older state.
const CLOCK_MARGIN: Duration = Duration::from_secs(120);
/// Postgres is compared even when nothing looks wrong, this often.
const FULL_CHECK_EVERY: Duration = Duration::from_secs(10);

/// What one look found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// Partitions re-established after their data was lost.
    pub restored: Vec<Partition>,
    /// Partitions healed after a rollback.
    pub healed: Vec<Partition>,
    /// Items loaded from Postgres and holds restored meanwhile.
    pub items: u64,
    pub holds: u64,
    /// Another instance holds the restore lock: this one waits.
    pub waiting: bool,
}

impl Check {
    pub fn is_steady(&self) -> bool {
        self.restored.is_empty() && self.healed.is_empty() && !self.waiting
    }
}

/// The trouble a partition is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    Lost,
    RolledBack { stream_last: EntryId },
}

#[derive(Clone)]
pub struct Watchdog {
    conn: RedisConn,
    keys: Keyspace,
    store: Store,
    warmer: Warmer,
    markers: Markers,
    window: Duration,
    /// The Redis process last seen (INFO server run_id).
    run_id: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Postgres's checkpoints as last read, for when it does not answer.
    checkpoints: std::sync::Arc<std::sync::Mutex<HashMap<u32, EntryId>>>,
}

impl Watchdog {
    pub fn new(
        conn: RedisConn,
        store: Store,
        warmer: Warmer,
        markers: Markers,
        window: Duration,
    ) -> Self {
        Self {
            conn,
            keys: warmer.keys().clone(),
            store,
            warmer,
            markers,
            window,
            run_id: Default::default(),
            checkpoints: Default::default(),
        }
    }

    /// Looks once; restores what needs it when this instance may.
    pub async fn check_once(&self) -> Result<Check, Error> {
        let troubles = self.troubles(true).await?;
        self.resolve(troubles).await
    }

    /// A cheap look (markers and the Redis process) that asks Postgres only
    /// when something looks wrong or `full` is set.
    async fn troubles(&self, full: bool) -> Result<BTreeMap<Partition, Trouble>, Error> {
        let mut conn = self.conn.clone();
        // Seen before the read: a flush marked meanwhile may be newer.
        let seen: Vec<Option<EntryId>> = self
            .keys
            .partitions()
            .map(|p| self.markers.seen(p))
            .collect();
        let states = self.markers.read_all(&mut conn).await?;
        let run_id = self.redis_run_id().await?;
        let restarted = {
            let mut known = self.run_id.lock().expect("run id lock");
            let changed = known.as_ref().is_some_and(|k| *k != run_id);
            *known = Some(run_id);
            changed
        };
        let mut troubles = BTreeMap::new();
        for (p, state) in self.keys.partitions().zip(&states) {
            if state.epoch.is_none() {
                troubles.insert(p, Trouble::Lost);
            }
        }
        let behind = states
            .iter()
            .zip(&seen)
            .any(|(s, seen)| s.epoch.is_some() && s.flushed < *seen);
        for (p, state) in self.keys.partitions().zip(&states) {
            if let (Some(flushed), false) = (state.flushed, behind) {
                self.markers.learn(p, flushed);
            }
        }
        let forked = self.keys.partitions().any(|p| self.markers.rolled_back(p));
        let suspicious = restarted || behind || forked;
        if !(full || suspicious) {
            return Ok(troubles);
        }
        if restarted {
            tracing::warn!("Redis restarted (or another node answers): comparing it with Postgres");
            // Its settings may have changed with it.
            if let Err(err) = crate::meta::check_redis_settings(&mut conn, true).await {
                tracing::warn!(error = %err, "cannot read the restarted Redis' settings");
            }
        }
        let checkpoints = self.checkpoints().await;
        let lasts = self.stream_last_ids().await?;
        for ((p, last), state) in self.keys.partitions().zip(lasts).zip(&states) {
            if troubles.contains_key(&p) {
                continue;
            }
            // The flusher found it rolled back (a fork: Redis gave out
            // versions Postgres had; or Redis lacks an entry it flushed),
            // whatever its stream and marker say now. Its holds may be as
            // old as the idempotency window.
            if self.markers.rolled_back(p) {
                let window_ago = EntryId {
                    ms: (now_ms() - self.window.as_millis() as i64).max(0) as u64,
                    seq: 0,
                };
                let since = last
                    .min(window_ago)
                    .min(state.flushed.unwrap_or(EntryId::ZERO));
                troubles.insert(p, Trouble::RolledBack { stream_last: since });
                continue;
            }
            let Some(&checkpoint) = checkpoints.get(&p.0) else {
                continue;
            };
            if last < checkpoint {
                troubles.insert(p, Trouble::RolledBack { stream_last: last });
                continue;
            }
            // The stream may have moved past the checkpoint with writes
            // taken after the rollback; the marker has not, and the flushed
            // entry is gone. (Entries are trimmed only once the flusher
            // acknowledged them, after marking them: a marker behind the
            // checkpoint in a sound Redis is a mark not yet written, with
            // the entry still in the stream.)
            if state.flushed.is_none_or(|f| f < checkpoint)
                && !self.stream_holds(p, checkpoint).await?
            {
                let since = state.flushed.unwrap_or(EntryId::ZERO).min(last);
                troubles.insert(p, Trouble::RolledBack { stream_last: since });
            }
        }
        Ok(troubles)
    }

    /// Restores the partitions in trouble (under the lock), and sets this
    /// instance's availability.
    async fn resolve(&self, troubles: BTreeMap<Partition, Trouble>) -> Result<Check, Error> {
        let availability = self.warmer.availability();
        if troubles.is_empty() {
            availability.set(true);
            return Ok(Check::default());
        }
        availability.set(false);
        let Some(lock) =
            RedisLock::acquire(&self.conn, self.keys.lock("rewarm"), RESTORE_LOCK_TTL).await?
        else {
            tracing::warn!(
                partitions = troubles.len(),
                "Redis lost or rolled back partitions; another instance is restoring them"
            );
            return Ok(Check {
                waiting: true,
                ..Check::default()
            });
        };
        let result = {
            let restore = self.restore(&troubles);
            tokio::pin!(restore);
            let mut renew = tokio::time::interval(RESTORE_LOCK_TTL / 3);
            renew.tick().await;
            loop {
                tokio::select! {
                    result = &mut restore => break result,
                    _ = renew.tick() => match lock.renew(RESTORE_LOCK_TTL).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("the restore lock expired while restoring"),
                        Err(err) => tracing::warn!(error = %err, "could not renew the restore lock"),
                    },
                }
            }
        };
        if let Err(err) = lock.release().await {
            tracing::warn!(error = %err, "could not release the restore lock; it expires by itself");
        }
        let check = result?;
        availability.set(true);
        Ok(check)
    }

    async fn restore(&self, troubles: &BTreeMap<Partition, Trouble>) -> Result<Check, Error> {
        let mut conn = self.conn.clone();
        let lost: Vec<Partition> = troubles
            .iter()
            .filter(|(_, t)| **t == Trouble::Lost)
            .map(|(p, _)| *p)
            .collect();
        let rolled: Vec<(Partition, EntryId)> = troubles
            .iter()
            .filter_map(|(p, t)| match t {
                Trouble::RolledBack { stream_last } => Some((*p, *stream_last)),
                Trouble::Lost => None,
            })
            .collect();
        let fresh_deployment = lost.len() == troubles.len() && self.store.is_empty().await?;
        if !lost.is_empty() && !fresh_deployment {
            counter!("stockd_redis_epoch_changes_total").increment(1);
            tracing::error!(partitions = ?lost, "Redis lost its data: re-warming from Postgres; \
                changes that had not been flushed to Postgres before the loss are gone");
        }
        for (p, last) in &rolled {
            counter!("stockd_redis_rollbacks_total").increment(1);
            tracing::error!(partition = %p, stream_last = %last,
                "Redis rolled back: Postgres holds changes this partition's stream no longer has; \
                 refusing it while it is brought back to the Postgres state");
        }
        let heal_until = now_ms() + HEAL_DEADLINE.as_millis() as i64;
        for (p, _) in &rolled {
            self.markers.set_heal(&mut conn, *p, heal_until).await?;
        }
        let affected: HashSet<Partition> = troubles.keys().copied().collect();

        // Every item whose Postgres version is above Redis' (all of them
        // after a loss); newer Redis state is never overwritten.
        // A batch this instance read from the Redis before the trouble and
        // has not written yet is written first.
        let flushes = self.markers.wait_for_flushes(FLUSH_WAIT).await;
        if flushes.is_none() {
            tracing::warn!(
                "restore: the flusher's batch in hand is still not written; restoring anyway"
            );
        }
        let counts = self.warmer.preload_all().await?;

        // Holds: held ones Redis lacks come back; after a rollback, the
        // ones Postgres has finished are finished in Redis too.
        let mut rows: Vec<ReservationRow> = self.store.held_reservations().await?;
        if let Some(oldest) = rolled.iter().map(|(_, last)| last.ms).min() {
            let since = oldest as i64 - CLOCK_MARGIN.as_millis() as i64;
            rows.extend(self.store.finished_reservations_since(since).await?);
        }
        let mut by_id: BTreeMap<&str, Vec<ReservationRow>> = BTreeMap::new();
        for row in &rows {
            by_id
                .entry(row.reservation_id.as_str())
                .or_default()
                .push(row.clone());
        }
        let mut holds = 0;
        for (id, rows) in &by_id {
            let touches = rows
                .iter()
                .any(|r| affected.contains(&Partition(r.partition)))
                || affected.contains(&self.keys.partition_of(id));
            if touches {
                restore_reservation(&self.conn, &self.keys, id, rows, self.window).await?;
                holds += 1;
            }
        }

        // Retries of ids Postgres knows must replay, not apply: each
        // partition gets the filter of the ids it may be asked about.
        let filters = self.seen_filters(&affected).await?;
        let checkpoints = self.checkpoints().await;
        let epoch = new_epoch_id();
        for p in &affected {
            let checkpoint = checkpoints.get(&p.0).copied();
            self.raise_stream_floor(*p, checkpoint).await?;
            self.markers
                .establish(&mut conn, *p, &epoch, checkpoint, filters.get(p))
                .await?;
        }
        let () = redis::cmd("HSET")
            .arg(self.keys.meta())
            .arg("partitions")
            .arg(self.keys.partition_count())
            .arg("schema")
            .arg(SCHEMA_VERSION)
            .arg("epoch")
            .arg(&epoch)
            .query_async(&mut conn)
            .await?;
        if !fresh_deployment {
            tracing::warn!(items = counts.loaded, holds, %epoch, restored = ?lost,
                healed = ?rolled.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
                "partitions restored from Postgres; serving them again");
        }
        Ok(Check {
            restored: lost,
            healed: rolled.into_iter().map(|(p, _)| p).collect(),
            items: counts.loaded,
            holds,
            waiting: false,
        })
    }

    /// Holds Postgres says are held and lapsed long ago: Redis should have
    /// expired them. When Redis lost their records (keys deleted or evicted
    /// while the partition kept its marker), they are put back, and the
    /// reaper expires them, so their units do not stay reserved for ever.
    pub async fn restore_overdue_holds(&self) -> Result<u64, Error> {
        let grace = (FULL_CHECK_EVERY * 3).as_millis() as i64;
        let rows = self.store.overdue_holds(grace, 500).await?;
        let mut by_id: BTreeMap<&str, Vec<ReservationRow>> = BTreeMap::new();
        for row in &rows {
            by_id
                .entry(row.reservation_id.as_str())
                .or_default()
                .push(row.clone());
        }
        let mut restored = 0;
        for (id, rows) in &by_id {
            if restore_reservation(&self.conn, &self.keys, id, rows, self.window).await? > 0 {
                restored += 1;
            }
        }
        if restored > 0 {
            counter!("stockd_holds_restored_total").increment(restored);
            tracing::warn!(
                restored,
                "put back lapsed holds whose records Redis had lost; \
                the reaper expires them now"
            );
        }
        Ok(restored)
    }

    /// The ids Postgres learned within the idempotency window, as a filter
    /// per affected partition: an id's rows' partitions and its own.
    async fn seen_filters(
        &self,
        affected: &HashSet<Partition>,
    ) -> Result<HashMap<Partition, SeenFilter>, Error> {
        let window_ms = self.window.as_millis() as i64;
        let mut ids: HashMap<Partition, Vec<String>> = HashMap::new();
        for (id, partition) in self.store.ids_seen_within(window_ms).await? {
            for p in [Partition(partition), self.keys.partition_of(&id)] {
                if affected.contains(&p) {
                    ids.entry(p).or_default().push(id.clone());
                }
            }
        }
        let until = now_ms() + window_ms;
        Ok(ids
            .into_iter()
            .map(|(p, ids)| (p, SeenFilter::of(ids.iter().map(String::as_str), until)))
            .collect())
    }

    /// Makes the stream exist with the flusher's group, and its last id at
    /// least Postgres's checkpoint: entries added from now on sort after
    /// every entry Postgres has.
    async fn raise_stream_floor(
        &self,
        partition: Partition,
        checkpoint: Option<EntryId>,
    ) -> Result<(), Error> {
        let stream = self.keys.events(partition);
        let mut conn = self.conn.clone();
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(crate::flusher::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
        let Some(checkpoint) = checkpoint else {
            return Ok(());
        };
        let last = self.stream_last_id(partition).await?;
        if last < checkpoint {
            let () = redis::cmd("XSETID")
                .arg(&stream)
                .arg(checkpoint.to_string())
                .query_async(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// The Redis processes serving now: every primary's `run_id` (one on a
    /// standalone Redis). A restart or a failover changes it.
    async fn redis_run_id(&self) -> Result<String, Error> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let mut ids: Vec<String> = Vec::new();
        for (node, value) in self.conn.on_every_primary(&info).await? {
            let text: String = redis::from_redis_value(value)
                .map_err(|e| Error::Internal(format!("INFO from {node}: {e}")))?;
            let run_id = text
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .unwrap_or_default()
                .trim();
            ids.push(format!("{node}={run_id}"));
        }
        ids.sort();
        Ok(ids.join(","))
    }

    /// Postgres's checkpoints; the last ones read when it does not answer
    /// (nothing can have been flushed since, then).
    async fn checkpoints(&self) -> HashMap<u32, EntryId> {
        match self.store.checkpoints().await {
            Ok(rows) => {
                let fresh: HashMap<u32, EntryId> = rows
                    .into_iter()
                    .filter_map(|(p, c)| EntryId::parse(&c.last_entry_id).map(|id| (p, id)))
                    .collect();
                *self.checkpoints.lock().expect("checkpoints lock") = fresh.clone();
                fresh
            }
            Err(err) => {
                tracing::warn!(error = %err, "watchdog: Postgres did not answer; using the checkpoints last read");
                self.checkpoints.lock().expect("checkpoints lock").clone()
            }
        }
    }

    /// Whether `partition`'s stream holds the entry `id`.
    async fn stream_holds(&self, partition: Partition, id: EntryId) -> Result<bool, Error> {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.events(partition))
            .arg(id.to_string())
            .arg(id.to_string())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(!entries.ids.is_empty())
    }

    /// The last id each partition stream ever generated (`0-0` for none).
    async fn stream_last_ids(&self) -> Result<Vec<EntryId>, Error> {
        let mut out = Vec::new();
        for p in self.keys.partitions() {
            out.push(self.stream_last_id(p).await?);
        }
        Ok(out)
    }

    async fn stream_last_id(&self, partition: Partition) -> Result<EntryId, Error> {
        let info: Result<redis::streams::StreamInfoStreamReply, redis::RedisError> =
            redis::cmd("XINFO")
                .arg("STREAM")
                .arg(self.keys.events(partition))
                .query_async(&mut self.conn.clone())
                .await;
        match info {
            Ok(info) => Ok(EntryId::parse(&info.last_generated_id).unwrap_or(EntryId::ZERO)),
            // No such stream: nothing was ever written there.
            Err(e) if e.code() == Some("ERR") => Ok(EntryId::ZERO),
            Err(e) => Err(e.into()),
        }
    }

    /// Looks every `interval` (and at once on an alarm) until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_full = std::time::Instant::now();
        loop {
            let alarmed = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => false,
                _ = self.markers.alarmed() => true,
            };
            let full = alarmed || last_full.elapsed() >= FULL_CHECK_EVERY;
            if full {
                last_full = std::time::Instant::now();
            }
            let number = full.then(|| self.markers.begin_full_check());
            let checked = match self.troubles(full).await {
                Ok(troubles) => self.resolve(troubles).await,
                Err(err) => Err(err),
            };
            if let Some(n) = number {
                self.markers
                    .end_full_check(n, matches!(&checked, Ok(check) if check.is_steady()));
            }
            if full && let Err(err) = self.restore_overdue_holds().await {
                tracing::warn!(error = %err, "checking for holds Redis lost failed; retrying");
            }
            match checked {
                Ok(check) if !check.is_steady() && !check.waiting => {
                    tracing::info!(restored = ?check.restored, healed = ?check.healed,
                        items = check.items, holds = check.holds, "restore finished");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "watchdog check failed; retrying"),
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn new_epoch_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{:x}", std::process::id())
}
