//! Webhooks end to end: a real HTTP receiver on loopback verifies every
//! signature and sees each transition once (a retry carries the same
//! idempotency key), in version order; a receiver that keeps failing sends
//! the delivery to dead letters, `stockctl webhook redeliver` brings it back,
//! and a dead endpoint holds up no other subscription. Loopback is refused
//! unless allowed (server-side request forgery), both when a subscription is
//! added and when a delivery connects; https endpoints are reached through
//! a private CA.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use stockd::pb;
use stockd::webhooks::signing;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);
const OWN_SECRET: &str = "own-secret-0123456789";
const SERVER_SECRET: &str = "server-secret-0123456789";
/// A Standard Webhooks secret: `whsec_` and 24 random bytes in base64.
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The receivers listen on loopback, which stockd refuses unless allowed.
const ALLOW_LOOPBACK: &str = "127.0.0.0/8,::1";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// The status it was answered with.
    status: u16,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    fn key(&self) -> String {
        self.header("idempotency-key").to_owned()
    }
}

/// How the receiver answers each path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Ok,
    /// 500 to the first request of every idempotency key, then 200.
    FailFirstAttempt,
    /// 500 while `failing` is set.
    FailWhileSet,
}

/// A minimal HTTP/1.1 server on 127.0.0.1:0 that records every request.
#[derive(Clone)]
struct Receiver {
    base: String,
    seen: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(paths: &[(&str, Behaviour)]) -> Self {
        Self::start_with(paths, None).await
    }

    /// Serves https as `localhost` with the certificate `tls` holds.
    async fn start_tls(paths: &[(&str, Behaviour)], tls: TlsAcceptor) -> Self {
        Self::start_with(paths, Some(tls)).await
    }

