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
//!   provider refund id (WuPay returns none) is a payment of its own. Its time is
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
//! | `duplicate_at_provider` | the provider has the refund more than once on D (two statement rows, or two different provider refund ids) | net, or null if not booked | sum of the payments |
//! | `amount_mismatch` | both sides have it once and the settlement amounts differ | net | amount |
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
//! **Status**: `balanced` when there are no discrepancies other than `pending` (pending refunds
//! are reported, and explain their part of `diff`, but do not fail the day); otherwise
//! `discrepancies`. The process exits 0 for `balanced`, 1 for `discrepancies`.
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

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use shared::config::Config;
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Row};

use crate::day::Day;
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
    /// Statement files; none: the provider side is the recorded provider attempts.
    pub statements: Vec<PathBuf>,
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
            exhaustive: false,
            as_of: None,
        }
    }
}

/// The day's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Balanced,
    Discrepancies,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Balanced => "balanced",
            Status::Discrepancies => "discrepancies",
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
    pub timings: Timings,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Statement,
    Attempts,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Statement => "statement",
            Source::Attempts => "attempts",
        }
    }

    /// Step 1, provider side: per bucket, the number of the day's provider rows (one per
    /// payment before deduplication) and the bit_xor of their fingerprints. For attempts in the
    /// indexed time zone and every provider, an index-only scan of the three columns of
    /// `provider_attempts_reconcile` in bucket order feeding a sorted aggregate; for one
    /// provider (not in that index) or in another zone, the planner's choice (a range of
    /// `provider_attempts_accepted_day` there) and a hash aggregate of the stored columns.
    fn pass_sql(self, day: DaySql, one_provider: bool) -> String {
        let provider = if one_provider {
            "AND provider = $4"
        } else {
            ""
        };
        match (self, day) {
            (Source::Statement, _) => format!(
                "SELECT {BUCKET} AS bucket, count(*) AS n, bit_xor({FP_STATEMENT}) AS fp
                 FROM pg_temp.recon_statement WHERE NOT edge
                 GROUP BY 1"
            ),
            (Source::Attempts, DaySql::Indexed) => format!(
                "SELECT recon_bucket AS bucket, count(*) AS n, bit_xor(recon_fp) AS fp
                 FROM provider_attempts
                 WHERE outcome = 'accepted' AND recon_day = $1 {provider}
                 GROUP BY 1"
            ),
            (Source::Attempts, DaySql::Range) => format!(
                "SELECT recon_bucket AS bucket, count(*) AS n, bit_xor(recon_fp) AS fp
                 FROM provider_attempts
                 WHERE outcome = 'accepted' AND recorded_at >= $2 AND recorded_at < $3 {provider}
                 GROUP BY 1"
            ),
        }
    }

    /// The day's payments in the drilled buckets (of the drilled refunds, $10, when `drill`
    /// is [`Drill::Refunds`]), deduplicated: provider, merchant, refund_no, amount, at, source
    /// (a human pointer to the evidence).
    fn payments(self, day: DaySql, drill: Drill) -> String {
        match self {
            Source::Statement => format!(
                "SELECT s.provider, s.merchant, s.refund_no,
                        s.settlement_refund_fee AS amount, s.refunded_at AS at,
                        coalesce(($6::text[])[s.file + 1], 'statement') || ':' || s.line
                          || coalesce(' ' || s.provider_refund_id, '') AS source
                 FROM pg_temp.recon_statement s
                 WHERE NOT s.edge AND {BUCKET} = ANY ($7::int[])
                   {}",
                drill.refunds("s")
            ),
            Source::Attempts => format!(
                "SELECT DISTINCT ON (a.provider, a.merchant, a.refund_no,
                                     coalesce(a.provider_refund_id, '#' || a.id))
                        a.provider, a.merchant, a.refund_no,
                        coalesce(a.settlement_refund_fee, 0) AS amount, a.recorded_at AS at,
                        'attempt ' || a.attempt
                          || CASE WHEN a.fenced THEN ' (fenced)' ELSE '' END
                          || coalesce(' ' || a.provider_refund_id, '') AS source
                 FROM provider_attempts a
                 WHERE a.outcome = 'accepted' AND a.recon_bucket = ANY ($7::int[]) {refunds}
                   AND {day}
                   AND ($4::text IS NULL OR a.provider = $4)
                 ORDER BY a.provider, a.merchant, a.refund_no,
                          coalesce(a.provider_refund_id, '#' || a.id), a.recorded_at, a.id",
                refunds = drill.refunds("a"),
                day = match day {
                    DaySql::Indexed => "a.recon_day = $1",
                    DaySql::Range => "a.recorded_at >= $2 AND a.recorded_at < $3",
                }
            ),
        }
    }

    /// Payments of the neighbouring days near the cut-offs, looked up by refund_no: provider,
    /// merchant, refund_no, at.
    fn neighbours(self) -> &'static str {
        match self {
            Source::Statement => {
                "SELECT provider, merchant, refund_no, refunded_at AS at
                 FROM pg_temp.recon_statement WHERE edge"
            }
            Source::Attempts => {
                "SELECT provider, merchant, refund_no, recorded_at AS at
                 FROM provider_attempts WHERE outcome = 'accepted'"
            }
        }
    }
}

/// One bucket of the ledger side.
#[derive(Debug, Clone, Copy, Default)]
struct LedgerBucket {
    /// `refund` entries.
    n: i64,
    /// Whether a reversal of the day is in it.
    rev: bool,
    fp: i64,
}

/// One (provider, merchant) of the ledger side.
#[derive(Debug, Clone)]
struct LedgerPair {
    provider: String,
    merchant: String,
    /// `refund` entries.
    count: i64,
    /// The day's entries, reversals included.
    total: i64,
    /// Whether it has a `refund` entry on the day (so the drill-down looks it up by index).
    refunds: bool,
}

/// The ledger side of step 1, folded from its rows as they stream in: a fixed array of
/// buckets and one entry per (provider, merchant).
#[derive(Debug)]
struct LedgerPass {
    buckets: Vec<LedgerBucket>,
    pairs: Vec<LedgerPair>,
}

