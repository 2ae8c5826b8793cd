//! A redis-server of the test's own, for the tests that stop, pause,
//! restart or roll back their Redis (never the shared one).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Options, eventually, free_port, unique_namespace};

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

    /// Options of a stockd on this Redis, with these command-line arguments.
    pub fn options(&self, args: &[&str]) -> Options {
        Options {
            redis_url: Some(self.url()),
            ..Options::with_args(args)
        }
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
