//! The axum discovery server: state, router, handlers and middleware.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, JsonRejection},
        ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query,
        Request, State,
    },
    http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use p2p_crypto::{Domain, NodeId, Signature};
use rand::Rng;
use serde::{de::DeserializeOwned, Deserialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    api::{
        request_signing_bytes, AnnounceResponse, ClaimEntry, ClaimResponse, DeleteRequest,
        DeleteResponse, DepositRequest, DepositResponse, MailboxItemWire, MailboxResponse,
        OnlineResponse, PeerEntry, PresenceEntry, RelayResponse, WithdrawResponse,
        HEADER_PRESENCE_EPOCH, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    },
    clock::{Clock, SystemClock},
    error::{AppError, ErrorCode},
    ratelimit::RateLimiter,
    record::{
        b64_decode, b64_encode, validate_name, NameClaim, PresenceRecord, Signed, SignedWire,
        Withdrawal,
    },
    relay::{Relay, RelayMetrics},
    store::{
        Announced, ClaimOutcome, DepositOutcome, LivePresence, MemoryStore, PeerState, RedbStore,
        RequestSeen, Store, StoreError, Withdrawn,
    },
};

/// The routes the server serves, as (method, path template). The OpenAPI document is
/// checked against this list by a test.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", paths::HEALTHZ),
    ("GET", paths::METRICS),
    ("POST", paths::NAMES),
    ("GET", paths::NAME),
    ("POST", paths::PRESENCE),
    ("GET", paths::PRESENCE),
    ("POST", paths::WITHDRAW),
    ("GET", paths::PEER),
    ("POST", paths::MAILBOX),
    ("GET", paths::MAILBOX),
    ("POST", paths::MAILBOX_DELETE),
    ("GET", paths::RELAY),
];

/// Path templates (axum syntax, which is also OpenAPI's).
pub mod paths {
    pub const HEALTHZ: &str = "/healthz";
    pub const METRICS: &str = "/metrics";
    pub const NAMES: &str = "/v1/names";
    pub const NAME: &str = "/v1/names/{name}";
    pub const PRESENCE: &str = "/v1/presence";
    pub const WITHDRAW: &str = "/v1/presence/withdraw";
    pub const PEER: &str = "/v1/peers/{node_id}";
    pub const MAILBOX: &str = "/v1/mailbox/{node_id}";
    pub const MAILBOX_DELETE: &str = "/v1/mailbox/{node_id}/delete";
    pub const RELAY: &str = "/v1/relay";
}

/// Limits and settings of a server. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// redb file for names and mailboxes, used by [`AppState::open`]; `None` keeps them
    /// in memory. Default: `None`. (A PostgreSQL store is given to [`AppState::new`].)
    pub db_path: Option<PathBuf>,
    /// Largest request body, in bytes. Default: 256 KiB.
    pub max_body_bytes: usize,
    /// Largest sealed envelope, in bytes (decoded). Default: 64 KiB.
    pub max_envelope_bytes: usize,
    /// Most envelopes waiting per recipient. Default: 1000.
    pub max_mailbox_count: usize,
    /// Most envelopes returned by one fetch. Default: 100.
    pub mailbox_fetch_batch: usize,
    /// Most ids in one delete request. Default: 1000.
    pub max_delete_ids: usize,
    /// Default page size of the online list. Default: 100.
    pub default_page_size: usize,
    /// Largest page size of the online list. Default: 500.
    pub max_page_size: usize,
    /// Most live presence records (and most tombstones). Default: 100 000.
    pub max_presence: usize,
    /// How far a record's timestamp may be ahead of the server's clock, and how far a
    /// signed mailbox request's timestamp may be from it either way. Default: 60 s.
    pub time_window: Duration,
    /// Sustained write requests (POST) per second per client IP. Default: 5.
    pub write_rate_per_sec: f64,
    /// Burst of write requests per client IP. Default: 60.
    pub write_burst: u32,
    /// Most client IPs tracked by the rate limiter. Default: 100 000.
    pub max_rate_clients: usize,
    /// Most signed mailbox requests remembered for replay detection. Default: 100 000.
    pub max_replay_entries: usize,
    /// Most requests handled at once. Default: 1024.
    pub max_concurrent_requests: usize,
    /// Most open connections. [`serve`] lowers it to leave a quarter of the process's
    /// soft open-file limit (at least 32 descriptors) for everything else, so accepting
    /// never runs out of descriptors. Default: 4096.
    pub max_connections: usize,
    /// Most open connections from one client IP; more are answered `503
    /// too_many_connections` and closed. Default: 64.
    pub max_connections_per_ip: usize,
    /// Time a client has to send a request's headers, counted from the connection's
    /// start or the end of the previous response: also how long an idle kept-alive
    /// connection stays open. Default: 10 s.
    pub header_timeout: Duration,
    /// Time a request may take once its headers are in, body included (`408
    /// request_timeout`). Default: 10 s.
    pub request_timeout: Duration,
    /// How often [`serve`] drops expired presence, old tombstones and old request
    /// signatures from the store. Default: 10 s.
    pub cleanup_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            db_path: None,
            max_body_bytes: 256 * 1024,
            max_envelope_bytes: 64 * 1024,
            max_mailbox_count: 1000,
            mailbox_fetch_batch: 100,
            max_delete_ids: 1000,
            default_page_size: 100,
            max_page_size: 500,
            max_presence: 100_000,
            time_window: Duration::from_secs(60),
            write_rate_per_sec: 5.0,
            write_burst: 60,
            max_rate_clients: 100_000,
            max_replay_entries: 100_000,
            max_concurrent_requests: 1024,
            max_connections: 4096,
            max_connections_per_ip: 64,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            cleanup_interval: Duration::from_secs(10),
        }
    }
}

