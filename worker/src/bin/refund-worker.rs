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
        Err(e) => shared::telemetry::fail("refund-worker", "refund-worker failed", &e),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Listen before anything else: a SIGTERM during startup (a rollout that changes its mind,
    // a test) must mean a clean stop, not death by the signal's default action.
    let signals = worker::signals::Signals::listen()?;
    let config = shared::config::Config::load(args.config.as_deref())?;
    let registry = worker::app::build_registry(&config)?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signals.recv().await;
        trigger.cancel();
    });
    worker::app::run(config, registry, shutdown).await
}
