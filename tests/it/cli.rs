//! `stockctl`, the built binary, against a real stockd.

use std::process::{Command, Stdio};

use prost::Message;
use stockd::pb;

use crate::support::process::{run_stockctl, stockctl};
use crate::support::*;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_what_happened() {
    let app = spawn_app().await;
    app.seed("mug", "", 2).await;
    let expect = |args: &'static [&'static str], code: i32| {
        let addr = app.addr;
        async move {
            let ran = stockctl(addr, args).await;
            assert_eq!(ran.code, code, "{args:?}: {}{}", ran.stdout, ran.stderr);
            ran
        }
    };
    expect(&["get", "mug"], 0).await;
    expect(&["reserve", "r0", "mug:0"], 64 + 3).await;
    expect(&["commit", "never"], 64 + 5).await;
    let short = expect(&["decrement", "mug:5"], 64 + 9).await;
    assert!(
        short
            .stderr
            .starts_with("error: FAILED_PRECONDITION (OUT_OF_STOCK): "),
        "the reason is printed: {}",
        short.stderr
    );
    expect(&["decrement", "mug:1", "--request-id", "once"], 0).await;
    expect(&["decrement", "mug:2", "--request-id", "once"], 64 + 6).await;
    expect(&["set", "mug", "3", "--expected-version", "99"], 64 + 10).await;

    let found = expect(&["--json", "commit", "never"], 64 + 5).await;
    let doc = json(&found.stdout);
    assert_eq!(doc["error"]["reason"], "RESERVATION_NOT_FOUND");
    assert_eq!(doc["error"]["metadata"]["reservation_id"], "never");

    // The address may be a bare HOST:PORT.
    let bare = app.addr.to_string();
    let ran = run_stockctl(&["--addr", &bare, "get", "mug"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);

    // Nobody listens: UNAVAILABLE.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ran = stockctl(port, &["get", "mug"]).await;
    assert_eq!(ran.code, 64 + 14, "{}", ran.stderr);

    // Usage errors: 2, and with --json a JSON document on stderr.
    let ran = stockctl(app.addr, &["get"]).await;
    assert_eq!((ran.code, ran.stdout.as_str()), (2, ""));
    assert!(ran.stderr.starts_with("error: "), "{}", ran.stderr);
    let ran = stockctl(app.addr, &["--json", "decrement", "mug:x"]).await;
    assert_eq!((ran.code, ran.stdout.as_str()), (2, ""));
    let doc = json(&ran.stderr);
    assert_eq!(doc["error"]["code"], "USAGE");
    assert!(
        doc["error"]["message"].as_str().unwrap().contains("mug:x"),
        "{doc}"
    );
    let ran = stockctl(app.addr, &["--json", "--help"]).await;
    assert_eq!(ran.code, 0, "help is not an error");
    assert!(ran.stdout.contains("Exit codes:"), "{}", ran.stdout);

    // Nothing the refused commands sent changed the item.
    assert_eq!(app.level("mug", "").await.unwrap().available, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_missing_token_exits_80() {
    let app = spawn_app_with(Options::with_args(&["--admin-token", "adm1n"])).await;
    let ran = stockctl(app.addr, &["flush-status"]).await;
    assert_eq!(ran.code, 64 + 16, "{}", ran.stderr);
    let ran = stockctl(app.addr, &["--admin-token", "adm1n", "flush-status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_exits_3_on_drift_and_preload_resumes_from_its_cursor() {
    let app = spawn_app().await;
    for sku in ["cli-a", "cli-b", "cli-c"] {
        app.seed(sku, "", 5).await;
    }
    let pool = app.postgres().await;
    app.converged(&pool).await;
    let ran = stockctl(app.addr, &["reconcile", "cli-b"]).await;
    assert_eq!(ran.code, 0, "in sync: {}{}", ran.stdout, ran.stderr);

    // Page by page (Postgres only, so a page of 1 stays cheap): progress
    // with the cursor on stderr, pure JSON on stdout.
    let args = ["--json", "preload", "--all", "--page-size", "1"];
    let ran = stockctl(app.addr, &args).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(json(&ran.stdout)["skipped"], 3);
    let first = ran.stderr.lines().next().unwrap();
    assert!(first.starts_with("preloaded: 1 items"), "{}", ran.stderr);
    let cursor = first
        .split_once("(resume with --cursor ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no cursor in {first:?}"));
    // The cursor is quoted for a shell; this one holds no quote.
    let cursor = cursor.trim_matches('\'');
    let resumed = stockctl(app.addr, &[&args[..], &["--cursor", cursor]].concat()).await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(json(&resumed.stdout)["skipped"], 2, "the rest");

    // Redis now disagrees with Postgres at the same version: drift.
    let key = app.keys.stock("cli-b", "default");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("avail")
        .arg(4)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let ran = stockctl(app.addr, &["--json", "reconcile", "cli-b"]).await;
    assert_eq!(ran.code, 3, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(json(&ran.stdout)["drift"], 1);
    assert_eq!(ran.stderr, "reconcile: 1 items out of sync\n");
    pool.close().await;
    app.stop().await;
}

#[tokio::test]
async fn completions_generate_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let ran = run_stockctl(&["completions", shell]).await;
        assert_eq!(ran.code, 0, "{shell}: {}", ran.stderr);
        for word in ["reconcile", "webhook", "timeout"] {
            assert!(ran.stdout.contains(word), "{shell} completes {word}");
        }
    }
    let bash = run_stockctl(&["completions", "bash"]).await.stdout;
    let checked = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("bash")
            .arg("-n")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(bash.as_bytes())
            .unwrap();
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(checked.success(), "bash accepts its completion script");
}

/// Forty subscriptions of 1,000 long SKUs each: more than the 4 MiB a gRPC
/// client accepts in one message, so ListWebhooks must page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_list_pages_past_the_message_limit() {
    // Never delivered to (no stock changes), but loopback must be allowed.
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-allow-networks",
        "127.0.0.0/8",
    ]))
    .await;
    let mut added = Vec::new();
    for n in 0..40 {
        let skus = (0..1_000)
            .map(|i| format!("{n:02}-{i:04}-{}", "x".repeat(120)))
            .collect();
        let url = format!("http://127.0.0.1:9/hook-{n}");
        let webhook = app
            .add_webhook(pb::AddWebhookRequest {
                skus,
                secret: "0123456789abcdef".into(),
                ..webhook_request(&url, &[pb::WebhookEvent::OutOfStock])
            })
            .await
            .unwrap()
            .webhook
            .unwrap();
        added.push(webhook);
    }
    let total: usize = added.iter().map(|w| w.encoded_len()).sum();
    assert!(
        total > 4 * 1024 * 1024,
        "one message would overflow: {total}"
    );

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app.list_webhooks(100, &page_token).await.unwrap();
        assert!(
            page.encoded_len() <= (1024 + 4) * 1024,
            "a page stays near 1 MiB"
        );
        assert!(!page.webhooks.is_empty());
        seen.extend(page.webhooks.iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let ids: Vec<u64> = added.iter().map(|w| w.id).collect();
    assert_eq!(seen, ids, "every subscription once, in id order");

    let small = app.list_webhooks(3, "").await.unwrap();
    assert_eq!(small.webhooks.len(), 3);
    assert_eq!(small.next_page_token, ids[2].to_string());

    let status = app.list_webhooks(0, "not-a-token").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&status), "INVALID_ARGUMENT");

    let listed = stockctl(app.addr, &["--json", "webhook", "list"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let doc: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let listed_ids: Vec<u64> = doc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_u64().unwrap())
        .collect();
    assert_eq!(listed_ids, ids);
    app.stop().await;
}

