//! The HTTP server: connections, routing, fault application and the `/_sim/` control API.
//!
//! Connections are served with hyper directly rather than through a framework because the
//! transport faults need the raw connection: when the service answers a request with an error,
//! hyper closes the connection without writing any response, which is how `reset` (plus
//! `SO_LINGER 0`, so the peer sees a TCP RST), `drop_response` and a timed-out `hang` are done.
//!
//! Order of work for a provider call (a refund call or a ShengPay status query): read the body
//! (capped) → parse enough to identify provider, merchant, refund and order numbers → pick the
//! fault rule for that operation → sleep the latency → apply a transport fault, or hand over to
//! the provider module (which applies decline, retry_later, bad_signature, refund_close and
//! change itself) → log the call → answer, or drop the answer.
//!
//! Besides connections, the simulator owns one background task, the ShengPay ticker that ends
//! refunds when their processing time is up (and so starts their notifies); it and every
//! notify delivery stop when the handle is shut down or dropped.
//!
//! Here: the listener, connections, routing and the [`SimHandle`]; [`provider`] parses and
//! answers provider calls, [`control`] serves the `/_sim/` API.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, SERVER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::calls::{CallLog, CallRecord, Outcome, QueryLog, QueryRecord};
use crate::clock::Clock;
use crate::config::{SHENGPAY_REFUND_PATH, SimConfig};
use crate::crypto::{self, MerchantKey, PlatformKey};
use crate::faults::{FaultEngine, FaultRule};
use crate::ledger::{self, Ledger, PaidRefund};
use crate::limits::Limiter;
use crate::rates::{RateBook, RateWindow};
use crate::shengpay::{self, Book, Notifier, NotifyRecord, ShengPayRefund, Which};
use crate::wupay::Binding;
use crate::{Provider, SimError};

mod control;
mod provider;

use control::control;
use provider::{Route, provider_call, soap_version};

/// How long connections get to finish in-flight requests when the simulator shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

pub(crate) struct ShengPayAccount {
    pub name: String,
    pub app_id: String,
    pub mch_id: String,
    pub key: MerchantKey,
}

pub(crate) struct WuPayAccount {
    pub name: String,
    pub path: String,
    pub cpn_id: String,
    pub area: String,
    pub rfkey: String,
}

#[derive(Clone, Copy)]
enum WuEndpoint {
    /// `{path}`: SOAP 1.1 and 1.2.
    Service,
    /// `{path}/Refund`: HTTP POST form and HTTP GET.
    Refund,
}

/// What does not change while the simulator runs: keys, merchants, rates, limits.
pub(crate) struct Settings {
    pub platform: PlatformKey,
    pub tz: Tz,
    pub coupon_rate: f64,
    pub string_amounts_rate: f64,
    pub latency_ms: u64,
    pub hang_max: Duration,
    pub max_body_bytes: usize,
    /// How long an accepted ShengPay refund stays `PROCESSING`.
    pub processing: Duration,
    pub query_path: String,
    pub shengpay: Vec<ShengPayAccount>,
    pub wupay: Vec<WuPayAccount>,
    wupay_routes: HashMap<String, (usize, WuEndpoint)>,
}

