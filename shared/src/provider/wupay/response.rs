//! Reading a WuPay reply: a SOAP envelope holding `RefundResponse/RefundResult` or a Fault, or
//! the `<string>` document of the HTTP bindings.
//!
//! Replies are read by namespace URI and local name, whatever prefixes the server chose, because
//! a fault code only means SOAP's `Client` in SOAP's namespace. Whatever an attacker or a broken
//! gateway could use is refused rather than interpreted: DOCTYPE (no entity expansion, no
//! external fetches), entities beyond the predefined ones, other encodings, deep nesting and
//! oversized input; no input can make the parser panic.

use quick_xml::events::{BytesRef, Event};
use quick_xml::name::{QName, ResolveResult};
use quick_xml::reader::NsReader;

use super::{SOAP11_NS, SOAP12_NS, SoapVersion, TEMPURI_NS};

/// Deeper nesting than this is not a WuPay reply. The cap also bounds the parser's stack and
/// the recursion of dropping the element tree, which arbitrary input could otherwise exhaust.
const MAX_DEPTH: usize = 32;

/// Provider text quoted in our error messages is cut to this many characters.
const MAX_QUOTED_CHARS: usize = 200;

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("response of {len} bytes is over the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error("response is not UTF-8 (invalid at byte {0})")]
    NotUtf8(usize),
    #[error("response declares encoding {0:?}; only UTF-8 is read")]
    Encoding(String),
    #[error("response has a DOCTYPE, which is refused")]
    Doctype,
    #[error("entity reference &{0}; is not a predefined XML entity or a valid character reference")]
    Entity(String),
    #[error("elements nest deeper than {0} levels")]
    TooDeep(usize),
    #[error("malformed XML: {0}")]
    Xml(String),
    #[error("not a WuPay reply: {0}")]
    Shape(String),
}

/// A `Refund` reply read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The `RefundResult` (SOAP) or `<string>` (HTTP GET/POST) text, exactly as sent.
    Result(String),
    /// A SOAP Fault.
    Fault(Fault),
}

/// A SOAP Fault, reduced to what classification needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The envelope version the fault came in.
    pub version: SoapVersion,
    /// The fault code's local part (`Client`, `Sender`, `Server.Timeout`, ...), its prefix
    /// resolved (or stripped when it is not declared).
    pub code: String,
    /// SOAP 1.2 only: the local part of the first `Subcode/Value`.
    pub subcode: Option<String>,
    /// `faultstring` (SOAP 1.1) or the first `Reason/Text` (SOAP 1.2).
    pub reason: String,
    pub class: FaultClass,
}

/// Who a fault blames, which decides whether the refund may have been processed. Only
/// [`FaultClass::Sender`] says it was not (the table in the `classify` module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// `Client`/`Client.*` in the SOAP 1.1 namespace, in a SOAP 1.1 envelope; `Sender` in the
    /// SOAP 1.2 namespace, in a SOAP 1.2 envelope: our request was refused before processing.
    Sender,
    /// `Server`/`Server.*` (1.1) or `Receiver` (1.2), in its envelope's namespace: the service
    /// failed while handling the request; it may have paid first.
    Receiver,
    /// Anything else: `VersionMismatch`, `MustUnderstand`, `DataEncodingUnknown`, a code in
    /// another namespace, in none or behind an undeclared prefix, the other SOAP version's
    /// name. Nothing proves the refund did not run, so it is treated like `Receiver`.
    Other,
}

/// One element of a reply. Attributes are not kept: nothing in a WuPay reply needs them.
#[derive(Debug, Default)]
struct Node {
    ns: Option<String>,
    local: String,
    children: Vec<Node>,
    text: String,
    /// For a leaf, its trimmed text read as a QName (`soap:Client`, `Client`) and resolved in
    /// the element's scope: where a fault code lives.
    text_ns: TextNs,
}

