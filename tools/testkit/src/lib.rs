//! The test kit: what the workspace's tests (and the demo and benchmarks) stand on, never
//! shipped. Per-test databases and broker names on the real local services, a fake provider for
//! tests that are about the worker rather than a protocol, helpers that point a config at the
//! simulator, private PostgreSQL and RabbitMQ servers for tests that must kill or restart one
//! ([`private`]), and a TCP fault proxy ([`faultproxy`], also the `fault-proxy` binary).
//!
//! Tests read `DATABASE_URL` (an admin URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`)
//! and `AMQP_URL`. Each test gets its own database, cloned from a template that has the
//! migrations applied (cloning is far faster than migrating), and its own exchange and queue
//! names, so tests run in parallel against one server. Without the variables — and without the
//! `testcontainers` feature and a Docker engine — a test fails with a message that says what to
//! start. Tests never skip.

pub mod faultproxy;
pub mod private;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shared::config::{AmqpConfig, Config};
use shared::job::{ProviderKind, RefundRequest};
use shared::provider::status::{QueryOutcome, QueryRecord, RefundStatus, StatusReport};
use shared::provider::{AttemptRecord, Outcome, Provider, RefundCall, Registry};
use sqlx::postgres::PgPoolOptions;
// Database names below are generated here (uuid, hash), never taken from input.
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// The admin database URL tests use: `DATABASE_URL`, else (with the `testcontainers` feature
/// and a Docker engine) a PostgreSQL container.
pub async fn database_url() -> anyhow::Result<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(url);
    }
    #[cfg(feature = "testcontainers")]
    if let Ok(url) = containers::postgres_url().await {
        return Ok(url);
    }
    anyhow::bail!(
        "DATABASE_URL is not set: tests need PostgreSQL. Start it (`just up`, or \
         `pg_ctlcluster <version> main start`) and set DATABASE_URL, e.g. \
         postgres://postgres@127.0.0.1:5432/postgres (`just test` does this for you); or build \
         the tests with `--features testkit/testcontainers` on a machine with Docker"
    )
}

/// The broker URL tests use: `AMQP_URL`, else (with the `testcontainers` feature and a Docker
/// engine) a RabbitMQ container.
pub async fn amqp_url() -> anyhow::Result<String> {
    if let Ok(url) = std::env::var("AMQP_URL") {
        return Ok(url);
    }
    #[cfg(feature = "testcontainers")]
    if let Ok(url) = containers::rabbitmq_url().await {
        return Ok(url);
    }
    anyhow::bail!(
        "AMQP_URL is not set: tests need RabbitMQ. Start it (`just up`, or \
         `rabbitmq-server -detached`) and set AMQP_URL, e.g. \
         amqp://guest:guest@127.0.0.1:5672/%2f (`just test` does this for you); or build the \
         tests with `--features testkit/testcontainers` on a machine with Docker"
    )
}

/// Containers for machines with Docker and without local services. One of each per test
/// process, started on first use; Testcontainers' reaper removes them when the process ends.
#[cfg(feature = "testcontainers")]
mod containers {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, ImageExt};
    use tokio::sync::OnceCell;

    static POSTGRES: OnceCell<(ContainerAsync<GenericImage>, String)> = OnceCell::const_new();
    static RABBITMQ: OnceCell<(ContainerAsync<GenericImage>, String)> = OnceCell::const_new();

    pub async fn postgres_url() -> anyhow::Result<String> {
        let (_, url) = POSTGRES
            .get_or_try_init(|| async {
                let c = GenericImage::new("postgres", "16-alpine")
                    .with_exposed_port(5432.tcp())
                    .with_wait_for(WaitFor::message_on_stdout(
                        "PostgreSQL init process complete",
                    ))
                    .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                    .start()
                    .await?;
                let port = c.get_host_port_ipv4(5432).await?;
                anyhow::Ok((c, format!("postgres://postgres@127.0.0.1:{port}/postgres")))
            })
            .await?;
        Ok(url.clone())
    }

    pub async fn rabbitmq_url() -> anyhow::Result<String> {
        let (_, url) = RABBITMQ
            .get_or_try_init(|| async {
                let c = GenericImage::new("rabbitmq", "3-alpine")
                    .with_exposed_port(5672.tcp())
                    .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                    .start()
                    .await?;
                let port = c.get_host_port_ipv4(5672).await?;
                anyhow::Ok((c, format!("amqp://guest:guest@127.0.0.1:{port}/%2f")))
            })
            .await?;
        Ok(url.clone())
    }
}

