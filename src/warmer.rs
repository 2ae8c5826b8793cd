//! Cache warming: Redis is a cache in front of Postgres that may start empty,
//! lose keys, or come back from a restart without its data.
//!
//! - **Preload** copies items from Postgres into Redis with `load.lua`, only
//!   where Redis lacks the item or holds an older version, and without an
//!   event (nothing changed). Pipelined, in pages.
//! - **Load on miss**: the engine asks the warmer for items a script found
//!   missing; each item is loaded once however many requests wait for it.
//!
//! Recovery from a data loss or a rollback, which re-warms through the
//! same preload, is the watchdog's (`watchdog.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::counter;
use tokio::sync::{OnceCell, watch};

use crate::domain::Item;
use crate::error::Error;
use crate::keys::{Keyspace, Partition};
use crate::redis_conn::{CommandBatch, RedisConn};
use crate::scripts;
use crate::store::{StockRow, Store};

/// Items per `load.lua` call.
const LOAD_CHUNK: usize = 500;
/// Rows per Postgres page when preloading everything.
pub const PAGE: i64 = 20_000;

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

    pub fn set(&self, serving: bool) {
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

/// Whether a load on miss found the item in Postgres, or why it failed.
type LoadResult = Result<bool, String>;
/// Loads on miss in progress, by (sku, location).
type Inflight = Mutex<HashMap<(String, String), Arc<OnceCell<LoadResult>>>>;

#[derive(Clone)]
pub struct Warmer {
    conn: RedisConn,
    store: Store,
    keys: Keyspace,
    availability: Availability,
    /// Items being loaded on a miss: later askers wait for the first load.
    inflight: Arc<Inflight>,
    loads_on_miss: Arc<AtomicU64>,
}

impl Warmer {
    pub fn new(conn: RedisConn, store: Store, keys: Keyspace, availability: Availability) -> Self {
        Self {
            conn,
            store,
            keys,
            availability,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            loads_on_miss: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn availability(&self) -> &Availability {
        &self.availability
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keys(&self) -> &Keyspace {
        &self.keys
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
        // One script call per chunk of one partition (a script touches one
        // slot), all of them in one batch.
        let mut batch = CommandBatch::new();
        for (&partition, rows) in &by_partition {
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
                batch.script(self.keys.events(partition), &scripts::LOAD, invocation);
            }
        }
        let mut counts = PreloadCounts::default();
        for reply in batch.query(&self.conn).await? {
            let (loaded, skipped): (u64, u64) = redis::from_redis_value(reply)
                .map_err(|e| Error::Internal(format!("load.lua reply: {e}")))?;
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
}
