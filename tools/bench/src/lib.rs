//! `refund-bench`: how fast the refund processor is on this machine, and how far it is from
//! what the machine allows (issue #8).
//!
//! Everything is local: PostgreSQL and RabbitMQ as configured, the provider simulator and the
//! worker as child processes built next to this binary. A run measures the machine's ceilings
//! first (S0: raw AMQP publish+consume+ack, and the job's own PostgreSQL transactions driven
//! directly), then the scenarios (S1 WuPay SOAP, S1u the same over PostgreSQL's Unix socket,
//! S1s ShengPay with RSA, S2 provider latency, S3 a backlog drain, S4 transport faults), then
//! the reconciler's and `dlq list`'s own benchmarks (S5) when they are built. It prints a table,
//! and writes JSON and a Markdown section for `docs/benchmarks.md`, each with the machine and
//! the date.
//!
//! The crate also holds the two focused benchmarks it runs in S5, `reconcile-bench` and
//! `dlq-bench` (binaries of their own). Developers run it through `just bench`; nothing that
//! ships depends on it.
//!
//! Modules: [`ceilings`] (S0), [`scenario`] (S1–S4), [`children`] (the simulator and worker
//! processes), [`publish`] (requests with confirms, timed), [`procs`] (CPU and memory from
//! `/proc`), [`stats`] (percentiles, medians, PostgreSQL counters), [`machine`], [`report`].

pub mod ceilings;
pub mod children;
pub mod machine;
pub mod procs;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use shared::config::Config;
use shared::job::ProviderKind;
use sqlx::{AssertSqlSafe, PgConnection};

use refund_sim::{FaultAction, FaultRule, Provider};
use ceilings::{Ceiling, PgVariant, Signing};
use machine::Machine;
use report::{Row, num};
use scenario::{Phase, PhaseResult, Spec};

/// Every scenario, in the order they run.
pub const ALL: [&str; 8] = ["S0", "S1", "S1u", "S1s", "S2", "S3", "S4", "S5"];

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
    /// (backlog drain), S4 (transport faults), S5 (reconciler and dlq list benches).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "S0,S1,S1u,S1s,S2,S3,S4,S5"
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
    /// Small sizes for a smoke run (CI, development): 2,000 jobs, 5,000 backlog, 5 s paced.
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

/// Concurrency for a provider latency by Little's law: in flight = rate × time in flight,
/// with the time in flight = latency + our own time per job (`own_ms`), and 25% headroom.
pub fn littles_law(rate: f64, latency_ms: u64, own_ms: f64) -> usize {
    (rate * (latency_ms as f64 + own_ms) / 1000.0 * 1.25).ceil() as usize
}

/// Our own time in flight per job, by Little's law from S1's maximum: with every slot busy,
/// a job holds its slot for concurrency / rate (claim, call and record, batching waits
/// included); 10 ms when S1 did not run.
pub fn own_time_ms(s1_rate: Option<f64>, concurrency: usize) -> f64 {
    match s1_rate {
        Some(r) if r > 0.0 => concurrency as f64 * 1000.0 / r,
        _ => 10.0,
    }
}

/// One S5 benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct External {
    pub name: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub seconds: f64,
    pub json: Option<serde_json::Value>,
    pub output_tail: String,
}

/// A target of the issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
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
        phases.chain(tools).collect()
    }
}

fn wupay_soap() -> (ProviderKind, Vec<String>) {
    (ProviderKind::Wupay, vec!["wu-soap11".into()])
}

fn shengpay() -> (ProviderKind, Vec<String>) {
    (
        ProviderKind::Shengpay,
        vec!["93751497".into(), "10000002".into()],
    )
}

/// Three equal transport faults adding up to `total` of the calls (rules are checked in
/// order, so each later rule's rate is raised for the calls the earlier ones left).
fn transport_faults(total: f64) -> Vec<FaultRule> {
    let each = total / 3.0;
    let mut left = 1.0;
    [
        FaultAction::Reset,
        FaultAction::Http500,
        FaultAction::DropResponse,
    ]
    .into_iter()
    .map(|a| {
        let r = (each / left).clamp(0.0, 1.0);
        left -= each;
        FaultRule::new(a).provider(Provider::ShengPay).rate(r)
    })
    .collect()
}

