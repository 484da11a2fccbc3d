//! Configuration: built-in defaults, then a TOML file, then `REFUNDS__SECTION__KEY` variables.
//!
//! This module owns every setting the binaries read and their validation. Defaults work against
//! the local services, so `refund-worker` with no file runs on a developer machine. Validation
//! happens once at start and names the offending key; a process never starts half-configured.
//! Secrets (private keys, `rfkey`) are not in the file: the file names the files that hold them,
//! and they are read into [`Secret`] values whose `Debug` and `Display` print `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::provider::CodeClass;

mod console;
mod finality;
mod flow;
mod operator;
mod reconciler;

pub use console::ConsoleConfig;
pub use finality::{NotifyConfig, QueryConfig};
pub use flow::{FlowConfig, LimitConfig};
pub use operator::OperatorConfig;
pub use reconciler::{ReconcilerConfig, StatementSource, fill as fill_statement_template};

/// The environment variable prefix; `REFUNDS__WORKER__PREFETCH=64` sets `worker.prefetch`.
pub const ENV_PREFIX: &str = "REFUNDS__";
/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "refunds.toml";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration key `{key}`: cannot read {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A secret value. Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that must send or use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Reads a secret file named by config key `key`, trimming surrounding whitespace.
    pub fn read_file(key: &str, path: &Path) -> Result<Self, ConfigError> {
        std::fs::read_to_string(path)
            .map(|s| Secret(s.trim().to_owned()))
            .map_err(|source| ConfigError::SecretFile {
                key: key.to_owned(),
                path: path.to_owned(),
                source,
            })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Everything the binaries read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    /// IANA time zone of the business day (ledger dates, reconciliation).
    pub timezone: String,
    pub amqp: AmqpConfig,
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub http: HttpConfig,
    pub shengpay: ShengpayConfig,
    pub wupay: WupayConfig,
    pub reconciler: ReconcilerConfig,
    pub notify: NotifyConfig,
    pub operator: OperatorConfig,
    pub console: ConsoleConfig,
    /// `[[limits]]`: per (provider, merchant) call budgets shared by every replica.
    pub limits: Vec<LimitConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/refunds".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            timezone: "Asia/Shanghai".into(),
            amqp: AmqpConfig::default(),
            database: DatabaseConfig::default(),
            worker: WorkerConfig::default(),
            http: HttpConfig::default(),
            shengpay: ShengpayConfig::default(),
            wupay: WupayConfig::default(),
            reconciler: ReconcilerConfig::default(),
            notify: NotifyConfig::default(),
            operator: OperatorConfig::default(),
            console: ConsoleConfig::default(),
            limits: Vec::new(),
        }
    }
}

/// Broker topology names. The defaults are the contract names (DESIGN §3, §6); tests override
/// them so that each test has its own exchanges and queues on one broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub events_exchange: String,
    /// Queue type for the work and dead-letter queues: `quorum` in a cluster, `classic` for a
    /// single local node.
    pub queue_type: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            exchange: "refunds".into(),
            queue: "refunds.requested".into(),
            routing_key: "refund.requested".into(),
            dead_letter_exchange: "refunds.dlx".into(),
            dead_letter_queue: "refunds.dead".into(),
            events_exchange: "refunds.events".into(),
            queue_type: "classic".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// Apply migrations at start (the worker); `refundctl migrate` does it explicitly.
    pub migrate_on_start: bool,
    /// PEM file of the CA(s) that sign the database server's certificate, for
    /// `sslmode=verify-full` (or `verify-ca`) in `database_url`. Unset: the system's CA store.
    /// Read at every new connection, so a rotated CA file is picked up without a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssl_root_cert: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            migrate_on_start: true,
            ssl_root_cert: None,
        }
    }
}

