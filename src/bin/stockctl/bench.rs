//! `stockctl bench`: load a running stockd (or, for comparison, a plain
//! Postgres table) with a workload, measure throughput and latency, and
//! check at the end that nothing was oversold.
//!
//! A run:
//! 1. seeds its own SKUs `bench-<run id>-<i>` (Admin.SetStock, or rows of
//!    `bench_stock` for `--target postgres`), so runs never collide, and
//!    waits for stockd's flush backlog to drain;
//! 2. runs `--clients` tasks, each sending one request at a time (or paced
//!    to `--rate`), multiplexed over `--connections` HTTP/2 connections,
//!    for `--duration` seconds or `--requests` calls; each call's latency
//!    goes to an HDR histogram (microseconds), its status code is counted,
//!    and each success is booked in the client's ledger;
//! 3. meanwhile samples FlushStatus (and the server's VmRSS with
//!    `--stockd-pid`) every 200 ms;
//! 4. replays with the same id any call whose outcome is unknown
//!    (UNAVAILABLE, a cut connection...), which stockd's idempotency makes
//!    safe, so the ledger is exact;
//! 5. waits for the flush to drain (`drain_ms`), then compares the ledger's
//!    expected available/reserved/version of every SKU with GetStock, and
//!    GetStock with Postgres' `stock` rows;
//! 6. reports the database's commits per second from the start of the load
//!    to the end of the drain ([`pgstat`]), and stockd's CPU time per
//!    request over the same window (`--stockd-pid`).
//!
//! The load runs on its own Tokio runtime (`--threads` workers) in its own
//! thread, whatever runtime the caller has.
//!
//! Submodules: [`workload`] (what is sent), [`ledger`] (what should result),
//! [`report`] (what is printed), [`grpc`] and [`postgres`] (the targets).

pub mod cpu;
pub mod grpc;
pub mod ledger;
pub mod pgstat;
pub mod postgres;
pub mod report;
pub mod workload;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Args, ValueEnum};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::commands::{self, Admin, CallSettings, Failure, Inventory, Target};
use super::render::Format;
use ledger::{Diff, Ledger};
use report::{Latency, Outcomes, Report, Verify};
use stockd::pb::admin_client::AdminClient;
use stockd::pb::inventory_client::InventoryClient;
pub use workload::Workload;
use workload::{Generator, Op};

/// The largest `available` stockd's SetStock accepts.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// How often FlushStatus and VmRSS are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// How often FlushStatus is polled while waiting for the flush to drain.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Clients per HTTP/2 connection when `--connections` is not given.
const CLIENTS_PER_CONNECTION: u32 = 25;
/// Most Postgres connections of the postgres target.
const MAX_PG_CONNECTIONS: u32 = 100;
/// Tries to learn the outcome of a call whose outcome was unknown.
const REPLAY_TRIES: u32 = 10;
/// How long replays of calls of unknown outcome may take in all.
const REPLAY_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// A running stockd, over gRPC.
    Stockd,
    /// The same workload as plain Postgres transactions on `bench_stock`.
    Postgres,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Stockd => "stockd",
            TargetKind::Postgres => "postgres",
        }
    }
}

/// `stockctl bench` options.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("length").required(true).args(["duration", "requests"])))]
pub struct BenchArgs {
    /// hot: one SKU; uniform: 1-line reserves over --skus; cart: 5-line
    /// reserves; mixed: reserve then commit/release, decrement, adjust.
    #[arg(long, value_enum)]
    pub workload: Workload,

    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub clients: u32,

    /// Run for this many seconds (e.g. 20 or 0.5).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,

    /// Run until this many calls were sent, over all clients.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,

    /// SKUs of the run (hot uses 1; cart needs 5, mixed 3 or more).
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub skus: u32,

    /// Units each SKU is seeded with (a small number makes a sell-out run).
    #[arg(long, value_name = "N", default_value_t = MAX_STOCK,
          value_parser = clap::value_parser!(i64).range(0..=MAX_STOCK))]
    pub stock: i64,

    /// What to load: stockd over gRPC, or Postgres directly.
    #[arg(long, value_enum, default_value_t = TargetKind::Stockd)]
    pub target: TargetKind,

    /// Postgres: stockd's database (to compare its `stock` rows), or where
    /// `--target postgres` keeps `bench_stock`.
    #[arg(
        long,
        env = "STOCKD_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/stockd",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: String,

    /// Pace the clients to this many requests per second in total (each
    /// client on a fixed schedule; a late call's latency counts from when
    /// it was due).
    #[arg(long, value_name = "PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// HTTP/2 connections the clients share (default: one per 25 clients).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connections: Option<u32>,

    /// Sample this process' resident memory (VmRSS) during the run.
    #[arg(long, value_name = "PID")]
    pub stockd_pid: Option<u32>,

    /// Report this Redis server's CPU during the load (its process id:
    /// `redis-cli INFO server`, `process_id`).
    #[arg(long, value_name = "PID")]
    pub redis_pid: Option<u32>,

    /// Reservation hold time: long, so nothing expires during the run.
    #[arg(long, value_name = "SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub ttl: u32,

    /// Threads of the load generator's runtime.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Prefix of the run's SKUs and ids (default: generated, unique).
    #[arg(long, value_name = "ID", value_parser = parse_run_id)]
    pub run_id: Option<String>,

    /// Give up waiting for the flush to drain after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub drain_timeout: u64,

    /// Skip the comparison of GetStock with Postgres' `stock` rows.
    #[arg(long)]
    pub no_postgres_check: bool,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err("expected seconds, more than 0 and at most 86400".into()),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("expected requests per second, more than 0".into()),
    }
}

fn parse_run_id(s: &str) -> Result<String, String> {
    if (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(s.to_owned())
    } else {
        Err("1 to 32 letters or digits".into())
    }
}

