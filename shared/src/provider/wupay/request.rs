//! The WuPay request: the thirteen `Refund` parameters in the service's order and their
//! encoding for each binding (SOAP 1.1 and 1.2 envelopes, HTTP POST form, HTTP GET query).
//!
//! XML is written from quick-xml events, every value escaped by the writer, and a value XML
//! 1.0 cannot carry is refused here, before anything is sent, so such a refund is provably not
//! sent. The reply writers (`soap_response`, `string_response`) live here too: they are the
//! same writer, used by the simulator and the tests to answer like the service.

use std::io;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::writer::Writer;

use super::{SOAP_ACTION, SoapVersion, TEMPURI_NS};
use crate::config::{Secret, WupayBinding, WupayMerchant};
use crate::job::RefundRequest;

/// `Content-Type` of an HTTP POST (form) request. The charset is stated because ASP.NET
/// decodes a form without one by its configured `requestEncoding`, which need not be UTF-8,
/// and our percent-encoded bytes are UTF-8.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
const XSD_NS: &str = "http://www.w3.org/2001/XMLSchema";

/// The `Refund` parameters, in the order the service declares them (the seed's help page).
pub const PARAM_NAMES: [&str; 13] = [
    "refund_id",
    "order_id",
    "pay_nd",
    "money",
    "refund_fee",
    "auth_type",
    "rec_organ",
    "rec_device",
    "rec_man",
    "reason",
    "rfkey",
    "cpnId",
    "area",
];

/// A request we refuse to build. Never carries a parameter's value (one of them is the rfkey).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("parameter `{name}` contains a control character{}; not sent", codepoint_note(*.codepoint))]
    ControlCharacter {
        name: String,
        codepoint: Option<u32>,
    },
    #[error("parameter `{name}` contains a character XML 1.0 cannot carry{}; not sent", codepoint_note(*.codepoint))]
    NotXmlChar {
        name: String,
        codepoint: Option<u32>,
    },
    #[error("the request has no `wupay` fields, which a WuPay refund requires")]
    MissingWupayFields,
    #[error("writing XML: {0}")]
    Xml(String),
}

fn codepoint_note(codepoint: Option<u32>) -> String {
    codepoint.map_or_else(String::new, |c| format!(" (U+{c:04X})"))
}

/// The `Refund` parameters for a request, in order, with the merchant's rfkey.
pub fn refund_params(
    request: &RefundRequest,
    merchant: &WupayMerchant,
    rfkey: &Secret,
) -> Result<Vec<(&'static str, String)>, EncodeError> {
    params_with_rfkey(request, merchant, rfkey.expose())
}

pub(super) fn params_with_rfkey(
    request: &RefundRequest,
    merchant: &WupayMerchant,
    rfkey: &str,
) -> Result<Vec<(&'static str, String)>, EncodeError> {
    let w = request
        .wupay
        .as_ref()
        .ok_or(EncodeError::MissingWupayFields)?;
    let values = [
        request.refund_no.clone(),
        request.order_no.clone(),
        w.pay_nd.clone(),
        request.total_fee.to_string(),
        request.refund_fee.to_string(),
        w.auth_type.clone(),
        w.rec_organ.clone(),
        w.rec_device.clone(),
        w.rec_man.clone(),
        request.reason.clone().unwrap_or_default(),
        rfkey.to_owned(),
        merchant.cpn_id.clone(),
        merchant.area.clone(),
    ];
    Ok(PARAM_NAMES.into_iter().zip(values).collect())
}

/// Refuses a value XML 1.0 cannot carry or that would be silently altered on the way
/// (`\r` and `\t` are normalised away by XML parsers): every `char::is_control` character, and
/// the non-characters U+FFFE and U+FFFF. The error names the parameter, never its value, and
/// leaves out the offending code point for the rfkey.
pub fn check_value(name: &str, value: &str) -> Result<(), EncodeError> {
    let codepoint = |c: char| (name != "rfkey").then_some(u32::from(c));
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(EncodeError::ControlCharacter {
            name: name.to_owned(),
            codepoint: codepoint(c),
        });
    }
    if let Some(c) = value.chars().find(|c| matches!(c, '\u{FFFE}' | '\u{FFFF}')) {
        return Err(EncodeError::NotXmlChar {
            name: name.to_owned(),
            codepoint: codepoint(c),
        });
    }
    Ok(())
}

