//! Rendering: the summary rows (medians over repeats) as a plain-text table for the terminal,
//! the same as Markdown for `docs/benchmarks.md`, and the targets and bounds as text.

use std::fmt::Write as _;

use serde::Serialize;

use super::ceilings::Ceiling;
use super::scenario::{PerRefundUs, PhaseResult};
use super::stats::median;

/// Cores kept busy (CPU-seconds per wall second) during a measurement.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cores {
    pub machine: f64,
    pub worker: f64,
    pub postgres: f64,
    pub postgres_this_db: f64,
    pub rabbitmq: f64,
    pub simulator: f64,
    pub bench: f64,
    pub other: f64,
    pub steal: f64,
}

/// One line of the results: a ceiling or a scenario phase, medians over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub phase: String,
    pub title: String,
    pub runs: usize,
    pub refunds: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub worker_cpu_us_per_refund: f64,
    pub worker_peak_rss_mib: f64,
    pub xacts_per_refund: f64,
    /// Provider calls per refund (1 without faults; retries above it).
    pub calls_per_refund: f64,
    pub ratio_amqp: f64,
    pub ratio_pg: f64,
    pub ratio_pg_batched: f64,
    /// Share of all CPUs busy, 0..=100.
    pub machine_busy_pct: f64,
    pub ncpu: usize,
    pub cores: Cores,
    pub per_refund_us: PerRefundUs,
    /// ncpu × 1 s / (system CPU µs per refund): the rate this machine's CPUs would allow if
    /// the system under test had them to itself.
    pub cpu_implied_rate: f64,
    pub wal_bytes_per_refund: f64,
    pub wal_syncs_per_refund: f64,
    /// Share of `jobs` updates that were HOT, 0..=100.
    pub jobs_hot_pct: f64,
    /// Rows of `jobs` read by sequential scans per refund.
    pub jobs_seq_rows_per_refund: f64,
    /// Share of the worker's CPU spent in the kernel, 0..=100.
    pub worker_kernel_pct: f64,
    /// Share of the scenario database's backends' CPU spent in the kernel, 0..=100.
    pub postgres_kernel_pct: f64,
    pub concurrency: Option<usize>,
    pub prefetch: Option<u16>,
    pub provider_latency_ms: Option<u64>,
    pub errors: Vec<String>,
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole * 100.0
    } else {
        f64::NAN
    }
}

fn med<T>(items: &[&T], f: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(|x| f(x)).collect::<Vec<_>>())
}

/// The ceilings' rows, medians per name, in first-seen order.
pub fn ceiling_rows(all: &[Ceiling]) -> Vec<Row> {
    let mut names: Vec<&str> = Vec::new();
    for c in all {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let runs: Vec<&Ceiling> = all.iter().filter(|c| c.name == name).collect();
            let ncpu = runs[0].cpu.ncpu;
            let cores = |f: &dyn Fn(&Ceiling) -> f64| med(&runs, |c| c.cpu.cores(f(c)));
            let is_pg = name.starts_with("S0 pg");
            let client = med(&runs, |c| c.client_cpu_us_per_refund);
            let server = med(&runs, |c| c.server_cpu_us_per_refund);
            let per_refund_us = PerRefundUs {
                worker: 0.0,
                postgres_this_db: if is_pg { server } else { 0.0 },
                postgres_all: med(&runs, |c| c.cpu.pg_all_s * 1e6 / c.count as f64),
                rabbitmq: med(&runs, |c| c.cpu.rabbitmq_s * 1e6 / c.count as f64),
                simulator: 0.0,
                bench: client,
                system: client + server,
            };
            Row {
                scenario: name.to_owned(),
                phase: "ceiling".into(),
                title: runs[0].what.clone(),
                runs: runs.len(),
                refunds: med(&runs, |c| c.count as f64),
                rate: med(&runs, |c| c.rate),
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                worker_cpu_us_per_refund: f64::NAN,
                worker_peak_rss_mib: f64::NAN,
                xacts_per_refund: med(&runs, |c| c.xacts_per_refund.unwrap_or(f64::NAN)),
                calls_per_refund: f64::NAN,
                ratio_amqp: f64::NAN,
                ratio_pg: f64::NAN,
                ratio_pg_batched: f64::NAN,
                machine_busy_pct: med(&runs, |c| c.cpu.machine_busy_share() * 100.0),
                ncpu,
                cores: Cores {
                    machine: cores(&|c| c.cpu.machine_busy_s),
                    worker: 0.0,
                    postgres: cores(&|c| c.cpu.pg_all_s),
                    postgres_this_db: cores(&|c| c.cpu.pg_db_s),
                    rabbitmq: cores(&|c| c.cpu.rabbitmq_s),
                    simulator: 0.0,
                    bench: cores(&|c| c.cpu.bench_s),
                    other: cores(&|c| c.cpu.other_s),
                    steal: cores(&|c| c.cpu.steal_s),
                },
                cpu_implied_rate: ncpu as f64 * 1e6 / per_refund_us.system,
                per_refund_us,
                wal_bytes_per_refund: med(&runs, |c| c.wal_bytes_per_refund.unwrap_or(f64::NAN)),
                wal_syncs_per_refund: med(&runs, |c| c.wal_syncs_per_refund.unwrap_or(f64::NAN)),
                jobs_hot_pct: f64::NAN,
                jobs_seq_rows_per_refund: f64::NAN,
                worker_kernel_pct: f64::NAN,
                postgres_kernel_pct: med(&runs, |c| pct(c.cpu.pg_db_sys_s, c.cpu.pg_db_s)),
                concurrency: None,
                prefetch: None,
                provider_latency_ms: None,
                errors: Vec::new(),
            }
        })
        .collect()
}

