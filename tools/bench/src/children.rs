//! The processes under test: `refund-sim` and `refund-worker`, each a child process with a
//! generated config, so that `/proc` gives each its own CPU time and peak memory and neither is
//! charged for the bench's own work (publishing, polling).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shared::config::Config;

use refund_sim::{FaultRule, RateWindow, SimLimit};
use testkit::{free_addr, free_port, http_get, local_sim_config, point_merchants, toml_file};

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM, then wait up to `grace` for the exit (SIGKILL after).
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "refund-bench: {} did not stop within {grace:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where the binaries are: next to this one (`target/release/`).
pub fn bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is not built: run `cargo build --release --bins` (`just bench` does)",
            p.display()
        );
    }
    Ok(p)
}

/// A running simulator child.
pub struct Sim {
    pub proc: Proc,
    pub base_url: String,
    /// WuPay merchant name → service path.
    pub wupay_paths: BTreeMap<String, String>,
    _config: tempfile::NamedTempFile,
}

/// Starts `refund-sim` with `config/sim.toml`'s merchants and keys, the given rules (the demo
/// rules are dropped) and provider-side rate limits, no coupons and no string amounts, on a
/// free port; waits until it answers.
pub async fn start_sim(
    bin_dir: &Path,
    rules: Vec<FaultRule>,
    limits: Vec<SimLimit>,
) -> anyhow::Result<Sim> {
    let mut c = local_sim_config(rules, 0.0)?;
    c.limits = limits;
    let port = free_port()?;
    c.listen = format!("127.0.0.1:{port}").parse()?;
    c.string_amounts_rate = 0.0;
    c.latency_ms = 0;
    // The bench's backlog is larger than the default call log; keep the log small, nothing
    // here reads it.
    c.call_log_capacity = 1_000;
    // ShengPay ends a refund (and sends its notify) a moment after accepting it, so that the
    // usual order holds: the call's answer is recorded, then the notify books it.
    c.shengpay.processing_ms = 50;
    let wupay_paths = c
        .wupay
        .merchants
        .iter()
        .map(|m| (m.merchant.clone(), m.path.clone()))
        .collect();
    let file = toml_file("refund-bench-sim-", &c)?;
    let child = Command::new(bin(bin_dir, "refund-sim")?)
        .arg("--config")
        .arg(file.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting refund-sim")?;
    let mut proc = Proc {
        child,
        name: "refund-sim",
    };
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http_get(&addr, "/_sim/health").await {
            break;
        }
        if proc.exited() || Instant::now() > deadline {
            bail!("refund-sim did not answer on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Sim {
        proc,
        base_url: format!("http://{addr}"),
        wupay_paths,
        _config: file,
    })
}

impl Sim {
    /// `HOST:PORT` of the simulator.
    pub fn addr(&self) -> &str {
        self.base_url.trim_start_matches("http://")
    }

    /// The simulator's arrival timeline for one merchant (`GET /_sim/rates?merchant=`).
    pub async fn rates(&self, merchant: &str) -> anyhow::Result<Vec<RateWindow>> {
        let name: String = url::form_urlencoded::byte_serialize(merchant.as_bytes()).collect();
        let path = format!("/_sim/rates?merchant={name}");
        let (status, body) = http_get(self.addr(), &path).await?;
        if status != 200 {
            bail!("GET {path} answered {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
    }

    /// Replaces the simulator's fault rules at run time (`POST /_sim/rules`).
    pub async fn set_rules(&self, rules: &[FaultRule]) -> anyhow::Result<()> {
        let body = serde_json::to_string(rules)?;
        let (status, answer) = http_post(self.addr(), "/_sim/rules", &body).await?;
        if status != 200 {
            bail!("POST /_sim/rules answered {status}: {answer}");
        }
        Ok(())
    }
}

/// A minimal HTTP/1.1 POST of a JSON body (the test kit has the GET); status and body.
async fn http_post(addr: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let answer = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, answer))
}

/// Points `base`'s merchants at the simulator (keys made absolute), gives it a free metrics
/// port and no migrations at start (scenario databases are cloned from the migrated template).
pub fn point_at_sim(base: &Config, sim: &Sim) -> anyhow::Result<Config> {
    let mut c = base.clone();
    point_merchants(&mut c, &sim.base_url, |m| {
        sim.wupay_paths
            .get(m)
            .map(|path| format!("{}{path}", sim.base_url))
    })?;
    c.worker.metrics_addr = free_addr()?;
    c.database.migrate_on_start = false;
    Ok(c)
}

/// A running worker child.
pub struct Worker {
    pub proc: Proc,
    pub metrics_addr: String,
    _config: tempfile::NamedTempFile,
}

/// Starts `refund-worker --config <generated>` with `RUST_LOG=log_level`, its JSON log lines
/// going to `log`; waits until `/readyz` says the database and the broker are up.
pub async fn start_worker(
    bin_dir: &Path,
    config: &Config,
    log_level: &str,
    log: &Path,
) -> anyhow::Result<Worker> {
    let addr = config.worker.metrics_addr.clone();
    start_worker_from(bin_dir, config, &addr, log_level, log).await
}

/// [`start_worker`] with a config given as anything that serialises to the worker's TOML
/// (S6 adds tables that [`Config`] may not know, as a [`toml::Value`]); `metrics_addr` is its
/// `worker.metrics_addr`, where readiness is asked.
pub async fn start_worker_from(
    bin_dir: &Path,
    config: &impl serde::Serialize,
    metrics_addr: &str,
    log_level: &str,
    log: &Path,
) -> anyhow::Result<Worker> {
    let file = toml_file("refund-bench-worker-", config)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = Command::new(bin(bin_dir, "refund-worker")?)
        .arg("--config")
        .arg(file.path())
        .env("RUST_LOG", log_level)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting refund-worker")?;
    let mut proc = Proc {
        child,
        name: "refund-worker",
    };
    let addr = metrics_addr.to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = http_get(&addr, "/readyz").await
            && body.contains("\"broker\":true")
        {
            break;
        }
        if proc.exited() {
            bail!("refund-worker exited at start (see {})", log.display());
        }
        if Instant::now() > deadline {
            bail!(
                "refund-worker was not ready within 30 s (see {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Worker {
        proc,
        metrics_addr: addr,
        _config: file,
    })
}
