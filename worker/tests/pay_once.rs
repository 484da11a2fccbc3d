//! The pay-once core against the real PostgreSQL and RabbitMQ (issue #14): what an attempt's
//! history means for the next decision, leases that cover the whole call, claims and outcomes
//! that survive a database that goes away, and answers PostgreSQL cannot store as they came.

mod common;

use std::time::Duration;

use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::state::State;
use shared::store::jobs::{self, Claimed, OutcomeToRecord, Recorded};
use shared::store::ops;
use shared::workflow::Decision;
use sqlx::PgPool;
use testkit::faultproxy::{FaultProxy, Mode};
use testkit::{self, FakeProvider, request_json};

fn maybe_delivered() -> Outcome {
    Outcome::MaybeDelivered {
        error: "timed out after sending".into(),
        raw: None,
    }
}

fn declined(code: &str) -> Outcome {
    Outcome::Declined {
        code: code.into(),
        message: "declined by the provider".into(),
        raw: "{}".into(),
    }
}

fn not_sent() -> Outcome {
    Outcome::NotSent {
        error: "connection refused".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_after_an_attempt_that_may_have_paid_keeps_the_order_amount_and_is_outcome_unknown()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    fake.script("PO-DECL", vec![maybe_delivered(), declined("NOTENOUGH")]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "PO-DECL", "m1", ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "PO-DECL", State::Dead).await?;
    let (_, cause) = ops::job_state(&db.pool, "PO-DECL").await?.unwrap();
    assert_eq!(cause.as_deref(), Some("outcome_unknown"));
    // The first attempt may have paid: the order keeps the amount reserved.
    assert_eq!(common::committed_fee(&db.pool, "OPO-DECL").await, 400);
    assert_eq!(fake.calls().get("PO-DECL"), Some(&2));
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_may_have_been_paid_dies_outcome_unknown_even_when_its_last_attempts_were_not_sent()
-> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    config.worker.retry.max_attempts = 3;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    fake.script("PO-HIST", vec![maybe_delivered(), not_sent(), not_sent()]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "PO-HIST", "m1", ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "PO-HIST", State::Dead).await?;
    let (_, cause) = ops::job_state(&db.pool, "PO-HIST").await?.unwrap();
    assert_eq!(cause.as_deref(), Some("outcome_unknown"));
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_sent_only_while_the_lease_covers_the_whole_http_call() -> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    // 3 s lease, 2 s HTTP timeout, 0.5 s margin: a claim that took more than 0.5 s leaves too
    // little lease for a call that may take 2 s.
    config.worker.lease_ms = 3_000;
    config.http.timeout_ms = 2_000;
    config.worker.lease_margin_ms = 500;
    let (proxy, url) = FaultProxy::for_url(&config.database_url).await?;
    config.database_url = url;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    testkit::wait_until(Duration::from_secs(10), "the worker is consuming", || {
        let config = config.clone();
        async move { Ok(testkit::queue_consumers(&config).await? > 0) }
    })
    .await?;
    // Every database round trip now takes ~0.4 s: a claim (two round trips) takes ~0.8 s.
    proxy.set_mode(Mode::Latency(Duration::from_millis(200)));
    common::publish(&config, "PO-LEASE", "m1", ProviderKind::Shengpay).await;
    testkit::wait_until(Duration::from_secs(30), "the claim given back", || {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM job_transitions
                 WHERE refund_no = 'PO-LEASE' AND detail->>'reason' = 'lease too short to send'",
            )
            .fetch_one(&pool)
            .await?;
            Ok(n >= 1)
        }
    })
    .await?;
    assert_eq!(
        fake.calls().get("PO-LEASE"),
        None,
        "sent with too little lease left"
    );
    proxy.set_mode(Mode::Pass);
    common::wait_state(&db.pool, "PO-LEASE", State::Succeeded).await?;
    assert_eq!(fake.calls().get("PO-LEASE"), Some(&1));
    app.stop().await?;
    Ok(())
}

