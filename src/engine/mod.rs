//! The stock engine: every stock operation as one script call in Redis.
//!
//! The engine lays a validated request out over partitions ([`plan`]),
//! runs its script with EVALSHA on the multiplexed connection every request
//! shares, and turns the typed reply into a domain result or an [`Error`].
//! It knows nothing about gRPC.
//!
//! Round trips: Reserve, Decrement, Adjust, SetStock and GetStock take one.
//! Commit, Release and Extend carry only the reservation id, and a script
//! must be handed every key it touches: the engine finds the reservation's
//! lines in its cache of reservations this instance made or saw (one round
//! trip), else in the reservation's locator (one more). The script re-checks
//! the fingerprint, so a stale cache entry is refused, not acted on.
//!
//! Besides the outcome, a script can answer that its partition refuses:
//! backlog over the limit, Redis lost its data, a rollback being healed or
//! detected ([`crate::markers`]); or that Postgres may know the id from
//! before Redis lost it, which the engine then looks up ([`recall`]) so that
//! a retry replays instead of applying twice.
//!
//! Future sizes: the rare paths (a lookup in Postgres, a load on miss, the
//! steps of a request spanning partitions on a cluster) are awaited boxed.
//! Their futures hold sqlx's and are ~9-10 KB; awaited inline they made
//! every request's future that large (Reserve's was 10,464 bytes; boxed,
//! 1,264), held for each request in flight and copied whole at every move
//! (into tonic's box, through each layer).

mod located;
mod plan;
pub(crate) mod recall;
mod steps;

pub use steps::decrement_of_internal;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Delta, Item, Level, Lines, RequestId, StockLevel, Ttl};
use crate::error::{ClosedState, Error, Shortage, UnknownItem};
use crate::keys::{Keyspace, Partition, fnv1a_64};
use crate::markers::{MarkerState, Markers};
use crate::redis_conn::{CommandBatch, RedisConn};
use crate::scripts::{self, Flags, Outcome, Refusal, ScriptLine, ScriptReply, StoredOutcome};
use crate::warmer::Warmer;

use located::{Located, LocatorCache};
use plan::{Kind, Plan};

/// Operational settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a finished reservation and a request's outcome are kept, so
    /// that a retry within the window replays the first outcome.
    pub idempotency_window: Duration,
    /// Memory for the reservations whose lines this instance remembers
    /// (Commit, Release and Extend of those take one round trip), in bytes.
    pub located_budget_bytes: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            idempotency_window: Duration::from_secs(24 * 3600),
            // About 85,000 one-line or 30,000 five-line reservations.
            located_budget_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A reservation after Reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub expires_at_ms: i64,
    pub levels: Vec<StockLevel>,
    pub replayed: bool,
}

/// The levels after a change (or, when `replayed`, after the first one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub levels: Vec<StockLevel>,
    pub replayed: bool,
}

/// What the reaper's attempt to expire one reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// This call released the hold with op `expire`.
    Expired,
    /// Someone else finished it first, or it was extended: nothing to do.
    NotDue,
    /// The id no longer names a reservation in that partition.
    Unknown,
    /// The reservation's records and the stock disagree: it cannot be
    /// finished without an operator (the detail says why).
    Broken(String),
}

/// The end of a held reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Commit,
    Release,
    Expire,
}

impl Finish {
    fn op(self) -> &'static str {
        match self {
            Finish::Commit => "commit",
            Finish::Release => "release",
            Finish::Expire => "expire",
        }
    }
}

/// Three string fields of a record, as HMGET reads them (a locator's
/// `fp`, `parts` and `all`).
/// How long a request waits for the watchdog to compare Redis with
/// Postgres before it answers UNAVAILABLE.
const FRESH_CHECK_WAIT: Duration = Duration::from_secs(2);

type LocatorFields = (Option<String>, Option<String>, Option<String>);

/// A part record's `fp`, `lines` and `coord` (its coordinator's partition).
type PartFields = (Option<String>, Option<String>, Option<u32>);

/// What Commit, Release and Extend do to a held reservation.
#[derive(Debug, Clone, Copy)]
enum OnHeld {
    Finish(Finish),
    Extend(Duration),
}

/// Whether a script may create an item Redis and Postgres both lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creates {
    No,
    /// SetStock: after Postgres was asked, a missing item is created.
    AfterLoad,
}

/// How a script call is laid out beyond its plan.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Write (or check) the id's locator in the same script, when it is a
    /// record of its own. Never on a cluster, where the script could not
    /// touch its partition: the engine writes it afterwards.
    locator: bool,
    creates: Creates,
    /// A part of a request coordinated in this partition (cluster).
    part_of: Option<Partition>,
}

