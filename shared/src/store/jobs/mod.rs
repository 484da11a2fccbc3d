//! The writes of a job's life: claims, transitions and outcomes, and what operators do.
//!
//! A claim moves a job to `in_flight`, increments its attempt (the fencing token) and sets a
//! lease from the database clock, so every worker agrees on when it ends ([`claim`]). Every
//! later write for that attempt is conditional on the attempt still being the job's, so a
//! worker that stalled past its lease cannot overwrite a newer attempt's result; its provider
//! call is still kept in `provider_attempts` (marked `fenced`), because a paid refund must never
//! go unrecorded ([`outcome`]). Operators' replays and resolutions ([`manual`]) and corrections of
//! a final job's booking ([`correct`]) are the database's functions, which re-check the job
//! under its row lock and audit. Every other state change goes through [`transition`] (here),
//! checked against [`state::TRANSITIONS`]; the database's trigger refuses any change of state
//! that list does not have, whoever makes it.

use std::time::Duration;

use chrono::Utc;
use sqlx::{PgConnection, PgPool, Row};

use crate::events::{EventKind, OutcomeEvent, format_time, new_event_id};
use crate::state::{self, Cause, State, Trigger};
use crate::store::{StoreError, millis};

mod claim;
mod correct;
mod finality;
mod manual;
mod outcome;

pub use claim::{ClaimToken, Claimed, Claims, Unreadable, claim, claimed_by};
pub use correct::{Correction, correct};
pub use finality::{Effect, Source, apply_status, give_up, not_at_provider, target};
pub(crate) use manual::parse_state;
pub use manual::{
    Operator, Resolution, Verdict, discard, discard_poison, not_paid_per_statement, replay, resolve,
};
pub use outcome::{OutcomeToRecord, Recorded, record_outcome, record_outcomes};

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
                    -- A dead job that may have been paid says so, whatever ended it, unless
                    -- the provider itself said how it stands (refund_abnormal).
                    cause = CASE WHEN $4 = 'dead' AND j.maybe_paid
                                      AND $5 IS DISTINCT FROM 'refund_abnormal'
                                 THEN 'outcome_unknown' ELSE $5 END,
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

/// The outcome event of a transition, as published. Its `event_id` is made here, once: the
/// batched writer stores this payload as it is, and the relay sends what is stored.
fn outcome_event(kind: EventKind, t: &Transitioned, tz: chrono_tz::Tz) -> OutcomeEvent {
    OutcomeEvent {
        version: 1,
        event_id: new_event_id(),
        event: kind,
        refund_no: Some(t.refund_no.clone()),
        order_no: Some(t.order_no.clone()),
        provider: Some(t.provider.clone()),
        merchant: Some(t.merchant.clone()),
        state: Some(t.to),
        refund_fee: Some(t.refund_fee),
        settlement_refund_fee: t.settlement_refund_fee.filter(|_| t.to == State::Succeeded),
        provider_refund_id: t
            .provider_refund_id
            .clone()
            .filter(|_| t.to == State::Succeeded),
        error_code: t.code.clone().filter(|_| t.to != State::Succeeded),
        error_message: t.message.clone().filter(|_| t.to != State::Succeeded),
        field: None,
        // The contract gives a cause to `refund.dead` alone, whatever the row still holds.
        cause: t.cause.clone().filter(|_| t.to == State::Dead),
        attempts: t.attempt,
        occurred_at: format_time(Utc::now(), tz),
    }
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

/// Gives a claim back without a call (too little lease left to send safely, or the
/// merchant's slot missed). No call was made, so the claim is not counted against the job's
/// retry budget.
pub async fn release(
    pool: &PgPool,
    claimed: &Claimed,
    actor: &str,
    reason: &str,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let change = Change {
        attempt: Some(claimed.attempt),
        retry_in: Some(Duration::ZERO),
        detail: Some(serde_json::json!({ "reason": reason })),
        ..Change::new(
            &claimed.refund_no,
            Trigger::Released,
            State::RetryWait,
            actor,
        )
    };
    let released = transition(&mut tx, &change).await?.is_some();
    if released {
        sqlx::query("UPDATE jobs SET retry_base = retry_base + 1 WHERE refund_no = $1")
            .bind(&claimed.refund_no)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(released)
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
