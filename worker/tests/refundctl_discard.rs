//! `refundctl dlq discard`: dead jobs and poison messages that will never be paid leave the
//! dead-letter set, audited, their history kept; a job whose provider may hold the money is
//! refused, and a discarded job is never replayed.

mod refundctl_common;

use refundctl_common as rc;
use shared::state::Cause;
use shared::store::intake::IntakeResult;
use worker::ctl::Status;
use worker::ctl::discard::{self, DiscardArgs};
use worker::ctl::dlq::{self, ListArgs, ReplayOutcome};
use worker::ctl::stats::{self, StatsArgs};

fn discard_args(refund_nos: &[&str], poison: &[i64], json: bool) -> DiscardArgs {
    DiscardArgs {
        refund_nos: refund_nos.iter().map(|s| s.to_string()).collect(),
        poison: poison.to_vec(),
        json,
        who: rc::who("dora", "INC-9 orders cancelled upstream"),
    }
}

fn list_all() -> ListArgs {
    ListArgs {
        cause: None,
        provider: None,
        json: false,
        ..Default::default()
    }
}

/// E1, E2 dead with retries exhausted (ShengPay m1), U1 dead with an unknown outcome (WuPay w1,
/// not idempotent), CH1 dead with refund_abnormal, OK1 succeeded, and one poison message; its
/// id.
async fn dead_letters(pool: &sqlx::PgPool) -> i64 {
    rc::exhausted_job(pool, "E1", "m1", "SYSTEMERROR").await;
    rc::exhausted_job(pool, "E2", "m1", "SYSTEMERROR").await;
    rc::dead_job(
        pool,
        "U1",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    rc::dead_job(
        pool,
        "CH1",
        "m1",
        rc::accepted("CH1"),
        Cause::RefundAbnormal,
    )
    .await;
    rc::succeeded_job(pool, "OK1", "m1").await;
    let body = String::from_utf8(rc::body("BAD1", "m1"))
        .unwrap()
        .replace("\"refund_fee\":100", "\"refund_fee\":1.5");
    let r = rc::take(pool, body.as_bytes()).await;
    assert!(matches!(r, IntakeResult::Rejected { .. }), "{r:?}");
    sqlx::query_scalar("SELECT id FROM rejected_messages WHERE refund_no = 'BAD1'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_items_leave_the_dead_letters_keep_their_history_and_are_never_replayed()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let poison = dead_letters(&db.pool).await;
    let ctl = rc::ctl(&config, &db.pool);
    let committed_before = rc::committed(&db.pool, "OE1").await;

    let mut out = Vec::new();
    let r = discard::discard(
        &ctl,
        &discard_args(
            &["E1", "U1", "CH1", "OK1", "NOPE"],
            &[poison, 999_999],
            false,
        ),
        &mut out,
    )
    .await?;
    let printed = rc::text(&out);
    assert_eq!(r.discarded(), vec!["E1", poison.to_string().as_str()]);
    assert_eq!(r.refused(), vec!["U1", "CH1", "OK1", "NOPE", "999999"]);
    assert_eq!(r.status(), Status::Incomplete, "refusals exit 1");
    let reason = |id: &str| {
        r.items
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| i.reason.clone())
            .unwrap_or_default()
    };
    assert!(reason("U1").contains("outcome_unknown"), "{}", reason("U1"));
    assert!(reason("U1").contains("job resolve"), "{}", reason("U1"));
    assert!(
        reason("CH1").contains("refund_abnormal"),
        "{}",
        reason("CH1")
    );
    assert!(
        reason("OK1").contains("succeeded, not dead"),
        "{}",
        reason("OK1")
    );
    assert_eq!(reason("NOPE"), "no such job");
    assert_eq!(reason("999999"), "no such poison message");
    assert!(printed.contains("E1  discarded"), "{printed}");
    assert!(
        printed.contains(&format!("poison message {poison}  discarded")),
        "{printed}"
    );
    assert!(
        printed.contains("discarded 2, refused 5 (of 7)"),
        "{printed}"
    );

    // Archived, not rewritten: still dead, its history and its order amount as they were.
    assert_eq!(rc::state_of(&db.pool, "E1").await, "dead");
    assert_eq!(rc::committed(&db.pool, "OE1").await, committed_before);
    let audit = rc::audit_rows(&db.pool, "E1").await;
    assert_eq!(
        audit,
        vec![(
            "dora".into(),
            "discard".into(),
            "discarded".into(),
            Some("dead".into()),
            None
        )]
    );
    let refusals = rc::audit_rows(&db.pool, "U1").await;
    assert_eq!(refusals.len(), 1, "a refusal is audited too");
    assert_eq!(refusals[0].2, "refused");

    // Out of the dead-letter set: `dlq list` and the depth of `stats`.
    let listed = dlq::list(&ctl, &list_all(), &mut Vec::new()).await?;
    let mut dead: Vec<(String, i64)> = listed
        .groups
        .iter()
        .map(|g| (g.cause.clone(), g.count))
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        vec![
            ("outcome_unknown".into(), 1),
            ("refund_abnormal".into(), 1),
            ("retries_exhausted".into(), 1)
        ]
    );
    assert_eq!(listed.poison_messages(), 0);
    let mut out = Vec::new();
    let s = stats::stats(&ctl, &StatsArgs { json: false }, &mut out).await?;
    assert_eq!(
        (
            s.dlq.dead_jobs,
            s.dlq.poison_messages,
            s.dlq.discarded,
            s.dlq.depth
        ),
        (3, 0, 2, 3)
    );
    assert!(
        rc::text(&out).contains("DLQ depth: 3 (3 dead jobs + 0 poison messages; 2 discarded"),
        "{}",
        rc::text(&out)
    );

    // Never replayed: `--all` does not select it, by name it is refused, and a dry run says so.
    let all = dlq::replay(&ctl, &rc::replay_all("erin"), &mut Vec::new()).await?;
    assert!(all.replayed().contains(&"E2"), "{:?}", all.replayed());
    assert!(
        all.outcome("E1").is_none(),
        "a discarded job is not selected"
    );
    let named = dlq::replay(&ctl, &rc::replay_these("erin", &["E1"]), &mut Vec::new()).await?;
    match named.outcome("E1") {
        Some(ReplayOutcome::Refused { reason, .. }) => {
            assert!(reason.contains("discarded"), "{reason}")
        }
        other => panic!("E1 replayed: {other:?}"),
    }
    let mut dry = rc::replay_these("erin", &["E1"]);
    dry.dry_run = true;
    let dry = dlq::replay(&ctl, &dry, &mut Vec::new()).await?;
    assert!(
        matches!(dry.outcome("E1"), Some(ReplayOutcome::WouldRefuse { reason, .. }) if reason.contains("discarded")),
        "{:?}",
        dry.outcome("E1")
    );
    assert_eq!(rc::state_of(&db.pool, "E1").await, "dead");

    // Once only.
    let again = discard::discard(
        &ctl,
        &discard_args(&["E1"], &[poison], false),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(again.discarded(), Vec::<&str>::new());
    for item in &again.items {
        let reason = item.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("already discarded by dora"), "{reason}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_one_object_per_item_with_the_summary_on_stderr() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let poison = dead_letters(&db.pool).await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    discard::discard(
        &ctl,
        &discard_args(&["E2", "OK1"], &[poison], true),
        &mut out,
    )
    .await?;
    let lines: Vec<serde_json::Value> = rc::text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["item"], "dead_job");
    assert_eq!(lines[0]["id"], "E2");
    assert_eq!(lines[0]["result"], "discarded");
    assert_eq!(lines[0]["prior"], "dead");
    assert_eq!(lines[1]["result"], "refused");
    assert_eq!(lines[1]["prior"], "succeeded");
    assert!(lines[1]["reason"].as_str().unwrap().contains("not dead"));
    assert_eq!(lines[2]["item"], "poison_message");
    assert_eq!(lines[2]["id"], poison.to_string());
    assert_eq!(lines[2]["result"], "discarded");
    Ok(())
}
