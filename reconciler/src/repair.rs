//! The repair loop: WuPay refunds whose outcome is unknown, settled from the provider's
//! statements (DESIGN §5, WuPay; §7).
//!
//! WuPay has no status query, so a call that may have reached it (`maybe_delivered`, or a
//! `RefundResult` we do not recognise) leaves its job dead with `outcome_unknown`, and replay
//! refuses to resend it: the provider may have paid. Its statement is the evidence. Before a
//! run against statements compares anything, for its business date D:
//!
//! - **Paid**: a job listed on D's statement (its merchant and `refund_no`, one valid row,
//!   the job's refund_fee) becomes `succeeded` through the same code path as a provider's
//!   status report: booked with the row's settlement and provider refund id, dated by its
//!   `refunded_at`, a `refund.resolved` event, the transition's detail naming the file and
//!   line. The run that follows then finds it booked and paid, not `missing_in_ledger`.
//! - **Absent**: a job whose attempts that may have paid fell on D or the day before, with no
//!   row on D's statement though the statement has rows of its merchant on D, gets the absence
//!   recorded. Once every needed day (each such attempt's day and the next: a payment near
//!   midnight is on the provider's next day) has been seen without it, the verdict "not paid
//!   per statement" is written, and only then does replay resend it.
//!
//! A row that disagrees in amount, or two rows of one refund, settle nothing: the run reports
//! them and an operator looks. Everything here is evidence, append-only (migration 0040).
//!
//! This runs in its own transaction, after the date's lock and before the run's snapshot, so
//! that the run sees what it booked. The candidate jobs are few (dead, unknown, WuPay): with
//! none, the statement is not read at all.

use chrono::NaiveDate;
use serde::Serialize;
use shared::provider::status::{RefundStatus, StatusReport};
use shared::store::StoreError;
use shared::store::jobs::{self, Effect, Source};
use sqlx::{Connection, PgConnection, Row};

/// Who the transitions and verdicts are by.
const ACTOR: &str = "reconciler:statement";

/// What the repair loop did for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Repairs {
    /// Booked as paid from a statement row.
    pub paid: Vec<Repaired>,
    /// Found absent on the run's date (not yet a verdict unless also in `not_paid`).
    pub absent: Vec<Repaired>,
    /// Marked not paid per statement: replay may resend them.
    pub not_paid: Vec<Repaired>,
}

impl Repairs {
    pub fn is_empty(&self) -> bool {
        self.paid.is_empty() && self.absent.is_empty() && self.not_paid.is_empty()
    }
}

/// One job the repair loop acted on, and the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Repaired {
    pub refund_no: String,
    pub merchant: String,
    /// `FILE:LINE` of the row for a payment; the files (and days) for an absence.
    pub evidence: String,
}

/// The WuPay jobs dead with an unknown outcome (few: the partial index on dead jobs).
const CANDIDATES: &str = "SELECT count(*) FROM jobs
     WHERE state = 'dead' AND cause = 'outcome_unknown' AND provider = 'wupay'";

/// Candidates listed on day $1 of the statement, once, valid, with the job's refund_fee; $2
/// the statement files in load order.
const LISTED: &str = "SELECT j.refund_no, j.merchant, s.provider_refund_id,
            s.settlement_refund_fee, s.refunded_at,
            coalesce(($2::text[])[s.file + 1], 'statement') || ':' || s.line AS evidence
     FROM jobs j
     JOIN recon_statement s ON s.provider = 'wupay' AND s.merchant = j.merchant
      AND s.refund_no = j.refund_no AND s.business_date = $1
     WHERE j.state = 'dead' AND j.cause = 'outcome_unknown' AND j.provider = 'wupay'
       AND NOT s.invalid AND s.refund_fee = j.refund_fee
       AND (SELECT count(*) FROM recon_statement x
            WHERE x.provider = 'wupay' AND x.merchant = j.merchant
              AND x.refund_no = j.refund_no AND x.business_date = $1) = 1
     ORDER BY j.refund_no";

/// Records the absences of day $2 (time zone $1, statement files $3): needed days
/// (`statement_needed_days`, migration 0040) of $2 whose
/// refund has no row on $2, where the statement has rows of its merchant on $2.
const RECORD_ABSENCES: &str = "WITH need AS (SELECT * FROM statement_needed_days($1))
     INSERT INTO statement_absences (refund_no, attempt, business_date, files)
     SELECT n.refund_no, n.attempt, n.day, $3 FROM need n
     WHERE n.day = $2
       AND NOT EXISTS (SELECT 1 FROM recon_statement s
                       WHERE s.provider = 'wupay' AND s.merchant = n.merchant
                         AND s.refund_no = n.refund_no AND s.business_date = $2)
       AND EXISTS (SELECT 1 FROM recon_statement s
                   WHERE s.provider = 'wupay' AND s.merchant = n.merchant
                     AND s.business_date = $2)
     ON CONFLICT DO NOTHING
     RETURNING refund_no, (SELECT merchant FROM jobs WHERE jobs.refund_no = statement_absences.refund_no)";

