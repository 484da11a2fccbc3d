//! Fixtures and helpers shared by the WuPay test modules: the seed request, a configured
//! merchant and client, reply classification and a one-shot local HTTP server.

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::request::percent_encode_into;
use super::*;
use crate::config::{HttpConfig, Secret, WupayBinding, WupayMerchant};
use crate::job::{ProviderKind, RefundRequest, WupayOptions};
use crate::provider::http::{self, HttpReply};
use crate::provider::{Outcome, RefundCall};

/// An rfkey whose plain, XML-escaped and URL-encoded forms all differ, so a test that it
/// never appears covers every form it could leak in; `<1` rather than `<x`, which request
/// validation would refuse on the GET/POST bindings.
pub(super) const RFKEY: &str = "rk-S3cr3t+/Key&<1>";

pub(super) const MAX: usize = 256 * 1024;

pub(super) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/wupay/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(super) fn request() -> RefundRequest {
    RefundRequest {
        version: 1,
        refund_no: "R2026112100000001".into(),
        order_no: "O2026112100000001".into(),
        provider: ProviderKind::Wupay,
        merchant: "wu-1".into(),
        total_fee: 1000,
        refund_fee: 100,
        reason: Some("customer returned goods".into()),
        requested_at: None,
        shengpay: None,
        wupay: Some(WupayOptions {
            pay_nd: "P0001".into(),
            auth_type: "1".into(),
            rec_organ: "S01".into(),
            rec_device: "T01".into(),
            rec_man: "op7".into(),
        }),
    }
}

pub(super) fn merchant(binding: WupayBinding, base_url: &str) -> WupayMerchant {
    WupayMerchant {
        merchant: "wu-1".into(),
        base_url: base_url.into(),
        binding,
        cpn_id: "CPN9".into(),
        area: "华东".into(),
        rfkey_file: "unused".into(),
        idempotent: false,
        success_results: vec!["SUCCESS".into()],
        failure_prefixes: vec!["FAIL".into()],
    }
}

pub(super) fn http_config() -> HttpConfig {
    HttpConfig {
        connect_timeout_ms: 2_000,
        timeout_ms: 5_000,
        ..HttpConfig::default()
    }
}

pub(super) fn client_for(m: &WupayMerchant) -> WupayClient {
    let cfg = http_config();
    let http = http::build_client(&cfg).unwrap();
    WupayClient::with_rfkey(m, "wupay.merchants[0]", Secret::new(RFKEY), http, &cfg).unwrap()
}

pub(super) fn reply(status: u16, body: &[u8]) -> HttpReply {
    HttpReply {
        status,
        content_type: Some("text/xml; charset=utf-8".into()),
        body: body.to_vec(),
    }
}

pub(super) fn outcome(status: u16, body: &[u8]) -> Outcome {
    client_for(&merchant(
        WupayBinding::Soap11,
        "http://127.0.0.1:1/WuPay.asmx",
    ))
    .outcome_of(&request(), &reply(status, body))
}

// ---- end to end against a local HTTP server -----------------------------------------

#[derive(Debug)]
pub(super) struct Received {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Received {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Accepts one connection, reads one HTTP/1.1 request, answers with a canned response.
pub(super) async fn serve_once(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
) -> (String, tokio::task::JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/WuPay.asmx", listener.local_addr().unwrap());
    let handle = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the request head");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap().split(' ');
        let method = request_line.next().unwrap().to_owned();
        let target = request_line.next().unwrap().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut req_body = buf[head_end + 4..].to_vec();
        while req_body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed inside the request body");
            req_body.extend_from_slice(&chunk[..n]);
        }
        let reason = if status == 200 {
            "OK"
        } else {
            "Internal Server Error"
        };
        let mut response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        sock.write_all(&response).await.unwrap();
        sock.shutdown().await.unwrap();
        Received {
            method,
            target,
            headers,
            body: req_body,
        }
    });
    (base, handle)
}

pub(super) fn call(r: &RefundRequest) -> RefundCall<'_> {
    RefundCall {
        request: r,
        attempt: 1,
    }
}

pub(super) fn assert_no_rfkey(s: &str) {
    let mut form = String::new();
    percent_encode_into(&mut form, RFKEY, true);
    let mut query = String::new();
    percent_encode_into(&mut query, RFKEY, false);
    for leak in [
        RFKEY,
        &quick_xml::escape::escape(RFKEY),
        &form,
        &query,
        "S3cr3t",
    ] {
        assert!(!s.contains(leak), "{leak:?} leaked into {s}");
    }
}

// ---- what may have run, what the stack refuses (defects 7 and 12) ------------------

pub(super) fn typed_outcome(status: u16, content_type: Option<&str>, body: &[u8]) -> Outcome {
    let reply = HttpReply {
        status,
        content_type: content_type.map(str::to_owned),
        body: body.to_vec(),
    };
    client_for(&merchant(
        WupayBinding::Soap11,
        "http://127.0.0.1:1/WuPay.asmx",
    ))
    .outcome_of(&request(), &reply)
}

// ---- properties --------------------------------------------------------------------

pub(super) fn xml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        1 => prop::sample::select(vec!['<', '>', '&', '"', '\'', ' ', ']', ';', '#', ':', '\u{FEFF}', '\u{2028}', '中']),
    ]
    .prop_filter("XML-safe", |c| !c.is_control() && !matches!(c, '\u{FFFE}' | '\u{FFFF}'))
}

pub(super) fn xml_value() -> impl Strategy<Value = String> {
    prop::collection::vec(xml_char(), 0..24).prop_map(String::from_iter)
}
