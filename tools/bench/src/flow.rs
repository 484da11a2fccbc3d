//! S6 and S7 (issue #19): the worker's flow control, judged from the provider's side.
//!
//! **S6, a per-merchant rate limit shared by several processes.** `--s6-workers` (3) copies of
//! `refund-worker` consume one queue and share one database. WuPay merchant [`S6_LIMITED`] is
//! limited by a `[[limits]]` entry (`--limit-rate`, 200/s, burst `--limit-burst`), merchant
//! [`S6_UNLIMITED`] is not. First a baseline, a burst of the unlimited merchant's jobs alone;
//! then the same burst again with the limited merchant's jobs spread evenly through it, enough
//! to keep the limited merchant busy for 1.5 × the baseline (at least 5 s, at most 60 s, at its
//! limit). The limited merchant's rate is what the simulator counted, per second of its clock
//! (`GET /_sim/rates`); the unlimited merchant's is its jobs over first publish → its last
//! final transition, in each run.
//!
//! **S7, one merchant's provider down mid-run.** One worker; an open-loop publisher at a fixed
//! rate to three WuPay merchants for `before + outage + after` seconds. `before` seconds in,
//! a simulator rule makes every call of [`S7_DOWN`] (configured `idempotent = true`) an HTTP
//! 500; `outage` seconds later the rule is removed. Measured: how many of its jobs went dead,
//! the other merchants' provider rate (simulator counts) during the outage against before it,
//! and how long after the return it took until every job of it published before the return
//! was final.
//!
//! Both use WuPay merchants only: no RSA (the simulator would otherwise take a core of this
//! 2-core machine), and no ShengPay notify listener, whose fixed port three workers could not
//! share.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use shared::config::Config;
use shared::job::ProviderKind;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use refund_sim::{FaultAction, FaultRule, Operation, RateWindow, SimLimit};

use super::children::{self, Sim, Worker};
use super::procs::{self, CpuUse, Watch};
use super::publish::{self, Msg, now_us};
use super::report::num;
use super::scenario::{END_STATES, wait_ended};
use super::stats::median;
use super::{Env, Options, Target, drop_db};

/// S6's merchant with a `[[limits]]` entry.
pub const S6_LIMITED: &str = "wu-soap11";
/// S6's merchant without one.
pub const S6_UNLIMITED: &str = "wu-soap12";
/// S7's merchant whose provider goes down.
pub const S7_DOWN: &str = "wu-soap12";
/// S7's merchants that stay up.
pub const S7_HEALTHY: [&str; 2] = ["wu-soap11", "wu-post"];

/// How far above the limit a 1-second window may go (the issue's ± 5%).
pub const LIMIT_TOLERANCE: f64 = 0.05;
/// The share of its rate the other merchant must keep (S6: of its baseline; S7: of before).
pub const KEEP_SHARE: f64 = 0.9;
/// S7: the down merchant's backlog must be final this soon after the provider's return.
pub const DRAIN_LIMIT_S: f64 = 10.0;

/// One second of the simulator's clock and the requests one merchant (or a group) made in it.
pub type Second = (i64, u64);

/// What one S6 run found.
#[derive(Debug, Clone, Serialize)]
pub struct S6Result {
    pub rep: usize,
    pub workers: usize,
    pub limited_merchant: String,
    pub unlimited_merchant: String,
    pub limit_per_sec: f64,
    pub burst: u32,
    /// Whether the workers' configs carried the `[[limits]]` entry: false when this build's
    /// config refuses the table (`limit_note` says why), and the run is then unlimited.
    pub limit_applied: bool,
    pub limit_note: Option<String>,
    pub unlimited_jobs: usize,
    /// The unlimited merchant alone: refunds/s over first publish → last final.
    pub baseline_rate: f64,
    pub baseline_seconds: f64,
    pub baseline_machine_busy_pct: f64,
    /// Cores the workers used, and cores outside the test, during the baseline.
    pub baseline_worker_cores: f64,
    pub baseline_other_cores: f64,
    pub limited_jobs: usize,
    /// The unlimited merchant with the limited one's jobs among its own.
    pub mixed_unlimited_rate: f64,
    pub mixed_unlimited_seconds: f64,
    /// `mixed_unlimited_rate / baseline_rate`.
    pub unlimited_ratio: f64,
    /// The limited merchant's jobs over its first publish → its last final.
    pub limited_rate: f64,
    pub mixed_machine_busy_pct: f64,
    pub mixed_worker_cores: f64,
    pub mixed_other_cores: f64,
    /// CPU-seconds per process during each run (`worker_s`: the workers together), to see
    /// where a slower mixed run spent its CPU.
    pub baseline_cpu: CpuUse,
    pub mixed_cpu: CpuUse,
    /// The unlimited merchant's provider requests per second, alone and mixed.
    pub unlimited_seconds_alone: Vec<Second>,
    pub unlimited_seconds_mixed: Vec<Second>,
    /// Provider requests of the limited merchant per second of the simulator's clock, gaps
    /// filled with 0, from its first request to its last.
    pub limited_seconds: Vec<Second>,
    /// The busiest of those seconds.
    pub limited_max_per_sec: u64,
    /// The median of the full seconds (the first and last, partly outside the run, left out).
    pub limited_median_per_sec: f64,
    /// Whether the simulator enforced the limit too (`--sim-limit`), and how many of the
    /// limited merchant's requests it refused.
    pub sim_limit: bool,
    pub sim_refused: u64,
    pub states: BTreeMap<String, i64>,
    pub dead: i64,
    pub error: Option<String>,
}

