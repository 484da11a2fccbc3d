//! `[reconciler]`: the nightly reconciliation (DESIGN §7, §9): its schedule, the grace window
//! around midnight, and where each provider's statement of a day appears
//! (`[reconciler.statements]`) and how long a scheduled run waits for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The providers a statement can be configured for.
const PROVIDERS: [&str; 2] = ["shengpay", "wupay"];

/// The placeholders a statement template may name.
pub const PLACEHOLDERS: [&str; 3] = ["{date}", "{provider}", "{merchant}"];

/// `[reconciler]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilerConfig {
    /// Cron expression (seconds first, as the `cron` crate reads it) for `schedule`.
    pub schedule: String,
    /// Refunds within this many minutes before the day's cut-off may still be in flight at the
    /// provider: a difference there is `pending`, not a discrepancy.
    pub grace_minutes: u32,
    /// `[reconciler.statements]`: per provider (`shengpay`, `wupay`), where its statement of a
    /// day appears: a file path or an `https://` URL, a template naming `{date}` (YYYY-MM-DD,
    /// the business date), `{provider}` and `{merchant}` (one statement per merchant configured
    /// for the provider). A provider not listed is reconciled without a statement of its own:
    /// each of its merchants with refunds is `statement_missing`.
    pub statements: BTreeMap<String, String>,
    /// How many times a waiting run (`schedule`, `run --wait`) looks for the day's statements
    /// before it reconciles without those still missing (each missing one is then a
    /// `statement_missing` discrepancy). At least 1.
    pub statement_wait_attempts: u32,
    /// Seconds between two looks of a waiting run.
    pub statement_wait_interval_secs: u64,
    /// A fetched statement larger than this is refused (the download stops there).
    pub max_statement_bytes: u64,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            schedule: "0 30 2 * * *".into(),
            grace_minutes: 30,
            statements: BTreeMap::new(),
            statement_wait_attempts: 7,
            statement_wait_interval_secs: 300,
            max_statement_bytes: 1 << 30,
        }
    }
}

/// Where one statement is read from, once its template is filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementSource {
    File(PathBuf),
    Url(String),
}

impl StatementSource {
    /// Sorts a filled-in template into a file path or a URL: the one place that decides which
    /// URL schemes a statement may come from: `http://` and `https://` (whether plain http is
    /// allowed is the https rule's to say, checked where the config is validated). Any other `scheme://` is refused; anything
    /// without `://` is a file path.
    pub fn parse(s: &str) -> Result<StatementSource, String> {
        if s.is_empty() {
            return Err("is empty; expected a file path or an https:// URL".into());
        }
        match s.split_once("://") {
            None => Ok(StatementSource::File(PathBuf::from(s))),
            Some((scheme, rest)) => {
                let scheme = scheme.to_ascii_lowercase();
                if scheme != "https" && scheme != "http" {
                    return Err(format!(
                        "{s:?}: a statement comes from a file path or an https:// URL, not {scheme}://"
                    ));
                }
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(format!("{s:?} has no host"));
                }
                Ok(StatementSource::Url(s.to_owned()))
            }
        }
    }
}

impl std::fmt::Display for StatementSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatementSource::File(p) => write!(f, "{}", p.display()),
            StatementSource::Url(u) => f.write_str(u),
        }
    }
}

/// Fills in a statement template. In a URL, `{merchant}` is percent-encoded (anything but
/// unreserved characters); in a file path a merchant that would leave its directory (`/`,
/// `\`, `..`, NUL) is refused.
pub fn fill(template: &str, date: &str, provider: &str, merchant: &str) -> Result<String, String> {
    let is_url = template.contains("://");
    let merchant = if is_url {
        let mut m = String::with_capacity(merchant.len());
        for b in merchant.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                m.push(char::from(b));
            } else {
                m.push_str(&format!("%{b:02X}"));
            }
        }
        m
    } else {
        if template.contains("{merchant}")
            && (merchant.contains(['/', '\\', '\0']) || merchant.contains(".."))
        {
            return Err(format!(
                "merchant {merchant:?} cannot be part of a file path"
            ));
        }
        merchant.to_owned()
    };
    Ok(template
        .replace("{date}", date)
        .replace("{provider}", provider)
        .replace("{merchant}", &merchant))
}

