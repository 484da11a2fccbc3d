//! Midnight grace (DESIGN §7): a refund one side has near a cut-off is `pending` only if its
//! partner across midnight is unmatched on its own day and agrees in amount; otherwise it is a
//! duplicate or an amount mismatch.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, Status, run};

const DAY: &str = "2026-11-10";
const NEXT: &str = "2026-11-11";

/// Two small days with their statements, and two refunds near the midnight between them:
/// M-TWICE booked and paid at 23:50 on DAY and paid again at 00:10 on NEXT under a new
/// provider id; M-DRIFT booked at 100 at 23:55 on DAY and paid 90 at 00:05 on NEXT.
async fn days_across_midnight(env: &Env) -> Vec<std::path::PathBuf> {
    let pool = env.pool();
    seed_day(pool, "MA", date(DAY), 300, false).await;
    seed_day(pool, "MB", date(NEXT), 300, false).await;
    let (day, next) = (env.path("day.csv"), env.path("next.csv"));
    write_statement(pool, "MA", date(DAY), &day).await;
    write_statement(pool, "MB", date(NEXT), &next).await;
    job(pool, "M-TWICE", "shengpay", "m1", 100, "succeeded").await;
    book(
        pool,
        "M-TWICE",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 23:50:00"),
    )
    .await;
    append(
        &day,
        &[row(
            "shengpay",
            "m1",
            "M-TWICE",
            "RO-T1",
            100,
            100,
            local("2026-11-10 23:49:59.9"),
        )],
    );
    append(
        &next,
        &[row(
            "shengpay",
            "m1",
            "M-TWICE",
            "RO-T2",
            100,
            100,
            local("2026-11-11 00:10:00"),
        )],
    );
    job(pool, "M-DRIFT", "shengpay", "m2", 100, "succeeded").await;
    book(
        pool,
        "M-DRIFT",
        "shengpay",
        "m2",
        100,
        100,
        local("2026-11-10 23:55:00"),
    )
    .await;
    append(
        &next,
        &[row(
            "shengpay",
            "m2",
            "M-DRIFT",
            "RO-D",
            100,
            90,
            local("2026-11-11 00:05:00"),
        )],
    );
    vec![day, next]
}

async fn reconcile(env: &Env, day: &str, statements: &[std::path::PathBuf]) -> (Status, i64) {
    let mut req = RunRequest::new(date(day));
    req.statements = statements.to_vec();
    let o = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_discrepancies_explain_diffs(env.pool(), o.run_id).await;
    (o.status, o.run_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_payment_just_after_midnight_of_a_refund_paid_on_its_own_day_is_a_duplicate_not_pending()
 {
    let env = env().await;
    let files = days_across_midnight(&env).await;
    let (status, run_id) = reconcile(&env, NEXT, &files).await;
    assert_eq!(status, Status::Discrepancies);
    let found = discrepancies(env.pool(), run_id).await;
    assert!(
        found.contains(&d(
            "duplicate_at_provider",
            "shengpay",
            "m1",
            "M-TWICE",
            None,
            Some(100)
        )),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_across_midnight_that_disagrees_in_amount_is_an_amount_mismatch_on_both_days() {
    let env = env().await;
    let files = days_across_midnight(&env).await;
    let (status, run_id) = reconcile(&env, DAY, &files).await;
    assert_eq!(status, Status::Discrepancies);
    assert_eq!(
        discrepancies(env.pool(), run_id).await,
        vec![d(
            "amount_mismatch",
            "shengpay",
            "m2",
            "M-DRIFT",
            Some(100),
            None
        )]
    );
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_discrepancies WHERE run_id = $1 AND refund_no = 'M-DRIFT'",
    )
    .bind(run_id)
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert!(detail.contains("90"), "{detail}");

    let (status, run_id) = reconcile(&env, NEXT, &files).await;
    assert_eq!(status, Status::Discrepancies);
    assert_eq!(
        discrepancies(env.pool(), run_id).await,
        vec![
            d(
                "amount_mismatch",
                "shengpay",
                "m2",
                "M-DRIFT",
                None,
                Some(90)
            ),
            d(
                "duplicate_at_provider",
                "shengpay",
                "m1",
                "M-TWICE",
                None,
                Some(100)
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_booked_before_midnight_and_paid_once_just_after_in_the_same_amount_stays_pending()
{
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "MC", date(DAY), 200, false).await;
    let day = env.path("day.csv");
    write_statement(pool, "MC", date(DAY), &day).await;
    job(pool, "M-OK", "wupay", "m3", 300, "succeeded").await;
    book(
        pool,
        "M-OK",
        "wupay",
        "m3",
        300,
        300,
        local("2026-11-10 23:58:00"),
    )
    .await;
    append(
        &day,
        &[row(
            "wupay",
            "m3",
            "M-OK",
            "",
            300,
            300,
            local("2026-11-11 00:01:00"),
        )],
    );
    let (status, run_id) = reconcile(&env, DAY, &[day]).await;
    assert_eq!(status, Status::Balanced);
    assert_eq!(
        discrepancies(pool, run_id).await,
        vec![d("pending", "wupay", "m3", "M-OK", Some(300), None)]
    );
}