/// The scenario specs (S2's concurrency from S1's measured rate when there is one).
fn spec(opts: &Options, base: &Config, id: &str, s1_rate: Option<f64>) -> Option<Spec> {
    let jobs = opts.jobs;
    let conc = opts.concurrency.unwrap_or(base.worker.concurrency);
    let pre = opts.prefetch.unwrap_or(base.worker.prefetch);
    let paced = Phase::Paced {
        fraction: opts.load_fraction,
        secs: opts.paced_secs,
    };
    let configured = if opts.concurrency.is_some() {
        "--concurrency".to_owned()
    } else {
        "the config file's".to_owned()
    };
    let mk = |id: &str, title: &str, (provider, merchants): (ProviderKind, Vec<String>)| Spec {
        id: id.into(),
        title: title.into(),
        provider,
        merchants,
        rules: Vec::new(),
        provider_latency_ms: 0,
        unix_socket: false,
        concurrency: conc,
        prefetch: pre,
        sizing: configured.clone(),
        phases: vec![Phase::Max(jobs), paced.clone()],
    };
    Some(match id {
        "S1" => mk("S1", "WuPay SOAP 1.1, no added latency", wupay_soap()),
        "S1u" => Spec {
            unix_socket: true,
            ..mk(
                "S1u",
                "S1 with the worker on PostgreSQL's Unix socket (no TCP, no Nagle)",
                wupay_soap(),
            )
        },
        "S1s" => mk(
            "S1s",
            "ShengPay, RSA (SHA1) and RSA2 (SHA256) signed requests, verified responses",
            shengpay(),
        ),
        "S2" => {
            let target = s1_rate.unwrap_or(0.0).max(2_500.0);
            let (concurrency, sizing) = match opts.concurrency {
                Some(c) => (c, "--concurrency".to_owned()),
                None => {
                    let own = own_time_ms(s1_rate, conc);
                    let c = littles_law(target, opts.latency_ms, own).max(conc);
                    (
                        c,
                        format!(
                            "Little's law: {} refunds/s × ({} ms provider + {} ms own, from S1's \
                             maximum: concurrency / rate) × 1.25 headroom = {c} in flight",
                            num(target, 0),
                            opts.latency_ms,
                            num(own, 0)
                        ),
                    )
                }
            };
            let prefetch = opts
                .prefetch
                .unwrap_or_else(|| (concurrency * 2).clamp(pre as usize, u16::MAX as usize) as u16);
            Spec {
                rules: vec![FaultRule::latency(opts.latency_ms)],
                provider_latency_ms: opts.latency_ms,
                concurrency,
                prefetch,
                sizing,
                ..mk(
                    "S2",
                    &format!("WuPay SOAP 1.1, {} ms provider latency", opts.latency_ms),
                    wupay_soap(),
                )
            }
        }
        "S3" => Spec {
            phases: vec![Phase::Backlog(opts.backlog)],
            ..mk(
                "S3",
                &format!(
                    "drain of a {}-job backlog (WuPay SOAP 1.1)",
                    num(opts.backlog as f64, 0)
                ),
                wupay_soap(),
            )
        },
        "S4" => Spec {
            rules: transport_faults(opts.fault_rate),
            phases: vec![Phase::Max(jobs)],
            ..mk(
                "S4",
                &format!(
                    "ShengPay with {:.0}% transport faults (reset, HTTP 500, drop_response), \
                     idempotent merchants",
                    opts.fault_rate * 100.0
                ),
                shengpay(),
            )
        },
        _ => return None,
    })
}

