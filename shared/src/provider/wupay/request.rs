//! What we send: the `Refund` operation's parameters in their order, and their encoding for
//! each binding (SOAP 1.1 and 1.2 envelopes written with an XML writer, the HTTP POST form, the
//! HTTP GET query), every value checked before it is written. The simulator's side of the same
//! wire (reading a request, writing a response) lives here too, so both ends share one encoding.

use std::io;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::writer::Writer;

use crate::config::{Secret, WupayBinding, WupayMerchant};
use crate::job::RefundRequest;

use super::*;

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

pub(super) fn check_params<N: AsRef<str>>(params: &[(N, String)]) -> Result<(), EncodeError> {
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

pub(super) fn write_envelope(
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

pub(super) fn join_encoded<N: AsRef<str>>(params: &[(N, String)], form: bool) -> String {
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

/// The bindings whose parameters ASP.NET reads as a form or query string, through request
/// validation.
pub(super) fn is_form_binding(binding: WupayBinding) -> bool {
    matches!(binding, WupayBinding::HttpPost | WupayBinding::HttpGet)
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