/// A writer over `pool`'s database reached through a fault proxy.
async fn proxied_writer(
    url: &str,
    lease: Duration,
) -> anyhow::Result<(FaultProxy, PgPool, worker::writer::Writer)> {
    let (proxy, proxied) = FaultProxy::for_url(url).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&proxied)
        .await?;
    let writer = worker::writer::Writer::start(
        pool.clone(),
        1,
        16,
        lease,
        "test-writer".into(),
        chrono_tz::Asia::Shanghai,
    );
    Ok((proxy, pool, writer))
}

/// A new job taken in through intake, as the consumer would.
async fn take(pool: &PgPool, refund_no: &str) {
    let registry = testkit::fake_registry(&[(ProviderKind::Shengpay, "m1", true)]);
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    let body = serde_json::to_vec(&request_json(
        refund_no,
        &format!("O{refund_no}"),
        ProviderKind::Shengpay,
        "m1",
        1000,
        400,
    ))
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let msg = shared::store::intake::Incoming {
        body: &body,
        message_id: None,
        redelivered: false,
    };
    let r = shared::store::intake::take(&mut tx, &msg, &admit, chrono_tz::Asia::Shanghai)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        matches!(r, shared::store::intake::IntakeResult::Created { .. }),
        "{r:?}"
    );
}

