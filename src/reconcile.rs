//! Reconciliation: do Redis and Postgres agree, and if not, where and why?
//!
//! Every item is put in one class (DESIGN.md, "Reconciliation classes"):
//!
//! | class | Redis vs Postgres | REPAIR |
//! |---|---|---|
//! | `in_sync` | same version, same quantities | — |
//! | `pending_flush` | Redis ahead, and unflushed stream entries of the item cover every version in between | never touched: the flusher will carry it |
//! | `redis_stale` | Postgres ahead | load Postgres into Redis (version-guarded) |
//! | `drift` | same version with other quantities, or Redis ahead with no unflushed entry to explain it | a `set` event restating Redis |
//! | `missing_in_redis` | only in Postgres | load Postgres into Redis |
//! | `missing_in_postgres` | only in Redis, no unflushed entry | a `set` event restating Redis |
//!
//! plus an audit of Postgres alone, `ledger_mismatch`: the ledger of the item
//! does not hold versions 1..current exactly once, or its deltas do not sum to
//! the stock row.
//!
//! The scan goes in pages: Postgres in key order (every item Postgres knows),
//! then a Redis `SCAN` for items only Redis has; Redis is read with pipelined
//! `HMGET`s, so memory stays bounded by a page. A `drift` or
//! `missing_in_postgres` verdict is checked again before it counts, reading
//! Redis, then the unflushed entries, then Postgres: in that order an event
//! being flushed meanwhile cannot look like drift. A repair of Redis-as-truth
//! is a compare-and-set on the version that never changes Redis quantities,
//! so it cannot oversell. One reconcile runs at a time (a Redis lock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{gauge, histogram};

use crate::backlog::Housekeeper;
use crate::domain::StockLevel;
use crate::error::Error;
use crate::keys::{Keyspace, Partition};
use crate::lock::RedisLock;
use crate::redis_conn::{CommandBatch, RedisConn, ScanCursor};
use crate::scripts;
use crate::store::{StockRow, Store};
use crate::warmer::Warmer;

/// Items reported back with both sides (the rest are only counted).
pub const MAX_ITEMS: usize = 100;
/// Unflushed entries read per partition; past it, a partition's items that
/// Redis has ahead are all taken as pending (never repaired).
const UNFLUSHED_CAP: usize = 200_000;
const LOCK_TTL: Duration = Duration::from_secs(600);
const DEFAULT_PAGE: usize = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    InSync,
    PendingFlush,
    RedisStale,
    Drift,
    MissingInRedis,
    MissingInPostgres,
    LedgerMismatch,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::InSync,
        Class::PendingFlush,
        Class::RedisStale,
        Class::Drift,
        Class::MissingInRedis,
        Class::MissingInPostgres,
        Class::LedgerMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::InSync => "in_sync",
            Class::PendingFlush => "pending_flush",
            Class::RedisStale => "redis_stale",
            Class::Drift => "drift",
            Class::MissingInRedis => "missing_in_redis",
            Class::MissingInPostgres => "missing_in_postgres",
            Class::LedgerMismatch => "ledger_mismatch",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Report,
    Repair,
}

#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Skus(Vec<String>),
}

/// (available, reserved, version)
type Quantities = (i64, i64, i64);
type ItemKey = (String, String);

/// One item that is not in sync, with both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemReport {
    pub sku: String,
    pub location: String,
    pub class: Class,
    pub redis: Option<StockLevel>,
    pub postgres: Option<StockLevel>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Items compared (the ledger audit is counted apart).
    pub checked: u64,
    pub counts: BTreeMap<Class, u64>,
    pub repaired: u64,
    /// Items REPAIR left alone: their ledger has an open fork.
    pub held_back: u64,
    pub items: Vec<ItemReport>,
    /// Where the next page starts, for paged calls.
    pub next_cursor: Option<String>,
}

impl Report {
    pub fn count(&self, class: Class) -> u64 {
        self.counts.get(&class).copied().unwrap_or(0)
    }

