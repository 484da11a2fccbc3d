//! Provider-confirmed finality (issue #16) against the real PostgreSQL and RabbitMQ: an accepted
//! refund waits for the provider's end, learnt from its status query or its notify, and is
//! booked as it really ended.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::provider::status::{QueryOutcome, RefundStatus, StatusReport};
use shared::state::State;
use shared::store::ops;
use sqlx::PgPool;
use testkit::{self, FakeProvider};

const M: &str = "sp1";

async fn job(pool: &PgPool, refund_no: &str) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT state, cause, last_code FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn ledger(pool: &PgPool, refund_no: &str) -> Vec<(i64, chrono::NaiveDate)> {
    sqlx::query_as(
        "SELECT settlement_refund_fee, business_date FROM ledger WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn history(pool: &PgPool, refund_no: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT to_state FROM job_transitions WHERE refund_no = $1 ORDER BY id")
        .bind(refund_no)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn status(refund_no: &str, status: RefundStatus) -> QueryOutcome {
    QueryOutcome::Status(StatusReport {
        refund_no: refund_no.into(),
        status,
        raw: "{}".into(),
    })
}

fn success(refund_no: &str, settle: i64, at: &str) -> QueryOutcome {
    status(
        refund_no,
        RefundStatus::Success {
            provider_refund_id: format!("RF-{refund_no}"),
            settlement_refund_fee: settle,
            success_time: chrono::DateTime::parse_from_rfc3339(at).unwrap().to_utc(),
        },
    )
}

/// A config whose status queries come fast: 150 ms, then every 150 ms.
async fn fast_queries() -> (shared::config::Config, testkit::TestDb) {
    let (mut config, db) = testkit::test_config().await.unwrap();
    config.worker.query.delays_ms = vec![150];
    config.worker.query.then_every_ms = 150;
    config.worker.query.poll_ms = 50;
    config.worker.query.lease_ms = 5_000;
    (config, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_refund_waits_in_accepted_and_is_booked_only_when_the_provider_says_it_paid() {
    let (config, db) = fast_queries().await;
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, true);
    fake.script_queries(
        "F1",
        vec![
            status("F1", RefundStatus::Processing),
            status("F1", RefundStatus::Processing),
            // Paid 23:59:58 UTC on the 21st: the 22nd in Asia/Shanghai, the business day.
            success("F1", 350, "2026-11-21T23:59:58Z"),
        ],
    );
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F1", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F1", State::Accepted)
        .await
        .unwrap();
    assert!(
        ledger(&db.pool, "F1").await.is_empty(),
        "booked before the provider said it paid"
    );
    common::wait_state(&db.pool, "F1", State::Succeeded)
        .await
        .unwrap();
    assert_eq!(
        ledger(&db.pool, "F1").await,
        vec![(350, chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap())],
        "one entry with the provider's settlement, dated by its success time"
    );
    assert_eq!(
        history(&db.pool, "F1").await,
        ["received", "in_flight", "accepted", "succeeded"]
    );
    assert_eq!(
        fake.calls().get("F1"),
        Some(&1),
        "an accepted refund is never sent again"
    );
    assert_eq!(fake.queries().get("F1"), Some(&3));
    let gone: i64 =
        sqlx::query_scalar("SELECT count(*) FROM status_queries WHERE refund_no = 'F1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(gone, 0, "a job whose end is known is no longer queried");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_refund_fails_with_refund_close_and_gives_the_order_amount_back() {
    let (config, db) = fast_queries().await;
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, true);
    fake.script_queries("F2", vec![status("F2", RefundStatus::Closed)]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F2", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F2", State::Failed)
        .await
        .unwrap();
    let (_, _, code) = job(&db.pool, "F2").await;
    assert_eq!(code.as_deref(), Some("REFUND_CLOSE"));
    assert_eq!(
        common::committed_fee(&db.pool, "OF2").await,
        0,
        "the order amount is free again"
    );
    assert!(ledger(&db.pool, "F2").await.is_empty());
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_the_provider_could_not_credit_is_dead_refund_abnormal_with_its_amount_held() {
    let (config, db) = fast_queries().await;
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, true);
    fake.script_queries("F3", vec![status("F3", RefundStatus::Change)]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F3", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F3", State::Dead)
        .await
        .unwrap();
    let (_, cause, code) = job(&db.pool, "F3").await;
    assert_eq!(
        cause.as_deref(),
        Some("refund_abnormal"),
        "not outcome_unknown: the provider said"
    );
    assert_eq!(code.as_deref(), Some("CHANGE"));
    assert_eq!(common::committed_fee(&db.pool, "OF3").await, 400);
    assert!(ledger(&db.pool, "F3").await.is_empty());
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_refund_with_no_end_within_the_schedule_goes_dead_refund_abnormal() {
    let (mut config, db) = fast_queries().await;
    config.worker.query.give_up_after_ms = 700;
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, true);
    fake.script_queries(
        "F4",
        (0..100)
            .map(|_| status("F4", RefundStatus::Processing))
            .collect(),
    );
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F4", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F4", State::Dead)
        .await
        .unwrap();
    let (_, cause, _) = job(&db.pool, "F4").await;
    assert_eq!(cause.as_deref(), Some("refund_abnormal"));
    let asked = fake.queries().get("F4").copied().unwrap_or(0);
    assert!(
        (2..=6).contains(&asked),
        "asked {asked} times within a 700 ms schedule of 150 ms steps"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        fake.queries().get("F4").copied(),
        Some(asked),
        "not asked after giving up"
    );
    assert_eq!(
        common::committed_fee(&db.pool, "OF4").await,
        400,
        "the amount stays held"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_unknown_refund_the_provider_never_received_is_sent_again_with_its_number() {
    let (mut config, db) = fast_queries().await;
    config.worker.full_sweep_interval_ms = 300;
    // Not idempotent, so the maybe-delivered call makes the job dead/outcome_unknown at once.
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, false);
    fake.script(
        "F5",
        vec![Outcome::MaybeDelivered {
            error: "timed out after sending".into(),
            raw: None,
        }],
    );
    // The first query: no such refund (the fake took nothing); after the resend, it paid.
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F5", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F5", State::Succeeded)
        .await
        .unwrap();
    assert_eq!(
        fake.calls().get("F5"),
        Some(&2),
        "sent once more, after the provider said it had none"
    );
    assert_eq!(fake.paid().len(), 1);
    let h = history(&db.pool, "F5").await;
    assert_eq!(
        h,
        [
            "received",
            "in_flight",
            "dead",
            "received",
            "in_flight",
            "accepted",
            "succeeded"
        ]
    );
    assert_eq!(ledger(&db.pool, "F5").await.len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_unknown_refund_the_provider_paid_is_booked_from_its_query_without_resending() {
    let (mut config, db) = fast_queries().await;
    config.worker.full_sweep_interval_ms = 300;
    let fake = FakeProvider::asynchronous(ProviderKind::Shengpay, M, false);
    fake.script(
        "F6",
        vec![Outcome::MaybeDelivered {
            error: "reset after sending".into(),
            raw: None,
        }],
    );
    fake.script_queries("F6", vec![success("F6", 400, "2026-11-21T10:00:00+08:00")]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F6", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F6", State::Succeeded)
        .await
        .unwrap();
    assert_eq!(fake.calls().get("F6"), Some(&1));
    assert_eq!(
        history(&db.pool, "F6").await,
        ["received", "in_flight", "dead", "succeeded"]
    );
    let source: Value = sqlx::query_scalar(
        "SELECT detail FROM job_transitions WHERE refund_no = 'F6' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(source["source"], "query");
    assert_eq!(ledger(&db.pool, "F6").await.len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_that_settles_on_the_call_is_booked_at_once_and_never_queried() {
    let (config, db) = fast_queries().await;
    let fake = FakeProvider::new(ProviderKind::Shengpay, M, true);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    common::publish(&config, "F7", M, ProviderKind::Shengpay).await;
    common::wait_state(&db.pool, "F7", State::Succeeded)
        .await
        .unwrap();
    assert_eq!(
        history(&db.pool, "F7").await,
        ["received", "in_flight", "succeeded"]
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(fake.queries().is_empty());
    app.stop().await.unwrap();
}

// --- the notify listener, with the real ShengPay client and the simulator ------------------------

mod notify {
    use super::*;
    use shared::config::SignType;
    use shared::provider::keys;
    use shared::provider::shengpay::signed_json;

    const SP: &str = "93751497";

    fn platform_key() -> openssl::pkey::PKey<openssl::pkey::Private> {
        keys::private_key_from_file(
            "platform",
            &testkit::workspace_root().join("keys/dev/shengpay_platform_private.pem"),
        )
        .unwrap()
    }

    fn notify_body(refund_no: &str, status: &str, extra: Value) -> String {
        let mut m = json!({
            "appId": "djgeiq978y933", "mchId": SP, "outTradeNo": format!("O{refund_no}"),
            "outRefundNo": refund_no, "refundId": format!("RF-{refund_no}"),
            "transactionId": "T1", "totalFee": 1000, "refundFee": 400,
            "settlementRefundFee": 380, "settlementTotalFee": 980, "refundStatus": status,
            "refundSuccessTime": "20261121100003", "nonceStr": "abc", "signType": "RSA",
        })
        .as_object()
        .cloned()
        .unwrap();
        if status != "SUCCESS" {
            m.remove("refundSuccessTime");
        }
        for (k, v) in extra.as_object().unwrap() {
            m.insert(k.clone(), v.clone());
        }
        signed_json(m, &platform_key(), SignType::Rsa).unwrap().body
    }

    async fn post(addr: &str, body: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/notify/shengpay"))
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn notifies(pool: &PgPool, refund_no: &str) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT status, effect FROM provider_notifications WHERE refund_no = $1 ORDER BY id",
        )
        .bind(refund_no)
        .fetch_all(pool)
        .await
        .unwrap()
    }

    async fn start() -> (
        shared::config::Config,
        testkit::TestDb,
        refund_sim::SimHandle,
        common::App,
    ) {
        let (base, db) = testkit::test_config().await.unwrap();
        // The simulator's own notifies are dropped: these tests send theirs.
        let sim = testkit::start_sim(
            vec![refund_sim::FaultRule::new(
                refund_sim::FaultAction::NotifyDrop,
            )],
            0.0,
        )
        .await
        .unwrap();
        let mut config = testkit::with_sim_merchants(&base, &sim).unwrap();
        for m in &mut config.shengpay.merchants {
            m.final_on_accept = false;
        }
        // The notify is what ends these refunds: no query comes for an hour.
        config.worker.query.delays_ms = vec![3_600_000];
        let registry = worker::app::build_registry(&config).unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
        let app = common::App { shutdown, handle };
        (config, db, sim, app)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_verified_notify_books_the_refund_once_and_a_repeat_or_a_late_processing_changes_nothing()
     {
        let (config, db, sim, app) = start().await;
        common::publish(&config, "N1", SP, ProviderKind::Shengpay).await;
        common::wait_state(&db.pool, "N1", State::Accepted)
            .await
            .unwrap();
        let before = shared::store::operator::job_detail(&db.pool, "N1")
            .await
            .unwrap();
        let schedule = before.status_query.expect("an accepted job is scheduled");
        assert!(schedule.next_at.is_some());
        assert_eq!(schedule.queries, 0);
        let addr = &config.notify.addr;
        assert_eq!(
            post(addr, &notify_body("N1", "SUCCESS", json!({}))).await,
            (200, "SUCCESS".into())
        );
        assert_eq!(
            ops::job_state(&db.pool, "N1").await.unwrap().unwrap().0,
            State::Succeeded
        );
        assert_eq!(
            ledger(&db.pool, "N1").await,
            vec![(380, chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap())]
        );
        // ShengPay repeats a notify until it is acknowledged, and may send an older one late.
        assert_eq!(
            post(addr, &notify_body("N1", "SUCCESS", json!({}))).await.0,
            200
        );
        assert_eq!(
            post(addr, &notify_body("N1", "PROCESSING", json!({})))
                .await
                .0,
            200
        );
        assert_eq!(
            post(addr, &notify_body("N1", "REFUND_CLOSE", json!({})))
                .await
                .0,
            200
        );
        assert_eq!(ledger(&db.pool, "N1").await.len(), 1);
        assert_eq!(
            ops::job_state(&db.pool, "N1").await.unwrap().unwrap().0,
            State::Succeeded
        );
        assert_eq!(
            notifies(&db.pool, "N1").await,
            vec![
                ("SUCCESS".into(), "applied".into()),
                ("SUCCESS".into(), "no_change".into()),
                ("PROCESSING".into(), "no_change".into()),
                ("REFUND_CLOSE".into(), "no_change".into()),
            ]
        );
        let after = shared::store::operator::job_detail(&db.pool, "N1")
            .await
            .unwrap();
        assert_eq!(after.notifications.len(), 4);
        assert!(
            after.notifications[0]
                .body
                .contains("\"outRefundNo\":\"N1\"")
        );
        assert_eq!(after.status_query, None, "an ended job leaves the schedule");
        app.stop().await.unwrap();
        sim.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notify_that_is_forged_or_about_another_refund_is_refused_and_changes_nothing() {
        let (config, db, sim, app) = start().await;
        common::publish(&config, "N2", SP, ProviderKind::Shengpay).await;
        common::wait_state(&db.pool, "N2", State::Accepted)
            .await
            .unwrap();
        let addr = &config.notify.addr;
        let good = notify_body("N2", "SUCCESS", json!({}));
        let cases: Vec<(&str, String, u16)> = vec![
            (
                "bad signature",
                good.replace("\"settlementRefundFee\":380", "\"settlementRefundFee\":400"),
                401,
            ),
            (
                "unsigned",
                serde_json::to_string(&{
                    let mut v: Value = serde_json::from_str(&good).unwrap();
                    v.as_object_mut().unwrap().remove("sign");
                    v
                })
                .unwrap(),
                401,
            ),
            (
                "another merchant's account",
                notify_body("N2", "SUCCESS", json!({"mchId": "99999999"})),
                403,
            ),
            (
                "another app of the merchant",
                notify_body("N2", "SUCCESS", json!({"appId": "other"})),
                403,
            ),
            (
                "an unknown refund",
                notify_body("N-none", "SUCCESS", json!({})),
                404,
            ),
            (
                "another amount",
                notify_body("N2", "SUCCESS", json!({"refundFee": 401})),
                422,
            ),
            (
                "another order",
                notify_body("N2", "SUCCESS", json!({"outTradeNo": "O-other"})),
                422,
            ),
            (
                "a success without its time",
                notify_body("N2", "SUCCESS", json!({"refundSuccessTime": ""})),
                422,
            ),
            ("not JSON", "refundStatus=SUCCESS".into(), 400),
        ];
        for (what, body, want) in cases {
            let (status, _) = post(addr, &body).await;
            assert_eq!(status, want, "{what}");
        }
        assert_eq!(
            ops::job_state(&db.pool, "N2").await.unwrap().unwrap().0,
            State::Accepted
        );
        assert!(
            notifies(&db.pool, "N2").await.is_empty(),
            "nothing unverified or foreign is stored"
        );
        assert!(ledger(&db.pool, "N2").await.is_empty());
        let big = format!(
            "{{\"pad\":\"{}\"}}",
            "x".repeat(config.notify.max_body_bytes)
        );
        assert_eq!(post(addr, &big).await.0, 413);
        assert_eq!(
            post(addr, &good).await.0,
            200,
            "the genuine notify still applies"
        );
        app.stop().await.unwrap();
        sim.shutdown().await;
    }
}