/// What one S7 run found.
#[derive(Debug, Clone, Serialize)]
pub struct S7Result {
    pub rep: usize,
    pub down_merchant: String,
    pub healthy_merchants: Vec<String>,
    /// Offered load, refunds/s per healthy merchant and for the down merchant.
    pub offered_healthy_per_merchant: f64,
    pub offered_down: f64,
    pub before_secs: f64,
    pub outage_secs: f64,
    pub after_secs: f64,
    /// When the down rule was installed and removed (µs since the epoch, this machine's clock).
    pub outage_start_us: i64,
    pub outage_end_us: i64,
    /// The healthy merchants' provider requests per second (sum of both): mean over the full
    /// seconds before the outage (the first two, the worker warming up, left out), during it
    /// and during the drain after it.
    pub healthy_before_per_sec: f64,
    pub healthy_during_per_sec: f64,
    pub healthy_after_per_sec: f64,
    /// `healthy_during_per_sec / healthy_before_per_sec`.
    pub healthy_ratio: f64,
    /// The down merchant's provider requests during the outage (the worker's retries and
    /// probes against a provider that answers nothing but 500).
    pub down_calls_during_outage: u64,
    pub down_jobs: usize,
    /// Of `down_jobs`, published before the provider's return: the backlog that must drain.
    pub backlog_jobs: usize,
    /// Of the backlog, jobs not final when the bench stopped waiting.
    pub backlog_not_final: usize,
    /// The backlog's last final transition − the provider's return, seconds (NaN when some
    /// never ended).
    pub drain_secs: f64,
    pub down_dead: i64,
    pub down_states: BTreeMap<String, i64>,
    pub healthy_states: BTreeMap<String, i64>,
    pub machine_busy_pct: f64,
    pub worker_cores: f64,
    /// Cores of processes outside the test during the run.
    pub other_cores: f64,
    pub healthy_seconds: Vec<Second>,
    pub down_seconds: Vec<Second>,
    pub error: Option<String>,
}

/// A `[[limits]]` entry of the worker's config.
#[derive(Debug, Clone, Serialize)]
struct Limit {
    provider: &'static str,
    merchant: String,
    rate_per_sec: f64,
    burst: u32,
}

/// A scenario's simulator, database and broker names.
struct Stage {
    sim: Sim,
    db_name: String,
    db_url: String,
    amqp: shared::config::AmqpConfig,
}

async fn stage(env: &Env, limits: Vec<SimLimit>) -> anyhow::Result<Stage> {
    let sim = children::start_sim(&env.bin_dir, Vec::new(), limits).await?;
    let db = testkit::test_db().await?;
    db.pool.close().await;
    Ok(Stage {
        sim,
        db_name: db.name,
        db_url: db.url,
        amqp: testkit::test_amqp(),
    })
}

async fn teardown(env: &Env, mut st: Stage) {
    st.sim.proc.stop(Duration::from_secs(10)).await;
    if let Ok(conn) = shared::broker::connect(&env.amqp_url, "refund-bench-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            shared::broker::delete_topology(&ch, &st.amqp).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
    match PgConnection::connect(&env.admin_url).await {
        Ok(mut admin) if !env.keep => {
            drop_db(&mut admin, &st.db_name).await;
            let _ = admin.close().await;
        }
        _ => eprintln!("  kept database {}", st.db_name),
    }
}

/// The scenario's worker config: the base config's worker settings and WuPay merchants
/// pointed at the simulator, those in `idempotent` marked so; no ShengPay merchants and the
/// notify listener off.
fn worker_config(
    env: &Env,
    opts: &Options,
    st: &Stage,
    needed: &[&str],
    idempotent: &[&str],
) -> anyhow::Result<Config> {
    let mut base = env.worker_base.clone();
    for m in needed {
        if !base.wupay.merchants.iter().any(|w| w.merchant == *m) {
            bail!(
                "the worker config has no WuPay merchant {m} (S6 and S7 use {S6_LIMITED}, \
                 {S6_UNLIMITED} and wu-post)"
            );
        }
    }
    base.database_url = st.db_url.clone();
    base.amqp_url = env.amqp_url.clone();
    base.amqp = st.amqp.clone();
    if let Some(c) = opts.concurrency {
        base.worker.concurrency = c;
    }
    if let Some(p) = opts.prefetch {
        base.worker.prefetch = p;
    }
    // Several workers side by side would fight over the notify listener's one port; WuPay has
    // no notifies, so there is nothing for it to receive.
    base.shengpay.merchants.clear();
    base.notify.addr = String::new();
    let mut c = children::point_at_sim(&base, &st.sim)?;
    for m in &mut c.wupay.merchants {
        if idempotent.contains(&m.merchant.as_str()) {
            m.idempotent = true;
        }
    }
    Ok(c)
}

/// `config` as TOML with `limits` as its `[[limits]]` tables (the typed config of this build
/// may not have the field, so it is added to the serialised form).
fn worker_toml(config: &Config, limits: &[Limit]) -> anyhow::Result<toml::Value> {
    let mut v = toml::Value::try_from(config)?;
    if !limits.is_empty()
        && let Some(t) = v.as_table_mut()
    {
        t.insert("limits".into(), toml::Value::try_from(limits)?);
    }
    Ok(v)
}

/// Whether this build's config takes `limits` (the worker reads the same `shared` crate), and
/// if not, the error a worker would stop with.
fn limits_accepted(config: &Config, limits: &[Limit]) -> Result<(), String> {
    let text = worker_toml(config, limits)
        .and_then(|v| Ok(toml::to_string(&v)?))
        .map_err(|e| format!("{e:#}"))?;
    Config::from_toml(&text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn start_workers(
    env: &Env,
    config: &Config,
    limits: &[Limit],
    n: usize,
    label: &str,
) -> anyhow::Result<Vec<Worker>> {
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = config.clone();
        c.worker.metrics_addr = testkit::free_addr()?;
        let v = worker_toml(&c, limits)?;
        let log = env.log_dir.join(format!("worker-{label}-w{i}.log"));
        let _ = std::fs::remove_file(&log);
        workers.push(
            children::start_worker_from(
                &env.bin_dir,
                &v,
                &c.worker.metrics_addr,
                &env.worker_log,
                &log,
            )
            .await?,
        );
    }
    Ok(workers)
}

/// Stops every worker; an error naming the log if one had exited on its own.
async fn stop_workers(env: &Env, workers: &mut [Worker], label: &str) -> anyhow::Result<()> {
    let mut exited = Vec::new();
    for (i, w) in workers.iter_mut().enumerate() {
        if w.proc.exited() {
            exited.push(i);
        }
        w.proc.stop(Duration::from_secs(30)).await;
    }
    if let Some(i) = exited.first() {
        bail!(
            "worker {i} exited during the run (see {})",
            env.log_dir
                .join(format!("worker-{label}-w{i}.log"))
                .display()
        );
    }
    Ok(())
}

/// Merges message groups so that each group's messages are spread evenly over the whole
/// sequence (group g's k-th message at position (k + ½) / n_g): published in order, each
/// merchant's jobs are then evenly mixed in the queue, and at a paced rate each merchant gets
/// its share of the rate.
fn interleave(groups: Vec<Vec<Msg>>) -> Vec<Msg> {
    let mut all: Vec<(f64, Msg)> = groups
        .into_iter()
        .flat_map(|g| {
            let n = g.len().max(1) as f64;
            g.into_iter()
                .enumerate()
                .map(move |(k, m)| ((k as f64 + 0.5) / n, m))
        })
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.into_iter().map(|(_, m)| m).collect()
}

/// Each refund number under `prefix` with its last final transition (µs since the epoch).
async fn final_times(mon: &mut PgConnection, prefix: &str) -> anyhow::Result<HashMap<String, i64>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT refund_no, (extract(epoch FROM max(at)) * 1000000)::int8 AS at_us
         FROM job_transitions WHERE refund_no LIKE $1 AND to_state IN {END_STATES}
         GROUP BY refund_no"
    )))
    .bind(format!("{prefix}%"))
    .fetch_all(&mut *mon)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<String, _>("refund_no"), r.get::<i64, _>("at_us")))
        .collect())
}

