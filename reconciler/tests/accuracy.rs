//! Accuracy (issue 17): a test day with every kind of difference planted, reconciled against
//! the providers' statements of the day and the next, is found item by item with its kind and
//! nothing else (recall = precision = 100%, computed), and a clean day is balanced.

mod common;

use std::collections::BTreeSet;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{RunOutcome, RunRequest, Status, run};

const DAY: &str = "2026-11-10";
const NEXT: &str = "2026-11-11";

/// What a run found or did: (business date, kind, refund_no). Kinds are the discrepancy
/// kinds, and `repair:paid` / `repair:not_paid` for unknown outcomes the statements settled.
type Item = (String, String, String);

fn item(day: &str, kind: &str, refund_no: &str) -> Item {
    (day.into(), kind.into(), refund_no.into())
}

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

/// A booked refund (job and ledger entry) at `at`.
#[allow(clippy::too_many_arguments)]
async fn booked(
    pool: &sqlx::PgPool,
    refund_no: &str,
    provider: &str,
    merchant: &str,
    fee: i64,
    settle: i64,
    at: chrono::DateTime<chrono::Utc>,
) {
    job(pool, refund_no, provider, merchant, fee, "succeeded").await;
    book(pool, refund_no, provider, merchant, fee, settle, at).await;
}

async fn reconcile(env: &Env, day: &str, files: &[std::path::PathBuf]) -> RunOutcome {
    let mut req = RunRequest::new(date(day));
    req.statements = files.to_vec();
    let o = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_discrepancies_explain_diffs(env.pool(), o.run_id).await;
    o
}