    async fn start_with(paths: &[(&str, Behaviour)], tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = match tls {
            None => format!("http://{}", listener.local_addr().unwrap()),
            Some(_) => format!(
                "https://localhost:{}",
                listener.local_addr().unwrap().port()
            ),
        };
        let receiver = Receiver {
            base,
            seen: Arc::default(),
            failing: Arc::new(AtomicBool::new(true)),
        };
        let behaviours: HashMap<String, Behaviour> =
            paths.iter().map(|(p, b)| (p.to_string(), *b)).collect();
        let r = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                let behaviours = behaviours.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => r.serve(socket, &behaviours).await,
                        Some(tls) => {
                            if let Ok(socket) = tls.accept(socket).await {
                                r.serve(socket, &behaviours).await
                            }
                        }
                    }
                });
            }
        });
        receiver
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        socket: S,
        behaviours: &HashMap<String, Behaviour>,
    ) {
        let mut socket = BufReader::new(socket);
        // Keep-alive: one request after another on the connection.
        loop {
            let mut request_line = String::new();
            if socket.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                return;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_owned();
            let mut headers = HashMap::new();
            loop {
                let mut line = String::new();
                socket.read_line(&mut line).await.unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
            let length: usize = headers
                .get("content-length")
                .map(|v| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; length];
            socket.read_exact(&mut body).await.unwrap();
            let status = {
                let mut seen = self.seen.lock().unwrap();
                let key = headers.get("idempotency-key").cloned().unwrap_or_default();
                let status = match behaviours.get(&path) {
                    Some(Behaviour::Ok) => 200,
                    Some(Behaviour::FailFirstAttempt) => {
                        if seen
                            .iter()
                            .any(|r| r.headers.get("idempotency-key") == Some(&key))
                        {
                            200
                        } else {
                            500
                        }
                    }
                    Some(Behaviour::FailWhileSet) if self.failing.load(Ordering::SeqCst) => 500,
                    Some(Behaviour::FailWhileSet) => 204,
                    None => 404,
                };
                seen.push(Received {
                    path,
                    headers,
                    body,
                    status,
                });
                status
            };
            let reason = if status < 300 { "OK" } else { "Nope" };
            let body = if status == 500 {
                "receiver says no"
            } else {
                ""
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let out = socket.get_mut();
            if out.write_all(response.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn seen(&self, path: &str) -> Vec<Received> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The HMAC key a Standard Webhooks library makes of `secret`: a `whsec_`
/// secret is base64 (`new Webhook(secret)`); the others are given to the
/// library as raw bytes (`Webhook::from_bytes`, `{format: "raw"}`).
fn library_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64.decode(encoded).expect("a whsec_ secret is base64"),
        None => secret.as_bytes().to_vec(),
    }
}

/// Verifies a request as the Standard Webhooks libraries do (written from
/// the specification, not with the server's code): the three headers,
/// timestamp within 5 minutes, one of the space-separated `v1,<base64>`
/// signatures equal to base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")).
fn assert_standard_signed(r: &Received, secret: &str) {
    use hmac::{KeyInit, Mac};
    let id = r.header("webhook-id");
    let timestamp = r.header("webhook-timestamp");
    let sent: i64 = timestamp.parse().unwrap();
    assert!((now_secs() - sent).abs() <= 300, "stale timestamp {sent}");
    assert!(
        !id.contains('.'),
        "the signed content is dot-separated: {id}"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&library_key(secret)).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&r.body);
    let expected = BASE64.encode(mac.finalize().into_bytes());
    let matched = r
        .header("webhook-signature")
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .any(|(version, sig)| version == "v1" && sig == expected);
    assert!(matched, "webhook-signature of {r:?}");
    // The library's receiver-side check agrees.
    signing::verify(
        secret,
        id,
        timestamp,
        r.header("webhook-signature"),
        &r.body,
        now_secs(),
        300,
    )
    .unwrap_or_else(|e| panic!("bad webhook-signature ({e}) on {r:?}"));
    assert_eq!(id, r.key(), "webhook-id is the idempotency key");
}

/// Verifies a request's signatures as a receiver must: the Standard
/// Webhooks one, and the earlier stockd one still sent beside it, written
/// from the README's description (not with the server's code): v1 = hex of
/// HMAC-SHA256(secret, "<stockd-timestamp>.<raw body>"), timestamp recent.
fn assert_signed(r: &Received, secret: &str) {
    use hmac::{KeyInit, Mac};
    assert_standard_signed(r, secret);
    let timestamp = r.header("stockd-timestamp");
    let sent: i64 = timestamp.parse().unwrap();
    assert!((now_secs() - sent).abs() < 300, "stale timestamp {sent}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("stockd-signature"), expected, "signature of {r:?}");
    // The library's receiver-side check agrees.
    signing::legacy::verify(
        secret.as_bytes(),
        timestamp,
        r.header("stockd-signature"),
        &r.body,
        now_secs(),
        300,
    )
    .unwrap_or_else(|e| panic!("bad signature ({e}) on {r:?}"));
    assert_eq!(r.header("content-type"), "application/json");
}

async fn decrement(app: &TestApp, sku: &str, quantity: i64) {
    app.decrement(&unique_namespace("dec"), vec![line(sku, "", quantity)])
        .await
        .expect("decrement");
}

async fn adjust(app: &TestApp, sku: &str, delta: i64) {
    app.adjust(&unique_namespace("adj"), sku, "", delta, "")
        .await
        .expect("adjust");
}

/// Runs a `stockctl` command line against the app; (exit code, stdout).
async fn stockctl(app: &TestApp, args: &[&str]) -> (i32, String) {
    let ran = crate::support::process::stockctl(app.addr, args).await;
    assert!(ran.code == 0, "stockctl {args:?}: {}", ran.stderr);
    (ran.code, ran.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transitions_arrive_signed_in_order_once_per_idempotency_key() {
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-secret",
        SERVER_SECRET,
        "--webhook-backoff-ms",
        "20",
        "--webhook-allow-networks",
        ALLOW_LOOPBACK,
    ]))
    .await;
    let receiver = Receiver::start(&[
        ("/own", Behaviour::FailFirstAttempt),
        ("/server", Behaviour::Ok),
    ])
    .await;
    // Every kind, own secret, this SKU only.
    let own = app
        .add_webhook(pb::AddWebhookRequest {
            url: receiver.url("/own"),
            events: vec![
                pb::WebhookEvent::OutOfStock.into(),
                pb::WebhookEvent::BackInStock.into(),
                pb::WebhookEvent::LowStock.into(),
            ],
            low_stock_threshold: 5,
            skus: vec!["mug".into()],
            secret: OWN_SECRET.into(),
        })
        .await
        .expect("add webhook");
    let own_id = own.webhook.as_ref().unwrap().id;
    assert!(own.generated_secret.is_empty());
    // out_of_stock of every SKU, signed with the server-wide secret.
    let server = app
        .add_webhook(webhook_request(
            &receiver.url("/server"),
            &[pb::WebhookEvent::OutOfStock],
        ))
        .await
        .expect("add webhook");
    assert_eq!(
        server.webhook.as_ref().unwrap().secret_source(),
        pb::WebhookSecretSource::Server
    );

    app.seed("mug", "", 10).await; // v1: created, no transition
    app.seed("other", "", 1).await;
    decrement(&app, "mug", 6).await; // v2: 10 -> 4, low_stock
    decrement(&app, "mug", 4).await; // v3: 4 -> 0, out_of_stock
    adjust(&app, "mug", 3).await; // v4: 0 -> 3, back_in_stock
    adjust(&app, "mug", 7).await; // v5: 3 -> 10, nothing
    app.reserve("hold-all", vec![line("mug", "", 10)], 600)
        .await
        .unwrap(); // v6: 10 -> 0, low_stock and out_of_stock
    app.release("hold-all").await.unwrap(); // v7: 0 -> 10, back_in_stock
    decrement(&app, "other", 1).await; // other v2: out_of_stock (server hook only)

    let expected = [
        (2, "low_stock"),
        (3, "out_of_stock"),
        (4, "back_in_stock"),
        (6, "low_stock"),
        (6, "out_of_stock"),
        (7, "back_in_stock"),
    ];
    let own_seen = eventually(DEADLINE, "every own delivery, retried once", || {
        let seen = receiver.seen("/own");
        async move {
            (seen.iter().filter(|r| r.status == 200).count() >= expected.len()).then_some(seen)
        }
    })
    .await;
    // Each transition twice (the first attempt answered 500), both with the
    // same key and body, and nothing else; one item's deliveries strictly in
    // version order: the next one only after the previous one succeeded.
    let keys: Vec<String> = own_seen.iter().map(Received::key).collect();
    let want_keys: Vec<String> = expected
        .iter()
        .flat_map(|(v, kind)| {
            let k = format!("mug/default/{v}/{kind}/{own_id}");
            [k.clone(), k]
        })
        .collect();
    assert_eq!(keys, want_keys);
    for pair in own_seen.chunks(2) {
        assert_eq!(pair[0].body, pair[1].body, "a retry sends the same body");
        assert_eq!(
            (pair[0].status, pair[1].status),
            (500, 200),
            "{:?}",
            pair[0].key()
        );
        assert_eq!(pair[0].header("stockd-attempt"), "1");
        assert_eq!(pair[1].header("stockd-attempt"), "2");
        assert_eq!(
            pair[0].header("stockd-delivery"),
            pair[1].header("stockd-delivery")
        );
    }
    for r in &own_seen {
        assert_signed(r, OWN_SECRET);
        let tampered = signing::legacy::verify(
            SERVER_SECRET.as_bytes(),
            r.header("stockd-timestamp"),
            r.header("stockd-signature"),
            &r.body,
            now_secs(),
            300,
        );
        assert!(tampered.is_err(), "signed with its own secret only");
    }
    // The payload.
    let v3 = own_seen[2].json();
    assert_eq!(v3["type"], "out_of_stock");
    assert_eq!(v3["id"], own_seen[2].key());
    assert_eq!(own_seen[2].header("stockd-event"), "out_of_stock");
    assert_eq!(
        (
            v3["sku"].as_str(),
            v3["location"].as_str(),
            v3["version"].as_i64(),
            v3["available"].as_i64(),
            v3["previous_available"].as_i64(),
            v3["op"].as_str(),
        ),
        (
            Some("mug"),
            Some("default"),
            Some(3),
            Some(0),
            Some(4),
            Some("decrement")
        )
    );
    assert_eq!(v3["subscription_id"].as_u64(), Some(own_id));
    let low = own_seen[0].json();
    assert_eq!(low["low_stock_threshold"], 5);
    let event = app
        .events()
        .await
        .into_iter()
        .find(|e| e.get("sku") == "mug" && e.get("ver") == "3")
        .unwrap();
    assert_eq!(v3["event_id"], event.id.as_str());
    assert_eq!(v3["partition"].as_u64(), Some(u64::from(event.partition)));
    assert_eq!(v3["occurred_at_ms"].as_i64(), Some(event.int("ts")));

    // The server-wide hook: mug v3, mug v6, other v2, once each.
    let server_seen = eventually(DEADLINE, "the server-secret deliveries", || {
        let seen = receiver.seen("/server");
        async move { (seen.len() >= 3).then_some(seen) }
    })
    .await;
    let mut items: Vec<(String, i64)> = server_seen
        .iter()
        .map(|r| {
            assert_signed(r, SERVER_SECRET);
            let j = r.json();
            (
                j["sku"].as_str().unwrap().to_owned(),
                j["version"].as_i64().unwrap(),
            )
        })
        .collect();
    items.sort();
    assert_eq!(
        items,
        [
            ("mug".to_owned(), 3),
            ("mug".to_owned(), 6),
            ("other".to_owned(), 2)
        ]
    );

    // Nothing is left to send, and the outbox holds one row per transition.
    let pool = app.postgres().await;
    eventually(DEADLINE, "9 deliveries recorded as delivered", || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT state, count(*) FROM webhook_deliveries GROUP BY state")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (rows == [("delivered".to_owned(), 9)]).then_some(())
        }
    })
    .await;
    let (_, listed) = stockctl(&app, &["--json", "webhook", "list"]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 2);
    assert_eq!(listed["webhooks"][0]["pending"], 0);
    assert!(
        !listed.to_string().contains(OWN_SECRET),
        "secrets are never listed"
    );
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_receiver_sends_deliveries_to_dead_letters_and_redeliver_works() {
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-max-attempts",
        "3",
        "--webhook-backoff-ms",
        "20",
        "--webhook-allow-networks",
        ALLOW_LOOPBACK,
    ]))
    .await;
    let receiver =
        Receiver::start(&[("/down", Behaviour::FailWhileSet), ("/up", Behaviour::Ok)]).await;
    // Through stockctl; without a secret the server generates one.
    let (_, added) = stockctl(
        &app,
        &[
            "--json",
            "webhook",
            "add",
            &receiver.url("/down"),
            "--events",
            "out_of_stock,back_in_stock",
        ],
    )
    .await;
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    let down_id = added["webhook"]["id"].as_u64().unwrap();
    let down_secret = added["generated_secret"].as_str().unwrap().to_owned();
    assert!(down_secret.starts_with("whsec_"), "{added}");
    let up = app
        .add_webhook(webhook_request(
            &receiver.url("/up"),
            &[pb::WebhookEvent::OutOfStock],
        ))
        .await
        .expect("add webhook");
    let up_secret = up.generated_secret.clone();

    app.seed("cup", "", 2).await;
    decrement(&app, "cup", 2).await; // v2: out_of_stock
    adjust(&app, "cup", 1).await; // v3: back_in_stock

    // The healthy subscription is served while the other one fails.
    let up_seen = eventually(DEADLINE, "the healthy endpoint's delivery", || {
        let seen = receiver.seen("/up");
        async move { (!seen.is_empty()).then_some(seen) }
    })
    .await;
    assert_eq!(
        up_seen[0].key(),
        format!("cup/default/2/out_of_stock/{}", up.webhook.unwrap().id)
    );
    assert_signed(&up_seen[0], &up_secret);

    // Three attempts of v2, then dead; only then v3 (in order), three
    // attempts, dead.
    let dead = eventually(DEADLINE, "two dead letters", || async {
        let r = app.webhook_dead_letters(down_id, 0).await.unwrap();
        (r.dead_letters.len() == 2).then_some(r.dead_letters)
    })
    .await;
    let down_seen = receiver.seen("/down");
    let keys: Vec<String> = down_seen.iter().map(Received::key).collect();
    let v2 = format!("cup/default/2/out_of_stock/{down_id}");
    let v3 = format!("cup/default/3/back_in_stock/{down_id}");
    assert_eq!(
        keys,
        [
            v2.clone(),
            v2.clone(),
            v2.clone(),
            v3.clone(),
            v3.clone(),
            v3.clone()
        ]
    );
    for r in &down_seen {
        assert_signed(r, &down_secret);
    }
    // Newest first.
    assert_eq!(dead[0].idempotency_key, v3);
    assert_eq!(dead[1].idempotency_key, v2);
    assert_eq!(dead[1].attempts, 3);
    assert!(dead[1].last_error.contains("500"), "{:?}", dead[1]);
    // The status line only: nothing of what the endpoint answered.
    assert_eq!(dead[1].last_error, "HTTP 500 Internal Server Error");
    assert_eq!(dead[1].url, receiver.url("/down"));

    let (_, table) = stockctl(&app, &["webhook", "dead-letters"]).await;
    assert!(table.contains("cup@default"), "{table}");
    let (_, listed) = stockctl(&app, &["--json", "webhook", "list"]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["webhooks"][0]["dead_letters"], 2);
    assert_eq!(listed["webhooks"][0]["pending"], 0);

    // The endpoint recovers; redeliver the older one by id, then the rest of
    // the subscription.
    receiver.failing.store(false, Ordering::SeqCst);
    let (_, out) = stockctl(
        &app,
        &["webhook", "redeliver", &dead[1].id.to_string(), "999999"],
    )
    .await;
    assert!(out.contains("requeued: 1"), "{out}");
    assert!(out.contains("not dead letters: 999999"), "{out}");
    let redelivered = eventually(DEADLINE, "the redelivery", || {
        let seen = receiver.seen("/down");
        async move { (seen.len() == 7).then_some(seen) }
    })
    .await;
    assert_eq!(redelivered[6].key(), v2, "the same idempotency key");
    assert_eq!(redelivered[6].status, 204);
    assert_eq!(redelivered[6].body, redelivered[0].body);
    assert_signed(&redelivered[6], &down_secret);

    stockctl(
        &app,
        &[
            "webhook",
            "redeliver",
            "--subscription",
            &down_id.to_string(),
        ],
    )
    .await;
    eventually(DEADLINE, "the second redelivery", || {
        let seen = receiver.seen("/down");
        let done = seen.len() == 8 && seen[7].key() == v3;
        async move { done.then_some(()) }
    })
    .await;
    let pool = app.postgres().await;
    eventually(DEADLINE, "both delivered", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 3).then_some(())
        }
    })
    .await;
    let (_, none) = stockctl(&app, &["webhook", "dead-letters"]).await;
    assert_eq!(none.trim(), "no dead letters");

    // Remove: the subscription and what it still had go.
    let (_, removed) = stockctl(&app, &["webhook", "remove", &down_id.to_string()]).await;
    assert!(
        removed.starts_with(&format!("removed webhook {down_id}")),
        "{removed}"
    );
    let status = app.remove_webhook(down_id).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_are_validated() {
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-allow-networks",
        ALLOW_LOOPBACK,
    ]))
    .await;
    let mut admin = app.admin.clone();
    let base = webhook_request("http://127.0.0.1:9/hook", &[pb::WebhookEvent::OutOfStock]);
    for (req, field) in [
        (
            pb::AddWebhookRequest {
                url: "ftp://shop.example/hook".into(),
                ..base.clone()
            },
            "url",
        ),
        (
            pb::AddWebhookRequest {
                events: vec![pb::WebhookEvent::Unspecified.into(), 99],
                ..base.clone()
            },
            "events[0]",
        ),
        (
            pb::AddWebhookRequest {
                events: vec![pb::WebhookEvent::LowStock.into()],
                ..base.clone()
            },
            "low_stock_threshold",
        ),
        (
            pb::AddWebhookRequest {
                secret: "short".into(),
                ..base.clone()
            },
            "secret",
        ),
        (
            pb::AddWebhookRequest {
                skus: vec!["bad sku".into()],
                ..base.clone()
            },
            "skus[0]",
        ),
    ] {
        let status = admin.add_webhook(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(status.message().contains(field), "{status:?}");
    }
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions")
        .fetch_one(&app.postgres().await)
        .await
        .unwrap();
    assert_eq!(none, 0, "nothing was stored");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_destinations_are_refused_unless_allowed() {
    // No allowlist: the defaults protect the deployment's own network.
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-max-attempts",
        "1",
        "--webhook-backoff-ms",
        "20",
    ]))
    .await;
    let receiver = Receiver::start(&[("/literal", Behaviour::Ok), ("/name", Behaviour::Ok)]).await;
    let port = receiver.base.rsplit(':').next().unwrap().to_owned();
    let by_name = format!("http://localhost:{port}/name");
    let mut admin = app.admin.clone();
    for (url, says) in [
        (receiver.url("/literal"), "127.0.0.1 is a loopback address"),
        // `localhost` resolves to 127.0.0.1 (and maybe ::1).
        (by_name.clone(), "localhost resolves to "),
        (format!("http://[::1]:{port}/"), "::1 is a loopback address"),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "169.254.169.254 is a link-local address",
        ),
        ("http://10.0.0.1/".into(), "10.0.0.1 is a private address"),
        (
            "https://192.168.1.1/".into(),
            "192.168.1.1 is a private address",
        ),
        (
            "http://100.64.0.1/".into(),
            "100.64.0.1 is a shared (CGNAT) address",
        ),
        ("http://[fd00::1]/".into(), "fd00::1 is a unique local"),
        (
            format!("http://0.0.0.0:{port}/"),
            "0.0.0.0 is the unspecified address",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "a form of 127.0.0.1, a loopback address",
        ),
        // Another spelling of 127.0.0.1.
        (
            format!("http://2130706433:{port}/"),
            "127.0.0.1 is a loopback",
        ),
    ] {
        let status = admin
            .add_webhook(webhook_request(&url, &[pb::WebhookEvent::OutOfStock]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            status.message().contains("url") && status.message().contains(says),
            "{url}: {status:?}"
        );
        assert!(
            status.message().contains("--webhook-allow-networks"),
            "says how to allow it: {status:?}"
        );
    }
    let pool = app.postgres().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing was stored");

    // Subscriptions that point inside anyway (added before this check, or
    // a name whose DNS answer changed since): every delivery is checked on
    // the addresses it would connect to, and never reaches the receiver.
    for path in ["/literal", "/name"] {
        let url = if path == "/name" {
            by_name.clone()
        } else {
            receiver.url(path)
        };
        sqlx::query(
            "INSERT INTO webhook_subscriptions (url, events, secret)
             VALUES ($1, ARRAY['out_of_stock'], $2)",
        )
        .bind(url)
        .bind(STANDARD_SECRET)
        .execute(&pool)
        .await
        .unwrap();
    }
    app.seed("jar", "", 1).await;
    decrement(&app, "jar", 1).await; // v2: out_of_stock to both
    let dead = eventually(DEADLINE, "both deliveries refused", || {
        let mut admin = app.admin.clone();
        async move {
            let r = admin
                .list_webhook_dead_letters(pb::ListWebhookDeadLettersRequest::default())
                .await
                .unwrap()
                .into_inner();
            (r.dead_letters.len() == 2).then_some(r.dead_letters)
        }
    })
    .await;
    for d in &dead {
        let expected = if d.url.contains("localhost") {
            "localhost resolves to "
        } else {
            "127.0.0.1 is a loopback address"
        };
        assert!(
            d.last_error.contains(expected) && d.last_error.contains("loopback"),
            "{d:?}"
        );
    }
    assert!(
        receiver.seen.lock().unwrap().is_empty(),
        "nothing reached the receiver"
    );
    pool.close().await;
    app.stop().await;
}

