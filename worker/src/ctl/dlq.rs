//! `dlq list` and `dlq replay`: the dead-letter set grouped by cause, and audited replay
//! (`dlq discard` is [`super::discard`]).
//!
//! The dead-letter set is every `dead` job plus every poison message (a request refused at
//! intake, or a conflicting reuse of a `refund_no`), which the worker stored with its reason
//! before dead-lettering it on the broker.
//!
//! Replay works one job per transaction: [`jobs::replay`] locks the job's row, re-checks it
//! (still dead? outcome unknown at a merchant that does not deduplicate?), moves it to
//! `received` and writes the audit row — or writes a refusal audit row — and only after that
//! transaction commits is the job's original request published again with the same
//! `refund_no`. The worker's intake takes it as a duplicate of a `received` job and runs it.
//! If the process dies between the commit and the publish, the worker's sweeper picks the
//! `received` job up after `worker.orphan_after_ms`: nothing is lost, and nothing is sent
//! twice, because a second replay of the same job finds it no longer dead and is refused.
//!
//! A dry run asks the same rule (the database's `operator_replay_refusal`) without locking or writing
//! anything — no audit row either: the audit records what operators did to jobs, and a dry run
//! does nothing to them.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use futures::StreamExt;
use serde::Serialize;
use shared::job::RefundRequest;
use shared::state::{Cause, State};
use shared::store::jobs::{self, Verdict};
use shared::store::operator::{self, DeadFilter, DeadGroup, PoisonGroup};

use super::publish::Publisher;
use super::render::{self, Progress};
use super::{AuditedUnlessDryRun, Ctl, OperatorArgs, Out, Status};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead jobs grouped by fingerprint (cause, provider, provider code) with counts and ages,
    /// then poison messages (rejected or conflicting requests) grouped by kind and field.
    List(ListArgs),
    /// Re-enqueue dead jobs with the same refund_no, after re-checking each under its row lock.
    ///
    /// A job that is no longer dead (resolved, replayed by someone else, ...) is refused, and
    /// so is a job whose outcome is unknown at a merchant that does not deduplicate on
    /// refund_no: the provider may have paid it, so check with the provider and use `refundctl
    /// job resolve`. Every replayed or refused job gets an audit row (operator, note, prior
    /// state, time).
    Replay(ReplayArgs),
    /// Take dead jobs or poison messages that will never be paid out of the dead letters
    /// (archived and audited; their history stays).
    ///
    /// A discarded job stays dead with its history and its order amount committed (to release
    /// it, `job resolve --as failed`); it leaves `dlq list`, the DLQ depth and `replay --all`,
    /// and a replay of it is refused. Refused for a job that is not dead, and for one whose
    /// provider may hold the money (outcome_unknown, refund_abnormal): resolve those.
    Discard(super::discard::DiscardArgs),
}

#[derive(Debug, Clone, Default, Args)]
#[command(after_help = "Examples:\n  \
    refundctl dlq list\n  \
    refundctl dlq list --cause retries_exhausted --provider shengpay\n  \
    refundctl dlq list --merchant 1900000109 --code SYSTEMERROR --since 2h\n  \
    refundctl dlq list --json --limit 100 | jq -r .refund_no")]
pub struct ListArgs {
    /// Only this cause; `rejected` or `conflict` select poison messages.
    #[arg(long, value_name = "C", value_parser = list_causes())]
    pub cause: Option<String>,
    /// Only this provider; poison messages belong to no provider and are left out.
    #[arg(long, value_name = "P", value_parser = ["shengpay", "wupay"])]
    pub provider: Option<String>,
    /// Only this merchant (poison messages are left out).
    #[arg(long, value_name = "M")]
    pub merchant: Option<String>,
    /// Only jobs whose last provider code is this (poison messages are left out).
    #[arg(long, value_name = "CODE")]
    pub code: Option<String>,
    /// Only jobs that died (poison messages that last arrived) this recently: 30m, 2h, 7d, or
    /// since an RFC 3339 time (2026-11-21T10:00:00+08:00).
    #[arg(long, value_name = "AGE|TIME", value_parser = super::render::parse_since)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many dead jobs and poison messages (`--json`), or groups of each (the
    /// table); the longest dead first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: Option<i64>,
    /// One JSON object per line: each dead job ("type":"dead_job"), then each poison message
    /// ("type":"poison_message").
    #[arg(long)]
    pub json: bool,
}

