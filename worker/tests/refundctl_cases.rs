//! Reconciliation cases: opened from a stored run, carried across reruns of the day
//! (`shared::store::cases::open_from_run`), listed with their age and explained with
//! `refundctl case`, through the store and through the real binary.

mod refundctl_common;

use std::process::Command;
use std::time::{Duration, Instant};

use refundctl_common as rc;
use worker::ctl::Status;
use worker::ctl::case::{self, ExplainArgs, ListArgs, StateArg};

/// (id, state, first_run_id, last_run_id, runs that saw it) of the case of (refund_no, kind).
async fn case_of(pool: &sqlx::PgPool, refund_no: &str, kind: &str) -> (i64, String, i64, i64, i64) {
    sqlx::query_as(
        "SELECT c.id, c.state, c.first_run_id, c.last_run_id,
                (SELECT count(*) FROM case_sightings r WHERE r.case_id = c.id)
         FROM reconciliation_cases c WHERE refund_no = $1 AND kind = $2",
    )
    .bind(refund_no)
    .bind(kind)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_keeps_a_cases_history_and_closes_what_it_no_longer_finds() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let day = "2026-11-10";
    let first = rc::stored_run(
        &db.pool,
        day,
        &[
            (
                "amount_mismatch",
                "shengpay",
                "m1",
                "A1",
                Some(100),
                Some(90),
            ),
            ("missing_in_ledger", "wupay", "w1", "B1", None, Some(50)),
            ("pending", "shengpay", "m1", "P1", Some(10), None),
            ("statement_missing", "wupay", "w2", "", Some(700), None),
        ],
    )
    .await;
    let (a1, state, from, to, runs) = case_of(&db.pool, "A1", "amount_mismatch").await;
    assert_eq!((state.as_str(), from, to, runs), ("open", first, first, 1));
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_cases WHERE kind = 'pending'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(pending, 0, "pending settles on a rerun: no case");

    // The rerun finds A1 again (another amount) and the missing statement, not B1.
    let second = rc::stored_run(
        &db.pool,
        day,
        &[
            (
                "amount_mismatch",
                "shengpay",
                "m1",
                "A1",
                Some(100),
                Some(80),
            ),
            ("statement_missing", "wupay", "w2", "", Some(700), None),
        ],
    )
    .await;
    let (id, state, from, to, runs) = case_of(&db.pool, "A1", "amount_mismatch").await;
    assert_eq!(
        (id, state.as_str(), from, to, runs),
        (a1, "open", first, second, 2),
        "the same case, seen by both runs"
    );
    let amount: Option<i64> =
        sqlx::query_scalar("SELECT provider_amount FROM reconciliation_cases WHERE id = $1")
            .bind(a1)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(amount, Some(80), "as the latest run counted it");
    let (_, state, _, last, runs) = case_of(&db.pool, "B1", "missing_in_ledger").await;
    assert_eq!(
        (state.as_str(), last, runs),
        ("resolved_by_rerun", first, 1)
    );
    let note: String =
        sqlx::query_scalar("SELECT close_note FROM reconciliation_cases WHERE refund_no = 'B1'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        note,
        format!("not found by run {second}, which supersedes run {first}")
    );

    // Found once more by a third run: open again, history kept.
    let third = rc::stored_run(
        &db.pool,
        day,
        &[
            (
                "amount_mismatch",
                "shengpay",
                "m1",
                "A1",
                Some(100),
                Some(80),
            ),
            ("missing_in_ledger", "wupay", "w1", "B1", None, Some(50)),
        ],
    )
    .await;
    let (_, state, from, last, runs) = case_of(&db.pool, "B1", "missing_in_ledger").await;
    assert_eq!(
        (state.as_str(), from, last, runs),
        ("open", first, third, 2)
    );
    // An explained case stays explained when a run finds it again.
    let (a1, ..) = case_of(&db.pool, "A1", "amount_mismatch").await;
    let ctl = rc::ctl(&config, &db.pool);
    let s = case::explain(
        &ctl,
        &ExplainArgs {
            id: a1,
            who: rc::who("finn", "coupon settled by the provider a day late: FIN-12"),
        },
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(s, Status::Done);
    rc::stored_run(
        &db.pool,
        day,
        &[(
            "amount_mismatch",
            "shengpay",
            "m1",
            "A1",
            Some(100),
            Some(80),
        )],
    )
    .await;
    assert_eq!(
        case_of(&db.pool, "A1", "amount_mismatch").await.1,
        "explained"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_are_listed_with_their_age_and_explaining_is_audited_once() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::stored_run(
        &db.pool,
        "2026-11-10",
        &[(
            "missing_at_provider",
            "shengpay",
            "m1",
            "L1",
            Some(100),
            None,
        )],
    )
    .await;
    rc::stored_run(
        &db.pool,
        "2026-11-11",
        &[(
            "duplicate_at_provider",
            "wupay",
            "w1",
            "L2",
            Some(100),
            Some(200),
        )],
    )
    .await;
    // L1's case has been open three days.
    sqlx::query(
        "UPDATE reconciliation_cases SET opened_at = now() - interval '3 days 1 hour'
         WHERE refund_no = 'L1'",
    )
    .execute(&db.pool)
    .await?;
    let ctl = rc::ctl(&config, &db.pool);
    let list = |date: Option<&str>, state: Option<StateArg>| ListArgs {
        date: date.map(|d| d.parse().unwrap()),
        state,
        json: true,
    };
    let mut out = Vec::new();
    case::list(&ctl, &list(None, None), &mut out).await?;
    let rows: Vec<serde_json::Value> = rc::text(&out)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["refund_no"], "L1");
    assert_eq!(rows[0]["days_open"], 3);
    assert_eq!(rows[1]["days_open"], 0);
    let mut out = Vec::new();
    case::list(&ctl, &list(Some("2026-11-11"), None), &mut out).await?;
    assert_eq!(rc::text(&out).lines().count(), 1);

    let id = rows[0]["id"].as_i64().expect("id");
    let explain = |by: &str| ExplainArgs {
        id,
        who: rc::who(by, "refunded in cash at the counter: ticket SR-9"),
    };
    assert_eq!(
        case::explain(&ctl, &explain("gus"), &mut Vec::new()).await?,
        Status::Done
    );
    let mut out = Vec::new();
    assert_eq!(
        case::explain(&ctl, &explain("hal"), &mut out).await?,
        Status::Incomplete,
        "only open cases are explained"
    );
    assert!(rc::text(&out).contains("explained, not open"));
    let audit = rc::audit_rows(&db.pool, "L1").await;
    assert_eq!(
        audit
            .iter()
            .map(|a| (a.0.as_str(), a.1.as_str(), a.2.as_str()))
            .collect::<Vec<_>>(),
        [
            ("gus", "case_explain", "explained"),
            ("hal", "case_explain", "refused")
        ]
    );
    let mut out = Vec::new();
    case::list(
        &ctl,
        &ListArgs {
            date: None,
            state: Some(StateArg::Explained),
            json: false,
        },
        &mut out,
    )
    .await?;
    let text = rc::text(&out);
    assert!(text.contains("DAYS OPEN"), "{text}");
    assert!(text.contains("L1") && !text.contains("L2"), "{text}");
    assert!(text.contains("ticket SR-9"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_a_hundred_thousand_discrepancies_opens_its_cases_in_seconds()
-> anyhow::Result<()> {
    let (_config, db) = testkit::test_config().await?;
    let runs: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (business_date, source, timezone, grace_minutes, status,
             started_at, locked_at, finished_at)
         SELECT '2026-11-10', 'statement', 'Asia/Shanghai', 30, 'discrepancies', now(), now(),
                now()
         FROM generate_series(1, 2) RETURNING id",
    )
    .fetch_all(&db.pool)
    .await?;
    let (first, second) = (runs[0], runs[1]);
    // The first run finds 100,000 refunds missing in the ledger; its rerun half of them.
    for (run, n) in [(first, 100_000), (second, 50_000)] {
        sqlx::query(
            "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant,
                 refund_no, ledger_amount, provider_amount, detail)
             SELECT $1, 'missing_in_ledger', 'shengpay', 'm' || (i % 16), 'R' || i, NULL, 100,
                    'statement line ' || i
             FROM generate_series(1, $2) i",
        )
        .bind(run)
        .bind(n)
        .execute(&db.pool)
        .await?;
    }
    let mut tx = db.pool.begin().await?;
    let t = Instant::now();
    let opened = shared::store::cases::open_from_run(&mut tx, first).await?;
    let took_first = t.elapsed();
    tx.commit().await?;
    assert_eq!(opened.opened, 100_000);

    let mut tx = db.pool.begin().await?;
    sqlx::query("UPDATE reconciliation_runs SET superseded_by = $1 WHERE id = $2")
        .bind(second)
        .bind(first)
        .execute(&mut *tx)
        .await?;
    let t = Instant::now();
    let rerun = shared::store::cases::open_from_run(&mut tx, second).await?;
    let took_second = t.elapsed();
    tx.commit().await?;
    assert_eq!(
        (rerun.opened, rerun.seen_again, rerun.resolved_by_rerun),
        (0, 50_000, 50_000)
    );
    eprintln!("open_from_run: 100,000 new cases in {took_first:?}; rerun in {took_second:?}");
    // Generous for a shared two-core machine; a statement per row would take minutes.
    let bound = Duration::from_secs(30);
    assert!(
        took_first < bound && took_second < bound,
        "{took_first:?} / {took_second:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_files_a_correction_for_approval_and_exits_1_for_unknown_cases_and_self_approval()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::succeeded_job(&db.pool, "K1", "w1").await;
    let file = std::env::temp_dir().join(format!(
        "refundctl-cases-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    // Four eyes: the default, unset in the file.
    std::fs::write(
        &file,
        format!(
            "database_url = {:?}\namqp_url = {:?}\n",
            config.database_url, config.amqp_url
        ),
    )?;
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_refundctl"))
            .env_remove("REFUNDS_CONFIG")
            .arg("--config")
            .arg(&file)
            .args(args)
            .output()
            .expect("refundctl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code().expect("exited"), text)
    };

    let (code, text) = run(&[
        "job",
        "correct",
        "K1",
        "--as",
        "failed",
        "--evidence",
        "not in WuPay's statement of 2026-11-10",
        "--operator",
        "ann",
    ]);
    assert_eq!(code, 0, "{text}");
    let id: i64 = text
        .split("approval request ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no request id in {text}"));
    let (code, text) = run(&["approvals", "list"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("K1") && text.contains("ann"), "{text}");
    let (code, text) = run(&["approvals", "approve", &id.to_string(), "--operator", "ann"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(rc::state_of(&db.pool, "K1").await, "succeeded");
    let (code, text) = run(&["approvals", "approve", &id.to_string(), "--operator", "ben"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(rc::state_of(&db.pool, "K1").await, "failed");

    let (code, text) = run(&["case", "list", "--state", "closed"]);
    assert_eq!(code, 2, "not a case state: {text}");
    let (code, text) = run(&["case", "list", "--state", "resolved_by_rerun"]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = run(&[
        "case",
        "explain",
        "4242",
        "--note",
        "x",
        "--operator",
        "ann",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no case 4242"), "{text}");
    let (code, text) = run(&[
        "approvals",
        "reject",
        "4242",
        "--note",
        "x",
        "--operator",
        "ann",
    ]);
    assert_eq!(code, 1, "{text}");
    let _ = std::fs::remove_file(&file);
    Ok(())
}
