//! Claims, transitions and outcomes: the writes of a job's life.
//!
//! A claim moves a job to `in_flight`, increments its attempt (the fencing token) and sets a
//! lease from the database clock, so every worker agrees on when it ends. Every later write for
//! that attempt is conditional on the attempt still being the job's, so a worker that stalled
//! past its lease cannot overwrite a newer attempt's result; its provider call is still kept in
//! `provider_attempts` (marked `fenced`), because a paid refund must never go unrecorded.

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use super::text::{storable, storable_opt};
use crate::events::{EventKind, OutcomeEvent, format_time};
use crate::job::RefundRequest;
use crate::provider::{AttemptRecord, Outcome};
use crate::state::{self, Cause, State, Trigger};
use crate::workflow::{Decision, History};

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
    /// The attempt number at the job's last replay (0 if never replayed): the retry budget
    /// counts attempts after it.
    pub retry_base: i32,
    /// When the job was last replayed: the retry budget's age counts from then.
    pub retry_since: Option<DateTime<Utc>>,
    /// Whether the merchant deduplicates on `refund_no`, as recorded when the job was created.
    pub idempotent: bool,
    /// What the job's earlier attempts left behind.
    pub history: History,
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

impl ClaimToken {
    /// A token no other claim statement has.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for ClaimToken {
    fn default() -> Self {
        Self::new()
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
        retry_since: r.try_get("retry_since")?,
        // A job from before idempotence was recorded, not yet backfilled: the side that never
        // resends a maybe-delivered request.
        idempotent: r.try_get::<Option<bool>, _>("idempotent")?.unwrap_or(false),
        history: History {
            maybe_paid: r.try_get("maybe_paid")?,
        },
    })
}

/// A state change to make, checked against [`state::TRANSITIONS`].
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub refund_no: &'a str,
    pub trigger: Trigger,
    pub to: State,
    /// Fencing: only apply if the job is still at this attempt.
    pub attempt: Option<i32>,
    pub actor: &'a str,
    pub cause: Option<&'a str>,
    pub retry_in: Option<Duration>,
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
    pub provider_refund_id: Option<&'a str>,
    pub settlement_refund_fee: Option<i64>,
    pub detail: Option<serde_json::Value>,
    /// The attempt this change ends may have paid (a lease that ran out mid-call).
    pub maybe_paid: bool,
}

impl<'a> Change<'a> {
    pub fn new(refund_no: &'a str, trigger: Trigger, to: State, actor: &'a str) -> Self {
        Self {
            refund_no,
            trigger,
            to,
            attempt: None,
            actor,
            cause: None,
            retry_in: None,
            code: None,
            message: None,
            provider_refund_id: None,
            settlement_refund_fee: None,
            detail: None,
            maybe_paid: false,
        }
    }
}

