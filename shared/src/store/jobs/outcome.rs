//! Recording provider calls and the decisions taken on them, many jobs in one statement: the
//! attempt row (always, fenced or not: it is the evidence), the fenced transition, the ledger
//! entry, the order amount given back, the outcome event, and the job's memory that an attempt
//! may have paid.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::events::EventKind;
use crate::provider::{AttemptRecord, Outcome};
use crate::state::{self, Cause, State, Trigger};
use crate::store::StoreError;
use crate::store::text::{storable, storable_opt};
use crate::workflow::Decision;

use super::{Claimed, Transitioned, millis, outcome_event};

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
            Decision::Succeed => (Trigger::ProviderAccepted, State::Succeeded, None, None),
            Decision::Accept { first_query } => (
                Trigger::ProviderAccepted,
                State::Accepted,
                None,
                Some(*first_query),
            ),
            Decision::Fail => (Trigger::Declined, State::Failed, None, None),
            Decision::Retry { after, .. } => (
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
    let mut spare = Vec::with_capacity(n);
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
        spare.push(matches!(
            item.decision,
            Decision::Retry { counted: false, .. }
        ));
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
                 $18::text[], $19::text[], $20::text[], $23::bool[], $24::bool[])
               AS u(refund_no, attempt, to_state, cause, retry_ms, code, message, prid, fee,
                    settle, coupon, outcome, http_status, request, response, latency_us,
                    provider, merchant, event_key, payload, maybe_paid, spare)
         ), upd AS (
             UPDATE jobs j SET state = u.to_state,
                    -- A dead job that may have been paid says so (a fenced attempt of another
                    -- worker may have learnt that since this one's claim).
                    cause = CASE WHEN u.to_state = 'dead' AND j.maybe_paid
                                 THEN 'outcome_unknown' ELSE u.cause END,
                    maybe_paid = j.maybe_paid OR u.maybe_paid,
                    -- A throttled call is not counted: the budget's base moves past it.
                    retry_base = j.retry_base + u.spare::int,
                    spared_attempts = j.spared_attempts + u.spare::int,
                    lease_until = NULL,
                    -- retry_ms is the retry's delay for retry_wait, the first query's for accepted.
                    next_attempt_at = CASE WHEN u.to_state = 'retry_wait'
                                           THEN now() + u.retry_ms * interval '1 millisecond' END,
                    last_code = u.code, last_message = u.message,
                    provider_refund_id = COALESCE(u.prid, j.provider_refund_id),
                    settlement_refund_fee = COALESCE(u.settle, j.settlement_refund_fee),
                    updated_at = now()
             FROM u
             WHERE j.refund_no = u.refund_no AND j.state = 'in_flight' AND j.attempt = u.attempt
             RETURNING j.refund_no, j.attempt, j.order_no, j.refund_fee, j.cause AS final_cause
         ), fenced AS (
             -- A fenced answer that may have paid still marks its job: the next attempt's
             -- decline must not be taken as final. Only jobs `upd` did not touch: a row updated
             -- twice in one statement keeps one of the two updates, unpredictably. (A job has a
             -- later attempt only after this one's lease ran out, which marked it already.)
             -- The usual batch, all applied, reads no job a second time.
             UPDATE jobs j SET maybe_paid = true
             FROM u
             WHERE j.refund_no = u.refund_no AND u.maybe_paid AND NOT j.maybe_paid
               AND NOT EXISTS (SELECT 1 FROM upd WHERE upd.refund_no = u.refund_no)
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
         ), sq AS (
             -- An accepted job waits for the provider's end; the query schedule is its clock.
             INSERT INTO status_queries (refund_no, provider, merchant, next_at)
             SELECT refund_no, provider, merchant, now() + retry_ms * interval '1 millisecond'
             FROM done WHERE to_state = 'accepted'
             ON CONFLICT (refund_no) DO UPDATE
                 SET since = now(), next_at = EXCLUDED.next_at, queries = 0, lease_until = NULL
         ), ev AS (
             -- The event says the cause the row got, which `upd` may have changed.
             INSERT INTO outbox (routing_key, refund_no, payload)
             SELECT event_key, refund_no,
                    CASE WHEN to_state = 'dead'
                         THEN jsonb_set(payload::jsonb, '{cause}', to_jsonb(final_cause))
                         ELSE payload::jsonb END
             FROM done WHERE event_key IS NOT NULL
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
    .bind(&spare)
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
