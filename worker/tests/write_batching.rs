//! Claims and outcomes of many jobs share a statement, and each job's writes stay its own:
//! fenced on its attempt, booked once, and not held back by a neighbour that cannot be written.

mod refundctl_common;

use std::time::Duration;

use refundctl_common::{new_job, tz};
use shared::provider::{AttemptRecord, Outcome};
use shared::state::State;
use shared::store::jobs::{self, Claimed, OutcomeToRecord, Recorded};
use shared::workflow::Decision;
use sqlx::PgPool;
use worker::writer::Writer;

fn accepted(fee: i64) -> AttemptRecord {
    AttemptRecord {
        outcome: Outcome::Accepted {
            provider_refund_id: "PR1".into(),
            refund_fee: fee,
            settlement_refund_fee: fee,
            coupon_refund_fee: 0,
            raw: "{}".into(),
        },
        request_redacted: "{}".into(),
        http_status: Some(200),
        latency: Duration::from_millis(3),
    }
}

fn declined() -> AttemptRecord {
    AttemptRecord {
        outcome: Outcome::Declined {
            code: "NOTENOUGH".into(),
            message: "balance too low".into(),
            raw: "{}".into(),
        },
        request_redacted: "{}".into(),
        http_status: Some(200),
        latency: Duration::from_millis(3),
    }
}

async fn claim_all(pool: &PgPool, nos: &[&str]) -> Vec<Claimed> {
    let nos: Vec<String> = nos.iter().map(|s| s.to_string()).collect();
    let mut claimed = jobs::claim(
        pool,
        &nos,
        Duration::from_secs(30),
        "test",
        jobs::ClaimToken::new(),
    )
    .await
    .unwrap()
    .claimed;
    claimed.sort_by(|a, b| a.refund_no.cmp(&b.refund_no));
    assert_eq!(claimed.len(), nos.len(), "every job is claimable");
    claimed
}

/// One writer task taking up to 16 writes per statement, 30 s leases.
fn one_writer(pool: &PgPool) -> Writer {
    Writer::start(
        pool.clone(),
        1,
        16,
        Duration::from_secs(30),
        "test".into(),
        tz(),
    )
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn outcomes_recorded_together_apply_per_job_and_fence_a_stale_attempt() {
    let db = testkit::test_db().await.unwrap();
    let pool = &db.pool;
    for no in ["WB-A", "WB-B", "WB-C", "WB-D"] {
        new_job(pool, no, "m1").await;
    }
    let claimed = claim_all(pool, &["WB-A", "WB-B", "WB-C", "WB-D"]).await;
    let fee = claimed[0].request.refund_fee;
    let mut stale = claimed[3].clone();
    stale.attempt -= 1;
    let items = [
        OutcomeToRecord {
            claimed: claimed[0].clone(),
            rec: accepted(fee),
            decision: Decision::Succeed,
        },
        OutcomeToRecord {
            claimed: claimed[1].clone(),
            rec: declined(),
            decision: Decision::Fail,
        },
        OutcomeToRecord {
            claimed: claimed[2].clone(),
            rec: declined(),
            decision: Decision::Retry {
                after: Duration::from_secs(60),
                counted: true,
            },
        },
        OutcomeToRecord {
            claimed: stale,
            rec: accepted(fee),
            decision: Decision::Succeed,
        },
    ];
    let refs: Vec<&OutcomeToRecord> = items.iter().collect();
    let recorded = jobs::record_outcomes(pool, &refs, "test", tz())
        .await
        .unwrap();
    assert_eq!(
        recorded,
        vec![
            Recorded::Applied(State::Succeeded),
            Recorded::Applied(State::Failed),
            Recorded::Applied(State::RetryWait),
            Recorded::Fenced,
        ]
    );
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT refund_no, state FROM jobs ORDER BY refund_no")
            .fetch_all(pool)
            .await
            .unwrap();
    let states: Vec<(&str, &str)> = states
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("WB-A", "succeeded"),
            ("WB-B", "failed"),
            ("WB-C", "retry_wait"),
            ("WB-D", "in_flight"),
        ]
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM ledger WHERE refund_no = 'WB-A'").await,
        1
    );
    assert_eq!(count(pool, "SELECT count(*) FROM ledger").await, 1);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM provider_attempts WHERE fenced AND refund_no = 'WB-D'"
        )
        .await,
        1,
        "the stale call is kept, marked fenced"
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM provider_attempts").await,
        4
    );
    // Events for the two final outcomes; a retry publishes none.
    let events: Vec<(String, String)> =
        sqlx::query_as("SELECT routing_key, refund_no FROM outbox ORDER BY refund_no")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        events,
        [
            ("refund.succeeded".to_owned(), "WB-A".to_owned()),
            ("refund.failed".to_owned(), "WB-B".to_owned()),
        ]
    );
    // History: intake, claim, and the outcome — for every job but the fenced one.
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM job_transitions WHERE from_state = 'in_flight'"
        )
        .await,
        3
    );
    // The failed refund gave its amount back to its order; the others still hold theirs.
    let committed: i64 = sqlx::query_scalar(
        "SELECT committed_fee FROM orders o JOIN jobs j USING (order_no) WHERE j.refund_no = 'WB-B'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(committed, 0);
}

