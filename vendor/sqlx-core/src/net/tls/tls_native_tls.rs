//! TLS to the database through OpenSSL directly (refunds patch, see VENDORED.md): upstream goes
//! through native-tls, which on Linux is the same OpenSSL but always loads the system CA bundle
//! when it builds a connector, even for a connection that verifies nothing (`sslmode=prefer`,
//! `require`) or trusts only its `sslrootcert` (libpq's rule, which native-tls does not follow:
//! it trusted the system CAs beside it).

use std::io::{self, Read, Write};
use std::net::IpAddr;

use crate::io::ReadBuf;
use crate::net::tls::util::StdSocket;
use crate::net::tls::TlsConfig;
use crate::net::Socket;
use crate::rt;
use crate::Error;

use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream,
    SslVerifyMode, SslVersion,
};
use openssl::x509::{X509VerifyResult, X509};
use std::task::{Context, Poll};

pub struct NativeTlsSocket<S: Socket> {
    stream: SslStream<StdSocket<S>>,
}

impl<S: Socket> Socket for NativeTlsSocket<S> {
    fn try_read(&mut self, buf: &mut dyn ReadBuf) -> io::Result<usize> {
        self.stream.read(buf.init_mut())
    }

    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.get_mut().poll_ready(cx)
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.get_mut().poll_ready(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.shutdown() {
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                self.stream.get_mut().poll_ready(cx)
            }
            Err(e) => Poll::Ready(Err(e
                .into_io_error()
                .unwrap_or_else(|e| io::Error::new(io::ErrorKind::Other, e)))),
        }
    }
}

/// Everything a TLS context is built from: the same inputs give the same context.
#[derive(PartialEq, Eq)]
struct ContextKey {
    accept_invalid_certs: bool,
    root_cert: Option<Vec<u8>>,
    client_cert: Option<Vec<u8>>,
    client_key: Option<Vec<u8>>,
}

/// Contexts built by this process, newest last. A context is immutable and shared by its
/// connections; the key holds the certificate files' contents, read at every connection, so a
/// rotated CA or client certificate builds a new one at the next connection.
static CONTEXTS: std::sync::Mutex<Vec<(ContextKey, SslContext)>> =
    std::sync::Mutex::new(Vec::new());

/// A process keeps at most this many (a pool uses one; a rotation adds one).
const MAX_CONTEXTS: usize = 8;

/// The context for `key`: the one built before, or a new one. The lock is held while building,
/// so connections opened at once wait for the first one's build (runs on a blocking thread:
/// the system CA bundle, when it is needed, is read from disk).
fn context(key: ContextKey) -> Result<SslContext, ErrorStack> {
    let mut built = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = built.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    if key.accept_invalid_certs {
        // prefer / require: encrypted, nothing verified, so no CA is loaded at all.
        b.set_verify(SslVerifyMode::NONE);
    } else {
        b.set_verify(SslVerifyMode::PEER);
        match &key.root_cert {
            // verify-ca / verify-full with sslrootcert: that file's CAs only (every one of them:
            // a rotation bundles the new CA with the old), as libpq does.
            Some(pem) => {
                for cert in X509::stack_from_pem(pem)? {
                    b.cert_store_mut().add_cert(cert)?;
                }
            }
            None => b.set_default_verify_paths()?,
        }
    }
    // authentication using user's key-file and its associated certificate
    if let (Some(cert), Some(pkey)) = (&key.client_cert, &key.client_key) {
        let cert = X509::from_pem(cert)?;
        let pkey = PKey::private_key_from_pem(pkey)?;
        b.set_certificate(&cert)?;
        b.set_private_key(&pkey)?;
        b.check_private_key()?;
    }
    let context = b.build();
    if built.len() >= MAX_CONTEXTS {
        built.remove(0);
    }
    built.push((key, context.clone()));
    Ok(context)
}

/// The handshake's failure, with the certificate check's reason when that is what failed
/// (`certificate verify failed ... (hostname mismatch)`).
fn failure(e: openssl::ssl::Error, verify: X509VerifyResult) -> Error {
    if verify == X509VerifyResult::OK {
        Error::tls(e)
    } else {
        Error::tls(format!("{e} ({})", verify.error_string()))
    }
}

pub async fn handshake<S: Socket>(
    socket: S,
    config: TlsConfig<'_>,
) -> crate::Result<NativeTlsSocket<S>> {
    let root_cert = match config.root_cert_path {
        Some(path) => Some(path.data().await?),
        None => None,
    };
    let (client_cert, client_key) = match (config.client_cert_path, config.client_key_path) {
        (Some(cert), Some(key)) => (Some(cert.data().await?), Some(key.data().await?)),
        _ => (None, None),
    };
    let key = ContextKey {
        accept_invalid_certs: config.accept_invalid_certs,
        root_cert,
        client_cert,
        client_key,
    };
    let context = rt::spawn_blocking(move || context(key))
        .await
        .map_err(Error::tls)?;

    let mut ssl = Ssl::new(&context).map_err(Error::tls)?;
    let ip = config.hostname.parse::<IpAddr>().ok();
    // SNI names a host, never an address (RFC 6066 §3).
    if ip.is_none() {
        ssl.set_hostname(config.hostname).map_err(Error::tls)?;
    }
    if !config.accept_invalid_certs && !config.accept_invalid_hostnames {
        let param = ssl.param_mut();
        match ip {
            Some(ip) => param.set_ip(ip),
            None => param.set_host(config.hostname),
        }
        .map_err(Error::tls)?;
    }

    let mut mid_handshake = match ssl.connect(StdSocket::new(socket)) {
        Ok(stream) => return Ok(NativeTlsSocket { stream }),
        Err(HandshakeError::SetupFailure(e)) => return Err(Error::tls(e)),
        Err(HandshakeError::Failure(mid)) => {
            let verify = mid.ssl().verify_result();
            return Err(failure(mid.into_error(), verify));
        }
        Err(HandshakeError::WouldBlock(mid)) => mid,
    };

    loop {
        mid_handshake.get_mut().ready().await?;

        match mid_handshake.handshake() {
            Ok(stream) => return Ok(NativeTlsSocket { stream }),
            Err(HandshakeError::SetupFailure(e)) => return Err(Error::tls(e)),
            Err(HandshakeError::Failure(mid)) => {
                let verify = mid.ssl().verify_result();
                return Err(failure(mid.into_error(), verify));
            }
            Err(HandshakeError::WouldBlock(mid)) => {
                mid_handshake = mid;
            }
        }
    }
}
