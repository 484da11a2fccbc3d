//! Fetched statements: where `[reconciler.statements]` says each provider's statement of a day
//! appears, getting it, and waiting for it (DESIGN §7).
//!
//! A provider's template (a file path or an `https://` URL, naming `{date}`, `{provider}` and
//! `{merchant}`) is filled in for the run's date: once, or once per merchant configured for the
//! provider when it names `{merchant}`. Each filled-in source is then looked at:
//!
//! - a file that exists is used where it is; an `https://` URL answering `200` is downloaded
//!   (through the shared client of [`shared::provider::http::build_client`]: OpenSSL TLS, no
//!   redirects; the body capped at `reconciler.max_statement_bytes`) into a private temporary
//!   directory that lives as long as the [`Fetcher`];
//! - a file that does not exist, or a URL answering `404` or `410`, is **not there yet**;
//! - anything else (another HTTP status, a redirect, a connection or TLS failure, a file that
//!   cannot be read) is an error naming the file or URL: the run cannot be done (exit 2).
//!
//! [`Fetcher::gather`] looks once, or, waiting (`schedule`, `run --wait`), up to
//! `reconciler.statement_wait_attempts` times `reconciler.statement_wait_interval_secs` apart
//! until every statement is there, logging each look. What is still not there at the end is
//! handed to the run as [`Missing`]: each is a `statement_missing` discrepancy, so the day is
//! not balanced.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use chrono::NaiveDate;
use shared::config::{Config, StatementSource, fill_statement_template};

/// A statement the configuration names for the run's date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub provider: String,
    /// The merchant, when the template names `{merchant}`.
    pub merchant: Option<String>,
    pub source: StatementSource,
}

/// A statement that is there, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Where it is read from (the file itself, or the downloaded copy).
    pub path: PathBuf,
    /// How reports, errors and evidence name it: its file path or URL.
    pub name: String,
    pub provider: String,
}

/// A configured statement still not there when the run started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub provider: String,
    /// `None`: the provider's one statement (a template without `{merchant}`).
    pub merchant: Option<String>,
    /// Its file path or URL.
    pub source: String,
    /// How many times it was looked for.
    pub looks: u32,
}

/// What the configured statements of a day came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gathered {
    pub fetched: Vec<Fetched>,
    pub missing: Vec<Missing>,
}

/// A configured statement that could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("configuration key `reconciler.statements.{provider}`: {message}")]
    Template { provider: String, message: String },
    #[error("statement {what}: {message}")]
    Source { what: String, message: String },
    #[error("fetching statements: {0}")]
    Setup(String),
}

