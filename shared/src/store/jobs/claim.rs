//! Claims: taking jobs to `in_flight` for one attempt each, and finding a claim's jobs again
//! when its reply was lost. Claimed rows are read one by one, so that one row that cannot be
//! read back into a job strands no other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::job::RefundRequest;
use crate::state::State;
use crate::store::StoreError;
use crate::workflow::History;

use super::millis;

/// A job a worker holds: what to send and the attempt that fences its writes.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub refund_no: String,
    /// The state the claim took the job from (`received` or `retry_wait`).
    pub from: State,
    pub attempt: i32,
    pub request: RefundRequest,
    pub created_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    /// Attempts not counted against the retry budget: the attempt number at the job's last
    /// replay (0 if never replayed), plus the claims given back without a call and the
    /// throttled calls since. The budget counts the attempts beyond it.
    pub retry_base: i32,
    /// When the job was last replayed: the retry budget's age counts from then.
    pub retry_since: Option<DateTime<Utc>>,
    /// Whether the merchant deduplicates on `refund_no`, as recorded when the job was created.
    pub idempotent: bool,
    /// What the job's earlier attempts left behind.
    pub history: History,
    /// Throttled calls not counted against the retry budget, over the job's life.
    pub spared_attempts: i32,
}

impl Claimed {
    /// Attempts made since the job was created or last replayed, this one included.
    pub fn budget_attempt(&self) -> i32 {
        self.attempt.saturating_sub(self.retry_base)
    }

    /// When the current retry budget started: creation, or the last replay.
    pub fn budget_start(&self) -> DateTime<Utc> {
        self.retry_since.unwrap_or(self.created_at)
    }
}

/// A claimed row that could not be read back into a job (its stored request does not parse):
/// it is never sent, and goes to an operator.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub refund_no: String,
    pub attempt: i32,
    pub error: String,
}

/// What one claim statement took: the jobs to send, and the rows it could not read.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub claimed: Vec<Claimed>,
    pub unreadable: Vec<Unreadable>,
}

/// Marks the rows one claim statement took, so that they can be found again if its reply is
/// lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimToken(uuid::Uuid);

impl Default for ClaimToken {
    fn default() -> Self {
        Self::new()
    }
}

impl ClaimToken {
    /// A token no other claim statement has.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

/// Reads claimed rows one by one, so that one unreadable row strands no other job.
fn read_claims(rows: Vec<sqlx::postgres::PgRow>) -> Result<Claims, StoreError> {
    let mut claims = Claims::default();
    for r in rows {
        let refund_no: String = r.try_get("refund_no")?;
        let attempt: i32 = r.try_get("attempt")?;
        match read_claim(&r, &refund_no, attempt) {
            Ok(c) => claims.claimed.push(c),
            Err(e) => claims.unreadable.push(Unreadable {
                refund_no,
                attempt,
                error: e.to_string(),
            }),
        }
    }
    Ok(claims)
}

fn read_claim(
    r: &sqlx::postgres::PgRow,
    refund_no: &str,
    attempt: i32,
) -> Result<Claimed, StoreError> {
    let request: serde_json::Value = r.try_get("request")?;
    let from: String = r.try_get("from_state")?;
    let request: RefundRequest = serde_json::from_value(request)
        .map_err(|e| StoreError::Corrupt(format!("jobs.request: {e}")))?;
    request
        .validate()
        .map_err(|e| StoreError::Corrupt(format!("jobs.request: {e}")))?;
    if request.refund_no != refund_no {
        return Err(StoreError::Corrupt(format!(
            "jobs.request names refund_no {:?}",
            request.refund_no
        )));
    }
    Ok(Claimed {
        refund_no: refund_no.to_owned(),
        from: from.parse().map_err(StoreError::Corrupt)?,
        attempt,
        request,
        created_at: r.try_get("created_at")?,
        lease_until: r.try_get("lease_until")?,
        retry_base: r.try_get("retry_base")?,
        spared_attempts: r.try_get("spared_attempts")?,
        retry_since: r.try_get("retry_since")?,
        // A job from before idempotence was recorded, not yet backfilled: the side that never
        // resends a maybe-delivered request.
        idempotent: r.try_get::<Option<bool>, _>("idempotent")?.unwrap_or(false),
        history: History {
            maybe_paid: r.try_get("maybe_paid")?,
        },
    })
}

/// Claims jobs that are `received`, or `retry_wait` and due, for one attempt each, in one
/// statement marked with `token`; jobs another worker holds locked are skipped. Each job is
/// looked up by its key (a lateral join, so no plan can turn it into a scan of `jobs`), and the
/// statement is not kept prepared, so the update's plan is made for the batch at hand. If the
/// reply is lost, [`claimed_by`] with the same token finds what it claimed.
pub async fn claim(
    pool: &PgPool,
    refund_nos: &[String],
    lease: Duration,
    actor: &str,
    token: ClaimToken,
) -> Result<Claims, StoreError> {
    let rows = sqlx::query(
        "WITH prev AS (
             SELECT j.refund_no, j.state FROM unnest($1::text[]) AS u(refund_no)
             CROSS JOIN LATERAL (
                 SELECT refund_no, state FROM jobs
                 WHERE refund_no = u.refund_no AND state IN ('received', 'retry_wait')
                   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                 FOR UPDATE SKIP LOCKED
             ) j
         ), upd AS (
             UPDATE jobs j SET state = 'in_flight', attempt = j.attempt + 1,
                    lease_until = now() + $2 * interval '1 millisecond',
                    last_lease_until = now() + $2 * interval '1 millisecond',
                    claim_token = $4, next_attempt_at = NULL, updated_at = now()
             FROM prev WHERE j.refund_no = prev.refund_no
             RETURNING j.refund_no, prev.state AS from_state, j.attempt, j.request,
                       j.created_at, j.lease_until, j.retry_base, j.retry_since, j.idempotent,
                       j.maybe_paid, j.spared_attempts
         ), hist AS (
             INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor)
             SELECT refund_no, from_state, 'in_flight', attempt, $3 FROM upd
         )
         SELECT * FROM upd",
    )
    .persistent(false)
    .bind(refund_nos)
    .bind(millis(lease))
    .bind(actor)
    .bind(token.0)
    .fetch_all(pool)
    .await?;
    read_claims(rows)
}

/// The jobs among `refund_nos` that the claim statement marked `token` holds in flight: what a
/// worker whose claim reply was lost claimed.
pub async fn claimed_by(
    pool: &PgPool,
    refund_nos: &[String],
    token: ClaimToken,
) -> Result<Claims, StoreError> {
    let rows = sqlx::query(
        "SELECT j.refund_no, j.attempt, j.request, j.created_at, j.lease_until, j.retry_base,
                j.retry_since, j.idempotent, j.maybe_paid, j.spared_attempts,
                (SELECT t.from_state FROM job_transitions t
                 WHERE t.refund_no = j.refund_no AND t.attempt = j.attempt
                   AND t.to_state = 'in_flight'
                 ORDER BY t.id DESC LIMIT 1) AS from_state
         FROM jobs j
         WHERE j.refund_no = ANY($1) AND j.claim_token = $2 AND j.state = 'in_flight'",
    )
    .persistent(false)
    .bind(refund_nos)
    .bind(token.0)
    .fetch_all(pool)
    .await?;
    read_claims(rows)
}
