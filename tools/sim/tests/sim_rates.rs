//! The arrival timeline (`/_sim/rates`) over real HTTP: every request counted per merchant and
//! second whatever it was served, past the call log's cap; one merchant taken down and brought
//! back by rule at run time, the way refund-bench's S7 does it; and the providers' own
//! per-merchant rate limits (`[[limits]]`).

mod sim_support;

use std::time::{SystemTime, UNIX_EPOCH};

use refund_sim::{FaultAction, FaultRule, Operation, Provider, RateWindow, SimLimit};
use sim_support::*;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn wupay_ok(sim: &refund_sim::SimHandle, binding: Wu) -> u16 {
    let params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
    let (status, _, _) = wupay_call(&client(), sim, binding, &params)
        .await
        .expect("HTTP response");
    status
}

async fn get_rates(sim: &refund_sim::SimHandle, query: &str) -> Vec<RateWindow> {
    let response = client()
        .get(format!("{}/_sim/rates{query}", sim.base_url()))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON array of windows")
}

fn total(windows: &[RateWindow]) -> (u64, u64, u64) {
    windows.iter().fold((0, 0, 0), |(c, r, q), w| {
        (c + w.calls, r + w.refunds, q + w.queries)
    })
}

#[tokio::test]
async fn every_request_is_counted_per_merchant_and_second_past_the_call_log_cap() {
    let mut config = config();
    // Far fewer records kept than requests sent: the timeline must not depend on the log.
    config.call_log_capacity = 2;
    config.rules = vec![
        FaultRule::new(FaultAction::Http500)
            .merchant("wu-soap11")
            .times(1)
            .order_no("^FAULT-"),
    ];
    let sim = start(config).await;
    let client = client();
    let before = unix_now();

    for _ in 0..5 {
        assert_eq!(wupay_ok(&sim, Wu::Soap11).await, 200);
    }
    // A faulted request counts too: the provider saw it.
    let faulted = wupay_params(&unique("FAULT-"), &unique("W"), 1000, 100);
    let (status, _, _) = wupay_call(&client, &sim, Wu::Soap11, &faulted)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    for _ in 0..2 {
        assert_eq!(wupay_ok(&sim, Wu::Post).await, 200);
    }
    let refund = unique("R");
    let _ = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &refund, 1000, 100),
    )
    .await;
    let _ = shengpay_query(&client, &sim, query_fields(&refund)).await;
    let _ = shengpay_query(&client, &sim, query_fields(&refund)).await;
    let after = unix_now();

    assert_eq!(sim.calls().len(), 2, "the call log kept only its capacity");
    let soap11 = get_rates(&sim, "?merchant=wu-soap11").await;
    assert_eq!(total(&soap11), (6, 6, 0), "{soap11:?}");
    assert!(
        soap11.iter().all(|w| (before..=after).contains(&w.second)
            && w.merchant.as_deref() == Some("wu-soap11")
            && w.provider == Provider::WuPay),
        "{soap11:?}"
    );
    assert!(
        soap11.windows(2).all(|p| p[0].second < p[1].second),
        "one window per second, in order: {soap11:?}"
    );
    assert_eq!(
        total(&get_rates(&sim, "?merchant=wu-post").await),
        (2, 2, 0)
    );
    let shengpay = get_rates(&sim, "?provider=shengpay").await;
    assert_eq!(total(&shengpay), (3, 1, 2), "refunds and queries apart");
    assert!(
        shengpay
            .iter()
            .all(|w| w.merchant.as_deref() == Some(MCH_ID))
    );
    assert_eq!(total(&get_rates(&sim, "").await).0, 11);
    assert_eq!(
        sim.rates(Some("wu-post")),
        get_rates(&sim, "?merchant=wu-post").await
    );
    assert!(get_rates(&sim, "?merchant=nobody").await.is_empty());
    let bad = client
        .get(format!("{}/_sim/rates?provider=paypal", sim.base_url()))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(bad.status(), 400);

    sim.reset();
    assert!(sim.rates(None).is_empty(), "reset forgets the timeline");
    sim.shutdown().await;
}