async fn external(env: &Env, name: &str, quick: bool, timeout: Duration) -> External {
    let path = env.bin_dir.join(name);
    let mut out = External {
        name: name.into(),
        status: "not available".into(),
        exit_code: None,
        seconds: 0.0,
        json: None,
        output_tail: String::new(),
    };
    if !path.exists() {
        out.output_tail = format!("{} is not built", path.display());
        return out;
    }
    let mut cmd = tokio::process::Command::new(&path);
    cmd.env("DATABASE_URL", &env.admin_url)
        .env("AMQP_URL", &env.amqp_url)
        .kill_on_drop(true);
    let help = std::process::Command::new(&path)
        .arg("--help")
        .output()
        .map(|h| String::from_utf8_lossy(&h.stdout).into_owned())
        .unwrap_or_default();
    let json_file = env.log_dir.join(format!("{name}.json"));
    let _ = std::fs::remove_file(&json_file);
    if help.contains("--json <") {
        cmd.arg("--json").arg(&json_file);
    }
    if quick && help.contains("--dead <") {
        cmd.args([
            "--dead", "5000", "--other", "5000", "--poison", "100", "--runs", "5",
        ]);
    }
    if quick && help.contains("--rows <") {
        cmd.args(["--rows", "100000", "--repeat", "2"]);
    }
    eprintln!("S5: {}", path.display());
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, cmd.output()).await;
    out.seconds = started.elapsed().as_secs_f64();
    let output = match result {
        Err(_) => {
            out.status = format!("timed out after {} s", timeout.as_secs());
            return out;
        }
        Ok(Err(e)) => {
            out.status = format!("could not run: {e}");
            return out;
        }
        Ok(Ok(o)) => o,
    };
    out.exit_code = output.status.code();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    out.json = std::fs::read_to_string(&json_file)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .or_else(|| serde_json::from_str::<serde_json::Value>(stdout.trim()).ok())
        .or_else(|| {
            stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
                .filter(|v| v.is_object())
        });
    let tail: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    out.output_tail = tail[tail.len().saturating_sub(30)..].join("\n");
    out.status = match (out.exit_code, &out.json) {
        (Some(0), Some(_)) => "ok".into(),
        (c, Some(_)) => format!(
            "ran, exit {} (see its output)",
            c.map(|c| c.to_string())
                .unwrap_or_else(|| "by signal".into())
        ),
        (c, None) => format!(
            "ran, exit {}, no JSON output",
            c.map(|c| c.to_string())
                .unwrap_or_else(|| "by signal".into())
        ),
    };
    out
}

fn find_row<'a>(rows: &'a [Row], scenario: &str, phase: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.phase.starts_with(phase) && r.rate.is_finite())
}

fn targets(rows: &[Row], signing: Option<&Signing>, opts: &Options) -> Vec<Target> {
    let mut t = Vec::new();
    let paced = format!("{:.0}% load", opts.load_fraction * 100.0);
    let mut rate_target = |label: &str, id: &str, min: f64| {
        if let Some(r) = find_row(rows, id, "max") {
            t.push(Target {
                target: label.into(),
                measured: format!("{} refunds/s", num(r.rate, 0)),
                met: Some(r.rate >= min),
            });
        }
    };
    rate_target("S1 ≥ 2,500 refunds/s", "S1", 2_500.0);
    rate_target("S1s ≥ 1,000 refunds/s", "S1s", 1_000.0);
    if let Some(r) = find_row(rows, "S1s", "max") {
        t.push(Target {
            target: "S1s worker CPU ≤ 1 ms per ShengPay refund".into(),
            measured: format!("{} µs", num(r.worker_cpu_us_per_refund, 0)),
            met: Some(r.worker_cpu_us_per_refund <= 1_000.0),
        });
        if let Some(s) = signing {
            let rsa = (s.sign_rsa_sha1_us + s.sign_rsa2_sha256_us) / 2.0 + s.verify_rsa_sha1_us;
            let share = rsa / r.worker_cpu_us_per_refund;
            t.push(Target {
                target: "S1s: signing is most of the worker's CPU per refund".into(),
                measured: format!(
                    "sign + verify {} µs = {:.0}% of {} µs",
                    num(rsa, 0),
                    share * 100.0,
                    num(r.worker_cpu_us_per_refund, 0)
                ),
                met: Some(share > 0.5),
            });
        }
    }
    if let (Some(s1), Some(s2)) = (find_row(rows, "S1", "max"), find_row(rows, "S2", "max")) {
        t.push(Target {
            target: format!("S2 ({} ms latency) ≥ 0.9 × S1", opts.latency_ms),
            measured: format!(
                "{} / {} = {:.2} × (concurrency {})",
                num(s2.rate, 0),
                num(s1.rate, 0),
                s2.rate / s1.rate,
                s2.concurrency.unwrap_or(0)
            ),
            met: Some(s2.rate >= 0.9 * s1.rate),
        });
    }
    for id in ["S1", "S1s", "S2"] {
        if let Some(r) = find_row(rows, id, &paced) {
            let limit = r.provider_latency_ms.unwrap_or(0) as f64 + 30.0;
            t.push(Target {
                target: format!("{id} p99 ≤ {} ms at {paced} of its maximum rate", limit),
                measured: format!(
                    "p99 {} ms (p50 {} ms) at {} refunds/s",
                    num(r.p99_ms, 1),
                    num(r.p50_ms, 1),
                    num(r.rate, 0)
                ),
                met: Some(r.p99_ms <= limit),
            });
        }
    }
    if let Some(r) = find_row(rows, "S3", "drain") {
        t.push(Target {
            target: format!(
                "worker peak RSS ≤ 100 MiB during the S3 drain of {}",
                num(r.refunds, 0)
            ),
            measured: format!(
                "{} MiB (drained at {} refunds/s)",
                num(r.worker_peak_rss_mib, 1),
                num(r.rate, 0)
            ),
            met: Some(r.worker_peak_rss_mib <= 100.0),
        });
    }
    t
}

