//! What operators and tests read: job states, counts, the paid ledger.

use std::collections::BTreeMap;

use sqlx::{PgPool, Row};

use super::StoreError;
use crate::state::State;

/// Number of jobs in each state.
pub async fn counts_by_state(pool: &PgPool) -> Result<BTreeMap<State, i64>, StoreError> {
    let rows = sqlx::query("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        .fetch_all(pool)
        .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let s: String = r.try_get("state")?;
        out.insert(s.parse().map_err(StoreError::Corrupt)?, r.try_get("n")?);
    }
    Ok(out)
}

/// Number of stored rejected messages of a kind (`rejected` or `conflict`).
pub async fn count_rejected(pool: &PgPool, kind: &str) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT count(*) AS n FROM rejected_messages WHERE kind = $1")
        .bind(kind)
        .fetch_one(pool)
        .await?;
    Ok(row.try_get("n")?)
}

/// A job's state and cause, if it exists.
pub async fn job_state(
    pool: &PgPool,
    refund_no: &str,
) -> Result<Option<(State, Option<String>)>, StoreError> {
    let row = sqlx::query("SELECT state, cause FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        let s: String = r.try_get("state")?;
        Ok((s.parse().map_err(StoreError::Corrupt)?, r.try_get("cause")?))
    })
    .transpose()
}

/// One ledger refund entry, as tests and reconciliation compare it with the provider.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LedgerRow {
    pub provider: String,
    pub merchant: String,
    pub refund_no: String,
    pub provider_refund_id: Option<String>,
    pub refund_fee: i64,
    pub settlement_refund_fee: i64,
}

/// Every ledger entry, net of reversals, ordered by refund_no.
pub async fn ledger(pool: &PgPool) -> Result<Vec<LedgerRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT provider, merchant, refund_no, max(provider_refund_id) AS provider_refund_id,
                sum(refund_fee)::bigint AS refund_fee,
                sum(settlement_refund_fee)::bigint AS settlement_refund_fee
         FROM ledger GROUP BY provider, merchant, refund_no
         HAVING sum(refund_fee) <> 0 ORDER BY refund_no",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(LedgerRow {
                provider: r.try_get("provider")?,
                merchant: r.try_get("merchant")?,
                refund_no: r.try_get("refund_no")?,
                provider_refund_id: r.try_get("provider_refund_id")?,
                refund_fee: r.try_get("refund_fee")?,
                settlement_refund_fee: r.try_get("settlement_refund_fee")?,
            })
        })
        .collect()
}

/// Number of provider calls recorded per refund_no (fenced ones included).
pub async fn attempts_per_job(pool: &PgPool) -> Result<BTreeMap<String, i64>, StoreError> {
    let rows =
        sqlx::query("SELECT refund_no, count(*) AS n FROM provider_attempts GROUP BY refund_no")
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("refund_no")?, r.try_get("n")?)))
        .collect()
}
