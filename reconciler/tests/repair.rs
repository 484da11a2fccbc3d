//! The repair loop: a WuPay job dead with an unknown outcome is settled by the provider's
//! statements (DESIGN §5, WuPay): listed, it is booked as paid from the row; absent from the
//! statements of its attempt's day and the next, it is marked not paid, and only then may
//! replay resend it.

mod common;

use common::*;
use sqlx::Row;

const DAY: &str = "2026-11-10";
const NEXT: &str = "2026-11-11";

/// A WuPay job dead with `outcome_unknown` after a call at `at` that may have reached WuPay.
async fn unknown(
    pool: &sqlx::PgPool,
    refund_no: &str,
    fee: i64,
    at: chrono::DateTime<chrono::Utc>,
) {
    job(pool, refund_no, "wupay", "m1", fee, "dead").await;
    attempt(pool, refund_no, 1, "maybe_delivered", None, 0, false, at).await;
}

async fn state_of(pool: &sqlx::PgPool, refund_no: &str) -> (String, Option<String>) {
    let r = sqlx::query("SELECT state, cause FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_one(pool)
        .await
        .unwrap();
    (r.get("state"), r.get("cause"))
}

async fn replay_refused(pool: &sqlx::PgPool, refund_no: &str) -> bool {
    // The database's rule, which replay applies under the row lock (migrations 0050, 0060),
    // as `dlq replay --dry-run` asks it.
    shared::store::operator::replay_facts(pool, refund_no)
        .await
        .unwrap()
        .expect("the job exists")
        .refusal
        .is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_wupay_outcome_listed_on_the_statement_is_booked_from_its_row_and_the_day_balances()
 {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "R", date(DAY), 300, false).await;
    let statement = env.path("wupay.csv");
    write_statement(pool, "R", date(DAY), &statement).await;
    unknown(pool, "R-UNKNOWN", 500, local("2026-11-10 10:00:00")).await;
    append(
        &statement,
        &[row(
            "wupay",
            "m1",
            "R-UNKNOWN",
            "WU-77",
            500,
            450,
            local("2026-11-10 10:00:01"),
        )],
    );
    let lines = std::fs::read_to_string(&statement).unwrap().lines().count();

    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("R-UNKNOWN: unknown outcome booked as paid per statement"),
        "{}",
        stderr(&out)
    );

    assert_eq!(
        state_of(pool, "R-UNKNOWN").await,
        ("succeeded".into(), None)
    );
    let (prid, settle, day): (String, i64, chrono::NaiveDate) = sqlx::query_as(
        "SELECT provider_refund_id, settlement_refund_fee, business_date FROM ledger
         WHERE refund_no = 'R-UNKNOWN' AND entry_kind = 'refund'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((prid.as_str(), settle, day), ("WU-77", 450, date(DAY)));
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM job_transitions
         WHERE refund_no = 'R-UNKNOWN' AND from_state = 'dead' AND to_state = 'succeeded'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(detail["source"], "statement");
    assert_eq!(
        detail["evidence"],
        format!("{}:{lines}", statement.display()),
        "the transition names the file and line"
    );
    let events: Vec<String> =
        sqlx::query_scalar("SELECT payload->>'event' FROM outbox WHERE refund_no = 'R-UNKNOWN'")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(events, vec!["refund.resolved".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_wupay_outcome_listed_with_another_refund_fee_is_left_for_an_operator() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "F", date(DAY), 60, false).await;
    let statement = env.path("wupay.csv");
    write_statement(pool, "F", date(DAY), &statement).await;
    unknown(pool, "F-UNKNOWN", 500, local("2026-11-10 10:00:00")).await;
    append(
        &statement,
        &[row(
            "wupay",
            "m1",
            "F-UNKNOWN",
            "WU-78",
            600,
            600,
            local("2026-11-10 10:00:01"),
        )],
    );
    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(
        state_of(pool, "F-UNKNOWN").await,
        ("dead".into(), Some("outcome_unknown".into()))
    );
    assert_eq!(
        discrepancies(pool, last_run(pool).await).await,
        vec![d(
            "missing_in_ledger",
            "wupay",
            "m1",
            "F-UNKNOWN",
            None,
            Some(600)
        )]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_wupay_outcome_absent_from_its_day_and_the_next_is_marked_not_paid_and_only_then_may_be_replayed()
 {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "A", date(DAY), 120, false).await;
    seed_day(pool, "B", date(NEXT), 120, false).await;
    let day = env.path("day.csv");
    let next = env.path("next.csv");
    write_statement(pool, "A", date(DAY), &day).await;
    write_statement(pool, "B", date(NEXT), &next).await;
    // Late on its day: a payment might be on the provider's next day.
    unknown(pool, "A-UNKNOWN", 500, local("2026-11-10 23:50:00")).await;
    assert!(replay_refused(pool, "A-UNKNOWN").await);

    let out = env.run_bin(&["--date", DAY, "--statement", day.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        replay_refused(pool, "A-UNKNOWN").await,
        "absent from one statement of two: still refused"
    );

    let out = env.run_bin(&["--date", NEXT, "--statement", next.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("A-UNKNOWN: unknown outcome marked not paid per statement"),
        "{}",
        stderr(&out)
    );
    assert!(!replay_refused(pool, "A-UNKNOWN").await);
    let evidence: serde_json::Value = sqlx::query_scalar(
        "SELECT evidence FROM statement_verdicts WHERE refund_no = 'A-UNKNOWN'
         AND verdict = 'not_paid'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let days: Vec<&str> = evidence["absent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["business_date"].as_str().unwrap())
        .collect();
    assert_eq!(days, vec![DAY, NEXT]);
    // Still dead with its cause: the verdict permits a replay, it does not make one.
    assert_eq!(
        state_of(pool, "A-UNKNOWN").await,
        ("dead".into(), Some("outcome_unknown".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_without_a_statement_of_the_jobs_merchant_proves_nothing_absent() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "S", date(DAY), 30, false).await;
    let statement = env.path("shengpay-only.csv");
    write_statement(pool, "S", date(DAY), &statement).await;
    // Only ShengPay's rows: WuPay's statement is not there.
    let text = std::fs::read_to_string(&statement).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("wupay,")).collect();
    std::fs::write(&statement, kept.join("\n") + "\n").unwrap();
    unknown(pool, "S-UNKNOWN", 500, local("2026-11-10 09:00:00")).await;
    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let absences: i64 =
        sqlx::query_scalar("SELECT count(*) FROM statement_absences WHERE refund_no = 'S-UNKNOWN'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(absences, 0);
}