/// `url` with its database name replaced by `db` (query parameters kept).
pub fn with_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").unwrap_or(0) + 2 => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{db}{query}")
        }
        _ => format!("{url}/{db}"),
    }
}

/// A database of one's own, cloned from the migrated template.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

fn template_name() -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for m in shared::store::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&*m.checksum);
    }
    format!("refunds_tmpl_{}", &hex_string(&h.finalize())[..12])
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn admin_conn() -> anyhow::Result<PgConnection> {
    let url = database_url().await?;
    PgConnection::connect(&url).await.with_context(|| {
        format!(
            "PostgreSQL is not reachable at {}: start it (`just up`)",
            shared::config::redact_url(&url)
        )
    })
}

/// Creates a fresh, migrated database for one test.
pub async fn test_db() -> anyhow::Result<TestDb> {
    let admin_url = database_url().await?;
    let mut admin = admin_conn().await?;
    let tmpl = template_name();
    // One process at a time builds the template; the others wait for it.
    sqlx::query("SELECT pg_advisory_lock(727274)")
        .execute(&mut admin)
        .await?;
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&tmpl)
        .fetch_optional(&mut admin)
        .await?
        .is_some();
    if !exists {
        let building = format!("{tmpl}_building");
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building}")))
            .execute(&mut admin)
            .await?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .execute(&mut admin)
            .await?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&with_db(&admin_url, &building))
            .await?;
        shared::store::migrate(&pool).await?;
        pool.close().await;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {tmpl}"
        )))
        .execute(&mut admin)
        .await?;
    }
    sqlx::query("SELECT pg_advisory_unlock(727274)")
        .execute(&mut admin)
        .await?;
    let name = format!("refunds_test_{}", uuid::Uuid::new_v4().simple());
    let mut tries = 0;
    loop {
        match sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {tmpl}"
        )))
        .execute(&mut admin)
        .await
        {
            Ok(_) => break,
            // Another test is cloning the same template at this instant.
            Err(e) if tries < 50 && e.to_string().contains("being accessed by other users") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let url = with_db(&admin_url, &name);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    Ok(TestDb { name, url, pool })
}

/// Exchange and queue names of one's own.
pub fn test_amqp() -> AmqpConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let id = &id[..12];
    AmqpConfig {
        exchange: format!("t.{id}.refunds"),
        queue: format!("t.{id}.refunds.requested"),
        routing_key: "refund.requested".into(),
        dead_letter_exchange: format!("t.{id}.refunds.dlx"),
        dead_letter_queue: format!("t.{id}.refunds.dead"),
        events_exchange: format!("t.{id}.refunds.events"),
        queue_type: "classic".into(),
    }
}