#[tokio::test]
async fn two_failed_refunds_of_one_order_in_one_batch_both_give_their_amount_back() {
    let db = testkit::test_db().await.unwrap();
    let pool = &db.pool;
    for (no, fee) in [("WB-O1", 300), ("WB-O2", 200)] {
        let body = serde_json::to_vec(&testkit::request_json(
            no,
            "WB-ORDER",
            shared::job::ProviderKind::Shengpay,
            "m1",
            1000,
            fee,
        ))
        .unwrap();
        let r = refundctl_common::take(pool, &body).await;
        assert!(
            matches!(r, shared::store::intake::IntakeResult::Created { .. }),
            "{r:?}"
        );
    }
    let held: i64 =
        sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = 'WB-ORDER'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(held, 500);
    let claimed = claim_all(pool, &["WB-O1", "WB-O2"]).await;
    let items: Vec<OutcomeToRecord> = claimed
        .into_iter()
        .map(|c| OutcomeToRecord {
            claimed: c,
            rec: declined(),
            decision: Decision::Fail,
        })
        .collect();
    let refs: Vec<&OutcomeToRecord> = items.iter().collect();
    jobs::record_outcomes(pool, &refs, "test", tz())
        .await
        .unwrap();
    let held: i64 =
        sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = 'WB-ORDER'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(held, 0, "both amounts are released, not just one");
}

// A current-thread runtime: both records are queued before the writer task first runs, so they
// reach it as one batch.
#[tokio::test]
async fn one_outcome_that_cannot_be_written_does_not_hold_back_the_others_in_its_batch() {
    let db = testkit::test_db().await.unwrap();
    let pool = &db.pool;
    new_job(pool, "WB-X", "m1").await;
    new_job(pool, "WB-Y", "m1").await;
    let claimed = claim_all(pool, &["WB-X", "WB-Y"]).await;
    let fee = claimed[0].request.refund_fee;
    // X already has a ledger entry (as if booked by hand), so booking it again must fail.
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, refund_fee,
             settlement_refund_fee, business_date, source)
         VALUES ('WB-X', 'refund', 'shengpay', 'm1', $1, $1, current_date, 'manual')",
    )
    .bind(fee)
    .execute(pool)
    .await
    .unwrap();
    let writer = one_writer(pool);
    let record = |c: &Claimed| {
        writer.record(OutcomeToRecord {
            claimed: c.clone(),
            rec: accepted(fee),
            decision: Decision::Succeed,
        })
    };
    let (x, y) = tokio::join!(record(&claimed[0]), record(&claimed[1]));
    // X's answer is kept (escaped, as an unrecognised answer) and X goes to an operator: the
    // provider accepted it, and its booking could not be written as it came.
    assert_eq!(x.unwrap(), Recorded::Applied(State::Dead));
    assert_eq!(y.unwrap(), Recorded::Applied(State::Succeeded));
    let (state, cause) = shared::store::ops::job_state(pool, "WB-X")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (state, cause.as_deref()),
        (State::Dead, Some("outcome_unknown"))
    );
    let (outcome, message): (String, String) =
        sqlx::query_as("SELECT outcome, message FROM provider_attempts WHERE refund_no = 'WB-X'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(outcome, "unrecognised");
    assert!(
        message.starts_with("accepted answer could not be recorded as it came")
            && message.contains("ledger_one_refund_entry"),
        "{message}"
    );
}

#[tokio::test]
async fn claims_asked_for_together_each_get_their_own_job_and_a_duplicate_gets_none() {
    let db = testkit::test_db().await.unwrap();
    let pool = &db.pool;
    new_job(pool, "WB-C1", "m1").await;
    new_job(pool, "WB-C2", "m1").await;
    let writer = one_writer(pool);
    let (a, b, again, missing) = tokio::join!(
        writer.claim("WB-C1".into()),
        writer.claim("WB-C2".into()),
        writer.claim("WB-C1".into()),
        writer.claim("WB-NONE".into()),
    );
    let a = a.unwrap().expect("C1 is claimed");
    let b = b.unwrap().expect("C2 is claimed");
    assert_eq!((a.refund_no.as_str(), a.attempt), ("WB-C1", 1));
    assert_eq!((b.refund_no.as_str(), b.attempt), ("WB-C2", 1));
    assert!(again.unwrap().is_none(), "one claim per job and attempt");
    assert!(missing.unwrap().is_none());
}

/// What a table holds, as comparable text (ids and times left out).
async fn snapshot(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT refund_no || ' ' || order_no || ' ' || state || ' ' || refund_fee || ' '
                || encode(content_hash, 'hex') || ' ' || request::text FROM jobs ORDER BY 1",
        "SELECT order_no || ' ' || total_fee || ' ' || committed_fee FROM orders ORDER BY 1",
        "SELECT refund_no || ' ' || coalesce(from_state, '-') || ' ' || to_state
         FROM job_transitions ORDER BY 1",
        "SELECT kind || ' ' || coalesce(refund_no, '-') || ' ' || field || ' ' || reason
         FROM rejected_messages ORDER BY 1",
        "SELECT routing_key || ' ' || refund_no FROM outbox ORDER BY 1",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
        out.extend(rows);
    }
    out
}