impl Default for LedgerPass {
    fn default() -> Self {
        LedgerPass {
            buckets: vec![LedgerBucket::default(); BUCKETS as usize],
            pairs: Vec::new(),
        }
    }
}

impl LedgerPass {
    fn pair(&mut self, provider: &str, merchant: &str) -> &mut LedgerPair {
        // The rows come in (provider, merchant) order: the last pair is nearly always the one.
        let at = match self
            .pairs
            .iter()
            .rposition(|p| p.provider == provider && p.merchant == merchant)
        {
            Some(i) => i,
            None => {
                self.pairs.push(LedgerPair {
                    provider: provider.to_owned(),
                    merchant: merchant.to_owned(),
                    count: 0,
                    total: 0,
                    refunds: false,
                });
                self.pairs.len() - 1
            }
        };
        &mut self.pairs[at]
    }

    fn bucket(&mut self, row: &PgRow) -> Result<&mut LedgerBucket, RunError> {
        let bucket: i32 = row.try_get("bucket")?;
        usize::try_from(bucket)
            .ok()
            .and_then(|b| self.buckets.get_mut(b))
            .ok_or_else(|| RunError::Invalid(format!("bucket {bucket} out of range")))
    }

    /// The refund entries of one (`provider`, `merchant`) per bucket: `buckets`, `n` and `fp`,
    /// arrays of the same length, and their `total`. The pair's number is the sum of `n`,
    /// added up here (checked).
    fn add_pair(&mut self, row: &PgRow) -> Result<(), RunError> {
        let provider: &str = row.try_get("provider")?;
        let merchant: &str = row.try_get("merchant")?;
        let overflow = || RunError::Overflow(format!("ledger of {provider}/{merchant}"));
        let buckets: Vec<i32> = row.try_get("buckets")?;
        let ns: Vec<i64> = row.try_get("n")?;
        let fps: Vec<i64> = row.try_get("fp")?;
        let total: i64 = row.try_get("total")?;
        if ns.len() != buckets.len() || fps.len() != buckets.len() {
            return Err(RunError::Invalid(
                "ledger pass: arrays of unequal length".into(),
            ));
        }
        let mut count = 0i64;
        for ((bucket, n), fp) in buckets.into_iter().zip(ns).zip(fps) {
            let b = usize::try_from(bucket)
                .ok()
                .and_then(|b| self.buckets.get_mut(b))
                .ok_or_else(|| RunError::Invalid(format!("bucket {bucket} out of range")))?;
            b.n = b.n.checked_add(n).ok_or_else(overflow)?;
            b.fp ^= fp;
            count = count.checked_add(n).ok_or_else(overflow)?;
        }
        let p = self.pair(provider, merchant);
        p.refunds = true;
        p.count = p.count.checked_add(count).ok_or_else(overflow)?;
        p.total = p.total.checked_add(total).ok_or_else(overflow)?;
        Ok(())
    }

    /// Adds another part of the pass (other pairs, other reversals).
    fn merge(&mut self, other: LedgerPass) -> Result<(), RunError> {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets) {
            b.n =
                b.n.checked_add(o.n)
                    .ok_or_else(|| RunError::Overflow("ledger bucket".into()))?;
            b.rev |= o.rev;
            b.fp ^= o.fp;
        }
        for o in other.pairs {
            let p = self.pair(&o.provider, &o.merchant);
            let overflow =
                || RunError::Overflow(format!("ledger of {}/{}", o.provider, o.merchant));
            p.refunds |= o.refunds;
            p.count = p.count.checked_add(o.count).ok_or_else(overflow)?;
            p.total = p.total.checked_add(o.total).ok_or_else(overflow)?;
        }
        Ok(())
    }

    /// A row of the reversals: (provider, merchant, bucket, total).
    fn add_reversals(&mut self, row: &PgRow) -> Result<(), RunError> {
        let provider: &str = row.try_get("provider")?;
        let merchant: &str = row.try_get("merchant")?;
        let total: i64 = row.try_get("total")?;
        self.bucket(row)?.rev = true;
        let p = self.pair(provider, merchant);
        p.total = p
            .total
            .checked_add(total)
            .ok_or_else(|| RunError::Overflow(format!("ledger of {provider}/{merchant}")))?;
        Ok(())
    }
}

/// What the drill-down reads of the buckets that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drill {
    /// Every row of them ($7).
    Buckets,
    /// The rows of the refunds that [`NARROW`] found in them ($10).
    Refunds,
}

impl Drill {
    /// The condition on table alias `t` that keeps the rows of the drilled refunds.
    fn refunds(self, t: &str) -> String {
        match self {
            Drill::Buckets => String::new(),
            Drill::Refunds => format!("AND {t}.refund_no = ANY ($10::text[])"),
        }
    }

    /// The day's ledger entries the drill-down reads, all columns.
    fn ledger(self) -> &'static str {
        match self {
            Drill::Buckets => LEDGER_DRILLED,
            Drill::Refunds => LEDGER_DRILLED_REFUNDS,
        }
    }

    /// Per (provider, merchant), minus the count and total of the ledger's refund entries the
    /// drill-down reads, and minus the total of its reversals: provider, merchant, dn, dt.
    fn ledger_totals(self) -> String {
        match self {
            Drill::Buckets => LEDGER_DRILLED_TOTALS.to_owned(),
            Drill::Refunds => format!(
                "SELECT provider, merchant, -count(*) FILTER (WHERE refund_fee > 0) AS dn,
                        -sum(settlement_refund_fee) AS dt
                 FROM ({LEDGER_DRILLED_REFUNDS}) e GROUP BY provider, merchant"
            ),
        }
    }
}

/// The ledger's (provider, merchant) pairs of the day, handed out a few at a time to the
/// connection that asks.
struct Pairs {
    providers: Vec<String>,
    merchants: Vec<String>,
    /// Several pairs per query when there are many (small) ones, so that round trips stay few;
    /// one when there are few (large) ones, so that the two connections finish together.
    chunk: usize,
    next: std::sync::atomic::AtomicUsize,
}

