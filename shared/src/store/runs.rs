//! Stored reconciliation runs with their totals: what `refund-reconciler runs` and the
//! console's reconciliation page show.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Row};

/// One stored run with its totals summed over its (provider, merchant) pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub date: NaiveDate,
    /// `null`: every provider.
    pub provider: Option<String>,
    /// `statement`, or `attempts` (our own recorded answers: not an independent comparison).
    pub source: String,
    pub status: String,
    pub discrepancies: i64,
    pub pending: i64,
    pub ledger_total: i64,
    pub provider_total: i64,
    pub diff: i64,
    pub ledger_count: i64,
    pub provider_count: i64,
    pub superseded_by: Option<i64>,
    pub statement_files: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub error: Option<String>,
}

const RUNS_SQL: &str = "SELECT r.id, r.business_date, r.provider, r.source, r.status,
        r.discrepancy_count, r.pending_count, r.superseded_by, r.statement_files, r.started_at,
        r.error,
        coalesce(sum(t.ledger_total), 0)::int8 AS ledger_total,
        coalesce(sum(t.provider_total), 0)::int8 AS provider_total,
        coalesce(sum(t.diff), 0)::int8 AS diff,
        coalesce(sum(t.ledger_count), 0)::int8 AS ledger_count,
        coalesce(sum(t.provider_count), 0)::int8 AS provider_count
 FROM reconciliation_runs r
 LEFT JOIN reconciliation_totals t ON t.run_id = r.id
 WHERE ($1::date IS NULL OR r.business_date = $1) AND r.status <> 'running'
 GROUP BY r.id
 ORDER BY r.id DESC
 LIMIT $2";

/// The stored runs (of `date`, if given), newest first, at most `limit`.
pub async fn list(
    conn: &mut PgConnection,
    date: Option<NaiveDate>,
    limit: i64,
) -> Result<Vec<RunRow>, sqlx::Error> {
    let rows = sqlx::query(RUNS_SQL)
        .bind(date)
        .bind(limit.max(0))
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(RunRow {
                id: r.try_get("id")?,
                date: r.try_get("business_date")?,
                provider: r.try_get("provider")?,
                source: r.try_get("source")?,
                status: r.try_get("status")?,
                discrepancies: r.try_get("discrepancy_count")?,
                pending: r.try_get("pending_count")?,
                ledger_total: r.try_get("ledger_total")?,
                provider_total: r.try_get("provider_total")?,
                diff: r.try_get("diff")?,
                ledger_count: r.try_get("ledger_count")?,
                provider_count: r.try_get("provider_count")?,
                superseded_by: r.try_get("superseded_by")?,
                statement_files: r.try_get("statement_files")?,
                started_at: r.try_get("started_at")?,
                error: r.try_get("error")?,
            })
        })
        .collect()
}
