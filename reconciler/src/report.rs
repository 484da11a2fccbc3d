//! Reports of a stored run: a table for people, the JSON report contract (DESIGN §7) for
//! programs, and CSV for spreadsheets.
//!
//! Every format is written from the database, not from memory: totals (one row per provider and
//! merchant) are read whole, discrepancies are streamed row by row in (provider, merchant,
//! refund_no) order, so a day with a million discrepancies prints in constant memory.
//!
//! - **json**: exactly the contract `{ "date", "status", "totals": [...], "discrepancies": [...]
//!   }`, nothing added; amounts are integers of fen or `null`. One array element per line.
//! - **table**: the run, its status, the totals, and each discrepancy with why it differs and
//!   the command that shows its job's history (`refundctl job show REFUND_NO`).
//! - **csv**: one line per discrepancy:
//!   `date,kind,provider,merchant,refund_no,ledger_amount,provider_amount,detail`.

use std::io::Write;

use chrono::NaiveDate;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{PgConnection, Row};

/// Output format of `run --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable table, with a `refundctl job show` hint per discrepancy.
    Table,
    /// The JSON report contract of DESIGN §7.
    Json,
    /// One CSV line per discrepancy.
    Csv,
}

/// A report that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading the run: {0}")]
    Db(#[from] sqlx::Error),
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing the report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing the report: {0}")]
    Csv(#[from] csv::Error),
    #[error("run {0} does not exist or did not finish")]
    NoRun(i64),
}

struct RunHeader {
    date: NaiveDate,
    status: String,
    provider: Option<String>,
    source: String,
    files: Vec<String>,
    timezone: String,
    grace_minutes: i32,
    discrepancies: i64,
    pending: i64,
}

#[derive(Serialize)]
struct TotalJson {
    provider: String,
    merchant: String,
    ledger_total: i64,
    provider_total: i64,
    diff: i64,
    ledger_count: i64,
    provider_count: i64,
}

#[derive(Serialize)]
struct DiscrepancyJson<'a> {
    kind: &'a str,
    provider: &'a str,
    merchant: &'a str,
    refund_no: &'a str,
    ledger_amount: Option<i64>,
    provider_amount: Option<i64>,
}

#[derive(Serialize)]
struct Head<'a> {
    date: String,
    status: &'a str,
}

struct Discrepancy {
    kind: String,
    provider: String,
    merchant: String,
    refund_no: String,
    ledger_amount: Option<i64>,
    provider_amount: Option<i64>,
    detail: String,
}

impl Discrepancy {
    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Discrepancy {
            kind: r.try_get("kind")?,
            provider: r.try_get("provider")?,
            merchant: r.try_get("merchant")?,
            refund_no: r.try_get("refund_no")?,
            ledger_amount: r.try_get("ledger_amount")?,
            provider_amount: r.try_get("provider_amount")?,
            detail: r.try_get("detail")?,
        })
    }
}

async fn header(conn: &mut PgConnection, run_id: i64) -> Result<RunHeader, ReportError> {
    let r = sqlx::query(
        "SELECT business_date, status, provider, source, statement_files, timezone,
                grace_minutes, discrepancy_count, pending_count
         FROM reconciliation_runs
         WHERE id = $1 AND status IN ('balanced', 'discrepancies')",
    )
    .bind(run_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ReportError::NoRun(run_id))?;
    Ok(RunHeader {
        date: r.try_get("business_date")?,
        status: r.try_get("status")?,
        provider: r.try_get("provider")?,
        source: r.try_get("source")?,
        files: r.try_get("statement_files")?,
        timezone: r.try_get("timezone")?,
        grace_minutes: r.try_get("grace_minutes")?,
        discrepancies: r.try_get("discrepancy_count")?,
        pending: r.try_get("pending_count")?,
    })
}

async fn totals(conn: &mut PgConnection, run_id: i64) -> Result<Vec<TotalJson>, ReportError> {
    let rows = sqlx::query(
        "SELECT provider, merchant, ledger_total, provider_total, diff, ledger_count,
                provider_count
         FROM reconciliation_totals WHERE run_id = $1 ORDER BY provider, merchant",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TotalJson {
                provider: r.try_get("provider")?,
                merchant: r.try_get("merchant")?,
                ledger_total: r.try_get("ledger_total")?,
                provider_total: r.try_get("provider_total")?,
                diff: r.try_get("diff")?,
                ledger_count: r.try_get("ledger_count")?,
                provider_count: r.try_get("provider_count")?,
            })
        })
        .collect()
}

const DISCREPANCIES_SQL: &str = "SELECT kind, provider, merchant, refund_no, ledger_amount,
        provider_amount, detail
 FROM reconciliation_discrepancies WHERE run_id = $1
 ORDER BY provider, merchant, refund_no";

/// Writes the report of stored run `run_id` in `format`.
pub async fn write<W: Write>(
    conn: &mut PgConnection,
    run_id: i64,
    format: Format,
    out: &mut W,
) -> Result<(), ReportError> {
    let head = header(conn, run_id).await?;
    match format {
        Format::Json => write_json(conn, run_id, &head, out).await?,
        Format::Table => write_table(conn, run_id, &head, out).await?,
        Format::Csv => write_csv(conn, run_id, &head, out).await?,
    }
    out.flush()?;
    Ok(())
}

