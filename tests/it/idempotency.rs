//! Retries with the same id replay the first outcome and change nothing; the
//! same id with another payload is ALREADY_EXISTS.

use futures::future::join_all;
use stockd::pb;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserve_replays_apply_once() {
    let app = spawn_app().await;
    app.seed("shirt", "", 10).await;
    let results = join_all((0..20).map(|_| {
        let rpc = app.clients();
        async move {
            rpc.reserve("order-1", vec![line("shirt", "", 3)], 600)
                .await
                .unwrap()
        }
    }))
    .await;
    let first: Vec<_> = results.iter().filter(|r| !r.replayed).collect();
    assert_eq!(first.len(), 1, "exactly one attempt applied");
    for r in &results {
        assert_eq!(
            r.levels, first[0].levels,
            "replays return the first outcome"
        );
        assert_eq!(r.expires_at_ms, first[0].expires_at_ms);
    }
    let level = app.level("shirt", "").await.unwrap();
    assert_eq!((level.available, level.reserved, level.version), (7, 3, 2));

    // The same lines in another order are the same request.
    app.seed("socks", "", 5).await;
    let cart = |lines: Vec<pb::Line>| app.reserve("order-2", lines, 0);
    cart(vec![line("shirt", "", 1), line("socks", "", 2)])
        .await
        .unwrap();
    let again = cart(vec![line("socks", "", 2), line("shirt", "", 1)])
        .await
        .unwrap();
    assert!(again.replayed);
    app.stop().await;
}

#[tokio::test]
async fn same_id_with_another_payload_is_already_exists_and_changes_nothing() {
    let app = spawn_app().await;
    app.seed("a", "", 10).await;
    app.seed("b", "", 10).await;

    app.reserve("r1", vec![line("a", "", 1)], 60).await.unwrap();
    app.decrement("d1", vec![line("a", "", 1)]).await.unwrap();
    app.adjust("j1", "a", "", 5, "restock").await.unwrap();
    app.set("s1", "b", "", 7).await.unwrap();

    let before = app.snapshot().await;
    let mut conflicts = vec![
        code_of(app.reserve("r1", vec![line("a", "", 2)], 60).await),
        // another TTL is another payload too
        code_of(app.reserve("r1", vec![line("a", "", 1)], 61).await),
        code_of(app.adjust("j1", "a", "", 5, "another reason").await),
        // request ids are one namespace: a set may not reuse an adjust's id
        code_of(app.set("j1", "a", "", 1).await),
        code_of(app.set_if_version("s1", "b", "", 7, 1).await),
    ];
    // An id reused in another partition: refused by a standalone Redis, in
    // the same script; on a cluster a request of one partition stays one
    // script there, and the reuse is noticed (logged, counted) after the
    // fact instead (docs/design.md, "Cluster mode").
    if !redis_cluster() {
        assert_ne!(app.keys.partition_of("a"), app.keys.partition_of("b"));
        conflicts.push(code_of(app.reserve("r1", vec![line("b", "", 1)], 60).await));
        conflicts.push(code_of(app.decrement("d1", vec![line("b", "", 1)]).await));
    }
    assert!(
        conflicts.iter().all(|c| *c == Code::AlreadyExists),
        "{conflicts:?}"
    );
    assert_eq!(app.snapshot().await, before, "a conflict changes nothing");
    app.stop().await;
}

#[tokio::test]
async fn every_operation_replays_its_first_outcome() {
    let app = spawn_app().await;
    app.seed("x", "", 20).await;

    let decrement = || app.decrement("dec", vec![line("x", "", 2)]);
    let first = decrement().await.unwrap();
    assert!(!first.replayed);
    // Something else changes the item in between: the replay still answers
    // with the levels of the first outcome.
    app.seed("x", "", 20).await;
    let replay = decrement().await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.levels, first.levels);

    let adjust = || app.adjust("adj", "x", "", -4, "damaged");
    let first = adjust().await.unwrap();
    let replay = adjust().await.unwrap();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.level, first.level);

    let set = || app.set("set", "x", "", 9);
    let first = set().await.unwrap();
    let replay = set().await.unwrap();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.level, first.level);

    app.reserve("res", vec![line("x", "", 1)], 60)
        .await
        .unwrap();
    let first = app.commit("res").await.unwrap();
    let replay = app.commit("res").await.unwrap();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.levels, first.levels);

    let level = app.level("x", "").await.unwrap();
    assert_eq!((level.available, level.reserved), (8, 0));
    // versions: seed 1, decrement 2, seed 3, adjust 4, set 5, reserve 6, commit 7
    assert_eq!(level.version, 7);
    app.stop().await;
}
