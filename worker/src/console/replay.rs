//! Bulk replays started from the console: previewed first, then run in the background at a
//! bounded rate, with progress to watch and an abort button.
//!
//! Each job goes through the same per-job replay as `refundctl dlq replay` (one transaction:
//! re-check, transition, audit under the signed-in operator; publish after the commit), so a
//! job that changed since the preview is refused then, and an abort stops between two jobs,
//! never inside one. Runs are kept in this process, newest last.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use shared::store::operator::{self, DeadFilter};
use tokio_util::sync::CancellationToken;

use crate::ctl::dlq::{self, ReplayOutcome};
use crate::ctl::{Ctl, OperatorArgs};

/// Which dead jobs a bulk replay takes: a dead-letter group's fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Selection {
    #[serde(default)]
    pub cause: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    /// The last provider code; `-` selects jobs without one.
    #[serde(default)]
    pub code: Option<String>,
}

impl Selection {
    /// Empty form fields mean "any".
    pub fn normalized(self) -> Self {
        let keep = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        Self {
            cause: keep(self.cause),
            provider: keep(self.provider),
            code: keep(self.code),
        }
    }

    /// What a person reads for it.
    pub fn describe(&self) -> String {
        let part = |k: &str, v: &Option<String>| v.as_ref().map(|v| format!("{k} {v}"));
        let parts: Vec<String> = [
            part("cause", &self.cause),
            part("provider", &self.provider),
            part("code", &self.code),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            "every dead job".into()
        } else {
            parts.join(", ")
        }
    }

    /// The dead jobs it selects now, longest dead first.
    pub async fn refund_nos(&self, ctl: &Ctl) -> anyhow::Result<Vec<String>> {
        let no_code = self.code.as_deref() == Some("-");
        let filter = DeadFilter {
            cause: self.cause.clone(),
            provider: self.provider.clone(),
            code: self.code.clone().filter(|_| !no_code),
            ..DeadFilter::default()
        };
        let jobs: Vec<_> = operator::dead_jobs(&ctl.pool, filter).try_collect().await?;
        Ok(jobs
            .into_iter()
            .filter(|j| !no_code || j.code.is_none())
            .map(|j| j.refund_no)
            .collect())
    }
}

/// What a replay would do to the selection now.
#[derive(Debug, Clone, Default)]
pub struct Preview {
    pub selected: Vec<String>,
    pub would_replay: usize,
    /// (refund_no, reason).
    pub refusals: Vec<(String, String)>,
}

/// Dry-runs every selected job (read-only, audits nothing).
pub async fn preview(ctl: &Ctl, selection: &Selection) -> anyhow::Result<Preview> {
    let selected = selection.refund_nos(ctl).await?;
    let mut p = Preview::default();
    for no in &selected {
        match dlq::dry_run_one(ctl, no).await? {
            ReplayOutcome::WouldRefuse { reason, .. } => p.refusals.push((no.clone(), reason)),
            _ => p.would_replay += 1,
        }
    }
    p.selected = selected;
    Ok(p)
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Finished,
    Aborted,
    /// Stopped by an error (shown in `error`).
    Failed,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Finished => "finished",
            RunState::Aborted => "aborted",
            RunState::Failed => "failed",
        }
    }
}

/// One bulk replay and how far it got.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: u64,
    pub operator: String,
    pub note: String,
    pub selection: Selection,
    pub rate: f64,
    pub total: usize,
    pub done: usize,
    pub replayed: usize,
    /// Replayed, but the publish failed: the sweeper re-enqueues them.
    pub not_published: usize,
    /// (refund_no, reason).
    pub refusals: Vec<(String, String)>,
    pub state: RunState,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

struct Entry {
    run: Arc<Mutex<Run>>,
    abort: CancellationToken,
}

/// The runs of this process.
#[derive(Default)]
pub struct Runs {
    by_id: Mutex<BTreeMap<u64, Entry>>,
}

/// A copy of a run, read under its lock.
fn snapshot(run: &Mutex<Run>) -> Run {
    run.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn update(run: &Mutex<Run>, f: impl FnOnce(&mut Run)) {
    f(&mut run.lock().unwrap_or_else(|p| p.into_inner()));
}

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every run, newest first.
    pub fn list(&self) -> Vec<Run> {
        self.lock()
            .values()
            .rev()
            .map(|e| snapshot(&e.run))
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<Run> {
        self.lock().get(&id).map(|e| snapshot(&e.run))
    }

    /// Asks a running run to stop before its next job; false when there is no such run.
    pub fn abort(&self, id: u64) -> bool {
        match self.lock().get(&id) {
            Some(e) => {
                e.abort.cancel();
                true
            }
            None => false,
        }
    }

    /// Starts replaying `selected` as `who`, at most `rate` per second, in the background.
    pub fn start(
        &self,
        ctl: Arc<Ctl>,
        who: OperatorArgs,
        selection: Selection,
        selected: Vec<String>,
        rate: f64,
    ) -> u64 {
        let abort = CancellationToken::new();
        let run = {
            let mut map = self.lock();
            let id = map.keys().next_back().map_or(1, |k| k + 1);
            let run = Arc::new(Mutex::new(Run {
                id,
                operator: who.operator.clone(),
                note: who.note.clone(),
                selection,
                rate,
                total: selected.len(),
                done: 0,
                replayed: 0,
                not_published: 0,
                refusals: Vec::new(),
                state: RunState::Running,
                error: None,
                started_at: Utc::now(),
                ended_at: None,
            }));
            map.insert(
                id,
                Entry {
                    run: run.clone(),
                    abort: abort.clone(),
                },
            );
            run
        };
        let id = snapshot(&run).id;
        tracing::info!(run = id, operator = %who.operator, jobs = selected.len(), rate, "console bulk replay started");
        tokio::spawn(async move {
            let ended = work(&ctl, &who, &selected, rate, &run, &abort).await;
            update(&run, |r| {
                r.ended_at = Some(Utc::now());
                r.state = match ended {
                    Ok(true) => RunState::Aborted,
                    Ok(false) => RunState::Finished,
                    Err(e) => {
                        r.error = Some(format!("{e:#}"));
                        RunState::Failed
                    }
                };
            });
            let r = snapshot(&run);
            tracing::info!(
                run = id,
                state = r.state.as_str(),
                replayed = r.replayed,
                refused = r.refusals.len(),
                "console bulk replay ended"
            );
        });
        id
    }
}

/// Replays one job after another; `Ok(true)` when aborted.
async fn work(
    ctl: &Ctl,
    who: &OperatorArgs,
    selected: &[String],
    rate: f64,
    run: &Mutex<Run>,
    abort: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publisher = None;
    let mut aborted = false;
    for no in selected {
        tokio::select! {
            biased;
            () = abort.cancelled() => { aborted = true; break; }
            _ = pace.tick() => {}
        }
        let outcome = dlq::replay_one(ctl, who, no, &mut publisher).await?;
        update(run, |r| {
            r.done += 1;
            match outcome {
                ReplayOutcome::Replayed { .. } => r.replayed += 1,
                ReplayOutcome::ReplayedNotPublished { .. } => {
                    r.replayed += 1;
                    r.not_published += 1;
                }
                ReplayOutcome::Refused { reason, .. }
                | ReplayOutcome::WouldRefuse { reason, .. } => {
                    r.refusals.push((no.clone(), reason))
                }
                ReplayOutcome::WouldReplay { .. } => {}
            }
        });
    }
    if let Some(p) = publisher {
        p.close().await;
    }
    Ok(aborted)
}
