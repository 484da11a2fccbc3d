//! `job show` (a job's whole story), `job resolve` (settling a dead job by hand) and
//! `job correct` (putting a final job's booking right after the fact).
//!
//! `show` reads everything from one snapshot: the job row, each provider call with what was
//! sent and received (secrets were redacted when the call was recorded), the full transition
//! history, the provider's notifies and the status query schedule, the operator audit rows, poison messages that carried the same `refund_no`, and
//! reconciliation discrepancies when the reconciler's tables exist.
//!
//! `resolve` is for a dead job whose outcome an operator has checked with the provider. It
//! goes through [`jobs::resolve`], which re-checks the state under the row lock and writes the
//! ledger entry (source `manual`) or the order release, the `refund.resolved` event and the
//! audit row in one transaction; a refusal is audited too.
//!
//! `correct` is for a final job booked wrongly, with the provider's evidence: it goes through
//! [`jobs::correct`] (new ledger entries only, the order's reserved amount moved, the
//! `refund.corrected` event, the refund's open cases closed as `corrected`, audited).
//!
//! Both take effect when a second operator approves them, or at once with `[operator]
//! approvals_required = 1` ([`super::approvals::submit`]).

use clap::{Args, Subcommand, ValueEnum};
use shared::state::State;
use shared::store::approvals::Action;
use shared::store::jobs::{Correction, Operator, Resolution, Verdict};
use shared::store::operator::{self, Discrepancies, JobDetail};

use super::approvals::{ActionReport, filed_line, submit};
use super::render;
use super::{Ctl, OperatorArgs, Out, Status, non_empty, os_user};

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// State, cause, attempts, every provider call, the full transition history, the
    /// provider's notifies and status query schedule, audit rows, poison messages and
    /// reconciliation discrepancies of one refund.
    Show(ShowArgs),
    /// Settle a dead job by hand after checking its outcome with the provider (audited).
    ///
    /// `--as succeeded` books a ledger entry (source manual) with the settlement fee the
    /// provider reports; `--as failed` gives the amount back to the order. Both publish
    /// `refund.resolved`. Only dead jobs can be resolved. With `[operator]
    /// approvals_required = 2` (the default) this files a request that a second operator
    /// approves (`refundctl approvals`), and prints its ID.
    Resolve(ResolveArgs),
    /// Correct a final job's booking with the provider's evidence (audited; approved).
    ///
    /// A failed job the provider paid: `--as succeeded` books it (source manual) and reserves
    /// its amount on the order again. A succeeded job the provider did not pay: `--as failed`
    /// reverses its booking and releases the amount. A succeeded job booked with the wrong
    /// settlement: `--as succeeded --settlement-fee N` reverses the booking and books N. The
    /// ledger only ever gets new entries. Publishes `refund.corrected` and closes the refund's
    /// open reconciliation cases as corrected. Like `resolve`, it files a request for a second
    /// operator unless `[operator] approvals_required = 1`.
    Correct(CorrectArgs),
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl job show R2026112100000001\n  \
    refundctl job show O2026112100000042        # by order number\n  \
    refundctl job show 50000000382019052709732678859   # by the provider's refund id\n  \
    refundctl job show R2026112100000001 --json | jq .job.state")]
pub struct ShowArgs {
    /// The refund's refund_no; or its order_no or the provider's refund id, when no
    /// refund_no is that.
    #[arg(value_name = "REFUND_NO|ORDER_NO|PROVIDER_REFUND_ID")]
    pub refund_no: String,
    /// One JSON object instead of the timeline.
    #[arg(long)]
    pub json: bool,
}

/// Shows one job, found by `refund_no`, else by order number or provider refund id; exit 1
/// when nothing is known about the key, or when it names several jobs (they are listed).
pub async fn show(ctl: &Ctl, args: &ShowArgs, out: &mut Out) -> anyhow::Result<Status> {
    let key = &args.refund_no;
    let mut detail = operator::job_detail(&ctl.pool, key).await?;
    if !detail.found() {
        let matches = operator::jobs_by_other_key(&ctl.pool, key).await?;
        match matches.as_slice() {
            [] => {}
            [one] => {
                // On stderr, so that --json stays one object.
                eprintln!(
                    "refundctl: {key:?} is the {} of refund {}",
                    one.matched, one.refund_no
                );
                detail = operator::job_detail(&ctl.pool, &one.refund_no).await?;
            }
            several => {
                let listed: Vec<String> = several
                    .iter()
                    .map(|m| format!("{} ({}, by {})", m.refund_no, m.state, m.matched))
                    .collect();
                eprintln!(
                    "refundctl: {key:?} names {} refunds: {}; show one by its refund_no",
                    several.len(),
                    listed.join(", ")
                );
                return Ok(Status::Incomplete);
            }
        }
    }
    if !detail.found() {
        if args.json {
            serde_json::to_writer(&mut *out, &detail)?;
            writeln!(out)?;
        }
        eprintln!(
            "refundctl: no job or poison message has refund_no {key:?}, and no job has it as \
             order_no or provider refund id"
        );
        return Ok(Status::Incomplete);
    }
    if args.json {
        serde_json::to_writer(&mut *out, &detail)?;
        writeln!(out)?;
    } else {
        write_detail(ctl, &detail, out)?;
    }
    Ok(Status::Done)
}