/// The scenarios' rows, medians per (scenario, phase), in first-seen order.
pub fn scenario_rows(all: &[PhaseResult]) -> Vec<Row> {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for r in all {
        let k = (r.scenario.as_str(), r.phase.as_str());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(s, p)| {
            let runs: Vec<&PhaseResult> = all
                .iter()
                .filter(|r| r.scenario == s && r.phase == p)
                .collect();
            let ok: Vec<&PhaseResult> =
                runs.iter().copied().filter(|r| r.error.is_none()).collect();
            let use_runs = if ok.is_empty() { runs.clone() } else { ok };
            let ncpu = use_runs[0].cpu.ncpu.max(1);
            let cores = |f: &dyn Fn(&PhaseResult) -> f64| med(&use_runs, |r| r.cpu.cores(f(r)));
            let pr = |f: &dyn Fn(&PerRefundUs) -> f64| med(&use_runs, |r| f(&r.per_refund_us));
            let per_refund_us = PerRefundUs {
                worker: pr(&|x| x.worker),
                postgres_this_db: pr(&|x| x.postgres_this_db),
                postgres_all: pr(&|x| x.postgres_all),
                rabbitmq: pr(&|x| x.rabbitmq),
                simulator: pr(&|x| x.simulator),
                bench: pr(&|x| x.bench),
                system: pr(&|x| x.system),
            };
            Row {
                scenario: s.to_owned(),
                phase: p.to_owned(),
                title: use_runs[0].title.clone(),
                runs: runs.len(),
                refunds: med(&use_runs, |r| r.ended as f64),
                rate: med(&use_runs, |r| r.rate),
                p50_ms: med(&use_runs, |r| r.p50_ms),
                p99_ms: med(&use_runs, |r| r.p99_ms),
                worker_cpu_us_per_refund: med(&use_runs, |r| r.worker_cpu_us_per_refund),
                worker_peak_rss_mib: med(&use_runs, |r| r.worker_peak_rss_mib),
                xacts_per_refund: med(&use_runs, |r| r.xacts_per_refund),
                calls_per_refund: med(&use_runs, |r| {
                    r.provider_calls as f64 / r.ended.max(1) as f64
                }),
                ratio_amqp: f64::NAN,
                ratio_pg: f64::NAN,
                ratio_pg_batched: f64::NAN,
                machine_busy_pct: med(&use_runs, |r| r.cpu.machine_busy_share() * 100.0),
                ncpu,
                cores: Cores {
                    machine: cores(&|r| r.cpu.machine_busy_s),
                    worker: cores(&|r| r.cpu.worker_s),
                    postgres: cores(&|r| r.cpu.pg_all_s),
                    postgres_this_db: cores(&|r| r.cpu.pg_db_s),
                    rabbitmq: cores(&|r| r.cpu.rabbitmq_s),
                    simulator: cores(&|r| r.cpu.sim_s),
                    bench: cores(&|r| r.cpu.bench_s),
                    other: cores(&|r| r.cpu.other_s),
                    steal: cores(&|r| r.cpu.steal_s),
                },
                cpu_implied_rate: ncpu as f64 * 1e6 / per_refund_us.system,
                per_refund_us,
                wal_bytes_per_refund: med(&use_runs, |r| r.wal_bytes_per_refund),
                wal_syncs_per_refund: med(&use_runs, |r| r.wal_syncs_per_refund),
                jobs_hot_pct: med(&use_runs, |r| r.jobs_hot_pct),
                jobs_seq_rows_per_refund: med(&use_runs, |r| r.jobs_seq_rows_per_refund),
                worker_kernel_pct: med(&use_runs, |r| pct(r.cpu.worker_sys_s, r.cpu.worker_s)),
                postgres_kernel_pct: med(&use_runs, |r| pct(r.cpu.pg_db_sys_s, r.cpu.pg_db_s)),
                concurrency: Some(use_runs[0].concurrency),
                prefetch: Some(use_runs[0].prefetch),
                provider_latency_ms: Some(use_runs[0].provider_latency_ms),
                errors: runs.iter().filter_map(|r| r.error.clone()).collect(),
            }
        })
        .collect()
}

