//! Reconciliation: every class planted on purpose and counted exactly;
//! REPORT changes nothing; REPAIR fixes what it may and leaves pending items
//! alone; a reconcile racing live reservations repairs nothing it should not.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use sqlx::Connection;
use stockd::pb;
use tonic::Code;

use crate::support::*;

fn counts(r: &pb::ReconcileResponse) -> [u64; 8] {
    [
        r.checked,
        r.in_sync,
        r.pending_flush,
        r.redis_stale,
        r.drift,
        r.missing_in_redis,
        r.missing_in_postgres,
        r.ledger_mismatch,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_class_is_planted_counted_and_repaired() {
    let app = spawn_app_with(Options::with_args(&["--database-max-connections", "24"])).await;
    for sku in [
        "ok-1",
        "ok-2",
        "pending",
        "stale",
        "drift-qty",
        "drift-gap",
        "gone",
        "pg-lost",
        "ledger-bad",
    ] {
        app.seed(sku, "", 10).await;
    }
    app.adjust("a", "stale", "", 5, "").await.unwrap();
    let pool = app.postgres().await;
    app.converged(&pool).await;

    // Plant the classes.
    let mut conn = app.redis.clone();
    let hset = |sku: &str, fields: &[&str]| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(app.keys.stock(sku, "default")).arg(fields);
        cmd
    };
    let _: () = hset("stale", &["avail", "10", "ver", "1"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = hset("drift-qty", &["avail", "3"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = hset("drift-gap", &["ver", "9"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(app.keys.stock("gone", "default"))
        .query_async(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM stock WHERE sku = 'pg-lost'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE stock_ledger SET d_available = d_available + 1 WHERE sku = 'ledger-bad'")
        .execute(&pool)
        .await
        .unwrap();

    // Hold the flusher: its first statement (INSERT into the ledger) waits
    // for this lock, while reads go on.
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE stock_ledger IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    app.decrement("d", vec![line("pending", "", 1)])
        .await
        .unwrap();
    app.seed("pending-new", "", 6).await;

    let redis_before = app.snapshot().await;
    let postgres_before = levels_in_postgres(&pool).await;
    let report = app.reconcile_all(pb::ReconcileMode::Report).await.unwrap();
    // checked, in_sync, pending_flush, redis_stale, drift, missing_in_redis, missing_in_postgres, ledger
    assert_eq!(counts(&report), [10, 3, 2, 1, 2, 1, 1, 1], "{report:#?}");
    assert_eq!(report.repaired, 0);
    let states: HashMap<String, pb::ItemState> = report
        .items
        .iter()
        .map(|i| (i.sku.clone(), i.state()))
        .collect();
    assert_eq!(states["pending"], pb::ItemState::PendingFlush);
    assert_eq!(states["pending-new"], pb::ItemState::PendingFlush);
    assert_eq!(states["stale"], pb::ItemState::RedisStale);
    assert_eq!(states["drift-qty"], pb::ItemState::Drift);
    assert_eq!(states["drift-gap"], pb::ItemState::Drift);
    assert_eq!(states["gone"], pb::ItemState::MissingInRedis);
    assert_eq!(states["pg-lost"], pb::ItemState::MissingInPostgres);
    assert_eq!(states["ledger-bad"], pb::ItemState::LedgerMismatch);
    let drifted = report.items.iter().find(|i| i.sku == "drift-qty").unwrap();
    assert_eq!(drifted.redis.as_ref().unwrap().available, 3);
    assert_eq!(drifted.postgres.as_ref().unwrap().available, 10);
    assert_eq!(
        app.snapshot().await,
        redis_before,
        "REPORT changes nothing in Redis"
    );
    assert_eq!(
        levels_in_postgres(&pool).await,
        postgres_before,
        "nor in Postgres"
    );

    // Paged, the same counts.
    let mut paged = [0u64; 8];
    let mut cursor = String::new();
    loop {
        let page = app
            .reconcile(pb::ReconcileRequest {
                page_size: 3,
                cursor,
                ..reconcile_all_request(pb::ReconcileMode::Report)
            })
            .await
            .unwrap();
        for (total, n) in paged.iter_mut().zip(counts(&page)) {
            *total += n;
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(paged, [10, 3, 2, 1, 2, 1, 1, 1]);

    // One at a time: a second reconcile while one holds the lock is refused.
    let lock = format!("{}:reconcile", app.keys.meta());
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("someone")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = app
        .reconcile_all(pb::ReconcileMode::Report)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();

    let pending_before = app.level("pending", "").await.unwrap();
    let repair = app.reconcile_all(pb::ReconcileMode::Repair).await.unwrap();
    assert_eq!(
        repair.repaired, 5,
        "stale, gone, two drifts, pg-lost: {repair:#?}"
    );
    assert_eq!(
        app.level("pending", "").await.unwrap(),
        pending_before,
        "a pending item is never repaired"
    );
    assert_eq!(
        app.level("stale", "").await.unwrap().version,
        2,
        "Postgres's newer state loaded"
    );
    assert_eq!(app.level("gone", "").await.unwrap().available, 10);
    assert_eq!(
        app.level("drift-qty", "").await.unwrap().available,
        3,
        "Redis stays the truth"
    );

    // Let the flusher go; undo the ledger tamper (a ledger mismatch is
    // reported for a person to look at, not repaired).
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    sqlx::query("UPDATE stock_ledger SET d_available = d_available - 1 WHERE sku = 'ledger-bad'")
        .execute(&pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "Postgres to follow the repairs",
        || async {
            let redis_levels = levels_in_redis(&mut app.redis.clone(), &app.namespace).await;
            (levels_in_postgres(&pool).await == redis_levels).then_some(())
        },
    )
    .await;
    let after = app.reconcile_all(pb::ReconcileMode::Report).await.unwrap();
    // Zero drift. The version gap planted in Redis stays visible in the
    // ledger audit: those versions never had events.
    assert_eq!(counts(&after), [10, 10, 0, 0, 0, 0, 0, 1], "{after:#?}");
    assert_eq!(after.items.len(), 1);
    assert_eq!(
        (after.items[0].sku.as_str(), after.items[0].state()),
        ("drift-gap", pb::ItemState::LedgerMismatch)
    );
    // Where only Postgres lost the row, the repair's deltas complete the
    // ledger again: it sums to the row.
    let (n, sum_a): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(d_available)::bigint FROM stock_ledger WHERE sku = 'pg-lost'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((n, sum_a), (2, 10));
    let ops: Vec<String> = app
        .events()
        .await
        .iter()
        .filter(|e| e.get("sku") == "drift-qty")
        .map(|e| e.get("op").to_owned())
        .collect();
    assert_eq!(
        ops,
        vec!["set", "set"],
        "the repair is a `set` event in the ledger"
    );
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_racing_live_reservations_repairs_nothing() {
    let app = spawn_app().await;
    let skus: Vec<String> = (0..5).map(|i| format!("live-{i}")).collect();
    for sku in &skus {
        app.seed(sku, "", 10_000).await;
    }
    let mut successes: HashMap<String, i64> = HashMap::new();
    for round in 0..8 {
        let reserves = (0..60).map(|i| {
            let rpc = app.clients();
            let sku = skus[i % skus.len()].clone();
            async move {
                let ok = rpc
                    .reserve(&format!("r{round}-{i}"), vec![line(&sku, "", 1)], 600)
                    .await
                    .is_ok();
                (sku, ok)
            }
        });
        let rpc = app.clients();
        let repair = async move {
            match rpc.reconcile_all(pb::ReconcileMode::Repair).await {
                Ok(r) => r.repaired,
                Err(s) => panic!("{s:?}"),
            }
        };
        let (results, repaired) = tokio::join!(join_all(reserves), repair);
        assert_eq!(
            repaired, 0,
            "round {round}: live traffic is pending, never drift"
        );
        for (sku, ok) in results {
            *successes.entry(sku).or_default() += i64::from(ok);
        }
    }
    for sku in &skus {
        let n = successes[sku];
        let level = app.level(sku, "").await.unwrap();
        assert_eq!(
            (level.available, level.reserved, level.version),
            (10_000 - n, n, 1 + n),
            "{sku}"
        );
    }
    let pool = app.postgres().await;
    app.converged(&pool).await;
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stockctl_pages_through_preload_and_reconcile_with_progress() {
    let app = spawn_app().await;
    app.seed("cli-1", "", 3).await;
    app.seed("cli-2", "berlin", 4).await;
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let stockctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stockctl"))
            .args(["--addr", &format!("http://{}", app.addr)])
            .args(args)
            .env_remove("STOCKD_ADMIN_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    for (args, progress, summary) in [
        (
            &["preload", "--all"][..],
            "preloaded: 2 items",
            "skipped:   2",
        ),
        (
            &["reconcile", "--all"][..],
            "reconciled: 2 items",
            "in_sync:             2",
        ),
    ] {
        let output = stockctl(args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(progress), "{args:?} progress: {stderr}");
        assert!(stdout.contains(summary), "{args:?} summary: {stdout}");
    }
    let json = stockctl(&["--json", "reconcile", "--all"]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        (doc["checked"].as_u64(), doc["ledger_mismatch"].as_u64()),
        (Some(2), Some(0))
    );
    let progress = String::from_utf8_lossy(&json.stderr);
    assert!(
        progress.starts_with("reconciled: 2 items"),
        "progress goes to standard error under --json too: {progress}"
    );
    pool.close().await;
    app.stop().await;
}

/// An item whose ledger forked (Redis gave out a version Postgres had) is
/// drift with no side to trust: REPAIR leaves both sides as they are and
/// counts it held back, until an operator marks the fork resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_holds_back_items_whose_ledger_forked() {
    let app = spawn_app().await;
    for sku in ["forked-stale", "forked-drift", "plain-drift"] {
        app.seed(sku, "", 10).await;
    }
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let mut conn = app.redis.clone();
    // Redis behind Postgres for one, other quantities for the others.
    let _: () = redis::cmd("HSET")
        .arg(app.keys.stock("forked-stale", "default"))
        .arg(&["avail", "4", "ver", "0"])
        .query_async(&mut conn)
        .await
        .unwrap();
    for sku in ["forked-drift", "plain-drift"] {
        let _: () = redis::cmd("HSET")
            .arg(app.keys.stock(sku, "default"))
            .arg(&["avail", "3"])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for (n, sku) in ["forked-stale", "forked-drift"].into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO ledger_forks (sku, location, version, partition, entry_id, op,
                 d_available, d_reserved, available, reserved, ref)
             VALUES ($1, 'default', 1, 0, $2, 'decrement', -7, 0, 3, 0, 'lost-sale')",
        )
        .bind(sku)
        .bind(format!("1-{n}"))
        .execute(&pool)
        .await
        .unwrap();
    }
    let redis_before = app.snapshot().await;
    let postgres_before = levels_in_postgres(&pool).await;

    let repair = app.reconcile_all(pb::ReconcileMode::Repair).await.unwrap();
    assert_eq!(
        (repair.redis_stale, repair.drift),
        (1, 2),
        "still reported in their classes: {repair:#?}"
    );
    assert_eq!((repair.repaired, repair.held_back), (1, 2), "{repair:#?}");
    let after = app.snapshot().await;
    for sku in ["forked-stale", "forked-drift"] {
        let key = app.keys.stock(sku, "default");
        let fields =
            |snapshot: &std::collections::BTreeMap<String, String>| snapshot.get(&key).cloned();
        assert_eq!(
            fields(&after),
            fields(&redis_before),
            "{sku}: Redis untouched"
        );
    }
    assert_eq!(app.level("plain-drift", "").await.unwrap().available, 3);
    let item = |sku: &str| (sku.to_owned(), "default".to_owned());
    eventually(
        Duration::from_secs(20),
        "the repair of plain-drift flushed",
        || async {
            let now = levels_in_postgres(&pool).await;
            (now.get(&item("plain-drift")).map(|l| l.0) == Some(3)).then_some(())
        },
    )
    .await;
    let postgres_after = levels_in_postgres(&pool).await;
    for sku in ["forked-stale", "forked-drift"] {
        assert_eq!(
            postgres_after.get(&item(sku)),
            postgres_before.get(&item(sku)),
            "{sku}: Postgres untouched"
        );
    }

    // Resolved, the next REPAIR takes it up.
    sqlx::query("UPDATE ledger_forks SET resolved_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    let again = app.reconcile_all(pb::ReconcileMode::Repair).await.unwrap();
    assert_eq!((again.repaired, again.held_back), (2, 0), "{again:#?}");
    pool.close().await;
    app.stop().await;
}
