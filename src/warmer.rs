//! Cache warming: Redis is a cache in front of Postgres that may start empty,
//! lose keys, or come back from a restart without its data.
//!
//! - **Preload** copies items from Postgres into Redis with `load.lua`, only
//!   where Redis lacks the item or holds an older version, and without an
//!   event (nothing changed). Pipelined, in pages.
//! - **Load on miss**: the engine asks the warmer for items a script found
//!   missing; each item is loaded once however many requests wait for it.
//! - **Recovery from data loss**: the epoch id in `NS:{meta}` disappears when
//!   Redis loses its data. The watchdog notices within a second, stops this
//!   instance from serving, and (one instance at a time, under a lock)
//!   re-warms stock and held reservations from Postgres, then writes a new
//!   epoch; every instance serves again once it sees the new epoch.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::counter;
use redis::aio::ConnectionManager;
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

use crate::domain::Item;
use crate::error::Error;
use crate::keys::{Keyspace, Partition};
use crate::lock::RedisLock;
use crate::meta::SCHEMA_VERSION;
use crate::scripts;
use crate::store::{HeldRow, StockRow, Store};

/// Items per `load.lua` call.
const LOAD_CHUNK: usize = 500;
/// Rows per Postgres page when preloading everything.
pub const PAGE: i64 = 20_000;
/// How long a re-warm may hold its lock before another instance may take over.
const REWARM_LOCK_TTL: Duration = Duration::from_secs(600);

/// Whether this instance serves requests; closed while it re-warms after a
/// Redis data loss (or waits for another instance to).
#[derive(Clone)]
pub struct Availability {
    serving: Arc<watch::Sender<bool>>,
}

impl Availability {
    pub fn new(serving: bool) -> Self {
        Self {
            serving: Arc::new(watch::Sender::new(serving)),
        }
    }

    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    fn set(&self, serving: bool) {
        self.serving
            .send_if_modified(|s| std::mem::replace(s, serving) != serving);
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }
}

/// Counts of a preload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PreloadCounts {
    /// Items written into Redis.
    pub loaded: u64,
    /// Items Redis held at the same or a newer version.
    pub skipped: u64,
    /// Requested SKUs Postgres does not know.
    pub not_found: u64,
}

impl std::ops::AddAssign for PreloadCounts {
    fn add_assign(&mut self, other: Self) {
        self.loaded += other.loaded;
        self.skipped += other.skipped;
        self.not_found += other.not_found;
    }
}

/// What one look at the epoch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochCheck {
    /// The epoch we know: Redis kept its data.
    Steady,
    /// Another instance re-warmed and wrote a new epoch; we serve again.
    Adopted,
    /// The epoch was gone and this instance re-warmed Redis.
    Rewarmed { items: u64, holds: u64 },
    /// The epoch is gone and another instance is re-warming.
    Waiting,
}

/// Whether a load on miss found the item in Postgres, or why it failed.
type LoadResult = Result<bool, String>;
/// Loads on miss in progress, by (sku, location).
type Inflight = Mutex<HashMap<(String, String), Arc<OnceCell<LoadResult>>>>;

#[derive(Clone)]
pub struct Warmer {
    conn: ConnectionManager,
    store: Store,
    keys: Keyspace,
    availability: Availability,
    known_epoch: Arc<Mutex<Option<String>>>,
    /// Items being loaded on a miss: later askers wait for the first load.
    inflight: Arc<Inflight>,
    loads_on_miss: Arc<AtomicU64>,
}

