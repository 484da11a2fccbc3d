//! Reports of a stored run: a table for people, the JSON report contract (DESIGN §7) for
//! programs, and CSV for spreadsheets.
//!
//! Every format is written from the database, not from memory: totals (one row per provider and
//! merchant) and the counts per kind are read whole, discrepancies are streamed row by row in
//! (provider, merchant, refund_no) order, so a day with a million discrepancies prints in
//! constant memory.
//!
//! A run against our own recorded answers (source `attempts`) is not an independent comparison
//! (the provider results we recorded are what our worker heard, not the provider's own account):
//! every format says so at its head, the table in its first lines, CSV in a `#` line before its
//! header, JSON in its added fields `independent: false` and `note`.
//!
//! - **json**: the contract `{ "date", "status", "totals": [...], "discrepancies": [...] }`
//!   unchanged, then added fields: `run_id`, `source` (`statement` or `attempts`),
//!   `independent` (false for `attempts`) and `note` (why, only then), `supersedes` (the runs
//!   this one superseded) and `kept_current` (earlier runs against statements that stay the
//!   day's result over this run against recorded answers), `nothing_to_reconcile` (neither
//!   side had anything: `status` then says `discrepancies`, the contract's word for "not
//!   balanced") and `by_kind` (per kind: `count`, `ledger_amount`, `provider_amount`, `diff`).
//!   A `statement_missing` discrepancy has an empty `refund_no`: it is about a whole merchant.
//!   Amounts are integers of fen or `null`. One array element per line.
//! - **table**: the run, its status, the count and amounts per discrepancy kind, the totals,
//!   and each discrepancy with why it differs and the command that shows its job's history
//!   (`refundctl job show REFUND_NO`). Amounts in fen with yuan beside them, formatted from the
//!   integer ([`yuan`]), never through a float.
//! - **csv**: one line per discrepancy:
//!   `date,kind,provider,merchant,refund_no,ledger_amount,provider_amount,detail`. Text cells
//!   that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, tab or CR:
//!   merchant and provider refund ids come from the provider's statement) get a leading `'`
//!   ([`neutralise`]); the amount columns are numbers we write, left as they are.

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
    /// The runs this one superseded.
    supersedes: Vec<i64>,
    /// Earlier runs against statements that stay the day's result over this one.
    kept_current: Vec<i64>,
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

/// The report's fields after the contract's (DESIGN §7 allows additions, not changes).
#[derive(Serialize)]
struct Tail<'a> {
    run_id: i64,
    source: &'a str,
    independent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    supersedes: &'a [i64],
    kept_current: &'a [i64],
    nothing_to_reconcile: bool,
    by_kind: &'a [KindSum],
}

/// What a run against recorded answers is not.
pub const NOT_INDEPENDENT: &str = "not an independent comparison: the provider side is the \
    results the providers returned to our own calls, as we recorded them; only a run against \
    the providers' statements is independent";

/// Count and amounts of one discrepancy kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindSum {
    pub kind: String,
    pub count: i64,
    /// Sums of the discrepancies' amounts (null counted as 0).
    pub ledger_amount: i64,
    pub provider_amount: i64,
    /// `provider_amount - ledger_amount`.
    pub diff: i64,
}

pub use shared::job::yuan;