/// Error starting or running a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("cannot open the discovery store: {0}")]
    Store(#[from] StoreError),
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared state of a server. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServerConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limiter: Mutex<RateLimiter>,
    metrics: Metrics,
    /// Requests handled at once ([`ServerConfig::max_concurrent_requests`]); a request
    /// over it waits for a permit.
    requests: tokio::sync::Semaphore,
    relay: std::sync::OnceLock<RelayAdvert>,
    /// The value of [`HEADER_PRESENCE_EPOCH`] on every response, when presence lives in
    /// this process only.
    presence_epoch: Option<header::HeaderValue>,
}

/// The relay served beside this HTTP server, as `GET /v1/relay` announces it.
struct RelayAdvert {
    node_id: NodeId,
    port: u16,
    /// The address nodes reach it at, when it is not this server's host at `port`.
    addr: Option<SocketAddr>,
    metrics: Arc<RelayMetrics>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.inner.config)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a poisoned lock is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AppState {
    /// Opens the store named by `config.db_path` (redb), or an in-memory one, with the
    /// system clock.
    pub fn open(config: ServerConfig) -> Result<Self, ServerError> {
        let store: Arc<dyn Store> = match &config.db_path {
            Some(path) => Arc::new(RedbStore::open(path)?),
            None => Arc::new(MemoryStore::new()),
        };
        Ok(Self::new(config, store, Arc::new(SystemClock)))
    }

    /// State over a given store and clock (`config.db_path` is ignored).
    pub fn new(config: ServerConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let inner = Inner {
            limiter: Mutex::new(RateLimiter::new(
                config.write_rate_per_sec,
                config.write_burst,
                config.max_rate_clients,
            )),
            metrics: Metrics::default(),
            requests: tokio::sync::Semaphore::new(config.max_concurrent_requests.max(1)),
            relay: std::sync::OnceLock::new(),
            presence_epoch: (!store.keeps_presence())
                .then(|| header::HeaderValue::from(rand::thread_rng().gen::<u64>())),
            config,
            store,
            clock,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Announces the relay running beside this server (on `GET /v1/relay`) and adds its
    /// counters to `/metrics`. Only the first call takes effect.
    pub fn set_relay(&self, relay: &Relay) -> Result<(), ServerError> {
        let port = relay.local_addr()?.port();
        self.advertise_relay(relay.node_id(), port, relay.metrics());
        Ok(())
    }

    /// Announces a relay by its parts: its key, its UDP port on this host, and the
    /// counters to show in `/metrics`. Only the first call takes effect.
    pub fn advertise_relay(&self, node_id: NodeId, port: u16, metrics: Arc<RelayMetrics>) {
        let _ = self.inner.relay.set(RelayAdvert {
            node_id,
            port,
            addr: None,
            metrics,
        });
    }

    /// Announces the relay running beside this server at an address of its own: where
    /// nodes reach it when that is not this server's host (an instance behind an HTTP
    /// load balancer, whose relay is reached directly). Only the first call of this and
    /// [`AppState::set_relay`] takes effect.
    pub fn set_relay_at(&self, relay: &Relay, public: SocketAddr) -> Result<(), ServerError> {
        let port = relay.local_addr()?.port();
        let _ = self.inner.relay.set(RelayAdvert {
            node_id: relay.node_id(),
            port,
            addr: Some(public),
            metrics: relay.metrics(),
        });
        Ok(())
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.inner.config.time_window.as_millis()).unwrap_or(u64::MAX)
    }

    /// The store.
    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// Hands this server's names and mailboxes over to the server of `to` (see
    /// [`crate::handover`]). Call it once this server no longer serves requests.
    pub async fn hand_over(
        &self,
        to: &crate::Client,
    ) -> Result<crate::handover::HandoverReport, crate::handover::HandoverError> {
        crate::handover::hand_over(self.store(), to).await
    }

    /// Drops what expired from the store, every `cleanup_interval`, until `stop`.
    async fn cleanup_loop(self, stop: CancellationToken) {
        let every = self
            .inner
            .config
            .cleanup_interval
            .max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.store().cleanup(self.now()).await {
                tracing::warn!(error = %e, "discovery store cleanup failed; retrying later");
            }
        }
    }

    /// Refuses timestamps too far in the future.
    fn check_not_future(&self, ts: u64) -> Result<(), AppError> {
        let now = self.now();
        if ts > now.saturating_add(self.window_ms()) {
            return Err(AppError::new(
                ErrorCode::TimestampOutOfWindow,
                format!("timestamp {ts} is more than the allowed window ahead of {now}"),
            ));
        }
        Ok(())
    }
}

