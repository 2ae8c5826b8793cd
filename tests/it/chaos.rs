//! Chaos (issue 11): random operations from concurrent clients on two
//! stockd processes, interleaved with random faults: kill -9 of a stockd,
//! Redis restarted from an older snapshot (a rollback) or empty (a loss),
//! Postgres cut behind a proxy. Every ambiguous answer is resolved the way
//! a client must: the same request, same id, until a definite answer. At
//! the end the stock equals the initial stock plus every acknowledged
//! operation, the ledger holds each acknowledged change once, and nothing
//! is negative.
//!
//! Redis faults are injected once every acknowledged change is flushed:
//! what a Redis loses before that is its own durability window (README,
//! "Durability"), which stockd cannot make up for; everything else must
//! survive. A seeded schedule (`STOCKD_CHAOS_SEED`) runs for
//! `STOCKD_CHAOS_SECS` (default 30), or 600 s with `STOCKD_CHAOS_LONG=1`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::RwLock;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::own_redis::OwnRedis;
use crate::support::process::Stockd;
use crate::support::proxy::FaultProxy;
use crate::support::*;

const ITEMS: usize = 8;
const INITIAL: i64 = 100_000;
const CLIENTS: usize = 6;
/// Longest a client retries one operation before the test fails.
const OP_DEADLINE: Duration = Duration::from_secs(90);

/// A small seeded generator (xorshift64*): the schedule of a run is
/// repeated by its seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the clients had acknowledged, per item (available, reserved), and
/// how often each (op, ref) must be in the ledger.
#[derive(Default)]
struct Model {
    levels: BTreeMap<String, (i64, i64)>,
    ledger: BTreeMap<(String, String), i64>,
    ops: BTreeMap<&'static str, u64>,
    refused: BTreeMap<&'static str, u64>,
    unexpected: Vec<String>,
}

impl Model {
    fn apply(&mut self, op: &'static str, reference: &str, lines: &[(String, i64, i64)]) {
        *self.ops.entry(op).or_default() += 1;
        for (sku, d_available, d_reserved) in lines {
            let level = self.levels.entry(sku.clone()).or_default();
            level.0 += d_available;
            level.1 += d_reserved;
            *self
                .ledger
                .entry((op.to_owned(), reference.to_owned()))
                .or_default() += 1;
        }
    }
}

/// The two stockd processes (restarted on kill -9 at new addresses).
struct Fleet {
    channels: std::sync::RwLock<Vec<Channel>>,
}

impl Fleet {
    fn channel(&self, n: u64) -> Channel {
        let channels = self.channels.read().unwrap();
        channels[n as usize % channels.len()].clone()
    }
}

struct Shared {
    fleet: Fleet,
    /// Clients hold it (read) for each attempt; a Redis fault waits for
    /// the attempts in flight and for the flush (write).
    gate: RwLock<()>,
    model: std::sync::Mutex<Model>,
    attempts: AtomicU64,
    ambiguous: AtomicU64,
    stop: AtomicBool,
}

