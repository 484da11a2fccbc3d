//! The simulator's configuration file (TOML, see `config/sim.toml` for every key documented).
//!
//! It holds only names and file paths; [`SimConfig::validate`] checks everything that can be
//! checked without touching the disk, and the server loads keys when it starts, so a bad
//! config fails at start rather than on the first request. Relative file paths are resolved
//! against the process's working directory (run from the workspace root: `keys/dev/...`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::faults::FaultRule;
use super::limits::SimLimit;
use super::{Provider, SimError};

/// Top-level configuration. Every field except `platform_private_key_file` has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Address to bind; port 0 picks a free port (see [`super::SimHandle::addr`]).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// IANA time zone that defines a statement's business date.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The simulated ShengPay platform key that signs every ShengPay response.
    pub platform_private_key_file: PathBuf,
    /// Share (0..=1) of ShengPay refunds that get a non-cash coupon part, picked from a hash of
    /// the refund number so reruns agree.
    #[serde(default)]
    pub coupon_rate: f64,
    /// Share (0..=1) of ShengPay responses that write amounts as JSON strings.
    #[serde(default)]
    pub string_amounts_rate: f64,
    /// Delay added before every provider call is handled.
    #[serde(default)]
    pub latency_ms: u64,
    /// Seed of the random source behind rule rates, string amounts and nonces.
    #[serde(default)]
    pub seed: u64,
    /// How long a `hang` fault holds a request before closing the connection unanswered.
    #[serde(default = "default_hang_max_ms")]
    pub hang_max_ms: u64,
    /// Upper bound on simultaneously open connections (accepting waits beyond it).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request body accepted; larger ones get HTTP 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How many call records are kept; the oldest are dropped beyond it.
    #[serde(default = "default_call_log_capacity")]
    pub call_log_capacity: usize,
    #[serde(default)]
    pub shengpay: ShengPaySection,
    #[serde(default)]
    pub wupay: WuPaySection,
    /// Fault rules active from the start (replaceable at run time).
    #[serde(default)]
    pub rules: Vec<FaultRule>,
    /// The providers' own per-merchant rate limits: requests beyond one are refused
    /// (ShengPay `FREQUENCY_LIMITED`, WuPay HTTP 429) before any rule is looked at.
    #[serde(default)]
    pub limits: Vec<SimLimit>,
}

/// ShengPay's accounts and its asynchronous side: how long a refund processes, where the
/// status query is served and how notifies are delivered.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShengPaySection {
    #[serde(default)]
    pub merchants: Vec<ShengPayMerchant>,
    /// How long an accepted refund stays `PROCESSING` before it ends; 0 ends it as the refund
    /// call is answered.
    #[serde(default = "default_processing_ms")]
    pub processing_ms: u64,
    /// Path of the status query, e.g. `/api/v3/payment/refundquery`.
    #[serde(default = "default_query_path")]
    pub query_path: String,
    /// Waits before each notify retry; after the last one, delivery gives up.
    #[serde(default = "default_notify_retry_ms")]
    pub notify_retry_ms: Vec<u64>,
    /// Time limit of one notify delivery attempt.
    #[serde(default = "default_notify_timeout_ms")]
    pub notify_timeout_ms: u64,
    /// Notify deliveries in flight at once (more wait for a slot).
    #[serde(default = "default_notify_concurrency")]
    pub notify_concurrency: usize,
    /// Notifies not yet delivered or given up, beyond which new ones are dropped (recorded as
    /// `dropped_overflow`), so a receiver that never answers cannot exhaust memory.
    #[serde(default = "default_notify_max_pending")]
    pub notify_max_pending: usize,
}