/// The provider's asynchronous end: the notifies that arrived and the status query schedule.
fn write_finality(d: &JobDetail, tz: chrono_tz::Tz, out: &mut Out) -> anyhow::Result<()> {
    writeln!(out)?;
    writeln!(out, "Provider notifies ({})", d.notifications.len())?;
    for n in &d.notifications {
        writeln!(
            out,
            "  {}  {}  {}",
            render::time_ms(n.received_at, tz),
            n.status,
            if n.effect == "applied" {
                "applied"
            } else {
                "no change (a duplicate, or older than what was known)"
            }
        )?;
        writeln!(out, "    body: {}", render::cut(&n.body, TEXT_MAX))?;
    }
    writeln!(out)?;
    match &d.status_query {
        None => writeln!(out, "Status queries: none scheduled")?,
        Some(q) => {
            writeln!(out, "Status queries ({} sent)", q.queries)?;
            let rows = [
                ("since", render::time(q.since, tz)),
                (
                    "next",
                    q.next_at
                        .map(|t| render::time(t, tz))
                        .unwrap_or_else(|| "never (schedule over)".into()),
                ),
                (
                    "lease until",
                    render::opt(q.lease_until.map(|t| render::time(t, tz))),
                ),
                ("last status", render::opt(q.last_status.as_deref())),
                (
                    "last error",
                    render::cut(q.last_error.as_deref().unwrap_or("-"), 200),
                ),
            ];
            for (k, v) in rows {
                writeln!(out, "  {k:<13}{v}")?;
            }
        }
    }
    Ok(())
}

/// Request and response texts are shown up to this many characters.
const TEXT_MAX: usize = 4096;