/// The job as it is after a transition.
#[derive(Debug, Clone)]
pub struct Transitioned {
    pub refund_no: String,
    pub from: State,
    pub to: State,
    pub attempt: i32,
    pub order_no: String,
    pub provider: String,
    pub merchant: String,
    pub refund_fee: i64,
    pub settlement_refund_fee: Option<i64>,
    pub provider_refund_id: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
    /// Why the job is dead, as written (the history may have changed the cause asked for).
    pub cause: Option<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
                       j.maybe_paid
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
                j.retry_since, j.idempotent, j.maybe_paid,
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

/// Applies one allowed transition with its history row; `None` if the job was not in a source
/// state (or not at the fencing attempt).
pub async fn transition(
    conn: &mut PgConnection,
    change: &Change<'_>,
) -> Result<Option<Transitioned>, StoreError> {
    let sources: Vec<&str> = state::sources(change.trigger, change.to)
        .into_iter()
        .map(State::as_str)
        .collect();
    if sources.is_empty() {
        return Err(StoreError::IllegalTransition {
            from: change.to,
            to: change.to,
            trigger: change.trigger,
        });
    }
    let row = sqlx::query(
        "WITH prev AS (
             SELECT refund_no, state FROM jobs
             WHERE refund_no = $1 AND state = ANY($2) AND ($3::int IS NULL OR attempt = $3)
             FOR UPDATE
         ), upd AS (
             UPDATE jobs j SET state = $4,
                    -- A dead job that may have been paid says so, whatever ended it.
                    cause = CASE WHEN $4 = 'dead' AND j.maybe_paid THEN 'outcome_unknown'
                                 ELSE $5 END,
                    maybe_paid = j.maybe_paid OR $13,
                    lease_until = NULL,
                    next_attempt_at = CASE WHEN $6::bigint IS NULL THEN NULL
                                           ELSE now() + $6 * interval '1 millisecond' END,
                    last_code = $7, last_message = $8,
                    provider_refund_id = COALESCE($9, j.provider_refund_id),
                    settlement_refund_fee = COALESCE($10, j.settlement_refund_fee),
                    updated_at = now()
             FROM prev WHERE j.refund_no = prev.refund_no
             RETURNING j.refund_no, prev.state AS from_state, j.attempt, j.order_no, j.provider,
                       j.merchant, j.refund_fee, j.settlement_refund_fee, j.provider_refund_id,
                       j.last_code, j.last_message, j.cause
         ), hist AS (
             INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor, cause, detail)
             SELECT refund_no, from_state, $4, attempt, $11, cause, $12 FROM upd
         )
         SELECT * FROM upd",
    )
    .bind(change.refund_no)
    .bind(&sources)
    .bind(change.attempt)
    .bind(change.to.as_str())
    .bind(change.cause)
    .bind(change.retry_in.map(millis))
    .bind(change.code)
    .bind(change.message)
    .bind(change.provider_refund_id)
    .bind(change.settlement_refund_fee)
    .bind(change.actor)
    .bind(&change.detail)
    .bind(change.maybe_paid)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let from: String = r.try_get("from_state")?;
    let from = from.parse::<State>().map_err(StoreError::Corrupt)?;
    if !state::allowed(from, change.to, change.trigger) {
        return Err(StoreError::IllegalTransition {
            from,
            to: change.to,
            trigger: change.trigger,
        });
    }
    Ok(Some(Transitioned {
        refund_no: r.try_get("refund_no")?,
        from,
        to: change.to,
        attempt: r.try_get("attempt")?,
        order_no: r.try_get("order_no")?,
        provider: r.try_get("provider")?,
        merchant: r.try_get("merchant")?,
        refund_fee: r.try_get("refund_fee")?,
        settlement_refund_fee: r.try_get("settlement_refund_fee")?,
        provider_refund_id: r.try_get("provider_refund_id")?,
        code: r.try_get("last_code")?,
        message: r.try_get("last_message")?,
        cause: r.try_get("cause")?,
    }))
}

/// Appends the ledger entry of a succeeded refund, dated in the business time zone.
pub async fn insert_ledger_entry(
    conn: &mut PgConnection,
    t: &Transitioned,
    refund_fee: i64,
    settlement_refund_fee: i64,
    source: &str,
    tz: chrono_tz::Tz,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source)
         VALUES ($1, 'refund', $2, $3, $4, $5, $6, (now() AT TIME ZONE $7)::date, $8)",
    )
    .bind(&t.refund_no)
    .bind(&t.provider)
    .bind(&t.merchant)
    .bind(&t.provider_refund_id)
    .bind(refund_fee)
    .bind(settlement_refund_fee)
    .bind(tz.name())
    .bind(source)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Gives a definitively failed refund's amount back to its order's cumulative cap.
pub async fn release_order_amount(
    conn: &mut PgConnection,
    order_no: &str,
    amount: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE orders SET committed_fee = committed_fee - $2 WHERE order_no = $1")
        .bind(order_no)
        .bind(amount)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Writes the outcome event of a transition to the outbox.
pub async fn insert_event(
    conn: &mut PgConnection,
    kind: EventKind,
    t: &Transitioned,
    tz: chrono_tz::Tz,
) -> Result<(), StoreError> {
    super::outbox::insert(conn, &outcome_event(kind, t, tz)).await
}

/// The outcome event of a transition, as published.
fn outcome_event(kind: EventKind, t: &Transitioned, tz: chrono_tz::Tz) -> OutcomeEvent {
    OutcomeEvent {
        version: 1,
        event: kind,
        refund_no: t.refund_no.clone(),
        order_no: Some(t.order_no.clone()),
        provider: Some(t.provider.clone()),
        merchant: Some(t.merchant.clone()),
        state: t.to,
        refund_fee: Some(t.refund_fee),
        settlement_refund_fee: t.settlement_refund_fee.filter(|_| t.to == State::Succeeded),
        provider_refund_id: t
            .provider_refund_id
            .clone()
            .filter(|_| t.to == State::Succeeded),
        error_code: t.code.clone().filter(|_| t.to != State::Succeeded),
        error_message: t.message.clone().filter(|_| t.to != State::Succeeded),
        attempts: t.attempt,
        occurred_at: format_time(Utc::now(), tz),
    }
}

/// How an outcome was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The job moved to this state.
    Applied(State),
    /// The job had moved on (lease expired, newer attempt): only the attempt was kept.
    Fenced,
}

