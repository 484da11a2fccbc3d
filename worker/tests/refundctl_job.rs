//! `refundctl job resolve` and `job show`: manual resolution with ledger, event and audit, and a
//! job's whole story.

mod refundctl_common;

use refundctl_common as rc;
use shared::state::{Cause, State};
use shared::store::jobs::Verdict;
use shared::store::operator::Discrepancies;
use worker::ctl::Status;
use worker::ctl::dlq;
use worker::ctl::job::{self, ResolveAs, ShowArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_dead_job_as_succeeded_books_a_manual_ledger_entry_an_event_and_an_audit_row()
-> anyhow::Result<()> {
    // The one-person path: resolution applies at once.
    let (config, db) = rc::one_person(testkit::test_config().await?);
    rc::dead_job(
        &db.pool,
        "R1",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("R1", ResolveAs::Succeeded, Some(90), "frank"),
        &mut out,
    )
    .await?;
    assert_eq!(r.verdict, Verdict::Done { prior: State::Dead });
    assert_eq!(r.status(), Status::Done);
    assert!(rc::text(&out).contains("R1  resolved: dead -> succeeded"));
    assert_eq!(rc::state_of(&db.pool, "R1").await, "succeeded");
    let ledger: (String, i64, i64, String) = sqlx::query_as(
        "SELECT entry_kind, refund_fee, settlement_refund_fee, source FROM ledger WHERE refund_no = 'R1'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(ledger, ("refund".into(), 100, 90, "manual".into()));
    let event: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE refund_no = 'R1' AND routing_key = 'refund.resolved'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(event["state"], "succeeded");
    assert_eq!(event["settlement_refund_fee"], 90);
    let audit = rc::audit_rows(&db.pool, "R1").await;
    assert_eq!(
        audit,
        vec![(
            "frank".into(),
            "resolve".into(),
            "resolved".into(),
            Some("dead".into()),
            None
        )]
    );

    // A final job is never resolved again: refused, audited, exit 1, nothing booked.
    let mut out = Vec::new();
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("R1", ResolveAs::Failed, None, "frank"),
        &mut out,
    )
    .await?;
    assert_eq!(r.status(), Status::Incomplete);
    assert!(
        matches!(&r.verdict, Verdict::Refused { prior: Some(State::Succeeded), reason } if reason.contains("not dead")),
        "{:?}",
        r.verdict
    );
    assert!(rc::text(&out).contains("R1  refused: job is succeeded, not dead"));
    assert_eq!(rc::state_of(&db.pool, "R1").await, "succeeded");
    assert_eq!(rc::audit_rows(&db.pool, "R1").await.len(), 2);
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(entries, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_as_failed_releases_the_order_amount_and_bad_input_is_refused()
-> anyhow::Result<()> {
    // The one-person path: resolution applies at once.
    let (config, db) = rc::one_person(testkit::test_config().await?);
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    rc::exhausted_job(&db.pool, "R2", "m1", "SYSTEMERROR").await;
    let ctl = rc::ctl(&config, &db.pool);

    let r = job::resolve(
        &ctl,
        &rc::resolve_args("R1", ResolveAs::Failed, None, "gina"),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(r.status(), Status::Done);
    assert_eq!(rc::state_of(&db.pool, "R1").await, "failed");
    let committed: i64 =
        sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = 'OR1'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(committed, 0, "the failed refund's amount is released");

    // A settlement fee above the refund fee is refused (and audited).
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("R2", ResolveAs::Succeeded, Some(101), "gina"),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(r.status(), Status::Incomplete);
    assert_eq!(rc::state_of(&db.pool, "R2").await, "dead");
    // --settlement-fee makes no sense with --as failed: could not run.
    let e = job::resolve(
        &ctl,
        &rc::resolve_args("R2", ResolveAs::Failed, Some(5), "gina"),
        &mut Vec::new(),
    )
    .await;
    assert!(e.is_err());
    // An unknown refund_no is refused.
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("NOPE", ResolveAs::Failed, None, "gina"),
        &mut Vec::new(),
    )
    .await?;
    assert!(matches!(r.verdict, Verdict::Refused { prior: None, .. }));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_show_tells_the_whole_story_calls_history_audit_poison_and_discrepancies()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    let conflicting = String::from_utf8(rc::body("R1", "m1"))
        .unwrap()
        .replace("\"refund_fee\":100", "\"refund_fee\":99");
    rc::take(&db.pool, conflicting.as_bytes()).await;
    let ctl = rc::ctl(&config, &db.pool);
    dlq::replay(&ctl, &rc::replay_these("hana", &["R1"]), &mut Vec::new()).await?;
    // A reconciliation run that found R1 paid by the provider but missing in the ledger.
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (business_date, source, timezone, grace_minutes, status,
             discrepancy_count, started_at, locked_at, finished_at)
         VALUES ('2026-11-22', 'attempts', 'Asia/Shanghai', 30, 'discrepancies', 1, now(), now(),
                 now())
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant, refund_no,
             ledger_amount, provider_amount, detail)
         VALUES ($1, 'missing_in_ledger', 'shengpay', 'm1', 'R1', NULL, 100, 'paid, not booked')",
    )
    .bind(run_id)
    .execute(&db.pool)
    .await?;

    // A notify that came for it, and its place in the status query schedule.
    sqlx::query(
        "INSERT INTO provider_notifications (provider, merchant, refund_no, status, body,
             body_sha256, effect)
         VALUES ('shengpay', 'm1', 'R1', 'PROCESSING', '{\"refundStatus\":\"PROCESSING\"}',
                 'abc', 'no_change')",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO status_queries (refund_no, provider, merchant, next_at, queries, last_status)
         VALUES ('R1', 'shengpay', 'm1', now() + interval '5 minutes', 2, 'PROCESSING')",
    )
    .execute(&db.pool)
    .await?;

    let show = |json| ShowArgs {
        refund_no: "R1".into(),
        json,
    };
    let mut out = Vec::new();
    assert_eq!(job::show(&ctl, &show(false), &mut out).await?, Status::Done);
    let printed = rc::text(&out);
    for needle in [
        "Refund R1  order OR1  shengpay/m1",
        "state        received",
        "attempts     2",
        "Provider calls (2)",
        "retry_later SYSTEMERROR  http 200  12.3 ms",
        "\"sign\":\"***\"",
        "History (6 transitions)",
        "(intake) -> received",
        "in_flight -> retry_wait",
        "in_flight -> dead",
        "dead -> received",
        "operator:hana",
        "Operator audit (1)",
        "replay replayed  by hana  dead -> received",
        "note: INC-42 provider outage over",
        "Provider notifies (1)",
        "PROCESSING  no change (a duplicate, or older than what was known)",
        "body: {\"refundStatus\":\"PROCESSING\"}",
        "Status queries (2 sent)",
        "last status  PROCESSING",
        "Poison messages with this refund_no (1)",
        "conflict",
        "Reconciliation discrepancies (1)",
        "missing_in_ledger",
    ] {
        assert!(
            printed.contains(needle),
            "missing {needle:?} in:\n{printed}"
        );
    }

    let mut out = Vec::new();
    job::show(&ctl, &show(true), &mut out).await?;
    let v: serde_json::Value = serde_json::from_slice(&out)?;
    assert_eq!(v["job"]["state"], "received");
    assert_eq!(v["job"]["attempt"], 2);
    assert_eq!(v["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(v["attempts"][0]["code"], "SYSTEMERROR");
    assert_eq!(v["attempts"][0]["latency_us"], 12345);
    assert!(v["attempts"][0]["response"].is_string());
    assert_eq!(v["transitions"].as_array().unwrap().len(), 6);
    assert_eq!(v["audit"][0]["operator"], "hana");
    assert_eq!(v["notifications"][0]["effect"], "no_change");
    assert_eq!(v["status_query"]["queries"], 2);
    assert!(v["status_query"]["next_at"].is_string());
    assert_eq!(v["rejections"][0]["kind"], "conflict");
    assert_eq!(v["discrepancies"]["status"], "found");
    assert_eq!(v["discrepancies"]["rows"][0]["kind"], "missing_in_ledger");
    assert_eq!(v["discrepancies"]["rows"][0]["provider_amount"], 100);
    assert_eq!(v["discrepancies"]["rows"][0]["business_date"], "2026-11-22");

    // Without the reconciler's tables, job show says so and shows everything else.
    sqlx::query("DROP TABLE reconciliation_discrepancies CASCADE")
        .execute(&db.pool)
        .await?;
    let detail = shared::store::operator::job_detail(&db.pool, "R1").await?;
    assert_eq!(detail.discrepancies, Discrepancies::NotInstalled);
    assert_eq!(detail.transitions.len(), 6);
    let mut out = Vec::new();
    job::show(&ctl, &show(false), &mut out).await?;
    assert!(rc::text(&out).contains("Reconciliation: not installed"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_show_of_an_unknown_refund_is_not_found_and_of_a_rejected_one_shows_the_rejection()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let ctl = rc::ctl(&config, &db.pool);
    let args = |no: &str| ShowArgs {
        refund_no: no.into(),
        json: false,
    };
    assert_eq!(
        job::show(&ctl, &args("NOPE"), &mut Vec::new()).await?,
        Status::Incomplete
    );
    let body = String::from_utf8(rc::body("BAD1", "m1"))
        .unwrap()
        .replace("\"refund_fee\":100", "\"refund_fee\":1.5");
    rc::take(&db.pool, body.as_bytes()).await;
    let mut out = Vec::new();
    assert_eq!(
        job::show(&ctl, &args("BAD1"), &mut out).await?,
        Status::Done
    );
    let printed = rc::text(&out);
    assert!(printed.contains("no job"), "{printed}");
    assert!(printed.contains("rejected"), "{printed}");
    assert!(printed.contains("refund_fee"), "{printed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_as_failed_is_refused_when_an_attempt_was_accepted_or_unrecognised()
-> anyhow::Result<()> {
    // The one-person path: resolution applies at once.
    let (config, db) = rc::one_person(testkit::test_config().await?);
    // An accepted answer (here on a job an operator must look at anyway) and an opaque one.
    rc::dead_job(
        &db.pool,
        "E1",
        "m1",
        rc::accepted("E1"),
        Cause::OutcomeUnknown,
    )
    .await;
    let unrecognised = shared::provider::Outcome::Unrecognised {
        result: "PENDING?".into(),
        raw: "<RefundResult>PENDING?</RefundResult>".into(),
    };
    rc::dead_job(&db.pool, "E2", "w1", unrecognised, Cause::OutcomeUnknown).await;
    let ctl = rc::ctl(&config, &db.pool);
    for no in ["E1", "E2"] {
        let r = job::resolve(
            &ctl,
            &rc::resolve_args(no, ResolveAs::Failed, None, "hana"),
            &mut Vec::new(),
        )
        .await?;
        assert!(
            matches!(&r.verdict, Verdict::Refused { reason, .. } if reason.contains("may have paid")),
            "{no}: {:?}",
            r.verdict
        );
        assert_eq!(rc::state_of(&db.pool, no).await, "dead");
    }
    // As succeeded, the fee must be what the provider accepted (100), not another figure.
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("E1", ResolveAs::Succeeded, Some(90), "hana"),
        &mut Vec::new(),
    )
    .await?;
    assert!(
        matches!(&r.verdict, Verdict::Refused { reason, .. } if reason.contains("disagrees with what the provider accepted (100)")),
        "{:?}",
        r.verdict
    );
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("E1", ResolveAs::Succeeded, Some(100), "hana"),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(r.status(), Status::Done);
    assert_eq!(rc::state_of(&db.pool, "E1").await, "succeeded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_waits_until_a_stalled_worker_can_no_longer_send() -> anyhow::Result<()> {
    // The one-person path: resolution applies at once.
    let (config, db) = rc::one_person(testkit::test_config().await?);
    // The worker of attempt 1 stalled: its lease ran out with no answer recorded, and the
    // sweeper sent the job (at a merchant that does not deduplicate) to the dead letters.
    rc::new_job(&db.pool, "S1", "w1").await;
    let claimed = shared::store::jobs::claim(
        &db.pool,
        &["S1".into()],
        std::time::Duration::from_secs(30),
        "test",
        shared::store::jobs::ClaimToken::new(),
    )
    .await?;
    assert_eq!(claimed.claimed.len(), 1);
    shared::store::jobs::expire_lease(&db.pool, "S1", 1, false, "sweeper", rc::tz()).await?;
    let ctl = rc::ctl(&config, &db.pool);
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("S1", ResolveAs::Failed, None, "ivan"),
        &mut Vec::new(),
    )
    .await?;
    assert!(
        matches!(&r.verdict, Verdict::Refused { reason, .. } if reason.contains("may still send until")),
        "{:?}",
        r.verdict
    );
    // Once the lease, the HTTP timeout and the margin are over, it may be resolved.
    sqlx::query(
        "UPDATE jobs SET last_lease_until = now() - interval '1 hour' WHERE refund_no = 'S1'",
    )
    .execute(&db.pool)
    .await?;
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("S1", ResolveAs::Failed, None, "ivan"),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(r.status(), Status::Done, "{:?}", r.verdict);
    Ok(())
}
