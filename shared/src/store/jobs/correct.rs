//! Corrections after the fact: a final job booked wrongly, put right by an operator with the
//! provider's evidence (`refundctl job correct`, DESIGN §7, §8).
//!
//! A correction never edits what was booked. It appends ledger entries (a reversal of the
//! live booking, and a booking of the right amount), moves the order's reserved amount, moves
//! the job by [`crate::state::Trigger::Correct`] with its history row, queues
//! `refund.corrected`, closes the refund's open reconciliation cases as `corrected` and writes
//! the audit row, all in the caller's transaction under the job's row lock. The rules and the
//! writes are the database's (`operator_correct`, migration 20261204000050); the ledger's own
//! constraints (migration 20261203000030) keep a refund booked at most once, net, whatever the
//! corrections.
//!
//! Entries made by a correction carry the business date of what they put right: a reversal
//! and its re-booking the date of the booking they replace, a first booking the date the
//! provider paid it when a reconciliation case says so (its `missing_in_ledger` day), else
//! today. Rerunning that day's reconciliation then finds it balanced.

use sqlx::PgConnection;

use crate::state::State;
use crate::store::StoreError;

use super::manual::verdict_of;
use super::{Operator, Verdict};

/// What the provider's evidence says the refund's end really was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    /// Paid, with this settlement fee.
    Succeeded { settlement_refund_fee: i64 },
    /// Not paid.
    Failed,
}

impl Correction {
    pub fn state(self) -> State {
        match self {
            Correction::Succeeded { .. } => State::Succeeded,
            Correction::Failed => State::Failed,
        }
    }

    pub fn settlement_refund_fee(self) -> Option<i64> {
        match self {
            Correction::Succeeded {
                settlement_refund_fee,
            } => Some(settlement_refund_fee),
            Correction::Failed => None,
        }
    }
}

/// Corrects a final job's booking with the provider's evidence (`op.note`): see the module
/// docs. Refusals are audited and change nothing else.
pub async fn correct(
    conn: &mut PgConnection,
    refund_no: &str,
    to: Correction,
    op: Operator<'_>,
    tz: chrono_tz::Tz,
) -> Result<Verdict, StoreError> {
    let row =
        sqlx::query("SELECT verdict, prior, reason FROM operator_correct($1, $2, $3, $4, $5, $6)")
            .bind(refund_no)
            .bind(to.state().as_str())
            .bind(to.settlement_refund_fee())
            .bind(tz.name())
            .bind(op.name)
            .bind(op.note)
            .fetch_one(&mut *conn)
            .await?;
    verdict_of(&row)
}