#[tokio::test]
async fn a_batch_taken_in_together_has_the_effect_of_taking_each_message_in_turn() {
    use shared::job::ProviderKind::{Shengpay, Wupay};
    use shared::store::intake::{self, Incoming};
    let req = |no: &str, order: &str, kind, merchant: &str, total: i64, fee: i64| {
        serde_json::to_vec(&testkit::request_json(
            no, order, kind, merchant, total, fee,
        ))
        .unwrap()
    };
    // Already there before the batch: a job whose copies and conflicts arrive in the batch.
    let before = [req("IB-OLD", "IB-OOLD", Shengpay, "m1", 1000, 100)];
    let batch = [
        req("IB-1", "IB-O1", Shengpay, "m1", 1000, 100),
        req("IB-OLD", "IB-OOLD", Shengpay, "m1", 1000, 100), // duplicate of a stored job
        req("IB-OLD", "IB-OOLD", Shengpay, "m1", 1000, 999), // conflict with a stored job
        req("IB-2", "IB-O2", Wupay, "w1", 500, 300),
        req("IB-3", "IB-O2", Wupay, "w1", 500, 200), // same order, still within its total
        req("IB-4", "IB-O2", Wupay, "w1", 500, 1),   // same order, over its total
        req("IB-1", "IB-O1", Shengpay, "m1", 1000, 100), // duplicate within the batch
        req("IB-1", "IB-O1", Shengpay, "m1", 1000, 50), // conflict within the batch
        req("IB-5", "IB-O5", Shengpay, "nobody", 1000, 100), // unknown merchant
        b"{not json".to_vec(),
        req("IB-6", "IB-O6", Shengpay, "m1", 700, 800), // refund over the total
        req("IB-7", "IB-O7", Shengpay, "m1", 700, 700),
        req("IB-8", "IB-OOLD", Shengpay, "m1", 999, 10), // order total differs from the stored one
    ];
    let registry = testkit::fake_registry(&[
        (shared::job::ProviderKind::Shengpay, "m1", true),
        (shared::job::ProviderKind::Wupay, "w1", false),
    ]);
    let known = |r: &shared::job::RefundRequest| registry.admit(r);
    let msgs: Vec<Incoming> = batch
        .iter()
        .map(|b| Incoming {
            body: b,
            message_id: None,
            redelivered: false,
        })
        .collect();

    let one_by_one = testkit::test_db().await.unwrap();
    let together = testkit::test_db().await.unwrap();
    for db in [&one_by_one, &together] {
        for b in &before {
            refundctl_common::take(&db.pool, b).await;
        }
    }
    let mut expected = Vec::new();
    let mut tx = one_by_one.pool.begin().await.unwrap();
    for m in &msgs {
        expected.push(intake::take(&mut tx, m, &known, tz()).await.unwrap());
    }
    tx.commit().await.unwrap();
    let mut tx = together.pool.begin().await.unwrap();
    let got = intake::take_batch(&mut tx, &msgs, &known, tz())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(got, expected);
    let labels: Vec<&str> = got.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels,
        [
            "created",
            "duplicate",
            "conflict",
            "created",
            "created",
            "rejected",
            "duplicate",
            "conflict",
            "rejected",
            "rejected",
            "rejected",
            "created",
            "rejected"
        ]
    );
    assert_eq!(
        snapshot(&together.pool).await,
        snapshot(&one_by_one.pool).await
    );
}

#[tokio::test]
async fn a_dead_outcome_announces_the_cause_the_job_was_given_not_the_one_asked_for() {
    let db = testkit::test_db().await.unwrap();
    let pool = &db.pool;
    new_job(pool, "WB-D1", "m1").await;
    let claimed = claim_all(pool, &["WB-D1"]).await;
    // Since the claim, another worker's fenced answer said this refund may have been paid.
    sqlx::query("UPDATE jobs SET maybe_paid = true WHERE refund_no = 'WB-D1'")
        .execute(pool)
        .await
        .unwrap();
    let items = [OutcomeToRecord {
        claimed: claimed[0].clone(),
        rec: declined(),
        decision: Decision::Dead {
            cause: shared::state::Cause::RetriesExhausted,
        },
    }];
    let refs: Vec<&OutcomeToRecord> = items.iter().collect();
    jobs::record_outcomes(pool, &refs, "test", tz())
        .await
        .unwrap();
    let (job_cause, event_cause): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT j.cause, o.payload->>'cause' FROM jobs j
         JOIN outbox o ON o.refund_no = j.refund_no AND o.routing_key = 'refund.dead'
         WHERE j.refund_no = 'WB-D1'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(job_cause.as_deref(), Some("outcome_unknown"));
    assert_eq!(
        event_cause, job_cause,
        "order systems must hear the cause operators see"
    );
}
