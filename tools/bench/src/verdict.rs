//! What a run's figures mean: each issue target met or missed, what bounds each figure (the
//! machine's ceilings, CPU), and the S5 benchmarks run as child processes.

use super::*;

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

pub(crate) async fn external(env: &Env, name: &str, quick: bool, timeout: Duration) -> External {
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

pub(crate) fn find_row<'a>(rows: &'a [Row], scenario: &str, phase: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.phase.starts_with(phase) && r.rate.is_finite())
}

pub(crate) fn targets(rows: &[Row], signing: Option<&Signing>, opts: &Options) -> Vec<Target> {
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
pub(crate) fn bounds(rows: &[Row]) -> Vec<String> {
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

/// The AMQP ceiling the scenarios are compared with: acking as the worker does (one `multiple`
/// ack per batch), or the one-ack-per-delivery run if only that one ran.
pub(crate) fn amqp_ceiling(rows: &[report::Row]) -> Option<&report::Row> {
    rows.iter()
        .find(|r| r.scenario == "S0 amqp multiple-ack")
        .or_else(|| rows.iter().find(|r| r.scenario == "S0 amqp"))
}
