//! Where the CPU went during the load, from `/proc`: the load generator
//! (this process), stockd (`--stockd-pid`), Redis (`--redis-pid`), the local
//! Postgres (every process named `postgres`) and the machine as a whole.
//!
//! All of them are read at the start and at the end of the load itself, so
//! that seeding, the drain and the checks around it do not dilute the
//! figures (scripts/bench once read Redis and the machine around the whole
//! run, which halved them). On a machine where the servers run elsewhere a
//! figure is simply missing.

use std::time::Duration;

use super::report::Cpu;

/// One reading of every counter; a counter that could not be read is `None`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    bench: Option<Duration>,
    pub stockd: Option<Duration>,
    redis: Option<Duration>,
    postgres: Option<Duration>,
    /// (busy, all) jiffies of every core, from the `cpu` line of /proc/stat.
    machine: Option<(u64, u64)>,
}

impl Reading {
    pub fn take(stockd_pid: Option<u32>, redis_pid: Option<u32>) -> Reading {
        Reading {
            bench: process_time(None),
            stockd: stockd_pid.and_then(|p| process_time(Some(p))),
            redis: redis_pid.and_then(|p| process_time(Some(p))),
            postgres: postgres_time(),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_machine(&s)),
        }
    }

    /// The use between `self` and `after`, `elapsed` apart, in % of one
    /// core (the machine: in % of all its cores).
    pub fn usage(&self, after: &Reading, elapsed: Duration) -> Cpu {
        Cpu {
            bench_pct: pct(self.bench, after.bench, elapsed),
            stockd_pct: pct(self.stockd, after.stockd, elapsed),
            stockd_us_per_request: None,
            redis_pct: pct(self.redis, after.redis, elapsed),
            postgres_pct: pct(self.postgres, after.postgres, elapsed),
            machine_busy_pct: match (self.machine, after.machine) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some(round1(
                    b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * 100.0,
                )),
                _ => None,
            },
        }
    }
}

/// utime + stime of /proc/PID/stat, in clock ticks (USER_HZ, 100 a second).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (2nd field) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, all) jiffies of the `cpu` line of /proc/stat: busy is user, nice,
/// system, irq, softirq and steal; all adds idle and iowait.
fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// CPU time used so far by `pid` (this process when `None`).
pub fn process_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    ticks(&std::fs::read_to_string(path).ok()?)
}

/// CPU time of every process named `postgres` (the server and its
/// backends), or `None` when there is none. Backends live as long as their
/// connection, and both targets keep theirs open through the load.
fn postgres_time() -> Option<Duration> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_postgres = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "postgres");
        if !is_postgres {
            continue;
        }
        if let Some(used) = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| ticks(&s))
        {
            *total.get_or_insert(Duration::ZERO) += used;
        }
    }
    total
}

fn ticks(stat: &str) -> Option<Duration> {
    Some(Duration::from_millis(parse_cpu_ticks(stat)? * 10))
}

/// CPU use in % of one core between two readings `elapsed` apart.
fn pct(before: Option<Duration>, after: Option<Duration>, elapsed: Duration) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| round1(used.as_secs_f64() / secs * 100.0))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        // pid (comm with a space and a parenthesis) state ppid ... utime stime ...
        let stat = "4242 (stock d) x) S 1 4242 4242 0 -1 4194560 1061 0 0 0 250 75 0 0 20 0 6 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (short"), None);
        let ms = Duration::from_millis;
        assert_eq!(pct(Some(ms(1000)), Some(ms(2500)), ms(2000)), Some(75.0));
        assert_eq!(pct(None, Some(ms(2500)), ms(2000)), None);
    }

    #[test]
    fn the_machine_is_busy_outside_idle_and_iowait() {
        let stat = "cpu  100 10 40 800 20 5 5 20 0 0\ncpu0 50 5 20 400 10 2 3 10 0 0\n";
        assert_eq!(parse_machine(stat), Some((180, 1000)));
        assert_eq!(parse_machine("cpu0 1 2 3\n"), None);
        let before = Reading {
            machine: Some((180, 1000)),
            ..Reading::default()
        };
        let after = Reading {
            machine: Some((630, 2000)),
            ..Reading::default()
        };
        let cpu = before.usage(&after, Duration::from_secs(5));
        assert_eq!(cpu.machine_busy_pct, Some(45.0));
        assert_eq!(cpu.redis_pct, None, "no --redis-pid: no figure");
    }
}