/// What bounds each scenario, from the figures: CPU saturation and who used it, the CPU
/// budget per refund, the database's share, and Little's law where latency is added.
fn bounds(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    let pg = rows.iter().find(|r| r.scenario == "S0 pg unbatched");
    let pgb = rows
        .iter()
        .find(|r| r.scenario.starts_with("S0 pg batched"));
    let amqp = amqp_ceiling(rows);
    for r in rows {
        if !r.rate.is_finite() || r.rate <= 0.0 {
            continue;
        }
        let mut s = format!(
            "**{} {}** — {} refunds/s. ",
            r.scenario,
            r.phase,
            num(r.rate, 0)
        );
        let busy = r.machine_busy_pct;
        // CPU the hypervisor gave to other guests is CPU this machine did not have either.
        let saturation = (r.cores.machine + r.cores.steal) / r.ncpu.max(1) as f64 * 100.0;
        let _ = write!(
            s,
            "Machine {}% busy ({} of {} cores; worker {}, postgres {} (this DB's backends {}), \
             rabbitmq {}, simulator {}, bench {}, other {}; {} stolen by the hypervisor). ",
            num(busy, 0),
            num(r.cores.machine, 2),
            r.ncpu,
            num(r.cores.worker, 2),
            num(r.cores.postgres, 2),
            num(r.cores.postgres_this_db, 2),
            num(r.cores.rabbitmq, 2),
            num(r.cores.simulator, 2),
            num(r.cores.bench, 2),
            num(r.cores.other, 2),
            num(r.cores.steal, 2),
        );
        if r.phase == "ceiling" {
            let _ = write!(
                s,
                "CPU per refund: server {} µs, client {} µs.",
                num(
                    r.per_refund_us
                        .postgres_this_db
                        .max(r.per_refund_us.rabbitmq),
                    0
                ),
                num(r.per_refund_us.bench, 0)
            );
            out.push(s);
            continue;
        }
        let _ = write!(
            s,
            "CPU per refund: worker {} µs + postgres {} µs + rabbitmq {} µs = {} µs \
             (simulator {} µs, bench {} µs besides), so this machine's {} cores allow at most \
             {} refunds/s for the system alone ({}% of the worker's CPU and {}% of its \
             database backends' is kernel time). ",
            num(r.per_refund_us.worker, 0),
            num(r.per_refund_us.postgres_all, 0),
            num(r.per_refund_us.rabbitmq, 0),
            num(r.per_refund_us.system, 0),
            num(r.per_refund_us.simulator, 0),
            num(r.per_refund_us.bench, 0),
            r.ncpu,
            num(r.cpu_implied_rate, 0),
            num(r.worker_kernel_pct, 0),
            num(r.postgres_kernel_pct, 0),
        );
        if saturation >= 85.0 {
            let (name, cores) = [
                ("postgres", r.cores.postgres),
                ("the worker", r.cores.worker),
                ("rabbitmq", r.cores.rabbitmq),
                ("the simulator", r.cores.simulator),
                ("other processes", r.cores.other),
            ]
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("?", 0.0));
            let _ = write!(
                s,
                "CPU-bound: the cores are saturated; the largest consumer is {name} ({} cores). ",
                num(cores, 2)
            );
        } else if r.provider_latency_ms.unwrap_or(0) > 0 {
            let c = r.concurrency.unwrap_or(0) as f64;
            let lat = r.provider_latency_ms.unwrap_or(0) as f64 / 1000.0;
            let _ = write!(
                s,
                "Not CPU-bound: Little's law caps it at concurrency / time in flight = {} / \
                 ({} ms + own work) < {} refunds/s. ",
                num(c, 0),
                num(lat * 1000.0, 0),
                num(c / lat, 0)
            );
        } else {
            let _ = write!(
                s,
                "Not CPU-saturated ({}% of the cores busy or stolen): the rest of the limit is \
                 waiting (round trips to PostgreSQL and RabbitMQ per refund, commit latency, \
                 scheduling), not cores. ",
                num(saturation, 0)
            );
        }
        if r.cores.other > 0.25 {
            let _ = write!(
                s,
                "Noise: {} cores went to processes outside the test (other users of this \
                 machine); with the machine to itself the figure would be higher. ",
                num(r.cores.other, 2)
            );
        }
        if let Some(pg) = pg
            && r.xacts_per_refund.is_finite()
        {
            let _ = write!(
                s,
                "Database: {} transactions per refund = {} commits/s; the unbatched PG ceiling \
                 ran {} commits/s ({} refunds/s at {} per refund){}. ",
                num(r.xacts_per_refund, 2),
                num(r.xacts_per_refund * r.rate, 0),
                num(pg.xacts_per_refund * pg.rate, 0),
                num(pg.rate, 0),
                num(pg.xacts_per_refund, 2),
                pgb.map(|b| format!(", batched {} refunds/s", num(b.rate, 0)))
                    .unwrap_or_default()
            );
        }
        if r.jobs_hot_pct.is_finite() {
            let _ = write!(
                s,
                "Table `jobs`: {}% of updates HOT; {} rows read by sequential scans per refund. ",
                num(r.jobs_hot_pct, 0),
                num(r.jobs_seq_rows_per_refund, 0)
            );
        }
        if let Some(a) = amqp {
            let _ = write!(
                s,
                "Broker: {:.0}% of the AMQP ceiling ({} msgs/s).",
                r.rate / a.rate * 100.0,
                num(a.rate, 0)
            );
        }
        for e in &r.errors {
            let _ = write!(s, " Error: {e}.");
        }
        out.push(s);
    }
    out
}

