//! What the jobs did minute by minute, for the console's throughput and failure charts: read
//! from the transition history (its BRIN index on `at` keeps the read to the last blocks).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::StoreError;

/// The transitions of one minute, by what they mean.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub succeeded: i64,
    pub failed: i64,
    pub accepted: i64,
    pub dead: i64,
    /// Attempts that will be tried again (transport faults, throttling).
    pub retried: i64,
}

/// The last `minutes` whole minutes up to now, oldest first, one row per minute (zeros
/// included, so a chart's x axis is time).
pub async fn last_minutes(pool: &PgPool, minutes: i32) -> Result<Vec<Minute>, StoreError> {
    Ok(sqlx::query_as::<_, Minute>(
        "WITH m AS (
             SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                                    date_trunc('minute', now()), interval '1 minute') AS minute),
         t AS (
             SELECT date_trunc('minute', at) AS minute, to_state, count(*) AS n
             FROM job_transitions
             WHERE at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
               AND to_state IN ('succeeded', 'failed', 'accepted', 'dead', 'retry_wait')
             GROUP BY 1, 2)
         SELECT m.minute,
                coalesce(sum(t.n) FILTER (WHERE t.to_state = 'succeeded'), 0)::int8 AS succeeded,
                coalesce(sum(t.n) FILTER (WHERE t.to_state = 'failed'), 0)::int8 AS failed,
                coalesce(sum(t.n) FILTER (WHERE t.to_state = 'accepted'), 0)::int8 AS accepted,
                coalesce(sum(t.n) FILTER (WHERE t.to_state = 'dead'), 0)::int8 AS dead,
                coalesce(sum(t.n) FILTER (WHERE t.to_state = 'retry_wait'), 0)::int8 AS retried
         FROM m LEFT JOIN t ON t.minute = m.minute
         GROUP BY m.minute ORDER BY m.minute",
    )
    .bind(minutes.max(1))
    .fetch_all(pool)
    .await?)
}

/// The discrepancies of one kind in each date's current reconciliation run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct KindTotal {
    pub kind: String,
    pub count: i64,
    /// Sums of the amounts on each side (fen; a side without an amount counts 0).
    pub ledger_amount: i64,
    pub provider_amount: i64,
}

/// Discrepancies of each date's current runs, by kind (the kinds that have any), largest
/// first.
pub async fn current_discrepancies_by_kind(pool: &PgPool) -> Result<Vec<KindTotal>, StoreError> {
    Ok(sqlx::query_as::<_, KindTotal>(
        "SELECT kind, count(*) AS count,
                coalesce(sum(ledger_amount), 0)::int8 AS ledger_amount,
                coalesce(sum(provider_amount), 0)::int8 AS provider_amount
         FROM reconciliation_current_discrepancies
         GROUP BY kind ORDER BY count(*) DESC, kind",
    )
    .fetch_all(pool)
    .await?)
}