/// A private CA and a certificate for `localhost` it signs: (CA PEM, the
/// server's TLS acceptor).
fn private_ca_and_localhost_server() -> (String, TlsAcceptor) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "webhook receivers' private CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .unwrap();
    (ca_pem, TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_endpoints_get_standard_webhooks_through_a_private_ca() {
    let (ca_pem, tls) = private_ca_and_localhost_server();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_namespace("wh"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("receivers-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_file = ca_file.to_string_lossy();
    let app = spawn_app_with(Options::with_args(&[
        "--webhook-ca-file",
        &ca_file,
        "--webhook-allow-networks",
        ALLOW_LOOPBACK,
    ]))
    .await;
    let receiver = Receiver::start_tls(&[("/tls", Behaviour::Ok)], tls).await;
    let url = receiver.url("/tls");
    assert!(url.starts_with("https://localhost:"), "{url}");
    let added = app
        .add_webhook(pb::AddWebhookRequest {
            url: url.clone(),
            events: vec![pb::WebhookEvent::OutOfStock.into()],
            secret: STANDARD_SECRET.into(),
            ..Default::default()
        })
        .await
        .expect("add webhook");
    let id = added.webhook.unwrap().id;

    // A SKU with a dot and a non-ASCII letter: the webhook-id may hold
    // neither, the body keeps the SKU as it is.
    let sku = "tasse.é";
    app.seed(sku, "", 2).await;
    decrement(&app, sku, 2).await; // v2: out_of_stock
    let seen = eventually(DEADLINE, "the https delivery", || {
        let seen = receiver.seen("/tls");
        async move { (!seen.is_empty()).then_some(seen) }
    })
    .await;
    let r = &seen[0];
    assert_eq!(r.status, 200);
    assert_standard_signed(r, STANDARD_SECRET);
    assert_eq!(
        r.header("webhook-id"),
        format!("tasse%2E%C3%A9/default/2/out_of_stock/{id}")
    );
    let body = r.json();
    assert_eq!(body["sku"], sku);
    assert_eq!(body["id"], format!("{sku}/default/2/out_of_stock/{id}"));
    // The earlier scheme still comes along, keyed with the secret as given.
    signing::legacy::verify(
        STANDARD_SECRET.as_bytes(),
        r.header("stockd-timestamp"),
        r.header("stockd-signature"),
        &r.body,
        now_secs(),
        300,
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    app.stop().await;
}