fn check_params<N: AsRef<str>>(params: &[(N, String)]) -> Result<(), EncodeError> {
    params
        .iter()
        .try_for_each(|(name, value)| check_value(name.as_ref(), value))
}

/// The SOAP request envelope, shaped exactly like the seed's: XML declaration, envelope with
/// `xsi`, `xsd` and the SOAP prefix declared, two-space indentation, `\n` line ends, and a
/// final `\n`.
pub fn soap_envelope<N: AsRef<str>>(
    version: SoapVersion,
    params: &[(N, String)],
) -> Result<Vec<u8>, EncodeError> {
    check_params(params)?;
    let mut refund = BytesStart::new("Refund");
    refund.push_attribute(("xmlns", TEMPURI_NS));
    write_envelope(version, refund, |w| {
        for (name, value) in params {
            w.create_element(name.as_ref())
                .write_text_content(BytesText::new(value))?;
        }
        Ok(())
    })
}

/// A SOAP reply carrying `result`, as the service writes it: for the simulator and tests.
pub fn soap_response(version: SoapVersion, result: &str) -> Result<Vec<u8>, EncodeError> {
    check_value("RefundResult", result)?;
    let mut response = BytesStart::new("RefundResponse");
    response.push_attribute(("xmlns", TEMPURI_NS));
    write_envelope(version, response, |w| {
        w.create_element("RefundResult")
            .write_text_content(BytesText::new(result))?;
        Ok(())
    })
}

fn write_envelope(
    version: SoapVersion,
    operation: BytesStart<'_>,
    content: impl FnOnce(&mut Writer<Vec<u8>>) -> io::Result<()>,
) -> Result<Vec<u8>, EncodeError> {
    let prefix = version.prefix();
    let envelope_name = format!("{prefix}:Envelope");
    let body_name = format!("{prefix}:Body");
    let operation_name = operation.name().as_ref().to_owned();
    let mut envelope = BytesStart::new(envelope_name.as_str());
    envelope.push_attribute(("xmlns:xsi", XSI_NS));
    envelope.push_attribute(("xmlns:xsd", XSD_NS));
    envelope.push_attribute((format!("xmlns:{prefix}").as_str(), version.namespace()));

    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let written: io::Result<()> = (|| {
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
        w.write_event(Event::Start(envelope))?;
        w.write_event(Event::Start(BytesStart::new(body_name.as_str())))?;
        w.write_event(Event::Start(operation))?;
        content(&mut w)?;
        w.write_event(Event::End(BytesEnd::new(operation_name.as_str())))?;
        w.write_event(Event::End(BytesEnd::new(body_name.as_str())))?;
        w.write_event(Event::End(BytesEnd::new(envelope_name.as_str())))?;
        Ok(())
    })();
    written.map_err(|e| EncodeError::Xml(e.to_string()))?;
    let mut out = w.into_inner();
    // A final line end, so the body equals a text file holding it (the golden fixtures).
    out.push(b'\n');
    Ok(out)
}

/// The `<string xmlns="http://tempuri.org/">` reply of the HTTP GET/POST bindings: for the
/// simulator and tests.
pub fn string_response(result: &str) -> Result<Vec<u8>, EncodeError> {
    check_value("string", result)?;
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let written: io::Result<()> = (|| {
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
        w.create_element("string")
            .with_attribute(("xmlns", TEMPURI_NS))
            .write_text_content(BytesText::new(result))?;
        Ok(())
    })();
    written.map_err(|e| EncodeError::Xml(e.to_string()))?;
    let mut out = w.into_inner();
    out.push(b'\n');
    Ok(out)
}

/// The HTTP POST body: `application/x-www-form-urlencoded`, parameters in order (space as `+`,
/// everything but `A-Za-z0-9*-._` percent-encoded as UTF-8, as browsers and .NET write forms).
pub fn form_body<N: AsRef<str>>(params: &[(N, String)]) -> Result<String, EncodeError> {
    check_params(params)?;
    Ok(join_encoded(params, true))
}

/// The HTTP GET query (without `?`), parameters in order, everything but `A-Za-z0-9*-._~`
/// percent-encoded as UTF-8. Spaces are `%20` rather than `+`: unambiguous to any decoder.
pub fn query_string<N: AsRef<str>>(params: &[(N, String)]) -> Result<String, EncodeError> {
    check_params(params)?;
    Ok(join_encoded(params, false))
}

