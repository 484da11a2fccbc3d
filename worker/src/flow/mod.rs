//! Flow control: every provider call waits for its merchant's turn (DESIGN §9 `[[limits]]`, §11).
//!
//! Each configured merchant has a [`Lane`]. Before a job is claimed (and before a status query
//! is sent) it is [`Flow::admit`]ted by its lane:
//! - a **limited** lane (`[[limits]]`) hands out call slots from the merchant's budget in
//!   PostgreSQL, shared by every replica ([`shared::store::budgets`]): one task per lane asks
//!   for as many slots as jobs are waiting, one round trip per batch, reserving at most
//!   `flow.reserve_ahead_ms` ahead and none sooner than `flow.slot_lead_ms` (the time to
//!   claim). A job holds neither an executor slot nor a claim while it waits; once claimed it
//!   sends at its slot's time ([`Flow::wait_turn`]) and never late (a slot missed by more than
//!   `flow.slot_grace_ms` is given up and the job asks again), so the provider sees at most
//!   `rate × W + burst` calls in any window W;
//! - a **paused** lane lets nothing through: its provider was failing (most of the last
//!   `flow.pause_window` calls failed in transport or with a 5xx). Jobs stay in the database as
//!   they are (`received`, `retry_wait`), their attempts unspent; one replica at a time sends a
//!   probe every `flow.probe_interval_ms`, and the first answered probe resumes the lane
//!   everywhere (the pause is in the database; other replicas read it every `flow.poll_ms`);
//! - any other lane lets a job through at once: an unlimited, healthy merchant pays nothing
//!   for flow control on its hot path.
//!
//! After the call the [`Ticket`] reports what the provider's answer says about its health
//! ([`Signal`]): failures feed the pause decision, and a throttled answer halves a limited
//! merchant's rate in the shared budget, which climbs back over `flow.recover_ms`.
//!
//! Fairness: waiting for budget happens in the lane, outside the executor's slots and the
//! consumer's prefetch. At most `flow.lane_queue` jobs of a lane ask for slots at once per
//! worker; the others queue behind them (refund numbers only, up to a bound; beyond it they stay
//! in the database for the sweeper). If the database is unreachable, a limited lane grants
//! nothing (it fails closed: never a call without budget).

mod tasks;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::config::{FlowConfig, LimitConfig};
use shared::job::ProviderKind;
use shared::provider::Signal;
use shared::store::budgets;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A lane's key: provider and merchant.
pub type LaneKey = (ProviderKind, String);

/// Every lane, and what they share.
pub struct Flow {
    pool: PgPool,
    cfg: FlowConfig,
    /// By provider, then merchant: looked up with the merchant as `&str`, no key to build on
    /// the hot path.
    lanes: HashMap<ProviderKind, HashMap<String, Arc<Lane>>>,
    ready: Mutex<Option<mpsc::UnboundedReceiver<Hold>>>,
}

/// What a lane answers a job that asks to call.
pub enum Admit {
    /// Go ahead: claim, then send at the ticket's turn.
    Go(Ticket),
    /// The merchant is paused until then: leave the job as it is.
    Paused(DateTime<Utc>),
}

/// One merchant's flow control.
pub struct Lane {
    provider: ProviderKind,
    merchant: String,
    limit: Option<LimitConfig>,
    state: Mutex<LaneState>,
    /// Where jobs of a limited lane wait for a slot: the lane's task answers each with the
    /// time of its slot, or with the pause that began meanwhile.
    waiters: Option<mpsc::UnboundedSender<Waiter>>,
    /// Where a queued job goes when it gets its task ([`Flow::take_ready`]).
    ready: mpsc::UnboundedSender<Hold>,
}

type Waiter = oneshot::Sender<Result<Instant, DateTime<Utc>>>;

#[derive(Default)]
struct LaneState {
    paused_until: Option<DateTime<Utc>>,
    /// A probe of this process is out: no other call goes until it is answered.
    probing: bool,
    /// The last calls, `true` for a failure.
    window: VecDeque<bool>,
    /// Jobs waiting in this lane, with a task or queued (so that one job waits once).
    held: HashSet<String>,
    /// How many of them have a task (at most `flow.lane_queue`).
    tasks: usize,
    /// The others, in arrival order: each gets a task when one ends.
    queued: VecDeque<String>,
    /// When this process last asked the database to slow the merchant down.
    last_slow: Option<Instant>,
    /// This process paused the merchant and the database does not hold that pause (yet, or at
    /// all when the write failed): a read of the database that shows no pause says nothing
    /// about it, and the probe at its end is this process's to send.
    local_only: bool,
    /// When this process's pause was recorded in the database: a read begun before then may
    /// not show it, so it must not undo it.
    recorded_at: Option<Instant>,
}