async fn states(mon: &mut PgConnection, prefix: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    Ok(
        sqlx::query("SELECT state, count(*) AS n FROM jobs WHERE refund_no LIKE $1 GROUP BY state")
            .bind(format!("{prefix}%"))
            .fetch_all(&mut *mon)
            .await?
            .iter()
            .map(|r| (r.get::<String, _>("state"), r.get::<i64, _>("n")))
            .collect(),
    )
}

/// Jobs over first publish → last final transition: (refunds/s, seconds).
fn span_rate(sent: &[i64], finals: &HashMap<String, i64>) -> (f64, f64) {
    let first = sent.iter().copied().min().unwrap_or(0);
    let last = finals.values().copied().max().unwrap_or(first);
    let seconds = (last - first).max(1) as f64 / 1e6;
    (finals.len() as f64 / seconds, seconds)
}

/// Requests per second summed over `windows`, every second from the first to the last.
fn per_second(windows: &[RateWindow]) -> Vec<Second> {
    let mut by: BTreeMap<i64, u64> = BTreeMap::new();
    for w in windows {
        *by.entry(w.second).or_default() += w.calls;
    }
    let (Some(&lo), Some(&hi)) = (by.keys().next(), by.keys().next_back()) else {
        return Vec::new();
    };
    (lo..=hi)
        .map(|s| (s, by.get(&s).copied().unwrap_or(0)))
        .collect()
}

/// Mean requests per second over the seconds wholly inside `[from_us, to_us)`; missing
/// seconds count as 0. NaN when no whole second fits.
fn mean_between(seconds: &[Second], from_us: i64, to_us: i64) -> f64 {
    let by: HashMap<i64, u64> = seconds.iter().copied().collect();
    // First second that starts at or after from_us; last that ends at or before to_us.
    let lo = from_us.div_euclid(1_000_000) + i64::from(from_us.rem_euclid(1_000_000) != 0);
    let hi = to_us.div_euclid(1_000_000);
    if hi <= lo {
        return f64::NAN;
    }
    let total: u64 = (lo..hi).map(|s| by.get(&s).copied().unwrap_or(0)).sum();
    total as f64 / (hi - lo) as f64
}

/// The busiest second, and the median of the full ones (first and last left out).
fn limit_figures(seconds: &[Second]) -> (u64, f64) {
    let max = seconds.iter().map(|s| s.1).max().unwrap_or(0);
    let full: Vec<f64> = if seconds.len() > 2 {
        seconds[1..seconds.len() - 1]
            .iter()
            .map(|s| s.1 as f64)
            .collect()
    } else {
        Vec::new()
    };
    (max, median(&full))
}

/// The machine's CPU counters and the workers' CPU seconds at one moment.
struct CpuMark {
    sample: procs::CpuSample,
    workers: f64,
}

fn mark(watch: &Watch, workers: &[u32]) -> CpuMark {
    CpuMark {
        sample: procs::sample(watch),
        workers: workers.iter().filter_map(|p| procs::cpu_seconds(*p)).sum(),
    }
}

/// Between two marks: the machine's busy share (%), the workers' cores, and the cores of
/// processes outside the test (a build, another user), which skew the rates measured.
fn cpu_between(a: &CpuMark, b: &CpuMark) -> (f64, f64, f64) {
    let (busy, workers, other, _) = cpu_split(a, b);
    (busy, workers, other)
}

/// [`cpu_between`], plus where the CPU went: the counters with the workers' seconds in
/// `worker_s` (the watch has no single worker) and taken out of `other_s`.
fn cpu_split(a: &CpuMark, b: &CpuMark) -> (f64, f64, f64, CpuUse) {
    let mut d = procs::delta(&a.sample, &b.sample);
    let wall = d.wall_s.max(1e-9);
    let workers = (b.workers - a.workers).max(0.0);
    d.worker_s = workers;
    d.other_s = (d.other_s - workers).max(0.0);
    (
        d.machine_busy_share() * 100.0,
        workers / wall,
        d.other_s / wall,
        d,
    )
}

fn machine_watch(st: &Stage) -> Watch {
    Watch {
        worker: None,
        sim: Some(st.sim.proc.pid()),
        db_name: Some(st.db_name.clone()),
        exclude: Vec::new(),
    }
}

fn poll_interval(n: usize) -> Duration {
    if n > 30_000 {
        Duration::from_millis(1000)
    } else {
        Duration::from_millis(200)
    }
}

