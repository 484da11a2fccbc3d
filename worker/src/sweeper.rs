//! The sweeper: nothing sits non-final past its deadline without moving on or raising an alert.
//!
//! Every `worker.sweep_interval_ms` it takes back expired leases (to a retry at an idempotent
//! merchant, to `dead`/`outcome_unknown` elsewhere), runs due retries and orphaned `received`
//! jobs in free executor slots, and publishes the oldest open job's age, warning past
//! `worker.stuck_after_ms`. Any number of workers may sweep at once: every write is a
//! conditional transition, so two sweepers never both take the same job.
//!
//! A round looks at the jobs created within `worker.sweep_recent_ms`, by index, so that its
//! cost follows the recent load rather than the table's whole history; at most every
//! `worker.full_sweep_interval_ms` (and first of all) a round reads every job, for the few
//! that stay open longer (long retry schedules, replays of old jobs), and enrolls ShengPay jobs
//! dead with an unknown outcome for a status query ([`crate::status_sync`]). Accepted jobs are
//! not the sweeper's: the query schedule is their clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared::store::sweep::{self, Scope};

use crate::app::Ctx;

/// Sweeps until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let every = Duration::from_millis(ctx.config.worker.sweep_interval_ms);
    let mut sweeper = Sweeper::default();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // A round that found more due jobs than it could start goes again as soon as some
        // have ended (a backlog after a pause drains at the executor's pace, not a round's).
        loop {
            match sweeper.sweep_once(&ctx).await {
                Ok(true) if !ctx.shutdown.is_cancelled() => {
                    tokio::time::sleep(MORE_DUE_PAUSE).await;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; trying again next round");
                    break;
                }
            }
        }
    }
}

/// Between two rounds while due jobs are left over.
const MORE_DUE_PAUSE: Duration = Duration::from_millis(10);

/// What a sweeper remembers between rounds.
#[derive(Debug, Default)]
pub struct Sweeper {
    /// When the last full round finished.
    last_full: Option<Instant>,
    /// The oldest open job the last full round found, when it was older than a round's window:
    /// bounded rounds cannot see it, so the age they publish counts it until the next full
    /// round.
    old_open: Option<DateTime<Utc>>,
}

impl Sweeper {
    /// One sweep round: a full one when due, else the recent jobs only. Whether it left due
    /// jobs it had no room for.
    pub async fn sweep_once(&mut self, ctx: &Arc<Ctx>) -> Result<bool, shared::store::StoreError> {
        let w = &ctx.config.worker;
        let full_every = Duration::from_millis(w.full_sweep_interval_ms);
        let full = self.last_full.is_none_or(|t| t.elapsed() >= full_every);
        let window_start = Utc::now()
            - chrono::Duration::milliseconds(i64::try_from(w.sweep_recent_ms).unwrap_or(i64::MAX));
        let scope = if full {
            Scope::All
        } else {
            Scope::CreatedSince(window_start)
        };
        let (oldest, more) = sweep_scope(ctx, scope).await?;
        if full {
            // Jobs that workers of an earlier release created without their merchant's
            // idempotence (a rolling upgrade): found by a partial index, usually none.
            let filled =
                shared::store::jobs::backfill_idempotent(&ctx.pool, &ctx.registry.idempotence())
                    .await?;
            if filled > 0 {
                tracing::info!(jobs = filled, "recorded merchant idempotence on older jobs");
            }
            // ShengPay jobs dead with an unknown outcome wait for a status query: the provider
            // can say whether it paid (a sequential read, so with the full round only).
            let enrolled = shared::store::queries::enroll(&ctx.pool, &["shengpay"]).await?;
            if enrolled > 0 {
                tracing::info!(jobs = enrolled, "jobs enrolled for a status query");
            }
            let (waiting, since) = shared::store::queries::backlog(&ctx.pool).await?;
            metrics::gauge!(crate::metrics::AWAITING_PROVIDER).set(waiting as f64);
            let longest_wait = since.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
            metrics::gauge!(crate::metrics::OLDEST_PROVIDER_WAIT).set(longest_wait);
            // What the database holds, not what this pod saw: these go down when an operator
            // replays, resolves or discards, where a per-pod counter never would.
            let census = shared::store::operator::job_census(&ctx.pool).await?;
            for state in shared::state::State::ALL {
                let n = census.by_state.get(&state).copied().unwrap_or(0);
                metrics::gauge!(crate::metrics::JOBS, "state" => state.as_str()).set(n as f64);
            }
            for cause in shared::state::Cause::ALL {
                let n = census
                    .dead_by_cause
                    .get(cause.as_str())
                    .copied()
                    .unwrap_or(0);
                metrics::gauge!(crate::metrics::DEAD_JOBS, "cause" => cause.as_str()).set(n as f64);
            }
            let (poison, _) = shared::store::operator::poison_totals(&ctx.pool).await?;
            let dead: i64 = census.dead_by_cause.values().sum();
            metrics::gauge!(crate::metrics::DLQ_DEPTH).set((dead + poison) as f64);
            if let Some(since) = since {
                tracing::debug!(waiting, oldest_wait_began = %since, "jobs waiting for the provider's end");
            }
            self.last_full = Some(Instant::now());
            self.old_open = oldest.filter(|t| *t < window_start);
        }
        let oldest = match (oldest, self.old_open) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let age = oldest.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
        metrics::gauge!(crate::metrics::OLDEST_OPEN_AGE).set(age);
        if age * 1000.0 > w.stuck_after_ms as f64 {
            tracing::warn!(
                oldest_open_age_s = age,
                "a job has been open longer than worker.stuck_after_ms"
            );
        }
        Ok(more)
    }
}