    fn add(
        &mut self,
        class: Class,
        redis: Option<Quantities>,
        postgres: Option<Quantities>,
        key: &ItemKey,
    ) {
        if class != Class::LedgerMismatch {
            self.checked += 1;
        }
        *self.counts.entry(class).or_default() += 1;
        if class != Class::InSync && self.items.len() < MAX_ITEMS {
            let level = |q: Quantities| StockLevel {
                sku: key.0.clone(),
                location: key.1.clone(),
                available: q.0,
                reserved: q.1,
                version: q.2,
            };
            self.items.push(ItemReport {
                sku: key.0.clone(),
                location: key.1.clone(),
                class,
                redis: redis.map(level),
                postgres: postgres.map(level),
            });
        }
    }

    fn merge(&mut self, other: Report) {
        self.checked += other.checked;
        for (class, n) in other.counts {
            *self.counts.entry(class).or_default() += n;
        }
        self.repaired += other.repaired;
        self.held_back += other.held_back;
        let room = MAX_ITEMS.saturating_sub(self.items.len());
        self.items.extend(other.items.into_iter().take(room));
    }
}

/// The unflushed entries of one partition, by item: lowest and highest
/// version among them.
#[derive(Default)]
struct Unflushed {
    by_item: HashMap<ItemKey, (i64, i64)>,
    /// More entries than we read: Redis-ahead items count as pending.
    truncated: bool,
}

impl Unflushed {
    fn explains(&self, key: &ItemKey, postgres_version: i64, redis_version: i64) -> bool {
        self.truncated
            || self
                .by_item
                .get(key)
                .is_some_and(|(lo, hi)| *lo <= postgres_version + 1 && *hi >= redis_version)
    }
}

/// The class of an item from both sides and the unflushed entries.
fn classify(
    redis: Option<Quantities>,
    postgres: Option<Quantities>,
    key: &ItemKey,
    unflushed: &Unflushed,
) -> Option<Class> {
    Some(match (redis, postgres) {
        (None, None) => return None,
        (None, Some(_)) => Class::MissingInRedis,
        (Some(r), None) => {
            if unflushed.explains(key, 0, r.2) {
                Class::PendingFlush
            } else {
                Class::MissingInPostgres
            }
        }
        (Some(r), Some(p)) if r.2 == p.2 => {
            if r == p {
                Class::InSync
            } else {
                Class::Drift
            }
        }
        (Some(r), Some(p)) if r.2 < p.2 => Class::RedisStale,
        (Some(r), Some(p)) => {
            if unflushed.explains(key, p.2, r.2) {
                Class::PendingFlush
            } else {
                Class::Drift
            }
        }
    })
}

/// Where a paged reconcile stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Items Postgres knows, after this key.
    Postgres(Option<ItemKey>),
    /// Items only Redis has, from this SCAN cursor.
    Redis(ScanCursor),
}

impl Phase {
    fn encode(&self) -> String {
        match self {
            Phase::Postgres(None) => "pg:".into(),
            Phase::Postgres(Some((sku, loc))) => format!("pg:{sku}\t{loc}"),
            Phase::Redis(cursor) => format!("redis:{cursor}"),
        }
    }

    fn decode(cursor: &str) -> Result<Self, Error> {
        let bad = || Error::invalid("cursor", "not a cursor this server returned");
        if cursor.is_empty() {
            return Ok(Phase::Postgres(None));
        }
        if let Some(rest) = cursor.strip_prefix("pg:") {
            if rest.is_empty() {
                return Ok(Phase::Postgres(None));
            }
            let (sku, loc) = rest.split_once('\t').ok_or_else(bad)?;
            return Ok(Phase::Postgres(Some((sku.to_owned(), loc.to_owned()))));
        }
        let scan = cursor.strip_prefix("redis:").ok_or_else(bad)?;
        Ok(Phase::Redis(scan.parse().map_err(|_| bad())?))
    }
}

#[derive(Clone)]
pub struct Reconciler {
    conn: RedisConn,
    store: Store,
    keys: Keyspace,
    warmer: Warmer,
    backlog: Housekeeper,
}

impl Reconciler {
    pub fn new(
        conn: RedisConn,
        store: Store,
        keys: Keyspace,
        warmer: Warmer,
        backlog: Housekeeper,
    ) -> Self {
        Self {
            conn,
            store,
            keys,
            warmer,
            backlog,
        }
    }

