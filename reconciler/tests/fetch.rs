//! Fetched statements (DESIGN §7): `[reconciler.statements]` names where each provider's
//! statement of a day appears; `run` without `--statement` fetches them (from a local HTTP
//! server here), `--wait` waits for them, a statement not there is `statement_missing`, and a
//! run against our own recorded answers says it is not an independent comparison.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use common::*;

const DAY: &str = "2026-11-10";

/// What the server answers per path: a status and a body; anything else is 404.
type Served = Arc<Mutex<HashMap<String, (u16, Vec<u8>)>>>;

/// A statement server on 127.0.0.1; its base URL and what it serves.
async fn server() -> (String, Served) {
    let served: Served = Arc::default();
    let app = axum::Router::new()
        .fallback(|State(s): State<Served>, uri: Uri| async move {
            match s.lock().unwrap().get(uri.path()) {
                Some((status, body)) => (StatusCode::from_u16(*status).unwrap(), body.clone()),
                None => (StatusCode::NOT_FOUND, b"not found".to_vec()),
            }
        })
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), served)
}

/// A config with `extra` after the common keys (inside `[reconciler]`).
fn config(env: &Env, name: &str, extra: &str) -> std::path::PathBuf {
    let path = env.path(name);
    std::fs::write(&path, toml(&env.db.url, 30) + extra).unwrap();
    path
}

