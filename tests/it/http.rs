//! The HTTP API: JSON reads and their errors, the client token, public
//! mode, and Server-Sent Events (order, Last-Event-ID resumption, the end
//! of a stream at shutdown).

use serde_json::json;

use crate::support::http_api::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_reads_answer_levels_and_clear_errors_that_change_nothing() {
    let app = spawn_app().await;
    let http = app.http_addr;
    app.seed("A", "", 10).await;
    app.seed("B", "wh-2", 3).await;

    let one = get(http, "/v1/stock/A", None).await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(
        one.body,
        json!({"sku": "A", "location": "default", "available": 10, "reserved": 0,
               "version": 1, "availability": "in_stock"})
    );
    let at = get(http, "/v1/stock/B?location=wh-2", None).await;
    assert_eq!(
        (
            at.body["available"].as_i64(),
            at.body["availability"].as_str()
        ),
        (Some(3), Some("low_stock"))
    );
    let many = get(http, "/v1/stock?item=A&item=B@wh-2&item=C", None).await;
    assert_eq!(many.status, 200, "{many:?}");
    assert_eq!(many.body["levels"].as_array().unwrap().len(), 2);
    assert_eq!(
        many.body["missing"],
        json!([{"sku": "C", "location": "default"}])
    );

    let before = app.snapshot().await;
    let unknown = get(http, "/v1/stock/nope", None).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "NOT_FOUND"),
        "{unknown:?}"
    );
    assert!(
        unknown.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
    for (path, field) in [
        ("/v1/stock/has%20space", "sku"),
        (&format!("/v1/stock/{}", "x".repeat(129)), "sku"),
        ("/v1/stock/A?location=a%09b", "location"),
        ("/v1/stock/A?locaton=x", "locaton"),
        ("/v1/stock?item=A&item=bad%20sku@wh", "item[1].sku"),
        ("/v1/stock?item=A@", "item[0].location"),
        ("/v1/stock", "item"),
        ("/v1/events?sku=A&sku=has%20space", "sku[1]"),
        ("/v1/events", "sku"),
    ] {
        let bad = get(http, path, None).await;
        assert_eq!(
            (bad.status, bad.code()),
            (400, "INVALID_ARGUMENT"),
            "{path}: {bad:?}"
        );
        assert_eq!(bad.body["error"]["field"], field, "{path}: {bad:?}");
        assert!(
            bad.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{path}: {bad:?}"
        );
    }
    let too_many: Vec<String> = (0..101).map(|i| format!("item=s{i}")).collect();
    let bad = get(http, &format!("/v1/stock?{}", too_many.join("&")), None).await;
    assert_eq!(
        (bad.status, bad.body["error"]["field"].as_str()),
        (400, Some("item"))
    );
    assert_eq!(app.snapshot().await, before, "bad requests changed nothing");

    let nowhere = get(http, "/v2/nothing", None).await;
    assert_eq!((nowhere.status, nowhere.code()), (404, "NOT_FOUND"));
    assert_eq!(get(http, "/healthz", None).await.status, 200);
    let ready = get(http, "/readyz", None).await;
    assert_eq!(
        (ready.status, &ready.body),
        (200, &json!({"status": "ready"}))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_token_is_required_when_configured() {
    let app = spawn_app_with(Options::with_args(&["--client-token", "s3cret"])).await;
    let http = app.http_addr;
    app.seed("A", "", 10).await;
    for token in [None, Some("wrong")] {
        for path in ["/v1/stock/A", "/v1/stock?item=A", "/v1/events?sku=A"] {
            let refused = get(http, path, token).await;
            assert_eq!(
                (refused.status, refused.code()),
                (401, "UNAUTHENTICATED"),
                "{path}"
            );
            assert_eq!(refused.headers["www-authenticate"], "Bearer");
        }
        let refused = graphql(http, "{ stock(sku: \"A\") { sku } }", token).await;
        assert_eq!((refused.status, refused.code()), (401, "UNAUTHENTICATED"));
    }
    let allowed = get(http, "/v1/stock/A", Some("s3cret")).await;
    assert_eq!(
        (allowed.status, allowed.body["available"].as_i64()),
        (200, Some(10))
    );
    assert!(Sse::open(http, &["A"], None, Some("s3cret")).await.is_ok());
    // Health stays open to the orchestrator.
    assert_eq!(get(http, "/readyz", None).await.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_mode_shows_buckets_and_never_quantities() {
    let app = spawn_app_with(Options::with_args(&[
        "--client-token",
        "s3cret",
        "--http-public",
        "--low-stock",
        "2",
    ]))
    .await;
    let http = app.http_addr;
    app.seed("P", "", 4).await;

    let public = get(http, "/v1/stock/P", None).await;
    assert_eq!(
        public.body,
        json!({"sku": "P", "location": "default", "availability": "in_stock"})
    );
    let many = get(http, "/v1/stock?item=P", None).await;
    assert_eq!(
        many.body["levels"],
        json!([{"sku": "P", "location": "default", "availability": "in_stock"}])
    );
    // The token still shows everything, and a wrong one is refused.
    let full = get(http, "/v1/stock/P", Some("s3cret")).await;
    assert_eq!(full.body["available"], 4);
    assert_eq!(get(http, "/v1/stock/P", Some("wrong")).await.status, 401);

    // Only the changes that move the item to another bucket are sent, and
    // they carry no quantity: 4 → 3 (in stock), 3 → 2 (low), 2 → 0 (out).
    let mut sse = Sse::open(http, &["P"], None, None).await.unwrap();
    reserve_as(&app, Some("s3cret"), "p-1", "P", 1).await;
    reserve_as(&app, Some("s3cret"), "p-2", "P", 1).await;
    reserve_as(&app, Some("s3cret"), "p-3", "P", 2).await;
    let seen = sse.take(2).await;
    let buckets: Vec<&str> = seen
        .iter()
        .map(|e| e.data["availability"].as_str().unwrap())
        .collect();
    assert_eq!(buckets, ["low_stock", "out_of_stock"]);
    for event in &seen {
        let mut keys: Vec<&str> = event
            .data
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["availability", "event_id", "location", "sku", "ts_ms"],
            "{event:?}"
        );
        assert_eq!(event.data["event_id"].as_str(), Some(event.id.as_str()));
    }

    let gql = graphql(http, "{ stock(sku: \"P\") { sku availability } }", None).await;
    assert_eq!(
        gql.body["data"]["stock"],
        json!({"sku": "P", "availability": "OUT_OF_STOCK"})
    );
    let hidden = graphql(http, "{ stock(sku: \"P\") { sku available } }", None).await;
    assert!(
        !hidden.body["data"].to_string().contains("available"),
        "{hidden:?}"
    );
    assert_eq!(
        hidden.body["errors"][0]["extensions"]["code"],
        "PERMISSION_DENIED"
    );
    let introspected = graphql(
        http,
        "{ __type(name: \"StockLevel\") { fields { name } } }",
        None,
    )
    .await;
    let fields = introspected.body["data"]["__type"]["fields"].to_string();
    assert!(
        !fields.contains("available") && !fields.contains("version"),
        "{fields}"
    );
    let full = graphql(
        http,
        "{ stock(sku: \"P\") { available reserved version } }",
        Some("s3cret"),
    )
    .await;
    assert_eq!(
        full.body["data"]["stock"],
        json!({"available": 0, "reserved": 4, "version": 4})
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_sends_changes_in_order_and_resumes_exactly_after_last_event_id() {
    let app = spawn_app().await;
    let http = app.http_addr;
    app.seed("S", "", 100).await;
    app.seed("T", "", 100).await;
    let mut sse = Sse::open(http, &["S", "T"], None, None).await.unwrap();

    reserve(&app, "s-1", "S", 2).await;
    let first = sse.take(1).await.remove(0);
    assert_eq!(
        (first.data["sku"].as_str(), first.data["op"].as_str()),
        (Some("S"), Some("reserve"))
    );
    assert_eq!(
        (
            first.data["available"].as_i64(),
            first.data["reserved"].as_i64()
        ),
        (Some(98), Some(2))
    );
    assert_eq!(first.data["delta_available"], -2);
    assert_eq!(first.data["reference"], "s-1");
    assert_eq!(first.data["event_id"].as_str(), Some(first.id.as_str()));

    // Several changes: each item's versions arrive in order.
    for i in 2..=6 {
        reserve(
            &app,
            &format!("s-{i}"),
            if i % 2 == 0 { "T" } else { "S" },
            1,
        )
        .await;
    }
    release(&app, "s-1").await;
    let rest = sse.take(6).await;
    for sku in ["S", "T"] {
        let versions: Vec<i64> = std::iter::once(&first)
            .chain(&rest)
            .filter(|e| e.data["sku"] == sku)
            .map(|e| e.data["version"].as_i64().unwrap())
            .collect();
        let mut sorted = versions.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(versions, sorted, "{sku}: in version order, no repeat");
    }
    assert_eq!(rest.last().unwrap().data["op"], "release");

    // A subscriber that saw up to the third event resumes with
    // Last-Event-ID: exactly the events after it, then live ones.
    let seen: Vec<String> = std::iter::once(&first)
        .chain(&rest)
        .map(|e| e.id.clone())
        .collect();
    let mut resumed = Sse::open(http, &["S", "T"], Some(&seen[2]), None)
        .await
        .unwrap();
    let replayed: Vec<String> = resumed
        .take(seen.len() - 3)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(replayed, seen[3..]);
    reserve(&app, "s-live", "S", 1).await;
    let live = resumed.take(1).await.remove(0);
    assert_eq!(live.data["reference"], "s-live");
    assert_eq!(sse.take(1).await[0].id, live.id);

    let bad = Sse::open(http, &["S"], Some("12345"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (bad.status, bad.body["error"]["field"].as_str()),
        (400, Some("Last-Event-ID"))
    );

    // At shutdown the stream ends with a stream_error naming where to resume.
    let stopping = tokio::spawn(app.stop());
    let end = sse.next().await.expect("a last event");
    assert_eq!(end.event, "stream_error", "{end:?}");
    assert_eq!(end.data["error"]["code"], "UNAVAILABLE");
    assert_eq!(
        end.data["error"]["resume_from"].as_str(),
        Some(live.id.as_str())
    );
    assert_eq!(end.id, live.id, "EventSource reconnects from there");
    assert!(sse.next().await.is_none(), "then the response ends");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_name_a_bounded_number_of_skus() {
    let app = spawn_app_with(Options::with_args(&["--http-max-skus", "3"])).await;
    let refused = Sse::open(app.http_addr, &["a", "b", "c", "d"], None, None)
        .await
        .err()
        .unwrap();
    assert_eq!((refused.status, refused.code()), (400, "INVALID_ARGUMENT"));
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 3"),
        "{refused:?}"
    );
    assert!(
        Sse::open(app.http_addr, &["a", "b", "c"], None, None)
            .await
            .is_ok()
    );
    app.stop().await;
}

/// A raw `GET /v1/events` whose reader reads nothing until told: its small
/// receive buffer fills, the server's writes stall, and the hub's queue for
/// it overflows.
/// Opens an SSE request that is then not read, returned once the server
/// answered with its head (so the watch is registered: changes made after
/// this returns are the stream's).
async fn stalled_sse(addr: std::net::SocketAddr, sku: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /v1/events?sku={sku} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Byte by byte up to the blank line: nothing of the body is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(DEADLINE, stream.read_u8())
            .await
            .expect("the response head in time")
            .unwrap();
        head.push(byte);
    }
    (stream, String::from_utf8(head).unwrap())
}

/// Everything the server sends until it closes, de-chunked: the SSE text.
async fn read_to_end_dechunked((mut stream, head): (tokio::net::TcpStream, String)) -> String {
    use tokio::io::AsyncReadExt;
    let mut raw = head.into_bytes();
    if tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .is_err()
    {
        panic!("the response did not end ({} bytes read)", raw.len());
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, mut body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_sse_subscriber_is_cut_with_the_id_to_resume_from() {
    let app = spawn_app_with(Options::with_args(&["--watch-buffer", "300"])).await;
    let http = app.http_addr;
    // One SKU at 100 locations: every event in one partition, so resuming
    // is exact. 20,000 events (~7 MB of SSE) are more than the socket
    // buffers of the stalled connection can take (4 MB at most here).
    let locations: Vec<String> = (0..100).map(|i| format!("wh-{i}")).collect();
    for location in &locations {
        app.seed("slow", location, 1_000_000).await;
    }
    let stalled = stalled_sse(http, "slow").await;
    let lines: Vec<stockd::pb::Line> = locations.iter().map(|l| line("slow", l, 1)).collect();
    for i in 0..100 {
        let id = format!("slow-{i}");
        app.reserve(&id, lines.clone(), 600).await.unwrap();
        release(&app, &id).await;
    }
    // Every change after the seeds, as the stream holds them (read in
    // pages: one reply of 20,000 entries is slow to decode).
    let stream = app.keys.events(app.keys.partition_of("slow"));
    let mut all: Vec<String> = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        all.extend(
            page.into_iter()
                .filter(|(_, fields)| {
                    fields.contains(&("op".into(), "reserve".into()))
                        || fields.contains(&("op".into(), "release".into()))
                })
                .map(|(id, _)| id),
        );
    }
    assert_eq!(all.len(), 20_000);

    let text = read_to_end_dechunked(stalled).await;
    let blocks: Vec<&str> = text.split("\n\n").filter(|b| b.contains("data:")).collect();
    let field = |block: &str, name: &str| {
        block
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    };
    let (last, received) = blocks.split_last().unwrap();
    assert_eq!(
        field(last, "event").as_deref(),
        Some("stream_error"),
        "{last}"
    );
    let problem: serde_json::Value = serde_json::from_str(&field(last, "data").unwrap()).unwrap();
    assert_eq!(problem["error"]["code"], "RESOURCE_EXHAUSTED", "{problem}");
    let resume = problem["error"]["resume_from"].as_str().unwrap().to_owned();
    assert_eq!(field(last, "id").as_deref(), Some(resume.as_str()));
    let received: Vec<String> = received.iter().map(|b| field(b, "id").unwrap()).collect();
    assert!(
        received.len() < all.len(),
        "cut before the end ({})",
        received.len()
    );
    assert_eq!(received, all[..received.len()], "what it got came in order");
    if let Some(last_received) = received.last() {
        assert_eq!(&resume, last_received, "resume from the last event it got");
    }

    // Resuming from there gives exactly the rest.
    let mut again = Sse::open(http, &["slow"], Some(&resume), None)
        .await
        .unwrap();
    let rest: Vec<String> = again
        .take(all.len() - received.len())
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(rest, all[received.len()..]);
    app.stop().await;
}