/// Answers the first page of Preload and never the second.
struct StuckAfterOnePage;

#[tonic::async_trait]
impl pb::admin_server::Admin for StuckAfterOnePage {
    async fn preload(
        &self,
        request: tonic::Request<pb::PreloadRequest>,
    ) -> Result<tonic::Response<pb::PreloadResponse>, tonic::Status> {
        if request.into_inner().cursor.is_empty() {
            return Ok(tonic::Response::new(pb::PreloadResponse {
                loaded: 1,
                next_cursor: "pg:a\tdefault".into(),
                ..Default::default()
            }));
        }
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_job_exits_130_with_its_cursor() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::admin_server::AdminServer::new(StuckAfterOnePage))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ran = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader, Read};
        let mut child = Command::new(env!("CARGO_BIN_EXE_stockctl"))
            // The deadline ends the run should the signal be lost.
            .args(["--addr", &addr.to_string(), "--timeout", "30s"])
            .args(["preload", "--all"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        // Waiting for the second page now: Ctrl-C.
        let signalled = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(signalled.success());
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        (child.wait().unwrap().code(), first, rest)
    })
    .await
    .unwrap();
    let (code, first, rest) = ran;
    assert!(
        first.starts_with("preloaded: 1 items") && first.contains("'pg:a\tdefault'"),
        "{first}"
    );
    assert_eq!(code, Some(130), "{rest}");
    assert_eq!(rest, "interrupted; resume with --cursor 'pg:a\tdefault'\n");
}
