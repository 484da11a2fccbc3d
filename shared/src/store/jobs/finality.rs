//! Applying what the provider says about a refund it accepted (its notify or its status query)
//! to the job, in the caller's transaction.
//!
//! Notifies repeat and arrive out of order, and a query can cross a notify, so the rule is
//! monotonic: a report only moves a job towards a more final state, and one that would not move
//! it has no effect ([`Effect::NoChange`]). A final job never changes. The order is
//! not-yet-known (received, in flight, retry wait, dead with an unknown outcome) < accepted
//! (`PROCESSING`) < ended (`SUCCESS` → succeeded, `REFUND_CLOSE` → failed, `CHANGE` →
//! dead/refund_abnormal); `CHANGE` is not final (an operator settles it), so a later `SUCCESS`
//! still books it.

use serde_json::json;
use sqlx::{PgConnection, Row};

use crate::events::EventKind;
use crate::provider::status::{RefundStatus, StatusReport};
use crate::state::{Cause, State, Trigger};
use crate::store::StoreError;

use super::{Change, Transitioned, insert_event, release_order_amount, transition};

/// Where a report came from (kept in the transition's history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Notify,
    Query,
    /// A row of the provider's statement (the reconciler's repair of an unknown outcome); the
    /// report's `raw` names the file and line, kept as the transition's evidence.
    Statement,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Notify => "notify",
            Source::Query => "query",
            Source::Statement => "statement",
        }
    }
}

/// What applying a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The job moved from one state to another.
    Applied { from: State, to: State },
    /// The job was already there or further (a duplicate, a report overtaken by a more final
    /// one), or is final.
    NoChange { state: State },
}

impl Effect {
    /// As stored with a notify.
    pub fn as_str(&self) -> &'static str {
        match self {
            Effect::Applied { .. } => "applied",
            Effect::NoChange { .. } => "no_change",
        }
    }
}

/// Where `status` takes a job that is in `state` with dead `cause`, if it moves it at all.
pub fn target(state: State, cause: Option<&str>, status: &RefundStatus) -> Option<State> {
    if state.is_final() {
        return None;
    }
    let unknown = state == State::Dead && cause == Some(Cause::OutcomeUnknown.as_str());
    match status {
        RefundStatus::Success { .. } => Some(State::Succeeded),
        RefundStatus::Closed => Some(State::Failed),
        RefundStatus::Change => (!(state == State::Dead
            && cause == Some(Cause::RefundAbnormal.as_str())))
        .then_some(State::Dead),
        // The provider holds the refund: stop resending and wait for its end. A job in flight
        // is left to its call's answer; an accepted one is already waiting.
        RefundStatus::Processing => {
            (state == State::RetryWait || unknown).then_some(State::Accepted)
        }
    }
}

/// The job fields a report is checked against and applied to, read under the row lock.
#[derive(Debug, Clone)]
struct Locked {
    state: State,
    cause: Option<String>,
}

/// Locks the job of `refund_no` and reads its state; `None` when there is no such job.
async fn lock(conn: &mut PgConnection, refund_no: &str) -> Result<Option<Locked>, StoreError> {
    let Some(r) = sqlx::query("SELECT state, cause FROM jobs WHERE refund_no = $1 FOR UPDATE")
        .bind(refund_no)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let state: String = r.try_get("state")?;
    Ok(Some(Locked {
        state: state.parse().map_err(StoreError::Corrupt)?,
        cause: r.try_get("cause")?,
    }))
}

