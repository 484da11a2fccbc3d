//! The flow control's background tasks: each limited lane's grant loop, and the poll of the
//! pauses and slow-downs other replicas decided.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::job::ProviderKind;
use shared::store::budgets;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Flow, Lane, Waiter};

impl Flow {
    /// A limited lane's task: hands the waiting jobs their slots from the shared budget.
    pub(super) async fn grant_loop(
        self: Arc<Self>,
        lane: Arc<Lane>,
        mut rx: mpsc::UnboundedReceiver<Waiter>,
        shutdown: CancellationToken,
    ) {
        let ahead = self.cfg.reserve_ahead();
        let (p, m) = (lane.provider.as_str(), lane.merchant.as_str());
        let mut queue: VecDeque<Waiter> = VecDeque::new();
        let mut failures = 0u32;
        loop {
            if queue.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    w = rx.recv() => match w {
                        Some(w) => queue.push_back(w),
                        None => return,
                    },
                }
            }
            while let Ok(w) = rx.try_recv() {
                queue.push_back(w);
            }
            queue.retain(|w| !w.is_closed());
            if queue.is_empty() {
                continue;
            }
            if let Some(until) = lane.paused_at(Utc::now()) {
                for w in queue.drain(..) {
                    let _ = w.send(Err(until));
                }
                continue;
            }
            let want = u32::try_from(queue.len().min(10_000)).unwrap_or(10_000);
            let grant = match budgets::take(
                &self.pool,
                p,
                m,
                want,
                budgets::Reach {
                    lead: self.cfg.slot_lead(),
                    ahead,
                    // A call leaves at most the grace after its slot (`wait_turn`).
                    slack: self.cfg.slot_grace(),
                },
                self.cfg.recover(),
            )
            .await
            {
                Ok(g) => {
                    failures = 0;
                    g
                }
                Err(e) => {
                    // Fail closed: no budget, no call. The waiters keep waiting.
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(50u64 << failures.min(5));
                    tracing::warn!(provider = p, merchant = m, error = %e, retry_in_ms = wait.as_millis() as u64, "could not take budget");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };
            let received = Instant::now();
            // Slots are on the database's clock: placed on ours relative to its `now`.
            let local = |t: DateTime<Utc>| {
                let d = t - grant.db_now;
                match d.to_std() {
                    Ok(ahead) => received + ahead,
                    Err(_) => received
                        .checked_sub((-d).to_std().unwrap_or_default())
                        .unwrap_or(received),
                }
            };
            if let Some(until) = grant.paused_until {
                lane.lock().paused_until = Some(until);
                lane.gauge_paused(true);
                for w in queue.drain(..) {
                    let _ = w.send(Err(until));
                }
                continue;
            }
            for k in 0..grant.granted {
                let Some(w) = queue.pop_front() else { break };
                // A waiter gone meanwhile leaves its slot unused: under-spent, never exceeded.
                let _ = w.send(Ok(local(grant.slot(k))));
            }
            if !queue.is_empty() {
                // The next slots fall within reach `ahead` before the next one is due; asking
                // sooner would only get nothing (or one slot per round trip).
                let next = local(grant.next_at)
                    .checked_sub(ahead)
                    .unwrap_or(received)
                    .max(received + ahead / 4);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
            }
        }
    }

    /// Reads the pauses and slow-downs other replicas decided, and publishes them as metrics.
    pub(super) async fn poll_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.poll()) => {}
            }
            let read_at = Instant::now();
            let states = match budgets::states(&self.pool, self.cfg.recover()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read merchant budgets");
                    continue;
                }
            };
            let mut seen = HashSet::new();
            for s in states {
                let Ok(provider) = s.provider.parse::<ProviderKind>() else {
                    continue;
                };
                let Some(lane) = self.lane(provider, &s.merchant) else {
                    continue;
                };
                seen.insert((provider, s.merchant));
                lane.sync(s.paused_until, read_at);
                if lane.limit.is_some() {
                    metrics::gauge!(crate::metrics::BUDGET_RATE, &lane.labels())
                        .set(f64::from(s.permille));
                }
            }
            for lane in self.all() {
                if !seen.contains(&(lane.provider, lane.merchant.clone())) {
                    lane.sync(None, read_at);
                }
            }
        }
    }
}