    /// Runs a reconcile (one page of it with `page_size`), holding the lock.
    pub async fn reconcile(
        &self,
        scope: Scope,
        mode: Mode,
        page_size: Option<usize>,
        cursor: &str,
    ) -> Result<Report, Error> {
        let mut phase = Phase::decode(cursor)?;
        let Some(lock) = RedisLock::acquire(
            &self.conn,
            format!("{}:reconcile", self.keys.meta()),
            LOCK_TTL,
        )
        .await?
        else {
            return Err(Error::FailedPrecondition(
                "another reconcile is running; try again when it has finished".into(),
            ));
        };
        let started = Instant::now();
        let run_id = format!(
            "reconcile-{:x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        );
        let size = page_size.unwrap_or(DEFAULT_PAGE).max(1);
        let mut report = Report::default();
        let outcome = loop {
            let page = match self.page(&scope, mode, &phase, size, &run_id).await {
                Ok(page) => page,
                Err(err) => break Err(err),
            };
            let (part, next) = page;
            report.merge(part);
            match next {
                None => break Ok(()),
                Some(next) if page_size.is_some() => {
                    report.next_cursor = Some(next.encode());
                    break Ok(());
                }
                Some(next) => phase = next,
            }
        };
        if let Err(err) = lock.release().await {
            tracing::warn!(error = %err, "could not release the reconcile lock; it expires by itself");
        }
        outcome?;
        histogram!("stockd_reconcile_duration_seconds").record(started.elapsed().as_secs_f64());
        if report.next_cursor.is_none() && page_size.is_none() {
            for class in Class::ALL {
                gauge!("stockd_reconcile_items", "class" => class.as_str())
                    .set(report.count(class) as f64);
            }
        }
        tracing::info!(
            checked = report.checked,
            repaired = report.repaired,
            counts = ?report.counts.iter().map(|(c, n)| (c.as_str(), *n)).collect::<Vec<_>>(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            ?mode,
            "reconciled"
        );
        Ok(report)
    }

    async fn page(
        &self,
        scope: &Scope,
        mode: Mode,
        phase: &Phase,
        size: usize,
        run_id: &str,
    ) -> Result<(Report, Option<Phase>), Error> {
        match phase {
            Phase::Postgres(after) => {
                let rows = match scope {
                    Scope::All => {
                        self.store
                            .stock_page(
                                after.as_ref().map(|(s, l)| (s.as_str(), l.as_str())),
                                size as i64,
                            )
                            .await?
                    }
                    Scope::Skus(skus) => self.store.stock_rows_of(skus).await?,
                };
                let next = match scope {
                    Scope::All if rows.len() == size => {
                        Phase::Postgres(rows.last().map(|r| (r.sku.clone(), r.location.clone())))
                    }
                    _ => Phase::Redis(ScanCursor::default()),
                };
                let report = self.postgres_page(&rows, mode, run_id).await?;
                Ok((report, Some(next)))
            }
            Phase::Redis(cursor) => {
                let (next, report) = self.redis_page(scope, *cursor, size, mode, run_id).await?;
                Ok((report, next.map(Phase::Redis)))
            }
        }
    }

    /// Classifies items Postgres knows.
    async fn postgres_page(
        &self,
        rows: &[StockRow],
        mode: Mode,
        run_id: &str,
    ) -> Result<Report, Error> {
        let mut report = Report::default();
        if rows.is_empty() {
            return Ok(report);
        }
        let keys: Vec<ItemKey> = rows
            .iter()
            .map(|r| (r.sku.clone(), r.location.clone()))
            .collect();
        let redis = self.read_redis(&keys).await?;
        let unflushed = self.unflushed_for(&keys).await?;
        let mut to_load = Vec::new();
        let mut suspects = Vec::new();
        for ((row, key), redis) in rows.iter().zip(&keys).zip(redis) {
            let postgres = Some((row.available, row.reserved, row.version));
            let partition = self.keys.partition_of(&key.0);
            match classify(redis, postgres, key, &unflushed[&partition]) {
                Some(Class::Drift) => suspects.push(key.clone()),
                Some(class @ (Class::RedisStale | Class::MissingInRedis)) => {
                    report.add(class, redis, postgres, key);
                    to_load.push(row.clone());
                }
                Some(class) => report.add(class, redis, postgres, key),
                None => {}
            }
        }
        self.judge_suspects(&suspects, mode, run_id, &mut report)
            .await?;
        for key in self.store.ledger_mismatches(&keys).await? {
            let row = rows.iter().find(|r| r.sku == key.0 && r.location == key.1);
            report.add(
                Class::LedgerMismatch,
                None,
                row.map(|r| (r.available, r.reserved, r.version)),
                &key,
            );
        }
        if mode == Mode::Repair && !to_load.is_empty() {
            let forked = self
                .forked(
                    &to_load,
                    |r| (r.sku.clone(), r.location.clone()),
                    &mut report,
                )
                .await?;
            to_load.retain(|r| !forked.contains(&(r.sku.clone(), r.location.clone())));
            report.repaired += self.warmer.load_rows(&to_load).await?.loaded;
        }
        Ok(report)
    }

    /// Classifies items only Redis has: SCAN steps until `size` stock keys
    /// (or the end). Each step examines at least `SCAN_COUNT` keys, so a
    /// small page does not cost one round trip per few keys of a Redis
    /// that holds much else (other namespaces, other applications).
    async fn redis_page(
        &self,
        scope: &Scope,
        cursor: ScanCursor,
        size: usize,
        mode: Mode,
        run_id: &str,
    ) -> Result<(Option<ScanCursor>, Report), Error> {
        const SCAN_COUNT: usize = 1000;
        let pattern = self.keys.pattern("{p*}:stock:*");
        let mut keys = Vec::new();
        let mut next = Some(cursor);
        while let Some(at) = next
            && keys.len() < size
        {
            let (found, after) = self
                .conn
                .scan_step(at, &pattern, size.max(SCAN_COUNT))
                .await?;
            keys.extend(found);
            next = after;
        }
        let mut report = Report::default();
        if keys.is_empty() {
            return Ok((next, report));
        }
        let mut batch = CommandBatch::new();
        for key in keys {
            let mut names = redis::cmd("HMGET");
            names.arg(&key).arg(&["sku", "loc"]);
            batch.cmd(key, names);
        }
        let names: Vec<(Option<String>, Option<String>)> = batch
            .query(&self.conn)
            .await?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Internal(format!("stock names: {e}")))?;
        let wanted: Option<HashSet<&str>> = match scope {
            Scope::All => None,
            Scope::Skus(skus) => Some(skus.iter().map(String::as_str).collect()),
        };
        let items: Vec<ItemKey> = names
            .into_iter()
            .filter_map(|(sku, loc)| Some((sku?, loc?)))
            .filter(|(sku, _)| wanted.as_ref().is_none_or(|w| w.contains(sku.as_str())))
            .collect();
        if items.is_empty() {
            return Ok((next, report));
        }
        let known: HashSet<ItemKey> = self
            .store
            .stock_rows_for(&items)
            .await?
            .into_iter()
            .map(|r| (r.sku, r.location))
            .collect();
        let only_in_redis: Vec<ItemKey> =
            items.into_iter().filter(|k| !known.contains(k)).collect();
        self.judge_suspects(&only_in_redis, mode, run_id, &mut report)
            .await?;
        Ok((next, report))
    }

    /// Looks again at items that looked like drift or missing in Postgres:
    /// Redis first, then the unflushed entries, then Postgres, so that an
    /// event flushed meanwhile shows as flushed. What still looks wrong is
    /// counted, and repaired in REPAIR mode.
    async fn judge_suspects(
        &self,
        keys: &[ItemKey],
        mode: Mode,
        run_id: &str,
        report: &mut Report,
    ) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let redis = self.read_redis(keys).await?;
        let unflushed = self.unflushed_for(keys).await?;
        let rows: HashMap<ItemKey, Quantities> = self
            .store
            .stock_rows_for(keys)
            .await?
            .into_iter()
            .map(|r| ((r.sku, r.location), (r.available, r.reserved, r.version)))
            .collect();
        let mut to_restate = Vec::new();
        for (key, redis) in keys.iter().zip(redis) {
            let postgres = rows.get(key).copied();
            let Some(class) = classify(
                redis,
                postgres,
                key,
                &unflushed[&self.keys.partition_of(&key.0)],
            ) else {
                continue;
            };
            report.add(class, redis, postgres, key);
            if let (Class::Drift | Class::MissingInPostgres, Some(r)) = (class, redis) {
                to_restate.push((key.clone(), r));
            }
        }
        if mode == Mode::Repair && !to_restate.is_empty() {
            let forked = self.forked(&to_restate, |(k, _)| k.clone(), report).await?;
            to_restate.retain(|(k, _)| !forked.contains(k));
            let keys: Vec<ItemKey> = to_restate.iter().map(|(k, _)| k.clone()).collect();
            let sums = self.store.ledger_sums(&keys).await?;
            for (key, redis) in to_restate {
                let (sum_a, sum_r) = sums.get(&key).copied().unwrap_or((0, 0));
                if self
                    .restate(&key, redis, redis.0 - sum_a, redis.1 - sum_r, run_id)
                    .await?
                {
                    report.repaired += 1;
                }
            }
        }
        Ok(())
    }