/// The verdicts "not paid per statement" now proven (time zone $1): every needed day has an
/// absence for the job's attempt count.
const DECIDE_NOT_PAID: &str = "WITH need AS (SELECT * FROM statement_needed_days($1)),
     proven AS (
         SELECT n.refund_no, n.merchant, n.attempt,
                jsonb_agg(jsonb_build_object('business_date', a.business_date, 'files', a.files)
                          ORDER BY a.business_date) AS evidence
         FROM need n
         LEFT JOIN statement_absences a ON a.refund_no = n.refund_no
          AND a.attempt = n.attempt AND a.business_date = n.day
         GROUP BY n.refund_no, n.merchant, n.attempt
         HAVING bool_and(a.refund_no IS NOT NULL))
     INSERT INTO statement_verdicts (refund_no, attempt, verdict, evidence)
     SELECT refund_no, attempt, 'not_paid', jsonb_build_object('absent', evidence) FROM proven
     ON CONFLICT DO NOTHING
     RETURNING refund_no, (SELECT merchant FROM jobs WHERE jobs.refund_no = statement_verdicts.refund_no),
               evidence::text";

/// Settles what day `date`'s statement (loaded in `recon_statement` on `conn`, from `files`)
/// says about WuPay jobs whose outcome is unknown. One transaction.
pub async fn from_statement(
    conn: &mut PgConnection,
    date: NaiveDate,
    tz: chrono_tz::Tz,
    files: &[String],
) -> Result<Repairs, StoreError> {
    let mut repairs = Repairs::default();
    let candidates: i64 = sqlx::query_scalar(CANDIDATES).fetch_one(&mut *conn).await?;
    if candidates == 0 {
        return Ok(repairs);
    }
    let mut tx = conn.begin().await?;
    let listed = sqlx::query(LISTED)
        .bind(date)
        .bind(files)
        .fetch_all(&mut *tx)
        .await?;
    for r in listed {
        let refund_no: String = r.try_get("refund_no")?;
        let evidence: String = r.try_get("evidence")?;
        let provider_refund_id: Option<String> = r.try_get("provider_refund_id")?;
        let report = StatusReport {
            refund_no: refund_no.clone(),
            status: RefundStatus::Success {
                provider_refund_id: provider_refund_id.unwrap_or_else(|| refund_no.clone()),
                settlement_refund_fee: r.try_get("settlement_refund_fee")?,
                success_time: r.try_get("refunded_at")?,
            },
            raw: evidence.clone(),
        };
        let effect = jobs::apply_status(
            &mut tx,
            &report,
            Source::Statement,
            std::time::Duration::ZERO,
            ACTOR,
            tz,
        )
        .await?;
        if matches!(effect, Effect::Applied { .. }) {
            sqlx::query(
                "INSERT INTO statement_verdicts (refund_no, attempt, verdict, evidence)
                 SELECT refund_no, attempt, 'paid', jsonb_build_object('row', $2::text)
                 FROM jobs WHERE refund_no = $1
                 ON CONFLICT DO NOTHING",
            )
            .bind(&refund_no)
            .bind(&evidence)
            .execute(&mut *tx)
            .await?;
            tracing::info!(%refund_no, %evidence, "unknown outcome booked as paid per statement");
            repairs.paid.push(Repaired {
                refund_no,
                merchant: r.try_get("merchant")?,
                evidence,
            });
        }
    }
    let files_text = files.join(", ");
    for r in sqlx::query(RECORD_ABSENCES)
        .bind(tz.name())
        .bind(date)
        .bind(files)
        .fetch_all(&mut *tx)
        .await?
    {
        repairs.absent.push(Repaired {
            refund_no: r.try_get(0)?,
            merchant: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
            evidence: format!("{date}: {files_text}"),
        });
    }
    for r in sqlx::query(DECIDE_NOT_PAID)
        .bind(tz.name())
        .fetch_all(&mut *tx)
        .await?
    {
        let refund_no: String = r.try_get(0)?;
        tracing::info!(%refund_no, "unknown outcome marked not paid per statement");
        repairs.not_paid.push(Repaired {
            refund_no,
            merchant: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
            evidence: r.try_get(2)?,
        });
    }
    tx.commit().await?;
    Ok(repairs)
}
