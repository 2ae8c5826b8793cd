//! The real binaries as child processes of a test: `stockd` started with a
//! namespace, database and instance id of the test's own, killed or stopped
//! by it; `stockctl` run once against a server.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::{Clients, POLL_INTERVAL, eventually, free_port, redis_cluster, redis_url};

/// A stockd process of the test's own.
pub struct Stockd {
    child: Child,
    pub addr: SocketAddr,
    pub log: std::path::PathBuf,
}

impl Stockd {
    pub async fn start(
        namespace: &str,
        database_url: &str,
        instance: &str,
        failpoint: bool,
    ) -> Self {
        Self::start_with(namespace, database_url, instance, failpoint, &[]).await
    }

    /// As `start`, with more command-line arguments.
    pub async fn start_with(
        namespace: &str,
        database_url: &str,
        instance: &str,
        failpoint: bool,
        extra: &[String],
    ) -> Self {
        let failpoint = failpoint.then_some("crash-after-commit");
        Self::start_failing(namespace, database_url, instance, failpoint, extra).await
    }

    /// As `start_with`, armed with the fail point `STOCKD_FAILPOINT` names
    /// (`crash-after-commit`, `export-crash-after-publish`, see
    /// src/failpoint.rs), if any.
    pub async fn start_failing(
        namespace: &str,
        database_url: &str,
        instance: &str,
        failpoint: Option<&str>,
        extra: &[String],
    ) -> Self {
        Self::start_on(
            (&redis_url(), redis_cluster()),
            namespace,
            database_url,
            instance,
            failpoint,
            extra,
        )
        .await
    }

    /// As `start_with`, on a standalone Redis of the test's own.
    pub async fn start_on_redis(
        redis_url: &str,
        namespace: &str,
        database_url: &str,
        instance: &str,
        extra: &[String],
    ) -> Self {
        Self::start_on(
            (redis_url, false),
            namespace,
            database_url,
            instance,
            None,
            extra,
        )
        .await
    }

    /// As `start_with`, on another Redis (`(url, is a cluster)`, e.g. a
    /// test's own cluster), with the fail point `failpoint` armed
    /// (`STOCKD_FAILPOINT`, see src/failpoint.rs).
    pub async fn start_on(
        (redis_url, cluster): (&str, bool),
        namespace: &str,
        database_url: &str,
        instance: &str,
        failpoint: Option<&str>,
        extra: &[String],
    ) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{namespace}-{instance}-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockd"));
        cmd.args(["--grpc-addr", &addr.to_string()])
            .args(["--namespace", namespace])
            .args(["--redis-url", redis_url])
            .args(["--database-url", database_url])
            .args(["--instance-id", instance])
            .args(["--flush-claim-idle-ms", "1000"])
            .args(["--flush-batch", "50"])
            .args(["--database-max-connections", "4"])
            .args(["--metrics-addr", ""])
            .args(cluster.then_some("--redis-cluster"))
            .args(["--http-addr", ""])
            .args(["--shutdown-drain-ms", "0"])
            .args(extra)
            .env("STOCKD_LOG", "info")
            .env_remove("STOCKD_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null());
        if let Some(point) = failpoint {
            cmd.env("STOCKD_FAILPOINT", point);
        }
        let mut child = cmd.spawn().expect("start stockd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "stockd exited while starting ({status}); log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
            {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                if health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "stockd did not start within 30 s"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Self { child, addr, log }
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    /// Typed clients of this process (see [`super::Rpc`]).
    pub fn clients(&self) -> Clients {
        Clients::new(self.channel())
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        eventually(deadline, "stockd to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    pub async fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(20)).await
    }

    /// Asks for a graceful shutdown without waiting for it.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Stockd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `stockctl` run printed and how it ended.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `stockctl --addr http://ADDR ARGS...`; see [`run_stockctl`].
pub async fn stockctl(addr: SocketAddr, args: &[&str]) -> Ran {
    let addr = format!("http://{addr}");
    run_stockctl(&[&["--addr", addr.as_str()], args].concat()).await
}

/// Runs `stockctl ARGS...` with none of stockctl's settings taken from this
/// process' environment.
pub async fn run_stockctl(args: &[&str]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stockctl"));
    command.args(args).stdin(Stdio::null());
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
