//! What the bench clients send: the workloads as generators of operations
//! on SKU indices, and the change each operation makes when it succeeds.
//!
//! Pure: no I/O, seeded randomness, so the tests below pin the shapes.

use rand::rngs::StdRng;
use rand::seq::index;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The shape of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Every request reserves 1 unit of the same SKU (a flash sale).
    Hot,
    /// Single-line reserves of 1 unit, spread evenly over the SKUs.
    Uniform,
    /// 5-line reserves of 1 unit each, on 5 distinct SKUs.
    Cart,
    /// Reserves followed by their commit or release, decrements and adjusts.
    Mixed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Hot => "hot",
            Workload::Uniform => "uniform",
            Workload::Cart => "cart",
            Workload::Mixed => "mixed",
        }
    }

    /// The fewest SKUs the workload can run on.
    pub fn min_skus(self) -> u32 {
        match self {
            Workload::Hot | Workload::Uniform => 1,
            Workload::Cart => CART_LINES as u32,
            Workload::Mixed => MIXED_MAX_LINES as u32,
        }
    }
}

/// Lines of a `cart` reserve.
pub const CART_LINES: usize = 5;
/// Most lines of a `mixed` reserve.
const MIXED_MAX_LINES: usize = 3;

/// A line: (SKU index, quantity).
pub type Line = (u32, i64);

/// One request. Ids are unique within a run (they start with the run id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Reserve { id: String, lines: Vec<Line> },
    Commit { id: String, lines: Vec<Line> },
    Release { id: String, lines: Vec<Line> },
    Decrement { id: String, lines: Vec<Line> },
    Adjust { id: String, sku: u32, delta: i64 },
}

/// The change of one item: (SKU index, delta of available, delta of reserved).
pub type Effect = (u32, i64, i64);

impl Op {
    /// What the operation changes when it succeeds, one entry per item (each
    /// entry is also one new version of that item).
    pub fn effects(&self) -> Vec<Effect> {
        match self {
            Op::Reserve { lines, .. } => lines.iter().map(|&(s, q)| (s, -q, q)).collect(),
            Op::Commit { lines, .. } => lines.iter().map(|&(s, q)| (s, 0, -q)).collect(),
            Op::Release { lines, .. } => lines.iter().map(|&(s, q)| (s, q, -q)).collect(),
            Op::Decrement { lines, .. } => lines.iter().map(|&(s, q)| (s, -q, 0)).collect(),
            Op::Adjust { sku, delta, .. } => vec![(*sku, *delta, 0)],
        }
    }
}

/// The operations of one client.
pub struct Generator {
    workload: Workload,
    skus: u32,
    /// `<run id>-<client>-`; a sequence number completes each id.
    prefix: String,
    seq: u64,
    rng: StdRng,
    /// `mixed`: the client's reservation that is held and not settled yet.
    held: Option<(String, Vec<Line>)>,
}

impl Generator {
    /// `skus` must be at least `workload.min_skus()`; `hot` uses SKU 0 only.
    pub fn new(workload: Workload, skus: u32, run_id: &str, client: u32, seed: u64) -> Self {
        assert!(skus >= workload.min_skus(), "too few SKUs for {workload:?}");
        Generator {
            workload,
            skus,
            prefix: format!("{run_id}-{client}-"),
            seq: 0,
            rng: StdRng::seed_from_u64(seed ^ (u64::from(client) << 32)),
            held: None,
        }
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{}{}", self.prefix, self.seq)
    }

    /// `k` distinct SKUs, each with a quantity in `qty`.
    fn lines(&mut self, k: usize, qty: std::ops::RangeInclusive<i64>) -> Vec<Line> {
        index::sample(&mut self.rng, self.skus as usize, k)
            .into_iter()
            .map(|s| (s as u32, self.rng.random_range(qty.clone())))
            .collect()
    }