/// "reset on 3.3% of shengpay calls, ..." for the setup notes.
fn describe_rules(rules: &[FaultRule]) -> String {
    rules
        .iter()
        .map(|r| {
            let what = match (r.action, r.latency_ms) {
                (Some(a), _) => a.as_str().to_owned(),
                (None, Some(ms)) => format!("{ms} ms latency"),
                (None, None) => "nothing".to_owned(),
            };
            let share = match r.rate {
                Some(p) if p < 1.0 => format!(" on {:.1}% of the remaining", p * 100.0),
                _ => " on all".to_owned(),
            };
            let provider = r.provider.map(|p| format!(" {p}")).unwrap_or_default();
            format!("{what}{share}{provider} calls")
        })
        .collect::<Vec<_>>()
        .join(", then ")
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
    let targets = targets(&rows, signing.as_ref(), &opts);
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
    })
}

/// The report for a terminal.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "\nrefund-bench — {} — {} × {}, {} MiB, kernel {}\n{}\nRabbitMQ {}, sqlx {}\n",
        m.date,
        m.nproc,
        m.cpu_model,
        num(m.memory_mib as f64, 0),
        m.kernel,
        m.postgres_version,
        m.rabbitmq_version,
        m.sqlx_version
    );
    s.push_str(&report::results_table(&r.rows, false));
    s.push_str("\nWhere the CPU went (cores busy during each measurement):\n");
    s.push_str(&report::cpu_table(&r.rows, false));
    if let Some(sg) = &r.signing {
        let _ = writeln!(
            s,
            "\nRSA-{} with OpenSSL, one thread: sign {} µs (SHA1) / {} µs (SHA256), verify {} µs",
            sg.key_bits,
            num(sg.sign_rsa_sha1_us, 0),
            num(sg.sign_rsa2_sha256_us, 0),
            num(sg.verify_rsa_sha1_us, 0)
        );
    }
    s.push_str("\nTargets:\n");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "  [{}] {} — {}",
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "?",
            },
            t.target,
            t.measured
        );
    }
    s.push_str("\nWhat bounds it:\n");
    for b in &r.bounds {
        let _ = writeln!(s, "  - {}", b.replace("**", ""));
    }
    if !r.s5.is_empty() {
        s.push_str("\nS5:\n");
        for e in &r.s5 {
            let _ = writeln!(s, "  {}: {} ({:.1} s)", e.name, e.status, e.seconds);
            if let Some(j) = &e.json {
                let _ = writeln!(s, "    {j}");
            }
        }
    }
    s
}