/// One call, retried with the same request until its answer is definite.
async fn until_definite<T, F, Fut>(
    shared: &Shared,
    rng: &mut Rng,
    what: &str,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    loop {
        let channel = shared.fleet.channel(rng.next());
        let answer = {
            let _attempt = shared.gate.read().await;
            shared.attempts.fetch_add(1, Ordering::Relaxed);
            tokio::time::timeout(Duration::from_secs(5), call(channel))
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client deadline")))
        };
        match answer {
            Err(status) if ambiguous(&status) => {
                shared.ambiguous.fetch_add(1, Ordering::Relaxed);
                assert!(
                    start.elapsed() < OP_DEADLINE,
                    "no definite answer to {what} within {OP_DEADLINE:?}: {status:?}"
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            answer => return answer,
        }
    }
}

fn skus() -> Vec<String> {
    (0..ITEMS).map(|i| format!("chaos-{i}")).collect()
}

/// Runs random operations until told to stop, then ends its open holds.
async fn client(shared: Arc<Shared>, n: usize, seed: u64) {
    let mut rng = Rng(seed ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let skus = skus();
    let mut open: Vec<(String, Vec<(String, i64)>)> = Vec::new();
    let mut k = 0u64;
    while !shared.stop.load(Ordering::Relaxed) || !open.is_empty() {
        k += 1;
        let id = format!("c{n}-{k}");
        let stopping = shared.stop.load(Ordering::Relaxed);
        let choice = if stopping { 9 } else { rng.below(10) };
        let pick = |rng: &mut Rng| -> Vec<(String, i64)> {
            let a = rng.below(ITEMS as u64) as usize;
            let mut lines = vec![(skus[a].clone(), 1 + rng.below(3) as i64)];
            if rng.below(3) == 0 {
                let b = (a + 1 + rng.below(ITEMS as u64 - 1) as usize) % ITEMS;
                lines.push((skus[b].clone(), 1 + rng.below(2) as i64));
            }
            lines
        };
        match choice {
            0..=2 => {
                let lines = pick(&mut rng);
                let request_lines: Vec<_> = lines.iter().map(|(s, q)| line(s, "", *q)).collect();
                let answer = until_definite(&shared, &mut rng, "decrement", |c| {
                    let (id, lines) = (id.clone(), request_lines.clone());
                    async move { Clients::new(c).decrement(&id, lines).await }
                })
                .await;
                record(&shared, "decrement", &id, answer.map(|_| ()), || {
                    lines.iter().map(|(s, q)| (s.clone(), -q, 0)).collect()
                });
            }
            3 => {
                let sku = skus[rng.below(ITEMS as u64) as usize].clone();
                let delta = rng.below(7) as i64 - 2;
                let delta = if delta == 0 { 1 } else { delta };
                let answer = until_definite(&shared, &mut rng, "adjust", |c| {
                    let (id, sku) = (id.clone(), sku.clone());
                    async move { Clients::new(c).adjust(&id, &sku, "", delta, "chaos").await }
                })
                .await;
                record(&shared, "adjust", &id, answer.map(|_| ()), || {
                    vec![(sku.clone(), delta, 0)]
                });
            }
            4..=6 if open.len() < 20 => {
                let lines = pick(&mut rng);
                let request_lines: Vec<_> = lines.iter().map(|(s, q)| line(s, "", *q)).collect();
                let answer = until_definite(&shared, &mut rng, "reserve", |c| {
                    let (id, lines) = (id.clone(), request_lines.clone());
                    async move { Clients::new(c).reserve(&id, lines, 3_600).await }
                })
                .await;
                let held = answer.is_ok();
                record(&shared, "reserve", &id, answer.map(|_| ()), || {
                    lines.iter().map(|(s, q)| (s.clone(), -q, *q)).collect()
                });
                if held {
                    open.push((id, lines));
                }
            }
            _ if !open.is_empty() => {
                let (hold, lines) = open.swap_remove(rng.below(open.len() as u64) as usize);
                let commit = rng.below(2) == 0;
                let answer = until_definite(&shared, &mut rng, "finish", |c| {
                    let hold = hold.clone();
                    async move {
                        let rpc = Clients::new(c);
                        if commit {
                            rpc.commit(&hold).await.map(drop)
                        } else {
                            rpc.release(&hold).await.map(drop)
                        }
                    }
                })
                .await;
                let (op, d_available) = if commit {
                    ("commit", 0)
                } else {
                    ("release", 1)
                };
                if let Err(status) = &answer {
                    // A hold is ended by its one client: any refusal is a bug.
                    shared.model.lock().unwrap().unexpected.push(format!(
                        "{op} {hold}: {:?} {}",
                        status.code(),
                        status.message()
                    ));
                    continue;
                }
                record(&shared, op, &hold, Ok(()), || {
                    lines
                        .iter()
                        .map(|(s, q)| (s.clone(), d_available * q, -q))
                        .collect()
                });
            }
            _ => {}
        }
    }
}

/// Books a definite answer in the model: applied, refused for lack of
/// stock, or something no client should ever see.
fn record(
    shared: &Shared,
    op: &'static str,
    reference: &str,
    answer: Result<(), tonic::Status>,
    lines: impl FnOnce() -> Vec<(String, i64, i64)>,
) {
    let mut model = shared.model.lock().unwrap();
    match answer {
        Ok(()) => model.apply(op, reference, &lines()),
        Err(status) if status.code() == Code::FailedPrecondition => {
            *model.refused.entry(op).or_default() += 1;
        }
        Err(status) => model.unexpected.push(format!(
            "{op} {reference}: {:?} {}",
            status.code(),
            status.message()
        )),
    }
}

/// Waits until every partition's stream is read and acknowledged by the
/// flusher: every change made so far is in Postgres.
async fn flushed(conn: &stockd::redis_conn::RedisConn, namespace: &str) {
    let keys = stockd::keys::Keyspace::new(namespace, 16);
    eventually(Duration::from_secs(60), "every change flushed", || {
        let keys = keys.clone();
        let mut conn = conn.clone();
        async move {
            for p in keys.partitions() {
                let groups: Result<Vec<BTreeMap<String, redis::Value>>, _> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(keys.events(p))
                    .query_async(&mut conn)
                    .await;
                let Ok(groups) = groups else {
                    continue;
                };
                for group in groups {
                    let int = |field: &str| -> Option<i64> {
                        group
                            .get(field)
                            .and_then(|v| redis::from_redis_value(v.clone()).ok())
                    };
                    if int("pending") != Some(0) || int("lag") != Some(0) {
                        return None;
                    }
                }
            }
            Some(())
        }
    })
    .await;
}

fn run_seconds() -> u64 {
    if let Ok(secs) = std::env::var("STOCKD_CHAOS_SECS") {
        return secs
            .parse()
            .expect("STOCKD_CHAOS_SECS is a number of seconds");
    }
    if std::env::var("STOCKD_CHAOS_LONG").is_ok_and(|v| v == "1") {
        600
    } else {
        30
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_never_loses_or_doubles_an_acknowledged_change() {
    let seed: u64 = std::env::var("STOCKD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let secs = run_seconds();
    println!("chaos: seed {seed}, {secs} s (STOCKD_CHAOS_SEED={seed} repeats the schedule)");
    let mut rng = Rng(seed);

    let mut redis = OwnRedis::start_persistent().await;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let namespace = unique_namespace("chaos");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::database(&database);
    let via_proxy = {
        let direct = postgres_url(&database);
        direct.replace("127.0.0.1:5432", &proxy.addr.to_string())
    };
    let args: Vec<String> = [
        "--epoch-check-ms",
        "100",
        "--redis-timeout-ms",
        "1000",
        "--database-statement-timeout-ms",
        "5000",
        "--database-lock-timeout-ms",
        "2000",
        "--database-idle-in-transaction-timeout-ms",
        "2000",
        "--database-acquire-timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec();
    let redis_url = redis.url();
    let start = |instance: &'static str| {
        let (url, namespace, via_proxy, args) = (
            redis_url.clone(),
            namespace.clone(),
            via_proxy.clone(),
            args.clone(),
        );
        async move { Stockd::start_on_redis(&url, &namespace, &via_proxy, instance, &args).await }
    };
    let mut fleet = vec![start("chaos-a").await, start("chaos-b").await];
    let conn = stockd::app::connect_redis(&redis.url(), false, Duration::from_secs(5))
        .await
        .unwrap();
    fleet[0].clients().seed_each(&skus(), INITIAL).await;
    let shared = Arc::new(Shared {
        fleet: Fleet {
            channels: std::sync::RwLock::new(fleet.iter().map(Stockd::channel).collect()),
        },
        gate: RwLock::new(()),
        model: Default::default(),
        attempts: AtomicU64::new(0),
        ambiguous: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(shared.clone(), n, seed)))
        .collect();

    // The faults, one at a time, 1-4 s apart.
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut snapshot = false;
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(1_000 + rng.below(3_000))).await;
        match rng.below(9) {
            0..=2 => {
                let n = rng.below(2) as usize;
                fleet[n].kill9();
                let instance = if n == 0 { "chaos-a" } else { "chaos-b" };
                fleet[n] = start(instance).await;
                shared.fleet.channels.write().unwrap()[n] = fleet[n].channel();
                *faults.entry("kill -9 stockd").or_default() += 1;
            }
            3 => {
                redis.save().await;
                snapshot = true;
                *faults.entry("(snapshot taken)").or_default() += 1;
            }
            4 | 5 if snapshot => {
                let _gate = shared.gate.write().await;
                flushed(&conn, &namespace).await;
                redis.restart_from_snapshot().await;
                *faults
                    .entry("Redis back from an older snapshot")
                    .or_default() += 1;
            }
            4..=6 => {
                let _gate = shared.gate.write().await;
                flushed(&conn, &namespace).await;
                redis.restart().await;
                snapshot = false;
                *faults.entry("Redis back empty").or_default() += 1;
            }
            _ => {
                proxy.cut();
                // How long the outage lasts (part of the fault schedule, like
                // the pause between faults above), not a wait for some state.
                tokio::time::sleep(Duration::from_millis(500 + rng.below(2_500))).await;
                proxy.restore();
                *faults.entry("Postgres cut").or_default() += 1;
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    // What every client was told, against both stores.
    let pool = sqlx::PgPool::connect(&postgres_url(&database))
        .await
        .unwrap();
    reconnected(&conn).await;
    assert_converged(
        &mut conn.clone(),
        &namespace,
        &pool,
        Duration::from_secs(60),
    )
    .await;
    let model = std::mem::take(&mut *shared.model.lock().unwrap());
    let report = format!(
        "chaos: seed {seed}, {:.0} s; operations acknowledged {:?}, refused for stock {:?}; \
         {} attempts, {} ambiguous answers retried; faults {:?}",
        began.elapsed().as_secs_f64(),
        model.ops,
        model.refused,
        shared.attempts.load(Ordering::Relaxed),
        shared.ambiguous.load(Ordering::Relaxed),
        faults
    );
    println!("{report}");
    assert!(
        model.unexpected.is_empty(),
        "{report}\nunexpected answers: {:?}",
        model.unexpected
    );
    let stock = levels_in_postgres(&pool).await;
    let mut lost_or_double = Vec::new();
    for sku in skus() {
        let (a, r) = model.levels.get(&sku).copied().unwrap_or_default();
        let want = (INITIAL + a, r);
        let (have_a, have_r, _) = stock[&(sku.clone(), "default".to_owned())];
        if (have_a, have_r) != want {
            lost_or_double.push(format!(
                "{sku}: stores {:?}, acknowledged {want:?}",
                (have_a, have_r)
            ));
        }
        assert!(have_a >= 0 && have_r >= 0, "{sku} negative");
        assert_eq!(have_r, 0, "{sku}: every hold was ended");
    }
    assert!(lost_or_double.is_empty(), "{report}\n{lost_or_double:?}");
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT op, ref, count(*) FROM stock_ledger WHERE op <> 'set' GROUP BY op, ref",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ledger: BTreeMap<(String, String), i64> =
        rows.into_iter().map(|(op, r, n)| ((op, r), n)).collect();
    let differing: Vec<_> = model
        .ledger
        .iter()
        .filter(|(k, n)| ledger.get(*k) != Some(*n))
        .map(|(k, n)| format!("{k:?}: acknowledged {n}, ledger {:?}", ledger.get(k)))
        .chain(
            ledger
                .iter()
                .filter(|(k, _)| !model.ledger.contains_key(*k))
                .map(|(k, n)| format!("{k:?}: in the ledger {n} times, never acknowledged")),
        )
        .take(10)
        .collect();
    assert!(differing.is_empty(), "{report}\nledger: {differing:?}");
    let forks: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_forks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(forks, 0, "{report}");
    for mut stockd in fleet {
        stockd.terminate().await;
    }
    pool.close().await;
    leftovers.remove().await;
}
