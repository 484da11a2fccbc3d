//! Keeping the rfkey out of everything the WuPay client hands back.
//!
//! The rfkey is a shared secret sent in the clear inside the request, and a server (or a URL in
//! a transport error) may echo it. So every string that leaves the client (errors, provider
//! messages, raw bodies, the recorded request) is scrubbed of it in every form it could take on
//! the wire, and provider text quoted in our errors is bounded and escaped.

use super::client::WupayClient;
use super::request::percent_encode_into;
use super::response::quote;
use crate::provider::Outcome;

/// What the attempt record shows instead of the `rfkey`.
pub(super) const REDACTED: &str = "***";

impl WupayClient {
    /// Provider text fit to quote in an error: rfkey scrubbed first (so a cut cannot leave
    /// part of it), control characters escaped (one line, nothing a terminal or log reader
    /// interprets), then bounded.
    pub(super) fn excerpt(&self, text: &str) -> String {
        let scrubbed = self.scrub(text.trim().to_owned());
        let mut escaped = String::with_capacity(scrubbed.len());
        for c in scrubbed.chars() {
            if c.is_control() {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        quote(&escaped)
    }

    /// Replaces the rfkey, in every form it could appear in (plain, XML-escaped, URL-encoded),
    /// with `***`.
    pub(super) fn scrub(&self, s: String) -> String {
        let key = self.rfkey.expose();
        if key.is_empty() {
            return s;
        }
        let mut form = String::new();
        percent_encode_into(&mut form, key, true);
        let mut query = String::new();
        percent_encode_into(&mut query, key, false);
        let escaped = quick_xml::escape::escape(key);
        let mut out = s;
        for form in [key, escaped.as_ref(), form.as_str(), query.as_str()] {
            if out.contains(form) {
                out = out.replace(form, REDACTED);
            }
        }
        out
    }

    pub(super) fn scrub_outcome(&self, outcome: Outcome) -> Outcome {
        let s = |v: String| self.scrub(v);
        match outcome {
            Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                raw,
            } => Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                raw: s(raw),
            },
            Outcome::Declined { code, message, raw } => Outcome::Declined {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::RetryLater { code, message, raw } => Outcome::RetryLater {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::RequestRejected { code, message, raw } => Outcome::RequestRejected {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::NotSent { error } => Outcome::NotSent { error: s(error) },
            Outcome::MaybeDelivered { error, raw } => Outcome::MaybeDelivered {
                error: s(error),
                raw: raw.map(s),
            },
            Outcome::Unrecognised { result, raw } => Outcome::Unrecognised {
                result: s(result),
                raw: s(raw),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WupayBinding;
    use crate::provider::Provider;
    use crate::provider::wupay::test_support::*;

    #[tokio::test]
    async fn an_rfkey_echoed_by_the_provider_is_scrubbed_from_the_outcome() {
        let escaped = quick_xml::escape::escape(RFKEY).into_owned();
        let body = format!(
            r#"<string xmlns="http://tempuri.org/">FAIL:BAD_KEY:rfkey {escaped} is wrong</string>"#
        );
        let (base, server) = serve_once(200, "text/xml", body.into_bytes()).await;
        let m = merchant(WupayBinding::HttpPost, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        server.await.unwrap();
        match &record.outcome {
            Outcome::Declined { code, message, raw } => {
                assert_eq!(code, "BAD_KEY");
                assert_eq!(message, "rfkey *** is wrong");
                assert_no_rfkey(message);
                assert_no_rfkey(raw);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quoted_server_text_is_bounded_escaped_and_free_of_the_rfkey() {
        let long = format!("{}\u{1b}[31m{RFKEY} {}", "e".repeat(180), "z".repeat(5000));
        let got = typed_outcome(502, Some("text/html"), long.as_bytes());
        let Outcome::MaybeDelivered { error, .. } = got else {
            panic!("{got:?}");
        };
        assert!(error.chars().count() < 300, "{}", error.chars().count());
        assert!(!error.chars().any(char::is_control), "{error:?}");
        assert!(error.contains("\\u{1b}[31m"), "{error}");
        assert_no_rfkey(&error);
        // An XML body that does not parse says so, and still quotes the server.
        let got = typed_outcome(500, Some("text/xml"), b"<oops");
        let Outcome::MaybeDelivered { error, .. } = got else {
            panic!("{got:?}");
        };
        assert!(error.contains("<oops"), "{error}");
    }
}
