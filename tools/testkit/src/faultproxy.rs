//! A small TCP fault proxy: it forwards connections to one upstream and breaks them on demand.
//!
//! The fault suite places a [`FaultProxy`] between the worker and each thing it talks to — the
//! provider simulator, RabbitMQ and PostgreSQL — and points the worker's URLs at the proxy (see
//! [`FaultProxy::for_url`]). The test then changes the [`Mode`] at run time to make the network
//! misbehave in one precise way, without touching the (shared) server behind it. Faults that
//! the servers themselves must suffer (a crash, a restart) are `crate::private`'s job instead.
//!
//! What this module owns: the listening socket, one pair of sockets (client side, upstream
//! side) per proxied connection, and the mode. Nothing else: it knows no protocol, so every
//! fault is expressed in bytes and TCP events, and what a fault means for a protocol is the
//! test's business.
//!
//! # Modes
//!
//! A mode applies to new connections and, where stated, to open ones; [`FaultProxy::set_mode`]
//! takes effect at once.
//!
//! * [`Mode::Pass`] — forward both ways untouched. Half-closes are forwarded (a client's FIN
//!   reaches the upstream as a FIN, and the response still flows back), and an error on one
//!   side resets the other side.
//! * [`Mode::Latency`]`(d)` — each chunk read from either side is written to the other side
//!   `d` later (per chunk and per direction, in order; a request-response exchange gains about
//!   `2·d`). Chunks are delayed one after another, so a long stream of chunks is slowed by `d`
//!   per chunk: this models a slow round trip, not a fat pipe with delay. Applies to open
//!   connections from their next chunk on.
//! * [`Mode::Blackhole`] — nothing is forwarded in either direction and nothing is sent: a new
//!   connection is accepted but no upstream connection is made, and open connections stall.
//!   The proxy stops reading, so what a peer sends waits in the kernel's buffers (a peer's
//!   writes still succeed until those fill), like a partition that TCP would ride out:
//!   switching back to `Pass` delivers everything held, in order, unless a peer gave up first.
//!   A client reading a response sees a read that never completes (use a timeout).
//! * [`Mode::Reset`] — new connections are reset (RST) right after accept, and every open
//!   connection is reset on both sides (client and upstream), as with [`FaultProxy::reset_all`]
//!   (but without waiting: `set_mode` returns at once, the RSTs follow within moments; use
//!   `reset_all().await` when the test must know they were sent). A client sees `ECONNRESET`
//!   (`ConnectionReset`) on its next read or write (the kernel reports it once).
//! * [`Mode::CloseAfter`]`(n)` — a connection is closed once it has delivered `n` bytes in
//!   total from the upstream to the client, counted from the connection's start: the client
//!   receives exactly the first `n` bytes, then a clean EOF (FIN), and the upstream connection
//!   is closed. The chunk that crosses the limit is cut at the limit. An open connection that
//!   had already delivered `n` or more bytes is closed at once when this mode is set; with
//!   `n = 0` a connection is closed before any byte reaches the client. Models a connection
//!   lost in the middle of a response.
//! * [`Mode::DropResponse`] — the client's bytes are forwarded as usual, but the first bytes
//!   the upstream sends back are discarded and the connection is closed (EOF to the client,
//!   close to the upstream): "the request arrived, the response was lost". The upstream did
//!   the work; the client cannot know whether it did. Applies to open connections too.
//! * [`Mode::Refuse`] — the proxy stops listening (the port stays reserved for it), so a
//!   connect fails with `ECONNREFUSED`, as when nothing listens; connections not yet accepted
//!   are reset. Open connections are left alone — call [`FaultProxy::reset_all`] as well to
//!   model a server that died. Leaving the mode listens again on the same address.
//!
//! Resets are real RSTs: the proxy sets `SO_LINGER` to 0 before closing a socket. An upstream
//! that cannot be reached makes the proxy reset the client connection.
//!
//! For manual use the `fault-proxy` binary wraps this module and reads mode changes on stdin.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What the proxy does to the traffic (see the module documentation for the exact semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward untouched.
    Pass,
    /// Forward each chunk after this delay, both directions.
    Latency(Duration),
    /// Forward nothing, send nothing; open connections stall, new ones are accepted and stall.
    Blackhole,
    /// Reset new and open connections.
    Reset,
    /// Close a connection after it has delivered this many bytes from upstream to client.
    CloseAfter(u64),
    /// Forward the request, drop the response and close the connection.
    DropResponse,
    /// Stop listening: connects are refused.
    Refuse,
}

