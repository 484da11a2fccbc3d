//! `approvals list | approve | reject`, and how `job resolve` and `job correct` take effect.
//!
//! With `[operator] approvals_required = 2` (the default) a resolution or correction is filed
//! as a request that a second, different operator approves; the approval applies it, in its
//! own transaction, through the same store functions as the one-person path
//! ([`shared::store::approvals`]). With 1 (development) it applies at once.

use clap::{Args, Subcommand};
use shared::state::State;
use shared::store::approvals::{self, Action, Context, Decided, Filed};
use shared::store::jobs::{Operator, Verdict};

use super::render;
use super::{Ctl, OperatorArgs, Out, Status, non_empty, os_user};

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests waiting for a second operator (with --all, decided ones too).
    List(ListArgs),
    /// Approve a request and apply it now (refused if you filed it).
    Approve(ApproveArgs),
    /// Reject a request: it will not be applied (its requester may withdraw it this way).
    Reject(RejectArgs),
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl approvals list\n  \
    refundctl approvals list --all --json")]
pub struct ListArgs {
    /// Decided requests too (applied, refused, rejected).
    #[arg(long)]
    pub all: bool,
    /// One JSON object per request, one per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl approvals approve 7 --operator bob\n  \
    refundctl approvals approve 7        # as the operating-system user")]
pub struct ApproveArgs {
    /// The request's ID (from `approvals list`, or as `job resolve` / `job correct` printed it).
    #[arg(value_name = "ID")]
    pub id: i64,
    /// Who you are: a different operator from the one who filed it.
    #[arg(long, value_name = "WHO", value_parser = non_empty, default_value_t = os_user())]
    pub operator: String,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl approvals reject 7 --operator bob --note \"statement line is another refund's\"")]
pub struct RejectArgs {
    /// The request's ID.
    #[arg(value_name = "ID")]
    pub id: i64,
    #[command(flatten)]
    pub who: OperatorArgs,
}

/// What a resolution or correction did, or would do once approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionReport {
    pub refund_no: String,
    /// What applying it did; when it waits for approval (`requested`), what applying it now
    /// would do (`Done`: filed; `Refused`: not filed).
    pub verdict: Verdict,
    /// The approval request it waits for.
    pub requested: Option<i64>,
}

impl ActionReport {
    pub fn status(&self) -> Status {
        Status::from_ok(matches!(self.verdict, Verdict::Done { .. }))
    }
}

pub(crate) fn context(ctl: &Ctl) -> Context {
    Context {
        quiet: ctl.config.resolve_quiet(),
        tz: ctl.tz,
    }
}

/// Applies `action` now, or files it for approval, as `[operator] approvals_required` says.
pub async fn submit(
    ctl: &Ctl,
    refund_no: &str,
    action: Action,
    op: Operator<'_>,
) -> anyhow::Result<ActionReport> {
    let mut tx = ctl.pool.begin().await?;
    let (verdict, requested) = if ctl.config.operator.four_eyes() {
        match approvals::request(&mut tx, refund_no, action, op, context(ctl)).await? {
            Filed::Requested { id, prior } => (Verdict::Done { prior }, Some(id)),
            Filed::Refused { prior, reason } => (Verdict::Refused { prior, reason }, None),
        }
    } else {
        (
            approvals::apply(&mut tx, refund_no, action, op, context(ctl)).await?,
            None,
        )
    };
    tx.commit().await?;
    Ok(ActionReport {
        refund_no: refund_no.to_owned(),
        verdict,
        requested,
    })
}

/// The line that says a request was filed.
pub fn filed_line(no: &str, id: i64, action: Action, prior: State) -> String {
    format!(
        "{no}  approval request {id} filed: {} {prior} -> {} waits for a second operator \
         (refundctl approvals approve {id} --operator WHO)",
        action.name(),
        action.outcome()
    )
}

/// Lists requests.
pub async fn list(ctl: &Ctl, args: &ListArgs, out: &mut Out) -> anyhow::Result<Status> {
    let rows = approvals::list(&ctl.pool, args.all).await?;
    if args.json {
        for r in &rows {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)?;
        }
        return Ok(Status::Done);
    }
    if rows.is_empty() {
        writeln!(out, "no approval requests waiting")?;
        return Ok(Status::Done);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.state.clone(),
                r.action.clone(),
                r.refund_no.clone(),
                r.outcome.clone(),
                render::opt(r.settlement_refund_fee),
                format!("{} ({})", r.requested_by, render::opt(r.db_user.as_deref())),
                render::age(render::seconds_since(r.requested_at)),
                render::opt(r.decided_by.as_deref()),
                render::cut(&r.note, 60),
            ]
        })
        .collect();
    render::table(
        out,
        "",
        &[
            "ID",
            "STATE",
            "ACTION",
            "REFUND_NO",
            "AS",
            "SETTLEMENT",
            "REQUESTED BY (DB USER)",
            "AGE",
            "DECIDED BY",
            "NOTE",
        ],
        &table,
        &[0, 5],
    )?;
    Ok(Status::Done)
}

/// Approves a request and applies it: exit 0 when applied, 1 when refused or not found.
pub async fn approve(ctl: &Ctl, args: &ApproveArgs, out: &mut Out) -> anyhow::Result<Status> {
    let mut tx = ctl.pool.begin().await?;
    let decided = approvals::approve(&mut tx, args.id, &args.operator, context(ctl)).await?;
    tx.commit().await?;
    report(args.id, &decided, out)
}

/// Rejects a request: exit 0 when rejected, 1 when refused or not found.
pub async fn reject(ctl: &Ctl, args: &RejectArgs, out: &mut Out) -> anyhow::Result<Status> {
    let mut tx = ctl.pool.begin().await?;
    let decided = approvals::reject(&mut tx, args.id, args.who.as_operator()).await?;
    tx.commit().await?;
    report(args.id, &decided, out)
}

fn report(id: i64, decided: &Decided, out: &mut Out) -> anyhow::Result<Status> {
    match decided {
        Decided::Applied { prior } => writeln!(
            out,
            "request {id}  approved and applied (the job was {prior})"
        )?,
        Decided::Rejected => writeln!(out, "request {id}  rejected")?,
        Decided::ActionRefused { reason } => writeln!(
            out,
            "request {id}  approved, but refused when applied (closed as refused): {reason}"
        )?,
        Decided::Refused { reason } => writeln!(out, "request {id}  refused: {reason}")?,
        Decided::NotFound => {
            eprintln!("refundctl: no approval request {id}");
            return Ok(Status::Incomplete);
        }
    }
    Ok(Status::from_ok(matches!(
        decided,
        Decided::Applied { .. } | Decided::Rejected
    )))
}