/// One provider call to record, with the decision taken on it.
#[derive(Debug, Clone)]
pub struct OutcomeToRecord {
    pub claimed: Claimed,
    pub rec: AttemptRecord,
    pub decision: Decision,
}

impl OutcomeToRecord {
    /// The transition the decision asks for: trigger, target state, cause and retry delay.
    fn change(&self) -> (Trigger, State, Option<Cause>, Option<Duration>) {
        match &self.decision {
            Decision::Succeed => (Trigger::Accepted, State::Succeeded, None, None),
            Decision::Fail => (Trigger::Declined, State::Failed, None, None),
            Decision::Retry { after } => (
                Trigger::RetryScheduled,
                State::RetryWait,
                None,
                Some(*after),
            ),
            Decision::Dead { cause } => (Trigger::Died, State::Dead, Some(*cause), None),
        }
    }

    /// The job as it will be if the transition applies (for its outcome event).
    fn expected(&self, to: State) -> Transitioned {
        let req = &self.claimed.request;
        let (prid, settle) = match &self.rec.outcome {
            Outcome::Accepted {
                provider_refund_id,
                settlement_refund_fee,
                ..
            } => (
                Some(provider_refund_id.clone()),
                Some(*settlement_refund_fee),
            ),
            _ => (None, None),
        };
        Transitioned {
            refund_no: self.claimed.refund_no.clone(),
            from: State::InFlight,
            to,
            attempt: self.claimed.attempt,
            order_no: req.order_no.clone(),
            provider: req.provider.as_str().to_owned(),
            merchant: req.merchant.clone(),
            refund_fee: req.refund_fee,
            settlement_refund_fee: settle,
            provider_refund_id: prid.map(|p| storable(&p).into_owned()),
            code: storable_opt(self.rec.outcome.code()).map(Cow::into_owned),
            message: storable_opt(self.rec.outcome.message()).map(Cow::into_owned),
            cause: self.change().2.map(|c| c.as_str().to_owned()),
        }
    }
}