impl fmt::Display for Mode {
    /// The form [`Mode::from_str`] and the `fault-proxy` binary read.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Pass => f.write_str("pass"),
            Mode::Latency(d) => write!(f, "latency:{}", d.as_millis()),
            Mode::Blackhole => f.write_str("blackhole"),
            Mode::Reset => f.write_str("reset"),
            Mode::CloseAfter(n) => write!(f, "close-after:{n}"),
            Mode::DropResponse => f.write_str("drop-response"),
            Mode::Refuse => f.write_str("refuse"),
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    /// `pass`, `latency:MS`, `blackhole`, `reset`, `close-after:N`, `drop-response`, `refuse`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s, None),
        };
        let number = |what: &str| -> Result<u64, String> {
            let a = arg.ok_or_else(|| format!("mode `{name}` needs a number: `{name}:{what}`"))?;
            a.parse::<u64>()
                .map_err(|e| format!("mode `{s}`: `{a}` is not a number of {what}: {e}"))
        };
        let no_arg = |m: Mode| match arg {
            None => Ok(m),
            Some(_) => Err(format!("mode `{name}` takes no argument (got `{s}`)")),
        };
        match name.to_ascii_lowercase().as_str() {
            "pass" => no_arg(Mode::Pass),
            "latency" => Ok(Mode::Latency(Duration::from_millis(number(
                "milliseconds",
            )?))),
            "blackhole" => no_arg(Mode::Blackhole),
            "reset" => no_arg(Mode::Reset),
            "close-after" => Ok(Mode::CloseAfter(number("bytes")?)),
            "drop-response" => no_arg(Mode::DropResponse),
            "refuse" => no_arg(Mode::Refuse),
            _ => Err(format!(
                "unknown mode `{s}`: expected pass, latency:MS, blackhole, reset, close-after:N, \
                 drop-response or refuse"
            )),
        }
    }
}

/// A running proxy. Dropping it stops listening and resets every open connection (without
/// waiting); [`FaultProxy::shutdown`] does the same and waits.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

