//! `refund-reconciler schedule`: reconciles the previous business day on the cron expression
//! `reconciler.schedule` (seconds first, as the `cron` crate reads it; default `0 30 2 * * *`),
//! evaluated in the configured time zone.
//!
//! Each firing at local time T runs the date before T's date. With `[reconciler.statements]`
//! configured it first gathers that day's statements ([`crate::fetch`]), waiting for those not
//! there yet: up to `reconciler.statement_wait_attempts` looks,
//! `reconciler.statement_wait_interval_secs` apart, each logged; then it reconciles against
//! them, a statement still missing being `statement_missing` (the day is not balanced, logged
//! at `warn`). Without statements configured it compares against the provider results recorded
//! per attempt, which is not an independent comparison (finance reruns the day with the
//! provider's statement, which supersedes it). Each run and its outcome is logged (JSON lines):
//! `info` when balanced, `warn` with the counts when there are discrepancies, `error` when the
//! run could not be done; the loop carries on either way. A firing missed while the process was
//! down (or while it waited for statements) is not caught up. SIGTERM or Ctrl-C stops the
//! loop, abandoning a wait or a run in progress (its transaction rolls back; nothing
//! half-stored). In Kubernetes the CronJob runs `refund-reconciler run --date yesterday --wait`
//! instead of this loop.

use std::future::Future;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use cron::Schedule;
use shared::config::Config;
use sqlx::PgPool;

use crate::progress::Progress;
use crate::run::{RunRequest, Status};

/// The next firing strictly after `after`, in `tz`.
pub fn next_firing(schedule: &Schedule, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Tz>> {
    schedule.after(&after.with_timezone(&tz)).next()
}

/// The business date a firing reconciles: the day before the firing's local date.
pub fn date_for(firing: &DateTime<Tz>) -> NaiveDate {
    let today = firing.date_naive();
    today.pred_opt().unwrap_or(today)
}

/// Runs the schedule until `shutdown` completes.
pub async fn run_schedule(
    config: Config,
    pool: PgPool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let schedule: Schedule = config.reconciler.schedule.parse().map_err(|e| {
        anyhow::anyhow!(
            "configuration key `reconciler.schedule`: {:?} is not a cron expression: {e}",
            config.reconciler.schedule
        )
    })?;
    let tz = config.tz()?;
    tokio::pin!(shutdown);
    tracing::info!(
        schedule = %config.reconciler.schedule, timezone = %tz.name(),
        grace_minutes = config.reconciler.grace_minutes, "reconciliation schedule started"
    );
    loop {
        let now = Utc::now();
        let Some(firing) = next_firing(&schedule, tz, now) else {
            tracing::warn!("the schedule has no further firings; stopping");
            return Ok(());
        };
        let date = date_for(&firing);
        tracing::info!(next_run_at = %firing.to_rfc3339(), date = %date, "next reconciliation");
        let wait = (firing.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => {
                tracing::info!("reconciliation schedule stopped");
                return Ok(());
            }
        }
        let started = std::time::Instant::now();
        tracing::info!(date = %date, "reconciliation started");
        let progress = Progress::hidden();
        let attempt = async {
            let mut request = RunRequest::new(date);
            // Kept until the run is stored: it owns the downloaded statements.
            let _fetcher = crate::fetch::prepare(&config, &mut request, true)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            let outcome = crate::run::run(&pool, &config, &request, &progress).await?;
            if !request.missing.is_empty() {
                tracing::warn!(
                    date = %date, missing = request.missing.len(),
                    "configured statements still not there: the day is not balanced"
                );
            }
            Ok::<_, anyhow::Error>(outcome)
        };
        let result = tokio::select! {
            r = attempt => r,
            () = &mut shutdown => {
                tracing::warn!(
                    date = %date,
                    "stopped while waiting for statements or during a run; the run was not stored"
                );
                return Ok(());
            }
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(o) if o.status == Status::Balanced => tracing::info!(
                date = %date, run_id = o.run_id, status = o.status.as_str(),
                discrepancies = o.discrepancies, pending = o.pending, elapsed_ms,
                "reconciliation finished"
            ),
            Ok(o) => tracing::warn!(
                date = %date, run_id = o.run_id, status = o.status.as_str(),
                discrepancies = o.discrepancies, pending = o.pending, elapsed_ms,
                "reconciliation finished"
            ),
            Err(e) => tracing::error!(
                date = %date, status = "failed", error = %e, elapsed_ms,
                "reconciliation failed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_runs_the_previous_shanghai_day_at_02_30() {
        let s: Schedule = "0 30 2 * * *".parse().unwrap();
        let tz = chrono_tz::Asia::Shanghai;
        // 2026-11-21 18:00 UTC is 2026-11-22 02:00 in Shanghai.
        let now = DateTime::parse_from_rfc3339("2026-11-21T18:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let f = next_firing(&s, tz, now).unwrap();
        assert_eq!(f.to_rfc3339(), "2026-11-22T02:30:00+08:00");
        assert_eq!(date_for(&f), NaiveDate::from_ymd_opt(2026, 11, 21).unwrap());
        let after = next_firing(&s, tz, f.with_timezone(&Utc)).unwrap();
        assert_eq!(after.to_rfc3339(), "2026-11-23T02:30:00+08:00");
    }
}
