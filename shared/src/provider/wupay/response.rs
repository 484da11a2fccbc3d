//! Reading what WuPay answers: a bounded, namespace-aware parse into a small tree (DOCTYPE
//! refused, depth and size capped), then the SOAP body, the `RefundResult` or the fault, by
//! namespace and local name, never by string matching.

use quick_xml::events::{BytesRef, Event};
use quick_xml::name::{QName, ResolveResult};
use quick_xml::reader::NsReader;

use super::*;

/// One element of a reply. Attributes are not kept: nothing in a WuPay reply needs them.
#[derive(Debug, Default)]
pub(super) struct Node {
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
pub(super) enum TextNs {
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

/// Reads a whole document into a tree of elements, refusing what a WuPay reply never needs
/// and an attacker might use: DOCTYPE, entities beyond the predefined ones, encodings other
/// than UTF-8, deep nesting, oversized input.
pub(super) fn parse_tree(body: &[u8], max_bytes: usize) -> Result<Node, ParseError> {
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

pub(super) fn push_text(stack: &mut [Node], s: &str) -> Result<(), ParseError> {
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
pub(super) fn decode_reference(r: &BytesRef<'_>) -> Result<char, ParseError> {
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
pub(super) fn soap_body(root: &Node) -> Result<Option<(SoapVersion, &Node)>, ParseError> {
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
pub(super) fn body_entry(body: &Node) -> Result<&Node, ParseError> {
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

pub(super) fn parse_fault(version: SoapVersion, fault: &Node) -> Result<Fault, ParseError> {
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
pub(super) fn qname_local(value: &str) -> &str {
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
