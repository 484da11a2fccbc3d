//! The command line of `refund-reconciler`: `run` for one day, `schedule` for the cron loop,
//! `runs` to list what was run.
//!
//! Exit status (DESIGN §7): 0 balanced, 1 discrepancies found or nothing to reconcile (a day
//! with nothing on either side is not balanced), 2 could not run (usage, config, statement,
//! database). Usage errors exit 2 through clap. `run` writes its report to stdout
//! (or `--out`), a one-line summary and any warnings to stderr as plain lines (`refund-reconciler:
//! warning: ...`; level from `RUST_LOG`, default `warn`), and a progress bar on stderr when it
//! is a terminal. `schedule` logs JSON lines on stdout like the other services (default level
//! `info`).

use std::io::Write;
use std::path::{Path, PathBuf};
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
/// Keys used: database_url, timezone, database.*, http.*, reconciler.schedule,
/// reconciler.grace_minutes, reconciler.statements.* (where each provider's statement of a day
/// appears: a file path or an https:// URL template with {date}, {provider}, {merchant}),
/// reconciler.statement_wait_attempts, reconciler.statement_wait_interval_secs,
/// reconciler.max_statement_bytes, and [[shengpay.merchants]] / [[wupay.merchants]] (merchant
/// only, to fill in {merchant}).
///
/// Exit status: 0 balanced, 1 discrepancies found, 2 could not run. A day with nothing on
/// either side is not balanced: "nothing to reconcile", exit status 1.
#[derive(Debug, Parser)]
#[command(
    name = "refund-reconciler",
    version,
    after_help = "Examples:\n  \
        refund-reconciler --config refunds.toml run --date yesterday\n  \
        refund-reconciler run --date 2026-11-21 --statement shengpay.csv --statement wupay.csv\n  \
        refund-reconciler runs --date yesterday"
)]
pub struct Cli {
    /// Configuration file (TOML), before or after the subcommand.
    #[arg(long, global = true, env = "REFUNDS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
    Schedule(ScheduleArgs),
    Runs(RunsArgs),
}

/// A business date on the command line: `YYYY-MM-DD`, `yesterday` or `today` (in the
/// configured time zone, known once the configuration is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateArg {
    Day(NaiveDate),
    Yesterday,
    Today,
}

impl DateArg {
    /// The date this names, `now` in `tz`.
    pub fn resolve(self, tz: chrono_tz::Tz, now: chrono::DateTime<chrono::Utc>) -> NaiveDate {
        let today = now.with_timezone(&tz).date_naive();
        match self {
            DateArg::Day(d) => d,
            DateArg::Today => today,
            DateArg::Yesterday => today.pred_opt().unwrap_or(today),
        }
    }
}

/// Reconciles one business date, stores the run (superseding earlier runs of the date) and
/// prints the report.
///
/// Per provider and merchant it compares the ledger's settlement_refund_fee total of the date
/// with the provider's, then lists every refund that differs: amount_mismatch,
/// missing_at_provider, missing_in_ledger, duplicate_at_provider, invalid_at_provider (a
/// statement row whose settlement is above its refund), statement_missing (a provider, or a
/// merchant, with no statement of the date), and pending (one side only, within
/// reconciler.grace_minutes of midnight, and the other side has it across midnight or is not
/// in yet). Pending refunds alone leave the day balanced.
///
/// The provider side, in this order: the --statement files (CSV: provider,merchant,refund_no,
/// provider_refund_id,refund_fee,settlement_refund_fee,refunded_at; rows are dated by
/// refunded_at in the configured time zone, rows of other dates are ignored except near
/// midnight); else, when [reconciler.statements] is configured, the day's statements fetched
/// from there (a file path or URL per provider; --wait waits for them, a statement still not
/// there is statement_missing); else, or with --from-attempts, the results the providers
/// returned to our own calls, which is not an independent comparison (the report says so).
///
/// Each discrepancy names its refund: `refundctl job show REFUND_NO` shows why.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    refund-reconciler run --date yesterday\n  \
    refund-reconciler run --date 2026-11-21 --wait --format json     # fetch [reconciler.statements], wait for them\n  \
    refund-reconciler run --date 2026-11-21 --provider shengpay \\\n      \
    --statement shengpay-2026-11-21.csv --statement shengpay-2026-11-22.csv --format json --out report.json\n  \
    refund-reconciler run --date 2026-11-21 --from-attempts          # against our own recorded answers\n\n\
    Exit status: 0 balanced, 1 discrepancies found (a statement still missing included), 2 could not run.")]
