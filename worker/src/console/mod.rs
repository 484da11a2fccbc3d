//! `refund-console`, the operator web console (DESIGN §12): search, a job's timeline, dead
//! letters with previewed rate-limited bulk replay and discard, unknown outcomes and their
//! resolution, the approvals queue, reconciliation runs and cases, and live charts.
//!
//! Server-rendered HTML (maud) over the same store functions and per-job actions as
//! `refundctl`: nothing here re-checks a state or writes a row itself, so the console can do
//! exactly what the CLI can and is refused exactly where the CLI is. Pages are in [`pages`],
//! the forms they post in [`actions`], sign-in and roles in [`auth`], bulk replays in
//! [`replay`], charts in [`charts`].
//!
//! Every request but the sign-in page, the stylesheet and `/healthz` needs a signed-in
//! operator ([`auth::Signed`]); every form carries a CSRF token; every action runs under the
//! signed-in operator's name, which the store writes into `operator_audit`.

pub mod actions;
pub mod auth;
pub mod charts;
pub mod pages;
pub mod replay;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::CookieJar;
use shared::config::Config;
use tokio_util::sync::CancellationToken;

use crate::ctl::Ctl;
use auth::{Operators, Role, Sessions, Signed, Via};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "refund_console";
/// The sign-in form's pre-session cookie (its CSRF token is bound to it).
pub const PRE_COOKIE: &str = "refund_console_pre";

/// What every handler works with.
pub struct Console {
    pub ctl: Arc<Ctl>,
    pub operators: Operators,
    pub sessions: Sessions,
    /// Failed sign-ins by name.
    pub sign_ins: auth::Throttle,
    pub runs: replay::Runs,
    trusted: Vec<IpAddr>,
}

impl Console {
    /// Connects to Postgres and reads the operators file, as `refund-console` starts.
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let path =
            config.console.operators_file.clone().context(
                "console.operators_file is not set: the console lets nobody in without it",
            )?;
        let operators = Operators::load(&path)?;
        // Replay reads idempotence from each job's own record; no provider client is needed (and
        // the console holds no merchant keys).
        let ctl = Ctl::connect(config, false).await?;
        Self::new(ctl, operators)
    }

    /// Over an existing [`Ctl`] (tests).
    pub fn new(mut ctl: Ctl, operators: Operators) -> anyhow::Result<Self> {
        ctl.progress = false;
        let c = &ctl.config.console;
        let trusted = c.trusted_proxy_ips()?;
        let sessions = Sessions::new(Duration::from_secs(c.session_idle_minutes * 60));
        Ok(Self {
            ctl: Arc::new(ctl),
            operators,
            sessions,
            sign_ins: auth::Throttle::default(),
            runs: replay::Runs::default(),
            trusted,
        })
    }

    /// The config the console runs with.
    pub fn config(&self) -> &Config {
        &self.ctl.config
    }

    /// The `Set-Cookie` attributes every cookie of the console gets.
    fn cookie<'a>(&self, name: &'a str, value: String) -> axum_extra::extract::cookie::Cookie<'a> {
        axum_extra::extract::cookie::Cookie::build((name, value))
            .http_only(true)
            .same_site(axum_extra::extract::cookie::SameSite::Strict)
            .secure(self.config().console.secure_cookies)
            .path("/")
            .build()
    }
}

/// Every route.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/search", get(pages::search))
        .route("/jobs/{refund_no}", get(pages::job))
        .route("/jobs/{refund_no}/replay", post(actions::replay_job))
        .route("/jobs/{refund_no}/discard", post(actions::discard_job))
        .route("/jobs/{refund_no}/resolve", post(actions::resolve))
        .route("/jobs/{refund_no}/correct", post(actions::correct))
        .route("/dlq", get(pages::dlq))
        .route(
            "/dlq/replay",
            get(pages::replay_preview).post(actions::start_replay),
        )
        .route("/dlq/poison/{id}/discard", post(actions::discard_poison))
        .route("/replays", get(pages::replays))
        .route("/replays/{id}", get(pages::replay_run))
        .route("/replays/{id}/abort", post(actions::abort_replay))
        .route("/unknown", get(pages::unknown))
        .route("/approvals", get(pages::approvals))
        .route("/approvals/{id}/approve", post(actions::approve))
        .route("/approvals/{id}/reject", post(actions::reject))
        .route("/reconciliation", get(pages::reconciliation))
        .route("/cases/{id}/explain", post(actions::explain_case))
        .route("/sign-in", get(pages::sign_in).post(actions::sign_in))
        .route("/sign-out", post(actions::sign_out))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::middleware::map_response(|r: Response| async {
            secure_headers(r)
        }))
        .with_state(console)
}

