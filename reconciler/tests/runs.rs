//! Stored runs: a rerun supersedes, runs of one day never interleave, failures are recorded.

mod common;

use std::time::Duration;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, lock_key, run};
use sqlx::Connection;

const DAY: &str = "2026-11-10";

/// id, locked_at, finished_at, superseded_by.
type RunTimes = (
    i64,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
    Option<i64>,
);

async fn day_with_two_discrepancies(env: &Env) {
    let pool = env.pool();
    seed_day(pool, "S", date(DAY), 300, true).await;
    job(pool, "S-SHENG", "shengpay", "m1", 100, "succeeded").await;
    book(
        pool,
        "S-SHENG",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 12:00:00"),
    )
    .await;
    job(pool, "S-WU", "wupay", "m2", 100, "succeeded").await;
    book(
        pool,
        "S-WU",
        "wupay",
        "m2",
        100,
        100,
        local("2026-11-10 12:00:00"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_of_a_day_supersedes_the_earlier_run() {
    let env = env().await;
    day_with_two_discrepancies(&env).await;
    let pool = env.pool();
    let hidden = Progress::hidden();
    let first = run(pool, &env.config, &RunRequest::new(date(DAY)), &hidden)
        .await
        .unwrap();
    let second = run(pool, &env.config, &RunRequest::new(date(DAY)), &hidden)
        .await
        .unwrap();
    assert_eq!(second.superseded, vec![first.run_id]);
    let by: Option<i64> =
        sqlx::query_scalar("SELECT superseded_by FROM reconciliation_runs WHERE id = $1")
            .bind(first.run_id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(by, Some(second.run_id));
    let current: Vec<(i64, String)> = sqlx::query_as(
        "SELECT run_id, refund_no FROM reconciliation_current_discrepancies ORDER BY refund_no",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        current,
        vec![
            (second.run_id, "S-SHENG".into()),
            (second.run_id, "S-WU".into())
        ]
    );

    // A run of one provider supersedes that provider's part only.
    let mut req = RunRequest::new(date(DAY));
    req.provider = Some("shengpay".into());
    let third = run(pool, &env.config, &req, &hidden).await.unwrap();
    assert!(third.superseded.is_empty(), "{:?}", third.superseded);
    let current: Vec<(i64, String)> = sqlx::query_as(
        "SELECT run_id, refund_no FROM reconciliation_current_discrepancies ORDER BY refund_no",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        current,
        vec![
            (third.run_id, "S-SHENG".into()),
            (second.run_id, "S-WU".into())
        ]
    );
    let pairs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconciliation_current_totals WHERE business_date = $1",
    )
    .bind(date(DAY))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(pairs, 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_while_another_run_of_the_same_day_holds_the_lock() {
    let env = env().await;
    day_with_two_discrepancies(&env).await;
    let mut holder = sqlx::PgConnection::connect(&env.db.url).await.unwrap();
    let (class, key) = lock_key(date(DAY));
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(class)
        .bind(key)
        .execute(&mut holder)
        .await
        .unwrap();
    let pool = env.pool().clone();
    let config = env.config.clone();
    let waiting = tokio::spawn(async move {
        run(
            &pool,
            &config,
            &RunRequest::new(date(DAY)),
            &Progress::hidden(),
        )
        .await
    });
    // Another day is not held up.
    let other = run(
        env.pool(),
        &env.config,
        &RunRequest::new(date("2026-11-09")),
        &Progress::hidden(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished());
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_runs WHERE business_date = $1")
            .bind(date(DAY))
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(stored, 0);
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(class)
        .bind(key)
        .execute(&mut holder)
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(done.run_id > other.run_id);
    assert_eq!(done.discrepancies, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_runs_of_one_day_never_interleave() {
    let env = env().await;
    seed_day(env.pool(), "K", date(DAY), 20_000, true).await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let pool = env.pool().clone();
        let config = env.config.clone();
        handles.push(tokio::spawn(async move {
            run(
                &pool,
                &config,
                &RunRequest::new(date(DAY)),
                &Progress::hidden(),
            )
            .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let runs: Vec<RunTimes> = sqlx::query_as(
        "SELECT id, locked_at, finished_at, superseded_by FROM reconciliation_runs
             WHERE business_date = $1 ORDER BY locked_at",
    )
    .bind(date(DAY))
    .fetch_all(env.pool())
    .await
    .unwrap();
    assert_eq!(runs.len(), 3);
    for w in runs.windows(2) {
        assert!(
            w[0].2 <= w[1].1,
            "run {} finished after run {} took the lock: {runs:?}",
            w[0].0,
            w[1].0
        );
        assert!(w[0].0 < w[1].0, "ids follow the lock order: {runs:?}");
        assert_eq!(
            w[0].3,
            Some(w[1].0),
            "each run is superseded by the next: {runs:?}"
        );
    }
    assert_eq!(runs[2].3, None);
    let totals: i64 = sqlx::query_scalar("SELECT count(*) FROM reconciliation_current_totals")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(totals, 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_that_breaks_the_contract_stops_the_run_with_exit_2_naming_line_and_field() {
    let env = env().await;
    day_with_two_discrepancies(&env).await;
    let statement = env.path("bad.csv");
    std::fs::write(
        &statement,
        "provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at\n\
         shengpay,m1,S-SHENG,RO1,100,100,2026-11-10T12:00:00+08:00\n\
         shengpay,m1,S-OTHER,RO2,100,99.5,2026-11-10T12:00:00+08:00\n",
    )
    .unwrap();
    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("bad.csv line 3, column 6 (settlement_refund_fee)"),
        "{err}"
    );
    assert!(
        stdout(&out).is_empty(),
        "no report for a run that could not be done"
    );
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM reconciliation_runs ORDER BY id DESC LIMIT 1")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("line 3"));
    let totals: i64 = sqlx::query_scalar("SELECT count(*) FROM reconciliation_totals")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(totals, 0, "nothing of a failed run is stored");
}
