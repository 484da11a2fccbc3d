//! One reconciliation run: the comparison, done inside PostgreSQL, and the stored result.
//!
//! # The two sides
//!
//! For business date D in the configured time zone (see [`crate::day`]), per provider and
//! merchant:
//!
//! - **Ledger side**: the ledger entries with `business_date = D`, netted per `refund_no`
//!   (entries `refund` and `reversal`; a refund whose entries of D net to zero in both
//!   `refund_fee` and `settlement_refund_fee` is not on the ledger side). Its time is the
//!   `booked_at` of its `refund` entry.
//! - **Provider side** from statements (`--statement`): every statement row whose business date
//!   (`refunded_at` in the time zone) is D is one payment. Its time is `refunded_at`.
//! - **Provider side** without statements: what the providers told us they paid, i.e. the
//!   `provider_attempts` rows with outcome `accepted` recorded during D, fenced ones included (a
//!   stale worker's accepted call is still evidence of a payment). Within the day one payment
//!   is one distinct (`refund_no`, `provider_refund_id`): an idempotent provider answering a
//!   retry with its first result again is the same payment. An accepted call without a
//!   provider refund id of the provider's own (WuPay has none: its outcome carries our
//!   `refund_no` there) is a payment of its own, one per attempt ([`PAYMENT_KEY`]). Its time is
//!   `recorded_at`. A payment re-reported on a later day counts on each day it was reported:
//!   attempts are what we heard each day; a statement is the provider's own account.
//!
//! # Totals
//!
//! `ledger_total` is the sum of the day's entries (reversals included), `ledger_count` the
//! number of `refund` entries booked that day; `provider_total` and `provider_count` are the
//! sum and number of the day's payments (a refund paid twice counts twice); `diff` is
//! `provider_total - ledger_total`. Sums are checked: an overflow stops the run.
//!
//! # Discrepancies
//!
//! Per refund (key: provider, merchant, `refund_no`), at most one, the first that applies:
//!
//! | kind | when | `ledger_amount` | `provider_amount` |
//! |---|---|---|---|
//! | `invalid_at_provider` | a statement row of the refund on D cannot be right (settlement above its refund_fee) | net, or null if not booked | sum of the payments |
//! | `duplicate_at_provider` | the provider has the refund more than once on D (two statement rows, or two different provider refund ids) | net, or null if not booked | sum of the payments |
//! | `amount_mismatch` | both sides have it once and the settlement amounts differ, or (against statements) the refund_fee amounts do; the detail names the amount | net | amount |
//! | `pending` | one side only, near a cut-off (below) | one side | the other: null |
//! | `missing_at_provider` | booked on D, not paid on D | net | null |
//! | `missing_in_ledger` | paid on D, not booked on D | null | amount |
//!
//! Amounts are as counted on D, so for each provider and merchant the discrepancies account
//! for the whole `diff`: the sum of `provider_amount - ledger_amount` (null as 0) over them
//! equals `diff`.
//!
//! **Pending.** With `G = reconciler.grace_minutes`, a refund that only one side has on D is
//! `pending` when its time on that side is within G of one of D's cut-offs (the last G minutes
//! before the end of D, or the first G minutes of D) and either
//!
//! 1. the other side has it within G on the other side of that same cut-off (the refund
//!    straddles midnight: booked 23:59:50 on D, paid 00:00:10 on D+1, or paid 23:59:59 on D and
//!    booked 00:00:01 on D+1; or the mirror images at the start of D), or
//! 2. the other side's data for that window is not in yet: for statements, no statement row of
//!    that provider is dated after D (for the end cut-off) or before D (for the start cut-off),
//!    i.e. the neighbouring day's statement was not given; for the ledger and for attempts,
//!    which are recorded live, the window has not closed yet when the run starts.
//!
//! Rerunning the day later with the neighbouring statement settles case 2. A refund paid twice
//! is `duplicate_at_provider` even near a cut-off.
//!
//! A partner across midnight (case 1) counts only if it is unmatched on its own day and agrees
//! in amount; otherwise the one-sided refund is not pending:
//!
//! - booked on D, and the provider paid it more than once across the cut-off:
//!   `duplicate_at_provider`; paid once, another amount: `amount_mismatch` (the other day's
//!   amount in the detail, `provider_amount` null: amounts are as counted on D);
//! - paid on D, and the booking across the cut-off was also paid there (a payment of it in the
//!   same window): this payment is a second one, `duplicate_at_provider`; booked another
//!   amount: `amount_mismatch` (`ledger_amount` null).
//!
//! "Its own day" is seen through the same grace window: a statement holds only those rows of
//! the neighbouring days.
//!
//! **Statement missing.** Against statements, a provider with ledger entries on D and no
//! statement row dated D in any file given has no statement: each of its (provider, merchant)
//! pairs is one `statement_missing` (`refund_no` empty, `ledger_amount` the pair's ledger
//! total, `provider_amount` null) instead of a `missing_at_provider` per refund. A file with
//! no row dated D is refused (exit 2, [`crate::statement`]) unless it is the neighbouring
//! day's statement beside one of D.
//!
//! **Status**: `balanced` when there are no discrepancies other than `pending` (pending refunds
//! are reported, and explain their part of `diff`, but do not fail the day) and something was
//! compared; `nothing_to_reconcile` when neither side has anything on D (no totals at all:
//! the wrong database or date, far more often than a day without refunds); otherwise
//! `discrepancies`. The process exits 0 for `balanced` only, 1 for the others. A run that
//! found nothing to reconcile supersedes nothing.
//!
//! # How it runs
//!
//! Statements are loaded first (outside the lock, into a session-temporary table with `COPY`).
//! Then the run takes a session-level advisory lock on the date (so two runs of one day never
//! interleave; the second waits and then supersedes the first) and, holding it, does everything
//! in one repeatable-read transaction whose snapshot it shares with a second connection:
//!
//! 1. **Fingerprints per bucket**, on both connections at once. A refund's bucket is
//!    `hashtext(refund_no) & 1023` (migration 0008); a row's fingerprint is a 64-bit hash of (provider,
//!    merchant, `refund_no`, `settlement_refund_fee`). The ledger and the attempts store both
//!    as generated columns (migration 0007), so every scan is index-only over a narrow index of
//!    fixed-width columns, in group order, feeding a sorted aggregate: nothing is hashed,
//!    sorted or computed per row:
//!    - the ledger's refund entries are read one (provider, merchant) at a time, found by a
//!      64-bit hash of the two (`recon_pair`; the day's pairs come from a skip scan of the
//!      index; two pairs with one hash would be totalled together), each giving per bucket the
//!      number of entries, their total and the `bit_xor` of their fingerprints (as arrays: one
//!      row back per pair). The second connection starts on the pairs at once, the first joins in when it
//!      is done with the provider side, so both stay busy to the end. The day's reversals, few,
//!      are read apart (`ledger_reconcile_reversals`): they add to the totals and mark their
//!      buckets;
//!    - the provider side returns per bucket the number of rows (one per payment before
//!      deduplication) and the `bit_xor` of theirs: attempts in bucket order of the day's
//!      business date in Asia/Shanghai (for one provider, or in another time zone, the planner's
//!      choice and a hash aggregate), statements from their temporary table.
//!
//!    Against statements the fingerprints of both sides are hashed with the row's refund_fee
//!    ([`fee_fp`]; the ledger's read from `ledger_reconcile_fees`, migration 0020), so that a
//!    statement row whose refund_fee alone differs makes its bucket differ.
//!
//!    A bucket is the same on both sides when the ledger has no reversal in it and the counts
//!    and the xors agree: the ledger's refund entries are distinct rows (one per `refund_no`),
//!    so equal xors leave the provider side those rows plus pairs of repeats, which equal
//!    counts rule out (up to a 64-bit hash collision).
//! 2. **Drill-down**: per refund, a full outer join of the two sides restricted to the buckets
//!    that differ, classified as above and stored. The ledger's refund entries there are looked
//!    up by index per (provider, merchant) and bucket, the attempts per bucket. For the
//!    attempts of every provider in the indexed zone (the nightly run) it is narrowed first,
//!    from the indexes alone ([`NARROW`]): in those buckets a ledger entry and an attempt with
//!    one fingerprint are one refund booked once and paid once, so only the refunds with a
//!    row that has no such partner (and those with a reversal of the day) are compared, all of
//!    their rows on both sides, found by `refund_no`. A few discrepancies then cost a few
//!    heap reads instead of every row of their buckets.
//! 3. **Totals**: outside what the drill-down read the provider side is the ledger's refund
//!    entries row for row, so the provider totals are the ledger's, less what the drill-down
//!    read of the ledger, plus what it counted. Steps 2 and 3 are one statement.
//!
//! `--exhaustive` drills into every bucket; it gives the same answer, more slowly. Nothing per
//! refund ever reaches this process: it holds 1,024 buckets and one row per (provider,
//! merchant).