fn join_encoded<N: AsRef<str>>(params: &[(N, String)], form: bool) -> String {
    let mut out = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        percent_encode_into(&mut out, name.as_ref(), form);
        out.push('=');
        percent_encode_into(&mut out, value, form);
    }
    out
}

pub(super) fn percent_encode_into(out: &mut String, s: &str, form: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => out.push(char::from(b)),
            // `*` is left as is in both, which keeps the redacted `***` readable in a query.
            b'*' => out.push('*'),
            b'~' if !form => out.push('~'),
            b' ' if form => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0F)]));
            }
        }
    }
}

/// Where a binding sends `Refund`: SOAP posts to the service address itself, HTTP POST and
/// GET to `{base_url}/Refund`.
pub fn endpoint(base_url: &str, binding: WupayBinding) -> String {
    match binding {
        WupayBinding::Soap11 | WupayBinding::Soap12 => base_url.to_owned(),
        WupayBinding::HttpPost | WupayBinding::HttpGet => {
            format!("{}/Refund", base_url.trim_end_matches('/'))
        }
    }
}

/// One request, ready to send: what goes on the wire and what the attempt record shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest {
    pub method: &'static str,
    pub url: String,
    pub content_type: Option<&'static str>,
    pub soap_action: Option<String>,
    pub body: Option<Vec<u8>>,
}

/// Encodes the parameters for a binding.
pub fn encode_request<N: AsRef<str>>(
    base_url: &str,
    binding: WupayBinding,
    params: &[(N, String)],
) -> Result<EncodedRequest, EncodeError> {
    let url = endpoint(base_url, binding);
    Ok(match binding {
        WupayBinding::Soap11 => EncodedRequest {
            method: "POST",
            url,
            content_type: Some(SoapVersion::Soap11.content_type()),
            soap_action: Some(format!("\"{SOAP_ACTION}\"")),
            body: Some(soap_envelope(SoapVersion::Soap11, params)?),
        },
        WupayBinding::Soap12 => EncodedRequest {
            method: "POST",
            url,
            content_type: Some(SoapVersion::Soap12.content_type()),
            soap_action: None,
            body: Some(soap_envelope(SoapVersion::Soap12, params)?),
        },
        WupayBinding::HttpPost => EncodedRequest {
            method: "POST",
            url,
            content_type: Some(FORM_CONTENT_TYPE),
            soap_action: None,
            body: Some(form_body(params)?.into_bytes()),
        },
        WupayBinding::HttpGet => EncodedRequest {
            method: "GET",
            url: format!("{url}?{}", query_string(params)?),
            content_type: None,
            soap_action: None,
            body: None,
        },
    })
}

impl EncodedRequest {
    /// What the attempt record keeps: the body as sent, or the URL for GET (whose query is
    /// the request).
    pub(super) fn record(&self) -> String {
        match &self.body {
            Some(body) => String::from_utf8_lossy(body).into_owned(),
            None => self.url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::provider::wupay::test_support::*;
    use crate::provider::wupay::*;

    /// A one-line fixture without the line end that ends the file.
    fn fixture_line(name: &str) -> String {
        let text = String::from_utf8(fixture(name)).unwrap();
        text.strip_suffix('\n').unwrap().to_owned()
    }

    /// The seed's placeholders: `string` everywhere, `int` for the two SOAP integers.
    fn seed_params(ints: &str) -> Vec<(&'static str, String)> {
        PARAM_NAMES
            .iter()
            .map(|&n| {
                let v = if matches!(n, "money" | "refund_fee") {
                    ints
                } else {
                    "string"
                };
                (n, v.to_owned())
            })
            .collect()
    }

    // ---- request encoding --------------------------------------------------------------

    #[test]
    fn the_soap11_envelope_for_the_seed_placeholders_equals_the_seed_byte_for_byte() {
        let ours = soap_envelope(SoapVersion::Soap11, &seed_params("int")).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(fixture("soap11_request.xml")).unwrap()
        );
    }

    #[test]
    fn the_soap12_envelope_for_the_seed_placeholders_equals_the_seed_byte_for_byte() {
        let ours = soap_envelope(SoapVersion::Soap12, &seed_params("int")).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(fixture("soap12_request.xml")).unwrap()
        );
    }