/// Records one provider call and the decision taken on it; see [`record_outcomes`].
pub async fn record_outcome(
    pool: &PgPool,
    claimed: &Claimed,
    rec: &AttemptRecord,
    decision: &Decision,
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<Recorded, StoreError> {
    let item = OutcomeToRecord {
        claimed: claimed.clone(),
        rec: rec.clone(),
        decision: decision.clone(),
    };
    let mut recorded = record_outcomes(pool, &[&item], actor, tz).await?;
    recorded
        .pop()
        .ok_or_else(|| StoreError::Corrupt("no result for a recorded outcome".into()))
}

/// Records provider calls and the decisions taken on them — per job the attempt row, the
/// transition with its history row, the ledger entry of a success, the order amount given back
/// by a failure, and the outcome event — for many jobs in one statement, so one commit.
///
/// Each job's writes are fenced on its claiming attempt: a job that has moved on (lease
/// expired, newer attempt) gets only its attempt row, marked `fenced`, and `Recorded::Fenced`.
/// The statement is not kept prepared: its plan is made for the batch at hand and the table as
/// it is (a cached generic plan made while `jobs` was small would scan it sequentially).
pub async fn record_outcomes(
    pool: &PgPool,
    items: &[&OutcomeToRecord],
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<Vec<Recorded>, StoreError> {
    let n = items.len();
    let mut refund_no = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut to_state = Vec::with_capacity(n);
    let mut cause = Vec::with_capacity(n);
    let mut retry_ms = Vec::with_capacity(n);
    let mut code = Vec::with_capacity(n);
    let mut message = Vec::with_capacity(n);
    let mut prid = Vec::with_capacity(n);
    let mut fee = Vec::with_capacity(n);
    let mut settle = Vec::with_capacity(n);
    let mut coupon = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut http_status = Vec::with_capacity(n);
    let mut request = Vec::with_capacity(n);
    let mut response = Vec::with_capacity(n);
    let mut latency_us = Vec::with_capacity(n);
    let mut provider = Vec::with_capacity(n);
    let mut merchant = Vec::with_capacity(n);
    let mut event_key = Vec::with_capacity(n);
    let mut payload = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut maybe_paid = Vec::with_capacity(n);
    // What the provider said is stored as PostgreSQL can hold it (see `text`): a NUL in an
    // answer must not make the attempt, the evidence, unrecordable.
    let texts: Vec<[Option<Cow<str>>; 5]> = items
        .iter()
        .map(|item| {
            let o = &item.rec.outcome;
            let prid = match o {
                Outcome::Accepted {
                    provider_refund_id, ..
                } => Some(provider_refund_id.as_str()),
                _ => None,
            };
            [
                storable_opt(o.code()),
                storable_opt(o.message()),
                storable_opt(prid),
                Some(storable(&item.rec.request_redacted)),
                storable_opt(o.raw()),
            ]
        })
        .collect();
    for (item, [t_code, t_message, t_prid, t_request, t_response]) in items.iter().zip(&texts) {
        let (trigger, to, why, retry_in) = item.change();
        if !state::allowed(State::InFlight, to, trigger) {
            return Err(StoreError::IllegalTransition {
                from: State::InFlight,
                to,
                trigger,
            });
        }
        let (f, s, c) = match &item.rec.outcome {
            Outcome::Accepted {
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => (
                Some(*refund_fee),
                Some(*settlement_refund_fee),
                Some(*coupon_refund_fee),
            ),
            _ => (None, None, None),
        };
        let event = match EventKind::for_state(to) {
            Some(kind) => {
                let e = outcome_event(kind, &item.expected(to), tz);
                let json =
                    serde_json::to_string(&e).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                (Some(kind.routing_key()), Some(json))
            }
            None => (None, None),
        };
        refund_no.push(item.claimed.refund_no.as_str());
        attempt.push(item.claimed.attempt);
        to_state.push(to.as_str());
        cause.push(why.map(Cause::as_str));
        retry_ms.push(retry_in.map(millis));
        code.push(t_code.as_deref());
        message.push(t_message.as_deref());
        prid.push(t_prid.as_deref());
        fee.push(f);
        settle.push(s);
        coupon.push(c);
        outcome.push(item.rec.outcome.class());
        http_status.push(item.rec.http_status.map(i32::from));
        request.push(t_request.as_deref().unwrap_or_default());
        response.push(t_response.as_deref());
        maybe_paid.push(item.rec.outcome.may_have_paid());
        latency_us.push(i64::try_from(item.rec.latency.as_micros()).unwrap_or(i64::MAX));
        provider.push(item.claimed.request.provider.as_str());
        merchant.push(item.claimed.request.merchant.as_str());
        event_key.push(event.0);
        payload.push(event.1);
        targets.push(to);
    }
    let rows = sqlx::query(
        "WITH u AS (
             SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::int8[],
                 $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[],
                 $12::text[], $13::int4[], $14::text[], $15::text[], $16::int8[], $17::text[],
                 $18::text[], $19::text[], $20::text[], $23::bool[])
               AS u(refund_no, attempt, to_state, cause, retry_ms, code, message, prid, fee,
                    settle, coupon, outcome, http_status, request, response, latency_us,
                    provider, merchant, event_key, payload, maybe_paid)
         ), upd AS (
             UPDATE jobs j SET state = u.to_state,
                    -- A dead job that may have been paid says so (a fenced attempt of another
                    -- worker may have learnt that since this one's claim).
                    cause = CASE WHEN u.to_state = 'dead' AND j.maybe_paid
                                 THEN 'outcome_unknown' ELSE u.cause END,
                    maybe_paid = j.maybe_paid OR u.maybe_paid,
                    lease_until = NULL,
                    next_attempt_at = now() + u.retry_ms * interval '1 millisecond',
                    last_code = u.code, last_message = u.message,
                    provider_refund_id = COALESCE(u.prid, j.provider_refund_id),
                    settlement_refund_fee = COALESCE(u.settle, j.settlement_refund_fee),
                    updated_at = now()
             FROM u
             WHERE j.refund_no = u.refund_no AND j.state = 'in_flight' AND j.attempt = u.attempt
             RETURNING j.refund_no, j.attempt, j.order_no, j.refund_fee, j.cause AS final_cause
         ), fenced AS (
             -- A fenced answer that may have paid still marks its job: the next attempt's
             -- decline must not be taken as final. The complement of `upd`'s condition, so no
             -- row is updated twice.
             UPDATE jobs j SET maybe_paid = true
             FROM u
             WHERE j.refund_no = u.refund_no AND u.maybe_paid AND NOT j.maybe_paid
               AND NOT (j.state = 'in_flight' AND j.attempt = u.attempt)
         ), done AS (
             SELECT u.*, upd.order_no, upd.refund_fee AS job_fee, upd.final_cause
             FROM upd JOIN u USING (refund_no, attempt)
         ), hist AS (
             INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor, cause,
                 detail)
             SELECT refund_no, 'in_flight', to_state, attempt, $21, final_cause,
                    jsonb_build_object('outcome', outcome)
             FROM done
         ), att AS (
             INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, code,
                 message, http_status, request, response, latency_us, provider_refund_id,
                 refund_fee, settlement_refund_fee, coupon_refund_fee, fenced)
             SELECT u.refund_no, u.attempt, u.provider, u.merchant, u.outcome, u.code, u.message,
                    u.http_status, u.request, u.response, u.latency_us, u.prid, u.fee, u.settle,
                    u.coupon, upd.refund_no IS NULL
             FROM u LEFT JOIN upd USING (refund_no, attempt)
         ), led AS (
             INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
                 refund_fee, settlement_refund_fee, business_date, source)
             SELECT refund_no, 'refund', provider, merchant, prid, fee, settle,
                    (now() AT TIME ZONE $22)::date, 'provider'
             FROM done WHERE to_state = 'succeeded' AND settle IS NOT NULL
         ), rel AS (
             UPDATE orders o SET committed_fee = o.committed_fee - f.amount
             FROM (SELECT order_no, sum(job_fee)::bigint AS amount FROM done
                   WHERE to_state = 'failed' GROUP BY order_no) f
             WHERE o.order_no = f.order_no
         ), ev AS (
             INSERT INTO outbox (routing_key, refund_no, payload)
             SELECT event_key, refund_no, payload::jsonb FROM done WHERE event_key IS NOT NULL
         )
         SELECT refund_no, attempt FROM upd",
    )
    .persistent(false)
    .bind(&refund_no)
    .bind(&attempt)
    .bind(&to_state)
    .bind(&cause)
    .bind(&retry_ms)
    .bind(&code)
    .bind(&message)
    .bind(&prid)
    .bind(&fee)
    .bind(&settle)
    .bind(&coupon)
    .bind(&outcome)
    .bind(&http_status)
    .bind(&request)
    .bind(&response)
    .bind(&latency_us)
    .bind(&provider)
    .bind(&merchant)
    .bind(&event_key)
    .bind(&payload)
    .bind(actor)
    .bind(tz.name())
    .bind(&maybe_paid)
    .fetch_all(pool)
    .await?;
    let mut applied = std::collections::HashSet::with_capacity(rows.len());
    for r in rows {
        let no: String = r.try_get("refund_no")?;
        let at: i32 = r.try_get("attempt")?;
        applied.insert((no, at));
    }
    Ok(items
        .iter()
        .zip(targets)
        .map(|(item, to)| {
            let key = (item.claimed.refund_no.clone(), item.claimed.attempt);
            if applied.contains(&key) {
                Recorded::Applied(to)
            } else {
                Recorded::Fenced
            }
        })
        .collect())
}