/// Runs S6 once; whatever fails is in `error`, and the database, the broker names and the
/// processes are cleaned up.
pub async fn s6(env: &Env, opts: &Options, rep: usize) -> S6Result {
    let mut r = S6Result {
        rep,
        workers: opts.s6_workers.max(1),
        limited_merchant: S6_LIMITED.into(),
        unlimited_merchant: S6_UNLIMITED.into(),
        limit_per_sec: opts.limit_rate,
        burst: opts.limit_burst,
        limit_applied: false,
        limit_note: None,
        unlimited_jobs: opts.s6_jobs.unwrap_or(opts.jobs),
        baseline_rate: f64::NAN,
        baseline_seconds: f64::NAN,
        baseline_machine_busy_pct: f64::NAN,
        baseline_worker_cores: f64::NAN,
        baseline_other_cores: f64::NAN,
        limited_jobs: 0,
        mixed_unlimited_rate: f64::NAN,
        mixed_unlimited_seconds: f64::NAN,
        unlimited_ratio: f64::NAN,
        limited_rate: f64::NAN,
        mixed_machine_busy_pct: f64::NAN,
        mixed_worker_cores: f64::NAN,
        mixed_other_cores: f64::NAN,
        baseline_cpu: CpuUse::default(),
        mixed_cpu: CpuUse::default(),
        unlimited_seconds_alone: Vec::new(),
        unlimited_seconds_mixed: Vec::new(),
        limited_seconds: Vec::new(),
        limited_max_per_sec: 0,
        limited_median_per_sec: f64::NAN,
        sim_limit: opts.sim_limit,
        sim_refused: 0,
        states: BTreeMap::new(),
        dead: 0,
        error: None,
    };
    let sim_limits = if opts.sim_limit {
        vec![SimLimit {
            provider: refund_sim::Provider::WuPay,
            merchant: S6_LIMITED.into(),
            rate_per_sec: opts.limit_rate * (1.0 + LIMIT_TOLERANCE),
            burst: opts.limit_burst.saturating_mul(2).max(1),
        }]
    } else {
        Vec::new()
    };
    match stage(env, sim_limits).await {
        Ok(st) => {
            if let Err(e) = s6_in(env, opts, &st, &mut r).await {
                eprintln!("  S6 failed: {e:#}");
                r.error = Some(format!("{e:#}"));
            }
            teardown(env, st).await;
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    r
}

async fn s6_in(env: &Env, opts: &Options, st: &Stage, r: &mut S6Result) -> anyhow::Result<()> {
    let rep = r.rep;
    let config = worker_config(env, opts, st, &[S6_LIMITED, S6_UNLIMITED], &[])?;
    let wanted = [Limit {
        provider: "wupay",
        merchant: S6_LIMITED.into(),
        rate_per_sec: opts.limit_rate,
        burst: opts.limit_burst,
    }];
    let limits: &[Limit] = match limits_accepted(&config, &wanted) {
        Ok(()) => {
            r.limit_applied = true;
            &wanted
        }
        Err(e) => {
            eprintln!(
                "  S6: this build's worker config refuses [[limits]] ({e}); running without \
                 the limit"
            );
            r.limit_note = Some(e);
            &[]
        }
    };
    let label = format!("s6-r{rep}");
    let mut workers = start_workers(env, &config, limits, r.workers, &label).await?;
    let pids: Vec<u32> = workers.iter().map(|w| w.proc.pid()).collect();
    let result = s6_runs(env, st, r, &pids).await;
    let stopped = stop_workers(env, &mut workers, &label).await;
    result.and(stopped)
}

async fn s6_runs(env: &Env, st: &Stage, r: &mut S6Result, pids: &[u32]) -> anyhow::Result<()> {
    let rep = r.rep;
    let conn = shared::broker::connect(&env.amqp_url, "refund-bench").await?;
    let ch = shared::broker::confirm_channel(&conn).await?;
    shared::broker::declare_topology(&ch, &st.amqp).await?;
    let mut mon = PgConnection::connect(&st.db_url).await?;
    let watch = machine_watch(st);
    let n_u = r.unlimited_jobs;

    // Fresh workers are slower for their first second or so (connections, prepared
    // statements): a short burst first, so that neither measured run pays for it.
    let prefix_w = format!("S6r{rep}w-");
    let n_w = (n_u / 10).clamp(200, 1_000);
    let warm = publish::requests(&prefix_w, n_w, ProviderKind::Wupay, &[S6_UNLIMITED]);
    publish::publish(&ch, &st.amqp, &warm, None).await?;
    wait_ended(&mut mon, "S6 warm-up", &prefix_w, n_w, poll_interval(n_w)).await?;

    let prefix_b = format!("S6r{rep}b-");
    eprintln!(
        "S6 baseline: {n_u} refunds of {S6_UNLIMITED} alone, {} workers",
        r.workers
    );
    let msgs = publish::requests(&prefix_b, n_u, ProviderKind::Wupay, &[S6_UNLIMITED]);
    let cpu0 = mark(&watch, pids);
    let sent = publish::publish(&ch, &st.amqp, &msgs, None).await?;
    wait_ended(&mut mon, "S6 baseline", &prefix_b, n_u, poll_interval(n_u)).await?;
    (
        r.baseline_machine_busy_pct,
        r.baseline_worker_cores,
        r.baseline_other_cores,
        r.baseline_cpu,
    ) = cpu_split(&cpu0, &mark(&watch, pids));
    let finals = final_times(&mut mon, &prefix_b).await?;
    (r.baseline_rate, r.baseline_seconds) = span_rate(&sent, &finals);
    eprintln!(
        "  -> {} refunds/s over {:.1} s, machine {:.0}% busy (workers {:.2} cores, outside \
         the test {:.2})",
        num(r.baseline_rate, 0),
        r.baseline_seconds,
        r.baseline_machine_busy_pct,
        r.baseline_worker_cores,
        r.baseline_other_cores
    );

    // Enough limited work to outlast the unlimited burst by half again, so that the two
    // compete for the whole of it.
    let lim = r.limit_per_sec.max(1.0);
    r.limited_jobs = ((lim * r.baseline_seconds * 1.5).ceil() as usize)
        .clamp((lim * 5.0) as usize, (lim * 60.0) as usize);
    let n_l = r.limited_jobs;
    let prefix_u = format!("S6r{rep}u-");
    let prefix_l = format!("S6r{rep}l-");
    eprintln!(
        "S6 mixed: {n_u} refunds of {S6_UNLIMITED} and {n_l} of {S6_LIMITED} (limit {}/s) \
         interleaved",
        num(lim, 0)
    );
    let msgs = interleave(vec![
        publish::requests(&prefix_u, n_u, ProviderKind::Wupay, &[S6_UNLIMITED]),
        publish::requests(&prefix_l, n_l, ProviderKind::Wupay, &[S6_LIMITED]),
    ]);
    // A second apart: the baseline's last simulator second and the mixed run's first differ.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = mark(&watch, pids);
    let mixed_us = now_us();
    let sent = publish::publish(&ch, &st.amqp, &msgs, None).await?;
    let sent_of = |prefix: &str| -> Vec<i64> {
        msgs.iter()
            .zip(&sent)
            .filter(|(m, _)| m.refund_no.starts_with(prefix))
            .map(|(_, t)| *t)
            .collect()
    };
    wait_ended(&mut mon, "S6 unlimited", &prefix_u, n_u, poll_interval(n_u)).await?;
    let finals_u = final_times(&mut mon, &prefix_u).await?;
    (r.mixed_unlimited_rate, r.mixed_unlimited_seconds) = span_rate(&sent_of(&prefix_u), &finals_u);
    r.unlimited_ratio = r.mixed_unlimited_rate / r.baseline_rate;
    (
        r.mixed_machine_busy_pct,
        r.mixed_worker_cores,
        r.mixed_other_cores,
        r.mixed_cpu,
    ) = cpu_split(&cpu0, &mark(&watch, pids));
    eprintln!(
        "  -> {S6_UNLIMITED}: {} refunds/s over {:.1} s ({:.2} × alone); cores alone → mixed: \
         postgres {:.2} → {:.2}, workers {:.2} → {:.2}, rabbitmq {:.2} → {:.2}, simulator \
         {:.2} → {:.2}",
        num(r.mixed_unlimited_rate, 0),
        r.mixed_unlimited_seconds,
        r.unlimited_ratio,
        r.baseline_cpu.cores(r.baseline_cpu.pg_all_s),
        r.mixed_cpu.cores(r.mixed_cpu.pg_all_s),
        r.baseline_cpu.cores(r.baseline_cpu.worker_s),
        r.mixed_cpu.cores(r.mixed_cpu.worker_s),
        r.baseline_cpu.cores(r.baseline_cpu.rabbitmq_s),
        r.mixed_cpu.cores(r.mixed_cpu.rabbitmq_s),
        r.baseline_cpu.cores(r.baseline_cpu.sim_s),
        r.mixed_cpu.cores(r.mixed_cpu.sim_s),
    );
    wait_ended(&mut mon, "S6 limited", &prefix_l, n_l, poll_interval(n_l)).await?;
    let finals_l = final_times(&mut mon, &prefix_l).await?;
    r.limited_rate = span_rate(&sent_of(&prefix_l), &finals_l).0;
    let unlimited = per_second(&st.sim.rates(S6_UNLIMITED).await?);
    let mixed_s = mixed_us.div_euclid(1_000_000);
    (r.unlimited_seconds_alone, r.unlimited_seconds_mixed) =
        unlimited.into_iter().partition(|(sec, _)| *sec < mixed_s);
    let windows = st.sim.rates(S6_LIMITED).await?;
    r.sim_refused = windows.iter().map(|w| w.limited).sum();
    r.limited_seconds = per_second(&windows);
    (r.limited_max_per_sec, r.limited_median_per_sec) = limit_figures(&r.limited_seconds);
    r.states = states(&mut mon, &format!("S6r{rep}")).await?;
    r.dead = r.states.get("dead").copied().unwrap_or(0);
    eprintln!(
        "  -> {S6_LIMITED}: {} refunds/s; provider saw at most {}/s, median {}/s over {} s",
        num(r.limited_rate, 0),
        r.limited_max_per_sec,
        num(r.limited_median_per_sec, 0),
        r.limited_seconds.len()
    );
    let _ = mon.close().await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Runs S7 once; whatever fails is in `error`, and everything is cleaned up.
pub async fn s7(env: &Env, opts: &Options, rep: usize) -> S7Result {
    let mut r = S7Result {
        rep,
        down_merchant: S7_DOWN.into(),
        healthy_merchants: S7_HEALTHY.iter().map(|m| (*m).to_owned()).collect(),
        offered_healthy_per_merchant: opts.s7_rate,
        offered_down: opts.s7_down_rate,
        before_secs: opts.s7_before_secs,
        outage_secs: opts.outage_secs,
        after_secs: opts.s7_after_secs,
        outage_start_us: 0,
        outage_end_us: 0,
        healthy_before_per_sec: f64::NAN,
        healthy_during_per_sec: f64::NAN,
        healthy_after_per_sec: f64::NAN,
        healthy_ratio: f64::NAN,
        down_calls_during_outage: 0,
        down_jobs: 0,
        backlog_jobs: 0,
        backlog_not_final: 0,
        drain_secs: f64::NAN,
        down_dead: 0,
        down_states: BTreeMap::new(),
        healthy_states: BTreeMap::new(),
        machine_busy_pct: f64::NAN,
        worker_cores: f64::NAN,
        other_cores: f64::NAN,
        healthy_seconds: Vec::new(),
        down_seconds: Vec::new(),
        error: None,
    };
    match stage(env, Vec::new()).await {
        Ok(st) => {
            if let Err(e) = s7_in(env, opts, &st, &mut r).await {
                eprintln!("  S7 failed: {e:#}");
                r.error = Some(format!("{e:#}"));
            }
            teardown(env, st).await;
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    r
}

/// The rule that takes S7's merchant down: every refund call (and query) an HTTP 500.
pub fn down_rule() -> FaultRule {
    FaultRule {
        name: Some(format!("{S7_DOWN} down")),
        ..FaultRule::new(FaultAction::Http500)
            .merchant(S7_DOWN)
            .operation(Operation::Any)
    }
}

async fn s7_in(env: &Env, opts: &Options, st: &Stage, r: &mut S7Result) -> anyhow::Result<()> {
    let mut needed = vec![S7_DOWN];
    needed.extend(S7_HEALTHY);
    let config = worker_config(env, opts, st, &needed, &[S7_DOWN])?;
    let label = format!("s7-r{}", r.rep);
    let mut workers = start_workers(env, &config, &[], 1, &label).await?;
    let pids: Vec<u32> = workers.iter().map(|w| w.proc.pid()).collect();
    let result = s7_run(env, st, r, &pids).await;
    let stopped = stop_workers(env, &mut workers, &label).await;
    result.and(stopped)
}

async fn s7_run(env: &Env, st: &Stage, r: &mut S7Result, pids: &[u32]) -> anyhow::Result<()> {
    let rep = r.rep;
    let conn = shared::broker::connect(&env.amqp_url, "refund-bench").await?;
    let ch = shared::broker::confirm_channel(&conn).await?;
    shared::broker::declare_topology(&ch, &st.amqp).await?;
    let mut mon = PgConnection::connect(&st.db_url).await?;
    let watch = machine_watch(st);

    let total_secs = r.before_secs + r.outage_secs + r.after_secs;
    let healthy_rate = r.offered_healthy_per_merchant * S7_HEALTHY.len() as f64;
    let n_h = (healthy_rate * total_secs).ceil() as usize;
    let n_d = (r.offered_down * total_secs).ceil() as usize;
    r.down_jobs = n_d;
    let prefix_h = format!("S7r{rep}h-");
    let prefix_d = format!("S7r{rep}d-");
    let rate = healthy_rate + r.offered_down;
    eprintln!(
        "S7: {} refunds/s to {} and {}/s to {S7_DOWN} for {:.0} s; {S7_DOWN} down (HTTP 500) \
         from {:.0} s for {:.0} s",
        num(r.offered_healthy_per_merchant, 0),
        S7_HEALTHY.join(", "),
        num(r.offered_down, 0),
        total_secs,
        r.before_secs,
        r.outage_secs
    );
    let msgs = interleave(vec![
        publish::requests(&prefix_h, n_h, ProviderKind::Wupay, &S7_HEALTHY),
        publish::requests(&prefix_d, n_d, ProviderKind::Wupay, &[S7_DOWN]),
    ]);
    let cpu0 = mark(&watch, pids);
    let started_us = now_us();
    let t0 = Instant::now();
    let publisher = {
        let ch = ch.clone();
        let amqp = st.amqp.clone();
        tokio::spawn(async move {
            let sent = publish::publish(&ch, &amqp, &msgs, Some(rate)).await;
            (msgs, sent)
        })
    };
    let (before, outage) = (r.before_secs, r.outage_secs);
    let outage_window = async {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(before)).into()).await;
        st.sim.set_rules(&[down_rule()]).await?;
        let down = now_us();
        eprintln!("  {S7_DOWN} down");
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(before + outage)).into()).await;
        st.sim.set_rules(&[]).await?;
        let back = now_us();
        eprintln!("  {S7_DOWN} back");
        anyhow::Ok((down, back))
    }
    .await;
    (r.outage_start_us, r.outage_end_us) = match outage_window {
        Ok(times) => times,
        Err(e) => {
            // Nothing may keep publishing into a topology about to be deleted.
            publisher.abort();
            return Err(e);
        }
    };
    let (msgs, sent) = publisher.await.context("the publisher task")?;
    let sent = sent?;
    let published_us = now_us();

    wait_ended(&mut mon, "S7 healthy", &prefix_h, n_h, poll_interval(n_h)).await?;
    // The backlog may not drain at all (the worker never resumes): the wait gives up after a
    // minute without progress, and what ended by then is measured.
    let waited = wait_ended(&mut mon, "S7 down", &prefix_d, n_d, poll_interval(n_d)).await;
    (r.machine_busy_pct, r.worker_cores, r.other_cores) = cpu_between(&cpu0, &mark(&watch, pids));

    let finals_d = final_times(&mut mon, &prefix_d).await?;
    let backlog: Vec<&str> = msgs
        .iter()
        .zip(&sent)
        .filter(|(m, t)| m.refund_no.starts_with(&prefix_d) && **t < r.outage_end_us)
        .map(|(m, _)| m.refund_no.as_str())
        .collect();
    r.backlog_jobs = backlog.len();
    r.backlog_not_final = backlog
        .iter()
        .filter(|no| !finals_d.contains_key(**no))
        .count();
    let last = backlog.iter().filter_map(|no| finals_d.get(*no)).max();
    r.drain_secs = match last {
        Some(at) if r.backlog_not_final == 0 => (at - r.outage_end_us) as f64 / 1e6,
        _ => f64::NAN,
    };
    r.down_states = states(&mut mon, &prefix_d).await?;
    r.healthy_states = states(&mut mon, &prefix_h).await?;
    r.down_dead = r.down_states.get("dead").copied().unwrap_or(0);

    let mut healthy = Vec::new();
    for m in S7_HEALTHY {
        healthy.extend(st.sim.rates(m).await?);
    }
    r.healthy_seconds = per_second(&healthy);
    r.down_seconds = per_second(&st.sim.rates(S7_DOWN).await?);
    // The first two seconds are the worker's connections and caches warming up.
    r.healthy_before_per_sec = mean_between(
        &r.healthy_seconds,
        started_us + 2_000_000,
        r.outage_start_us,
    );
    r.healthy_during_per_sec = mean_between(&r.healthy_seconds, r.outage_start_us, r.outage_end_us);
    r.healthy_after_per_sec = mean_between(&r.healthy_seconds, r.outage_end_us, published_us);
    r.healthy_ratio = r.healthy_during_per_sec / r.healthy_before_per_sec;
    let (lo, hi) = (
        r.outage_start_us.div_euclid(1_000_000),
        r.outage_end_us.div_euclid(1_000_000),
    );
    r.down_calls_during_outage = r
        .down_seconds
        .iter()
        .filter(|(s, _)| (lo..=hi).contains(s))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "  -> healthy {} → {} calls/s during the outage ({:.2} ×), {} after; {S7_DOWN}: {} \
         dead, {} calls during the outage, backlog of {} final {} s after the return",
        num(r.healthy_before_per_sec, 0),
        num(r.healthy_during_per_sec, 0),
        r.healthy_ratio,
        num(r.healthy_after_per_sec, 0),
        r.down_dead,
        r.down_calls_during_outage,
        r.backlog_jobs,
        num(r.drain_secs, 1)
    );
    let _ = mon.close().await;
    let _ = conn.close(200, "done".into()).await;
    waited.map(|_| ())
}

