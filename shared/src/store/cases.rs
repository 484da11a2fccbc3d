//! Reconciliation cases (DESIGN §7): what finance acts on after a run found discrepancies.
//!
//! This module owns the `reconciliation_cases` table (migration 20261203000030, which says
//! why a case is keyed the way it is and when it closes or opens again). The reconciler opens
//! and carries cases forward in the transaction that stores its run ([`open_from_run`]);
//! operators list and explain them (`refundctl case`), and a correction of a refund's booking
//! closes its open cases as `corrected` (the database's `operator_correct`). Every operator
//! decision is a database function that audits it in `operator_audit`, and the database's own
//! session user is stamped on the case.

use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use super::jobs::Operator;

/// A case's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseState {
    Open,
    /// An operator said why the difference is right, or will settle by itself.
    Explained,
    /// The refund's booking was corrected (`refundctl job correct`).
    Corrected,
    /// A later run of the day that supersedes the one that found it no longer finds it.
    ResolvedByRerun,
}

impl CaseState {
    pub const ALL: [CaseState; 4] = [
        CaseState::Open,
        CaseState::Explained,
        CaseState::Corrected,
        CaseState::ResolvedByRerun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CaseState::Open => "open",
            CaseState::Explained => "explained",
            CaseState::Corrected => "corrected",
            CaseState::ResolvedByRerun => "resolved_by_rerun",
        }
    }
}

impl fmt::Display for CaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CaseState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CaseState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown case state {s:?}"))
    }
}

/// What [`open_from_run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CarriedForward {
    /// Cases this run opened (first found by it).
    pub opened: u64,
    /// Cases an earlier run had opened that this run found again.
    pub seen_again: u64,
    /// Open cases that this run, superseding the run that last found them, no longer finds.
    pub resolved_by_rerun: u64,
}

/// Opens a case for each of run `run_id`'s discrepancies (but `pending`, which a rerun with
/// the neighbouring day settles), carries forward the cases earlier runs of the day opened,
/// and closes as `resolved_by_rerun` the open cases of the runs it supersedes that it no
/// longer finds. Set-based (one upsert for the run's discrepancies, one update for the cases
/// it no longer finds), so a run with a hundred thousand discrepancies costs two statements.
/// Called in the run's own transaction after `superseded_by` is set; it returns
/// `sqlx::Error` because that is what the reconciler's run speaks.
pub async fn open_from_run(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<CarriedForward, sqlx::Error> {
    // `xmax = 0` tells a row this statement inserted from one it updated. A `corrected` case
    // is opened again only by a run that began after the correction: one that began before
    // it saw the wrong booking.
    let row = sqlx::query(
        "WITH run AS (
             SELECT id, business_date, coalesce(locked_at, started_at) AS began
             FROM reconciliation_runs WHERE id = $1
         ), up AS (
             INSERT INTO reconciliation_cases AS c (business_date, provider, merchant,
                 refund_no, kind, ledger_amount, provider_amount, detail, first_run_id,
                 last_run_id)
             SELECT run.business_date, d.provider, d.merchant, d.refund_no, d.kind,
                    d.ledger_amount, d.provider_amount, d.detail, d.run_id, d.run_id
             FROM reconciliation_discrepancies d JOIN run ON run.id = d.run_id
             WHERE d.run_id = $1 AND d.kind <> 'pending'
             ON CONFLICT (business_date, provider, merchant, refund_no, kind) DO UPDATE
             SET ledger_amount = EXCLUDED.ledger_amount,
                 provider_amount = EXCLUDED.provider_amount,
                 detail = EXCLUDED.detail,
                 last_run_id = EXCLUDED.last_run_id,
                 state = CASE WHEN c.state = 'resolved_by_rerun'
                                OR (c.state = 'corrected'
                                    AND c.closed_at < (SELECT began FROM run))
                              THEN 'open' ELSE c.state END,
                 closed_at = CASE WHEN c.state = 'resolved_by_rerun'
                                    OR (c.state = 'corrected'
                                        AND c.closed_at < (SELECT began FROM run))
                                  THEN NULL ELSE c.closed_at END,
                 closed_by = CASE WHEN c.state = 'resolved_by_rerun'
                                    OR (c.state = 'corrected'
                                        AND c.closed_at < (SELECT began FROM run))
                                  THEN NULL ELSE c.closed_by END,
                 close_note = CASE WHEN c.state = 'resolved_by_rerun'
                                     OR (c.state = 'corrected'
                                         AND c.closed_at < (SELECT began FROM run))
                                   THEN NULL ELSE c.close_note END
             RETURNING c.id, (c.xmax = 0) AS inserted
         ), seen AS (
             INSERT INTO case_sightings (case_id, run_id)
             SELECT id, $1 FROM up
             ON CONFLICT DO NOTHING
         )
         SELECT count(*) FILTER (WHERE inserted) AS opened,
                count(*) FILTER (WHERE NOT inserted) AS seen_again
         FROM up",
    )
    .bind(run_id)
    .fetch_one(&mut *conn)
    .await?;
    let opened: i64 = row.try_get("opened")?;
    let seen_again: i64 = row.try_get("seen_again")?;
    // The upsert above moved every case this run found to last_run_id = $1, so what is still
    // open on a run this one supersedes is what it no longer finds.
    let gone = sqlx::query(
        "UPDATE reconciliation_cases c
         SET state = 'resolved_by_rerun', closed_at = now(), closed_by = 'reconciler',
             close_note = format('not found by run %s, which supersedes run %s', $1::bigint,
                                 c.last_run_id)
         FROM reconciliation_runs o
         WHERE c.state = 'open' AND c.last_run_id = o.id AND o.superseded_by = $1",
    )
    .bind(run_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(CarriedForward {
        opened: u64::try_from(opened).unwrap_or(0),
        seen_again: u64::try_from(seen_again).unwrap_or(0),
        resolved_by_rerun: gone,
    })
}

/// One case, as `refundctl case list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Case {
    pub id: i64,
    pub business_date: NaiveDate,
    pub provider: String,
    pub merchant: String,
    /// Empty for `statement_missing` (a whole provider and merchant).
    pub refund_no: String,
    pub kind: String,
    pub state: String,
    pub ledger_amount: Option<i64>,
    pub provider_amount: Option<i64>,
    pub detail: String,
    pub first_run_id: i64,
    pub last_run_id: i64,
    /// How many runs found it.
    pub runs: i64,
    pub opened_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_by: Option<String>,
    pub close_note: Option<String>,
    pub closed_db_user: Option<String>,
    /// Whole days it has been open (until now, or until it closed).
    pub days_open: i64,
}