impl Warmer {
    pub fn new(
        conn: ConnectionManager,
        store: Store,
        keys: Keyspace,
        availability: Availability,
    ) -> Self {
        Self {
            conn,
            store,
            keys,
            availability,
            known_epoch: Arc::new(Mutex::new(None)),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            loads_on_miss: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn availability(&self) -> &Availability {
        &self.availability
    }

    /// How many items were read from Postgres because a request missed them.
    pub fn loads_on_miss(&self) -> u64 {
        self.loads_on_miss.load(Ordering::Relaxed)
    }

    /// Copies `rows` into Redis (version-guarded), grouped by partition and
    /// pipelined: one round trip for up to a page of rows.
    pub async fn load_rows(&self, rows: &[StockRow]) -> Result<PreloadCounts, Error> {
        if rows.is_empty() {
            return Ok(PreloadCounts::default());
        }
        let mut by_partition: BTreeMap<Partition, Vec<&StockRow>> = BTreeMap::new();
        for row in rows {
            by_partition
                .entry(self.keys.partition_of(&row.sku))
                .or_default()
                .push(row);
        }
        let mut conn = self.conn.clone();
        // EVALSHA in a pipeline does not fall back to loading the script.
        scripts::LOAD.prepare_invoke().load_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        for rows in by_partition.values() {
            for chunk in rows.chunks(LOAD_CHUNK) {
                let mut invocation = scripts::LOAD.prepare_invoke();
                for row in chunk {
                    invocation
                        .key(self.keys.stock(&row.sku, &row.location))
                        .arg(&row.sku)
                        .arg(&row.location)
                        .arg(row.available)
                        .arg(row.reserved)
                        .arg(row.version);
                }
                pipe.invoke_script(&invocation);
            }
        }
        let replies: Vec<(u64, u64)> = pipe.query_async(&mut conn).await?;
        let mut counts = PreloadCounts::default();
        for (loaded, skipped) in replies {
            counts.loaded += loaded;
            counts.skipped += skipped;
        }
        Ok(counts)
    }

    /// Preloads every location of each SKU; SKUs Postgres lacks are counted.
    pub async fn preload_skus(&self, skus: &[String]) -> Result<PreloadCounts, Error> {
        let rows = self.store.stock_rows_of(skus).await?;
        let mut counts = self.load_rows(&rows).await?;
        let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.sku.as_str()).collect();
        counts.not_found = skus.iter().filter(|s| !known.contains(s.as_str())).count() as u64;
        Ok(counts)
    }

    /// Preloads one page of the catalogue after `after`; returns the counts
    /// and where the next page starts (`None` at the end).
    pub async fn preload_page(
        &self,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<(PreloadCounts, Option<(String, String)>), Error> {
        let rows = self
            .store
            .stock_page(after.as_ref().map(|(s, l)| (s.as_str(), l.as_str())), limit)
            .await?;
        let counts = self.load_rows(&rows).await?;
        let next = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|r| (r.sku.clone(), r.location.clone())))
            .flatten();
        Ok((counts, next))
    }

    /// Preloads the whole catalogue, page by page.
    pub async fn preload_all(&self) -> Result<PreloadCounts, Error> {
        let mut total = PreloadCounts::default();
        let mut after = None;
        loop {
            let (counts, next) = self.preload_page(after, PAGE).await?;
            total += counts;
            match next {
                Some(cursor) => after = Some(cursor),
                None => return Ok(total),
            }
        }
    }

    /// Loads items a request found missing in Redis. Each item is read from
    /// Postgres once however many requests ask at the same time. Returns the
    /// items Postgres does not know either.
    pub async fn load_on_miss(&self, items: &[Item]) -> Result<Vec<Item>, Error> {
        let mut unknown = Vec::new();
        for item in items {
            let key = (item.sku.to_string(), item.location.to_string());
            let cell = self
                .inflight
                .lock()
                .expect("inflight map lock")
                .entry(key.clone())
                .or_default()
                .clone();
            let result = cell
                .get_or_init(|| async {
                    // A request that missed the item just before another's
                    // load finished arrives here after that load: Redis has
                    // the item by now, and Postgres need not be asked again.
                    let present: Result<bool, redis::RedisError> = redis::cmd("EXISTS")
                        .arg(self.keys.stock(&key.0, &key.1))
                        .query_async(&mut self.conn.clone())
                        .await;
                    match present {
                        Ok(true) => return Ok(true),
                        Ok(false) => {}
                        Err(e) => return Err(format!("redis: {e}")),
                    }
                    self.loads_on_miss.fetch_add(1, Ordering::Relaxed);
                    counter!("stockd_loads_on_miss_total").increment(1);
                    match self.store.stock_row(&key.0, &key.1).await {
                        Ok(Some(row)) => self
                            .load_rows(&[row])
                            .await
                            .map(|_| true)
                            .map_err(|e| e.to_string()),
                        Ok(None) => Ok(false),
                        Err(e) => Err(format!("postgres: {e}")),
                    }
                })
                .await
                .clone();
            // The next miss of this item (after an eviction) loads afresh.
            let mut inflight = self.inflight.lock().expect("inflight map lock");
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
            drop(inflight);
            match result {
                Ok(true) => {}
                Ok(false) => unknown.push(item.clone()),
                Err(detail) => return Err(Error::Unavailable(detail)),
            }
        }
        Ok(unknown)
    }

