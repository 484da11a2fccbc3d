//! `stats`: jobs by state, the oldest non-final job, and the dead-letter depth.
//!
//! The dead-letter depth is what an operator has to look at: dead jobs plus stored poison
//! messages (both from Postgres, the source of truth). The broker's dead-letter queue holds the
//! dead-lettered poison deliveries; its message count is shown as well when the broker
//! answers, and left out (with the reason) when it does not: `stats` never fails on the broker.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use shared::config::Config;
use shared::state::State;
use shared::store::budgets::BudgetState;
use shared::store::operator::{self, OldestJob};

use super::render;
use super::{Ctl, Out};

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl stats\n  \
    refundctl stats --json | jq .dlq.depth")]
pub struct StatsArgs {
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Dead-letter depth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqDepth {
    /// Dead jobs not discarded.
    pub dead_jobs: i64,
    /// Distinct stored poison messages not discarded.
    pub poison_messages: i64,
    /// Dead jobs and poison messages operators discarded (`dlq discard`): archived, out of
    /// the depth.
    pub discarded: i64,
    /// `dead_jobs + poison_messages`.
    pub depth: i64,
    /// Messages in the broker's dead-letter queue, when it answered.
    pub broker_queue: String,
    pub broker_messages: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_error: Option<String>,
}

/// What `stats` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// The database read, its password left out: a wrong `database_url` shows here, not as a
    /// quiet "0 jobs".
    pub database: String,
    /// Every state, zeros included.
    pub counts: BTreeMap<String, i64>,
    pub total: i64,
    /// The oldest job not in a final state (`dead` included: it waits for an operator).
    pub oldest_non_final: Option<OldestJob>,
    /// The oldest job still being worked on (`received`, `in_flight`, `retry_wait`).
    pub oldest_in_progress: Option<OldestJob>,
    pub dlq: DlqDepth,
    /// Flow control: each merchant with a limit or a pause on record, its rate in force and
    /// whether it is paused because its provider is down.
    pub merchants: Vec<BudgetState>,
}

/// Gathers and prints the stats.
pub async fn stats(
    ctl: &Ctl,
    args: &super::stats::StatsArgs,
    out: &mut Out,
) -> anyhow::Result<Stats> {
    let by_state = shared::store::ops::counts_by_state(&ctl.pool).await?;
    let counts: BTreeMap<String, i64> = State::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), by_state.get(s).copied().unwrap_or(0)))
        .collect();
    let non_final: Vec<State> = State::ALL.into_iter().filter(|s| !s.is_final()).collect();
    let in_progress = [State::Received, State::InFlight, State::RetryWait];
    let oldest_non_final = operator::oldest_in(&ctl.pool, &non_final).await?;
    let oldest_in_progress = operator::oldest_in(&ctl.pool, &in_progress).await?;
    let dlq =
        operator::dlq_counts(&ctl.pool, by_state.get(&State::Dead).copied().unwrap_or(0)).await?;
    let (broker_messages, broker_error) = match broker_dead_letters(&ctl.config).await {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(shared::telemetry::error_chain(e.as_ref()))),
    };
    let merchants =
        shared::store::budgets::states(&ctl.pool, ctl.config.worker.flow.recover()).await?;
    let s = Stats {
        merchants,
        database: ctl.config.database_url_redacted(),
        total: counts.values().sum(),
        counts,
        oldest_non_final,
        oldest_in_progress,
        dlq: DlqDepth {
            dead_jobs: dlq.dead_jobs,
            poison_messages: dlq.poison_messages,
            discarded: dlq.discarded,
            depth: dlq.depth(),
            broker_queue: ctl.config.amqp.dead_letter_queue.clone(),
            broker_messages,
            broker_error,
        },
    };
    if args.json {
        serde_json::to_writer(&mut *out, &s)?;
        writeln!(out)?;
    } else {
        write_stats(ctl, &s, out)?;
    }
    Ok(s)
}

