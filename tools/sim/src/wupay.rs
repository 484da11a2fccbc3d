//! The simulated WuPay service: an ASP.NET `.asmx` clone with one operation, `Refund`, in
//! namespace `http://tempuri.org/`, over its four bindings (SOAP 1.1, SOAP 1.2, HTTP POST form,
//! HTTP GET), as the seed's help page shows them.
//!
//! Requests are parsed by namespace and local name (any prefix), DOCTYPE refused; responses are
//! written with quick-xml's writer, every value escaped. Results are opaque strings:
//! - `SUCCESS`: paid now, or paid before with the same amounts;
//! - `FAIL:<CODE>:<message>`: a definitive decline (`REFUND_AMOUNT_ERROR`, `PARAMS_ERROR` for a
//!   refund_id reused with different amounts, `LACK_PARAMS`, or a rule's `decline` code).
//!
//! WuPay's contract has no "try again later" result, so a `retry_later` rule is served the way
//! the real service fails transiently: a SOAP `soap:Server` / `soap12:Receiver` fault with HTTP
//! 500 (HTTP GET/POST: HTTP 500 with an ASP.NET-style plain-text exception). Request problems
//! (wrong rfkey, cpnId or area, unreadable XML) are `soap:Client` / `soap12:Sender` faults
//! (GET/POST: HTTP 500 plain text, as ASP.NET does). WuPay has no signatures either, so a
//! `bad_signature` rule pays and then answers HTTP 200 with truncated, unparseable XML.
//!
//! On the HTTP GET and POST bindings ASP.NET request validation runs when the service reads its
//! parameters: a value with `<` before an ASCII letter, `!`, `/` or `?`, or with `&#`, is
//! answered HTTP 500 `HttpRequestValidationException` and `Refund` never runs. SOAP bodies are
//! not validated, so the same values pass there.

use std::collections::HashMap;
use std::io;

use hyper::StatusCode;
use quick_xml::Writer;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesDecl, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

use super::Provider;
use super::calls::Outcome;
use super::faults::{FaultAction, Fired, fault_code};
use super::ledger::{Decision, RefundAttempt};
use super::server::{Reply, SimState, lock};

const TEMPURI: &str = "http://tempuri.org/";
const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
const XSD_NS: &str = "http://www.w3.org/2001/XMLSchema";
pub(crate) const SOAP_ACTION: &str = "http://tempuri.org/Refund";

/// The operation's parameters, in the order the help page lists them.
pub(crate) const PARAMS: [&str; 13] = [
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binding {
    Soap11,
    Soap12,
    HttpPost,
    HttpGet,
}

impl Binding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Binding::Soap11 => "soap11",
            Binding::Soap12 => "soap12",
            Binding::HttpPost => "http_post",
            Binding::HttpGet => "http_get",
        }
    }

    fn envelope_ns(self) -> &'static str {
        match self {
            Binding::Soap12 => SOAP12_NS,
            _ => SOAP11_NS,
        }
    }

    fn is_soap(self) -> bool {
        matches!(self, Binding::Soap11 | Binding::Soap12)
    }

    fn content_type(self) -> &'static str {
        match self {
            Binding::Soap12 => "application/soap+xml; charset=utf-8",
            _ => "text/xml; charset=utf-8",
        }
    }
}

/// Parameter values by name; absent parameters are absent (SOAP) or an error (GET/POST).
#[derive(Debug, Default)]
pub(crate) struct WuParams {
    values: HashMap<&'static str, String>,
}