impl Mode {
    const PLAIN: Mode = Mode {
        locator: false,
        creates: Creates::No,
        part_of: None,
    };
    const LOCATED: Mode = Mode {
        locator: true,
        creates: Creates::No,
        part_of: None,
    };

    fn part_of(coordinator: Partition) -> Mode {
        Mode {
            part_of: Some(coordinator),
            ..Mode::PLAIN
        }
    }
}

/// The operations of `scripts/`, against one Redis and one keyspace.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConn,
    keys: Keyspace,
    settings: EngineSettings,
    markers: Markers,
    located: LocatorCache,
    /// Loads misses from Postgres, looks up ids Redis forgot, and tells
    /// whether this instance serves; absent when the engine runs without
    /// Postgres (tests of the scripts alone).
    warmer: Option<Warmer>,
}

impl Engine {
    pub fn new(
        conn: RedisConn,
        keys: Keyspace,
        markers: Markers,
        settings: EngineSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn,
                located: LocatorCache::new(settings.located_budget_bytes),
                keys,
                settings,
                markers,
                warmer: None,
            }),
        }
    }

    /// Loads items a request misses from Postgres through `warmer`, asks
    /// Postgres for ids Redis may have forgotten, and refuses requests while
    /// the warmer's availability is closed.
    pub fn with_warmer(self, warmer: Warmer) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            conn: shared.conn.clone(),
            keys: shared.keys.clone(),
            settings: shared.settings.clone(),
            markers: shared.markers.clone(),
            located: LocatorCache::new(shared.settings.located_budget_bytes),
            warmer: shared.warmer.clone(),
        });
        Self {
            inner: Arc::new(Inner {
                warmer: Some(warmer),
                ..inner
            }),
        }
    }

    pub fn keys(&self) -> &Keyspace {
        &self.inner.keys
    }

    pub fn markers(&self) -> &Markers {
        &self.inner.markers
    }

    fn conn(&self) -> RedisConn {
        self.inner.conn.clone()
    }

    fn window_ms(&self) -> String {
        self.inner
            .settings
            .idempotency_window
            .as_millis()
            .to_string()
    }

    /// UNAVAILABLE while this instance re-warms Redis after a data loss.
    fn ensure_serving(&self) -> Result<(), Error> {
        match &self.inner.warmer {
            Some(w) if !w.availability().is_serving() => Err(Error::Unavailable(
                "re-warming Redis from Postgres after a data loss".into(),
            )),
            _ => Ok(()),
        }
    }

    pub async fn reserve(
        &self,
        id: &RequestId,
        lines: &Lines,
        ttl: Ttl,
    ) -> Result<Reserved, Error> {
        self.ensure_serving()?;
        let ttl_ms = ttl.as_millis().to_string();
        let fp = fingerprint("reserve", &[&ttl_ms], lines_for_fingerprint(lines));
        let script_lines = lines
            .iter()
            .map(|l| ScriptLine::new(&l.item, l.quantity.get()))
            .collect();
        let plan = Plan::new(
            &self.inner.keys,
            Kind::Reservation,
            id.as_str(),
            script_lines,
        );
        let outcome = if self.coordinates(&plan) {
            Box::pin(self.reserve_across(&plan, &fp, Duration::from_millis(ttl.as_millis())))
                .await?
        } else {
            let groups = plan.reservation_groups(&self.inner.keys, &self.inner.markers);
            self.run(
                &scripts::RESERVE,
                &plan,
                &fp,
                &groups,
                Mode::LOCATED,
                [ttl_ms, self.window_ms()],
            )
            .await?
        };
        let Outcome::Applied { out, replayed } = outcome else {
            return Err(refusal(outcome, id));
        };
        self.claim_locator(
            &plan,
            &fp,
            Duration::from_millis(ttl.as_millis()) + self.inner.settings.idempotency_window * 2,
        );
        let out =
            StoredOutcome::parse(&out).map_err(|e| Error::Internal(format!("reserve: {e}")))?;
        self.inner
            .located
            .remember(id.as_str(), Located::of_plan(&plan, fp));
        Ok(Reserved {
            expires_at_ms: out
                .exp
                .ok_or_else(|| Error::Internal("reserve outcome without exp".into()))?,
            levels: levels(out.levels),
            replayed,
        })
    }

    pub async fn commit(&self, id: &RequestId) -> Result<Changed, Error> {
        self.finish(id, Finish::Commit).await
    }

    pub async fn release(&self, id: &RequestId) -> Result<Changed, Error> {
        self.finish(id, Finish::Release).await
    }

    pub async fn extend(&self, id: &RequestId, ttl: Ttl) -> Result<i64, Error> {
        self.ensure_serving()?;
        let outcome = self
            .on_located(id, OnHeld::Extend(Duration::from_millis(ttl.as_millis())))
            .await?;
        match outcome {
            Outcome::Applied { out, .. } => out
                .parse()
                .map_err(|_| Error::Internal(format!("extend reply {out:?} is not a time"))),
            other => Err(refusal(other, id)),
        }
    }

    pub async fn decrement(&self, id: &RequestId, lines: &Lines) -> Result<Changed, Error> {
        let fp = fingerprint("decrement", &[], lines_for_fingerprint(lines));
        let lines = lines
            .iter()
            .map(|l| ScriptLine::new(&l.item, -l.quantity.get()))
            .collect();
        self.apply(id, fp, "decrement", lines).await
    }

    pub async fn adjust(
        &self,
        id: &RequestId,
        item: &Item,
        delta: Delta,
        reason: &str,
    ) -> Result<Changed, Error> {
        let delta_text = delta.get().to_string();
        let fp = fingerprint(
            "adjust",
            &[
                item.sku.as_str(),
                item.location.as_str(),
                &delta_text,
                reason,
            ],
            Vec::new(),
        );
        self.apply(id, fp, "adjust", vec![ScriptLine::new(item, delta.get())])
            .await
    }

    async fn apply(
        &self,
        id: &RequestId,
        fp: String,
        op: &str,
        lines: Vec<ScriptLine>,
    ) -> Result<Changed, Error> {
        self.ensure_serving()?;
        let plan = Plan::new(&self.inner.keys, Kind::Request, id.as_str(), lines);
        let outcome = if self.coordinates(&plan) {
            Box::pin(self.decrement_across(&plan, &fp)).await?
        } else {
            let groups = plan.change_groups(&self.inner.keys, &self.inner.markers);
            self.run(
                &scripts::APPLY,
                &plan,
                &fp,
                &groups,
                Mode::LOCATED,
                [op.to_owned(), self.window_ms()],
            )
            .await?
        };
        if matches!(outcome, Outcome::Applied { .. }) {
            self.claim_locator(&plan, &fp, self.inner.settings.idempotency_window);
        }
        changed(outcome, id)
    }

    pub async fn set(
        &self,
        id: &RequestId,
        item: &Item,
        available: Level,
        expected_version: Option<i64>,
    ) -> Result<Changed, Error> {
        self.ensure_serving()?;
        let expected = expected_version.map(|v| v.to_string()).unwrap_or_default();
        let target = available.get().to_string();
        let fp = fingerprint(
            "set",
            &[
                item.sku.as_str(),
                item.location.as_str(),
                &target,
                &expected,
            ],
            Vec::new(),
        );
        let plan = Plan::new(
            &self.inner.keys,
            Kind::Request,
            id.as_str(),
            vec![ScriptLine::new(item, available.get())],
        );
        let groups = plan.change_groups(&self.inner.keys, &self.inner.markers);
        let outcome = self
            .run(
                &scripts::SET,
                &plan,
                &fp,
                &groups,
                Mode {
                    creates: Creates::AfterLoad,
                    ..Mode::LOCATED
                },
                [expected, self.window_ms()],
            )
            .await?;
        if let Outcome::Version(current) = outcome {
            return Err(Error::VersionMismatch {
                expected: expected_version.unwrap_or_default(),
                current,
            });
        }
        if matches!(outcome, Outcome::Applied { .. }) {
            self.claim_locator(&plan, &fp, self.inner.settings.idempotency_window);
        }
        changed(outcome, id)
    }

    /// Reads the levels of `items`; items Redis lacks (and Postgres too)
    /// come back in `missing`. One pipelined round trip, which also reads
    /// the partitions' markers: a partition that is lost, being healed or
    /// rolled back answers UNAVAILABLE rather than stale stock.
    pub async fn get(&self, items: &[Item]) -> Result<(Vec<StockLevel>, Vec<Item>), Error> {
        self.ensure_serving()?;
        let (mut levels, missing) = self.read(items).await?;
        let Some(warmer) = self.inner.warmer.as_ref().filter(|_| !missing.is_empty()) else {
            return Ok((levels, missing));
        };
        let unknown = Box::pin(warmer.load_on_miss(&missing)).await?;
        let loaded: Vec<Item> = missing
            .into_iter()
            .filter(|i| !unknown.contains(i))
            .collect();
        let (more, _) = self.read(&loaded).await?;
        levels.extend(more);
        Ok((levels, unknown))
    }

    async fn read(&self, items: &[Item]) -> Result<(Vec<StockLevel>, Vec<Item>), Error> {
        if items.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let keys = &self.inner.keys;
        let mut partitions: Vec<Partition> = items
            .iter()
            .map(|i| keys.partition_of(i.sku.as_str()))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        // What was seen before the read is what the markers must not be
        // behind (a flush marked meanwhile may legitimately be newer).
        let seen: Vec<Option<crate::events::EntryId>> = partitions
            .iter()
            .map(|&p| self.inner.markers.seen(p))
            .collect();
        let mut batch = CommandBatch::new();
        for &p in &partitions {
            batch.script(
                keys.marker(p),
                &scripts::MARKER,
                self.inner.markers.read_invocation(p),
            );
        }
        for item in items {
            let key = keys.stock(item.sku.as_str(), item.location.as_str());
            let mut read = redis::cmd("HMGET");
            read.arg(&key).arg(&["avail", "resv", "ver"]);
            batch.cmd(key, read);
        }
        let replies = batch.query(&self.inner.conn).await?;
        let (markers, rows) = replies.split_at(partitions.len());
        for ((&p, marker), seen) in partitions.iter().zip(markers).zip(seen) {
            let state: MarkerState = redis::FromRedisValue::from_redis_value(marker.clone())
                .map_err(|e| Error::Internal(format!("marker reply: {e}")))?;
            // A marker behind what this instance saw is a rollback only when
            // the stream lacks that entry too (as `marker_refusal` in
            // common.lua judges it): between a flush's commit and its
            // marking, the instance already knows the newer id. Rare, so
            // the stream is asked only then.
            let seen = match seen {
                Some(id) if state.epoch.is_some() && state.flushed < Some(id) => {
                    let stream = keys.events(p);
                    let held: Vec<redis::Value> = redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(id.to_string())
                        .arg(id.to_string())
                        .query_async(&mut self.inner.conn.clone())
                        .await?;
                    (held.is_empty()).then_some(id)
                }
                other => other,
            };
            self.check_read_marker(p, &state, seen)?;
        }
        let mut levels = Vec::new();
        let mut missing = Vec::new();
        for (item, row) in items.iter().zip(rows) {
            let row: (Option<i64>, Option<i64>, Option<i64>) =
                redis::FromRedisValue::from_redis_value(row.clone())
                    .map_err(|e| Error::Internal(format!("stock reply: {e}")))?;
            match row {
                (Some(available), Some(reserved), Some(version)) => levels.push(StockLevel {
                    sku: item.sku.to_string(),
                    location: item.location.to_string(),
                    available,
                    reserved,
                    version,
                }),
                _ => missing.push(item.clone()),
            }
        }
        Ok((levels, missing))
    }

    /// The refusals of a script's marker check, for reads.
    fn check_read_marker(
        &self,
        p: Partition,
        state: &MarkerState,
        seen: Option<crate::events::EntryId>,
    ) -> Result<(), Error> {
        let markers = &self.inner.markers;
        let refused = if state.epoch.is_none() {
            Some(Refusal::Lost)
        } else if state.heal_until_ms.is_some_and(|until| until > now_ms()) {
            Some(Refusal::Healing)
        } else if seen.is_some_and(|seen| state.flushed < Some(seen)) {
            Some(Refusal::RolledBack)
        } else {
            None
        };
        if let Some(flushed) = state.flushed {
            markers.learn(p, flushed);
        }
        match refused {
            Some(why) => Err(self.partition_refused(why, &self.inner.keys.marker(p))),
            None => Ok(()),
        }
    }

    /// Ids of `partition`'s reservations whose hold has lapsed, at most `limit`.
    pub async fn due_reservations(
        &self,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        let mut invocation = scripts::DUE.prepare_invoke();
        invocation
            .key(self.inner.keys.reservation_expiry(partition))
            .key(self.inner.keys.marker(partition))
            .arg(limit);
        Ok(invocation.invoke_async(&mut self.conn()).await?)
    }

    /// Drops an id from a partition's expiry index (so the reaper does not
    /// look at it again): it names no reservation there any more, or one
    /// that is broken and parked for an operator.
    pub async fn forget_expiry(&self, partition: Partition, id: &str) -> Result<(), Error> {
        let _: i64 = redis::cmd("ZREM")
            .arg(self.inner.keys.reservation_expiry(partition))
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Moves a reservation the reaper cannot finish out of its way: a
    /// dead-letter entry in the partition (with the reason) for an
    /// operator, and out of the expiry index. Its records and stock stay as
    /// they are, to be looked at.
    pub async fn park_broken_reservation(
        &self,
        partition: Partition,
        id: &str,
        reason: &str,
    ) -> Result<(), Error> {
        let keys = &self.inner.keys;
        redis::pipe()
            .cmd("XADD")
            .arg(keys.dead_letters(partition))
            .arg("*")
            .arg("reservation")
            .arg(id)
            .arg("reason")
            .arg(reason)
            .ignore()
            .cmd("ZREM")
            .arg(keys.reservation_expiry(partition))
            .arg(id)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Expires the reservation `id` of `partition` if its hold has lapsed
    /// (the reaper's call). The reaper found the id in that partition's
    /// expiry index, so the partition's record is read first: for a
    /// reservation of one partition it holds every line.
    pub async fn expire(&self, partition: Partition, id: &str) -> Result<Expiry, Error> {
        let keys = &self.inner.keys;
        // The partition's record of the reservation, or (on a cluster) its
        // part of one that spans partitions: both in one round trip.
        let ((fp, parts, lines), (part_fp, part_lines, coordinator)): (LocatorFields, PartFields) =
            redis::pipe()
                .cmd("HMGET")
                .arg(keys.reservation(partition, id))
                .arg(&["fp", "parts", "lines"])
                .cmd("HMGET")
                .arg(keys.part(partition, id))
                .arg(&["fp", "lines", "coord"])
                .query_async(&mut self.conn())
                .await?;
        if let (Some(fp), Some(lines), Some(coordinator)) = (part_fp, part_lines, coordinator) {
            let part =
                Located::parse(fp, &partition.to_string(), &lines).map_err(Error::Internal)?;
            return self
                .expire_part(partition, id, &part, Partition(coordinator))
                .await;
        }
        let (Some(fp), Some(parts), Some(lines)) = (fp, parts, lines) else {
            return Ok(Expiry::Unknown);
        };
        let located = if parts == partition.to_string() {
            Located::parse(fp, &parts, &lines).map_err(Error::Internal)?
        } else {
            let id = RequestId::parse("reservation_id", id)?;
            match self.locate(&id).await {
                Ok(located) => located,
                Err(Error::UnknownReservation(_)) => return Ok(Expiry::Unknown),
                Err(e) => return Err(e),
            }
        };
        let window = self.window_ms();
        let plan = located
            .plan(keys, id)
            .ok_or_else(|| Error::Internal(format!("reservation {id}: lines outside its parts")))?;
        let groups = plan.reservation_groups(keys, &self.inner.markers);
        let outcome = self
            .run(
                &scripts::FINISH,
                &plan,
                &located.fingerprint,
                &groups,
                Mode::PLAIN,
                [Finish::Expire.op().to_owned(), window],
            )
            .await?;
        Ok(match outcome {
            Outcome::Applied { .. } => Expiry::Expired,
            Outcome::NotDue | Outcome::State(_) => Expiry::NotDue,
            Outcome::Unknown => Expiry::Unknown,
            Outcome::Corrupt(detail) => Expiry::Broken(detail),
            other => Expiry::Broken(format!("finish answered {other:?}")),
        })
    }

    async fn finish(&self, id: &RequestId, how: Finish) -> Result<Changed, Error> {
        self.ensure_serving()?;
        let outcome = self.on_located(id, OnHeld::Finish(how)).await?;
        changed(outcome, id)
    }

    /// Runs `script` on the reservation `id` as this instance remembers
    /// it; when the script does not know that reservation (the id was
    /// finished and reused meanwhile), once more as its locator says now.
    async fn on_located(&self, id: &RequestId, op: OnHeld) -> Result<Outcome, Error> {
        let keys = &self.inner.keys;
        let window = self.window_ms();
        let mut cached = self.inner.located.get(id.as_str());
        loop {
            let from_cache = cached.is_some();
            let located = match cached.take() {
                Some(located) => located,
                None => self.locate_in_redis(id).await?,
            };
            let plan = located.plan(keys, id.as_str()).ok_or_else(|| {
                Error::Internal(format!("reservation {id}: lines outside its parts"))
            })?;
            let fp = &located.fingerprint;
            let outcome = match op {
                OnHeld::Finish(how) if self.coordinates(&plan) => {
                    Box::pin(self.finish_across(&plan, fp, how)).await?
                }
                OnHeld::Extend(ttl) if self.coordinates(&plan) => {
                    Box::pin(self.extend_across(&plan, fp, ttl)).await?
                }
                OnHeld::Finish(how) => {
                    let groups = plan.reservation_groups(keys, &self.inner.markers);
                    self.run(
                        &scripts::FINISH,
                        &plan,
                        fp,
                        &groups,
                        Mode::PLAIN,
                        [how.op().to_owned(), window.clone()],
                    )
                    .await?
                }
                OnHeld::Extend(ttl) => {
                    let groups = plan.reservation_groups(keys, &self.inner.markers);
                    let outcome = self
                        .run(
                            &scripts::EXTEND,
                            &plan,
                            fp,
                            &groups,
                            Mode::LOCATED,
                            [ttl.as_millis().to_string(), window.clone()],
                        )
                        .await?;
                    if matches!(outcome, Outcome::Applied { .. }) {
                        self.claim_locator(
                            &plan,
                            fp,
                            ttl + self.inner.settings.idempotency_window * 2,
                        );
                    }
                    outcome
                }
            };
            if outcome == Outcome::Unknown && from_cache {
                self.inner.located.forget(id.as_str());
                continue;
            }
            return Ok(outcome);
        }
    }

    /// The reservation `id`'s fingerprint, partitions and lines: from this
    /// instance's cache, else from its locator in Redis, else (when Redis
    /// may have lost it) from Postgres, put back into Redis first.
    async fn locate(&self, id: &RequestId) -> Result<Located, Error> {
        match self.inner.located.get(id.as_str()) {
            Some(located) => Ok(located),
            None => self.locate_in_redis(id).await,
        }
    }

    /// The reservation as its locator in Redis (or Postgres) says now.
    async fn locate_in_redis(&self, id: &RequestId) -> Result<Located, Error> {
        let keys = &self.inner.keys;
        let home = keys.partition_of(id.as_str());
        let mut recalled = false;
        loop {
            // The home partition's marker in the same round trip: a locator
            // missing from a Redis that lost or rolled back that partition
            // says nothing (the hold may be live), so that is UNAVAILABLE,
            // never NOT_FOUND.
            let seen = self.inner.markers.seen(home);
            let mut batch = CommandBatch::new();
            batch.script(
                keys.marker(home),
                &scripts::MARKER,
                self.inner.markers.read_invocation(home),
            );
            let mut locator = redis::cmd("HMGET");
            locator
                .arg(keys.reservation(home, id.as_str()))
                .arg(&["fp", "parts", "all"]);
            batch.cmd(keys.reservation(home, id.as_str()), locator);
            let mut until = redis::cmd("HGET");
            until.arg(keys.marker(home)).arg("seen_until");
            batch.cmd(keys.marker(home), until);
            let replies = batch.query(&self.inner.conn).await?;
            let [marker, locator, until] = <[redis::Value; 3]>::try_from(replies)
                .map_err(|r| Error::Internal(format!("locator reply of {} parts", r.len())))?;
            let state: MarkerState = redis::FromRedisValue::from_redis_value(marker)
                .map_err(|e| Error::Internal(format!("marker reply: {e}")))?;
            self.check_read_marker(home, &state, seen)?;
            let (fp, parts, all): LocatorFields = redis::FromRedisValue::from_redis_value(locator)
                .map_err(|e| Error::Internal(format!("locator reply: {e}")))?;
            let seen_until: Option<i64> = redis::FromRedisValue::from_redis_value(until)
                .map_err(|e| Error::Internal(format!("locator reply: {e}")))?;
            if let (Some(fp), Some(parts), Some(all)) = (fp, parts, all) {
                let located = Located::parse(fp, &parts, &all).map_err(Error::Internal)?;
                self.inner.located.remember(id.as_str(), located.clone());
                return Ok(located);
            }
            // On a cluster the locator of a reservation of one partition is
            // written after it, and may be missing: look in every partition.
            if self.inner.conn.is_cluster()
                && let Some(located) = self.probe(id.as_str()).await?
            {
                self.inner.located.remember(id.as_str(), located.clone());
                return Ok(located);
            }
            // Only a partition re-established from Postgres within the
            // window may have forgotten a reservation Postgres knows.
            let maybe_forgotten = seen_until.is_some_and(|until| until > now_ms());
            if recalled {
                return Err(unknown_reservation(id));
            }
            if !maybe_forgotten && !self.lost_alone(id).await? {
                return Err(unknown_reservation(id));
            }
            recalled = true;
            if !Box::pin(self.recall_reservation(id.as_str())).await? {
                return Err(unknown_reservation(id));
            }
        }
    }

    /// Whether Redis lost the reservation `id` alone, its partitions being
    /// sound: Postgres knows it and a fresh watchdog check found nothing
    /// lost or rolled back (then it is recalled from Postgres). A Redis
    /// that rolled back where no stream shows it yet (the id's partition
    /// flushed nothing since) looks like this at first: the check heals
    /// it, and the client's retry finds the hold; never NOT_FOUND.
    async fn lost_alone(&self, id: &RequestId) -> Result<bool, Error> {
        let Some(warmer) = &self.inner.warmer else {
            return Ok(false);
        };
        if warmer
            .store()
            .reservation_rows(id.as_str())
            .await?
            .is_empty()
        {
            return Ok(false);
        }
        match self.inner.markers.fresh_check(FRESH_CHECK_WAIT).await {
            Some(true) => Ok(true),
            _ => Err(Error::Unavailable(format!(
                "reservation {id} is known to Postgres, not to Redis: Redis is being checked"
            ))),
        }
    }

    /// The reservation `id` of one partition, found by reading its record
    /// in every partition (one batch; a locator's absence is rare).
    async fn probe(&self, id: &str) -> Result<Option<Located>, Error> {
        let keys = &self.inner.keys;
        let mut batch = CommandBatch::new();
        for p in keys.partitions() {
            let record = keys.reservation(p, id);
            let mut read = redis::cmd("HMGET");
            read.arg(&record).arg(&["fp", "parts", "lines", "coord"]);
            batch.cmd(record, read);
        }
        for (p, reply) in keys.partitions().zip(batch.query(&self.inner.conn).await?) {
            let (fp, parts, lines, coordinator): (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            ) = redis::from_redis_value(reply)
                .map_err(|e| Error::Internal(format!("reservation record: {e}")))?;
            if let (Some(fp), Some(parts), Some(lines), None) = (fp, parts, lines, coordinator)
                && parts == p.to_string()
            {
                return Located::parse(fp, &parts, &lines)
                    .map(Some)
                    .map_err(Error::Internal);
            }
        }
        Ok(None)
    }

    /// Runs a stock-changing script: loads items it misses from Postgres,
    /// looks up ids Postgres may know, and turns partition refusals into
    /// errors; returns every other outcome for the caller to interpret.
    async fn run(
        &self,
        script: &redis::Script,
        plan: &Plan,
        fp: &str,
        groups: &[scripts::Group],
        mode: Mode,
        params: [String; 2],
    ) -> Result<Outcome, Error> {
        let keys = &self.inner.keys;
        let with_locator = mode.locator && !self.inner.conn.is_cluster();
        let creates = mode.creates;
        let mut flags = Flags {
            part_of: mode.part_of,
            ..Flags::default()
        };
        let mut loaded = false;
        loop {
            let layout = plan.layout(keys, fp, groups, with_locator, flags, params.clone());
            let reply: ScriptReply = layout
                .invocation(script)
                .invoke_async(&mut self.conn())
                .await?;
            for (group, flushed) in groups.iter().zip(&reply.flushed) {
                if let Some(flushed) = flushed {
                    self.inner.markers.learn(group.partition, *flushed);
                }
            }
            match reply.outcome {
                Outcome::Refused(why, marker) => return Err(self.partition_refused(why, &marker)),
                Outcome::CheckPostgres if !flags.checked => {
                    Box::pin(self.recall(plan)).await?;
                    flags.checked = true;
                }
                Outcome::Missing(items) if !loaded => {
                    loaded = true;
                    let unknown = Box::pin(self.load_missing(&items)).await?;
                    match unknown {
                        // No warmer (tests of the scripts alone): create.
                        None if creates == Creates::AfterLoad => flags.create = true,
                        None => return Ok(Outcome::Missing(items)),
                        Some(unknown) if creates == Creates::AfterLoad => {
                            flags.create = !unknown.is_empty();
                        }
                        Some(unknown) if unknown.is_empty() => {}
                        Some(unknown) => return Ok(Outcome::Missing(unknown)),
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// The error for a partition that refuses; a lost or rolled-back one
    /// wakes the watchdog at once.
    fn partition_refused(&self, why: Refusal, marker: &str) -> Error {
        match why {
            Refusal::Backlog => Error::Backlogged(marker.to_owned()),
            Refusal::Healing => Error::Unavailable(format!(
                "{marker}: Redis rolled back; restoring this partition from Postgres"
            )),
            Refusal::Lost | Refusal::RolledBack => {
                self.inner.markers.sound_alarm();
                Error::Unavailable(format!(
                    "{marker}: Redis {} this partition; it is being restored from Postgres",
                    if why == Refusal::Lost {
                        "lost"
                    } else {
                        "rolled back"
                    }
                ))
            }
        }
    }

    /// After a script answered `missing`: loads the missing items from
    /// Postgres (once per item, however many requests wait). Returns the
    /// items Postgres lacks too, or `None` without a warmer.
    async fn load_missing(
        &self,
        missing: &[(String, String)],
    ) -> Result<Option<Vec<(String, String)>>, Error> {
        let Some(warmer) = &self.inner.warmer else {
            return Ok(None);
        };
        let items = missing
            .iter()
            .map(|(sku, location)| Item::parse("", sku.clone(), location.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let unknown = warmer.load_on_miss(&items).await?;
        Ok(Some(
            unknown
                .into_iter()
                .map(|i| (i.sku.to_string(), i.location.to_string()))
                .collect(),
        ))
    }
}

impl ScriptLine {
    fn new(item: &Item, amount: i64) -> Self {
        Self {
            sku: item.sku.to_string(),
            location: item.location.to_string(),
            amount,
        }
    }
}

/// Unix milliseconds by this machine's clock (only compared with times
/// Redis wrote with a margin of seconds: heal deadlines, filter expiry).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn levels(levels: Vec<(String, String, i64, i64, i64)>) -> Vec<StockLevel> {
    levels
        .into_iter()
        .map(|(sku, location, available, reserved, version)| StockLevel {
            sku,
            location,
            available,
            reserved,
            version,
        })
        .collect()
}

fn changed(outcome: Outcome, id: &RequestId) -> Result<Changed, Error> {
    let Outcome::Applied { out, replayed } = outcome else {
        return Err(refusal(outcome, id));
    };
    let out = StoredOutcome::parse(&out).map_err(Error::Internal)?;
    Ok(Changed {
        levels: levels(out.levels),
        replayed,
    })
}

fn unknown_reservation(id: &RequestId) -> Error {
    Error::UnknownReservation(id.to_string())
}

/// The error a script's refusal stands for.
fn refusal(outcome: Outcome, id: &RequestId) -> Error {
    match outcome {
        Outcome::Exists => {
            Error::AlreadyExists(format!("id {id} was already used for a different request"))
        }
        Outcome::Missing(items) => Error::UnknownItems(
            items
                .into_iter()
                .map(|(sku, location)| UnknownItem { sku, location })
                .collect(),
        ),
        Outcome::Short(lines) => Error::InsufficientStock(
            lines
                .into_iter()
                .map(|(sku, location, requested, available)| Shortage {
                    sku,
                    location,
                    requested,
                    available,
                })
                .collect(),
        ),
        Outcome::Ceiling(lines) => {
            let names: Vec<String> = lines
                .iter()
                .map(|(s, l, d, a)| format!("{l}/{s} (available {a}, delta {d})"))
                .collect();
            Error::FailedPrecondition(format!(
                "available would pass {}: {}",
                crate::domain::MAX_AVAILABLE,
                names.join(", ")
            ))
        }
        Outcome::Unknown => unknown_reservation(id),
        Outcome::State(state) => match ClosedState::parse(&state) {
            Some(state) => Error::ReservationClosed {
                id: id.to_string(),
                state,
            },
            None => Error::Internal(format!("reservation {id} is in state {state:?}")),
        },
        Outcome::NotDue => Error::FailedPrecondition(format!("reservation {id} is not due")),
        Outcome::Corrupt(detail) => {
            Error::Internal(format!("stock does not match reservation: {detail}"))
        }
        // `run` handles these, and `set` the version mismatch.
        Outcome::CheckPostgres
        | Outcome::Applied { .. }
        | Outcome::Version(_)
        | Outcome::Refused(..) => {
            Error::Internal(format!("unexpected script outcome for {id}: {outcome:?}"))
        }
    }
}

/// Lines in canonical order, so that the same lines in another order are the
/// same request.
fn lines_for_fingerprint(lines: &Lines) -> Vec<String> {
    let mut parts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{}\u{1f}{}\u{1f}{}",
                l.item.sku,
                l.item.location,
                l.quantity.get()
            )
        })
        .collect();
    parts.sort_unstable();
    parts
}

/// A stable digest of a request's payload, stored with its outcome so that a
/// retry can be told apart from a different request under the same id.
fn fingerprint(op: &str, fields: &[&str], lines: Vec<String>) -> String {
    let mut text = String::from(op);
    for part in fields
        .iter()
        .copied()
        .chain(lines.iter().map(String::as_str))
    {
        text.push('\u{1e}');
        text.push_str(part);
    }
    format!("{:016x}", fnv1a_64(text.as_bytes()))
}