    /// Of the items about to be repaired, those whose ledger forked (Redis
    /// gave out a version Postgres had: a rollback nobody caught in time).
    /// Neither side is the truth for them: Postgres lacks the forked
    /// change, Redis may lack the one Postgres kept. Repairing either way
    /// would erase a sale, so they are held back, counted and logged until
    /// an operator resolved the fork (`ledger_forks.resolved_at`).
    async fn forked<T>(
        &self,
        candidates: &[T],
        key: impl Fn(&T) -> ItemKey,
        report: &mut Report,
    ) -> Result<HashSet<ItemKey>, Error> {
        let keys: Vec<ItemKey> = candidates.iter().map(key).collect();
        let forked: HashSet<ItemKey> = self.store.open_forks(&keys).await?.into_iter().collect();
        for (sku, location) in &forked {
            tracing::warn!(%sku, %location,
                "not repaired: the item's ledger forked; resolve the fork in ledger_forks first");
        }
        report.held_back += forked.len() as u64;
        Ok(forked)
    }

    /// Writes a `set` event restating Redis's quantities, if the item is
    /// still at the version we judged.
    async fn restate(
        &self,
        key: &ItemKey,
        redis: Quantities,
        d_avail: i64,
        d_resv: i64,
        run_id: &str,
    ) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let partition = self.keys.partition_of(&key.0);
        let (status, version): (String, String) = scripts::REPAIR
            .key(self.keys.stock(&key.0, &key.1))
            .key(self.keys.events(partition))
            .key(self.keys.marker(partition))
            .arg(run_id)
            .arg(redis.2)
            .arg(&key.0)
            .arg(&key.1)
            .arg(d_avail)
            .arg(d_resv)
            .invoke_async(&mut conn)
            .await?;
        if status == "lost" || status == "healing" {
            return Err(Error::Unavailable(format!(
                "{version}: the partition is being restored; repair later"
            )));
        }
        if status == "ok" {
            tracing::warn!(sku = %key.0, location = %key.1, %version, "repaired drift: Postgres will follow Redis");
            Ok(true)
        } else {
            tracing::info!(sku = %key.0, location = %key.1, "not repaired: the item changed meanwhile");
            Ok(false)
        }
    }

    async fn read_redis(&self, keys: &[ItemKey]) -> Result<Vec<Option<Quantities>>, Error> {
        let mut batch = CommandBatch::new();
        for (sku, loc) in keys {
            let key = self.keys.stock(sku, loc);
            let mut read = redis::cmd("HMGET");
            read.arg(&key).arg(&["avail", "resv", "ver"]);
            batch.cmd(key, read);
        }
        let rows: Vec<(Option<i64>, Option<i64>, Option<i64>)> = batch
            .query(&self.conn)
            .await?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Internal(format!("stock levels: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|row| match row {
                (Some(a), Some(r), Some(v)) => Some((a, r, v)),
                _ => None,
            })
            .collect())
    }

    /// The unflushed entries of the partitions of `keys`.
    async fn unflushed_for(
        &self,
        keys: &[ItemKey],
    ) -> Result<HashMap<Partition, Unflushed>, Error> {
        let partitions: HashSet<Partition> = keys
            .iter()
            .map(|(sku, _)| self.keys.partition_of(sku))
            .collect();
        let mut out = HashMap::new();
        for p in partitions {
            out.insert(p, self.unflushed(p).await?);
        }
        Ok(out)
    }

    async fn unflushed(&self, partition: Partition) -> Result<Unflushed, Error> {
        let backlog = self.backlog.backlog(partition).await?;
        let Some(oldest) = backlog
            .group(crate::flusher::GROUP)
            .and_then(|g| g.oldest_unhandled)
        else {
            return Ok(Unflushed::default());
        };
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.keys.events(partition))
            .arg(oldest.to_string())
            .arg("+")
            .arg("COUNT")
            .arg(UNFLUSHED_CAP)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut unflushed = Unflushed {
            truncated: entries.len() >= UNFLUSHED_CAP,
            ..Unflushed::default()
        };
        for (id, fields) in entries {
            let (Some(sku), Some(loc), Some(ver)) = (
                fields.get("sku"),
                fields.get("loc"),
                fields.get("ver").and_then(|v| v.parse::<i64>().ok()),
            ) else {
                continue;
            };
            debug_assert!(crate::events::EntryId::parse(&id).is_some());
            let span = unflushed
                .by_item
                .entry((sku.clone(), loc.clone()))
                .or_insert((ver, ver));
            span.0 = span.0.min(ver);
            span.1 = span.1.max(ver);
        }
        Ok(unflushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ItemKey {
        ("s".into(), "default".into())
    }

    fn pending(lo: i64, hi: i64) -> Unflushed {
        Unflushed {
            by_item: [(key(), (lo, hi))].into_iter().collect(),
            truncated: false,
        }
    }

    #[test]
    fn classes() {
        let none = Unflushed::default();
        let k = key();
        assert_eq!(
            classify(Some((5, 1, 3)), Some((5, 1, 3)), &k, &none),
            Some(Class::InSync)
        );
        assert_eq!(
            classify(Some((4, 1, 3)), Some((5, 1, 3)), &k, &none),
            Some(Class::Drift)
        );
        assert_eq!(
            classify(Some((5, 1, 2)), Some((5, 1, 3)), &k, &none),
            Some(Class::RedisStale)
        );
        assert_eq!(
            classify(None, Some((5, 1, 3)), &k, &none),
            Some(Class::MissingInRedis)
        );
        assert_eq!(
            classify(Some((5, 1, 3)), None, &k, &none),
            Some(Class::MissingInPostgres)
        );
        assert_eq!(
            classify(Some((5, 1, 3)), None, &k, &pending(1, 3)),
            Some(Class::PendingFlush)
        );
        // Redis ahead: pending only when the unflushed entries cover the gap.
        assert_eq!(
            classify(Some((1, 0, 6)), Some((5, 0, 3)), &k, &pending(4, 6)),
            Some(Class::PendingFlush)
        );
        assert_eq!(
            classify(Some((1, 0, 6)), Some((5, 0, 3)), &k, &pending(5, 6)),
            Some(Class::Drift)
        );
        assert_eq!(
            classify(Some((1, 0, 6)), Some((5, 0, 3)), &k, &pending(4, 5)),
            Some(Class::Drift)
        );
        assert_eq!(
            classify(Some((1, 0, 6)), Some((5, 0, 3)), &k, &none),
            Some(Class::Drift)
        );
        let truncated = Unflushed {
            truncated: true,
            ..Unflushed::default()
        };
        assert_eq!(
            classify(Some((1, 0, 6)), Some((5, 0, 3)), &k, &truncated),
            Some(Class::PendingFlush)
        );
        assert_eq!(classify(None, None, &k, &none), None);
    }

    #[test]
    fn cursors_round_trip() {
        for phase in [
            Phase::Postgres(None),
            Phase::Postgres(Some(("a:b".into(), "x".into()))),
            Phase::Redis(ScanCursor {
                node: 1,
                cursor: 42,
            }),
        ] {
            assert_eq!(Phase::decode(&phase.encode()).unwrap(), phase);
        }
        assert!(Phase::decode("bogus").is_err());
        assert!(Phase::decode("redis:x").is_err());
    }
}
