//! The result of a bench run: one serde document (`--json`) and a readable
//! table.

use std::collections::BTreeMap;
use std::io::{self, Write};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

use super::ledger::Diff;
use crate::render::code_name;

/// Latency histograms count microseconds, up to this (longer calls are
/// recorded as this).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A histogram of latencies in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean().round() / 1000.0,
        }
    }
}

/// CPU used during the load, in % of one core (the machine: of all its
/// cores); see `cpu.rs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Cpu {
    /// This process: the load generator.
    pub bench_pct: Option<f64>,
    /// `--stockd-pid`.
    pub stockd_pct: Option<f64>,
    /// `--stockd-pid`'s CPU time per request, in microseconds, from the
    /// start of the load to the end of the flush's drain (stockd target).
    pub stockd_us_per_request: Option<f64>,
    /// `--redis-pid`.
    pub redis_pct: Option<f64>,
    /// Every local process named `postgres`.
    pub postgres_pct: Option<f64>,
    /// The whole machine, whoever used it, in % of all its cores.
    pub machine_busy_pct: Option<f64>,
}

/// Count of calls per gRPC status code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcomes([u64; 17]);

impl Outcomes {
    pub fn add(&mut self, code: Code) {
        self.0[code as usize] += 1;
    }

    pub fn merge(&mut self, other: &Outcomes) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub fn count(&self, code: Code) -> u64 {
        self.0[code as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `CODE → count` of the codes seen.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| (code_name(Code::from_i32(c as i32)), *n))
            .collect()
    }
}

/// The checks at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verify {
    /// Units the successful calls took beyond the seeded stock (plus
    /// restocks and releases): more yeses than there was stock.
    pub sold_beyond_stock: u64,
    /// The target's live state (GetStock, or the postgres target's table)
    /// against the client's account.
    pub state: Diff,
    /// stockd only: Postgres' `stock` rows against GetStock, after the
    /// flush drained. `None` when not checked.
    pub postgres: Option<Diff>,
    /// Calls whose outcome was unknown (e.g. UNAVAILABLE) and that were
    /// replayed with the same id after the load to learn it.
    pub replayed_unknown: u64,
    /// Of those, the ones still unknown: the account cannot be exact.
    pub still_unknown: u64,
}

impl Verify {
    /// Units sold beyond the stock plus every mismatched unit (must be 0).
    pub fn oversold(&self) -> u64 {
        self.sold_beyond_stock
            + self.state.mismatch_units
            + self.postgres.map(|d| d.mismatch_units).unwrap_or(0)
    }
}

/// One bench run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub target: &'static str,
    pub workload: &'static str,
    pub run_id: String,
    pub clients: u32,
    pub connections: u32,
    pub threads: usize,
    pub skus: u32,
    pub stock: i64,
    /// The `--rate` limit, requests per second over all clients.
    pub rate_limit_per_s: Option<f64>,
    /// Calls that completed during the load, whatever their outcome.
    pub requests: u64,
    pub duration_s: f64,
    pub throughput_per_s: f64,
    /// Calls that succeeded, per second.
    pub ok_per_s: f64,
    pub latency_ms: Latency,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub oversold: u64,
    pub verify: Verify,
    /// stockd: the oldest unflushed event's age, at its highest, sampled
    /// every 200 ms during the load and the drain.
    pub max_flush_lag_ms: Option<i64>,
    /// stockd: the most unflushed events (all partitions) seen at once.
    pub max_pending: Option<u64>,
    /// stockd: from the end of the load until no partition had unflushed
    /// events.
    pub drain_ms: Option<u64>,
    /// CPU used during the load.
    pub cpu_pct: Cpu,
    /// Transactions the database committed per second from the start of
    /// the load to the end of the drain (`pg_stat_database.xact_commit`).
    pub pg_commits_per_s: Option<f64>,
    /// `--stockd-pid`: the highest VmRSS sampled during the run.
    pub peak_rss_mb: Option<f64>,
    /// What went wrong; empty when the run checked out.
    pub problems: Vec<String>,
    pub ok: bool,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Per second, to 2 decimals; 0 for an empty duration.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        round2(count as f64 / secs)
    } else {
        0.0
    }
}

