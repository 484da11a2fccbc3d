//! What operators do to a job by hand: replay a dead job, resolve it after checking with the
//! provider. Each re-checks the job under its row lock, in the transaction that writes its
//! audit row, so a refusal is audited too and two operators cannot both act on one job. An
//! operator's note stays with operators (audit row, history, the job's last message): the
//! `refund.resolved` event order systems receive never carries it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::events::EventKind;
use crate::state::{Cause, State, Trigger};
use crate::store::StoreError;

use super::{
    Change, Transitioned, insert_event, insert_ledger_entry, millis, release_order_amount,
    transition,
};

/// The `error_message` of a `refund.resolved` event of a manual resolution (as failed; a
/// success carries none), in place of the operator's note.
pub const RESOLVED_BY_OPERATOR: &str = "resolved by an operator after checking with the provider";

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
    // Sent again: whatever the query schedule waited for is now the new attempt's to answer.
    crate::store::queries::done(conn, refund_no).await?;
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
    // The note is the operator's account for other operators (history, audit, `job show`);
    // order systems get a fixed text, never it.
    let public = Transitioned {
        message: Some(RESOLVED_BY_OPERATOR.to_owned()),
        ..t
    };
    insert_event(conn, EventKind::Resolved, &public, tz).await?;
    crate::store::queries::done(conn, refund_no).await?;
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
