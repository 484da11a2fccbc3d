//! What `refundctl` reads: the dead-letter set grouped by cause, a job's whole story, and the
//! counts behind `stats`.
//!
//! This module owns the operator's read queries. The writes an operator makes (replay, manual
//! resolution, correction) are database functions called from [`super::jobs`]; nothing here
//! changes a job. Every query reads the hot `jobs` row through the indexes it already has (primary key,
//! `created_at`) or by a sequential scan: the team keeps `jobs` free of indexes on columns that
//! change on every transition so that transitions stay HOT updates, and a scan of a few hundred
//! thousand rows answers well inside the CLI's one-second budget (`dlq-bench` measures it).
//!
//! When a job died is its `updated_at`: the transition into `dead` sets it, and a dead job's row
//! changes again only when it leaves `dead` (replay or resolution). It equals the time of the
//! last `→ dead` row in `job_transitions` up to the few microseconds of the same transaction,
//! without a join per dead job.

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use crate::state::State;

/// Rejected message bodies are shown up to this many bytes (they can be 64 KiB and more).
pub const BODY_PREVIEW_BYTES: usize = 4096;

/// Which dead jobs to list or replay. `cause` also selects poison messages by kind
/// (`rejected`, `conflict`); poison messages belong to no provider or merchant and carry no
/// provider code, so a `provider`, `merchant` or `code` filter leaves them out. `since` is
/// when a job died (its `updated_at`) or a poison message last arrived; `limit` caps the dead
/// jobs (and poison messages) listed, or the groups.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub cause: Option<String>,
    pub provider: Option<String>,
    pub merchant: Option<String>,
    pub code: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
}

impl DeadFilter {
    /// Whether poison messages can match (they have no provider, merchant or code).
    pub fn admits_poison(&self) -> bool {
        self.provider.is_none() && self.merchant.is_none() && self.code.is_none()
    }
}

/// The dead-letter conditions on `jobs` for a [`DeadFilter`] bound as $1..$5 (cause, provider,
/// merchant, code, since): one text so the grouped and the per-job listing agree.
const DEAD_WHERE: &str = "state = 'dead' AND ($1::text IS NULL OR cause = $1)
           AND ($2::text IS NULL OR provider = $2)
           AND ($3::text IS NULL OR merchant = $3)
           AND ($4::text IS NULL OR last_code = $4)
           AND ($5::timestamptz IS NULL OR updated_at >= $5)
           AND NOT EXISTS (SELECT 1 FROM dlq_discards d WHERE d.refund_no = jobs.refund_no)";

/// The poison-message conditions for a kind and a `since`, bound as $1, $2.
const POISON_WHERE: &str = "($1::text IS NULL OR kind = $1)
           AND ($2::timestamptz IS NULL OR last_seen_at >= $2)
           AND NOT EXISTS (SELECT 1 FROM dlq_discards d WHERE d.poison_id = rejected_messages.id)";

/// One fingerprint of the dead-letter set: dead jobs with the same cause, provider and last
/// provider code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeadGroup {
    pub cause: String,
    pub provider: String,
    pub code: Option<String>,
    pub count: i64,
    /// When the longest-dead job of the group died.
    pub oldest: DateTime<Utc>,
    /// When the most recently dead job of the group died.
    pub newest: DateTime<Utc>,
    /// One of the group's last provider messages, to show what the code meant.
    pub sample_message: Option<String>,
}

/// Dead jobs grouped by fingerprint (cause, provider, last code), largest group first.
pub async fn dead_groups(pool: &PgPool, filter: &DeadFilter) -> Result<Vec<DeadGroup>, StoreError> {
    let sql = format!(
        "SELECT cause, provider, last_code AS code, count(*) AS count,
                min(updated_at) AS oldest, max(updated_at) AS newest,
                max(last_message) AS sample_message
         FROM jobs
         WHERE {DEAD_WHERE}
         GROUP BY cause, provider, last_code
         ORDER BY count(*) DESC, cause, provider, last_code NULLS FIRST
         LIMIT $6"
    );
    Ok(sqlx::query_as::<_, DeadGroup>(sqlx::AssertSqlSafe(sql))
        .bind(filter.cause.as_deref())
        .bind(filter.provider.as_deref())
        .bind(filter.merchant.as_deref())
        .bind(filter.code.as_deref())
        .bind(filter.since)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?)
}