/// The handle on one open connection: a kill switch and a signal that it has finished.
struct ConnEntry {
    kill: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends every open connection its kill switch; returns the signals of their ends.
    fn kill_all(&self) -> Vec<oneshot::Receiver<()>> {
        let drained: Vec<ConnEntry> = self.conns().drain().map(|(_, e)| e).collect();
        drained
            .into_iter()
            .map(|e| {
                let _ = e.kill.send(());
                e.done
            })
            .collect()
    }
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks a free port; see [`FaultProxy::addr`]) and forwards to
    /// `upstream`, starting in [`Mode::Pass`]. Needs a Tokio runtime.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = bind_listener(listen)?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared {
            upstream,
            mode,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(shared.clone(), listener, stop_rx));
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        Ok(FaultProxy {
            addr,
            shared,
            stop,
            accept_task: Mutex::new(Some(task)),
        })
    }

    /// A proxy on a free port of 127.0.0.1 in front of `upstream`.
    pub async fn to(upstream: SocketAddr) -> io::Result<FaultProxy> {
        Self::start(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// A proxy in front of the server that `url` names (`postgres://…`, `amqp://…`,
    /// `http://…`), and the same URL pointed at the proxy instead. A URL without a port gets
    /// its scheme's default (5432, 5672, 80, 443).
    pub async fn for_url(url: &str) -> anyhow::Result<(FaultProxy, String)> {
        let upstream = url_addr(url)?;
        let proxy = Self::to(upstream).await.map_err(|e| {
            anyhow::anyhow!("fault proxy: cannot listen on 127.0.0.1 for {upstream}: {e}")
        })?;
        let via = proxy.rewrite_url(url)?;
        Ok((proxy, via))
    }

    /// `url` with its host and port replaced by the proxy's address.
    pub fn rewrite_url(&self, url: &str) -> anyhow::Result<String> {
        with_addr(url, self.addr)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Changes the mode, for new connections and (see the module documentation) open ones.
    pub fn set_mode(&self, mode: Mode) {
        tracing::debug!(addr = %self.addr, %mode, "fault proxy mode");
        self.shared.mode.send_replace(mode);
        if mode == Mode::Reset {
            // Open connections are reset even if the mode changes again before they look.
            drop(self.shared.kill_all());
        }
    }

    /// Resets (RST, both sides) every open connection and waits until they are closed;
    /// returns how many there were. The mode stays as it is, so new connections still work
    /// in `Pass`.
    pub async fn reset_all(&self) -> usize {
        let done = self.shared.kill_all();
        let n = done.len();
        for d in done {
            let _ = d.await;
        }
        n
    }

    /// Connections open now (accepted and not yet closed).
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Connections accepted since the start, including those reset at once.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops listening, resets every open connection and waits for both.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let task = self
            .accept_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
        self.reset_all().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self
            .accept_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        // The connection tasks reset their sockets when they next run.
        drop(self.shared.kill_all());
    }
}

/// The socket address a URL's host and port name (the scheme's default port if none).
pub fn url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let u = url::Url::parse(url).map_err(|e| anyhow::anyhow!("cannot parse URL: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("URL has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = u
        .port()
        .or_else(|| default_port(u.scheme()))
        .ok_or_else(|| anyhow::anyhow!("URL has no port and `{}` has no default", u.scheme()))?;
    (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} resolves to no address"))
}

/// `url` with host and port replaced by `addr`.
pub fn with_addr(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).map_err(|e| anyhow::anyhow!("cannot parse URL: {e}"))?;
    u.set_ip_host(addr.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the host of a `{}` URL", u.scheme()))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port of a `{}` URL", u.scheme()))?;
    Ok(u.to_string())
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "postgres" | "postgresql" => Some(5432),
        "amqp" => Some(5672),
        "amqps" => Some(5671),
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// Binds the listening socket to an explicit port. Linux frees an automatically chosen port
/// when a listening socket stops listening (`Refuse`), but keeps an explicitly bound one, so
/// port 0 is resolved to a free port first and then bound by number.
fn bind_listener(listen: SocketAddr) -> io::Result<TcpListener> {
    let mut last_err = None;
    for _ in 0..20 {
        let mut addr = listen;
        if addr.port() == 0 {
            let probe = std::net::TcpListener::bind(listen)?;
            addr.set_port(probe.local_addr()?.port());
        }
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && listen.port() == 0 => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        return TcpListener::from_std(socket.into());
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free port")))
}

async fn accept_loop(
    shared: Arc<Shared>,
    mut listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let mut mode_rx = shared.mode.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        if *mode_rx.borrow_and_update() == Mode::Refuse {
            // Stop listening but keep the port: pending connections are reset, new connects
            // are refused. The socket leaves Tokio meanwhile: the hang-up a stopped listener
            // reports would stay in Tokio's readiness and make `accept` spin once it listens
            // again, so it is registered afresh.
            let std_listener = match listener.into_std() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "fault proxy: cannot deregister the listener");
                    return;
                }
            };
            if let Err(e) = SockRef::from(&std_listener).shutdown(Shutdown::Read) {
                tracing::warn!(error = %e, "fault proxy: cannot stop listening");
            }
            loop {
                tokio::select! {
                    c = mode_rx.changed() => if c.is_err() { return },
                    _ = stop.changed() => return,
                }
                if *mode_rx.borrow_and_update() != Mode::Refuse {
                    break;
                }
            }
            let relisten = SockRef::from(&std_listener)
                .listen(1024)
                .and_then(|()| TcpListener::from_std(std_listener));
            listener = match relisten {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "fault proxy: cannot listen again");
                    return;
                }
            };
            continue;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((client, _)) => admit(&shared, client),
                Err(e) => {
                    tracing::warn!(error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            c = mode_rx.changed() => if c.is_err() { return },
            c = stop.changed() => if c.is_err() { return },
        }
    }
}

