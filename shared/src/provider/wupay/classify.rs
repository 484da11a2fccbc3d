//! How a WuPay reply is classified into an [`Outcome`], and the merchant rules that read a
//! `RefundResult`.
//!
//! WuPay's answers are not signed, and most merchants are not idempotent on `refund_id`. A reply
//! classified [`Outcome::RequestRejected`] takes the job to `dead`/`provider_rejected_request`,
//! which an operator may replay: a resend. So only what says the service refused the request
//! *before running `Refund`* is RequestRejected; whatever might follow a refund that ran is
//! [`Outcome::MaybeDelivered`] (resent only to an idempotent merchant, otherwise left to
//! reconciliation). When in doubt, maybe delivered: a wrong "maybe" costs a day's wait for the
//! statement, a wrong "rejected" can pay twice. In order:
//!
//! | reply | outcome |
//! |---|---|
//! | SOAP 1.1 Fault whose `faultcode` resolves to `Client` (or `Client.*`) in the SOAP 1.1 envelope namespace, any prefix, any HTTP status | RequestRejected, code `Client[.*]` |
//! | SOAP 1.2 Fault whose `Code/Value` resolves to `Sender` in the SOAP 1.2 envelope namespace, any status | RequestRejected, code `Sender[/<subcode>]` |
//! | any other Fault: `Server`/`Receiver`, `VersionMismatch`, `MustUnderstand`, `DataEncodingUnknown`, a code in another namespace or none, an undeclared prefix, the other version's code | MaybeDelivered |
//! | `RefundResult` / `<string>` on a 2xx | by the merchant's `success_results` / `failure_prefixes`: Accepted, Declined or Unrecognised |
//! | `RefundResult` / `<string>` on any other status, 429 included | MaybeDelivered: the operation ran |
//! | 429 with no answer in its body | RetryLater |
//! | 401, 403, 404, 405, 410, 411, 413, 414, 415, 431 with no answer in its body | RequestRejected, code `HTTP_<status>`: refused at the door |
//! | any other status (2xx, 3xx, 400, 408, other 4xx, 5xx) with a body that is no readable answer | MaybeDelivered |
//!
//! `VersionMismatch` and `MustUnderstand` are, by the SOAP specs, raised before the body is
//! processed, yet they are not taken as proof: we send exactly the configured version and no
//! header blocks, so such a fault means that what answered is not behaving like the service we
//! configured (a gateway, another stack), and what it did with the body is unknown.
//!
//! A 3xx is not a refusal: "process the POST, then redirect" is a common pattern, and redirects
//! are never followed. 400 is not either: ASP.NET and any code behind it may answer 400 for
//! anything, including after the operation ran. The statuses listed above describe the target,
//! the method, the credentials or the request's size and media type, which a server decides
//! before dispatching to an operation. Even for those, a body that holds or resembles an answer
//! (a `RefundResult`, a SOAP envelope, the tempuri namespace, a bare result string the merchant's
//! rules recognise) makes the reply maybe delivered: the body is better evidence than the status.
//!
//! A MaybeDelivered error names the status and quotes the server's own text (bounded, control
//! characters escaped, rfkey scrubbed); only a body served as XML that does not parse is called
//! malformed XML.
//!
//! [`Outcome`]: crate::provider::Outcome
//! [`Outcome::RequestRejected`]: crate::provider::Outcome::RequestRejected
//! [`Outcome::MaybeDelivered`]: crate::provider::Outcome::MaybeDelivered

use super::client::WupayClient;
use super::response::{FaultClass, ParseError, Reply, parse_response};
use super::{SOAP11_NS, SOAP12_NS, TEMPURI_NS};
use crate::job::RefundRequest;
use crate::provider::Outcome;
use crate::provider::http::HttpReply;

/// What a `RefundResult` string means under a merchant's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultClass {
    Success,
    Failure { code: String, message: String },
    Unrecognised,
}

