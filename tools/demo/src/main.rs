//! `refund-demo`: the main job end to end on local defaults, for a newcomer (`just demo`).
//!
//! Recreates the `refunds_demo` database, starts the provider simulator (in this process, with
//! `config/sim.toml`) and a `refund-worker` (a child process, `config/refunds.toml` pointed at
//! the demo database and demo queues, its notify listener named in the ShengPay merchants'
//! `notify_url`), publishes a mixed batch — both providers, all four WuPay bindings, declines,
//! transport faults, ShengPay's asynchronous ends (by notify, by status query after a lost
//! notify, closed, not credited), duplicates, a conflict, a bad message — waits until
//! every job is final or dead, reads the worker's `/metrics` and `/readyz`, runs the day's
//! reconciliation against the simulator's statement, prints a summary, and stops what it started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use shared::config::Config;
use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use sqlx::{AssertSqlSafe, Connection};
use testkit::{http_get, request_json, wait_ready};

/// Runs the refund processor end to end against the simulator and prints what happened.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Worker configuration (merchants, keys); its database and queues are replaced by demo ones.
    #[arg(long, default_value = "config/refunds.toml")]
    config: PathBuf,
    /// Simulator configuration.
    #[arg(long, default_value = "config/sim.toml")]
    sim_config: PathBuf,
    /// Admin database URL (the demo creates and drops `refunds_demo` through it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// Give up waiting for the jobs after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

const DEMO_DB: &str = "refunds_demo";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM first so the worker drains; SIGKILL if it does not stop.
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(25);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("no folder for the current executable")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is not built: run `cargo build --release --bins` (just demo does)",
            p.display()
        );
    }
    Ok(p)
}

fn with_db(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => format!("{url}/{db}"),
    }
}

