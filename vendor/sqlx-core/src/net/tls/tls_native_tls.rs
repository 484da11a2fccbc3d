use std::io::{self, Read, Write};

use crate::io::ReadBuf;
use crate::net::tls::util::StdSocket;
use crate::net::tls::TlsConfig;
use crate::net::Socket;
use crate::rt;
use crate::Error;

use native_tls::{HandshakeError, Identity};
use std::task::{Context, Poll};

pub struct NativeTlsSocket<S: Socket> {
    stream: native_tls::TlsStream<StdSocket<S>>,
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
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.get_mut().poll_ready(cx),
            ready => Poll::Ready(ready),
        }
    }
}

/// Everything a connector is built from: the same inputs give the same connector.
#[derive(PartialEq, Eq)]
struct ConnectorKey {
    accept_invalid_certs: bool,
    accept_invalid_hostnames: bool,
    root_cert: Option<Vec<u8>>,
    client_cert: Option<Vec<u8>>,
    client_key: Option<Vec<u8>>,
}

/// Connectors built by this process, newest last (refunds patch: see VENDORED.md). Building one
/// loads and parses the system CA bundle (OpenSSL's default verify paths, twice with OpenSSL 3),
/// tens of milliseconds a connection; a connector is immutable and cheap to clone, so the ones
/// already built are reused. The key holds the certificate files' contents, read at every
/// connection as before, so a rotated CA or client certificate builds a new connector.
static CONNECTORS: std::sync::Mutex<Vec<(ConnectorKey, native_tls::TlsConnector)>> =
    std::sync::Mutex::new(Vec::new());

/// A process keeps at most this many (a pool uses one; a rotation adds one).
const MAX_CONNECTORS: usize = 8;

/// The connector for `key`: a clone of the one built before, or a new one. The lock is held
/// while building, so connections opened at once wait for the first one's build instead of
/// each loading the bundle (runs on a blocking thread).
fn connector(key: ConnectorKey) -> Result<native_tls::TlsConnector, native_tls::Error> {
    let mut built = CONNECTORS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = built.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let mut builder = native_tls::TlsConnector::builder();
    builder
        .danger_accept_invalid_certs(key.accept_invalid_certs)
        .danger_accept_invalid_hostnames(key.accept_invalid_hostnames);
    // Every certificate of the file (refunds patch): a rotation trusts a bundle of the new CA
    // and the old one while the server's certificate changes.
    if let Some(data) = &key.root_cert {
        for cert in native_tls::Certificate::stack_from_pem(data)? {
            builder.add_root_certificate(cert);
        }
    }
    // authentication using user's key-file and its associated certificate
    if let (Some(cert), Some(key)) = (&key.client_cert, &key.client_key) {
        builder.identity(Identity::from_pkcs8(cert, key)?);
    }
    let connector = builder.build()?;
    if built.len() >= MAX_CONNECTORS {
        built.remove(0);
    }
    built.push((key, connector.clone()));
    Ok(connector)
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
    let key = ConnectorKey {
        accept_invalid_certs: config.accept_invalid_certs,
        accept_invalid_hostnames: config.accept_invalid_hostnames,
        root_cert,
        client_cert,
        client_key,
    };

    // The openssl TlsConnector synchronously loads certificates from files.
    // Loading these files can block for tens of milliseconds.
    let connector = rt::spawn_blocking(move || connector(key))
        .await
        .map_err(Error::tls)?;

    let mut mid_handshake = match connector.connect(config.hostname, StdSocket::new(socket)) {
        Ok(tls_stream) => return Ok(NativeTlsSocket { stream: tls_stream }),
        Err(HandshakeError::Failure(e)) => return Err(Error::tls(e)),
        Err(HandshakeError::WouldBlock(mid_handshake)) => mid_handshake,
    };

    loop {
        mid_handshake.get_mut().ready().await?;

        match mid_handshake.handshake() {
            Ok(tls_stream) => return Ok(NativeTlsSocket { stream: tls_stream }),
            Err(HandshakeError::Failure(e)) => return Err(Error::tls(e)),
            Err(HandshakeError::WouldBlock(mid_handshake_)) => {
                mid_handshake = mid_handshake_;
            }
        }
    }
}
