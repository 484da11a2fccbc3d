//! Each stored run opens a case per discrepancy (`shared::store::cases::open_from_run`, called
//! where the run is stored), and a rerun carries the day's cases forward.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, Status, run};

const DAY: &str = "2026-11-10";

async fn cases(env: &Env) -> Vec<(String, String, String, i64, i64)> {
    sqlx::query_as(
        "SELECT refund_no, kind, state, first_run_id, last_run_id FROM reconciliation_cases
         ORDER BY refund_no, kind",
    )
    .fetch_all(env.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_run_opens_a_case_per_discrepancy_and_its_rerun_closes_the_one_it_no_longer_finds()
{
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "P", date(DAY), 200, false).await;
    job(pool, "S-DRIFT", "shengpay", "m1", 100, "succeeded").await;
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
    let statement = env.path("s.csv");
    write_statement(pool, "P", date(DAY), &statement).await;
    let drifted = env.path("drifted.csv");
    std::fs::copy(&statement, &drifted).unwrap();
    append(
        &drifted,
        &[row(
            "shengpay",
            "m1",
            "S-DRIFT",
            "RO-S-DRIFT",
            100,
            90,
            local("2026-11-10 12:00:00"),
        )],
    );
    append(
        &statement,
        &[row(
            "shengpay",
            "m1",
            "S-DRIFT",
            "RO-S-DRIFT",
            100,
            100,
            local("2026-11-10 12:00:00"),
        )],
    );

    let mut req = RunRequest::new(date(DAY));
    req.statements = vec![drifted];
    let first = run(pool, &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(first.status, Status::Discrepancies);
    assert_eq!(
        cases(&env).await,
        [(
            "S-DRIFT".into(),
            "amount_mismatch".into(),
            "open".into(),
            first.run_id,
            first.run_id
        )]
    );

    // The provider sent a corrected statement: the rerun balances and supersedes the first.
    req.statements = vec![statement];
    let second = run(pool, &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(second.status, Status::Balanced);
    assert_eq!(second.superseded, [first.run_id]);
    assert_eq!(
        cases(&env).await,
        [(
            "S-DRIFT".into(),
            "amount_mismatch".into(),
            "resolved_by_rerun".into(),
            first.run_id,
            first.run_id
        )]
    );
}
