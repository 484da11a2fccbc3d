//! The fault proxy's modes, each observed with a plain TCP echo server behind it, and the proxy
//! in front of the real local PostgreSQL.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use testkit::faultproxy::{FaultProxy, Mode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server that also records every byte it received.
struct Echo {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            rec.lock().unwrap().extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo {
        addr,
        received,
        task,
    }
}

async fn proxy_to(upstream: SocketAddr) -> FaultProxy {
    FaultProxy::to(upstream).await.expect("proxy starts")
}

/// Sends `msg` and reads the same number of bytes back.
async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "no echo within 5 s"))??;
    Ok(buf)
}

/// The connection must have been reset: a write or the read after it fails with
/// `ConnectionReset` (the kernel reports a received RST once, to whichever call comes first).
async fn expect_reset(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(b"ping").await?;
        s.read(&mut buf).await
    })
    .await
    .expect("the reset arrives within 5 s");
    match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes (0: a clean EOF)"),
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pass_forwards_both_ways_and_counts_connections() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    assert_eq!(p.mode(), Mode::Pass);
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"hello").await.unwrap(), b"hello");
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    assert_eq!(roundtrip(&mut c, &big).await.unwrap(), big);
    assert_eq!(p.connections(), 1);
    assert_eq!(p.accepted(), 1);
    drop(c);
    wait_for("the connection to close", || p.connections() == 0).await;
    p.shutdown().await;
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut c, b"warm").await.unwrap();

    p.set_mode(Mode::Latency(Duration::from_millis(150)));
    let t = Instant::now();
    assert_eq!(roundtrip(&mut c, b"slow").await.unwrap(), b"slow");
    let slow = t.elapsed();
    assert!(
        slow >= Duration::from_millis(290),
        "round trip took {slow:?}"
    );
    assert!(slow < Duration::from_secs(2), "round trip took {slow:?}");

    p.set_mode(Mode::Pass);
    let t = Instant::now();
    roundtrip(&mut c, b"fast").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn blackhole_stalls_open_and_new_connections_then_delivers_on_pass() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    let mut open = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut open, b"before").await.unwrap();

    p.set_mode(Mode::Blackhole);
    open.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_millis(400), open.read_exact(&mut buf)).await;
    assert!(
        r.is_err(),
        "an open connection answered in blackhole: {r:?}"
    );

    // A new connection is accepted (connect succeeds) but gets nothing.
    let mut fresh = TcpStream::connect(p.addr()).await.unwrap();
    fresh.write_all(b"new!").await.unwrap();
    let mut buf2 = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_millis(400), fresh.read_exact(&mut buf2)).await;
    assert!(r.is_err(), "a new connection answered in blackhole: {r:?}");
    assert_eq!(
        up.received.lock().unwrap().as_slice(),
        b"before",
        "the upstream got bytes during the blackhole"
    );

    // Healing delivers what was held, in order, on both connections.
    p.set_mode(Mode::Pass);
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held");
    tokio::time::timeout(Duration::from_secs(5), fresh.read_exact(&mut buf2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf2, b"new!");
}

#[tokio::test]
async fn reset_resets_open_and_new_connections() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    let mut open = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut open, b"hi").await.unwrap();

    p.set_mode(Mode::Reset);
    expect_reset(&mut open).await;
    let mut fresh = TcpStream::connect(p.addr()).await.unwrap();
    expect_reset(&mut fresh).await;
    wait_for("connections to go", || p.connections() == 0).await;

    p.set_mode(Mode::Pass);
    let mut again = TcpStream::connect(p.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut again, b"back").await.unwrap(), b"back");
}

#[tokio::test]
async fn reset_all_resets_every_open_connection_and_keeps_serving() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    let mut a = TcpStream::connect(p.addr()).await.unwrap();
    let mut b = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut a, b"a").await.unwrap();
    roundtrip(&mut b, b"b").await.unwrap();
    assert_eq!(p.connections(), 2);

    assert_eq!(p.reset_all().await, 2);
    assert_eq!(p.connections(), 0);
    expect_reset(&mut a).await;
    expect_reset(&mut b).await;

    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"c").await.unwrap(), b"c");
}

#[tokio::test]
async fn close_after_n_delivers_exactly_n_bytes_then_eof() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    p.set_mode(Mode::CloseAfter(10));
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    // Two writes so that the upstream answers in more than one chunk.
    c.write_all(b"0123456").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(b"789abcdefghijklmnop").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .expect("EOF within 5 s")
        .expect("a clean EOF, not an error");
    assert_eq!(got, b"0123456789");

    // Set on an open connection that already delivered more: it closes at once.
    p.set_mode(Mode::Pass);
    let mut open = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut open, b"twelve bytes").await.unwrap();
    p.set_mode(Mode::CloseAfter(5));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn drop_response_forwards_the_request_and_closes_without_an_answer() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    p.set_mode(Mode::DropResponse);
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"POST /refund").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .expect("EOF within 5 s")
        .expect("a clean EOF, not an error");
    assert!(got.is_empty(), "the client got {got:?}");
    assert_eq!(up.received.lock().unwrap().as_slice(), b"POST /refund");
}

