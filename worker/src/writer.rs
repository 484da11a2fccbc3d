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
//! do. A transient database failure of an outcome batch is retried with backoff for as long as
//! it lasts, past the lease too: the attempt row is the evidence of what the provider said, and
//! fencing makes a late write safe. Any other failure is retried job by job, so one bad job
//! cannot hold back the others, and an outcome that still cannot be written as it came is
//! written escaped, for an operator. A claim whose reply was lost is found again by its
//! statement's token; a claim that failed otherwise is not retried here: the job stays
//! claimable and the sweeper takes it.

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
    /// Already rewritten by [`unrecordable`] once.
    rewritten: bool,
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

    /// Records an outcome, retrying transient failures for as long as they last.
    pub async fn record(&self, item: OutcomeToRecord) -> anyhow::Result<Recorded> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Record(Box::new(Pending {
                item,
                rewritten: false,
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

/// One claim statement for every queued claim, marked with a token of its own. If its reply
/// is lost (the statement may have committed), the rows it claimed are found again by the
/// token and answered as claimed, so no job this process took stays stranded in flight; a row
/// that cannot be read back into a job is sent to an operator, and the others go on.
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
    let token = jobs::ClaimToken::new();
    let claimed = timed(
        "claim",
        nos.len(),
        jobs::claim(&shared.pool, &nos, shared.lease, &shared.actor, token),
    )
    .await;
    let claimed = match claimed {
        Ok(c) => Ok(c),
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, jobs = nos.len(), "claim reply lost; finding what the claim took");
            recover_claims(shared, &nos, token).await
        }
        Err(e) => Err(e),
    };
    match claimed {
        Ok(claimed) => {
            for bad in &claimed.unreadable {
                give_up_unreadable(shared, bad).await;
            }
            let mut by_no: HashMap<String, Claimed> = claimed
                .claimed
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

/// Finds the jobs a claim statement marked `token` took, retrying while the database is out of
/// reach (their leases run meanwhile; an executor checks its lease before sending).
async fn recover_claims(
    shared: &Shared,
    nos: &[String],
    token: jobs::ClaimToken,
) -> Result<jobs::Claims, shared::store::StoreError> {
    let mut backoff = transient_backoff();
    loop {
        match jobs::claimed_by(&shared.pool, nos, token).await {
            Err(e) if e.is_transient() => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "finding a lost claim's jobs failed; retrying");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// A claimed row that cannot be read back into a job: never sent from it, so it goes `dead`
/// (its cause `unreadable_job`, or `outcome_unknown` when an earlier attempt may have paid).
async fn give_up_unreadable(shared: &Shared, bad: &jobs::Unreadable) {
    tracing::error!(refund_no = %bad.refund_no, error = %bad.error, "a claimed job cannot be read; sending it to an operator");
    let message = format!("the stored job cannot be read: {}", bad.error);
    let killed = jobs::kill(
        &shared.pool,
        &bad.refund_no,
        Some(bad.attempt),
        shared::state::Cause::UnreadableJob,
        &message,
        &shared.actor,
        shared.tz,
    )
    .await;
    if let Err(e) = killed {
        tracing::error!(refund_no = %bad.refund_no, error = %e, "could not record an unreadable job as dead; its lease will expire and the sweeper decides");
    }
}

/// Backoff for the writer's retries of transient database failures: 50 ms doubling to 2 s,
/// with jitter, forever.
fn transient_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// One outcome statement for every queued outcome. What the provider said is evidence, so it is
/// always recorded: a transient failure is retried for as long as it lasts (fencing makes a
/// late write safe: a job that moved on keeps the attempt row only); any other failure is
/// retried job by job, and a job whose outcome still cannot be written as it came is recorded
/// in a form that can ([`unrecordable`]), so one bad answer holds back no other.
async fn record_batch(shared: &Shared, mut batch: Vec<Pending>) {
    let mut backoff = transient_backoff();
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
                let Some(mut p) = batch.pop() else { return };
                if p.rewritten {
                    let _ = p
                        .reply
                        .send(Err(anyhow!("recording the outcome failed: {e}")));
                    return;
                }
                tracing::error!(refund_no = %p.item.claimed.refund_no, error = %e, "an outcome cannot be recorded as it came; recording it escaped, for an operator");
                p.item = unrecordable(p.item, &e.to_string());
                p.rewritten = true;
                batch.push(p);
            }
        }
    }
}

/// An outcome that could not be written as it came (for a reason other than the connection's),
/// as one that can: the answer's text escaped to ASCII with its SHA-256, kept as an
/// unrecognised answer, and the job sent to an operator as `dead`/`outcome_unknown` (the
/// provider may have paid, and nothing of what it said may be lost or trusted blindly).
fn unrecordable(mut item: OutcomeToRecord, error: &str) -> OutcomeToRecord {
    let o = &item.rec.outcome;
    let raw = o.raw().unwrap_or_default();
    let hex = shared::store::text::sha256_hex(raw.as_bytes());
    let result = format!(
        "{} answer could not be recorded as it came ({error}); its text (SHA-256 {hex}) is kept \
         escaped",
        o.class()
    );
    item.rec.outcome = shared::provider::Outcome::Unrecognised {
        result: result.escape_default().to_string(),
        raw: raw.escape_default().to_string(),
    };
    item.rec.request_redacted = item.rec.request_redacted.escape_default().to_string();
    item.decision = shared::workflow::Decision::Dead {
        cause: shared::state::Cause::OutcomeUnknown,
    };
    item
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
