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
//! Before each claim a job waits for its merchant's turn ([`crate::flow`]): rate limit and
//! pause, without holding an executor slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::job::ProviderKind;
use shared::provider::{Outcome, RefundCall, Signal};
use shared::state::{Cause, State};
use shared::store::jobs::{self, Claimed, OutcomeToRecord, Recorded};
use shared::workflow::{Decision, decide};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::app::Ctx;
use crate::flow::{Admit, Held, Ticket};

/// A job to run, with the merchant whose lane it waits in.
#[derive(Debug, Clone)]
pub struct JobRef {
    pub refund_no: String,
    pub provider: ProviderKind,
    pub merchant: String,
}

/// Runs a job: at once when its merchant is neither limited nor paused, waiting for an executor
/// slot (this is the consumer's backpressure); otherwise it waits in its merchant's lane
/// without holding the consumer ([`offer`]).
pub async fn dispatch(ctx: &Arc<Ctx>, job: JobRef) {
    let lane = ctx.flow.lane(job.provider, &job.merchant);
    if lane.as_ref().is_some_and(|l| ctx.flow.waits(l)) {
        offer(ctx, job);
        return;
    }
    let Ok(permit) = ctx.slots.clone().acquire_owned().await else {
        return;
    };
    spawn(ctx, job, Some(permit));
}

/// Puts a job in its merchant's lane to wait for its turn, if the lane has room (else the job
/// stays in the database for the sweeper); whether it was taken.
pub fn offer(ctx: &Arc<Ctx>, job: JobRef) -> bool {
    let Some(lane) = ctx.flow.lane(job.provider, &job.merchant) else {
        // Not configured here: the attempt kills it with its cause.
        spawn(ctx, job, None);
        return true;
    };
    match ctx.flow.hold(&lane, &job.refund_no) {
        Held::Run(hold) => {
            spawn_held(ctx, job, None, Some(hold));
            true
        }
        Held::Queued => true,
        Held::Refused => false,
    }
}

/// Runs the jobs that waited in a lane's queue as their turn to wait comes, until shutdown.
pub async fn run_ready(ctx: Arc<Ctx>) {
    let Some(mut ready) = ctx.flow.take_ready() else {
        return;
    };
    loop {
        let hold = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            h = ready.recv() => match h {
                Some(h) => h,
                None => return,
            },
        };
        let job = JobRef {
            refund_no: hold.refund_no().to_owned(),
            provider: hold.lane().provider(),
            merchant: hold.lane().merchant().to_owned(),
        };
        spawn_held(&ctx, job, None, Some(hold));
    }
}

/// Runs a job in the background, with an executor slot already held or to be acquired when
/// its turn comes.
pub fn spawn(ctx: &Arc<Ctx>, job: JobRef, permit: Option<OwnedSemaphorePermit>) {
    spawn_held(ctx, job, permit, None);
}

fn spawn_held(
    ctx: &Arc<Ctx>,
    job: JobRef,
    permit: Option<OwnedSemaphorePermit>,
    hold: Option<crate::flow::Hold>,
) {
    if ctx.jobs.is_closed() {
        // Draining for shutdown: the job stays as it is and the next sweeper takes it.
        return;
    }
    let ctx2 = ctx.clone();
    ctx.jobs.spawn(async move {
        if let Err(e) = run(&ctx2, &job, permit, hold).await {
            tracing::error!(refund_no = %job.refund_no, error = %e, "job run failed; the sweeper will pick it up");
        }
    });
}