fn write_detail(ctl: &Ctl, d: &JobDetail, out: &mut Out) -> anyhow::Result<()> {
    let tz = ctl.tz;
    match &d.job {
        Some(j) => {
            writeln!(
                out,
                "Refund {}  order {}  {}/{}",
                j.refund_no, j.order_no, j.provider, j.merchant
            )?;
            let state = match &j.cause {
                Some(c) => format!("{} (cause {c})", j.state),
                None => j.state.clone(),
            };
            let idempotent = j.idempotent;
            let rows = [
                ("state", state),
                ("attempts", j.attempt.to_string()),
                (
                    "amounts",
                    format!(
                        "total {} fen, refund {} fen, settlement {}",
                        j.total_fee,
                        j.refund_fee,
                        render::opt(j.settlement_refund_fee.map(|s| format!("{s} fen")))
                    ),
                ),
                (
                    "last code",
                    match (&j.last_code, &j.last_message) {
                        (None, None) => "-".into(),
                        (c, m) => format!(
                            "{}: {}",
                            render::opt(c.as_deref()),
                            render::cut(m.as_deref().unwrap_or(""), 200)
                        ),
                    },
                ),
                ("provider id", render::opt(j.provider_refund_id.as_deref())),
                (
                    "merchant",
                    format!(
                        "{} on refund_no",
                        match idempotent {
                            Some(true) => "deduplicates",
                            Some(false) => "does not deduplicate",
                            None => "not recorded (treated as not deduplicating)",
                        }
                    ),
                ),
                ("created", render::time_ago(j.created_at, tz)),
                ("updated", render::time_ago(j.updated_at, tz)),
                (
                    "lease until",
                    render::opt(j.lease_until.map(|t| render::time(t, tz))),
                ),
                (
                    "next attempt",
                    render::opt(j.next_attempt_at.map(|t| render::time(t, tz))),
                ),
            ];
            for (k, v) in rows {
                writeln!(out, "  {k:<13}{v}")?;
            }
            writeln!(out, "  {:<13}{}", "request", j.request)?;
        }
        None => writeln!(
            out,
            "Refund {}: no job (every message with this refund_no was refused at intake)",
            d.refund_no
        )?,
    }

    writeln!(out)?;
    writeln!(out, "Provider calls ({})", d.attempts.len())?;
    for a in &d.attempts {
        writeln!(
            out,
            "  attempt {}  {}  {}{}  http {}  {}{}",
            a.attempt,
            render::time_ms(a.recorded_at, tz),
            a.outcome,
            a.code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default(),
            render::opt(a.http_status),
            render::latency(a.latency_us),
            if a.fenced {
                "  FENCED (came back after its attempt was superseded; kept, not applied)"
            } else {
                ""
            }
        )?;
        if let Some(m) = &a.message {
            writeln!(out, "    message:  {}", render::cut(m, TEXT_MAX))?;
        }
        if let Some(id) = &a.provider_refund_id {
            writeln!(
                out,
                "    paid:     provider id {id}, refund {} fen, settlement {} fen, coupon {} fen",
                render::opt(a.refund_fee),
                render::opt(a.settlement_refund_fee),
                render::opt(a.coupon_refund_fee)
            )?;
        }
        writeln!(out, "    request:  {}", render::cut(&a.request, TEXT_MAX))?;
        writeln!(
            out,
            "    response: {}",
            render::cut(a.response.as_deref().unwrap_or("-"), TEXT_MAX)
        )?;
    }

    writeln!(out)?;
    writeln!(out, "History ({} transitions)", d.transitions.len())?;
    let rows: Vec<Vec<String>> = d
        .transitions
        .iter()
        .map(|t| {
            vec![
                render::time_ms(t.at, tz),
                format!(
                    "{} -> {}",
                    t.from_state.as_deref().unwrap_or("(intake)"),
                    t.to_state
                ),
                t.attempt.to_string(),
                t.actor.clone(),
                render::opt(t.cause.as_deref()),
                render::cut(
                    &t.detail.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                    100,
                ),
            ]
        })
        .collect();
    if !rows.is_empty() {
        render::table(
            out,
            "  ",
            &["AT", "TRANSITION", "ATTEMPT", "BY", "CAUSE", "DETAIL"],
            &rows,
            &[2],
        )?;
    }

    write_finality(d, tz, out)?;

    writeln!(out)?;
    writeln!(out, "Operator audit ({})", d.audit.len())?;
    for a in &d.audit {
        writeln!(
            out,
            "  {}  {} {}  by {}  {} -> {}{}",
            render::time_ms(a.at, tz),
            a.action,
            a.result,
            a.operator,
            render::opt(a.prior_state.as_deref()),
            render::opt(a.new_state.as_deref()),
            a.detail
                .as_ref()
                .map(|v| format!("  {v}"))
                .unwrap_or_default()
        )?;
        writeln!(out, "    note: {}", a.note)?;
        if let Some(r) = &a.reason {
            writeln!(out, "    reason: {r}")?;
        }
    }

    writeln!(out)?;
    writeln!(
        out,
        "Poison messages with this refund_no ({})",
        d.rejections.len()
    )?;
    for r in &d.rejections {
        writeln!(
            out,
            "  {} {}  {}: {}  (arrived {}x, first {}, last {})",
            r.kind,
            r.id,
            r.field,
            r.reason,
            r.occurrences,
            render::time(r.first_seen_at, tz),
            render::time(r.last_seen_at, tz)
        )?;
        writeln!(
            out,
            "    body ({} bytes): {}",
            r.body_bytes,
            render::cut(&r.body, 300)
        )?;
    }

    writeln!(out)?;
    match &d.discrepancies {
        Discrepancies::NotInstalled => {
            writeln!(out, "Reconciliation: not installed in this database")?
        }
        Discrepancies::Unavailable { error } => writeln!(
            out,
            "Reconciliation: discrepancies could not be read: {error}"
        )?,
        Discrepancies::Found { rows } if rows.is_empty() => {
            writeln!(out, "Reconciliation discrepancies: none")?
        }
        Discrepancies::Found { rows } => {
            writeln!(out, "Reconciliation discrepancies ({})", rows.len())?;
            for r in rows {
                writeln!(out, "  {r}")?;
            }
        }
    }
    Ok(())
}

/// How a dead job was settled at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResolveAs {
    /// The provider paid the refund.
    Succeeded,
    /// The provider did not pay it.
    Failed,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl job resolve R2026112100000001 --as succeeded --settlement-fee 90 --note 'confirmed by ShengPay: SP-7'\n  \
    refundctl job resolve R2026112100000001 --as failed --operator alice --note 'provider: never received'")]
pub struct ResolveArgs {
    /// The dead job's refund_no.
    #[arg(value_name = "REFUND_NO")]
    pub refund_no: String,
    /// What the provider says happened.
    #[arg(long = "as", value_name = "OUTCOME", value_enum)]
    pub to: ResolveAs,
    /// The settlement refund fee the provider reports, in fen (required with --as succeeded).
    #[arg(
        long,
        value_name = "N",
        required_if_eq("to", "succeeded"),
        value_parser = clap::value_parser!(i64).range(0..)
    )]
    pub settlement_fee: Option<i64>,
    #[command(flatten)]
    pub who: OperatorArgs,
}

