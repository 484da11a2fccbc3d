//! The status query schedule (`status_queries`): which jobs wait for the provider's word, and
//! when each is asked next.
//!
//! A row exists while a job waits: an accepted job (added with its acceptance), or a ShengPay
//! job dead with an unknown outcome (added by the sweeper's [`enroll`]). Workers take due rows
//! with a lease and `SKIP LOCKED`, so replicas share the work and no two query one job at once;
//! a worker that dies mid-query leaves a lease that ends, and the row is taken again. A row
//! whose schedule ran out for a dead job stays, due never (`next_at = 'infinity'`), so that the
//! sweeper does not enroll the job again; a replay or resolution removes it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use super::{StoreError, millis};
use crate::job::RefundRequest;
use crate::state::State;

/// A due query, taken with a lease.
#[derive(Debug, Clone)]
pub struct DueQuery {
    pub refund_no: String,
    pub since: DateTime<Utc>,
    /// Queries made before this one.
    pub queries: i32,
    pub state: State,
    pub cause: Option<String>,
    pub request: RefundRequest,
    /// When the job was taken in.
    pub created_at: DateTime<Utc>,
}

/// Takes up to `limit` due queries for `lease`, skipping rows another worker holds; the job's
/// request comes with each. A row whose job cannot be read is left to its lease.
pub async fn take_due(
    pool: &PgPool,
    limit: i64,
    lease: Duration,
) -> Result<Vec<DueQuery>, StoreError> {
    let rows = sqlx::query(
        "WITH due AS (
             SELECT refund_no FROM status_queries
             WHERE next_at <= now() AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_at LIMIT $1
             FOR UPDATE SKIP LOCKED
         ), taken AS (
             UPDATE status_queries q SET lease_until = now() + $2 * interval '1 millisecond'
             FROM due WHERE q.refund_no = due.refund_no
             RETURNING q.refund_no, q.since, q.queries
         )
         SELECT t.refund_no, t.since, t.queries, j.state, j.cause, j.request, j.created_at
         FROM taken t JOIN jobs j USING (refund_no)",
    )
    .bind(limit)
    .bind(millis(lease))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let refund_no: String = r.try_get("refund_no")?;
        let state: String = r.try_get("state")?;
        let request: serde_json::Value = r.try_get("request")?;
        let request = match serde_json::from_value::<RefundRequest>(request) {
            Ok(req) => req,
            Err(e) => {
                tracing::error!(refund_no = %refund_no, error = %e, "a job waiting for a status query cannot be read");
                continue;
            }
        };
        out.push(DueQuery {
            refund_no,
            since: r.try_get("since")?,
            queries: r.try_get("queries")?,
            state: state.parse().map_err(StoreError::Corrupt)?,
            cause: r.try_get("cause")?,
            request,
            created_at: r.try_get("created_at")?,
        });
    }
    Ok(out)
}

/// Puts a job in the schedule (or restarts its wait): first query after `first`, or now.
pub async fn wait(
    conn: &mut PgConnection,
    refund_no: &str,
    provider: &str,
    merchant: &str,
    first: Option<Duration>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO status_queries (refund_no, provider, merchant, next_at)
         VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
         ON CONFLICT (refund_no) DO UPDATE
             SET since = now(), next_at = EXCLUDED.next_at, queries = 0, lease_until = NULL",
    )
    .bind(refund_no)
    .bind(provider)
    .bind(merchant)
    .bind(first.map_or(0, millis))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes a job out of the schedule (its end is known, or an operator took it over).
pub async fn done(conn: &mut PgConnection, refund_no: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM status_queries WHERE refund_no = $1")
        .bind(refund_no)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records a query that did not end the wait and when the next is due (`None`: never, the
/// schedule ran out), giving the lease back.
pub async fn reschedule(
    pool: &PgPool,
    refund_no: &str,
    next_in: Option<Duration>,
    status: Option<&str>,
    error: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE status_queries
         SET queries = queries + 1, lease_until = NULL, last_status = $3, last_error = $4,
             next_at = CASE WHEN $2::bigint IS NULL THEN 'infinity'::timestamptz
                            ELSE now() + $2 * interval '1 millisecond' END
         WHERE refund_no = $1",
    )
    .bind(refund_no)
    .bind(next_in.map(millis))
    .bind(status)
    .bind(error.map(|e| {
        let short: String = e.chars().take(1024).collect();
        super::text::storable(&short).into_owned()
    }))
    .execute(pool)
    .await?;
    Ok(())
}

/// Enrolls the jobs that should be waiting for a status query and are not: ShengPay jobs dead
/// with an unknown outcome, and accepted jobs whose row is missing (a backstop: acceptance
/// adds it in the same statement). A sequential read of `jobs`, so the sweeper runs it with its
/// full sweep. Returns how many it enrolled.
pub async fn enroll(pool: &PgPool, providers: &[&str]) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO status_queries (refund_no, provider, merchant, next_at)
         SELECT refund_no, provider, merchant, now() FROM jobs
         WHERE provider = ANY($1)
           AND (state = 'accepted' OR (state = 'dead' AND cause = 'outcome_unknown'))
         ON CONFLICT (refund_no) DO NOTHING",
    )
    .persistent(false)
    .bind(providers)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How many jobs wait for a status query, and when the oldest wait began.
pub async fn backlog(pool: &PgPool) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
    let r = sqlx::query(
        "SELECT count(*) AS n, min(since) AS oldest FROM status_queries
         WHERE next_at <> 'infinity'",
    )
    .fetch_one(pool)
    .await?;
    Ok((r.try_get("n")?, r.try_get("oldest")?))
}