impl Settings {
    fn load(config: &SimConfig) -> Result<Self, SimError> {
        config.validate()?;
        let platform =
            PlatformKey::new(crypto::load_private_key(&config.platform_private_key_file)?);
        let shengpay = config
            .shengpay
            .merchants
            .iter()
            .map(|m| {
                Ok(ShengPayAccount {
                    name: m.merchant.clone(),
                    app_id: m.app_id.clone(),
                    mch_id: m.mch_id.clone(),
                    key: MerchantKey::new(crypto::load_public_key(&m.public_key_file)?),
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        let wupay = config
            .wupay
            .merchants
            .iter()
            .map(|m| {
                Ok(WuPayAccount {
                    name: m.merchant.clone(),
                    path: m.path.clone(),
                    cpn_id: m.cpn_id.clone(),
                    area: m.area.clone(),
                    rfkey: crypto::load_secret(&m.rfkey_file)?,
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        let mut wupay_routes = HashMap::new();
        for (i, m) in wupay.iter().enumerate() {
            wupay_routes.insert(m.path.clone(), (i, WuEndpoint::Service));
            wupay_routes.insert(format!("{}/Refund", m.path), (i, WuEndpoint::Refund));
        }
        Ok(Settings {
            platform,
            tz: config.tz()?,
            coupon_rate: config.coupon_rate,
            string_amounts_rate: config.string_amounts_rate,
            latency_ms: config.latency_ms,
            hang_max: Duration::from_millis(config.hang_max_ms),
            max_body_bytes: config.max_body_bytes,
            processing: Duration::from_millis(config.shengpay.processing_ms),
            query_path: config.shengpay.query_path.clone(),
            shengpay,
            wupay,
            wupay_routes,
        })
    }
}

/// Everything the request handlers and background tasks share.
pub(crate) struct SimState {
    pub settings: Settings,
    /// Every accepted ShengPay refund and its status. Lock order: `refunds`, then `ledger`.
    pub refunds: Mutex<Book>,
    pub ledger: Mutex<Ledger>,
    pub calls: Mutex<CallLog>,
    pub queries: Mutex<QueryLog>,
    /// Requests per merchant per second, uncapped (the logs above are capped).
    pub rates: Mutex<RateBook>,
    /// The providers' own per-merchant rate limits.
    pub limiter: Mutex<Limiter>,
    pub notifier: Notifier,
    pub faults: Mutex<FaultEngine>,
    pub clock: Clock,
    pub open_connections: AtomicUsize,
    /// Wakes the ticker when a refund is accepted (it may be due before the one it waits for).
    pub wake: tokio::sync::Notify,
    /// Bumped by every reset, so notifies of forgotten refunds stop.
    epoch: AtomicU64,
    /// Becomes true (or its sender goes away) when the simulator shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The runtime the simulator started on: background work is spawned there even when a
    /// handle method is called from outside it.
    pub runtime: tokio::runtime::Handle,
}

impl SimState {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// Locks a mutex even if a panicking thread poisoned it: every critical section leaves its
/// data consistent before anything that could panic, and a test fake must keep answering.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A provider module's answer, with what it means for the call log.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
    pub outcome: Outcome,
    pub code: Option<String>,
    /// A ShengPay refund this call accepted: (merchant, refund number).
    pub accepted: Option<(String, String)>,
    /// Status queries: what the query log records as answered.
    pub detail: Option<String>,
}

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct Abort(&'static str);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection closed on purpose: {}", self.0)
    }
}

impl std::error::Error for Abort {}

type HttpResponse = Response<Full<Bytes>>;

/// Starts simulators.
pub struct Simulator;

impl Simulator {
    /// Loads keys, binds `config.listen` and serves until [`SimHandle::shutdown`] (or the handle
    /// is dropped).
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let settings = Settings::load(&config)?;
        let faults = FaultEngine::new(&config.rules, config.seed).map_err(SimError::Invalid)?;
        let limiter = Limiter::new(&config.limits, |p, name| config.merchant_index(p, name))
            .map_err(SimError::Invalid)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = Arc::new(SimState {
            settings,
            refunds: Mutex::new(Book::default()),
            ledger: Mutex::new(Ledger::new()),
            calls: Mutex::new(CallLog::new(config.call_log_capacity)),
            queries: Mutex::new(QueryLog::new(config.call_log_capacity)),
            rates: Mutex::new(RateBook::default()),
            limiter: Mutex::new(limiter),
            notifier: Notifier::new(&config.shengpay, config.call_log_capacity, config.seed)?,
            faults: Mutex::new(faults),
            clock: Clock::default(),
            open_connections: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(0),
            shutdown: shutdown_rx.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let max_connections = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let permits = Arc::new(Semaphore::new(max_connections as usize));
        let ticker = tokio::spawn(shengpay::run_ticker(
            Arc::clone(&state),
            shutdown_rx.clone(),
        ));
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&state),
            Arc::clone(&permits),
            shutdown_rx,
        ));
        info!(
            %addr,
            shengpay_merchants = state.settings.shengpay.len(),
            wupay_merchants = state.settings.wupay.len(),
            rules = config.rules.len(),
            "refund-sim listening"
        );
        Ok(SimHandle {
            addr,
            state,
            shutdown,
            accept: Some(accept),
            ticker: Some(ticker),
            permits,
            max_connections,
        })
    }
}

/// A running simulator: its address, its evidence (paid list, ShengPay refunds, call, query and
/// notify logs, statement) and its controls (rules, clock, finish, resend, reset). Dropping it
/// stops the server, the ticker and every notify delivery too.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    permits: Arc<Semaphore>,
    max_connections: u32,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ShengPay refund endpoint.
    pub fn shengpay_url(&self) -> String {
        format!("{}{SHENGPAY_REFUND_PATH}", self.base_url())
    }

    /// The ShengPay status query endpoint (`[shengpay] query_path`).
    pub fn shengpay_query_url(&self) -> String {
        format!("{}{}", self.base_url(), self.state.settings.query_path)
    }

    /// The `.asmx` service address of a WuPay merchant (by our merchant name).
    pub fn wupay_url(&self, merchant: &str) -> Option<String> {
        self.state
            .settings
            .wupay
            .iter()
            .find(|m| m.name == merchant)
            .map(|m| format!("{}{}", self.base_url(), m.path))
    }

    /// Every refund paid, in payment order: WuPay refunds at their call, ShengPay refunds once
    /// they ended `SUCCESS` (at their success time).
    pub fn paid(&self) -> Vec<PaidRefund> {
        lock(&self.state.ledger).paid()
    }

    /// Every ShengPay refund accepted, in acceptance order, whatever its status.
    pub fn refunds(&self) -> Vec<ShengPayRefund> {
        lock(&self.state.refunds).list(None)
    }

    /// The ShengPay refunds of one refund number (one per merchant).
    pub fn refunds_for(&self, refund_no: &str) -> Vec<ShengPayRefund> {
        lock(&self.state.refunds).list(Some(refund_no))
    }

    /// Ends every `PROCESSING` ShengPay refund now (each with its planned status) and starts
    /// their notifies; returns how many ended.
    pub fn finish(&self) -> usize {
        shengpay::end_refunds(&self.state, Which::All)
    }

    /// Every notify delivery attempt (and notify never sent), in order.
    pub fn notifies(&self) -> Vec<NotifyRecord> {
        self.state.notifier.records(None)
    }

    /// The notify records of one refund number.
    pub fn notifies_for(&self, refund_no: &str) -> Vec<NotifyRecord> {
        self.state.notifier.records(Some(refund_no))
    }

    /// Sends the final notify of an ended ShengPay refund once more, now, and returns the
    /// record of that attempt. [`SimError::NotFound`] if there is no such refund, it is still
    /// processing, or it named no `notifyUrl`.
    pub async fn send_notify(&self, refund_no: &str) -> Result<NotifyRecord, SimError> {
        shengpay::resend(&self.state, None, refund_no).await
    }

    /// Every ShengPay status query received (up to `call_log_capacity`), in order.
    pub fn queries(&self) -> Vec<QueryRecord> {
        lock(&self.state.queries).records(None)
    }

    /// The status queries for one refund number.
    pub fn queries_for(&self, refund_no: &str) -> Vec<QueryRecord> {
        lock(&self.state.queries).records(Some(refund_no))
    }

    /// Every provider call received (up to `call_log_capacity`, oldest dropped), in order.
    pub fn calls(&self) -> Vec<CallRecord> {
        lock(&self.state.calls).records()
    }

    /// The calls for one refund number.
    pub fn calls_for(&self, refund_no: &str) -> Vec<CallRecord> {
        let mut calls = self.calls();
        calls.retain(|c| c.refund_no.as_deref() == Some(refund_no));
        calls
    }

    /// Requests per merchant per second of the simulator's clock (refund calls and status
    /// queries, counted apart and together), ordered by provider, merchant and second; only
    /// `merchant`'s when given. Not capped like the call log.
    pub fn rates(&self, merchant: Option<&str>) -> Vec<RateWindow> {
        rate_windows(&self.state, merchant, None)
    }

    /// Replaces all fault rules (all or nothing) and restarts their `times` counters.
    pub fn set_rules(&self, rules: Vec<FaultRule>) -> Result<(), SimError> {
        lock(&self.state.faults)
            .replace(&rules)
            .map_err(SimError::Invalid)
    }

    pub fn rules(&self) -> Vec<FaultRule> {
        lock(&self.state.faults).rules()
    }

    /// Sets the simulator's clock to `now` (it keeps running from there); `None` returns to
    /// the real clock. Decides `refunded_at` and so the statement's business dates.
    pub fn set_now(&self, now: Option<DateTime<Utc>>) {
        self.state.clock.set_now(now);
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.state.clock.now()
    }

    /// Forgets every payment, order, ShengPay refund (and its pending end), call, query,
    /// notify record, arrival count and `times` counter, and stops notifies under way; keeps
    /// rules and clock.
    pub fn reset(&self) {
        reset(&self.state);
    }

    /// The provider statement CSV for `date` (in `tz`, default the configured time zone).
    pub fn statement_csv(
        &self,
        date: NaiveDate,
        provider: Option<Provider>,
        tz: Option<Tz>,
    ) -> Result<String, SimError> {
        let tz = tz.unwrap_or(self.state.settings.tz);
        let rows = lock(&self.state.ledger).statement(date, tz, provider);
        ledger::statement_csv(&rows, tz).map_err(|e| SimError::Io(e.into()))
    }

    /// Connections open right now: lets tests check that abandoned requests (a client that
    /// gave up on a `hang`) do not pile up.
    pub fn open_connections(&self) -> usize {
        self.state.open_connections.load(Ordering::Relaxed)
    }

    /// Stops accepting, gives open connections [`SHUTDOWN_GRACE`] to finish, then closes them.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.await;
        }
        // Every connection holds a permit until its task ends; all permits back = all closed.
        let all = self.permits.acquire_many(self.max_connections);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE * 3, all).await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// The arrival timeline with merchant indices turned into our merchant names.
pub(crate) fn rate_windows(
    state: &SimState,
    merchant: Option<&str>,
    provider: Option<Provider>,
) -> Vec<RateWindow> {
    let settings = &state.settings;
    lock(&state.rates).windows(merchant, provider, |p, i| match p {
        Provider::ShengPay => settings.shengpay.get(i).map(|m| m.name.as_str()),
        Provider::WuPay => settings.wupay.get(i).map(|m| m.name.as_str()),
    })
}

fn reset(state: &SimState) {
    // Bumped first: a notify that checks it after this point stops instead of logging about a
    // refund that no longer exists.
    state.epoch.fetch_add(1, Ordering::SeqCst);
    {
        let mut book = lock(&state.refunds);
        lock(&state.ledger).clear();
        book.clear();
    }
    lock(&state.calls).clear();
    lock(&state.queries).clear();
    lock(&state.rates).clear();
    state.notifier.clear();
    lock(&state.faults).clear_counts();
}

pub(crate) async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    // A dropped sender (the handle is gone) also means shut down.
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<SimState>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = wait_for_shutdown(&mut shutdown) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = wait_for_shutdown(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            state.open_connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(stream, peer, Arc::clone(&state), shutdown).await;
            state.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<SimState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let reset_flag = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ConnIo {
        stream,
        reset: Arc::clone(&reset_flag),
    });
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        let reset_flag = Arc::clone(&reset_flag);
        async move { route(state, reset_flag, req).await }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended");
            }
        }
        () = wait_for_shutdown(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

/// The TCP stream, plus a flag that turns its close into a reset.
struct ConnIo {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            // Linger 0 makes close() send RST instead of FIN: the client sees "connection
            // reset", the way a crashed provider or a middlebox looks. Zero linger never blocks.
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(SERVER, HeaderValue::from_static("refund-sim"));
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => error_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error_json(status: StatusCode, message: &str) -> HttpResponse {
    json(status, &serde_json::json!({ "error": message }))
}

fn query_params(req_query: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(req_query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Reads a whole body, at most `max` bytes. `Ok(Err(response))` is the 413 to send.
async fn read_body(body: Incoming, max: usize) -> Result<Result<Bytes, HttpResponse>, Abort> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Ok(Err(respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain; charset=utf-8",
            "request body too large",
        ))),
        // The client went away mid-body: nobody to answer.
        Err(_) => Err(Abort("request body not received")),
    }
}

async fn route(
    state: Arc<SimState>,
    reset_flag: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<HttpResponse, Abort> {
    let path = req.uri().path().to_owned();
    if path == "/_sim" || path.starts_with("/_sim/") {
        return control(&state, req).await;
    }
    if path == SHENGPAY_REFUND_PATH || path == state.settings.query_path {
        if req.method() != Method::POST {
            return Ok(method_not_allowed());
        }
        let route = if path == SHENGPAY_REFUND_PATH {
            Route::ShengPay
        } else {
            Route::ShengPayQuery
        };
        return provider_call(state, reset_flag, req, route).await;
    }
    let Some(&(merchant, endpoint)) = state.settings.wupay_routes.get(&path) else {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found",
        ));
    };
    let binding = match (endpoint, req.method()) {
        (WuEndpoint::Refund, &Method::GET) => Binding::HttpGet,
        (WuEndpoint::Refund, &Method::POST) => Binding::HttpPost,
        (WuEndpoint::Service, &Method::POST) => match soap_version(req.headers()) {
            Some(binding) => binding,
            None => {
                return Ok(respond(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "text/plain; charset=utf-8",
                    "SOAP requests must be text/xml (1.1) or application/soap+xml (1.2)",
                ));
            }
        },
        (WuEndpoint::Service, &Method::GET) => return Ok(help_page()),
        _ => return Ok(method_not_allowed()),
    };
    provider_call(state, reset_flag, req, Route::WuPay { merchant, binding }).await
}

fn method_not_allowed() -> HttpResponse {
    respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        "method not allowed",
    )
}

fn help_page() -> HttpResponse {
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        "<html><body><h1>WuPay</h1><p>Operation: <b>Refund</b> (refund-sim)</p></body></html>",
    )
}
