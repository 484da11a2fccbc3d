//! What operators do to a job by hand: replay a dead job, discard one (or a poison message)
//! from the dead letters, resolve it after checking with the
//! provider. The rules and the writes are the database's (migration 20261204000050,
//! `operator_replay`, `operator_resolve`): each function re-checks the job under its row lock,
//! in the transaction that writes its audit row, so a refusal is audited too and two operators
//! cannot both act on one job, and the operator's database role can write nothing except
//! through them. This module calls them and reads their verdict. An operator's note stays with
//! operators (audit row, history, the job's last message): the `refund.resolved` event order
//! systems receive never carries it.

use std::time::Duration;

use sqlx::{PgConnection, Row};

use crate::state::State;
use crate::store::{StoreError, millis};

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

/// A state as an operator function returned it.
pub(crate) fn parse_state(s: Option<String>) -> Result<Option<State>, StoreError> {
    s.map(|s| s.parse().map_err(StoreError::Corrupt))
        .transpose()
}

/// The [`Verdict`] of an operator function's row (`verdict`, `prior`, `reason`).
pub(crate) fn verdict_of(row: &sqlx::postgres::PgRow) -> Result<Verdict, StoreError> {
    let verdict: String = row.try_get("verdict")?;
    let prior = parse_state(row.try_get("prior")?)?;
    let reason: Option<String> = row.try_get("reason")?;
    match (verdict.as_str(), prior, reason) {
        ("done", Some(prior), None) => Ok(Verdict::Done { prior }),
        ("refused", prior, Some(reason)) => Ok(Verdict::Refused { prior, reason }),
        (v, p, r) => Err(StoreError::Corrupt(format!(
            "operator function answered {v} (prior {p:?}, reason {r:?})"
        ))),
    }
}

/// Whether the provider's statements showed the job's current attempts unpaid (a `not_paid`
/// verdict of the reconciler's repair loop, migration 0040).
pub async fn not_paid_per_statement(
    conn: &mut PgConnection,
    refund_no: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM statement_verdicts v JOIN jobs j ON j.refund_no = v.refund_no
             WHERE v.refund_no = $1 AND v.verdict = 'not_paid' AND v.attempt = j.attempt)",
    )
    .bind(refund_no)
    .fetch_one(&mut *conn)
    .await?)
}

/// Replays a dead job (back to `received`, same `refund_no`): refused (and audited) for a job
/// that is not dead, and for one whose outcome is unknown at a merchant that does not
/// deduplicate on `refund_no` (as recorded on the job) unless the provider's statements
/// showed its current attempt unpaid.
pub async fn replay(
    conn: &mut PgConnection,
    refund_no: &str,
    op: Operator<'_>,
) -> Result<Verdict, StoreError> {
    job_action(conn, "operator_replay", refund_no, op).await
}

/// Discards a dead job from the dead letters (archived, still `dead`, no money moved):
/// refused (and audited) for a job that is not dead, already discarded, or whose provider may
/// hold the money (`outcome_unknown`, `refund_abnormal`: those are resolved, not archived).
pub async fn discard(
    conn: &mut PgConnection,
    refund_no: &str,
    op: Operator<'_>,
) -> Result<Verdict, StoreError> {
    job_action(conn, "operator_discard_job", refund_no, op).await
}

/// Calls the operator function `function(refund_no, operator, note)` and reads its verdict.
async fn job_action(
    conn: &mut PgConnection,
    function: &'static str,
    refund_no: &str,
    op: Operator<'_>,
) -> Result<Verdict, StoreError> {
    let sql = format!("SELECT verdict, prior, reason FROM {function}($1, $2, $3)");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(refund_no)
        .bind(op.name)
        .bind(op.note)
        .fetch_one(&mut *conn)
        .await?;
    verdict_of(&row)
}

/// Discards a stored poison message from the dead letters: `None` when done, else why it was
/// refused (no such message, already discarded; audited either way).
pub async fn discard_poison(
    conn: &mut PgConnection,
    id: i64,
    op: Operator<'_>,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT verdict, reason FROM operator_discard_poison($1, $2, $3)")
        .bind(id)
        .bind(op.name)
        .bind(op.note)
        .fetch_one(&mut *conn)
        .await?;
    let verdict: String = row.try_get("verdict")?;
    let reason: Option<String> = row.try_get("reason")?;
    match (verdict.as_str(), reason) {
        ("done", None) => Ok(None),
        ("refused", Some(reason)) => Ok(Some(reason)),
        (v, r) => Err(StoreError::Corrupt(format!(
            "operator_discard_poison answered {v} (reason {r:?})"
        ))),
    }
}

/// How an operator settles a dead job after checking with the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The provider paid: book it with this settlement fee.
    Succeeded { settlement_refund_fee: i64 },
    /// The provider did not pay.
    Failed,
}

impl Resolution {
    /// The job's state once applied, and the settlement fee booked.
    pub fn target(self) -> (State, Option<i64>) {
        match self {
            Resolution::Succeeded {
                settlement_refund_fee,
            } => (State::Succeeded, Some(settlement_refund_fee)),
            Resolution::Failed => (State::Failed, None),
        }
    }
}

/// Resolves a dead job by hand: ledger entry (source `manual`) or order release, the
/// `refund.resolved` event and the audit row, in the caller's transaction. Refused (and
/// audited) while the last attempt's worker may still send (its lease plus `quiet`, the HTTP
/// timeout and a margin, has not passed and it recorded no answer), as failed when an attempt
/// was accepted or unrecognised, and as succeeded with a settlement fee out of range or that
/// disagrees with an accepted attempt's.
pub async fn resolve(
    conn: &mut PgConnection,
    refund_no: &str,
    resolution: Resolution,
    quiet: Duration,
    op: Operator<'_>,
    tz: chrono_tz::Tz,
) -> Result<Verdict, StoreError> {
    let (to, settle) = resolution.target();
    let row = sqlx::query(
        "SELECT verdict, prior, reason FROM operator_resolve($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(refund_no)
    .bind(to.as_str())
    .bind(settle)
    .bind(millis(quiet))
    .bind(tz.name())
    .bind(op.name)
    .bind(op.note)
    .fetch_one(&mut *conn)
    .await?;
    verdict_of(&row)
}
