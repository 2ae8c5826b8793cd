//! Where a reservation is: its fingerprint, partitions and lines, as its
//! locator record says, and a bounded cache of the reservations this
//! instance made or looked up, so that Commit, Release and Extend of those
//! need no read before their script.

use std::sync::Arc;

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

/// Reservations by id, at most a given number (least recently used go).
pub(crate) struct LocatorCache {
    cache: Cache<String, Arc<Located>>,
}

impl LocatorCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: Cache::new(capacity.max(1)),
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
        let cache = LocatorCache::new(10);
        let located = Located::parse("fp".into(), "1", "[]").unwrap();
        cache.remember("r", located.clone());
        assert_eq!(cache.get("r"), Some(located));
        cache.forget("r");
        assert_eq!(cache.get("r"), None);
    }
}
