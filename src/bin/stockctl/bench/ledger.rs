//! The client's own account of what its successful calls did, and the check
//! of that account against what the server (or Postgres) reports.
//!
//! Every SKU starts at (`stock`, 0) at version 1 (the seeding set). Each
//! successful operation moves `available` and `reserved` by its effects and
//! bumps the version of each item it touches by exactly 1, so the expected
//! state of every item is known exactly, and any difference is a bug.

use std::collections::HashMap;

use super::workload::Op;

/// The net change of one item by the successful calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    pub d_available: i64,
    pub d_reserved: i64,
    /// Successful changes of the item (each is one version).
    pub changes: u64,
}

/// Changes per SKU index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    items: HashMap<u32, Change>,
}

/// An item's quantities; `version` when the source has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub available: i64,
    pub reserved: i64,
    pub version: Option<i64>,
}

impl Ledger {
    /// Records a successful operation.
    pub fn apply(&mut self, op: &Op) {
        for (sku, d_available, d_reserved) in op.effects() {
            let c = self.items.entry(sku).or_default();
            c.d_available += d_available;
            c.d_reserved += d_reserved;
            c.changes += 1;
        }
    }

    pub fn merge(&mut self, other: &Ledger) {
        for (sku, o) in &other.items {
            let c = self.items.entry(*sku).or_default();
            c.d_available += o.d_available;
            c.d_reserved += o.d_reserved;
            c.changes += o.changes;
        }
    }

    pub fn change(&self, sku: u32) -> Change {
        self.items.get(&sku).copied().unwrap_or_default()
    }

    /// The expected level of each of `skus` items seeded with `stock`.
    pub fn expected(&self, skus: u32, stock: i64) -> Vec<Level> {
        (0..skus)
            .map(|s| {
                let c = self.change(s);
                Level {
                    available: stock + c.d_available,
                    reserved: c.d_reserved,
                    version: Some(1 + c.changes as i64),
                }
            })
            .collect()
    }

    /// Units the successful calls took beyond what there was: a negative
    /// expected quantity means the server said yes once too often.
    pub fn sold_beyond_stock(expected: &[Level]) -> u64 {
        expected
            .iter()
            .map(|l| (-l.available).max(0).unsigned_abs() + (-l.reserved).max(0).unsigned_abs())
            .sum()
    }
}

/// How a source differs from what it should hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Diff {
    /// Items compared.
    pub items: u64,
    /// Items the source does not have at all.
    pub missing_items: u64,
    /// Items whose available or reserved differ.
    pub mismatch_items: u64,
    /// Sum of |available difference| + |reserved difference|, a missing
    /// item counting all its expected units.
    pub mismatch_units: u64,
    /// Items at another version than expected (only where both have one).
    pub version_mismatch_items: u64,
}

impl Diff {
    /// Compares `actual[i]` with `expected[i]` for every item.
    pub fn compare(expected: &[Level], actual: &[Option<Level>]) -> Diff {
        assert_eq!(expected.len(), actual.len(), "one actual per expected item");
        let mut d = Diff {
            items: expected.len() as u64,
            ..Diff::default()
        };
        for (e, a) in expected.iter().zip(actual) {
            match a {
                None => {
                    d.missing_items += 1;
                    d.mismatch_units += e.available.unsigned_abs() + e.reserved.unsigned_abs();
                }
                Some(a) => {
                    let units = e.available.abs_diff(a.available) + e.reserved.abs_diff(a.reserved);
                    if units > 0 {
                        d.mismatch_items += 1;
                        d.mismatch_units += units;
                    }
                    if let (Some(ev), Some(av)) = (e.version, a.version)
                        && ev != av
                    {
                        d.version_mismatch_items += 1;
                    }
                }
            }
        }
        d
    }

    pub fn is_clean(&self) -> bool {
        self.missing_items == 0 && self.mismatch_units == 0 && self.version_mismatch_items == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve(lines: &[(u32, i64)]) -> Op {
        Op::Reserve {
            id: "r".into(),
            lines: lines.to_vec(),
        }
    }

    fn level(available: i64, reserved: i64, version: i64) -> Level {
        Level {
            available,
            reserved,
            version: Some(version),
        }
    }

    #[test]
    fn expected_levels_follow_the_successful_calls() {
        let mut l = Ledger::default();
        l.apply(&reserve(&[(0, 2), (1, 1)]));
        l.apply(&Op::Commit {
            id: "r".into(),
            lines: vec![(0, 2), (1, 1)],
        });
        l.apply(&reserve(&[(1, 3)]));
        l.apply(&Op::Release {
            id: "r2".into(),
            lines: vec![(1, 3)],
        });
        l.apply(&Op::Decrement {
            id: "d".into(),
            lines: vec![(2, 1)],
        });
        l.apply(&Op::Adjust {
            id: "a".into(),
            sku: 2,
            delta: 5,
        });
        l.apply(&reserve(&[(2, 4)]));
        assert_eq!(
            l.expected(4, 10),
            [
                level(8, 0, 3),  // reserve 2, commit 2
                level(9, 0, 5),  // reserve 1, commit 1, reserve 3, release 3
                level(10, 4, 4), // decrement 1, adjust +5, reserve 4
                level(10, 0, 1), // untouched: as seeded
            ]
        );
    }

    #[test]
    fn merged_ledgers_add_up() {
        let (mut a, mut b) = (Ledger::default(), Ledger::default());
        a.apply(&reserve(&[(0, 1)]));
        b.apply(&reserve(&[(0, 1), (3, 2)]));
        a.merge(&b);
        assert_eq!(
            a.change(0),
            Change {
                d_available: -2,
                d_reserved: 2,
                changes: 2
            }
        );
        assert_eq!(a.change(3).d_available, -2);
        assert_eq!(a.change(9), Change::default());
    }

    #[test]
    fn more_successes_than_stock_is_oversold() {
        let mut l = Ledger::default();
        for _ in 0..7 {
            l.apply(&reserve(&[(0, 1)]));
        }
        let e = l.expected(2, 5);
        assert_eq!(e[0].available, -2);
        assert_eq!(Ledger::sold_beyond_stock(&e), 2);
        assert_eq!(Ledger::sold_beyond_stock(&l.expected(2, 7)), 0);
    }

    #[test]
    fn diff_counts_units_items_versions_and_missing() {
        let expected = [
            level(5, 1, 3),
            level(0, 2, 4),
            level(7, 0, 1),
            level(9, 0, 2),
        ];
        let actual = [
            Some(level(5, 1, 3)), // same
            Some(level(1, 1, 4)), // 1 + 1 units off
            None,                 // 7 units missing
            Some(level(9, 0, 3)), // same quantities, another version
        ];
        let d = Diff::compare(&expected, &actual);
        assert_eq!(
            d,
            Diff {
                items: 4,
                missing_items: 1,
                mismatch_items: 1,
                mismatch_units: 9,
                version_mismatch_items: 1,
            }
        );
        assert!(!d.is_clean());
        let same: Vec<Option<Level>> = expected.iter().copied().map(Some).collect();
        assert!(Diff::compare(&expected, &same).is_clean());
    }

    #[test]
    fn versions_are_compared_only_when_both_sides_have_one() {
        let expected = [level(5, 0, 2)];
        let actual = [Some(Level {
            available: 5,
            reserved: 0,
            version: None,
        })];
        assert!(Diff::compare(&expected, &actual).is_clean());
    }
}
