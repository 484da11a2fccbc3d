//! `refundctl`, the operator CLI (DESIGN §8): what is dead and why, safe audited replay, manual
//! resolution and corrections (approved by a second operator), reconciliation cases, a job's
//! whole timeline, enqueueing requests from a file, and counts.
//!
//! The binary is a thin shell: it parses [`Cli`] and calls [`main`]. Every command is an async
//! function over a [`Ctl`] (configuration, pool, which merchants are idempotent) that writes its
//! per-item results to a `Write` and returns a report, so tests drive the same code in-process
//! and look at both. Progress bars go to stderr, and only when stderr is a terminal.
//!
//! Nothing here re-implements a state check: replay and resolution go through
//! [`shared::store::jobs::replay`] and [`shared::store::jobs::resolve`], which lock the job's row,
//! re-check its state and write the audit row in the caller's transaction.
//!
//! Exit status: 0 done, 1 some items refused or not found, 2 could not run (usage, config,
//! database or broker unreachable).

pub mod approvals;
pub mod case;
pub mod discard;
pub mod dlq;
pub mod enqueue;
pub mod job;
pub mod publish;
pub mod render;
pub mod stats;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shared::config::Config;
use shared::provider::Registry;
use sqlx::PgPool;

/// How a command ended, when it could run at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything asked for was done: exit 0.
    Done,
    /// Some items were refused, invalid or not found: exit 1.
    Incomplete,
}

impl Status {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Status::Done => 0,
            Status::Incomplete => 1,
        }
    }

    /// `Incomplete` when `ok` is false.
    pub fn from_ok(ok: bool) -> Self {
        if ok { Status::Done } else { Status::Incomplete }
    }
}

/// Where a command writes its results (stdout in the binary, a buffer in tests).
pub type Out = dyn Write + Send;

/// Exit code when a command could not run.
pub const EXIT_COULD_NOT_RUN: u8 = 2;

/// Exit code when stdout was closed under a command (128 + SIGPIPE, what a shell reports for
/// a filter the signal ended).
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Whether the error is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| {
                c.downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            })
            == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// Operator CLI of the refund processor: dead letters, safe replay, manual resolution, job
/// timelines.
///
/// Reads configuration from --config (default ./refunds.toml if present), then REFUNDS__*
/// environment variables, like refund-worker.
#[derive(Debug, Parser)]
#[command(
    name = "refundctl",
    version,
    after_help = "Examples:\n  \
        refundctl --config refunds.toml stats\n  \
        refundctl dlq list --since 2h\n  \
        refundctl dlq replay --cause retries_exhausted --dry-run\n  \
        refundctl job show R2026112100000001\n\n\
        Exit status: 0 done, 1 some items refused, invalid or not found, 2 could not run \
        (usage, configuration, database or broker), 141 stdout closed (| head)."
)]
pub struct Cli {
    /// Configuration file (TOML); the same file the worker reads.
    #[arg(long, global = true, env = "REFUNDS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish v1 refund requests from a JSON-lines file, with publisher confirms.
    ///
    /// Each line is validated as the worker's intake would (DESIGN §3), its merchant checked
    /// against this config's; invalid lines are reported with their line number and the field
    /// at fault and are not published. Running
    /// it twice is safe: the worker recognises a repeated refund_no with the same content as a
    /// duplicate.
    Enqueue(enqueue::EnqueueArgs),
    /// Look at one job, settle a dead one by hand, or correct a final one's booking.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Four-eyes: resolutions and corrections waiting for a second operator.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Reconciliation cases: one per discrepancy, open until explained or corrected.
    #[command(subcommand)]
    Case(case::CaseCommand),
    /// The dead-letter set: dead jobs and poison messages.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Jobs by state, the oldest non-final job, and the dead-letter depth.
    Stats(stats::StatsArgs),
    /// Apply the database migrations embedded in this binary.
    #[command(after_help = "Examples:\n  refundctl migrate\n  \
        REFUNDS__DATABASE_URL=postgres://owner@db/refunds refundctl migrate")]
    Migrate,
}

/// Who does an audited action, and why. Both are required and stored in `operator_audit`.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Who you are (stored in the audit row; default: the operating-system user).
    #[arg(long, value_name = "WHO", value_parser = non_empty, default_value_t = os_user())]
    pub operator: String,
    /// Why you do it: ticket, provider confirmation, ... (stored in the audit row).
    #[arg(long, value_name = "WHY", value_parser = non_empty)]
    pub note: String,
}

impl OperatorArgs {
    pub fn as_operator(&self) -> shared::store::jobs::Operator<'_> {
        shared::store::jobs::Operator {
            name: &self.operator,
            note: &self.note,
        }
    }
}

/// Who does an action a dry run can preview: `--operator` (default: the operating-system
/// user) and `--note` are needed unless `--dry-run`, which changes and audits nothing.
#[derive(Debug, Clone, Default, Args)]
pub struct AuditedUnlessDryRun {
    /// Who you are (stored in the audit row; default: the operating-system user; not needed
    /// with --dry-run).
    #[arg(long, value_name = "WHO", value_parser = non_empty)]
    pub operator: Option<String>,
    /// Why you do it: ticket, provider confirmation, ... (stored in the audit row; not needed
    /// with --dry-run).
    #[arg(long, value_name = "WHY", value_parser = non_empty, required_unless_present = "dry_run")]
    pub note: Option<String>,
}

