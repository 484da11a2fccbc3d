//! Which run is a day's result (DESIGN §7): a run against statements is never replaced by a
//! later run against our own recorded answers; a rerun with statements supersedes, and the
//! report says what it superseded or what stays current.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, Status, run};

const DAY: &str = "2026-11-10";

/// A day whose statement pays S-DRIFT 90 where we booked (and recorded the answer) 100.
async fn day_with_a_drift(env: &Env) -> std::path::PathBuf {
    let pool = env.pool();
    seed_day(pool, "P", date(DAY), 300, true).await;
    let statement = env.path("s.csv");
    write_statement(pool, "P", date(DAY), &statement).await;
    job(pool, "S-DRIFT", "shengpay", "m1", 100, "succeeded").await;
    attempt(
        pool,
        "S-DRIFT",
        1,
        "accepted",
        Some("RO-SD"),
        100,
        false,
        local("2026-11-10 12:00:00"),
    )
    .await;
    book(
        pool,
        "S-DRIFT",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 12:00:00.1"),
    )
    .await;
    append(
        &statement,
        &[row(
            "shengpay",
            "m1",
            "S-DRIFT",
            "RO-SD",
            100,
            90,
            local("2026-11-10 12:00:00"),
        )],
    );
    statement
}

async fn current(env: &Env) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "SELECT run_id, kind, refund_no FROM reconciliation_current_discrepancies ORDER BY refund_no",
    )
    .fetch_all(env.pool())
    .await
    .unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(out)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_run_against_recorded_answers_never_replaces_a_statement_run() {
    let env = env().await;
    let statement = day_with_a_drift(&env).await;
    let mut req = RunRequest::new(date(DAY));
    req.statements = vec![statement.clone()];
    let first = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(first.status, Status::Discrepancies);

    // Against recorded answers the day looks balanced: stored, but not the day's result.
    let out = env.run_bin(&["--date", DAY, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["status"], "balanced");
    assert_eq!(report["source"], "attempts");
    assert_eq!(report["supersedes"], serde_json::json!([]));
    assert_eq!(report["kept_current"], serde_json::json!([first.run_id]));
    assert!(report["run_id"].as_i64().unwrap() > first.run_id);
    let by: Option<i64> =
        sqlx::query_scalar("SELECT superseded_by FROM reconciliation_runs WHERE id = $1")
            .bind(first.run_id)
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(by, None);
    assert_eq!(
        current(&env).await,
        vec![(first.run_id, "amount_mismatch".into(), "S-DRIFT".into())]
    );
    let table = stdout(&env.run_bin(&["--date", DAY]));
    assert!(
        table.contains(&format!("run {} against statements stays", first.run_id)),
        "{table}"
    );

    // A rerun with the statement supersedes the statement run and the latest attempts run, and
    // says so.
    let attempts_run = last_run(env.pool()).await;
    assert!(attempts_run > first.run_id);
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = json(&out);
    let mut superseded: Vec<i64> = report["supersedes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    superseded.sort();
    assert_eq!(superseded, vec![first.run_id, attempts_run], "{report}");
    assert_eq!(report["kept_current"], serde_json::json!([]));
    let rerun = report["run_id"].as_i64().unwrap();
    assert_eq!(
        current(&env).await,
        vec![(rerun, "amount_mismatch".into(), "S-DRIFT".into())]
    );
}
