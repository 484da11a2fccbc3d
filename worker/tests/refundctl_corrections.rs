//! `refundctl job correct` and four-eyes approval (`approvals list | approve | reject`):
//! corrections of a final job's booking as new ledger entries, the order's reserved amount,
//! the event, the cases it closes, and resolutions and corrections that take effect only when
//! a second operator approves them.

mod refundctl_common;

use refundctl_common as rc;
use shared::state::State;
use shared::store::jobs::Verdict;
use worker::ctl::Status;
use worker::ctl::approvals::{self, ApproveArgs, ListArgs, RejectArgs};
use worker::ctl::dlq;
use worker::ctl::job::{self, ResolveAs};

fn approve(id: i64, by: &str) -> ApproveArgs {
    ApproveArgs {
        id,
        operator: by.into(),
    }
}

fn reject(id: i64, by: &str) -> RejectArgs {
    RejectArgs {
        id,
        who: rc::who(by, "the statement line is of another refund"),
    }
}

/// (state, requested_by, decided_by, db_user, decided_db_user) of an approval request.
async fn request_row(
    pool: &sqlx::PgPool,
    id: i64,
) -> (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    sqlx::query_as(
        "SELECT state, requested_by, decided_by, db_user, decided_db_user
         FROM approval_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn session_user(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_is_refused_until_a_second_operator_approves_it() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    assert_eq!(
        config.operator.approvals_required, 2,
        "four eyes by default"
    );
    rc::succeeded_job(&db.pool, "C1", "w1").await;
    let original = rc::ledger_rows(&db.pool, "C1").await;
    assert_eq!(original.len(), 1);
    let ctl = rc::ctl(&config, &db.pool);

    // alice asks: the provider never paid C1. Nothing changes yet.
    let mut out = Vec::new();
    let r = job::correct(
        &ctl,
        &rc::correct_args("C1", ResolveAs::Failed, None, "alice"),
        &mut out,
    )
    .await?;
    assert_eq!(r.status(), Status::Done);
    let id = r.requested.expect("a request was filed");
    assert!(
        rc::text(&out).contains(&format!("C1  approval request {id} filed")),
        "{}",
        rc::text(&out)
    );
    assert_eq!(rc::state_of(&db.pool, "C1").await, "succeeded");
    assert_eq!(rc::ledger_rows(&db.pool, "C1").await, original);
    assert!(
        rc::events(&db.pool, "C1", "refund.corrected")
            .await
            .is_empty()
    );

    let mut out = Vec::new();
    approvals::list(
        &ctl,
        &ListArgs {
            all: false,
            json: true,
        },
        &mut out,
    )
    .await?;
    let listed: serde_json::Value = serde_json::from_slice(&out)?;
    assert_eq!(listed["id"], id);
    assert_eq!(listed["action"], "correct");
    assert_eq!(listed["outcome"], "failed");
    assert_eq!(listed["requested_by"], "alice");

    // alice cannot approve her own request.
    let mut out = Vec::new();
    let s = approvals::approve(&ctl, &approve(id, "alice"), &mut out).await?;
    assert_eq!(s, Status::Incomplete);
    assert!(
        rc::text(&out).contains("a second, different operator"),
        "{}",
        rc::text(&out)
    );
    assert_eq!(rc::state_of(&db.pool, "C1").await, "succeeded");
    assert_eq!(request_row(&db.pool, id).await.0, "pending");

    // bob approves: applied in the approval's transaction.
    let s = approvals::approve(&ctl, &approve(id, "bob"), &mut Vec::new()).await?;
    assert_eq!(s, Status::Done);
    assert_eq!(rc::state_of(&db.pool, "C1").await, "failed");
    let rows = rc::ledger_rows(&db.pool, "C1").await;
    assert_eq!(rows[0], original[0], "the booking itself is never changed");
    assert_eq!(
        rows[1..],
        [(
            rows[1].0,
            "reversal".into(),
            -100,
            -100,
            Some(rows[0].0),
            None
        )]
    );
    assert_eq!(rc::committed(&db.pool, "OC1").await, 0, "amount released");
    let events = rc::events(&db.pool, "C1", "refund.corrected").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["state"], "failed");
    assert_eq!(events[0]["error_code"], "CORRECTED");
    assert!(
        !events[0].to_string().contains("line 7"),
        "the evidence stays with operators: {}",
        events[0]
    );

    let me = session_user(&db.pool).await;
    let (state, requested_by, decided_by, db_user, decided_db_user) =
        request_row(&db.pool, id).await;
    assert_eq!(
        (state.as_str(), requested_by.as_str(), decided_by.as_deref()),
        ("applied", "alice", Some("bob"))
    );
    assert_eq!(db_user.as_deref(), Some(me.as_str()));
    assert_eq!(decided_db_user.as_deref(), Some(me.as_str()));
    let audit: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT operator, action, result, db_user FROM operator_audit WHERE refund_no = 'C1'
         ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    let who = Some(me);
    assert_eq!(
        audit,
        vec![
            (
                "alice".into(),
                "correct_request".into(),
                "requested".into(),
                who.clone()
            ),
            (
                "alice".into(),
                "approve".into(),
                "refused".into(),
                who.clone()
            ),
            (
                "alice".into(),
                "correct".into(),
                "corrected".into(),
                who.clone()
            ),
            ("bob".into(), "approve".into(), "approved".into(), who),
        ]
    );

    // Decided once: approving again is refused.
    let s = approvals::approve(&ctl, &approve(id, "carol"), &mut Vec::new()).await?;
    assert_eq!(s, Status::Incomplete);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refund_the_provider_paid_is_booked_on_its_paid_day_and_its_cases_close_as_corrected()
-> anyhow::Result<()> {
    let (config, db) = rc::one_person(testkit::test_config().await?);
    rc::failed_job(&db.pool, "F1", "m1").await;
    assert_eq!(rc::committed(&db.pool, "OF1").await, 0);
    rc::stored_run(
        &db.pool,
        "2026-11-10",
        &[("missing_in_ledger", "shengpay", "m1", "F1", None, Some(95))],
    )
    .await;
    assert_eq!(
        rc::case_state(&db.pool, "F1", "missing_in_ledger").await,
        ("open".into(), None)
    );
    let ctl = rc::ctl(&config, &db.pool);

    let mut out = Vec::new();
    let r = job::correct(
        &ctl,
        &rc::correct_args("F1", ResolveAs::Succeeded, Some(95), "dora"),
        &mut out,
    )
    .await?;
    assert_eq!(
        r.verdict,
        Verdict::Done {
            prior: State::Failed
        }
    );
    assert_eq!(r.requested, None, "one person: applied at once");
    assert!(rc::text(&out).contains("F1  corrected: failed -> succeeded"));
    assert_eq!(rc::state_of(&db.pool, "F1").await, "succeeded");
    let booked: (String, i64, i64, String, String) = sqlx::query_as(
        "SELECT entry_kind, refund_fee, settlement_refund_fee, business_date::text, source
         FROM ledger WHERE refund_no = 'F1'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        booked,
        (
            "refund".into(),
            100,
            95,
            "2026-11-10".into(),
            "manual".into()
        )
    );
    assert_eq!(rc::committed(&db.pool, "OF1").await, 100, "reserved again");
    assert_eq!(
        rc::case_state(&db.pool, "F1", "missing_in_ledger").await,
        ("corrected".into(), Some("dora".into()))
    );
    let events = rc::events(&db.pool, "F1", "refund.corrected").await;
    assert_eq!(events[0]["state"], "succeeded");
    assert_eq!(events[0]["settlement_refund_fee"], 95);
    assert_eq!(events[0]["error_code"], serde_json::Value::Null);
    let history: (String, String, String) = sqlx::query_as(
        "SELECT from_state, to_state, actor FROM job_transitions WHERE refund_no = 'F1'
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        history,
        ("failed".into(), "succeeded".into(), "operator:dora".into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_settlement_is_reversed_and_booked_again_and_no_ledger_row_ever_changes()
-> anyhow::Result<()> {
    let (config, db) = rc::one_person(testkit::test_config().await?);
    rc::succeeded_job(&db.pool, "S1", "w1").await;
    let ctl = rc::ctl(&config, &db.pool);
    let correct = |to, fee| {
        let ctl = &ctl;
        async move {
            job::correct(
                ctl,
                &rc::correct_args("S1", to, fee, "erin"),
                &mut Vec::new(),
            )
            .await
            .unwrap()
        }
    };

    let r = correct(ResolveAs::Succeeded, Some(90)).await;
    assert_eq!(r.status(), Status::Done);
    let rows = rc::ledger_rows(&db.pool, "S1").await;
    let original = rows[0].0;
    assert_eq!(rows[0], (original, "refund".into(), 100, 100, None, None));
    assert_eq!(
        rows[1..],
        [
            (
                rows[1].0,
                "reversal".into(),
                -100,
                -100,
                Some(original),
                None
            ),
            (rows[2].0, "refund".into(), 100, 90, None, Some(rows[1].0)),
        ]
    );
    let settlement: Option<i64> =
        sqlx::query_scalar("SELECT settlement_refund_fee FROM jobs WHERE refund_no = 'S1'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(settlement, Some(90));
    assert_eq!(rc::committed(&db.pool, "OS1").await, 100, "still paid");

    // The same settlement again is nothing to correct.
    let r = correct(ResolveAs::Succeeded, Some(90)).await;
    assert!(
        matches!(&r.verdict, Verdict::Refused { reason, .. } if reason.contains("nothing to correct")),
        "{:?}",
        r.verdict
    );

    // Not paid after all, then paid with 80: each step reverses what is live and books anew.
    assert_eq!(
        correct(ResolveAs::Failed, None).await.status(),
        Status::Done
    );
    assert_eq!(rc::committed(&db.pool, "OS1").await, 0);
    assert_eq!(
        correct(ResolveAs::Succeeded, Some(80)).await.status(),
        Status::Done
    );
    let rows = rc::ledger_rows(&db.pool, "S1").await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[3].1, "reversal");
    assert_eq!(rows[3].4, Some(rows[2].0));
    assert_eq!((rows[4].3, rows[4].5), (80, Some(rows[3].0)));
    let net: (i64, i64) = sqlx::query_as(
        "SELECT sum(refund_fee)::bigint, sum(settlement_refund_fee)::bigint FROM ledger
         WHERE refund_no = 'S1'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(net, (100, 80), "booked once, net");
    assert_eq!(rc::committed(&db.pool, "OS1").await, 100);
    assert_eq!(
        rc::events(&db.pool, "S1", "refund.corrected").await.len(),
        3
    );

    // The ledger itself refuses a second booking that follows no reversal, and any edit.
    let second = sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, refund_fee,
             settlement_refund_fee, business_date, source)
         VALUES ('S1', 'refund', 'wupay', 'w1', 100, 100, current_date, 'manual')",
    )
    .execute(&db.pool)
    .await;
    assert!(second.is_err(), "a second original booking");
    let again = sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, refund_fee,
             settlement_refund_fee, business_date, source, rebooks)
         VALUES ('S1', 'refund', 'wupay', 'w1', 100, 100, current_date, 'manual', $1)",
    )
    .bind(rows[3].0)
    .execute(&db.pool)
    .await;
    assert!(again.is_err(), "a reversal booked again twice");
    let edit = sqlx::query("UPDATE ledger SET settlement_refund_fee = 1 WHERE id = $1")
        .bind(original)
        .execute(&db.pool)
        .await;
    assert!(edit.is_err(), "append-only");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_waits_for_a_second_operator_and_a_rejected_request_is_never_applied()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "D1", "m1", "SYSTEMERROR").await;
    let ctl = rc::ctl(&config, &db.pool);

    let r = job::resolve(
        &ctl,
        &rc::resolve_args("D1", ResolveAs::Failed, None, "alice"),
        &mut Vec::new(),
    )
    .await?;
    let id = r.requested.expect("filed");
    assert_eq!(rc::state_of(&db.pool, "D1").await, "dead");

    // One pending request per refund: a contradicting one waits for nothing.
    let mut out = Vec::new();
    let r = job::resolve(
        &ctl,
        &rc::resolve_args("D1", ResolveAs::Succeeded, Some(100), "carol"),
        &mut out,
    )
    .await?;
    assert_eq!(r.status(), Status::Incomplete);
    assert!(rc::text(&out).contains("is pending"), "{}", rc::text(&out));

    // bob says no: never applied, and cannot be approved afterwards.
    assert_eq!(
        approvals::reject(&ctl, &reject(id, "bob"), &mut Vec::new()).await?,
        Status::Done
    );
    assert_eq!(
        approvals::approve(&ctl, &approve(id, "carol"), &mut Vec::new()).await?,
        Status::Incomplete
    );
    assert_eq!(rc::state_of(&db.pool, "D1").await, "dead");
    assert_eq!(request_row(&db.pool, id).await.0, "rejected");

    // A correction is for final jobs only: refused when asked, nothing filed.
    let r = job::correct(
        &ctl,
        &rc::correct_args("D1", ResolveAs::Failed, None, "carol"),
        &mut Vec::new(),
    )
    .await?;
    assert!(
        matches!(&r.verdict, Verdict::Refused { reason, .. } if reason.contains("job resolve")),
        "{:?}",
        r.verdict
    );
    assert_eq!(r.requested, None);

    // A requester may withdraw their own request.
    let id = job::resolve(
        &ctl,
        &rc::resolve_args("D1", ResolveAs::Failed, None, "alice"),
        &mut Vec::new(),
    )
    .await?
    .requested
    .expect("filed");
    assert_eq!(
        approvals::reject(&ctl, &reject(id, "alice"), &mut Vec::new()).await?,
        Status::Done
    );
    let mut out = Vec::new();
    approvals::list(
        &ctl,
        &ListArgs {
            all: false,
            json: false,
        },
        &mut out,
    )
    .await?;
    assert!(
        rc::text(&out).contains("no approval requests waiting"),
        "{}",
        rc::text(&out)
    );
    // An unknown request is not found.
    assert_eq!(
        approvals::approve(&ctl, &approve(9999, "bob"), &mut Vec::new()).await?,
        Status::Incomplete
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_applies_nothing_when_the_job_changed_after_the_request() -> anyhow::Result<()>
{
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "D2", "m1", "SYSTEMERROR").await;
    let ctl = rc::ctl(&config, &db.pool);
    let id = job::resolve(
        &ctl,
        &rc::resolve_args("D2", ResolveAs::Failed, None, "alice"),
        &mut Vec::new(),
    )
    .await?
    .requested
    .expect("filed");
    // Meanwhile someone replays it: it is no longer dead.
    let replayed = dlq::replay(&ctl, &rc::replay_these("carol", &["D2"]), &mut Vec::new()).await?;
    assert_eq!(replayed.status(), Status::Done);
    assert_eq!(rc::state_of(&db.pool, "D2").await, "received");

    let mut out = Vec::new();
    let s = approvals::approve(&ctl, &approve(id, "bob"), &mut out).await?;
    assert_eq!(s, Status::Incomplete);
    assert!(
        rc::text(&out).contains("refused when applied"),
        "{}",
        rc::text(&out)
    );
    assert_eq!(rc::state_of(&db.pool, "D2").await, "received");
    assert_eq!(request_row(&db.pool, id).await.0, "refused");
    assert!(
        rc::events(&db.pool, "D2", "refund.resolved")
            .await
            .is_empty()
    );
    assert_eq!(
        rc::committed(&db.pool, "OD2").await,
        100,
        "nothing released"
    );
    Ok(())
}