/// Which cases to list.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaseFilter {
    pub date: Option<NaiveDate>,
    pub state: Option<CaseState>,
}

/// The columns of [`Case`] from `reconciliation_cases c`, as a literal (queries are static
/// text).
macro_rules! case_select {
    () => {
        "SELECT c.id, c.business_date, c.provider, c.merchant, c.refund_no, c.kind, c.state,
                c.ledger_amount, c.provider_amount, c.detail, c.first_run_id, c.last_run_id,
                (SELECT count(*) FROM case_sightings r WHERE r.case_id = c.id) AS runs,
                c.opened_at, c.closed_at, c.closed_by, c.close_note, c.closed_db_user,
                floor(extract(epoch FROM coalesce(c.closed_at, now()) - c.opened_at)
                      / 86400)::bigint AS days_open
         FROM reconciliation_cases c "
    };
}

/// The cases matching the filter, oldest business date first.
pub async fn list(pool: &PgPool, filter: CaseFilter) -> Result<Vec<Case>, StoreError> {
    Ok(sqlx::query_as::<_, Case>(concat!(
        case_select!(),
        "WHERE ($1::date IS NULL OR c.business_date = $1)
           AND ($2::text IS NULL OR c.state = $2)
         ORDER BY c.business_date, c.provider, c.merchant, c.refund_no, c.kind"
    ))
    .bind(filter.date)
    .bind(filter.state.map(CaseState::as_str))
    .fetch_all(pool)
    .await?)
}

/// Every case of one refund, open or closed, oldest first (a job's timeline shows them).
pub async fn of_refund(pool: &PgPool, refund_no: &str) -> Result<Vec<Case>, StoreError> {
    Ok(sqlx::query_as::<_, Case>(concat!(
        case_select!(),
        "WHERE c.refund_no = $1 ORDER BY c.business_date, c.id"
    ))
    .bind(refund_no)
    .fetch_all(pool)
    .await?)
}

/// What explaining a case did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explained {
    Done,
    /// Nothing changed but the audit row.
    Refused {
        reason: String,
    },
    NotFound,
}

/// Marks an open case `explained` with the operator's note, audited (a refusal too), in the
/// caller's transaction (`operator_case_explain`, migration 20261204000050).
pub async fn explain(
    conn: &mut PgConnection,
    case_id: i64,
    op: Operator<'_>,
) -> Result<Explained, StoreError> {
    let row = sqlx::query("SELECT verdict, reason FROM operator_case_explain($1, $2, $3)")
        .bind(case_id)
        .bind(op.name)
        .bind(op.note)
        .fetch_one(&mut *conn)
        .await?;
    let verdict: String = row.try_get("verdict")?;
    let reason: Option<String> = row.try_get("reason")?;
    match (verdict.as_str(), reason) {
        ("done", None) => Ok(Explained::Done),
        ("refused", Some(reason)) => Ok(Explained::Refused { reason }),
        ("not_found", None) => Ok(Explained::NotFound),
        (v, r) => Err(StoreError::Corrupt(format!(
            "operator_case_explain answered {v} (reason {r:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_states_round_trip_through_text() {
        for s in CaseState::ALL {
            assert_eq!(s.as_str().parse::<CaseState>().unwrap(), s);
        }
        assert!("closed".parse::<CaseState>().is_err());
    }
}
