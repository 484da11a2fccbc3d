//! `reconcile-bench`: the reconciler's benchmark (issue #5), run by `just bench`.
//!
//! For each row count N (default 100,000 and 1,000,000) it creates a fresh database, generates
//! one business day of N refunds (jobs, ledger entries, accepted provider attempts, a few
//! retries, and four planted discrepancies: a refund paid twice, one paid but never booked, one
//! booked but never paid, one a fen apart) with `INSERT ... SELECT generate_series`, runs
//! `VACUUM ANALYZE` on the tables (statistics, and the visibility map that lets the
//! reconciler's scans be index-only, as autovacuum would in production), writes the day's
//! provider statement CSV, and then, interleaved `--repeat` times:
//!
//! - times the bare `SELECT provider, merchant, SUM(settlement_refund_fee) FROM ledger WHERE
//!   business_date = $1 GROUP BY provider, merchant` (query only, on an open connection);
//! - times a full `refund-reconciler run` as a child process (start, connect, migrations check,
//!   reconcile, store, write the JSON report), once against the recorded attempts and once
//!   against the statement file, and reads each child's peak resident memory (`ru_maxrss` from
//!   `wait4`).
//!
//! It prints medians, the ratio run / bare, the peak RSS and how it changes from the smallest
//! to the largest N, as a table and as JSON (`--json FILE` to also write it to a file). Every
//! run must find exactly the four planted discrepancies (exit status 1), or the benchmark fails.
//!
//! Needs the `refund-reconciler` binary next to this one (`cargo build --release -p
//! reconciler --bins`) and a PostgreSQL admin URL (`DATABASE_URL`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::NaiveDate;
use clap::Parser;
use futures::TryStreamExt;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// Benchmarks refund-reconciler against a bare GROUP BY over the same ledger rows, and
/// measures its peak memory, at several day sizes.
#[derive(Debug, Parser)]
#[command(name = "reconcile-bench", version)]
struct Args {
    /// Ledger rows per day to benchmark, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    rows: Vec<u64>,
    /// Measurements per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// PostgreSQL admin URL; a database per size is created (and dropped) next to it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The refund-reconciler binary (default: next to this one).
    #[arg(long)]
    reconciler: Option<PathBuf>,
    /// Which provider side to benchmark.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Also write the JSON results to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the generated databases.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Attempts,
    Statement,
    Both,
}

const DAY: &str = "2026-11-10";
const PLANTED: usize = 4;
const BARE: &str = "SELECT provider, merchant, SUM(settlement_refund_fee) FROM ledger \
                    WHERE business_date = $1 GROUP BY provider, merchant";