/// Records on jobs created before idempotence was recorded at intake their merchant's setting
/// in `merchants` (provider, merchant, idempotent); how many jobs it filled in. Jobs of a
/// merchant not in the list keep no record and count as not idempotent.
pub async fn backfill_idempotent(
    pool: &PgPool,
    merchants: &[(String, String, bool)],
) -> Result<u64, StoreError> {
    let provider: Vec<&str> = merchants.iter().map(|m| m.0.as_str()).collect();
    let merchant: Vec<&str> = merchants.iter().map(|m| m.1.as_str()).collect();
    let idempotent: Vec<bool> = merchants.iter().map(|m| m.2).collect();
    Ok(sqlx::query(
        "UPDATE jobs j SET idempotent = m.idempotent
         FROM unnest($1::text[], $2::text[], $3::bool[]) AS m(provider, merchant, idempotent)
         WHERE j.idempotent IS NULL AND j.provider = m.provider AND j.merchant = m.merchant",
    )
    .bind(&provider)
    .bind(&merchant)
    .bind(&idempotent)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Gives a claim back without a call (too little lease left to send safely).
pub async fn release(pool: &PgPool, claimed: &Claimed, actor: &str) -> Result<bool, StoreError> {
    let mut conn = pool.acquire().await?;
    let change = Change {
        attempt: Some(claimed.attempt),
        retry_in: Some(Duration::ZERO),
        detail: Some(serde_json::json!({ "reason": "lease too short to send" })),
        ..Change::new(
            &claimed.refund_no,
            Trigger::Released,
            State::RetryWait,
            actor,
        )
    };
    Ok(transition(&mut conn, &change).await?.is_some())
}

/// Moves a job that cannot be called to `dead` with a cause (and its event).
pub async fn kill(
    pool: &PgPool,
    refund_no: &str,
    attempt: Option<i32>,
    cause: Cause,
    message: &str,
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let change = Change {
        attempt,
        cause: Some(cause.as_str()),
        message: Some(message),
        ..Change::new(refund_no, Trigger::Died, State::Dead, actor)
    };
    let Some(t) = transition(&mut tx, &change).await? else {
        return Ok(false);
    };
    insert_event(&mut tx, EventKind::Dead, &t, tz).await?;
    tx.commit().await?;
    Ok(true)
}

/// Takes back a job whose lease ran out: to `retry_wait` (due now) when the job's merchant is
/// idempotent (as recorded on the job), else to `dead`/`outcome_unknown`, since the call may
/// have gone out; either way the job is marked as maybe paid.
pub async fn expire_lease(
    pool: &PgPool,
    refund_no: &str,
    attempt: i32,
    idempotent: bool,
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<Option<State>, StoreError> {
    let mut tx = pool.begin().await?;
    let message = "lease expired: the worker died or stalled during the attempt";
    // The call may have gone out: whatever comes next must count this attempt as one that
    // may have paid.
    let change = if idempotent {
        Change {
            attempt: Some(attempt),
            retry_in: Some(Duration::ZERO),
            code: Some("LEASE_EXPIRED"),
            message: Some(message),
            maybe_paid: true,
            ..Change::new(refund_no, Trigger::LeaseExpired, State::RetryWait, actor)
        }
    } else {
        Change {
            attempt: Some(attempt),
            cause: Some(Cause::OutcomeUnknown.as_str()),
            code: Some("LEASE_EXPIRED"),
            message: Some(message),
            maybe_paid: true,
            ..Change::new(refund_no, Trigger::LeaseExpired, State::Dead, actor)
        }
    };
    let Some(t) = transition(&mut tx, &change).await? else {
        return Ok(None);
    };
    if t.to == State::Dead {
        insert_event(&mut tx, EventKind::Dead, &t, tz).await?;
    }
    tx.commit().await?;
    Ok(Some(t.to))
}

/// What an operator action did to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the job moved from this state.
    Done { prior: State },
    /// Refused, with the reason (nothing changed but the audit row).
    Refused {
        prior: Option<State>,
        reason: String,
    },
}

/// An operator's name and reason, both required for every audited action.
#[derive(Debug, Clone, Copy)]
pub struct Operator<'a> {
    pub name: &'a str,
    pub note: &'a str,
}

/// Locks a job's row and reads its state and cause (inside the caller's transaction).
async fn lock_state(
    conn: &mut PgConnection,
    refund_no: &str,
) -> Result<Option<(State, Option<String>)>, StoreError> {
    let row = sqlx::query("SELECT state, cause FROM jobs WHERE refund_no = $1 FOR UPDATE")
        .bind(refund_no)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        let s: String = r.try_get("state")?;
        Ok((s.parse().map_err(StoreError::Corrupt)?, r.try_get("cause")?))
    })
    .transpose()
}