/// A number for a table: `—` when missing, thousands separated when large.
pub fn num(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let s = format!("{x:.decimals$}");
    // No "-0.00": a value that rounds to zero is zero.
    let s = if s
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_owned()
    } else {
        s
    };
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), format!(".{f}")),
        None => (s.clone(), String::new()),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", int),
    };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}{frac}")
}

/// A table, aligned for a terminal or as Markdown.
pub fn table(headers: &[&str], rows: &[Vec<String>], markdown: bool) -> String {
    let cols = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let pad = |s: &str, w: usize, left: bool| {
        let n = w.saturating_sub(s.chars().count());
        if left {
            format!("{s}{}", " ".repeat(n))
        } else {
            format!("{}{s}", " ".repeat(n))
        }
    };
    let mut out = String::new();
    let line = |cells: Vec<String>| {
        if markdown {
            format!("| {} |\n", cells.join(" | "))
        } else {
            format!("{}\n", cells.join("  ").trim_end())
        }
    };
    out.push_str(&line(
        headers
            .iter()
            .enumerate()
            .map(|(i, h)| pad(h, width[i], i < 2))
            .collect(),
    ));
    if markdown {
        out.push_str(&line(
            (0..cols)
                .map(|i| {
                    if i < 2 {
                        "-".repeat(width[i].max(3))
                    } else {
                        format!("{}:", "-".repeat(width[i].max(3) - 1))
                    }
                })
                .collect(),
        ));
    } else {
        let total: usize = width.iter().sum::<usize>() + 2 * (cols - 1);
        let _ = writeln!(out, "{}", "-".repeat(total));
    }
    for r in rows {
        out.push_str(&line(
            (0..cols)
                .map(|i| pad(r.get(i).map(String::as_str).unwrap_or(""), width[i], i < 2))
                .collect(),
        ));
    }
    out
}

/// The main table: throughput, latency, cost per refund and the ratios to the ceilings.
pub fn results_table(rows: &[Row], markdown: bool) -> String {
    let headers = [
        "scenario",
        "phase",
        "refunds",
        "refunds/s",
        "p50 ms",
        "p99 ms",
        "worker CPU µs/refund",
        "worker peak RSS MiB",
        "DB xacts/refund",
        "× AMQP ceiling",
        "× PG ceiling",
        "× PG batched",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut phase = r.phase.clone();
            if !r.errors.is_empty() {
                phase.push_str(" (!)");
            }
            vec![
                r.scenario.clone(),
                phase,
                num(r.refunds, 0),
                num(r.rate, 0),
                num(r.p50_ms, 1),
                num(r.p99_ms, 1),
                num(r.worker_cpu_us_per_refund, 0),
                num(r.worker_peak_rss_mib, 1),
                num(r.xacts_per_refund, 2),
                num(r.ratio_amqp, 2),
                num(r.ratio_pg, 2),
                num(r.ratio_pg_batched, 2),
            ]
        })
        .collect();
    table(&headers, &body, markdown)
}

fn pct_cell(x: f64) -> String {
    if x.is_finite() {
        format!("{}%", num(x, 0))
    } else {
        "—".into()
    }
}

/// Where the CPU went: cores busy per process, CPU per refund, and the CPU-implied rate.
pub fn cpu_table(rows: &[Row], markdown: bool) -> String {
    let headers = [
        "scenario",
        "phase",
        "machine busy",
        "worker",
        "postgres (this DB)",
        "rabbitmq",
        "simulator",
        "bench",
        "other",
        "steal",
        "system CPU µs/refund",
        "CPU-implied refunds/s",
        "calls/refund",
        "WAL KiB/refund",
        "WAL fsyncs/refund",
        "worker in kernel",
        "PG backends in kernel",
        "jobs updates HOT",
        "jobs rows seq-scanned/refund",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scenario.clone(),
                r.phase.clone(),
                format!("{}%", num(r.machine_busy_pct, 0)),
                num(r.cores.worker, 2),
                format!(
                    "{} ({})",
                    num(r.cores.postgres, 2),
                    num(r.cores.postgres_this_db, 2)
                ),
                num(r.cores.rabbitmq, 2),
                num(r.cores.simulator, 2),
                num(r.cores.bench, 2),
                num(r.cores.other, 2),
                num(r.cores.steal, 2),
                num(r.per_refund_us.system, 0),
                num(r.cpu_implied_rate, 0),
                num(r.calls_per_refund, 2),
                num(r.wal_bytes_per_refund / 1024.0, 1),
                num(r.wal_syncs_per_refund, 3),
                pct_cell(r.worker_kernel_pct),
                pct_cell(r.postgres_kernel_pct),
                pct_cell(r.jobs_hot_pct),
                num(r.jobs_seq_rows_per_refund, 0),
            ]
        })
        .collect();
    table(&headers, &body, markdown)
}
