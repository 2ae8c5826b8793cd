//! Faults: stockd against a Redis that goes away. The test owns that Redis
//! (a redis-server on a free local port) and stops it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stockd::pb;
use tonic::Code;

use crate::common::*;
use crate::reasons::{reason, retry_delay};

/// A throwaway redis-server without persistence, killed on drop.
pub struct OwnRedis {
    pub port: u16,
    child: Child,
}

impl OwnRedis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    /// Stops it and starts a new, empty one on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        *self = Self::start_on(self.port).await;
    }

    async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/dev-services installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(10),
            "own redis-server to answer",
            || {
                let url = url.clone();
                async move {
                    let client = redis::Client::open(url).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                }
            },
        )
        .await;
        Self { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_is_unavailable() {
    let mut redis = OwnRedis::start().await;
    let app = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        extra_args: vec!["--redis-timeout-ms".into(), "500".into()],
        ..Options::default()
    })
    .await;
    app.seed("sku", "", 3).await;
    redis.kill();

    let mut inv = app.inventory.clone();
    let status = inv
        .reserve(pb::ReserveRequest {
            reservation_id: "r".into(),
            lines: vec![line("sku", "", 1)],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "REDIS_UNAVAILABLE");
    assert!(retry_delay(&status).is_some(), "worth retrying: {status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "no infrastructure detail leaks: {status:?}"
    );
    let status = inv
        .get_stock(pb::GetStockRequest {
            items: vec![pb::ItemRef {
                sku: "sku".into(),
                location: String::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    app.stop_keep_data().await;
}