/// One dead job, as `dlq list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeadJob {
    pub refund_no: String,
    pub order_no: String,
    pub provider: String,
    pub merchant: String,
    pub cause: String,
    pub code: Option<String>,
    pub message: Option<String>,
    pub attempts: i32,
    pub refund_fee: i64,
    pub created_at: DateTime<Utc>,
    pub died_at: DateTime<Utc>,
}

/// Every dead job matching the filter, longest dead first, streamed (the set can be large).
pub fn dead_jobs(
    pool: &PgPool,
    filter: DeadFilter,
) -> impl Stream<Item = Result<DeadJob, StoreError>> + Send + '_ {
    let sql = format!(
        "SELECT refund_no, order_no, provider, merchant, cause, last_code AS code,
                last_message AS message, attempt AS attempts, refund_fee, created_at,
                updated_at AS died_at
         FROM jobs
         WHERE {DEAD_WHERE}
         ORDER BY updated_at, refund_no
         LIMIT $6"
    );
    sqlx::query_as::<_, DeadJob>(sqlx::AssertSqlSafe(sql))
        .bind(filter.cause)
        .bind(filter.provider)
        .bind(filter.merchant)
        .bind(filter.code)
        .bind(filter.since)
        .bind(filter.limit)
        .fetch(pool)
        .map(|r| r.map_err(StoreError::from))
}

/// The `refund_no`s of dead jobs (all, or of one cause), longest dead first: what
/// `dlq replay --all` / `--cause` works through.
pub async fn dead_refund_nos(
    pool: &PgPool,
    cause: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT refund_no FROM jobs
         WHERE state = 'dead' AND ($1::text IS NULL OR cause = $1)
           AND NOT EXISTS (SELECT 1 FROM dlq_discards d WHERE d.refund_no = jobs.refund_no)
         ORDER BY updated_at, refund_no",
    )
    .bind(cause)
    .fetch_all(pool)
    .await?)
}

/// Poison messages (refused at intake, or conflicting with an existing `refund_no`) of one
/// kind and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PoisonGroup {
    /// `rejected` or `conflict`.
    pub kind: String,
    /// The field the reason names (`$` for the message as a whole).
    pub field: String,
    /// Distinct message bodies.
    pub messages: i64,
    /// Times they arrived (a body published again counts again).
    pub occurrences: i64,
    pub oldest: DateTime<Utc>,
    pub newest: DateTime<Utc>,
    /// The most recent reason of the group.
    pub sample_reason: String,
}