fn write_stats(ctl: &Ctl, s: &Stats, out: &mut Out) -> anyhow::Result<()> {
    writeln!(out, "Database: {}", s.database)?;
    writeln!(out)?;
    writeln!(out, "Jobs by state")?;
    let mut rows: Vec<Vec<String>> = s
        .counts
        .iter()
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    // Lifecycle order rather than alphabetical.
    rows.sort_by_key(|r| {
        State::ALL
            .iter()
            .position(|s| s.as_str() == r[0])
            .unwrap_or(usize::MAX)
    });
    rows.push(vec!["total".into(), s.total.to_string()]);
    render::table(out, "  ", &["STATE", "JOBS"], &rows, &[1])?;
    writeln!(out)?;
    let oldest = |o: &Option<OldestJob>| match o {
        Some(j) => format!(
            "{} ({}), created {}, {} old",
            j.refund_no,
            j.state,
            render::time(j.created_at, ctl.tz),
            render::age(j.age_seconds)
        ),
        None => "none".into(),
    };
    writeln!(
        out,
        "Oldest non-final job:   {}",
        oldest(&s.oldest_non_final)
    )?;
    writeln!(
        out,
        "Oldest job in progress: {}",
        oldest(&s.oldest_in_progress)
    )?;
    writeln!(
        out,
        "DLQ depth: {} ({} dead jobs + {} poison messages; {} discarded, not counted)",
        s.dlq.depth, s.dlq.dead_jobs, s.dlq.poison_messages, s.dlq.discarded
    )?;
    // Poison messages are no job's state, so the table above cannot show them.
    writeln!(
        out,
        "Poison messages: {} (requests refused at intake or conflicting, stored: `dlq list`)",
        s.dlq.poison_messages
    )?;
    match (&s.dlq.broker_messages, &s.dlq.broker_error) {
        (Some(n), _) => writeln!(
            out,
            "Broker dead-letter queue {}: {n} messages",
            s.dlq.broker_queue
        )?,
        (None, Some(e)) => writeln!(
            out,
            "Broker dead-letter queue {}: unavailable ({e})",
            s.dlq.broker_queue
        )?,
        (None, None) => {}
    }
    writeln!(out)?;
    if s.merchants.is_empty() {
        writeln!(
            out,
            "Merchants: no limit or pause on record (no [[limits]] configured, no provider down)"
        )?;
        return Ok(());
    }
    writeln!(out, "Merchants (flow control)")?;
    let rows: Vec<Vec<String>> = s
        .merchants
        .iter()
        .map(|m| {
            let limit = match m.rate_per_sec {
                Some(r) => format!("{r:.1}/s, burst {}", m.burst),
                None => "none".into(),
            };
            let now = match m.rate_per_sec {
                Some(r) if m.permille < 1000 => format!(
                    "{:.1}/s ({}% after throttling)",
                    r * f64::from(m.permille) / 1000.0,
                    m.permille / 10
                ),
                Some(r) => format!("{r:.1}/s"),
                None => "-".into(),
            };
            let state = match (m.paused_since, m.paused_until) {
                (since, Some(until)) => format!(
                    "PAUSED since {}, next probe {} ({})",
                    since.map_or_else(|| "?".into(), |t| render::time(t, ctl.tz)),
                    render::time(until, ctl.tz),
                    m.pause_reason.as_deref().unwrap_or("provider failing")
                ),
                _ => "running".into(),
            };
            vec![m.provider.clone(), m.merchant.clone(), limit, now, state]
        })
        .collect();
    render::table(
        out,
        "  ",
        &["PROVIDER", "MERCHANT", "LIMIT", "RATE NOW", "STATE"],
        &rows,
        &[],
    )?;
    Ok(())
}

/// Messages in the broker's dead-letter queue (a passive declare: creates nothing).
async fn broker_dead_letters(config: &Config) -> anyhow::Result<u32> {
    let work = async {
        let conn = shared::broker::connect(&config.amqp_url, "refundctl-stats").await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                config.amqp.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "done".into()).await;
        anyhow::Ok(q?.message_count())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| anyhow::anyhow!("RabbitMQ did not answer within 5 s"))?
}