    pub fn next_op(&mut self) -> Op {
        match self.workload {
            Workload::Hot => Op::Reserve {
                id: self.next_id(),
                lines: vec![(0, 1)],
            },
            Workload::Uniform => {
                let sku = self.rng.random_range(0..self.skus);
                Op::Reserve {
                    id: self.next_id(),
                    lines: vec![(sku, 1)],
                }
            }
            Workload::Cart => Op::Reserve {
                id: self.next_id(),
                lines: self.lines(CART_LINES, 1..=1),
            },
            Workload::Mixed => self.next_mixed(),
        }
    }

    /// A held reservation is settled next: commit 3 times in 4, else
    /// release. Otherwise: reserve 60 %, decrement 25 %, adjust 15 %.
    fn next_mixed(&mut self) -> Op {
        if let Some((id, lines)) = self.held.take() {
            return if self.rng.random_ratio(3, 4) {
                Op::Commit { id, lines }
            } else {
                Op::Release { id, lines }
            };
        }
        let roll = self.rng.random_range(0..100);
        if roll < 60 {
            let k = self.rng.random_range(1..=MIXED_MAX_LINES);
            Op::Reserve {
                id: self.next_id(),
                lines: self.lines(k, 1..=2),
            }
        } else if roll < 85 {
            let k = self.rng.random_range(1..=2);
            Op::Decrement {
                id: self.next_id(),
                lines: self.lines(k, 1..=1),
            }
        } else {
            let sku = self.rng.random_range(0..self.skus);
            // -2..=3 without 0: a little more restock than shrinkage.
            let mut delta = self.rng.random_range(-2..=2);
            if delta >= 0 {
                delta += 1;
            }
            Op::Adjust {
                id: self.next_id(),
                sku,
                delta,
            }
        }
    }