impl DatabaseConfig {
    /// A CA file must hold at least one PEM certificate, and `database_url` must ask for the
    /// server's certificate to be checked: with `sslmode=prefer` or `require` the CA would be
    /// loaded and then ignored, which looks safe and is not.
    fn validate(&self, database_url: &str) -> Result<(), ConfigError> {
        const KEY: &str = "database.ssl_root_cert";
        let Some(path) = &self.ssl_root_cert else {
            return Ok(());
        };
        let pem = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
            key: KEY.to_owned(),
            path: path.clone(),
            source,
        })?;
        if openssl::x509::X509::stack_from_pem(&pem).map_or(true, |certs| certs.is_empty()) {
            return Err(ConfigError::invalid(
                KEY,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        let mode = database_url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| ConfigError::invalid("database_url", e.to_string()))?
            .get_ssl_mode();
        use sqlx::postgres::PgSslMode;
        let unchecked = match mode {
            PgSslMode::VerifyFull | PgSslMode::VerifyCa => return Ok(()),
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
        };
        Err(ConfigError::invalid(
            KEY,
            format!(
                "is set, but database_url's sslmode is {unchecked}, which does not check the \
                 server's certificate: add sslmode=verify-full to database_url"
            ),
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// AMQP prefetch (unacked deliveries per consumer); at least the in-flight target.
    pub prefetch: u16,
    /// Provider calls in flight at once in one worker process.
    pub concurrency: usize,
    /// How long a claim holds a job before the sweeper may take it back.
    pub lease_ms: u64,
    /// Safety margin: a worker does not send when less than this is left on its lease.
    pub lease_margin_ms: u64,
    pub retry: RetryConfig,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
    /// How often the sweeper looks for expired leases, due retries and orphaned jobs.
    pub sweep_interval_ms: u64,
    /// Each sweep looks at the jobs created this recently, by index; older ones wait for a
    /// full sweep. Longer than `lease_ms` and `orphan_after_ms`, so that recovering from a
    /// crash never waits for one.
    pub sweep_recent_ms: u64,
    /// How often a sweep reads every job, sequentially (the table's whole history): for jobs
    /// older than `sweep_recent_ms` still open (long retries, replays of old jobs).
    pub full_sweep_interval_ms: u64,
    /// A `received` job older than this with no worker on it is taken by the sweeper (its
    /// worker died between intake and claim).
    pub orphan_after_ms: u64,
    /// A non-final job older than this raises a warning (and shows in the stuck-job metric).
    pub stuck_after_ms: u64,
    /// How long a SIGTERM waits for in-flight work before exiting anyway.
    pub shutdown_grace_ms: u64,
    /// How many deliveries the intake gathers into one transaction at most.
    pub intake_batch: usize,
    /// How many claims, or recorded outcomes, the writer puts into one statement at most.
    pub write_batch: usize,
    /// Writer tasks: how many claim/outcome statements one worker process runs at once.
    pub writers: usize,
    /// How long the outbox relay sleeps when it finds nothing to publish.
    pub outbox_poll_ms: u64,
    /// The status queries of jobs waiting for the provider's end.
    pub query: QueryConfig,
    /// Rate limits, slow-down and pause (`[worker.flow]`).
    pub flow: FlowConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            prefetch: 512,
            concurrency: 256,
            lease_ms: 30_000,
            lease_margin_ms: 2_000,
            retry: RetryConfig::default(),
            metrics_addr: "127.0.0.1:9464".into(),
            sweep_interval_ms: 1_000,
            sweep_recent_ms: 3_600_000,
            full_sweep_interval_ms: 60_000,
            orphan_after_ms: 10_000,
            stuck_after_ms: 15 * 60_000,
            shutdown_grace_ms: 20_000,
            intake_batch: 64,
            write_batch: 128,
            writers: 2,
            outbox_poll_ms: 200,
            query: QueryConfig::default(),
            flow: FlowConfig::default(),
        }
    }
}

impl WorkerConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// Exponential backoff with equal jitter, capped, bounded by attempts and age.
///
/// The defaults keep a job at an idempotent merchant alive through a one-hour outage even when
/// nothing pauses it: the delay after call n is drawn from [c/2, c] with
/// c = min(200 ms × 2^(n-1), 10 min), so the 23 waits between its 24 counted calls last at
/// least 1 h 01 min and at most 2 h 03 min (see the README, "Retries and outages").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: u32,
    /// Counted provider calls at most, the first included.
    pub max_attempts: i32,
    /// A job older than this is not retried again.
    pub max_age_ms: u64,
    /// Retries due sooner than this wait in the worker; later ones go back to Postgres and the
    /// sweeper picks them up.
    pub in_process_max_ms: u64,
    /// Calls answered "too many requests" (throttled), and failed probes of a paused
    /// merchant, are not counted against `max_attempts`, up to this many over a job's life;
    /// past it they count like any failure.
    pub max_uncounted: i32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay_ms: 200,
            max_delay_ms: 600_000,
            multiplier: 2,
            max_attempts: 24,
            max_age_ms: 24 * 3_600_000,
            in_process_max_ms: 2_000,
            max_uncounted: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub connect_timeout_ms: u64,
    /// Whole-request timeout, connect to last byte.
    pub timeout_ms: u64,
    /// Responses larger than this are not read (and the attempt is "maybe delivered").
    pub max_response_bytes: usize,
    pub pool_max_idle_per_host: usize,
    /// Accept `http://` provider URLs. For the local simulator and tests only: see
    /// [`HttpConfig::check_url`].
    pub allow_plain_http: bool,
}