    #[test]
    fn the_http_post_form_for_the_seed_placeholders_equals_the_seed() {
        assert_eq!(
            form_body(&seed_params("string")).unwrap(),
            fixture_line("http_post_form.txt")
        );
    }

    #[test]
    fn the_http_get_url_for_the_seed_placeholders_equals_the_seed_request_line() {
        let req = encode_request(
            "http://czvkqwpaydpservices.pay.wuerp.com/WuPay.asmx",
            WupayBinding::HttpGet,
            &seed_params("string"),
        )
        .unwrap();
        assert_eq!(
            req.url,
            format!(
                "http://czvkqwpaydpservices.pay.wuerp.com/WuPay.asmx/Refund?{}",
                fixture_line("http_get_query.txt")
            )
        );
        assert_eq!(req.method, "GET");
        assert_eq!(req.body, None);
    }

    #[test]
    fn soap_posts_to_the_service_address_and_http_bindings_to_its_refund_path() {
        let base = "http://h/WuPay.asmx";
        assert_eq!(endpoint(base, WupayBinding::Soap11), base);
        assert_eq!(endpoint(base, WupayBinding::Soap12), base);
        assert_eq!(
            endpoint(base, WupayBinding::HttpPost),
            "http://h/WuPay.asmx/Refund"
        );
        assert_eq!(
            endpoint("http://h/WuPay.asmx/", WupayBinding::HttpGet),
            "http://h/WuPay.asmx/Refund"
        );
    }

