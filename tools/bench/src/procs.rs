//! Where the CPU goes: per-process CPU time and memory read from `/proc`.
//!
//! A scenario is bracketed by two [`CpuSample`]s; their [`CpuUse`] difference says how many
//! CPU-seconds the worker, the simulator, this bench, RabbitMQ (`beam.smp`), PostgreSQL (the
//! scenario database's own backends, and every `postgres` process) and everything else on the
//! machine used in between. That is the evidence for "what bounds it": a machine that is 100%
//! busy is CPU-bound, and the table shows which process took the cores.
//!
//! Linux only (it reads `/proc/<pid>/stat`, `/proc/<pid>/status` and `/proc/stat`).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`, 100 on every Linux we know).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Online CPUs.
pub fn ncpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3 is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User and system (kernel) CPU seconds a process (all its threads) has used so far.
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let f = stat_fields(pid)?;
    // utime is field 14, stime field 15 (1-based): indices 11 and 12 after the name.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime as f64 / clk_tck(), stime as f64 / clk_tck()))
}

/// User plus system CPU seconds a process (all its threads) has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// CPU seconds the calling thread has run (`/proc/thread-self/schedstat`, nanoseconds), so a
/// micro-benchmark is not inflated by other processes taking the core.
pub fn thread_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

/// A `kB` line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Peak resident set size (`VmHWM`) in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM").map(|k| k as f64 / 1024.0)
}

/// Current resident set size (`VmRSS`) in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS").map(|k| k as f64 / 1024.0)
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whole-machine CPU ticks from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SysCpu {
    /// user + nice + system + irq + softirq
    pub busy: u64,
    pub idle: u64,
    pub steal: u64,
}

fn sys_cpu() -> SysCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return SysCpu::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    SysCpu {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
    }
}

/// What to look for in a sample.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    pub worker: Option<u32>,
    pub sim: Option<u32>,
    /// The scenario database: backends whose command line names it are "this DB's backends".
    pub db_name: Option<String>,
    /// Backends that are the bench's own (its monitoring connection): not the system's cost.
    pub exclude: Vec<u32>,
}

/// CPU seconds used so far by each watched process, and the machine's tick counters.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    sys: SysCpu,
    /// (user, system) seconds.
    worker: (f64, f64),
    sim: f64,
    bench: f64,
    beam: HashMap<u32, f64>,
    /// Every `postgres` process: (CPU seconds, is a backend of the scenario database).
    pg: HashMap<u32, (f64, bool)>,
    /// The scenario database's backends: system (kernel) seconds.
    pg_db_sys: HashMap<u32, f64>,
}

/// Takes a sample now.
pub fn sample(w: &Watch) -> CpuSample {
    let mut beam = HashMap::new();
    let mut pg = HashMap::new();
    let mut pg_db_sys = HashMap::new();
    let db_marker = w.db_name.as_ref().map(|d| format!(" {d} "));
    for pid in pids() {
        let Some(c) = comm(pid) else { continue };
        if c == "beam.smp" {
            if let Some(s) = cpu_seconds(pid) {
                beam.insert(pid, s);
            }
        } else if c == "postgres" && !w.exclude.contains(&pid) {
            let Some((user, sys)) = cpu_split(pid) else {
                continue;
            };
            let mine = db_marker
                .as_ref()
                .is_some_and(|m| cmdline(pid).is_some_and(|cl| cl.contains(m.as_str())));
            pg.insert(pid, (user + sys, mine));
            if mine {
                pg_db_sys.insert(pid, sys);
            }
        }
    }
    CpuSample {
        at: Instant::now(),
        sys: sys_cpu(),
        worker: w.worker.and_then(cpu_split).unwrap_or((0.0, 0.0)),
        sim: w.sim.and_then(cpu_seconds).unwrap_or(0.0),
        bench: cpu_seconds(std::process::id()).unwrap_or(0.0),
        beam,
        pg,
        pg_db_sys,
    }
}

