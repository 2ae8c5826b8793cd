//! `Inventory.Watch`: events in version order per item, exact resumption
//! from an event id (also across the replay → live switch), OUT_OF_RANGE
//! for a trimmed id, and a slow watcher cut with the id to resume from.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use stockd::pb;
use tonic::Code;
use tonic::codec::Streaming;

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(20);

async fn watch(app: &TestApp, skus: &[&str], from: &str) -> Streaming<pb::StockEvent> {
    try_watch(app, skus, from).await.expect("watch starts")
}

async fn try_watch(
    app: &TestApp,
    skus: &[&str],
    from: &str,
) -> Result<Streaming<pb::StockEvent>, tonic::Status> {
    app.watch(skus, from).await
}

/// The next `n` events, or a panic naming what arrived before the deadline.
async fn take(stream: &mut Streaming<pb::StockEvent>, n: usize) -> Vec<pb::StockEvent> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(DEADLINE, stream.message()).await {
            Ok(Ok(Some(e))) => got.push(e),
            Ok(Ok(None)) => panic!("the stream ended after {} of {n} events", got.len()),
            Ok(Err(status)) => panic!("the stream failed after {} of {n}: {status:?}", got.len()),
            Err(_) => panic!("only {} of {n} events within {DEADLINE:?}", got.len()),
        }
    }
    got
}

async fn adjust(app: &TestApp, sku: &str, delta: i64) -> pb::StockLevel {
    app.adjust(&unique_namespace("adj"), sku, "", delta, "test")
        .await
        .expect("adjust")
        .level
        .unwrap()
}

/// `count` SKUs that share one partition (a watch of them resumes exactly).
fn skus_in_one_partition(app: &TestApp, prefix: &str, count: usize) -> Vec<String> {
    let home = app.keys.partition_of(&format!("{prefix}-0"));
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|s| app.keys.partition_of(s) == home)
        .take(count)
        .collect()
}