mod reconcile;
mod sides;
mod sql;

use reconcile::*;
use sides::*;
pub use sql::*;

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use shared::config::Config;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::progress::Progress;
use crate::statement::{LoadError, LoadSummary, StatementError};

/// Buckets per (provider, merchant) for the drill-down (a power of two).
pub const BUCKETS: i32 = 1024;

/// The first key of the advisory lock that serializes runs of one date ("REC1").
pub const LOCK_CLASS: i32 = 0x5245_4331;

/// The advisory lock key of a date's runs: `pg_advisory_xact_lock(LOCK_CLASS, days since
/// 1970-01-01)`.
pub fn lock_key(date: NaiveDate) -> (i32, i32) {
    let days = (date - NaiveDate::default()).num_days();
    (LOCK_CLASS, i32::try_from(days).unwrap_or(i32::MAX))
}

/// What to reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub date: NaiveDate,
    /// Only this provider (`shengpay` or `wupay`).
    pub provider: Option<String>,
    /// Statement files handed in (`--statement`).
    pub statements: Vec<PathBuf>,
    /// Statements fetched from `[reconciler.statements]` ([`crate::fetch`]).
    pub fetched: Vec<crate::fetch::Fetched>,
    /// Configured statements of the date that were not there: each is a `statement_missing`
    /// discrepancy (its provider's, or its merchant's, refunds are not compared one by one).
    /// With no statement at all, handed in or fetched, and none missing, the provider side is
    /// the recorded provider attempts.
    pub missing: Vec<crate::fetch::Missing>,
    /// Drill down into every refund instead of only where fingerprints differ.
    pub exhaustive: bool,
    /// The instant the run reasons as of (whether grace windows have closed); default: the
    /// database's `now()`.
    pub as_of: Option<DateTime<Utc>>,
}