pub struct RunArgs {
    /// The business date to reconcile, in the configured time zone: YYYY-MM-DD, yesterday or
    /// today.
    #[arg(long, value_name = "YYYY-MM-DD|yesterday|today", value_parser = parse_date)]
    pub date: DateArg,
    /// Reconcile only this provider.
    #[arg(long, value_name = "PROVIDER", value_parser = ["shengpay", "wupay"])]
    pub provider: Option<String>,
    /// A provider statement CSV; repeat for several files (e.g. the next day's statement too,
    /// to settle refunds paid across midnight). Given, [reconciler.statements] is not fetched.
    #[arg(
        long = "statement",
        value_name = "FILE",
        conflicts_with = "from_attempts"
    )]
    pub statements: Vec<PathBuf>,
    /// Compare against the provider results recorded per attempt even when
    /// [reconciler.statements] is configured (not an independent comparison).
    #[arg(long)]
    pub from_attempts: bool,
    /// Wait for the configured statements of the date: look up to
    /// reconciler.statement_wait_attempts times, reconciler.statement_wait_interval_secs
    /// apart, then reconcile (a statement still missing is statement_missing: exit 1).
    #[arg(long, conflicts_with_all = ["from_attempts", "statements"])]
    pub wait: bool,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Compare every refund one by one instead of only where the per-merchant fingerprints
    /// differ (slower; same answer).
    #[arg(long)]
    pub exhaustive: bool,
}

/// Runs `run` for the previous business day on the cron expression reconciler.schedule, in the
/// configured time zone; logs each run and its outcome. With [reconciler.statements]
/// configured it fetches the day's statements first, waiting for them (up to
/// reconciler.statement_wait_attempts looks, reconciler.statement_wait_interval_secs apart,
/// each logged), and reconciles against them; a statement still missing is statement_missing,
/// so the day is not balanced. Without, it compares against the provider results recorded per
/// attempt. Stops on SIGTERM or Ctrl-C. (In Kubernetes, the CronJob runs `run --wait`.)
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    refund-reconciler schedule --config refunds.toml\n  \
    REFUNDS__RECONCILER__SCHEDULE='0 30 2 * * *' refund-reconciler schedule")]
pub struct ScheduleArgs {}

/// Lists stored runs, newest first: id, date, scope, source (statement, or attempts: our own
/// recorded answers), status, discrepancies, pending, totals, and the run that superseded it.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    refund-reconciler runs\n  \
    refund-reconciler runs --date yesterday --format json")]
pub struct RunsArgs {
    /// Only runs of this business date: YYYY-MM-DD, yesterday or today.
    #[arg(long, value_name = "YYYY-MM-DD|yesterday|today", value_parser = parse_date)]
    pub date: Option<DateArg>,
    /// At most this many runs.
    #[arg(long, default_value_t = 30)]
    pub limit: i64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::runs::RunsFormat::Text)]
    pub format: crate::runs::RunsFormat,
}

fn parse_date(s: &str) -> Result<DateArg, String> {
    match s {
        "yesterday" => return Ok(DateArg::Yesterday),
        "today" => return Ok(DateArg::Today),
        _ => {}
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| d.format("%Y-%m-%d").to_string() == s)
        .map(DateArg::Day)
        .ok_or_else(|| format!("{s:?} is not a date like 2026-11-21, nor yesterday or today"))
}