/// CPU used between two samples, in CPU-seconds, and the wall time between them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    pub worker_s: f64,
    /// Of `worker_s`, in the kernel (system calls: sockets, futexes, writes).
    pub worker_sys_s: f64,
    pub sim_s: f64,
    pub bench_s: f64,
    pub rabbitmq_s: f64,
    /// Backends connected to the scenario database (the worker's pool, or the ceiling's).
    pub pg_db_s: f64,
    /// Of `pg_db_s`, in the kernel (sockets, WAL writes and fsyncs).
    pub pg_db_sys_s: f64,
    /// Every `postgres` process: this database's backends, other databases' (other users of
    /// the server), WAL writer, checkpointer, autovacuum.
    pub pg_all_s: f64,
    /// Busy CPU of the whole machine (all processes, kernel included).
    pub machine_busy_s: f64,
    /// CPU time the hypervisor gave to someone else.
    pub steal_s: f64,
    /// Busy time not attributed to the processes above (compilers, other tests, the kernel).
    pub other_s: f64,
    pub ncpu: usize,
}

impl CpuUse {
    /// Machine busy share, 0..=1, of all CPUs over the window.
    pub fn machine_busy_share(&self) -> f64 {
        if self.wall_s <= 0.0 {
            return 0.0;
        }
        self.machine_busy_s / (self.wall_s * self.ncpu as f64)
    }

    /// CPU-seconds per wall second: how many cores a consumer kept busy.
    pub fn cores(&self, seconds: f64) -> f64 {
        if self.wall_s <= 0.0 {
            0.0
        } else {
            seconds / self.wall_s
        }
    }

    /// "worker 0.71, postgres 0.82 (this DB 0.60), ..." in cores, largest first.
    pub fn breakdown(&self) -> String {
        let mut parts = [
            ("worker", self.worker_s),
            ("postgres", self.pg_all_s),
            ("rabbitmq", self.rabbitmq_s),
            ("simulator", self.sim_s),
            ("bench", self.bench_s),
            ("other", self.other_s),
        ];
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        parts
            .iter()
            .map(|(name, s)| {
                if *name == "postgres" {
                    format!(
                        "postgres {:.2} (this DB's backends {:.2})",
                        self.cores(*s),
                        self.cores(self.pg_db_s)
                    )
                } else {
                    format!("{name} {:.2}", self.cores(*s))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The CPU used from `a` to `b`.
pub fn delta(a: &CpuSample, b: &CpuSample) -> CpuUse {
    let tck = clk_tck();
    let since = |map_a: &HashMap<u32, f64>, map_b: &HashMap<u32, f64>| -> f64 {
        map_b
            .iter()
            .map(|(pid, s)| (s - map_a.get(pid).copied().unwrap_or(0.0)).max(0.0))
            .sum()
    };
    let pg_a: HashMap<u32, f64> = a.pg.iter().map(|(p, (s, _))| (*p, *s)).collect();
    let pg_b: HashMap<u32, f64> = b.pg.iter().map(|(p, (s, _))| (*p, *s)).collect();
    let pg_db_b: HashMap<u32, f64> =
        b.pg.iter()
            .filter(|(_, (_, mine))| *mine)
            .map(|(p, (s, _))| (*p, *s))
            .collect();
    let worker_s = ((b.worker.0 + b.worker.1) - (a.worker.0 + a.worker.1)).max(0.0);
    let worker_sys_s = (b.worker.1 - a.worker.1).max(0.0);
    let pg_db_sys_s = since(&a.pg_db_sys, &b.pg_db_sys);
    let sim_s = (b.sim - a.sim).max(0.0);
    let bench_s = (b.bench - a.bench).max(0.0);
    let rabbitmq_s = since(&a.beam, &b.beam);
    let pg_all_s = since(&pg_a, &pg_b);
    let pg_db_s = since(&pg_a, &pg_db_b);
    let machine_busy_s = b.sys.busy.saturating_sub(a.sys.busy) as f64 / tck;
    let steal_s = b.sys.steal.saturating_sub(a.sys.steal) as f64 / tck;
    let attributed = worker_s + sim_s + bench_s + rabbitmq_s + pg_all_s;
    CpuUse {
        wall_s: b.at.duration_since(a.at).as_secs_f64(),
        worker_s,
        worker_sys_s,
        sim_s,
        bench_s,
        rabbitmq_s,
        pg_db_s,
        pg_db_sys_s,
        pg_all_s,
        machine_busy_s,
        steal_s,
        other_s: (machine_busy_s - attributed).max(0.0),
        ncpu: ncpu(),
    }
}