/// Sweeps the jobs in `scope`; when the oldest open one among them was created, and whether
/// due jobs were left for want of room.
async fn sweep_scope(
    ctx: &Arc<Ctx>,
    scope: Scope,
) -> Result<(Option<DateTime<Utc>>, bool), shared::store::StoreError> {
    let store = &ctx.pool;
    for e in sweep::expired_leases(store, scope, 500).await? {
        if let Some(to) = shared::store::jobs::expire_lease(
            store,
            &e.refund_no,
            e.attempt,
            e.idempotent,
            &ctx.actor,
            ctx.tz,
        )
        .await?
        {
            crate::metrics::transition("in_flight", to.as_str());
            tracing::warn!(refund_no = %e.refund_no, attempt = e.attempt, to = %to, "lease expired");
            if to == shared::state::State::Dead {
                metrics::counter!(crate::metrics::DEAD_LETTERS, "cause" => "outcome_unknown")
                    .increment(1);
            }
        }
    }
    let free = ctx.slots.available_permits();
    let room = ctx.flow.lane_room();
    let mut more = false;
    if free + room > 0 && !ctx.shutdown.is_cancelled() {
        let orphan_after = Duration::from_millis(ctx.config.worker.orphan_after_ms);
        // Paused merchants' jobs stay as they are (their attempts unspent), and so do those of
        // limited merchants whose lane is full here.
        let skip = ctx.flow.closed_lanes();
        let limit = i64::try_from(free + room).unwrap_or(i64::MAX);
        let due = sweep::due(store, scope, orphan_after, limit, &skip).await?;
        more = i64::try_from(due.len()).unwrap_or(i64::MAX) >= limit;
        for d in due {
            let job = crate::executor::JobRef {
                refund_no: d.refund_no,
                provider: d.provider,
                merchant: d.merchant,
            };
            let waits = ctx
                .flow
                .lane(job.provider, &job.merchant)
                .is_some_and(|l| ctx.flow.waits(&l));
            if waits {
                crate::executor::offer(ctx, job);
                continue;
            }
            let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
                more = true;
                continue;
            };
            crate::executor::spawn(ctx, job, Some(permit));
        }
    }
    Ok((sweep::oldest_open(store, scope).await?, more))
}
