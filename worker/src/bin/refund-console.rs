//! `refund-console`: the operator web console; see `worker::console`.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// The operator web console: search, job timelines, dead letters and bulk replay, unknown
/// outcomes and approvals, reconciliation, live charts.
///
/// Reads configuration from --config (default ./refunds.toml if present), then REFUNDS__*
/// environment variables, like refund-worker. Listens on console.addr; signs operators in from
/// console.operators_file (or a trusted proxy's console.proxy_header). SIGTERM or Ctrl-C: stop.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
        refund-console --config refunds.toml\n  \
        REFUNDS__CONSOLE__ADDR=0.0.0.0:9470 refund-console --config refunds.toml\n  \
        echo -n 'a long passphrase' | refund-console hash-password\n\n\
        The operators file (console.operators_file):\n  \
        [[operators]]\n  \
        name = \"alice\"\n  \
        role = \"operator\"        # viewer | operator | approver\n  \
        password_hash = \"$argon2id$v=19$...\"   # from hash-password"
)]
struct Args {
    /// Configuration file (TOML); the same file the worker reads.
    #[arg(long, global = true, env = "REFUNDS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the console (what runs without a subcommand).
    Serve,
    /// Read a password from stdin (one line) and print its argon2id hash for the operators
    /// file.
    HashPassword,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    shared::telemetry::init();
    let result = match args.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(args.config).await,
        Command::HashPassword => hash_password(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => shared::telemetry::fail("refund-console", "refund-console failed", &e),
    }
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let signals = worker::signals::Signals::listen()?;
    let config = shared::config::Config::load(config.as_deref())?;
    let console = Arc::new(worker::console::Console::connect(config).await?);
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signals.recv().await;
        trigger.cancel();
    });
    worker::console::serve(console, shutdown).await
}

fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("no password on stdin");
    }
    println!("{}", worker::console::auth::hash_password(password)?);
    Ok(())
}