/// The generated results section of `docs/benchmarks.md`.
pub fn render_markdown(r: &Report) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "## Results of {}\n", m.date);
    let _ = writeln!(
        s,
        "Generated by `{}` (`{}`). Machine: {} × {}, {} MiB RAM, Linux {}; {}; RabbitMQ {}; \
         sqlx {}. Load average at start: {}. PostgreSQL settings: {}.\n\nTCP_NODELAY: {}.\n",
        r.tool,
        command_line(&r.options),
        m.nproc,
        m.cpu_model,
        num(m.memory_mib as f64, 0),
        m.kernel,
        m.postgres_version,
        m.rabbitmq_version,
        m.sqlx_version,
        m.loadavg_at_start,
        m.postgres_settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        m.sqlx_tcp_nodelay,
    );
    s.push_str("Setup:\n\n");
    for line in &r.setup {
        let _ = writeln!(s, "- {line}");
    }
    let _ = writeln!(
        s,
        "\n### Throughput, latency and cost per refund{}\n",
        if r.options.repeat > 1 {
            format!(" (medians of {} runs)", r.options.repeat)
        } else {
            String::new()
        }
    );
    s.push_str(&report::results_table(&r.rows, true));
    s.push_str(
        "\nLatency is end to end: publish → the job's final transition. In a `max` burst it is \
         mostly queueing (all N requests are published at once); the `% load` rows are the \
         latency figures. `(!)` marks a phase that reported an error (see the JSON).\n",
    );
    s.push_str("\n### Where the CPU went\n\n");
    s.push_str(
        "Cores kept busy during each measurement (CPU-seconds per second, from /proc; \
         `postgres` is every postgres process on the server, in brackets the scenario \
         database's own backends). `system CPU µs/refund` = worker + postgres + rabbitmq; \
         `CPU-implied refunds/s` = cores × 1 s / that. WAL figures are cluster-wide.\n\n",
    );
    s.push_str(&report::cpu_table(&r.rows, true));
    if let Some(sg) = &r.signing {
        let _ = writeln!(
            s,
            "\nShengPay RSA-{} with OpenSSL (the worker's own code), one thread: sign {} µs \
             (RSA, SHA1) / {} µs (RSA2, SHA256), verify {} µs.",
            sg.key_bits,
            num(sg.sign_rsa_sha1_us, 0),
            num(sg.sign_rsa2_sha256_us, 0),
            num(sg.verify_rsa_sha1_us, 0)
        );
    }
    s.push_str("\n### Targets\n\n| target | measured | met |\n|---|---|---|\n");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            t.target,
            t.measured,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "?",
            }
        );
    }
    s.push_str("\n### What bounds each figure\n\n");
    for b in &r.bounds {
        let _ = writeln!(s, "- {b}");
    }
    if !r.s5.is_empty() {
        s.push_str("\n### S5: reconciler and `dlq list`\n\n");
        for e in &r.s5 {
            let _ = writeln!(
                s,
                "- `{}`: {} ({:.1} s){}",
                e.name,
                e.status,
                e.seconds,
                e.json
                    .as_ref()
                    .map(|j| format!("\n\n  ```json\n  {j}\n  ```\n"))
                    .unwrap_or_default()
            );
        }
    }
    s
}

fn command_line(o: &Options) -> String {
    let mut c = format!(
        "refund-bench --scenarios {} --jobs {} --backlog {} --repeat {}",
        o.scenarios.join(","),
        o.jobs,
        o.backlog,
        o.repeat
    );
    if o.quick {
        c.push_str(" --quick");
    }
    c
}

const BEGIN: &str = "<!-- refund-bench:begin (generated: `just bench` rewrites this section) -->";
const END: &str = "<!-- refund-bench:end -->";

/// Replaces the generated section of `path` (or appends one).
pub fn write_markdown(path: &Path, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n\n{section}\n{END}");
    let new = match (old.find("<!-- refund-bench:begin"), old.find(END)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{block}{}", &old[..a], &old[b + END.len()..])
        }
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}{block}\n")
        }
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

/// The AMQP ceiling the scenarios are compared with: acking as the worker does (one `multiple`
/// ack per batch), or the one-ack-per-delivery run if only that one ran.
fn amqp_ceiling(rows: &[report::Row]) -> Option<&report::Row> {
    rows.iter()
        .find(|r| r.scenario == "S0 amqp multiple-ack")
        .or_else(|| rows.iter().find(|r| r.scenario == "S0 amqp"))
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
