//! The stockd server: config, telemetry, then `app::run` until a signal.

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use stockd::{app, config::Config, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    telemetry::init(&config.log, config.log_format);
    tracing::info!(?config, "starting stockd");
    if let Err(err) = telemetry::install_metrics(&config.metrics_addr) {
        tracing::error!(addr = %config.metrics_addr, error = %err, "cannot serve metrics");
        return std::process::ExitCode::FAILURE;
    }

    let listener = match TcpListener::bind(config.grpc_addr).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(addr = %config.grpc_addr, error = %err, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    match app::run(config, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "stockd failed");
            eprintln!("stockd: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM start a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
