//! Measures stockd's event export as a consumer sees it: for `SECONDS`, it
//! receives every change of namespace `NS` from NATS (a core subscription
//! on `stockd.<ns>.stock.>`, which sees each message as JetStream stores
//! it) and from RabbitMQ (an exclusive queue bound to `stockd.<ns>.events`
//! with `#`), and prints per broker the messages per second and the export
//! lag: receive time minus the change's `ts` (Redis's clock, the same
//! machine here), p50 / p99 / max.
//!
//!     cargo run --example export_lag -- shop 20
//!
//! Run it beside a load (`stockctl bench`) on a stockd started with
//! STOCKD_NATS_URL and STOCKD_AMQP_URL. Broker URLs: STOCKD_NATS_URL and
//! STOCKD_AMQP_URL, defaulting to the local ones.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn lag_of(payload: &[u8]) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((now_ms() - json["ts"].as_i64()?).max(0) as u64)
}

fn report(broker: &str, h: &Histogram<u64>, window: Duration) {
    println!(
        "{broker}: {} messages, {:.0}/s, export lag p50 {} ms, p99 {} ms, max {} ms",
        h.len(),
        h.len() as f64 / window.as_secs_f64(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let namespace = args.next().unwrap_or_else(|| "stockd".into());
    let seconds: u64 = args.next().map_or(Ok(20), |s| s.parse())?;
    let nats_url =
        std::env::var("STOCKD_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let amqp_url = std::env::var("STOCKD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let window = Duration::from_secs(seconds);

    let nats = async_nats::connect(&nats_url).await?;
    let mut sub = nats
        .subscribe(format!("{}.>", stockd::export::subject_prefix(&namespace)))
        .await?;
    let amqp = lapin::Connection::connect(&amqp_url, Default::default()).await?;
    let channel = amqp.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            stockd::export::exchange(&namespace).as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.name().clone(),
            "export-lag".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let mut nats_lag = Histogram::<u64>::new(3)?;
    let mut amqp_lag = Histogram::<u64>::new(3)?;
    let until = tokio::time::Instant::from(Instant::now() + window);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            Some(m) = sub.next() => {
                if let Some(lag) = lag_of(&m.payload) { nats_lag.record(lag)?; }
            }
            Some(Ok(d)) = deliveries.next() => {
                if let Some(lag) = lag_of(&d.data) { amqp_lag.record(lag)?; }
            }
        }
    }
    report("nats", &nats_lag, window);
    report("amqp", &amqp_lag, window);
    Ok(())
}