impl Pairs {
    async fn of_day(conn: &mut PgConnection, req: &RunRequest) -> Result<Pairs, RunError> {
        let row = sqlx::query(LEDGER_PAIRS)
            .bind(req.date)
            .bind(req.provider.as_deref())
            .fetch_one(conn)
            .await?;
        let providers: Vec<String> = row.try_get("providers")?;
        Ok(Pairs {
            chunk: providers.len().div_ceil(32).max(1),
            providers,
            merchants: row.try_get("merchants")?,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The next pairs nobody has taken, as (providers, merchants).
    fn take(&self) -> Option<(&[String], &[String])> {
        let i = self
            .next
            .fetch_add(self.chunk, std::sync::atomic::Ordering::Relaxed);
        let end = (i + self.chunk).min(self.providers.len());
        self.providers
            .get(i..end)
            .zip(self.merchants.get(i..end))
            .filter(|(p, _)| !p.is_empty())
    }
}

/// How a query finds the day's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DaySql {
    /// The time zone is [`INDEXED_TZ`]: by `provider_attempts_reconcile`, in bucket order.
    Indexed,
    /// Another zone: by a range of `recorded_at`.
    Range,
}

/// The time zone of `provider_attempts.recon_day`, the business date its index is keyed by
/// (migration 0007).
pub const INDEXED_TZ: &str = "Asia/Shanghai";

/// The parameters every query of a run is given (each uses some of them).
struct Params<'a> {
    date: NaiveDate,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    provider: Option<&'a str>,
    exhaustive: bool,
    files: Vec<String>,
}

fn bind<'q>(
    sql: String,
    p: &Params<'_>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql))
        .bind(p.date)
        .bind(p.start)
        .bind(p.end)
        .bind(p.provider.map(str::to_owned))
        .bind(p.exhaustive)
        .bind(p.files.clone())
}

/// A refund's bucket, for statements (a temporary table); the ledger and the attempts store it
/// as `recon_bucket` (migration 0008, the same expression, [`BUCKETS`] of them).
pub const BUCKET: &str = "(hashtext(refund_no) & 1023)";
/// A statement row's fingerprint: a 64-bit hash of (provider, merchant, refund_no,
/// settlement_refund_fee), the expression the ledger and the attempts store as `recon_fp`
/// (migration 0007). They must stay the same, or no bucket ever matches.
pub const FP_STATEMENT: &str = "hashtextextended(refund_no, settlement_refund_fee \
                            # hashtextextended(provider || '/' || merchant, 0))";

/// Step 1, ledger side, for some (provider, merchant) pairs ($2, $3), one row each: per
/// bucket, the refund entries and the bit_xor of their fingerprints, as arrays, and the pair's
/// total (a bigint that raises an error on overflow).
/// Per pair an index-only scan of `ledger_reconcile` in bucket order feeding a sorted
/// aggregate: bucket and fingerprint are stored columns, read from the index, and the sums stay
/// bigint (`recon_sum`, migration 0007).
const LEDGER_PASS: &str = "SELECT pm.provider, pm.merchant, g.*
         FROM unnest($2::text[], $3::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT coalesce(array_agg(bucket), '{}') AS buckets,
                    coalesce(array_agg(n), '{}') AS n, coalesce(array_agg(fp), '{}') AS fp,
                    coalesce(recon_sum(total), 0) AS total
             FROM (
                 SELECT recon_bucket AS bucket, count(*) AS n,
                        recon_sum(settlement_refund_fee) AS total, bit_xor(recon_fp) AS fp
                 FROM ledger
                 WHERE business_date = $1 AND refund_fee > 0
                   AND recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
                 GROUP BY 1
             ) b
         ) g";

/// The (provider, merchant) pairs with refund entries on the day, as two arrays: a skip scan
/// of `ledger_reconcile`, one index descent and one row per pair. The provider is filtered
/// afterwards: filtering in the scan would read every row of the other provider's pairs.
const LEDGER_PAIRS: &str = "WITH RECURSIVE p AS (
         (SELECT recon_pair, provider, merchant FROM ledger
          WHERE business_date = $1 AND refund_fee > 0
          ORDER BY recon_pair LIMIT 1)
         UNION ALL
         SELECT n.* FROM p CROSS JOIN LATERAL (
             SELECT recon_pair, provider, merchant FROM ledger
             WHERE business_date = $1 AND refund_fee > 0 AND recon_pair > p.recon_pair
             ORDER BY recon_pair LIMIT 1
         ) n
     )
     SELECT coalesce(array_agg(provider ORDER BY provider, merchant), '{}') AS providers,
            coalesce(array_agg(merchant ORDER BY provider, merchant), '{}') AS merchants
     FROM p WHERE $2::text IS NULL OR provider = $2";

/// Step 1, the day's reversals (few; `ledger_reconcile_reversals`): per (provider, merchant)
/// and bucket, their total.
const REVERSALS: &str = "SELECT provider, merchant, recon_bucket AS bucket,
                sum(settlement_refund_fee)::bigint AS total
         FROM ledger
         WHERE business_date = $1 AND refund_fee < 0 AND ($2::text IS NULL OR provider = $2)
         GROUP BY 1, 2, 3";

/// The day's ledger entries in the drilled buckets ($7), all columns: the refund entries
/// looked up by index per (provider, merchant) of the day ($8, $9), and the reversals among the
/// day's few.
const LEDGER_DRILLED: &str = "SELECT e.* FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT * FROM ledger e
             WHERE e.business_date = $1 AND e.refund_fee > 0
               AND e.recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND e.recon_bucket = ANY ($7::int[])
         ) e
         UNION ALL
         SELECT e.* FROM ledger e
         WHERE e.business_date = $1 AND e.refund_fee < 0
           AND e.recon_bucket = ANY ($7::int[])";

/// The day's ledger entries of the drilled refunds ($10), all columns: the refund entries by
/// `ledger_one_refund_entry`, the reversals among the day's few.
const LEDGER_DRILLED_REFUNDS: &str = "SELECT e.* FROM ledger e
         WHERE e.entry_kind = 'refund' AND e.refund_no = ANY ($10::text[])
           AND e.business_date = $1
         UNION ALL
         SELECT e.* FROM ledger e
         WHERE e.business_date = $1 AND e.refund_fee < 0 AND e.refund_no = ANY ($10::text[])";

