//! `[console]`: the operator web console, `refund-console` (DESIGN §12).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[console]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where the console listens.
    pub addr: String,
    /// The operators who may sign in: a TOML file of `[[operators]]` with `name`, `role`
    /// (`viewer`, `operator`, `approver`) and `password_hash` (argon2, PHC string; `refund-console
    /// hash-password` makes one). Required: nobody gets in without being named here.
    pub operators_file: Option<PathBuf>,
    /// A header that names the signed-in operator, set by an authenticating proxy in front of
    /// the console (e.g. `X-Auth-Request-User`). Believed only from `trusted_proxies`; the name
    /// must be in the operators file, which gives the role. Empty: proxy sign-in is off.
    pub proxy_header: String,
    /// Addresses (IPs) of the proxies whose `proxy_header` is believed.
    pub trusted_proxies: Vec<String>,
    /// Mark the session cookie `Secure` (sent over HTTPS only; browsers also accept it from
    /// `localhost`). Turn off only to reach a development console by a non-local plain-HTTP
    /// address.
    pub secure_cookies: bool,
    /// How long a sign-in lasts without use, in minutes.
    pub session_idle_minutes: u64,
    /// The default pace of a bulk replay started from the console, replays per second (the
    /// form may ask for less, never more).
    pub replay_rate: f64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:9470".into(),
            operators_file: None,
            proxy_header: String::new(),
            trusted_proxies: Vec::new(),
            secure_cookies: true,
            session_idle_minutes: 30,
            replay_rate: 20.0,
        }
    }
}

impl ConsoleConfig {
    /// The trusted proxy addresses, parsed.
    pub fn trusted_proxy_ips(&self) -> Result<Vec<std::net::IpAddr>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse().map_err(|_| {
                    ConfigError::invalid(
                        "console.trusted_proxies",
                        format!("{p:?} is not an IP address"),
                    )
                })
            })
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "console.addr",
                format!("{:?} is not an address like 127.0.0.1:9470", self.addr),
            ));
        }
        self.trusted_proxy_ips()?;
        if !self.trusted_proxies.is_empty() && self.proxy_header.trim().is_empty() {
            return Err(ConfigError::invalid(
                "console.proxy_header",
                "must name the header when console.trusted_proxies is set",
            ));
        }
        if !self.proxy_header.is_empty() && header_name_check(&self.proxy_header).is_err() {
            return Err(ConfigError::invalid(
                "console.proxy_header",
                format!("{:?} is not a header name", self.proxy_header),
            ));
        }
        if self.session_idle_minutes == 0 {
            return Err(ConfigError::invalid(
                "console.session_idle_minutes",
                "must be at least 1",
            ));
        }
        if !self.replay_rate.is_finite() || self.replay_rate <= 0.0 {
            return Err(ConfigError::invalid(
                "console.replay_rate",
                "must be a number of replays per second above 0",
            ));
        }
        Ok(())
    }
}

/// A header name is a non-empty HTTP token (RFC 9110 §5.1).
fn header_name_check(name: &str) -> Result<(), ()> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.is_empty() && name.chars().all(token) {
        Ok(())
    } else {
        Err(())
    }
}