fn run(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["run", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    bin(&all)
}

/// A day of refunds of both providers, and each provider's statement of it as bytes.
async fn day_with_statements(env: &Env) -> (Vec<u8>, Vec<u8>) {
    seed_day(env.pool(), "F", date(DAY), 60, true).await;
    let all = env.path("all.csv");
    write_statement(env.pool(), "F", date(DAY), &all).await;
    let text = std::fs::read_to_string(&all).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_owned();
    let (mut s, mut w) = (header.clone() + "\n", header + "\n");
    for l in lines {
        if l.starts_with("shengpay,") {
            s.push_str(l);
            s.push('\n');
        } else {
            w.push_str(l);
            w.push('\n');
        }
    }
    (s.into_bytes(), w.into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn run_without_a_statement_fetches_the_configured_ones_by_url_template_and_balances() {
    let env = env().await;
    let (shengpay, wupay) = day_with_statements(&env).await;
    let (base, served) = server().await;
    served
        .lock()
        .unwrap()
        .insert(format!("/bills/shengpay/{DAY}.csv"), (200, shengpay));
    // The other provider from a file template.
    let wupay_file = env.path(&format!("wupay-{DAY}.csv"));
    std::fs::write(&wupay_file, wupay).unwrap();
    let cfg = config(
        &env,
        "fetch.toml",
        &format!(
            "\n[reconciler.statements]\nshengpay = \"{base}/bills/{{provider}}/{{date}}.csv\"\n\
             wupay = \"{}\"\n",
            env.path("{provider}-{date}.csv").display()
        ),
    );
    let out = run(&cfg, &["--date", DAY]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("against 2 statements"), "{table}");
    assert!(!table.contains("not an independent"), "{table}");
    let files: Vec<String> =
        sqlx::query_scalar("SELECT statement_files FROM reconciliation_runs ORDER BY id DESC")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(
        files,
        vec![
            format!("{base}/bills/shengpay/{DAY}.csv"),
            wupay_file.display().to_string()
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_not_there_is_statement_missing_naming_its_url_and_exits_1() {
    let env = env().await;
    let (shengpay, _) = day_with_statements(&env).await;
    let (base, served) = server().await;
    served
        .lock()
        .unwrap()
        .insert(format!("/shengpay/{DAY}.csv"), (200, shengpay));
    let cfg = config(
        &env,
        "fetch.toml",
        &format!(
            "\n[reconciler.statements]\nshengpay = \"{base}/shengpay/{{date}}.csv\"\nwupay = \"{base}/wupay/{{date}}.csv\"\n"
        ),
    );
    let out = run(&cfg, &["--date", DAY, "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["status"], "discrepancies");
    assert_eq!(report["independent"], true);
    let kinds: Vec<&str> = report["discrepancies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    // One per WuPay merchant with refunds, none per refund.
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == "statement_missing"),
        "{kinds:?}"
    );
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_discrepancies WHERE kind = 'statement_missing' LIMIT 1",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert!(
        detail.contains(&format!("{base}/wupay/{DAY}.csv")),
        "{detail}"
    );
    let err = stderr(&out);
    assert!(
        err.contains(
            "refund-reconciler: warning: wupay: the statement of 2026-11-10 was not there"
        ) && !err.contains("{\""),
        "warnings are plain lines: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_statement_missing_for_a_provider_without_refunds_still_fails_the_day() {
    let env = env().await;
    // ShengPay refunds only: WuPay paid nothing, and has nothing booked.
    let at = local("2026-11-10 12:00:00");
    job(env.pool(), "S1", "shengpay", "m1", 100, "succeeded").await;
    book(env.pool(), "S1", "shengpay", "m1", 100, 100, at).await;
    let shengpay = format!(
        "provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at\n{}\n",
        row("shengpay", "m1", "S1", "RO-S1", 100, 100, at)
    );
    let dir = env.path("bills");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(format!("shengpay-{DAY}.csv")), shengpay).unwrap();
    let cfg = config(
        &env,
        "fetch.toml",
        &format!(
            "\n[reconciler.statements]\nshengpay = \"{0}/shengpay-{{date}}.csv\"\nwupay = \"{0}/wupay-{{date}}.csv\"\n",
            dir.display()
        ),
    );
    let out = run(&cfg, &["--date", DAY]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let rows: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT kind, provider, ledger_amount FROM reconciliation_discrepancies")
            .fetch_all(env.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("statement_missing".into(), "wupay".into(), Some(0))]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_error_other_than_404_stops_the_run_naming_the_url() {
    let env = env().await;
    day_with_statements(&env).await;
    let (base, served) = server().await;
    served
        .lock()
        .unwrap()
        .insert(format!("/s/{DAY}.csv"), (500, b"oops".to_vec()));
    let cfg = config(
        &env,
        "fetch.toml",
        &format!("\n[reconciler.statements]\nshengpay = \"{base}/s/{{date}}.csv\"\n"),
    );
    let out = run(&cfg, &["--date", DAY]);
    assert_eq!(out.status.code(), Some(2), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{base}/s/{DAY}.csv")) && err.contains("HTTP 500"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_wait_looks_again_until_the_statement_is_there_logging_each_look() {
    let env = env().await;
    let (shengpay, wupay) = day_with_statements(&env).await;
    let (base, served) = server().await;
    served
        .lock()
        .unwrap()
        .insert(format!("/wupay/{DAY}.csv"), (200, wupay));
    let cfg = config(
        &env,
        "wait.toml",
        &format!(
            "statement_wait_attempts = 10\nstatement_wait_interval_secs = 1\n\n\
             [reconciler.statements]\nshengpay = \"{base}/shengpay/{{date}}.csv\"\n\
             wupay = \"{base}/wupay/{{date}}.csv\"\n"
        ),
    );
    let publish = {
        let served = served.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            served
                .lock()
                .unwrap()
                .insert(format!("/shengpay/{DAY}.csv"), (200, shengpay));
        })
    };
    let out = tokio::task::spawn_blocking(move || run(&cfg, &["--date", DAY, "--wait"]))
        .await
        .unwrap();
    publish.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not there yet (HTTP 404); looking again in 1 s (look 1 of 10)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_wait_gives_up_at_its_bound_and_the_day_is_not_balanced() {
    let env = env().await;
    let (_, wupay) = day_with_statements(&env).await;
    let (base, served) = server().await;
    served
        .lock()
        .unwrap()
        .insert(format!("/wupay/{DAY}.csv"), (200, wupay));
    let cfg = config(
        &env,
        "wait.toml",
        &format!(
            "statement_wait_attempts = 2\nstatement_wait_interval_secs = 1\n\n\
             [reconciler.statements]\nshengpay = \"{base}/shengpay/{{date}}.csv\"\n\
             wupay = \"{base}/wupay/{{date}}.csv\"\n"
        ),
    );
    let out = tokio::task::spawn_blocking(move || run(&cfg, &["--date", DAY, "--wait"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("look 1 of 2") && err.contains("after 2 looks"),
        "{err}"
    );
    assert!(
        err.contains("1 configured statement of 2026-11-10 not there"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn from_attempts_stays_possible_and_every_format_says_it_is_not_independent() {
    let env = env().await;
    day_with_statements(&env).await;
    let cfg = config(
        &env,
        "fetch.toml",
        "\n[reconciler.statements]\nshengpay = \"/nowhere/{date}.csv\"\n",
    );
    let out = run(&cfg, &["--date", DAY, "--from-attempts"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("NOTE: not an independent comparison"),
        "{table}"
    );
    let out = run(
        &cfg,
        &["--date", DAY, "--from-attempts", "--format", "json"],
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["source"], "attempts");
    assert_eq!(report["independent"], false);
    assert!(
        report["note"]
            .as_str()
            .unwrap()
            .starts_with("not an independent comparison")
    );
    let out = run(&cfg, &["--date", DAY, "--from-attempts", "--format", "csv"]);
    let csv = stdout(&out);
    assert!(csv.starts_with("# not an independent comparison"), "{csv}");
    assert!(stderr(&out).contains("not an independent comparison"));
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_cells_from_a_statement_cannot_be_formulas() {
    let env = env().await;
    seed_day(env.pool(), "X", date(DAY), 10, false).await;
    let statement = env.path("s.csv");
    write_statement(env.pool(), "X", date(DAY), &statement).await;
    append(
        &statement,
        &[
            // Paid, never booked: its merchant and provider refund id reach the CSV.
            "shengpay,\"=HYPERLINK(\"\"http://evil.example\"\",\"\"x\"\")\",R-EVIL1,RO1,100,100,2026-11-10T12:00:00+08:00".into(),
            "shengpay,m1,R-EVIL2,\"=HYPERLINK(\"\"http://evil.example\"\")\",100,100,2026-11-10T12:00:00+08:00".into(),
        ],
    );
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "csv",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
    let mut rows = 0;
    for r in reader.records() {
        let r = r.unwrap();
        rows += 1;
        for (i, cell) in r.iter().enumerate() {
            // Amount columns (5, 6) are our numbers; every other cell is text.
            if i == 5 || i == 6 {
                assert!(cell.is_empty() || cell.parse::<i64>().is_ok(), "{cell}");
                continue;
            }
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "a formula cell: {cell:?}"
            );
        }
        if &r[4] == "R-EVIL1" {
            assert_eq!(&r[3], "'=HYPERLINK(\"http://evil.example\",\"x\")");
        }
        if &r[4] == "R-EVIL2" {
            assert!(r[7].contains("=HYPERLINK"), "{:?}", &r[7]);
        }
    }
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_lists_past_runs_with_source_status_totals_and_superseded_by() {
    let env = env().await;
    day_with_statements(&env).await;
    let first = env.run_bin(&["--date", DAY]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let second = env.run_bin(&["--date", DAY]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let cfg = env.config_path.to_str().unwrap();
    let out = bin(&["runs", "--config", cfg, "--date", DAY, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let runs: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["superseded_by"], runs[0]["id"]);
    assert_eq!(runs[0]["source"], "attempts");
    assert_eq!(runs[0]["status"], "balanced");
    assert!(runs[0]["ledger_total"].as_i64().unwrap() > 0);
    assert_eq!(runs[0]["diff"], 0);
    let out = bin(&["runs", "--config", cfg]);
    let text = stdout(&out);
    assert!(text.contains(&format!("by {}", runs[0]["id"])), "{text}");
    assert!(
        text.contains("attempts") && text.contains("balanced"),
        "{text}"
    );
    // yesterday and today name dates in the configured time zone.
    let out = bin(&["runs", "--config", cfg, "--date", "yesterday"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("(no runs)"));
}
