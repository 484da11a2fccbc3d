//! ShengPay's asynchronous side over real HTTP: a refund is PROCESSING, then ends; it is paid
//! (paid list, statement) only when it ends SUCCESS; the status query answers how it stands;
//! refund_close and change end it otherwise; finish ends everything now. Answers and notifies
//! are checked with openssl and the rsa crate, and read with our own client (`shared`), so
//! what the worker relies on is what the simulator sends.

mod sim_support;

use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use refund_sim::{FaultAction, FaultRule, Operation, Provider, RefundStatus, SimConfig, SimHandle};
use serde_json::{Map, Value};
use shared::provider::Provider as _;
use shared::provider::status::{QueryOutcome, RefundStatus as Status};
use sim_support::*;

const NOTIFY_FIELDS: [&str; 15] = [
    "appId",
    "mchId",
    "outTradeNo",
    "outRefundNo",
    "refundId",
    "transactionId",
    "totalFee",
    "refundFee",
    "settlementRefundFee",
    "settlementTotalFee",
    "refundStatus",
    "refundSuccessTime",
    "nonceStr",
    "signType",
    "sign",
];

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// The test config with refunds processing for `ms` and these rules.
async fn sim_processing(ms: u64, rules: Vec<FaultRule>) -> SimHandle {
    let mut config = config();
    config.shengpay.processing_ms = ms;
    config.rules = rules;
    start(config).await
}

fn sorted_keys(fields: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<String> = fields.keys().cloned().collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_refund_is_processing_then_succeeds_after_processing_ms_and_a_signed_notify_arrives() {
    let sim = sim_processing(400, vec![]).await;
    let receiver = Receiver::start().await;
    let (order, refund) = (unique("O"), unique("R"));
    let started = Instant::now();

    let answer = shengpay_refund(
        &client(),
        &sim,
        refund_fields_to(&receiver, &order, &refund, 1000, 100),
    )
    .await;

    assert_eq!(text(&answer, "resultCode"), "SUCCESS", "{answer:?}");
    assert!(verifies(&answer));
    let accepted = sim.refunds_for(&refund);
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].status, RefundStatus::Processing);
    assert!(accepted[0].success_time.is_none());
    assert!(sim.paid().is_empty(), "accepted is not paid");

    let notify = receiver.wait_for(1).await.remove(0);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "ended early"
    );
    assert_eq!(notify.content_type, "application/json; charset=utf-8");
    assert!(notify.verified, "rsa crate: {}", notify.body);
    assert!(verifies(&notify.fields), "openssl: {}", notify.body);
    let mut expected: Vec<String> = NOTIFY_FIELDS.iter().map(|k| (*k).to_owned()).collect();
    expected.sort();
    assert_eq!(sorted_keys(&notify.fields), expected);
    let f = &notify.fields;
    assert_eq!(text(f, "appId"), APP_ID);
    assert_eq!(text(f, "mchId"), MCH_ID);
    assert_eq!(text(f, "outTradeNo"), order);
    assert_eq!(text(f, "outRefundNo"), refund);
    assert_eq!(text(f, "refundId"), text(&answer, "refundId"));
    assert_eq!(text(f, "transactionId"), text(&answer, "transactionId"));
    assert_eq!(amount(f, "totalFee"), 1000);
    assert_eq!(amount(f, "refundFee"), 100);
    assert_eq!(amount(f, "settlementRefundFee"), 100);
    assert_eq!(amount(f, "settlementTotalFee"), 1000);
    assert_eq!(text(f, "refundStatus"), "SUCCESS");
    assert_eq!(text(f, "signType"), "RSA");
    assert_eq!(text(f, "nonceStr").len(), 32);

    let ended = sim.refunds_for(&refund).remove(0);
    assert_eq!(ended.status, RefundStatus::Success);
    let success_time = ended.success_time.expect("a success time");
    assert_eq!(
        text(f, "refundSuccessTime"),
        success_time
            .with_timezone(&chrono_tz::Asia::Shanghai)
            .format("%Y%m%d%H%M%S")
            .to_string()
    );
    let paid = sim.paid();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].refunded_at, success_time);
    eventually("the delivery is recorded", || {
        sim.notifies_for(&refund).iter().any(|n| n.delivered)
    })
    .await;
    let records = sim.notifies_for(&refund);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].attempt, 1);
    assert_eq!(records[0].status, "SUCCESS");
    assert_eq!(records[0].http_status, Some(200));
    assert_eq!(records[0].answer.as_deref(), Some("SUCCESS"));
    sim.shutdown().await;
}