/// A CSV text cell a spreadsheet will not run: a leading `=`, `+`, `-`, `@`, tab or CR gets a
/// `'` in front (OWASP, CSV injection).
pub fn neutralise(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

/// Count and amounts per kind of run `run_id`, in the order of [`crate::KINDS`].
async fn by_kind(conn: &mut PgConnection, run_id: i64) -> Result<Vec<KindSum>, ReportError> {
    let rows = sqlx::query(
        "SELECT kind, count(*)::int8 AS n,
                coalesce(sum(ledger_amount), 0)::int8 AS l,
                coalesce(sum(provider_amount), 0)::int8 AS p
         FROM reconciliation_discrepancies WHERE run_id = $1 GROUP BY kind",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            let (l, p): (i64, i64) = (r.try_get("l")?, r.try_get("p")?);
            Ok(KindSum {
                kind: r.try_get("kind")?,
                count: r.try_get("n")?,
                ledger_amount: l,
                provider_amount: p,
                diff: p.saturating_sub(l),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    out.sort_by_key(|k| {
        crate::KINDS
            .iter()
            .position(|x| *x == k.kind)
            .unwrap_or(usize::MAX)
    });
    Ok(out)
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
         WHERE id = $1 AND status IN ('balanced', 'discrepancies', 'nothing_to_reconcile')",
    )
    .bind(run_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ReportError::NoRun(run_id))?;
    let supersedes: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM reconciliation_runs WHERE superseded_by = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    let kept_current: Vec<i64> = sqlx::query_scalar(crate::run::KEPT_CURRENT)
        .bind(run_id)
        .fetch_all(&mut *conn)
        .await?;
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
        supersedes,
        kept_current,
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
    // The contract's status is balanced or discrepancies: a day with nothing to reconcile is
    // not balanced, so it says discrepancies (and nothing_to_reconcile, added, says why).
    let nothing = head.status == "nothing_to_reconcile";
    let mut start = serde_json::to_string(&Head {
        date: head.date.to_string(),
        status: if nothing {
            "discrepancies"
        } else {
            &head.status
        },
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
    // Added after the contract's fields, which stay as they are: which run this is, what it
    // compared against, and whether it is the day's result.
    drop(rows);
    out.write_all(b"],")?;
    let kinds = by_kind(conn, run_id).await?;
    let independent = head.source == "statement";
    let tail = serde_json::to_string(&Tail {
        run_id,
        source: &head.source,
        independent,
        note: (!independent).then_some(NOT_INDEPENDENT),
        by_kind: &kinds,
        supersedes: &head.supersedes,
        kept_current: &head.kept_current,
        nothing_to_reconcile: nothing,
    })?;
    out.write_all(tail.trim_start_matches('{').as_bytes())?;
    out.write_all(b"\n")?;
    Ok(())
}

async fn write_csv<W: Write>(
    conn: &mut PgConnection,
    run_id: i64,
    head: &RunHeader,
    out: &mut W,
) -> Result<(), ReportError> {
    if head.source != "statement" {
        // Before the header: whoever opens the file sees it first.
        writeln!(out, "# {NOT_INDEPENDENT}")?;
    }
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
        // Text cells neutralised; the amounts are numbers of ours (a negative one stays a
        // number).
        w.write_record([
            date.as_str(),
            &neutralise(&d.kind),
            &neutralise(&d.provider),
            &neutralise(&d.merchant),
            &neutralise(&d.refund_no),
            &amount(d.ledger_amount),
            &amount(d.provider_amount),
            &neutralise(&d.detail),
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
        "statement" if head.files.is_empty() => "statements (none was there)".to_owned(),
        "statement" => format!("{} statements", head.files.len()),
        _ => "provider results recorded per attempt".to_owned(),
    };
    writeln!(
        out,
        "Reconciliation of {} ({}), {scope}, against {source}; run {run_id}",
        head.date, head.timezone
    )?;
    if head.source != "statement" {
        writeln!(out, "NOTE: {NOT_INDEPENDENT}.")?;
    }
    if head.status == "nothing_to_reconcile" {
        writeln!(
            out,
            "Status: NOTHING TO RECONCILE: neither the ledger nor the provider side has a refund \
             on {}; is this the right database and date? (exit status 1)",
            head.date
        )?;
    }
    let status = match head.status.as_str() {
        "balanced" => "BALANCED",
        "nothing_to_reconcile" => "NOT BALANCED",
        _ => "DISCREPANCIES",
    };
    writeln!(
        out,
        "Status: {status}: {} discrepancies, {} pending (grace {} min around midnight)",
        head.discrepancies, head.pending, head.grace_minutes
    )?;
    let runs = |ids: &[i64]| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !head.supersedes.is_empty() {
        writeln!(out, "Supersedes run {}.", runs(&head.supersedes))?;
    }
    if !head.kept_current.is_empty() {
        writeln!(
            out,
            "Not the day's result: run {} against statements stays the day's result (a run \
             against recorded answers never replaces one against statements).",
            runs(&head.kept_current)
        )?;
    }
    writeln!(out)?;

    // fen, and yuan beside it.
    let money = |v: i64| format!("{v} ({})", yuan(v));
    let kinds = by_kind(conn, run_id).await?;
    if !kinds.is_empty() {
        writeln!(out, "By kind (fen, yuan in brackets)")?;
        writeln!(
            out,
            "{:21}  {:>7}  {:>28}  {:>28}  {:>28}",
            "KIND", "COUNT", "LEDGER", "PROVIDER", "DIFF"
        )?;
        for k in &kinds {
            writeln!(
                out,
                "{:21}  {:>7}  {:>28}  {:>28}  {:>28}",
                k.kind,
                k.count,
                money(k.ledger_amount),
                money(k.provider_amount),
                money(k.diff)
            )?;
        }
        writeln!(out)?;
    }

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
    writeln!(out, "Totals (settlement_refund_fee, fen, yuan in brackets)")?;
    writeln!(
        out,
        "{:pw$}  {:mw$}  {:>28}  {:>28}  {:>26}  {:>10}  {:>10}",
        "PROVIDER", "MERCHANT", "LEDGER", "PROVIDER", "DIFF", "LEDGER #", "PROVIDER #"
    )?;
    for t in &totals {
        writeln!(
            out,
            "{:pw$}  {:mw$}  {:>28}  {:>28}  {:>26}  {:>10}  {:>10}",
            t.provider,
            t.merchant,
            money(t.ledger_total),
            money(t.provider_total),
            money(t.diff),
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
            writeln!(out, "Discrepancies (fen, yuan in brackets)")?;
            writeln!(
                out,
                "{:21}  {:pw$}  {:mw$}  {:20}  {:>24}  {:>24}",
                "KIND", "PROVIDER", "MERCHANT", "REFUND NO", "LEDGER", "PROVIDER"
            )?;
            any = true;
        }
        let amount = |a: Option<i64>| a.map_or_else(|| "-".to_owned(), money);
        writeln!(
            out,
            "{:21}  {:pw$}  {:mw$}  {:20}  {:>24}  {:>24}",
            d.kind,
            d.provider,
            d.merchant,
            d.refund_no,
            amount(d.ledger_amount),
            amount(d.provider_amount)
        )?;
        writeln!(out, "    why: {}", d.detail)?;
        if d.refund_no.is_empty() {
            // statement_missing: about a whole merchant, no refund of its own.
            writeln!(
                out,
                "    see: [reconciler.statements] {} or --statement FILE of {}",
                d.provider, head.date
            )?;
        } else {
            writeln!(out, "    see: refundctl job show {}", d.refund_no)?;
        }
    }
    if !any {
        writeln!(out, "No discrepancies.")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_is_formatted_from_integer_fen() {
        assert_eq!(yuan(0), "0.00");
        assert_eq!(yuan(1), "0.01");
        assert_eq!(yuan(-90), "-0.90");
        assert_eq!(yuan(123_456_789), "1,234,567.89");
        assert_eq!(yuan(100_000), "1,000.00");
        assert_eq!(yuan(i64::MIN), "-92,233,720,368,547,758.08");
    }

    #[test]
    fn formula_cells_are_neutralised_and_others_left_alone() {
        assert_eq!(
            neutralise("=HYPERLINK(\"http://x\")"),
            "'=HYPERLINK(\"http://x\")"
        );
        for c in ["+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert!(neutralise(c).starts_with('\''), "{c}");
        }
        assert_eq!(neutralise("m1"), "m1");
        assert_eq!(neutralise("provider: =x"), "provider: =x");
    }
}
