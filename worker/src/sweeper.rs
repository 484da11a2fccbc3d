//! The sweeper: nothing sits non-final past its deadline without moving on or raising an alert.
//!
//! Every `worker.sweep_interval_ms` it takes back expired leases (to a retry at an idempotent
//! merchant, to `dead`/`outcome_unknown` elsewhere), runs due retries and orphaned `received`
//! jobs in free executor slots, and publishes the oldest open job's age, warning past
//! `worker.stuck_after_ms`. Any number of workers may sweep at once: every write is a
//! conditional transition, so two sweepers never both take the same job.

use std::sync::Arc;
use std::time::Duration;

use shared::job::ProviderKind;

use crate::app::Ctx;

/// Sweeps until shutdown.
pub async fn run(ctx: Arc<Ctx>) {
    let every = Duration::from_millis(ctx.config.worker.sweep_interval_ms);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sweep_once(&ctx).await {
            tracing::warn!(error = %e, "sweep failed; trying again next round");
        }
    }
}

/// One sweep round.
pub async fn sweep_once(ctx: &Arc<Ctx>) -> Result<(), shared::store::StoreError> {
    let store = &ctx.pool;
    for e in shared::store::sweep::expired_leases(store, 500).await? {
        let idempotent = e
            .provider
            .parse::<ProviderKind>()
            .ok()
            .and_then(|k| ctx.registry.get(k, &e.merchant))
            .is_some_and(|c| c.idempotent());
        if let Some(to) = shared::store::jobs::expire_lease(
            store,
            &e.refund_no,
            e.attempt,
            idempotent,
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
    if free > 0 && !ctx.shutdown.is_cancelled() {
        let orphan_after = Duration::from_millis(ctx.config.worker.orphan_after_ms);
        for refund_no in shared::store::sweep::due(store, orphan_after, free as i64).await? {
            let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
                break;
            };
            crate::executor::spawn(ctx, refund_no, permit);
        }
    }
    let age = shared::store::sweep::oldest_open_age_secs(store).await?;
    metrics::gauge!(crate::metrics::OLDEST_OPEN_AGE).set(age);
    if age * 1000.0 > ctx.config.worker.stuck_after_ms as f64 {
        tracing::warn!(
            oldest_open_age_s = age,
            "a job has been open longer than worker.stuck_after_ms"
        );
    }
    Ok(())
}
