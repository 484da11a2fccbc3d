//! Each fault kind, observed from the client's side over real HTTP, and what it did (or did
//! not) pay.

mod sim_support;

use std::time::{Duration, Instant};

use refund_sim::{FaultAction, FaultRule, Provider, SimHandle};
use serde_json::{Map, Value};
use sim_support::*;

async fn sim_with(rules: Vec<FaultRule>) -> SimHandle {
    let mut config = config();
    config.rules = rules;
    start(config).await
}

/// The I/O error kind somewhere in an error's source chain.
fn io_error_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = e.source();
    }
    None
}

#[tokio::test]
async fn reset_closes_the_connection_without_a_response_and_pays_nothing() {
    let sim = sim_with(vec![FaultRule::new(FaultAction::Reset).order_no("^RST-")]).await;
    let refund = unique("R");

    let result = post_shengpay(
        &client(),
        &sim,
        signed(refund_fields(&unique("RST-"), &refund, 1000, 100)),
    )
    .await;

    let error = result.expect_err("a reset connection gives no HTTP response");
    assert!(!error.is_timeout() && error.status().is_none(), "{error:?}");
    assert!(
        io_error_kind(&error) == Some(std::io::ErrorKind::ConnectionReset),
        "a TCP reset, not a clean close: {error:?}"
    );
    assert!(sim.paid().is_empty());
    let calls = sim.calls_for(&refund);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].served(), "reset");
    assert!(!calls[0].paid());
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_response_pays_once_and_closes_the_connection_without_a_response() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::DropResponse)
            .order_no("^DROP-")
            .times(1),
    ])
    .await;
    let client = client();
    let (order, refund) = (unique("DROP-"), unique("R"));

    let lost = post_shengpay(
        &client,
        &sim,
        signed(refund_fields(&order, &refund, 1000, 100)),
    )
    .await;
    assert!(lost.is_err(), "the response must be dropped: {lost:?}");
    assert_eq!(sim.paid().len(), 1, "paid although the client saw an error");

    let retry = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
    assert_eq!(text(&retry, "resultCode"), "SUCCESS");
    assert_eq!(text(&retry, "refundId"), sim.paid()[0].provider_refund_id);
    assert_eq!(
        sim.paid().len(),
        1,
        "the retry replays, it does not pay again"
    );
    let served: Vec<_> = sim.calls_for(&refund).iter().map(|c| c.served()).collect();
    assert_eq!(served, ["drop_response", "replayed"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn hang_holds_the_request_until_the_client_times_out() {
    let sim = sim_with(vec![FaultRule::new(FaultAction::Hang).order_no("^HANG-")]).await;
    let client = client_with_timeout(Duration::from_millis(700));
    let started = Instant::now();

    let result = post_shengpay(
        &client,
        &sim,
        signed(refund_fields(&unique("HANG-"), &unique("R"), 1000, 100)),
    )
    .await;

    let error = result.expect_err("no answer");
    assert!(error.is_timeout(), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(sim.paid().is_empty());
    // Shutdown must not wait for the hang to run out.
    let stopping = Instant::now();
    sim.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_hang_ends_when_the_client_closes_its_connection() {
    use tokio::io::AsyncWriteExt as _;
    let sim = sim_with(vec![FaultRule::new(FaultAction::Hang).order_no("^HANG-")]).await;
    let body = signed(refund_fields(&unique("HANG-"), &unique("R"), 1000, 100));
    let mut raw = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connect");
    let request = format!(
        "POST /api/v1/payment/refund HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(request.as_bytes()).await.expect("send");

    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.calls().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.calls()[0].served(), "hang");
    assert_eq!(sim.open_connections(), 1);
    drop(raw);

    // Abandoned hangs must not pile up until hang_max_ms.
    while sim.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.open_connections(), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn http500_answers_500_and_pays_nothing() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::Http500).order_no("^E500-"),
    ])
    .await;

    let response = post_shengpay(
        &client(),
        &sim,
        signed(refund_fields(&unique("E500-"), &unique("R"), 1000, 100)),
    )
    .await
    .expect("an HTTP response");

    assert_eq!(response.status(), 500);
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn binary_body_answers_502_with_bytes_that_are_not_text_and_pays_nothing() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::BinaryBody).order_no("^EBIN-"),
    ])
    .await;

    let response = post_shengpay(
        &client(),
        &sim,
        signed(refund_fields(&unique("EBIN-"), &unique("R"), 1000, 100)),
    )
    .await
    .expect("an HTTP response");

    assert_eq!(response.status(), 502);
    let body = response.bytes().await.expect("a body");
    assert!(body.contains(&0) && std::str::from_utf8(&body).is_err());
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn decline_answers_a_signed_definitive_fail_with_the_rule_code() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::Decline)
            .order_no("^DECL-")
            .code("TRADE_OVERDUE"),
    ])
    .await;

    let response = shengpay_refund(
        &client(),
        &sim,
        refund_fields(&unique("DECL-"), &unique("R"), 1000, 100),
    )
    .await;

    assert_eq!(text(&response, "returnCode"), "SUCCESS");
    assert_eq!(text(&response, "resultCode"), "FAIL");
    assert_eq!(text(&response, "errorCode"), "TRADE_OVERDUE");
    assert_eq!(
        text(&response, "errorCodeDes"),
        "order is past its refund period"
    );
    assert!(verifies(&response));
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn retry_later_twice_then_the_third_attempt_is_paid() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::RetryLater)
            .order_no("^BUSY-")
            .times(2),
    ])
    .await;
    let client = client();
    let (order, refund) = (unique("BUSY-"), unique("R"));

    let mut results = Vec::new();
    for _ in 0..3 {
        let response =
            shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
        assert!(verifies(&response));
        results.push((
            text(&response, "resultCode").to_owned(),
            text(&response, "errorCode").to_owned(),
        ));
    }

    assert_eq!(
        results,
        [
            ("FAIL".to_owned(), "SYSTEMERROR".to_owned()),
            ("FAIL".to_owned(), "SYSTEMERROR".to_owned()),
            ("SUCCESS".to_owned(), String::new()),
        ]
    );
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_signature_pays_but_the_response_signature_fails_to_verify() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::BadSignature)
            .order_no("^BADSIG-")
            .times(1),
    ])
    .await;
    let client = client();
    let (order, refund) = (unique("BADSIG-"), unique("R"));

    let tampered = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
    assert_eq!(text(&tampered, "resultCode"), "SUCCESS");
    assert!(!verifies(&tampered), "the signature must not verify");
    assert_eq!(sim.paid().len(), 1);

    let retry = shengpay_refund(&client, &sim, refund_fields(&order, &refund, 1000, 100)).await;
    assert!(verifies(&retry));
    assert_eq!(text(&retry, "refundId"), text(&tampered, "refundId"));
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn latency_delays_the_answer_then_handles_normally() {
    let sim = sim_with(vec![FaultRule::latency(400).order_no("^SLOW-")]).await;
    let started = Instant::now();

    let response = shengpay_refund(
        &client(),
        &sim,
        refund_fields(&unique("SLOW-"), &unique("R"), 1000, 100),
    )
    .await;

    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(text(&response, "resultCode"), "SUCCESS");
    assert_eq!(sim.calls()[0].latency_ms, 400);
    assert_eq!(sim.calls()[0].served(), "paid");
    sim.shutdown().await;
}