/// The settlement fee to book for `--as` (`None`: failed, nothing booked); `--settlement-fee`
/// goes with `--as succeeded` and only with it.
fn settlement(to: ResolveAs, fee: Option<i64>) -> anyhow::Result<Option<i64>> {
    match (to, fee) {
        (ResolveAs::Succeeded, Some(fee)) => Ok(Some(fee)),
        (ResolveAs::Succeeded, None) => {
            anyhow::bail!("--settlement-fee is required with --as succeeded")
        }
        (ResolveAs::Failed, None) => Ok(None),
        (ResolveAs::Failed, Some(_)) => {
            anyhow::bail!("--settlement-fee applies only to --as succeeded")
        }
    }
}

/// Resolves a dead job (see [`JobCommand::Resolve`]).
pub async fn resolve(ctl: &Ctl, args: &ResolveArgs, out: &mut Out) -> anyhow::Result<ActionReport> {
    let resolution = match settlement(args.to, args.settlement_fee)? {
        Some(fee) => Resolution::Succeeded {
            settlement_refund_fee: fee,
        },
        None => Resolution::Failed,
    };
    let action = Action::Resolve(resolution);
    let report = submit(ctl, &args.refund_no, action, args.who.as_operator()).await?;
    let no = &args.refund_no;
    match (&report.verdict, report.requested, resolution) {
        (Verdict::Done { prior }, Some(id), _) => {
            writeln!(out, "{}", filed_line(no, id, action, *prior))?
        }
        (
            Verdict::Done { prior },
            None,
            Resolution::Succeeded {
                settlement_refund_fee,
            },
        ) => writeln!(
            out,
            "{no}  resolved: {prior} -> {} (ledger entry booked, source manual, settlement fee \
             {settlement_refund_fee} fen; event refund.resolved queued)",
            State::Succeeded
        )?,
        (Verdict::Done { prior }, None, Resolution::Failed) => writeln!(
            out,
            "{no}  resolved: {prior} -> {} (amount released to the order; event \
             refund.resolved queued)",
            State::Failed
        )?,
        (Verdict::Refused { reason, .. }, _, _) => writeln!(out, "{no}  refused: {reason}")?,
    }
    Ok(report)
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl job correct R2026112100000001 --as failed --evidence 'not in ShengPay statement of 2026-11-21'\n  \
    refundctl job correct R2026112100000001 --as succeeded --settlement-fee 80 --evidence 'statement line 412' --operator alice")]
pub struct CorrectArgs {
    /// The final job's refund_no.
    #[arg(value_name = "REFUND_NO")]
    pub refund_no: String,
    /// What the provider's evidence says happened.
    #[arg(long = "as", value_name = "OUTCOME", value_enum)]
    pub to: ResolveAs,
    /// The settlement refund fee the provider paid, in fen (required with --as succeeded).
    #[arg(
        long,
        value_name = "N",
        required_if_eq("to", "succeeded"),
        value_parser = clap::value_parser!(i64).range(0..)
    )]
    pub settlement_fee: Option<i64>,
    /// The provider's evidence: statement file and line, ticket, query answer (audited).
    #[arg(long, value_name = "TEXT", value_parser = non_empty)]
    pub evidence: String,
    /// Who you are (stored in the audit row).
    #[arg(long, value_name = "WHO", value_parser = non_empty, default_value_t = os_user())]
    pub operator: String,
}

/// Corrects a final job's booking (see [`JobCommand::Correct`]).
pub async fn correct(ctl: &Ctl, args: &CorrectArgs, out: &mut Out) -> anyhow::Result<ActionReport> {
    let correction = match settlement(args.to, args.settlement_fee)? {
        Some(fee) => Correction::Succeeded {
            settlement_refund_fee: fee,
        },
        None => Correction::Failed,
    };
    let action = Action::Correct(correction);
    let op = Operator {
        name: &args.operator,
        note: &args.evidence,
    };
    let report = submit(ctl, &args.refund_no, action, op).await?;
    let no = &args.refund_no;
    match (&report.verdict, report.requested) {
        (Verdict::Done { prior }, Some(id)) => {
            writeln!(out, "{}", filed_line(no, id, action, *prior))?
        }
        (Verdict::Done { prior }, None) => writeln!(
            out,
            "{no}  corrected: {prior} -> {} (new ledger entries booked; event refund.corrected \
             queued; open cases closed as corrected)",
            correction.state()
        )?,
        (Verdict::Refused { reason, .. }, _) => writeln!(out, "{no}  refused: {reason}")?,
    }
    Ok(report)
}