/// Builds the router (for `oneshot` tests, or to nest in another app). Client IPs come
/// from `ConnectInfo<SocketAddr>` when present (as [`serve`] provides); without it they
/// read as `0.0.0.0`.
pub fn router(state: AppState) -> Router {
    let config = &state.inner.config;
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::METRICS, get(metrics))
        .route(paths::NAMES, post(claim_name))
        .route(paths::NAME, get(lookup_name))
        .route(paths::PRESENCE, post(announce).get(online))
        .route(paths::WITHDRAW, post(withdraw))
        .route(paths::PEER, get(lookup_peer))
        .route(paths::MAILBOX, post(deposit).get(fetch_mailbox))
        .route(paths::MAILBOX_DELETE, post(delete_mailbox))
        .route(paths::RELAY, get(relay_info))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` completes, then finishes in-flight requests.
/// Runs on the caller's tokio runtime, so a node can embed it. Connections are capped
/// per client IP and in all ([`ServerConfig::max_connections`]), and each has the
/// header, idle and request deadlines of its [`ServerConfig`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let config = state.inner.config.clone();
    let stop = CancellationToken::new();
    let cleanup = tokio::spawn(state.clone().cleanup_loop(stop.clone()));
    let served = crate::listen::serve(listener, router(state), &config, shutdown).await;
    stop.cancel();
    let _ = cleanup.await;
    served
}

// ---------------------------------------------------------------------------------------
// Extractors that turn axum's rejections into `AppError`.

/// JSON body; rejections become `malformed_json` / `unsupported_media_type` /
/// `body_too_large`.
struct JsonBody<T>(T);

fn body_rejection(status: StatusCode, text: String) -> AppError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::new(ErrorCode::BodyTooLarge, text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::new(ErrorCode::UnsupportedMediaType, text),
        _ => AppError::new(ErrorCode::MalformedJson, text),
    }
}

/// Whether the request says its body is JSON: `application/json`, with no parameter but
/// `charset=utf-8` (JSON is UTF-8; `+json` types and other charsets are refused).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        && parts.all(|param| {
            let param = param.trim();
            param.is_empty() || {
                let (k, v) = param.split_once('=').unwrap_or((param, ""));
                k.trim().eq_ignore_ascii_case("charset")
                    && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            }
        })
}

fn not_json() -> AppError {
    AppError::new(
        ErrorCode::UnsupportedMediaType,
        "expected Content-Type: application/json (charset utf-8)",
    )
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        if !is_json(req.headers()) {
            return Err(not_json());
        }
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rej) => {
                let rej: JsonRejection = rej;
                Err(body_rejection(rej.status(), rej.body_text()))
            }
        }
    }
}

/// A single path parameter as a string.
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|e| AppError::new(ErrorCode::InvalidParameter, e.body_text()))
    }
}

impl PathParam {
    fn node_id(&self) -> Result<NodeId, AppError> {
        self.0
            .parse()
            .map_err(|e| AppError::new(ErrorCode::InvalidNodeId, format!("invalid NodeId: {e}")))
    }
}

/// Query string; rejections become `invalid_parameter`.
struct QueryParams<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| AppError::new(ErrorCode::InvalidParameter, e.body_text()))
    }
}

fn client_ip(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| {
            c.0.ip().to_canonical()
        })
}

// ---------------------------------------------------------------------------------------
// Middleware.

/// Token-bucket limit on write requests per client IP: every method but GET and HEAD
/// (unknown methods too, though no route takes them).
fn over_rate(state: &AppState, req: &Request) -> Option<AppError> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return None;
    }
    let ip = client_ip(req.extensions());
    let wait = lock(&state.inner.limiter).check(ip, state.now()).err()?;
    Some(AppError::new(ErrorCode::RateLimited, "too many write requests").with_retry_after(wait))
}

/// Refuses a request whose `Content-Length` is over the body limit before reading any
/// of its body.
fn oversize_body(state: &AppState, req: &Request) -> Option<AppError> {
    let max = state.inner.config.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    declared.is_some_and(|n| n > max as u64).then(|| {
        AppError::new(
            ErrorCode::BodyTooLarge,
            format!("request bodies are limited to {max} bytes"),
        )
    })
}

/// The methods counted by name in the metrics; any other is `other`.
const KNOWN_METHODS: &[Method] = &[
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

/// The method as a metrics label, from a fixed set.
fn method_label(method: &Method) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| *m == method)
        .map_or("other", Method::as_str)
}

/// The JSON error for a refusal made around the handlers (the request timeout's 408).
fn layer_refusal(status: StatusCode) -> AppError {
    match status {
        StatusCode::REQUEST_TIMEOUT => AppError::new(
            ErrorCode::RequestTimeout,
            "the request did not arrive within the server's deadline",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            AppError::new(ErrorCode::BodyTooLarge, "the request body is too large")
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            AppError::new(ErrorCode::ServerFull, "the server is overloaded")
        }
        _ => AppError::new(ErrorCode::MalformedRequest, "the request was refused"),
    }
}

/// The server's own work around every request, in one layer (axum clones a route's
/// layers for every request, so one layer costs less than several):
/// - waits for one of the [`ServerConfig::max_concurrent_requests`] permits;
/// - refuses a body declared over the limit ([`oversize_body`]), then a write over the
///   client's rate ([`over_rate`]), before anything inside runs;
/// - answers `408 request_timeout` when the handler (reading the body included) takes
///   longer than [`ServerConfig::request_timeout`];
/// - gives a bodiless refusal from inside the JSON error body;
/// - adds the presence epoch header;
/// - counts requests by method, route and status (labels from fixed sets: known methods
///   and routes, anything else `other` / `unmatched`), and rejections by code;
/// - at debug level, runs the request in a span and logs its status and time.
async fn front(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_permit) = state.inner.requests.acquire().await else {
        return layer_refusal(StatusCode::SERVICE_UNAVAILABLE).into_response();
    };
    let started = tracing::enabled!(tracing::Level::DEBUG).then(std::time::Instant::now);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| {
            ROUTES
                .iter()
                .map(|(_, path)| *path)
                .find(|path| *path == p.as_str())
                .unwrap_or("unmatched")
        });
    let method = method_label(req.method());
    let refused = oversize_body(&state, &req).or_else(|| over_rate(&state, &req));
    let mut resp = match refused {
        Some(e) => e.into_response(),
        None => {
            let span = tracing::debug_span!("request", method = %req.method(), uri = %req.uri());
            let deadline = state.inner.config.request_timeout;
            match tokio::time::timeout(deadline, next.run(req).instrument(span)).await {
                Ok(resp) => resp,
                Err(_) => layer_refusal(StatusCode::REQUEST_TIMEOUT).into_response(),
            }
        }
    };
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error())
        && resp.extensions().get::<ErrorCode>().is_none()
    {
        resp = layer_refusal(status).into_response();
    }
    if let Some(epoch) = &state.inner.presence_epoch {
        resp.headers_mut()
            .insert(HEADER_PRESENCE_EPOCH, epoch.clone());
    }
    let code = resp.extensions().get::<ErrorCode>().copied();
    state
        .inner
        .metrics
        .record(method, route, resp.status().as_u16(), code);
    if let Some(started) = started {
        tracing::debug!(
            method,
            route,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "request served"
        );
    }
    resp
}

async fn unknown_route() -> AppError {
    AppError::new(ErrorCode::UnknownRoute, "no such endpoint")
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take that method",
    )
}

// ---------------------------------------------------------------------------------------
// Handlers.

/// `GET /healthz`: `200 {"status": "ok", "store": KIND}` when the store answers (for
/// PostgreSQL, a round trip to the database), else `503 store_unavailable`.
async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    state.store().health().await?;
    Ok(Json(serde_json::json!({
        "status": "ok",
        "store": state.store().kind(),
    })))
}

/// `GET /v1/relay`: the relay this server runs (404 when it runs none).
async fn relay_info(State(state): State<AppState>) -> Result<Json<RelayResponse>, AppError> {
    state
        .inner
        .relay
        .get()
        .map(|r| {
            Json(RelayResponse {
                node_id: r.node_id,
                port: r.addr.map_or(r.port, |a| a.port()),
                addr: r.addr,
            })
        })
        .ok_or_else(|| AppError::new(ErrorCode::NotFound, "this discovery server runs no relay"))
}

fn claim_entry(c: &Signed<NameClaim>) -> ClaimEntry {
    let wire = c.to_wire();
    ClaimEntry {
        record: wire.record,
        signature: wire.signature,
        decoded: Some(c.record().clone()),
    }
}

/// Whether a presence entry carries the observed IP: only for a record that announces
/// an unspecified address.
fn needs_observed_ip(live: &LivePresence) -> bool {
    live.signed
        .record()
        .addrs
        .iter()
        .any(|a| a.ip().is_unspecified())
}

fn expires_in_secs(live: &LivePresence, now: u64) -> u64 {
    live.expires_at_ms.saturating_sub(now) / 1000
}

fn presence_entry(live: &LivePresence, now: u64) -> PresenceEntry {
    let wire = live.signed.to_wire();
    PresenceEntry {
        record: wire.record,
        signature: wire.signature,
        observed_ip: needs_observed_ip(live).then_some(live.observed_ip),
        expires_in_secs: expires_in_secs(live, now),
        decoded: Some(live.signed.record().clone()),
    }
}

/// `POST /v1/names`: claim a name (register).
async fn claim_name(
    State(state): State<AppState>,
    JsonBody(wire): JsonBody<SignedWire>,
) -> Result<Json<ClaimResponse>, AppError> {
    let claim = Signed::<NameClaim>::from_wire(&wire)?;
    state.check_not_future(claim.record().timestamp_ms)?;
    let outcome = state.store().claim(&claim).await?;
    let name = claim.record().name.clone();
    match outcome {
        ClaimOutcome::Stored | ClaimOutcome::Unchanged => Ok(Json(ClaimResponse {
            changed: outcome == ClaimOutcome::Stored,
            claim: claim_entry(&claim),
        })),
        ClaimOutcome::Taken => Err(AppError::new(
            ErrorCode::NameTaken,
            format!("name {name:?} belongs to another key"),
        )),
        ClaimOutcome::Stale => Err(AppError::new(
            ErrorCode::StaleRecord,
            "this key already has a claim at least as new",
        )),
    }
}

/// The entry for `node` from what the store knows; `None` if it knows nothing.
fn peer_entry(node: NodeId, state: &PeerState, now: u64) -> Option<PeerEntry> {
    if state.claim.is_none() && state.presence.is_none() {
        return None;
    }
    Some(PeerEntry {
        node_id: node,
        claim: state.claim.as_ref().map(claim_entry),
        presence: state.presence.as_ref().map(|l| presence_entry(l, now)),
    })
}

/// [`peer_entry`] as the JSON body of a response, put together from each record's JSON
/// (made once per record, see [`Signed`]), so a lookup serializes nothing but the node
/// id, the observed IP and the seconds left. `None` if it knows nothing.
fn peer_entry_body(node: NodeId, state: &PeerState, now: u64) -> Option<Response> {
    if state.claim.is_none() && state.presence.is_none() {
        return None;
    }
    let assembled = (|| {
        let claim = match &state.claim {
            Some(c) => Some(c.json()?),
            None => None,
        };
        let presence = match &state.presence {
            Some(live) => Some((live, live.signed.json()?)),
            None => None,
        };
        let mut out = String::with_capacity(1024);
        out.push_str("{\"node_id\":\"");
        out.push_str(&node.to_string());
        out.push_str("\",\"claim\":");
        match claim {
            Some(c) => {
                out.push('{');
                out.push_str(&c.wire_fields);
                out.push_str(",\"decoded\":");
                out.push_str(&c.decoded);
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"presence\":");
        match presence {
            Some((live, p)) => {
                out.push('{');
                out.push_str(&p.wire_fields);
                if needs_observed_ip(live) {
                    out.push_str(",\"observed_ip\":\"");
                    out.push_str(&live.observed_ip.to_string());
                    out.push('"');
                }
                out.push_str(",\"expires_in_secs\":");
                out.push_str(&expires_in_secs(live, now).to_string());
                out.push_str(",\"decoded\":");
                out.push_str(&p.decoded);
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push('}');
        Some(out)
    })();
    Some(match assembled {
        Some(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        None => Json(peer_entry(node, state, now)?).into_response(),
    })
}

/// `GET /v1/names/{name}`.
async fn lookup_name(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Response, AppError> {
    validate_name(&name)?;
    let now = state.now();
    let found = state.store().lookup_name(&name, now).await?;
    found
        .and_then(|s| {
            let node = s.claim.as_ref()?.record().node_id;
            peer_entry_body(node, &s, now)
        })
        .ok_or_else(|| AppError::new(ErrorCode::NotFound, format!("no claim on {name:?}")))
}

/// `GET /v1/peers/{node_id}`.
async fn lookup_peer(
    State(state): State<AppState>,
    param: PathParam,
) -> Result<Response, AppError> {
    let node = param.node_id()?;
    let now = state.now();
    let found = state.store().peer(&node, now).await?;
    peer_entry_body(node, &found, now)
        .ok_or_else(|| AppError::new(ErrorCode::NotFound, format!("unknown node {node}")))
}

/// `POST /v1/presence`: announce (login) or renew.
async fn announce(
    State(state): State<AppState>,
    ConnectInfoIp(ip): ConnectInfoIp,
    JsonBody(wire): JsonBody<SignedWire>,
) -> Result<Json<AnnounceResponse>, AppError> {
    let signed = Signed::<PresenceRecord>::from_wire(&wire)?;
    let rec = signed.record().clone();
    state.check_not_future(rec.timestamp_ms)?;
    if let Some(name) = rec.name.as_deref() {
        let claim = state
            .store()
            .lookup_name(name, state.now())
            .await?
            .and_then(|s| s.claim);
        match claim {
            Some(c) if c.record().node_id == rec.node_id => {}
            Some(_) => {
                return Err(AppError::new(
                    ErrorCode::NameTaken,
                    "the record names a name that belongs to another key",
                ))
            }
            None => {
                return Err(AppError::new(
                    ErrorCode::NameNotClaimed,
                    "claim the name before announcing it",
                ))
            }
        }
    }
    let now = state.now();
    let result = state
        .store()
        .announce(&signed, ip, now, state.inner.config.max_presence)
        .await?;
    match result {
        Announced::Live { .. } => {
            let ttl = u64::from(rec.ttl_secs);
            let reannounce_after_secs = rand::thread_rng().gen_range(ttl / 2..=ttl * 3 / 4);
            Ok(Json(AnnounceResponse {
                reannounce_after_secs: reannounce_after_secs.max(1),
                observed_ip: ip,
            }))
        }
        Announced::Stale => Err(AppError::new(
            ErrorCode::StaleRecord,
            "record is not newer than the last one from this node, or already expired",
        )),
        Announced::Full => Err(AppError::new(
            ErrorCode::ServerFull,
            "the server holds its maximum number of live records",
        )),
    }
}

/// The client IP as an extractor.
struct ConnectInfoIp(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ConnectInfoIp {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        Ok(ConnectInfoIp(client_ip(&parts.extensions)))
    }
}

/// `POST /v1/presence/withdraw`: logout.
async fn withdraw(
    State(state): State<AppState>,
    JsonBody(wire): JsonBody<SignedWire>,
) -> Result<Json<WithdrawResponse>, AppError> {
    let signed = Signed::<Withdrawal>::from_wire(&wire)?;
    state.check_not_future(signed.record().timestamp_ms)?;
    let now = state.now();
    let result = state
        .store()
        .withdraw(&signed, now, state.inner.config.max_presence)
        .await?;
    match result {
        Withdrawn::Applied { was_live } => Ok(Json(WithdrawResponse {
            withdrawn: was_live,
        })),
        Withdrawn::Stale => Err(AppError::new(
            ErrorCode::StaleRecord,
            "withdrawal is not newer than the last record from this node",
        )),
        Withdrawn::Full => Err(AppError::new(
            ErrorCode::ServerFull,
            "the server holds its maximum number of records",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlineQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/presence?cursor=&limit=`: the online list.
