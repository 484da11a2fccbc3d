//! ShengPay notifies as the receiver sees them: retried until acknowledged with 2xx `SUCCESS`,
//! given up after the retry list, and shaped by the notify fault rules (drop, delay, duplicate,
//! reorder, bad sign, foreign). The receiver verifies every body with the rsa crate and the
//! platform public key, and refuses what does not verify, as the worker does.

mod sim_support;

use std::time::{Duration, Instant};

use refund_sim::{FaultAction, FaultRule, NotifyKind, NotifyOutcome, SimHandle};
use serde_json::Value;
use sim_support::*;

/// Refunds end as answered; retries wait `retry_ms`.
async fn sim_notifying(rules: Vec<FaultRule>, retry_ms: Vec<u64>) -> SimHandle {
    let mut config = config();
    config.shengpay.notify_retry_ms = retry_ms;
    config.rules = rules;
    start(config).await
}

/// Sends one refund (100 of 1000) whose notify goes to `receiver`; returns its number.
async fn refund_to(sim: &SimHandle, receiver: &Receiver, order_prefix: &str) -> String {
    let refund = unique("R");
    let answer = shengpay_refund(
        &client(),
        sim,
        refund_fields_to(receiver, &unique(order_prefix), &refund, 1000, 100),
    )
    .await;
    assert_eq!(text(&answer, "resultCode"), "SUCCESS", "{answer:?}");
    refund
}

/// Waits until the notify sequence of `refund` has nothing more to send.
async fn settled(sim: &SimHandle, refund: &str, records: usize) {
    eventually(&format!("{records} notify records for {refund}"), || {
        sim.notifies_for(refund).len() >= records
    })
    .await;
}