/// The causes a dead job can have, as `--cause` takes them (`dlq replay`).
fn dead_causes() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(Cause::ALL.map(Cause::as_str))
}

/// The causes and the poison kinds, as `dlq list --cause` takes them.
fn list_causes() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        Cause::ALL
            .map(Cause::as_str)
            .into_iter()
            .chain(["rejected", "conflict"]),
    )
}

/// What `dlq list` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListReport {
    pub groups: Vec<DeadGroup>,
    pub poison: Vec<PoisonGroup>,
    /// Lines written in `--json` mode.
    pub json_lines: u64,
}

impl ListReport {
    pub fn dead_jobs(&self) -> i64 {
        self.groups.iter().map(|g| g.count).sum()
    }

    pub fn poison_messages(&self) -> i64 {
        self.poison.iter().map(|g| g.messages).sum()
    }
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    item: T,
}

/// Lists the dead-letter set (see [`DlqCommand::List`]).
pub async fn list(ctl: &Ctl, args: &ListArgs, out: &mut Out) -> anyhow::Result<ListReport> {
    let filter = DeadFilter {
        cause: args.cause.clone(),
        provider: args.provider.clone(),
        merchant: args.merchant.clone(),
        code: args.code.clone(),
        since: args.since,
        limit: args.limit,
    };
    // Poison messages have a kind, not a cause, and no provider, merchant or code: `--cause
    // rejected` selects them, `--provider`, `--merchant` and `--code` leave them out.
    let with_poison = filter.admits_poison();
    if args.json {
        let mut report = ListReport::default();
        let mut rows = operator::dead_jobs(&ctl.pool, filter);
        while let Some(job) = rows.next().await {
            let line = Tagged {
                kind: "dead_job",
                item: job?,
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            report.json_lines += 1;
        }
        if with_poison {
            let messages =
                operator::poison_messages(&ctl.pool, args.cause.as_deref(), args.since, args.limit)
                    .await?;
            for m in messages {
                let line = Tagged {
                    kind: "poison_message",
                    item: m,
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
                report.json_lines += 1;
            }
        }
        return Ok(report);
    }
    let groups = operator::dead_groups(&ctl.pool, &filter).await?;
    let poison = if with_poison {
        operator::poison_groups(&ctl.pool, args.cause.as_deref(), args.since, args.limit).await?
    } else {
        Vec::new()
    };
    let report = ListReport {
        groups,
        poison,
        json_lines: 0,
    };
    write_list(ctl, &report, out)?;
    Ok(report)
}

fn write_list(ctl: &Ctl, r: &ListReport, out: &mut Out) -> anyhow::Result<()> {
    let tz = ctl.tz;
    if r.groups.is_empty() {
        writeln!(out, "Dead jobs: none")?;
    } else {
        writeln!(
            out,
            "Dead jobs: {} in {} group{} (cause, provider, last provider code)",
            r.dead_jobs(),
            r.groups.len(),
            plural(r.groups.len())
        )?;
        let rows: Vec<Vec<String>> = r
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.cause.clone(),
                    g.provider.clone(),
                    render::opt(g.code.as_deref()),
                    g.count.to_string(),
                    render::time_ago(g.oldest, tz),
                    render::time_ago(g.newest, tz),
                    render::cut(g.sample_message.as_deref().unwrap_or("-"), 60),
                ]
            })
            .collect();
        render::table(
            out,
            "  ",
            &[
                "CAUSE",
                "PROVIDER",
                "CODE",
                "COUNT",
                "OLDEST (DIED)",
                "NEWEST (DIED)",
                "SAMPLE MESSAGE",
            ],
            &rows,
            &[3],
        )?;
    }
    writeln!(out)?;
    if r.poison.is_empty() {
        writeln!(out, "Poison messages: none")?;
    } else {
        writeln!(
            out,
            "Poison messages: {} in {} group{} (rejected at intake or conflicting; stored, never \
             sent)",
            r.poison_messages(),
            r.poison.len(),
            plural(r.poison.len())
        )?;
        let rows: Vec<Vec<String>> = r
            .poison
            .iter()
            .map(|g| {
                vec![
                    g.kind.clone(),
                    g.field.clone(),
                    g.messages.to_string(),
                    g.occurrences.to_string(),
                    render::time_ago(g.oldest, tz),
                    render::time_ago(g.newest, tz),
                    render::cut(&g.sample_reason, 80),
                ]
            })
            .collect();
        render::table(
            out,
            "  ",
            &[
                "KIND",
                "FIELD",
                "MESSAGES",
                "ARRIVALS",
                "FIRST SEEN",
                "LAST SEEN",
                "SAMPLE REASON",
            ],
            &rows,
            &[2, 3],
        )?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[derive(Debug, Clone, Args)]
#[command(
    group(ArgGroup::new("selection").required(true).args(["refund_nos", "cause", "all"])),
    after_help = "Examples:\n  \
        refundctl dlq replay --all --dry-run\n  \
        refundctl dlq replay --cause retries_exhausted --note 'INC-42 provider outage over'\n  \
        refundctl dlq replay --refund-no R1001 R1002 --operator alice --note 'SP-7' --rate 5\n  \
        refundctl dlq replay --all --note 'INC-42' --json > replay.jsonl"
)]
pub struct ReplayArgs {
    /// Replay these jobs (repeat the flag or list several).
    #[arg(long = "refund-no", value_name = "N", num_args = 1..)]
    pub refund_nos: Vec<String>,
    /// Replay every dead job of this cause.
    #[arg(long, value_name = "C", value_parser = dead_causes())]
    pub cause: Option<String>,
    /// Replay every dead job.
    #[arg(long)]
    pub all: bool,
    /// Print what would happen to each job; change nothing, audit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replays per second at most (0: no limit), so the providers are not flooded.
    #[arg(long, value_name = "PER_SEC", default_value_t = 20.0, value_parser = parse_rate)]
    pub rate: f64,
    /// One JSON object per job on stdout ({"refund_no", "result", "prior", "reason"}); the
    /// summary goes to stderr.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub who: AuditedUnlessDryRun,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !r.is_finite() || r < 0.0 {
        return Err("must be a number of replays per second, 0 or more".into());
    }
    Ok(r)
}