fn ids(events: &[pb::StockEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

/// The stream entries of `skus`, per partition in stream order.
async fn stream_ids(app: &TestApp, skus: &[String]) -> Vec<(u32, String)> {
    app.events()
        .await
        .into_iter()
        .filter(|e| skus.iter().any(|s| s == e.get("sku")))
        .map(|e| (e.partition, e.id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_arrive_in_version_order_per_item_and_none_is_missed() {
    let app = spawn_app().await;
    let skus = skus_in_distinct_partitions(&app.keys, "ord", 4);
    let sku_refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    // Two watchers share the reader: one of these SKUs, one of everything.
    let mut some = watch(&app, &sku_refs, "").await;
    let mut all = watch(&app, &[], "").await;
    for sku in &skus {
        app.seed(sku, "", 1_000).await;
        app.seed(sku, "berlin", 1_000).await;
    }
    // Concurrent changes from several clients, lines across partitions.
    let clients = (0..6).map(|c| {
        let rpc = app.clients();
        let skus = skus.clone();
        async move {
            for i in 0..15 {
                let id = format!("ord-{c}-{i}");
                let a = &skus[(c + i) % skus.len()];
                let b = &skus[(c + i + 1) % skus.len()];
                rpc.reserve(&id, vec![line(a, "", 1), line(b, "berlin", 2)], 600)
                    .await
                    .unwrap();
                if i % 2 == 0 {
                    rpc.commit(&id).await.unwrap();
                } else {
                    rpc.release(&id).await.unwrap();
                }
            }
        }
    });
    join_all(clients).await;

    let expected = stream_ids(&app, &skus).await;
    assert_eq!(
        expected.len(),
        8 + 6 * 15 * 4,
        "the stream holds every change"
    );
    for (name, stream) in [("by sku", &mut some), ("all", &mut all)] {
        let got = take(stream, expected.len()).await;
        // Per item: versions 1, 2, 3, ... each once, in order, with the
        // state after each change.
        let mut versions: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        for e in &got {
            versions
                .entry((e.sku.clone(), e.location.clone()))
                .or_default()
                .push(e.version);
            assert!(e.available + e.reserved <= 1_000, "{e:?}");
        }
        assert_eq!(versions.len(), 8, "{name}");
        for (item, vs) in &versions {
            let want: Vec<i64> = (1..=vs.len() as i64).collect();
            assert_eq!(vs, &want, "{name}: {item:?} out of order or with gaps");
            let level = app.level(&item.0, &item.1).await.unwrap();
            assert_eq!(level.version, *vs.last().unwrap(), "{name}: {item:?}");
        }
        // Exactly the stream's entries, each once.
        let mut got_ids: Vec<(u32, String)> = got
            .iter()
            .map(|e| (e.partition, e.event_id.clone()))
            .collect();
        let mut want_ids = expected.clone();
        got_ids.sort();
        want_ids.sort();
        assert_eq!(got_ids, want_ids, "{name}");
    }
    // The wire fields carry the event.
    let set_event = &app
        .events()
        .await
        .into_iter()
        .find(|e| e.get("sku") == skus[0] && e.get("ver") == "1" && e.get("loc") == "default")
        .unwrap();
    let mut again = watch(&app, &[&skus[0]], "0-0").await;
    let first = take(&mut again, 1).await.remove(0);
    assert_eq!(first.event_id, set_event.id);
    assert_eq!(first.partition, set_event.partition);
    assert_eq!(
        (
            first.op(),
            first.delta_available,
            first.available,
            first.version
        ),
        (pb::StockOp::Set, 1_000, 1_000, 1)
    );
    assert_eq!(first.ts_ms, set_event.int("ts"));
    assert!(first.reference.starts_with("seed-"), "{first:?}");
    drop((some, all, again));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_from_an_id_replays_exactly_the_missed_events() {
    let app = spawn_app().await;
    let skus = skus_in_one_partition(&app, "res", 3);
    let refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    for sku in &skus {
        app.seed(sku, "", 100).await;
    }
    let mut first = watch(&app, &refs, "").await;
    for i in 0..5 {
        adjust(&app, &skus[i % 3], 1).await;
    }
    let seen = take(&mut first, 5).await;
    let last_seen = seen.last().unwrap().event_id.clone();
    drop(first); // the client goes away...

    for i in 0..7 {
        adjust(&app, &skus[i % 3], 2).await; // ...and misses these
    }
    let all = stream_ids(&app, &skus).await;
    let position = all.iter().position(|(_, id)| *id == last_seen).unwrap();
    let missed: Vec<String> = all[position + 1..]
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(missed.len(), 7);

    // Resume while more changes keep coming: the replay, the switch to
    // live and the live events form one sequence without gap or repeat.
    // Several rounds, each resuming from the last event of the one before,
    // so the switch meets writes the reader has not seen yet.
    let mut resume_from = last_seen;
    let mut first_round = true;
    for round in 0..4 {
        let position = stream_ids(&app, &skus)
            .await
            .iter()
            .position(|(_, id)| *id == resume_from)
            .unwrap();
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let rpc = app.clients();
                let skus = skus.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        rpc.adjust(
                            &format!("live-{round}-{p}-{i}"),
                            &skus[(i + p) % 3],
                            "",
                            1,
                            "",
                        )
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        let mut resumed = watch(&app, &refs, &resume_from).await;
        for p in producers {
            p.await.unwrap();
        }
        // A marker after everything: the event right before it must be the
        // last live one, so nothing was repeated or invented.
        let marker = adjust(&app, &skus[0], 5).await;
        let expected: Vec<String> = stream_ids(&app, &skus).await[position + 1..]
            .iter()
            .map(|(_, id)| id.clone())
            .collect();
        let got = take(&mut resumed, expected.len()).await;
        assert_eq!(ids(&got), expected, "round {round}");
        if first_round {
            assert_eq!(ids(&got[..7]), missed);
            first_round = false;
        }
        let last = got.last().unwrap();
        assert_eq!(
            (last.sku.as_str(), last.version),
            (skus[0].as_str(), marker.version)
        );
        resume_from = last.event_id.clone();
    }

    // The same from a watch of everything, whose resume id comes from one
    // partition: nothing after it is missed in any partition (events of
    // that very millisecond in other partitions may come again).
    let others = skus_in_distinct_partitions(&app.keys, "wide", 5);
    for sku in &others {
        app.seed(sku, "", 10).await;
    }
    let mut wide = watch(&app, &[], "").await;
    for sku in &others {
        adjust(&app, sku, 1).await;
    }
    let before = take(&mut wide, 5).await;
    let resume_from = before.last().unwrap().event_id.clone();
    drop(wide);
    for sku in others.iter().rev() {
        adjust(&app, sku, 1).await;
    }
    let mut wide = watch(&app, &[], &resume_from).await;
    let marker = adjust(&app, &others[0], 1).await;
    let mut got: Vec<pb::StockEvent> = Vec::new();
    while !got
        .iter()
        .any(|e| e.sku == others[0] && e.version == marker.version)
    {
        got.extend(take(&mut wide, 1).await);
    }
    let got_keys: HashSet<(String, i64)> = got.iter().map(|e| (e.sku.clone(), e.version)).collect();
    for sku in &others {
        let v = app.level(sku, "").await.unwrap().version;
        // The second round of adjusts (version 3) and, for the marker's
        // SKU, the marker (version 4).
        assert!(
            got_keys.contains(&(sku.clone(), 3)),
            "{sku} v3 missed: {got_keys:?}"
        );
        assert!(got_keys.contains(&(sku.clone(), v)), "{sku} v{v} missed");
    }
    let resume_ms: u64 = resume_from.split('-').next().unwrap().parse().unwrap();
    for e in &got {
        if e.version <= 2 {
            let ms: u64 = e.event_id.split('-').next().unwrap().parse().unwrap();
            assert_eq!(ms, resume_ms, "only same-millisecond events repeat: {e:?}");
        }
    }
    drop(wide);
    app.stop().await;
}

/// With no watcher the reader only moves its cursors now and then, so it
/// can be behind the changes when a watch arrives: a resumed watch must
/// still start just after its resume id, and a live one with what comes
/// after its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_that_arrive_at_an_idle_reader_get_exactly_what_follows() {
    let app = spawn_app().await;
    let skus = skus_in_one_partition(&app, "idle", 2);
    let refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    for sku in &skus {
        app.seed(sku, "", 100).await;
    }
    // Changes while no one watches.
    for i in 0..6 {
        adjust(&app, &skus[i % 2], -1).await;
    }
    let all = stream_ids(&app, &skus).await;
    assert_eq!(all.len(), 8, "two seeds and six changes");
    let resume_from = all[3].1.clone();
    let expected: Vec<String> = all[4..].iter().map(|(_, id)| id.clone()).collect();

    let mut resumed = watch(&app, &refs, &resume_from).await;
    let mut live = watch(&app, &refs, "").await;
    let after = adjust(&app, &skus[0], -1).await;

    let mut replayed = ids(&take(&mut resumed, expected.len() + 1).await);
    let newest = replayed.pop().unwrap();
    assert_eq!(
        replayed, expected,
        "the replay starts right after {resume_from}"
    );
    let first_live = take(&mut live, 1).await.remove(0);
    assert_eq!(
        first_live.event_id, newest,
        "both watches see the new change"
    );
    assert_eq!(
        (first_live.sku.as_str(), first_live.version),
        (skus[0].as_str(), after.version),
        "the live watch starts with the change made after it"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trimmed_resume_id_is_out_of_range_and_bad_requests_are_invalid() {
    let app = spawn_app().await;
    app.seed("trim", "", 10).await;
    for _ in 0..5 {
        adjust(&app, "trim", 1).await;
    }
    let entries = stream_ids(&app, &["trim".to_owned()]).await;
    assert_eq!(entries.len(), 6);
    let (partition, keep_from) = entries[4].clone();
    // Trim below the fifth entry, as the flusher's housekeeping does below
    // its retention.
    let _: i64 = redis::cmd("XTRIM")
        .arg(app.keys.events(stockd::keys::Partition(partition)))
        .arg("MINID")
        .arg(&keep_from)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();

    let status = try_watch(&app, &["trim"], &entries[1].1).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(reason(&status), "OUT_OF_RANGE");
    assert!(status.message().contains(&entries[1].1), "{status:?}");
    // Still held: fine, and it starts right after.
    let mut ok = watch(&app, &["trim"], &keep_from).await;
    assert_eq!(take(&mut ok, 1).await[0].event_id, entries[5].1);
    drop(ok);

    for (skus, from, field) in [
        (vec!["trim"], "12345", "from_event_id"),
        (vec!["trim"], "1-x", "from_event_id"),
        (vec!["trim"], "$", "from_event_id"),
        (vec!["has space"], "", "skus[0]"),
        (vec![""], "", "skus[0]"),
    ] {
        let status = try_watch(&app, &skus, from).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{skus:?} {from:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_watcher_is_cut_and_can_resume_from_the_id_it_is_given() {
    let app = spawn_app_with(Options::with_args(&["--watch-buffer", "1000"])).await;
    let skus = skus_in_one_partition(&app, "slow", 50);
    for sku in &skus {
        app.seed(sku, "", 1_000_000).await;
    }
    let refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    // A client that advertises a small HTTP/2 window and then reads nothing.
    let slow_client = Clients::small_window(app.addr).await;
    let mut slow = slow_client.watch(&refs, "").await.unwrap();
    // A healthy watcher of the same SKUs alongside keeps everything.
    let mut healthy = watch(&app, &refs, "").await;
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok(Some(_)) = healthy.message().await {
            n += 1;
            if n == 4_000 {
                break;
            }
        }
        n
    });

    // 40 reservations of 50 lines, each released: 4,000 events.
    let lines: Vec<pb::Line> = skus.iter().map(|s| line(s, "", 1)).collect();
    for i in 0..40 {
        let id = format!("slow-{i}");
        app.reserve(&id, lines.clone(), 600).await.unwrap();
        app.release(&id).await.unwrap();
    }
    let healthy_got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the healthy watcher got everything within 60 s")
        .unwrap();
    assert_eq!(healthy_got, 4_000, "the healthy watcher got everything");

    // The slow one gets what was already on its way, then the cut.
    let mut received: Vec<pb::StockEvent> = Vec::new();
    let status = loop {
        match tokio::time::timeout(DEADLINE, slow.message()).await {
            Ok(Ok(Some(e))) => received.push(e),
            Ok(Ok(None)) => panic!("the slow watcher's stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no status within {DEADLINE:?}"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "CLIENT_TOO_SLOW");
    assert!(retry_delay(&status).is_some(), "worth retrying: {status:?}");
    assert!(status.message().contains("too slow"), "{status:?}");
    assert!(
        received.len() < 4_000,
        "cut before it got everything ({})",
        received.len()
    );
    let resume = status
        .message()
        .rsplit(' ')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    if let Some(last) = received.last() {
        assert_eq!(resume, last.event_id, "resume from the last event it got");
    }

    // Resuming from that id gives exactly the rest.
    let all = stream_ids(&app, &skus).await;
    let rest: Vec<String> = all
        .iter()
        .map(|(_, id)| id.clone())
        .filter(|id| {
            let key = |s: &str| {
                let (a, b) = s.split_once('-').unwrap();
                (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
            };
            key(id) > key(&resume)
        })
        .collect();
    assert_eq!(received.len() + rest.len(), all.len() - 50, "{resume}");
    let mut again = watch(&app, &refs, &resume).await;
    assert_eq!(ids(&take(&mut again, rest.len()).await), rest);
    drop((slow, again));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_watches_end_at_shutdown_with_the_id_to_resume_from() {
    let app = spawn_app().await;
    app.seed("bye", "", 1).await;
    let mut open = watch(&app, &["bye"], "").await;
    adjust(&app, "bye", 1).await;
    let last = take(&mut open, 1).await.remove(0);
    // The server's graceful shutdown is not held up by the open stream.
    let stopping = tokio::spawn(app.stop());
    let status = tokio::time::timeout(DEADLINE, open.message())
        .await
        .expect("the watch ends")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "SHUTTING_DOWN");
    assert!(retry_delay(&status).is_some(), "worth retrying: {status:?}");
    assert!(
        status.message().ends_with(&last.event_id),
        "{status:?} names {}",
        last.event_id
    );
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stopped in time")
        .unwrap();
}
