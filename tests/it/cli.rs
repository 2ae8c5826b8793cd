//! `stockctl`, the built binary, against a real stockd.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

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
