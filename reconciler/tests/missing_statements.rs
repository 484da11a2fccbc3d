//! A day is balanced only when something was compared and agreed: a provider with refunds in
//! the ledger but no statement is `statement_missing`, a day with nothing on either side is
//! "nothing to reconcile", and a statement with no row of the run's date is refused.

mod common;

use common::*;

const DAY: &str = "2026-11-10";

/// Keeps the header and the rows of `provider` in the statement at `path`.
fn keep_provider(path: &std::path::Path, provider: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, l)| *i == 0 || l.starts_with(&format!("{provider},")))
        .map(|(_, l)| l)
        .collect();
    std::fs::write(path, kept.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_with_refunds_in_the_ledger_but_no_statement_is_statement_missing_per_merchant()
{
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "N", date(DAY), 600, false).await;
    let statement = env.path("shengpay.csv");
    write_statement(pool, "N", date(DAY), &statement).await;
    keep_provider(&statement, "shengpay");
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let run_id = last_run(pool).await;
    let found = discrepancies(pool, run_id).await;
    let ledger: Vec<(String, i64)> = sqlx::query_as(
        "SELECT merchant, sum(settlement_refund_fee)::bigint FROM ledger
         WHERE provider = 'wupay' AND business_date = $1 GROUP BY merchant ORDER BY merchant",
    )
    .bind(date(DAY))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(ledger.len(), 4);
    let expected: Vec<D> = ledger
        .iter()
        .map(|(m, total)| d("statement_missing", "wupay", m, "", Some(*total), None))
        .collect();
    assert_eq!(found, expected);
    assert_discrepancies_explain_diffs(pool, run_id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_with_nothing_on_either_side_is_nothing_to_reconcile_and_exits_1() {
    let env = env().await;
    let out = env.run_bin(&["--date", DAY, "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "discrepancies");
    assert_eq!(report["nothing_to_reconcile"], true);
    assert_eq!(report["totals"], serde_json::json!([]));
    let out = env.run_bin(&["--date", DAY]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(
        stdout(&out).contains("Status: NOTHING TO RECONCILE"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("nothing to reconcile"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_with_no_row_of_the_run_date_is_refused_with_exit_2_naming_it_and_the_good_run_stays()
 {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "G", date(DAY), 300, false).await;
    seed_day(pool, "H", date("2026-11-05"), 300, false).await;
    seed_day(pool, "K", date("2026-11-11"), 300, false).await;
    let good = env.path("good.csv");
    write_statement(pool, "G", date(DAY), &good).await;
    let out = env.run_bin(&["--date", DAY, "--statement", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let good_run = last_run(pool).await;

    let wrong = env.path("wrong-day.csv");
    write_statement(pool, "H", date("2026-11-05"), &wrong).await;
    let out = env.run_bin(&["--date", DAY, "--statement", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("wrong-day.csv") && err.contains("no row dated 2026-11-10"),
        "{err}"
    );
    let current: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT run_id FROM reconciliation_current_totals WHERE business_date = $1",
    )
    .bind(date(DAY))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(current, vec![good_run]);

    // The next day's statement beside the day's own is a neighbour, not a wrong day.
    let next = env.path("next-day.csv");
    write_statement(pool, "K", date("2026-11-11"), &next).await;
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        good.to_str().unwrap(),
        "--statement",
        next.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}