#[tokio::test]
async fn refuse_stops_listening_on_the_same_port_until_pass() {
    let up = echo().await;
    let p = proxy_to(up.addr).await;
    let mut open = TcpStream::connect(p.addr()).await.unwrap();
    roundtrip(&mut open, b"x").await.unwrap();

    p.set_mode(Mode::Refuse);
    let mut refused = false;
    for _ in 0..50 {
        match TcpStream::connect(p.addr()).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            // The mode change reaches the accept loop a moment later.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(refused, "connects were not refused");
    // Open connections are left alone.
    assert_eq!(roundtrip(&mut open, b"y").await.unwrap(), b"y");

    p.set_mode(Mode::Pass);
    let mut back = None;
    for _ in 0..50 {
        if let Ok(s) = TcpStream::connect(p.addr()).await {
            back = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut back = back.expect("listening again");
    assert_eq!(roundtrip(&mut back, b"z").await.unwrap(), b"z");
}

#[tokio::test]
async fn an_unreachable_upstream_resets_the_client() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = proxy_to(closed).await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    expect_reset(&mut c).await;
}

#[test]
fn modes_parse_and_print() {
    for (text, mode) in [
        ("pass", Mode::Pass),
        ("latency:250", Mode::Latency(Duration::from_millis(250))),
        ("blackhole", Mode::Blackhole),
        ("reset", Mode::Reset),
        ("close-after:42", Mode::CloseAfter(42)),
        ("drop-response", Mode::DropResponse),
        ("refuse", Mode::Refuse),
    ] {
        assert_eq!(text.parse::<Mode>().unwrap(), mode);
        assert_eq!(mode.to_string(), text);
    }
    for bad in ["latency", "latency:x", "close-after", "pass:1", "nope"] {
        let e = bad.parse::<Mode>().unwrap_err();
        assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
    }
}

#[tokio::test]
async fn for_url_rewrites_the_url_to_the_proxy() {
    let up = echo().await;
    let url = format!("postgres://u:p@{}/db?sslmode=disable", up.addr);
    let (p, via) = FaultProxy::for_url(&url).await.unwrap();
    assert_eq!(p.upstream(), up.addr);
    assert_eq!(
        via,
        format!("postgres://u:p@{}/db?sslmode=disable", p.addr())
    );
    let (p2, via2) = FaultProxy::for_url("amqp://guest:guest@127.0.0.1/%2f")
        .await
        .unwrap();
    assert_eq!(p2.upstream().port(), 5672);
    assert_eq!(via2, format!("amqp://guest:guest@{}/%2f", p2.addr()));
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: these tests need PostgreSQL, e.g. \
         postgres://postgres@127.0.0.1:5432/postgres",
    )
}

#[tokio::test]
async fn postgres_through_the_proxy_breaks_on_reset_and_recovers() {
    let (p, url) = FaultProxy::for_url(&database_url()).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    assert_eq!(p.connections(), 1);

    assert_eq!(p.reset_all().await, 1);
    let err = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .expect_err("the reset connection still answered");
    assert!(
        matches!(err, sqlx::Error::Io(_)),
        "expected an I/O error, got {err}"
    );

    p.set_mode(Mode::Reset);
    assert!(sqlx::PgConnection::connect(&url).await.is_err());
    p.set_mode(Mode::Latency(Duration::from_millis(30)));
    let mut slow = sqlx::PgConnection::connect(&url).await.unwrap();
    let t = Instant::now();
    let _: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut slow)
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(55),
        "{:?}",
        t.elapsed()
    );

    p.set_mode(Mode::Pass);
    let mut fresh = sqlx::PgConnection::connect(&url).await.unwrap();
    let two: i32 = sqlx::query_scalar("SELECT 2")
        .fetch_one(&mut fresh)
        .await
        .unwrap();
    assert_eq!(two, 2);
    fresh.close().await.unwrap();
}

#[tokio::test]
async fn the_binary_takes_modes_on_stdin() {
    let up = echo().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fault-proxy"))
        .args(["--upstream", &up.addr.to_string(), "--mode", "pass"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = out.next_line().await.unwrap().unwrap();
    let addr: SocketAddr = first
        .strip_prefix("listening on ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .parse()
        .unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"via bin").await.unwrap(), b"via bin");

    stdin.write_all(b"reset-all\n").await.unwrap();
    assert_eq!(
        out.next_line().await.unwrap().unwrap(),
        "reset 1 connection(s)"
    );
    expect_reset(&mut c).await;

    stdin.write_all(b"drop-response\n").await.unwrap();
    assert_eq!(
        out.next_line().await.unwrap().unwrap(),
        "mode drop-response"
    );
    stdin.write_all(b"status\n").await.unwrap();
    let status = out.next_line().await.unwrap().unwrap();
    assert!(status.starts_with("mode drop-response, 0 open"), "{status}");

    stdin.write_all(b"quit\n").await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st}");
}

#[test]
fn the_binary_has_help() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fault-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--listen",
        "--upstream",
        "--mode",
        "drop-response",
        "close-after",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

/// The fault suite shares a proxy with spawned tasks.
#[allow(dead_code)]
fn proxy_is_shareable(p: &'static FaultProxy) {
    fn send<T: Send>(_: T) {}
    fn sync<T: Send + Sync>(_: &T) {}
    sync(p);
    send(p.reset_all());
}