/// Permission to make one call, and what the call said.
pub struct Ticket {
    lane: Arc<Lane>,
    /// The slot's time on this process's clock (limited lanes).
    at: Option<Instant>,
    probe: bool,
    waited_since: Instant,
}

impl Ticket {
    /// Whether this call is the probe of a paused merchant: its failure is the pause's to
    /// count, not the job's.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A probe whose job could not be claimed (or whose call was not made) frees the probe:
        // the pause it pushed on stands, and the next probe goes at its end.
        if self.probe {
            self.lane.lock().probing = false;
        }
    }
}

/// A job waiting in a lane: removed from the lane's set when dropped.
pub struct Hold {
    lane: Arc<Lane>,
    refund_no: String,
}

impl Hold {
    /// The job held.
    pub fn refund_no(&self) -> &str {
        &self.refund_no
    }

    /// Its merchant's lane.
    pub fn lane(&self) -> &Lane {
        &self.lane
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut st = self.lane.lock();
        st.held.remove(&self.refund_no);
        // The next queued job takes this one's task.
        let next = st.queued.pop_front();
        if next.is_none() {
            st.tasks = st.tasks.saturating_sub(1);
        }
        let n = st.held.len();
        drop(st);
        self.lane.gauge_waiting(n);
        if let Some(refund_no) = next {
            let hold = Hold {
                lane: self.lane.clone(),
                refund_no,
            };
            // The receiver is gone only at shutdown: the job stays in the database.
            let _ = self.lane.ready.send(hold);
        }
    }
}

/// Queued jobs of one lane in one worker at most (refund numbers only: a few MB); beyond, the
/// jobs wait in the database for the sweeper.
const QUEUED_MAX: usize = 100_000;

