//! The simulated WuPay `.asmx` service over its four bindings, its faults and its results.

mod sim_support;

use refund_sim::{FaultAction, FaultRule, Provider};
use sim_support::*;

const TEXT_XML: &str = "text/xml; charset=utf-8";

#[tokio::test]
async fn all_four_bindings_pay_and_answer_success() {
    let sim = start(config()).await;
    let client = client();

    for binding in Wu::ALL {
        let refund = unique("W");
        let params = wupay_params(&unique("O"), &refund, 1000, 100);
        let (status, content_type, body) = wupay_call(&client, &sim, binding, &params)
            .await
            .expect("HTTP response");

        assert_eq!(status, 200, "{binding:?}: {body}");
        let (element, expected_type) = match binding {
            Wu::Soap11 => ("RefundResult", TEXT_XML),
            Wu::Soap12 => ("RefundResult", "application/soap+xml; charset=utf-8"),
            Wu::Post | Wu::Get => ("string", TEXT_XML),
        };
        assert_eq!(content_type, expected_type, "{binding:?}");
        assert_eq!(
            xml_text(&body, element).as_deref(),
            Some("SUCCESS"),
            "{binding:?}: {body}"
        );
        let paid = sim.paid();
        let last = paid.last().expect("a payment");
        assert_eq!(last.refund_no, refund);
        assert_eq!(last.provider, Provider::WuPay);
        assert_eq!(last.merchant, binding.merchant());
        assert_eq!(last.settlement_refund_fee, 100, "WuPay has no coupons");
        assert!(last.provider_refund_id.starts_with("WU"));
    }
    assert_eq!(sim.paid().len(), 4);
    let bindings: Vec<_> = sim.calls().iter().map(|c| c.binding).collect();
    assert_eq!(bindings, ["soap11", "soap12", "http_post", "http_get"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_get_and_post_result_is_the_documented_string_document() {
    let sim = start(config()).await;
    let params = wupay_params(&unique("O"), &unique("W"), 1000, 100);

    let (_, _, body) = wupay_call(&client(), &sim, Wu::Get, &params)
        .await
        .expect("HTTP");

    assert_eq!(
        body,
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<string xmlns=\"http://tempuri.org/\">SUCCESS</string>"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_rfkey_is_a_client_fault_and_pays_nothing() {
    let sim = start(config()).await;
    let client = client();
    let mut params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
    set_param(&mut params, "rfkey", "wrong");

    let (status, _, soap11) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    assert_eq!(
        xml_text(&soap11, "faultcode").as_deref(),
        Some("soap:Client"),
        "{soap11}"
    );
    assert!(soap11.contains("http://schemas.xmlsoap.org/soap/envelope/"));

    let (status, _, soap12) = wupay_call(&client, &sim, Wu::Soap12, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    assert_eq!(
        xml_text(&soap12, "Value").as_deref(),
        Some("soap12:Sender"),
        "{soap12}"
    );
    assert!(xml_text(&soap12, "Text").is_some_and(|t| t.contains("rfkey")));

    for binding in [Wu::Post, Wu::Get] {
        let (status, content_type, body) = wupay_call(&client, &sim, binding, &params)
            .await
            .expect("HTTP");
        assert_eq!(status, 500);
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert!(body.contains("invalid rfkey"), "{body}");
    }
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_cpn_id_or_area_is_a_client_fault() {
    let sim = start(config()).await;
    let mut params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
    set_param(&mut params, "area", "A99");

    let (status, _, body) = wupay_call(&client(), &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");

    assert_eq!(status, 500);
    assert_eq!(xml_text(&body, "faultcode").as_deref(), Some("soap:Client"));
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeat_succeeds_without_paying_and_changed_amounts_are_refused() {
    let sim = start(config()).await;
    let client = client();
    let (order, refund) = (unique("O"), unique("W"));
    let params = wupay_params(&order, &refund, 1000, 100);
    wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");

    let (_, _, again) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    let changed = wupay_params(&order, &refund, 1000, 150);
    let (status, _, refused) = wupay_call(&client, &sim, Wu::Soap11, &changed)
        .await
        .expect("HTTP");

    assert_eq!(xml_text(&again, "RefundResult").as_deref(), Some("SUCCESS"));
    assert_eq!(status, 200);
    assert_eq!(
        xml_text(&refused, "RefundResult").as_deref(),
        Some("FAIL:PARAMS_ERROR:refund_id reused with different amounts")
    );
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn over_refunding_an_order_is_declined() {
    let sim = start(config()).await;
    let client = client();
    let order = unique("O");
    wupay_call(
        &client,
        &sim,
        Wu::Post,
        &wupay_params(&order, &unique("W"), 1000, 900),
    )
    .await
    .expect("HTTP");

    let over = wupay_params(&order, &unique("W"), 1000, 101);
    let (_, _, body) = wupay_call(&client, &sim, Wu::Post, &over)
        .await
        .expect("HTTP");

    let result = xml_text(&body, "string").expect("a result");
    assert!(result.starts_with("FAIL:REFUND_AMOUNT_ERROR:"), "{result}");
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_decline_rule_answers_fail_code_message() {
    let mut config = config();
    config.rules = vec![FaultRule::new(FaultAction::Decline).order_no("^DECL-")];
    let sim = start(config).await;
    let params = wupay_params(&unique("DECL-"), &unique("W"), 1000, 100);

    let (status, _, body) = wupay_call(&client(), &sim, Wu::Soap12, &params)
        .await
        .expect("HTTP");

    assert_eq!(status, 200);
    assert_eq!(
        xml_text(&body, "RefundResult").as_deref(),
        Some("FAIL:ORDER_NOT_REFUNDABLE:order is not refundable")
    );
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn retry_later_is_a_server_fault_and_pays_nothing() {
    let mut config = config();
    config.rules = vec![FaultRule::new(FaultAction::RetryLater).provider(Provider::WuPay)];
    let sim = start(config).await;
    let client = client();
    let params = wupay_params(&unique("O"), &unique("W"), 1000, 100);

    let (status, _, soap11) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    assert_eq!(
        xml_text(&soap11, "faultcode").as_deref(),
        Some("soap:Server")
    );
    assert!(xml_text(&soap11, "faultstring").is_some_and(|t| t.contains("SYSTEMERROR")));

    let (status, _, soap12) = wupay_call(&client, &sim, Wu::Soap12, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    assert_eq!(
        xml_text(&soap12, "Value").as_deref(),
        Some("soap12:Receiver")
    );

    let (status, _, get) = wupay_call(&client, &sim, Wu::Get, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 500);
    assert!(get.contains("SYSTEMERROR"), "{get}");
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_signature_pays_but_answers_unparseable_xml() {
    let mut config = config();
    config.rules = vec![
        FaultRule::new(FaultAction::BadSignature)
            .order_no("^BAD-")
            .times(1),
    ];
    let sim = start(config).await;
    let client = client();
    let params = wupay_params(&unique("BAD-"), &unique("W"), 1000, 100);

    let (status, _, broken) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    assert_eq!(status, 200);
    assert_eq!(
        xml_text(&broken, "RefundResult"),
        None,
        "must not parse: {broken}"
    );
    assert_eq!(sim.paid().len(), 1);

    let (_, _, retry) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");
    assert_eq!(xml_text(&retry, "RefundResult").as_deref(), Some("SUCCESS"));
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_and_drop_response_close_wupay_connections_too() {
    let mut config = config();
    config.rules = vec![
        FaultRule::new(FaultAction::Reset).order_no("^RST-"),
        FaultRule::new(FaultAction::DropResponse).order_no("^DROP-"),
    ];
    let sim = start(config).await;
    let client = client();

    let reset = wupay_call(
        &client,
        &sim,
        Wu::Get,
        &wupay_params(&unique("RST-"), &unique("W"), 10, 1),
    )
    .await;
    assert!(reset.is_err(), "{reset:?}");
    assert!(sim.paid().is_empty());
    let dropped = wupay_call(
        &client,
        &sim,
        Wu::Soap12,
        &wupay_params(&unique("DROP-"), &unique("W"), 10, 1),
    )
    .await;
    assert!(dropped.is_err(), "{dropped:?}");
    assert_eq!(sim.paid().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_soap_action_or_missing_get_parameter_is_refused() {
    let sim = start(config()).await;
    let client = client();
    let base = sim.wupay_url("wu-soap11").expect("merchant");
    let params = wupay_params(&unique("O"), &unique("W"), 10, 1);

    let response = client
        .post(&base)
        .header("content-type", "text/xml; charset=utf-8")
        .header("SOAPAction", "\"http://tempuri.org/Other\"")
        .body(soap_envelope(&params, false))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 500);
    let body = response.text().await.expect("body");
    assert_eq!(xml_text(&body, "faultcode").as_deref(), Some("soap:Client"));

    let response = client
        .get(format!("{base}/Refund"))
        .query(&params[..3])
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 500);
    assert!(
        response
            .text()
            .await
            .expect("body")
            .contains("Missing parameter: money.")
    );
    assert!(sim.paid().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn values_with_markup_are_parsed_and_results_escaped() {
    let sim = start(config()).await;
    let client = client();
    let refund = unique("W");
    // Characters that must be escaped in XML survive the SOAP round trip unchanged.
    let params = wupay_params("O<&>1", &refund, 10, 1);

    let (status, _, body) = wupay_call(&client, &sim, Wu::Soap11, &params)
        .await
        .expect("HTTP");

    assert_eq!(status, 200, "{body}");
    assert_eq!(sim.paid()[0].order_no, "O<&>1");
    sim.shutdown().await;
}

#[tokio::test]
async fn get_and_post_refuse_markup_with_a_request_validation_500_and_pay_nothing() {
    let sim = start(config()).await;
    let client = client();
    for (binding, collection) in [(Wu::Post, "Request.Form"), (Wu::Get, "Request.QueryString")] {
        for (name, value) in [
            ("reason", "returned <b>goods</b>"),
            ("rec_man", "op&#55;"),
            ("pay_nd", "<!--P"),
            ("reason", "</"),
            ("reason", "<?x"),
        ] {
            let mut params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
            set_param(&mut params, name, value);
            let (status, content_type, body) = wupay_call(&client, &sim, binding, &params)
                .await
                .expect("HTTP");
            assert_eq!(status, 500, "{binding:?} {name}={value:?}: {body}");
            assert!(content_type.starts_with("text/plain"), "{content_type}");
            assert!(
                body.starts_with("System.Web.HttpRequestValidationException")
                    && body.contains(&format!(
                        "A potentially dangerous {collection} value was detected from the client ({name}="
                    )),
                "{binding:?}: {body}"
            );
        }
    }
    assert!(sim.paid().is_empty(), "{:?}", sim.paid());
    sim.shutdown().await;
}

#[tokio::test]
async fn soap_takes_what_request_validation_refuses_and_get_post_take_harmless_brackets() {
    let sim = start(config()).await;
    let client = client();
    for binding in [Wu::Soap11, Wu::Soap12] {
        let mut params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
        set_param(&mut params, "reason", "returned <b>goods</b> AT&#38;T");
        let (status, _, body) = wupay_call(&client, &sim, binding, &params)
            .await
            .expect("HTTP");
        assert_eq!(status, 200, "{binding:?}: {body}");
        assert_eq!(xml_text(&body, "RefundResult").as_deref(), Some("SUCCESS"));
    }
    for binding in [Wu::Post, Wu::Get] {
        let mut params = wupay_params(&unique("O"), &unique("W"), 1000, 100);
        // `<` before a space, a digit or a non-ASCII letter, and `&` not before `#`, pass
        // ASP.NET's check.
        set_param(&mut params, "reason", "a < b, 1<2, <中, Q&A & #1");
        let (status, _, body) = wupay_call(&client, &sim, binding, &params)
            .await
            .expect("HTTP");
        assert_eq!(status, 200, "{binding:?}: {body}");
        assert_eq!(xml_text(&body, "string").as_deref(), Some("SUCCESS"));
    }
    assert_eq!(sim.paid().len(), 4);
    sim.shutdown().await;
}