#[tokio::test]
async fn our_client_reads_the_notify_and_the_query_answers_as_the_worker_will() {
    let sim = sim_processing(60_000, vec![]).await;
    let receiver = Receiver::start().await;
    let ours = our_client_notified_at(&sim, &receiver.url);
    let request = refund_request(&unique("O"), &unique("R"));

    let record = ours
        .refund(shared::provider::RefundCall {
            request: &request,
            attempt: 1,
        })
        .await;
    assert_eq!(record.outcome.class(), "accepted", "{:?}", record.outcome);
    let processing = ours.query(&request).await.expect("ShengPay has a query");
    assert!(
        matches!(&processing.outcome, QueryOutcome::Status(r) if r.status == Status::Processing),
        "{:?}",
        processing.outcome
    );

    assert_eq!(sim.finish(), 1);
    let notify = receiver.wait_for(1).await.remove(0);
    let report = ours
        .read_notify(notify.body.as_bytes(), &request)
        .expect("our client accepts the notify");
    let Status::Success {
        provider_refund_id,
        settlement_refund_fee,
        success_time,
    } = report.status
    else {
        panic!("a success: {report:?}");
    };
    let ended = sim.refunds_for(&request.refund_no).remove(0);
    assert_eq!(provider_refund_id, ended.provider_refund_id);
    assert_eq!(settlement_refund_fee, 100);
    // refundSuccessTime has whole seconds.
    assert_eq!(
        success_time.timestamp(),
        ended.success_time.expect("success").timestamp()
    );
    let succeeded = ours.query(&request).await.expect("ShengPay has a query");
    assert!(
        matches!(&succeeded.outcome, QueryOutcome::Status(r) if matches!(r.status, Status::Success { .. })),
        "{:?}",
        succeeded.outcome
    );
    let unknown = ours
        .query(&refund_request(&unique("O"), &unique("R")))
        .await
        .expect("ShengPay has a query");
    assert!(
        matches!(unknown.outcome, QueryOutcome::NotFound { .. }),
        "{:?}",
        unknown.outcome
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_paid_list_and_statement_show_a_refund_only_once_it_succeeded_dated_by_its_success() {
    let sim = sim_processing(60_000, vec![]).await;
    let client = client();
    let refund = unique("R");
    let wu_refund = unique("W");
    // Accepted at 23:59:59.5 on 21 November in Shanghai; WuPay pays at the call, as before.
    sim.set_now(Some(at("2026-11-21T15:59:59.500Z")));
    shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &refund, 1000, 100),
    )
    .await;
    wupay_call(
        &client,
        &sim,
        Wu::Get,
        &wupay_params(&unique("O"), &wu_refund, 500, 50),
    )
    .await
    .expect("HTTP");
    let day1 = NaiveDate::from_ymd_opt(2026, 11, 21).expect("date");
    let day2 = NaiveDate::from_ymd_opt(2026, 11, 22).expect("date");
    let listed = |date| {
        sim.statement_csv(date, None, None)
            .expect("CSV")
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    let paid: Vec<_> = sim.paid().into_iter().map(|p| p.refund_no).collect();
    assert_eq!(paid, std::slice::from_ref(&wu_refund));
    assert_eq!(listed(day1), std::slice::from_ref(&wu_refund));

    // It succeeds at 00:00:00.5 on the 22nd: that is its business date.
    sim.set_now(Some(at("2026-11-21T16:00:00.500Z")));
    assert_eq!(sim.finish(), 1);
    sim.set_now(None);

    let paid = sim.paid();
    assert_eq!(paid.len(), 2);
    assert_eq!(paid[1].refund_no, refund);
    assert!(paid[1].refunded_at >= at("2026-11-21T16:00:00.500Z"));
    assert!(paid[1].refunded_at < at("2026-11-21T16:00:10Z"));
    assert_eq!(listed(day1), [wu_refund]);
    assert_eq!(listed(day2), std::slice::from_ref(&refund));
    let csv = sim
        .statement_csv(day2, Some(Provider::ShengPay), None)
        .expect("CSV");
    assert!(csv.contains(",2026-11-22T00:00:0"), "{csv}");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_query_answers_processing_then_success_signed_with_the_notify_fields() {
    let sim = sim_processing(60_000, vec![]).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));
    shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;

    let processing = shengpay_query(&client, &sim, query_fields(&refund)).await;
    assert!(verifies(&processing), "{processing:?}");
    assert!(verifies_rsa(&processing));
    assert_eq!(text(&processing, "returnCode"), "SUCCESS");
    assert_eq!(text(&processing, "resultCode"), "SUCCESS");
    assert_eq!(text(&processing, "refundStatus"), "PROCESSING");
    assert!(processing.get("refundSuccessTime").is_none());
    assert_eq!(text(&processing, "outRefundNo"), refund);
    assert_eq!(text(&processing, "outTradeNo"), order);

    sim.finish();
    let success = shengpay_query(&client, &sim, query_fields(&refund)).await;
    assert!(verifies(&success), "{success:?}");
    for key in NOTIFY_FIELDS {
        assert!(success.contains_key(key), "{key} missing: {success:?}");
    }
    assert_eq!(text(&success, "refundStatus"), "SUCCESS");
    assert_eq!(text(&success, "refundSuccessTime").len(), 14);
    assert_eq!(text(&success, "mchId"), MCH_ID);
    assert_eq!(text(&success, "appId"), APP_ID);
    assert_eq!(amount(&success, "refundFee"), 100);
    assert_eq!(amount(&success, "totalFee"), 1000);
    assert_eq!(text(&success, "refundId"), sim.paid()[0].provider_refund_id);

    let answered: Vec<_> = sim
        .queries_for(&refund)
        .into_iter()
        .map(|q| q.answered)
        .collect();
    assert_eq!(answered, ["PROCESSING", "SUCCESS"]);
    assert!(
        sim.calls_for(&refund).len() == 1,
        "queries stay out of the call log"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_query_of_an_unknown_refund_is_a_signed_refundnotexist_naming_it() {
    let sim = sim_processing(0, vec![]).await;
    let refund = unique("R");

    let answer = shengpay_query(&client(), &sim, query_fields(&refund)).await;

    assert!(verifies(&answer), "{answer:?}");
    assert_eq!(text(&answer, "returnCode"), "SUCCESS");
    assert_eq!(text(&answer, "resultCode"), "FAIL");
    assert_eq!(text(&answer, "errorCode"), "REFUNDNOTEXIST");
    assert!(!text(&answer, "errorCodeDes").is_empty());
    assert_eq!(text(&answer, "outRefundNo"), refund);
    assert_eq!(text(&answer, "mchId"), MCH_ID);
    assert_eq!(text(&answer, "appId"), APP_ID);
    assert_eq!(text(&answer, "nonceStr").len(), 32);
    assert_eq!(text(&answer, "signType"), "RSA");
    assert_eq!(sim.queries()[0].answered, "not_found");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_query_with_a_bad_sign_is_sign_error_and_one_from_an_unknown_account_mch_not_found() {
    let sim = sim_processing(0, vec![]).await;
    let client = client();
    let refund = unique("R");
    let tampered = signed(query_fields(&refund)).replace(&refund, &format!("{refund}9"));
    let mut stranger = query_fields(&refund);
    stranger.insert("appId".into(), "someone-else".into());

    let bad_sign: Map<String, Value> = post_query(&client, &sim, tampered)
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    let unknown = shengpay_query(&client, &sim, stranger).await;

    assert_eq!(text(&bad_sign, "returnCode"), "FAIL");
    assert_eq!(text(&bad_sign, "errorCode"), "SIGN_ERROR");
    assert!(verifies(&bad_sign));
    assert_eq!(text(&unknown, "returnCode"), "FAIL");
    assert_eq!(text(&unknown, "errorCode"), "MCH_NOT_FOUND");
    let answered: Vec<_> = sim.queries().into_iter().map(|q| q.answered).collect();
    assert_eq!(answered, ["rejected", "rejected"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn refund_close_frees_the_order_total_and_never_appears_in_paid_or_the_statement() {
    let sim = sim_processing(
        60_000,
        vec![FaultRule::new(FaultAction::RefundClose).refund_no("^CLOSE-")],
    )
    .await;
    let receiver = Receiver::start().await;
    let client = client();
    let order = unique("O");
    let closed = unique("CLOSE-");

    let first = shengpay_refund(
        &client,
        &sim,
        refund_fields_to(&receiver, &order, &closed, 1000, 1000),
    )
    .await;
    assert_eq!(
        text(&first, "resultCode"),
        "SUCCESS",
        "the call is accepted"
    );
    let while_reserved = shengpay_refund(
        &client,
        &sim,
        refund_fields(&order, &unique("R"), 1000, 1000),
    )
    .await;
    assert_eq!(text(&while_reserved, "errorCode"), "REFUND_AMOUNT_ERROR");

    assert_eq!(sim.finish(), 1);
    let notify = receiver.wait_for(1).await.remove(0);
    assert!(notify.verified);
    assert_eq!(text(&notify.fields, "refundStatus"), "REFUND_CLOSE");
    assert!(notify.fields.get("refundSuccessTime").is_none());
    assert_eq!(
        sim.refunds_for(&closed)[0].status,
        RefundStatus::RefundClose
    );
    let again = shengpay_refund(&client, &sim, refund_fields(&order, &closed, 1000, 1000)).await;
    assert_eq!(text(&again, "refundId"), text(&first, "refundId"));

    let other = unique("R");
    let second = shengpay_refund(&client, &sim, refund_fields(&order, &other, 1000, 1000)).await;
    assert_eq!(text(&second, "resultCode"), "SUCCESS", "{second:?}");
    assert_eq!(sim.finish(), 1);
    let paid: Vec<_> = sim.paid().into_iter().map(|p| p.refund_no).collect();
    assert_eq!(paid, [other]);
    let today = sim
        .now()
        .with_timezone(&chrono_tz::Asia::Shanghai)
        .date_naive();
    let csv = sim.statement_csv(today, None, None).expect("CSV");
    assert!(!csv.contains(&closed), "{csv}");
    sim.shutdown().await;
}

#[tokio::test]
async fn change_keeps_the_order_total_taken_and_stays_out_of_paid() {
    let sim = sim_processing(
        0,
        vec![FaultRule::new(FaultAction::Change).order_no("^CHG-")],
    )
    .await;
    let client = client();
    let (order, refund) = (unique("CHG-"), unique("R"));

    shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 1000)).await;
    let more = shengpay_refund(&client, &sim, refund_fields(&order, &unique("R"), 1000, 1)).await;
    let status = shengpay_query(&client, &sim, query_fields(&refund)).await;

    assert_eq!(sim.refunds_for(&refund)[0].status, RefundStatus::Change);
    assert_eq!(text(&status, "refundStatus"), "CHANGE");
    assert!(status.get("refundSuccessTime").is_none());
    assert_eq!(text(&more, "errorCode"), "REFUND_AMOUNT_ERROR");
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn finish_ends_every_processing_refund_now_and_the_control_api_lists_them() {
    let sim = sim_processing(600_000, vec![]).await;
    let client = client();
    let base = sim.base_url();
    let refunds: Vec<String> = (0..3).map(|_| unique("R")).collect();
    for refund in &refunds {
        shengpay_refund(&client, &sim, refund_fields(&unique("O"), refund, 100, 10)).await;
    }
    let listed: Vec<Map<String, Value>> = client
        .get(format!("{base}/_sim/refunds"))
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
        "order_no",
        "refund_fee",
        "settlement_refund_fee",
        "status",
        "accepted_at",
        "ends_at",
        "ended_at",
        "success_time",
    ] {
        assert!(
            listed[0].contains_key(key),
            "{key} missing: {:?}",
            listed[0]
        );
    }
    assert_eq!(listed[0]["status"], "PROCESSING");

    let finished: Value = client
        .post(format!("{base}/_sim/finish"))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(finished["ended"], 3);
    assert_eq!(sim.finish(), 0, "nothing left processing");
    assert!(
        sim.refunds()
            .iter()
            .all(|r| r.status == RefundStatus::Success)
    );
    assert_eq!(sim.paid().len(), 3);
    let one: Vec<Map<String, Value>> = client
        .get(format!("{base}/_sim/refunds?refund_no={}", refunds[1]))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["status"], "SUCCESS");

    sim.reset();
    assert!(sim.refunds().is_empty());
    assert!(sim.queries().is_empty());
    assert!(sim.notifies().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn query_faults_apply_with_operation_query_and_not_to_refund_calls() {
    let sim = sim_processing(
        0,
        vec![
            FaultRule::new(FaultAction::Http500)
                .refund_no("^QF500-")
                .operation(Operation::Query),
            FaultRule::new(FaultAction::Reset)
                .refund_no("^QFRST-")
                .operation(Operation::Query),
            FaultRule::new(FaultAction::RetryLater)
                .refund_no("^QFBUSY-")
                .operation(Operation::Query),
        ],
    )
    .await;
    let client = client();
    let (e500, reset, busy) = (unique("QF500-"), unique("QFRST-"), unique("QFBUSY-"));
    for refund in [&e500, &reset, &busy] {
        let answer =
            shengpay_refund(&client, &sim, refund_fields(&unique("O"), refund, 100, 10)).await;
        assert_eq!(
            text(&answer, "resultCode"),
            "SUCCESS",
            "refund calls untouched"
        );
    }
    assert_eq!(sim.paid().len(), 3);

    let status = post_query(&client, &sim, signed(query_fields(&e500)))
        .await
        .expect("HTTP")
        .status();
    assert_eq!(status, 500);
    let lost = post_query(&client, &sim, signed(query_fields(&reset))).await;
    assert!(lost.is_err(), "reset gives no answer: {lost:?}");
    let retry = shengpay_query(&client, &sim, query_fields(&busy)).await;
    assert_eq!(text(&retry, "resultCode"), "FAIL");
    assert_eq!(text(&retry, "errorCode"), "SYSTEMERROR");
    assert!(verifies(&retry));

    let answered: Vec<_> = sim.queries().into_iter().map(|q| q.answered).collect();
    assert_eq!(answered, ["http500", "reset", "retry_later"]);
    let served: Vec<_> = sim.calls().iter().map(|c| c.served()).collect();
    assert_eq!(served, ["paid", "paid", "paid"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_action_that_does_not_fit_its_operation_is_refused_at_load_and_at_run_time() {
    let path = testkit::workspace_root().join("config/sim.toml");
    let text = std::fs::read_to_string(&path).expect("readable");
    let bad = format!(
        "{text}\n[[rules]]\nname = \"confused\"\naction = \"notify_drop\"\noperation = \"query\"\n"
    );
    let error = SimConfig::from_toml_str(&bad)
        .expect_err("notify_drop cannot apply to queries")
        .to_string();
    assert!(error.contains("confused"), "{error}");
    assert!(error.contains("notify_drop"), "{error}");

    let sim = sim_processing(0, vec![]).await;
    let response = client()
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&serde_json::json!([{ "action": "decline", "operation": "query" }]))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 400);
    assert!(sim.rules().is_empty());
    sim.shutdown().await;
}

#[test]
fn the_asynchronous_settings_are_validated() {
    let path = testkit::workspace_root().join("config/sim.toml");
    let shipped = SimConfig::load(&path).expect("config/sim.toml is valid");
    assert_eq!(shipped.shengpay.query_path, "/api/v3/payment/refundquery");
    assert_eq!(shipped.shengpay.processing_ms, 2000);
    type Change = fn(&mut refund_sim::ShengPaySection);
    let changes: [(&str, Change); 6] = [
        ("query_path", |s| s.query_path = "api/refundquery".into()),
        ("query_path", |s| {
            s.query_path = "/api/v1/payment/refund".into()
        }),
        ("query_path", |s| s.query_path = "/_sim/query".into()),
        ("notify_concurrency", |s| s.notify_concurrency = 0),
        ("notify_max_pending", |s| s.notify_max_pending = 0),
        ("notify_timeout_ms", |s| s.notify_timeout_ms = 0),
    ];
    for (key, change) in changes {
        let mut config = config();
        change(&mut config.shengpay);
        let result = config.validate();
        assert!(
            result.as_ref().is_err_and(|e| e.to_string().contains(key)),
            "{key}: {result:?}"
        );
    }
    let mut collides = config();
    collides.wupay.merchants[0].path = "/api/v3/payment/refundquery".into();
    assert!(
        collides.validate().is_err(),
        "a WuPay path on the query path"
    );
}
