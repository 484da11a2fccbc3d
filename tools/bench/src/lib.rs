//! `refund-bench`: how fast the refund processor is on this machine, and how far it is from
//! what the machine allows (issue #8).
//!
//! Everything is local: PostgreSQL and RabbitMQ as configured, the provider simulator and the
//! worker as child processes built next to this binary. A run measures the machine's ceilings
//! first (S0: raw AMQP publish+consume+ack, and the job's own PostgreSQL transactions driven
//! directly), then the scenarios (S1 WuPay SOAP, S1u the same over PostgreSQL's Unix socket,
//! S1s ShengPay with RSA, S2 provider latency, S3 a backlog drain, S4 transport faults), then
//! the reconciler's and `dlq list`'s own benchmarks (S5) when they are built, and the flow-control
//! scenarios (S6 a per-merchant rate limit across three workers, S7 one merchant's provider
//! down for a minute; issue #19). It prints a table,
//! and writes JSON and a Markdown section for `docs/benchmarks.md`, each with the machine and
//! the date.
//!
//! The crate also holds the two focused benchmarks it runs in S5, `reconcile-bench` and
//! `dlq-bench` (binaries of their own). Developers run it through `just bench`; nothing that
//! ships depends on it.
//!
//! Modules: [`ceilings`] (S0), [`scenario`] (S1–S4), [`flow`] (S6, S7), [`children`] (the
//! simulator and worker
//! processes), [`publish`] (requests with confirms, timed), [`procs`] (CPU and memory from
//! `/proc`), [`stats`] (percentiles, medians, PostgreSQL counters), [`machine`], [`report`].

pub mod ceilings;
pub mod children;
pub mod flow;
pub mod machine;
pub mod procs;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod stats;

mod plan;
mod render;
mod verdict;

#[allow(unused_imports)]
use plan::*;
pub use plan::{littles_law, own_time_ms};
#[allow(unused_imports)]
use render::*;
pub use render::{render_markdown, render_text, write_markdown};
#[allow(unused_imports)]
use verdict::*;
pub use verdict::{External, Target};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use shared::config::Config;
use shared::job::ProviderKind;
use sqlx::{AssertSqlSafe, PgConnection};

use ceilings::{Ceiling, PgVariant, Signing};
use machine::Machine;
use refund_sim::{FaultAction, FaultRule, Provider};
use report::{Row, num};
use scenario::{Phase, PhaseResult, Spec};

/// Every scenario, in the order they run.
pub const ALL: [&str; 10] = ["S0", "S1", "S1u", "S1s", "S2", "S3", "S4", "S5", "S6", "S7"];