impl Default for ShengPaySection {
    fn default() -> Self {
        ShengPaySection {
            merchants: Vec::new(),
            processing_ms: default_processing_ms(),
            query_path: default_query_path(),
            notify_retry_ms: default_notify_retry_ms(),
            notify_timeout_ms: default_notify_timeout_ms(),
            notify_concurrency: default_notify_concurrency(),
            notify_max_pending: default_notify_max_pending(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WuPaySection {
    #[serde(default)]
    pub merchants: Vec<WuPayMerchant>,
}

/// A ShengPay merchant account, located by `mch_id` + `app_id` in each request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShengPayMerchant {
    /// Our merchant name: what the paid list, call log and statement call this account.
    pub merchant: String,
    pub app_id: String,
    pub mch_id: String,
    /// The merchant's public key, used to verify request signatures.
    pub public_key_file: PathBuf,
}

/// A WuPay merchant account, located by the service path its requests arrive at.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WuPayMerchant {
    pub merchant: String,
    /// Service address path, e.g. `/WuPay.asmx`; HTTP GET/POST use `{path}/Refund`.
    pub path: String,
    pub cpn_id: String,
    pub area: String,
    /// File holding the shared `rfkey` secret (surrounding whitespace ignored).
    pub rfkey_file: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18080))
}
fn default_timezone() -> String {
    "Asia/Shanghai".to_owned()
}
fn default_hang_max_ms() -> u64 {
    600_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_processing_ms() -> u64 {
    2000
}
fn default_query_path() -> String {
    "/api/v3/payment/refundquery".to_owned()
}
fn default_notify_retry_ms() -> Vec<u64> {
    vec![1000, 2000, 5000, 10_000, 30_000, 60_000]
}
fn default_notify_timeout_ms() -> u64 {
    5000
}
fn default_notify_concurrency() -> usize {
    16
}
fn default_notify_max_pending() -> usize {
    100_000
}
/// A day: more than any test or benchmark waits, and keeps deadlines far from overflow.
const MAX_DELAY_MS: u64 = 86_400_000;
fn default_call_log_capacity() -> usize {
    // A record is a few hundred bytes: this keeps the log well under 100 MB.
    200_000
}

/// The ShengPay refund endpoint.
pub(crate) const SHENGPAY_REFUND_PATH: &str = "/api/v1/payment/refund";

/// Paths the provider APIs may not take because the simulator's own endpoints live there.
const RESERVED_PREFIXES: [&str; 2] = ["/_sim", SHENGPAY_REFUND_PATH];

impl SimConfig {
    /// A configuration with defaults, no merchants and no rules.
    pub fn new(platform_private_key_file: impl Into<PathBuf>) -> Self {
        SimConfig {
            listen: default_listen(),
            timezone: default_timezone(),
            platform_private_key_file: platform_private_key_file.into(),
            coupon_rate: 0.0,
            string_amounts_rate: 0.0,
            latency_ms: 0,
            seed: 0,
            hang_max_ms: default_hang_max_ms(),
            max_connections: default_max_connections(),
            max_body_bytes: default_max_body_bytes(),
            call_log_capacity: default_call_log_capacity(),
            shengpay: ShengPaySection::default(),
            wupay: WuPaySection::default(),
            rules: Vec::new(),
            limits: Vec::new(),
        }
    }

    /// Parses TOML text and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, SimError> {
        let config: SimConfig =
            toml::from_str(text).map_err(|e| SimError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SimError::Invalid(format!("cannot read config {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&text)
            .map_err(|e| SimError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Checks everything that does not need the disk: rates, names, paths and rules.
    pub fn validate(&self) -> Result<(), SimError> {
        let invalid = |msg: String| Err(SimError::Invalid(msg));
        self.timezone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| SimError::Invalid(format!("unknown timezone {:?}", self.timezone)))?;
        for (name, rate) in [
            ("coupon_rate", self.coupon_rate),
            ("string_amounts_rate", self.string_amounts_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return invalid(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        if self.max_connections == 0 {
            return invalid("max_connections must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            return invalid("max_body_bytes must be at least 1024".into());
        }
        self.shengpay.validate()?;
        let mut names = HashSet::new();
        let mut accounts = HashSet::new();
        for m in &self.shengpay.merchants {
            if m.merchant.is_empty() || m.app_id.is_empty() || m.mch_id.is_empty() {
                return invalid("shengpay merchants need merchant, app_id and mch_id".into());
            }
            if !names.insert(m.merchant.as_str()) {
                return invalid(format!("duplicate shengpay merchant {:?}", m.merchant));
            }
            if !accounts.insert((m.mch_id.as_str(), m.app_id.as_str())) {
                return invalid(format!(
                    "duplicate shengpay account mch_id {:?} app_id {:?}",
                    m.mch_id, m.app_id
                ));
            }
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for m in &self.wupay.merchants {
            if m.merchant.is_empty() || m.cpn_id.is_empty() || m.area.is_empty() {
                return invalid("wupay merchants need merchant, cpn_id and area".into());
            }
            if !names.insert(m.merchant.as_str()) {
                return invalid(format!("duplicate wupay merchant {:?}", m.merchant));
            }
            let path = m.path.as_str();
            if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') || path.contains('?')
            {
                return invalid(format!(
                    "wupay path {path:?} must start with '/', not end with '/', and have no query"
                ));
            }
            let query_path = self.shengpay.query_path.as_str();
            if RESERVED_PREFIXES.iter().any(|p| path.starts_with(p))
                || path == query_path
                || format!("{path}/Refund") == query_path
            {
                return invalid(format!(
                    "wupay path {path:?} collides with a simulator endpoint"
                ));
            }
            if !paths.insert(path) {
                return invalid(format!("duplicate wupay path {path:?}"));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|e| SimError::Invalid(format!("{}: {e}", rule.label(i))))?;
        }
        crate::limits::Limiter::new(&self.limits, |p, name| self.merchant_index(p, name))
            .map_err(SimError::Invalid)?;
        Ok(())
    }

    /// Where merchant `name` of `provider` is in its account list (the simulator's index).
    pub(crate) fn merchant_index(&self, provider: Provider, name: &str) -> Option<usize> {
        match provider {
            Provider::ShengPay => self
                .shengpay
                .merchants
                .iter()
                .position(|m| m.merchant == name),
            Provider::WuPay => self.wupay.merchants.iter().position(|m| m.merchant == name),
        }
    }

    /// The configured time zone (validated by [`SimConfig::validate`]).
    pub(crate) fn tz(&self) -> Result<chrono_tz::Tz, SimError> {
        self.timezone
            .parse()
            .map_err(|_| SimError::Invalid(format!("unknown timezone {:?}", self.timezone)))
    }
}

impl ShengPaySection {
    fn validate(&self) -> Result<(), SimError> {
        let invalid = |msg: String| Err(SimError::Invalid(format!("shengpay.{msg}")));
        let path = self.query_path.as_str();
        if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#']) {
            return invalid(format!(
                "query_path {path:?} must start with '/' and have no query"
            ));
        }
        if path == SHENGPAY_REFUND_PATH || path == "/_sim" || path.starts_with("/_sim/") {
            return invalid(format!(
                "query_path {path:?} collides with the refund endpoint or /_sim"
            ));
        }
        if self.processing_ms > MAX_DELAY_MS {
            return invalid(format!("processing_ms must be at most {MAX_DELAY_MS}"));
        }
        if self.notify_retry_ms.iter().any(|ms| *ms > MAX_DELAY_MS) {
            return invalid(format!(
                "notify_retry_ms entries must be at most {MAX_DELAY_MS}"
            ));
        }
        if !(1..=MAX_DELAY_MS).contains(&self.notify_timeout_ms) {
            return invalid(format!(
                "notify_timeout_ms must be between 1 and {MAX_DELAY_MS}"
            ));
        }
        if self.notify_concurrency == 0 {
            return invalid("notify_concurrency must be at least 1".into());
        }
        if self.notify_max_pending == 0 {
            return invalid("notify_max_pending must be at least 1".into());
        }
        Ok(())
    }
}
