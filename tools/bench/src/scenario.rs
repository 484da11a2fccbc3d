//! S1–S4: the real worker binary against the simulator, measured from the outside.
//!
//! Each scenario gets a fresh database (cloned from the migrated template) and its own
//! exchange and queue names, a `refund-sim` child with the scenario's fault rules, and runs
//! its phases, each with a fresh `refund-worker` child (so peak RSS and CPU are the phase's):
//!
//! - `max`: a burst of N requests published as fast as confirms allow; throughput is N over
//!   first publish → last job final. Latencies here are mostly queueing.
//! - `70%`: an open-loop publisher at 0.7 × the `max` rate for a fixed time; the latencies are
//!   the service's at that load.
//! - `drain`: N requests published with no worker running, then the worker is started; rate is
//!   N over worker ready → last job final.
//!
//! End-to-end latency of a refund = its final transition's `job_transitions.at`
//! (`clock_timestamp()` in PostgreSQL) − the moment the bench handed its publish to the broker
//! client; both clocks are this machine's. Database transactions per refund come from
//! `pg_stat_database.xact_commit` of the scenario database (the bench's own polling queries are
//! counted and subtracted; the worker is stopped before the second reading so its backends
//! flush their statistics).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use shared::config::Config;
use shared::job::ProviderKind;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use super::children::{self, Sim};
use super::procs::{self, CpuUse, Watch};
use super::publish::{self, Msg, now_us};
use super::stats::{self, percentile};
use super::{Env, drop_db};
use refund_sim::FaultRule;

/// What one phase does.
#[derive(Debug, Clone, Serialize)]
pub enum Phase {
    /// A burst of this many requests, published as fast as possible.
    Max(usize),
    /// An open-loop publisher at `fraction` × the scenario's `max` rate for `secs` seconds.
    Paced { fraction: f64, secs: f64 },
    /// This many requests queued with the worker stopped, then drained.
    Backlog(usize),
}

impl Phase {
    pub fn label(&self) -> String {
        match self {
            Phase::Max(_) => "max".into(),
            Phase::Paced { fraction, .. } => format!("{:.0}% load", fraction * 100.0),
            Phase::Backlog(_) => "drain".into(),
        }
    }
}

/// A scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub id: String,
    pub title: String,
    pub provider: ProviderKind,
    pub merchants: Vec<String>,
    pub rules: Vec<FaultRule>,
    /// Latency the simulator adds to every call (also in `rules`); 0 for none.
    pub provider_latency_ms: u64,
    /// Connect the worker to PostgreSQL over the Unix socket instead of TCP.
    pub unix_socket: bool,
    pub concurrency: usize,
    pub prefetch: u16,
    /// How `concurrency` was chosen.
    pub sizing: String,
    pub phases: Vec<Phase>,
}

/// CPU microseconds per refund, per process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PerRefundUs {
    pub worker: f64,
    pub postgres_this_db: f64,
    pub postgres_all: f64,
    pub rabbitmq: f64,
    pub simulator: f64,
    pub bench: f64,
    /// worker + PostgreSQL (all) + RabbitMQ: what the system under test costs, without the
    /// simulator and the bench.
    pub system: f64,
}

/// The result of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub scenario: String,
    pub phase: String,
    pub title: String,
    pub jobs: usize,
    /// Jobs that reached an end state (succeeded, failed, rejected, dead).
    pub ended: usize,
    pub states: BTreeMap<String, i64>,
    /// Provider calls recorded (`provider_attempts` rows).
    pub provider_calls: i64,
    pub offered_rate: Option<f64>,
    pub seconds: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub worker_cpu_us_per_refund: f64,
    pub worker_peak_rss_mib: f64,
    pub xacts_per_refund: f64,
    pub rollbacks: i64,
    /// Cluster-wide (every database on the server, other users included).
    pub wal_bytes_per_refund: f64,
    pub wal_syncs_per_refund: f64,
    pub per_refund_us: PerRefundUs,
    pub cpu: CpuUse,
    /// Per table, what the phase did to it (`pg_stat_user_tables` deltas; the bench's own
    /// polling of `jobs` and `outbox` included).
    pub tables: BTreeMap<String, stats::TableCounters>,
    /// Share of `jobs` updates that were HOT (no index touched), 0..=100.
    pub jobs_hot_pct: f64,
    /// Rows of `jobs` read by sequential scans per refund (the sweeper's queries: the bench
    /// polls through the primary key).
    pub jobs_seq_rows_per_refund: f64,
    pub concurrency: usize,
    pub prefetch: u16,
    pub provider_latency_ms: u64,
    pub error: Option<String>,
}