/// Benchmarks the refund processor on this machine against the machine's own ceilings.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "refund-bench",
    version,
    after_help = "Exit status: 0 when every phase ran (a target missed is a finding, not a \
                  failure), 1 when a phase reported an error or an S5 tool did not finish with \
                  its report (named on stderr, marked in the reports, which are written all the \
                  same), 2 when the bench could not run."
)]
pub struct Options {
    /// Scenarios to run, comma separated: S0 (ceilings), S1 (WuPay SOAP), S1u (S1 with the
    /// worker on PostgreSQL's Unix socket), S1s (ShengPay RSA), S2 (provider latency), S3
    /// (backlog drain), S4 (transport faults), S5 (reconciler and dlq list benches), S6 (a
    /// per-merchant rate limit across three workers), S7 (one merchant's provider down).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "S0,S1,S1u,S1s,S2,S3,S4,S5,S6,S7"
    )]
    pub scenarios: Vec<String>,
    /// Refunds per burst (S1, S1u, S1s, S2, S4).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Refunds queued before the worker starts (S3).
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Runs of every scenario; the tables show medians.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results section of this Markdown file (between the refund-bench markers;
    /// appended when the file has none).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Small sizes for a smoke run (CI, development): 2,000 jobs, 5,000 backlog, 5 s paced,
    /// S7 with 8 s before, 15 s of outage and 5 s after.
    #[arg(long)]
    pub quick: bool,
    /// Admin URL of PostgreSQL (scenario databases are created and dropped through it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub admin_url: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The worker's configuration (worker, retry, HTTP settings and merchants); database,
    /// broker names and merchant addresses are replaced per scenario.
    #[arg(long, default_value = "config/refunds.toml")]
    pub config: PathBuf,
    /// Seconds of open-loop load for the latency phases.
    #[arg(long, default_value_t = 20.0)]
    pub paced_secs: f64,
    /// The open-loop load as a fraction of the scenario's measured maximum rate.
    #[arg(long, default_value_t = 0.7)]
    pub load_fraction: f64,
    /// Provider latency of S2, milliseconds.
    #[arg(long, default_value_t = 50)]
    pub latency_ms: u64,
    /// Worker concurrency for every scenario (default: the config's; S2 sizes it by Little's
    /// law).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Worker prefetch for every scenario (default: the config's; S2 raises it to twice its
    /// concurrency).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Share of ShengPay calls that fail in transport in S4 (reset, HTTP 500 and
    /// drop_response in equal parts).
    #[arg(long, default_value_t = 0.10)]
    pub fault_rate: f64,
    /// Concurrent tasks of the PostgreSQL ceiling.
    #[arg(long, default_value_t = 16)]
    pub pg_clients: usize,
    /// Refunds of the unbatched PostgreSQL ceiling (default: half of --jobs).
    #[arg(long)]
    pub pg_refunds: Option<usize>,
    /// Refunds per transaction of the batched PostgreSQL ceiling.
    #[arg(long, default_value_t = 50)]
    pub pg_batch: usize,
    /// Messages of the AMQP ceiling (default: 2.5 × --jobs).
    #[arg(long)]
    pub amqp_messages: Option<usize>,
    /// RUST_LOG of the worker (`info` is what production runs).
    #[arg(long, default_value = "info")]
    pub worker_log: String,
    /// PostgreSQL's Unix socket folder (S1u, and the ceiling over the socket).
    #[arg(long, default_value = "/var/run/postgresql")]
    pub pg_socket_dir: PathBuf,
    /// Where refund-worker, refund-sim and the S5 benches are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the workers' logs go.
    #[arg(long, default_value = "target/bench-logs")]
    pub log_dir: PathBuf,
    /// Keep the scenario databases (their names are printed).
    #[arg(long)]
    pub keep: bool,
    /// Give each S5 bench at most this many seconds.
    #[arg(long, default_value_t = 900)]
    pub external_timeout_secs: u64,
    /// S6: refunds of the unlimited merchant per run (default: --jobs).
    #[arg(long)]
    pub s6_jobs: Option<usize>,
    /// S6: worker processes on the one queue and database.
    #[arg(long, default_value_t = 3)]
    pub s6_workers: usize,
    /// S6: the limited merchant's `rate_per_sec` in `[[limits]]`.
    #[arg(long, default_value_t = 200.0)]
    pub limit_rate: f64,
    /// S6: the limited merchant's `burst` in `[[limits]]`.
    #[arg(long, default_value_t = 10)]
    pub limit_burst: u32,
    /// S6: the simulator enforces the limit too, as a provider would (+5%, twice the burst):
    /// requests beyond it are answered HTTP 429, and counted.
    #[arg(long)]
    pub sim_limit: bool,
    /// S7: offered refunds/s to each merchant that stays up.
    #[arg(long, default_value_t = 200.0)]
    pub s7_rate: f64,
    /// S7: offered refunds/s to the merchant whose provider goes down.
    #[arg(long, default_value_t = 100.0)]
    pub s7_down_rate: f64,
    /// S7: seconds of load before the outage.
    #[arg(long, default_value_t = 15.0)]
    pub s7_before_secs: f64,
    /// S7: seconds the provider is down.
    #[arg(long, default_value_t = 60.0)]
    pub outage_secs: f64,
    /// S7: seconds of load after the provider's return.
    #[arg(long, default_value_t = 10.0)]
    pub s7_after_secs: f64,
}

impl Options {
    /// Applies `--quick` and the defaults that depend on `--jobs`.
    pub fn resolved(mut self) -> Self {
        if self.quick {
            self.jobs = self.jobs.min(2_000);
            self.backlog = self.backlog.min(5_000);
            self.paced_secs = self.paced_secs.min(5.0);
            self.pg_refunds = Some(self.pg_refunds.unwrap_or(1_000).min(1_000));
            self.amqp_messages = Some(self.amqp_messages.unwrap_or(5_000).min(5_000));
            self.s7_before_secs = self.s7_before_secs.min(8.0);
            self.outage_secs = self.outage_secs.min(15.0);
            self.s7_after_secs = self.s7_after_secs.min(5.0);
        }
        self.pg_refunds.get_or_insert(self.jobs / 2);
        self.amqp_messages.get_or_insert(self.jobs * 5 / 2);
        self.scenarios = self
            .scenarios
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        self
    }

