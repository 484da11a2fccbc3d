//! WuPay has no refund id of its own (its accepted answer carries our refund_no): against
//! recorded answers, two accepted WuPay calls for one refund are two payments.

mod common;

use common::*;

const DAY: &str = "2026-11-10";

#[tokio::test(flavor = "multi_thread")]
async fn two_accepted_wupay_calls_for_one_refund_are_a_duplicate_at_provider() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "W", date(DAY), 500, true).await;
    job(pool, "W-TWICE", "wupay", "m3", 700, "succeeded").await;
    // A stale worker's call and the retry's, both accepted; WuPay's outcome names our refund.
    attempt(
        pool,
        "W-TWICE",
        1,
        "accepted",
        Some("W-TWICE"),
        700,
        true,
        local("2026-11-10 11:00:00"),
    )
    .await;
    attempt(
        pool,
        "W-TWICE",
        2,
        "accepted",
        Some("W-TWICE"),
        700,
        false,
        local("2026-11-10 11:00:40"),
    )
    .await;
    book(
        pool,
        "W-TWICE",
        "wupay",
        "m3",
        700,
        700,
        local("2026-11-10 11:00:40.1"),
    )
    .await;
    let out = env.run_bin(&["--date", DAY, "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let run_id = last_run(pool).await;
    assert_eq!(
        discrepancies(pool, run_id).await,
        vec![d(
            "duplicate_at_provider",
            "wupay",
            "m3",
            "W-TWICE",
            Some(700),
            Some(1400)
        )]
    );
    assert_discrepancies_explain_diffs(pool, run_id).await;
    let (ledger, provider): (i64, i64) = sqlx::query_as(
        "SELECT ledger_count, provider_count FROM reconciliation_totals
         WHERE run_id = $1 AND provider = 'wupay' AND merchant = 'm3'",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(provider, ledger + 1);
}
