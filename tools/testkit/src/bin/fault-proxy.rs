//! `fault-proxy`: a TCP proxy that breaks connections on demand (`testkit::faultproxy`), for
//! trying faults by hand: put it between the worker and PostgreSQL, RabbitMQ or the simulator,
//! then type modes on stdin.

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::Context as _;
use clap::Parser;
use testkit::faultproxy::{FaultProxy, Mode};
use tokio::io::AsyncBufReadExt;
use tracing_subscriber::EnvFilter;

const ABOUT: &str = "TCP fault proxy: forwards one listening address to one upstream and \
injects faults (latency, blackhole, reset, close-after, drop-response, refuse) on demand.";

const LONG_ABOUT: &str = "\
TCP fault proxy: forwards connections from --listen to --upstream and injects network faults,
switchable at run time. Modes:
  pass             forward untouched
  latency:MS       forward each chunk MS milliseconds late, both directions
  blackhole        forward nothing, send nothing: open connections stall, new ones are accepted
                   and stall (what was sent is held and delivered when the mode changes back)
  reset            reset (RST) new connections at once and every open connection
  close-after:N    close a connection (clean EOF) once it has sent N bytes upstream->client
  drop-response    forward requests, drop the first response bytes and close the connection
  refuse           stop listening: connects fail with 'connection refused'

Stdin, one command per line: a mode (as above) sets it; `reset-all` resets every open
connection; `status` prints the mode and counters; `quit` stops. At EOF on stdin the proxy keeps
running until SIGINT/SIGTERM. The first stdout line is `listening on ADDR -> UPSTREAM`.
RUST_LOG sets the log level (logs go to stderr).";

#[derive(Parser)]
#[command(name = "fault-proxy", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the first output line names it).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to forward to, HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Initial mode: pass | latency:MS | blackhole | reset | close-after:N | drop-response | refuse.
    #[arg(long, default_value = "pass")]
    mode: Mode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let upstream = cli
        .upstream
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --upstream {}", cli.upstream))?
        .next()
        .with_context(|| format!("--upstream {} resolves to no address", cli.upstream))?;
    let proxy = FaultProxy::start(cli.listen, upstream)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    proxy.set_mode(cli.mode);
    say(&format!(
        "listening on {} -> {} (mode {})",
        proxy.addr(),
        upstream,
        cli.mode
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let cmd = line.trim();
                    match cmd {
                        "" => {}
                        "quit" | "exit" => break,
                        "reset-all" => {
                            let n = proxy.reset_all().await;
                            say(&format!("reset {n} connection(s)"));
                        }
                        "status" => say(&format!(
                            "mode {}, {} open connection(s), {} accepted",
                            proxy.mode(),
                            proxy.connections(),
                            proxy.accepted()
                        )),
                        _ => match cmd.parse::<Mode>() {
                            Ok(m) => {
                                proxy.set_mode(m);
                                say(&format!("mode {m}"));
                            }
                            Err(e) => eprintln!("fault-proxy: {e}"),
                        },
                    }
                }
                Ok(None) => stdin_open = false,
                Err(e) => {
                    eprintln!("fault-proxy: stdin: {e}");
                    stdin_open = false;
                }
            },
        }
    }
    proxy.shutdown().await;
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