#[derive(Debug, Clone, serde::Serialize)]
struct Measured {
    rows: u64,
    mode: &'static str,
    generate_s: f64,
    bare_ms: Vec<f64>,
    run_ms: Vec<f64>,
    bare_median_ms: f64,
    run_median_ms: f64,
    ratio: f64,
    peak_rss_kib: i64,
    discrepancies: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match bench(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => shared::telemetry::fail("reconcile-bench", "reconcile-bench failed", &e),
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let reconciler = match &args.reconciler {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("refund-reconciler"),
    };
    if !reconciler.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p reconciler --bins)",
            reconciler.display()
        );
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let date: NaiveDate = DAY.parse()?;
    let modes: Vec<&'static str> = match args.mode {
        Mode::Attempts => vec!["attempts"],
        Mode::Statement => vec!["statement"],
        Mode::Both => vec!["attempts", "statement"],
    };
    let scratch = std::env::temp_dir().join(format!("reconcile-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut results: Vec<Measured> = Vec::new();
    for &n in &args.rows {
        let name = format!("reconcile_bench_{n}");
        eprintln!("reconcile-bench: {n} rows: generating database {name} ...");
        let (url, generate) = create_database(&args.database_url, &name).await?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        shared::store::migrate(&pool).await?;
        let started = Instant::now();
        generate_day(&pool, date, n).await?;
        let statement = scratch.join(format!("statement-{n}.csv"));
        write_statement(&pool, &statement).await?;
        let generate_s = started.elapsed().as_secs_f64() + generate;
        let config = scratch.join(format!("refunds-{n}.toml"));
        std::fs::write(
            &config,
            format!("database_url = \"{url}\"\ntimezone = \"Asia/Shanghai\"\n"),
        )?;
        let report = scratch.join(format!("report-{n}.json"));
        let run_args = |mode: &str| {
            let mut a = vec![
                "run".to_owned(),
                "--config".into(),
                config.display().to_string(),
                "--date".into(),
                DAY.into(),
                "--format".into(),
                "json".into(),
                "--out".into(),
                report.display().to_string(),
            ];
            if mode == "statement" {
                a.push("--statement".into());
                a.push(statement.display().to_string());
            }
            a
        };
        let mut conn = PgConnection::connect(&url).await?;
        eprintln!("reconcile-bench: {n} rows: generated in {generate_s:.1} s; warming up ...");
        bare(&mut conn, date).await?;
        let mut found = std::collections::HashMap::new();
        for mode in &modes {
            let r = child(&reconciler, &run_args(mode), &scratch)?;
            found.insert(*mode, check_report(&report, r.code, mode)?);
        }
        let mut bare_ms = Vec::new();
        let mut run_ms: std::collections::HashMap<&str, Vec<f64>> = Default::default();
        let mut rss: std::collections::HashMap<&str, i64> = Default::default();
        for i in 0..args.repeat {
            bare_ms.push(ms(bare(&mut conn, date).await?));
            for mode in &modes {
                let r = child(&reconciler, &run_args(mode), &scratch)?;
                check_report(&report, r.code, mode)?;
                run_ms.entry(mode).or_default().push(ms(r.elapsed));
                let peak = rss.entry(mode).or_default();
                *peak = (*peak).max(r.maxrss_kib);
            }
            eprintln!(
                "reconcile-bench: {n} rows: measurement {}/{} done",
                i + 1,
                args.repeat
            );
        }
        conn.close().await?;
        pool.close().await;
        for mode in &modes {
            let runs = run_ms.remove(mode).unwrap_or_default();
            let bare_median = median(&bare_ms);
            let run_median = median(&runs);
            results.push(Measured {
                rows: n,
                mode,
                generate_s,
                bare_ms: bare_ms.clone(),
                run_ms: runs,
                bare_median_ms: bare_median,
                run_median_ms: run_median,
                ratio: run_median / bare_median,
                peak_rss_kib: rss.get(mode).copied().unwrap_or(0),
                discrepancies: found.get(mode).copied().unwrap_or(0),
            });
        }
        if !args.keep {
            drop_database(&args.database_url, &name).await?;
            let _ = std::fs::remove_file(&statement);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print(&results, &args)?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    match base[scheme_end..].rfind('/') {
        Some(i) => format!("{}/{db}{query}", &base[..scheme_end + i]),
        None => format!("{base}/{db}{query}"),
    }
}

/// Creates database `name` (dropping an old one); its URL and the seconds it took.
async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<(String, f64)> {
    let started = Instant::now();
    let mut admin = PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("PostgreSQL at {}", shared::config::redact_url(admin_url)))?;
    // `name` is made here from a number, never from input.
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok((with_db(admin_url, name), started.elapsed().as_secs_f64()))
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// One day of `n` refunds spread over 2 providers x 8 merchants and over the day in Shanghai,
/// with the four planted discrepancies.
async fn generate_day(pool: &PgPool, date: NaiveDate, n: u64) -> anyhow::Result<()> {
    let n = i64::try_from(n)?;
    let mut conn = pool.acquire().await?;
    // Skipping the foreign-key triggers makes generation several times faster; it needs a
    // superuser, and works without (slower).
    let _ = sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await;
    // Refund i: booked at start + 1 s + i * (day - 2 s) / (n + 1), paid 100 ms before: all
    // inside the day, none paired across midnight. Around midday
    // (i = n/2 + 1 ..= n/2 + 4), one is paid twice, one is paid but never booked, one is booked
    // but never paid, one is a fen short at the provider. One in 33 was retried after a
    // transport failure.
    let planted: Vec<String> = (1..=4).map(|k| format!("R{:010}", n / 2 + k)).collect();
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
             request, content_hash, state, attempt, provider_refund_id, settlement_refund_fee,
             created_at, updated_at)
         SELECT 'R' || lpad(i::text, 10, '0'), 'O' || lpad(i::text, 10, '0'),
                CASE WHEN i % 3 = 0 THEN 'wupay' ELSE 'shengpay' END, 'm' || (i % 8),
                100000, fee, '{}'::jsonb, '\\x00'::bytea, 'succeeded',
                CASE WHEN i % 33 = 0 THEN 2 ELSE 1 END,
                CASE WHEN i % 3 = 0 THEN NULL ELSE 'RO' || i END,
                fee - CASE WHEN i % 5 = 0 THEN fee / 10 ELSE 0 END, at, at
         FROM generate_series(1, $2::bigint) i
         CROSS JOIN LATERAL (SELECT 100 + (i * 7919) % 90000 AS fee,
             ($1::date::timestamp AT TIME ZONE 'Asia/Shanghai') + interval '1 second'
               + (interval '1 day' - interval '2 seconds') * i / ($2 + 1) AS at) x",
    )
    .bind(date)
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source, booked_at)
         SELECT refund_no, 'refund', provider, merchant, provider_refund_id, refund_fee,
                settlement_refund_fee, $1, 'provider', created_at
         FROM jobs WHERE refund_no <> $2",
    )
    .bind(date)
    .bind(&planted[1])
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, request,
             latency_us, provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee,
             recorded_at)
         SELECT refund_no, 1, provider, merchant, 'not_sent', '{}', 1000, NULL, NULL, NULL, NULL,
                created_at - interval '2 seconds'
         FROM jobs WHERE attempt = 2",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, request,
             latency_us, provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee,
             recorded_at)
         SELECT refund_no, attempt, provider, merchant, 'accepted', '{}', 1000,
                provider_refund_id, refund_fee,
                settlement_refund_fee + CASE WHEN refund_no = $4 THEN -1 ELSE 0 END,
                refund_fee - settlement_refund_fee, created_at - interval '100 milliseconds'
         FROM jobs WHERE refund_no <> $3
         UNION ALL
         SELECT refund_no, 3, provider, merchant, 'accepted', '{}', 1000, 'RO-AGAIN', refund_fee,
                settlement_refund_fee, refund_fee - settlement_refund_fee,
                created_at + interval '1 minute'
         FROM jobs WHERE refund_no = $1",
    )
    .bind(&planted[0])
    .bind(&planted[1])
    .bind(&planted[2])
    .bind(&planted[3])
    .execute(&mut *conn)
    .await?;
    let _ = sqlx::query("SET session_replication_role = DEFAULT")
        .execute(&mut *conn)
        .await;
    drop(conn);
    for table in ["jobs", "ledger", "provider_attempts"] {
        sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The day's statement: every accepted attempt, streamed to `path` with COPY.
async fn write_statement(pool: &PgPool, path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut conn = pool.acquire().await?;
    let mut stream = conn
        .copy_out_raw(
            "COPY (SELECT provider, merchant, refund_no,
                          coalesce(provider_refund_id, '') AS provider_refund_id, refund_fee,
                          settlement_refund_fee,
                          to_char(recorded_at AT TIME ZONE 'Asia/Shanghai',
                                  'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+08:00\"') AS refunded_at
                   FROM provider_attempts WHERE outcome = 'accepted' ORDER BY id)
             TO STDOUT WITH (FORMAT csv, HEADER true)",
        )
        .await?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    while let Some(chunk) = stream.try_next().await? {
        out.write_all(&chunk)?;
    }
    out.flush()?;
    Ok(())
}

