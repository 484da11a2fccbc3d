//! The acceptance scenario of issue #5: a day of 100,000 refunds with planted discrepancies of
//! every kind, reconciled by the binary against a statement, and a clean day.

mod common;

use common::*;

const DAY: &str = "2026-11-10";

/// Plants, on top of the bulk day, one refund of every kind of difference, and some near
/// midnight that must not be reported. Returns the discrepancies the report must list.
async fn plant(env: &Env, statement: &std::path::Path) -> Vec<D> {
    let pool = env.pool();
    let mut rows = Vec::new();
    // Paid twice by the provider.
    job(pool, "X-DUP", "shengpay", "m1", 500, "succeeded").await;
    book(
        pool,
        "X-DUP",
        "shengpay",
        "m1",
        500,
        500,
        local("2026-11-10 10:00:00"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m1",
        "X-DUP",
        "RO-DUP-1",
        500,
        500,
        local("2026-11-10 09:59:59.9"),
    ));
    rows.push(row(
        "shengpay",
        "m1",
        "X-DUP",
        "RO-DUP-2",
        500,
        500,
        local("2026-11-10 10:05:00"),
    ));
    // Paid by the provider, never booked (the job is dead: outcome unknown).
    job(pool, "X-NOLEDGER", "shengpay", "m2", 300, "dead").await;
    rows.push(row(
        "shengpay",
        "m2",
        "X-NOLEDGER",
        "RO-NL",
        300,
        300,
        local("2026-11-10 11:00:00"),
    ));
    // Booked, never paid.
    job(pool, "X-NOTPAID", "wupay", "m3", 400, "succeeded").await;
    book(
        pool,
        "X-NOTPAID",
        "wupay",
        "m3",
        400,
        400,
        local("2026-11-10 12:00:00"),
    )
    .await;
    // One fen apart.
    job(pool, "X-ONEFEN", "wupay", "m0", 1000, "succeeded").await;
    book(
        pool,
        "X-ONEFEN",
        "wupay",
        "m0",
        1000,
        1000,
        local("2026-11-10 13:00:00"),
    )
    .await;
    rows.push(row(
        "wupay",
        "m0",
        "X-ONEFEN",
        "",
        1000,
        999,
        local("2026-11-10 12:59:59"),
    ));
    // Booked 10 s before midnight, paid 10 s after: pending.
    job(pool, "X-LATE-BOOK", "shengpay", "m1", 200, "succeeded").await;
    book(
        pool,
        "X-LATE-BOOK",
        "shengpay",
        "m1",
        200,
        180,
        local("2026-11-10 23:59:50"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m1",
        "X-LATE-BOOK",
        "RO-LB",
        200,
        180,
        local("2026-11-11 00:00:10"),
    ));
    // Paid 5 s before midnight, booked 5 s after (on the next business date): pending.
    job(pool, "X-LATE-PAY", "shengpay", "m2", 250, "succeeded").await;
    book(
        pool,
        "X-LATE-PAY",
        "shengpay",
        "m2",
        250,
        250,
        local("2026-11-11 00:00:05"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m2",
        "X-LATE-PAY",
        "RO-LP",
        250,
        250,
        local("2026-11-10 23:59:55"),
    ));
    // Both sides a breath before midnight: matched.
    job(pool, "X-EDGE-OK", "shengpay", "m3", 260, "succeeded").await;
    book(
        pool,
        "X-EDGE-OK",
        "shengpay",
        "m3",
        260,
        260,
        local("2026-11-10 23:59:59.9"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m3",
        "X-EDGE-OK",
        "RO-EO",
        260,
        260,
        local("2026-11-10 23:59:59.8"),
    ));
    // Both sides a breath after midnight: the next day's business, not this one's.
    job(pool, "X-NEXTDAY", "shengpay", "m3", 270, "succeeded").await;
    book(
        pool,
        "X-NEXTDAY",
        "shengpay",
        "m3",
        270,
        270,
        local("2026-11-11 00:00:00.5"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m3",
        "X-NEXTDAY",
        "RO-ND",
        270,
        270,
        local("2026-11-11 00:00:00.4"),
    ));
    // Booked 15 minutes before midnight (inside the grace window) but never paid, and the
    // provider's next day is in the statement: missing, not pending.
    job(pool, "X-LATE-NOTPAID", "shengpay", "m0", 280, "succeeded").await;
    book(
        pool,
        "X-LATE-NOTPAID",
        "shengpay",
        "m0",
        280,
        280,
        local("2026-11-10 23:45:00"),
    )
    .await;
    // Booked 20 s after the day began, paid 2 s before it (on the previous date): pending.
    job(pool, "X-EARLY-BOOK", "shengpay", "m0", 290, "succeeded").await;
    book(
        pool,
        "X-EARLY-BOOK",
        "shengpay",
        "m0",
        290,
        290,
        local("2026-11-10 00:00:20"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m0",
        "X-EARLY-BOOK",
        "RO-EB",
        290,
        290,
        local("2026-11-09 23:59:58"),
    ));
    // A row of the previous day far from midnight: ignored.
    job(pool, "X-PREVDAY", "shengpay", "m0", 310, "succeeded").await;
    rows.push(row(
        "shengpay",
        "m0",
        "X-PREVDAY",
        "RO-PD",
        310,
        310,
        local("2026-11-09 12:00:00"),
    ));
    // Booked and reversed the same day, never paid: nothing to report.
    job(pool, "X-REVERSED", "shengpay", "m1", 700, "succeeded").await;
    let id = book(
        pool,
        "X-REVERSED",
        "shengpay",
        "m1",
        700,
        700,
        local("2026-11-10 14:00:00"),
    )
    .await;
    reverse(pool, id, 700, 700, local("2026-11-10 15:00:00")).await;
    // Booked 800, corrected by -100 the same day, paid 700: matched.
    job(pool, "X-PARTIAL", "shengpay", "m2", 800, "succeeded").await;
    let id = book(
        pool,
        "X-PARTIAL",
        "shengpay",
        "m2",
        800,
        800,
        local("2026-11-10 14:30:00"),
    )
    .await;
    reverse(pool, id, 100, 100, local("2026-11-10 16:00:00")).await;
    rows.push(row(
        "shengpay",
        "m2",
        "X-PARTIAL",
        "RO-PA",
        700,
        700,
        local("2026-11-10 14:29:59"),
    ));
    append(statement, &rows);

    vec![
        d(
            "duplicate_at_provider",
            "shengpay",
            "m1",
            "X-DUP",
            Some(500),
            Some(1000),
        ),
        d("pending", "shengpay", "m0", "X-EARLY-BOOK", Some(290), None),
        d("pending", "shengpay", "m1", "X-LATE-BOOK", Some(180), None),
        d(
            "missing_at_provider",
            "shengpay",
            "m0",
            "X-LATE-NOTPAID",
            Some(280),
            None,
        ),
        d("pending", "shengpay", "m2", "X-LATE-PAY", None, Some(250)),
        d(
            "missing_in_ledger",
            "shengpay",
            "m2",
            "X-NOLEDGER",
            None,
            Some(300),
        ),
        d(
            "missing_at_provider",
            "wupay",
            "m3",
            "X-NOTPAID",
            Some(400),
            None,
        ),
        d(
            "amount_mismatch",
            "wupay",
            "m0",
            "X-ONEFEN",
            Some(1000),
            Some(999),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_of_100_000_refunds_reports_each_planted_discrepancy_and_nothing_else_and_exits_1() {
    let env = env().await;
    seed_day(env.pool(), "B", date(DAY), 100_000, false).await;
    let statement = env.path("statement.csv");
    write_statement(env.pool(), "B", date(DAY), &statement).await;
    let expected = plant(&env, &statement).await;

    let report = env.path("report.json");
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--format",
        "json",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).expect("the report is JSON");
    assert_eq!(json["date"], DAY);
    assert_eq!(json["status"], "discrepancies");
    let mut found: Vec<D> = json["discrepancies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_owned(),
                v["provider"].as_str().unwrap().to_owned(),
                v["merchant"].as_str().unwrap().to_owned(),
                v["refund_no"].as_str().unwrap().to_owned(),
                v["ledger_amount"].as_i64(),
                v["provider_amount"].as_i64(),
            )
        })
        .collect();
    found.sort_by(|a, b| a.3.cmp(&b.3));
    assert_eq!(found, expected);

    // The totals: every pair of the bulk day, and the sums of both sides.
    let totals = json["totals"].as_array().unwrap();
    assert_eq!(totals.len(), 8, "{totals:?}");
    let ledger_count: i64 = totals
        .iter()
        .map(|t| t["ledger_count"].as_i64().unwrap())
        .sum();
    let provider_count: i64 = totals
        .iter()
        .map(|t| t["provider_count"].as_i64().unwrap())
        .sum();
    // Bulk + X-DUP, X-NOTPAID, X-ONEFEN, X-LATE-BOOK, X-EDGE-OK, X-LATE-NOTPAID,
    // X-EARLY-BOOK, X-REVERSED, X-PARTIAL.
    assert_eq!(ledger_count, 100_000 + 9);
    // Bulk + X-DUP twice, X-NOLEDGER, X-ONEFEN, X-LATE-PAY, X-EDGE-OK, X-PARTIAL.
    assert_eq!(provider_count, 100_000 + 7);
    let run_id = last_run(env.pool()).await;
    assert_discrepancies_explain_diffs(env.pool(), run_id).await;

    // The same day, every refund compared one by one, gives the same answer.
    let out = env.run_bin(&[
        "--date",
        DAY,
        "--statement",
        statement.to_str().unwrap(),
        "--exhaustive",
        "--format",
        "csv",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let exhaustive = discrepancies(env.pool(), last_run(env.pool()).await).await;
    assert_eq!(exhaustive, expected);
    let csv = stdout(&out);
    assert!(
        csv.starts_with(
            "date,kind,provider,merchant,refund_no,ledger_amount,provider_amount,detail\n"
        ),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1 + expected.len(), "{csv}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_day_of_100_000_refunds_is_balanced_and_exits_0() {
    let env = env().await;
    seed_day(env.pool(), "C", date(DAY), 100_000, false).await;
    let statement = env.path("statement.csv");
    write_statement(env.pool(), "C", date(DAY), &statement).await;
    let out = env.run_bin(&["--date", DAY, "--statement", statement.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("Status: BALANCED"), "{table}");
    assert!(table.contains("No discrepancies."), "{table}");
    assert!(
        stderr(&out).contains("balanced: 0 discrepancies, 0 pending"),
        "{}",
        stderr(&out)
    );
}
