//! `refund-sim`: runs the provider simulator (ShengPay JSON + WuPay `.asmx` over real HTTP with
//! real RSA signatures) until SIGTERM/SIGINT, logging JSON lines; or, with `statement`, fetches
//! a provider statement CSV from a running simulator.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use refund_sim::{SimConfig, Simulator};
use tracing_subscriber::EnvFilter;

const ABOUT: &str = "Provider simulator for the refund processor: fakes ShengPay and WuPay over \
real HTTP, pays each refund number at most once, injects faults by rule, exports a statement.";

const LONG_ABOUT: &str = "\
Provider simulator for the refund processor: fakes ShengPay (POST /api/v1/payment/refund, signed
JSON) and WuPay (an ASP.NET .asmx clone: SOAP 1.1, SOAP 1.2, HTTP POST, HTTP GET) over real HTTP
with real RSA signatures. It pays each refund number at most once, injects faults by rule
(latency, http500, reset, hang, drop_response, bad_signature, decline, retry_later) and exports
what it paid as a provider statement CSV.

ShengPay is asynchronous: an accepted refund is PROCESSING for [shengpay] processing_ms, then
ends SUCCESS (or REFUND_CLOSE / CHANGE by rule), is notified to its notifyUrl (signed JSON,
retried until answered 2xx SUCCESS; rules notify_drop, notify_delay, notify_duplicate,
notify_reorder, notify_bad_sign, notify_foreign) and answered by the status query at
[shengpay] query_path (default /api/v3/payment/refundquery; rules with operation = query).

Control API (JSON unless noted):
  GET  /_sim/health                      liveness and counters
  GET  /_sim/paid                        every refund paid
  GET  /_sim/calls[?full=1&refund_no=R]  call counts per served kind and per refund number
  GET  /_sim/rates[?merchant=M&provider=P]  requests per merchant per second (uncapped):
                                         [{provider, merchant, second, calls, refunds, queries}]
  GET  /_sim/statement?date=YYYY-MM-DD[&provider=P][&tz=Asia/Shanghai]   statement CSV
  GET  /_sim/rules | POST /_sim/rules    fault rules (POST replaces all: a JSON array)
  GET  /_sim/clock | POST /_sim/clock    {\"now\": RFC 3339 or null} shifts the clock
  GET  /_sim/refunds[?refund_no=R]       ShengPay refunds and their status
  GET  /_sim/notifies[?refund_no=R]      every notify delivery attempt
  GET  /_sim/queries[?refund_no=R]       every ShengPay status query and what it answered
  POST /_sim/finish                      end every PROCESSING refund now ({\"ended\": n})
  POST /_sim/notify                      {\"refund_no\": R, \"merchant\"?: M} resend its final notify
  POST /_sim/reset                       forget payments, refunds, calls, queries, notifies, counters

Key and rfkey paths in the config resolve against the working directory. Logs are JSON lines on
stdout; RUST_LOG sets the level (default info; debug logs every provider call).";

#[derive(Parser)]
#[command(
    name = "refund-sim",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Simulator config file (TOML); see config/sim.toml for every key.
    #[arg(long, env = "REFUND_SIM_CONFIG", default_value = "config/sim.toml")]
    config: PathBuf,
    /// Address to listen on, overriding the config's `listen` (port 0 picks a free port).
    #[arg(long, env = "REFUND_SIM_LISTEN")]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the provider statement CSV for one business date from a running simulator.
    Statement {
        /// Base URL of the running simulator.
        #[arg(long, default_value = "http://127.0.0.1:18080")]
        url: String,
        /// Business date, YYYY-MM-DD.
        #[arg(long)]
        date: chrono::NaiveDate,
        /// Only this provider (shengpay or wupay).
        #[arg(long)]
        provider: Option<String>,
        /// Time zone of the business date (default: the simulator's `timezone`).
        #[arg(long)]
        tz: Option<String>,
        /// Write the CSV here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Statement {
            url,
            date,
            provider,
            tz,
            out,
        }) => statement(&url, date, provider, tz, out).await,
        None => serve(cli.config, cli.listen).await,
    }
}

async fn serve(config_path: PathBuf, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let mut config = SimConfig::load(&config_path)?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let handle = Simulator::start(config).await?;
    tracing::info!(base_url = %handle.base_url(), "refund-sim ready");
    shutdown_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

async fn statement(
    base: &str,
    date: chrono::NaiveDate,
    provider: Option<String>,
    tz: Option<String>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut url = url::Url::parse(base)
        .with_context(|| format!("invalid --url {base:?}"))?
        .join("/_sim/statement")?;
    if url.scheme() != "http" {
        bail!("--url must be http:// (the simulator does not speak TLS)");
    }
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("date", &date.to_string());
        if let Some(provider) = &provider {
            query.append_pair("provider", provider);
        }
        if let Some(tz) = &tz {
            query.append_pair("tz", tz);
        }
    }
    let host = url.host_str().context("--url has no host")?.to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(connection);
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let request = hyper::Request::get(target)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("request failed")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "simulator answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    match out {
        Some(path) => std::fs::write(&path, &body)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(&body)?;
        }
    }
    Ok(())
}