impl Flow {
    /// Lanes for every configured merchant; limited lanes start their tasks (stopped by
    /// `shutdown`).
    pub fn start(
        pool: PgPool,
        cfg: FlowConfig,
        merchants: impl IntoIterator<Item = LaneKey>,
        limits: &[LimitConfig],
        shutdown: CancellationToken,
    ) -> Arc<Flow> {
        let mut lanes = HashMap::new();
        let mut tasks = Vec::new();
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        for (provider, merchant) in merchants {
            let limit = limits
                .iter()
                .find(|l| l.provider == provider && l.merchant == merchant)
                .cloned();
            let (tx, rx) = match limit {
                Some(_) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    (Some(tx), Some(rx))
                }
                None => (None, None),
            };
            let lane = Arc::new(Lane {
                provider,
                merchant: merchant.clone(),
                limit,
                state: Mutex::new(LaneState::default()),
                waiters: tx,
                ready: ready_tx.clone(),
            });
            lane.gauge_paused(false);
            if let Some(rx) = rx {
                tasks.push((lane.clone(), rx));
            }
            lanes
                .entry(provider)
                .or_insert_with(HashMap::new)
                .insert(merchant, lane);
        }
        let flow = Arc::new(Flow {
            pool,
            cfg,
            lanes,
            ready: Mutex::new(Some(ready_rx)),
        });
        for (lane, rx) in tasks {
            tokio::spawn(flow.clone().grant_loop(lane, rx, shutdown.clone()));
        }
        tokio::spawn(flow.clone().poll_loop(shutdown));
        flow
    }

    /// Writes the configured limits to the shared budgets (the last worker to start sets them).
    pub async fn configure(&self) -> Result<(), shared::store::StoreError> {
        let mut limited = Vec::new();
        let mut unlimited = Vec::new();
        for lane in self.all() {
            let key = (lane.provider.as_str().to_owned(), lane.merchant.clone());
            match &lane.limit {
                Some(l) => limited.push((key.0, key.1, l.rate_per_sec, l.burst)),
                None => unlimited.push(key),
            }
        }
        budgets::configure(&self.pool, &limited, &unlimited).await
    }

    /// The lane of a merchant; `None` for a merchant not configured here.
    pub fn lane(&self, provider: ProviderKind, merchant: &str) -> Option<Arc<Lane>> {
        self.lanes.get(&provider)?.get(merchant).cloned()
    }

    /// Every lane.
    fn all(&self) -> impl Iterator<Item = &Arc<Lane>> {
        self.lanes.values().flat_map(HashMap::values)
    }

    /// The queued jobs that got their task, for the executor to run (once: `None` after).
    pub fn take_ready(&self) -> Option<mpsc::UnboundedReceiver<Hold>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Lanes that cannot take a job now: paused, or limited with jobs queued in this process
    /// (it has more than it can run; the rest wait in the database). The sweeper leaves their
    /// jobs in the database.
    pub fn closed_lanes(&self) -> Vec<(String, String)> {
        let now = Utc::now();
        self.all()
            .filter(|l| l.paused_at(now).is_some() || l.busy())
            .map(|l| (l.provider.as_str().to_owned(), l.merchant.clone()))
            .collect()
    }

    /// How many more jobs limited lanes can give a task in this process.
    pub fn lane_room(&self) -> usize {
        self.all()
            .filter(|l| l.limit.is_some())
            .map(|l| self.cfg.lane_queue.saturating_sub(l.lock().tasks))
            .sum()
    }

    /// Whether a job of this lane must wait in it (limited, or paused) rather than go
    /// straight to an executor slot.
    pub fn waits(&self, lane: &Lane) -> bool {
        lane.limit.is_some() || lane.paused_at(Utc::now()).is_some()
    }

    /// Takes `refund_no` into its lane: `Run` with a place to wait in (a task may start),
    /// `Queued` when the lane's tasks are all taken (it starts when one ends, through
    /// [`Flow::take_ready`]), `Refused` when the lane holds it already or its queue is full
    /// (the job stays in the database for the sweeper).
    pub fn hold(&self, lane: &Arc<Lane>, refund_no: &str) -> Held {
        let mut st = lane.lock();
        if st.held.contains(refund_no) {
            return Held::Refused;
        }
        let held = if st.tasks < self.cfg.lane_queue {
            st.tasks += 1;
            Held::Run(Hold {
                lane: lane.clone(),
                refund_no: refund_no.to_owned(),
            })
        } else if st.queued.len() < QUEUED_MAX {
            st.queued.push_back(refund_no.to_owned());
            Held::Queued
        } else {
            return Held::Refused;
        };
        st.held.insert(refund_no.to_owned());
        let n = st.held.len();
        drop(st);
        lane.gauge_waiting(n);
        held
    }

    /// Waits for the lane's permission to make one call.
    pub async fn admit(&self, lane: &Arc<Lane>) -> Admit {
        let since = Instant::now();
        let now = Utc::now();
        if let Some(until) = lane.paused_at(now) {
            return Admit::Paused(until);
        }
        if lane.pause_ran_out(now) {
            match self.try_probe(lane).await {
                Probe::Won => {
                    return Admit::Go(Ticket {
                        lane: lane.clone(),
                        at: None,
                        probe: true,
                        waited_since: since,
                    });
                }
                Probe::Paused(until) => return Admit::Paused(until),
                Probe::Resumed => {}
            }
        }
        let Some(waiters) = &lane.waiters else {
            return Admit::Go(Ticket {
                lane: lane.clone(),
                at: None,
                probe: false,
                waited_since: since,
            });
        };
        let (tx, rx) = oneshot::channel();
        if waiters.send(tx).is_err() {
            // The lane's task stopped: shutting down.
            return Admit::Paused(Utc::now() + self.cfg.probe_interval());
        }
        match rx.await {
            Ok(Ok(at)) => {
                shared::failpoint::hit("budget_taken");
                Admit::Go(Ticket {
                    lane: lane.clone(),
                    at: Some(at),
                    probe: false,
                    waited_since: since,
                })
            }
            Ok(Err(until)) => Admit::Paused(until),
            Err(_) => Admit::Paused(Utc::now() + self.cfg.probe_interval()),
        }
    }

    /// Claims the probe of a lane whose pause ran out, in the database (one replica wins).
    async fn try_probe(&self, lane: &Arc<Lane>) -> Probe {
        {
            let mut st = lane.lock();
            if st.probing {
                return Probe::Paused(Utc::now() + self.cfg.probe_interval());
            }
            st.probing = true;
        }
        let (p, m) = (lane.provider.as_str(), lane.merchant.as_str());
        let won = budgets::probe(&self.pool, p, m, self.cfg.probe_interval()).await;
        let mut st = lane.lock();
        match won {
            Ok((true, until)) => {
                st.paused_until = until;
                tracing::info!(
                    provider = p,
                    merchant = m,
                    "merchant paused: sending a probe"
                );
                Probe::Won
            }
            Ok((false, Some(until))) => {
                st.probing = false;
                st.paused_until = Some(until);
                Probe::Paused(until)
            }
            Ok((false, None)) if st.local_only => {
                // The database does not hold this process's pause (its write is on its way,
                // or failed): nobody else can have probed it, so this process probes.
                st.paused_until = Some(Utc::now() + self.cfg.probe_interval());
                tracing::info!(
                    provider = p,
                    merchant = m,
                    "merchant paused (here only so far): sending a probe"
                );
                Probe::Won
            }
            Ok((false, None)) => {
                st.probing = false;
                st.paused_until = None;
                st.window.clear();
                drop(st);
                lane.gauge_paused(false);
                Probe::Resumed
            }
            Err(e) => {
                st.probing = false;
                let until = Utc::now() + self.cfg.probe_interval();
                st.paused_until = Some(until);
                tracing::warn!(provider = p, merchant = m, error = %e, "could not claim a probe; staying paused");
                Probe::Paused(until)
            }
        }
    }

    /// Whether the ticket's slot has passed by more than the grace: a call now could bunch with
    /// the slots after it, so the job must ask again (before its claim: no attempt spent).
    pub fn missed(&self, ticket: &Ticket) -> bool {
        ticket
            .at
            .is_some_and(|at| Instant::now() > at + self.cfg.slot_grace())
    }

    /// Waits until the ticket's slot; `false` when the slot was missed: the call must not be
    /// sent.
    pub async fn wait_turn(&self, ticket: &Ticket) -> bool {
        let Some(at) = ticket.at else {
            return true;
        };
        if self.missed(ticket) {
            return false;
        }
        tokio::time::sleep_until(at).await;
        // A busy machine can wake this task late: a call sent now would bunch with later
        // slots' calls, past the limit.
        if self.missed(ticket) {
            return false;
        }
        metrics::histogram!(crate::metrics::BUDGET_WAIT, &ticket.lane.labels())
            .record(ticket.waited_since.elapsed().as_secs_f64());
        true
    }

    /// Reports what the ticket's call said about the provider.
    pub async fn finish(&self, ticket: Ticket, signal: Signal) {
        let lane = &ticket.lane;
        let (p, m) = (lane.provider.as_str(), lane.merchant.as_str());
        if ticket.probe {
            if signal == Signal::Failed {
                lane.lock().probing = false;
                tracing::info!(
                    provider = p,
                    merchant = m,
                    "probe failed; merchant stays paused"
                );
                return;
            }
            match budgets::resume(&self.pool, p, m).await {
                Ok(_) => tracing::warn!(
                    provider = p,
                    merchant = m,
                    "probe answered: merchant resumed"
                ),
                Err(e) => {
                    tracing::warn!(provider = p, merchant = m, error = %e, "probe answered but the resume could not be recorded; other replicas resume at their next probe")
                }
            }
            let mut st = lane.lock();
            st.probing = false;
            st.paused_until = None;
            st.local_only = false;
            st.window.clear();
            drop(st);
            lane.gauge_paused(false);
            return;
        }
        if signal == Signal::Throttled {
            metrics::counter!(crate::metrics::THROTTLED, &lane.labels()).increment(1);
            self.slow_down(lane).await;
        }
        if let Some(until) = self.observe(lane, signal == Signal::Failed) {
            metrics::counter!(crate::metrics::PAUSES, &lane.labels()).increment(1);
            let reason = format!(
                "{}% or more of the last {} calls failed",
                self.cfg.pause_failure_percent, self.cfg.pause_window
            );
            let recorded =
                budgets::pause(&self.pool, p, m, self.cfg.probe_interval(), &reason).await;
            let mut st = lane.lock();
            let shared_until = match recorded {
                Ok(t) => {
                    st.local_only = false;
                    st.recorded_at = Some(Instant::now());
                    t
                }
                Err(e) => {
                    tracing::warn!(provider = p, merchant = m, error = %e, "could not record the pause; pausing this worker only");
                    until
                }
            };
            // A probe of this process may have gone out while the write was on its way: the
            // pause it pushed on stands.
            st.paused_until = st.paused_until.max(Some(shared_until));
            drop(st);
            tracing::warn!(
                provider = p,
                merchant = m,
                probe_at = %shared_until,
                "provider failing: merchant paused (jobs wait, attempts not spent)"
            );
        }
    }

    /// Adds a call to the lane's window; when the window now says the provider is down, the
    /// pause's end (the first probe).
    fn observe(&self, lane: &Lane, failed: bool) -> Option<DateTime<Utc>> {
        let mut st = lane.lock();
        if st.paused_until.is_some() {
            return None;
        }
        st.window.push_back(failed);
        while st.window.len() > self.cfg.pause_window {
            st.window.pop_front();
        }
        let n = st.window.len();
        let failures = st.window.iter().filter(|f| **f).count();
        if n >= self.cfg.pause_min_calls
            && failures * 100 >= usize::from(self.cfg.pause_failure_percent) * n
        {
            st.window.clear();
            let until = Utc::now() + self.cfg.probe_interval();
            st.paused_until = Some(until);
            st.local_only = true;
            drop(st);
            lane.gauge_paused(true);
            return Some(until);
        }
        None
    }

    /// Halves a limited merchant's shared rate (this process asks at most every half second:
    /// the database debounces across replicas).
    async fn slow_down(&self, lane: &Lane) {
        if lane.limit.is_none() {
            return;
        }
        {
            let mut st = lane.lock();
            if st
                .last_slow
                .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
            {
                return;
            }
            st.last_slow = Some(Instant::now());
        }
        let (p, m) = (lane.provider.as_str(), lane.merchant.as_str());
        match budgets::slow_down(
            &self.pool,
            p,
            m,
            self.cfg.min_rate_permille,
            self.cfg.recover(),
            Duration::from_secs(1),
        )
        .await
        {
            Ok(Some(permille)) => {
                metrics::gauge!(crate::metrics::BUDGET_RATE, &lane.labels())
                    .set(f64::from(permille));
                tracing::warn!(
                    provider = p,
                    merchant = m,
                    rate_permille = permille,
                    "provider throttled us: merchant's rate cut"
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(provider = p, merchant = m, error = %e, "could not slow the merchant down")
            }
        }
    }
}