/// Maps a `RefundResult` under a merchant's rules. The trimmed value equal to one of
/// `success_results` is a success; one starting with a `failure_prefixes` entry (the longest
/// that matches) is a failure, its code and message read from the rest (see
/// [`split_failure`]); anything else is unrecognised.
pub fn map_result(
    result: &str,
    success_results: &[String],
    failure_prefixes: &[String],
) -> ResultClass {
    let value = result.trim();
    if success_results.iter().any(|s| s == value) {
        return ResultClass::Success;
    }
    let prefix = failure_prefixes
        .iter()
        .filter(|p| !p.is_empty() && value.starts_with(p.as_str()))
        .max_by_key(|p| p.len());
    match prefix {
        Some(p) => {
            let (code, message) = split_failure(&value[p.len()..]);
            ResultClass::Failure { code, message }
        }
        None => ResultClass::Unrecognised,
    }
}

/// Code and message from what follows a failure prefix: leading `:`, `|`, `-` and whitespace
/// are dropped; the code runs to the first `:`, `|` or whitespace (a code is one token, so
/// `FAIL:ORDER_NOT_REFUNDABLE insufficient balance` has code `ORDER_NOT_REFUNDABLE`); the
/// message is the rest, trimmed, less one leading `:` or `|`. An empty code becomes `FAIL`.
pub fn split_failure(rest: &str) -> (String, String) {
    let is_separator = |c: char| matches!(c, ':' | '|');
    let rest = rest.trim_start_matches(|c: char| is_separator(c) || c == '-' || c.is_whitespace());
    let end = rest
        .find(|c: char| is_separator(c) || c.is_whitespace())
        .unwrap_or(rest.len());
    let (code, after) = rest.split_at(end);
    let after = after.trim_start();
    let message = after.strip_prefix(is_separator).unwrap_or(after).trim();
    let code = if code.is_empty() { "FAIL" } else { code };
    (code.to_owned(), message.to_owned())
}

/// Statuses a server decides before dispatching to an operation: the target, the method, the
/// credentials, the request's size or media type. Not 400 (anything may answer it, at any
/// point) nor 3xx (a redirect may follow a request that was processed).
fn refused_at_the_door(status: u16) -> bool {
    matches!(
        status,
        401 | 403 | 404 | 405 | 410 | 411 | 413 | 414 | 415 | 431
    )
}

fn is_xml_media_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "text/xml" || media == "application/xml" || media.ends_with("+xml")
}

impl WupayClient {
    /// Classifies a reply that arrived whole, by the table in the module docs: the body first
    /// (a fault by its code whatever the status, a result counts only on a 2xx), then the
    /// status, which can refuse only when the body holds nothing like an answer.
    pub(super) fn outcome_of(&self, request: &RefundRequest, reply: &HttpReply) -> Outcome {
        let status = reply.status;
        let raw = String::from_utf8_lossy(&reply.body).into_owned();
        match parse_response(&reply.body, self.max_response_bytes) {
            Ok(Reply::Fault(f)) => match f.class {
                FaultClass::Sender => Outcome::RequestRejected {
                    code: match &f.subcode {
                        Some(sub) => format!("{}/{sub}", f.code),
                        None => f.code,
                    },
                    message: f.reason,
                    raw,
                },
                FaultClass::Receiver | FaultClass::Other => Outcome::MaybeDelivered {
                    error: format!(
                        "SOAP fault {} (HTTP {status}): {}",
                        self.excerpt(&f.code),
                        self.excerpt(&f.reason)
                    ),
                    raw: Some(raw),
                },
            },
            Ok(Reply::Result(value)) if (200..300).contains(&status) => {
                self.outcome_of_result(request, value, raw)
            }
            Ok(Reply::Result(value)) => Outcome::MaybeDelivered {
                error: format!(
                    "HTTP {status} with a result, so the operation ran: {}",
                    self.excerpt(&value)
                ),
                raw: Some(raw),
            },
            Err(e) => {
                let summary = self.summary(reply, &raw, &e);
                let answer_like = self.resembles_an_answer(&raw);
                match status {
                    429 if !answer_like => Outcome::RetryLater {
                        code: "HTTP_429".into(),
                        message: summary,
                        raw,
                    },
                    s if refused_at_the_door(s) && !answer_like => Outcome::RequestRejected {
                        code: format!("HTTP_{status}"),
                        message: summary,
                        raw,
                    },
                    _ => Outcome::MaybeDelivered {
                        error: summary,
                        raw: Some(raw),
                    },
                }
            }
        }
    }