    #[test]
    fn each_binding_carries_its_content_type_and_soap_action() {
        let p = seed_params("1");
        let s11 = encode_request("http://h/WuPay.asmx", WupayBinding::Soap11, &p).unwrap();
        assert_eq!(s11.content_type, Some("text/xml; charset=utf-8"));
        assert_eq!(
            s11.soap_action.as_deref(),
            Some("\"http://tempuri.org/Refund\"")
        );
        let s12 = encode_request("http://h/WuPay.asmx", WupayBinding::Soap12, &p).unwrap();
        assert_eq!(
            s12.content_type,
            Some("application/soap+xml; charset=utf-8; action=\"http://tempuri.org/Refund\"")
        );
        assert_eq!(s12.soap_action, None);
        let post = encode_request("http://h/WuPay.asmx", WupayBinding::HttpPost, &p).unwrap();
        assert_eq!(
            post.content_type,
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        assert_eq!(post.method, "POST");
    }

    #[test]
    fn form_and_query_encode_reserved_and_non_ascii_characters() {
        let p = vec![
            ("reason", "a b&c=d+é*~/%".to_owned()),
            ("area", "华东".to_owned()),
        ];
        assert_eq!(
            form_body(&p).unwrap(),
            "reason=a+b%26c%3Dd%2B%C3%A9*%7E%2F%25&area=%E5%8D%8E%E4%B8%9C"
        );
        assert_eq!(
            query_string(&p).unwrap(),
            "reason=a%20b%26c%3Dd%2B%C3%A9*~%2F%25&area=%E5%8D%8E%E4%B8%9C"
        );
    }

    #[test]
    fn parameters_come_in_the_service_order_from_the_request_and_the_merchant() {
        let m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        let p = refund_params(&request(), &m, &Secret::new(RFKEY)).unwrap();
        let expected = [
            ("refund_id", "R2026112100000001"),
            ("order_id", "O2026112100000001"),
            ("pay_nd", "P0001"),
            ("money", "1000"),
            ("refund_fee", "100"),
            ("auth_type", "1"),
            ("rec_organ", "S01"),
            ("rec_device", "T01"),
            ("rec_man", "op7"),
            ("reason", "customer returned goods"),
            ("rfkey", RFKEY),
            ("cpnId", "CPN9"),
            ("area", "华东"),
        ];
        let got: Vec<(&str, &str)> = p.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_missing_reason_is_sent_as_an_empty_parameter() {
        let mut r = request();
        r.reason = None;
        let m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        let p = refund_params(&r, &m, &Secret::new(RFKEY)).unwrap();
        assert_eq!(p[9], ("reason", String::new()));
        let xml = String::from_utf8(soap_envelope(SoapVersion::Soap11, &p).unwrap()).unwrap();
        assert!(xml.contains("\n      <reason></reason>\n"), "{xml}");
    }

    #[test]
    fn markup_in_values_is_escaped_and_reads_back_unchanged() {
        let mut p = seed_params("1");
        p[9].1 = "<b>&amp; \"quoted\" 'x' ]]> </reason>".into();
        let xml = soap_envelope(SoapVersion::Soap11, &p).unwrap();
        let text = String::from_utf8(xml.clone()).unwrap();
        assert!(!text.contains("<b>"), "{text}");
        assert!(text.contains("&lt;b&gt;&amp;amp;"), "{text}");
        let back = parse_refund_request(&xml, MAX).unwrap();
        assert_eq!(back[9].1, p[9].1);
    }

    #[test]
    fn control_characters_are_refused_naming_the_parameter() {
        for c in [
            '\t', '\r', '\n', '\u{0}', '\u{7}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}',
        ] {
            let mut p = seed_params("1");
            p[9].1 = format!("bad{c}value");
            let e = soap_envelope(SoapVersion::Soap12, &p).unwrap_err();
            assert_eq!(
                e,
                EncodeError::ControlCharacter {
                    name: "reason".into(),
                    codepoint: Some(u32::from(c))
                }
            );
            assert!(e.to_string().contains("`reason`"), "{e}");
            assert!(form_body(&p).is_err());
            assert!(query_string(&p).is_err());
        }
    }

    #[test]
    fn a_refused_rfkey_is_named_without_any_trace_of_its_value() {
        let mut p = seed_params("1");
        p[10].1 = "secret\u{1}".into();
        let e = form_body(&p).unwrap_err();
        assert_eq!(
            e,
            EncodeError::ControlCharacter {
                name: "rfkey".into(),
                codepoint: None
            }
        );
        assert!(!e.to_string().contains("secret"));
        assert!(!e.to_string().contains("U+"));
    }

    #[test]
    fn non_characters_xml_cannot_carry_are_refused() {
        let mut p = seed_params("1");
        p[6].1 = "x\u{FFFF}".into();
        assert!(matches!(
            soap_envelope(SoapVersion::Soap11, &p),
            Err(EncodeError::NotXmlChar { name, .. }) if name == "rec_organ"
        ));
    }

    #[test]
    fn our_own_reply_writers_produce_the_seed_replies() {
        assert_eq!(
            soap_response(SoapVersion::Soap11, "string").unwrap(),
            fixture("soap11_response.xml")
        );
        assert_eq!(
            soap_response(SoapVersion::Soap12, "string").unwrap(),
            fixture("soap12_response.xml")
        );
        assert_eq!(
            string_response("string").unwrap(),
            fixture("string_response.xml")
        );
    }

    proptest! {
        #[test]
        fn any_non_control_values_round_trip_through_both_envelopes(
            values in prop::collection::vec(xml_value(), 13),
            soap12 in any::<bool>(),
        ) {
            let params: Vec<(&str, String)> = PARAM_NAMES.iter().copied().zip(values).collect();
            let version = if soap12 { SoapVersion::Soap12 } else { SoapVersion::Soap11 };
            let xml = soap_envelope(version, &params).unwrap();
            let back = parse_refund_request(&xml, usize::MAX).unwrap();
            let expected: Vec<(String, String)> =
                params.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect();
            prop_assert_eq!(back, expected);
        }

        #[test]
        fn values_with_a_control_character_are_refused_by_every_encoder(
            before in xml_value(),
            control in any::<char>().prop_filter("control", |c| c.is_control()),
            after in xml_value(),
            index in 0..13usize,
        ) {
            let mut params = seed_params("1");
            params[index].1 = format!("{before}{control}{after}");
            let name = PARAM_NAMES[index];
            let named = |r: Result<(), EncodeError>| matches!(
                r, Err(EncodeError::ControlCharacter { name: n, .. }) if n == name
            );
            prop_assert!(named(soap_envelope(SoapVersion::Soap11, &params).map(drop)));
            prop_assert!(named(soap_envelope(SoapVersion::Soap12, &params).map(drop)));
            prop_assert!(named(form_body(&params).map(drop)));
            prop_assert!(named(query_string(&params).map(drop)));
        }
    }
}