/// `<hex unix seconds><4 hex random>`: short, sortable by time, unique.
fn generate_run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs:x}{:04x}", rand::random::<u16>())
}

fn fail(message: impl Into<String>) -> Failure {
    Failure::Other(message.into())
}

// ------------------------------------------------------------------ names

/// The SKU names of a run, `bench-<run id>-<i>`.
#[derive(Clone)]
pub struct Names(Arc<NamesInner>);

struct NamesInner {
    run_id: String,
    prefix: String,
    skus: Vec<String>,
}

impl Names {
    pub fn new(run_id: &str, skus: u32) -> Names {
        let prefix = format!("bench-{run_id}-");
        let skus = (0..skus).map(|i| format!("{prefix}{i}")).collect();
        Names(Arc::new(NamesInner {
            run_id: run_id.to_owned(),
            prefix,
            skus,
        }))
    }

    pub fn sku(&self, i: u32) -> &str {
        &self.0.skus[i as usize]
    }

    pub fn len(&self) -> usize {
        self.0.skus.len()
    }

    pub fn run_id(&self) -> &str {
        &self.0.run_id
    }

    /// `bench-<run id>-`: no `%` or `_`, so it is also a LIKE prefix.
    pub fn prefix(&self) -> &str {
        &self.0.prefix
    }

    /// The index of a SKU of this run.
    pub fn index_of(&self, sku: &str) -> Option<u32> {
        let rest = sku.strip_prefix(self.prefix())?;
        if rest.starts_with('0') && rest.len() > 1 {
            return None;
        }
        rest.parse::<u32>()
            .ok()
            .filter(|&i| (i as usize) < self.len())
    }
}

// ------------------------------------------------------------------- plan

/// The validated options of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub workload: Workload,
    pub target: TargetKind,
    pub clients: u32,
    pub connections: u32,
    pub threads: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub skus: u32,
    pub stock: i64,
    pub rate: Option<f64>,
    pub ttl: u32,
    pub run_id: String,
    pub stockd_pid: Option<u32>,
    pub redis_pid: Option<u32>,
    pub database_url: String,
    pub drain_timeout: Duration,
    pub postgres_check: bool,
}

impl Plan {
    pub fn new(args: BenchArgs) -> Result<Plan, String> {
        let skus = match args.workload {
            Workload::Hot => 1,
            _ => args.skus,
        };
        if skus < args.workload.min_skus() {
            return Err(format!(
                "--workload {} needs --skus {} or more",
                args.workload.name(),
                args.workload.min_skus()
            ));
        }
        let connections = args
            .connections
            .unwrap_or((args.clients / CLIENTS_PER_CONNECTION).max(1))
            .min(args.clients);
        Ok(Plan {
            workload: args.workload,
            target: args.target,
            clients: args.clients,
            connections,
            threads: usize::from(args.threads),
            duration: args.duration.map(Duration::from_secs_f64),
            requests: args.requests,
            skus,
            stock: args.stock,
            rate: args.rate,
            ttl: args.ttl,
            run_id: args.run_id.unwrap_or_else(generate_run_id),
            stockd_pid: args.stockd_pid,
            redis_pid: args.redis_pid,
            database_url: args.database_url,
            drain_timeout: Duration::from_secs(args.drain_timeout),
            postgres_check: !args.no_postgres_check,
        })
    }

    /// The gap between two calls of one client under `--rate`.
    fn interval(&self) -> Option<Duration> {
        self.rate
            .map(|r| Duration::from_secs_f64(f64::from(self.clients) / r))
    }
}

// -------------------------------------------------------------------- run

/// Runs the bench and prints its report; an oversell (or any check that
/// failed) is an error after the report.
pub async fn run(
    args: BenchArgs,
    target: &Target,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let plan = Plan::new(args).map_err(Failure::Usage)?;
    let conn = Conn {
        endpoint: commands::endpoint(target)?,
        client_auth: CallSettings::client(target)?,
        admin_auth: CallSettings::admin(target)?,
    };

    let (progress, mut messages) = mpsc::unbounded_channel::<String>();
    let (done_tx, mut done) = oneshot::channel();
    let threads = plan.threads;
    std::thread::Builder::new()
        .name("stockctl-bench".into())
        .spawn(move || {
            let runtime = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()
            };
            let result = match runtime {
                Ok(rt) => rt.block_on(execute(plan, conn, progress)),
                Err(e) => Err(fail(format!("cannot start the bench runtime: {e}"))),
            };
            let _ = done_tx.send(result);
        })
        .map_err(|e| fail(format!("cannot start the bench thread: {e}")))?;

    let result = loop {
        tokio::select! {
            Some(m) = messages.recv() => writeln!(err, "bench: {m}")?,
            r = &mut done => break r.map_err(|_| fail("the bench thread died"))?,
        }
    };
    while let Ok(m) = messages.try_recv() {
        writeln!(err, "bench: {m}")?;
    }
    let report = result?;
    match format {
        Format::Json => report.write_json(out)?,
        Format::Table => report.write_table(out)?,
    }
    out.flush()?;
    if report.ok {
        Ok(())
    } else {
        Err(fail(format!(
            "bench failed: {}",
            report.problems.join("; ")
        )))
    }
}

/// How to reach stockd (TLS settings included).
struct Conn {
    endpoint: tonic::transport::Endpoint,
    client_auth: CallSettings,
    admin_auth: CallSettings,
}

type Progress = mpsc::UnboundedSender<String>;

fn say(progress: &Progress, message: String) {
    let _ = progress.send(message);
}

/// One client's way to its target.
enum Caller {
    Stockd(Box<grpc::Caller>),
    Postgres(postgres::Caller),
}

impl Caller {
    async fn call(&mut self, op: &Op) -> Code {
        match self {
            Caller::Stockd(c) => c.call(op).await,
            Caller::Postgres(c) => c.call(op).await,
        }
    }
}

