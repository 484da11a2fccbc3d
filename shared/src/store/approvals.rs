//! Four-eyes approval of what operators do to a refund's money (DESIGN §8, `[operator]
//! approvals_required`): a manual resolution of a dead job and a correction of a final one.
//!
//! With two people required, the first operator files a request ([`request`]) holding
//! everything the action needs; a second, different operator approves it ([`approve`]), and
//! the action is applied in the transaction of the approval, re-checked under the job's row
//! lock as if it were made then; or rejects it ([`reject`]). A request is checked when it is
//! filed by applying the action in a subtransaction that is then rolled back: a request that
//! would be refused now (the job is not dead, the fee is out of range, ...) is refused at
//! once, with the same reason, instead of waiting for a signature to fail. With one person
//! required (development), [`apply`] applies at once, as before approvals existed.
//!
//! Each step is a database function (`operator_request`, `operator_approve`,
//! `operator_reject`, migration 20261204000050) that the operator's role may execute and
//! nothing else: the checks, the writes and the audit rows are the database's.
//!
//! Every step writes an audit row; the requester's name stays on the action's own rows (its
//! transition and audit), the approver's on the approval's audit row, and the database stamps
//! its session user on the request and on the decision.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::jobs::{self, Correction, Operator, Resolution, Verdict, parse_state};
use super::{StoreError, millis};
use crate::state::State;

/// An action that takes a second operator's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `job resolve`: settle a dead job.
    Resolve(Resolution),
    /// `job correct`: put a final job's booking right.
    Correct(Correction),
}

impl Action {
    /// As stored in `approval_requests.action` and named in audit rows.
    pub fn name(self) -> &'static str {
        match self {
            Action::Resolve(_) => "resolve",
            Action::Correct(_) => "correct",
        }
    }

    /// The job's state once applied.
    pub fn outcome(self) -> State {
        match self {
            Action::Resolve(Resolution::Succeeded { .. })
            | Action::Correct(Correction::Succeeded { .. }) => State::Succeeded,
            Action::Resolve(Resolution::Failed) | Action::Correct(Correction::Failed) => {
                State::Failed
            }
        }
    }

    pub fn settlement_refund_fee(self) -> Option<i64> {
        match self {
            Action::Resolve(Resolution::Succeeded {
                settlement_refund_fee,
            })
            | Action::Correct(Correction::Succeeded {
                settlement_refund_fee,
            }) => Some(settlement_refund_fee),
            _ => None,
        }
    }
}

/// What an action needs besides the job: the quiet time after a worker's lease (resolution)
/// and the business time zone.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub quiet: Duration,
    pub tz: chrono_tz::Tz,
}

/// Applies an action now, in the caller's transaction (the one-person path). `op` is who
/// asked for it, with the note or evidence.
pub async fn apply(
    conn: &mut PgConnection,
    refund_no: &str,
    action: Action,
    op: Operator<'_>,
    cx: Context,
) -> Result<Verdict, StoreError> {
    match action {
        Action::Resolve(r) => jobs::resolve(conn, refund_no, r, cx.quiet, op, cx.tz).await,
        Action::Correct(c) => jobs::correct(conn, refund_no, c, op, cx.tz).await,
    }
}

/// What filing a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filed {
    /// Waiting for a second operator; applied now, the action would move the job from `prior`.
    Requested { id: i64, prior: State },
    /// Not filed: the action would be refused now, or the refund has a pending request.
    Refused {
        prior: Option<State>,
        reason: String,
    },
}