impl AuditedUnlessDryRun {
    /// Both named, for a real run.
    pub fn new(operator: &str, note: &str) -> Self {
        Self {
            operator: Some(operator.to_owned()),
            note: Some(note.to_owned()),
        }
    }

    /// The operator and note of a real run: `--operator` or the operating-system user, and
    /// `--note`.
    pub fn resolve(&self) -> anyhow::Result<OperatorArgs> {
        let operator = match &self.operator {
            Some(o) => o.clone(),
            None => {
                let user = os_user();
                if user.is_empty() {
                    anyhow::bail!(
                        "--operator is required: the environment names no operating-system \
                         user ($USER) to default to"
                    );
                }
                user
            }
        };
        let note = self
            .note
            .clone()
            .context("--note is required unless --dry-run")?;
        Ok(OperatorArgs { operator, note })
    }
}

/// The operating-system user running refundctl: `--operator`'s default (DESIGN §8). Empty
/// when the environment names none, which `non_empty` then refuses, so `--operator` is needed.
pub(crate) fn os_user() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_default()
}

pub(crate) fn non_empty(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(t.to_owned())
}

/// Whether each (provider, merchant) deduplicates on `refund_no`, as this config says: what
/// `refundctl migrate` records on jobs from before idempotence was recorded at intake. Replay
/// reads the job's own record, never this.
#[derive(Debug, Clone, Default)]
pub struct Idempotency {
    merchants: HashMap<(String, String), bool>,
}

impl Idempotency {
    /// From the provider clients, as the worker sees them.
    pub fn from_registry(registry: &Registry) -> Self {
        let merchants = registry
            .merchants()
            .filter_map(|(kind, merchant)| {
                let client = registry.get(kind, merchant)?;
                Some((
                    (kind.as_str().to_owned(), merchant.to_owned()),
                    client.idempotent(),
                ))
            })
            .collect();
        Self { merchants }
    }

    /// From the `idempotent` keys of the merchant entries in config (what the clients read).
    pub fn from_config(config: &Config) -> Self {
        let sp = config
            .shengpay
            .merchants
            .iter()
            .map(|m| (("shengpay".to_owned(), m.merchant.clone()), m.idempotent));
        let wu = config
            .wupay
            .merchants
            .iter()
            .map(|m| (("wupay".to_owned(), m.merchant.clone()), m.idempotent));
        Self {
            merchants: sp.chain(wu).collect(),
        }
    }

    /// Sets one merchant (tests).
    pub fn with(mut self, provider: &str, merchant: &str, idempotent: bool) -> Self {
        self.merchants
            .insert((provider.to_owned(), merchant.to_owned()), idempotent);
        self
    }

    /// Every known (provider, merchant, idempotent).
    pub fn entries(&self) -> Vec<(String, String, bool)> {
        self.merchants
            .iter()
            .map(|((p, m), i)| (p.clone(), m.clone(), *i))
            .collect()
    }

    /// Whether this (provider, merchant) is configured at all.
    pub fn is_configured(&self, provider: &str, merchant: &str) -> bool {
        self.merchants
            .contains_key(&(provider.to_owned(), merchant.to_owned()))
    }

    /// Whether this merchant deduplicates on `refund_no`; false when it is not configured.
    pub fn is_idempotent(&self, provider: &str, merchant: &str) -> bool {
        self.merchants
            .get(&(provider.to_owned(), merchant.to_owned()))
            .copied()
            .unwrap_or(false)
    }
}

/// What every command works with.
pub struct Ctl {
    pub config: Config,
    pub pool: PgPool,
    pub tz: chrono_tz::Tz,
    pub idempotency: Idempotency,
    /// Draw progress bars (on stderr).
    pub progress: bool,
}

impl Ctl {
    /// For tests and tools: an existing pool, explicit idempotency, no progress bars.
    pub fn new(config: Config, pool: PgPool, idempotency: Idempotency) -> anyhow::Result<Self> {
        let tz = config.tz()?;
        Ok(Self {
            config,
            pool,
            tz,
            idempotency,
            progress: false,
        })
    }

    /// Connects to Postgres and learns which merchants are idempotent. With `clients` (what
    /// `dlq replay` asks for, since the answer decides what may be sent again) the answer comes
    /// from the provider clients, built as the worker builds them (`build_registry`); if a
    /// client cannot be built here (an operator host without the merchants' key files), or
    /// without `clients` (commands that only display it, and should not pay for building an
    /// HTTP client), it comes from the same `idempotent` keys of the merchant entries, which
    /// is what the clients read.
    pub async fn connect(config: Config, clients: bool) -> anyhow::Result<Self> {
        let idempotency = if clients {
            match crate::app::build_registry(&config) {
                Ok(registry) => Idempotency::from_registry(&registry),
                Err(e) => {
                    eprintln!(
                        "refundctl: note: provider clients could not be built ({}); reading \
                         merchant idempotency from the config entries",
                        shared::telemetry::error_chain(e.as_ref())
                    );
                    Idempotency::from_config(&config)
                }
            }
        } else {
            Idempotency::from_config(&config)
        };
        let pool = shared::store::connect(&config).await.with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                config.database_url_redacted()
            )
        })?;
        let mut ctl = Self::new(config, pool, idempotency)?;
        ctl.progress = std::io::stderr().is_terminal();
        Ok(ctl)
    }
}