    fn wants(&self, id: &str) -> bool {
        self.scenarios.iter().any(|s| s.eq_ignore_ascii_case(id))
    }
}

/// What every scenario shares.
pub struct Env {
    pub bin_dir: PathBuf,
    pub admin_url: String,
    pub amqp_url: String,
    pub pg_socket_dir: PathBuf,
    pub log_dir: PathBuf,
    pub worker_log: String,
    pub keep: bool,
    /// The worker config the scenarios start from.
    pub worker_base: Config,
}

/// Drops a scenario database (names are generated by the test kit, never taken from input).
pub async fn drop_db(admin: &mut PgConnection, name: &str) {
    if let Err(e) = sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut *admin)
    .await
    {
        eprintln!("refund-bench: could not drop database {name}: {e}");
    }
}

/// The same database reached through the Unix socket in `dir` (no TCP, so no Nagle).
pub fn unix_socket_url(url: &str, dir: &Path) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}host={}", dir.display())
}

fn socket_available(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(".s.PGSQL."))
        })
        .unwrap_or(false)
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub machine: Machine,
    pub options: Options,
    pub setup: Vec<String>,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub bounds: Vec<String>,
    pub signing: Option<Signing>,
    pub s5: Vec<External>,
    pub scenarios: Vec<Spec>,
    pub ceilings: Vec<Ceiling>,
    pub runs: Vec<PhaseResult>,
    pub s6: Vec<flow::S6Result>,
    pub s7: Vec<flow::S7Result>,
}

impl Report {
    /// What went wrong in the run: phases that reported an error and S5 tools that did not
    /// finish with a report. A target missed is a finding, not a failure.
    pub fn failures(&self) -> Vec<String> {
        let phases = self
            .rows
            .iter()
            .filter(|r| !r.errors.is_empty())
            .map(|r| format!("{} {}: {}", r.scenario, r.phase, r.errors.join("; ")));
        let tools = self
            .s5
            .iter()
            .filter(|x| x.status != "ok")
            .map(|x| format!("{}: {}", x.name, x.status));
        let s6 = self.s6.iter().filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("S6 run {}: {e}", r.rep + 1))
        });
        let s7 = self.s7.iter().filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("S7 run {}: {e}", r.rep + 1))
        });
        phases.chain(tools).chain(s6).chain(s7).collect()
    }
}