impl RunRequest {
    pub fn new(date: NaiveDate) -> Self {
        RunRequest {
            date,
            provider: None,
            statements: Vec::new(),
            fetched: Vec::new(),
            missing: Vec::new(),
            exhaustive: false,
            as_of: None,
        }
    }

    /// Whether the provider side is statements (handed in, fetched, or configured and
    /// missing) rather than the recorded provider attempts.
    pub fn against_statements(&self) -> bool {
        !self.statements.is_empty() || !self.fetched.is_empty() || !self.missing.is_empty()
    }

    /// The statements to load, in order: those handed in, then those fetched.
    pub fn inputs(&self) -> Vec<crate::statement::Input> {
        self.statements
            .iter()
            .cloned()
            .map(crate::statement::Input::file)
            .chain(self.fetched.iter().map(|f| crate::statement::Input {
                path: f.path.clone(),
                name: f.name.clone(),
                fetched_for: Some(f.provider.clone()),
            }))
            .collect()
    }

    /// How the stored run names its statements: files by path, fetched ones by URL.
    pub fn statement_names(&self) -> Vec<String> {
        self.inputs().into_iter().map(|i| i.name).collect()
    }
}

/// The day's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Balanced,
    Discrepancies,
    /// Neither side has anything on the day (no totals): not balanced, since nothing was
    /// compared; most likely the wrong database or date. Exit status 1.
    NothingToReconcile,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Balanced => "balanced",
            Status::Discrepancies => "discrepancies",
            Status::NothingToReconcile => "nothing_to_reconcile",
        }
    }
}