    /// Tells the generator how `op` ended; `ok` only for a definite success.
    /// A `mixed` client settles each reservation it got.
    pub fn observe(&mut self, op: &Op, ok: bool) {
        if let (Workload::Mixed, Op::Reserve { id, lines }, true) = (self.workload, op, ok) {
            self.held = Some((id.clone(), lines.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn kind(op: &Op) -> &'static str {
        match op {
            Op::Reserve { .. } => "reserve",
            Op::Commit { .. } => "commit",
            Op::Release { .. } => "release",
            Op::Decrement { .. } => "decrement",
            Op::Adjust { .. } => "adjust",
        }
    }

    fn ops(g: &mut Generator, n: usize, ok: bool) -> Vec<Op> {
        (0..n)
            .map(|_| {
                let op = g.next_op();
                g.observe(&op, ok);
                op
            })
            .collect()
    }

    fn id(op: &Op) -> &str {
        match op {
            Op::Reserve { id, .. }
            | Op::Commit { id, .. }
            | Op::Release { id, .. }
            | Op::Decrement { id, .. }
            | Op::Adjust { id, .. } => id,
        }
    }

    #[test]
    fn hot_always_reserves_one_unit_of_sku_0() {
        let mut g = Generator::new(Workload::Hot, 1, "r", 0, 1);
        for op in ops(&mut g, 100, true) {
            assert!(
                matches!(&op, Op::Reserve { lines, .. } if lines == &[(0, 1)]),
                "{op:?}"
            );
        }
    }

    #[test]
    fn uniform_spreads_over_every_sku() {
        let mut g = Generator::new(Workload::Uniform, 10, "r", 3, 7);
        let mut seen = [0u32; 10];
        for op in ops(&mut g, 2000, true) {
            let Op::Reserve { lines, .. } = op else {
                panic!("uniform only reserves: {op:?}")
            };
            assert_eq!(lines.len(), 1);
            assert_eq!(lines[0].1, 1);
            seen[lines[0].0 as usize] += 1;
        }
        // 200 expected per SKU; far outside 100..300 means a skewed draw.
        assert!(seen.iter().all(|&n| (100..300).contains(&n)), "{seen:?}");
    }

    #[test]
    fn cart_lines_are_five_distinct_skus() {
        let mut g = Generator::new(Workload::Cart, 5, "r", 0, 9);
        for op in ops(&mut g, 200, true) {
            let Op::Reserve { lines, .. } = op else {
                panic!("cart only reserves: {op:?}")
            };
            let skus: HashSet<u32> = lines.iter().map(|l| l.0).collect();
            assert_eq!(lines.len(), CART_LINES);
            assert_eq!(skus.len(), CART_LINES, "{lines:?}");
            assert!(lines.iter().all(|&(s, q)| s < 5 && q == 1));
        }
    }

    #[test]
    fn ids_are_unique_and_carry_the_run_and_client() {
        let mut all = HashSet::new();
        for client in 0..3 {
            let mut g = Generator::new(Workload::Mixed, 50, "run9", client, 5);
            for op in ops(&mut g, 500, true) {
                let id = id(&op).to_owned();
                assert!(id.starts_with(&format!("run9-{client}-")), "{id}");
                if !matches!(op, Op::Commit { .. } | Op::Release { .. }) {
                    assert!(all.insert(id.clone()), "id {id} used twice");
                }
            }
        }
    }

    #[test]
    fn mixed_settles_each_successful_reserve_next_with_its_lines() {
        let mut g = Generator::new(Workload::Mixed, 20, "r", 1, 11);
        let ops = ops(&mut g, 5000, true);
        let mut kinds = std::collections::HashMap::new();
        for pair in ops.windows(2) {
            *kinds.entry(kind(&pair[0])).or_insert(0u32) += 1;
            if let Op::Reserve { id, lines } = &pair[0] {
                match &pair[1] {
                    Op::Commit { id: i, lines: l } | Op::Release { id: i, lines: l } => {
                        assert_eq!((i, l), (id, lines));
                    }
                    other => panic!("reserve {id} not settled next: {other:?}"),
                }
            }
        }
        for kind in ["reserve", "commit", "release", "decrement", "adjust"] {
            assert!(kinds.get(kind).copied().unwrap_or(0) > 50, "{kinds:?}");
        }
        // Settlements: 3 commits for each release, roughly.
        let (c, r) = (kinds["commit"], kinds["release"]);
        assert!(c > 2 * r && c < 4 * r, "commit {c} release {r}");
        for op in &ops {
            if let Op::Adjust { delta, .. } = op {
                assert!(*delta != 0 && (-2..=3).contains(delta), "{op:?}");
            }
        }
    }

    #[test]
    fn mixed_does_not_settle_a_failed_reserve() {
        let mut g = Generator::new(Workload::Mixed, 20, "r", 1, 11);
        for op in ops(&mut g, 1000, false) {
            assert!(
                !matches!(op, Op::Commit { .. } | Op::Release { .. }),
                "{op:?}"
            );
        }
    }

    #[test]
    fn effects_of_each_operation() {
        let lines = vec![(1, 2), (4, 1)];
        let id = String::from("x");
        let reserve = Op::Reserve {
            id: id.clone(),
            lines: lines.clone(),
        };
        assert_eq!(reserve.effects(), [(1, -2, 2), (4, -1, 1)]);
        let commit = Op::Commit {
            id: id.clone(),
            lines: lines.clone(),
        };
        assert_eq!(commit.effects(), [(1, 0, -2), (4, 0, -1)]);
        let release = Op::Release {
            id: id.clone(),
            lines: lines.clone(),
        };
        assert_eq!(release.effects(), [(1, 2, -2), (4, 1, -1)]);
        let decrement = Op::Decrement {
            id: id.clone(),
            lines,
        };
        assert_eq!(decrement.effects(), [(1, -2, 0), (4, -1, 0)]);
        let adjust = Op::Adjust {
            id,
            sku: 7,
            delta: -3,
        };
        assert_eq!(adjust.effects(), [(7, -3, 0)]);
    }

    #[test]
    fn same_seed_same_operations() {
        let a = ops(
            &mut Generator::new(Workload::Mixed, 9, "r", 2, 42),
            100,
            true,
        );
        let b = ops(
            &mut Generator::new(Workload::Mixed, 9, "r", 2, 42),
            100,
            true,
        );
        assert_eq!(a, b);
    }
}