/// A config for one test: its own database and broker names, fast timings.
pub async fn test_config() -> anyhow::Result<(Config, TestDb)> {
    let db = test_db().await?;
    let amqp_url = amqp_url().await?;
    check_broker(&amqp_url).await?;
    let mut c = Config {
        database_url: db.url.clone(),
        amqp_url,
        amqp: test_amqp(),
        ..Config::default()
    };
    c.database.migrate_on_start = false;
    c.database.max_connections = 8;
    c.worker.metrics_addr = "127.0.0.1:0".into();
    // Tests run side by side: each listener on a port of its own (`point_merchants` gives one
    // a known free address when a simulator sends it notifies).
    c.notify.addr = "127.0.0.1:0".into();
    c.worker.sweep_interval_ms = 200;
    c.worker.orphan_after_ms = 2_000;
    c.worker.lease_ms = 5_000;
    c.worker.lease_margin_ms = 500;
    c.http.timeout_ms = 2_000;
    c.http.connect_timeout_ms = 500;
    // The simulator and the tests' fake providers speak plain http on 127.0.0.1.
    c.http.allow_plain_http = true;
    c.worker.retry.initial_delay_ms = 20;
    c.worker.retry.max_delay_ms = 200;
    c.worker.shutdown_grace_ms = 5_000;
    Ok((c, db))
}

/// Fails with a message naming RabbitMQ when it does not answer.
pub async fn check_broker(url: &str) -> anyhow::Result<()> {
    match tokio::time::timeout(
        Duration::from_secs(5),
        shared::broker::connect(url, "test-check"),
    )
    .await
    {
        Ok(Ok(c)) => {
            let _ = c.close(200, "ok".into()).await;
            Ok(())
        }
        Ok(Err(e)) => bail!(
            "RabbitMQ is not reachable at {}: {e}. Start it (`just up` or `rabbitmq-server -detached`)",
            shared::config::redact_url(url)
        ),
        Err(_) => bail!(
            "RabbitMQ did not answer at {} within 5 s. Start it (`just up` or `rabbitmq-server -detached`)",
            shared::config::redact_url(url)
        ),
    }
}