/// What happened (or would happen) to one selected job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// Back to `received` and published again.
    Replayed { prior: State },
    /// Back to `received`, but the publish failed: the worker's sweeper will pick it up.
    ReplayedNotPublished { prior: State, error: String },
    /// Refused (audited), with the reason.
    Refused {
        prior: Option<State>,
        reason: String,
    },
    /// Dry run: would be replayed.
    WouldReplay { prior: State },
    /// Dry run: would be refused.
    WouldRefuse {
        prior: Option<State>,
        reason: String,
    },
}

impl ReplayOutcome {
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ReplayOutcome::Refused { .. } | ReplayOutcome::WouldRefuse { .. }
        )
    }

    pub fn is_replay(&self) -> bool {
        matches!(
            self,
            ReplayOutcome::Replayed { .. } | ReplayOutcome::ReplayedNotPublished { .. }
        )
    }
}

/// One selected job and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobReplay {
    pub refund_no: String,
    #[serde(flatten)]
    pub outcome: ReplayOutcome,
}

/// What a replay run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub jobs: Vec<JobReplay>,
}

impl ReplayReport {
    pub fn replayed(&self) -> Vec<&str> {
        self.pick(ReplayOutcome::is_replay)
    }

    pub fn refused(&self) -> Vec<&str> {
        self.pick(ReplayOutcome::is_refusal)
    }

    pub fn would_replay(&self) -> Vec<&str> {
        self.pick(|o| matches!(o, ReplayOutcome::WouldReplay { .. }))
    }

