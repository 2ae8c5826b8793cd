//! The demo page (`GET /demo`) in a real headless Chromium, driven over
//! the DevTools protocol: it shows the stock, and a Reserve shows on the
//! page within a second.
//!
//! Chromium is Debian's (`/usr/bin/chromium`); scripts/test installs it,
//! and so does this test when it is missing and apt-get is there. Only on
//! a machine without apt-get is the test skipped, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::support::http_api::reserve;
use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser, installed when missing; `None` (with the reason printed)
/// only where it cannot be installed.
fn chromium() -> Option<PathBuf> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if Path::new(CHROMIUM).exists() {
        return Some(CHROMIUM.into());
    }
    let has_apt = std::process::Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_apt {
        eprintln!(
            "SKIPPED demo_browser: {CHROMIUM} is missing and this machine has no apt-get to install Debian's chromium"
        );
        return None;
    }
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "chromium"][..],
    ] {
        let output = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run apt-get");
        assert!(
            output.status.success(),
            "apt-get {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "apt-get installed no {CHROMIUM}"
    );
    Some(CHROMIUM.into())
}

/// A headless Chromium and one page of it, over the DevTools protocol.
struct Browser {
    child: Child,
    profile: PathBuf,
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next_id: u64,
}

impl Browser {
    async fn launch(binary: &Path) -> Browser {
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_namespace("chromium"));
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // Chromium says where its DevTools endpoint is on stderr.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("chromium starts within 30 s");
        // Keep draining stderr so that chromium never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to DevTools");
        let mut browser = Browser {
            child,
            profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// Sends one command (to the page once attached) and waits for its
    /// result, passing over the events that come meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            command["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools connection open")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// What the card of `sku` shows: (availability, available).
    async fn card(&mut self, sku: &str) -> (Value, Value) {
        let shown = self
            .eval(&format!(
                "(() => {{ const c = document.querySelector('[data-sku=\"{sku}\"]');
                   return c ? [c.dataset.availability, c.dataset.available ?? null] : null; }})()"
            ))
            .await;
        (shown[0].clone(), shown[1].clone())
    }

    async fn close(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_page_shows_stock_and_updates_within_a_second_of_a_reserve() {
    let Some(binary) = chromium() else {
        return;
    };
    let app = spawn_app().await;
    app.seed("D1", "", 10).await;
    app.seed("D2", "", 3).await;
    let mut browser = Browser::launch(&binary).await;
    browser
        .open(&format!("http://{}/demo?sku=D1&sku=D2", app.http_addr))
        .await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d1 = browser.card("D1").await;
        let d2 = browser.card("D2").await;
        if d1 == (json!("in_stock"), json!("10")) && d2 == (json!("low_stock"), json!("3")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show the stock: D1 {d1:?}, D2 {d2:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    assert_eq!(
        browser
            .eval("document.getElementById('status').textContent")
            .await,
        "live"
    );

    for (id, sku, quantity, expected) in [
        ("demo-1", "D1", 4, (json!("in_stock"), json!("6"))),
        ("demo-2", "D2", 3, (json!("out_of_stock"), json!("0"))),
    ] {
        let reserved_at = Instant::now();
        reserve(&app, id, sku, quantity).await;
        loop {
            let shown = browser.card(sku).await;
            if shown == expected {
                break;
            }
            assert!(
                reserved_at.elapsed() < Duration::from_secs(1),
                "{sku} not updated within a second of the Reserve: shows {shown:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        eprintln!(
            "demo page: {sku} updated {:?} after the Reserve",
            reserved_at.elapsed()
        );
    }
    browser.close().await;
    app.stop().await;
}