/// Step 2, narrowed: the refunds to compare one by one in the buckets that differ ($7), from
/// the indexes alone but for a row per refund found. In those buckets a ledger refund entry
/// and an accepted attempt with one fingerprint are one refund of one (provider, merchant)
/// with one amount, booked once and paid once (up to a 64-bit hash collision); what has no
/// partner, or more than one, is a refund to compare, with every row of it on both sides (a
/// refund paid twice has a partnered row and one without). The day's reversals in those
/// buckets are compared too: their refunds net on the ledger side, which fingerprints do not.
/// For attempts by `provider_attempts_reconcile`, every provider ($8, $9: the day's pairs).
const NARROW: &str = "WITH x AS (
         SELECT e.recon_pair AS pair, e.recon_bucket AS bucket, e.recon_fp AS fp, 1 AS side
         FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT recon_pair, recon_bucket, recon_fp FROM ledger
             WHERE business_date = $1 AND refund_fee > 0
               AND recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND recon_bucket = ANY ($7::int[])
         ) e
         UNION ALL
         SELECT NULL, recon_bucket, recon_fp, -1 FROM provider_attempts
         WHERE outcome = 'accepted' AND recon_day = $1 AND recon_bucket = ANY ($7::int[])
     ), odd AS (
         SELECT bucket, fp, max(pair) AS pair FROM x GROUP BY bucket, fp HAVING sum(side) <> 0
     )
     SELECT coalesce(array_agg(DISTINCT r.refund_no), '{}') FROM (
         SELECT e.refund_no FROM odd JOIN ledger e
           ON e.business_date = $1 AND e.refund_fee > 0 AND e.recon_pair = odd.pair
          AND e.recon_bucket = odd.bucket AND e.recon_fp = odd.fp
         UNION ALL
         SELECT a.refund_no FROM odd JOIN provider_attempts a
           ON a.outcome = 'accepted' AND a.recon_day = $1 AND a.recon_bucket = odd.bucket
          AND a.recon_fp = odd.fp
         UNION ALL
         SELECT refund_no FROM ledger
         WHERE business_date = $1 AND refund_fee < 0 AND recon_bucket = ANY ($7::int[])
     ) r";

/// Per (provider, merchant), minus the ledger's refund entries and entries' total in the
/// drilled buckets ($7), read like [`LEDGER_DRILLED`] but from the index alone.
const LEDGER_DRILLED_TOTALS: &str = "SELECT pm.provider, pm.merchant, -t.n AS dn, -t.total AS dt
         FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT count(*) AS n, sum(e.settlement_refund_fee) AS total FROM ledger e
             WHERE e.business_date = $1 AND e.refund_fee > 0
               AND e.recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND e.recon_bucket = ANY ($7::int[])
         ) t
         WHERE t.n > 0
         UNION ALL
         SELECT provider, merchant, 0, -sum(settlement_refund_fee) FROM ledger
         WHERE business_date = $1 AND refund_fee < 0
           AND recon_bucket = ANY ($7::int[])
         GROUP BY provider, merchant";

/// Step 2a: both sides per refund in the drilled buckets (of the drilled refunds, for
/// [`Drill::Refunds`]): provider, merchant, refund_no, ledger_amount, booked_at, manual,
/// provider_amount, provider_n, provider_at, sources.
fn refunds_sql(source: Source, day: DaySql, drill: Drill) -> String {
    format!(
        "WITH l AS (
             SELECT e.provider, e.merchant, e.refund_no,
                    sum(e.settlement_refund_fee) AS amount,
                    min(e.booked_at) FILTER (WHERE e.entry_kind = 'refund') AS booked_at,
                    bool_or(e.source = 'manual') AS manual
             FROM ({ledger}) e
             WHERE ($4::text IS NULL OR e.provider = $4)
             GROUP BY e.provider, e.merchant, e.refund_no
             HAVING sum(e.refund_fee) <> 0 OR sum(e.settlement_refund_fee) <> 0
         ), p AS (
             SELECT provider, merchant, refund_no, sum(amount) AS amount, count(*) AS n,
                    min(at) AS at, string_agg(source, ', ' ORDER BY at, source) AS sources
             FROM ({payments}) x
             GROUP BY provider, merchant, refund_no
         )
         SELECT coalesce(l.provider, p.provider) AS provider,
                coalesce(l.merchant, p.merchant) AS merchant,
                coalesce(l.refund_no, p.refund_no) AS refund_no,
                l.amount::bigint AS ledger_amount, l.booked_at, l.manual,
                p.amount::bigint AS provider_amount, coalesce(p.n, 0) AS provider_n,
                p.at AS provider_at, p.sources
         FROM l FULL JOIN p
           ON p.provider = l.provider AND p.merchant = l.merchant AND p.refund_no = l.refund_no",
        ledger = drill.ledger(),
        payments = source.payments(day, drill)
    )
}

/// Steps 2 and 3 in one statement (no temporary table to create and drop): compares the
/// refunds, classifies and stores their discrepancies, and returns per (provider, merchant)
/// what the drill-down changes on the provider side (`dn`, `dt`: less the ledger entries it
/// read, plus the payments it counted) and the number of `refunds` it compared.
fn drill_sql(source: Source, day: DaySql, drill: Drill) -> String {
    format!(
        "WITH recon_refunds AS MATERIALIZED ({refunds}),
         stored AS ({discrepancies})
         SELECT provider, merchant, sum(dn)::bigint AS dn, sum(dt)::bigint AS dt,
                sum(refunds)::bigint AS refunds
         FROM (
             SELECT e.*, 0 AS refunds FROM ({ledger}) e
             WHERE ($4::text IS NULL OR provider = $4)
             UNION ALL
             SELECT provider, merchant, provider_n, coalesce(provider_amount, 0), 1
             FROM recon_refunds
         ) x GROUP BY provider, merchant",
        refunds = refunds_sql(source, day, drill),
        discrepancies = discrepancies_sql(source),
        ledger = drill.ledger_totals(),
    )
}

