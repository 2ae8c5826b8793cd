//! The reaper: lapsed holds come back exactly once, even with two stockd
//! instances reaping the same Redis.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_expire_each_hold_exactly_once() {
    let first = spawn_app().await;
    let second = spawn_app_with(Options {
        namespace: first.namespace.clone(),
        ..Options::default()
    })
    .await;
    let skus = skus_in_distinct_partitions(&first.keys, "exp", 4);
    for sku in &skus {
        first.seed(sku, "", 100).await;
    }

    // 40 holds of one second, half through each instance, some spanning
    // two partitions.
    let holds = (0..40).map(|i| {
        let rpc = if i % 2 == 0 {
            first.clients()
        } else {
            second.clients()
        };
        let mut lines = vec![line(&skus[i % 4], "", 1)];
        if i % 3 == 0 {
            lines.push(line(&skus[(i + 1) % 4], "", 2));
        }
        async move { rpc.reserve(&format!("hold-{i}"), lines, 1).await.unwrap() }
    });
    join_all(holds).await;

    eventually(Duration::from_secs(10), "every hold to expire", || async {
        let mut all_back = true;
        for sku in &skus {
            let level = first.level(sku, "").await.unwrap();
            all_back &= level.reserved == 0;
        }
        all_back.then_some(())
    })
    .await;

    let events = first.events().await;
    let mut expiries: HashMap<(String, String), usize> = HashMap::new();
    for e in events.iter().filter(|e| e.get("op") == "expire") {
        *expiries
            .entry((e.get("ref").to_owned(), e.get("sku").to_owned()))
            .or_default() += 1;
    }
    let reserves = events.iter().filter(|e| e.get("op") == "reserve").count();
    assert_eq!(expiries.len(), reserves, "every reserved line expired");
    assert!(
        expiries.values().all(|n| *n == 1),
        "an expiry applied twice: {expiries:?}"
    );
    for sku in &skus {
        let level = first.level(sku, "").await.unwrap();
        assert_eq!((level.available, level.reserved), (100, 0), "{sku}");
    }
    let mut conn = first.redis.clone();
    for p in first.keys.partitions() {
        let left: i64 = redis::cmd("ZCARD")
            .arg(first.keys.reservation_expiry(p))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "expiry index of {p} is empty");
    }
    second.stop_keep_data().await;
    first.stop().await;
}

#[tokio::test]
async fn expiring_a_hold_that_is_not_due_changes_nothing() {
    // The reaper asks only for due ids, but an Extend may land between its
    // query and its expire call: the script must judge "due" itself.
    let app = spawn_app().await;
    app.seed("fresh", "", 3).await;
    app.reserve("fresh-hold", vec![line("fresh", "", 1)], 600)
        .await
        .unwrap();
    let engine = stockd::engine::Engine::new(
        app.redis.clone(),
        app.keys.clone(),
        stockd::markers::Markers::new(app.keys.clone()),
        stockd::engine::EngineSettings::default(),
    );
    let before = app.snapshot().await;
    let id = stockd::domain::RequestId::parse("id", "fresh-hold").unwrap();
    assert_eq!(
        engine
            .expire(app.keys.partition_of("fresh"), id.as_str())
            .await
            .unwrap(),
        stockd::engine::Expiry::NotDue
    );
    let unknown = stockd::domain::RequestId::parse("id", "no-such-hold").unwrap();
    assert_eq!(
        engine
            .expire(app.keys.partition_of("fresh"), unknown.as_str())
            .await
            .unwrap(),
        stockd::engine::Expiry::Unknown
    );
    assert_eq!(app.snapshot().await, before);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_reservation_is_dead_lettered_and_the_others_expire_on_time() {
    let app = spawn_app().await;
    let skus = skus_in_distinct_partitions(&app.keys, "rot", 4);
    // Another item of the broken one's partition, so that its partition's
    // pass must go on past it.
    let sibling = (0..)
        .map(|i| format!("rot-sib-{i}"))
        .find(|s| app.keys.partition_of(s) == app.keys.partition_of(&skus[0]))
        .unwrap();
    for sku in skus.iter().chain([&sibling]) {
        app.seed(sku, "", 10).await;
    }
    // Holds of two seconds.
    app.reserve("broken", vec![line(&skus[0], "", 2)], 2)
        .await
        .unwrap();
    // Its item no longer holds the units it reserved: expiring it cannot
    // be done (the script answers `corrupt`).
    let () = redis::cmd("HSET")
        .arg(app.keys.stock(&skus[0], "default"))
        .arg("resv")
        .arg(0)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let mut expiries = HashMap::new();
    for (i, sku) in skus.iter().skip(1).chain([&sibling]).enumerate() {
        let held = app
            .reserve(&format!("fine-{i}"), vec![line(sku, "", 3)], 2)
            .await
            .unwrap();
        expiries.insert(sku.clone(), held.expires_at_ms);
    }
    for (sku, expires_at_ms) in &expiries {
        eventually(
            Duration::from_secs(10),
            "a sound hold to expire",
            || async { (app.level(sku, "").await.unwrap().reserved == 0).then_some(()) },
        )
        .await;
        let late = now_ms() - expires_at_ms;
        assert!(late < 2_000, "{sku} expired {late} ms after its expiry");
    }
    // The broken one is parked once, with its reason, and left alone.
    let parked =
        eventually(
            Duration::from_secs(10),
            "the broken hold parked",
            || async {
                let mut found = Vec::new();
                for p in app.keys.partitions() {
                    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
                        .arg(app.keys.dead_letters(p))
                        .arg("-")
                        .arg("+")
                        .query_async(&mut app.redis.clone())
                        .await
                        .unwrap();
                    found.extend(entries.into_iter().filter(|(_, f)| {
                        f.get("reservation").map(String::as_str) == Some("broken")
                    }));
                }
                (!found.is_empty()).then_some(found)
            },
        )
        .await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].1["reason"].contains("reserved"), "{parked:?}");
    let level = app.level(&skus[0], "").await.unwrap();
    assert_eq!(
        (level.available, level.reserved),
        (8, 0),
        "left for an operator"
    );
    app.stop().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
