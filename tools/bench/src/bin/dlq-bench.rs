//! `dlq-bench`: how fast `refundctl dlq list` answers over a large dead-letter set.
//!
//! Creates a fresh database, migrates it, fills it with generate_series (by default 100,000
//! dead jobs spread over ten fingerprints, 100,000 succeeded jobs beside them, and 1,000 poison
//! messages), then times the command's own code (`worker::ctl::dlq::list`, output discarded):
//! the grouped list, its filters, and the `--json` stream of every dead job. When the
//! `refundctl` binary sits next to this one, it also times whole `refundctl dlq list` processes
//! (start, config, connect, query, print). Prints a table and one JSON line; exits 1 when the
//! grouped list's p95 is over the budget (1 s, issue #6). The database is dropped afterwards
//! unless --keep.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use shared::config::Config;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use worker::ctl::dlq::{self, ListArgs};
use worker::ctl::{Ctl, Idempotency};

/// Times `refundctl dlq list` over a large dead-letter set in a throwaway database.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Admin URL of the PostgreSQL server (a database is created and dropped on it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Dead jobs to create.
    #[arg(long, default_value_t = 100_000)]
    dead: i64,
    /// Succeeded jobs beside them (the list scans the whole jobs table).
    #[arg(long, default_value_t = 100_000)]
    other: i64,
    /// Poison messages (rejected or conflicting).
    #[arg(long, default_value_t = 1_000)]
    poison: i64,
    /// Timed runs per case (after two warm-up runs).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The budget for the grouped list's p95, in milliseconds.
    #[arg(long, default_value_t = 1000.0)]
    budget_ms: f64,
    /// Keep the database afterwards (its name is printed).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Serialize)]
struct CaseResult {
    case: String,
    runs: usize,
    median_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'a str,
    dead_jobs: i64,
    other_jobs: i64,
    poison_messages: i64,
    fill_seconds: f64,
    budget_ms: f64,
    ok: bool,
    results: &'a [CaseResult],
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => shared::telemetry::fail("dlq-bench", "dlq-bench failed", &e),
    }
}

fn with_db(url: &str, db: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL has no scheme")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let path = base[scheme_end..].find('/').map(|i| scheme_end + i);
    let host = match path {
        Some(i) => &base[..i],
        None => base,
    };
    Ok(format!("{host}/{db}{query}"))
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mut admin = PgConnection::connect(&args.database_url)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                shared::config::redact_url(&args.database_url)
            )
        })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    // Generated from the process id and the clock only, never from input.
    let name = format!("refunds_dlqbench_{}_{stamp}", std::process::id());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let url = with_db(&args.database_url, &name)?;
    let outcome = bench(&args, &url).await;
    if args.keep {
        eprintln!("dlq-bench: kept database {name}");
    } else {
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
    }
    outcome
}

async fn bench(args: &Args, url: &str) -> anyhow::Result<bool> {
    let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
    shared::store::migrate(&pool).await?;
    let started = Instant::now();
    fill(&pool, args).await?;
    let fill_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "dlq-bench: {} dead + {} other jobs, {} poison messages written in {fill_seconds:.1} s",
        args.dead, args.other, args.poison
    );

    let config = Config {
        database_url: url.to_owned(),
        ..Config::default()
    };
    let ctl = Ctl::new(config.clone(), pool.clone(), Idempotency::default())?;
    let list = |cause: Option<&str>, provider: Option<&str>, json: bool| ListArgs {
        cause: cause.map(str::to_owned),
        provider: provider.map(str::to_owned),
        json,
        ..ListArgs::default()
    };
    let cases = [
        ("dlq list", list(None, None, false)),
        (
            "dlq list --cause retries_exhausted",
            list(Some("retries_exhausted"), None, false),
        ),
        (
            "dlq list --provider wupay",
            list(None, Some("wupay"), false),
        ),
        ("dlq list --json (every dead job)", list(None, None, true)),
    ];
    let mut results = Vec::new();
    for (label, case) in &cases {
        let runs = if case.json {
            args.runs.min(5)
        } else {
            args.runs
        };
        let (samples, listed) = time_runs(runs, || async {
            let r = dlq::list(&ctl, case, &mut std::io::sink()).await?;
            anyhow::Ok(r.dead_jobs() + r.json_lines as i64)
        })
        .await?;
        anyhow::ensure!(listed > 0, "{label} listed nothing");
        results.push(summarise(label, &samples));
    }
    if let Some(bin) = refundctl_binary() {
        let file = std::env::temp_dir().join(format!("dlq-bench-{}.toml", std::process::id()));
        std::fs::write(&file, format!("database_url = {url:?}\n"))?;
        let timed = time_runs(args.runs.min(10), || async {
            let out = tokio::process::Command::new(&bin)
                .arg("--config")
                .arg(&file)
                .args(["dlq", "list"])
                .env_remove("REFUNDS_CONFIG")
                .output()
                .await?;
            anyhow::ensure!(
                out.status.success(),
                "refundctl dlq list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        })
        .await;
        let _ = std::fs::remove_file(&file);
        results.push(summarise("refundctl dlq list (whole process)", &timed?.0));
    }
    pool.close().await;

    let ok = results[0].p95_ms < args.budget_ms;
    print_table(args, &results, ok)?;
    let report = Report {
        bench: "dlq_list",
        dead_jobs: args.dead,
        other_jobs: args.other,
        poison_messages: args.poison,
        fill_seconds,
        budget_ms: args.budget_ms,
        ok,
        results: &results,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ok)
}

/// Two warm-up runs, then `runs` timed ones: milliseconds each, and the last run's value.
async fn time_runs<F, Fut, T>(runs: usize, mut f: F) -> anyhow::Result<(Vec<f64>, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    f().await?;
    let mut last = f().await?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        last = f().await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((samples, last))
}

fn summarise(case: &str, samples: &[f64]) -> CaseResult {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
        s[i]
    };
    CaseResult {
        case: case.to_owned(),
        runs: s.len(),
        median_ms: round(at(0.5)),
        p95_ms: round(at(0.95)),
        max_ms: round(s[s.len() - 1]),
    }
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

fn refundctl_binary() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let bin = me.parent()?.join("refundctl");
    bin.exists().then_some(bin)
}

fn print_table(args: &Args, results: &[CaseResult], ok: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "dlq list over {} dead jobs ({} other jobs, {} poison messages)",
        args.dead, args.other, args.poison
    )?;
    writeln!(
        out,
        "{:<40} {:>5} {:>10} {:>10} {:>10}",
        "CASE", "RUNS", "MEDIAN ms", "P95 ms", "MAX ms"
    )?;
    for r in results {
        writeln!(
            out,
            "{:<40} {:>5} {:>10.1} {:>10.1} {:>10.1}",
            r.case, r.runs, r.median_ms, r.p95_ms, r.max_ms
        )?;
    }
    writeln!(
        out,
        "budget: p95 of `dlq list` under {} ms: {}",
        args.budget_ms,
        if ok { "met" } else { "MISSED" }
    )
}