/// The namespace of a leaf's text read as a QName.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum TextNs {
    /// Not a leaf.
    #[default]
    NotLeaf,
    /// Bound to this namespace: by its prefix, or, unprefixed, by the default namespace.
    Bound(String),
    /// Unprefixed with no default namespace in scope: in no namespace.
    Unbound,
    /// Its prefix is declared nowhere in scope.
    Undeclared,
}

impl Node {
    fn is(&self, ns: &str, local: &str) -> bool {
        self.ns.as_deref() == Some(ns) && self.local == local
    }

    fn child(&self, ns: &str, local: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.is(ns, local))
    }

    fn leaf_text(&self) -> Result<&str, ParseError> {
        if self.children.is_empty() {
            Ok(&self.text)
        } else {
            Err(ParseError::Shape(format!(
                "<{}> should hold text, not elements",
                self.local
            )))
        }
    }

    fn describe(&self) -> String {
        match &self.ns {
            Some(ns) => format!("{{{}}}{}", quote(ns), quote(&self.local)),
            None => quote(&self.local),
        }
    }
}

pub(super) fn quote(s: &str) -> String {
    if s.chars().count() <= MAX_QUOTED_CHARS {
        s.to_owned()
    } else {
        let mut cut: String = s.chars().take(MAX_QUOTED_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Reads a whole document into a tree of elements, refusing what a WuPay reply never needs
/// and an attacker might use: DOCTYPE, entities beyond the predefined ones, encodings other
/// than UTF-8, deep nesting, oversized input.
fn parse_tree(body: &[u8], max_bytes: usize) -> Result<Node, ParseError> {
    if body.len() > max_bytes {
        return Err(ParseError::TooLarge {
            len: body.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| ParseError::NotUtf8(e.valid_up_to()))?;
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut reader = NsReader::from_str(text);
    reader.config_mut().expand_empty_elements = true;
    let xml = |e: quick_xml::Error| ParseError::Xml(quote(&e.to_string()));

    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let (resolved, event) = reader.read_resolved_event().map_err(xml)?;
        let ns = match resolved {
            ResolveResult::Bound(ns) => Some(ns.into_inner().to_owned()),
            ResolveResult::Unbound => None,
            ResolveResult::Unknown(prefix) => {
                return Err(ParseError::Xml(format!(
                    "undeclared namespace prefix {:?}",
                    quote(&prefix)
                )));
            }
        };
        match event {
            Event::Start(e) => {
                if root.is_some() {
                    return Err(ParseError::Xml("more than one root element".into()));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(ParseError::TooDeep(MAX_DEPTH));
                }
                stack.push(Node {
                    ns,
                    local: e.local_name().as_ref().to_owned(),
                    ..Node::default()
                });
            }
            Event::Empty(_) => {
                // `expand_empty_elements` turns `<a/>` into Start and End, so this never
                // arrives; refusing it keeps the tree honest if that ever changes.
                return Err(ParseError::Xml("unexpanded empty element".into()));
            }
            Event::End(_) => {
                let Some(mut node) = stack.pop() else {
                    return Err(ParseError::Xml("closing tag without an opening tag".into()));
                };
                if node.children.is_empty() {
                    // The End event still sees the element's own namespace scope: the reader
                    // pops it only on the next read. Element-name resolution is the QName
                    // rule for text too: an unprefixed name takes the default namespace.
                    node.text_ns =
                        match reader.resolver().resolve_element(QName(node.text.trim())).0 {
                            ResolveResult::Bound(ns) => TextNs::Bound(ns.into_inner().to_owned()),
                            ResolveResult::Unbound => TextNs::Unbound,
                            ResolveResult::Unknown(_) => TextNs::Undeclared,
                        };
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(t) => push_text(&mut stack, &t.xml10_content())?,
            Event::CData(c) => push_text(&mut stack, &c.xml10_content())?,
            Event::GeneralRef(r) => {
                let mut buf = [0u8; 4];
                push_text(&mut stack, decode_reference(&r)?.encode_utf8(&mut buf))?;
            }
            Event::DocType(_) => return Err(ParseError::Doctype),
            Event::Decl(d) => {
                if let Some(encoding) = d.encoding() {
                    let encoding = encoding.map_err(|e| ParseError::Xml(quote(&e.to_string())))?;
                    if !encoding.eq_ignore_ascii_case("utf-8") {
                        return Err(ParseError::Encoding(quote(&encoding)));
                    }
                }
            }
            Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(ParseError::Xml(format!(
            "document ends inside <{}>",
            quote(&open.local)
        )));
    }
    root.ok_or_else(|| ParseError::Shape("no root element".into()))
}

fn push_text(stack: &mut [Node], s: &str) -> Result<(), ParseError> {
    match stack.last_mut() {
        Some(node) => {
            node.text.push_str(s);
            Ok(())
        }
        None if s.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n')) => Ok(()),
        None => Err(ParseError::Xml("text outside the root element".into())),
    }
}

/// Decodes `&name;`: the five predefined entities and character references, nothing else (a
/// reply has no DTD that could declare more, and we refuse any that tries).
fn decode_reference(r: &BytesRef<'_>) -> Result<char, ParseError> {
    let name: &str = r;
    if r.is_char_ref() {
        return match r.resolve_char_ref() {
            Ok(Some(c)) => Ok(c),
            _ => Err(ParseError::Entity(quote(name))),
        };
    }
    match name {
        "lt" => Ok('<'),
        "gt" => Ok('>'),
        "amp" => Ok('&'),
        "apos" => Ok('\''),
        "quot" => Ok('"'),
        other => Err(ParseError::Entity(quote(other))),
    }
}

/// The SOAP version and `Body` of an envelope root, or `None` if the root is no envelope.
fn soap_body(root: &Node) -> Result<Option<(SoapVersion, &Node)>, ParseError> {
    let version = if root.is(SOAP11_NS, "Envelope") {
        SoapVersion::Soap11
    } else if root.is(SOAP12_NS, "Envelope") {
        SoapVersion::Soap12
    } else {
        return Ok(None);
    };
    let ns = version.namespace();
    let mut bodies = root.children.iter().filter(|c| c.is(ns, "Body"));
    match (bodies.next(), bodies.next()) {
        (Some(body), None) => Ok(Some((version, body))),
        (None, _) => Err(ParseError::Shape("envelope without a Body".into())),
        (Some(_), Some(_)) => Err(ParseError::Shape("envelope with two Bodies".into())),
    }
}

/// The one element inside a SOAP `Body`.
fn body_entry(body: &Node) -> Result<&Node, ParseError> {
    match body.children.as_slice() {
        [entry] => Ok(entry),
        [] => Err(ParseError::Shape("empty SOAP Body".into())),
        _ => Err(ParseError::Shape(
            "SOAP Body with more than one element".into(),
        )),
    }
}

/// Reads a `Refund` reply: a SOAP 1.1 or 1.2 envelope holding `RefundResponse/RefundResult`
/// or a Fault, or the `<string>` document of the HTTP GET/POST bindings. Any binding's
/// request may be answered by any of these (a SOAP 1.2 request may get a SOAP 1.1
/// `VersionMismatch` fault), so the document, not the binding, decides how it is read.
pub fn parse_response(body: &[u8], max_bytes: usize) -> Result<Reply, ParseError> {
    let root = parse_tree(body, max_bytes)?;
    if root.is(TEMPURI_NS, "string") {
        return Ok(Reply::Result(root.leaf_text()?.to_owned()));
    }
    let Some((version, body)) = soap_body(&root)? else {
        return Err(ParseError::Shape(format!(
            "unexpected root element {}",
            root.describe()
        )));
    };
    let entry = body_entry(body)?;
    if entry.is(version.namespace(), "Fault") {
        return Ok(Reply::Fault(parse_fault(version, entry)?));
    }
    if entry.is(TEMPURI_NS, "RefundResponse") {
        let result = entry
            .child(TEMPURI_NS, "RefundResult")
            .ok_or_else(|| ParseError::Shape("RefundResponse without RefundResult".into()))?;
        return Ok(Reply::Result(result.leaf_text()?.to_owned()));
    }
    Err(ParseError::Shape(format!(
        "unexpected SOAP Body element {}",
        entry.describe()
    )))
}

fn parse_fault(version: SoapVersion, fault: &Node) -> Result<Fault, ParseError> {
    let ns = version.namespace();
    let (code_node, subcode, reason) = match version {
        SoapVersion::Soap11 => {
            // SOAP 1.1 fault children are unqualified; a default namespace on the Fault would
            // put them in the envelope namespace, which is read the same.
            let named = |local: &str| {
                fault
                    .children
                    .iter()
                    .find(|c| c.local == local && c.ns.as_deref().is_none_or(|n| n == ns))
            };
            let code = named("faultcode")
                .ok_or_else(|| ParseError::Shape("SOAP 1.1 Fault without faultcode".into()))?;
            let reason = match named("faultstring") {
                Some(s) => s.leaf_text()?.to_owned(),
                None => String::new(),
            };
            (code, None, reason)
        }
        SoapVersion::Soap12 => {
            let code = fault
                .child(ns, "Code")
                .ok_or_else(|| ParseError::Shape("SOAP 1.2 Fault without Code".into()))?;
            let value = code
                .child(ns, "Value")
                .ok_or_else(|| ParseError::Shape("SOAP 1.2 Fault Code without Value".into()))?;
            let subcode = match code.child(ns, "Subcode").and_then(|s| s.child(ns, "Value")) {
                Some(v) => Some(qname_local(v.leaf_text()?).to_owned()),
                None => None,
            };
            let reason = match fault.child(ns, "Reason").and_then(|r| r.child(ns, "Text")) {
                Some(t) => t.leaf_text()?.to_owned(),
                None => String::new(),
            };
            (value, subcode, reason)
        }
    };
    let code = qname_local(code_node.leaf_text()?).to_owned();
    // A fault code is a QName: `Client` means SOAP's Client only in SOAP's namespace. Any other
    // namespace, none, or an undeclared prefix makes it someone else's code, whose meaning we
    // cannot know, so it cannot prove that nothing ran.
    let in_envelope_ns = code_node.text_ns == TextNs::Bound(ns.to_owned());
    let class = match version {
        _ if !in_envelope_ns => FaultClass::Other,
        // SOAP 1.1 refines codes with dots (`Client.Authentication`); the part before the
        // first dot is the standard code.
        SoapVersion::Soap11 => match code.split('.').next().unwrap_or_default() {
            "Client" => FaultClass::Sender,
            "Server" => FaultClass::Receiver,
            _ => FaultClass::Other,
        },
        // SOAP 1.2 has no dotted codes: refinements go in Subcode.
        SoapVersion::Soap12 => match code.as_str() {
            "Sender" => FaultClass::Sender,
            "Receiver" => FaultClass::Receiver,
            _ => FaultClass::Other,
        },
    };
    Ok(Fault {
        version,
        code,
        subcode,
        reason: reason.trim().to_owned(),
        class,
    })
}

/// The local part of a QName written as text (`soap:Client` → `Client`).
fn qname_local(value: &str) -> &str {
    let value = value.trim();
    value.split_once(':').map_or(value, |(_, local)| local)
}

/// Reads our own `Refund` request envelope back into its parameters, in document order: for
/// the simulator and the round-trip tests.
pub fn parse_refund_request(
    body: &[u8],
    max_bytes: usize,
) -> Result<Vec<(String, String)>, ParseError> {
    let root = parse_tree(body, max_bytes)?;
    let Some((_, body)) = soap_body(&root)? else {
        return Err(ParseError::Shape(format!(
            "unexpected root element {}",
            root.describe()
        )));
    };
    let entry = body_entry(body)?;
    if !entry.is(TEMPURI_NS, "Refund") {
        return Err(ParseError::Shape(format!(
            "unexpected SOAP Body element {}",
            entry.describe()
        )));
    }
    entry
        .children
        .iter()
        .map(|p| Ok((p.local.clone(), p.leaf_text()?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::provider::Outcome;
    use crate::provider::wupay::test_support::*;
    use crate::provider::wupay::*;

    fn result_of(body: &str) -> String {
        match parse_response(body.as_bytes(), MAX) {
            Ok(Reply::Result(r)) => r,
            other => panic!("{body}\n-> {other:?}"),
        }
    }

    fn fault_of(body: &[u8]) -> Fault {
        match parse_response(body, MAX) {
            Ok(Reply::Fault(f)) => f,
            other => panic!("{}\n-> {other:?}", String::from_utf8_lossy(body)),
        }
    }

    // ---- reply parsing -----------------------------------------------------------------

    #[test]
    fn the_seed_replies_read_as_their_result() {
        for f in [
            "soap11_response.xml",
            "soap12_response.xml",
            "string_response.xml",
        ] {
            assert_eq!(
                parse_response(&fixture(f), MAX),
                Ok(Reply::Result("string".into())),
                "{f}"
            );
        }
    }

    #[test]
    fn soap11_replies_are_read_whatever_the_prefixes() {
        let cases = [
            r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>SUCCESS</RefundResult></RefundResponse></s:Body></s:Envelope>"#,
            r#"<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="http://schemas.xmlsoap.org/soap/envelope/"><env:Header><h:Trace xmlns:h="urn:h">1</h:Trace></env:Header><env:Body><t:RefundResponse xmlns:t="http://tempuri.org/"><t:RefundResult>SUCCESS</t:RefundResult></t:RefundResponse></env:Body></env:Envelope>"#,
            r#"<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>SUCCESS</RefundResult></RefundResponse></Body></Envelope>"#,
            // A misleading prefix: `soap12` bound to the SOAP 1.1 namespace is SOAP 1.1.
            "\u{FEFF}<soap12:Envelope xmlns:soap12=\"http://schemas.xmlsoap.org/soap/envelope/\">\r\n <soap12:Body>\r\n  <x:RefundResponse xmlns:x=\"http://tempuri.org/\"><!-- c --><x:RefundResult><![CDATA[SUC]]>CESS</x:RefundResult></x:RefundResponse></soap12:Body></soap12:Envelope>",
        ];
        for c in cases {
            assert_eq!(result_of(c), "SUCCESS", "{c}");
        }
    }

    #[test]
    fn soap12_replies_are_read_whatever_the_prefixes() {
        let cases = [
            r#"<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope"><soap:Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>FAIL:X:y</RefundResult></RefundResponse></soap:Body></soap:Envelope>"#,
            r#"<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body><t:RefundResponse xmlns:t="http://tempuri.org/"><t:RefundResult>FAIL:X:y</t:RefundResult></t:RefundResponse></env:Body></env:Envelope>"#,
            r#"<Envelope xmlns="http://www.w3.org/2003/05/soap-envelope"><Body xmlns:t="http://tempuri.org/"><t:RefundResponse><t:RefundResult>FAIL:X:y</t:RefundResult></t:RefundResponse></Body></Envelope>"#,
        ];
        for c in cases {
            assert_eq!(result_of(c), "FAIL:X:y", "{c}");
        }
    }

    #[test]
    fn result_text_keeps_its_whitespace_and_decodes_references() {
        let body = r#"<string xmlns="http://tempuri.org/"> FAIL:&lt;A&gt;:&#x4E2D;&#25991; &amp; &quot;&apos; </string>"#;
        assert_eq!(result_of(body), " FAIL:<A>:中文 & \"' ");
        assert_eq!(result_of(r#"<string xmlns="http://tempuri.org/"/>"#), "");
    }

    #[test]
    fn names_in_the_wrong_namespace_are_not_taken_for_the_reply() {
        let cases = [
            // Right prefix, wrong URI.
            r#"<soap:Envelope xmlns:soap="urn:not-soap"><soap:Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>SUCCESS</RefundResult></RefundResponse></soap:Body></soap:Envelope>"#,
            // Result elements outside tempuri.
            r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><RefundResponse><RefundResult>SUCCESS</RefundResult></RefundResponse></soap:Body></soap:Envelope>"#,
            r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><RefundResponse xmlns="http://tempuri.org/"><o:RefundResult xmlns:o="urn:o">SUCCESS</o:RefundResult></RefundResponse></soap:Body></soap:Envelope>"#,
            // `<string>` without its namespace.
            r#"<string>SUCCESS</string>"#,
            // An undeclared prefix.
            r#"<soap:Envelope><soap:Body/></soap:Envelope>"#,
            // Body from the other SOAP version.
            r#"<a:Envelope xmlns:a="http://schemas.xmlsoap.org/soap/envelope/" xmlns:b="http://www.w3.org/2003/05/soap-envelope"><b:Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>SUCCESS</RefundResult></RefundResponse></b:Body></a:Envelope>"#,
            // Text where SUCCESS is only in an element's content, not the result.
            r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><RefundResponse xmlns="http://tempuri.org/">SUCCESS</RefundResponse></soap:Body></soap:Envelope>"#,
            // A result that holds elements.
            r#"<string xmlns="http://tempuri.org/"><b>SUCCESS</b></string>"#,
        ];
        for c in cases {
            assert!(parse_response(c.as_bytes(), MAX).is_err(), "{c}");
        }
    }

    #[test]
    fn a_doctype_is_refused_before_any_entity_is_expanded() {
        let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><string xmlns="http://tempuri.org/">&lol2;</string>"#;
        assert_eq!(
            parse_response(laughs.as_bytes(), MAX),
            Err(ParseError::Doctype)
        );
        let plain = r#"<!DOCTYPE string><string xmlns="http://tempuri.org/">SUCCESS</string>"#;
        assert_eq!(
            parse_response(plain.as_bytes(), MAX),
            Err(ParseError::Doctype)
        );
        let external = r#"<!DOCTYPE x SYSTEM "file:///etc/passwd"><string xmlns="http://tempuri.org/">&x;</string>"#;
        assert_eq!(
            parse_response(external.as_bytes(), MAX),
            Err(ParseError::Doctype)
        );
    }

    #[test]
    fn only_predefined_entities_and_character_references_are_decoded() {
        for bad in [
            "&nbsp;",
            "&custom;",
            "&#0;",
            "&#xD800;",
            "&#x110000;",
            "&#xZZ;",
        ] {
            let body = format!(r#"<string xmlns="http://tempuri.org/">a{bad}b</string>"#);
            assert!(
                matches!(
                    parse_response(body.as_bytes(), MAX),
                    Err(ParseError::Entity(_) | ParseError::Xml(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn oversized_deep_non_utf8_and_foreign_encoding_replies_are_refused() {
        let body = fixture("string_response.xml");
        assert_eq!(
            parse_response(&body, body.len() - 1),
            Err(ParseError::TooLarge {
                len: body.len(),
                max: body.len() - 1
            })
        );
        let deep = format!(
            "<string xmlns=\"http://tempuri.org/\">{}{}</string>",
            "<a>".repeat(10_000),
            "</a>".repeat(10_000)
        );
        assert_eq!(
            parse_response(deep.as_bytes(), MAX),
            Err(ParseError::TooDeep(MAX_DEPTH))
        );
        assert!(matches!(
            parse_response(b"<string xmlns=\"http://tempuri.org/\">\xff</string>", MAX),
            Err(ParseError::NotUtf8(_))
        ));
        let latin = r#"<?xml version="1.0" encoding="ISO-8859-1"?><string xmlns="http://tempuri.org/">x</string>"#;
        assert!(matches!(
            parse_response(latin.as_bytes(), MAX),
            Err(ParseError::Encoding(_))
        ));
    }

    #[test]
    fn truncated_and_trailing_garbage_replies_are_refused() {
        let body = fixture("soap11_response.xml");
        for cut in [10, body.len() / 2, body.len() - 3] {
            assert!(parse_response(&body[..cut], MAX).is_err(), "cut at {cut}");
        }
        let mut two_roots = body.clone();
        two_roots.extend_from_slice(b"<string xmlns=\"http://tempuri.org/\">SUCCESS</string>");
        assert!(parse_response(&two_roots, MAX).is_err());
        let mut text_after = body;
        text_after.extend_from_slice(b"SUCCESS");
        assert!(parse_response(&text_after, MAX).is_err());
    }

    // ---- faults ------------------------------------------------------------------------

    #[test]
    fn asp_net_faults_read_with_their_code_reason_and_class() {
        let cases = [
            (
                "soap11_fault_client.xml",
                SoapVersion::Soap11,
                "Client",
                FaultClass::Sender,
            ),
            (
                "soap11_fault_server.xml",
                SoapVersion::Soap11,
                "Server",
                FaultClass::Receiver,
            ),
            (
                "soap11_fault_version_mismatch.xml",
                SoapVersion::Soap11,
                "VersionMismatch",
                FaultClass::Other,
            ),
            (
                "soap12_fault_sender.xml",
                SoapVersion::Soap12,
                "Sender",
                FaultClass::Sender,
            ),
            (
                "soap12_fault_receiver.xml",
                SoapVersion::Soap12,
                "Receiver",
                FaultClass::Receiver,
            ),
            (
                "soap12_fault_must_understand.xml",
                SoapVersion::Soap12,
                "MustUnderstand",
                FaultClass::Other,
            ),
        ];
        for (file, version, code, class) in cases {
            let f = fault_of(&fixture(file));
            assert_eq!(
                (f.version, f.code.as_str(), f.class),
                (version, code, class),
                "{file}"
            );
            assert!(!f.reason.is_empty(), "{file}");
        }
        assert_eq!(
            fault_of(&fixture("soap11_fault_client.xml")).reason,
            "Server was unable to read request. ---> There is an error in XML document (1, 2)."
        );
    }

    #[test]
    fn fault_codes_are_resolved_as_qnames_not_matched_as_text() {
        let soap11 = |code: &str| {
            format!(
                r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><e:Fault><faultcode {code}</faultcode><faultstring>why</faultstring></e:Fault></e:Body></e:Envelope>"#
            )
        };
        let class = |body: String| fault_of(body.as_bytes()).class;
        // Any prefix bound to the SOAP namespace, declared where the code is.
        assert_eq!(
            class(soap11(
                r#"xmlns:q="http://schemas.xmlsoap.org/soap/envelope/">q:Server"#
            )),
            FaultClass::Receiver
        );
        assert_eq!(class(soap11(">e:Client")), FaultClass::Sender);
        // SOAP 1.1 dotted refinements keep their base class.
        assert_eq!(
            class(soap11(">e:Client.Authentication")),
            FaultClass::Sender
        );
        assert_eq!(class(soap11(">e:Server.Timeout")), FaultClass::Receiver);
        // Unprefixed without a default namespace, or behind an undeclared prefix, a code is in
        // no namespace we know: not SOAP's.
        assert_eq!(class(soap11(">Server")), FaultClass::Other);
        assert_eq!(class(soap11(">nope:Client")), FaultClass::Other);
        // An application's own namespace is not SOAP's, whatever the local name.
        assert_eq!(
            class(soap11(r#"xmlns:app="urn:app">app:Server"#)),
            FaultClass::Other
        );
        assert_eq!(class(soap11(">e:Weird")), FaultClass::Other);

        let soap12 = r#"<S:Envelope xmlns:S="http://www.w3.org/2003/05/soap-envelope"><S:Body><S:Fault><S:Code><S:Value>S:Sender</S:Value><S:Subcode><S:Value xmlns:w="urn:wupay">w:BadKey</S:Value></S:Subcode></S:Code><S:Reason><S:Text xml:lang="zh">密钥错误</S:Text></S:Reason></S:Fault></S:Body></S:Envelope>"#;
        let f = fault_of(soap12.as_bytes());
        assert_eq!(f.class, FaultClass::Sender);
        assert_eq!(f.subcode.as_deref(), Some("BadKey"));
        assert_eq!(f.reason, "密钥错误");
        assert!(matches!(
            outcome(500, soap12.as_bytes()),
            Outcome::RequestRejected { code, message, .. } if code == "Sender/BadKey" && message == "密钥错误"
        ));
    }

    #[test]
    fn a_fault_without_its_code_is_unreadable() {
        let body = r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><e:Fault><faultstring>x</faultstring></e:Fault></e:Body></e:Envelope>"#;
        assert!(parse_response(body.as_bytes(), MAX).is_err());
        assert!(matches!(
            outcome(500, body.as_bytes()),
            Outcome::MaybeDelivered { .. }
        ));
    }

    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            prop::sample::select(vec![
                "<",
                ">",
                "&",
                "&#",
                "&#x;",
                "&lt",
                "</soap:Body>",
                "<soap:Fault>",
                "<faultcode>",
                "soap:Server",
                "</faultcode>",
                "<!DOCTYPE x>",
                "<![CDATA[",
                "]]>",
                "<!--",
                "-->",
                "<?xml version=\"1.0\" encoding=\"x\"?>",
                " xmlns:a=\"urn:a\"",
                " xmlns=\"\"",
                "<a:b>",
                "</a:b>",
                "\"",
                "'",
                ":",
                "<RefundResult>",
                "</RefundResult>",
            ])
            .prop_map(str::to_owned),
        ]
    }

    proptest! {
        #[test]
        fn any_result_text_round_trips_through_every_reply_shape(value in xml_value()) {
            for body in [
                soap_response(SoapVersion::Soap11, &value).unwrap(),
                soap_response(SoapVersion::Soap12, &value).unwrap(),
                string_response(&value).unwrap(),
            ] {
                prop_assert_eq!(parse_response(&body, usize::MAX), Ok(Reply::Result(value.clone())));
            }
        }

        #[test]
        fn the_reply_parser_never_panics_on_arbitrary_bytes(
            body in prop::collection::vec(any::<u8>(), 0..2048),
            status in 100u16..600,
        ) {
            let _ = parse_response(&body, MAX);
            let _ = parse_refund_request(&body, MAX);
            let _ = outcome(status, &body);
        }

        #[test]
        fn the_reply_parser_never_panics_on_text_spliced_into_a_valid_reply(
            file in prop::sample::select(vec![
                "soap11_response.xml", "soap12_response.xml", "string_response.xml",
                "soap11_fault_client.xml", "soap12_fault_receiver.xml",
            ]),
            splices in prop::collection::vec((any::<prop::sample::Index>(), fragment()), 1..4),
            status in prop::sample::select(vec![200u16, 400, 500]),
        ) {
            let mut body = fixture(file);
            for (at, text) in splices {
                let i = at.index(body.len() + 1);
                body.splice(i..i, text.into_bytes());
            }
            let _ = parse_response(&body, MAX);
            let _ = parse_refund_request(&body, MAX);
            let _ = outcome(status, &body);
        }
    }
}
