//! The sweeper's queries: what is overdue, whatever happened to its message.
//!
//! Postgres is the source of truth, so the sweeper never trusts that a message will come: it
//! finds leases that ran out (a worker died or stalled mid-call), retries that are due, and
//! `received` jobs nobody claimed (a worker died between intake and claim). There is no index on
//! a job's state on purpose: an index on columns that change at every transition would cost
//! every transition its HOT update (see docs/design-notes.md). So each query takes a [`Scope`]:
//! the jobs created since a moment, read through `jobs_created_at` (the table's history is
//! not read), or all of them, read sequentially. The sweeper uses the first every round and the
//! second now and then. Each is planned with its own bound (not kept prepared), so a bounded
//! sweep is never given a plan made for the whole table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::StoreError;

/// Which jobs a sweep looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Jobs created at or after this moment, found by `jobs_created_at`.
    CreatedSince(DateTime<Utc>),
    /// Every job: a sequential read of the table.
    All,
}

impl Scope {
    /// The bound the queries take (`NULL` for all).
    fn since(self) -> Option<DateTime<Utc>> {
        match self {
            Scope::CreatedSince(t) => Some(t),
            Scope::All => None,
        }
    }
}

/// A job whose lease ran out.
#[derive(Debug, Clone)]
pub struct Expired {
    pub refund_no: String,
    pub attempt: i32,
    pub provider: String,
    pub merchant: String,
    /// As recorded on the job at intake (false when it was not recorded).
    pub idempotent: bool,
}

/// In-flight jobs in `scope` whose lease has ended, at most `limit`.
pub async fn expired_leases(
    pool: &PgPool,
    scope: Scope,
    limit: i64,
) -> Result<Vec<Expired>, StoreError> {
    let rows = sqlx::query(
        "SELECT refund_no, attempt, provider, merchant, COALESCE(idempotent, false) AS idempotent
         FROM jobs
         WHERE state = 'in_flight' AND lease_until < now()
           AND ($2::timestamptz IS NULL OR created_at >= $2)
         ORDER BY lease_until LIMIT $1",
    )
    .persistent(false)
    .bind(limit)
    .bind(scope.since())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Expired {
                refund_no: r.try_get("refund_no")?,
                attempt: r.try_get("attempt")?,
                provider: r.try_get("provider")?,
                merchant: r.try_get("merchant")?,
                idempotent: r.try_get("idempotent")?,
            })
        })
        .collect()
}

/// Jobs in `scope` ready for a claim: due retries, and `received` jobs older than
/// `orphan_after`.
pub async fn due(
    pool: &PgPool,
    scope: Scope,
    orphan_after: Duration,
    limit: i64,
    skip: &[(String, String)],
) -> Result<Vec<DueJob>, StoreError> {
    let (skip_provider, skip_merchant): (Vec<&str>, Vec<&str>) =
        skip.iter().map(|(p, m)| (p.as_str(), m.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT refund_no, provider, merchant FROM jobs
         WHERE ((state = 'retry_wait' AND next_attempt_at <= now())
                OR (state = 'received' AND updated_at < now() - $1 * interval '1 millisecond'))
           AND ($3::timestamptz IS NULL OR created_at >= $3)
           AND (provider, merchant) NOT IN (SELECT * FROM unnest($4::text[], $5::text[]))
         ORDER BY updated_at LIMIT $2",
    )
    .persistent(false)
    .bind(i64::try_from(orphan_after.as_millis()).unwrap_or(i64::MAX))
    .bind(limit)
    .bind(scope.since())
    .bind(&skip_provider)
    .bind(&skip_merchant)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let provider: String = r.try_get("provider")?;
            Ok(DueJob {
                refund_no: r.try_get("refund_no")?,
                provider: provider
                    .parse()
                    .map_err(|e: String| StoreError::Corrupt(format!("jobs.provider: {e}")))?,
                merchant: r.try_get("merchant")?,
            })
        })
        .collect()
}

/// A job the sweeper found due, and whose lane it goes through.
#[derive(Debug, Clone)]
pub struct DueJob {
    pub refund_no: String,
    pub provider: crate::job::ProviderKind,
    pub merchant: String,
}

/// When the oldest non-final, non-dead job in `scope` was created (`None` when there is none).
pub async fn oldest_open(pool: &PgPool, scope: Scope) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row = sqlx::query(
        "SELECT min(created_at) AS oldest FROM jobs
         WHERE state IN ('received', 'in_flight', 'retry_wait')
           AND ($1::timestamptz IS NULL OR created_at >= $1)",
    )
    .persistent(false)
    .bind(scope.since())
    .fetch_one(pool)
    .await?;
    Ok(row.try_get("oldest")?)
}