/// Publishes bodies to the request exchange with confirms (declaring the topology first).
pub async fn publish_requests(config: &Config, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
    let conn = shared::broker::connect(&config.amqp_url, "test-publisher").await?;
    let ch = shared::broker::confirm_channel(&conn).await?;
    shared::broker::declare_topology(&ch, &config.amqp).await?;
    let mut pending = Vec::with_capacity(bodies.len());
    for b in bodies {
        pending.push(
            ch.basic_publish(
                config.amqp.exchange.as_str().into(),
                config.amqp.routing_key.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                b,
                shared::broker::json_properties(None),
            )
            .await?,
        );
    }
    for p in pending {
        if p.await?.is_nack() {
            bail!("broker nacked a test publish");
        }
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Messages waiting in a queue.
pub async fn queue_depth(config: &Config, queue: &str) -> anyhow::Result<u32> {
    Ok(queue_counts(config, queue).await?.0)
}

/// Consumers of the request queue (a started worker is consuming when this is above 0).
pub async fn queue_consumers(config: &Config) -> anyhow::Result<u32> {
    Ok(queue_counts(config, &config.amqp.queue).await?.1)
}

/// A queue's messages and consumers; 0 and 0 for a queue not declared yet.
async fn queue_counts(config: &Config, queue: &str) -> anyhow::Result<(u32, u32)> {
    let conn = shared::broker::connect(&config.amqp_url, "test-depth").await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let counts = match q {
        Ok(q) => (q.message_count(), q.consumer_count()),
        // A passive declare of a missing queue closes the channel with 404.
        Err(_) => (0, 0),
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(counts)
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The most of these instants any one-second window (sliding) holds: what a rate limit bounds.
pub fn max_per_second(mut at: Vec<chrono::DateTime<chrono::Utc>>) -> usize {
    at.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..at.len() {
        while at[end] - at[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A free `127.0.0.1:port` for a child's listener (a worker's `metrics_addr`).
pub fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// A minimal HTTP/1.1 request: `headers`, and `body` sent as a form; the status and the whole
/// answer, its headers included.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// A minimal HTTP/1.1 GET; the status and the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, text) = http_request(addr, "GET", path, &[], "").await?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `http://{addr}/readyz` until it answers 200 (`ready`) or 503 (not `ready`).
pub async fn wait_ready(addr: &str, ready: bool, within: Duration) -> anyhow::Result<()> {
    let want = if ready { 200 } else { 503 };
    let deadline = Instant::now() + within;
    loop {
        let status = http_get(addr, "/readyz").await.map(|(s, _)| s).unwrap_or(0);
        if status == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("http://{addr}/readyz stayed {status} (not {want}) for {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a config as TOML to a temporary file (named `{prefix}….toml`) for a child process;
/// dropping the file deletes it.
pub fn toml_file<T: serde::Serialize>(
    prefix: &str,
    config: &T,
) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".toml")
        .tempfile()?;
    std::io::Write::write_all(&mut f, toml::to_string(config)?.as_bytes())?;
    Ok(f)
}

/// A valid v1 request body for tests.
pub fn request_json(
    refund_no: &str,
    order_no: &str,
    provider: ProviderKind,
    merchant: &str,
    total: i64,
    refund: i64,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "version": 1,
        "refund_no": refund_no,
        "order_no": order_no,
        "provider": provider.as_str(),
        "merchant": merchant,
        "total_fee": total,
        "refund_fee": refund,
        "reason": "test refund",
    });
    if provider == ProviderKind::Wupay {
        v["wupay"] = serde_json::json!({
            "pay_nd": "P0001", "auth_type": "1", "rec_organ": "S01", "rec_device": "T01", "rec_man": "op7"
        });
    }
    v
}

/// A provider fake for worker tests (protocol tests use the simulator): it pays each
/// `refund_no` once, answers a repeat with the first result like a real provider, and can be
/// told to decline or to fail in transport for given refunds.
pub struct FakeProvider {
    kind: ProviderKind,
    merchant: String,
    idempotent: bool,
    /// Processes refunds after accepting them, like ShengPay: the job waits in `accepted`, and
    /// the status query says how it ended.
    asynchronous: bool,
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    paid: HashMap<String, i64>,
    calls: HashMap<String, u32>,
    script: HashMap<String, Vec<Outcome>>,
    queries: HashMap<String, u32>,
    query_script: HashMap<String, Vec<QueryOutcome>>,
}

impl FakeProvider {
    pub fn new(kind: ProviderKind, merchant: &str, idempotent: bool) -> Arc<Self> {
        Arc::new(Self {
            kind,
            merchant: merchant.to_owned(),
            idempotent,
            asynchronous: false,
            state: Mutex::new(FakeState::default()),
        })
    }

    /// A provider that ends refunds after accepting them. Unless scripted, its status query
    /// says `SUCCESS` (settled in full, now) for a refund it took and "no such refund" for
    /// one it did not.
    pub fn asynchronous(kind: ProviderKind, merchant: &str, idempotent: bool) -> Arc<Self> {
        Arc::new(Self {
            kind,
            merchant: merchant.to_owned(),
            idempotent,
            asynchronous: true,
            state: Mutex::new(FakeState::default()),
        })
    }

    /// The next status queries for `refund_no` answer these, in order.
    pub fn script_queries(&self, refund_no: &str, outcomes: Vec<QueryOutcome>) {
        if let Ok(mut s) = self.state.lock() {
            s.query_script.insert(refund_no.to_owned(), outcomes);
        }
    }

    /// Status queries received per refund_no.
    pub fn queries(&self) -> HashMap<String, u32> {
        self.state
            .lock()
            .map(|s| s.queries.clone())
            .unwrap_or_default()
    }

    /// The next calls for `refund_no` answer these outcomes, in order (then it pays).
    pub fn script(&self, refund_no: &str, outcomes: Vec<Outcome>) {
        if let Ok(mut s) = self.state.lock() {
            s.script.insert(refund_no.to_owned(), outcomes);
        }
    }

    /// What it paid: refund_no → refund_fee.
    pub fn paid(&self) -> HashMap<String, i64> {
        self.state
            .lock()
            .map(|s| s.paid.clone())
            .unwrap_or_default()
    }

    /// Calls received per refund_no.
    pub fn calls(&self) -> HashMap<String, u32> {
        self.state
            .lock()
            .map(|s| s.calls.clone())
            .unwrap_or_default()
    }
}

/// The next scripted answer for `refund_no`, taken off its list.
fn next_scripted<T>(script: &mut HashMap<String, Vec<T>>, refund_no: &str) -> Option<T> {
    script
        .get_mut(refund_no)
        .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
}

#[async_trait]
impl Provider for FakeProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }
    fn merchant(&self) -> &str {
        &self.merchant
    }
    fn idempotent(&self) -> bool {
        self.idempotent
    }
    fn final_on_accept(&self) -> bool {
        !self.asynchronous
    }
    async fn query(&self, r: &RefundRequest) -> Option<QueryRecord> {
        if !self.asynchronous {
            return None;
        }
        let outcome = match self.state.lock() {
            Ok(mut s) => {
                *s.queries.entry(r.refund_no.clone()).or_default() += 1;
                match next_scripted(&mut s.query_script, &r.refund_no) {
                    Some(o) => o,
                    None if s.paid.contains_key(&r.refund_no) => {
                        QueryOutcome::Status(StatusReport {
                            refund_no: r.refund_no.clone(),
                            status: RefundStatus::Success {
                                provider_refund_id: format!("FAKE-{}", r.refund_no),
                                settlement_refund_fee: r.refund_fee,
                                success_time: chrono::Utc::now(),
                            },
                            raw: "{}".into(),
                        })
                    }
                    None => QueryOutcome::NotFound { raw: "{}".into() },
                }
            }
            Err(_) => QueryOutcome::Unanswered {
                error: "fake provider poisoned".into(),
                raw: None,
            },
        };
        Some(QueryRecord {
            outcome,
            request_redacted: r.refund_no.clone(),
            http_status: Some(200),
            latency: Duration::from_millis(1),
        })
    }
    async fn refund(&self, call: RefundCall<'_>) -> AttemptRecord {
        let r: &RefundRequest = call.request;
        let outcome = match self.state.lock() {
            Ok(mut s) => {
                *s.calls.entry(r.refund_no.clone()).or_default() += 1;
                match next_scripted(&mut s.script, &r.refund_no) {
                    Some(o) => o,
                    None => {
                        s.paid.entry(r.refund_no.clone()).or_insert(r.refund_fee);
                        Outcome::Accepted {
                            provider_refund_id: format!("FAKE-{}", r.refund_no),
                            refund_fee: r.refund_fee,
                            settlement_refund_fee: r.refund_fee,
                            coupon_refund_fee: 0,
                            raw: "{}".into(),
                        }
                    }
                }
            }
            Err(_) => Outcome::NotSent {
                error: "fake provider poisoned".into(),
            },
        };
        AttemptRecord {
            outcome,
            request_redacted: r.canonical_json(),
            http_status: Some(200),
            latency: Duration::from_millis(1),
        }
    }
}

/// A registry of fake clients, one per (provider, merchant, idempotent): what intake admits
/// against in tests that take messages in without a worker.
pub fn fake_registry(merchants: &[(ProviderKind, &str, bool)]) -> Registry {
    let mut registry = Registry::default();
    for (kind, merchant, idempotent) in merchants {
        registry.insert(FakeProvider::new(*kind, merchant, *idempotent));
    }
    registry
}

/// The workspace root (tests run in their crate's folder; this crate is `tools/testkit`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

/// `path`, relative to the workspace root unless it is absolute.
pub fn absolutise(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        workspace_root().join(path)
    }
}

/// `config/sim.toml`'s merchants and keys (paths made absolute) with these fault rules in place
/// of the demo's and this share of coupon refunds. ShengPay refunds end (and their notifies go
/// out) as they are accepted, not after the file's processing time: tests wait on ends, and a
/// test that needs a refund to stay `PROCESSING` sets `shengpay.processing_ms` itself.
pub fn local_sim_config(
    rules: Vec<refund_sim::FaultRule>,
    coupon_rate: f64,
) -> anyhow::Result<refund_sim::SimConfig> {
    let mut c = refund_sim::SimConfig::load(&workspace_root().join("config/sim.toml"))?;
    c.platform_private_key_file = absolutise(&c.platform_private_key_file);
    for m in &mut c.shengpay.merchants {
        m.public_key_file = absolutise(&m.public_key_file);
    }
    for m in &mut c.wupay.merchants {
        m.rfkey_file = absolutise(&m.rfkey_file);
    }
    c.rules = rules;
    c.coupon_rate = coupon_rate;
    c.shengpay.processing_ms = 0;
    Ok(c)
}

/// Points `c`'s merchants at a simulator at `base_url` (keys made absolute); `wupay_url` gives
/// a WuPay merchant's service URL. ShengPay's notifies come back to this worker: its notify
/// listener gets a free port if it has none yet, and every merchant's `notify_url` names it.
pub fn point_merchants(
    c: &mut Config,
    base_url: &str,
    wupay_url: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    if c.notify.addr.ends_with(":0") {
        c.notify.addr = free_addr()?;
    }
    let notify_url = format!("http://{}/notify/shengpay", c.notify.addr);
    // The simulator speaks plain http on 127.0.0.1 (DESIGN §5 allows it only by this flag).
    c.http.allow_plain_http = true;
    for m in &mut c.shengpay.merchants {
        m.base_url = base_url.to_owned();
        m.notify_url = notify_url.clone();
        m.private_key_file = absolutise(&m.private_key_file);
        m.platform_public_key_file = absolutise(&m.platform_public_key_file);
    }
    for m in &mut c.wupay.merchants {
        m.base_url = wupay_url(&m.merchant)
            .with_context(|| format!("the simulator has no WuPay merchant {}", m.merchant))?;
        m.rfkey_file = absolutise(&m.rfkey_file);
    }
    Ok(())
}

/// Starts the simulator with `config/sim.toml`'s merchants and keys on a free port, with the
/// given fault rules instead of the file's demo rules.
pub async fn start_sim(
    rules: Vec<refund_sim::FaultRule>,
    coupon_rate: f64,
) -> anyhow::Result<refund_sim::SimHandle> {
    let mut c = local_sim_config(rules, coupon_rate)?;
    c.listen = "127.0.0.1:0".parse()?;
    Ok(refund_sim::Simulator::start(c).await?)
}

/// `config` with the merchants of `config/refunds.toml`, pointed at an address where nothing
/// listens (127.0.0.1:9): for tests of a worker that must start but never reach a provider.
pub fn with_dev_merchants(config: &mut Config) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(workspace_root().join("config/refunds.toml"))?;
    let dev = Config::from_toml(&text)?;
    config.shengpay = dev.shengpay;
    config.wupay = dev.wupay;
    point_merchants(config, "http://127.0.0.1:9", |m| {
        Some(format!("http://127.0.0.1:9/{m}/WuPay.asmx"))
    })
}

/// `base` with the merchants of `config/refunds.toml`, pointed at a running simulator.
pub fn with_sim_merchants(base: &Config, sim: &refund_sim::SimHandle) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(workspace_root().join("config/refunds.toml"))?;
    let dev = Config::from_toml(&text)?;
    let mut c = base.clone();
    c.shengpay = dev.shengpay;
    c.wupay = dev.wupay;
    point_merchants(&mut c, &sim.base_url(), |m| sim.wupay_url(m))?;
    Ok(c)
}

/// A child process of a test (the real binary) that is killed when dropped, so a test that
/// fails half-way leaves no process running into the next ones.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Asks it to stop (SIGTERM), as an orchestrator would, and waits for it.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(self.0.wait()?)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