async fn bare(conn: &mut PgConnection, date: NaiveDate) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let rows = sqlx::query(BARE).bind(date).fetch_all(&mut *conn).await?;
    let elapsed = started.elapsed();
    if rows.is_empty() {
        bail!("the bare query found no rows");
    }
    Ok(elapsed)
}

struct ChildRun {
    code: i32,
    elapsed: Duration,
    maxrss_kib: i64,
}

/// Runs the reconciler and waits for it with wait4(2), for its own peak RSS.
fn child(bin: &Path, args: &[String], scratch: &Path) -> anyhow::Result<ChildRun> {
    let stderr_path = scratch.join("reconciler.stderr");
    let stderr = std::fs::File::create(&stderr_path)?;
    let started = Instant::now();
    let child = Command::new(bin)
        .args(args)
        .env_remove("REFUNDS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 writes it and the status for our own child `pid`,
    // which nothing else waits for (the Child handle is never waited on).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if r < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    if code != 0 && code != 1 {
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!("refund-reconciler exited with {code}: {text}");
    }
    Ok(ChildRun {
        code,
        elapsed,
        maxrss_kib: usage.ru_maxrss,
    })
}

/// Checks that a run found exactly the planted discrepancies; returns how many it found.
fn check_report(report: &Path, code: i32, mode: &str) -> anyhow::Result<usize> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let found = json["discrepancies"].as_array().map_or(0, Vec::len);
    if code != 1 || found != PLANTED {
        bail!(
            "{mode}: expected exit status 1 and {PLANTED} discrepancies, got {code} and {found}: {}",
            json["discrepancies"]
        );
    }
    Ok(found)
}