    /// Whether a body that did not parse as a reply may still be one: a mangled envelope, a
    /// `RefundResult` cut short, a bare result string. Text matching is fine here because it
    /// only ever moves a reply towards "maybe delivered", never away from it.
    pub(super) fn resembles_an_answer(&self, raw: &str) -> bool {
        const MARKS: [&str; 5] = [
            "RefundResult",
            "RefundResponse",
            TEMPURI_NS,
            SOAP11_NS,
            SOAP12_NS,
        ];
        let m = &self.merchant;
        MARKS.iter().any(|mark| raw.contains(mark))
            || map_result(raw, &m.success_results, &m.failure_prefixes) != ResultClass::Unrecognised
    }

    /// `HTTP <status>: <what the server said>`. A body served as XML (or untyped and looking
    /// like it) that does not parse is reported with the parse error; any other body is quoted
    /// as the server's own text, which is what an operator needs to see.
    pub(super) fn summary(&self, reply: &HttpReply, raw: &str, error: &ParseError) -> String {
        let status = reply.status;
        if reply.body.is_empty() {
            return format!("HTTP {status}: empty body");
        }
        let xml = match reply.content_type.as_deref() {
            Some(ct) => is_xml_media_type(ct),
            None => raw
                .trim_start_matches('\u{FEFF}')
                .trim_start()
                .starts_with('<'),
        };
        if xml {
            format!("HTTP {status}: {error}; body: {}", self.excerpt(raw))
        } else {
            format!("HTTP {status}: {}", self.excerpt(raw))
        }
    }

