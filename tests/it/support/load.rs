//! Load for the tests that crash, cut or kill something while traffic
//! flows: random operations of every kind on a set of SKUs, from many
//! clients at once, in the background until told to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::join_all;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use super::{Clients, Rpc, TestApp, line};

/// Random operations on `skus` from `clients` concurrent clients, `ops`
/// each; refusals and failures are part of the load and ignored.
pub async fn random_load(rpc: &Clients, skus: &[String], clients: usize, ops: usize, seed: u64) {
    let tasks = (0..clients).map(|c| {
        let rpc = rpc.clone();
        let skus = skus.to_vec();
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + c as u64);
            let mut held: Vec<String> = Vec::new();
            for i in 0..ops {
                let id = format!("c{seed}-{c}-{i}");
                let pick =
                    |rng: &mut rand::rngs::StdRng| skus[rng.random_range(0..skus.len())].clone();
                match rng.random_range(0..6) {
                    0 | 1 => {
                        let a = pick(&mut rng);
                        let b = pick(&mut rng);
                        let mut lines = vec![line(&a, "", rng.random_range(1..3))];
                        if b != a {
                            lines.push(line(&b, "", 1));
                        }
                        if rpc.reserve(&id, lines, 600).await.is_ok() {
                            held.push(id);
                        }
                    }
                    2 if !held.is_empty() => {
                        let id = held.swap_remove(rng.random_range(0..held.len()));
                        let _ = rpc.commit(&id).await;
                    }
                    3 if !held.is_empty() => {
                        let id = held.swap_remove(rng.random_range(0..held.len()));
                        let _ = rpc.release(&id).await;
                    }
                    4 => {
                        let _ = rpc.decrement(&id, vec![line(&pick(&mut rng), "", 1)]).await;
                    }
                    _ => {
                        let sku = pick(&mut rng);
                        let delta = rng.random_range(1..4);
                        let _ = rpc.adjust(&id, &sku, "", delta, "restock").await;
                    }
                }
            }
        }
    });
    join_all(tasks).await;
}

/// [`random_load`] rounds against `channel` until `stop`; failures (the
/// server is being killed) are expected and ignored.
pub fn background_load(
    channel: Channel,
    skus: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let rpc = Clients::new(channel);
        let mut round = rand::rng().random_range(0..u32::MAX as u64);
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            random_load(&rpc, &skus, 8, 5, round).await;
        }
    })
}

/// `count` SKUs named `<prefix>-<i>`, each set to `available`.
pub async fn seed_catalogue(
    app: &TestApp,
    prefix: &str,
    count: usize,
    available: i64,
) -> Vec<String> {
    let skus: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    for sku in &skus {
        app.seed(sku, "", available).await;
    }
    skus
}