/// The batch: (body, what the demo expects of it, in words).
fn batch() -> Vec<(Vec<u8>, &'static str)> {
    let mut out = Vec::new();
    let mut push = |no: String,
                    order: String,
                    kind: ProviderKind,
                    merchant: &str,
                    fee: i64,
                    what: &'static str| {
        let v = request_json(&no, &order, kind, merchant, fee * 4, fee);
        out.push((serde_json::to_vec(&v).unwrap_or_default(), what));
    };
    let sp = ["93751497", "10000002"];
    let wu = ["wu-soap11", "wu-soap12", "wu-post", "wu-get"];
    for i in 0..20 {
        push(
            format!("DEMO-S{i:03}"),
            format!("ORD-S{i:03}"),
            ProviderKind::Shengpay,
            sp[i % 2],
            100 + i as i64 * 37,
            "paid",
        );
    }
    for i in 0..12 {
        push(
            format!("DEMO-W{i:03}"),
            format!("ORD-W{i:03}"),
            ProviderKind::Wupay,
            wu[i % 4],
            250 + i as i64 * 11,
            "paid",
        );
    }
    push(
        "DEMO-DECL1".into(),
        "DECLINE-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        300,
        "declined",
    );
    push(
        "DEMO-DECL2".into(),
        "DECLINE-2".into(),
        ProviderKind::Shengpay,
        sp[1],
        300,
        "declined",
    );
    push(
        "DEMO-DECL3".into(),
        "DECLINE-3".into(),
        ProviderKind::Wupay,
        wu[0],
        300,
        "declined",
    );
    push(
        "DEMO-BUSY1".into(),
        "BUSY2-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        410,
        "paid after two RetryLater",
    );
    push(
        "DEMO-E500S".into(),
        "E500-1".into(),
        ProviderKind::Shengpay,
        sp[1],
        420,
        "paid after an HTTP 500 (idempotent)",
    );
    push(
        "DEMO-RESET".into(),
        "RESET1-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        430,
        "paid after a reset (idempotent)",
    );
    push(
        "DEMO-DROPS".into(),
        "DROP1-1".into(),
        ProviderKind::Shengpay,
        sp[1],
        440,
        "paid; lost response retried safely",
    );
    push(
        "DEMO-BADSG".into(),
        "BADSIG1-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        450,
        "paid after an unverifiable answer",
    );
    push(
        "DEMO-E500W".into(),
        "E500-2".into(),
        ProviderKind::Wupay,
        wu[1],
        460,
        "dead: outcome unknown (not idempotent)",
    );
    push(
        "DEMO-DROPW".into(),
        "DROP1-2".into(),
        ProviderKind::Wupay,
        wu[2],
        470,
        "dead: paid but answer lost (not idempotent); the statement settles it",
    );
    // ShengPay's asynchronous end: every ShengPay refund above is accepted, then booked when
    // its notify arrives; these three end otherwise (rules in config/sim.toml).
    push(
        "DEMO-QUERY".into(),
        "NOTIFYDROP-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        480,
        "paid; notify lost, booked from the status query",
    );
    push(
        "DEMO-CLOSE".into(),
        "CLOSE-1".into(),
        ProviderKind::Shengpay,
        sp[1],
        490,
        "failed: the provider closed the refund",
    );
    push(
        "DEMO-CHANGE".into(),
        "CHANGE-1".into(),
        ProviderKind::Shengpay,
        sp[0],
        500,
        "dead: card not credited (refund_abnormal)",
    );
    // Duplicates (same content again), a conflict (same refund_no, other amount), a bad message.
    for i in 0..3 {
        push(
            format!("DEMO-S{i:03}"),
            format!("ORD-S{i:03}"),
            ProviderKind::Shengpay,
            sp[i % 2],
            100 + i as i64 * 37,
            "duplicate",
        );
    }
    push(
        "DEMO-S005".into(),
        "ORD-S005".into(),
        ProviderKind::Shengpay,
        sp[1],
        999,
        "conflict",
    );
    out.push((
        br#"{"version":1,"refund_no":"DEMO-BAD","order_no":"ORD-BAD","provider":"shengpay","merchant":"93751497","total_fee":1000,"refund_fee":10.5}"#.to_vec(),
        "rejected: float amount",
    ));
    out
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "\nrefund-demo failed: {}",
                shared::telemetry::error_chain(e.as_ref())
            );
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!("== Refund processor demo ==\n");
    // 1. A fresh demo database and demo queues.
    let mut admin = sqlx::PgConnection::connect(&args.admin_url)
        .await
        .context("PostgreSQL is not reachable: run `just up`")?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {DEMO_DB}")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    let mut config = Config::load(Some(&args.config))?;
    config.database_url = with_db(&args.admin_url, DEMO_DB);
    config.amqp.exchange = "demo.refunds".into();
    config.amqp.queue = "demo.refunds.requested".into();
    config.amqp.dead_letter_exchange = "demo.refunds.dlx".into();
    config.amqp.dead_letter_queue = "demo.refunds.dead".into();
    config.amqp.events_exchange = "demo.refunds.events".into();
    config.worker.lease_ms = 15_000;
    config.http.timeout_ms = 3_000;
    let broker = shared::broker::connect(&config.amqp_url, "refund-demo")
        .await
        .context("RabbitMQ is not reachable: run `just up`")?;
    let ch = shared::broker::confirm_channel(&broker).await?;
    for q in [&config.amqp.queue, &config.amqp.dead_letter_queue] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let ch = shared::broker::confirm_channel(&broker).await?;
    shared::broker::declare_topology(&ch, &config.amqp).await?;
    // An events queue, to show what order systems receive.
    ch.queue_declare(
        "demo.refunds.events.all".into(),
        Default::default(),
        Default::default(),
    )
    .await?;
    ch.queue_purge("demo.refunds.events.all".into(), Default::default())
        .await?;
    ch.queue_bind(
        "demo.refunds.events.all".into(),
        config.amqp.events_exchange.as_str().into(),
        "#".into(),
        Default::default(),
        Default::default(),
    )
    .await?;

    // 2. The simulator, on a free port; the worker's merchants point at it.
    let mut sim_cfg = refund_sim::SimConfig::load(&args.sim_config)?;
    sim_cfg.listen = "127.0.0.1:0".parse()?;
    let sim = refund_sim::Simulator::start(sim_cfg).await?;
    // ShengPay's notifies come to the demo worker's own listener, on a free port.
    config.notify.addr = "127.0.0.1:0".into();
    testkit::point_merchants(&mut config, &sim.base_url(), |m| sim.wupay_url(m))?;
    // A refund whose notify was lost is asked about after 3 s, not the production minute.
    config.worker.query.delays_ms = vec![3_000];
    config.worker.query.then_every_ms = 3_000;
    config.worker.query.poll_ms = 500;
    println!(
        "simulator   {} (ShengPay + WuPay, fault rules from {})",
        sim.base_url(),
        args.sim_config.display()
    );
    let cfg_file = std::env::temp_dir().join(format!("refund-demo-{}.toml", std::process::id()));
    std::fs::write(&cfg_file, toml::to_string(&config)?)?;
    let worker_log = std::env::temp_dir().join("refund-demo-worker.log");
    let worker = Proc(
        Command::new(bin("refund-worker")?)
            .arg("--config")
            .arg(&cfg_file)
            .stdout(std::fs::File::create(&worker_log)?)
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    println!(
        "worker      pid {} (log: {}), metrics on http://{}, notifies on http://{}/notify/shengpay",
        worker.0.id(),
        worker_log.display(),
        config.worker.metrics_addr,
        config.notify.addr
    );
    wait_ready(&config.worker.metrics_addr, true, Duration::from_secs(30))
        .await
        .context("the worker did not become ready (see its log)")?;

    // 3. The batch.
    let batch = batch();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await?;
    for (body, _) in &batch {
        shared::broker::publish_confirmed(
            &ch,
            &config.amqp.exchange,
            &config.amqp.routing_key,
            body,
            shared::broker::json_properties(None),
        )
        .await?;
    }
    let expected_jobs = batch
        .iter()
        .filter(|(_, what)| {
            !matches!(*what, "duplicate" | "conflict") && !what.starts_with("rejected")
        })
        .count();
    println!(
        "published   {} messages: {expected_jobs} refunds, 3 duplicates, 1 conflict, 1 bad message\n",
        batch.len()
    );

    // 4. Wait for every job to be final or dead.
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(expected_jobs as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "settling   [{bar:40}] {pos}/{len} jobs final or dead ({elapsed})",
    )?);
    loop {
        let counts = ops::counts_by_state(&pool).await?;
        let done: i64 = [State::Succeeded, State::Failed, State::Dead]
            .iter()
            .map(|s| counts.get(s).copied().unwrap_or(0))
            .sum();
        bar.set_position(done as u64);
        let poison = ops::count_rejected(&pool, "rejected").await?
            + ops::count_rejected(&pool, "conflict").await?;
        if done == expected_jobs as i64 && poison == 2 {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            bar.abandon();
            bail!(
                "jobs did not settle within {} s: {counts:?}",
                args.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish();
    // ShengPay's day holds a refund only once it has ended: wait for the simulator to finish
    // processing what it accepted before taking its statement.
    while sim
        .refunds()
        .iter()
        .any(|r| r.status == refund_sim::RefundStatus::Processing)
    {
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            bail!(
                "the simulator still processes refunds after {} s",
                args.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the relay publish the last events.
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 5. What an SRE sees.
    let (_, metrics) = http_get(&config.worker.metrics_addr, "/metrics").await?;
    let (_, ready) = http_get(&config.worker.metrics_addr, "/readyz").await?;

    // 6. Reconciliation against the simulator's statement for today.
    let tz = config.tz()?;
    let today = chrono::Utc::now().with_timezone(&tz).date_naive();
    let statement = std::env::temp_dir().join(format!("refund-demo-statement-{today}.csv"));
    std::fs::write(&statement, sim.statement_csv(today, None, None)?)?;
    let recon = Command::new(bin("refund-reconciler")?)
        .args([
            "run",
            "--date",
            &today.to_string(),
            "--format",
            "table",
            "--config",
        ])
        .arg(&cfg_file)
        .arg("--statement")
        .arg(&statement)
        .output()?;

    // 7. The summary.
    println!("\n== Jobs by state ==");
    for (state, n) in ops::counts_by_state(&pool).await? {
        println!("  {state:<11} {n}");
    }
    println!(
        "  (stored rejections: {}, conflicts: {})",
        ops::count_rejected(&pool, "rejected").await?,
        ops::count_rejected(&pool, "conflict").await?
    );
    println!("\n== ShengPay's asynchronous end (accepted, then the provider's word) ==");
    let ends: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT detail->>'source', to_state, count(*) FROM job_transitions
         WHERE from_state = 'accepted' AND detail ? 'source'
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await?;
    for (source, to, n) in ends {
        println!("  accepted -> {to:<10} by {source:<7} {n}");
    }
    let (notifies, applied): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE effect = 'applied') FROM provider_notifications",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "  notifies received and verified: {notifies} ({applied} applied, {} repeats changed nothing)",
        notifies - applied
    );
    println!("\n== Each refund against what the demo planted ==");
    let mut by_what: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (body, what) in &batch {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
            && let Some(no) = v["refund_no"].as_str()
            && !matches!(*what, "duplicate" | "conflict" | "rejected: float amount")
        {
            let st = ops::job_state(&pool, no).await?.map(|(s, c)| match c {
                Some(c) => format!("{s}/{c}"),
                None => s.to_string(),
            });
            by_what
                .entry(what)
                .or_default()
                .push(format!("{no}={}", st.unwrap_or_else(|| "missing".into())));
        }
    }
    for (what, jobs) in by_what {
        let shown: Vec<_> = jobs.iter().take(3).cloned().collect();
        let more = if jobs.len() > 3 {
            format!(" (+{} more)", jobs.len() - 3)
        } else {
            String::new()
        };
        println!("  {what:<44} {}{more}", shown.join(", "));
    }
    let paid = sim.paid();
    let ledger = ops::ledger(&pool).await?;
    println!("\n== Money ==");
    println!(
        "  simulator paid {} refunds, {} fen settled",
        paid.len(),
        paid.iter().map(|p| p.settlement_refund_fee).sum::<i64>()
    );
    println!(
        "  ledger booked  {} refunds, {} fen settled",
        ledger.len(),
        ledger.iter().map(|l| l.settlement_refund_fee).sum::<i64>()
    );
    println!("  paid more than once: {}", {
        let mut s = std::collections::HashSet::new();
        paid.iter().filter(|p| !s.insert(&p.refund_no)).count()
    });

    for no in ["DEMO-S000", "DEMO-QUERY", "DEMO-BUSY1", "DEMO-DROPW"] {
        println!("\n== Timeline of {no} (refundctl job show {no}) ==");
        match bin("refundctl") {
            Ok(ctl) => {
                let out = Command::new(ctl)
                    .args(["--config"])
                    .arg(&cfg_file)
                    .args(["job", "show", no])
                    .output()?;
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
            Err(e) => println!("  ({e})"),
        }
    }
    println!(
        "\n== Reconciliation for {today} (refund-reconciler run, exit {}) ==",
        recon.status.code().unwrap_or(-1)
    );
    print!("{}", String::from_utf8_lossy(&recon.stdout));
    if !recon.stderr.is_empty() {
        print!("{}", String::from_utf8_lossy(&recon.stderr));
    }
    println!(
        "  (DEMO-DROPW was paid by WuPay but its answer was lost: the job went dead/outcome_unknown,"
    );
    println!(
        "   and the run booked it from WuPay's statement row before comparing: see its timeline.)"
    );

    println!("\n== Metrics (excerpt of /metrics) ==");
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        if [
            "refunds_transitions_total",
            "refunds_provider_calls_total{",
            "refunds_dead_letters_total",
            "refunds_retries_total",
            "refunds_outbox_published_total",
            "refunds_intake_total",
            "refunds_notifies_total",
            "refunds_status_queries_total",
        ]
        .iter()
        .any(|m| line.starts_with(m))
        {
            println!("  {line}");
        }
    }
    println!("  /readyz: {ready}");
    let events = ch
        .queue_declare(
            "demo.refunds.events.all".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    println!(
        "\n== Outcome events published to {} == {}",
        config.amqp.events_exchange,
        events.message_count()
    );

    // 8. Stop what we started.
    drop(worker);
    sim.shutdown().await;
    for q in [
        "demo.refunds.events.all",
        config.amqp.queue.as_str(),
        config.amqp.dead_letter_queue.as_str(),
    ] {
        let _ = ch.queue_delete(q.into(), Default::default()).await;
    }
    let _ = broker.close(200, "demo done".into()).await;
    let _ = std::fs::remove_file(&cfg_file);
    println!(
        "\nDone. The demo database `{DEMO_DB}` is kept for a look: psql -h 127.0.0.1 -U postgres {DEMO_DB}, \
         or in the web console: just console (http://127.0.0.1:9470/)"
    );
    Ok(())
}
