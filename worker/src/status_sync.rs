//! The status sync workflow: ask the provider how the refunds it accepted (or may have
//! received) ended, on the decaying schedule of `[worker.query]`, and apply the answer.
//!
//! One task per worker takes due queries with a lease (`store::queries::take_due`, `SKIP
//! LOCKED`), so replicas share the work and never query one job twice at once; it runs up to
//! `worker.query.concurrency` queries at a time. Each answer has its handler: a status is
//! applied like a notify (towards a more final state only); "no such refund" sends an
//! `outcome_unknown` job again with the same `refund_no`; no usable answer (transport failure,
//! refusal, an answer that does not verify) waits for the next query. When the schedule runs
//! out, an accepted job goes `dead`/`refund_abnormal` for an operator and a dead one stops
//! being asked. A query never changes a final job.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shared::provider::Signal;
use shared::provider::status::QueryOutcome;
use shared::state::State;
use shared::store::jobs::{self, Effect, Source};
use shared::store::queries::{self, DueQuery};

use crate::app::Ctx;
use crate::flow::Admit;

/// Runs until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let poll = Duration::from_millis(ctx.config.worker.query.poll_ms);
    loop {
        let worked = match round(&ctx).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "status query round failed; trying again");
                0
            }
        };
        // A full batch means more are due: go on at once.
        if worked < ctx.config.worker.query.batch {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
        } else if ctx.shutdown.is_cancelled() {
            return;
        }
    }
}

/// Takes the due queries and runs them; how many it took.
async fn round(ctx: &Arc<Ctx>) -> anyhow::Result<usize> {
    let q = &ctx.config.worker.query;
    let due = queries::take_due(
        &ctx.pool,
        i64::try_from(q.batch).unwrap_or(i64::MAX),
        q.lease(),
    )
    .await?;
    let n = due.len();
    futures::stream::iter(due)
        .for_each_concurrent(q.concurrency, |d| async move {
            let refund_no = d.refund_no.clone();
            if let Err(e) = query_one(ctx, d).await {
                // The lease ends and the query is taken again.
                tracing::warn!(refund_no = %refund_no, error = %e, "status query not recorded");
            }
        })
        .await;
    Ok(n)
}

/// One due query: ask, then hand the answer to its handler.
async fn query_one(ctx: &Arc<Ctx>, d: DueQuery) -> anyhow::Result<()> {
    if !matches!(d.state, State::Accepted | State::Dead) {
        // Its end arrived by another way, or an operator sent it again.
        let mut conn = ctx.pool.acquire().await?;
        queries::done(&mut conn, &d.refund_no).await?;
        return Ok(());
    }
    let Some(client) = ctx.registry.get(d.request.provider, &d.request.merchant) else {
        return reschedule(
            ctx,
            &d,
            None,
            Some("no client configured for this merchant"),
        )
        .await;
    };
    // Queries spend from the merchant's budget too, and wait out its pause.
    let ticket = match ctx.flow.lane(d.request.provider, &d.request.merchant) {
        Some(lane) => match ctx.flow.admit(&lane).await {
            Admit::Go(t) => Some(t),
            // Its lease runs out and it is taken again later: nothing counted.
            Admit::Paused(_) => return Ok(()),
        },
        None => None,
    };
    if let Some(t) = ticket.as_ref()
        && !ctx.flow.wait_turn(t).await
    {
        return Ok(());
    }
    let Some(rec) = client.query(&d.request).await else {
        // This provider has no status query (its unknowns are settled by statement).
        let mut conn = ctx.pool.acquire().await?;
        queries::done(&mut conn, &d.refund_no).await?;
        return Ok(());
    };
    if let Some(t) = ticket {
        let signal = match (&rec.outcome, rec.http_status) {
            (_, Some(429 | 503)) => Signal::Throttled,
            (QueryOutcome::Unanswered { .. }, _) => Signal::Failed,
            _ => Signal::Answered,
        };
        ctx.flow.finish(t, signal).await;
    }
    metrics::counter!(
        crate::metrics::STATUS_QUERIES,
        "provider" => d.request.provider.as_str(),
        "merchant" => d.request.merchant.clone(),
        "outcome" => rec.outcome.class()
    )
    .increment(1);
    tracing::info!(
        refund_no = %d.refund_no,
        outcome = rec.outcome.class(),
        http_status = rec.http_status,
        latency_ms = u64::try_from(rec.latency.as_millis()).unwrap_or(u64::MAX),
        "status query finished"
    );
    match rec.outcome {
        QueryOutcome::Status(report) => on_status(ctx, &d, &report).await,
        QueryOutcome::NotFound { .. } => on_not_found(ctx, &d).await,
        QueryOutcome::Unanswered { error, .. } => reschedule(ctx, &d, None, Some(&error)).await,
    }
}

