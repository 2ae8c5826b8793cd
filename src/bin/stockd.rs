//! The stockd server: config, telemetry, then the application until a signal.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use stockd::app::Application;
use stockd::config::Config;
use stockd::telemetry;

/// mimalloc rather than glibc's malloc: under load glibc's allocator took
/// about a quarter of stockd's CPU (consolidating and unlinking chunks freed
/// on another thread); see docs/benchmarks.md, "Profile".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    telemetry::init(&config.logging.log, config.logging.log_format);
    tracing::info!(?config, "starting stockd");
    if let Err(err) = telemetry::install_metrics(&config.server.metrics_addr) {
        tracing::error!(addr = %config.server.metrics_addr, error = %err, "cannot serve metrics");
        return std::process::ExitCode::FAILURE;
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let started = match Application::build(config).await {
        Ok(app) => app.run_until_stopped(shutdown).await,
        Err(err) => Err(err),
    };
    match started {
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
