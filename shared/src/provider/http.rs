//! The one HTTP client every provider call goes through, and how its failures are classified.
//!
//! One `reqwest::Client` per process keeps connections alive across refunds (a TLS handshake per
//! refund would cost more than the refund). Its errors are sorted into the two transport classes
//! of DESIGN §5: [`TransportError::NotSent`] only when the request provably never left (the
//! connection was never established), everything else [`TransportError::MaybeDelivered`].
//! Bodies are read with a size cap so a misbehaving provider cannot exhaust memory.

use std::time::Duration;

use crate::config::HttpConfig;

/// A transport failure, classified by whether the provider may have seen the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("not sent: {0}")]
    NotSent(String),
    #[error("maybe delivered: {0}")]
    MaybeDelivered(String),
}

/// A response that arrived whole: status and body (at most the configured cap).
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Builds the shared client: keep-alive pool, connect and total timeouts, TCP_NODELAY, TLS 1.2
/// or newer, no redirects. Which URLs it may be pointed at is the configuration's rule
/// ([`HttpConfig::check_url`]: https only, unless `allow_plain_http`).
pub fn build_client(cfg: &HttpConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        // Set here rather than left to the system's OpenSSL configuration, which differs
        // between images and may still allow TLS 1.0 and 1.1 (broken, and refused by the
        // payment industry's rules since 2018).
        .tls_version_min(reqwest::tls::Version::TLS_1_2)
        .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        // Redirects would send a signed refund to an address nobody configured.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Classifies a reqwest error: only a failure to connect proves the request never left.
pub fn classify(e: &reqwest::Error) -> TransportError {
    let text = error_chain(e);
    if e.is_connect() || e.is_builder() {
        TransportError::NotSent(text)
    } else {
        TransportError::MaybeDelivered(text)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Sends a request and reads the whole body, refusing bodies over `max_bytes`.
pub async fn send(
    request: reqwest::RequestBuilder,
    max_bytes: usize,
) -> Result<HttpReply, TransportError> {
    let mut resp = request.send().await.map_err(|e| classify(&e))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(len) = resp.content_length()
        && len > max_bytes as u64
    {
        return Err(TransportError::MaybeDelivered(format!(
            "response of {len} bytes is over the {max_bytes}-byte cap"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        TransportError::MaybeDelivered(format!("reading response: {}", error_chain(&e)))
    })? {
        if body.len() + chunk.len() > max_bytes {
            return Err(TransportError::MaybeDelivered(format!(
                "response is over the {max_bytes}-byte cap"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpReply {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_shared_client_speaks_https() {
        // Port 9 (discard) is closed here: a client with TLS support fails to *connect*; one
        // without fails before that, on the URL scheme.
        let client = build_client(&HttpConfig::default()).unwrap();
        let err = client.get("https://127.0.0.1:9/").send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert!(matches!(classify(&err), TransportError::NotSent(_)));
    }

    /// Accepts connections on 127.0.0.1 and counts them; each gets `reply` and is closed.
    async fn server(reply: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(reply.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        (port, hits)
    }

    #[tokio::test]
    async fn a_redirect_is_returned_as_it_is_and_never_followed() {
        use std::sync::atomic::Ordering;
        let (target, target_hits) =
            server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into()).await;
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "307 Temporary Redirect",
        ] {
            let (port, hits) = server(format!(
                "HTTP/1.1 {status}\r\nLocation: http://127.0.0.1:{target}/elsewhere\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            ))
            .await;
            let client = build_client(&HttpConfig::default()).unwrap();
            let reply = send(
                client
                    .post(format!("http://127.0.0.1:{port}/refund"))
                    .body("signed"),
                1024,
            )
            .await
            .unwrap();
            assert_eq!(reply.status.to_string(), status[..3], "{status}");
            assert_eq!(hits.load(Ordering::SeqCst), 1);
        }
        assert_eq!(
            target_hits.load(Ordering::SeqCst),
            0,
            "a redirect was followed"
        );
    }
}