async fn write_json<W: Write>(
    conn: &mut PgConnection,
    run_id: i64,
    head: &RunHeader,
    out: &mut W,
) -> Result<(), ReportError> {
    let totals = totals(conn, run_id).await?;
    // The head object serialized, without its closing brace, keeps the key order of the
    // contract and the escaping of serde_json.
    let mut start = serde_json::to_string(&Head {
        date: head.date.to_string(),
        status: &head.status,
    })?;
    start.pop();
    write!(out, "{start},\"totals\":[")?;
    for (i, t) in totals.iter().enumerate() {
        out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut *out, t)?;
    }
    out.write_all(b"],\"discrepancies\":[")?;
    let mut rows = sqlx::query(DISCREPANCIES_SQL)
        .bind(run_id)
        .fetch(&mut *conn);
    let mut first = true;
    while let Some(r) = rows.try_next().await? {
        let d = Discrepancy::from_row(&r)?;
        out.write_all(if first { b"\n" } else { b",\n" })?;
        first = false;
        serde_json::to_writer(
            &mut *out,
            &DiscrepancyJson {
                kind: &d.kind,
                provider: &d.provider,
                merchant: &d.merchant,
                refund_no: &d.refund_no,
                ledger_amount: d.ledger_amount,
                provider_amount: d.provider_amount,
            },
        )?;
    }
    out.write_all(b"]}\n")?;
    Ok(())
}

async fn write_csv<W: Write>(
    conn: &mut PgConnection,
    run_id: i64,
    head: &RunHeader,
    out: &mut W,
) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "date",
        "kind",
        "provider",
        "merchant",
        "refund_no",
        "ledger_amount",
        "provider_amount",
        "detail",
    ])?;
    let date = head.date.to_string();
    let amount = |a: Option<i64>| a.map(|v| v.to_string()).unwrap_or_default();
    let mut rows = sqlx::query(DISCREPANCIES_SQL)
        .bind(run_id)
        .fetch(&mut *conn);
    while let Some(r) = rows.try_next().await? {
        let d = Discrepancy::from_row(&r)?;
        w.write_record([
            date.as_str(),
            &d.kind,
            &d.provider,
            &d.merchant,
            &d.refund_no,
            &amount(d.ledger_amount),
            &amount(d.provider_amount),
            &d.detail,
        ])?;
    }
    w.flush()?;
    Ok(())
}

async fn write_table<W: Write>(
    conn: &mut PgConnection,
    run_id: i64,
    head: &RunHeader,
    out: &mut W,
) -> Result<(), ReportError> {
    let totals = totals(conn, run_id).await?;
    let scope = head.provider.as_deref().unwrap_or("all providers");
    let source = match head.source.as_str() {
        "statement" if head.files.len() == 1 => format!("statement {}", head.files[0]),
        "statement" => format!("{} statements", head.files.len()),
        _ => "provider results recorded per attempt".to_owned(),
    };
    writeln!(
        out,
        "Reconciliation of {} ({}), {scope}, against {source}; run {run_id}",
        head.date, head.timezone
    )?;
    let status = if head.status == "balanced" {
        "BALANCED"
    } else {
        "DISCREPANCIES"
    };
    writeln!(
        out,
        "Status: {status}: {} discrepancies, {} pending (grace {} min around midnight)",
        head.discrepancies, head.pending, head.grace_minutes
    )?;
    writeln!(out)?;

    let pw = totals
        .iter()
        .map(|t| t.provider.len())
        .chain([8])
        .max()
        .unwrap_or(8);
    let mw = totals
        .iter()
        .map(|t| t.merchant.chars().count())
        .chain([8])
        .max()
        .unwrap_or(8);
    writeln!(out, "Totals (settlement_refund_fee, fen)")?;
    writeln!(
        out,
        "{:pw$}  {:mw$}  {:>16}  {:>16}  {:>14}  {:>10}  {:>10}",
        "PROVIDER", "MERCHANT", "LEDGER", "PROVIDER", "DIFF", "LEDGER #", "PROVIDER #"
    )?;
    for t in &totals {
        writeln!(
            out,
            "{:pw$}  {:mw$}  {:>16}  {:>16}  {:>14}  {:>10}  {:>10}",
            t.provider,
            t.merchant,
            t.ledger_total,
            t.provider_total,
            t.diff,
            t.ledger_count,
            t.provider_count
        )?;
    }
    if totals.is_empty() {
        writeln!(out, "(no refunds on either side)")?;
    }
    writeln!(out)?;

    let mut rows = sqlx::query(DISCREPANCIES_SQL)
        .bind(run_id)
        .fetch(&mut *conn);
    let mut any = false;
    while let Some(r) = rows.try_next().await? {
        let d = Discrepancy::from_row(&r)?;
        if !any {
            writeln!(out, "Discrepancies (fen)")?;
            writeln!(
                out,
                "{:21}  {:pw$}  {:mw$}  {:20}  {:>14}  {:>14}",
                "KIND", "PROVIDER", "MERCHANT", "REFUND NO", "LEDGER", "PROVIDER"
            )?;
            any = true;
        }
        let amount = |a: Option<i64>| a.map_or_else(|| "-".to_owned(), |v| v.to_string());
        writeln!(
            out,
            "{:21}  {:pw$}  {:mw$}  {:20}  {:>14}  {:>14}",
            d.kind,
            d.provider,
            d.merchant,
            d.refund_no,
            amount(d.ledger_amount),
            amount(d.provider_amount)
        )?;
        writeln!(out, "    why: {}", d.detail)?;
        writeln!(out, "    see: refundctl job show {}", d.refund_no)?;
    }
    if !any {
        writeln!(out, "No discrepancies.")?;
    }
    Ok(())
}
