//! Without a statement the provider side is what the providers answered our calls:
//! accepted attempts, one payment per (refund_no, provider_refund_id) within the day.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunRequest, Status, run};

const DAY: &str = "2026-11-10";

/// A day of 2,000 refunds plus the awkward cases of real traffic, all paid once.
async fn awkward_day(env: &Env) {
    let pool = env.pool();
    seed_day(pool, "A", date(DAY), 2_000, true).await;
    // Retried after a transport failure; the second call was accepted.
    job(pool, "A-RETRY", "shengpay", "m1", 500, "succeeded").await;
    attempt(
        pool,
        "A-RETRY",
        1,
        "maybe_delivered",
        None,
        0,
        false,
        local("2026-11-10 09:00:00"),
    )
    .await;
    attempt(
        pool,
        "A-RETRY",
        2,
        "accepted",
        Some("RO-RETRY"),
        500,
        false,
        local("2026-11-10 09:01:00"),
    )
    .await;
    book(
        pool,
        "A-RETRY",
        "shengpay",
        "m1",
        500,
        500,
        local("2026-11-10 09:01:00.1"),
    )
    .await;
    // A stale worker's accepted call (fenced) and the retry's, answered with the same refund
    // by the idempotent provider: one payment.
    job(pool, "A-REPLAY", "shengpay", "m2", 600, "succeeded").await;
    attempt(
        pool,
        "A-REPLAY",
        1,
        "accepted",
        Some("RO-REPLAY"),
        540,
        true,
        local("2026-11-10 10:00:00"),
    )
    .await;
    attempt(
        pool,
        "A-REPLAY",
        2,
        "accepted",
        Some("RO-REPLAY"),
        540,
        false,
        local("2026-11-10 10:00:40"),
    )
    .await;
    book(
        pool,
        "A-REPLAY",
        "shengpay",
        "m2",
        600,
        540,
        local("2026-11-10 10:00:40.1"),
    )
    .await;
    // WuPay returns no refund id.
    job(pool, "A-WU", "wupay", "m3", 700, "succeeded").await;
    attempt(
        pool,
        "A-WU",
        1,
        "accepted",
        None,
        700,
        false,
        local("2026-11-10 11:00:00"),
    )
    .await;
    book(
        pool,
        "A-WU",
        "wupay",
        "m3",
        700,
        700,
        local("2026-11-10 11:00:00.1"),
    )
    .await;
    // Declined: no payment, no ledger entry.
    job(pool, "A-DECLINED", "shengpay", "m0", 800, "failed").await;
    attempt(
        pool,
        "A-DECLINED",
        1,
        "declined",
        None,
        0,
        false,
        local("2026-11-10 12:00:00"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_statement_accepted_attempts_are_the_provider_side_and_a_replayed_payment_counts_once()
 {
    let env = env().await;
    awkward_day(&env).await;
    let report = env.path("r.json");
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--format",
        "json",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["status"], "balanced");
    assert_eq!(json["discrepancies"], serde_json::json!([]));
    for t in json["totals"].as_array().unwrap() {
        assert_eq!(t["diff"], 0, "{t}");
        assert_eq!(t["ledger_count"], t["provider_count"], "{t}");
    }
    let total: i64 = json["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ledger_count"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 2_003);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_different_provider_refund_ids_for_one_refund_are_a_duplicate_at_provider() {
    let env = env().await;
    awkward_day(&env).await;
    job(env.pool(), "A-TWICE", "shengpay", "m1", 900, "succeeded").await;
    attempt(
        env.pool(),
        "A-TWICE",
        1,
        "accepted",
        Some("RO-T1"),
        900,
        true,
        local("2026-11-10 13:00:00"),
    )
    .await;
    attempt(
        env.pool(),
        "A-TWICE",
        2,
        "accepted",
        Some("RO-T2"),
        900,
        false,
        local("2026-11-10 13:00:45"),
    )
    .await;
    book(
        env.pool(),
        "A-TWICE",
        "shengpay",
        "m1",
        900,
        900,
        local("2026-11-10 13:00:45.1"),
    )
    .await;
    let out = env.run_bin(&["--date", DAY, "--format", "table"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let run_id = last_run(env.pool()).await;
    assert_eq!(
        discrepancies(env.pool(), run_id).await,
        vec![d(
            "duplicate_at_provider",
            "shengpay",
            "m1",
            "A-TWICE",
            Some(900),
            Some(1800)
        )]
    );
    assert_discrepancies_explain_diffs(env.pool(), run_id).await;
    let table = stdout(&out);
    assert!(
        table.contains("attempt 1 (fenced) RO-T1, attempt 2 RO-T2"),
        "{table}"
    );
    assert!(table.contains("see: refundctl job show A-TWICE"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_near_midnight_is_pending_until_the_grace_window_has_closed() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "G", date(DAY), 500, true).await;
    // Booked 5 minutes before midnight; the provider's answer never recorded.
    job(pool, "G-LATE", "shengpay", "m1", 100, "succeeded").await;
    book(
        pool,
        "G-LATE",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 23:55:00"),
    )
    .await;
    // Accepted 2 minutes before midnight; not booked (yet).
    job(pool, "G-PAID", "shengpay", "m2", 200, "in_flight").await;
    attempt(
        pool,
        "G-PAID",
        1,
        "accepted",
        Some("RO-GP"),
        200,
        false,
        local("2026-11-10 23:58:00"),
    )
    .await;
    // Booked and answered across midnight.
    job(pool, "G-ACROSS", "wupay", "m3", 300, "succeeded").await;
    attempt(
        pool,
        "G-ACROSS",
        1,
        "accepted",
        None,
        300,
        false,
        local("2026-11-10 23:59:59.9"),
    )
    .await;
    book(
        pool,
        "G-ACROSS",
        "wupay",
        "m3",
        300,
        300,
        local("2026-11-11 00:00:00.2"),
    )
    .await;

    let mut req = RunRequest::new(date(DAY));
    req.as_of = Some(local("2026-11-11 00:10:00"));
    let early = run(pool, &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(early.status, Status::Balanced);
    assert_eq!((early.discrepancies, early.pending), (0, 3));
    assert_eq!(
        discrepancies(pool, early.run_id).await,
        vec![
            d("pending", "wupay", "m3", "G-ACROSS", None, Some(300)),
            d("pending", "shengpay", "m1", "G-LATE", Some(100), None),
            d("pending", "shengpay", "m2", "G-PAID", None, Some(200)),
        ]
    );
    assert_discrepancies_explain_diffs(pool, early.run_id).await;

    req.as_of = Some(local("2026-11-11 02:30:00"));
    let late = run(pool, &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(late.status, Status::Discrepancies);
    assert_eq!(
        discrepancies(pool, late.run_id).await,
        vec![
            d("pending", "wupay", "m3", "G-ACROSS", None, Some(300)),
            d(
                "missing_at_provider",
                "shengpay",
                "m1",
                "G-LATE",
                Some(100),
                None
            ),
            d(
                "missing_in_ledger",
                "shengpay",
                "m2",
                "G-PAID",
                None,
                Some(200)
            ),
        ]
    );
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_discrepancies WHERE run_id = $1 AND refund_no = 'G-ACROSS'",
    )
    .bind(late.run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(detail.contains("booked at 2026-11-11 00:00:00"), "{detail}");

    // The next day sees the same refund from its side of midnight.
    let next = run(
        pool,
        &env.config,
        &RunRequest::new(date("2026-11-11")),
        &Progress::hidden(),
    )
    .await
    .unwrap();
    assert!(discrepancies(pool, next.run_id).await.contains(&d(
        "pending",
        "wupay",
        "m3",
        "G-ACROSS",
        Some(300),
        None
    )));
}
