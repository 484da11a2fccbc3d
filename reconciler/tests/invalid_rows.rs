//! A statement row that parses but cannot be right (settlement above the refund) is a
//! discrepancy `invalid_at_provider`; the rest of the day is reconciled.

mod common;

use common::*;

const DAY: &str = "2026-11-10";

#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_settlement_exceeds_its_refund_is_invalid_at_provider_and_the_rest_of_the_day_is_reconciled()
 {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "I", date(DAY), 1_000, false).await;
    let statement = env.path("s.csv");
    write_statement(pool, "I", date(DAY), &statement).await;
    job(pool, "I-BAD", "shengpay", "m1", 100, "succeeded").await;
    book(
        pool,
        "I-BAD",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 09:00:00"),
    )
    .await;
    job(pool, "I-UNPAID", "wupay", "m0", 200, "succeeded").await;
    book(
        pool,
        "I-UNPAID",
        "wupay",
        "m0",
        200,
        200,
        local("2026-11-10 10:00:00"),
    )
    .await;
    append(
        &statement,
        &[row(
            "shengpay",
            "m1",
            "I-BAD",
            "RO-IB",
            100,
            150,
            local("2026-11-10 08:59:59"),
        )],
    );
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "discrepancies");
    let run_id = last_run(pool).await;
    assert_eq!(
        discrepancies(pool, run_id).await,
        vec![
            d(
                "invalid_at_provider",
                "shengpay",
                "m1",
                "I-BAD",
                Some(100),
                Some(150)
            ),
            d(
                "missing_at_provider",
                "wupay",
                "m0",
                "I-UNPAID",
                Some(200),
                None
            ),
        ]
    );
    assert_discrepancies_explain_diffs(pool, run_id).await;
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_discrepancies WHERE run_id = $1 AND refund_no = 'I-BAD'",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        detail.contains("settlement 150 above the refund_fee 100"),
        "{detail}"
    );
    assert!(reconciler::KINDS.contains(&"invalid_at_provider"));
}