impl PhaseResult {
    /// A scenario that could not run at all.
    pub fn failed(spec: &Spec, error: String) -> Self {
        let phase = spec.phases.first().cloned().unwrap_or(Phase::Max(0));
        let mut r = Self::empty(spec, &phase, 0);
        r.error = Some(error);
        r
    }

    fn empty(spec: &Spec, phase: &Phase, jobs: usize) -> Self {
        PhaseResult {
            scenario: spec.id.clone(),
            phase: phase.label(),
            title: spec.title.clone(),
            jobs,
            ended: 0,
            states: BTreeMap::new(),
            provider_calls: 0,
            offered_rate: None,
            seconds: 0.0,
            rate: 0.0,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            max_ms: f64::NAN,
            worker_cpu_us_per_refund: f64::NAN,
            worker_peak_rss_mib: f64::NAN,
            xacts_per_refund: f64::NAN,
            rollbacks: 0,
            wal_bytes_per_refund: f64::NAN,
            wal_syncs_per_refund: f64::NAN,
            per_refund_us: PerRefundUs::default(),
            cpu: CpuUse::default(),
            tables: BTreeMap::new(),
            jobs_hot_pct: f64::NAN,
            jobs_seq_rows_per_refund: f64::NAN,
            concurrency: spec.concurrency,
            prefetch: spec.prefetch,
            provider_latency_ms: spec.provider_latency_ms,
            error: None,
        }
    }
}

pub(crate) const END_STATES: &str = "('succeeded', 'failed', 'rejected', 'dead')";

/// Polls until every job with `prefix` has ended; the number of queries it ran.
pub(crate) async fn wait_ended(
    mon: &mut PgConnection,
    label: &str,
    prefix: &str,
    n: usize,
    interval: Duration,
) -> anyhow::Result<u64> {
    // A range on the primary key (refund numbers sort by code point under C and C.UTF-8), so
    // the poll is an index scan and the sweeper's sequential scans of `jobs` can be counted
    // apart from the bench's.
    let upper = prefix_upper(prefix);
    let mut polls = 0u64;
    let started = Instant::now();
    let mut last_progress = (Instant::now(), 0i64);
    let mut last_print = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM jobs WHERE refund_no >= $1 AND refund_no < $2
                 AND state IN {END_STATES}"
        )))
        .bind(prefix)
        .bind(&upper)
        .fetch_one(&mut *mon)
        .await?;
        polls += 1;
        if done as usize >= n {
            return Ok(polls);
        }
        if done > last_progress.1 {
            last_progress = (Instant::now(), done);
        } else if last_progress.0.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("no progress for 60 s: {done} of {n} jobs ended");
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {label}: {done}/{n} ended ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(interval).await;
    }
}

/// The smallest string above every string that starts with `prefix` (its last character
/// incremented; prefixes here end in `-`).
fn prefix_upper(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    if let Some(last) = chars.pop() {
        chars.push(char::from_u32(last as u32 + 1).unwrap_or(char::MAX));
    }
    chars.into_iter().collect()
}

/// Polls until the outbox is empty (the relay published every event); the queries it ran.
async fn wait_outbox(mon: &mut PgConnection) -> anyhow::Result<u64> {
    let mut polls = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&mut *mon)
            .await?;
        polls += 1;
        if left == 0 || Instant::now() > deadline {
            return Ok(polls);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Ctx<'a> {
    env: &'a Env,
    spec: &'a Spec,
    sim: &'a Sim,
    config: Config,
    db_name: String,
    db_url_tcp: String,
    admin: PgConnection,
    ch: lapin::Channel,
    log: std::path::PathBuf,
}