#[tokio::test]
async fn one_merchant_is_taken_down_and_brought_back_at_run_time() {
    let sim = start(config()).await;
    let down = FaultRule::new(FaultAction::Http500)
        .merchant("wu-soap12")
        .operation(Operation::Any);
    let response = client()
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&vec![down])
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 200);

    assert_eq!(wupay_ok(&sim, Wu::Soap12).await, 500);
    assert_eq!(wupay_ok(&sim, Wu::Soap12).await, 500);
    assert_eq!(
        wupay_ok(&sim, Wu::Soap11).await,
        200,
        "other merchants unaffected"
    );
    assert!(sim.paid().iter().all(|p| p.merchant == "wu-soap11"));

    let response = client()
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&Vec::<FaultRule>::new())
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 200);
    assert_eq!(
        wupay_ok(&sim, Wu::Soap12).await,
        200,
        "back once the rule is gone"
    );
    assert_eq!(total(&sim.rates(Some("wu-soap12"))), (3, 3, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_merchant_over_its_limit_is_throttled_as_each_provider_does() {
    let mut config = config();
    config.limits = vec![
        SimLimit {
            provider: Provider::WuPay,
            merchant: "wu-soap11".into(),
            rate_per_sec: 0.1,
            burst: 2,
        },
        SimLimit {
            provider: Provider::ShengPay,
            merchant: MCH_ID.into(),
            rate_per_sec: 0.1,
            burst: 1,
        },
    ];
    // A throttled request never reaches the rules: this one would otherwise answer 500.
    config.rules = vec![FaultRule::new(FaultAction::Http500).order_no("^LIMITED-")];
    let sim = start(config).await;
    let client = client();

    assert_eq!(wupay_ok(&sim, Wu::Soap11).await, 200);
    assert_eq!(wupay_ok(&sim, Wu::Soap11).await, 200);
    let params = wupay_params(&unique("LIMITED-"), &unique("W"), 1000, 100);
    let (status, _, body) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    assert_eq!((status, body.as_str()), (429, "Too Many Requests"));
    assert_eq!(
        wupay_ok(&sim, Wu::Soap12).await,
        200,
        "other merchants unlimited"
    );

    let first = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &unique("R"), 1000, 100),
    )
    .await;
    assert_eq!(text(&first, "resultCode"), "SUCCESS");
    let throttled = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &unique("R"), 1000, 100),
    )
    .await;
    assert_eq!(text(&throttled, "resultCode"), "FAIL");
    assert_eq!(text(&throttled, "errorCode"), "FREQUENCY_LIMITED");
    assert!(
        verifies(&throttled),
        "a throttled answer is signed like any other"
    );

    let soap11 = sim.rates(Some("wu-soap11"));
    let limited: u64 = soap11.iter().map(|w| w.limited).sum();
    assert_eq!((total(&soap11).0, limited), (3, 1), "{soap11:?}");
    let sp: u64 = sim.rates(Some(MCH_ID)).iter().map(|w| w.limited).sum();
    assert_eq!(sp, 1);
    let served: Vec<&str> = sim.calls().iter().map(|c| c.served()).collect();
    assert_eq!(
        served.iter().filter(|s| **s == "http500").count(),
        0,
        "{served:?}"
    );
    assert_eq!(
        sim.paid().len(),
        4,
        "two wu-soap11, one wu-soap12, one ShengPay"
    );
    sim.shutdown().await;
}

#[test]
fn limits_naming_an_unknown_merchant_are_refused() {
    let mut config = config();
    config.limits = vec![SimLimit {
        provider: Provider::WuPay,
        merchant: MCH_ID.into(),
        rate_per_sec: 1.0,
        burst: 1,
    }];
    let error = config
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("not a configured wupay merchant"), "{error}");
}
