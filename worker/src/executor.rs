//! Running one job: claim, lease check, provider call, decision, record.
//!
//! A job runs only while it holds an executor slot (bounding in-flight calls) and a claim
//! (bounding who may call the provider for it: one attempt at a time, fenced by the attempt
//! number). The lease is checked against a local monotonic deadline started *before* the claim
//! was requested, which is never later than the database's `lease_until`, so the check needs no
//! extra round trip; a request is sent only if what is left covers the whole HTTP call (its
//! timeout) and the margin. No transaction is held across the HTTP call. Short retries wait here;
//! longer ones go back to Postgres for the sweeper. Claims and outcomes are written through the
//! [`crate::writer`], which shares each statement and commit among the jobs that are ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::provider::{Outcome, RefundCall};
use shared::state::{Cause, State};
use shared::store::jobs::{self, Claimed, OutcomeToRecord, Recorded};
use shared::workflow::{Decision, decide};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::app::Ctx;

/// Runs a job when a slot is free (waits for one: this is the consumer's backpressure).
pub async fn dispatch(ctx: &Arc<Ctx>, refund_no: String) {
    let Ok(permit) = ctx.slots.clone().acquire_owned().await else {
        return;
    };
    spawn(ctx, refund_no, permit);
}

/// Runs a job in the background with an already-held slot.
pub fn spawn(ctx: &Arc<Ctx>, refund_no: String, permit: OwnedSemaphorePermit) {
    if ctx.jobs.is_closed() {
        // Draining for shutdown: the job stays `received` and the next sweeper takes it.
        return;
    }
    let ctx2 = ctx.clone();
    ctx.jobs.spawn(async move {
        let _permit = permit;
        metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        if let Err(e) = run(&ctx2, &refund_no).await {
            tracing::error!(refund_no = %refund_no, error = %e, "job run failed; the sweeper will pick it up");
        }
        metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
    });
}

/// Claims and calls until the job is final, dead, fenced, or waiting for a later retry.
pub async fn run(ctx: &Arc<Ctx>, refund_no: &str) -> anyhow::Result<()> {
    let lease = ctx.config.worker.lease();
    let margin = Duration::from_millis(ctx.config.worker.lease_margin_ms);
    loop {
        let started = Instant::now();
        let Some(claimed) = ctx.writer.claim(refund_no.to_owned()).await? else {
            // Final, dead, not yet due, or another worker has it.
            return Ok(());
        };
        shared::failpoint::hit("claimed");
        crate::metrics::transition(claimed.from.as_str(), State::InFlight.as_str());
        let span = tracing::info_span!(
            "job",
            refund_no = %claimed.refund_no,
            provider = %claimed.request.provider,
            merchant = %claimed.request.merchant,
            attempt = claimed.attempt
        );
        let next = attempt(ctx, claimed, started, lease, margin)
            .instrument(span)
            .await?;
        match next {
            Some(wait) => {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            None => return Ok(()),
        }
    }
}

/// Whether a lease of `lease`, `elapsed` into it, still covers a call that may take `timeout`
/// with `margin` to spare.
fn lease_covers_call(
    elapsed: Duration,
    lease: Duration,
    timeout: Duration,
    margin: Duration,
) -> bool {
    elapsed.saturating_add(timeout).saturating_add(margin) < lease
}

/// One attempt; `Some(wait)` when the job should be tried again here after `wait`.
async fn attempt(
    ctx: &Arc<Ctx>,
    claimed: Claimed,
    started: Instant,
    lease: Duration,
    margin: Duration,
) -> anyhow::Result<Option<Duration>> {
    let req = &claimed.request;
    let Some(client) = ctx.registry.get(req.provider, &req.merchant).cloned() else {
        tracing::error!("no client is configured for this merchant any more");
        jobs::kill(
            &ctx.pool,
            &claimed.refund_no,
            Some(claimed.attempt),
            Cause::MerchantNotConfigured,
            "no client configured for this merchant",
            &ctx.actor,
            ctx.tz,
        )
        .await?;
        return Ok(None);
    };
    // The last moment to decide whether to send. The call may take the whole HTTP timeout, and
    // the lease must outlast it with the margin to spare: past the lease, the sweeper may hand
    // the job to someone else while this call is still out.
    if !lease_covers_call(started.elapsed(), lease, ctx.config.http.timeout(), margin) {
        tracing::warn!("lease nearly over before sending; giving the claim back");
        jobs::release(&ctx.pool, &claimed, &ctx.actor).await?;
        return Ok(None);
    }
    let rec = client
        .refund(RefundCall {
            request: req,
            attempt: claimed.attempt,
        })
        .await;
    shared::failpoint::hit("sent");
    let class = rec.outcome.class();
    // Static labels stay borrowed; only the merchant is copied (on the hot path).
    let (provider, merchant) = (req.provider.as_str(), &req.merchant);
    metrics::counter!(crate::metrics::PROVIDER_CALLS, "provider" => provider, "merchant" => merchant.clone(), "outcome" => class).increment(1);
    metrics::histogram!(crate::metrics::PROVIDER_LATENCY, "provider" => provider, "merchant" => merchant.clone(), "outcome" => class)
        .record(rec.latency.as_secs_f64());
    // The retry budget restarts at a replay: count attempts and age from there.
    let age = (chrono::Utc::now() - claimed.budget_start())
        .to_std()
        .unwrap_or_default();
    let decision = decide(
        &rec.outcome,
        claimed.budget_attempt(),
        age,
        claimed.idempotent,
        claimed.history,
        &ctx.policy,
        &mut rand::rng(),
    )
    .at_acceptance(
        client.final_on_accept(),
        ctx.config.worker.query.due_after(0),
    );
    tracing::info!(
        outcome = class,
        code = rec.outcome.code().unwrap_or(""),
        latency_ms = rec.latency.as_millis() as u64,
        decision = ?decision,
        "provider call finished"
    );
    let provider = req.provider.as_str();
    let accepted = matches!(rec.outcome, Outcome::Accepted { .. });
    let item = OutcomeToRecord {
        claimed,
        rec,
        decision: decision.clone(),
    };
    let recorded = match ctx.writer.record(item).await {
        Ok(r) => r,
        Err(e) => {
            if accepted {
                tracing::error!(error = %e, "could not record an accepted refund; the lease will expire and the sweeper decides (resend if idempotent, else outcome_unknown)");
            }
            return Err(e);
        }
    };
    shared::failpoint::hit("recorded");
    match (&recorded, &decision) {
        (Recorded::Fenced, _) => {
            metrics::counter!(crate::metrics::FENCED).increment(1);
            tracing::warn!(
                outcome = class,
                "outcome arrived after the job moved on; kept as a fenced attempt"
            );
            Ok(None)
        }
        (Recorded::Applied(to), Decision::Retry { after }) => {
            crate::metrics::transition(State::InFlight.as_str(), to.as_str());
            metrics::counter!(crate::metrics::RETRIES, "provider" => provider).increment(1);
            let in_process = Duration::from_millis(ctx.config.worker.retry.in_process_max_ms);
            Ok((*after <= in_process).then_some(*after))
        }
        (Recorded::Applied(to), decision) => {
            crate::metrics::transition(State::InFlight.as_str(), to.as_str());
            if let Decision::Dead { cause } = decision {
                metrics::counter!(crate::metrics::DEAD_LETTERS, "cause" => cause.as_str())
                    .increment(1);
                // An operator's business: at WARN, its cause a plain word to grep and alert on.
                tracing::warn!(cause = cause.as_str(), "job dead: {cause}");
            }
            Ok(None)
        }
    }
}