    pub(super) fn outcome_of_result(
        &self,
        request: &RefundRequest,
        value: String,
        raw: String,
    ) -> Outcome {
        let m = &self.merchant;
        match map_result(&value, &m.success_results, &m.failure_prefixes) {
            ResultClass::Success => Outcome::Accepted {
                provider_refund_id: request.refund_no.clone(),
                refund_fee: request.refund_fee,
                settlement_refund_fee: request.refund_fee,
                coupon_refund_fee: 0,
                raw,
            },
            ResultClass::Failure { code, message } => Outcome::Declined { code, message, raw },
            ResultClass::Unrecognised => Outcome::Unrecognised { result: value, raw },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WupayBinding;
    use crate::provider::wupay::test_support::*;
    use crate::provider::wupay::*;

    fn strings(v: &[String]) -> Vec<String> {
        v.to_vec()
    }

    #[test]
    fn client_and_sender_faults_are_request_rejected_whatever_the_http_status() {
        for (file, code) in [
            ("soap11_fault_client.xml", "Client"),
            ("soap12_fault_sender.xml", "Sender"),
        ] {
            for status in [500, 200, 400] {
                match outcome(status, &fixture(file)) {
                    Outcome::RequestRejected {
                        code: c,
                        message,
                        raw,
                    } => {
                        assert_eq!(c, code);
                        assert!(message.starts_with("Server was unable to read request"));
                        assert!(raw.contains("Fault"));
                    }
                    other => panic!("{file} {status}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn server_and_receiver_faults_are_maybe_delivered() {
        for file in ["soap11_fault_server.xml", "soap12_fault_receiver.xml"] {
            match outcome(500, &fixture(file)) {
                Outcome::MaybeDelivered { error, raw } => {
                    assert!(error.contains("Object reference"), "{error}");
                    assert!(raw.is_some());
                }
                other => panic!("{file}: {other:?}"),
            }
        }
    }

    // ---- result mapping and HTTP status ------------------------------------------------

    #[test]
    fn default_rules_map_success_fail_and_anything_else() {
        let ok = strings(&["SUCCESS".into()]);
        let fail = strings(&["FAIL".into()]);
        assert_eq!(map_result("SUCCESS", &ok, &fail), ResultClass::Success);
        assert_eq!(map_result("  SUCCESS\n", &ok, &fail), ResultClass::Success);
        assert_eq!(map_result("success", &ok, &fail), ResultClass::Unrecognised);
        assert_eq!(
            map_result(
                "FAIL:ORDER_NOT_REFUNDABLE:order already refunded",
                &ok,
                &fail
            ),
            ResultClass::Failure {
                code: "ORDER_NOT_REFUNDABLE".into(),
                message: "order already refunded".into()
            }
        );
        assert_eq!(map_result("PENDING", &ok, &fail), ResultClass::Unrecognised);
        assert_eq!(map_result("", &ok, &fail), ResultClass::Unrecognised);
        assert_eq!(
            map_result("RETRY:BUSY:later", &ok, &fail),
            ResultClass::Unrecognised
        );
    }

    #[test]
    fn failure_code_and_message_are_read_from_what_follows_the_prefix() {
        let cases = [
            ("", "FAIL", ""),
            (":", "FAIL", ""),
            (":NOTENOUGH", "NOTENOUGH", ""),
            (":NOTENOUGH:", "NOTENOUGH", ""),
            ("|NOTENOUGH|balance too low", "NOTENOUGH", "balance too low"),
            (
                " - NOTENOUGH: balance: too low ",
                "NOTENOUGH",
                "balance: too low",
            ),
            (" NOTENOUGH", "NOTENOUGH", ""),
            ("::", "FAIL", ""),
            // Every leading separator goes; the code is the first word.
            (":: message only", "message", "only"),
            ("-X|a:b", "X", "a:b"),
        ];
        for (rest, code, message) in cases {
            assert_eq!(
                split_failure(rest),
                (code.to_owned(), message.to_owned()),
                "{rest:?}"
            );
        }
    }

    #[test]
    fn custom_success_results_and_failure_prefixes_come_from_config() {
        let ok = strings(&["0".into(), "OK".into()]);
        let fail = strings(&["ERR".into(), "E".into(), "退款失败".into()]);
        assert_eq!(map_result("0", &ok, &fail), ResultClass::Success);
        assert_eq!(map_result("OK", &ok, &fail), ResultClass::Success);
        assert_eq!(map_result("SUCCESS", &ok, &fail), ResultClass::Unrecognised);
        assert_eq!(map_result("FAIL:X", &ok, &fail), ResultClass::Unrecognised);
        // The longest matching prefix wins: `ERR:...` is not `E` + `RR:...`.
        assert_eq!(
            map_result("ERR:NOTENOUGH:x", &ok, &fail),
            ResultClass::Failure {
                code: "NOTENOUGH".into(),
                message: "x".into()
            }
        );
        assert_eq!(
            map_result("退款失败：订单不存在|ORDER_NOT_EXIST", &ok, &fail),
            ResultClass::Failure {
                code: "：订单不存在".into(),
                message: "ORDER_NOT_EXIST".into()
            }
        );
    }

    #[test]
    fn an_accepted_refund_carries_our_refund_no_and_the_requested_amount() {
        let body = soap_response(SoapVersion::Soap11, "SUCCESS").unwrap();
        assert_eq!(
            outcome(200, &body),
            Outcome::Accepted {
                provider_refund_id: "R2026112100000001".into(),
                refund_fee: 100,
                settlement_refund_fee: 100,
                coupon_refund_fee: 0,
                raw: String::from_utf8(body).unwrap(),
            }
        );
    }

    #[test]
    fn a_fail_result_is_declined_and_anything_else_unrecognised() {
        let body = soap_response(
            SoapVersion::Soap12,
            "FAIL:ORDER_NOT_REFUNDABLE:order already refunded",
        )
        .unwrap();
        assert!(matches!(
            outcome(200, &body),
            Outcome::Declined { code, message, .. }
                if code == "ORDER_NOT_REFUNDABLE" && message == "order already refunded"
        ));
        let body = string_response(" PROCESSING ").unwrap();
        assert!(matches!(
            outcome(200, &body),
            Outcome::Unrecognised { result, raw } if result == " PROCESSING " && raw.contains("PROCESSING")
        ));
    }

    #[test]
    fn custom_merchant_rules_drive_the_outcome() {
        let mut m = merchant(WupayBinding::HttpPost, "http://127.0.0.1:1/WuPay.asmx");
        m.success_results = vec!["00".into()];
        m.failure_prefixes = vec!["ERR".into()];
        let c = client_for(&m);
        let accepted = c.outcome_of(&request(), &reply(200, &string_response("00").unwrap()));
        assert_eq!(accepted.class(), "accepted");
        let declined = c.outcome_of(
            &request(),
            &reply(200, &string_response("ERR|E42|no").unwrap()),
        );
        assert!(matches!(declined, Outcome::Declined { code, .. } if code == "E42"));
        let unknown = c.outcome_of(
            &request(),
            &reply(200, &string_response("SUCCESS").unwrap()),
        );
        assert_eq!(unknown.class(), "unrecognised");
    }

    #[test]
    fn http_status_decides_when_the_body_is_no_fault() {
        let html = b"<html><body>Request format is unrecognized for URL unexpectedly ending in '/Refund'.</body></html>";
        assert!(matches!(
            outcome(500, html),
            Outcome::MaybeDelivered { raw: Some(_), .. }
        ));
        assert!(matches!(outcome(503, b""), Outcome::MaybeDelivered { .. }));
        assert!(matches!(
            outcome(200, b"not xml"),
            Outcome::MaybeDelivered { .. }
        ));
        assert!(matches!(outcome(200, b""), Outcome::MaybeDelivered { .. }));
        assert!(
            matches!(outcome(404, html), Outcome::RequestRejected { code, .. } if code == "HTTP_404")
        );
        // A redirect may follow a request that was processed.
        assert!(matches!(outcome(301, b""), Outcome::MaybeDelivered { .. }));
        assert!(
            matches!(outcome(429, b""), Outcome::RetryLater { code, .. } if code == "HTTP_429")
        );
        assert!(matches!(outcome(408, b""), Outcome::MaybeDelivered { .. }));
        // A result counts only on a 2xx.
        let success = soap_response(SoapVersion::Soap11, "SUCCESS").unwrap();
        assert!(matches!(
            outcome(500, &success),
            Outcome::MaybeDelivered { .. }
        ));
    }

    fn soap11_fault(code: &str) -> Vec<u8> {
        format!(
            r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><e:Fault><faultcode {code}</faultcode><faultstring>why</faultstring></e:Fault></e:Body></e:Envelope>"#
        )
        .into_bytes()
    }

    fn soap12_fault(value: &str) -> Vec<u8> {
        format!(
            r#"<S:Envelope xmlns:S="http://www.w3.org/2003/05/soap-envelope"><S:Body><S:Fault><S:Code><S:Value {value}</S:Value></S:Code><S:Reason><S:Text xml:lang="en">why</S:Text></S:Reason></S:Fault></S:Body></S:Envelope>"#
        )
        .into_bytes()
    }

    #[test]
    fn a_soap_fault_with_a_foreign_or_unknown_code_is_maybe_delivered() {
        let cases = [
            // An application's own namespace, whatever the local name.
            soap11_fault(r#"xmlns:app="urn:app">app:Client"#),
            // A prefix nobody declared: the code's namespace is unknown.
            soap11_fault(">nope:Client"),
            // No prefix and no default namespace: not in SOAP's namespace.
            soap11_fault(">Client"),
            // Not a SOAP code at all.
            soap11_fault(">e:Weird"),
            // SOAP 1.2's name in SOAP 1.1's namespace is not a SOAP 1.1 code.
            soap11_fault(">e:Sender"),
            // SOAP 1.1's code in a SOAP 1.2 envelope, bound to the 1.1 namespace.
            soap12_fault(r#"xmlns:o="http://schemas.xmlsoap.org/soap/envelope/">o:Client"#),
            soap12_fault(r#"xmlns:app="urn:app">app:Sender"#),
            soap12_fault(">S:Client"),
        ];
        for body in cases {
            for status in [500, 200, 400] {
                let got = outcome(status, &body);
                assert!(
                    matches!(got, Outcome::MaybeDelivered { raw: Some(_), .. }),
                    "{status} {}\n-> {got:?}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }

    #[test]
    fn version_mismatch_and_must_understand_faults_are_maybe_delivered() {
        for file in [
            "soap11_fault_version_mismatch.xml",
            "soap12_fault_must_understand.xml",
        ] {
            let got = outcome(500, &fixture(file));
            assert!(
                matches!(got, Outcome::MaybeDelivered { raw: Some(_), .. }),
                "{file}: {got:?}"
            );
        }
    }

    #[test]
    fn only_client_in_soap11s_namespace_and_sender_in_soap12s_are_request_rejected() {
        let rejected = [
            (soap11_fault(">e:Client"), "Client"),
            (
                soap11_fault(r#"xmlns:q="http://schemas.xmlsoap.org/soap/envelope/">q:Client"#),
                "Client",
            ),
            (
                soap11_fault(">e:Client.Authentication"),
                "Client.Authentication",
            ),
            // The default namespace is the envelope's: an unprefixed code resolves into it.
            (
                br#"<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body><Fault><faultcode>Client</faultcode><faultstring>why</faultstring></Fault></Body></Envelope>"#.to_vec(),
                "Client",
            ),
            (soap12_fault(">S:Sender"), "Sender"),
        ];
        for (body, code) in rejected {
            let got = outcome(500, &body);
            assert!(
                matches!(&got, Outcome::RequestRejected { code: c, .. } if c == code),
                "{}\n-> {got:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn a_result_body_on_a_3xx_or_4xx_is_maybe_delivered() {
        let bodies = [
            soap_response(SoapVersion::Soap11, "SUCCESS").unwrap(),
            soap_response(SoapVersion::Soap12, "FAIL:X:y").unwrap(),
            string_response("SUCCESS").unwrap(),
            string_response("PROCESSING").unwrap(),
        ];
        for status in [
            301, 302, 303, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429,
        ] {
            for body in &bodies {
                let got = outcome(status, body);
                assert!(
                    matches!(got, Outcome::MaybeDelivered { raw: Some(_), .. }),
                    "{status}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn a_mangled_answer_on_a_4xx_is_maybe_delivered() {
        let mut cut = soap_response(SoapVersion::Soap11, "SUCCESS").unwrap();
        cut.truncate(cut.len() - 40);
        for (ct, body) in [
            (Some("text/xml; charset=utf-8"), cut),
            (Some("text/plain"), b"SUCCESS".to_vec()),
            (None, b"FAIL:NOTENOUGH:low".to_vec()),
        ] {
            let got = typed_outcome(404, ct, &body);
            assert!(
                matches!(got, Outcome::MaybeDelivered { .. }),
                "{ct:?} {}: {got:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn a_redirect_or_a_4xx_that_does_not_say_nothing_ran_is_maybe_delivered() {
        let html = b"<html><body><h1>Bad Request</h1></body></html>";
        for (status, body) in [
            (301, &b""[..]),
            (302, &b""[..]),
            (303, &html[..]),
            (307, &b""[..]),
            (400, &html[..]),
            (400, &b""[..]),
            (409, &b""[..]),
            (422, &html[..]),
        ] {
            let got = typed_outcome(status, Some("text/html"), body);
            assert!(
                matches!(got, Outcome::MaybeDelivered { .. }),
                "{status}: {got:?}"
            );
        }
    }

    #[test]
    fn a_door_refusal_without_an_answer_is_request_rejected() {
        let iis = b"<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Strict//EN\"><html><head><title>404 - File or directory not found.</title></head><body>Server Error</body></html>";
        for (status, ct, body) in [
            (404, Some("text/html"), &iis[..]),
            (404, None, &b""[..]),
            (
                405,
                Some("text/html; charset=utf-8"),
                &b"<html>The HTTP verb POST is not allowed</html>"[..],
            ),
            (401, Some("text/html"), &b""[..]),
            (
                403,
                Some("text/html"),
                &b"<html>403 - Forbidden: Access is denied.</html>"[..],
            ),
            (415, Some("text/plain"), &b"Unsupported Media Type"[..]),
        ] {
            let got = typed_outcome(status, ct, body);
            let want = format!("HTTP_{status}");
            assert!(
                matches!(&got, Outcome::RequestRejected { code, .. } if *code == want),
                "{status}: {got:?}"
            );
        }
    }

    #[test]
    fn http_429_is_retry_later_unless_it_carries_an_answer() {
        assert!(
            matches!(outcome(429, b""), Outcome::RetryLater { code, .. } if code == "HTTP_429")
        );
        let got = outcome(429, &string_response("SUCCESS").unwrap());
        assert!(matches!(got, Outcome::MaybeDelivered { .. }), "{got:?}");
    }

    #[test]
    fn a_failure_code_ends_at_the_first_whitespace_and_the_message_is_the_rest() {
        let ok = strings(&["SUCCESS".into()]);
        assert_eq!(
            map_result(
                "FAIL:ORDER_NOT_REFUNDABLE insufficient balance",
                &ok,
                &strings(&["FAIL".into()])
            ),
            ResultClass::Failure {
                code: "ORDER_NOT_REFUNDABLE".into(),
                message: "insufficient balance".into()
            }
        );
        for (rest, code, message) in [
            (
                ":NOTENOUGH   balance  too low ",
                "NOTENOUGH",
                "balance  too low",
            ),
            (":NOTENOUGH\u{3000}余额不足", "NOTENOUGH", "余额不足"),
            (" NOTENOUGH : too low", "NOTENOUGH", "too low"),
            ("|NOTENOUGH | too low", "NOTENOUGH", "too low"),
            (":NOTENOUGH low: very", "NOTENOUGH", "low: very"),
        ] {
            assert_eq!(
                split_failure(rest),
                (code.to_owned(), message.to_owned()),
                "{rest:?}"
            );
        }
        // Configured prefixes, including one with a space in it, still lead.
        let fail = strings(&["ERR".into(), "退款 失败".into()]);
        assert_eq!(
            map_result("退款 失败 E42 余额不足", &ok, &fail),
            ResultClass::Failure {
                code: "E42".into(),
                message: "余额不足".into()
            }
        );
        assert_eq!(
            map_result("ERR E42 no money", &ok, &fail),
            ResultClass::Failure {
                code: "E42".into(),
                message: "no money".into()
            }
        );
    }

    #[test]
    fn a_plain_text_500_is_summarised_with_the_servers_own_text_not_as_malformed_xml() {
        let text = "System.InvalidOperationException: Request format is invalid.\r\n   at System.Web.Services.Protocols.HttpServerProtocol.ReadParameters()";
        let got = typed_outcome(500, Some("text/plain; charset=utf-8"), text.as_bytes());
        match got {
            Outcome::MaybeDelivered { error, raw } => {
                assert!(!error.contains("malformed XML"), "{error}");
                assert!(
                    error.starts_with(
                        "HTTP 500: System.InvalidOperationException: Request format is invalid.\\r\\n"
                    ),
                    "{error}"
                );
                assert_eq!(raw.as_deref(), Some(text));
            }
            other => panic!("{other:?}"),
        }
    }
}