/// Runs every phase of a scenario; `rep` numbers the repetition (for refund numbers). The
/// database, the broker names and the simulator are cleaned up whatever happens.
pub async fn run(env: &Env, spec: &Spec, rep: usize) -> anyhow::Result<Vec<PhaseResult>> {
    let mut sim = children::start_sim(&env.bin_dir, spec.rules.clone(), Vec::new()).await?;
    let db = testkit::test_db().await?;
    db.pool.close().await;
    let amqp = testkit::test_amqp();
    let result = run_in(env, spec, rep, &sim, &db.name, &db.url, &amqp).await;
    sim.proc.stop(Duration::from_secs(10)).await;
    if let Ok(conn) = shared::broker::connect(&env.amqp_url, "refund-bench-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            shared::broker::delete_topology(&ch, &amqp).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
    match PgConnection::connect(&env.admin_url).await {
        Ok(mut admin) if !env.keep => {
            drop_db(&mut admin, &db.name).await;
            let _ = admin.close().await;
        }
        _ => eprintln!("  kept database {}", db.name),
    }
    result
}

async fn run_in(
    env: &Env,
    spec: &Spec,
    rep: usize,
    sim: &Sim,
    db_name: &str,
    db_url: &str,
    amqp: &shared::config::AmqpConfig,
) -> anyhow::Result<Vec<PhaseResult>> {
    let conn = shared::broker::connect(&env.amqp_url, "refund-bench").await?;
    let ch = shared::broker::confirm_channel(&conn).await?;
    shared::broker::declare_topology(&ch, amqp).await?;
    let mut base = env.worker_base.clone();
    base.database_url = if spec.unix_socket {
        super::unix_socket_url(db_url, &env.pg_socket_dir)
    } else {
        db_url.to_owned()
    };
    base.amqp_url = env.amqp_url.clone();
    base.amqp = amqp.clone();
    base.worker.concurrency = spec.concurrency;
    base.worker.prefetch = spec.prefetch;
    let config = children::point_at_sim(&base, sim)?;
    let log = env
        .log_dir
        .join(format!("worker-{}-r{rep}.log", spec.id.to_lowercase()));
    let _ = std::fs::remove_file(&log);
    let mut ctx = Ctx {
        env,
        spec,
        sim,
        config,
        db_name: db_name.to_owned(),
        db_url_tcp: db_url.to_owned(),
        admin: PgConnection::connect(&env.admin_url).await?,
        ch,
        log,
    };
    let mut results: Vec<PhaseResult> = Vec::new();
    for (i, phase) in spec.phases.iter().enumerate() {
        let prefix = format!("{}r{rep}p{i}-", spec.id);
        let max_rate = results
            .iter()
            .find(|r| r.phase == "max" && r.error.is_none())
            .map(|r| r.rate);
        let (n, rate) = match phase {
            Phase::Max(n) | Phase::Backlog(n) => (*n, None),
            Phase::Paced { fraction, secs } => match max_rate {
                Some(m) => {
                    let r = m * fraction;
                    (((r * secs).ceil() as usize).max(1), Some(r))
                }
                None => {
                    let mut r = PhaseResult::empty(spec, phase, 0);
                    r.error = Some("no max-rate phase to pace from".into());
                    results.push(r);
                    continue;
                }
            },
        };
        eprintln!(
            "{} {} ({}): {n} refunds{}",
            spec.id,
            phase.label(),
            spec.title,
            rate.map(|r| format!(" at {r:.0}/s")).unwrap_or_default()
        );
        let r = match run_phase(&mut ctx, phase, &prefix, n, rate).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("  {} {} failed: {e:#}", spec.id, phase.label());
                let mut r = PhaseResult::empty(spec, phase, n);
                r.error = Some(format!("{e:#}"));
                r
            }
        };
        eprintln!(
            "  -> {:.0} refunds/s, p50 {:.1} ms, p99 {:.1} ms, worker {:.0} µs CPU/refund, \
             {:.2} xacts/refund, machine {:.0}% busy",
            r.rate,
            r.p50_ms,
            r.p99_ms,
            r.worker_cpu_us_per_refund,
            r.xacts_per_refund,
            r.cpu.machine_busy_share() * 100.0
        );
        let failed = r.error.is_some();
        results.push(r);
        if failed {
            break;
        }
    }
    let _ = ctx.admin.close().await;
    let _ = conn.close(200, "done".into()).await;
    Ok(results)
}

