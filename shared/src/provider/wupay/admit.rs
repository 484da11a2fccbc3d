//! What the service's stack refuses before `Refund` runs, refused at intake instead.
//!
//! [`WupayClient::admit`] refuses, at intake, what WuPay's ASP.NET stack would refuse before
//! running `Refund`, so such a request is rejected naming its field instead of being sent and
//! ending in a 500 (maybe delivered, `outcome_unknown`): `total_fee` (`money`) and `refund_fee`
//! above 2,147,483,647 (they are 32-bit `int`s in the service's signature), and, on the HTTP GET
//! and POST bindings only, values that ASP.NET request validation refuses
//! ([`request_validation_trigger`]). The same check runs again before each send.
//!
//! [`WupayClient::admit`]: crate::provider::Provider::admit

use crate::config::WupayBinding;
use crate::job::{ErrorCode, RefundRequest, Rejection};

/// Where ASP.NET request validation would find `value` dangerous, if anywhere: the two
/// characters at fault. On the HTTP GET and POST bindings every form or query value goes
/// through it (`CrossSiteScriptingValidation.IsDangerousString`) when the service reads its
/// parameters, and a hit is an `HttpRequestValidationException`, HTTP 500, before `Refund`
/// runs: `<` followed by a letter, `!`, `/` or `?`, and `&#`. .NET checks for ASCII letters;
/// any letter is refused here, in case a stack differs: refusing a value the service would have
/// taken costs a rejected request at intake, sending one it refuses costs a job stuck as maybe
/// delivered.
pub fn request_validation_trigger(value: &str) -> Option<&str> {
    value.char_indices().find_map(|(i, c)| {
        let rest = &value[i + c.len_utf8()..];
        let next = rest.chars().next()?;
        let dangerous = match c {
            '<' => next.is_alphabetic() || matches!(next, '!' | '/' | '?'),
            '&' => next == '#',
            _ => false,
        };
        dangerous.then(|| &value[i..i + c.len_utf8() + next.len_utf8()])
    })
}

/// The bindings whose parameters ASP.NET reads as a form or query string, through request
/// validation.
pub(super) fn is_form_binding(binding: WupayBinding) -> bool {
    matches!(binding, WupayBinding::HttpPost | WupayBinding::HttpGet)
}