/// What [`Flow::hold`] did with a job.
pub enum Held {
    Run(Hold),
    Queued,
    Refused,
}

enum Probe {
    Won,
    Paused(DateTime<Utc>),
    Resumed,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("provider", self.provider.as_str().to_owned()),
            ("merchant", self.merchant.clone()),
        ]
    }

    fn gauge_paused(&self, paused: bool) {
        metrics::gauge!(crate::metrics::MERCHANT_PAUSED, &self.labels()).set(if paused {
            1.0
        } else {
            0.0
        });
    }

    fn gauge_waiting(&self, n: usize) {
        metrics::gauge!(crate::metrics::BUDGET_WAITING, &self.labels()).set(n as f64);
    }

    /// Until when the lane is paused, if it is at `now` (a pause that ran out while a probe of
    /// this process is out still holds).
    fn paused_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let st = self.lock();
        match st.paused_until {
            Some(t) if t > now => Some(t),
            Some(_) if st.probing => Some(now + chrono::Duration::seconds(1)),
            _ => None,
        }
    }

    /// Whether the lane is paused and its pause ran out: time for a probe.
    fn pause_ran_out(&self, now: DateTime<Utc>) -> bool {
        self.lock().paused_until.is_some_and(|t| t <= now)
    }

    /// A limited lane with jobs queued behind its tasks.
    fn busy(&self) -> bool {
        self.limit.is_some() && !self.lock().queued.is_empty()
    }

    /// Takes the pause the database held in a read begun at `read_at`.
    fn sync(&self, paused_until: Option<DateTime<Utc>>, read_at: Instant) {
        let mut st = self.lock();
        if st.probing {
            return;
        }
        if paused_until.is_none() && (st.local_only || st.recorded_at.is_some_and(|t| t > read_at))
        {
            // The database does not hold this process's pause yet, or the read began before
            // it was recorded: it says nothing about it.
            return;
        }
        let was = st.paused_until.is_some();
        st.paused_until = paused_until;
        st.local_only = false;
        if was && paused_until.is_none() {
            st.window.clear();
        }
        drop(st);
        self.gauge_paused(paused_until.is_some());
    }

    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    pub fn merchant(&self) -> &str {
        &self.merchant
    }
}
