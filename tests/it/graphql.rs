//! GraphQL: the `stock` query over HTTP, and `stockChanged` over a
//! WebSocket in raw `graphql-transport-ws` messages: changes in version
//! order, resumption with `fromEventId`, the token in `connection_init`,
//! and the limit of subscriptions per connection.

use serde_json::{Value, json};

use crate::support::http_api::*;
use crate::support::*;

const CHANGED: &str = "eventId sku location available reserved version op availability";

fn subscription(skus: &[&str], from: Option<&str>) -> String {
    let skus: Vec<String> = skus.iter().map(|s| format!("\"{s}\"")).collect();
    let from = from
        .map(|f| format!(", fromEventId: \"{f}\""))
        .unwrap_or_default();
    format!(
        "subscription {{ stockChanged(skus: [{}]{from}) {{ {CHANGED} }} }}",
        skus.join(", ")
    )
}

/// The id of `sku`'s latest event: subscribing from it makes a test
/// independent of when the server registers the subscription.
async fn last_event_id(app: &TestApp, sku: &str) -> String {
    let events = app.events().await;
    events
        .iter()
        .rev()
        .find(|e| e.get("sku") == sku)
        .expect("an event")
        .id
        .clone()
}

/// The next `n` changes of subscription `id`.
async fn next_changes(socket: &mut GraphqlSocket, id: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let message = socket.receive().await.expect("the socket stays open");
        assert_eq!(message["type"], "next", "{message}");
        assert_eq!(message["id"], id, "{message}");
        assert!(message["payload"]["errors"].is_null(), "{message}");
        out.push(message["payload"]["data"]["stockChanged"].clone());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stock_query_reads_like_get_stock() {
    let app = spawn_app().await;
    let http = app.http_addr;
    app.seed("G", "wh", 7).await;
    let answer = graphql(
        http,
        "{ stock(sku: \"G\", location: \"wh\") { sku location available reserved version availability } }",
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body["data"]["stock"],
        json!({"sku": "G", "location": "wh", "available": 7, "reserved": 0, "version": 1,
               "availability": "IN_STOCK"})
    );
    let unknown = graphql(http, "{ stock(sku: \"G\") { sku } }", None).await;
    assert_eq!(unknown.body, json!({"data": {"stock": null}}));

    let before = app.snapshot().await;
    let bad = graphql(http, "{ stock(sku: \"has space\") { sku } }", None).await;
    let error = &bad.body["errors"][0];
    assert_eq!(error["extensions"]["code"], "INVALID_ARGUMENT", "{bad:?}");
    assert_eq!(error["extensions"]["field"], "sku", "{bad:?}");
    assert_eq!(app.snapshot().await, before);
    let broken = reqwest::Client::new()
        .post(format!("http://{http}/graphql"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400);
    let body: Value = serde_json::from_str(&broken.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["field"], "body");

    // GET with the query in the query string works too.
    let by_get = get(
        http,
        "/graphql?query=%7Bstock(sku:%22G%22,location:%22wh%22)%7Bavailable%7D%7D",
        None,
    )
    .await;
    assert_eq!(by_get.body["data"]["stock"]["available"], 7);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_subscription_receives_changes_in_version_order_and_resumes() {
    let app = spawn_app().await;
    let http = app.http_addr;
    app.seed("W", "", 50).await;
    app.seed("X", "", 50).await;
    let mut socket = GraphqlSocket::connect(http, json!({})).await.unwrap();
    let seeded = last_event_id(&app, "W").await;
    socket
        .subscribe("1", &subscription(&["W"], Some(&seeded)))
        .await;
    reserve(&app, "w-0", "W", 1).await;
    let first = next_changes(&mut socket, "1", 1).await.remove(0);
    assert_eq!(first["version"], 2);

    for i in 1..=5 {
        reserve(&app, &format!("w-{i}"), "W", 1).await;
        reserve(&app, &format!("x-{i}"), "X", 1).await; // not subscribed
    }
    release(&app, "w-0").await;
    let changes = next_changes(&mut socket, "1", 6).await;
    let versions: Vec<i64> = changes
        .iter()
        .map(|c| c["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [3, 4, 5, 6, 7, 8]);
    assert!(changes.iter().all(|c| c["sku"] == "W"));
    assert_eq!(changes[0]["op"], "reserve");
    assert_eq!(changes[5]["op"], "release");
    assert_eq!(
        (
            changes[5]["available"].as_i64(),
            changes[5]["reserved"].as_i64()
        ),
        (Some(45), Some(5))
    );

    // A second subscription resumes after the third change it missed.
    let resume = changes[1]["eventId"].as_str().unwrap();
    socket
        .subscribe("2", &subscription(&["W"], Some(resume)))
        .await;
    let replayed = next_changes(&mut socket, "2", 4).await;
    let replayed_versions: Vec<i64> = replayed
        .iter()
        .map(|c| c["version"].as_i64().unwrap())
        .collect();
    assert_eq!(replayed_versions, [5, 6, 7, 8]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_authenticate_in_connection_init_and_limit_subscriptions() {
    let app = spawn_app_with(Options::with_args(&[
        "--client-token",
        "s3cret",
        "--http-max-subscriptions",
        "2",
    ]))
    .await;
    let http = app.http_addr;
    app.seed("L", "", 5).await;
    let refused = GraphqlSocket::connect(http, json!({})).await.err().unwrap();
    assert!(refused.contains("token"), "{refused}");
    let refused = GraphqlSocket::connect(http, json!({"Authorization": "Bearer no"}))
        .await
        .err()
        .unwrap();
    assert!(refused.contains("token"), "{refused}");

    let mut socket = GraphqlSocket::connect(http, json!({"Authorization": "Bearer s3cret"}))
        .await
        .unwrap();
    // Which of the three is refused depends on the order the server
    // starts them in; they all resume from the seed, so the admitted ones
    // see the change whenever they start.
    let seeded = last_event_id(&app, "L").await;
    let mut ids = vec!["a", "b", "c"];
    for id in &ids {
        socket
            .subscribe(id, &subscription(&["L"], Some(&seeded)))
            .await;
    }
    let refusal = socket.receive().await.unwrap();
    let refused = refusal["id"].as_str().unwrap().to_owned();
    ids.retain(|id| *id != refused);
    assert_eq!(
        refusal["payload"]["errors"][0]["extensions"]["code"], "RESOURCE_EXHAUSTED",
        "{refusal}"
    );
    assert!(
        refusal["payload"]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2")
    );
    let done = socket.receive().await.unwrap();
    assert_eq!(
        (done["type"].as_str(), done["id"].as_str()),
        (Some("complete"), Some(refused.as_str()))
    );

    // Too many SKUs in one subscription is refused naming the argument.
    let many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut other = GraphqlSocket::connect(http, json!({"Authorization": "Bearer s3cret"}))
        .await
        .unwrap();
    other.subscribe("m", &subscription(&many, None)).await;
    let refusal = other.receive().await.unwrap();
    assert_eq!(
        refusal["payload"]["errors"][0]["extensions"]["field"], "skus",
        "{refusal}"
    );

    // The two admitted subscriptions both get the change.
    reserve_as(&app, Some("s3cret"), "l-1", "L", 1).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let message = socket.receive().await.unwrap();
        assert_eq!(
            message["payload"]["data"]["stockChanged"]["version"], 2,
            "{message}"
        );
        got.push(message["id"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ids);
    app.stop().await;
}
