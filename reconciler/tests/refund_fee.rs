//! The statement's refund_fee is compared too: a row whose refund_fee differs from the
//! ledger's, settlement equal, is an amount_mismatch that says which amount differs.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, Status, run};

const DAY: &str = "2026-11-10";

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_row_whose_refund_fee_differs_from_the_ledger_is_an_amount_mismatch() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "F", date(DAY), 2_000, false).await;
    let statement = env.path("s.csv");
    write_statement(pool, "F", date(DAY), &statement).await;
    job(pool, "F-FEE", "shengpay", "m2", 1000, "succeeded").await;
    book(
        pool,
        "F-FEE",
        "shengpay",
        "m2",
        1000,
        900,
        local("2026-11-10 15:00:00"),
    )
    .await;
    append(
        &statement,
        &[row(
            "shengpay",
            "m2",
            "F-FEE",
            "RO-FF",
            1200,
            900,
            local("2026-11-10 14:59:59"),
        )],
    );
    let mut req = RunRequest::new(date(DAY));
    req.statements = vec![statement];
    for exhaustive in [false, true] {
        req.exhaustive = exhaustive;
        let o = run(pool, &env.config, &req, &Progress::hidden())
            .await
            .unwrap();
        assert_eq!(o.status, Status::Discrepancies, "exhaustive: {exhaustive}");
        assert_eq!(
            discrepancies(pool, o.run_id).await,
            vec![d(
                "amount_mismatch",
                "shengpay",
                "m2",
                "F-FEE",
                Some(900),
                Some(900)
            )],
            "exhaustive: {exhaustive}"
        );
        let detail: String =
            sqlx::query_scalar("SELECT detail FROM reconciliation_discrepancies WHERE run_id = $1")
                .bind(o.run_id)
                .fetch_one(pool)
                .await
                .unwrap();
        assert!(
            detail.contains("refund_fee: ledger 1000, provider 1200"),
            "{detail}"
        );
        assert_discrepancies_explain_diffs(pool, o.run_id).await;
    }
}