/// The middle value of `f` over the runs without an error (all runs when none is clean).
fn med_of<T>(runs: &[T], ok: impl Fn(&T) -> bool, f: impl Fn(&T) -> f64) -> f64 {
    let clean: Vec<f64> = runs.iter().filter(|r| ok(r)).map(&f).collect();
    if clean.is_empty() {
        median(&runs.iter().map(f).collect::<Vec<_>>())
    } else {
        median(&clean)
    }
}

/// The S6 and S7 criteria, medians over the repetitions.
pub fn targets(s6: &[S6Result], s7: &[S7Result]) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(first) = s6.first() {
        let ok = |r: &S6Result| r.error.is_none();
        let lim = first.limit_per_sec;
        let ceiling = lim * (1.0 + LIMIT_TOLERANCE);
        let max = med_of(s6, ok, |r| r.limited_max_per_sec as f64);
        let med = med_of(s6, ok, |r| r.limited_median_per_sec);
        let note = if first.limit_applied {
            String::new()
        } else {
            "; the workers ran WITHOUT [[limits]] (this build's config refuses it)".into()
        };
        t.push(Target {
            target: format!(
                "S6: the provider sees ≤ {}/s (+{:.0}%) from {} in every 1-s window, {} workers",
                num(lim, 0),
                LIMIT_TOLERANCE * 100.0,
                first.limited_merchant,
                first.workers
            ),
            measured: format!(
                "busiest second {}, median full second {}{note}",
                num(max, 0),
                num(med, 0)
            ),
            met: Some(max <= ceiling && first.limit_applied),
        });
        t.push(Target {
            target: format!(
                "S6: {} runs at its limit (median full second within {}/s ± {:.0}%)",
                first.limited_merchant,
                num(lim, 0),
                LIMIT_TOLERANCE * 100.0
            ),
            measured: format!("median {}/s", num(med, 0)),
            met: Some(((med - lim) / lim).abs() <= LIMIT_TOLERANCE),
        });
        let ratio = med_of(s6, ok, |r| r.unlimited_ratio);
        t.push(Target {
            target: format!(
                "S6: {} keeps ≥ {:.0}% of its rate alone with {} limited beside it",
                first.unlimited_merchant,
                KEEP_SHARE * 100.0,
                first.limited_merchant
            ),
            measured: format!(
                "{} / {} refunds/s = {:.2} ×",
                num(med_of(s6, ok, |r| r.mixed_unlimited_rate), 0),
                num(med_of(s6, ok, |r| r.baseline_rate), 0),
                ratio
            ),
            met: Some(ratio >= KEEP_SHARE),
        });
    }
    if let Some(first) = s7.first() {
        // S7's own waiting error (a backlog that never drained) is a finding measured by
        // the figures, not a reason to ignore the run.
        let ok = |_: &S7Result| true;
        let dead = med_of(s7, ok, |r| r.down_dead as f64);
        t.push(Target {
            target: format!(
                "S7: 0 jobs of {} dead after {:.0} s of its provider down",
                first.down_merchant, first.outage_secs
            ),
            measured: format!(
                "{} of {} dead ({} provider calls during the outage)",
                num(dead, 0),
                num(med_of(s7, ok, |r| r.down_jobs as f64), 0),
                num(med_of(s7, ok, |r| r.down_calls_during_outage as f64), 0)
            ),
            met: Some(dead == 0.0),
        });
        let ratio = med_of(s7, ok, |r| r.healthy_ratio);
        t.push(Target {
            target: format!(
                "S7: {} keep ≥ {:.0}% of their rate before the outage during it",
                first.healthy_merchants.join(" and "),
                KEEP_SHARE * 100.0
            ),
            measured: format!(
                "{} → {} provider calls/s = {:.2} ×",
                num(med_of(s7, ok, |r| r.healthy_before_per_sec), 0),
                num(med_of(s7, ok, |r| r.healthy_during_per_sec), 0),
                ratio
            ),
            met: Some(ratio >= KEEP_SHARE),
        });
        let drain = med_of(s7, ok, |r| r.drain_secs);
        let not_final = med_of(s7, ok, |r| r.backlog_not_final as f64);
        t.push(Target {
            target: format!(
                "S7: {}'s backlog all final ≤ {:.0} s after its provider's return",
                first.down_merchant, DRAIN_LIMIT_S
            ),
            measured: if not_final > 0.0 {
                format!(
                    "{} of {} never ended",
                    num(not_final, 0),
                    num(med_of(s7, ok, |r| r.backlog_jobs as f64), 0)
                )
            } else {
                format!(
                    "{} s for {} jobs{}",
                    num(drain, 1),
                    num(med_of(s7, ok, |r| r.backlog_jobs as f64), 0),
                    if drain < 0.0 {
                        " (negative: all had ended before the return, dead ones included)"
                    } else {
                        ""
                    }
                )
            },
            met: Some(not_final == 0.0 && drain <= DRAIN_LIMIT_S),
        });
    }
    t
}