impl HttpConfig {
    /// The whole-request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }

    /// The https rule (DESIGN §5): a URL the system sends refunds to or takes payment evidence
    /// from must be `https://`, unless `[http] allow_plain_http = true`. Every such key is
    /// checked with this one function, so that the rule and its message are the same
    /// everywhere: the merchants' `base_url` today, statement URLs as they are added.
    ///
    /// Why it is not a recommendation: WuPay's answers are not signed, so on plain http anyone
    /// on the path can book a refund as paid or failed; ShengPay's are signed, but its requests
    /// and the refund amounts would still travel in clear text. `key` names the setting in the
    /// error (`wupay.merchants[2].base_url`).
    pub fn check_url(&self, key: &str, url: &str) -> Result<(), ConfigError> {
        let parsed = reqwest::Url::parse(url)
            .ok()
            .filter(|u| u.host_str().is_some_and(|h| !h.is_empty()));
        match parsed.as_ref().map(reqwest::Url::scheme) {
            Some("https") => Ok(()),
            Some("http") if self.allow_plain_http => Ok(()),
            Some("http") => Err(ConfigError::invalid(
                key,
                format!(
                    "{url:?} is plain http: provider URLs must be https:// (answers on plain \
                     http can be forged by anyone on the path); set [http] allow_plain_http = \
                     true only for a local simulator or tests"
                ),
            )),
            _ => Err(ConfigError::invalid(
                key,
                format!("{url:?} must be an https:// URL with a host"),
            )),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            max_response_bytes: 256 * 1024,
            pool_max_idle_per_host: 128,
            allow_plain_http: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShengpayConfig {
    pub merchants: Vec<ShengpayMerchant>,
    /// Overrides of the code table, e.g. `SYSTEMERROR = "declined"`.
    pub codes: BTreeMap<String, CodeClass>,
}

/// ShengPay signature algorithm: `RSA` is SHA1withRSA, `RSA2` is SHA256withRSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignType {
    #[serde(rename = "RSA")]
    Rsa,
    #[serde(rename = "RSA2")]
    Rsa2,
}

impl SignType {
    pub fn as_str(self) -> &'static str {
        match self {
            SignType::Rsa => "RSA",
            SignType::Rsa2 => "RSA2",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShengpayMerchant {
    pub merchant: String,
    pub base_url: String,
    pub app_id: String,
    pub mch_id: String,
    #[serde(default = "default_sign_type")]
    pub sign_type: SignType,
    pub private_key_file: PathBuf,
    pub platform_public_key_file: PathBuf,
    pub notify_url: String,
    #[serde(default = "default_true")]
    pub idempotent: bool,
    /// The status query's path under `base_url`.
    #[serde(default = "default_query_path")]
    pub query_path: String,
    /// Treat `resultCode SUCCESS` on the refund call as the refund's end (a product that
    /// settles synchronously); by default it means accepted, and the end comes by notify or
    /// status query.
    #[serde(default)]
    pub final_on_accept: bool,
}

fn default_query_path() -> String {
    "/api/v3/payment/refundquery".to_owned()
}

fn default_sign_type() -> SignType {
    SignType::Rsa
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WupayConfig {
    pub merchants: Vec<WupayMerchant>,
}

/// How a WuPay merchant's `.asmx` service is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WupayBinding {
    Soap11,
    Soap12,
    HttpPost,
    HttpGet,
}

impl WupayBinding {
    pub fn as_str(self) -> &'static str {
        match self {
            WupayBinding::Soap11 => "soap11",
            WupayBinding::Soap12 => "soap12",
            WupayBinding::HttpPost => "http_post",
            WupayBinding::HttpGet => "http_get",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WupayMerchant {
    pub merchant: String,
    /// The service address including `WuPay.asmx`.
    pub base_url: String,
    #[serde(default = "default_binding")]
    pub binding: WupayBinding,
    pub cpn_id: String,
    pub area: String,
    pub rfkey_file: PathBuf,
    /// WuPay's deduplication on `refund_id` is undocumented: off unless confirmed.
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default = "default_success_results")]
    pub success_results: Vec<String>,
    #[serde(default = "default_failure_prefixes")]
    pub failure_prefixes: Vec<String>,
}

fn default_binding() -> WupayBinding {
    WupayBinding::Soap11
}

fn default_success_results() -> Vec<String> {
    vec!["SUCCESS".into()]
}

fn default_failure_prefixes() -> Vec<String> {
    vec!["FAIL".into()]
}

impl Config {
    /// Loads defaults, then `file` (or `refunds.toml` if present), then the environment, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(f) => {
                if !f.exists() {
                    return Err(ConfigError::invalid(
                        "--config",
                        format!("file {} does not exist", f.display()),
                    ));
                }
                fig = fig.merge(Toml::file_exact(f));
            }
            None => {
                if Path::new(DEFAULT_FILE).exists() {
                    fig = fig.merge(Toml::file_exact(DEFAULT_FILE));
                }
            }
        }
        Self::from_figment(fig.merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// Loads from TOML text (and nothing else): for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let c: Config = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        c.validate()?;
        Ok(c)
    }

    /// The configured time zone.
    pub fn tz(&self) -> Result<chrono_tz::Tz, ConfigError> {
        self.timezone
            .parse::<chrono_tz::Tz>()
            .map_err(|e| ConfigError::invalid("timezone", e.to_string()))
    }

    /// Checks what types alone cannot; every error names its key.
    /// How long after the last claim's lease ended a stalled worker may still be sending:
    /// the HTTP timeout plus the lease margin. Manual resolution waits for it.
    pub fn resolve_quiet(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.http
                .timeout_ms
                .saturating_add(self.worker.lease_margin_ms),
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tz()?;
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(ConfigError::invalid(
                "database_url",
                "must start with postgres:// or postgresql://",
            ));
        }
        self.database.validate(&self.database_url)?;
        if !self.amqp_url.starts_with("amqp://") && !self.amqp_url.starts_with("amqps://") {
            return Err(ConfigError::invalid(
                "amqp_url",
                "must start with amqp:// or amqps://",
            ));
        }
        if !matches!(self.amqp.queue_type.as_str(), "classic" | "quorum") {
            return Err(ConfigError::invalid(
                "amqp.queue_type",
                "must be classic or quorum",
            ));
        }
        let w = &self.worker;
        if w.prefetch == 0 {
            return Err(ConfigError::invalid(
                "worker.prefetch",
                "must be at least 1",
            ));
        }
        if w.concurrency == 0 {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "must be at least 1",
            ));
        }
        if w.intake_batch == 0 {
            return Err(ConfigError::invalid(
                "worker.intake_batch",
                "must be at least 1",
            ));
        }
        if w.write_batch == 0 {
            return Err(ConfigError::invalid(
                "worker.write_batch",
                "must be at least 1",
            ));
        }
        if w.writers == 0 {
            return Err(ConfigError::invalid("worker.writers", "must be at least 1"));
        }
        if w.lease_margin_ms >= w.lease_ms {
            return Err(ConfigError::invalid(
                "worker.lease_margin_ms",
                "must be shorter than worker.lease_ms",
            ));
        }
        if self.http.timeout_ms + w.lease_margin_ms > w.lease_ms {
            return Err(ConfigError::invalid(
                "worker.lease_ms",
                format!(
                    "must be at least http.timeout_ms + worker.lease_margin_ms ({} ms): a lease \
                     must outlive the provider call it covers",
                    self.http.timeout_ms + w.lease_margin_ms
                ),
            ));
        }
        if w.sweep_recent_ms <= w.lease_ms.max(w.orphan_after_ms) {
            return Err(ConfigError::invalid(
                "worker.sweep_recent_ms",
                format!(
                    "must be longer than worker.lease_ms and worker.orphan_after_ms ({} ms), so \
                     that expired leases and orphaned jobs are found by every sweep",
                    w.lease_ms.max(w.orphan_after_ms)
                ),
            ));
        }
        if w.full_sweep_interval_ms < w.sweep_interval_ms {
            return Err(ConfigError::invalid(
                "worker.full_sweep_interval_ms",
                "must be at least worker.sweep_interval_ms",
            ));
        }
        if w.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "worker.metrics_addr",
                format!("{:?} is not an address like 0.0.0.0:9464", w.metrics_addr),
            ));
        }
        w.query.validate(self.http.timeout_ms)?;
        w.flow.validate()?;
        let merchants: Vec<(crate::job::ProviderKind, &str)> = self
            .shengpay
            .merchants
            .iter()
            .map(|m| (crate::job::ProviderKind::Shengpay, m.merchant.as_str()))
            .chain(
                self.wupay
                    .merchants
                    .iter()
                    .map(|m| (crate::job::ProviderKind::Wupay, m.merchant.as_str())),
            )
            .collect();
        flow::validate_limits(&self.limits, &merchants)?;
        self.notify.validate(&w.metrics_addr)?;
        self.operator.validate()?;
        self.console.validate()?;
        let r = &w.retry;
        if r.max_attempts < 1 {
            return Err(ConfigError::invalid(
                "worker.retry.max_attempts",
                "must be at least 1",
            ));
        }
        if r.multiplier < 1 {
            return Err(ConfigError::invalid(
                "worker.retry.multiplier",
                "must be at least 1",
            ));
        }
        if r.initial_delay_ms == 0 || r.initial_delay_ms > r.max_delay_ms {
            return Err(ConfigError::invalid(
                "worker.retry.initial_delay_ms",
                "must be at least 1 and at most worker.retry.max_delay_ms",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.shengpay.merchants.iter().enumerate() {
            let key = |k: &str| format!("shengpay.merchants[{i}].{k}");
            if m.merchant.is_empty() {
                return Err(ConfigError::invalid(key("merchant"), "must not be empty"));
            }
            if !seen.insert(("shengpay", m.merchant.as_str())) {
                return Err(ConfigError::invalid(
                    key("merchant"),
                    format!("merchant {:?} is configured twice", m.merchant),
                ));
            }
            self.http.check_url(&key("base_url"), &m.base_url)?;
            for (k, v) in [
                ("app_id", &m.app_id),
                ("mch_id", &m.mch_id),
                ("notify_url", &m.notify_url),
            ] {
                if v.is_empty() {
                    return Err(ConfigError::invalid(key(k), "must not be empty"));
                }
            }
            if !m.query_path.starts_with('/') {
                return Err(ConfigError::invalid(
                    key("query_path"),
                    "must start with / (a path under base_url)",
                ));
            }
        }
        for (i, m) in self.wupay.merchants.iter().enumerate() {
            let key = |k: &str| format!("wupay.merchants[{i}].{k}");
            if m.merchant.is_empty() {
                return Err(ConfigError::invalid(key("merchant"), "must not be empty"));
            }
            if !seen.insert(("wupay", m.merchant.as_str())) {
                return Err(ConfigError::invalid(
                    key("merchant"),
                    format!("merchant {:?} is configured twice", m.merchant),
                ));
            }
            self.http.check_url(&key("base_url"), &m.base_url)?;
            if m.success_results.is_empty() {
                return Err(ConfigError::invalid(
                    key("success_results"),
                    "must list at least one value",
                ));
            }
            if m.failure_prefixes.iter().any(String::is_empty) {
                return Err(ConfigError::invalid(
                    key("failure_prefixes"),
                    "an empty prefix would match every result",
                ));
            }
        }
        self.reconciler
            .validate(&self.http, |provider| match provider {
                "shengpay" => self.shengpay.merchants.len(),
                "wupay" => self.wupay.merchants.len(),
                _ => 0,
            })?;
        if self.reconciler.schedule.parse::<cron::Schedule>().is_err() {
            return Err(ConfigError::invalid(
                "reconciler.schedule",
                format!(
                    "{:?} is not a cron expression (sec min hour day month weekday)",
                    self.reconciler.schedule
                ),
            ));
        }
        Ok(())
    }

    /// `database_url` with any password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url)
    }

    /// `amqp_url` with any password replaced, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(&self.amqp_url)
    }
}

