//! Every change appends one event per item to its partition's stream, with
//! the contract's fields, and versions run 1, 2, 3… without gaps.

use std::collections::HashMap;

use crate::support::*;

#[tokio::test]
async fn events_carry_the_contract_fields_and_versions_without_gaps() {
    let app = spawn_app().await;
    let skus = skus_in_distinct_partitions(&app.keys, "ev", 2);
    let (a, b) = (&skus[0], &skus[1]);
    app.seed(a, "", 10).await;
    app.seed(b, "paris", 10).await;
    app.reserve("r1", vec![line(a, "", 2), line(b, "paris", 1)], 60)
        .await
        .unwrap();
    app.commit("r1").await.unwrap();
    app.reserve("r2", vec![line(a, "", 1)], 60).await.unwrap();
    app.release("r2").await.unwrap();
    app.decrement("d1", vec![line(b, "paris", 3)])
        .await
        .unwrap();
    app.adjust("a1", a, "", -1, "shrinkage").await.unwrap();

    let events = app.events().await;
    let fields = [
        "sku", "loc", "op", "d_avail", "d_resv", "avail", "resv", "ver", "ref", "ts",
    ];
    let mut per_item: HashMap<(String, String), Vec<&Event>> = HashMap::new();
    for e in &events {
        let mut names: Vec<&str> = e.fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut expected = fields.to_vec();
        // the request's fingerprint, so that Postgres can answer a retry
        // whose record Redis lost (docs/design.md)
        expected.push("fp");
        assert_eq!(e.get("fp").len(), 16, "a 64-bit fingerprint in hex");
        if e.get("op") == "reserve" {
            // the hold's expiry, for the flusher's reservation rows
            expected.push("exp");
            assert!(e.int("exp") > e.int("ts"));
        }
        expected.sort_unstable();
        assert_eq!(names, expected, "event {} fields", e.id);
        assert_eq!(
            e.partition,
            app.keys.partition_of(e.get("sku")).0,
            "event in its sku's partition"
        );
        assert!(e.int("ts") > 1_600_000_000_000);
        per_item
            .entry((e.get("sku").into(), e.get("loc").into()))
            .or_default()
            .push(e);
    }
    for (item, evs) in &per_item {
        let (mut avail, mut resv) = (0, 0);
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e.int("ver"), i as i64 + 1, "{item:?} versions without gaps");
            avail += e.int("d_avail");
            resv += e.int("d_resv");
            assert_eq!(
                (e.int("avail"), e.int("resv")),
                (avail, resv),
                "{item:?} deltas sum to the state"
            );
        }
    }
    let ops_a: Vec<&str> = per_item[&(a.clone(), "default".into())]
        .iter()
        .map(|e| e.get("op"))
        .collect();
    assert_eq!(
        ops_a,
        vec!["set", "reserve", "commit", "reserve", "release", "adjust"]
    );
    let ops_b: Vec<&str> = per_item[&(b.clone(), "paris".into())]
        .iter()
        .map(|e| e.get("op"))
        .collect();
    assert_eq!(ops_b, vec!["set", "reserve", "commit", "decrement"]);
    let refs: Vec<&str> = per_item[&(a.clone(), "default".into())]
        .iter()
        .map(|e| e.get("ref"))
        .collect();
    assert_eq!(&refs[1..], &["r1", "r1", "r2", "r2", "a1"]);

    let level = app.level(a, "").await.unwrap();
    assert_eq!((level.available, level.reserved, level.version), (7, 0, 6));
    app.stop().await;
}