/// Everything a run reports as wrong (pending is not wrong: it waits for its other half) and
/// every repair it made.
async fn found(env: &Env, day: &str, o: &RunOutcome) -> Vec<Item> {
    let mut out: Vec<Item> = discrepancies(env.pool(), o.run_id)
        .await
        .into_iter()
        .filter(|d| d.0 != "pending")
        .map(|d| item(day, &d.0, &d.3))
        .collect();
    out.extend(
        o.repairs
            .paid
            .iter()
            .map(|r| item(day, "repair:paid", &r.refund_no)),
    );
    out.extend(
        o.repairs
            .not_paid
            .iter()
            .map(|r| item(day, "repair:not_paid", &r.refund_no)),
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_planted_difference_is_found_with_its_kind_and_nothing_else() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "A", date(DAY), 400, false).await;
    seed_day(pool, "B", date(NEXT), 400, false).await;
    let (day, next) = (env.path("day.csv"), env.path("next.csv"));
    write_statement(pool, "A", date(DAY), &day).await;
    write_statement(pool, "B", date(NEXT), &next).await;
    let noon = local("2026-11-10 12:00:00");
    let mut planted: BTreeSet<Item> = BTreeSet::new();
    let mut rows: Vec<String> = Vec::new();

    // Booked, never paid.
    booked(pool, "P-MAP", "shengpay", "m1", 1000, 1000, noon).await;
    planted.insert(item(DAY, "missing_at_provider", "P-MAP"));
    // Paid, never booked.
    rows.push(row("wupay", "m2", "P-MIL", "", 700, 700, noon));
    planted.insert(item(DAY, "missing_in_ledger", "P-MIL"));
    // Paid twice: ShengPay under two refund ids, WuPay (no id of its own) in two rows.
    booked(pool, "P-DUPS", "shengpay", "m1", 800, 800, noon).await;
    rows.push(row("shengpay", "m1", "P-DUPS", "RO-S1", 800, 800, noon));
    rows.push(row("shengpay", "m1", "P-DUPS", "RO-S2", 800, 800, noon));
    planted.insert(item(DAY, "duplicate_at_provider", "P-DUPS"));
    booked(pool, "P-DUPW", "wupay", "m2", 800, 800, noon).await;
    rows.push(row("wupay", "m2", "P-DUPW", "", 800, 800, noon));
    rows.push(row("wupay", "m2", "P-DUPW", "", 800, 800, noon));
    planted.insert(item(DAY, "duplicate_at_provider", "P-DUPW"));
    // One fen apart in settlement.
    booked(pool, "P-FEN", "shengpay", "m2", 1000, 1000, noon).await;
    rows.push(row("shengpay", "m2", "P-FEN", "RO-F", 1000, 999, noon));
    planted.insert(item(DAY, "amount_mismatch", "P-FEN"));
    // Same settlement, another refund_fee.
    booked(pool, "P-FEE", "wupay", "m3", 1000, 900, noon).await;
    rows.push(row("wupay", "m3", "P-FEE", "", 1001, 900, noon));
    planted.insert(item(DAY, "amount_mismatch", "P-FEE"));
    // A row that cannot be right: settlement above its refund.
    booked(pool, "P-INV", "shengpay", "m3", 1000, 1000, noon).await;
    rows.push(row("shengpay", "m3", "P-INV", "RO-I", 1000, 1100, noon));
    planted.insert(item(DAY, "invalid_at_provider", "P-INV"));
    // Paid at 23:50 on DAY and again at 00:10 on NEXT under a new id: NEXT's duplicate.
    booked(
        pool,
        "M-TWICE",
        "shengpay",
        "m1",
        100,
        100,
        local("2026-11-10 23:50:00"),
    )
    .await;
    rows.push(row(
        "shengpay",
        "m1",
        "M-TWICE",
        "RO-T1",
        100,
        100,
        local("2026-11-10 23:49:59.9"),
    ));
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
    planted.insert(item(NEXT, "duplicate_at_provider", "M-TWICE"));
    // Booked 100 at 23:55, paid 90 at 00:05: an amount mismatch on both days.
    booked(
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
    planted.insert(item(DAY, "amount_mismatch", "M-DRIFT"));
    planted.insert(item(NEXT, "amount_mismatch", "M-DRIFT"));
    // Unknown outcomes at WuPay: one listed (paid), one on neither day's statement (not paid).
    unknown(pool, "U-PAID", 500, local("2026-11-10 10:00:00")).await;
    rows.push(row(
        "wupay",
        "m1",
        "U-PAID",
        "WU-1",
        500,
        450,
        local("2026-11-10 10:00:01"),
    ));
    planted.insert(item(DAY, "repair:paid", "U-PAID"));
    unknown(pool, "U-NOT", 600, local("2026-11-10 11:00:00")).await;
    planted.insert(item(NEXT, "repair:not_paid", "U-NOT"));
    append(&day, &rows);

    let files = [day, next];
    let d = reconcile(&env, DAY, &files).await;
    assert_eq!(d.status, Status::Discrepancies);
    let n = reconcile(&env, NEXT, &files).await;
    assert_eq!(n.status, Status::Discrepancies);
    let mut reported: Vec<Item> = found(&env, DAY, &d).await;
    reported.extend(found(&env, NEXT, &n).await);
    let reported_set: BTreeSet<Item> = reported.iter().cloned().collect();
    assert_eq!(
        reported.len(),
        reported_set.len(),
        "reported twice: {reported:?}"
    );

    let hits = planted.intersection(&reported_set).count() as f64;
    let recall = hits / planted.len() as f64;
    let precision = hits / reported_set.len() as f64;
    let missed: Vec<&Item> = planted.difference(&reported_set).collect();
    let extra: Vec<&Item> = reported_set.difference(&planted).collect();
    assert!(
        recall == 1.0 && precision == 1.0,
        "recall {recall:.3}, precision {precision:.3}; missed {missed:?}; not planted {extra:?}"
    );
    // Every kind the statements can show, planted and found.
    let kinds: BTreeSet<&str> = planted.iter().map(|i| i.1.as_str()).collect();
    assert_eq!(kinds.len(), 7, "{kinds:?}");

    // What the repairs did stands: paid is booked, not paid stays dead for a replay.
    let states: Vec<(String, String)> = sqlx::query_as(
        "SELECT refund_no, state FROM jobs WHERE refund_no IN ('U-PAID', 'U-NOT') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        states,
        vec![
            ("U-NOT".into(), "dead".into()),
            ("U-PAID".into(), "succeeded".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_day_reconciled_against_its_statement_is_balanced_with_nothing_reported() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "C", date(DAY), 2_000, false).await;
    let day = env.path("day.csv");
    write_statement(pool, "C", date(DAY), &day).await;
    let o = reconcile(&env, DAY, &[day]).await;
    assert_eq!(o.status, Status::Balanced);
    assert_eq!((o.discrepancies, o.pending), (0, 0));
    assert!(o.repairs.is_empty());
    assert!(discrepancies(pool, o.run_id).await.is_empty());
    assert!(
        o.totals
            .iter()
            .all(|t| t.diff == 0 && t.ledger_count == t.provider_count)
    );
}