    /// Looks at the epoch once; re-warms when it is gone and nobody else is.
    pub async fn check_epoch_once(&self) -> Result<EpochCheck, Error> {
        let mut conn = self.conn.clone();
        let epoch: Option<String> = redis::cmd("HGET")
            .arg(self.keys.meta())
            .arg("epoch")
            .query_async(&mut conn)
            .await?;
        let known = self.known_epoch.lock().expect("epoch lock").clone();
        match epoch {
            Some(epoch) if Some(&epoch) == known.as_ref() => {
                self.availability.set(true);
                Ok(EpochCheck::Steady)
            }
            Some(epoch) => {
                if known.is_some() {
                    counter!("stockd_redis_epoch_changes_total").increment(1);
                    tracing::warn!(%epoch, "Redis was re-warmed by another instance; serving again");
                }
                *self.known_epoch.lock().expect("epoch lock") = Some(epoch);
                self.availability.set(true);
                Ok(if known.is_some() {
                    EpochCheck::Adopted
                } else {
                    EpochCheck::Steady
                })
            }
            None => {
                self.availability.set(false);
                let Some(lock) =
                    RedisLock::acquire(&self.conn, self.rewarm_lock_key(), REWARM_LOCK_TTL).await?
                else {
                    tracing::warn!(
                        "Redis lost its data; another instance is re-warming it, not serving meanwhile"
                    );
                    return Ok(EpochCheck::Waiting);
                };
                let result = self.rewarm(known.is_some()).await;
                if let Err(err) = lock.release().await {
                    tracing::warn!(error = %err, "could not release the re-warm lock; it expires by itself");
                }
                let (items, holds, epoch) = result?;
                *self.known_epoch.lock().expect("epoch lock") = Some(epoch);
                self.availability.set(true);
                Ok(EpochCheck::Rewarmed { items, holds })
            }
        }
    }

    fn rewarm_lock_key(&self) -> String {
        format!("{}:rewarm", self.keys.meta())
    }

    /// Loads stock and held reservations from Postgres into an empty Redis
    /// and writes a new epoch. Returns (items, holds, epoch).
    async fn rewarm(&self, lost: bool) -> Result<(u64, u64, String), Error> {
        if lost {
            counter!("stockd_redis_epoch_changes_total").increment(1);
            tracing::error!(
                "Redis lost its data (its epoch id is gone): re-warming from Postgres; \
                 changes that had not been flushed to Postgres before the loss are gone"
            );
        }
        let counts = self.preload_all().await?;
        let holds = self.store.held_reservations().await?;
        let restored = self.restore_holds(&holds).await?;
        let epoch = new_epoch_id();
        let mut conn = self.conn.clone();
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
        if lost || counts.loaded > 0 || restored > 0 {
            tracing::warn!(
                items = counts.loaded,
                holds = restored,
                %epoch,
                "re-warmed Redis from Postgres: stock and held reservations restored; serving again"
            );
        }
        Ok((counts.loaded, restored, epoch))
    }

    /// Writes the records of held reservations back: each partition's record
    /// and expiry entry, and the home record. Their request fingerprint is
    /// not in Postgres, so a Reserve replay of a restored hold answers
    /// ALREADY_EXISTS; Commit, Release, Extend and expiry work as before.
    async fn restore_holds(&self, rows: &[HeldRow]) -> Result<u64, Error> {
        let mut by_id: BTreeMap<&str, Vec<&HeldRow>> = BTreeMap::new();
        for row in rows {
            by_id
                .entry(row.reservation_id.as_str())
                .or_default()
                .push(row);
        }
        let mut conn = self.conn.clone();
        let ids: Vec<&str> = by_id.keys().copied().collect();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                let parts = &by_id[id];
                let exp = parts
                    .iter()
                    .filter_map(|p| p.expires_at_ms)
                    .max()
                    .unwrap_or(0);
                let fingerprint = format!("restored:{id}");
                let mut all = Vec::new();
                for part in parts {
                    let lines = serde_json::to_string(&part.lines).expect("lines serialise");
                    let record = self.keys.reservation(Partition(part.partition), id);
                    pipe.cmd("HSET")
                        .arg(&record)
                        .arg(&["state", "held", "fp", &fingerprint, "lines", &lines])
                        .arg("exp")
                        .arg(exp)
                        .ignore();
                    pipe.cmd("ZADD")
                        .arg(self.keys.reservation_expiry(Partition(part.partition)))
                        .arg(exp)
                        .arg(*id)
                        .ignore();
                    all.extend(part.lines.iter().cloned());
                }
                let home = self.keys.reservation(self.keys.partition_of(id), id);
                pipe.cmd("HSET")
                    .arg(&home)
                    .arg(&["state", "held", "fp", &fingerprint])
                    .arg("exp")
                    .arg(exp)
                    .arg("all")
                    .arg(serde_json::to_string(&all).expect("lines serialise"))
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(by_id.len() as u64)
    }

    /// Checks the epoch every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.check_epoch_once().await {
                Ok(EpochCheck::Rewarmed { items, holds }) => {
                    tracing::info!(items, holds, "re-warm finished");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "epoch check failed; retrying"),
            }
        }
    }
}

fn new_epoch_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{:x}", std::process::id())
}