impl WuParams {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

/// Parses form or query parameters (HTTP POST / GET bindings). As ASP.NET does, every
/// parameter must be present (it may be empty) and the ints must convert.
pub(crate) fn parse_form(encoded: &[u8]) -> Result<WuParams, String> {
    let mut params = WuParams::default();
    for (key, value) in url::form_urlencoded::parse(encoded) {
        if let Some(name) = PARAMS.iter().find(|p| **p == key) {
            params
                .values
                .entry(name)
                .or_insert_with(|| value.into_owned());
        }
    }
    for name in PARAMS {
        if params.get(name).is_none() {
            return Err(format!(
                "System.InvalidOperationException: Missing parameter: {name}."
            ));
        }
    }
    for name in ["money", "refund_fee"] {
        let value = params.get(name).unwrap_or("");
        if value.trim().parse::<i32>().is_err() {
            return Err(format!(
                "System.ArgumentException: Cannot convert {} to System.Int32.\r\nParameter name: type",
                printable(value)
            ));
        }
    }
    Ok(params)
}

/// Parses a SOAP envelope of `binding`'s version. Errors become Client/Sender faults.
pub(crate) fn parse_soap(body: &[u8], binding: Binding) -> Result<WuParams, String> {
    let unreadable = |why: &str| format!("Server was unable to read request. ---> {why}");
    let text = std::str::from_utf8(body).map_err(|_| unreadable("request is not UTF-8"))?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().expand_empty_elements = true;
    let envelope_ns = binding.envelope_ns();
    let mut params = WuParams::default();
    let mut depth = 0usize;
    let mut in_body = false;
    let mut in_refund = false;
    let mut seen_refund = false;
    let mut current: Option<&'static str> = None;
    loop {
        let (ns, event) = reader
            .read_resolved_event()
            .map_err(|e| unreadable(&format!("There is an error in XML document: {e}")))?;
        let ns_is = |want: &str| matches!(&ns, ResolveResult::Bound(n) if n.0 == want);
        match event {
            Event::DocType(_) => return Err(unreadable("DTD is prohibited in this XML document")),
            Event::Start(start) => {
                depth += 1;
                if depth > 32 {
                    return Err(unreadable("XML document nested too deeply"));
                }
                let local = start.local_name();
                let local = local.as_ref();
                match depth {
                    1 if !(ns_is(envelope_ns) && local == "Envelope") => {
                        return Err(format!(
                            "Possible SOAP version mismatch: Envelope namespace was unexpected. Expecting {envelope_ns}."
                        ));
                    }
                    2 => in_body = ns_is(envelope_ns) && local == "Body",
                    3 if in_body => {
                        if !(ns_is(TEMPURI) && local == "Refund") || seen_refund {
                            return Err(
                                "Server did not recognize the value of the request element."
                                    .to_owned(),
                            );
                        }
                        in_refund = true;
                        seen_refund = true;
                    }
                    4 if in_refund && ns_is(TEMPURI) => {
                        current = PARAMS.iter().copied().find(|p| *p == local);
                        if let Some(name) = current
                            && params.values.insert(name, String::new()).is_some()
                        {
                            return Err(unreadable(&format!("element {name} appears twice")));
                        }
                    }
                    5.. if current.is_some() => {
                        return Err(unreadable("unexpected element inside a parameter"));
                    }
                    _ => {}
                }
            }
            Event::End(_) => {
                match depth {
                    4 => current = None,
                    3 => in_refund = false,
                    2 => in_body = false,
                    _ => {}
                }
                depth = depth.saturating_sub(1);
            }
            Event::Text(t) if depth == 4 => {
                if let Some(name) = current {
                    push(&mut params, name, &t.xml10_content());
                }
            }
            Event::CData(t) if depth == 4 => {
                if let Some(name) = current {
                    push(&mut params, name, &t.xml10_content());
                }
            }
            Event::GeneralRef(r) if depth == 4 => {
                if let Some(name) = current {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        Ok(None) => resolve_predefined_entity(&r)
                            .map(str::to_owned)
                            .ok_or_else(|| unreadable(&format!("unknown entity &{};", &*r)))?,
                        Err(e) => return Err(unreadable(&e.to_string())),
                    };
                    push(&mut params, name, &resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !seen_refund {
        return Err(unreadable("no Refund element in the SOAP Body"));
    }
    for name in ["money", "refund_fee"] {
        if let Some(value) = params.get(name)
            && value.trim().parse::<i32>().is_err()
        {
            return Err(unreadable(&format!(
                "There is an error in XML document: {name} is not an int"
            )));
        }
    }
    Ok(params)
}

/// ASP.NET's `CrossSiteScriptingValidation.IsDangerousString`: `<` followed by an ASCII
/// letter, `!`, `/` or `?`, or `&` followed by `#`.
fn is_dangerous(value: &str) -> bool {
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        let next = chars.peek().copied();
        let hit = match (c, next) {
            ('<', Some(n)) => n.is_ascii_alphabetic() || matches!(n, '!' | '/' | '?'),
            ('&', Some('#')) => true,
            _ => false,
        };
        if hit {
            return true;
        }
    }
    false
}

/// The exception text ASP.NET writes for the first parameter request validation refuses, if
/// any. Like .NET, it quotes the value cut to 15 characters.
fn request_validation(binding: Binding, params: &WuParams) -> Option<String> {
    let collection = match binding {
        Binding::HttpGet => "Request.QueryString",
        _ => "Request.Form",
    };
    PARAMS.iter().find_map(|&name| {
        let value = params.get(name).filter(|v| is_dangerous(v))?;
        let mut shown = printable(value);
        if shown.chars().count() > 15 {
            shown = shown.chars().take(15).collect::<String>() + "...";
        }
        Some(format!(
            "System.Web.HttpRequestValidationException: A potentially dangerous {collection} value was detected from the client ({name}=\"{shown}\")."
        ))
    })
}

fn push(params: &mut WuParams, name: &'static str, text: &str) {
    params.values.entry(name).or_default().push_str(text);
}

/// Keeps echoed input readable and valid in any response: no control characters, bounded.
fn printable(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Handles one refund call after fault selection. `fired` is the rule that fired, if any; only
/// its decline, retry_later and bad_signature actions matter here.
pub(crate) fn process(
    state: &SimState,
    merchant_index: usize,
    binding: Binding,
    parsed: &Result<WuParams, String>,
    fired: Option<&Fired>,
) -> Reply {
    let Some(merchant) = state.settings.wupay.get(merchant_index) else {
        return client_error(
            binding,
            "System.ArgumentException: unknown service",
            "NOT_FOUND",
        );
    };
    let params = match parsed {
        Ok(p) => p,
        Err(message) => return client_error(binding, message, "INVALID_REQUEST"),
    };
    if !binding.is_soap()
        && let Some(message) = request_validation(binding, params)
    {
        return client_error(binding, &message, "REQUEST_VALIDATION");
    }
    if params.get("rfkey").map(str::trim) != Some(merchant.rfkey.as_str()) {
        return client_error(
            binding,
            "System.ArgumentException: invalid rfkey",
            "INVALID_RFKEY",
        );
    }
    if params.get("cpnId") != Some(merchant.cpn_id.as_str())
        || params.get("area") != Some(merchant.area.as_str())
    {
        return client_error(
            binding,
            "System.ArgumentException: invalid cpnId or area",
            "INVALID_MERCHANT",
        );
    }
    let text = |name: &str| params.get(name).unwrap_or("").trim();
    for name in ["refund_id", "order_id"] {
        if text(name).is_empty() {
            return fail(
                binding,
                "LACK_PARAMS",
                &format!("{name} is required"),
                Outcome::Rejected,
            );
        }
        if text(name).chars().count() > 32 || text(name).chars().any(char::is_control) {
            return fail(
                binding,
                "PARAMS_ERROR",
                &format!("{name} must be at most 32 printable characters"),
                Outcome::Rejected,
            );
        }
    }
    // Both were checked to be Int32 when parsed; absent (SOAP) means 0, as in .NET.
    let amount = |name: &str| text(name).parse::<i32>().map(i64::from).unwrap_or(0);
    let (total_fee, refund_fee) = (amount("money"), amount("refund_fee"));
    if total_fee < 1 || refund_fee < 1 {
        return fail(
            binding,
            "PARAMS_ERROR",
            "money and refund_fee must be positive",
            Outcome::Rejected,
        );
    }

    let mut corrupt = false;
    if let Some(fired) = fired {
        match fired.action {
            Some(FaultAction::Decline) => {
                let (code, message) = fault_code(fired);
                return fail(binding, &code, &message, Outcome::Declined);
            }
            Some(FaultAction::RetryLater) => {
                let (code, message) = fault_code(fired);
                return server_error(binding, &format!("{code}: {message}"), &code);
            }
            Some(FaultAction::BadSignature) => corrupt = true,
            _ => {}
        }
    }

    let attempt = RefundAttempt {
        provider: Provider::WuPay,
        merchant: merchant.name.clone(),
        refund_no: text("refund_id").to_owned(),
        order_no: text("order_id").to_owned(),
        total_fee,
        refund_fee,
        coupon_rate: 0.0,
    };
    let decision = lock(&state.ledger).apply(&attempt, state.clock.now(), true);
    match decision {
        Decision::Paid(_) => result(binding, "SUCCESS", Outcome::Paid, None, corrupt),
        Decision::Replayed(_) => result(binding, "SUCCESS", Outcome::Replayed, None, corrupt),
        Decision::Conflict => fail(
            binding,
            "PARAMS_ERROR",
            "refund_id reused with different amounts",
            Outcome::Rejected,
        ),
        Decision::Declined { code, message } => fail(binding, code, &message, Outcome::Declined),
    }
}

/// A `FAIL:<CODE>:<message>` result.
fn fail(binding: Binding, code: &str, message: &str, outcome: Outcome) -> Reply {
    let value = format!("FAIL:{code}:{message}");
    result(binding, &value, outcome, Some(code), false)
}

/// An HTTP 200 result carrying `value` in the binding's format. `truncate` cuts the XML before
/// the result element closes (the `bad_signature` fault).
fn result(
    binding: Binding,
    value: &str,
    outcome: Outcome,
    code: Option<&str>,
    truncate: bool,
) -> Reply {
    let (mut body, closing) = if binding.is_soap() {
        (soap_result(binding, value), "</RefundResult>")
    } else {
        (plain_result(value), "</string>")
    };
    if truncate && let Some(cut) = body.find(closing) {
        body.truncate(cut);
    }
    Reply {
        status: StatusCode::OK,
        content_type: binding.content_type(),
        body,
        outcome,
        code: code.map(str::to_owned),
        accepted: None,
        detail: None,
    }
}

/// A request problem: SOAP Client/Sender fault, or for GET/POST the plain-text HTTP 500 that
/// ASP.NET sends for an exception.
fn client_error(binding: Binding, message: &str, code: &str) -> Reply {
    error_reply(binding, true, message, Outcome::Rejected, code)
}

/// A transient failure: SOAP Server/Receiver fault, or plain-text HTTP 500 for GET/POST.
fn server_error(binding: Binding, message: &str, code: &str) -> Reply {
    let message = format!("Server was unable to process request. ---> {message}");
    error_reply(binding, false, &message, Outcome::RetryLater, code)
}

fn error_reply(
    binding: Binding,
    client: bool,
    message: &str,
    outcome: Outcome,
    code: &str,
) -> Reply {
    let (content_type, body) = if binding.is_soap() {
        (binding.content_type(), soap_fault(binding, client, message))
    } else {
        let text = if client || message.starts_with("System.") {
            message.to_owned()
        } else {
            format!("System.InvalidOperationException: {message}")
        };
        ("text/plain; charset=utf-8", text)
    };
    Reply {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        content_type,
        body,
        outcome,
        code: Some(code.to_owned()),
        accepted: None,
        detail: None,
    }
}

fn prefix(binding: Binding) -> &'static str {
    match binding {
        Binding::Soap12 => "soap12",
        _ => "soap",
    }
}

/// Writes `<?xml ...?><P:Envelope ...><P:Body>` + `inner` + closing tags.
fn envelope(
    binding: Binding,
    inner: impl FnOnce(&mut Writer<Vec<u8>>) -> io::Result<()>,
) -> io::Result<String> {
    let p = prefix(binding);
    let mut w = Writer::new(Vec::new());
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
    w.create_element(format!("{p}:Envelope"))
        .with_attribute(("xmlns:xsi", XSI_NS))
        .with_attribute(("xmlns:xsd", XSD_NS))
        .with_attribute((format!("xmlns:{p}").as_str(), binding.envelope_ns()))
        .write_inner_content(|w| {
            w.create_element(format!("{p}:Body"))
                .write_inner_content(inner)?;
            Ok(())
        })?;
    Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
}

fn soap_result(binding: Binding, value: &str) -> String {
    envelope(binding, |w| {
        w.create_element("RefundResponse")
            .with_attribute(("xmlns", TEMPURI))
            .write_inner_content(|w| {
                w.create_element("RefundResult")
                    .write_text_content(BytesText::new(value))?;
                Ok(())
            })?;
        Ok(())
    })
    // Writing into a Vec cannot fail; an empty body would surface as unparseable anyway.
    .unwrap_or_default()
}

fn soap_fault(binding: Binding, client: bool, message: &str) -> String {
    let p = prefix(binding);
    envelope(binding, |w| {
        w.create_element(format!("{p}:Fault"))
            .write_inner_content(|w| {
                if binding == Binding::Soap12 {
                    let code = if client { "Sender" } else { "Receiver" };
                    w.create_element(format!("{p}:Code"))
                        .write_inner_content(|w| {
                            w.create_element(format!("{p}:Value"))
                                .write_text_content(BytesText::new(&format!("{p}:{code}")))?;
                            Ok(())
                        })?;
                    w.create_element(format!("{p}:Reason"))
                        .write_inner_content(|w| {
                            w.create_element(format!("{p}:Text"))
                                .with_attribute(("xml:lang", "en"))
                                .write_text_content(BytesText::new(message))?;
                            Ok(())
                        })?;
                    w.create_element(format!("{p}:Detail")).write_empty()?;
                } else {
                    let code = if client { "Client" } else { "Server" };
                    w.create_element("faultcode")
                        .write_text_content(BytesText::new(&format!("{p}:{code}")))?;
                    w.create_element("faultstring")
                        .write_text_content(BytesText::new(message))?;
                    w.create_element("detail").write_empty()?;
                }
                Ok(())
            })?;
        Ok(())
    })
    .unwrap_or_default()
}

/// The HTTP GET/POST result: `<?xml ...?>\n<string xmlns="http://tempuri.org/">VALUE</string>`.
fn plain_result(value: &str) -> String {
    let mut w = Writer::new(Vec::new());
    let written: io::Result<()> = (|| {
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
        w.get_mut().push(b'\n');
        w.create_element("string")
            .with_attribute(("xmlns", TEMPURI))
            .write_text_content(BytesText::new(value))?;
        Ok(())
    })();
    match written {
        Ok(()) => String::from_utf8_lossy(&w.into_inner()).into_owned(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOAP11: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">
  <s:Header><x>ignored</x></s:Header>
  <s:Body>
    <t:Refund xmlns:t="http://tempuri.org/">
      <t:refund_id>R&amp;1</t:refund_id><t:order_id><![CDATA[O<1>]]></t:order_id>
      <t:money>100</t:money><t:refund_fee>10</t:refund_fee><t:reason/>
      <t:rfkey>k&#65;</t:rfkey>
    </t:Refund>
  </s:Body>
</s:Envelope>"#;

    #[test]
    fn soap_parameters_are_read_by_namespace_and_local_name() {
        let params = parse_soap(SOAP11.as_bytes(), Binding::Soap11).expect("valid envelope");
        assert_eq!(params.get("refund_id"), Some("R&1"));
        assert_eq!(params.get("order_id"), Some("O<1>"));
        assert_eq!(params.get("money"), Some("100"));
        assert_eq!(params.get("reason"), Some(""));
        assert_eq!(params.get("rfkey"), Some("kA"));
        assert_eq!(params.get("area"), None);
    }

    #[test]
    fn a_soap_11_envelope_on_the_soap_12_binding_is_a_version_mismatch() {
        let err = parse_soap(SOAP11.as_bytes(), Binding::Soap12).unwrap_err();
        assert!(err.contains("version mismatch"), "{err}");
    }

    #[test]
    fn doctype_is_refused() {
        let body = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x/>"#;
        assert!(
            parse_soap(body.as_bytes(), Binding::Soap11)
                .unwrap_err()
                .contains("DTD")
        );
    }

    #[test]
    fn results_are_escaped_and_truncation_breaks_the_xml() {
        let reply = result(
            Binding::HttpGet,
            "FAIL:X:a<b&c",
            Outcome::Declined,
            None,
            false,
        );
        assert_eq!(
            reply.body,
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<string xmlns=\"http://tempuri.org/\">FAIL:X:a&lt;b&amp;c</string>"
        );
        let cut = result(Binding::Soap11, "SUCCESS", Outcome::Paid, None, true);
        assert!(cut.body.ends_with("<RefundResult>SUCCESS"), "{}", cut.body);
    }

    #[test]
    fn request_validation_is_asp_nets_dangerous_string_check() {
        for bad in ["<a", "x<Z", "<!", "</", "<?", "&#", "a&#x41;"] {
            assert!(is_dangerous(bad), "{bad:?}");
        }
        for fine in ["", "<", "&", "< a", "1<2", "<中", "<<", "Q&A", "& #", "a>b"] {
            assert!(!is_dangerous(fine), "{fine:?}");
        }
    }

    #[test]
    fn form_parameters_must_all_be_present_and_ints_must_convert() {
        let mut query: String = PARAMS.iter().map(|p| format!("{p}=1&")).collect();
        assert!(parse_form(query.as_bytes()).is_ok());
        query = query.replace("money=1&", "money=x&");
        assert!(
            parse_form(query.as_bytes())
                .unwrap_err()
                .contains("Cannot convert")
        );
        assert!(
            parse_form(b"refund_id=1")
                .unwrap_err()
                .contains("Missing parameter")
        );
    }
}