/// Totals of one (provider, merchant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    pub provider: String,
    pub merchant: String,
    pub ledger_total: i64,
    pub provider_total: i64,
    pub diff: i64,
    pub ledger_count: i64,
    pub provider_count: i64,
}

/// Where a run's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Parsing and copying statements into the database.
    pub load_ms: u64,
    /// Waiting for another run of the date.
    pub lock_ms: u64,
    /// Step 1: fingerprints per bucket, both sides, and the ledger's totals.
    pub totals_ms: u64,
    /// Writing the run's row and comparing the buckets.
    pub buckets_ms: u64,
    /// Step 3: the refund-by-refund comparison and the discrepancies.
    pub drill_ms: u64,
    /// Storing totals and the run, superseding, committing.
    pub store_ms: u64,
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A stored run's summary.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_id: i64,
    pub date: NaiveDate,
    pub status: Status,
    /// Discrepancies other than `pending`.
    pub discrepancies: i64,
    pub pending: i64,
    pub totals: Vec<Total>,
    /// (provider, merchant) pairs with rows in the buckets the run drilled into, and those
    /// buckets.
    pub drilled_pairs: usize,
    pub drilled_buckets: i64,
    /// The refunds compared one by one.
    pub drilled_refunds: u64,
    pub statements: Option<LoadSummary>,
    pub superseded: Vec<i64>,
    /// Earlier runs against statements that stay the day's result over this one (a run
    /// against recorded answers does not replace them); empty when this run is current.
    pub kept_current: Vec<i64>,
    /// What the statement settled of unknown WuPay outcomes before the comparison.
    pub repairs: crate::repair::Repairs,
    /// What a person should know about the run (a provider without a statement, a configured
    /// statement that was not there), one sentence each; also logged.
    pub warnings: Vec<String>,
    pub timings: Timings,
}

/// The earlier runs against statements that stay the result of run $1's date and scope over
/// it, because $1 is a run against recorded answers (DESIGN §7): not superseded, finished,
/// and covering a provider that $1 covers.
pub const KEPT_CURRENT: &str = "SELECT o.id FROM reconciliation_runs r
     JOIN reconciliation_runs o ON o.business_date = r.business_date AND o.id < r.id
     WHERE r.id = $1 AND r.source = 'attempts' AND o.source = 'statement'
       AND o.superseded_by IS NULL AND o.status IN ('balanced', 'discrepancies')
       AND (o.provider IS NULL OR r.provider IS NULL OR o.provider = r.provider)
     ORDER BY o.id";

/// Why a run could not be done (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("amounts out of range: {0}")]
    Overflow(String),
    #[error("settling unknown outcomes from the statement: {0}")]
    Repair(#[from] shared::store::StoreError),
}

impl From<LoadError> for RunError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Statement(s) => RunError::Statement(s),
            LoadError::Db(d) => RunError::Db(d),
        }
    }
}

/// Runs and stores the reconciliation of `req.date`. On failure the attempt is recorded as a
/// `failed` run when the database can still be reached.
pub async fn run(
    pool: &PgPool,
    config: &Config,
    req: &RunRequest,
    progress: &Progress,
) -> Result<RunOutcome, RunError> {
    let conns = match Connections::open(&pool.connect_options()).await {
        Ok(c) => c,
        Err(e) => {
            let e = RunError::from(e);
            record_failure(pool, config, req, Utc::now(), &e).await;
            return Err(e);
        }
    };
    let (outcome, main) = run_on(conns, pool, config, req, progress).await?;
    let _ = main.close().await;
    Ok(outcome)
}

