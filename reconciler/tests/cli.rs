//! The command line: the JSON report contract, the table's pointers to jobs, exit status 2 for
//! anything that keeps a run from happening, help text, and the schedule.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DAY: &str = "2026-11-10";

async fn small_day(env: &Env) -> std::path::PathBuf {
    let pool = env.pool();
    seed_day(pool, "J", date(DAY), 200, false).await;
    let statement = env.path("s.csv");
    write_statement(pool, "J", date(DAY), &statement).await;
    job(pool, "J-MISSING", "shengpay", "m1", 100, "succeeded").await;
    book(
        pool,
        "J-MISSING",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 12:00:00"),
    )
    .await;
    // Failed on our side (a dead, unknown one would be settled by the repair loop).
    job(pool, "J-EXTRA", "wupay", "m2", 100, "failed").await;
    append(
        &statement,
        &[row(
            "wupay",
            "m2",
            "J-EXTRA",
            "",
            100,
            90,
            local("2026-11-10 13:00:00"),
        )],
    );
    statement
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_report_has_exactly_the_contract_shape() {
    let env = env().await;
    let statement = small_day(&env).await;
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    // The contract's four fields, and the ones added after them.
    assert_eq!(
        keys(&v),
        [
            "by_kind",
            "date",
            "discrepancies",
            "independent",
            "kept_current",
            "nothing_to_reconcile",
            "run_id",
            "source",
            "status",
            "supersedes",
            "totals"
        ]
    );
    assert_eq!(v["source"], "statement");
    assert_eq!(v["independent"], true);
    let counted: i64 = v["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["count"].as_i64().unwrap())
        .sum();
    assert_eq!(
        counted,
        v["discrepancies"].as_array().unwrap().len() as i64,
        "{}",
        v["by_kind"]
    );
    assert_eq!(v["nothing_to_reconcile"], false);
    assert_eq!(v["date"], DAY);
    assert_eq!(v["status"], "discrepancies");
    let totals = v["totals"].as_array().unwrap();
    assert_eq!(totals.len(), 8);
    for t in totals {
        assert_eq!(
            keys(t),
            [
                "diff",
                "ledger_count",
                "ledger_total",
                "merchant",
                "provider",
                "provider_count",
                "provider_total"
            ]
        );
        for k in [
            "diff",
            "ledger_count",
            "ledger_total",
            "provider_count",
            "provider_total",
        ] {
            assert!(t[k].is_i64(), "{k} is an integer: {t}");
        }
        assert_eq!(
            t["diff"].as_i64().unwrap(),
            t["provider_total"].as_i64().unwrap() - t["ledger_total"].as_i64().unwrap()
        );
    }
    let ds = v["discrepancies"].as_array().unwrap();
    assert_eq!(ds.len(), 2);
    for d in ds {
        assert_eq!(
            keys(d),
            [
                "kind",
                "ledger_amount",
                "merchant",
                "provider",
                "provider_amount",
                "refund_no"
            ]
        );
        assert!(reconciler::KINDS.contains(&d["kind"].as_str().unwrap()));
        for k in ["ledger_amount", "provider_amount"] {
            assert!(d[k].is_i64() || d[k].is_null(), "{k}: {d}");
        }
    }
    assert_eq!(ds[0]["refund_no"], "J-MISSING");
    assert_eq!(ds[0]["ledger_amount"], 100);
    assert!(ds[0]["provider_amount"].is_null());
    assert_eq!(ds[1]["kind"], "missing_in_ledger");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_table_explains_each_discrepancy_and_points_at_its_job() {
    let env = env().await;
    let statement = small_day(&env).await;
    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("Status: DISCREPANCIES: 2 discrepancies, 0 pending"),
        "{table}"
    );
    assert!(table.contains("missing_at_provider"), "{table}");
    assert!(
        table.contains("see: refundctl job show J-MISSING"),
        "{table}"
    );
    assert!(table.contains("see: refundctl job show J-EXTRA"), "{table}");
    assert!(table.contains("job failed"), "{table}");
    assert!(
        table.contains("s.csv:"),
        "the statement line is named: {table}"
    );
    assert!(
        stderr(&out).contains("discrepancies: 2 discrepancies"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_config_is_taken_before_or_after_the_subcommand() {
    let env = env().await;
    let config = env.config_path.to_str().unwrap();
    for args in [
        vec!["--config", config, "runs"],
        vec!["runs", "--config", config],
    ] {
        let out = bin(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anything_that_keeps_a_run_from_happening_exits_2() {
    let env = env().await;
    let config = env.config_path.to_str().unwrap();
    for (args, expect) in [
        (vec!["run", "--config", config], "--date"),
        (
            vec!["run", "--config", config, "--date", "2026-13-01"],
            "2026-13-01",
        ),
        (
            vec!["run", "--config", config, "--date", "2026-11-1"],
            "2026-11-1",
        ),
        (
            vec![
                "run",
                "--config",
                config,
                "--date",
                DAY,
                "--provider",
                "paypal",
            ],
            "paypal",
        ),
        (
            vec!["run", "--config", config, "--date", DAY, "--format", "xml"],
            "xml",
        ),
        (
            vec![
                "run",
                "--config",
                config,
                "--date",
                DAY,
                "--statement",
                "/no/such.csv",
            ],
            "/no/such.csv",
        ),
        (
            vec!["run", "--config", "/no/such.toml", "--date", DAY],
            "/no/such.toml",
        ),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let out = bin(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    let unreachable = env.path("unreachable.toml");
    std::fs::write(
        &unreachable,
        toml("postgres://postgres@127.0.0.1:1/nothing", 30).replace(
            "max_connections = 4",
            "max_connections = 1\nacquire_timeout_ms = 2000",
        ),
    )
    .unwrap();
    let out = bin(&[
        "run",
        "--config",
        unreachable.to_str().unwrap(),
        "--date",
        DAY,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot use the database"),
        "{}",
        stderr(&out)
    );
    let bad_grace = env.path("grace.toml");
    std::fs::write(&bad_grace, toml(&env.db.url, 721)).unwrap();
    let out = bin(&[
        "run",
        "--config",
        bad_grace.to_str().unwrap(),
        "--date",
        DAY,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reconciler.grace_minutes"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_help_shows_examples_of_its_command() {
    for (args, example) in [
        (
            vec!["--help"],
            "refund-reconciler --config refunds.toml run",
        ),
        (vec!["run", "--help"], "refund-reconciler run --date"),
        (vec!["runs", "--help"], "refund-reconciler runs"),
        (vec!["schedule", "--help"], "refund-reconciler schedule"),
    ] {
        let out = bin(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = stdout(&out);
        let examples = text.split_once("Examples:").map(|(_, e)| e).unwrap_or("");
        assert!(examples.contains(example), "{args:?}: {text}");
    }
}

#[test]
fn every_subcommand_has_help() {
    for (args, expect) in [
        (
            vec!["--help"],
            "Exit status: 0 balanced, 1 discrepancies found, 2 could not run",
        ),
        (vec!["run", "--help"], "--statement <FILE>"),
        (vec!["run", "--help"], "pending"),
        (vec!["run", "--help"], "refundctl job show"),
        (vec!["schedule", "--help"], "reconciler.schedule"),
    ] {
        let out = bin(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(stdout(&out).contains(expect), "{args:?}: {}", stdout(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_reconciles_the_previous_business_day_and_logs_the_outcome() {
    let env = env().await;
    let yesterday =
        (chrono::Utc::now().with_timezone(&TZ).date_naive() - chrono::Days::new(1)).to_string();
    // Something to compare: a day with nothing on either side is not balanced.
    seed_day(env.pool(), "Y", date(&yesterday), 20, true).await;
    let config = env.path("every-second.toml");
    std::fs::write(
        &config,
        toml(&env.db.url, 30) + "schedule = \"* * * * * *\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_refund-reconciler"))
        .args(["schedule", "--config", config.to_str().unwrap()])
        .env_remove("REFUNDS_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let finished = loop {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            if Instant::now() > deadline {
                break None;
            }
            continue;
        };
        seen.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "reconciliation finished" {
            break Some(v);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let v = finished.unwrap_or_else(|| panic!("no finished run logged: {seen:#?}"));
    assert_eq!(v["fields"]["date"], yesterday.as_str());
    assert_eq!(v["fields"]["status"], "balanced");
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconciliation_runs WHERE business_date = $1::date",
    )
    .bind(&yesterday)
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert!(runs >= 1);
}
