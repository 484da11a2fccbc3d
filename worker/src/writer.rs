//! Group commit for the executor: the claims and recorded outcomes of many jobs, one statement
//! each.
//!
//! An executor task hands its claim, or its outcome, to the writer and waits for the answer. A
//! writer task takes whatever has queued up (up to `worker.write_batch`), runs the claims as one
//! statement and the outcomes as another ([`jobs::claim`], [`jobs::record_outcomes`]: each a
//! transaction of its own, so one commit per batch), and answers each task. Nothing waits for a
//! batch to fill: under light load a batch is a single job and adds no latency; under load the
//! queue fills while the previous statement runs, and a commit, a round trip and a plan are
//! shared by the whole batch. `worker.writers` tasks run statements at once.
//!
//! Every write stays what it was alone: a claim is conditional on the job's state, an outcome is
//! fenced on its attempt, so batching changes how many jobs share a commit, never what a job may
//! do. A transient database failure of an outcome batch is retried with backoff, for each job
//! until its lease would end (past that the sweeper decides, as it would for a worker that
//! died); any other failure is retried job by job, so one bad job cannot hold back the others.
//! A failed claim is not retried here: the job stays claimable and the sweeper takes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use backon::{BackoffBuilder, ExponentialBuilder};
use shared::store::jobs::{self, Claimed, OutcomeToRecord, Recorded};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

/// Where executor tasks send their writes.
#[derive(Clone)]
pub struct Writer {
    ops: mpsc::UnboundedSender<Op>,
}

enum Op {
    Claim {
        refund_no: String,
        reply: oneshot::Sender<anyhow::Result<Option<Claimed>>>,
    },
    // Boxed: an outcome carries the whole request and response; a claim only a refund_no.
    Record(Box<Pending>),
}

struct Pending {
    item: OutcomeToRecord,
    /// Past this the job's lease may be over: stop retrying and leave it to the sweeper.
    deadline: Instant,
    reply: oneshot::Sender<anyhow::Result<Recorded>>,
}

/// What every writer task shares.
struct Shared {
    pool: PgPool,
    ops: Mutex<mpsc::UnboundedReceiver<Op>>,
    batch: usize,
    lease: Duration,
    actor: String,
    tz: chrono_tz::Tz,
}

impl Writer {
    /// Starts `writers` writer tasks; they stop when every [`Writer`] handle is dropped.
    pub fn start(
        pool: PgPool,
        writers: usize,
        batch: usize,
        lease: Duration,
        actor: String,
        tz: chrono_tz::Tz,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            pool,
            ops: Mutex::new(rx),
            batch: batch.max(1),
            lease,
            actor,
            tz,
        });
        for _ in 0..writers.max(1) {
            tokio::spawn(write_loop(shared.clone()));
        }
        Self { ops: tx }
    }

    /// Claims one job for an attempt; `None` if it is not claimable (final, dead, not yet due,
    /// or held by another worker).
    pub async fn claim(&self, refund_no: String) -> anyhow::Result<Option<Claimed>> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Claim { refund_no, reply })
            .map_err(|_| anyhow!("the writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the writer dropped a claim"))?
    }

    /// Records an outcome, retrying transient failures until `deadline`.
    pub async fn record(
        &self,
        item: OutcomeToRecord,
        deadline: Instant,
    ) -> anyhow::Result<Recorded> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Record(Box::new(Pending {
                item,
                deadline,
                reply,
            })))
            .map_err(|_| anyhow!("the writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the writer dropped an outcome"))?
    }
}

/// Takes what has queued up, writes it, answers; until the channel closes.
async fn write_loop(shared: Arc<Shared>) {
    loop {
        let mut claims = Vec::new();
        let mut records = Vec::new();
        {
            let mut ops = shared.ops.lock().await;
            let Some(first) = ops.recv().await else {
                return;
            };
            let mut take = |op| match op {
                Op::Claim { refund_no, reply } => claims.push((refund_no, reply)),
                Op::Record(p) => records.push(*p),
            };
            take(first);
            for _ in 1..shared.batch {
                match ops.try_recv() {
                    Ok(op) => take(op),
                    Err(_) => break,
                }
            }
        }
        tokio::join!(claim_batch(&shared, claims), record_batch(&shared, records));
    }
}

/// One claim statement for every queued claim.
async fn claim_batch(
    shared: &Shared,
    claims: Vec<(String, oneshot::Sender<anyhow::Result<Option<Claimed>>>)>,
) {
    if claims.is_empty() {
        return;
    }
    let mut nos: Vec<String> = claims.iter().map(|(no, _)| no.clone()).collect();
    nos.sort_unstable();
    nos.dedup();
    let claimed = timed(
        "claim",
        nos.len(),
        jobs::claim(&shared.pool, &nos, shared.lease, &shared.actor),
    )
    .await;
    match claimed {
        Ok(claimed) => {
            let mut by_no: HashMap<String, Claimed> = claimed
                .into_iter()
                .map(|c| (c.refund_no.clone(), c))
                .collect();
            // Two tasks asking for the same job: the first gets the claim, the other nothing.
            for (no, reply) in claims {
                let _ = reply.send(Ok(by_no.remove(&no)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = nos.len(), "claim failed; the sweeper will take these jobs");
            for (_, reply) in claims {
                let _ = reply.send(Err(anyhow!("claim failed: {e}")));
            }
        }
    }
}

/// One outcome statement for every queued outcome, with the retries described above.
async fn record_batch(shared: &Shared, mut batch: Vec<Pending>) {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build();
    while !batch.is_empty() {
        let recorded = {
            let items: Vec<&OutcomeToRecord> = batch.iter().map(|p| &p.item).collect();
            timed(
                "outcome",
                items.len(),
                jobs::record_outcomes(&shared.pool, &items, &shared.actor, shared.tz),
            )
            .await
        };
        match recorded {
            Ok(results) => {
                for (p, r) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(Ok(r));
                }
                return;
            }
            Err(e) if e.is_transient() => {
                let now = Instant::now();
                let (keep, late): (Vec<_>, Vec<_>) =
                    batch.into_iter().partition(|p| now < p.deadline);
                for p in late {
                    let _ = p
                        .reply
                        .send(Err(anyhow!("recording the outcome failed: {e}")));
                }
                batch = keep;
                let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(error = %e, jobs = batch.len(), retry_in_ms = wait.as_millis() as u64, "recording outcomes failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) if batch.len() > 1 => {
                tracing::warn!(error = %e, jobs = batch.len(), "recording a batch of outcomes failed; recording them one by one");
                for p in batch {
                    Box::pin(record_batch(shared, vec![p])).await;
                }
                return;
            }
            Err(e) => {
                for p in batch {
                    let _ = p
                        .reply
                        .send(Err(anyhow!("recording the outcome failed: {e}")));
                }
                return;
            }
        }
    }
}

/// Runs one writer statement for `jobs` jobs, recording the batch size and how long it took.
async fn timed<T>(kind: &'static str, jobs: usize, statement: impl Future<Output = T>) -> T {
    metrics::histogram!(crate::metrics::WRITE_BATCH, "kind" => kind).record(jobs as f64);
    let started = Instant::now();
    let out = statement.await;
    metrics::histogram!(crate::metrics::WRITE_SECONDS, "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    out
}
