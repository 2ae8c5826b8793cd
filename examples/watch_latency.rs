//! Event latency from Reserve to Watch receipt, against a running stockd.
//!
//! ```sh
//! cargo run --release --bin stockd &                       # or scripts/run
//! cargo run --release --example watch_latency -- --samples 2000 --load 4
//! ```
//!
//! One client watches a SKU; another reserves one unit of it (and releases
//! it), `--samples` times, one at a time. For each Reserve the latency is
//! measured from just before the Reserve is sent to the moment its event
//! (matched by `reference`) comes out of the Watch stream, and also from the
//! Reserve's answer to that moment. `--load N` runs N more clients doing
//! reserve/release on other SKUs meanwhile, so the reader, the flusher and
//! the Redis are busy as in production; `--watchers N` opens N more watches
//! of every SKU that read and discard. Prints p50/p90/p99/max.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use stockd::pb;
use stockd::pb::inventory_client::InventoryClient;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Reserves measured.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Background clients doing reserve/release on other SKUs.
    #[arg(long, default_value_t = 0)]
    load: usize,
    /// More watchers of every SKU, reading and discarding (fan-out cost).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
}

fn line(sku: &str) -> pb::Line {
    pb::Line {
        sku: sku.into(),
        location: String::new(),
        quantity: 1,
    }
}

async fn seed(admin: &mut pb::admin_client::AdminClient<Channel>, sku: &str, run: &str) {
    admin
        .set_stock(pb::SetStockRequest {
            request_id: format!("{run}-seed-{sku}"),
            sku: sku.into(),
            location: String::new(),
            available: 1_000_000,
            expected_version: None,
        })
        .await
        .expect("seed (is the admin token needed? set STOCKD_ADMIN_TOKEN)");
}

fn report(name: &str, h: &Histogram<u64>) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{name:<28} n={:<6} p50={:.3} ms  p90={:.3} ms  p99={:.3} ms  max={:.3} ms",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let channel = Channel::from_shared(args.addr.clone())
        .expect("an http:// address")
        .connect()
        .await
        .expect("connect to stockd");
    let run = format!(
        "lat-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let sku = format!("{run}-watched");
    seed(&mut admin, &sku, &run).await;

    // Background load on other SKUs, each client on its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for c in 0..args.load {
        let other = format!("{run}-load-{c}");
        seed(&mut admin, &other, &run).await;
        let ch = Channel::from_shared(args.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut inv = InventoryClient::new(ch);
        let stop = stop.clone();
        let run = run.clone();
        loaders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("{run}-l{c}-{i}");
                i += 1;
                if inv
                    .reserve(pb::ReserveRequest {
                        reservation_id: id.clone(),
                        lines: vec![line(&other)],
                        ttl_seconds: 60,
                    })
                    .await
                    .is_ok()
                {
                    let _ = inv.release(pb::ReleaseRequest { reservation_id: id }).await;
                }
            }
            i
        }));
    }

    // Other watchers of everything, each on its own connection.
    for _ in 0..args.watchers {
        let ch = Channel::from_shared(args.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut stream = InventoryClient::new(ch)
            .watch(pb::WatchRequest::default())
            .await
            .expect("watch")
            .into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    }

    // The watcher: its own connection, like a storefront.
    let watch_channel = Channel::from_shared(args.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut events = InventoryClient::new(watch_channel)
        .watch(pb::WatchRequest {
            skus: vec![sku.clone()],
            from_event_id: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();

    let mut inv = InventoryClient::new(channel);
    let mut from_send = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut from_answer = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    // A few unmeasured rounds first (connections, caches).
    let warmup = 50.min(args.samples / 10);
    let started = Instant::now();
    for i in 0..warmup + args.samples {
        let id = format!("{run}-m{i}");
        let sent = Instant::now();
        inv.reserve(pb::ReserveRequest {
            reservation_id: id.clone(),
            lines: vec![line(&sku)],
            ttl_seconds: 60,
        })
        .await
        .expect("reserve");
        let answered = Instant::now();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .expect("an event within 10 s")
                .expect("the watch stream")
                .expect("the watch stream is open");
            if event.reference == id && event.op() == pb::StockOp::Reserve {
                break;
            }
        }
        let received = Instant::now();
        if i >= warmup {
            from_send
                .record((received - sent).as_micros().max(1) as u64)
                .unwrap();
            from_answer
                .record((received - answered).as_micros().max(1) as u64)
                .unwrap();
        }
        inv.release(pb::ReleaseRequest { reservation_id: id })
            .await
            .expect("release");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut load_ops = 0;
    for l in loaders {
        load_ops += l.await.unwrap_or(0) * 2;
    }
    println!(
        "stockd at {}; {} samples, {} background clients ({:.0} ops/s of load), {} other watchers",
        args.addr,
        args.samples,
        args.load,
        load_ops as f64 / elapsed.as_secs_f64(),
        args.watchers
    );
    report("Reserve sent -> Watch event", &from_send);
    report("Reserve answered -> event", &from_answer);
}