/// What the server side measured while the load ran.
#[derive(Debug, Clone, Default)]
struct Samples {
    max_lag_ms: Option<i64>,
    max_pending: Option<u64>,
    peak_rss_kb: Option<u64>,
    flush_errors: u64,
}

impl Samples {
    fn flush(&mut self, s: grpc::FlushSnapshot) {
        self.max_lag_ms = Some(self.max_lag_ms.unwrap_or(0).max(s.oldest_unflushed_age_ms));
        self.max_pending = Some(self.max_pending.unwrap_or(0).max(s.pending));
    }

    fn rss(&mut self, kb: u64) {
        self.peak_rss_kb = Some(self.peak_rss_kb.unwrap_or(0).max(kb));
    }
}

/// `VmRSS` of /proc/PID/status, in kB.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

fn read_rss_kb(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Samples FlushStatus (when `admin` is given) and VmRSS until `stop`.
async fn sample(
    mut admin: Option<Admin>,
    pid: Option<u32>,
    samples: Arc<Mutex<Samples>>,
    stop: CancellationToken,
) {
    loop {
        if let Some(kb) = pid.and_then(read_rss_kb) {
            samples.lock().unwrap().rss(kb);
        }
        if let Some(a) = admin.as_mut() {
            match grpc::flush_status(a).await {
                Ok(Some(s)) => samples.lock().unwrap().flush(s),
                Ok(None) => admin = None,
                Err(_) => samples.lock().unwrap().flush_errors += 1,
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Polls FlushStatus until nothing is unflushed; the time that took, or
/// `None` after `timeout`.
async fn wait_drained(
    admin: &mut Admin,
    timeout: Duration,
    samples: Option<&Mutex<Samples>>,
) -> Result<Option<Duration>, Failure> {
    let start = Instant::now();
    loop {
        let snapshot = grpc::flush_status(admin)
            .await
            .map_err(Failure::from)?
            .unwrap_or_default();
        if let Some(samples) = samples {
            samples.lock().unwrap().flush(snapshot);
        }
        if snapshot.pending == 0 {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > timeout {
            return Ok(None);
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What the load phase produced.
struct Loaded {
    elapsed: Duration,
    cpu: report::Cpu,
    /// `--stockd-pid`'s CPU time when the load began.
    stockd_cpu_at_start: Option<Duration>,
    histogram: Histogram<u64>,
    outcomes: Outcomes,
    ledger: Ledger,
    /// Calls whose outcome is unknown (stockd only), to replay.
    unknown: Vec<Op>,
}

/// Codes after which the call may or may not have been applied.
fn outcome_unknown(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The part of the load all clients share.
struct Shared {
    start: Instant,
    deadline: Option<Instant>,
    budget: Option<(AtomicU64, u64)>,
    interval: Option<Duration>,
    clients: u32,
    replay_unknown: bool,
    histograms: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    /// Takes the right to send one more call.
    fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match &self.budget {
            Some((sent, max)) => sent.fetch_add(1, Ordering::Relaxed) < *max,
            None => true,
        }
    }
}

#[derive(Default)]
struct ClientOut {
    outcomes: Outcomes,
    ledger: Ledger,
    unknown: Vec<Op>,
}

async fn client(
    shared: Arc<Shared>,
    id: u32,
    mut caller: Caller,
    mut generator: Generator,
) -> ClientOut {
    let mut out = ClientOut::default();
    // Clients start spread over one interval, not all at once.
    let mut next = shared
        .interval
        .map(|iv| shared.start + iv.mul_f64(f64::from(id) / f64::from(shared.clients)));
    let mut last_done = shared.start;
    let shard = &shared.histograms[id as usize % shared.histograms.len()];
    while shared.take() {
        let mut due = None;
        if let (Some(at), Some(iv)) = (next.as_mut(), shared.interval) {
            tokio::time::sleep_until((*at).into()).await;
            due = Some(*at);
            *at += iv;
            if shared.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        let op = generator.next_op();
        let sent = Instant::now();
        let code = caller.call(&op).await;
        let done = Instant::now();
        // Paced: a call that is late because this client's previous call was
        // slow counts from when it was due (no coordinated omission); the
        // timer's own lateness does not count.
        let from = match due {
            Some(due) if last_done > due => due,
            _ => sent,
        };
        last_done = done;
        let us = done.saturating_duration_since(from).as_micros() as u64;
        shard.lock().unwrap().saturating_record(us.max(1));
        out.outcomes.add(code);
        generator.observe(&op, code == Code::Ok);
        if code == Code::Ok {
            out.ledger.apply(&op);
        } else if shared.replay_unknown && outcome_unknown(code) {
            out.unknown.push(op);
        }
    }
    out
}

/// Runs the clients to the end of the load.
async fn load(plan: &Plan, callers: Vec<Caller>) -> Result<Loaded, Failure> {
    let cpu_before = cpu::Reading::take(plan.stockd_pid, plan.redis_pid);
    let start = Instant::now();
    let shards = (plan.clients as usize).min(16);
    let shared = Arc::new(Shared {
        start,
        deadline: plan.duration.map(|d| start + d),
        budget: plan.requests.map(|n| (AtomicU64::new(0), n)),
        interval: plan.interval(),
        clients: plan.clients,
        replay_unknown: plan.target == TargetKind::Stockd,
        histograms: (0..shards)
            .map(|_| Mutex::new(report::new_histogram()))
            .collect(),
    });
    let seed: u64 = rand::random();
    let mut tasks = tokio::task::JoinSet::new();
    for (id, caller) in callers.into_iter().enumerate() {
        let id = id as u32;
        let generator = Generator::new(plan.workload, plan.skus, &plan.run_id, id, seed);
        tasks.spawn(client(shared.clone(), id, caller, generator));
    }
    let mut loaded = Loaded {
        elapsed: Duration::ZERO,
        cpu: report::Cpu::default(),
        stockd_cpu_at_start: cpu_before.stockd,
        histogram: report::new_histogram(),
        outcomes: Outcomes::default(),
        ledger: Ledger::default(),
        unknown: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let out = joined.map_err(|e| fail(format!("bench client: {e}")))?;
        loaded.outcomes.merge(&out.outcomes);
        loaded.ledger.merge(&out.ledger);
        loaded.unknown.extend(out.unknown);
    }
    loaded.elapsed = start.elapsed();
    loaded.cpu = cpu_before.usage(
        &cpu::Reading::take(plan.stockd_pid, plan.redis_pid),
        loaded.elapsed,
    );
    for h in &shared.histograms {
        loaded
            .histogram
            .add(&*h.lock().unwrap())
            .map_err(|e| fail(format!("merging histograms: {e:?}")))?;
    }
    Ok(loaded)
}

/// Replays each call of unknown outcome with its own id until stockd gives
/// a definite answer; books the successes. Gives up after `REPLAY_FOR` in
/// all (e.g. when the server is gone). Returns the calls still unknown.
async fn replay_unknown(caller: &mut Caller, loaded: &mut Loaded) -> u64 {
    let give_up = Instant::now() + REPLAY_FOR;
    let mut still = 0;
    for op in std::mem::take(&mut loaded.unknown) {
        let mut known = false;
        for attempt in 0..REPLAY_TRIES {
            if Instant::now() >= give_up {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let code = caller.call(&op).await;
            if !outcome_unknown(code) {
                if code == Code::Ok {
                    loaded.ledger.apply(&op);
                }
                known = true;
                break;
            }
        }
        if !known {
            still += 1;
        }
    }
    still
}

async fn execute(plan: Plan, conn: Conn, progress: Progress) -> Result<Report, Failure> {
    match plan.target {
        TargetKind::Stockd => execute_stockd(plan, conn, progress).await,
        TargetKind::Postgres => execute_postgres(plan, progress).await,
    }
}

fn length(plan: &Plan) -> String {
    match (plan.duration, plan.requests) {
        (Some(d), _) => format!("{:.1} s", d.as_secs_f64()),
        (None, Some(n)) => format!("{n} requests"),
        (None, None) => String::new(),
    }
}

async fn execute_stockd(plan: Plan, conn: Conn, progress: Progress) -> Result<Report, Failure> {
    let names = Names::new(&plan.run_id, plan.skus);
    let admin_channel = grpc::connect(&conn.endpoint).await?;
    let mut admin: Admin = AdminClient::with_interceptor(admin_channel.clone(), conn.admin_auth);
    let mut inventory: Inventory =
        InventoryClient::with_interceptor(admin_channel, conn.client_auth.clone());

    say(
        &progress,
        format!(
            "run {}: seeding {} SKUs with {} units",
            plan.run_id, plan.skus, plan.stock
        ),
    );
    grpc::seed(&admin, &names, plan.stock).await?;
    let flush_supported = grpc::flush_status(&mut admin)
        .await
        .map_err(Failure::from)?
        .is_some();
    if flush_supported {
        // Start with an empty backlog, so the lag and the drain are the load's.
        if wait_drained(&mut admin, plan.drain_timeout, None)
            .await?
            .is_none()
        {
            return Err(fail("the flush backlog did not drain before the load"));
        }
    }

    let mut channels = Vec::with_capacity(plan.connections as usize);
    for _ in 0..plan.connections {
        channels.push(grpc::connect(&conn.endpoint).await?);
    }
    let callers = (0..plan.clients as usize)
        .map(|i| {
            Caller::Stockd(Box::new(grpc::Caller {
                client: InventoryClient::with_interceptor(
                    channels[i % channels.len()].clone(),
                    conn.client_auth.clone(),
                ),
                names: names.clone(),
                ttl_seconds: plan.ttl,
            }))
        })
        .collect();

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(
        flush_supported.then(|| admin.clone()),
        plan.stockd_pid,
        samples.clone(),
        stop.clone(),
    ));
    say(
        &progress,
        format!(
            "{} load for {}: {} clients over {} connections",
            plan.workload.name(),
            length(&plan),
            plan.clients,
            plan.connections
        ),
    );
    let commits = start_commit_count(&plan, &progress).await;
    let mut loaded = load(&plan, callers).await?;
    let load_end = Instant::now();

    let replayed = loaded.unknown.len() as u64;
    let mut replayer = Caller::Stockd(Box::new(grpc::Caller {
        client: inventory.clone(),
        names: names.clone(),
        ttl_seconds: plan.ttl,
    }));
    let still_unknown = replay_unknown(&mut replayer, &mut loaded).await;

    let mut problems = Vec::new();
    let mut drain_ms = None;
    if flush_supported {
        say(&progress, "waiting for the flush to drain".into());
        match wait_drained(&mut admin, plan.drain_timeout, Some(&samples)).await? {
            Some(_) => drain_ms = Some(load_end.elapsed().as_millis() as u64),
            None => problems.push(format!(
                "the flush did not drain within {} s",
                plan.drain_timeout.as_secs()
            )),
        }
    }
    stop.cancel();
    let _ = sampler.await;
    // The flush's work is the requests' too: CPU and commits up to the
    // end of the drain.
    loaded.cpu.stockd_us_per_request = cpu_per_request(
        loaded.stockd_cpu_at_start,
        plan.stockd_pid.and_then(|p| cpu::process_time(Some(p))),
        loaded.outcomes.total(),
    );
    let pg_commits_per_s = commits_per_second(commits, &mut problems).await;

    say(
        &progress,
        "checking GetStock against the calls' outcomes".into(),
    );
    let expected = loaded.ledger.expected(plan.skus, plan.stock);
    let actual = grpc::read_levels(&mut inventory, &names).await?;
    let state = Diff::compare(&expected, &actual);

    let postgres = if !plan.postgres_check {
        None
    } else if !flush_supported {
        problems.push("Postgres not checked: the server has no FlushStatus".into());
        None
    } else {
        say(&progress, "checking Postgres against GetStock".into());
        match grpc::read_postgres(&plan.database_url, &names).await {
            Ok(rows) => Some(Diff::compare(&actual_or_zero(&actual), &rows)),
            Err(e) => {
                problems.push(format!("Postgres not checked: {e}"));
                None
            }
        }
    };
    let verify = Verify {
        sold_beyond_stock: Ledger::sold_beyond_stock(&expected),
        state,
        postgres,
        replayed_unknown: replayed,
        still_unknown,
    };
    let samples = samples.lock().unwrap().clone();
    let mut report = build_report(&plan, &loaded, verify, &samples, drain_ms, problems);
    report.pg_commits_per_s = pg_commits_per_s;
    Ok(report)
}

/// Starts counting the database's commits (see [`pgstat`]); a database
/// that cannot be asked leaves the figure out.
async fn start_commit_count(plan: &Plan, progress: &Progress) -> Option<pgstat::Commits> {
    match pgstat::Commits::start(&plan.database_url).await {
        Ok(commits) => Some(commits),
        Err(e) => {
            say(
                progress,
                format!("Postgres commits not counted (pg_stat_database: {e})"),
            );
            None
        }
    }
}

async fn commits_per_second(
    commits: Option<pgstat::Commits>,
    problems: &mut Vec<String>,
) -> Option<f64> {
    match commits?.per_second().await {
        Ok(rate) => Some(rate),
        Err(e) => {
            problems.push(format!("Postgres commits not counted: {e}"));
            None
        }
    }
}

/// CPU microseconds per request between two readings.
fn cpu_per_request(
    before: Option<Duration>,
    after: Option<Duration>,
    requests: u64,
) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    (requests > 0).then(|| (used.as_secs_f64() * 1e6 / requests as f64 * 10.0).round() / 10.0)
}

/// GetStock's levels as the expectation for Postgres (a missing item is
/// expected with nothing, so only the GetStock check counts it).
fn actual_or_zero(actual: &[Option<ledger::Level>]) -> Vec<ledger::Level> {
    actual
        .iter()
        .map(|a| {
            a.unwrap_or(ledger::Level {
                available: 0,
                reserved: 0,
                version: None,
            })
        })
        .collect()
}

async fn execute_postgres(plan: Plan, progress: Progress) -> Result<Report, Failure> {
    let names = Names::new(&plan.run_id, plan.skus);
    let connections = plan.clients.min(MAX_PG_CONNECTIONS);
    say(
        &progress,
        format!("connecting {connections} Postgres connections"),
    );
    let pool = postgres::connect(&plan.database_url, connections)
        .await
        .map_err(|e| fail(format!("postgres: {e}")))?;
    say(
        &progress,
        format!(
            "run {}: seeding {} rows of bench_stock with {} units",
            plan.run_id, plan.skus, plan.stock
        ),
    );
    postgres::seed(&pool, &names, plan.stock)
        .await
        .map_err(|e| fail(format!("seeding bench_stock: {e}")))?;

    let callers = (0..plan.clients)
        .map(|_| {
            Caller::Postgres(postgres::Caller {
                pool: pool.clone(),
                names: names.clone(),
            })
        })
        .collect();
    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(None, plan.stockd_pid, samples.clone(), stop.clone()));
    say(
        &progress,
        format!(
            "{} load for {}: {} clients over {connections} Postgres connections",
            plan.workload.name(),
            length(&plan),
            plan.clients
        ),
    );
    let commits = start_commit_count(&plan, &progress).await;
    let loaded = load(&plan, callers).await?;
    stop.cancel();
    let _ = sampler.await;
    let mut problems = Vec::new();
    let pg_commits_per_s = commits_per_second(commits, &mut problems).await;

    say(
        &progress,
        "checking bench_stock against the calls' outcomes".into(),
    );
    let mut expected = loaded.ledger.expected(plan.skus, plan.stock);
    for e in &mut expected {
        e.version = None;
    }
    let actual = postgres::read_levels(&pool, &names)
        .await
        .map_err(|e| fail(format!("reading bench_stock: {e}")))?;
    let verify = Verify {
        sold_beyond_stock: Ledger::sold_beyond_stock(&expected),
        state: Diff::compare(&expected, &actual),
        postgres: None,
        replayed_unknown: 0,
        still_unknown: 0,
    };
    if let Err(e) = postgres::clean_up(&pool, &names).await {
        problems.push(format!("could not delete the run's bench_stock rows: {e}"));
    }
    pool.close().await;
    let samples = samples.lock().unwrap().clone();
    let mut report = build_report(&plan, &loaded, verify, &samples, None, problems);
    report.connections = connections;
    report.pg_commits_per_s = pg_commits_per_s;
    Ok(report)
}

fn build_report(
    plan: &Plan,
    loaded: &Loaded,
    verify: Verify,
    samples: &Samples,
    drain_ms: Option<u64>,
    mut problems: Vec<String>,
) -> Report {
    let secs = loaded.elapsed.as_secs_f64();
    let requests = loaded.outcomes.total();
    let oversold = verify.oversold();
    let mut checks = Vec::new();
    if requests == 0 {
        checks.push("no call completed".to_owned());
    }
    if oversold > 0 {
        checks.push(format!("oversold {oversold} units"));
    }
    let s = &verify.state;
    if s.missing_items > 0 {
        checks.push(format!("{} items missing", s.missing_items));
    }
    if s.version_mismatch_items > 0 {
        checks.push(format!(
            "{} items at another version than the successful calls make",
            s.version_mismatch_items
        ));
    }
    if let Some(p) = &verify.postgres
        && !p.is_clean()
    {
        checks.push(format!(
            "Postgres differs from GetStock: {} items missing, {} with other quantities, {} at another version",
            p.missing_items, p.mismatch_items, p.version_mismatch_items
        ));
    }
    if verify.still_unknown > 0 {
        checks.push(format!(
            "{} calls of unknown outcome even after replays",
            verify.still_unknown
        ));
    }
    let errors: Vec<String> = loaded
        .outcomes
        .by_name()
        .into_iter()
        .filter(|(c, _)| !matches!(*c, "OK" | "FAILED_PRECONDITION"))
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    if !errors.is_empty() {
        checks.push(format!("errors: {}", errors.join(", ")));
    }
    checks.append(&mut problems);
    Report {
        target: plan.target.name(),
        workload: plan.workload.name(),
        run_id: plan.run_id.clone(),
        clients: plan.clients,
        connections: plan.connections,
        threads: plan.threads,
        skus: plan.skus,
        stock: plan.stock,
        rate_limit_per_s: plan.rate,
        requests,
        duration_s: (secs * 1000.0).round() / 1000.0,
        throughput_per_s: report::rate(requests, secs),
        ok_per_s: report::rate(loaded.outcomes.count(Code::Ok), secs),
        latency_ms: Latency::of(&loaded.histogram),
        outcomes: loaded.outcomes.by_name(),
        oversold,
        verify,
        max_flush_lag_ms: samples.max_lag_ms,
        max_pending: samples.max_pending,
        drain_ms,
        cpu_pct: loaded.cpu,
        pg_commits_per_s: None,
        peak_rss_mb: samples
            .peak_rss_kb
            .map(|kb| (kb as f64 / 1024.0 * 10.0).round() / 10.0),
        ok: checks.is_empty(),
        problems: checks,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let argv = ["stockctl", "bench"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Bench(b) => Plan::new(b),
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_derived_values() {
        let p = plan(&["--workload", "uniform", "--duration", "2"]).unwrap();
        assert_eq!(p.clients, 50);
        assert_eq!(p.connections, 2, "one connection per 25 clients");
        assert_eq!(p.skus, 10_000);
        assert_eq!(p.stock, MAX_STOCK);
        assert_eq!(p.duration, Some(Duration::from_secs(2)));
        assert_eq!(p.target, TargetKind::Stockd);
        assert_eq!(p.ttl, 86_400);
        assert!(p.run_id.len() >= 9 && p.run_id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(p.interval(), None);

        let p = plan(&[
            "--workload",
            "hot",
            "--requests",
            "10",
            "--skus",
            "50",
            "--clients",
            "3",
        ])
        .unwrap();
        assert_eq!(p.skus, 1, "hot is one SKU");
        assert_eq!(p.connections, 1);
        assert_eq!(p.requests, Some(10));
    }

    #[test]
    fn rate_is_spread_over_the_clients() {
        let p = plan(&[
            "--workload",
            "uniform",
            "--duration",
            "1",
            "--clients",
            "10",
            "--rate",
            "1000",
        ])
        .unwrap();
        assert_eq!(p.interval(), Some(Duration::from_millis(10)));
    }

    #[test]
    fn invalid_invocations_are_refused() {
        assert!(plan(&["--workload", "uniform"]).is_err(), "needs a length");
        assert!(
            plan(&[
                "--workload",
                "uniform",
                "--duration",
                "1",
                "--requests",
                "5"
            ])
            .is_err()
        );
        assert!(plan(&["--workload", "uniform", "--duration", "0"]).is_err());
        assert!(
            plan(&["--workload", "cart", "--duration", "1", "--skus", "4"])
                .unwrap_err()
                .contains("--skus 5")
        );
        assert!(plan(&["--workload", "mixed", "--duration", "1", "--skus", "2"]).is_err());
        assert!(
            plan(&[
                "--workload",
                "hot",
                "--duration",
                "1",
                "--stock",
                "1000000001"
            ])
            .is_err()
        );
        assert!(plan(&["--workload", "hot", "--duration", "1", "--run-id", "a-b"]).is_err());
        assert!(plan(&["--workload", "hot", "--duration", "1", "--rate", "0"]).is_err());
        let p = plan(&[
            "--workload",
            "hot",
            "--duration",
            "1",
            "--stock",
            "0",
            "--run-id",
            "x1",
        ]);
        assert_eq!(p.unwrap().run_id, "x1");
    }

    #[test]
    fn names_round_trip() {
        let n = Names::new("r1", 12);
        assert_eq!(n.sku(0), "bench-r1-0");
        assert_eq!(n.sku(11), "bench-r1-11");
        assert_eq!(n.index_of("bench-r1-11"), Some(11));
        assert_eq!(n.index_of("bench-r1-12"), None, "not of this run");
        assert_eq!(n.index_of("bench-r1-011"), None);
        assert_eq!(n.index_of("bench-r2-1"), None);
        assert_eq!(n.prefix(), "bench-r1-");
        assert_eq!(n.len(), 12);
    }

    #[test]
    fn vm_rss_is_read_in_kb() {
        let status = "Name:\tstockd\nVmPeak:\t  900000 kB\nVmRSS:\t   34567 kB\nThreads:\t5\n";
        assert_eq!(parse_vm_rss(status), Some(34_567));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn cpu_per_request_counts_the_whole_window() {
        let ms = Duration::from_millis;
        // 1.5 s of CPU over 10,000 requests: 150 µs each.
        assert_eq!(
            cpu_per_request(Some(ms(1000)), Some(ms(2500)), 10_000),
            Some(150.0)
        );
        assert_eq!(cpu_per_request(Some(ms(1000)), Some(ms(2500)), 0), None);
        assert_eq!(cpu_per_request(None, Some(ms(2500)), 10), None);
    }

    #[test]
    fn unknown_outcomes_are_the_ones_that_may_have_applied() {
        assert!(outcome_unknown(Code::Unavailable));
        assert!(outcome_unknown(Code::DeadlineExceeded));
        assert!(!outcome_unknown(Code::FailedPrecondition));
        assert!(!outcome_unknown(Code::Ok));
        assert!(!outcome_unknown(Code::AlreadyExists));
    }

    fn loaded(codes: &[(Code, u64)]) -> Loaded {
        let mut outcomes = Outcomes::default();
        for &(c, n) in codes {
            for _ in 0..n {
                outcomes.add(c);
            }
        }
        Loaded {
            elapsed: Duration::from_secs(2),
            cpu: report::Cpu::default(),
            stockd_cpu_at_start: None,
            histogram: report::new_histogram(),
            outcomes,
            ledger: Ledger::default(),
            unknown: vec![],
        }
    }

    #[test]
    fn report_verdict() {
        let p = plan(&["--workload", "hot", "--duration", "2", "--stock", "5"]).unwrap();
        let samples = Samples::default();
        let ok = build_report(
            &p,
            &loaded(&[(Code::Ok, 5), (Code::FailedPrecondition, 95)]),
            Verify::default(),
            &samples,
            Some(12),
            vec![],
        );
        assert!(ok.ok, "{:?}", ok.problems);
        assert_eq!(ok.requests, 100);
        assert_eq!(ok.throughput_per_s, 50.0);
        assert_eq!(ok.ok_per_s, 2.5);

        let bad = build_report(
            &p,
            &loaded(&[(Code::Ok, 6), (Code::Unavailable, 1)]),
            Verify {
                sold_beyond_stock: 1,
                ..Verify::default()
            },
            &samples,
            None,
            vec!["the flush did not drain within 120 s".into()],
        );
        assert!(!bad.ok);
        assert_eq!(bad.oversold, 1);
        assert_eq!(
            bad.problems,
            [
                "oversold 1 units",
                "errors: UNAVAILABLE 1",
                "the flush did not drain within 120 s"
            ]
        );
    }

    // ------------------------------------------- whole runs, fake server

    use std::collections::HashMap;
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use stockd::pb;

    /// A held reservation's (sku, quantity) lines.
    type HeldLines = Vec<(String, i64)>;

    /// An in-memory stockd: items (available, reserved, version) and held
    /// reservations. With `oversell`, a short reserve answers OK and
    /// changes nothing: the bug the bench must catch.
    #[derive(Clone, Default)]
    struct FakeStockd {
        items: Arc<Mutex<HashMap<String, [i64; 3]>>>,
        held: Arc<Mutex<HashMap<String, HeldLines>>>,
        oversell: bool,
    }

    fn level(sku: &str, v: [i64; 3]) -> pb::StockLevel {
        pb::StockLevel {
            sku: sku.into(),
            location: "default".into(),
            available: v[0],
            reserved: v[1],
            version: v[2],
        }
    }

    impl FakeStockd {
        /// Applies (d_available, d_reserved) to every line, all or nothing.
        fn apply(&self, lines: &[(String, i64, i64)]) -> Result<(), Status> {
            let mut items = self.items.lock().unwrap();
            for (sku, da, dr) in lines {
                let v = items
                    .get(sku)
                    .ok_or_else(|| Status::not_found(sku.clone()))?;
                if v[0] + da < 0 || v[1] + dr < 0 {
                    return if self.oversell {
                        Ok(())
                    } else {
                        Err(Status::failed_precondition("not enough stock"))
                    };
                }
            }
            for (sku, da, dr) in lines {
                let v = items.get_mut(sku).unwrap();
                *v = [v[0] + da, v[1] + dr, v[2] + 1];
            }
            Ok(())
        }

        fn settle(&self, id: &str, release: bool) -> Result<(), Status> {
            let lines = self
                .held
                .lock()
                .unwrap()
                .remove(id)
                .ok_or_else(|| Status::not_found(id.to_owned()))?;
            let d = |q: i64| if release { q } else { 0 };
            let lines: Vec<_> = lines.into_iter().map(|(s, q)| (s, d(q), -q)).collect();
            self.apply(&lines)
        }
    }

    #[tonic::async_trait]
    impl pb::inventory_server::Inventory for FakeStockd {
        async fn reserve(
            &self,
            req: Request<pb::ReserveRequest>,
        ) -> Result<Response<pb::ReserveResponse>, Status> {
            let r = req.into_inner();
            assert_eq!(r.ttl_seconds, 86_400, "a long hold");
            let lines: Vec<_> = r
                .lines
                .iter()
                .map(|l| (l.sku.clone(), -l.quantity, l.quantity))
                .collect();
            self.apply(&lines)?;
            let held = r
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity))
                .collect();
            let fresh = self
                .held
                .lock()
                .unwrap()
                .insert(r.reservation_id, held)
                .is_none();
            assert!(fresh, "reservation ids are unique");
            Ok(Response::new(pb::ReserveResponse::default()))
        }

        async fn commit(
            &self,
            req: Request<pb::CommitRequest>,
        ) -> Result<Response<pb::CommitResponse>, Status> {
            self.settle(&req.into_inner().reservation_id, false)?;
            Ok(Response::new(pb::CommitResponse::default()))
        }

        async fn release(
            &self,
            req: Request<pb::ReleaseRequest>,
        ) -> Result<Response<pb::ReleaseResponse>, Status> {
            self.settle(&req.into_inner().reservation_id, true)?;
            Ok(Response::new(pb::ReleaseResponse::default()))
        }

        async fn decrement(
            &self,
            req: Request<pb::DecrementRequest>,
        ) -> Result<Response<pb::DecrementResponse>, Status> {
            let lines: Vec<_> = req
                .into_inner()
                .lines
                .iter()
                .map(|l| (l.sku.clone(), -l.quantity, 0))
                .collect();
            self.apply(&lines)?;
            Ok(Response::new(pb::DecrementResponse::default()))
        }

        async fn adjust(
            &self,
            req: Request<pb::AdjustRequest>,
        ) -> Result<Response<pb::AdjustResponse>, Status> {
            let r = req.into_inner();
            self.apply(&[(r.sku, r.delta, 0)])?;
            Ok(Response::new(pb::AdjustResponse::default()))
        }

        async fn get_stock(
            &self,
            req: Request<pb::GetStockRequest>,
        ) -> Result<Response<pb::GetStockResponse>, Status> {
            let items = self.items.lock().unwrap();
            let mut out = pb::GetStockResponse::default();
            for i in req.into_inner().items {
                match items.get(&i.sku) {
                    Some(v) => out.levels.push(level(&i.sku, *v)),
                    None => out.missing.push(i),
                }
            }
            Ok(Response::new(out))
        }
    }

    #[tonic::async_trait]
    impl pb::admin_server::Admin for FakeStockd {
        async fn set_stock(
            &self,
            req: Request<pb::SetStockRequest>,
        ) -> Result<Response<pb::SetStockResponse>, Status> {
            let r = req.into_inner();
            let mut items = self.items.lock().unwrap();
            if r.expected_version == Some(0) && items.contains_key(&r.sku) {
                return Err(Status::aborted("exists"));
            }
            let v = [r.available, 0, 1];
            items.insert(r.sku.clone(), v);
            Ok(Response::new(pb::SetStockResponse {
                level: Some(level(&r.sku, v)),
                replayed: false,
            }))
        }

        async fn flush_status(
            &self,
            _req: Request<pb::FlushStatusRequest>,
        ) -> Result<Response<pb::FlushStatusResponse>, Status> {
            Ok(Response::new(pb::FlushStatusResponse {
                partitions: vec![pb::PartitionFlushStatus::default()],
            }))
        }
    }

    async fn serve(fake: FakeStockd) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::inventory_server::InventoryServer::new(fake.clone()))
                .add_service(pb::admin_server::AdminServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Runs `stockctl --json bench ARGS` against `addr`: exit code, JSON.
    async fn bench(addr: SocketAddr, args: &[&str]) -> (u8, serde_json::Value, String) {
        let url = format!("http://{addr}");
        let argv = [
            "stockctl",
            "--addr",
            url.as_str(),
            "--json",
            "bench",
            "--no-postgres-check",
        ]
        .into_iter()
        .chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = crate::run(cli, &mut out, &mut err, crate::progress::Display::Lines).await;
        let err = String::from_utf8(err).unwrap();
        let v = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
        (code, v, err)
    }

    #[tokio::test]
    async fn hot_sell_out_sells_exactly_the_stock() {
        let fake = FakeStockd::default();
        let addr = serve(fake.clone()).await;
        let args = [
            "--workload",
            "hot",
            "--requests",
            "300",
            "--clients",
            "8",
            "--stock",
            "100",
        ];
        let (code, v, err) = bench(addr, &args).await;
        assert_eq!(code, crate::EXIT_OK, "{err}");
        assert_eq!(v["requests"], 300);
        assert_eq!(v["outcomes"]["OK"], 100);
        assert_eq!(v["outcomes"]["FAILED_PRECONDITION"], 200);
        assert_eq!(v["oversold"], 0);
        assert_eq!(v["drain_ms"].as_u64().map(|d| d < 5_000), Some(true), "{v}");
        assert_eq!(v["ok"], true);
        let items = fake.items.lock().unwrap();
        let sku = format!("bench-{}-0", v["run_id"].as_str().unwrap());
        assert_eq!(items[&sku], [0, 100, 101]);
        assert!(err.contains("seeding 1 SKUs"), "{err}");
    }

    #[tokio::test]
    async fn mixed_bookkeeping_matches_a_correct_server_exactly() {
        let addr = serve(FakeStockd::default()).await;
        let args = [
            "--workload",
            "mixed",
            "--requests",
            "2000",
            "--clients",
            "10",
            "--skus",
            "20",
            "--stock",
            "40",
        ];
        let (code, v, err) = bench(addr, &args).await;
        assert_eq!(code, crate::EXIT_OK, "{err}\n{v}");
        assert_eq!(v["verify"]["state"]["items"], 20);
        assert_eq!(v["verify"]["state"]["version_mismatch_items"], 0);
        assert_eq!(v["oversold"], 0);
        for kind in ["OK", "FAILED_PRECONDITION"] {
            assert!(
                v["outcomes"][kind].as_u64().unwrap() > 0,
                "low stock: some fail {v}"
            );
        }
    }

    #[tokio::test]
    async fn an_overselling_server_is_caught() {
        let addr = serve(FakeStockd {
            oversell: true,
            ..FakeStockd::default()
        })
        .await;
        let args = [
            "--workload",
            "uniform",
            "--requests",
            "100",
            "--clients",
            "4",
            "--skus",
            "3",
            "--stock",
            "10",
        ];
        let (code, v, err) = bench(addr, &args).await;
        assert_eq!(code, crate::EXIT_FAILURE);
        assert_eq!(
            v["outcomes"]["OK"], 100,
            "the server said yes to everything"
        );
        assert_eq!(v["verify"]["sold_beyond_stock"], 70);
        assert!(v["oversold"].as_u64().unwrap() >= 70, "{v}");
        assert_eq!(v["ok"], false);
        assert!(err.contains("error: bench failed: oversold"), "{err}");
    }

    #[tokio::test]
    async fn a_duration_run_with_a_rate_stays_near_the_rate() {
        let addr = serve(FakeStockd::default()).await;
        let args = [
            "--workload",
            "uniform",
            "--duration",
            "1",
            "--clients",
            "4",
            "--rate",
            "200",
            "--skus",
            "5",
        ];
        let (code, v, err) = bench(addr, &args).await;
        assert_eq!(code, crate::EXIT_OK, "{err}");
        let n = v["requests"].as_u64().unwrap();
        assert!((150..=210).contains(&n), "about 200 in 1 s, got {n}");
        assert_eq!(v["rate_limit_per_s"], 200.0);
    }
}