#[tokio::test]
async fn a_notify_answered_non_2xx_or_not_success_is_retried_until_delivered() {
    let sim = sim_notifying(vec![], vec![30, 30, 30]).await;
    let receiver = Receiver::scripted(vec![(500, "busy"), (200, "FAIL")]).await;

    let refund = refund_to(&sim, &receiver, "O").await;

    let received = receiver.wait_for(3).await;
    assert_eq!(
        received.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 200, 200]
    );
    assert!(received.iter().all(|r| r.verified));
    settled(&sim, &refund, 3).await;
    let records = sim.notifies_for(&refund);
    let seen: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.attempt,
                r.http_status,
                r.answer.clone().unwrap_or_default(),
                r.delivered,
                r.outcome,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, Some(500), "busy".into(), false, NotifyOutcome::Retry),
            (2, Some(200), "FAIL".into(), false, NotifyOutcome::Retry),
            (
                3,
                Some(200),
                "SUCCESS".into(),
                true,
                NotifyOutcome::Delivered
            ),
        ]
    );
    assert!(records.iter().all(|r| r.kind == NotifyKind::Final));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_notify_nobody_acknowledges_is_given_up_after_the_retry_list() {
    let sim = sim_notifying(vec![], vec![20, 20]).await;
    let receiver = Receiver::scripted(vec![(503, "down"); 10]).await;

    let refund = refund_to(&sim, &receiver, "O").await;

    settled(&sim, &refund, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let records = sim.notifies_for(&refund);
    let outcomes: Vec<_> = records.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            NotifyOutcome::Retry,
            NotifyOutcome::Retry,
            NotifyOutcome::GivenUp
        ]
    );
    assert_eq!(receiver.received().len(), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_notify_to_an_address_nobody_listens_on_records_the_error_and_is_retried() {
    let sim = sim_notifying(vec![], vec![20]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let refund = unique("R");
    let mut fields = refund_fields(&unique("O"), &refund, 1000, 100);
    fields.insert("notifyUrl".into(), format!("http://{closed}/notify").into());

    shengpay_refund(&client(), &sim, fields).await;

    settled(&sim, &refund, 2).await;
    let records = sim.notifies_for(&refund);
    assert!(records.iter().all(|r| r.http_status.is_none()));
    assert!(records.iter().all(|r| r.error.is_some()), "{records:?}");
    assert_eq!(records[1].outcome, NotifyOutcome::GivenUp);
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_drop_sends_nothing_and_records_why() {
    let sim = sim_notifying(
        vec![FaultRule::new(FaultAction::NotifyDrop).order_no("^NDROP-")],
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;

    let dropped = refund_to(&sim, &receiver, "NDROP-").await;
    let normal = refund_to(&sim, &receiver, "O").await;

    let received = receiver.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(text(&received[0].fields, "outRefundNo"), normal);
    let records = sim.notifies_for(&dropped);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].attempt, 0);
    assert_eq!(records[0].outcome, NotifyOutcome::DroppedByRule);
    assert_eq!(
        sim.paid().len(),
        2,
        "dropping the notify does not undo the refund"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_delay_holds_back_the_first_delivery() {
    let sim = sim_notifying(
        vec![
            FaultRule::new(FaultAction::NotifyDelay)
                .order_no("^NDELAY-")
                .with_latency(400),
        ],
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;
    let started = Instant::now();

    refund_to(&sim, &receiver, "NDELAY-").await;

    receiver.wait_for(1).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_duplicate_delivers_the_final_notify_twice_the_second_after_the_first_answer() {
    let sim = sim_notifying(
        vec![FaultRule::new(FaultAction::NotifyDuplicate).order_no("^NDUP-")],
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;

    let refund = refund_to(&sim, &receiver, "NDUP-").await;

    let received = receiver.wait_for(2).await;
    for notify in &received {
        assert!(notify.verified);
        assert_eq!(text(&notify.fields, "outRefundNo"), refund);
        assert_eq!(text(&notify.fields, "refundStatus"), "SUCCESS");
    }
    assert_eq!(
        text(&received[0].fields, "refundSuccessTime"),
        text(&received[1].fields, "refundSuccessTime")
    );
    settled(&sim, &refund, 2).await;
    let records = sim.notifies_for(&refund);
    assert_eq!(records[0].kind, NotifyKind::Final);
    assert_eq!(records[1].kind, NotifyKind::Duplicate);
    assert!(records[0].at <= records[1].at);
    assert!(records.iter().all(|r| r.delivered));
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_reorder_delivers_a_stale_processing_notify_after_the_final_one() {
    let sim = sim_notifying(
        vec![FaultRule::new(FaultAction::NotifyReorder).order_no("^NREORD-")],
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;

    let refund = refund_to(&sim, &receiver, "NREORD-").await;

    let received = receiver.wait_for(2).await;
    assert_eq!(text(&received[0].fields, "refundStatus"), "SUCCESS");
    let stale = &received[1].fields;
    assert!(received[1].verified, "a stale notify is genuinely signed");
    assert_eq!(text(stale, "refundStatus"), "PROCESSING");
    assert_eq!(text(stale, "outRefundNo"), refund);
    assert!(stale.get("refundSuccessTime").is_none());
    settled(&sim, &refund, 2).await;
    let kinds: Vec<_> = sim.notifies_for(&refund).iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [NotifyKind::Final, NotifyKind::Stale]);
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_bad_sign_fails_verification_first_and_the_retry_verifies() {
    let sim = sim_notifying(
        vec![FaultRule::new(FaultAction::NotifyBadSign).order_no("^NBAD-")],
        vec![30],
    )
    .await;
    let receiver = Receiver::start().await;

    let refund = refund_to(&sim, &receiver, "NBAD-").await;

    let received = receiver.wait_for(2).await;
    assert!(!received[0].verified, "{}", received[0].body);
    assert!(!verifies(&received[0].fields), "openssl agrees");
    assert_eq!(received[0].answered, 401);
    assert!(received[1].verified);
    settled(&sim, &refund, 2).await;
    let records = sim.notifies_for(&refund);
    assert_eq!(records[0].kind, NotifyKind::BadSign);
    assert_eq!(records[0].outcome, NotifyOutcome::Retry);
    assert_eq!(records[1].kind, NotifyKind::Final);
    assert!(records[1].delivered);
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_foreign_first_delivers_a_signed_notify_about_another_refund_and_account() {
    let sim = sim_notifying(
        vec![FaultRule::new(FaultAction::NotifyForeign).order_no("^NFOR-")],
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;
    let ours = our_client(&sim);
    let order = unique("NFOR-");
    let refund = unique("R");
    shengpay_refund(
        &client(),
        &sim,
        refund_fields_to(&receiver, &order, &refund, 1000, 100),
    )
    .await;

    let received = receiver.wait_for(2).await;
    let foreign = &received[0];
    assert!(foreign.verified, "signed by the platform key");
    assert_ne!(text(&foreign.fields, "outRefundNo"), refund);
    assert!(text(&foreign.fields, "outRefundNo").starts_with(&refund));
    assert_ne!(text(&foreign.fields, "mchId"), MCH_ID);
    assert_eq!(text(&received[1].fields, "outRefundNo"), refund);
    assert_eq!(text(&received[1].fields, "mchId"), MCH_ID);
    // Our client refuses the foreign one as not about this refund.
    use shared::provider::Provider as _;
    let request = refund_request(&order, &refund);
    assert!(ours.read_notify(foreign.body.as_bytes(), &request).is_err());
    assert!(
        ours.read_notify(received[1].body.as_bytes(), &request)
            .is_ok()
    );
    settled(&sim, &refund, 2).await;
    let kinds: Vec<_> = sim.notifies_for(&refund).iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [NotifyKind::Foreign, NotifyKind::Final]);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_resend_delivers_the_final_notify_again_and_unknown_or_processing_refunds_are_404() {
    let mut config = config();
    config.shengpay.processing_ms = 60_000;
    let sim = start(config).await;
    let receiver = Receiver::start().await;
    let client = client();
    let base = sim.base_url();
    let refund = refund_to(&sim, &receiver, "O").await;

    let processing = client
        .post(format!("{base}/_sim/notify"))
        .json(&serde_json::json!({ "refund_no": refund }))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(processing.status(), 404);
    let unknown = client
        .post(format!("{base}/_sim/notify"))
        .json(&serde_json::json!({ "refund_no": "nope", "merchant": MCH_ID }))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.expect("JSON error");
    assert!(error["error"].is_string());

    sim.finish();
    receiver.wait_for(1).await;
    let record = sim.send_notify(&refund).await.expect("a resend");
    assert!(record.delivered);
    assert_eq!(record.kind, NotifyKind::Duplicate);
    let over_http: Value = client
        .post(format!("{base}/_sim/notify"))
        .json(&serde_json::json!({ "refund_no": refund, "merchant": MCH_ID }))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(over_http["delivered"], true);
    let received = receiver.wait_for(3).await;
    assert!(received.iter().all(|r| r.verified
        && text(&r.fields, "refundStatus") == "SUCCESS"
        && text(&r.fields, "outRefundNo") == refund));

    let listed: Vec<Value> = client
        .get(format!("{base}/_sim/notifies?refund_no={refund}"))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(listed.len(), 3);
    for key in [
        "refund_no",
        "merchant",
        "status",
        "attempt",
        "kind",
        "http_status",
        "answer",
        "delivered",
        "at",
    ] {
        assert!(listed[0].get(key).is_some(), "{key} missing: {}", listed[0]);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn beyond_notify_max_pending_new_notifies_are_recorded_as_dropped_overflow() {
    let mut config = config();
    config.shengpay.notify_max_pending = 1;
    config.shengpay.notify_retry_ms = vec![60_000];
    let sim = start(config).await;
    // The first notify stays pending: refused, then waiting a minute for its retry.
    let receiver = Receiver::scripted(vec![(500, "busy")]).await;

    let first = refund_to(&sim, &receiver, "O").await;
    receiver.wait_for(1).await;
    let second = refund_to(&sim, &receiver, "O").await;

    settled(&sim, &second, 1).await;
    assert_eq!(
        sim.notifies_for(&second)[0].outcome,
        NotifyOutcome::DroppedOverflow
    );
    assert_eq!(sim.notifies_for(&first)[0].outcome, NotifyOutcome::Retry);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutting_down_stops_notifies_under_way() {
    let sim = sim_notifying(vec![], vec![200, 200, 200]).await;
    let receiver = Receiver::scripted(vec![(500, "busy"); 10]).await;
    refund_to(&sim, &receiver, "O").await;
    receiver.wait_for(1).await;

    sim.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(receiver.received().len(), 1, "no retry after shutdown");
}
