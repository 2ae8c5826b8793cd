//! Retries with the same id replay the first outcome and change nothing; the
//! same id with another payload is ALREADY_EXISTS.

use futures::future::join_all;
use stockd::pb;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserve_replays_apply_once() {
    let app = spawn_app().await;
    app.seed("shirt", "", 10).await;
    let request = pb::ReserveRequest {
        reservation_id: "order-1".into(),
        lines: vec![line("shirt", "", 3)],
        ttl_seconds: 600,
    };
    let results = join_all((0..20).map(|_| {
        let mut client = app.inventory.clone();
        let request = request.clone();
        async move { client.reserve(request).await.unwrap().into_inner() }
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
    let mut client = app.inventory.clone();
    let cart = |lines: Vec<pb::Line>| pb::ReserveRequest {
        reservation_id: "order-2".into(),
        lines,
        ttl_seconds: 0,
    };
    client
        .reserve(cart(vec![line("shirt", "", 1), line("socks", "", 2)]))
        .await
        .unwrap();
    let again = client
        .reserve(cart(vec![line("socks", "", 2), line("shirt", "", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    app.stop().await;
}

#[tokio::test]
async fn same_id_with_another_payload_is_already_exists_and_changes_nothing() {
    let app = spawn_app().await;
    app.seed("a", "", 10).await;
    app.seed("b", "", 10).await;
    let mut inv = app.inventory.clone();
    let mut admin = app.admin.clone();

    inv.reserve(pb::ReserveRequest {
        reservation_id: "r1".into(),
        lines: vec![line("a", "", 1)],
        ttl_seconds: 60,
    })
    .await
    .unwrap();
    inv.decrement(pb::DecrementRequest {
        request_id: "d1".into(),
        lines: vec![line("a", "", 1)],
    })
    .await
    .unwrap();
    inv.adjust(pb::AdjustRequest {
        request_id: "j1".into(),
        sku: "a".into(),
        location: String::new(),
        delta: 5,
        reason: "restock".into(),
    })
    .await
    .unwrap();
    admin
        .set_stock(pb::SetStockRequest {
            request_id: "s1".into(),
            sku: "b".into(),
            location: String::new(),
            available: 7,
            expected_version: None,
        })
        .await
        .unwrap();

    let before = app.snapshot().await;
    let mut conflicts = vec![
        code_of(
            inv.reserve(pb::ReserveRequest {
                reservation_id: "r1".into(),
                lines: vec![line("a", "", 2)],
                ttl_seconds: 60,
            })
            .await,
        ),
        // another TTL is another payload too
        code_of(
            inv.reserve(pb::ReserveRequest {
                reservation_id: "r1".into(),
                lines: vec![line("a", "", 1)],
                ttl_seconds: 61,
            })
            .await,
        ),
        code_of(
            inv.adjust(pb::AdjustRequest {
                request_id: "j1".into(),
                sku: "a".into(),
                location: String::new(),
                delta: 5,
                reason: "another reason".into(),
            })
            .await,
        ),
        // request ids are one namespace: a set may not reuse an adjust's id
        code_of(
            admin
                .set_stock(pb::SetStockRequest {
                    request_id: "j1".into(),
                    sku: "a".into(),
                    location: String::new(),
                    available: 1,
                    expected_version: None,
                })
                .await,
        ),
        code_of(
            admin
                .set_stock(pb::SetStockRequest {
                    request_id: "s1".into(),
                    sku: "b".into(),
                    location: String::new(),
                    available: 7,
                    expected_version: Some(1),
                })
                .await,
        ),
    ];
    // An id reused in another partition: refused by a standalone Redis, in
    // the same script; on a cluster a request of one partition stays one
    // script there, and the reuse is noticed (logged, counted) after the
    // fact instead (docs/design.md, "Cluster mode").
    if !redis_cluster() {
        assert_ne!(app.keys.partition_of("a"), app.keys.partition_of("b"));
        conflicts.push(code_of(
            inv.reserve(pb::ReserveRequest {
                reservation_id: "r1".into(),
                lines: vec![line("b", "", 1)],
                ttl_seconds: 60,
            })
            .await,
        ));
        conflicts.push(code_of(
            inv.decrement(pb::DecrementRequest {
                request_id: "d1".into(),
                lines: vec![line("b", "", 1)],
            })
            .await,
        ));
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
    let mut inv = app.inventory.clone();
    let mut admin = app.admin.clone();

    let dec = pb::DecrementRequest {
        request_id: "dec".into(),
        lines: vec![line("x", "", 2)],
    };
    let first = inv.decrement(dec.clone()).await.unwrap().into_inner();
    assert!(!first.replayed);
    // Something else changes the item in between: the replay still answers
    // with the levels of the first outcome.
    app.seed("x", "", 20).await;
    let replay = inv.decrement(dec).await.unwrap().into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.levels, first.levels);

    let adj = pb::AdjustRequest {
        request_id: "adj".into(),
        sku: "x".into(),
        location: String::new(),
        delta: -4,
        reason: "damaged".into(),
    };
    let first = inv.adjust(adj.clone()).await.unwrap().into_inner();
    let replay = inv.adjust(adj).await.unwrap().into_inner();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.level, first.level);

    let set = pb::SetStockRequest {
        request_id: "set".into(),
        sku: "x".into(),
        location: String::new(),
        available: 9,
        expected_version: None,
    };
    let first = admin.set_stock(set.clone()).await.unwrap().into_inner();
    let replay = admin.set_stock(set).await.unwrap().into_inner();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.level, first.level);

    inv.reserve(pb::ReserveRequest {
        reservation_id: "res".into(),
        lines: vec![line("x", "", 1)],
        ttl_seconds: 60,
    })
    .await
    .unwrap();
    let commit = pb::CommitRequest {
        reservation_id: "res".into(),
    };
    let first = inv.commit(commit.clone()).await.unwrap().into_inner();
    let replay = inv.commit(commit).await.unwrap().into_inner();
    assert!(replay.replayed && !first.replayed);
    assert_eq!(replay.levels, first.levels);

    let level = app.level("x", "").await.unwrap();
    assert_eq!((level.available, level.reserved), (8, 0));
    // versions: seed 1, decrement 2, seed 3, adjust 4, set 5, reserve 6, commit 7
    assert_eq!(level.version, 7);
    app.stop().await;
}