/// Replaces the password in `scheme://user:password@host/...` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_point_at_local_services() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.database_url, "postgres://postgres@127.0.0.1:5432/refunds");
        assert_eq!(c.amqp.exchange, "refunds");
        assert_eq!(c.tz().unwrap(), chrono_tz::Asia::Shanghai);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[worker]\nprefetch = 0\n").unwrap_err();
        assert!(e.to_string().contains("worker.prefetch"), "{e}");
        let e = Config::from_toml("timezone = \"Mars/Olympus\"\n").unwrap_err();
        assert!(e.to_string().contains("timezone"), "{e}");
        let e = Config::from_toml("[worker]\nprefetchh = 3\n").unwrap_err();
        assert!(e.to_string().contains("prefetchh"), "{e}");
        let e = Config::from_toml(
            "[[wupay.merchants]]\nmerchant='w'\nbase_url='ftp://x'\ncpn_id='c'\narea='a'\nrfkey_file='k'\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("wupay.merchants[0].base_url"), "{e}");
        let e = Config::from_toml("[worker]\nsweep_recent_ms = 20000\n").unwrap_err();
        assert!(e.to_string().contains("worker.sweep_recent_ms"), "{e}");
        let e = Config::from_toml("[worker]\nfull_sweep_interval_ms = 10\n").unwrap_err();
        assert!(
            e.to_string().contains("worker.full_sweep_interval_ms"),
            "{e}"
        );
    }

    fn wupay_merchant(name: &str, base_url: &str) -> String {
        format!(
            "[[wupay.merchants]]\nmerchant='{name}'\nbase_url='{base_url}'\ncpn_id='c'\n\
             area='a'\nrfkey_file='k'\n"
        )
    }

    #[test]
    fn a_plain_http_provider_url_is_refused_naming_the_key_unless_allowed() {
        let merchants = [
            wupay_merchant("w0", "https://wupay.example/WuPay.asmx"),
            wupay_merchant("w1", "https://wupay.example/WuPay.asmx"),
            wupay_merchant("w2", "http://wupay.example/WuPay.asmx"),
        ]
        .concat();
        let e = Config::from_toml(&merchants).unwrap_err().to_string();
        assert!(e.contains("wupay.merchants[2].base_url"), "{e}");
        assert!(e.contains("allow_plain_http"), "{e}");

        let shengpay = "[[shengpay.merchants]]\nmerchant='s'\nbase_url='http://127.0.0.1:1'\n\
                        app_id='a'\nmch_id='m'\nprivate_key_file='k'\n\
                        platform_public_key_file='p'\nnotify_url='http://n/'\n";
        let e = Config::from_toml(shengpay).unwrap_err().to_string();
        assert!(e.contains("shengpay.merchants[0].base_url"), "{e}");

        let allowed = format!("[http]\nallow_plain_http = true\n{merchants}{shengpay}");
        let c = Config::from_toml(&allowed).unwrap();
        assert!(c.http.allow_plain_http);
        // Allowing http does not allow anything else.
        let e = Config::from_toml(&format!(
            "[http]\nallow_plain_http = true\n{}",
            wupay_merchant("w", "https://")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("wupay.merchants[0].base_url"), "{e}");
    }

    #[test]
    fn https_provider_urls_need_no_flag_and_the_flag_is_off_by_default() {
        assert!(!HttpConfig::default().allow_plain_http);
        let c = Config::from_toml(&wupay_merchant(
            "w",
            "HTTPS://WuPay.Example:8443/WuPay.asmx",
        ))
        .unwrap();
        assert_eq!(c.wupay.merchants.len(), 1);
        let h = HttpConfig::default();
        assert!(
            h.check_url("k", "https://statements.example/2026-12-03.csv")
                .is_ok()
        );
        let e = h
            .check_url("reconciler.statements.x", "http://s/")
            .unwrap_err();
        assert!(e.to_string().contains("reconciler.statements.x"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's, not ours
    fn environment_overrides_file_values() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("r.toml", "[worker]\nprefetch = 10\nconcurrency = 3\n")?;
            jail.set_env("REFUNDS__WORKER__PREFETCH", "77");
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.worker.prefetch, 77);
            assert_eq!(c.worker.concurrency, 3);
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(
            redact_url("postgres://u:pw@h/db"),
            "postgres://u:***@h/db".to_owned()
        );
    }
}
