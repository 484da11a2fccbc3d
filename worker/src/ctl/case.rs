//! `case list` and `case explain`: the reconciliation cases finance acts on (DESIGN §7).
//!
//! The reconciler opens a case for each discrepancy it stores and carries it across reruns of
//! the day ([`shared::store::cases`]); a correction (`job correct`) closes a refund's open
//! cases as `corrected`; here operators see them with their age and explain the ones that
//! need no correction.

use chrono::NaiveDate;
use clap::{Args, Subcommand, ValueEnum};
use shared::store::cases::{self, CaseFilter, CaseState, Explained};

use super::render;
use super::{Ctl, OperatorArgs, Out, Status};

#[derive(Debug, Subcommand)]
pub enum CaseCommand {
    /// Cases, oldest business date first, with how many days each has been open.
    List(ListArgs),
    /// Close an open case as explained, saying why no correction is needed (audited).
    Explain(ExplainArgs),
}

/// A case state, as `--state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Open,
    Explained,
    Corrected,
    #[value(name = "resolved_by_rerun")]
    ResolvedByRerun,
}

impl From<StateArg> for CaseState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Open => CaseState::Open,
            StateArg::Explained => CaseState::Explained,
            StateArg::Corrected => CaseState::Corrected,
            StateArg::ResolvedByRerun => CaseState::ResolvedByRerun,
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl case list\n  \
    refundctl case list --date 2026-11-21 --state open\n  \
    refundctl case list --json | jq .id")]
pub struct ListArgs {
    /// Only cases of this business date (YYYY-MM-DD).
    #[arg(long, value_name = "D")]
    pub date: Option<NaiveDate>,
    /// Only cases in this state.
    #[arg(long, value_name = "S", value_enum)]
    pub state: Option<StateArg>,
    /// One JSON object per case, one per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl case explain 12 --note 'coupon settled a day late: FIN-12' --operator carol")]
pub struct ExplainArgs {
    /// The case's ID (from `case list`).
    #[arg(value_name = "ID")]
    pub id: i64,
    #[command(flatten)]
    pub who: OperatorArgs,
}

/// Lists cases.
pub async fn list(ctl: &Ctl, args: &ListArgs, out: &mut Out) -> anyhow::Result<Status> {
    let filter = CaseFilter {
        date: args.date,
        state: args.state.map(CaseState::from),
    };
    let rows = cases::list(&ctl.pool, filter).await?;
    if args.json {
        for c in &rows {
            serde_json::to_writer(&mut *out, c)?;
            writeln!(out)?;
        }
        return Ok(Status::Done);
    }
    if rows.is_empty() {
        writeln!(out, "no cases")?;
        return Ok(Status::Done);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.business_date.to_string(),
                format!("{}/{}", c.provider, c.merchant),
                if c.refund_no.is_empty() {
                    "(all)".into()
                } else {
                    c.refund_no.clone()
                },
                c.kind.clone(),
                render::opt(c.ledger_amount),
                render::opt(c.provider_amount),
                c.state.clone(),
                c.days_open.to_string(),
                c.runs.to_string(),
                render::cut(c.close_note.as_deref().unwrap_or(&c.detail), 60),
            ]
        })
        .collect();
    render::table(
        out,
        "",
        &[
            "ID",
            "DATE",
            "PROVIDER/MERCHANT",
            "REFUND_NO",
            "KIND",
            "LEDGER",
            "PROVIDER",
            "STATE",
            "DAYS OPEN",
            "RUNS",
            "NOTE / DETAIL",
        ],
        &table,
        &[0, 5, 6, 8, 9],
    )?;
    Ok(Status::Done)
}

/// Explains a case: exit 0 when explained, 1 when not open or not found.
pub async fn explain(ctl: &Ctl, args: &ExplainArgs, out: &mut Out) -> anyhow::Result<Status> {
    let mut tx = ctl.pool.begin().await?;
    let r = cases::explain(&mut tx, args.id, args.who.as_operator()).await?;
    tx.commit().await?;
    match r {
        Explained::Done => {
            writeln!(out, "case {}  explained", args.id)?;
            Ok(Status::Done)
        }
        Explained::Refused { reason } => {
            writeln!(out, "case {}  refused: {reason}", args.id)?;
            Ok(Status::Incomplete)
        }
        Explained::NotFound => {
            eprintln!("refundctl: no case {}", args.id);
            Ok(Status::Incomplete)
        }
    }
}