/// Writes the data set with a few set-based statements.
async fn fill(pool: &PgPool, args: &Args) -> anyhow::Result<()> {
    // Ten fingerprints: cause, provider and code vary with i; the time of death spreads over a
    // day, creation over three days before it.
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee, request,
             content_hash, state, cause, attempt, last_code, last_message, created_at, updated_at)
         SELECT no, 'O' || no, provider, merchant, 100000, fee,
                jsonb_build_object('version', 1, 'refund_no', no, 'order_no', 'O' || no,
                    'provider', provider, 'merchant', merchant, 'total_fee', 100000,
                    'refund_fee', fee, 'reason', 'dlq-bench refund'),
                sha256(convert_to(no, 'UTF8')), 'dead',
                (ARRAY['retries_exhausted', 'retries_exhausted', 'retries_exhausted',
                       'retries_exhausted', 'retries_exhausted', 'outcome_unknown',
                       'outcome_unknown', 'provider_rejected_request',
                       'provider_rejected_request', 'merchant_not_configured'])[1 + i % 10],
                1 + i % 8,
                (ARRAY['SYSTEMERROR', 'FREQUENCY_LIMITED', 'NOT_SENT', 'MAYBE_DELIVERED',
                       'BIZERR_NEED_RETRY', 'MAYBE_DELIVERED', 'UNRECOGNISED_RESULT',
                       'SIGN_ERROR', 'MCH_NOT_FOUND', NULL])[1 + i % 10],
                'dlq-bench: provider said no (' || (i % 10) || ')',
                now() - interval '4 days' + (i % 259200) * interval '1 second',
                now() - (i % 86400) * interval '1 second'
         FROM (SELECT i, 'D' || lpad(i::text, 10, '0') AS no,
                      CASE WHEN i % 3 = 0 THEN 'wupay' ELSE 'shengpay' END AS provider,
                      'm' || (i % 7) AS merchant, 100 + i % 900 AS fee
               FROM generate_series(1, $1) AS i) s",
    )
    .bind(args.dead)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee, request,
             content_hash, state, attempt, provider_refund_id, settlement_refund_fee, created_at,
             updated_at)
         SELECT no, 'O' || no, provider, merchant, 100000, fee,
                jsonb_build_object('version', 1, 'refund_no', no, 'order_no', 'O' || no,
                    'provider', provider, 'merchant', merchant, 'total_fee', 100000,
                    'refund_fee', fee, 'reason', 'dlq-bench refund'),
                sha256(convert_to(no, 'UTF8')), 'succeeded', 1, 'P' || no, fee,
                now() - interval '2 days', now() - interval '1 day'
         FROM (SELECT i, 'S' || lpad(i::text, 10, '0') AS no,
                      CASE WHEN i % 3 = 0 THEN 'wupay' ELSE 'shengpay' END AS provider,
                      'm' || (i % 7) AS merchant, 100 + i % 900 AS fee
               FROM generate_series(1, $1) AS i) s",
    )
    .bind(args.other)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO rejected_messages (kind, refund_no, field, reason, body, body_sha256,
             occurrences, first_seen_at, last_seen_at)
         SELECT CASE WHEN i % 5 = 0 THEN 'conflict' ELSE 'rejected' END,
                'X' || lpad(i::text, 10, '0'),
                (ARRAY['refund_no', 'refund_fee', '$', 'merchant', 'total_fee'])[1 + i % 5],
                'dlq-bench reason ' || (i % 5), convert_to('{\"bench\":' || i || '}', 'UTF8'),
                sha256(convert_to('poison' || i, 'UTF8')), 1 + i % 3,
                now() - (i % 86400) * interval '1 second', now()
         FROM generate_series(1, $1) AS i",
    )
    .bind(args.poison)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM (ANALYZE) jobs").execute(pool).await?;
    sqlx::query("VACUUM (ANALYZE) rejected_messages")
        .execute(pool)
        .await?;
    Ok(())
}