/// [`run`] on connections already open. Gives back the run's own connection, its lock
/// released and nothing pending, to read the stored run with; on an error both are closed,
/// which releases the lock.
pub async fn run_on(
    conns: Connections,
    pool: &PgPool,
    config: &Config,
    req: &RunRequest,
    progress: &Progress,
) -> Result<(RunOutcome, PgConnection), RunError> {
    let started_at = Utc::now();
    let result = run_inner(conns, config, req, progress, started_at).await;
    if let Err(e) = &result {
        record_failure(pool, config, req, started_at, e).await;
    }
    result
}

/// The two connections of a run, opened together: its own (the date's lock, the transaction,
/// temporary tables) and a helper that reads part of the ledger in the same snapshot.
pub struct Connections {
    pub main: PgConnection,
    helper: PgConnection,
}

impl Connections {
    pub async fn open(options: &PgConnectOptions) -> Result<Self, sqlx::Error> {
        let (main, helper) = futures::try_join!(options.connect(), options.connect())?;
        Ok(Connections { main, helper })
    }
}

/// Records a run that could not be done, so that a missing night shows in the runs table
/// (when the database can still be reached: a warning otherwise).
async fn record_failure(
    pool: &PgPool,
    config: &Config,
    req: &RunRequest,
    started_at: DateTime<Utc>,
    error: &RunError,
) {
    if let Err(e) = insert_failure(pool, config, req, started_at, error).await {
        tracing::warn!(error = %e, "could not record the failed run");
    }
}

async fn insert_failure(
    pool: &PgPool,
    config: &Config,
    req: &RunRequest,
    started_at: DateTime<Utc>,
    error: &RunError,
) -> Result<(), sqlx::Error> {
    let mut conn: sqlx::pool::PoolConnection<sqlx::Postgres> = pool.acquire().await?;
    let files = req.statement_names();
    sqlx::query(
        "INSERT INTO reconciliation_runs (business_date, provider, source, statement_files,
             timezone, grace_minutes, status, error, started_at, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'failed', $7, $8, clock_timestamp())",
    )
    .bind(req.date)
    .bind(req.provider.as_deref())
    .bind(if req.against_statements() {
        "statement"
    } else {
        "attempts"
    })
    .bind(&files)
    .bind(&config.timezone)
    .bind(i32::try_from(config.reconciler.grace_minutes).unwrap_or(i32::MAX))
    .bind(error.to_string())
    .bind(started_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Connects for one run of the command line: the run's two connections at once, migrated first
/// when `database.migrate_on_start` is set, and a pool that connects only if a failed run has
/// to be recorded. A reconciliation is short: connecting one after the other, and a third
/// connection for the pool, were a tenth of a day of a million refunds.
pub async fn open(config: &Config) -> Result<(PgPool, Connections), shared::store::StoreError> {
    let mut small = config.clone();
    small.database.max_connections = 1;
    let pool = shared::store::connect_lazy(&small)?;
    let mut conns = Connections::open(&shared::store::connect_options(config)?).await?;
    if config.database.migrate_on_start {
        shared::store::migrate_on(&mut conns.main).await?;
    }
    Ok((pool, conns))
}

/// Connects to the database for runs: a small pool (a run opens its own two connections, and
/// uses the pool to record a failure), migrated first when `database.migrate_on_start` is set.
pub async fn connect(config: &Config) -> Result<PgPool, shared::store::StoreError> {
    let mut small = config.clone();
    small.database.max_connections = small.database.max_connections.clamp(1, 2);
    let pool = shared::store::connect(&small).await?;
    if config.database.migrate_on_start {
        shared::store::migrate(&pool).await?;
    }
    Ok(pool)
}