/// The S6 and S7 figures, one line per run, for the terminal or Markdown (a table).
pub fn render(s6: &[S6Result], s7: &[S7Result], markdown: bool) -> String {
    use super::report::table;
    let mut s = String::new();
    if !s6.is_empty() {
        let headers = [
            "S6 run",
            "limit",
            "alone refunds/s",
            "mixed refunds/s",
            "× alone",
            "limited jobs",
            "limited refunds/s",
            "busiest second",
            "median second",
            "machine busy (alone, mixed)",
            "cores outside the test",
            "dead",
            "simulator refused",
        ];
        let rows: Vec<Vec<String>> = s6
            .iter()
            .map(|r| {
                vec![
                    format!(
                        "{}{}",
                        r.rep + 1,
                        if r.error.is_some() { " (!)" } else { "" }
                    ),
                    if r.limit_applied {
                        format!("{}/s burst {}", num(r.limit_per_sec, 0), r.burst)
                    } else {
                        "none (refused)".into()
                    },
                    num(r.baseline_rate, 0),
                    num(r.mixed_unlimited_rate, 0),
                    num(r.unlimited_ratio, 2),
                    num(r.limited_jobs as f64, 0),
                    num(r.limited_rate, 0),
                    num(r.limited_max_per_sec as f64, 0),
                    num(r.limited_median_per_sec, 0),
                    format!(
                        "{}%, {}%",
                        num(r.baseline_machine_busy_pct, 0),
                        num(r.mixed_machine_busy_pct, 0)
                    ),
                    format!(
                        "{}, {}",
                        num(r.baseline_other_cores, 2),
                        num(r.mixed_other_cores, 2)
                    ),
                    num(r.dead as f64, 0),
                    if r.sim_limit {
                        num(r.sim_refused as f64, 0)
                    } else {
                        "—".into()
                    },
                ]
            })
            .collect();
        s.push_str(&table(&headers, &rows, markdown));
        for r in s6 {
            if let Some(e) = &r.error {
                s.push_str(&format!("\nS6 run {}: error: {e}\n", r.rep + 1));
            }
        }
    }
    if !s7.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        let headers = [
            "S7 run",
            "healthy calls/s before",
            "during",
            "after",
            "× before",
            "down jobs",
            "dead",
            "calls during outage",
            "backlog",
            "not final",
            "drain s",
            "machine busy",
            "cores outside the test",
        ];
        let rows: Vec<Vec<String>> = s7
            .iter()
            .map(|r| {
                vec![
                    format!(
                        "{}{}",
                        r.rep + 1,
                        if r.error.is_some() { " (!)" } else { "" }
                    ),
                    num(r.healthy_before_per_sec, 0),
                    num(r.healthy_during_per_sec, 0),
                    num(r.healthy_after_per_sec, 0),
                    num(r.healthy_ratio, 2),
                    num(r.down_jobs as f64, 0),
                    num(r.down_dead as f64, 0),
                    num(r.down_calls_during_outage as f64, 0),
                    num(r.backlog_jobs as f64, 0),
                    num(r.backlog_not_final as f64, 0),
                    num(r.drain_secs, 1),
                    format!("{}%", num(r.machine_busy_pct, 0)),
                    num(r.other_cores, 2),
                ]
            })
            .collect();
        s.push_str(&table(&headers, &rows, markdown));
        for r in s7 {
            let states = |m: &BTreeMap<String, i64>| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            s.push_str(&format!(
                "\nS7 run {}: {} ended {}; healthy ended {}{}\n",
                r.rep + 1,
                r.down_merchant,
                states(&r.down_states),
                states(&r.healthy_states),
                r.error
                    .as_ref()
                    .map(|e| format!("; error: {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    s
}

/// The setup notes of S6 and S7 for the report.
pub fn setup_notes(opts: &Options, ran_s6: bool, ran_s7: bool) -> Vec<String> {
    let mut out = Vec::new();
    if ran_s6 {
        out.push(format!(
            "S6: {} workers on one queue and database; WuPay {S6_LIMITED} limited by \
             [[limits]] to {}/s burst {}, {S6_UNLIMITED} unlimited; {} refunds of \
             {S6_UNLIMITED} alone, then again with {S6_LIMITED}'s interleaved (1.5 × the \
             baseline's duration at the limit, 5–60 s); the limit is checked against the \
             simulator's per-second arrival counts (`/_sim/rates`, refund calls and status \
             queries together){}",
            opts.s6_workers.max(1),
            num(opts.limit_rate, 0),
            opts.limit_burst,
            num(opts.s6_jobs.unwrap_or(opts.jobs) as f64, 0),
            if opts.sim_limit {
                format!(
                    "; the simulator enforces {}/s burst {} itself (HTTP 429 beyond)",
                    num(opts.limit_rate * (1.0 + LIMIT_TOLERANCE), 0),
                    opts.limit_burst.saturating_mul(2).max(1)
                )
            } else {
                String::new()
            },
        ));
    }
    if ran_s7 {
        out.push(format!(
            "S7: one worker; open-loop {}/s to each of {} and {}/s to {S7_DOWN} (idempotent) \
             for {:.0} + {:.0} + {:.0} s; during the middle {:.0} s every {S7_DOWN} call gets \
             HTTP 500 (simulator rule, installed and removed over `/_sim/rules`); rates are \
             the simulator's per-second arrival counts",
            num(opts.s7_rate, 0),
            S7_HEALTHY.join(", "),
            num(opts.s7_down_rate, 0),
            opts.s7_before_secs,
            opts.outage_secs,
            opts.s7_after_secs,
            opts.outage_secs,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(prefix: &str, n: usize) -> Vec<Msg> {
        (0..n)
            .map(|i| Msg {
                refund_no: format!("{prefix}{i}"),
                body: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn interleaving_spreads_each_group_evenly() {
        let all = interleave(vec![msgs("a", 9), msgs("b", 3)]);
        let order: String = all
            .iter()
            .map(|m| m.refund_no.chars().next().unwrap_or('?'))
            .collect();
        assert_eq!(order.matches('b').count(), 3);
        // Each third of the sequence holds one b.
        for third in order.as_bytes().chunks(4) {
            assert_eq!(third.iter().filter(|c| **c == b'b').count(), 1, "{order}");
        }
        // Within a group, the order is kept.
        let a: Vec<&str> = all
            .iter()
            .map(|m| m.refund_no.as_str())
            .filter(|n| n.starts_with('a'))
            .collect();
        assert_eq!(a, ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"]);
    }

    #[test]
    fn seconds_are_filled_and_means_count_only_whole_seconds() {
        let w = |second, calls| RateWindow {
            provider: refund_sim::Provider::WuPay,
            merchant: Some("m".into()),
            second,
            calls,
            refunds: calls,
            queries: 0,
            limited: 0,
        };
        let seconds = per_second(&[w(10, 5), w(12, 7), w(10, 1)]);
        assert_eq!(seconds, [(10, 6), (11, 0), (12, 7)]);
        // [10.5 s, 13 s): whole seconds 11 and 12.
        assert_eq!(mean_between(&seconds, 10_500_000, 13_000_000), 3.5);
        assert_eq!(mean_between(&seconds, 10_000_000, 11_000_000), 6.0);
        assert!(mean_between(&seconds, 10_200_000, 10_900_000).is_nan());
        assert_eq!(limit_figures(&seconds), (7, 0.0));
        assert_eq!(
            limit_figures(&[(1, 3), (2, 200), (3, 205), (4, 9)]),
            (205, 202.5)
        );
    }

    #[test]
    fn limits_are_added_as_tables_of_the_worker_config() {
        let limits = [Limit {
            provider: "wupay",
            merchant: "wu-soap11".into(),
            rate_per_sec: 200.0,
            burst: 10,
        }];
        let v = worker_toml(&Config::default(), &limits).expect("serialises");
        let text = toml::to_string(&v).expect("TOML");
        assert!(text.contains("[[limits]]"), "{text}");
        assert!(text.contains("rate_per_sec = 200.0"), "{text}");
        assert!(text.contains("merchant = \"wu-soap11\""), "{text}");
    }
}
