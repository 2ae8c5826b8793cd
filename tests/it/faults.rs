//! Faults: stockd against a Redis that goes away. The test owns that Redis
//! (a redis-server on a free local port) and stops it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stockd::pb;
use tonic::Code;

use crate::common::*;
use crate::reasons::{reason, retry_delay};

/// A redis-server of the test's own on a free local port, killed on drop.
/// Without persistence unless started with [`OwnRedis::start_persistent`],
/// whose snapshot (written only by an explicit `SAVE`) a restart loads.
pub struct OwnRedis {
    pub port: u16,
    child: Child,
    /// The directory of the snapshot, for a persistent one.
    dir: Option<std::path::PathBuf>,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_on(free_port(), None).await
    }

    /// One whose `SAVE` writes a snapshot that a restart comes back from:
    /// what a restart from an older RDB, an AOF `everysec` crash or a
    /// failover to a lagging replica look like to stockd.
    pub async fn start_persistent() -> Self {
        let port = free_port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("own-redis-{port}-{}", unique_namespace("dir")));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_on(port, Some(dir)).await
    }

    /// Stops it and starts a new, empty one on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join("dump.rdb"));
        }
        *self = Self::start_on(self.port, self.dir.take()).await;
    }

    /// `SHUTDOWN NOSAVE`, then a start from the last `SAVE`: every change
    /// made since that snapshot is gone from Redis.
    pub async fn restart_from_snapshot(&mut self) {
        assert!(self.dir.is_some(), "a persistent redis-server");
        let _: Result<(), _> = redis::cmd("SHUTDOWN")
            .arg("NOSAVE")
            .query_async(&mut self.connection().await)
            .await;
        let _ = self.child.wait();
        *self = Self::start_on(self.port, self.dir.take()).await;
    }

    /// A snapshot of what it holds now (`SAVE`).
    pub async fn save(&self) {
        let () = redis::cmd("SAVE")
            .query_async(&mut self.connection().await)
            .await
            .unwrap();
    }

    /// `CLIENT PAUSE ms ALL`: every client's commands wait that long.
    pub async fn pause(&self, ms: u64) {
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut self.connection().await)
            .await
            .unwrap();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn start_on(port: u16, dir: Option<std::path::PathBuf>) -> Self {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(dir) = &dir {
            cmd.arg("--dir").arg(dir);
        }
        let child = cmd
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
        Self { port, child, dir }
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
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a failed call may or may not have been applied: the client must
/// retry it with the same id until it gets a definite answer.
pub fn ambiguous(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Calls `call` until its answer is definite (what a client does after
/// UNAVAILABLE: the same request, same id, again), for `deadline` at most.
pub async fn definite<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = std::time::Instant::now();
    loop {
        match call().await {
            Err(status) if ambiguous(&status) => {
                assert!(
                    start.elapsed() < deadline,
                    "no definite answer to {what} within {deadline:?}: {status:?}"
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            answer => return answer,
        }
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
    app.stop_on_own_redis().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_turned_replica_is_unavailable_and_changes_nothing() {
    let redis = OwnRedis::start().await;
    let app = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    app.seed("ro", "", 5).await;
    let config = |name: &'static str, value: &'static str| {
        let redis = &redis;
        async move {
            let () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut redis.connection().await)
                .await
                .unwrap();
        }
    };
    let replica_of = |target: Vec<&'static str>| {
        let redis = &redis;
        async move {
            let () = redis::cmd("REPLICAOF")
                .arg(target)
                .query_async(&mut redis.connection().await)
                .await
                .unwrap();
        }
    };
    // A replica of a master that does not answer: it keeps its data,
    // refuses writes (READONLY), then, told not to serve stale data,
    // everything (MASTERDOWN).
    replica_of(vec!["127.0.0.1", "1"]).await;
    let before = app.stock_and_streams().await;
    let sale = |id: &str| pb::DecrementRequest {
        request_id: id.into(),
        lines: vec![line("ro", "", 1)],
    };
    let mut inv = app.inventory.clone();
    for (n, serve_stale) in ["yes", "no"].into_iter().enumerate() {
        config("replica-serve-stale-data", serve_stale).await;
        let status = inv.decrement(sale("ro-1")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "round {n}: {status:?}");
        assert_eq!(reason(&status), "REDIS_UNAVAILABLE");
    }
    config("replica-serve-stale-data", "yes").await;
    assert_eq!(app.stock_and_streams().await, before, "nothing changed");
    replica_of(vec!["NO", "ONE"]).await;
    let sold = definite(Duration::from_secs(10), "the sale", || {
        let mut inv = inv.clone();
        async move { inv.decrement(sale("ro-1")).await }
    })
    .await
    .unwrap()
    .into_inner();
    assert!(!sold.replayed);
    assert_eq!(sold.levels[0].available, 4);
    app.stop_on_own_redis().await;
}
