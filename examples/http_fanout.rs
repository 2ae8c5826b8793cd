//! Fan-out of the HTTP API: many Server-Sent Events subscribers (and some
//! GraphQL WebSocket ones) on one stockd, the latency from a Reserve to
//! each subscriber's receipt of its event, and stockd's memory per
//! subscriber. A load tool, not a test.
//!
//! ```sh
//! cargo build --release --bin stockd --example http_fanout
//! target/release/examples/http_fanout --sse 5000 --websockets 200 --samples 200
//! ```
//!
//! It starts its OWN stockd (`--stockd`, default `target/release/stockd`)
//! on free ports with a fresh namespace and database, raises the open-files
//! limit to its hard limit first (the child inherits it: each subscriber is
//! a socket on both sides), and removes its keys and database at the end.
//! Every subscriber watches the same SKU, each on its own TCP connection.
//! For each of `--samples` Reserves, one at a time, it records for every
//! subscriber the time from just before the Reserve was sent to the moment
//! that subscriber parsed the event, and waits until all got it. Memory is
//! stockd's resident set (`/proc/<pid>/status` VmRSS) before the
//! subscribers connect and once they are all receiving, divided by their
//! number. The tool and stockd share the machine: with thousands of
//! subscribers, the client side's parsing is part of the latency measured.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use stockd::pb;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Parser)]
struct Args {
    /// The stockd binary to start.
    #[arg(long, default_value = "target/release/stockd")]
    stockd: String,
    /// Server-Sent Events subscribers.
    #[arg(long, default_value_t = 5000)]
    sse: usize,
    /// GraphQL subscribers over WebSocket.
    #[arg(long, default_value_t = 200)]
    websockets: usize,
    /// Reserves measured.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Connections opened at once while subscribing.
    #[arg(long, default_value_t = 100)]
    connect_batch: usize,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The Postgres server; the tool uses a database of its own on it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
}

/// Which channel a subscriber uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Channel {
    Sse,
    WebSocket,
}

/// What every subscriber reports into.
struct Shared {
    /// When Reserve number i was sent, in µs since `base`.
    sent_at_us: Vec<AtomicU64>,
    base: Instant,
    /// Receipts of Reserve number i (warm-up is number 0).
    received: Vec<AtomicUsize>,
    sse: Mutex<Histogram<u64>>,
    websocket: Mutex<Histogram<u64>>,
}

impl Shared {
    /// A subscriber got the event of the Reserve with reference `reference`.
    fn record(&self, channel: Channel, reference: &str, run: &str) {
        let Some(i) = reference
            .strip_prefix(run)
            .and_then(|r| r.strip_prefix("-r"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return;
        };
        let now_us = self.base.elapsed().as_micros() as u64;
        let latency = now_us.saturating_sub(self.sent_at_us[i].load(Ordering::Acquire));
        if i > 0 {
            let histogram = match channel {
                Channel::Sse => &self.sse,
                Channel::WebSocket => &self.websocket,
            };
            let _ = histogram.lock().unwrap().record(latency.max(1));
        }
        self.received[i].fetch_add(1, Ordering::Release);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Raises this process's open-files limit to its hard limit.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Stockd {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
}

fn start_stockd(args: &Args, namespace: &str, database: &str) -> Stockd {
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(&args.stockd)
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--http-addr", &http.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--namespace", namespace])
        .args(["--redis-url", &args.redis_url])
        .args(["--database-url", &format!("{}/{database}", args.postgres)])
        .args(["--http-max-subscriptions", "16"])
        .env("STOCKD_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {}: {e} (build it with cargo build --release)",
                args.stockd
            )
        });
    Stockd {
        child,
        grpc,
        http,
        metrics,
    }
}

async fn wait_ready(http: SocketAddr) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{http}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "stockd not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// stockd's `stockd_watchers` gauge: subscriptions registered with its hub.
async fn watchers(metrics: SocketAddr) -> usize {
    let Ok(response) = reqwest::get(format!("http://{metrics}/metrics")).await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("stockd_watchers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

/// One SSE subscriber: reads events until the stream ends.
async fn sse_subscriber(
    http: SocketAddr,
    sku: String,
    run: String,
    shared: Arc<Shared>,
    connected: Arc<AtomicUsize>,
) {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let mut response = client
        .get(format!("http://{http}/v1/events?sku={sku}"))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 200, "subscribe");
    connected.fetch_add(1, Ordering::Relaxed);
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for data in block.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if let Ok(event) = serde_json::from_str::<Value>(data)
                    && event["op"] == "reserve"
                {
                    shared.record(
                        Channel::Sse,
                        event["reference"].as_str().unwrap_or(""),
                        &run,
                    );
                }
            }
        }
    }
}

/// One GraphQL subscriber over `graphql-transport-ws`.
async fn websocket_subscriber(
    http: SocketAddr,
    sku: String,
    run: String,
    shared: Arc<Shared>,
    connected: Arc<AtomicUsize>,
) {
    let mut request = format!("ws://{http}/graphql")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket");
    let send = |v: Value| Message::text(v.to_string());
    socket
        .send(send(json!({"type": "connection_init", "payload": {}})))
        .await
        .unwrap();
    let query =
        format!("subscription {{ stockChanged(skus: [\"{sku}\"]) {{ eventId op version }} }}");
    let mut subscribed = false;
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_default();
        match value["type"].as_str() {
            Some("connection_ack") if !subscribed => {
                subscribed = true;
                socket
                    .send(send(json!({"type": "subscribe", "id": "1",
                        "payload": {"query": query}})))
                    .await
                    .unwrap();
                connected.fetch_add(1, Ordering::Relaxed);
            }
            Some("ping") => {
                let _ = socket.send(send(json!({"type": "pong"}))).await;
            }
            Some("next") => {
                // The selection has no reference: the version tells which
                // Reserve this is.
                let change = &value["payload"]["data"]["stockChanged"];
                if change["op"] == "reserve" {
                    let version = change["version"].as_i64().unwrap_or(0);
                    // Version 1 is the seed; version v + 1 is Reserve v - 1
                    // (number 0 being the warm-up).
                    if version >= 2 {
                        let reference = format!("{run}-r{}", version - 2);
                        shared.record(Channel::WebSocket, &reference, &run);
                    }
                }
            }
            _ => {}
        }
    }
}