    fn pick(&self, f: impl Fn(&ReplayOutcome) -> bool) -> Vec<&str> {
        self.jobs
            .iter()
            .filter(|j| f(&j.outcome))
            .map(|j| j.refund_no.as_str())
            .collect()
    }

    pub fn outcome(&self, refund_no: &str) -> Option<&ReplayOutcome> {
        self.jobs
            .iter()
            .find(|j| j.refund_no == refund_no)
            .map(|j| &j.outcome)
    }

    /// Exit 1 when any job was (or would be) refused.
    pub fn status(&self) -> Status {
        Status::from_ok(self.refused().is_empty())
    }
}

/// Which jobs a replay works through: the listed ones (deduplicated, in order), or the dead
/// jobs of a cause or all dead jobs at this moment, longest dead first. Each is re-checked
/// when its turn comes, so a job that changes meanwhile is refused then.
pub async fn select(ctl: &Ctl, args: &ReplayArgs) -> anyhow::Result<Vec<String>> {
    if !args.refund_nos.is_empty() {
        let mut seen = HashSet::new();
        return Ok(args
            .refund_nos
            .iter()
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect());
    }
    let cause = if args.all {
        None
    } else {
        args.cause.as_deref()
    };
    Ok(operator::dead_refund_nos(&ctl.pool, cause).await?)
}

/// Selects and replays (see [`DlqCommand::Replay`]).
pub async fn replay(ctl: &Ctl, args: &ReplayArgs, out: &mut Out) -> anyhow::Result<ReplayReport> {
    let selected = select(ctl, args).await?;
    replay_selected(ctl, args, &selected, out).await
}