/// Step 2b: classify and store, from `recon_refunds`. Extra parameters: $11 run id, $12 grace
/// minutes, $13 time zone, $14 providers whose next day is known, $15 providers whose previous
/// day is known, $16 whether the ledger's next window is closed, $17 whether its previous
/// window is closed.
fn discrepancies_sql(source: Source) -> String {
    format!(
        "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant, refund_no,
             ledger_amount, provider_amount, detail)
         SELECT $11, k.kind, r.provider, r.merchant, r.refund_no, r.ledger_amount,
                r.provider_amount,
                concat_ws('; ', k.why,
                          'job ' || coalesce(j.state || coalesce(' (' || j.cause || ')', ''),
                                             'not found'))
         FROM recon_refunds r
         CROSS JOIN LATERAL (SELECT make_interval(mins => $12) AS g) gi
         -- For a one-sided refund: its time on that side, the cut-off it is near (if any), and
         -- whether the other side would be after that cut-off. OFFSET 0 keeps the planner from
         -- copying these CASEs into every condition below that uses them: copied, they made
         -- planning (index predicates tested against each) cost 3-10 ms, more than a narrowed
         -- drill-down takes to run.
         CROSS JOIN LATERAL (
             SELECT t,
                    CASE WHEN t >= $3 - gi.g AND t < $3 THEN $3
                         WHEN t >= $2 AND t < $2 + gi.g THEN $2 END AS cut
             FROM (SELECT CASE WHEN r.ledger_amount IS NULL THEN r.provider_at
                               WHEN r.provider_amount IS NULL THEN r.booked_at END AS t) t0
             OFFSET 0
         ) c
         LEFT JOIN LATERAL (
             SELECT min(x.at) AS at FROM ({neighbours}) x
             WHERE r.provider_amount IS NULL AND c.cut IS NOT NULL
               AND x.refund_no = r.refund_no AND x.provider = r.provider
               AND x.merchant = r.merchant
               AND x.at >= CASE WHEN c.cut = $3 THEN $3 ELSE $2 - gi.g END
               AND x.at < CASE WHEN c.cut = $3 THEN $3 + gi.g ELSE $2 END
         ) pp ON true
         LEFT JOIN LATERAL (
             SELECT min(x.booked_at) AS at FROM ledger x
             WHERE r.ledger_amount IS NULL AND c.cut IS NOT NULL
               AND x.refund_no = r.refund_no AND x.entry_kind = 'refund'
               AND x.provider = r.provider AND x.merchant = r.merchant
               AND x.booked_at >= CASE WHEN c.cut = $3 THEN $3 ELSE $2 - gi.g END
               AND x.booked_at < CASE WHEN c.cut = $3 THEN $3 + gi.g ELSE $2 END
         ) lp ON true
         CROSS JOIN LATERAL (
             SELECT CASE WHEN c.cut = $3 THEN r.provider = ANY($14::text[])
                         ELSE r.provider = ANY($15::text[]) END AS provider_known,
                    CASE WHEN c.cut = $3 THEN $16 ELSE $17 END AS ledger_known,
                    CASE WHEN c.cut = $3 THEN 'the next day ' || ($1 + 1)
                         ELSE 'the previous day ' || ($1 - 1) END AS neighbour,
                    CASE WHEN c.cut = $3 THEN 'before' ELSE 'after' END AS side
         ) n
         CROSS JOIN LATERAL (
             SELECT to_char(r.booked_at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS booked,
                    to_char(r.provider_at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS paid,
                    to_char(pp.at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS partner_paid,
                    to_char(lp.at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS partner_booked
         ) f
         CROSS JOIN LATERAL (
             SELECT CASE
                 WHEN r.ledger_amount IS NOT NULL AND r.provider_amount IS NOT NULL THEN
                     CASE WHEN r.provider_n > 1 THEN 'duplicate_at_provider'
                          WHEN r.ledger_amount <> r.provider_amount THEN 'amount_mismatch'
                     END
                 WHEN r.provider_amount IS NULL THEN
                     CASE WHEN c.cut IS NOT NULL AND (pp.at IS NOT NULL OR NOT n.provider_known)
                          THEN 'pending' ELSE 'missing_at_provider' END
                 ELSE
                     CASE WHEN r.provider_n > 1 THEN 'duplicate_at_provider'
                          WHEN c.cut IS NOT NULL AND (lp.at IS NOT NULL OR NOT n.ledger_known)
                          THEN 'pending' ELSE 'missing_in_ledger' END
             END AS kind
         ) k0
         CROSS JOIN LATERAL (
             SELECT k0.kind, CASE k0.kind
                 WHEN 'duplicate_at_provider' THEN
                     'provider has it ' || r.provider_n || ' times: ' || r.sources
                     || CASE WHEN r.ledger_amount IS NULL THEN '; not in the ledger' ELSE '' END
                 WHEN 'amount_mismatch' THEN 'provider: ' || r.sources
                 WHEN 'missing_in_ledger' THEN
                     'provider: ' || r.sources || ' at ' || f.paid
                 WHEN 'missing_at_provider' THEN
                     coalesce('booked ' || f.booked, 'reversal of a refund booked on another day')
                     || CASE WHEN r.manual THEN ' (manual resolution)' ELSE '' END
                 WHEN 'pending' THEN
                     CASE WHEN r.provider_amount IS NULL THEN
                         'booked ' || f.booked || ', within ' || $12 || ' min ' || n.side
                         || ' the cut-off; '
                         || coalesce('provider paid it at ' || f.partner_paid,
                                     'the provider''s ' || n.neighbour || ' is not in yet')
                     ELSE
                         'provider: ' || r.sources || ' at ' || f.paid || ', within ' || $12
                         || ' min ' || n.side || ' the cut-off; '
                         || coalesce('booked at ' || f.partner_booked,
                                     'the ledger of ' || n.neighbour || ' is not complete yet')
                     END
             END AS why
         ) k
         LEFT JOIN jobs j ON j.refund_no = r.refund_no
         WHERE k.kind IS NOT NULL",
        neighbours = source.neighbours()
    )
}

async fn run_inner(
    conns: Connections,
    config: &Config,
    req: &RunRequest,
    progress: &Progress,
    started_at: DateTime<Utc>,
) -> Result<(RunOutcome, PgConnection), RunError> {
    let clock = Instant::now();
    let tz = config.tz().map_err(|e| RunError::Invalid(e.to_string()))?;
    let day = Day::new(req.date, tz, config.reconciler.grace_minutes).map_err(RunError::Invalid)?;
    if let Some(p) = &req.provider
        && !crate::PROVIDERS.contains(&p.as_str())
    {
        return Err(RunError::Invalid(format!(
            "--provider {p:?}: expected shengpay or wupay"
        )));
    }
    let source = if req.statements.is_empty() {
        Source::Attempts
    } else {
        Source::Statement
    };
    // Connections of its own: the run's temporary tables and session lock must not outlive
    // it in a pool.
    let Connections {
        main: mut conn,
        helper,
    } = conns;

    let mut timings = Timings::default();
    let step = Instant::now();
    let statements = match source {
        Source::Statement => {
            // Before the session's first temporary table.
            sqlx::query("SET temp_buffers = '128MB'")
                .execute(&mut conn)
                .await?;
            let total = req
                .statements
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            let bar = progress.bytes(total, "loading statements");
            let summary = crate::statement::load(
                &mut conn,
                &req.statements,
                &day,
                req.provider.as_deref(),
                &bar,
            )
            .await?;
            bar.finish_and_clear();
            for f in &summary.files {
                tracing::info!(
                    file = %f.path, rows = f.rows, on_date = f.on_date,
                    near_cutoff = f.near_cutoff, ignored = f.ignored, "statement loaded"
                );
            }
            Some(summary)
        }
        Source::Attempts => None,
    };
    timings.load_ms = ms_since(step);
    let step = Instant::now();

    let spinner = progress.spinner(format!("waiting for other runs of {}", req.date));
    // A session lock, taken before the transaction begins, so that the transaction's snapshot
    // (repeatable read, shared with the helper) is taken after the previous run of the date
    // committed and this run supersedes it. Dropping the connection on an error releases it.
    let (class, key) = lock_key(req.date);
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(class)
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    if !free {
        tracing::warn!(date = %req.date, "another run of this date is in progress; waiting for it");
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(class)
            .bind(key)
            .execute(&mut conn)
            .await?;
    }
    let day_sql = if tz.name() == INDEXED_TZ {
        DaySql::Indexed
    } else {
        DaySql::Range
    };
    // The attempts of every provider by their index: the provider side streams in bucket
    // order, and the drill-down can be narrowed to refunds by index.
    let streaming =
        source == Source::Attempts && day_sql == DaySql::Indexed && req.provider.is_none();
    // Index-only scans in index order, so that grouping streams instead of hashing or sorting
    // a million rows; the plans are fixed rather than left to estimates for expressions.
    let plan_settings = [
        "SET LOCAL enable_seqscan = off",
        "SET LOCAL enable_bitmapscan = off",
        "SET LOCAL enable_sort = off",
        "SET LOCAL enable_hashagg = off",
        "SET LOCAL max_parallel_workers_per_gather = 0",
    ]
    .join("; ");
    // One round trip: the transaction, its settings, and the plan settings of the provider
    // side when it streams (the others set them when they join the ledger side).
    let mut tx = conn
        .begin_with(AssertSqlSafe(format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL jit = off; \
             SET LOCAL work_mem = '64MB'; SET LOCAL application_name = 'refund-reconciler'; {}",
            if streaming {
                plan_settings.as_str()
            } else {
                ""
            }
        )))
        .await?;
    let head = sqlx::query(
        "SELECT pg_export_snapshot() AS snapshot, coalesce($1::timestamptz, now()) AS as_of",
    )
    .bind(req.as_of)
    .fetch_one(&mut *tx)
    .await?;
    let (snapshot, as_of): (String, DateTime<Utc>) =
        (head.try_get("snapshot")?, head.try_get("as_of")?);
    timings.lock_ms = ms_since(step);
    let files: Vec<String> = req
        .statements
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let params = Params {
        date: req.date,
        start: day.start,
        end: day.end,
        provider: req.provider.as_deref(),
        exhaustive: req.exhaustive,
        files,
    };

    spinner.set_message(format!("matching totals of {}", req.date));
    let step = Instant::now();
    // The ledger's (provider, merchant) pairs, found by whichever connection gets there first
    // (the second one, at once), are shared out as they come between the two, so that both
    // stay busy to the end.
    let pairs = tokio::sync::OnceCell::<Pairs>::new();
    let ledger_side = async {
        // The ledger side is read on the second connection, concurrently with the provider
        // side.
        let mut helper = helper;
        // The id is made by the server of hex digits and dashes; checked all the same.
        if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(RunError::Invalid(format!(
                "unexpected snapshot id {snapshot:?}"
            )));
        }
        // One round trip: the transaction, its snapshot and its plan settings.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT '{snapshot}'; SET LOCAL jit = off; {plan_settings}"
        )))
        .execute(&mut helper)
        .await?;
        let pairs = pairs
            .get_or_try_init(|| Pairs::of_day(&mut helper, req))
            .await?;
        let mut pass = LedgerPass::default();
        let reversals = sqlx::query(REVERSALS)
            .bind(req.date)
            .bind(req.provider.as_deref())
            .fetch_all(&mut helper)
            .await?;
        for row in &reversals {
            pass.add_reversals(row)?;
        }
        while let Some((p, m)) = pairs.take() {
            let rows = sqlx::query(LEDGER_PASS)
                .bind(req.date)
                .bind(p)
                .bind(m)
                .fetch_all(&mut helper)
                .await?;
            for row in &rows {
                pass.add_pair(row)?;
            }
        }
        sqlx::raw_sql("COMMIT").execute(&mut helper).await?;
        let _ = helper.close().await;
        Ok::<_, RunError>(pass)
    };
    let provider_side = async {
        // As arrays, one row: 1,024 rows cost more to send and decode than to compute.
        let row = bind(
            format!(
                "SELECT coalesce(array_agg(bucket), '{{}}') AS buckets,
                        coalesce(array_agg(n), '{{}}') AS n, coalesce(array_agg(fp), '{{}}') AS fp
                 FROM ({}) p",
                source.pass_sql(day_sql, req.provider.is_some())
            ),
            &params,
        )
        .fetch_one(&mut *tx)
        .await?;
        let buckets: Vec<i32> = row.try_get("buckets")?;
        let ns: Vec<i64> = row.try_get("n")?;
        let fps: Vec<i64> = row.try_get("fp")?;
        let mut side = vec![(0i64, 0i64); BUCKETS as usize];
        for ((b, n), fp) in buckets.into_iter().zip(ns).zip(fps) {
            let slot = usize::try_from(b)
                .ok()
                .and_then(|b| side.get_mut(b))
                .ok_or_else(|| RunError::Invalid(format!("bucket {b} out of range")))?;
            *slot = (n, fp);
        }
        // Then the ledger pairs the second connection has not taken yet.
        let mut pass = LedgerPass::default();
        let pairs = pairs
            .get_or_try_init(|| Pairs::of_day(&mut tx, req))
            .await?;
        if let Some(first) = pairs.take() {
            if !streaming {
                sqlx::raw_sql(AssertSqlSafe(plan_settings.clone()))
                    .execute(&mut *tx)
                    .await?;
            }
            let mut next = Some(first);
            while let Some((p, m)) = next {
                let rows = sqlx::query(LEDGER_PASS)
                    .bind(req.date)
                    .bind(p)
                    .bind(m)
                    .fetch_all(&mut *tx)
                    .await?;
                for row in &rows {
                    pass.add_pair(row)?;
                }
                next = pairs.take();
            }
        }
        sqlx::raw_sql(
            "SET LOCAL enable_seqscan = on; SET LOCAL enable_bitmapscan = on; \
             SET LOCAL enable_sort = on; SET LOCAL enable_hashagg = on; \
             RESET max_parallel_workers_per_gather",
        )
        .execute(&mut *tx)
        .await?;
        Ok::<_, RunError>((side, pass))
    };
    let (mut ledger, (provider_side, main_part)) = futures::try_join!(ledger_side, provider_side)?;
    ledger.merge(main_part)?;
    ledger
        .pairs
        .sort_by(|a, b| (&a.provider, &a.merchant).cmp(&(&b.provider, &b.merchant)));
    timings.totals_ms = ms_since(step);
    let step = Instant::now();
    // In the transaction, so never seen before it commits: written when it is needed.
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (business_date, provider, source, statement_files,
             timezone, grace_minutes, status, started_at, locked_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, now())
         RETURNING id",
    )
    .bind(req.date)
    .bind(req.provider.as_deref())
    .bind(source.as_str())
    .bind(&params.files)
    .bind(tz.name())
    .bind(i32::try_from(day.grace_minutes).unwrap_or(i32::MAX))
    .bind(started_at)
    .fetch_one(&mut *tx)
    .await?;

    // A bucket is the same on both sides when neither has a reversal in it and both have the
    // same number of rows and the same bit_xor of fingerprints: the ledger's rows of a bucket
    // without reversals are distinct (one refund entry per refund_no), so equal xors leave the
    // provider side only the same rows plus pairs of repeats, which equal counts rule out (up
    // to a 64-bit hash collision).
    let drilled: Vec<i32> = (0..BUCKETS)
        .filter(|&b| {
            let i = b as usize;
            let l = &ledger.buckets[i];
            req.exhaustive || l.rev || (l.n, l.fp) != provider_side[i]
        })
        .collect();
    let mut totals: Vec<Total> = ledger
        .pairs
        .iter()
        .map(|p| Total {
            provider: p.provider.clone(),
            merchant: p.merchant.clone(),
            ledger_total: p.total,
            provider_total: p.total,
            diff: 0,
            ledger_count: p.count,
            provider_count: p.count,
        })
        .collect();
    // The (provider, merchant) pairs with refund entries on the day: the drill-down looks
    // their refund entries up by index, pair by pair.
    let (pair_providers, pair_merchants): (Vec<String>, Vec<String>) = ledger
        .pairs
        .iter()
        .filter(|p| p.refunds)
        .map(|p| (p.provider.clone(), p.merchant.clone()))
        .unzip();
    timings.buckets_ms = ms_since(step);

    if let Some(summary) = &statements {
        let mut uncovered: Vec<&str> = totals
            .iter()
            .filter(|t| t.ledger_count > 0 && !summary.coverage.dates.contains_key(&t.provider))
            .map(|t| t.provider.as_str())
            .collect();
        uncovered.dedup();
        for provider in uncovered {
            tracing::warn!(
                provider,
                "the statements have no row of this provider, so each of its refunds is \
                 missing_at_provider; give its statement, or --provider for the other"
            );
        }
    }

    let drilled_buckets = i64::try_from(drilled.len()).unwrap_or(i64::MAX);
    let mut drilled_pairs = 0;
    let mut drilled_refunds = 0;
    if !drilled.is_empty() {
        spinner.set_message(format!("drilling into {drilled_buckets} buckets"));
        let drill = if streaming && !req.exhaustive {
            Drill::Refunds
        } else {
            Drill::Buckets
        };
        let narrowed: Vec<String> = match drill {
            Drill::Refunds => bind(NARROW.to_owned(), &params)
                .bind(&drilled)
                .bind(&pair_providers)
                .bind(&pair_merchants)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?,
            Drill::Buckets => Vec::new(),
        };
        let (next_known, previous_known) = match &statements {
            Some(s) => (s.coverage.after(req.date), s.coverage.before(req.date)),
            None => {
                let all = || crate::PROVIDERS.map(str::to_owned).to_vec();
                (
                    if day.next_window_closed(as_of) {
                        all()
                    } else {
                        Vec::new()
                    },
                    if day.previous_window_closed(as_of) {
                        all()
                    } else {
                        Vec::new()
                    },
                )
            }
        };
        // Outside what the drill-down read the provider side is the ledger's refund entries,
        // row for row; inside it, it is what the drill-down counted (each payment once). So
        // the provider totals are the ledger's, less what the drill-down read of it, plus the
        // drill-down's.
        let corrections = bind(drill_sql(source, day_sql, drill), &params)
            .bind(&drilled)
            .bind(&pair_providers)
            .bind(&pair_merchants)
            .bind(&narrowed)
            .bind(run_id)
            .bind(i32::try_from(day.grace_minutes).unwrap_or(i32::MAX))
            .bind(tz.name())
            .bind(&next_known)
            .bind(&previous_known)
            .bind(day.next_window_closed(as_of))
            .bind(day.previous_window_closed(as_of))
            .fetch_all(&mut *tx)
            .await?;
        drilled_pairs = corrections.len();
        for c in corrections {
            let (provider, merchant): (String, String) =
                (c.try_get("provider")?, c.try_get("merchant")?);
            let (dn, dt): (i64, i64) = (c.try_get("dn")?, c.try_get("dt")?);
            drilled_refunds += u64::try_from(c.try_get::<i64, _>("refunds")?).unwrap_or(0);
            let at = match totals
                .iter()
                .position(|t| t.provider == provider && t.merchant == merchant)
            {
                Some(i) => i,
                None => {
                    totals.push(Total {
                        provider: provider.clone(),
                        merchant: merchant.clone(),
                        ledger_total: 0,
                        provider_total: 0,
                        diff: 0,
                        ledger_count: 0,
                        provider_count: 0,
                    });
                    totals.len() - 1
                }
            };
            let t = &mut totals[at];
            t.provider_count = t.provider_count.checked_add(dn).ok_or_else(|| {
                RunError::Overflow(format!("provider count of {provider}/{merchant}"))
            })?;
            t.provider_total = t.provider_total.checked_add(dt).ok_or_else(|| {
                RunError::Overflow(format!("provider total of {provider}/{merchant}"))
            })?;
        }
        totals.sort_by(|a, b| (&a.provider, &a.merchant).cmp(&(&b.provider, &b.merchant)));
    }
    timings.drill_ms = ms_since(step);

    spinner.set_message("storing the run");
    let step = Instant::now();
    for t in &mut totals {
        t.diff = t
            .provider_total
            .checked_sub(t.ledger_total)
            .ok_or_else(|| RunError::Overflow(format!("diff of {}/{}", t.provider, t.merchant)))?;
    }
    let column = |f: fn(&Total) -> i64| totals.iter().map(f).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO reconciliation_totals (run_id, provider, merchant, ledger_total,
             ledger_count, provider_total, provider_count, diff)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                                  $7::int8[], $8::int8[])",
    )
    .bind(run_id)
    .bind(
        totals
            .iter()
            .map(|t| t.provider.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        totals
            .iter()
            .map(|t| t.merchant.clone())
            .collect::<Vec<_>>(),
    )
    .bind(column(|t| t.ledger_total))
    .bind(column(|t| t.ledger_count))
    .bind(column(|t| t.provider_total))
    .bind(column(|t| t.provider_count))
    .bind(column(|t| t.diff))
    .execute(&mut *tx)
    .await?;

    let counts = sqlx::query(
        "SELECT count(*) FILTER (WHERE kind <> 'pending') AS d,
                count(*) FILTER (WHERE kind = 'pending') AS p
         FROM reconciliation_discrepancies WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&mut *tx)
    .await?;
    let (discrepancies, pending): (i64, i64) = (counts.try_get("d")?, counts.try_get("p")?);
    let status = if discrepancies == 0 {
        Status::Balanced
    } else {
        Status::Discrepancies
    };
    sqlx::query(
        "UPDATE reconciliation_runs SET status = $2, discrepancy_count = $3, pending_count = $4,
             finished_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(status.as_str())
    .bind(discrepancies)
    .bind(pending)
    .execute(&mut *tx)
    .await?;
    // A run for every provider supersedes every earlier run of the date; a run for one
    // provider supersedes the earlier runs for that provider (an earlier run for every
    // provider stays current for the others: see the reconciliation_current_* views).
    let superseded: Vec<i64> = sqlx::query_scalar(
        "UPDATE reconciliation_runs SET superseded_by = $1
         WHERE business_date = $2 AND id <> $1 AND superseded_by IS NULL
           AND status IN ('balanced', 'discrepancies')
           AND ($3::text IS NULL OR provider = $3)
         RETURNING id",
    )
    .bind(run_id)
    .bind(req.date)
    .bind(req.provider.as_deref())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(class)
        .bind(key)
        .execute(&mut conn)
        .await?;
    timings.store_ms = ms_since(step);
    spinner.finish_and_clear();

    tracing::info!(
        run_id, date = %req.date, status = status.as_str(), discrepancies, pending,
        drilled_pairs, drilled_buckets, drilled_refunds, source = source.as_str(),
        elapsed_ms = ms_since(clock), load_ms = timings.load_ms, lock_ms = timings.lock_ms,
        totals_ms = timings.totals_ms, buckets_ms = timings.buckets_ms,
        drill_ms = timings.drill_ms, store_ms = timings.store_ms,
        "reconciliation stored"
    );
    let outcome = RunOutcome {
        run_id,
        date: req.date,
        status,
        discrepancies,
        pending,
        totals,
        drilled_pairs,
        drilled_buckets,
        drilled_refunds,
        statements,
        superseded,
        timings,
    };
    Ok((outcome, conn))
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
    let files: Vec<String> = req
        .statements
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    sqlx::query(
        "INSERT INTO reconciliation_runs (business_date, provider, source, statement_files,
             timezone, grace_minutes, status, error, started_at, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'failed', $7, $8, clock_timestamp())",
    )
    .bind(req.date)
    .bind(req.provider.as_deref())
    .bind(if req.statements.is_empty() {
        "attempts"
    } else {
        "statement"
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
