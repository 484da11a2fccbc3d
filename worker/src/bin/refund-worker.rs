//! `refund-worker`: see the `worker` library for what it does.

use std::path::PathBuf;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Consumes refund requests from RabbitMQ and pays each at most once through its provider.
///
/// Reads configuration from --config (default ./refunds.toml if present), then REFUNDS__*
/// environment variables (REFUNDS__WORKER__CONCURRENCY=32 sets worker.concurrency). Serves
/// /metrics, /healthz and /readyz on worker.metrics_addr. SIGTERM or Ctrl-C: stop consuming,
/// finish in-flight refunds, exit.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "REFUNDS_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    shared::telemetry::init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "refund-worker failed");
            eprintln!("refund-worker: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = shared::config::Config::load(args.config.as_deref())?;
    let registry = worker::app::build_registry(&config)?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    worker::app::run(config, registry, shutdown).await
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