fn accepted_record(c: &Claimed) -> OutcomeToRecord {
    OutcomeToRecord {
        claimed: c.clone(),
        rec: shared::provider::AttemptRecord {
            outcome: Outcome::Accepted {
                provider_refund_id: format!("P-{}", c.refund_no),
                refund_fee: c.request.refund_fee,
                settlement_refund_fee: c.request.refund_fee,
                coupon_refund_fee: 0,
                raw: "{}".into(),
            },
            request_redacted: "{}".into(),
            http_status: Some(200),
            latency: Duration::from_millis(3),
        },
        decision: Decision::Succeed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_answer_is_recorded_even_when_the_database_is_away_past_the_lease()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let lease = Duration::from_millis(800);
    let (proxy, _pool, writer) = proxied_writer(&db.url, lease).await?;
    take(&db.pool, "PO-REC").await;
    let claimed = writer.claim("PO-REC".into()).await?.expect("claimable");
    // The database goes away before the answer is written, for longer than the lease.
    proxy.set_mode(Mode::Refuse);
    proxy.reset_all().await;
    let record = tokio::spawn({
        let writer = writer.clone();
        let item = accepted_record(&claimed);
        async move { writer.record(item).await }
    });
    tokio::time::sleep(lease * 3).await;
    proxy.set_mode(Mode::Pass);
    let recorded = tokio::time::timeout(Duration::from_secs(20), record).await???;
    assert_eq!(recorded, Recorded::Applied(State::Succeeded));
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM provider_attempts WHERE refund_no = 'PO-REC'")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(outcomes, ["accepted"]);
    assert_eq!(ops::ledger(&db.pool).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_was_lost_is_found_again_and_handed_to_its_caller() -> anyhow::Result<()>
{
    let db = testkit::test_db().await?;
    let (proxy, pool, writer) = proxied_writer(&db.url, Duration::from_secs(30)).await?;
    take(&db.pool, "PO-LOST").await;
    // The claim statement is held at its history insert (by a trigger waiting for a lock the
    // test holds) after it has been parsed, so that its reply can be made to go missing.
    sqlx::raw_sql(
        "CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$;
         CREATE TRIGGER test_hold BEFORE INSERT ON job_transitions
             FOR EACH ROW EXECUTE FUNCTION test_hold();",
    )
    .execute(&db.pool)
    .await?;
    let mut holder = db.pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *holder)
        .await?;
    sqlx::query("SELECT 1").execute(&pool).await?;
    let claim = tokio::spawn({
        let writer = writer.clone();
        async move { writer.claim("PO-LOST".into()).await }
    });
    testkit::wait_until(
        Duration::from_secs(10),
        "the claim waits for the lock",
        || {
            let pool = db.pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'WITH prev AS%'",
                )
                .fetch_one(&pool)
                .await?;
                Ok(waiting > 0)
            }
        },
    )
    .await?;
    proxy.set_mode(Mode::DropResponse);
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *holder)
        .await?;
    // The claim committed and its reply was dropped; the database answers again shortly.
    testkit::wait_until(Duration::from_secs(10), "the claim committed", || {
        let pool = db.pool.clone();
        async move {
            Ok(ops::job_state(&pool, "PO-LOST").await?.map(|s| s.0) == Some(State::InFlight))
        }
    })
    .await?;
    proxy.set_mode(Mode::Pass);
    let claimed = tokio::time::timeout(Duration::from_secs(20), claim).await???;
    let claimed = claimed.expect("the lost claim is found again");
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.from, State::Received);
    // It is a claim like any other: its outcome records.
    let recorded = writer.record(accepted_record(&claimed)).await?;
    assert_eq!(recorded, Recorded::Applied(State::Succeeded));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_claimed_row_goes_to_an_operator_and_the_rest_of_the_batch_is_claimed()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    for no in ["PO-U1", "PO-U2", "PO-U3"] {
        take(&db.pool, no).await;
    }
    sqlx::query("UPDATE jobs SET request = '{\"version\": 1}' WHERE refund_no = 'PO-U2'")
        .execute(&db.pool)
        .await?;
    let writer = worker::writer::Writer::start(
        db.pool.clone(),
        1,
        16,
        Duration::from_secs(30),
        "test-writer".into(),
        chrono_tz::Asia::Shanghai,
    );
    let claims: Vec<_> = ["PO-U1", "PO-U2", "PO-U3"]
        .into_iter()
        .map(|no| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.claim(no.into()).await })
        })
        .collect();
    let mut got = Vec::new();
    for c in claims {
        got.push(c.await??.map(|c| c.refund_no));
    }
    assert_eq!(
        got,
        [Some("PO-U1".to_owned()), None, Some("PO-U3".to_owned())]
    );
    let (state, cause) = ops::job_state(&db.pool, "PO-U2").await?.unwrap();
    assert_eq!(
        (state, cause.as_deref()),
        (State::Dead, Some("unreadable_job"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_a_nul_or_bytes_that_are_not_utf8_are_recorded_and_decided_once()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    fake.script(
        "PO-NUL",
        vec![Outcome::Declined {
            code: "NOTENOUGH".into(),
            message: "balance\u{0}low".into(),
            raw: "{\"errorCodeDes\":\"balance\u{0}low\"}".into(),
        }],
    );
    fake.script(
        "PO-BIN",
        vec![Outcome::MaybeDelivered {
            error: "HTTP 502".into(),
            raw: Some(String::from_utf8_lossy(b"\x00\xff\xfe\x00binary").into_owned()),
        }],
    );
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "PO-NUL", "m1", ProviderKind::Shengpay).await;
    common::publish(&config, "PO-BIN", "m1", ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "PO-NUL", State::Failed).await?;
    common::wait_state(&db.pool, "PO-BIN", State::Succeeded).await?;
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT refund_no, outcome, response FROM provider_attempts ORDER BY refund_no, attempt",
    )
    .fetch_all(&db.pool)
    .await?;
    let outcomes: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(
        outcomes,
        [
            ("PO-BIN", "maybe_delivered"),
            ("PO-BIN", "accepted"),
            ("PO-NUL", "declined")
        ]
    );
    assert!(rows[2].2.as_deref().unwrap().contains("balance\\u0000low"));
    // Decided once: the decline was not called again, the binary answer resent once.
    assert_eq!(fake.calls().get("PO-NUL"), Some(&1));
    assert_eq!(fake.calls().get("PO-BIN"), Some(&2));
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT payload->>'error_message' FROM outbox WHERE refund_no = 'PO-NUL'",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(events.iter().all(|m| !m.contains('\0')));
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_answer_that_may_have_paid_marks_the_job_for_its_next_attempt()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    take(&db.pool, "PO-FEN").await;
    let lease = Duration::from_secs(30);
    let first = jobs::claim(
        &db.pool,
        &["PO-FEN".into()],
        lease,
        "t",
        jobs::ClaimToken::new(),
    )
    .await?
    .claimed
    .remove(0);
    // The first attempt's worker stalls; the job is taken back and claimed again.
    sqlx::query(
        "UPDATE jobs SET lease_until = now() - interval '1 second' WHERE refund_no = 'PO-FEN'",
    )
    .execute(&db.pool)
    .await?;
    jobs::expire_lease(
        &db.pool,
        "PO-FEN",
        1,
        true,
        "sweeper",
        chrono_tz::Asia::Shanghai,
    )
    .await?;
    let second = jobs::claim(
        &db.pool,
        &["PO-FEN".into()],
        lease,
        "t",
        jobs::ClaimToken::new(),
    )
    .await?
    .claimed
    .remove(0);
    assert!(
        second.history.maybe_paid,
        "a lease that ran out mid-call may have paid"
    );
    // The stalled worker's acceptance arrives late: fenced, kept, and still counted.
    let late = jobs::record_outcome(
        &db.pool,
        &first,
        &accepted_record(&first).rec,
        &Decision::Succeed,
        "t",
        chrono_tz::Asia::Shanghai,
    )
    .await?;
    assert_eq!(late, Recorded::Fenced);
    let maybe_paid: bool =
        sqlx::query_scalar("SELECT maybe_paid FROM jobs WHERE refund_no = 'PO-FEN'")
            .fetch_one(&db.pool)
            .await?;
    assert!(maybe_paid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_records_the_merchants_idempotence_on_the_job() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let registry = testkit::fake_registry(&[
        (ProviderKind::Shengpay, "m1", true),
        (ProviderKind::Wupay, "w1", false),
    ]);
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    let bodies: Vec<Vec<u8>> = [
        ("PO-I1", "m1", ProviderKind::Shengpay),
        ("PO-I2", "w1", ProviderKind::Wupay),
    ]
    .iter()
    .map(|(no, m, k)| {
        serde_json::to_vec(&request_json(no, &format!("O{no}"), *k, m, 1000, 100)).unwrap()
    })
    .collect();
    let msgs: Vec<_> = bodies
        .iter()
        .map(|b| shared::store::intake::Incoming {
            body: b,
            message_id: None,
            redelivered: false,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    shared::store::intake::take_batch(&mut tx, &msgs, &admit, chrono_tz::Asia::Shanghai).await?;
    tx.commit().await?;
    let rows: Vec<(String, Option<bool>)> =
        sqlx::query_as("SELECT refund_no, idempotent FROM jobs ORDER BY refund_no")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        rows,
        [
            ("PO-I1".to_owned(), Some(true)),
            ("PO-I2".to_owned(), Some(false))
        ]
    );
    // A job from before idempotence was recorded takes its merchant's current setting.
    sqlx::query("UPDATE jobs SET idempotent = NULL")
        .execute(&db.pool)
        .await?;
    let filled =
        jobs::backfill_idempotent(&db.pool, &[("shengpay".into(), "m1".into(), true)]).await?;
    assert_eq!(filled, 1);
    let rows: Vec<(String, Option<bool>)> =
        sqlx::query_as("SELECT refund_no, idempotent FROM jobs ORDER BY refund_no")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        rows,
        [("PO-I1".to_owned(), Some(true)), ("PO-I2".to_owned(), None)]
    );
    Ok(())
}
