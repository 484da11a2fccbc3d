//! The WuPay client: an ASP.NET `.asmx` service, operation `Refund` in `http://tempuri.org/`.
//!
//! This module owns everything WuPay-specific (DESIGN §5, seed `000_7df7c380637a5bf3.txt`): the
//! thirteen request parameters and their order, the four bindings the service offers (SOAP 1.1,
//! SOAP 1.2, HTTP POST form, HTTP GET query; one per merchant), reading the reply (a SOAP
//! envelope with `RefundResponse/RefundResult`, a SOAP Fault, or `<string>` for GET/POST), and
//! mapping the opaque `RefundResult` string to an [`Outcome`] through the merchant's
//! `success_results` and `failure_prefixes`.
//!
//! XML is the risky part of this provider, so it is handled with care in both directions.
//! Requests are written with quick-xml's [`Writer`] from events, every value escaped by
//! [`BytesText::new`], and values that XML 1.0 cannot carry (control characters, U+FFFE,
//! U+FFFF) are refused before anything is sent: nothing left, so [`Outcome::NotSent`].
//! Replies are read with [`NsReader`] by namespace URI and local name, whatever prefixes the
//! server chose; DOCTYPE is refused (no entity expansion, no external fetches), only the five
//! predefined entities and numeric character references are decoded, size and nesting depth are
//! capped, and no input can make the parser panic.
//!
//! The `rfkey` is a shared secret sent in the clear inside the request. It is replaced by `***`
//! in the attempt record, and every string this client hands back (errors, provider messages,
//! raw bodies) is scrubbed of it, in case a server or a URL in a transport error echoes it.
//!
//! The parts live in private children, one per responsibility: `request` (the thirteen
//! parameters, the XML writer, form and query encoding), `response` (reading a reply by
//! namespace and local name, faults included), `classify` (a reply mapped to an [`Outcome`],
//! with the table of what may have run), `admit` (what WuPay's stack refuses before `Refund`
//! runs, refused at intake), `redact` (keeping the rfkey out of everything we hand back) and
//! `client` (the [`Provider`] that ties them to HTTP). Everything public is re-exported here,
//! so callers keep naming `wupay::X`.
//!
//! [`Writer`]: quick_xml::writer::Writer
//! [`BytesText::new`]: quick_xml::events::BytesText::new
//! [`NsReader`]: quick_xml::reader::NsReader
//! [`Outcome`]: super::Outcome
//! [`Outcome::NotSent`]: super::Outcome::NotSent
//! [`Provider`]: super::Provider

mod admit;
mod classify;
mod client;
mod redact;
mod request;
mod response;
#[cfg(test)]
mod test_support;

pub use admit::request_validation_trigger;
pub use classify::{ResultClass, map_result, split_failure};
pub use client::WupayClient;
pub use request::{
    EncodeError, EncodedRequest, FORM_CONTENT_TYPE, PARAM_NAMES, check_value, encode_request,
    endpoint, form_body, query_string, refund_params, soap_envelope, soap_response,
    string_response,
};
pub use response::{Fault, FaultClass, ParseError, Reply, parse_refund_request, parse_response};

/// The service namespace of the `Refund` operation and of its reply elements.
pub const TEMPURI_NS: &str = "http://tempuri.org/";
/// SOAP 1.1 envelope namespace.
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// SOAP 1.2 envelope namespace.
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
/// The SOAP action of `Refund` (quoted in the SOAP 1.1 `SOAPAction` header).
pub const SOAP_ACTION: &str = "http://tempuri.org/Refund";

/// A SOAP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SoapVersion {
    Soap11,
    Soap12,
}

impl SoapVersion {
    /// The envelope namespace URI.
    pub fn namespace(self) -> &'static str {
        match self {
            SoapVersion::Soap11 => SOAP11_NS,
            SoapVersion::Soap12 => SOAP12_NS,
        }
    }

    /// The prefix our requests use, as in the seed.
    fn prefix(self) -> &'static str {
        match self {
            SoapVersion::Soap11 => "soap",
            SoapVersion::Soap12 => "soap12",
        }
    }

    /// The request `Content-Type`; SOAP 1.2 carries the action in it instead of a header.
    pub fn content_type(self) -> &'static str {
        match self {
            SoapVersion::Soap11 => "text/xml; charset=utf-8",
            SoapVersion::Soap12 => {
                "application/soap+xml; charset=utf-8; action=\"http://tempuri.org/Refund\""
            }
        }
    }
}