/// Appends one operator audit row.
#[allow(clippy::too_many_arguments)]
pub async fn insert_audit(
    conn: &mut PgConnection,
    refund_no: Option<&str>,
    action: &str,
    result: &str,
    op: Operator<'_>,
    prior: Option<State>,
    new_state: Option<State>,
    reason: Option<&str>,
    detail: Option<serde_json::Value>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO operator_audit (refund_no, action, result, operator, note, prior_state,
             new_state, reason, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(refund_no)
    .bind(action)
    .bind(result)
    .bind(op.name)
    .bind(op.note)
    .bind(prior.map(State::as_str))
    .bind(new_state.map(State::as_str))
    .bind(reason)
    .bind(detail)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Audits a refused operator action and returns the refusal.
async fn refuse(
    conn: &mut PgConnection,
    refund_no: &str,
    action: &str,
    op: Operator<'_>,
    prior: Option<State>,
    target: Option<State>,
    reason: String,
) -> Result<Verdict, StoreError> {
    insert_audit(
        conn,
        Some(refund_no),
        action,
        "refused",
        op,
        prior,
        target,
        Some(&reason),
        None,
    )
    .await?;
    Ok(Verdict::Refused { prior, reason })
}

/// Why a dead job may not be replayed, if it may not: final jobs never are, nor jobs whose
/// outcome is unknown at a merchant that does not deduplicate on `refund_no`.
pub fn replay_refusal(state: State, cause: Option<&str>, idempotent: bool) -> Option<String> {
    if state != State::Dead {
        return Some(format!(
            "job is {state}, not dead: only dead jobs are replayed"
        ));
    }
    if cause == Some(Cause::OutcomeUnknown.as_str()) && !idempotent {
        return Some(
            "outcome unknown at a merchant that is not idempotent: the provider may have paid; \
             check with the provider and use `refundctl job resolve`"
                .to_owned(),
        );
    }
    None
}

/// Replays a dead job (back to `received`, same `refund_no`), re-checking its state and the
/// merchant's idempotence recorded on it under the row lock in the transaction that writes the
/// audit row; refusals are audited too.
pub async fn replay(
    conn: &mut PgConnection,
    refund_no: &str,
    op: Operator<'_>,
) -> Result<Verdict, StoreError> {
    let Some((prior, cause)) = lock_state(conn, refund_no).await? else {
        return refuse(
            conn,
            refund_no,
            "replay",
            op,
            None,
            None,
            "no such job".into(),
        )
        .await;
    };
    // The job's own record of its merchant, never this process's config: a stale config must
    // not let an outcome_unknown job at a merchant that does not deduplicate be sent again.
    let idempotent: bool =
        sqlx::query_scalar("SELECT COALESCE(idempotent, false) FROM jobs WHERE refund_no = $1")
            .bind(refund_no)
            .fetch_one(&mut *conn)
            .await?;
    if let Some(reason) = replay_refusal(prior, cause.as_deref(), idempotent) {
        return refuse(conn, refund_no, "replay", op, Some(prior), None, reason).await;
    }
    let actor = format!("operator:{}", op.name);
    let change = Change {
        detail: Some(serde_json::json!({ "note": op.note, "cause": cause })),
        ..Change::new(refund_no, Trigger::Replay, State::Received, &actor)
    };
    if transition(conn, &change).await?.is_none() {
        return Err(StoreError::Corrupt(format!(
            "job {refund_no} changed under its row lock"
        )));
    }
    sqlx::query("UPDATE jobs SET retry_base = attempt, retry_since = now() WHERE refund_no = $1")
        .bind(refund_no)
        .execute(&mut *conn)
        .await?;
    insert_audit(
        conn,
        Some(refund_no),
        "replay",
        "replayed",
        op,
        Some(prior),
        Some(State::Received),
        None,
        None,
    )
    .await?;
    Ok(Verdict::Done { prior })
}

/// How an operator settles a dead job after checking with the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The provider paid: book it with this settlement fee.
    Succeeded { settlement_refund_fee: i64 },
    /// The provider did not pay.
    Failed,
}

/// What the provider's answers say about a dead job, for its manual resolution.
struct ResolutionEvidence {
    refund_fee: i64,
    /// An attempt (fenced or not) was accepted or answered with an unrecognised result.
    paid_evidence: bool,
    /// The settlement fees of accepted attempts.
    accepted_fees: Vec<i64>,
    /// Until when the worker of the last attempt may still send: set while its lease plus
    /// `quiet` has not passed and it recorded no answer for that attempt.
    quiet_until: Option<DateTime<Utc>>,
}

/// Reads a job's [`ResolutionEvidence`] (inside the caller's transaction, under its row lock).
async fn resolution_evidence(
    conn: &mut PgConnection,
    refund_no: &str,
    quiet: Duration,
) -> Result<ResolutionEvidence, StoreError> {
    let row = sqlx::query(
        "SELECT j.refund_fee,
                EXISTS (SELECT 1 FROM provider_attempts a WHERE a.refund_no = j.refund_no
                          AND a.outcome IN ('accepted', 'unrecognised')) AS paid_evidence,
                ARRAY(SELECT DISTINCT a.settlement_refund_fee FROM provider_attempts a
                      WHERE a.refund_no = j.refund_no AND a.outcome = 'accepted'
                        AND a.settlement_refund_fee IS NOT NULL) AS accepted_fees,
                CASE WHEN j.attempt > 0
                      AND NOT EXISTS (SELECT 1 FROM provider_attempts a
                                      WHERE a.refund_no = j.refund_no AND a.attempt = j.attempt)
                      AND j.last_lease_until + $2 * interval '1 millisecond' > now()
                     THEN j.last_lease_until + $2 * interval '1 millisecond' END AS quiet_until
         FROM jobs j WHERE j.refund_no = $1",
    )
    .bind(refund_no)
    .bind(millis(quiet))
    .fetch_one(&mut *conn)
    .await?;
    Ok(ResolutionEvidence {
        refund_fee: row.try_get("refund_fee")?,
        paid_evidence: row.try_get("paid_evidence")?,
        accepted_fees: row.try_get("accepted_fees")?,
        quiet_until: row.try_get("quiet_until")?,
    })
}

/// Resolves a dead job by hand: ledger entry (source `manual`) or order release, the
/// `refund.resolved` event and the audit row, in the caller's transaction. Refused (and
/// audited) while the last attempt's worker may still send (its lease plus `quiet`, the HTTP
/// timeout and a margin, has not passed and it recorded no answer), as failed when an attempt
/// was accepted or unrecognised, and as succeeded with a settlement fee that disagrees with
/// an accepted attempt's.
pub async fn resolve(
    conn: &mut PgConnection,
    refund_no: &str,
    resolution: Resolution,
    quiet: Duration,
    op: Operator<'_>,
    tz: chrono_tz::Tz,
) -> Result<Verdict, StoreError> {
    let (to, settle) = match resolution {
        Resolution::Succeeded {
            settlement_refund_fee,
        } => (State::Succeeded, Some(settlement_refund_fee)),
        Resolution::Failed => (State::Failed, None),
    };
    let Some((prior, _)) = lock_state(conn, refund_no).await? else {
        let reason = "no such job".to_owned();
        return refuse(conn, refund_no, "resolve", op, None, Some(to), reason).await;
    };
    if prior != State::Dead {
        let reason = format!("job is {prior}, not dead: only dead jobs are resolved by hand");
        return refuse(
            conn,
            refund_no,
            "resolve",
            op,
            Some(prior),
            Some(to),
            reason,
        )
        .await;
    }
    let evidence = resolution_evidence(conn, refund_no, quiet).await?;
    let refund_fee = evidence.refund_fee;
    let refusal = if let Some(until) = evidence.quiet_until {
        Some(format!(
            "the last attempt's worker may still send until {} (its lease, the HTTP timeout and \
             a margin); resolve after that",
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))
    } else if settle.is_none() && evidence.paid_evidence {
        Some(
            "an attempt was accepted or answered with an unrecognised result: the provider may \
             have paid, so it cannot be resolved as failed; check with the provider"
                .to_owned(),
        )
    } else if let Some(s) = settle
        && !(0..=refund_fee).contains(&s)
    {
        Some(format!(
            "settlement fee {s} must be between 0 and the refund fee {refund_fee}"
        ))
    } else if let Some(s) = settle
        && !evidence.accepted_fees.is_empty()
        && !evidence.accepted_fees.contains(&s)
    {
        Some(format!(
            "settlement fee {s} disagrees with what the provider accepted ({})",
            evidence
                .accepted_fees
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        return refuse(
            conn,
            refund_no,
            "resolve",
            op,
            Some(prior),
            Some(to),
            reason,
        )
        .await;
    }
    let actor = format!("operator:{}", op.name);
    let change = Change {
        settlement_refund_fee: settle,
        code: Some("MANUAL"),
        message: Some(op.note),
        detail: Some(serde_json::json!({ "note": op.note })),
        ..Change::new(refund_no, Trigger::Resolve, to, &actor)
    };
    let Some(t) = transition(conn, &change).await? else {
        return Err(StoreError::Corrupt(format!(
            "job {refund_no} changed under its row lock"
        )));
    };
    match settle {
        Some(s) => insert_ledger_entry(conn, &t, refund_fee, s, "manual", tz).await?,
        None => release_order_amount(conn, &t.order_no, t.refund_fee).await?,
    }
    insert_event(conn, EventKind::Resolved, &t, tz).await?;
    insert_audit(
        conn,
        Some(refund_no),
        "resolve",
        "resolved",
        op,
        Some(prior),
        Some(to),
        None,
        settle.map(|s| serde_json::json!({ "settlement_refund_fee": s })),
    )
    .await?;
    Ok(Verdict::Done { prior })
}
