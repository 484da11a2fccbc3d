//! The simulated ShengPay over real HTTP: signatures checked both ways with openssl against the
//! simulator's rsa-crate implementation, and the money rules (pay once, replay, refuse).

mod sim_support;

use serde_json::Value;
use sim_support::*;

#[tokio::test]
async fn a_signed_refund_is_paid_once_and_its_response_signature_verifies() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));

    let response = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;

    assert_eq!(text(&response, "returnCode"), "SUCCESS", "{response:?}");
    assert_eq!(text(&response, "resultCode"), "SUCCESS");
    assert!(
        verifies(&response),
        "response signature must verify: {response:?}"
    );
    assert_eq!(text(&response, "signType"), "RSA");
    assert_eq!(text(&response, "outRefundNo"), refund);
    assert_eq!(text(&response, "outTradeNo"), order);
    assert_eq!(text(&response, "mchId"), MCH_ID);
    assert_eq!(text(&response, "appId"), APP_ID);
    assert!(text(&response, "refundId").starts_with("RO"));
    assert!(text(&response, "transactionId").starts_with('C'));
    assert_eq!(text(&response, "nonceStr").len(), 32);
    assert_eq!(amount(&response, "refundFee"), 100);
    assert_eq!(amount(&response, "settlementRefundFee"), 100);
    assert_eq!(amount(&response, "totalFee"), 1000);
    assert_eq!(amount(&response, "settlementTotalFee"), 1000);
    assert!(response.get("couponRefundFee").is_none());

    let paid = sim.paid();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].refund_no, refund);
    assert_eq!(paid[0].merchant, MCH_ID);
    assert_eq!(paid[0].provider_refund_id, text(&response, "refundId"));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeat_returns_the_first_refund_id_and_pays_nothing_more() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));

    let first = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
    let again = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;

    assert_eq!(text(&again, "resultCode"), "SUCCESS");
    assert!(verifies(&again));
    assert_eq!(text(&again, "refundId"), text(&first, "refundId"));
    assert_eq!(amount(&again, "refundFee"), 100);
    assert_ne!(text(&again, "nonceStr"), text(&first, "nonceStr"));
    assert_eq!(sim.paid().len(), 1);
    let served: Vec<_> = sim.calls_for(&refund).iter().map(|c| c.served()).collect();
    assert_eq!(served, ["paid", "replayed"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeat_with_different_amounts_is_refused_and_never_pays() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));
    shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;

    let changed = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 200)).await;

    assert_eq!(text(&changed, "returnCode"), "SUCCESS");
    assert_eq!(text(&changed, "resultCode"), "FAIL");
    assert_eq!(text(&changed, "errorCode"), "PARAMS_ERROR");
    assert!(verifies(&changed), "FAIL responses are signed too");
    assert_eq!(sim.paid().len(), 1);
    assert_eq!(sim.paid()[0].refund_fee, 100);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_request_signature_gets_sign_error_and_pays_nothing() {
    let sim = start(config()).await;
    let client = client();
    let body = signed(refund_fields(&unique("O"), &unique("R"), 1000, 100));
    // Change a signed value after signing.
    let tampered = body.replace("\"refundFee\":100", "\"refundFee\":900");
    assert_ne!(body, tampered);

    let response: serde_json::Map<String, Value> = post_shengpay(&client, &sim, tampered)
        .await
        .expect("HTTP response")
        .json()
        .await
        .expect("JSON");

    assert_eq!(text(&response, "returnCode"), "FAIL");
    assert_eq!(text(&response, "returnMsg"), "sign error");
    assert_eq!(text(&response, "errorCode"), "SIGN_ERROR");
    assert!(verifies(&response));
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unknown_merchant_gets_mch_not_found() {
    let sim = start(config()).await;
    let mut fields = refund_fields(&unique("O"), &unique("R"), 1000, 100);
    fields.insert("appId".into(), "someone-else".into());

    let response = shengpay_refund(&client(), &sim, fields).await;

    assert_eq!(text(&response, "returnCode"), "FAIL");
    assert_eq!(text(&response, "errorCode"), "MCH_NOT_FOUND");
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_request_without_nonce_gets_lack_params() {
    let sim = start(config()).await;
    let mut fields = refund_fields(&unique("O"), &unique("R"), 1000, 100);
    fields.remove("nonceStr");

    let response = shengpay_refund(&client(), &sim, fields).await;

    assert_eq!(text(&response, "returnCode"), "SUCCESS");
    assert_eq!(text(&response, "resultCode"), "FAIL");
    assert_eq!(text(&response, "errorCode"), "LACK_PARAMS");
    assert!(verifies(&response));
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn amounts_sent_as_digit_strings_are_accepted_but_fractions_are_not() {
    let sim = start(config()).await;
    let client = client();
    let mut fields = refund_fields(&unique("O"), &unique("R"), 1000, 100);
    fields.insert("refundFee".into(), "100".into());
    let response = shengpay_refund(&client, &sim, fields).await;
    assert_eq!(text(&response, "resultCode"), "SUCCESS", "{response:?}");

    let mut fields = refund_fields(&unique("O"), &unique("R"), 1000, 100);
    fields.insert("refundFee".into(), serde_json::json!(1.5));
    let response = shengpay_refund(&client, &sim, fields).await;
    assert_eq!(text(&response, "errorCode"), "PARAMS_ERROR");
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn cumulative_refunds_beyond_the_order_total_are_declined() {
    let sim = start(config()).await;
    let client = client();
    let order = unique("O");

    let first = shengpay_refund(
        &client,
        &sim,
        refund_fields(&order, &unique("R"), 1000, 600),
    )
    .await;
    let second = shengpay_refund(
        &client,
        &sim,
        refund_fields(&order, &unique("R"), 1000, 401),
    )
    .await;
    let other_total =
        shengpay_refund(&client, &sim, refund_fields(&order, &unique("R"), 2000, 10)).await;
    let over_total = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &unique("R"), 100, 101),
    )
    .await;
    let rest = shengpay_refund(
        &client,
        &sim,
        refund_fields(&order, &unique("R"), 1000, 400),
    )
    .await;

    assert_eq!(text(&first, "resultCode"), "SUCCESS");
    for declined in [&second, &other_total, &over_total] {
        assert_eq!(text(declined, "resultCode"), "FAIL");
        assert_eq!(text(declined, "errorCode"), "REFUND_AMOUNT_ERROR");
        assert!(!text(declined, "errorCodeDes").is_empty());
        assert!(verifies(declined));
    }
    assert_eq!(text(&rest, "resultCode"), "SUCCESS");
    let paid: i64 = sim.paid().iter().map(|p| p.refund_fee).sum();
    assert_eq!(paid, 1000);
    sim.shutdown().await;
}

#[tokio::test]
async fn coupons_and_string_amounts_are_signed_as_written_with_rsa2() {
    let mut config = config();
    config.coupon_rate = 1.0;
    config.string_amounts_rate = 1.0;
    let sim = start(config).await;
    let client = client();
    let refund = unique("R");
    let mut fields = refund_fields(&unique("O"), &refund, 1000, 105);
    fields.insert("signType".into(), "RSA2".into());

    let response = shengpay_refund(&client, &sim, fields).await;

    assert_eq!(text(&response, "resultCode"), "SUCCESS", "{response:?}");
    assert_eq!(text(&response, "signType"), "RSA2");
    assert!(verifies(&response));
    assert!(
        response["refundFee"].is_string(),
        "refundFee written as a string"
    );
    assert_eq!(amount(&response, "refundFee"), 105);
    assert_eq!(amount(&response, "couponRefundFee"), 10);
    assert_eq!(amount(&response, "couponRefundFee0"), 10);
    assert_eq!(amount(&response, "couponRefundCount"), 1);
    assert_eq!(amount(&response, "settlementRefundFee"), 95);
    assert!(text(&response, "couponRefundId0").starts_with("CP"));
    assert_eq!(text(&response, "couponType0"), "NO_CASH");
    let paid = sim.paid();
    assert_eq!(paid[0].settlement_refund_fee, 95);
    assert_eq!(paid[0].coupon_refund_fee, 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_same_refund_number_at_two_merchants_is_two_refunds() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));
    let mut other = refund_fields(&order, &refund, 1000, 100);
    other.insert("mchId".into(), "10000002".into());
    other.insert("appId".into(), "app-10000002".into());

    shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
    let response = shengpay_refund(&client, &sim, other).await;

    assert_eq!(text(&response, "resultCode"), "SUCCESS");
    let merchants: Vec<_> = sim.paid().into_iter().map(|p| p.merchant).collect();
    assert_eq!(merchants, [MCH_ID, "10000002"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn concurrent_retries_of_one_refund_pay_it_once() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("R"));
    let attempts = (0..8).map(|_| {
        let body = signed(refund_fields(&order, &refund, 1000, 100));
        post_shengpay(&client, &sim, body)
    });
    let mut ids = Vec::new();
    for response in futures::future::join_all(attempts).await {
        let body: serde_json::Map<String, Value> =
            response.expect("HTTP response").json().await.expect("JSON");
        ids.push(text(&body, "refundId").to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn every_fail_answer_names_the_refund_merchant_and_app_it_answers() {
    let sim = start(config()).await;
    let client = client();
    let order = unique("O");
    let first = unique("R");
    shengpay_refund(&client, &sim, refund_fields(&order, &first, 1000, 100)).await;
    let over = unique("R");
    let declined = shengpay_refund(&client, &sim, refund_fields(&order, &over, 1000, 901)).await;
    let conflict = shengpay_refund(&client, &sim, refund_fields(&order, &first, 1000, 200)).await;
    let unsigned = unique("R");
    let bad_sign = signed(refund_fields(&order, &unsigned, 1000, 100))
        .replace("\"refundFee\":100", "\"refundFee\":900");
    let sign_error: serde_json::Map<String, Value> = post_shengpay(&client, &sim, bad_sign)
        .await
        .expect("HTTP response")
        .json()
        .await
        .expect("JSON");

    for (what, response, refund) in [
        ("decline", &declined, &over),
        ("conflict", &conflict, &first),
        ("sign error", &sign_error, &unsigned),
    ] {
        assert!(verifies(response), "{what}: {response:?}");
        assert_eq!(text(response, "outRefundNo"), refund.as_str(), "{what}");
        assert_eq!(text(response, "outTradeNo"), order, "{what}");
        assert_eq!(text(response, "mchId"), MCH_ID, "{what}");
        assert_eq!(text(response, "appId"), APP_ID, "{what}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn our_client_books_the_simulators_decline_and_retry_later_as_such() {
    use refund_sim::{FaultAction, FaultRule};
    use shared::provider::{Outcome, Provider, RefundCall};
    let mut config = config();
    config.rules = vec![
        FaultRule::new(FaultAction::Decline)
            .order_no("^DECL-")
            .code("TRADE_OVERDUE"),
        FaultRule::new(FaultAction::RetryLater).order_no("^BUSY-"),
    ];
    let sim = start(config).await;
    let ours = our_client(&sim);

    for (order, want) in [
        (unique("DECL-"), "declined"),
        (unique("BUSY-"), "retry_later"),
        (unique("O"), "accepted"),
    ] {
        let request = refund_request(&order, &unique("R"));
        let record = ours
            .refund(RefundCall {
                request: &request,
                attempt: 1,
            })
            .await;
        assert_eq!(
            record.outcome.class(),
            want,
            "{order}: {:?}",
            record.outcome
        );
        if want == "declined" {
            assert!(matches!(
                &record.outcome,
                Outcome::Declined { code, .. } if code == "TRADE_OVERDUE"
            ));
        }
    }
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}