impl Report {
    pub fn write_json(&self, w: &mut dyn Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *w, self).map_err(io::Error::other)?;
        writeln!(w)
    }

    pub fn write_table(&self, w: &mut dyn Write) -> io::Result<()> {
        let l = &self.latency_ms;
        let v = &self.verify;
        let outcomes = self
            .outcomes
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut oversold = format!(
            "{} units (beyond stock {}, {} mismatch {} units in {} items",
            self.oversold,
            v.sold_beyond_stock,
            if self.target == "stockd" {
                "GetStock"
            } else {
                "table"
            },
            v.state.mismatch_units,
            v.state.mismatch_items + v.state.missing_items,
        );
        if self.target == "stockd" {
            oversold.push_str(&format!(
                ", {} version mismatches",
                v.state.version_mismatch_items
            ));
        }
        match &v.postgres {
            Some(p) => oversold.push_str(&format!(
                "; Postgres vs GetStock {} units in {} items, {} version mismatches)",
                p.mismatch_units,
                p.mismatch_items + p.missing_items,
                p.version_mismatch_items
            )),
            None => oversold.push(')'),
        }
        let mut fields: Vec<(&str, String)> = vec![
            ("target", self.target.to_owned()),
            (
                "workload",
                format!(
                    "{}, {} SKU{} of {} units",
                    self.workload,
                    self.skus,
                    if self.skus == 1 { "" } else { "s" },
                    self.stock
                ),
            ),
            (
                "clients",
                format!(
                    "{} over {} connection{}, {} thread{}",
                    self.clients,
                    self.connections,
                    if self.connections == 1 { "" } else { "s" },
                    self.threads,
                    if self.threads == 1 { "" } else { "s" }
                ),
            ),
            ("run id", self.run_id.clone()),
        ];
        if let Some(r) = self.rate_limit_per_s {
            fields.push(("rate limit", format!("{r} req/s")));
        }
        fields.extend([
            (
                "requests",
                format!("{} in {:.2} s", self.requests, self.duration_s),
            ),
            (
                "throughput",
                format!(
                    "{:.0} req/s ({:.0} OK/s)",
                    self.throughput_per_s, self.ok_per_s
                ),
            ),
            (
                "latency ms",
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean
                ),
            ),
            ("outcomes", outcomes),
            ("oversold", oversold),
        ]);
        if v.replayed_unknown > 0 {
            fields.push((
                "unknown",
                format!(
                    "{} calls replayed after the load, {} still unknown",
                    v.replayed_unknown, v.still_unknown
                ),
            ));
        }
        if self.target == "stockd" {
            fields.push((
                "flush",
                format!(
                    "max lag {}, max pending {}, drained in {}",
                    opt(self.max_flush_lag_ms, " ms"),
                    opt(self.max_pending, ""),
                    opt(self.drain_ms, " ms"),
                ),
            ));
        }
        fields.push((
            "CPU",
            format!(
                "stockctl {}, stockd {}, Redis {}, Postgres {} (% of one core); \
                 machine {} busy; stockd {} per request",
                opt(self.cpu_pct.bench_pct, "%"),
                opt(self.cpu_pct.stockd_pct, "%"),
                opt(self.cpu_pct.redis_pct, "%"),
                opt(self.cpu_pct.postgres_pct, "%"),
                opt(self.cpu_pct.machine_busy_pct, "%"),
                opt(self.cpu_pct.stockd_us_per_request, " µs"),
            ),
        ));
        fields.push(("PG commits", opt(self.pg_commits_per_s, " per second")));
        fields.push((
            "peak RSS",
            match self.peak_rss_mb {
                Some(mb) => format!("{mb:.1} MB"),
                None => "- (no --stockd-pid)".to_owned(),
            },
        ));
        fields.push((
            "verdict",
            if self.ok {
                "OK".to_owned()
            } else {
                format!("FAILED: {}", self.problems.join("; "))
            },
        ));
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
        for (k, v) in fields {
            writeln!(w, "{k:<width$}{v}")?;
        }
        Ok(())
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    match v {
        Some(v) => format!("{v}{unit}"),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut outcomes = Outcomes::default();
        for _ in 0..3 {
            outcomes.add(Code::Ok);
        }
        outcomes.add(Code::FailedPrecondition);
        Report {
            target: "stockd",
            workload: "hot",
            run_id: "abc".into(),
            clients: 50,
            connections: 2,
            threads: 1,
            skus: 1,
            stock: 3,
            rate_limit_per_s: None,
            requests: 4,
            duration_s: 2.0,
            throughput_per_s: rate(4, 2.0),
            ok_per_s: rate(3, 2.0),
            latency_ms: Latency {
                p50: 1.5,
                p90: 2.0,
                p99: 3.25,
                p999: 4.0,
                max: 4.0,
                mean: 2.1,
            },
            outcomes: outcomes.by_name(),
            oversold: 0,
            verify: Verify {
                postgres: Some(Diff::default()),
                ..Verify::default()
            },
            max_flush_lag_ms: Some(120),
            max_pending: Some(40),
            drain_ms: None,
            cpu_pct: Cpu {
                bench_pct: Some(40.0),
                stockd_pct: Some(55.5),
                stockd_us_per_request: Some(180.2),
                redis_pct: Some(31.0),
                postgres_pct: None,
                machine_busy_pct: Some(88.5),
            },
            pg_commits_per_s: Some(19.5),
            peak_rss_mb: None,
            problems: vec![],
            ok: true,
        }
    }

    #[test]
    fn percentiles_in_ms_with_microsecond_resolution() {
        let mut h = new_histogram();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!((l.p50, l.p90, l.p99, l.p999), (0.5, 0.9, 0.99, 0.999));
        assert_eq!((l.max, l.mean), (1.0, 0.501));
        h.record(25_000).unwrap();
        let l = Latency::of(&h);
        assert_eq!(l.p99, 0.991, "one more value moves the rank");
        // 3 significant digits: 25 ms lands in a bucket 16 µs wide.
        assert!((25.0..25.02).contains(&l.max), "{}", l.max);
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
    }

    #[test]
    fn slow_calls_saturate_instead_of_failing() {
        let mut h = new_histogram();
        h.saturating_record(MAX_LATENCY_US * 10);
        assert!(Latency::of(&h).max >= 60_000.0);
    }

    #[test]
    fn outcomes_are_named_and_merged() {
        let mut a = Outcomes::default();
        a.add(Code::Ok);
        a.add(Code::Unavailable);
        let mut b = Outcomes::default();
        b.add(Code::Ok);
        a.merge(&b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.count(Code::Ok), 2);
        let names: Vec<(&str, u64)> = a.by_name().into_iter().collect();
        assert_eq!(names, [("OK", 2), ("UNAVAILABLE", 1)]);
    }

    #[test]
    fn oversold_adds_beyond_stock_and_mismatches() {
        let v = Verify {
            sold_beyond_stock: 2,
            state: Diff {
                mismatch_units: 3,
                ..Diff::default()
            },
            postgres: Some(Diff {
                mismatch_units: 5,
                ..Diff::default()
            }),
            ..Verify::default()
        };
        assert_eq!(v.oversold(), 10);
        assert_eq!(Verify::default().oversold(), 0);
    }

    #[test]
    fn json_document_has_the_documented_keys() {
        let mut out = Vec::new();
        report().write_json(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for key in [
            "target",
            "workload",
            "clients",
            "requests",
            "duration_s",
            "throughput_per_s",
            "latency_ms",
            "outcomes",
            "oversold",
            "max_flush_lag_ms",
            "drain_ms",
            "peak_rss_mb",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        assert_eq!(v["throughput_per_s"], 2.0);
        assert_eq!(v["latency_ms"]["p99"], 3.25);
        assert_eq!(v["latency_ms"]["p999"], 4.0);
        assert_eq!(v["outcomes"]["OK"], 3);
        assert_eq!(v["outcomes"]["FAILED_PRECONDITION"], 1);
        assert_eq!(v["max_flush_lag_ms"], 120);
        assert!(v["drain_ms"].is_null());
        assert!(v["peak_rss_mb"].is_null());
        assert_eq!(v["verify"]["postgres"]["mismatch_units"], 0);
        assert_eq!(v["cpu_pct"]["stockd_us_per_request"], 180.2);
        assert_eq!(v["cpu_pct"]["redis_pct"], 31.0);
        assert!(v["cpu_pct"]["postgres_pct"].is_null());
        assert_eq!(v["cpu_pct"]["machine_busy_pct"], 88.5);
        assert_eq!(v["pg_commits_per_s"], 19.5);
    }

    #[test]
    fn table_is_readable() {
        let mut out = Vec::new();
        report().write_table(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("target      stockd\n"), "{text}");
        assert!(text.contains("throughput  2 req/s (2 OK/s)\n"), "{text}");
        assert!(
            text.contains("p50 1.500  p90 2.000  p99 3.250  p99.9 4.000  max 4.000"),
            "{text}"
        );
        assert!(
            text.contains("outcomes    FAILED_PRECONDITION 1, OK 3\n"),
            "{text}"
        );
        assert!(
            text.contains("max lag 120 ms, max pending 40, drained in -"),
            "{text}"
        );
        assert!(
            text.contains(
                "stockctl 40%, stockd 55.5%, Redis 31%, Postgres - (% of one core); \
                 machine 88.5% busy; stockd 180.2 µs per request\n"
            ),
            "{text}"
        );
        assert!(text.contains("PG commits  19.5 per second\n"), "{text}");
        assert!(text.ends_with("verdict     OK\n"), "{text}");

        let mut failed = report();
        failed.ok = false;
        failed.problems = vec!["oversold 2 units".into()];
        let mut out = Vec::new();
        failed.write_table(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("verdict     FAILED: oversold 2 units\n"),
            "{text}"
        );
    }
}