async fn run_phase(
    ctx: &mut Ctx<'_>,
    phase: &Phase,
    prefix: &str,
    n: usize,
    rate: Option<f64>,
) -> anyhow::Result<PhaseResult> {
    let spec = ctx.spec;
    let msgs: Vec<Msg> = {
        let m: Vec<&str> = spec.merchants.iter().map(String::as_str).collect();
        publish::requests(prefix, n, spec.provider, &m)
    };
    let mut mon = PgConnection::connect(&ctx.db_url_tcp).await?;
    let mon_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut mon)
        .await?;
    let t0 = stats::table_counters(&mut mon).await?;
    let mut polls = 2u64;
    let c0 = stats::pg_counters(&mut ctx.admin, &ctx.db_name).await?;
    let mut sent: Vec<i64> = Vec::new();
    if let Phase::Backlog(_) = phase {
        eprintln!("  publishing the backlog with no worker running");
        sent = publish::publish(&ctx.ch, &ctx.config.amqp, &msgs, None).await?;
    }
    let mut config = ctx.config.clone();
    config.worker.metrics_addr = testkit::free_addr()?;
    let mut worker =
        children::start_worker(&ctx.env.bin_dir, &config, &ctx.env.worker_log, &ctx.log).await?;
    let ready_us = now_us();
    let watch = Watch {
        worker: Some(worker.proc.pid()),
        sim: Some(ctx.sim.proc.pid()),
        db_name: Some(ctx.db_name.clone()),
        exclude: vec![mon_pid as u32],
    };
    let cpu0 = procs::sample(&watch);
    if !matches!(phase, Phase::Backlog(_)) {
        sent = publish::publish(&ctx.ch, &ctx.config.amqp, &msgs, rate).await?;
    }
    let interval = if n > 30_000 {
        Duration::from_millis(1000)
    } else {
        Duration::from_millis(200)
    };
    let label = format!("{} {}", spec.id, phase.label());
    let waited = wait_ended(&mut mon, &label, prefix, n, interval).await;
    let mut error = None;
    match waited {
        Ok(p) => polls += p,
        Err(e) => error = Some(format!("{e:#}")),
    }
    polls += wait_outbox(&mut mon).await?;
    let cpu1 = procs::sample(&watch);
    let peak_rss = procs::peak_rss_mib(worker.proc.pid()).unwrap_or(f64::NAN);
    if worker.proc.exited() {
        error.get_or_insert_with(|| {
            format!(
                "the worker exited during the phase (see {})",
                ctx.log.display()
            )
        });
    }
    worker.proc.stop(Duration::from_secs(30)).await;
    let _ = mon.close().await;
    // Backends flush their statistics when they exit.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c1 = stats::pg_counters(&mut ctx.admin, &ctx.db_name).await?;
    let d = c1.since(&c0);

    // What happened to each refund.
    let mut q = PgConnection::connect(&ctx.db_url_tcp)
        .await
        .context("connecting for the results")?;
    // Before the result queries below, which scan these tables themselves.
    let t1 = stats::table_counters(&mut q).await?;
    let like = format!("{prefix}%");
    let finals = sqlx::query(AssertSqlSafe(format!(
        "SELECT refund_no, (extract(epoch FROM max(at)) * 1000000)::int8 AS at_us
         FROM job_transitions WHERE refund_no LIKE $1 AND to_state IN {END_STATES}
         GROUP BY refund_no"
    )))
    .bind(&like)
    .fetch_all(&mut q)
    .await?;
    let states: BTreeMap<String, i64> =
        sqlx::query("SELECT state, count(*) AS n FROM jobs WHERE refund_no LIKE $1 GROUP BY state")
            .bind(&like)
            .fetch_all(&mut q)
            .await?
            .iter()
            .map(|r| (r.get::<String, _>("state"), r.get::<i64, _>("n")))
            .collect();
    let provider_calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM provider_attempts WHERE refund_no LIKE $1")
            .bind(&like)
            .fetch_one(&mut q)
            .await?;
    let _ = q.close().await;
    let tables: BTreeMap<String, stats::TableCounters> = t1
        .iter()
        .map(|(k, v)| (k.clone(), v.since(&t0.get(k).copied().unwrap_or_default())))
        .collect();
    let jobs_t = tables.get("jobs").copied().unwrap_or_default();
    let jobs_hot_pct = if jobs_t.n_tup_upd > 0 {
        jobs_t.n_tup_hot_upd as f64 / jobs_t.n_tup_upd as f64 * 100.0
    } else {
        f64::NAN
    };
    let jobs_seq_rows = jobs_t.seq_tup_read as f64;

    let sent_at: HashMap<&str, i64> = msgs
        .iter()
        .zip(&sent)
        .map(|(m, t)| (m.refund_no.as_str(), *t))
        .collect();
    let mut lat_ms: Vec<f64> = Vec::with_capacity(finals.len());
    let mut last_us = i64::MIN;
    for r in &finals {
        let no: String = r.get("refund_no");
        let at: i64 = r.get("at_us");
        last_us = last_us.max(at);
        if let Some(s) = sent_at.get(no.as_str()) {
            lat_ms.push((at - s) as f64 / 1000.0);
        }
    }
    lat_ms.sort_by(f64::total_cmp);
    let ended = finals.len();
    let start_us = match phase {
        Phase::Backlog(_) => ready_us,
        _ => sent.iter().copied().min().unwrap_or(ready_us),
    };
    let seconds = (last_us - start_us).max(1) as f64 / 1e6;
    let cpu = procs::delta(&cpu0, &cpu1);
    let nf = ended.max(1) as f64;
    let per = |s: f64| s * 1e6 / nf;
    let per_refund_us = PerRefundUs {
        worker: per(cpu.worker_s),
        postgres_this_db: per(cpu.pg_db_s),
        postgres_all: per(cpu.pg_all_s),
        rabbitmq: per(cpu.rabbitmq_s),
        simulator: per(cpu.sim_s),
        bench: per(cpu.bench_s),
        system: per(cpu.worker_s + cpu.pg_all_s + cpu.rabbitmq_s),
    };
    Ok(PhaseResult {
        scenario: spec.id.clone(),
        phase: phase.label(),
        title: spec.title.clone(),
        jobs: n,
        ended,
        states,
        provider_calls,
        offered_rate: rate,
        seconds,
        rate: ended as f64 / seconds,
        p50_ms: percentile(&lat_ms, 50.0),
        p99_ms: percentile(&lat_ms, 99.0),
        max_ms: lat_ms.last().copied().unwrap_or(f64::NAN),
        worker_cpu_us_per_refund: per_refund_us.worker,
        worker_peak_rss_mib: peak_rss,
        xacts_per_refund: (d.xact_commit - polls as i64) as f64 / nf,
        rollbacks: d.xact_rollback,
        wal_bytes_per_refund: d.wal_bytes / nf,
        wal_syncs_per_refund: d.wal_sync as f64 / nf,
        per_refund_us,
        cpu,
        tables,
        jobs_hot_pct,
        jobs_seq_rows_per_refund: jobs_seq_rows / nf,
        concurrency: spec.concurrency,
        prefetch: spec.prefetch,
        provider_latency_ms: spec.provider_latency_ms,
        error,
    })
}
