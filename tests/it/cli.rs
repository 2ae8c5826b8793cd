//! `stockctl`, the built binary, against a real stockd.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use prost::Message;
use stockd::pb;

use crate::common::*;

/// What one `stockctl` run printed and how it ended.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `stockctl --addr http://ADDR ARGS...` with none of stockctl's
/// settings taken from this process' environment.
pub async fn stockctl(addr: SocketAddr, args: &[&str]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stockctl"));
    command
        .args(["--addr", &format!("http://{addr}")])
        .args(args)
        .stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STOCKD_") {
            command.env_remove(name);
        }
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("stockctl runner")
        .expect("stockctl runs");
    Ran {
        code: output.status.code().expect("stockctl exited"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Forty subscriptions of 1,000 long SKUs each: more than the 4 MiB a gRPC
/// client accepts in one message, so ListWebhooks must page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_list_pages_past_the_message_limit() {
    // Never delivered to (no stock changes), but loopback must be allowed.
    let app = spawn_app_with(Options {
        extra_args: vec!["--webhook-allow-networks".into(), "127.0.0.0/8".into()],
        ..Options::default()
    })
    .await;
    let mut admin = app.admin.clone();
    let mut added = Vec::new();
    for n in 0..40 {
        let skus = (0..1_000)
            .map(|i| format!("{n:02}-{i:04}-{}", "x".repeat(120)))
            .collect();
        let webhook = admin
            .add_webhook(pb::AddWebhookRequest {
                url: format!("http://127.0.0.1:9/hook-{n}"),
                events: vec![pb::WebhookEvent::OutOfStock.into()],
                skus,
                secret: "0123456789abcdef".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
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
        let page = admin
            .list_webhooks(pb::ListWebhooksRequest {
                page_size: 100,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
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

    let small = admin
        .list_webhooks(pb::ListWebhooksRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.webhooks.len(), 3);
    assert_eq!(small.next_page_token, ids[2].to_string());

    let status = admin
        .list_webhooks(pb::ListWebhooksRequest {
            page_size: 0,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(crate::reasons::reason(&status), "INVALID_ARGUMENT");

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
