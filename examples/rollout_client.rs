//! A checkout client for a rollout by hand (README, "Lifecycle"): it
//! follows the health of every instance it is given (a `Health.Watch` on
//! `""` each) and sends each Reserve to an instance that says SERVING, so a
//! draining instance gets no new work. A call that fails as UNAVAILABLE, or
//! as one that never reached the server (its connection going away), is sent
//! again with the same reservation id to another serving instance:
//! idempotency makes that safe. It prints what it sent and how it ended.
//!
//! cargo run --example rollout_client -- SECONDS ADDR [ADDR...]
//!
//! The SKUs `rollout-0` .. `rollout-99` must exist (stockctl set).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stockd::pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CLIENTS: usize = 16;

struct Instance {
    addr: String,
    channel: Channel,
    serving: AtomicBool,
}

/// Follows `instance`'s overall health for ever (reconnecting when the
/// stream ends: the instance restarts).
async fn follow_health(instance: Arc<Instance>) {
    loop {
        let mut health = HealthClient::new(instance.channel.clone());
        if let Ok(answer) = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            let mut statuses = answer.into_inner();
            while let Some(Ok(status)) = statuses.next().await {
                let serving = status.status == ServingStatus::Serving as i32;
                if instance.serving.swap(serving, Ordering::SeqCst) != serving {
                    eprintln!(
                        "{:?} {} {}",
                        std::time::SystemTime::now(),
                        instance.addr,
                        if serving { "SERVING" } else { "NOT_SERVING" }
                    );
                }
            }
        }
        if instance.serving.swap(false, Ordering::SeqCst) {
            eprintln!("{} health stream ended", instance.addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a call may be sent again elsewhere: refused for availability, or
/// it never reached a server (tonic's errors for a connection going away).
fn send_again(status: &tonic::Status) -> bool {
    let detail = format!("{status:?}");
    match status.code() {
        Code::Unavailable => true,
        Code::Cancelled => detail.contains("connection closed"),
        Code::Internal | Code::Unknown => {
            detail.contains("GoAway(") || detail.contains("connection closed")
        }
        _ => false,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args[0].parse().expect("SECONDS");
    let instances: Vec<Arc<Instance>> = args[1..]
        .iter()
        .map(|addr| {
            Arc::new(Instance {
                addr: addr.clone(),
                channel: Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy(),
                serving: AtomicBool::new(false),
            })
        })
        .collect();
    for instance in &instances {
        tokio::spawn(follow_health(instance.clone()));
    }
    let (sent, ok, refused, resent, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let end = Instant::now() + Duration::from_secs(seconds);
    let run = std::process::id();
    let clients = (0..CLIENTS).map(|c| {
        let instances = instances.clone();
        let (sent, ok, refused, resent, failed) = (
            sent.clone(),
            ok.clone(),
            refused.clone(),
            resent.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let request = pb::ReserveRequest {
                    reservation_id: format!("rollout-{run}-{c}-{n}"),
                    lines: vec![pb::Line {
                        sku: format!("rollout-{}", n % 100),
                        location: String::new(),
                        quantity: 1,
                    }],
                    ttl_seconds: 600,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                let mut attempt = 0usize;
                loop {
                    // Round robin over the instances that say SERVING (all
                    // of them when none does: better a refusal than nothing).
                    let serving: Vec<&Arc<Instance>> = instances
                        .iter()
                        .filter(|i| i.serving.load(Ordering::SeqCst))
                        .collect();
                    let pool = if serving.is_empty() {
                        instances.iter().collect()
                    } else {
                        serving
                    };
                    let instance = pool[(n as usize + c + attempt) % pool.len()];
                    let mut client =
                        pb::inventory_client::InventoryClient::new(instance.channel.clone());
                    match client.reserve(request.clone()).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(status) if status.code() == Code::FailedPrecondition => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(status) if send_again(&status) && attempt < 20 => {
                            resent.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "resend after {} from {}: {}",
                                status.code(),
                                instance.addr,
                                status.message()
                            );
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(status) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("FAILED at {}: {status:?}", instance.addr);
                            break;
                        }
                    }
                }
            }
        })
    });
    futures::future::join_all(clients).await;
    println!(
        "reserves sent {} ok {} refused(out of stock) {} sent again {} failed {}",
        sent.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        resent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}