/// Poison messages grouped by kind and field, largest group first (see [`DeadFilter`] for
/// `since` and `limit`).
pub async fn poison_groups(
    pool: &PgPool,
    kind: Option<&str>,
    since: Option<DateTime<Utc>>,
    limit: Option<i64>,
) -> Result<Vec<PoisonGroup>, StoreError> {
    let sql = format!(
        "SELECT kind, field, count(*) AS messages, sum(occurrences)::bigint AS occurrences,
                min(first_seen_at) AS oldest, max(last_seen_at) AS newest,
                (array_agg(reason ORDER BY last_seen_at DESC, id DESC))[1] AS sample_reason
         FROM rejected_messages
         WHERE {POISON_WHERE}
         GROUP BY kind, field
         ORDER BY count(*) DESC, kind, field
         LIMIT $3"
    );
    Ok(sqlx::query_as::<_, PoisonGroup>(sqlx::AssertSqlSafe(sql))
        .bind(kind)
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// One stored poison message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoisonMessage {
    pub id: i64,
    pub kind: String,
    pub refund_no: Option<String>,
    pub field: String,
    pub reason: String,
    pub occurrences: i32,
    pub message_id: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// The body as text (invalid UTF-8 replaced), cut at [`BODY_PREVIEW_BYTES`].
    pub body: String,
    /// The body's full length in bytes.
    pub body_bytes: usize,
}

fn poison_from_row(r: sqlx::postgres::PgRow) -> Result<PoisonMessage, StoreError> {
    let body: Vec<u8> = r.try_get("body")?;
    Ok(PoisonMessage {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        refund_no: r.try_get("refund_no")?,
        field: r.try_get("field")?,
        reason: r.try_get("reason")?,
        occurrences: r.try_get("occurrences")?,
        message_id: r.try_get("message_id")?,
        first_seen_at: r.try_get("first_seen_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
        body: preview(&body),
        body_bytes: body.len(),
    })
}

/// The body as text, cut at [`BODY_PREVIEW_BYTES`] on a character boundary.
fn preview(body: &[u8]) -> String {
    let cut = &body[..body.len().min(BODY_PREVIEW_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if body.len() > BODY_PREVIEW_BYTES {
        // A multi-byte character split at the cut shows as U+FFFD; drop it.
        if text.ends_with('\u{FFFD}') {
            text.pop();
        }
        text.push('…');
    }
    text
}

/// Every poison message (of one kind, arrived since), oldest first, at most `limit`.
pub async fn poison_messages(
    pool: &PgPool,
    kind: Option<&str>,
    since: Option<DateTime<Utc>>,
    limit: Option<i64>,
) -> Result<Vec<PoisonMessage>, StoreError> {
    let sql = format!(
        "SELECT id, kind, refund_no, field, reason, occurrences, message_id, first_seen_at,
                last_seen_at, body
         FROM rejected_messages
         WHERE {POISON_WHERE}
         ORDER BY first_seen_at, id
         LIMIT $3"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kind)
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(poison_from_row)
        .collect()
}

/// A job found by another of its keys than `refund_no`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct JobMatch {
    pub refund_no: String,
    pub state: String,
    /// `order_no` or `provider_refund_id`: which key matched.
    pub matched: String,
}

/// The jobs whose `order_no` (by index) or provider refund id (the job's, or any attempt's:
/// a scan, as `job show` runs it once) is `key`, oldest first.
pub async fn jobs_by_other_key(pool: &PgPool, key: &str) -> Result<Vec<JobMatch>, StoreError> {
    Ok(sqlx::query_as::<_, JobMatch>(
        "SELECT refund_no, state, 'order_no' AS matched, created_at FROM jobs WHERE order_no = $1
         UNION
         SELECT j.refund_no, j.state, 'provider_refund_id', j.created_at FROM jobs j
         WHERE j.provider_refund_id = $1
            OR j.refund_no IN (SELECT refund_no FROM provider_attempts
                               WHERE provider_refund_id = $1)
         ORDER BY created_at, refund_no",
    )
    .bind(key)
    .fetch_all(pool)
    .await?)
}

/// The job row, everything an operator needs to judge it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobRecord {
    pub refund_no: String,
    pub order_no: String,
    pub provider: String,
    pub merchant: String,
    pub total_fee: i64,
    pub refund_fee: i64,
    pub state: String,
    pub cause: Option<String>,
    pub attempt: i32,
    pub lease_until: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_code: Option<String>,
    pub last_message: Option<String>,
    pub provider_refund_id: Option<String>,
    pub settlement_refund_fee: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Whether the merchant deduplicates on `refund_no`, as recorded at intake (`None`: a job
    /// from before that was recorded, not yet backfilled; treated as not idempotent).
    pub idempotent: Option<bool>,
    /// An attempt may have paid (maybe delivered, unrecognised or accepted, or a lease that
    /// ran out mid-call).
    pub maybe_paid: bool,
    /// The request as accepted at intake.
    pub request: serde_json::Value,
}

impl JobRecord {
    /// The state as the state machine knows it.
    pub fn state(&self) -> Result<State, StoreError> {
        self.state.parse().map_err(StoreError::Corrupt)
    }
}

/// One provider call. Request and response were redacted when they were written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: i64,
    pub attempt: i32,
    pub outcome: String,
    pub code: Option<String>,
    pub message: Option<String>,
    pub http_status: Option<i32>,
    pub latency_us: i64,
    pub request: String,
    pub response: Option<String>,
    pub provider_refund_id: Option<String>,
    pub refund_fee: Option<i64>,
    pub settlement_refund_fee: Option<i64>,
    pub coupon_refund_fee: Option<i64>,
    /// The call came back after its attempt had been superseded (kept, not applied).
    pub fenced: bool,
    pub recorded_at: DateTime<Utc>,
}

/// One row of the job's append-only transition history.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TransitionRow {
    pub id: i64,
    pub from_state: Option<String>,
    pub to_state: String,
    pub attempt: i32,
    pub actor: String,
    pub cause: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
}

/// One operator audit row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub refund_no: Option<String>,
    pub action: String,
    pub result: String,
    pub operator: String,
    pub note: String,
    pub prior_state: Option<String>,
    pub new_state: Option<String>,
    pub reason: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
}

/// One verified provider notify, as stored when it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct NotificationRow {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub status: String,
    /// `applied` (it moved the job) or `no_change` (a duplicate, or older than what we knew).
    pub effect: String,
    pub body: String,
}