/// A status: applied like a notify; if it did not end the wait, the next query is scheduled.
async fn on_status(
    ctx: &Arc<Ctx>,
    d: &DueQuery,
    report: &shared::provider::status::StatusReport,
) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    let effect = jobs::apply_status(
        &mut tx,
        report,
        Source::Query,
        ctx.config.worker.query.due_after(0),
        &ctx.actor,
        ctx.tz,
    )
    .await?;
    tx.commit().await?;
    match effect {
        Effect::Applied { from, to } => {
            crate::metrics::transition(from.as_str(), to.as_str());
            crate::metrics::ended(
                d.request.provider,
                crate::metrics::published_at(&d.request, d.created_at),
                to,
            );
            Ok(())
        }
        Effect::NoChange { .. } => reschedule(ctx, d, Some(report.status.as_str()), None).await,
    }
}

/// "No such refund": the refund call never reached the provider. A job dead with an unknown
/// outcome is sent again, same `refund_no`; an accepted one (the provider took it, yet does not
/// know it) is asked again, and an operator sees it if that goes on.
async fn on_not_found(ctx: &Arc<Ctx>, d: &DueQuery) -> anyhow::Result<()> {
    if d.state == State::Dead {
        let mut tx = ctx.pool.begin().await?;
        let resent = jobs::not_at_provider(&mut tx, &d.refund_no, &ctx.actor).await?;
        tx.commit().await?;
        if let Some(t) = resent {
            crate::metrics::transition(t.from.as_str(), t.to.as_str());
            tracing::info!(refund_no = %d.refund_no, "the provider has no such refund: sending it again");
            let job = crate::executor::JobRef {
                refund_no: d.refund_no.clone(),
                provider: d.request.provider,
                merchant: d.request.merchant.clone(),
            };
            crate::executor::dispatch(ctx, job).await;
            return Ok(());
        }
    }
    tracing::warn!(refund_no = %d.refund_no, state = %d.state, "the provider says it has no such refund");
    reschedule(ctx, d, Some("NOT_FOUND"), None).await
}

/// Schedules the next query, or ends the wait when the schedule has run out: an accepted job
/// goes `dead`/`refund_abnormal`, a dead one is no longer asked.
async fn reschedule(
    ctx: &Arc<Ctx>,
    d: &DueQuery,
    status: Option<&str>,
    error: Option<&str>,
) -> anyhow::Result<()> {
    let q = &ctx.config.worker.query;
    let done = u32::try_from(d.queries).unwrap_or(0).saturating_add(1);
    let waited = (chrono::Utc::now() - d.since).to_std().unwrap_or_default();
    let next_at = q.due_after(done);
    if next_at > q.give_up_after() {
        if d.state == State::Accepted {
            let mut tx = ctx.pool.begin().await?;
            if jobs::give_up(&mut tx, &d.refund_no, &ctx.actor, ctx.tz).await? {
                crate::metrics::transition(State::Accepted.as_str(), State::Dead.as_str());
                tracing::error!(refund_no = %d.refund_no, "the provider never said how the refund ended: dead/refund_abnormal");
            }
            tx.commit().await?;
            return Ok(());
        }
        queries::reschedule(&ctx.pool, &d.refund_no, None, status, error).await?;
        return Ok(());
    }
    let next_in = next_at.saturating_sub(waited);
    queries::reschedule(&ctx.pool, &d.refund_no, Some(next_in), status, error).await?;
    Ok(())
}