/// Runs a parsed command line and returns the process exit code; errors are printed to stderr.
pub async fn main(cli: Cli) -> ExitCode {
    // Provider strings reach a terminal: every command's output shows control characters
    // escaped.
    let mut out = render::Escaped::new(std::io::stdout());
    let code = match run(cli, &mut out).await {
        Ok(status) => status.code(),
        // The reader went away (`| head`): stop quietly, as a filter killed by SIGPIPE does
        // (Rust ignores the signal, so the write fails instead), with its status.
        Err(e) if is_broken_pipe(&e) => EXIT_BROKEN_PIPE,
        Err(e) => {
            let _ = out.flush();
            eprintln!("refundctl: {}", shared::telemetry::error_chain(e.as_ref()));
            EXIT_COULD_NOT_RUN
        }
    };
    let _ = out.flush();
    ExitCode::from(code)
}

/// Loads the configuration, connects, and runs the command.
pub async fn run(cli: Cli, out: &mut Out) -> anyhow::Result<Status> {
    let config = Config::load(cli.config.as_deref())?;
    let clients = matches!(cli.command, Command::Dlq(dlq::DlqCommand::Replay(_)));
    let ctl = Ctl::connect(config, clients).await?;
    let status = execute(&ctl, cli.command, out).await;
    ctl.pool.close().await;
    status
}

/// Runs one command over a connected [`Ctl`].
pub async fn execute(ctl: &Ctl, command: Command, out: &mut Out) -> anyhow::Result<Status> {
    match command {
        Command::Enqueue(a) => Ok(enqueue::enqueue(ctl, &a, out).await?.status()),
        Command::Job(job::JobCommand::Show(a)) => job::show(ctl, &a, out).await,
        Command::Job(job::JobCommand::Resolve(a)) => Ok(job::resolve(ctl, &a, out).await?.status()),
        Command::Job(job::JobCommand::Correct(a)) => Ok(job::correct(ctl, &a, out).await?.status()),
        Command::Approvals(approvals::ApprovalsCommand::List(a)) => {
            approvals::list(ctl, &a, out).await
        }
        Command::Approvals(approvals::ApprovalsCommand::Approve(a)) => {
            approvals::approve(ctl, &a, out).await
        }
        Command::Approvals(approvals::ApprovalsCommand::Reject(a)) => {
            approvals::reject(ctl, &a, out).await
        }
        Command::Case(case::CaseCommand::List(a)) => case::list(ctl, &a, out).await,
        Command::Case(case::CaseCommand::Explain(a)) => case::explain(ctl, &a, out).await,
        Command::Dlq(dlq::DlqCommand::List(a)) => {
            dlq::list(ctl, &a, out).await?;
            Ok(Status::Done)
        }
        Command::Dlq(dlq::DlqCommand::Replay(a)) => Ok(dlq::replay(ctl, &a, out).await?.status()),
        Command::Dlq(dlq::DlqCommand::Discard(a)) => {
            Ok(discard::discard(ctl, &a, out).await?.status())
        }
        Command::Stats(a) => {
            stats::stats(ctl, &a, out).await?;
            Ok(Status::Done)
        }
        Command::Migrate => migrate(ctl, out).await,
    }
}

/// Applies pending migrations and says which were applied.
pub async fn migrate(ctl: &Ctl, out: &mut Out) -> anyhow::Result<Status> {
    use shared::store::operator::applied_migrations;
    let before = applied_migrations(&ctl.pool).await?;
    shared::store::migrate(&ctl.pool)
        .await
        .context("applying migrations")?;
    let after = applied_migrations(&ctl.pool).await?;
    let new: Vec<_> = after.iter().filter(|m| !before.contains(m)).collect();
    if new.is_empty() {
        writeln!(
            out,
            "migrations: up to date ({} applied, database {})",
            after.len(),
            ctl.config.database_url_redacted()
        )?;
    } else {
        for (version, description) in &new {
            writeln!(out, "applied {version} {description}")?;
        }
        writeln!(
            out,
            "migrations: {} applied now, {} in total",
            new.len(),
            after.len()
        )?;
    }
    let filled = shared::store::jobs::backfill_idempotent(&ctl.pool, &ctl.idempotency.entries())
        .await
        .context("recording merchant idempotence on older jobs")?;
    if filled > 0 {
        writeln!(
            out,
            "recorded their merchant's idempotence (from this config) on {filled} older jobs"
        )?;
    }
    Ok(Status::Done)
}