/// Where the job stands in the status query schedule (accepted jobs, and jobs whose outcome
/// is unknown at a provider that can be asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StatusQueryRow {
    pub since: DateTime<Utc>,
    /// `None`: the schedule is over (given up, or the job ended).
    pub next_at: Option<DateTime<Utc>>,
    pub queries: i32,
    pub lease_until: Option<DateTime<Utc>>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
}

/// Reconciliation findings about one refund, if reconciliation is installed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Discrepancies {
    /// The reconciliation tables do not exist in this database (yet).
    NotInstalled,
    /// The rows, each as the table holds it (`run_id`, `kind`, `ledger_amount`, ...).
    Found { rows: Vec<serde_json::Value> },
    /// The table exists but could not be read as expected.
    Unavailable { error: String },
}

/// Everything known about one `refund_no`, read from one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDetail {
    pub refund_no: String,
    /// `None` when no job exists (a message with this `refund_no` may still have been
    /// rejected at intake: see `rejections`).
    pub job: Option<JobRecord>,
    pub attempts: Vec<AttemptRow>,
    pub transitions: Vec<TransitionRow>,
    pub audit: Vec<AuditRow>,
    /// Verified notifies about this refund, in arrival order.
    pub notifications: Vec<NotificationRow>,
    /// The status query schedule, while the job has one.
    pub status_query: Option<StatusQueryRow>,
    /// Rejected or conflicting messages that carried this `refund_no`.
    pub rejections: Vec<PoisonMessage>,
    pub discrepancies: Discrepancies,
}

impl JobDetail {
    /// Whether a job or a poison message has this `refund_no` (audit rows alone, such as a
    /// refused replay of an unknown number, do not count).
    pub fn found(&self) -> bool {
        self.job.is_some() || !self.rejections.is_empty()
    }
}