/// Files a request for `action` on `refund_no` by `op` (see the module docs), audited either
/// way, in the caller's transaction.
pub async fn request(
    conn: &mut PgConnection,
    refund_no: &str,
    action: Action,
    op: Operator<'_>,
    cx: Context,
) -> Result<Filed, StoreError> {
    let row = sqlx::query(
        "SELECT verdict, request_id, prior, reason
         FROM operator_request($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(action.name())
    .bind(refund_no)
    .bind(action.outcome().as_str())
    .bind(action.settlement_refund_fee())
    .bind(millis(cx.quiet))
    .bind(cx.tz.name())
    .bind(op.name)
    .bind(op.note)
    .fetch_one(&mut *conn)
    .await?;
    let verdict: String = row.try_get("verdict")?;
    let id: Option<i64> = row.try_get("request_id")?;
    let prior = parse_state(row.try_get("prior")?)?;
    let reason: Option<String> = row.try_get("reason")?;
    match (verdict.as_str(), id, prior, reason) {
        ("requested", Some(id), Some(prior), None) => Ok(Filed::Requested { id, prior }),
        ("refused", None, prior, Some(reason)) => Ok(Filed::Refused { prior, reason }),
        (v, id, p, r) => Err(StoreError::Corrupt(format!(
            "operator_request answered {v} (id {id:?}, prior {p:?}, reason {r:?})"
        ))),
    }
}

/// What deciding a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// Approved, and the action was applied: the job moved from `prior`.
    Applied {
        prior: State,
    },
    /// Approved, but the action was refused when applied (the job changed meanwhile): the
    /// request is closed as `refused`, nothing else changed.
    ActionRefused {
        reason: String,
    },
    /// Rejected: the action will not be applied.
    Rejected,
    /// The decision itself was refused (not pending, or the approver is the requester).
    Refused {
        reason: String,
    },
    NotFound,
}

/// A stored request, as `approvals list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ApprovalRequest {
    pub id: i64,
    pub action: String,
    pub refund_no: String,
    /// The state the job ends in when applied.
    pub outcome: String,
    pub settlement_refund_fee: Option<i64>,
    /// The resolution's note, or the correction's evidence.
    pub note: String,
    pub requested_by: String,
    /// The database session user that filed it.
    pub db_user: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_db_user: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decision_note: Option<String>,
    pub refusal: Option<String>,
}

/// The columns of [`ApprovalRequest`], as a literal (queries are static text).
macro_rules! request_columns {
    () => {
        "id, action, refund_no, outcome, settlement_refund_fee, note, requested_by, db_user,
         requested_at, state, decided_by, decided_db_user, decided_at, decision_note, refusal"
    };
}

/// Requests, pending ones only unless `all`, oldest first.
pub async fn list(pool: &PgPool, all: bool) -> Result<Vec<ApprovalRequest>, StoreError> {
    Ok(sqlx::query_as::<_, ApprovalRequest>(concat!(
        "SELECT ",
        request_columns!(),
        " FROM approval_requests WHERE $1 OR state = 'pending' ORDER BY id"
    ))
    .bind(all)
    .fetch_all(pool)
    .await?)
}

/// The [`Decided`] of a decision function's row (`verdict`, `prior`, `reason`).
fn decided_of(row: &sqlx::postgres::PgRow) -> Result<Decided, StoreError> {
    let verdict: String = row.try_get("verdict")?;
    let prior = match row.try_get::<Option<String>, _>("prior") {
        Ok(p) => parse_state(p)?,
        // operator_reject has no prior column.
        Err(sqlx::Error::ColumnNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let reason: Option<String> = row.try_get("reason")?;
    match (verdict.as_str(), prior, reason) {
        ("applied", Some(prior), None) => Ok(Decided::Applied { prior }),
        ("action_refused", None, Some(reason)) => Ok(Decided::ActionRefused { reason }),
        ("rejected", None, None) => Ok(Decided::Rejected),
        ("refused", None, Some(reason)) => Ok(Decided::Refused { reason }),
        ("not_found", None, None) => Ok(Decided::NotFound),
        (v, p, r) => Err(StoreError::Corrupt(format!(
            "approval decision answered {v} (prior {p:?}, reason {r:?})"
        ))),
    }
}

/// Approves request `id` as `approver` and applies its action in the same transaction (the
/// caller's), as its requester asked it; see [`Decided`].
pub async fn approve(
    conn: &mut PgConnection,
    id: i64,
    approver: &str,
    cx: Context,
) -> Result<Decided, StoreError> {
    let row = sqlx::query("SELECT verdict, prior, reason FROM operator_approve($1, $2, $3, $4)")
        .bind(id)
        .bind(approver)
        .bind(millis(cx.quiet))
        .bind(cx.tz.name())
        .fetch_one(&mut *conn)
        .await?;
    decided_of(&row)
}

/// Rejects request `id` (its requester may withdraw it this way), audited, in the caller's
/// transaction.
pub async fn reject(
    conn: &mut PgConnection,
    id: i64,
    op: Operator<'_>,
) -> Result<Decided, StoreError> {
    let row = sqlx::query("SELECT verdict, reason FROM operator_reject($1, $2, $3)")
        .bind(id)
        .bind(op.name)
        .bind(op.note)
        .fetch_one(&mut *conn)
        .await?;
    decided_of(&row)
}