async fn wait_for(what: &str, deadline: Duration, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn report(name: &str, h: &Histogram<u64>) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

async fn cleanup(args: &Args, namespace: &str, database: &str) {
    if let Ok(client) = redis::Client::open(args.redis_url.as_str())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    }
    if let Ok(pool) = sqlx::PgPool::connect(&format!("{}/postgres", args.postgres)).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let open_files = raise_open_files();
    let needed = (args.sse + args.websockets) as u64 * 2 + 200;
    assert!(
        open_files >= needed,
        "open-files limit {open_files} is below the {needed} this run needs (ulimit -Hn)"
    );
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let run = format!("fanout-{stamp}");
    let namespace = run.clone();
    let database = format!("stockd_fanout_{stamp}");

    let mut stockd = start_stockd(&args, &namespace, &database);
    wait_ready(stockd.http).await;
    let pid = stockd.child.id();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", stockd.grpc))
        .unwrap()
        .connect()
        .await
        .expect("gRPC");
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let mut inventory = pb::inventory_client::InventoryClient::new(channel);
    let sku = format!("{run}-hot");
    admin
        .set_stock(pb::SetStockRequest {
            request_id: format!("{run}-seed"),
            sku: sku.clone(),
            location: String::new(),
            available: 1_000_000,
            expected_version: None,
        })
        .await
        .expect("seed");

    let rss_before = rss_kib(pid);
    let shared = Arc::new(Shared {
        sent_at_us: (0..=args.samples).map(|_| AtomicU64::new(0)).collect(),
        base: Instant::now(),
        received: (0..=args.samples).map(|_| AtomicUsize::new(0)).collect(),
        sse: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        websocket: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
    });
    let connected = Arc::new(AtomicUsize::new(0));
    let subscribers = args.sse + args.websockets;
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let (sku, run, shared, counter) =
            (sku.clone(), run.clone(), shared.clone(), connected.clone());
        tasks.push(if i < args.sse {
            tokio::spawn(sse_subscriber(stockd.http, sku, run, shared, counter))
        } else {
            tokio::spawn(websocket_subscriber(stockd.http, sku, run, shared, counter))
        });
        if (i + 1) % args.connect_batch == 0 {
            let target = i + 1;
            wait_for("subscribers to connect", Duration::from_secs(60), || {
                connected.load(Ordering::Relaxed) >= target
            })
            .await;
        }
    }
    wait_for("subscribers to connect", Duration::from_secs(60), || {
        connected.load(Ordering::Relaxed) >= subscribers
    })
    .await;
    // A WebSocket subscription is registered a moment after it is sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while watchers(stockd.metrics).await < subscribers {
        assert!(
            Instant::now() < deadline,
            "subscriptions not registered within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_time = connect_started.elapsed();

    // Warm-up (number 0), unmeasured: every subscriber gets it.
    let reserve = |i: usize| pb::ReserveRequest {
        reservation_id: format!("{run}-r{i}"),
        lines: vec![pb::Line {
            sku: sku.clone(),
            location: String::new(),
            quantity: 1,
        }],
        ttl_seconds: 3600,
    };
    inventory.reserve(reserve(0)).await.expect("reserve");
    wait_for(
        "every subscriber to get the warm-up",
        Duration::from_secs(60),
        || shared.received[0].load(Ordering::Acquire) >= subscribers,
    )
    .await;
    let rss_after = rss_kib(pid);

    let started = Instant::now();
    for i in 1..=args.samples {
        shared.sent_at_us[i].store(shared.base.elapsed().as_micros() as u64, Ordering::Release);
        inventory.reserve(reserve(i)).await.expect("reserve");
        wait_for(
            "every subscriber to get the event",
            Duration::from_secs(30),
            || shared.received[i].load(Ordering::Acquire) >= subscribers,
        )
        .await;
    }
    let measured = started.elapsed();

    println!(
        "stockd {} ({} cores), {} SSE + {} WebSocket subscribers of one SKU, {} Reserves one at a time",
        args.stockd,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.sse,
        args.websockets,
        args.samples
    );
    println!(
        "connected in {:.1} s; {} samples in {:.1} s ({:.0} events delivered/s)",
        connect_time.as_secs_f64(),
        args.samples,
        measured.as_secs_f64(),
        (args.samples * subscribers) as f64 / measured.as_secs_f64()
    );
    println!();
    println!("| Reserve sent → event parsed | receipts | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    report("SSE", &shared.sse.lock().unwrap());
    report("GraphQL WebSocket", &shared.websocket.lock().unwrap());
    println!();
    println!(
        "stockd RSS: {:.1} MiB before, {:.1} MiB with {subscribers} subscribers: {:.1} KiB per subscriber",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_after.saturating_sub(rss_before) as f64 / subscribers as f64
    );

    for task in &tasks {
        task.abort();
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = stockd.child.wait();
    cleanup(&args, &namespace, &database).await;
}