/// Applies a verified report to its job (which the caller has checked the report names), in
/// the caller's transaction: the transition and its history, the ledger entry of a success
/// (dated by the provider's success time in the business time zone), the order amount given
/// back by a close, the event, and the job's place in the query schedule (a job that starts
/// waiting is first queried after `first_query`).
pub async fn apply_status(
    conn: &mut PgConnection,
    report: &StatusReport,
    source: Source,
    first_query: std::time::Duration,
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<Effect, StoreError> {
    let Some(job) = lock(conn, &report.refund_no).await? else {
        return Err(StoreError::Corrupt(format!(
            "no job {} for a provider report",
            report.refund_no
        )));
    };
    let Some(to) = target(job.state, job.cause.as_deref(), &report.status) else {
        return Ok(Effect::NoChange { state: job.state });
    };
    let mut detail = json!({ "source": source.as_str(), "status": report.status.as_str() });
    if source == Source::Statement {
        detail["evidence"] = json!(report.raw);
    }
    let (code, cause, prid, settle) = match &report.status {
        RefundStatus::Success {
            provider_refund_id,
            settlement_refund_fee,
            ..
        } => (
            None,
            None,
            Some(provider_refund_id.as_str()),
            Some(*settlement_refund_fee),
        ),
        RefundStatus::Closed => (Some("REFUND_CLOSE"), None, None, None),
        RefundStatus::Change => (Some("CHANGE"), Some(Cause::RefundAbnormal), None, None),
        RefundStatus::Processing => (None, None, None, None),
    };
    let message = match &report.status {
        RefundStatus::Closed => Some("the provider closed the refund without paying it"),
        RefundStatus::Change => {
            Some("the provider could not credit the refund: the money needs another route")
        }
        _ => None,
    };
    let change = Change {
        cause: cause.map(Cause::as_str),
        code,
        message,
        provider_refund_id: prid,
        settlement_refund_fee: settle,
        detail: Some(detail),
        // A refund the provider holds or paid has, or may have, moved money; a closed one
        // has not, but what came before it still counts.
        maybe_paid: !matches!(report.status, RefundStatus::Closed),
        ..Change::new(&report.refund_no, Trigger::ProviderStatus, to, actor)
    };
    let Some(t) = transition(conn, &change).await? else {
        return Err(StoreError::Corrupt(format!(
            "job {} changed under its row lock",
            report.refund_no
        )));
    };
    if let RefundStatus::Success {
        settlement_refund_fee,
        success_time,
        ..
    } = &report.status
    {
        book(conn, &t, *settlement_refund_fee, *success_time, tz).await?;
    }
    if to == State::Failed {
        release_order_amount(conn, &t.order_no, t.refund_fee).await?;
    }
    let kind = if t.from == State::Dead && to != State::Dead {
        EventKind::Resolved
    } else {
        EventKind::for_state(to).unwrap_or(EventKind::Resolved)
    };
    insert_event(conn, kind, &t, tz).await?;
    if to == State::Accepted {
        super::super::queries::wait(
            conn,
            &t.refund_no,
            &t.provider,
            &t.merchant,
            Some(first_query),
        )
        .await?;
    } else {
        super::super::queries::done(conn, &t.refund_no).await?;
    }
    Ok(Effect::Applied {
        from: t.from,
        to: t.to,
    })
}

/// Sends a job again after the provider's verified word that it holds no refund of this
/// number (dead with an unknown outcome → received, same `refund_no`). That word is the
/// evidence that no earlier attempt paid, so the job's memory that one may have is cleared and
/// its retry budget restarts, as at a replay. `None` when the job is no longer dead with an
/// unknown outcome (its end arrived meanwhile).
pub async fn not_at_provider(
    conn: &mut PgConnection,
    refund_no: &str,
    actor: &str,
) -> Result<Option<Transitioned>, StoreError> {
    let Some(job) = lock(conn, refund_no).await? else {
        return Ok(None);
    };
    if job.state != State::Dead || job.cause.as_deref() != Some(Cause::OutcomeUnknown.as_str()) {
        return Ok(None);
    }
    let change = Change {
        detail: Some(json!({ "source": "query", "status": "NOT_FOUND" })),
        ..Change::new(refund_no, Trigger::NotAtProvider, State::Received, actor)
    };
    let t = transition(conn, &change).await?;
    sqlx::query(
        "UPDATE jobs SET retry_base = attempt, retry_since = now(), maybe_paid = false
         WHERE refund_no = $1",
    )
    .bind(refund_no)
    .execute(&mut *conn)
    .await?;
    super::super::queries::done(conn, refund_no).await?;
    Ok(t)
}

/// Gives up waiting for the provider's end of an accepted job (the query schedule ran out):
/// `dead`/`refund_abnormal` with its event, for an operator. `false` when the job is no longer
/// accepted.
pub async fn give_up(
    conn: &mut PgConnection,
    refund_no: &str,
    actor: &str,
    tz: chrono_tz::Tz,
) -> Result<bool, StoreError> {
    let change = Change {
        cause: Some(Cause::RefundAbnormal.as_str()),
        code: Some("NO_PROVIDER_END"),
        message: Some("the provider never said how the refund ended within the query schedule"),
        ..Change::new(refund_no, Trigger::Died, State::Dead, actor)
    };
    let Some(t) = transition(conn, &change).await? else {
        return Ok(false);
    };
    insert_event(conn, EventKind::Dead, &t, tz).await?;
    super::super::queries::done(conn, refund_no).await?;
    Ok(true)
}

/// The ledger entry of a refund the provider says it paid: its settlement, dated by when it
/// says it paid (the business date in `tz`), not by when we heard.
async fn book(
    conn: &mut PgConnection,
    t: &Transitioned,
    settlement_refund_fee: i64,
    success_time: chrono::DateTime<chrono::Utc>,
    tz: chrono_tz::Tz,
) -> Result<(), StoreError> {
    let business_date = success_time.with_timezone(&tz).date_naive();
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source)
         VALUES ($1, 'refund', $2, $3, $4, $5, $6, $7, 'provider')",
    )
    .bind(&t.refund_no)
    .bind(&t.provider)
    .bind(&t.merchant)
    .bind(&t.provider_refund_id)
    .bind(t.refund_fee)
    .bind(settlement_refund_fee)
    .bind(business_date)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn success() -> RefundStatus {
        RefundStatus::Success {
            provider_refund_id: "RF".into(),
            settlement_refund_fee: 1,
            success_time: Utc::now(),
        }
    }

    #[test]
    fn a_report_never_moves_a_final_job() {
        for s in State::ALL.into_iter().filter(|s| s.is_final()) {
            for status in [
                success(),
                RefundStatus::Closed,
                RefundStatus::Change,
                RefundStatus::Processing,
            ] {
                assert_eq!(target(s, None, &status), None, "{s} {status:?}");
            }
        }
    }

    #[test]
    fn processing_only_stops_jobs_that_would_otherwise_be_sent_again_or_left_unknown() {
        let p = RefundStatus::Processing;
        assert_eq!(target(State::RetryWait, None, &p), Some(State::Accepted));
        assert_eq!(
            target(State::Dead, Some("outcome_unknown"), &p),
            Some(State::Accepted)
        );
        assert_eq!(target(State::Dead, Some("refund_abnormal"), &p), None);
        assert_eq!(target(State::Accepted, None, &p), None);
        assert_eq!(target(State::InFlight, None, &p), None);
    }

    #[test]
    fn an_end_applies_from_any_state_that_is_not_final_and_a_repeated_change_is_no_change() {
        for s in [
            State::Received,
            State::InFlight,
            State::Accepted,
            State::RetryWait,
            State::Dead,
        ] {
            assert_eq!(
                target(s, Some("outcome_unknown"), &success()),
                Some(State::Succeeded)
            );
            assert_eq!(
                target(s, Some("outcome_unknown"), &RefundStatus::Closed),
                Some(State::Failed)
            );
        }
        assert_eq!(
            target(State::Accepted, None, &RefundStatus::Change),
            Some(State::Dead)
        );
        assert_eq!(
            target(State::Dead, Some("refund_abnormal"), &RefundStatus::Change),
            None
        );
        assert_eq!(
            target(State::Dead, Some("refund_abnormal"), &success()),
            Some(State::Succeeded)
        );
    }

    #[test]
    fn every_target_is_an_allowed_transition() {
        for s in State::ALL {
            for cause in [None, Some("outcome_unknown"), Some("refund_abnormal")] {
                for status in [
                    success(),
                    RefundStatus::Closed,
                    RefundStatus::Change,
                    RefundStatus::Processing,
                ] {
                    if let Some(to) = target(s, cause, &status) {
                        assert!(
                            crate::state::allowed(s, to, Trigger::ProviderStatus),
                            "{s} -> {to} by {status:?}"
                        );
                    }
                }
            }
        }
    }
}
