//! Many clients at once on the same stock: never oversell.

use futures::future::join_all;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_reservations_of_fifty_units_give_exactly_fifty() {
    let app = spawn_app().await;
    app.seed("hot", "", 50).await;

    let attempts = (0..200).map(|i| {
        let rpc = app.clients();
        async move {
            rpc.reserve(&format!("r-{i}"), vec![line("hot", "", 1)], 600)
                .await
        }
    });
    let results = join_all(attempts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let short = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition))
        .count();
    assert_eq!(ok, 50, "exactly the units in stock are reserved");
    assert_eq!(short, 150, "every other attempt is refused as short stock");

    let level = app.level("hot", "").await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.version),
        (0, 50, 51)
    );
    assert_eq!(app.events().await.len(), 51, "one set, fifty reserves");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decrements_and_reservations_never_oversell() {
    let app = spawn_app().await;
    app.seed("mixed", "", 100).await;

    let ops = (0..300).map(|i| {
        let rpc = app.clients();
        async move {
            let qty = 1 + (i % 3);
            if i % 2 == 0 {
                rpc.reserve(&format!("r-{i}"), vec![line("mixed", "", qty)], 600)
                    .await
                    .map(|_| qty)
            } else {
                rpc.decrement(&format!("d-{i}"), vec![line("mixed", "", qty)])
                    .await
                    .map(|_| qty)
            }
        }
    });
    let results = join_all(ops).await;
    let taken: i64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    for r in &results {
        if let Err(status) = r {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    let level = app.level("mixed", "").await.unwrap();
    assert!(taken <= 100, "took {taken} of 100 units");
    assert_eq!(level.available, 100 - taken);
    assert!(level.available >= 0 && level.reserved >= 0);
    app.stop().await;
}