fn print(results: &[Measured], args: &Args) -> anyhow::Result<()> {
    println!(
        "reconcile-bench: one business day ({DAY}, Asia/Shanghai), medians of {} measurements \
         (tables VACUUM ANALYZEd after generation; bare: query only, parallel workers allowed; \
         run: whole process)",
        args.repeat
    );
    println!(
        "{:>10}  {:9}  {:>10}  {:>12}  {:>7}  {:>12}  {:>13}  {:>10}",
        "rows", "mode", "bare (ms)", "run (ms)", "ratio", "peak RSS", "discrepancies", "gen (s)"
    );
    for r in results {
        println!(
            "{:>10}  {:9}  {:>10.1}  {:>12.1}  {:>6.2}x  {:>8.1} MiB  {:>13}  {:>10.1}",
            r.rows,
            r.mode,
            r.bare_median_ms,
            r.run_median_ms,
            r.ratio,
            r.peak_rss_kib as f64 / 1024.0,
            r.discrepancies,
            r.generate_s
        );
    }
    let mut memory = serde_json::Map::new();
    for mode in ["attempts", "statement"] {
        let of_mode: Vec<&Measured> = results.iter().filter(|r| r.mode == mode).collect();
        if let (Some(small), Some(large)) = (
            of_mode.iter().min_by_key(|r| r.rows),
            of_mode.iter().max_by_key(|r| r.rows),
        ) && small.rows != large.rows
        {
            let ratio = large.peak_rss_kib as f64 / small.peak_rss_kib.max(1) as f64;
            println!(
                "peak RSS {mode}: {:.1} MiB at {} rows, {:.1} MiB at {} rows ({ratio:.2}x \
                 for {:.0}x the rows)",
                small.peak_rss_kib as f64 / 1024.0,
                small.rows,
                large.peak_rss_kib as f64 / 1024.0,
                large.rows,
                large.rows as f64 / small.rows as f64
            );
            memory.insert(mode.into(), serde_json::json!(ratio));
        }
    }
    let json = serde_json::json!({
        "benchmark": "reconcile-bench",
        "date": DAY,
        "timezone": "Asia/Shanghai",
        "repeat": args.repeat,
        "bare_query": BARE,
        "setup": "after generation each table is VACUUM ANALYZEd (statistics, and a visibility \
                  map that lets the reconciler's scans be index-only), then one untimed bare \
                  query and one untimed run per mode warm the caches",
        "measured": {
            "bare": "the bare query alone, on a connection opened beforehand, with the \
                     server's parallel query settings (parallel workers allowed)",
            "run": "wall clock of a whole refund-reconciler run child process: start, config, \
                    connect, migrations check, reconcile (two connections sharing one \
                    snapshot, one server process each, no parallel workers), store, write the \
                    JSON report; peak RSS is the child's ru_maxrss",
            "interleaving": "each measurement runs the bare query, then each mode, in turn",
        },
        "results": results,
        "peak_rss_ratio_largest_to_smallest": memory,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
