//! The command line of `refund-reconciler`: `run` for one day, `schedule` for the cron loop.
//!
//! Exit status (DESIGN §7): 0 balanced, 1 discrepancies found, 2 could not run (usage, config,
//! statement, database). Usage errors exit 2 through clap. `run` writes its report to stdout
//! (or `--out`), a one-line summary and any warnings to stderr (JSON log lines, level from
//! `RUST_LOG`, default `warn`), and a progress bar on stderr when it is a terminal. `schedule`
//! logs JSON lines on stdout like the other services (default level `info`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand};
use shared::config::Config;
use sqlx::Connection;

use crate::progress::Progress;
use crate::report::Format;
use crate::run::{RunRequest, Status};

/// Reconciles settlementRefundFee totals of the providers against the ledger, per provider,
/// merchant and business date.
///
/// Configuration comes from --config (default ./refunds.toml if present), then REFUNDS__*
/// environment variables (REFUNDS__RECONCILER__GRACE_MINUTES=10 sets reconciler.grace_minutes).
/// Keys used: database_url, timezone, database.*, reconciler.schedule,
/// reconciler.grace_minutes.
///
/// Exit status: 0 balanced, 1 discrepancies found, 2 could not run.
#[derive(Debug, Parser)]
#[command(name = "refund-reconciler", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
    Schedule(ScheduleArgs),
}

/// Reconciles one business date, stores the run (superseding earlier runs of the date) and
/// prints the report.
///
/// Per provider and merchant it compares the ledger's settlement_refund_fee total of the date
/// with the provider's, then lists every refund that differs: amount_mismatch,
/// missing_at_provider, missing_in_ledger, duplicate_at_provider, and pending (one side only,
/// within reconciler.grace_minutes of midnight, and the other side has it across midnight or
/// is not in yet). Pending refunds alone leave the day balanced.
///
/// The provider side is the --statement files (CSV: provider,merchant,refund_no,
/// provider_refund_id,refund_fee,settlement_refund_fee,refunded_at; rows are dated by
/// refunded_at in the configured time zone, rows of other dates are ignored except near
/// midnight), or, without --statement, the results the providers returned to our calls.
///
/// Each discrepancy names its refund: `refundctl job show REFUND_NO` shows why.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    refund-reconciler run --date 2026-11-21\n  \
    refund-reconciler run --date 2026-11-21 --provider shengpay \\\n      \
    --statement shengpay-2026-11-21.csv --statement shengpay-2026-11-22.csv --format json --out report.json\n\n\
    Exit status: 0 balanced, 1 discrepancies found, 2 could not run.")]
pub struct RunArgs {
    /// The business date to reconcile, in the configured time zone.
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = parse_date)]
    pub date: NaiveDate,
    /// Reconcile only this provider.
    #[arg(long, value_name = "PROVIDER", value_parser = ["shengpay", "wupay"])]
    pub provider: Option<String>,
    /// A provider statement CSV; repeat for several files (e.g. the next day's statement too,
    /// to settle refunds paid across midnight).
    #[arg(long = "statement", value_name = "FILE")]
    pub statements: Vec<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "REFUNDS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Compare every refund one by one instead of only where the per-merchant fingerprints
    /// differ (slower; same answer).
    #[arg(long)]
    pub exhaustive: bool,
}

/// Runs `run` for the previous business day on the cron expression reconciler.schedule, in the
/// configured time zone, against the provider results recorded per attempt; logs each run and
/// its outcome. Stops on SIGTERM or Ctrl-C. (In Kubernetes, the CronJob runs `run` instead.)
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "REFUNDS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

fn parse_date(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| d.format("%Y-%m-%d").to_string() == s)
        .ok_or_else(|| format!("{s:?} is not a date like 2026-11-21"))
}

/// Parses the command line and runs it; the process's exit status.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_stderr_logging();
            match run_command(args).await {
                Ok(Status::Balanced) => ExitCode::SUCCESS,
                Ok(Status::Discrepancies) => ExitCode::from(1),
                Err(e) => {
                    shared::telemetry::fail("refund-reconciler", "refund-reconciler run failed", &e)
                }
            }
        }
        Command::Schedule(args) => {
            shared::telemetry::init();
            match schedule_command(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => shared::telemetry::fail(
                    "refund-reconciler",
                    "refund-reconciler schedule failed",
                    &e,
                ),
            }
        }
    }
}

/// JSON log lines on stderr: stdout carries the report.
fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // sqlx's own slow-statement warnings are noise here: a nightly run's queries are slow
        // by nature; the run logs its own step timings at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run_command(args: RunArgs) -> anyhow::Result<Status> {
    let config = Config::load(args.config.as_deref())?;
    for s in &args.statements {
        if !s.is_file() {
            anyhow::bail!("--statement {}: no such file", s.display());
        }
    }
    let (pool, conns) = crate::run::open(&config).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot use the database at {}: {e}",
            config.database_url_redacted()
        )
    })?;
    let request = RunRequest {
        date: args.date,
        provider: args.provider,
        statements: args.statements,
        exhaustive: args.exhaustive,
        as_of: None,
    };
    let (outcome, mut conn) =
        crate::run::run_on(conns, &pool, &config, &request, &Progress::for_stderr()).await?;
    match &args.out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("--out {}: {e}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            crate::report::write(&mut conn, outcome.run_id, args.format, &mut w).await?;
            w.flush()?;
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            crate::report::write(&mut conn, outcome.run_id, args.format, &mut w).await?;
            w.flush()?;
        }
    }
    let _ = conn.close().await;
    eprintln!(
        "refund-reconciler: {} {}: {} discrepancies, {} pending (run {}{})",
        outcome.date,
        outcome.status.as_str(),
        outcome.discrepancies,
        outcome.pending,
        outcome.run_id,
        if outcome.superseded.is_empty() {
            String::new()
        } else {
            format!(
                ", supersedes {}",
                outcome
                    .superseded
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(outcome.status)
}

async fn schedule_command(args: ScheduleArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let pool = crate::run::connect(&config).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot use the database at {}: {e}",
            config.database_url_redacted()
        )
    })?;
    crate::schedule::run_schedule(config, pool, wait_for_signal()).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the schedule");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