/// Listens on `[console] addr` until `shutdown`.
pub async fn serve(console: Arc<Console>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = console.config().console.addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding console.addr {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "console listening");
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("serving the console")
}

/// A page that could not be shown, as the browser gets it.
#[derive(Debug)]
pub enum PageError {
    /// Not signed in: to the sign-in page, then back.
    SignIn {
        next: String,
    },
    /// The role does not allow it.
    Forbidden {
        role: Role,
        needs: Role,
    },
    /// Signed in by the proxy as somebody the operators file does not name.
    NotListed(String),
    /// A form without the page's CSRF token.
    BadToken,
    NotFound(String),
    /// A form field that cannot be used, named.
    BadInput(String),
    Internal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError::Internal(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, text) = match self {
            PageError::SignIn { next } => {
                let to = format!("/sign-in?next={}", pages::url_encode(&next));
                return Redirect::to(&to).into_response();
            }
            PageError::Forbidden { role, needs } => (
                StatusCode::FORBIDDEN,
                "Not allowed",
                format!(
                    "Your role is {}; this takes the {} role. Nothing was changed.",
                    role.as_str(),
                    needs.as_str()
                ),
            ),
            PageError::NotListed(what) => (StatusCode::FORBIDDEN, "Not an operator", what),
            PageError::BadToken => (
                StatusCode::FORBIDDEN,
                "Form expired",
                "The form's security token does not match this session (it may have been \
                 signed in again meanwhile). Go back, reload the page and send it again. \
                 Nothing was changed."
                    .to_owned(),
            ),
            PageError::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", what),
            PageError::BadInput(what) => (StatusCode::BAD_REQUEST, "Cannot do that", what),
            PageError::Internal(e) => {
                let chain = shared::telemetry::error_chain(e.as_ref());
                tracing::error!(error = %chain, "console page failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "Something failed", chain)
            }
        };
        (status, pages::error_page(title, &text)).into_response()
    }
}

impl FromRequestParts<Arc<Console>> for Signed {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let next = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Some(name) = proxy_operator(parts, console) {
            let role = console.operators.role(&name).ok_or_else(|| {
                PageError::NotListed(format!(
                    "the proxy signed you in as {name:?}, who is not in the console's \
                         operators file"
                ))
            })?;
            let csrf = console.sessions.csrf_token(&Via::Proxy, &name);
            return Ok(Signed {
                name,
                role,
                via: Via::Proxy,
                csrf,
            });
        }
        let jar = CookieJar::from_headers(&parts.headers);
        let id = jar
            .get(SESSION_COOKIE)
            .map(|c| c.value().to_owned())
            .ok_or(PageError::SignIn { next: next.clone() })?;
        let name = console
            .sessions
            .touch(&id)
            .ok_or(PageError::SignIn { next: next.clone() })?;
        // Removed from the operators file since signing in: out.
        let role = console
            .operators
            .role(&name)
            .ok_or(PageError::SignIn { next })?;
        let via = Via::Session(id);
        let csrf = console.sessions.csrf_token(&via, &name);
        Ok(Signed {
            name,
            role,
            via,
            csrf,
        })
    }
}

/// The operator a trusted proxy names in its header, when this request came from one.
fn proxy_operator(parts: &Parts, console: &Console) -> Option<String> {
    let header_name = &console.config().console.proxy_header;
    if header_name.is_empty() {
        return None;
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    if !auth::is_trusted(&console.trusted, peer) {
        return None;
    }
    let value = parts
        .headers
        .get(header_name.as_str())?
        .to_str()
        .ok()?
        .trim();
    (!value.is_empty()).then(|| value.to_owned())
}

impl Signed {
    /// Refuses unless the role allows `needs`.
    pub fn require(&self, needs: Role) -> Result<(), PageError> {
        if self.may(needs) {
            Ok(())
        } else {
            tracing::warn!(operator = %self.name, role = self.role.as_str(), needs = needs.as_str(), "console action refused by role");
            Err(PageError::Forbidden {
                role: self.role,
                needs,
            })
        }
    }

    /// Refuses a form whose token is not this session's.
    pub fn check_csrf(&self, sent: &str) -> Result<(), PageError> {
        if auth::token_matches(&self.csrf, sent) {
            Ok(())
        } else {
            tracing::warn!(operator = %self.name, "console form with a wrong CSRF token refused");
            Err(PageError::BadToken)
        }
    }
}

/// Headers every page gets: no caching of operator data, no framing, no sniffing, scripts and
/// styles from this origin only.
pub fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    r
}