fn admit(shared: &Arc<Shared>, client: TcpStream) {
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    if *shared.mode.borrow() == Mode::Reset {
        abort(&client);
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (kill_tx, kill_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    shared.conns().insert(
        id,
        ConnEntry {
            kill: kill_tx,
            done: done_rx,
        },
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        serve(&shared, client, kill_rx).await;
        shared.conns().remove(&id);
        drop(done_tx);
    });
}

/// Sets `SO_LINGER` 0 so that closing the socket sends RST.
fn abort(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// How one direction, or the whole connection, ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The source sent EOF; the FIN was passed on.
    Eof,
    /// Close both sides cleanly (FIN).
    Close,
    /// Reset both sides (RST).
    Reset,
}

async fn serve(shared: &Shared, mut client: TcpStream, mut kill: oneshot::Receiver<()>) {
    let mut mode_rx = shared.mode.subscribe();
    // A connection accepted in Blackhole makes no upstream connection until the mode changes.
    let connect = async {
        if let Some(end) = hold(&mut mode_rx).await {
            return Err(end);
        }
        match TcpStream::connect(shared.upstream).await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::debug!(upstream = %shared.upstream, error = %e, "fault proxy: upstream unreachable");
                Err(End::Reset)
            }
        }
    };
    let connected = tokio::select! {
        _ = &mut kill => Err(End::Reset),
        r = connect => r,
    };
    let mut upstream = match connected {
        Ok(u) => u,
        Err(_) => {
            abort(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let end = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = pump_up(cr, uw, shared.mode.subscribe());
        let down = pump_down(ur, cw, shared.mode.subscribe());
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                _ = &mut kill => break End::Reset,
                e = &mut up, if !up_done => match e {
                    End::Eof => up_done = true,
                    other => break other,
                },
                e = &mut down, if !down_done => match e {
                    End::Eof => down_done = true,
                    other => break other,
                },
            }
            if up_done && down_done {
                break End::Eof;
            }
        }
    };
    match end {
        End::Reset => {
            abort(&client);
            abort(&upstream);
        }
        End::Close => {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
        End::Eof => {}
    }
}

/// Waits while the mode is `Blackhole`; `Some(Reset)` when it is `Reset`.
async fn hold(mode: &mut watch::Receiver<Mode>) -> Option<End> {
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Blackhole => {
                if mode.changed().await.is_err() {
                    return Some(End::Reset);
                }
            }
            Mode::Reset => return Some(End::Reset),
            _ => return None,
        }
    }
}

const CHUNK: usize = 16 * 1024;

/// Client → upstream.
async fn pump_up(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) -> End {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if let Some(end) = hold(&mut mode).await {
            return end;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return End::Eof;
                }
                Ok(n) => n,
                Err(_) => return End::Reset,
            },
            c = mode.changed() => {
                if c.is_err() {
                    return End::Reset;
                }
                continue;
            }
        };
        if let Some(end) = hold(&mut mode).await {
            return end;
        }
        let m = *mode.borrow();
        if let Mode::Latency(d) = m {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Reset;
        }
    }
}

/// Upstream → client.
async fn pump_down(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) -> End {
    let mut buf = vec![0u8; CHUNK];
    let mut sent: u64 = 0;
    loop {
        if let Some(end) = hold(&mut mode).await {
            return end;
        }
        if let Mode::CloseAfter(limit) = *mode.borrow()
            && sent >= limit
        {
            return End::Close;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return End::Eof;
                }
                Ok(n) => n,
                Err(_) => return End::Reset,
            },
            c = mode.changed() => {
                if c.is_err() {
                    return End::Reset;
                }
                continue;
            }
        };
        if let Some(end) = hold(&mut mode).await {
            return end;
        }
        let m = *mode.borrow();
        let chunk = match m {
            Mode::DropResponse => return End::Close,
            Mode::CloseAfter(limit) => {
                let left = usize::try_from(limit.saturating_sub(sent)).unwrap_or(usize::MAX);
                &buf[..n.min(left)]
            }
            _ => &buf[..n],
        };
        if let Mode::Latency(d) = m {
            tokio::time::sleep(d).await;
        }
        if !chunk.is_empty() && to.write_all(chunk).await.is_err() {
            return End::Reset;
        }
        sent += chunk.len() as u64;
        if let Mode::CloseAfter(limit) = m
            && sent >= limit
        {
            let _ = to.flush().await;
            return End::Close;
        }
    }
}