impl ReconcilerConfig {
    /// Checks `[reconciler.statements]` and the waiting keys; `merchants(provider)` lists the
    /// merchants configured for a provider (a template naming `{merchant}` needs some).
    /// A URL template obeys the https rule of `http` ([`super::HttpConfig::check_url`]).
    pub(super) fn validate(
        &self,
        http: &super::HttpConfig,
        merchants: impl Fn(&str) -> usize,
    ) -> Result<(), ConfigError> {
        for (provider, template) in &self.statements {
            let key = format!("reconciler.statements.{provider}");
            if !PROVIDERS.contains(&provider.as_str()) {
                return Err(ConfigError::invalid(
                    key,
                    "not a provider: expected shengpay or wupay",
                ));
            }
            let mut rest = template.clone();
            for p in PLACEHOLDERS {
                rest = rest.replace(p, "");
            }
            if let Some(i) = rest.find(['{', '}']) {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{template:?}: unknown placeholder near {:?}; a template may name {}",
                        &rest[i..],
                        PLACEHOLDERS.join(", ")
                    ),
                ));
            }
            if template.contains("{merchant}") && merchants(provider) == 0 {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "names {{merchant}}, but no [[{provider}.merchants]] are configured to \
                         fill it in"
                    ),
                ));
            }
            let sample = fill(template, "2026-11-21", provider, "m")
                .map_err(|e| ConfigError::invalid(&key, e))?;
            if let StatementSource::Url(url) =
                StatementSource::parse(&sample).map_err(|e| ConfigError::invalid(&key, e))?
            {
                http.check_url(&key, &url)?;
            }
        }
        if self.statement_wait_attempts == 0 {
            return Err(ConfigError::invalid(
                "reconciler.statement_wait_attempts",
                "must be at least 1 (1: look once, do not wait)",
            ));
        }
        if self.max_statement_bytes == 0 {
            return Err(ConfigError::invalid(
                "reconciler.max_statement_bytes",
                "must be above 0",
            ));
        }
        Ok(())
    }

    /// How long a waiting run waits at most, from its first look to its last.
    pub fn statement_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.statement_wait_interval_secs
                .saturating_mul(u64::from(self.statement_wait_attempts.saturating_sub(1))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_comes_from_a_file_or_an_http_url_only() {
        assert_eq!(
            StatementSource::parse("/srv/s-2026-11-21.csv").unwrap(),
            StatementSource::File("/srv/s-2026-11-21.csv".into())
        );
        assert!(matches!(
            StatementSource::parse("https://bills.example/x.csv").unwrap(),
            StatementSource::Url(_)
        ));
        assert!(StatementSource::parse("ftp://bills.example/x.csv").is_err());
        assert!(StatementSource::parse("file:///etc/passwd").is_err());
        assert!(StatementSource::parse("").is_err());
    }

    #[test]
    fn a_template_fills_in_date_provider_and_an_encoded_merchant() {
        assert_eq!(
            fill(
                "https://b.example/{provider}/{merchant}/{date}.csv",
                "2026-11-21",
                "wupay",
                "m 1/&"
            )
            .unwrap(),
            "https://b.example/wupay/m%201%2F%26/2026-11-21.csv"
        );
        assert!(fill("/srv/{merchant}.csv", "2026-11-21", "wupay", "../x").is_err());
    }

    #[test]
    fn unknown_placeholders_and_providers_are_refused() {
        let mut c = ReconcilerConfig::default();
        c.statements
            .insert("wupay".into(), "https://b.example/{day}.csv".into());
        assert!(
            c.validate(&super::super::HttpConfig::default(), |_| 1)
                .unwrap_err()
                .to_string()
                .contains("{day}")
        );
        let mut c = ReconcilerConfig::default();
        c.statements.insert("paypal".into(), "/x.csv".into());
        assert!(
            c.validate(&super::super::HttpConfig::default(), |_| 1)
                .is_err()
        );
        let mut c = ReconcilerConfig::default();
        c.statements
            .insert("wupay".into(), "/srv/{merchant}-{date}.csv".into());
        assert!(
            c.validate(&super::super::HttpConfig::default(), |_| 0)
                .unwrap_err()
                .to_string()
                .contains("merchants")
        );
        assert!(
            c.validate(&super::super::HttpConfig::default(), |_| 1)
                .is_ok()
        );
    }

    #[test]
    fn a_plain_http_statement_url_is_refused_unless_plain_http_is_allowed() {
        let mut c = ReconcilerConfig::default();
        c.statements
            .insert("wupay".into(), "http://b.example/{date}.csv".into());
        let mut http = super::super::HttpConfig::default();
        let e = c.validate(&http, |_| 1).unwrap_err().to_string();
        assert!(e.contains("reconciler.statements.wupay"), "{e}");
        assert!(e.contains("plain http"), "{e}");
        http.allow_plain_http = true;
        assert!(c.validate(&http, |_| 1).is_ok());
    }
}
