//! Where a reservation is: its fingerprint, partitions and lines, as its
//! locator record says, and a bounded cache of the reservations this
//! instance made or looked up, so that Commit, Release and Extend of those
//! need no read before their script.

use std::sync::Arc;

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::plan::{Kind, Plan};
use crate::keys::{Keyspace, Partition};
use crate::scripts::ScriptLine;

/// A reservation as its locator describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    pub fingerprint: String,
    pub parts: Vec<Partition>,
    /// Every line (sku, location, quantity), in request order.
    pub lines: Vec<ScriptLine>,
}

impl Located {
    pub fn of_plan(plan: &Plan, fingerprint: String) -> Self {
        Self {
            fingerprint,
            parts: plan.parts.clone(),
            lines: plan.lines.iter().map(|(l, _)| l.clone()).collect(),
        }
    }

    /// From the locator's fields: `parts` as `3,7`, `lines` as JSON
    /// `[[sku, location, quantity], ...]`.
    pub fn parse(fingerprint: String, parts: &str, lines: &str) -> Result<Self, String> {
        let parts = parts
            .split(',')
            .map(|p| p.parse().map(Partition))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("reservation locator with parts {parts:?}"))?;
        let lines: Vec<(String, String, i64)> = serde_json::from_str(lines)
            .map_err(|e| format!("reservation locator with lines {lines:?}: {e}"))?;
        Ok(Self {
            fingerprint,
            parts,
            lines: lines
                .into_iter()
                .map(|(sku, location, amount)| ScriptLine {
                    sku,
                    location,
                    amount,
                })
                .collect(),
        })
    }

    /// About what this entry holds in memory, in bytes.
    fn approximate_bytes(&self) -> usize {
        size_of::<Self>()
            + self.fingerprint.len()
            + self.parts.len() * size_of::<Partition>()
            + self
                .lines
                .iter()
                .map(|l| size_of::<ScriptLine>() + l.sku.len() + l.location.len())
                .sum::<usize>()
    }

    /// The plan of a script on this reservation; `None` when a line is
    /// outside the parts (a corrupt locator).
    pub fn plan(&self, keys: &Keyspace, id: &str) -> Option<Plan> {
        Plan::of_parts(
            keys,
            Kind::Reservation,
            id,
            self.parts.clone(),
            self.lines.clone(),
        )
    }
}

/// Reservations by id, within a memory budget (quick_cache's eviction,
/// which favours recently and often used entries; not a strict LRU): a five-line cart weighs about three one-line reservations, so
/// the budget, not a count, bounds the process's memory.
pub(crate) struct LocatorCache {
    cache: Cache<String, Arc<Located>, ByBytes>,
}

/// Bookkeeping of one cache entry besides the key's and value's bytes (the
/// Arc's counts, the entry's slot and metadata), estimated.
const ENTRY_OVERHEAD: usize = 64;

/// One line of one-line reservations: what the entry count is estimated
/// from.
const TYPICAL_ENTRY: usize = 192;

#[derive(Clone)]
struct ByBytes;

impl Weighter<String, Arc<Located>> for ByBytes {
    fn weight(&self, id: &String, located: &Arc<Located>) -> u64 {
        (id.len() + located.approximate_bytes() + ENTRY_OVERHEAD) as u64
    }
}

impl LocatorCache {
    /// A cache of at most about `budget_bytes` of entries.
    pub fn new(budget_bytes: usize) -> Self {
        let budget_bytes = budget_bytes.max(TYPICAL_ENTRY);
        Self {
            cache: Cache::with_weighter(budget_bytes / TYPICAL_ENTRY, budget_bytes as u64, ByBytes),
        }
    }

    pub fn get(&self, id: &str) -> Option<Located> {
        self.cache.get(id).map(|l| (*l).clone())
    }

    pub fn remember(&self, id: &str, located: Located) {
        self.cache.insert(id.to_owned(), Arc::new(located));
    }

    pub fn forget(&self, id: &str) {
        self.cache.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_fields_parse_and_bad_ones_say_why() {
        let located =
            Located::parse("fp".into(), "3,7", r#"[["a","default",2],["b","x",1]]"#).unwrap();
        assert_eq!(located.parts, vec![Partition(3), Partition(7)]);
        assert_eq!(located.lines[1].location, "x");
        assert!(Located::parse("fp".into(), "3,x", "[]").is_err());
        assert!(Located::parse("fp".into(), "3", "{").is_err());
    }

    #[test]
    fn the_cache_forgets_on_request() {
        let cache = LocatorCache::new(10_000);
        let located = Located::parse("fp".into(), "1", "[]").unwrap();
        cache.remember("r", located.clone());
        assert_eq!(cache.get("r"), Some(located));
        cache.forget("r");
        assert_eq!(cache.get("r"), None);
    }

    #[test]
    fn the_cache_keeps_within_its_budget_whatever_the_entries_weigh() {
        let budget = 64 * 1024;
        let cache = LocatorCache::new(budget);
        let cart = |n: usize| {
            let lines: Vec<String> = (0..n)
                .map(|i| format!(r#"["sku-{i:07}","default",1]"#))
                .collect();
            Located::parse("f".repeat(40), "1", &format!("[{}]", lines.join(","))).unwrap()
        };
        for (i, lines) in [1, 5, 20].into_iter().cycle().take(3_000).enumerate() {
            cache.remember(&format!("reservation-{i}"), cart(lines));
        }
        assert!(
            cache.cache.weight() <= budget as u64,
            "{}",
            cache.cache.weight()
        );
        // Entries of every size are kept: the newest is found, and so is a
        // recent one of each size (1, 5 and 20 lines). Not every recent one:
        // the cache is not a strict LRU, and a heavy entry can push the one
        // before it out of its shard's admission queue (the shard is picked
        // by a random hash; asserting on entry 2,998 failed 7 % of runs).
        assert!(cache.get("reservation-2999").is_some());
        for size in 0..3 {
            assert!(
                (2_900..3_000)
                    .filter(|i| i % 3 == size)
                    .any(|i| cache.get(&format!("reservation-{i}")).is_some()),
                "no recent entry of size class {size} is kept"
            );
        }
        assert!(cache.cache.len() > 100, "{}", cache.cache.len());
    }
}