#[tokio::test]
async fn rules_match_by_provider_and_merchant_too() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::Http500)
            .provider(Provider::ShengPay)
            .merchant("10000002"),
    ])
    .await;
    let client = client();
    let mut other = refund_fields(&unique("O"), &unique("R"), 1000, 100);
    other.insert("mchId".into(), "10000002".into());
    other.insert("appId".into(), "app-10000002".into());

    let hit = post_shengpay(&client, &sim, signed(other))
        .await
        .expect("HTTP");
    let miss = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &unique("R"), 1000, 100),
    )
    .await;

    assert_eq!(hit.status(), 500);
    assert_eq!(text(&miss, "resultCode"), "SUCCESS");
    sim.shutdown().await;
}

#[tokio::test]
async fn rules_are_replaced_at_run_time_over_http() {
    let sim = start(config()).await;
    let client = client();
    let rules = serde_json::json!([
        {"name": "decline all", "order_no": "^RT-", "action": "decline", "code": "NOTENOUGH"}
    ]);

    let set = client
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&rules)
        .send()
        .await
        .expect("HTTP");
    assert_eq!(set.status(), 200);
    let listed: Value = client
        .get(format!("{}/_sim/rules", sim.base_url()))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(listed, rules);
    let response = shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("RT-"), &unique("R"), 10, 1),
    )
    .await;
    assert_eq!(text(&response, "errorCode"), "NOTENOUGH");

    let bad = client
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&serde_json::json!([{"action": "explode"}]))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(bad.status(), 400);
    let invalid_regex = client
        .post(format!("{}/_sim/rules", sim.base_url()))
        .json(&serde_json::json!([{"action": "reset", "order_no": "("}]))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(invalid_regex.status(), 400);
    assert_eq!(sim.rules().len(), 1, "a refused rule set changes nothing");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_rate_below_one_fires_reproducibly_for_a_seed() {
    let run = |seed| async move {
        let mut config = config();
        config.seed = seed;
        config.rules = vec![FaultRule::new(FaultAction::Http500).rate(0.5)];
        let sim = start(config).await;
        let client = client();
        let mut statuses = Vec::new();
        for i in 0..12 {
            let order = format!("O-rate-{i}");
            let response =
                post_shengpay(&client, &sim, signed(refund_fields(&order, &order, 10, 1)))
                    .await
                    .expect("HTTP");
            statuses.push(response.status().as_u16());
        }
        sim.shutdown().await;
        statuses
    };
    let first = run(11).await;
    assert_eq!(first, run(11).await);
    assert!(first.contains(&500) && first.contains(&200), "{first:?}");
}

#[tokio::test]
async fn the_calls_endpoint_counts_per_refund_and_per_served_kind() {
    let sim = sim_with(vec![
        FaultRule::new(FaultAction::Http500)
            .order_no("^CNT-")
            .times(1),
    ])
    .await;
    let client = client();
    let (order, refund) = (unique("CNT-"), unique("R"));
    for _ in 0..3 {
        let _ = post_shengpay(&client, &sim, signed(refund_fields(&order, &refund, 10, 1))).await;
    }

    let summary: Map<String, Value> = client
        .get(format!("{}/_sim/calls?full=1", sim.base_url()))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");

    assert_eq!(summary["total"], 3);
    assert_eq!(summary["by_served"]["http500"], 1);
    assert_eq!(summary["by_served"]["paid"], 1);
    assert_eq!(summary["by_served"]["replayed"], 1);
    assert_eq!(summary["by_refund_no"][&refund]["total"], 3);
    let calls = summary["calls"].as_array().expect("full log");
    assert_eq!(calls[0]["fault"], "http500");
    assert_eq!(calls[0]["order_no"], order.as_str());
    assert_eq!(calls[1]["outcome"], "paid");
    assert_eq!(calls[1]["merchant"], MCH_ID);
    sim.shutdown().await;
}