/// Claims and calls until the job is final, dead, fenced, paused or waiting for a later retry.
/// Every call first waits for its merchant's turn (flow control) without an executor slot, then
/// takes a slot for the claim and the call only.
pub async fn run(
    ctx: &Arc<Ctx>,
    job: &JobRef,
    mut permit: Option<OwnedSemaphorePermit>,
    mut hold: Option<crate::flow::Hold>,
) -> anyhow::Result<()> {
    let lease = ctx.config.worker.lease();
    let margin = Duration::from_millis(ctx.config.worker.lease_margin_ms);
    let lane = ctx.flow.lane(job.provider, &job.merchant);
    loop {
        let ticket = match &lane {
            Some(lane) => match ctx.flow.admit(lane).await {
                Admit::Go(t) => Some(t),
                Admit::Paused(until) if hold.is_some() => {
                    // It waits in its lane: ready to go the moment the merchant resumes (a
                    // job left in the database would wait for the orphan sweep).
                    let wait = (until - chrono::Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .clamp(
                            Duration::from_millis(10),
                            ctx.config.worker.flow.probe_interval(),
                        );
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                Admit::Paused(until) => {
                    tracing::debug!(refund_no = %job.refund_no, paused_until = %until, "merchant paused: the job waits in the database");
                    return Ok(());
                }
            },
            None => None,
        };
        // Its turn has come: it no longer counts against the lane's room.
        drop(hold.take());
        let permit = match permit.take() {
            Some(p) => p,
            None => ctx.slots.clone().acquire_owned().await?,
        };
        if ticket.as_ref().is_some_and(|t| ctx.flow.missed(t)) {
            // Executor slots were busy past the merchant's slot: ask for a new one, unclaimed.
            drop(permit);
            continue;
        }
        metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        let next = claim_and_call(ctx, &job.refund_no, ticket, lease, margin).await;
        metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
        drop(permit);
        match next? {
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

/// One claim and, if the job was claimable, one attempt; `Some(wait)` to try again here.
async fn claim_and_call(
    ctx: &Arc<Ctx>,
    refund_no: &str,
    ticket: Option<Ticket>,
    lease: Duration,
    margin: Duration,
) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    let Some(claimed) = ctx.writer.claim(refund_no.to_owned()).await? else {
        // Final, dead, not yet due, or another worker has it. A slot it held goes unused.
        return Ok(None);
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
    attempt(ctx, claimed, ticket, started, lease, margin)
        .instrument(span)
        .await
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
    ticket: Option<Ticket>,
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
    // The merchant's turn: its slot's time, never later (a missed slot is traded for a new one).
    if let Some(t) = ticket.as_ref()
        && !ctx.flow.wait_turn(t).await
    {
        // The claim took longer than the slot's lead: ask for a new slot, uncounted.
        tracing::debug!("the merchant's slot passed during the claim; giving the claim back");
        jobs::release(&ctx.pool, &claimed, &ctx.actor, "slot missed").await?;
        return Ok(Some(Duration::ZERO));
    }
    if !lease_covers_call(started.elapsed(), lease, ctx.config.http.timeout(), margin) {
        tracing::warn!("lease nearly over before sending; giving the claim back");
        jobs::release(&ctx.pool, &claimed, &ctx.actor, "lease too short to send").await?;
        return Ok(None);
    }
    let rec = client
        .refund(RefundCall {
            request: req,
            attempt: claimed.attempt,
        })
        .await;
    shared::failpoint::hit("sent");
    let signal = rec.signal();
    let probe = ticket.as_ref().is_some_and(Ticket::is_probe);
    if let Some(t) = ticket {
        ctx.flow.finish(t, signal).await;
    }
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
    // A throttled call is the provider's pacing, not a failure, and a failed probe is the
    // pause's business: neither is counted against the job's budget, up to a bound.
    let spare = (signal == Signal::Throttled || (probe && signal == Signal::Failed))
        && claimed.spared_attempts < ctx.config.worker.retry.max_uncounted;
    let decision = decide(
        &rec.outcome,
        claimed.budget_attempt(),
        age,
        claimed.idempotent,
        claimed.history,
        spare,
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
    // For the end-to-end histogram: the item takes the claim.
    let (kind, published) = (
        req.provider,
        crate::metrics::published_at(req, claimed.created_at),
    );
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
        (Recorded::Applied(to), Decision::Retry { after, .. }) => {
            crate::metrics::transition(State::InFlight.as_str(), to.as_str());
            metrics::counter!(crate::metrics::RETRIES, "provider" => provider).increment(1);
            let in_process = Duration::from_millis(ctx.config.worker.retry.in_process_max_ms);
            Ok((*after <= in_process).then_some(*after))
        }
        (Recorded::Applied(to), decision) => {
            crate::metrics::transition(State::InFlight.as_str(), to.as_str());
            crate::metrics::ended(kind, published, *to);
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
