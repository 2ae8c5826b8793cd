//! Issue 11: waits on Postgres are bounded. A stockd killed mid-batch whose
//! connections Postgres never sees close (a proxy keeps them open) leaves
//! open transactions that Postgres itself ends; a long table lock makes
//! requests fail within their deadline, not hang, and does not hold up a
//! SIGTERM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tonic::Code;

use crate::support::process::Stockd;
use crate::support::proxy::FaultProxy;
use crate::support::*;

/// Short Postgres timeouts, so that the bound is seconds, not a minute.
fn short_timeouts() -> Vec<String> {
    [
        "--database-idle-in-transaction-timeout-ms",
        "2000",
        "--database-lock-timeout-ms",
        "1000",
        "--database-statement-timeout-ms",
        "3000",
        "--database-acquire-timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_of_killed_instances_that_postgres_never_saw_close_end_in_time() {
    let proxy = FaultProxy::start_keeping_upstream("127.0.0.1:5432".parse().unwrap()).await;
    let namespace = unique_namespace("zombie");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let via_proxy = postgres_url(&database).replace("127.0.0.1:5432", &proxy.addr.to_string());
    let mut args = short_timeouts();
    args.extend(["--flush-batch".into(), "20".into()]);
    let mut stockd = Stockd::start_with(&namespace, &via_proxy, "zombie", false, &args).await;
    let skus: Vec<String> = (0..8).map(|i| format!("z-{i}")).collect();
    stockd.clients().seed_each(&skus, 100_000).await;

    let channel = Arc::new(std::sync::RwLock::new(stockd.channel()));
    let stop = Arc::new(AtomicBool::new(false));
    // Sales under way all along; each retried with its id until definite.
    let load: Vec<_> = (0..4)
        .map(|c| {
            let (channel, stop, skus) = (channel.clone(), stop.clone(), skus.clone());
            tokio::spawn(async move {
                let mut sold: BTreeMap<String, i64> = BTreeMap::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sku = skus[(n * 3 + c) % skus.len()].clone();
                    let id = format!("z{c}-{n}");
                    definite(Duration::from_secs(60), "a sale", || {
                        let rpc = Clients::new(channel.read().unwrap().clone());
                        let (id, lines) = (id.clone(), vec![line(&sku, "", 1)]);
                        async move { rpc.decrement(&id, lines).await }
                    })
                    .await
                    .unwrap();
                    *sold.entry(sku).or_default() += 1;
                }
                sold
            })
        })
        .collect();

    let pool = sqlx::PgPool::connect(&postgres_url(&database))
        .await
        .unwrap();
    let flushed = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM stock_ledger")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    for round in 0..3 {
        // Killed while it writes batches.
        let before = flushed().await;
        eventually(Duration::from_secs(20), "batches under way", || async {
            (flushed().await > before + 40).then_some(())
        })
        .await;
        stockd.kill9();
        stockd = Stockd::start_with(&namespace, &via_proxy, "zombie", false, &args).await;
        *channel.write().unwrap() = stockd.channel();
        println!(
            "round {round}: {} upstream sessions outlived their client",
            proxy.zombies()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut sold: BTreeMap<String, i64> = BTreeMap::new();
    for task in load {
        for (sku, n) in task.await.unwrap() {
            *sold.entry(sku).or_default() += n;
        }
    }
    assert!(
        proxy.zombies() > 0,
        "the proxy kept sessions of dead instances open"
    );
    // Within the bound: the dead instances' transactions are ended by
    // Postgres, the new instance's flusher gets their locks.
    let start = Instant::now();
    let conn = shared_redis().await;
    assert_converged(
        &mut conn.clone(),
        &namespace,
        &pool,
        Duration::from_secs(30),
    )
    .await;
    println!("converged {:?} after the load stopped", start.elapsed());
    let stock = levels_in_postgres(&pool).await;
    for sku in &skus {
        let (available, _, _) = stock[&(sku.clone(), "default".to_owned())];
        assert_eq!(
            available,
            100_000 - sold.get(sku).copied().unwrap_or(0),
            "{sku}"
        );
    }
    stockd.terminate().await;
    pool.close().await;
    leftovers.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_table_lock_fails_requests_in_time_and_does_not_hold_up_sigterm() {
    let namespace = unique_namespace("tablelock");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let mut stockd = Stockd::start_with(
        &namespace,
        &postgres_url(&database),
        "lock",
        false,
        &short_timeouts(),
    )
    .await;
    stockd.clients().seed_each(&["hot".to_owned()], 1_000).await;
    let pool = sqlx::PgPool::connect(&postgres_url(&database))
        .await
        .unwrap();
    // Items only Postgres knows: a read of one loads it on a miss.
    for i in 0..20 {
        sqlx::query("INSERT INTO stock (sku, location, available, reserved, version) VALUES ($1, 'default', 5, 0, 1)")
            .bind(format!("cold-{i}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(20), "the seed flushed", || async {
        sqlx::query_scalar::<_, i64>("SELECT version FROM stock WHERE sku = 'hot'")
            .fetch_optional(&pool)
            .await
            .unwrap()
    })
    .await;

    // Someone holds the stock table (say a migration), much longer than
    // any request may wait.
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE stock IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let locked_at = Instant::now();
    let rpc = stockd.clients();

    // More cold reads at once than the pool has connections: each
    // answers within its deadline, retryable.
    let reads = (0..20).map(|i| {
        let mut inv = rpc.inventory.clone();
        async move {
            let started = Instant::now();
            let mut request = tonic::Request::new(get_request(&[(&format!("cold-{i}"), "")]));
            request.set_timeout(Duration::from_secs(10));
            let answer = inv.get_stock(request).await;
            (started.elapsed(), answer)
        }
    });
    for (took, answer) in join_all(reads).await {
        let status = answer.expect_err("the item cannot be loaded while the table is locked");
        assert!(
            ambiguous(&status) && status.code() == Code::Unavailable,
            "{status:?}"
        );
        assert!(took < Duration::from_secs(6), "answered after {took:?}");
    }
    // What Redis holds is served meanwhile.
    let started = Instant::now();
    rpc.decrement("sale-under-lock", vec![line("hot", "", 1)])
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    // The pool is not exhausted: once the lock is gone, a cold read works.
    let held = locked_at.elapsed();
    locker.rollback().await.unwrap();
    assert!(held < Duration::from_secs(30), "the lock was held {held:?}");
    let level = definite(Duration::from_secs(10), "a cold read", || {
        rpc.get(&[("cold-0", "")])
    })
    .await
    .unwrap();
    assert_eq!(level.levels[0].available, 5);

    // SIGTERM with the table locked again and a flush waiting on it.
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE stock IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    rpc.decrement("sale-before-stop", vec![line("hot", "", 1)])
        .await
        .unwrap();
    let stopping = Instant::now();
    stockd.terminate().await;
    let took = stopping.elapsed();
    locker.rollback().await.unwrap();
    assert!(took < Duration::from_secs(8), "SIGTERM took {took:?}");

    pool.close().await;
    leftovers.remove().await;
}
