//! `dlq discard`: takes dead jobs and poison messages that will never be paid out of the
//! dead-letter set, audited.
//!
//! A discard archives: the job stays `dead` with its whole history, the poison message stays
//! stored, and a `dlq_discards` row says who discarded it, when and why; `dlq list`, `dlq
//! replay --all` and the DLQ depth of `stats` leave it out, and a replay of it is refused. It
//! moves no money: to settle a job whose provider may hold the money (`outcome_unknown`,
//! `refund_abnormal`) the tool is `job resolve`, and the database refuses to discard one
//! (`operator_discard_job`, migration 20261204000060). Each item is its own transaction
//! through that function, which re-checks under the row lock and writes the audit row.

use clap::{ArgGroup, Args};
use serde::Serialize;
use shared::state::State;
use shared::store::jobs::{self, Verdict};

use super::{Ctl, OperatorArgs, Out, Status};

#[derive(Debug, Clone, Args)]
#[command(
    group(ArgGroup::new("what").required(true).multiple(true).args(["refund_nos", "poison"])),
    after_help = "Examples:\n  \
        refundctl dlq discard --refund-no R1001 R1002 --note 'INC-7: order cancelled upstream'\n  \
        refundctl dlq discard --poison 42 --operator alice --note 'test message from staging'\n  \
        refundctl dlq discard --poison 42 43 --note 'garbage' --json"
)]
pub struct DiscardArgs {
    /// Dead jobs to discard (repeat the flag or list several).
    #[arg(long = "refund-no", value_name = "N", num_args = 1..)]
    pub refund_nos: Vec<String>,
    /// Poison messages to discard, by the id `dlq list --json` prints.
    #[arg(long, value_name = "ID", num_args = 1..)]
    pub poison: Vec<i64>,
    /// One JSON object per item on stdout ({"item", "id", "result", "prior", "reason"}); the
    /// summary goes to stderr.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub who: OperatorArgs,
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscardItem {
    /// `dead_job` or `poison_message`.
    pub item: &'static str,
    /// The refund_no, or the poison message's id.
    pub id: String,
    /// `discarded` or `refused`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<State>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `dlq discard` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscardReport {
    pub items: Vec<DiscardItem>,
}

impl DiscardReport {
    /// The items discarded.
    pub fn discarded(&self) -> Vec<&str> {
        self.with("discarded")
    }

    /// The items refused.
    pub fn refused(&self) -> Vec<&str> {
        self.with("refused")
    }

    fn with(&self, result: &str) -> Vec<&str> {
        self.items
            .iter()
            .filter(|i| i.result == result)
            .map(|i| i.id.as_str())
            .collect()
    }

    /// Done when nothing was refused.
    pub fn status(&self) -> Status {
        Status::from_ok(self.refused().is_empty())
    }
}

/// Discards each named dead job and poison message (see [`DiscardArgs`]).
pub async fn discard(
    ctl: &Ctl,
    args: &DiscardArgs,
    out: &mut Out,
) -> anyhow::Result<DiscardReport> {
    let op = args.who.as_operator();
    let mut report = DiscardReport::default();
    for refund_no in &args.refund_nos {
        let mut tx = ctl.pool.begin().await?;
        let verdict = jobs::discard(&mut tx, refund_no, op).await?;
        tx.commit().await?;
        let item = match verdict {
            Verdict::Done { prior } => DiscardItem {
                item: "dead_job",
                id: refund_no.clone(),
                result: "discarded",
                prior: Some(prior),
                reason: None,
            },
            Verdict::Refused { prior, reason } => DiscardItem {
                item: "dead_job",
                id: refund_no.clone(),
                result: "refused",
                prior,
                reason: Some(reason),
            },
        };
        write_item(out, args.json, &item)?;
        report.items.push(item);
    }
    for id in &args.poison {
        let mut tx = ctl.pool.begin().await?;
        let refusal = jobs::discard_poison(&mut tx, *id, op).await?;
        tx.commit().await?;
        let item = DiscardItem {
            item: "poison_message",
            id: id.to_string(),
            result: if refusal.is_some() {
                "refused"
            } else {
                "discarded"
            },
            prior: None,
            reason: refusal,
        };
        write_item(out, args.json, &item)?;
        report.items.push(item);
    }
    let summary = format!(
        "discarded {}, refused {} (of {})",
        report.discarded().len(),
        report.refused().len(),
        report.items.len()
    );
    if args.json {
        eprintln!("{summary}");
    } else {
        writeln!(out, "{summary}")?;
    }
    Ok(report)
}

fn write_item(out: &mut Out, json: bool, item: &DiscardItem) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, item)?;
        writeln!(out)?;
        return Ok(());
    }
    let what = match item.item {
        "poison_message" => format!("poison message {}", item.id),
        _ => item.id.clone(),
    };
    match &item.reason {
        None => writeln!(out, "{what}  discarded")?,
        Some(reason) => writeln!(out, "{what}  refused: {reason}")?,
    }
    Ok(())
}