/// Reads a job with its calls, history, audit rows, poison messages and reconciliation
/// discrepancies, all from one repeatable-read snapshot.
pub async fn job_detail(pool: &PgPool, refund_no: &str) -> Result<JobDetail, StoreError> {
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let job = sqlx::query_as::<_, JobRecord>(
        "SELECT refund_no, order_no, provider, merchant, total_fee, refund_fee, state, cause,
                attempt, lease_until, next_attempt_at, last_code, last_message,
                provider_refund_id, settlement_refund_fee, created_at, updated_at, idempotent,
                maybe_paid, request
         FROM jobs WHERE refund_no = $1",
    )
    .bind(refund_no)
    .fetch_optional(&mut *tx)
    .await?;
    let attempts = sqlx::query_as::<_, AttemptRow>(
        "SELECT id, attempt, outcome, code, message, http_status, latency_us, request, response,
                provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee, fenced,
                recorded_at
         FROM provider_attempts WHERE refund_no = $1 ORDER BY attempt, id",
    )
    .bind(refund_no)
    .fetch_all(&mut *tx)
    .await?;
    let transitions = sqlx::query_as::<_, TransitionRow>(
        "SELECT id, from_state, to_state, attempt, actor, cause, detail, at
         FROM job_transitions WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(&mut *tx)
    .await?;
    let audit = sqlx::query_as::<_, AuditRow>(
        "SELECT id, refund_no, action, result, operator, note, prior_state, new_state, reason,
                detail, at
         FROM operator_audit WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(&mut *tx)
    .await?;
    let notifications = sqlx::query_as::<_, NotificationRow>(
        "SELECT id, received_at, status, effect, body
         FROM provider_notifications WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(&mut *tx)
    .await?;
    // 'infinity' marks a finished schedule; shown as none.
    let status_query = sqlx::query_as::<_, StatusQueryRow>(
        "SELECT since, CASE WHEN isfinite(next_at) THEN next_at END AS next_at, queries,
                lease_until, last_status, last_error
         FROM status_queries WHERE refund_no = $1",
    )
    .bind(refund_no)
    .fetch_optional(&mut *tx)
    .await?;
    let rejections = sqlx::query(
        "SELECT id, kind, refund_no, field, reason, occurrences, message_id, first_seen_at,
                last_seen_at, body
         FROM rejected_messages WHERE refund_no = $1 ORDER BY first_seen_at, id",
    )
    .bind(refund_no)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(poison_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let discrepancies = discrepancies(&mut tx, refund_no).await?;
    tx.commit().await?;
    Ok(JobDetail {
        refund_no: refund_no.to_owned(),
        job,
        attempts,
        transitions,
        audit,
        notifications,
        status_query,
        rejections,
        discrepancies,
    })
}

/// Reconciliation discrepancies for one refund, read only when the reconciler's tables exist:
/// from the view of each date's current (latest finished) run when there is one, else from the
/// table of every run. Each read runs inside a savepoint, so that a view this role may not read
/// or an unexpected shape of the table cannot fail the rest of `job show`.
async fn discrepancies(
    conn: &mut PgConnection,
    refund_no: &str,
) -> Result<Discrepancies, StoreError> {
    let (view, table): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('reconciliation_current_discrepancies') IS NOT NULL,
                to_regclass('reconciliation_discrepancies') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    // The whole row as JSON: shows whatever columns the reconciler keeps.
    let from_view = "SELECT to_jsonb(d) FROM reconciliation_current_discrepancies d
                     WHERE d.refund_no = $1 ORDER BY d.business_date, d.run_id";
    let from_table = "SELECT to_jsonb(d) FROM reconciliation_discrepancies d
                      WHERE d.refund_no = $1 ORDER BY d.run_id";
    let mut error = None;
    for (exists, sql) in [(view, from_view), (table, from_table)] {
        if !exists {
            continue;
        }
        match read_in_savepoint(conn, sql, refund_no).await? {
            Ok(rows) => return Ok(Discrepancies::Found { rows }),
            Err(e) => error = Some(e),
        }
    }
    Ok(match error {
        Some(error) => Discrepancies::Unavailable { error },
        None => Discrepancies::NotInstalled,
    })
}

/// Runs one JSON-rows query inside a savepoint: the rows, or the query's error (with the
/// savepoint rolled back, so the transaction goes on).
async fn read_in_savepoint(
    conn: &mut PgConnection,
    sql: &'static str,
    refund_no: &str,
) -> Result<Result<Vec<serde_json::Value>, String>, StoreError> {
    sqlx::query("SAVEPOINT discrepancies")
        .execute(&mut *conn)
        .await?;
    let rows = sqlx::query_scalar::<_, serde_json::Value>(sql)
        .bind(refund_no)
        .fetch_all(&mut *conn)
        .await;
    let end = if rows.is_ok() {
        "RELEASE SAVEPOINT discrepancies"
    } else {
        "ROLLBACK TO SAVEPOINT discrepancies"
    };
    sqlx::query(end).execute(&mut *conn).await?;
    Ok(rows.map_err(|e| e.to_string()))
}

/// The request of a job as stored at intake (inside the caller's transaction).
pub async fn job_request(
    conn: &mut PgConnection,
    refund_no: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT request FROM jobs WHERE refund_no = $1")
            .bind(refund_no)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// What a replay would decide about a job, read without touching it: state, cause, where it
/// is paid, and the refusal.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReplayFacts {
    pub state: String,
    pub cause: Option<String>,
    pub provider: String,
    pub merchant: String,
    /// As recorded on the job at intake; false when it was not recorded.
    pub idempotent: bool,
    /// The provider's statements showed its current attempts unpaid.
    pub not_paid_per_statement: bool,
    /// An operator discarded it from the dead letters (`dlq discard`).
    pub discarded: bool,
    /// Why a replay would be refused now (`operator_replay_refusal`, the rule the replay
    /// itself applies under the row lock), if it would.
    pub refusal: Option<String>,
}

/// Reads a job's state, cause, provider, merchant and recorded idempotence without locking
/// (for dry runs).
pub async fn replay_facts(
    pool: &PgPool,
    refund_no: &str,
) -> Result<Option<ReplayFacts>, StoreError> {
    Ok(sqlx::query_as::<_, ReplayFacts>(
        "SELECT f.*, operator_replay_refusal(f.state, f.cause, f.idempotent,
                                             f.not_paid_per_statement, f.discarded) AS refusal
         FROM (SELECT state, cause, provider, merchant,
                      COALESCE(idempotent, false) AS idempotent,
                      EXISTS (SELECT 1 FROM statement_verdicts v
                              WHERE v.refund_no = jobs.refund_no AND v.verdict = 'not_paid'
                                AND v.attempt = jobs.attempt) AS not_paid_per_statement,
                      EXISTS (SELECT 1 FROM dlq_discards d
                              WHERE d.refund_no = jobs.refund_no) AS discarded
               FROM jobs WHERE refund_no = $1) f",
    )
    .bind(refund_no)
    .fetch_optional(pool)
    .await?)
}

/// A job that has waited longest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OldestJob {
    pub refund_no: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub age_seconds: i64,
}

/// The oldest job in one of `states` (walks the `created_at` index).
pub async fn oldest_in(pool: &PgPool, states: &[State]) -> Result<Option<OldestJob>, StoreError> {
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    Ok(sqlx::query_as::<_, OldestJob>(
        "SELECT refund_no, state, created_at,
                floor(extract(epoch FROM now() - created_at))::bigint AS age_seconds
         FROM jobs WHERE state = ANY($1) ORDER BY created_at LIMIT 1",
    )
    .bind(&states)
    .fetch_optional(pool)
    .await?)
}

/// Stored poison messages not discarded: distinct bodies and total arrivals.
pub async fn poison_totals(pool: &PgPool) -> Result<(i64, i64), StoreError> {
    let r = sqlx::query(
        "SELECT count(*) AS messages, COALESCE(sum(occurrences), 0)::bigint AS occurrences
         FROM rejected_messages WHERE NOT EXISTS (SELECT 1 FROM dlq_discards d WHERE d.poison_id = rejected_messages.id)",
    )
    .fetch_one(pool)
    .await?;
    Ok((r.try_get("messages")?, r.try_get("occurrences")?))
}

/// Dead-letter items discarded by operators (`dlq discard`): dead jobs, poison messages.
pub async fn discarded_totals(pool: &PgPool) -> Result<(i64, i64), StoreError> {
    let r = sqlx::query(
        "SELECT count(refund_no) AS jobs, count(poison_id) AS poison FROM dlq_discards",
    )
    .fetch_one(pool)
    .await?;
    Ok((r.try_get("jobs")?, r.try_get("poison")?))
}

/// The dead-letter depth: what waits for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DlqCounts {
    /// Dead jobs not discarded.
    pub dead_jobs: i64,
    /// Distinct stored poison messages not discarded.
    pub poison_messages: i64,
    /// Dead jobs and poison messages operators discarded (`dlq discard`), out of the depth.
    pub discarded: i64,
}

impl DlqCounts {
    /// Dead jobs plus poison messages.
    pub fn depth(&self) -> i64 {
        self.dead_jobs + self.poison_messages
    }
}

/// The dead-letter depth, given how many jobs are `dead` (the caller has counted states).
pub async fn dlq_counts(pool: &PgPool, dead_total: i64) -> Result<DlqCounts, StoreError> {
    let (discarded_jobs, discarded_poison) = discarded_totals(pool).await?;
    let (poison_messages, _) = poison_totals(pool).await?;
    Ok(DlqCounts {
        dead_jobs: dead_total - discarded_jobs,
        poison_messages,
        discarded: discarded_jobs + discarded_poison,
    })
}

/// Jobs by state, and the dead ones not discarded by cause, from one read of `jobs` (what
/// the worker's full sweep exports as gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCensus {
    pub by_state: std::collections::BTreeMap<State, i64>,
    /// Dead jobs outstanding (not discarded), by cause.
    pub dead_by_cause: std::collections::BTreeMap<String, i64>,
}