/// Replays (or dry-runs) an already selected list of jobs, one transaction each, at most
/// `args.rate` per second.
pub async fn replay_selected(
    ctl: &Ctl,
    args: &ReplayArgs,
    selected: &[String],
    out: &mut Out,
) -> anyhow::Result<ReplayReport> {
    // Who, and why, before anything is done: a dry run audits nothing and needs neither.
    let who = if args.dry_run {
        None
    } else {
        Some(args.who.resolve()?)
    };
    let mut report = ReplayReport {
        dry_run: args.dry_run,
        jobs: Vec::with_capacity(selected.len()),
    };
    if selected.is_empty() {
        if args.json {
            eprintln!("nothing to replay: no dead job matches");
        } else {
            writeln!(out, "nothing to replay: no dead job matches")?;
        }
        return Ok(report);
    }
    let mut publisher = if args.dry_run {
        None
    } else {
        Some(Publisher::connect(&ctl.config, "refundctl-replay").await?)
    };
    let mut pace = (!args.dry_run && args.rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let progress = Progress::new(
        ctl.progress,
        selected.len() as u64,
        if args.dry_run { "dry run" } else { "replay" },
    );
    for refund_no in selected {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let outcome = match &who {
            None => dry_run_one(ctl, refund_no).await?,
            Some(who) => replay_one(ctl, who, refund_no, &mut publisher).await?,
        };
        let item = JobReplay {
            refund_no: refund_no.clone(),
            outcome,
        };
        progress.suspend(|| -> anyhow::Result<()> {
            if args.json {
                serde_json::to_writer(&mut *out, &item)?;
                writeln!(out)?;
            } else {
                write_outcome(out, refund_no, &item.outcome)?;
            }
            Ok(())
        })?;
        progress.inc(1);
        report.jobs.push(item);
    }
    progress.finish();
    if let Some(p) = publisher {
        p.close().await;
    }
    if args.json {
        write_summary(&report, &mut std::io::stderr())?;
    } else {
        write_summary(&report, out)?;
    }
    Ok(report)
}

/// The same checks as a replay, read-only.
pub(crate) async fn dry_run_one(ctl: &Ctl, refund_no: &str) -> anyhow::Result<ReplayOutcome> {
    let Some(f) = operator::replay_facts(&ctl.pool, refund_no).await? else {
        return Ok(ReplayOutcome::WouldRefuse {
            prior: None,
            reason: "no such job".into(),
        });
    };
    let state: State = f.state.parse().map_err(anyhow::Error::msg)?;
    Ok(match f.refusal {
        Some(reason) => ReplayOutcome::WouldRefuse {
            prior: Some(state),
            reason,
        },
        None => ReplayOutcome::WouldReplay { prior: state },
    })
}

/// One job: re-check, transition and audit in one transaction; publish after the commit.
pub(crate) async fn replay_one(
    ctl: &Ctl,
    who: &OperatorArgs,
    refund_no: &str,
    publisher: &mut Option<Publisher>,
) -> anyhow::Result<ReplayOutcome> {
    let mut tx = ctl.pool.begin().await?;
    let verdict = jobs::replay(&mut tx, refund_no, who.as_operator())
        .await
        .with_context(|| format!("replaying {refund_no}"))?;
    let (prior, body) = match verdict {
        Verdict::Refused { prior, reason } => {
            tx.commit().await?;
            return Ok(ReplayOutcome::Refused { prior, reason });
        }
        Verdict::Done { prior } => {
            let stored = operator::job_request(&mut tx, refund_no)
                .await?
                .with_context(|| format!("job {refund_no} vanished during its replay"))?;
            let request: RefundRequest = serde_json::from_value(stored)
                .with_context(|| format!("the stored request of {refund_no} is unreadable"))?;
            tx.commit().await?;
            (prior, request.canonical_json())
        }
    };
    match publish(ctl, publisher, refund_no, body.as_bytes()).await {
        Ok(()) => Ok(ReplayOutcome::Replayed { prior }),
        Err(error) => Ok(ReplayOutcome::ReplayedNotPublished {
            prior,
            error: format!("{error:#}"),
        }),
    }
}

/// Publishes with confirms, reconnecting once if the channel was lost since the last job.
async fn publish(
    ctl: &Ctl,
    publisher: &mut Option<Publisher>,
    refund_no: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    if !publisher.as_ref().is_some_and(Publisher::is_open) {
        if let Some(old) = publisher.take() {
            old.close().await;
        }
        *publisher = Some(Publisher::connect(&ctl.config, "refundctl-replay").await?);
    }
    let p = publisher
        .as_ref()
        .context("no broker connection for the replay")?;
    let result = p.publish(body, Some(refund_no)).await;
    if result.is_err() && !p.is_open() {
        // The next job reconnects.
        if let Some(old) = publisher.take() {
            old.close().await;
        }
    }
    Ok(result?)
}

fn write_outcome(out: &mut Out, refund_no: &str, o: &ReplayOutcome) -> std::io::Result<()> {
    match o {
        ReplayOutcome::Replayed { prior } => {
            writeln!(
                out,
                "{refund_no}  replayed  ({prior} -> received, re-enqueued)"
            )
        }
        ReplayOutcome::ReplayedNotPublished { prior, error } => writeln!(
            out,
            "{refund_no}  replayed  ({prior} -> received) but not re-enqueued: {error}; the \
             worker's sweeper will pick it up"
        ),
        ReplayOutcome::Refused { reason, .. } => writeln!(out, "{refund_no}  refused: {reason}"),
        ReplayOutcome::WouldReplay { prior } => {
            writeln!(out, "{refund_no}  would replay  ({prior} -> received)")
        }
        ReplayOutcome::WouldRefuse { reason, .. } => {
            writeln!(out, "{refund_no}  would refuse: {reason}")
        }
    }
}

fn write_summary(r: &ReplayReport, out: &mut Out) -> std::io::Result<()> {
    let total = r.jobs.len();
    if r.dry_run {
        writeln!(
            out,
            "dry run: would replay {}, would refuse {} (of {total} selected); nothing was changed",
            r.would_replay().len(),
            r.refused().len()
        )
    } else {
        let unpublished = r
            .jobs
            .iter()
            .filter(|j| matches!(j.outcome, ReplayOutcome::ReplayedNotPublished { .. }))
            .count();
        writeln!(
            out,
            "replayed {}, refused {} (of {total} selected){}",
            r.replayed().len(),
            r.refused().len(),
            if unpublished > 0 {
                format!("; {unpublished} not re-enqueued, left to the sweeper")
            } else {
                String::new()
            }
        )
    }
}