async fn online(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<OnlineQuery>,
) -> Result<Json<OnlineResponse>, AppError> {
    let config = &state.inner.config;
    let limit = q.limit.unwrap_or(config.default_page_size);
    if limit == 0 || limit > config.max_page_size {
        return Err(AppError::new(
            ErrorCode::InvalidParameter,
            format!("limit must be 1..={}", config.max_page_size),
        ));
    }
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<NodeId>().map_err(|e| {
            AppError::new(ErrorCode::InvalidParameter, format!("invalid cursor: {e}"))
        })?),
    };
    let now = state.now();
    let (page, next) = state.store().online_page(cursor, limit, now).await?;
    let peers = page
        .iter()
        .map(|(live, claim)| PeerEntry {
            node_id: live.signed.record().node_id,
            claim: claim.as_ref().map(claim_entry),
            presence: Some(presence_entry(live, now)),
        })
        .collect();
    Ok(Json(OnlineResponse {
        peers,
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// `POST /v1/mailbox/{node_id}`: deposit a sealed envelope.
async fn deposit(
    State(state): State<AppState>,
    param: PathParam,
    JsonBody(req): JsonBody<DepositRequest>,
) -> Result<(StatusCode, Json<DepositResponse>), AppError> {
    let to = param.node_id()?;
    let config = &state.inner.config;
    if req.envelope.len() > config.max_envelope_bytes * 4 / 3 + 4 {
        return Err(AppError::new(
            ErrorCode::EnvelopeTooLarge,
            format!(
                "envelopes are limited to {} bytes",
                config.max_envelope_bytes
            ),
        ));
    }
    let envelope = b64_decode(&req.envelope)
        .map_err(|e| AppError::new(ErrorCode::InvalidEnvelope, format!("envelope: {e}")))?;
    if envelope.is_empty() {
        return Err(AppError::new(ErrorCode::InvalidEnvelope, "empty envelope"));
    }
    if envelope.len() > config.max_envelope_bytes {
        return Err(AppError::new(
            ErrorCode::EnvelopeTooLarge,
            format!(
                "envelopes are limited to {} bytes",
                config.max_envelope_bytes
            ),
        ));
    }
    let known = state.store().peer(&to, state.now()).await?;
    if known.claim.is_none() && known.presence.is_none() {
        return Err(AppError::new(
            ErrorCode::NotFound,
            format!("unknown recipient {to}"),
        ));
    }
    let max = config.max_mailbox_count;
    match state.store().deposit(&to, envelope, max).await? {
        DepositOutcome::Stored(id) => Ok((StatusCode::CREATED, Json(DepositResponse { id }))),
        DepositOutcome::Full => Err(AppError::new(
            ErrorCode::MailboxFull,
            format!("the mailbox of {to} is full ({max} envelopes)"),
        )),
    }
}

/// Checks a signed mailbox request for `node`: headers present, timestamp within the
/// window, signature by `node` over method, path and query, body hash and timestamp,
/// not seen before.
async fn authenticate(
    state: &AppState,
    node: &NodeId,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AppError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(sig)) = (header(HEADER_TIMESTAMP), header(HEADER_SIGNATURE)) else {
        return Err(AppError::new(
            ErrorCode::Unauthenticated,
            format!("signed request required: {HEADER_TIMESTAMP} and {HEADER_SIGNATURE} headers"),
        ));
    };
    let ts: u64 = ts.parse().map_err(|_| {
        AppError::new(
            ErrorCode::Unauthenticated,
            "timestamp header is not an integer",
        )
    })?;
    let sig: Signature = sig.parse().map_err(|_| {
        AppError::new(
            ErrorCode::BadSignature,
            "signature header is not base32 of 64 bytes",
        )
    })?;
    let now = state.now();
    let window = state.window_ms();
    if ts.abs_diff(now) > window {
        return Err(AppError::new(
            ErrorCode::TimestampOutOfWindow,
            "request timestamp is too far from the server's clock",
        ));
    }
    let signed = request_signing_bytes(method.as_str(), path_and_query, body, ts);
    node.verify(Domain::Request, &signed, &sig).map_err(|_| {
        AppError::new(
            ErrorCode::BadSignature,
            "request signature does not verify with the mailbox owner's key",
        )
    })?;
    let forget_at = ts.saturating_add(window).saturating_add(1);
    let max = state.inner.config.max_replay_entries;
    match state
        .store()
        .check_request(&sig, forget_at, now, max)
        .await?
    {
        RequestSeen::Fresh => Ok(()),
        RequestSeen::Replayed => Err(AppError::new(
            ErrorCode::ReplayedRequest,
            "this signed request was already used",
        )),
        RequestSeen::Full => Err(AppError::new(
            ErrorCode::RateLimited,
            "too many signed requests in flight; retry shortly",
        )
        .with_retry_after(Duration::from_secs(1))),
    }
}

fn path_and_query(uri: &axum::http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// `GET /v1/mailbox/{node_id}`: fetch envelopes (signed by the recipient).
async fn fetch_mailbox(
    State(state): State<AppState>,
    param: PathParam,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<MailboxResponse>, AppError> {
    let node = param.node_id()?;
    authenticate(&state, &node, &method, path_and_query(&uri), &headers, b"").await?;
    let batch = state.inner.config.mailbox_fetch_batch;
    let (items, more) = state.store().fetch(&node, batch).await?;
    Ok(Json(MailboxResponse {
        items: items
            .into_iter()
            .map(|(id, env)| MailboxItemWire {
                id,
                envelope: b64_encode(&env),
            })
            .collect(),
        more,
    }))
}

/// `POST /v1/mailbox/{node_id}/delete`: delete envelopes by id (signed by the recipient).
async fn delete_mailbox(
    State(state): State<AppState>,
    param: PathParam,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DeleteResponse>, AppError> {
    let node = param.node_id()?;
    if !is_json(&headers) {
        return Err(not_json());
    }
    let body = body.map_err(|e| body_rejection(e.status(), e.body_text()))?;
    authenticate(
        &state,
        &node,
        &method,
        path_and_query(&uri),
        &headers,
        &body,
    )
    .await?;
    let req: DeleteRequest = serde_json::from_slice(&body)
        .map_err(|e| AppError::new(ErrorCode::MalformedJson, e.to_string()))?;
    if req.ids.len() > state.inner.config.max_delete_ids {
        return Err(AppError::new(
            ErrorCode::InvalidParameter,
            format!(
                "at most {} ids per delete",
                state.inner.config.max_delete_ids
            ),
        ));
    }
    let deleted = state.store().delete(&node, &req.ids).await?;
    Ok(Json(DeleteResponse { deleted }))
}

// ---------------------------------------------------------------------------------------
// Metrics.

#[derive(Debug, Default)]
struct Metrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Debug, Default)]
struct MetricsInner {
    requests: BTreeMap<(&'static str, &'static str, u16), u64>,
    rejections: BTreeMap<&'static str, u64>,
}

impl Metrics {
    fn record(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        code: Option<ErrorCode>,
    ) {
        let mut m = lock(&self.inner);
        *m.requests.entry((method, route, status)).or_default() += 1;
        if let Some(code) = code {
            *m.rejections.entry(code.as_str()).or_default() += 1;
        }
    }
}

/// `GET /metrics`: Prometheus text format. The request and rejection counters, the rate
/// limiter and the relay are this instance's; the store's counts (names, mailboxes, live
/// records) are the shared database's, so every instance on it shows the same. While the
/// store is unreachable, `discovery_store_up` is 0 and its counts are left out.
async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.store().stats(state.now()).await;
    if let Err(e) = &stats {
        tracing::warn!(error = %e, "metrics without the store's counts");
    }
    let clients = lock(&state.inner.limiter).clients();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP discovery_requests_total HTTP requests by method, route and status."
    );
    let _ = writeln!(out, "# TYPE discovery_requests_total counter");
    {
        let m = lock(&state.inner.metrics.inner);
        for ((method, route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "discovery_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP discovery_rejections_total Error responses by error code."
        );
        let _ = writeln!(out, "# TYPE discovery_rejections_total counter");
        for (code, n) in &m.rejections {
            let _ = writeln!(out, "discovery_rejections_total{{reason=\"{code}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP discovery_store_info The kind of store this instance uses."
    );
    let _ = writeln!(out, "# TYPE discovery_store_info gauge");
    let _ = writeln!(
        out,
        "discovery_store_info{{kind=\"{}\"}} 1",
        state.store().kind()
    );
    let mut gauges = vec![
        (
            "discovery_store_up",
            "Whether the store answered this scrape (1) or not (0).",
            u64::from(stats.is_ok()),
        ),
        (
            "discovery_rate_limited_clients",
            "Client IPs tracked by the rate limiter.",
            clients as u64,
        ),
    ];
    if let Ok(stats) = stats {
        gauges.extend([
            (
                "discovery_live_records",
                "Live presence records.",
                stats.live,
            ),
            ("discovery_names", "Claimed names.", stats.names),
            (
                "discovery_mailbox_envelopes",
                "Envelopes waiting in all mailboxes.",
                stats.envelopes,
            ),
        ]);
    }
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    }
    if let Some(relay) = state.inner.relay.get() {
        relay.metrics.render(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{NameClaim, PresenceRecord, RelayRef};
    use p2p_crypto::SecretKey;

    fn presence(sk: &SecretKey, addr: &str, relay: Option<RelayRef>) -> Signed<PresenceRecord> {
        let record = PresenceRecord {
            node_id: sk.public(),
            name: Some("alice".into()),
            addrs: vec![
                addr.parse().expect("addr"),
                "[::1]:9".parse().expect("addr"),
            ],
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: 1_700_000_000_000,
            ttl_secs: 60,
            relay,
        };
        Signed::sign(sk, record).expect("sign")
    }

    async fn body_of(resp: Response) -> serde_json::Value {
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("the body is JSON")
    }

    #[tokio::test]
    async fn a_lookups_assembled_body_is_the_entry_serialized_whole() {
        let sk = SecretKey::generate();
        let relay = Some(RelayRef {
            node_id: SecretKey::generate().public(),
            addr: "192.0.2.7:443".parse().expect("addr"),
        });
        let claim = Signed::sign(
            &sk,
            NameClaim {
                name: "alice".into(),
                node_id: sk.public(),
                mailbox_key: sk.mailbox_secret().public(),
                timestamp_ms: 5,
            },
        )
        .expect("sign");
        let now = 1_700_000_000_000;
        let live = |addr: &str, relay| LivePresence {
            signed: presence(&sk, addr, relay),
            observed_ip: "203.0.113.9".parse().expect("ip"),
            expires_at_ms: now + 42_500,
        };
        let states = [
            PeerState {
                claim: Some(claim.clone()),
                presence: None,
            },
            PeerState {
                claim: None,
                presence: Some(live("0.0.0.0:4000", None)),
            },
            PeerState {
                claim: Some(claim.clone()),
                presence: Some(live("198.51.100.1:4000", relay)),
            },
            PeerState {
                claim: Some(claim),
                presence: Some(live("0.0.0.0:4000", relay)),
            },
        ];
        for state in &states {
            let whole = serde_json::to_value(peer_entry(sk.public(), state, now).expect("entry"))
                .expect("serialize");
            // Twice: the second answer comes from the records' JSON made by the first.
            for _ in 0..2 {
                let body = peer_entry_body(sk.public(), state, now).expect("body");
                assert_eq!(body_of(body).await, whole);
            }
        }
        assert!(peer_entry_body(sk.public(), &PeerState::default(), now).is_none());
    }
}