/// Refuses what WuPay's ASP.NET stack would refuse before running `Refund` (see the module
/// docs): sent, such a request would come back as a 500 that cannot be told from a failure
/// after paying.
pub(super) fn admit_request(
    binding: WupayBinding,
    request: &RefundRequest,
) -> Result<(), Rejection> {
    for (field, param, fee) in [
        ("total_fee", "money", request.total_fee),
        ("refund_fee", "refund_fee", request.refund_fee),
    ] {
        if i32::try_from(fee).is_err() {
            return Err(Rejection::new(
                ErrorCode::AmountTooLargeForProvider,
                field,
                format!(
                    "{fee} fen does not fit WuPay's `{param}`, a 32-bit int in its service (at most {}): its stack would refuse the request before Refund runs",
                    i32::MAX
                ),
            ));
        }
    }
    if !is_form_binding(binding) {
        return Ok(());
    }
    let Some(w) = &request.wupay else {
        return Err(Rejection::new(
            ErrorCode::MissingField,
            "wupay",
            "required when provider is wupay",
        ));
    };
    let fields = [
        ("refund_no", request.refund_no.as_str()),
        ("order_no", request.order_no.as_str()),
        ("wupay.pay_nd", w.pay_nd.as_str()),
        ("wupay.auth_type", w.auth_type.as_str()),
        ("wupay.rec_organ", w.rec_organ.as_str()),
        ("wupay.rec_device", w.rec_device.as_str()),
        ("wupay.rec_man", w.rec_man.as_str()),
        ("reason", request.reason.as_deref().unwrap_or_default()),
    ];
    for (field, value) in fields {
        if let Some(at) = request_validation_trigger(value) {
            return Err(Rejection::new(
                ErrorCode::UnsafeForBinding,
                field,
                format!(
                    "contains {at:?}, which ASP.NET request validation on WuPay's {} binding refuses (HTTP 500, HttpRequestValidationException) before Refund runs; only the SOAP bindings carry it",
                    binding.as_str()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Secret;
    use crate::provider::http;
    use crate::provider::wupay::test_support::*;
    use crate::provider::wupay::*;
    use crate::provider::{Outcome, Provider};

    fn request_with_reason(reason: &str) -> RefundRequest {
        let mut r = request();
        r.reason = Some(reason.to_owned());
        r
    }

    #[test]
    fn amounts_above_wupays_32_bit_int_are_refused_at_admission_naming_the_field() {
        for binding in [
            WupayBinding::Soap11,
            WupayBinding::Soap12,
            WupayBinding::HttpPost,
            WupayBinding::HttpGet,
        ] {
            let c = client_for(&merchant(binding, "http://h/WuPay.asmx"));
            let mut r = request();
            r.total_fee = 2_147_483_647;
            r.refund_fee = 2_147_483_647;
            assert_eq!(c.admit(&r), Ok(()), "{binding:?}: i32::MAX fits");

            r.total_fee = 2_147_483_648;
            r.refund_fee = 100;
            let e = c.admit(&r).unwrap_err();
            assert_eq!(e.field, "total_fee", "{binding:?}");
            assert!(
                e.reason.contains("32-bit int") && e.reason.contains("2147483647"),
                "{}",
                e.reason
            );

            // Only reachable for a request that skipped validation (refund_fee > total_fee),
            // but the field is named all the same.
            r.total_fee = 100;
            r.refund_fee = 3_000_000_000;
            let e = c.admit(&r).unwrap_err();
            assert_eq!(e.field, "refund_fee", "{binding:?}");
            assert!(e.reason.contains("32-bit int"), "{}", e.reason);
        }
    }

    #[test]
    fn markup_asp_net_request_validation_refuses_is_refused_at_admission_on_http_get_and_post() {
        for binding in [WupayBinding::HttpPost, WupayBinding::HttpGet] {
            let c = client_for(&merchant(binding, "http://h/WuPay.asmx"));
            for bad in [
                "<b>", "x<script", "<!--", "</x", "<?xml", "AT&#38;T", "&#x41;", "a<Z",
            ] {
                let e = c.admit(&request_with_reason(bad)).unwrap_err();
                assert_eq!(e.field, "reason", "{binding:?} {bad:?}");
                assert!(
                    e.reason.contains("request validation") && e.reason.contains("SOAP"),
                    "{}",
                    e.reason
                );
            }
            for name in [
                "wupay.pay_nd",
                "wupay.auth_type",
                "wupay.rec_organ",
                "wupay.rec_device",
                "wupay.rec_man",
            ] {
                let mut r = request();
                if let Some(w) = r.wupay.as_mut() {
                    let field = match name {
                        "wupay.pay_nd" => &mut w.pay_nd,
                        "wupay.auth_type" => &mut w.auth_type,
                        "wupay.rec_organ" => &mut w.rec_organ,
                        "wupay.rec_device" => &mut w.rec_device,
                        _ => &mut w.rec_man,
                    };
                    *field = "op<i>7".into();
                }
                assert_eq!(
                    c.admit(&r).map_err(|e| e.field),
                    Err(name.to_owned()),
                    "{binding:?}"
                );
            }
        }
    }

    #[test]
    fn the_soap_bindings_admit_markup_and_harmless_brackets_pass_everywhere() {
        for binding in [WupayBinding::Soap11, WupayBinding::Soap12] {
            let c = client_for(&merchant(binding, "http://h/WuPay.asmx"));
            assert_eq!(c.admit(&request_with_reason("<b>AT&#38;T</b>")), Ok(()));
        }
        for binding in [WupayBinding::HttpPost, WupayBinding::HttpGet] {
            let c = client_for(&merchant(binding, "http://h/WuPay.asmx"));
            for fine in ["a < b", "1<2", "x>y", "Q&A", "& #", "<", "&", "<<3", "<中"] {
                // `<中`: .NET's check is for ASCII letters only; we refuse any letter, to be
                // safe, so this one is the exception.
                if fine == "<中" {
                    assert!(c.admit(&request_with_reason(fine)).is_err());
                } else {
                    assert_eq!(c.admit(&request_with_reason(fine)), Ok(()), "{fine:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_request_admission_refuses_is_never_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/WuPay.asmx", listener.local_addr().unwrap());
        let mut over = request();
        over.total_fee = 2_147_483_648;
        let markup = request_with_reason("<b>bold</b>");
        for (binding, r) in [
            (WupayBinding::Soap11, &over),
            (WupayBinding::HttpGet, &over),
            (WupayBinding::HttpPost, &markup),
            (WupayBinding::HttpGet, &markup),
        ] {
            let record = client_for(&merchant(binding, &base)).refund(call(r)).await;
            match &record.outcome {
                Outcome::NotSent { error } => assert!(
                    error.contains("`total_fee`") || error.contains("`reason`"),
                    "{error}"
                ),
                other => panic!("{binding:?}: {other:?}"),
            }
            assert_eq!(record.http_status, None);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), listener.accept())
                .await
                .is_err(),
            "nothing may reach the provider"
        );
    }

    #[test]
    fn configured_values_request_validation_refuses_are_refused_at_start_on_http_get_and_post() {
        let cfg = http_config();
        let http = http::build_client(&cfg).unwrap();
        for binding in [WupayBinding::HttpPost, WupayBinding::HttpGet] {
            let mut m = merchant(binding, "http://h/WuPay.asmx");
            m.cpn_id = "<CPN>".into();
            let e = WupayClient::with_rfkey(
                &m,
                "wupay.merchants[0]",
                Secret::new(RFKEY),
                http.clone(),
                &cfg,
            )
            .unwrap_err();
            assert!(e.to_string().contains("wupay.merchants[0].cpn_id"), "{e}");
            let m = merchant(binding, "http://h/WuPay.asmx");
            let e = WupayClient::with_rfkey(
                &m,
                "wupay.merchants[0]",
                Secret::new("k&#ey"),
                http.clone(),
                &cfg,
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("rfkey_file") && !e.to_string().contains("k&#ey"),
                "{e}"
            );
        }
        let mut m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        m.cpn_id = "<CPN>".into();
        assert!(
            WupayClient::with_rfkey(&m, "wupay.merchants[0]", Secret::new(RFKEY), http, &cfg)
                .is_ok()
        );
    }
}