/// Counts [`JobCensus`] in one sequential read of `jobs`.
pub async fn job_census(pool: &PgPool) -> Result<JobCensus, StoreError> {
    let rows = sqlx::query(
        "SELECT j.state, j.cause, d.refund_no IS NOT NULL AS discarded, count(*) AS n
         FROM jobs j LEFT JOIN dlq_discards d ON d.refund_no = j.refund_no
         GROUP BY 1, 2, 3",
    )
    .persistent(false)
    .fetch_all(pool)
    .await?;
    let mut census = JobCensus::default();
    for r in rows {
        let state: State = r
            .try_get::<String, _>("state")?
            .parse()
            .map_err(StoreError::Corrupt)?;
        let n: i64 = r.try_get("n")?;
        *census.by_state.entry(state).or_default() += n;
        let discarded: bool = r.try_get("discarded")?;
        if let (State::Dead, false, Some(cause)) =
            (state, discarded, r.try_get::<Option<String>, _>("cause")?)
        {
            *census.dead_by_cause.entry(cause).or_default() += n;
        }
    }
    Ok(census)
}

/// Applied migrations: (version, description), in order.
pub async fn applied_migrations(pool: &PgPool) -> Result<Vec<(i64, String)>, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("version")?, r.try_get("description")?)))
        .collect()
}