/// Runs what `opts` asks for; the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let opts = opts.resolved();
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no folder for the current executable")?
            .to_path_buf(),
    };
    let config_path = if opts.config.exists() {
        opts.config.clone()
    } else {
        testkit::workspace_root().join(&opts.config)
    };
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading the worker config {}", config_path.display()))?;
    let worker_base = Config::from_toml(&text)?;
    std::fs::create_dir_all(&opts.log_dir)?;
    let env = Env {
        bin_dir,
        admin_url: opts.admin_url.clone(),
        amqp_url: opts.amqp_url.clone(),
        pg_socket_dir: opts.pg_socket_dir.clone(),
        log_dir: opts.log_dir.clone(),
        worker_log: opts.worker_log.clone(),
        keep: opts.keep,
        worker_base,
    };
    for b in ["refund-worker", "refund-sim"] {
        children::bin(&env.bin_dir, b)?;
    }
    testkit::check_broker(&env.amqp_url).await?;
    let machine = machine::describe(&env.admin_url).await;
    eprintln!(
        "refund-bench: {} × {}, {} MiB, {}; scenarios {}",
        machine.nproc,
        machine.cpu_model,
        machine.memory_mib,
        machine.date,
        opts.scenarios.join(",")
    );
    let socket = socket_available(&env.pg_socket_dir);
    let mut setup = vec![
        format!(
            "worker: `target/release/refund-worker` as a child process, config {} (prefetch {}, \
             concurrency {}, intake batch {}, {} database connections), RUST_LOG={}, its JSON \
             log to {}",
            config_path.display(),
            env.worker_base.worker.prefetch,
            env.worker_base.worker.concurrency,
            env.worker_base.worker.intake_batch,
            env.worker_base.database.max_connections,
            env.worker_log,
            env.log_dir.display()
        ),
        "simulator: `target/release/refund-sim` as a child process (its CPU is measured apart \
         from the worker's), config/sim.toml's merchants and keys, no coupons, no string \
         amounts, RUST_LOG=warn"
            .into(),
        "publisher: this process, one confirm channel, confirms pipelined (4,096 outstanding), \
         persistent JSON requests of about 300 bytes"
            .into(),
        "each scenario: a fresh database cloned from the migrated template, its own exchange \
         and queue names (classic, durable), a fresh worker process per phase"
            .into(),
    ];
    let mut ceilings: Vec<Ceiling> = Vec::new();
    let mut signing: Option<Signing> = None;
    let mut runs: Vec<PhaseResult> = Vec::new();
    let mut specs: Vec<Spec> = Vec::new();
    for rep in 0..opts.repeat.max(1) {
        if opts.repeat > 1 {
            eprintln!("== repetition {} of {}", rep + 1, opts.repeat);
        }
        if opts.wants("S0") {
            let n = opts.amqp_messages.unwrap_or(50_000);
            for multiple in [false, true] {
                eprintln!("S0 AMQP ceiling ({n} messages, multiple ack: {multiple})");
                match ceilings::amqp(&env, n, &env.worker_base.worker, multiple).await {
                    Ok(c) => {
                        eprintln!("  -> {} msgs/s", num(c.rate, 0));
                        ceilings.push(c)
                    }
                    Err(e) => eprintln!("  AMQP ceiling failed: {e:#}"),
                }
            }
            let n = opts.pg_refunds.unwrap_or(10_000);
            let mut variants = vec![(1usize, PgVariant::Tcp, n)];
            if socket {
                variants.push((1, PgVariant::UnixSocket, n));
            }
            variants.push((1, PgVariant::GenericPlans, n));
            if opts.pg_batch > 1 {
                variants.push((opts.pg_batch, PgVariant::Tcp, n * 3));
            }
            for (batch, variant, count) in variants {
                eprintln!(
                    "S0 PostgreSQL ceiling ({count} refunds, {} tasks, batch {batch}, {variant:?})",
                    opts.pg_clients,
                );
                match ceilings::postgres(&env, count, opts.pg_clients, batch, variant).await {
                    Ok(c) => {
                        eprintln!(
                            "  -> {} refunds/s, {} xacts/refund",
                            num(c.rate, 0),
                            num(c.xacts_per_refund.unwrap_or(f64::NAN), 2)
                        );
                        ceilings.push(c)
                    }
                    Err(e) => eprintln!("  PostgreSQL ceiling failed: {e:#}"),
                }
            }
            if signing.is_none() {
                match ceilings::signing(2_000) {
                    Ok(s) => signing = Some(s),
                    Err(e) => eprintln!("  signing benchmark failed: {e:#}"),
                }
            }
        }
        let mut s1_rate = None;
        for id in ["S1", "S1u", "S1s", "S2", "S3", "S4"] {
            if !opts.wants(id) {
                continue;
            }
            if id == "S1u" && !socket {
                eprintln!(
                    "S1u skipped: no PostgreSQL socket in {}",
                    env.pg_socket_dir.display()
                );
                continue;
            }
            let Some(spec) = spec(&opts, &env.worker_base, id, s1_rate) else {
                continue;
            };
            match scenario::run(&env, &spec, rep).await {
                Ok(results) => {
                    if id == "S1" {
                        s1_rate = results
                            .iter()
                            .find(|r| r.phase == "max" && r.error.is_none())
                            .map(|r| r.rate);
                    }
                    runs.extend(results);
                }
                Err(e) => {
                    eprintln!("{id} failed: {e:#}");
                    let mut r = PhaseResult::failed(&spec, format!("{e:#}"));
                    r.phase = "max".into();
                    runs.push(r);
                }
            }
            if rep == 0 {
                specs.push(spec);
            }
        }
    }
    let mut s5 = Vec::new();
    let mut s6 = Vec::new();
    let mut s7 = Vec::new();
    for rep in 0..opts.repeat.max(1) {
        if opts.repeat > 1 && (opts.wants("S6") || opts.wants("S7")) {
            eprintln!("== S6/S7 repetition {} of {}", rep + 1, opts.repeat);
        }
        if opts.wants("S6") {
            s6.push(flow::s6(&env, &opts, rep).await);
        }
        if opts.wants("S7") {
            s7.push(flow::s7(&env, &opts, rep).await);
        }
    }
    if opts.wants("S5") {
        let timeout = Duration::from_secs(opts.external_timeout_secs);
        for name in ["reconcile-bench", "dlq-bench"] {
            s5.push(external(&env, name, opts.quick, timeout).await);
        }
    }
    let mut rows = report::ceiling_rows(&ceilings);
    let mut scen = report::scenario_rows(&runs);
    let amqp = amqp_ceiling(&rows).map(|r| r.rate);
    let pg = rows
        .iter()
        .find(|r| r.scenario == "S0 pg unbatched")
        .map(|r| r.rate);
    let pgb = rows
        .iter()
        .find(|r| r.scenario.starts_with("S0 pg batched"))
        .map(|r| r.rate);
    for r in rows.iter_mut().chain(scen.iter_mut()) {
        r.ratio_amqp = amqp.map(|a| r.rate / a).unwrap_or(f64::NAN);
        r.ratio_pg = pg.map(|a| r.rate / a).unwrap_or(f64::NAN);
        r.ratio_pg_batched = pgb.map(|a| r.rate / a).unwrap_or(f64::NAN);
        if r.scenario == "S0 amqp" || r.scenario == "S0 amqp multiple-ack" {
            r.ratio_pg = f64::NAN;
            r.ratio_pg_batched = f64::NAN;
        }
        if r.scenario.starts_with("S0 pg") {
            r.ratio_amqp = f64::NAN;
        }
    }
    rows.extend(scen);
    for s in &specs {
        setup.push(format!(
            "{}: {} — merchants {}, concurrency {} ({}), prefetch {}{}{}",
            s.id,
            s.title,
            s.merchants.join(", "),
            s.concurrency,
            s.sizing,
            s.prefetch,
            if s.rules.is_empty() {
                String::new()
            } else {
                format!(", simulator rules: {}", describe_rules(&s.rules))
            },
            if s.unix_socket {
                format!(
                    ", database over {}",
                    unix_socket_url("…", &env.pg_socket_dir)
                )
            } else {
                String::new()
            }
        ));
    }
    setup.extend(flow::setup_notes(&opts, !s6.is_empty(), !s7.is_empty()));
    let mut targets = targets(&rows, signing.as_ref(), &opts);
    targets.extend(flow::targets(&s6, &s7));
    let bounds = bounds(&rows);
    Ok(Report {
        tool: format!("refund-bench {}", env!("CARGO_PKG_VERSION")),
        machine,
        options: opts,
        setup,
        rows,
        targets,
        bounds,
        signing,
        s5,
        scenarios: specs,
        ceilings,
        runs,
        s6,
        s7,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_faults_add_up_to_the_total() {
        let rules = transport_faults(0.10);
        let mut left = 1.0;
        let mut fired = 0.0;
        for r in &rules {
            let p = left * r.rate.unwrap_or(1.0);
            fired += p;
            left -= p;
        }
        assert!((fired - 0.10).abs() < 1e-9, "{fired}");
    }

    #[test]
    fn littles_law_sizes_in_flight_work() {
        assert_eq!(littles_law(2_500.0, 50, 10.0), 188);
        // S1 at 2,500/s with 128 slots: each job holds its slot 51.2 ms.
        let own = own_time_ms(Some(2_500.0), 128);
        assert!((own - 51.2).abs() < 1e-9);
        assert_eq!(littles_law(2_500.0, 50, own), 317);
        assert_eq!(own_time_ms(None, 128), 10.0);
    }

    #[test]
    fn the_markdown_section_is_replaced_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b.md");
        std::fs::write(&p, "# Bench\n\nintro\n").expect("write");
        write_markdown(&p, "one").expect("first");
        write_markdown(&p, "two").expect("second");
        let text = std::fs::read_to_string(&p).expect("read");
        assert!(text.starts_with("# Bench\n\nintro\n"));
        assert!(text.contains("two") && !text.contains("one"));
        assert_eq!(text.matches(END).count(), 1);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(15_400.4, 0), "15,400");
        assert_eq!(num(1_060.0, 1), "1,060.0");
        assert_eq!(num(-1234.5, 1), "-1,234.5");
        assert_eq!(num(f64::NAN, 1), "—");
        assert_eq!(num(999.0, 0), "999");
    }
}