/// Parses the command line and runs it; the process's exit status.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_stderr_logging();
            match run_command(args, cli.config.as_deref()).await {
                Ok(Status::Balanced) => ExitCode::SUCCESS,
                // Nothing compared is not balanced: someone should look (wrong database?).
                Ok(Status::Discrepancies | Status::NothingToReconcile) => ExitCode::from(1),
                Err(e) => {
                    shared::telemetry::fail("refund-reconciler", "refund-reconciler run failed", &e)
                }
            }
        }
        Command::Runs(args) => {
            init_stderr_logging();
            match crate::runs::runs_command(args, cli.config.as_deref()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => shared::telemetry::fail(
                    "refund-reconciler",
                    "refund-reconciler runs failed",
                    &e,
                ),
            }
        }
        Command::Schedule(args) => {
            shared::telemetry::init();
            match schedule_command(args, cli.config.as_deref()).await {
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

/// Plain lines on stderr (`refund-reconciler: warning: ...`): stdout carries the report, and
/// a person reads what goes beside it.
fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // sqlx's own slow-statement warnings are noise here: a nightly run's queries are slow
        // by nature; the run logs its own step timings at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    let _ = tracing_subscriber::fmt()
        .event_format(crate::plain::Plain)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run_command(args: RunArgs, config: Option<&Path>) -> anyhow::Result<Status> {
    let config = Config::load(config)?;
    for s in &args.statements {
        if !s.is_file() {
            anyhow::bail!("--statement {}: no such file", s.display());
        }
    }
    let date = args.date.resolve(config.tz()?, chrono::Utc::now());
    let mut request = RunRequest::new(date);
    request.provider = args.provider;
    request.statements = args.statements;
    request.exhaustive = args.exhaustive;
    // Kept until the run is stored: it owns the downloaded statements.
    let _fetcher = if request.statements.is_empty() && !args.from_attempts {
        crate::fetch::prepare(&config, &mut request, args.wait).await?
    } else {
        None
    };
    if args.wait && !request.against_statements() {
        // A scheduled run that means to compare against statements must not quietly compare
        // against our own answers because the configuration lost them.
        anyhow::bail!(
            "--wait: [reconciler.statements] names no statement{}: nothing to wait for; \
             configure it, or run with --from-attempts",
            request
                .provider
                .as_deref()
                .map(|p| format!(" of {p}"))
                .unwrap_or_default()
        );
    }
    let (pool, conns) = crate::run::open(&config).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot use the database at {}: {e}",
            config.database_url_redacted()
        )
    })?;
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
    let kept = if outcome.kept_current.is_empty() {
        String::new()
    } else {
        format!(
            "; not the day's result: run {} against statements stays",
            outcome
                .kept_current
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    eprintln!(
        "refund-reconciler: {} {}: {} discrepancies, {} pending (run {}{}){kept}",
        outcome.date,
        outcome.status.as_str().replace('_', " "),
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
    if !request.against_statements() {
        eprintln!(
            "refund-reconciler: note: compared against the provider results we recorded per \
             attempt: not an independent comparison (only a run against the providers' \
             statements is)"
        );
    }
    if !request.missing.is_empty() {
        eprintln!(
            "refund-reconciler: {} configured statement{} of {} not there: the day is not balanced",
            request.missing.len(),
            if request.missing.len() == 1 { "" } else { "s" },
            outcome.date
        );
    }
    let r = &outcome.repairs;
    for (what, list) in [
        ("unknown outcome booked as paid per statement", &r.paid),
        (
            "unknown outcome marked not paid per statement (replay may resend it)",
            &r.not_paid,
        ),
    ] {
        for j in list {
            eprintln!(
                "refund-reconciler: {}: {what}; evidence {}",
                j.refund_no, j.evidence
            );
        }
    }
    if !r.absent.is_empty() {
        eprintln!(
            "refund-reconciler: {} unknown outcomes absent from the statement of {} \
             (not paid once absent on every needed day)",
            r.absent.len(),
            outcome.date
        );
    }
    Ok(outcome.status)
}

async fn schedule_command(_args: ScheduleArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config)?;
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