/// The configured statements of `date` (of `provider` only, if given).
pub fn plan(
    config: &Config,
    date: NaiveDate,
    provider: Option<&str>,
) -> Result<Vec<Planned>, FetchError> {
    let date = date.format("%Y-%m-%d").to_string();
    let mut out = Vec::new();
    for (p, template) in &config.reconciler.statements {
        if provider.is_some_and(|only| only != p) {
            continue;
        }
        let merchants: Vec<Option<String>> = if template.contains("{merchant}") {
            let configured: Vec<String> = match p.as_str() {
                "shengpay" => config
                    .shengpay
                    .merchants
                    .iter()
                    .map(|m| m.merchant.clone())
                    .collect(),
                _ => config
                    .wupay
                    .merchants
                    .iter()
                    .map(|m| m.merchant.clone())
                    .collect(),
            };
            configured.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        for merchant in merchants {
            let template_error = |message: String| FetchError::Template {
                provider: p.clone(),
                message,
            };
            let filled =
                fill_statement_template(template, &date, p, merchant.as_deref().unwrap_or(""))
                    .map_err(template_error)?;
            let source = StatementSource::parse(&filled).map_err(template_error)?;
            out.push(Planned {
                provider: p.clone(),
                merchant,
                source,
            });
        }
    }
    Ok(out)
}

/// Looks for statements, downloading those behind URLs into a temporary directory of its own.
pub struct Fetcher {
    client: reqwest::Client,
    dir: tempfile::TempDir,
    max_bytes: u64,
    downloads: usize,
}

/// One look at one statement.
enum Look {
    There(PathBuf),
    NotYet(String),
}

impl Fetcher {
    pub fn new(config: &Config) -> Result<Self, FetchError> {
        // The shared client, with room for a statement of a million rows (~100 MB) to arrive:
        // the providers' refund calls keep their own short timeout.
        let mut http = config.http.clone();
        http.timeout_ms = http.timeout_ms.max(600_000);
        let client = shared::provider::http::build_client(&http)
            .map_err(|e| FetchError::Setup(format!("the HTTP client: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("refund-reconciler-statements-")
            .tempdir()
            .map_err(|e| FetchError::Setup(format!("a temporary directory: {e}")))?;
        Ok(Fetcher {
            client,
            dir,
            max_bytes: config.reconciler.max_statement_bytes,
            downloads: 0,
        })
    }

    /// Looks for every planned statement: once, or (`wait`) again every `interval` until all
    /// are there or `attempts` looks were made. Each look is logged.
    pub async fn gather(
        &mut self,
        planned: &[Planned],
        wait: bool,
        attempts: u32,
        interval: Duration,
    ) -> Result<Gathered, FetchError> {
        let attempts = if wait { attempts.max(1) } else { 1 };
        let mut fetched: Vec<Option<Fetched>> = vec![None; planned.len()];
        let mut why: Vec<String> = vec![String::new(); planned.len()];
        for look in 1..=attempts {
            for (i, p) in planned.iter().enumerate() {
                if fetched[i].is_some() {
                    continue;
                }
                match self.look(p).await? {
                    Look::There(path) => {
                        tracing::info!(
                            provider = p.provider.as_str(), statement = %p.source, look,
                            "statement is there"
                        );
                        fetched[i] = Some(Fetched {
                            path,
                            name: p.source.to_string(),
                            provider: p.provider.clone(),
                        });
                    }
                    Look::NotYet(reason) => why[i] = reason,
                }
            }
            let missing: Vec<&Planned> = planned
                .iter()
                .zip(&fetched)
                .filter(|(_, f)| f.is_none())
                .map(|(p, _)| p)
                .collect();
            if missing.is_empty() {
                break;
            }
            for (p, reason) in planned
                .iter()
                .zip(&why)
                .zip(&fetched)
                .filter_map(|((p, w), f)| f.is_none().then_some((p, w)))
            {
                if look < attempts {
                    tracing::warn!(
                        provider = p.provider.as_str(), statement = %p.source, look, attempts,
                        next_look_in_s = interval.as_secs(),
                        "statement not there yet ({reason}); looking again in {} s (look {look} of {attempts})",
                        interval.as_secs()
                    );
                } else {
                    tracing::warn!(
                        provider = p.provider.as_str(), statement = %p.source, look, attempts,
                        "statement still not there ({reason}) after {look} looks: reconciling \
                         without it (statement_missing)"
                    );
                }
            }
            if look < attempts {
                tokio::time::sleep(interval).await;
            }
        }
        let looks = attempts;
        let mut out = Gathered::default();
        for (p, f) in planned.iter().zip(fetched) {
            match f {
                Some(f) => out.fetched.push(f),
                None => out.missing.push(Missing {
                    provider: p.provider.clone(),
                    merchant: p.merchant.clone(),
                    source: p.source.to_string(),
                    looks,
                }),
            }
        }
        Ok(out)
    }

    async fn look(&mut self, p: &Planned) -> Result<Look, FetchError> {
        match &p.source {
            StatementSource::File(path) => match std::fs::metadata(path) {
                Ok(m) if m.is_file() => Ok(Look::There(path.clone())),
                Ok(_) => Err(FetchError::Source {
                    what: path.display().to_string(),
                    message: "is not a file".into(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(Look::NotYet("no such file".into()))
                }
                Err(e) => Err(FetchError::Source {
                    what: path.display().to_string(),
                    message: e.to_string(),
                }),
            },
            StatementSource::Url(url) => self.download(url, &p.provider).await,
        }
    }

    async fn download(&mut self, url: &str, provider: &str) -> Result<Look, FetchError> {
        let fail = |message: String| FetchError::Source {
            what: url.to_owned(),
            message,
        };
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| fail(chain(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(Look::NotYet(format!("HTTP {}", status.as_u16())));
        }
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            return Err(fail(format!(
                "HTTP {} to {to:?}: redirects are not followed; configure the final address",
                status.as_u16()
            )));
        }
        if status != reqwest::StatusCode::OK {
            return Err(fail(format!(
                "HTTP {} (expected 200, or 404 while it is not there yet)",
                status.as_u16()
            )));
        }
        if let Some(len) = resp.content_length()
            && len > self.max_bytes
        {
            return Err(fail(format!(
                "{len} bytes, above reconciler.max_statement_bytes ({})",
                self.max_bytes
            )));
        }
        self.downloads += 1;
        let path = self
            .dir
            .path()
            .join(format!("{}-{provider}.csv", self.downloads));
        let file = std::fs::File::create(&path)
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        let mut w = std::io::BufWriter::new(file);
        let mut total: u64 = 0;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(format!("reading the body: {}", chain(&e))))?
        {
            total = total.saturating_add(chunk.len() as u64);
            if total > self.max_bytes {
                return Err(fail(format!(
                    "longer than reconciler.max_statement_bytes ({})",
                    self.max_bytes
                )));
            }
            w.write_all(&chunk)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        }
        w.flush()
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        Ok(Look::There(path))
    }
}

/// An error and its causes, for a message that says why a connection failed (refused, TLS).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Fills `req.fetched` and `req.missing` from `[reconciler.statements]` for its date and
/// provider, looking once or (`wait`) waiting as configured. `None` (nothing changed) when no
/// statement is configured for the run's providers: the run then compares against the
/// recorded provider attempts. The [`Fetcher`] returned owns the downloaded copies: keep it
/// until the run is stored.
pub async fn prepare(
    config: &Config,
    req: &mut crate::run::RunRequest,
    wait: bool,
) -> Result<Option<Fetcher>, FetchError> {
    let planned = plan(config, req.date, req.provider.as_deref())?;
    if planned.is_empty() {
        return Ok(None);
    }
    let mut fetcher = Fetcher::new(config)?;
    let gathered = fetcher
        .gather(
            &planned,
            wait,
            config.reconciler.statement_wait_attempts,
            Duration::from_secs(config.reconciler.statement_wait_interval_secs),
        )
        .await?;
    req.fetched = gathered.fetched;
    req.missing = gathered.missing;
    Ok(Some(fetcher))
}
