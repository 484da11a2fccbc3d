//! The sweeper's queries: what is overdue, whatever happened to its message.
//!
//! Postgres is the source of truth, so the sweeper never trusts that a message will come: it
//! finds leases that ran out (a worker died or stalled mid-call), retries that are due, and
//! `received` jobs nobody claimed (a worker died between intake and claim). These scans read
//! `jobs` without an index on its state on purpose: an index on columns that change at every
//! transition would cost every transition its HOT update (see docs/design-notes.md).

use std::time::Duration;

use sqlx::{PgPool, Row};

use super::StoreError;

/// A job whose lease ran out.
#[derive(Debug, Clone)]
pub struct Expired {
    pub refund_no: String,
    pub attempt: i32,
    pub provider: String,
    pub merchant: String,
}

/// In-flight jobs whose lease has ended, at most `limit`.
pub async fn expired_leases(pool: &PgPool, limit: i64) -> Result<Vec<Expired>, StoreError> {
    let rows = sqlx::query(
        "SELECT refund_no, attempt, provider, merchant FROM jobs
         WHERE state = 'in_flight' AND lease_until < now()
         ORDER BY lease_until LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Expired {
                refund_no: r.try_get("refund_no")?,
                attempt: r.try_get("attempt")?,
                provider: r.try_get("provider")?,
                merchant: r.try_get("merchant")?,
            })
        })
        .collect()
}

/// Jobs ready for a claim: due retries, and `received` jobs older than `orphan_after`.
pub async fn due(
    pool: &PgPool,
    orphan_after: Duration,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT refund_no FROM jobs
         WHERE (state = 'retry_wait' AND next_attempt_at <= now())
            OR (state = 'received' AND updated_at < now() - $1 * interval '1 millisecond')
         ORDER BY updated_at LIMIT $2",
    )
    .bind(i64::try_from(orphan_after.as_millis()).unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok(r.try_get("refund_no")?))
        .collect()
}

/// The age in seconds of the oldest non-final, non-dead job (0 when there is none).
pub async fn oldest_open_age_secs(pool: &PgPool) -> Result<f64, StoreError> {
    let row = sqlx::query(
        "SELECT COALESCE(extract(epoch FROM now() - min(created_at))::float8, 0) AS age
         FROM jobs WHERE state IN ('received', 'in_flight', 'retry_wait')",
    )
    .fetch_one(pool)
    .await?;
    Ok(row.try_get("age")?)
}
