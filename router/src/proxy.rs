//! One routed request, start to finish: checks, the body made ready for
//! its tries, the tries themselves (endpoint, credentials, per-try timeout),
//! failover to the next endpoint, and the answer with its `x-cascade-*`
//! headers.
//!
//! Invariant: nothing here awaits an actor or holds a lock across an
//! await. The plan and settings are `Arc` snapshots read from `watch`es;
//! outcomes go to the tiers by message.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cascade_actors::TierId;
use cascade_actors::resilience::SharedRetryBudget;
use cascade_actors::routing::RequestAuth;
use cascade_actors::text::{duration, root_cause};
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, field};

use crate::body::{self, BoxError, ProxyBody, Tracked};
use crate::config::{Route, RouterConfig};
use crate::headers;
use crate::plan::{EndpointState, Plan, PlanTier};
use crate::pool;
use crate::stats::{InFlight, Stats, WorkerStats};
use crate::timer;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// The settings a request reads, rebuilt on reload.
#[derive(Clone)]
pub struct Settings {
    pub config: RouterConfig,
    pub routes: Vec<Route>,
    pub budget: SharedRetryBudget,
}

impl Settings {
    /// Settings for `config`, keeping `previous`'s budget when its
    /// configuration did not change (a reload must not refill it).
    pub fn new(config: RouterConfig, previous: Option<&Settings>) -> Settings {
        let budget = match previous {
            Some(p) if p.config.retry_budget == config.retry_budget => p.budget.clone(),
            _ => SharedRetryBudget::new(config.retry_budget.clone(), Instant::now()),
        };
        Settings {
            routes: config.replay_routes(),
            config,
            budget,
        }
    }

    fn replay_safe(&self, method: &Method, path: &str) -> bool {
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
            || self
                .routes
                .iter()
                .any(|r| r.method == method && r.path == path)
    }
}

/// A worker's own copy of what a `watch` publishes. Reading the `watch`
/// itself writes its lock word and the published `Arc`'s count, lines that
/// every worker's requests would then take turns at; the copy's lock and
/// count are this worker's alone, and a new value costs one clone.
pub struct Local<T> {
    cell: std::sync::Mutex<(watch::Receiver<Arc<T>>, Arc<T>)>,
}

impl<T: Clone> Local<T> {
    pub fn new(mut published: watch::Receiver<Arc<T>>) -> Local<T> {
        let current = Arc::new(T::clone(&published.borrow_and_update()));
        Local {
            cell: std::sync::Mutex::new((published, current)),
        }
    }

    /// The newest value published.
    pub fn get(&self) -> Arc<T> {
        let mut cell = self
            .cell
            .lock()
            // Nothing under this lock can panic.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (published, current) = &mut *cell;
        // A closed channel (the router stopping) keeps the last value.
        if published.has_changed().unwrap_or(false) {
            *current = Arc::new(T::clone(&published.borrow_and_update()));
        }
        Arc::clone(current)
    }
}

/// What every request on one worker shares: the worker's own copies of the
/// plan and the settings, its own counters and client, and its index into
/// each endpoint's idle connections; `all` and `pending` are the router's,
/// shared by every worker.
pub struct Shared {
    /// The plans as published, to wait for a new one.
    pub plans: watch::Receiver<Arc<Plan>>,
    /// This worker's copy of the newest plan, for a request to read.
    pub plan: Local<Plan>,
    pub settings: watch::Receiver<Arc<Settings>>,
    /// This worker's copy of the settings, for a request to read.
    pub local_settings: Local<Settings>,
    pub client: HttpClient,
    /// This worker's counters.
    pub stats: Arc<WorkerStats>,
    /// The router's, for what is not per worker.
    pub all: Arc<Stats>,
    /// Requests waiting for a tier now (bounded by `max_pending`).
    pub pending: Arc<AtomicUsize>,
    /// Rotates ties between equally loaded endpoints (the worker's own).
    pub turn: AtomicUsize,
    /// First attempts not yet handed to the retry budget (the worker's own).
    pub deposits: AtomicU64,
    /// Which worker this is: its idle connections in each endpoint's pool.
    pub worker: usize,
    /// The process's main runtime, where the tiers' token caches fetch (so
    /// their connections do not live on a worker's runtime).
    pub control: tokio::runtime::Handle,
    /// This worker's kept per-try timers.
    pub tries: timer::Spares,
    /// Spans are exported: a request's span is made at `info`, else at
    /// `debug`. A span at `info` that only the log layer sees costs more
    /// user-space work than the rest of the request (the log layer formats
    /// its fields, the registry keeps it) and shows up in no log line, as
    /// nothing is logged at `info` per request.
    pub traced: bool,
}

/// The span of one request, at `$level`.
macro_rules! request_span {
    ($level:expr, $request:expr) => {
        tracing::span!(
            $level,
            "request",
            otel.kind = "server",
            http.request.method = %$request.method(),
            url.path = $request.uri().path(),
            backend.tier = field::Empty,
            attempts = field::Empty,
            http.response.status_code = field::Empty,
        )
    };
}

/// First attempts a worker counts before it hands them to the retry budget
/// together: the budget's lock is every worker's, and taking it on every
/// request would have the cores take turns at its cache line. A worker
/// hands in what it holds before it asks for a retry, so what the budget
/// misses is at most this many first attempts of each other worker (a
/// fifth of a retry each), which errs on the side of fewer retries.
const DEPOSIT_BATCH: u64 = 16;

impl Shared {
    /// Counts a first attempt toward the retry budget.
    fn deposit(&self, budget: &SharedRetryBudget, now: Instant) {
        if self.deposits.fetch_add(1, Ordering::Relaxed) + 1 >= DEPOSIT_BATCH {
            self.hand_in(budget, now);
        }
    }

    /// Hands the first attempts counted so far to the retry budget.
    fn hand_in(&self, budget: &SharedRetryBudget, now: Instant) {
        budget.deposit_many(now, self.deposits.swap(0, Ordering::Relaxed));
    }
}

/// An answer cascade makes itself, and why.
struct Refusal {
    status: StatusCode,
    body: serde_json::Value,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            body: json!({ "error": message.into() }),
            retry_after: None,
        }
    }
}

/// How a try failed, for the retry decision, the breaker and the client.
struct Failure {
    tier: TierId,
    endpoint: String,
    /// For the tier's breaker and the client: `HTTP 503`, `connection refused`.
    error: String,
    /// The upstream's own answer (a 502/503/504), forwarded if it is the last.
    response: Option<Response<hyper::body::Incoming>>,
    timed_out: bool,
}

/// The hyper service: never fails, every problem is an HTTP answer.
pub async fn handle(
    shared: Arc<Shared>,
    client: Arc<headers::Client>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let span = if shared.traced {
        request_span!(tracing::Level::INFO, request)
    } else {
        request_span!(tracing::Level::DEBUG, request)
    };
    let started = Instant::now();
    let in_flight = shared.stats.begin();
    // A disabled span (no subscriber wants it: spans are not exported) is
    // not entered on every poll, and the request's future is not moved
    // once more into the wrapper that would enter it.
    let traced = !span.is_disabled();
    let routing = route(&shared, &client, request, in_flight, started);
    let (response, tier, attempts) = if traced {
        routing.instrument(span.clone()).await
    } else {
        routing.await
    };
    let status = response.status().as_u16();
    if traced {
        span.record("backend.tier", tier.map_or("none", TierId::as_str));
        span.record("attempts", attempts);
        span.record("http.response.status_code", status);
    }
    let now = Instant::now();
    let latency = now.saturating_duration_since(started);
    shared.stats.answered(now, tier, latency, attempts);
    cascade_actors::metrics::metrics().router_request(
        shared.worker,
        tier,
        status,
        attempts,
        latency,
    );
    Ok(response)
}

/// Routes one request: (the answer, the tier that gave it, tries made).
async fn route(
    shared: &Shared,
    client: &headers::Client,
    request: Request<hyper::body::Incoming>,
    in_flight: InFlight,
    arrived: Instant,
) -> (Response<ProxyBody>, Option<TierId>, u32) {
    let settings = shared.local_settings.get();
    let config = &settings.config;
    let deadline = arrived + config.deadline;
    let (mut parts, incoming) = request.into_parts();

    let seen = headers::Seen::scan(&parts.headers);
    if parts.method == Method::CONNECT || seen.upgrade {
        return refuse(
            Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "cascade does not proxy CONNECT or protocol upgrades (WebSocket): \
                 the service's API is plain request and response",
            ),
            None,
            0,
        );
    }
    let max_body = config.max_body.as_u64();
    if let Some(length) = seen.content_length
        && length > max_body
    {
        body::linger(incoming);
        return refuse(too_large(max_body), None, 0);
    }
    let path = parts.uri.path();
    let replay_safe = settings.replay_safe(&parts.method, path);
    // When the next try starts, for its timeout: a request's arrival, unless
    // its body had to be read or a tier waited for first (the clock is read
    // again only then, and for a retry).
    let mut try_start = arrived;
    let mut prepared = if replay_safe && http_body::Body::is_end_stream(&incoming) {
        // No body (most GETs): nothing to read, and no timer to arm for it.
        body::Prepared::Replayable(bytes::Bytes::new())
    } else if replay_safe {
        let reading = body::prepare(incoming, config.max_replay_body.as_u64(), max_body);
        // Boxed, as the paths below that are not every request's: inline,
        // each would make every request's future larger to move.
        let read = Box::pin(tokio::time::timeout_at(deadline, reading)).await;
        try_start = Instant::now();
        match read {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(error)) => {
                if let Some(max) = body::too_large(error.as_ref()) {
                    return refuse(too_large(max), None, 0);
                }
                let message = format!(
                    "cannot read the request body: {}",
                    root_cause(error.as_ref())
                );
                return refuse(Refusal::new(StatusCode::BAD_REQUEST, message), None, 0);
            }
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {} (router.deadline)",
                    duration(config.deadline)
                );
                return refuse(Refusal::new(StatusCode::REQUEST_TIMEOUT, message), None, 0);
            }
        }
    } else {
        body::streaming(incoming, max_body)
    };

    let proto = if parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        "https"
    } else {
        "http"
    };
    headers::upstream_request(&mut parts.headers, &seen, client, proto);
    let client_authorization = seen.authorization;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    shared.deposit(&settings.budget, arrived);
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut first_failure: Option<(TierId, String)> = None;
    let mut last: Option<Failure> = None;
    loop {
        let attempts = tried.len() as u32;
        let current = last.as_ref().map(|f| f.tier);
        let plan = shared.plan.get();
        let turn = shared.turn.fetch_add(1, Ordering::Relaxed);
        // Borrowed from this iteration's plan: nothing of the tier is copied.
        let chosen = plan.choose(current, &tried, turn);
        let (tier, endpoint) = match chosen {
            Some(found) => found,
            None => {
                let wait_until = deadline.min(Instant::now() + config.start_wait);
                let waited = if last.is_some() || plan.coming_up() {
                    // Boxed, as it is seldom needed (see the body's read).
                    Box::pin(wait_for_endpoint(
                        shared, config, current, &tried, wait_until,
                    ))
                    .await
                } else {
                    Err(WaitEnd::Nothing)
                };
                match (waited, last) {
                    (Ok(()), failure) => {
                        // The wait is not the next try's to pay for.
                        try_start = Instant::now();
                        last = failure;
                        continue;
                    }
                    (Err(WaitEnd::Full), _) => {
                        let message = format!(
                            "{} requests are already waiting for a tier (router.max_pending)",
                            config.max_pending
                        );
                        let refusal = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message)
                            .with_retry_after(Duration::from_secs(1));
                        return refuse(refusal, None, attempts);
                    }
                    (Err(end), Some(failure)) => {
                        let why = match end {
                            WaitEnd::TimedOut => format!(
                                "no other endpoint served within {}",
                                duration(config.start_wait.min(config.deadline))
                            ),
                            _ => "no other endpoint serves".to_owned(),
                        };
                        return fail(failure, attempts, &why);
                    }
                    (Err(_), None) => {
                        cascade_actors::metrics::metrics().router_no_tier();
                        let plan = shared.plan.get();
                        return refuse(no_tier(&plan, config), None, 0);
                    }
                }
            }
        };
        if attempts >= config.max_attempts {
            let failure = last.expect("a try was made before max_attempts is reached");
            return fail(
                failure,
                attempts,
                &format!("{attempts} tries made (router.max_attempts)"),
            );
        }
        if let Some(failure) = &last {
            cascade_actors::metrics::metrics().router_retry(failure.tier);
            let now = Instant::now();
            try_start = now;
            shared.hand_in(&settings.budget, now);
            if !settings.budget.try_withdraw(now) {
                cascade_actors::metrics::metrics().router_budget_exhausted();
                return fail(
                    last.expect("checked"),
                    attempts,
                    "the retry budget is spent",
                );
            }
        }
        let Some(body) = prepared.take() else {
            let failure = last.expect("a streamed body is gone only after a try");
            return fail(failure, attempts, "its body was streamed to the first try");
        };
        let attempts = attempts + 1;
        // Set on the request's own headers, which every try copies: set on
        // the copy, it would grow a map cloned to its exact size.
        match &endpoint.host {
            Some(host) => {
                parts.headers.insert(header::HOST, host.clone());
            }
            None => {
                parts.headers.remove(header::HOST);
            }
        }

        let outcome = attempt(
            tier,
            endpoint,
            &parts,
            &path_and_query,
            body,
            client_authorization,
            shared,
            config,
            (try_start, deadline),
        )
        .await;
        match outcome {
            Ok((response, load)) => {
                // When the try started: a tier's idle time (for its cold-start
                // timeout) is counted in minutes, and this saves a clock read.
                tier.runtime.answered(try_start);
                if let Some((from, error)) = first_failure {
                    shared
                        .all
                        .retried_failover(from, tier.tier(), error, attempts);
                }
                let idle = config.request_timeout(tier.tier());
                return (
                    forward(response, tier.tier(), attempts, idle, (in_flight, load)),
                    Some(tier.tier()),
                    attempts,
                );
            }
            Err(Attempt::TooLarge(max)) => {
                return refuse(too_large(max), Some(tier.tier()), attempts);
            }
            Err(Attempt::Failed(failure)) => {
                // Only a failed try is remembered: most requests need no list.
                tried.push(Arc::clone(endpoint));
                debug!(backend.tier = %failure.tier, endpoint = %failure.endpoint, error = %failure.error, attempts, "Try failed.");
                if first_failure.is_none() {
                    first_failure = Some((failure.tier, failure.error.clone()));
                }
                if !prepared.replayable() {
                    let why = not_retried_because(replay_safe, &parts.method, path);
                    return fail(failure, attempts, &why);
                }
                last = Some(failure);
            }
        }
    }
}

fn not_retried_because(replay_safe: bool, method: &Method, path: &str) -> String {
    if replay_safe {
        "its body was larger than router.max_replay_body, so it was not kept for a retry".into()
    } else {
        format!("{method} {path} is not replay-safe (router.replay_safe)")
    }
}

enum WaitEnd {
    /// Too many requests wait already.
    Full,
    /// Nothing is coming up: waiting would not help.
    Nothing,
    TimedOut,
}

/// Waits, holding one of `max_pending` places, until the plan offers an
/// untried endpoint, at most until `until`.
async fn wait_for_endpoint(
    shared: &Shared,
    config: &RouterConfig,
    current: Option<TierId>,
    tried: &[Arc<EndpointState>],
    until: Instant,
) -> Result<(), WaitEnd> {
    if shared.plans.borrow().table.stopping {
        return Err(WaitEnd::Nothing);
    }
    let waiting = shared.pending.fetch_add(1, Ordering::Relaxed);
    let _place = Place(&shared.pending);
    if waiting >= config.max_pending {
        return Err(WaitEnd::Full);
    }
    let mut plans = shared.plans.clone();
    let offered =
        plans.wait_for(|plan| plan.table.stopping || plan.choose(current, tried, 0).is_some());
    match tokio::time::timeout_at(until, offered).await {
        Ok(Ok(plan)) if !plan.table.stopping => Ok(()),
        Ok(_) => Err(WaitEnd::Nothing),
        Err(_) => Err(WaitEnd::TimedOut),
    }
}

/// Gives a waiting place back when dropped.
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Attempt {
    Failed(Failure),
    TooLarge(u64),
}

/// Counts a request on an endpoint while its response lasts, and then
/// gives the connection that carried it back to the endpoint's pool.
pub struct Load {
    endpoint: Arc<EndpointState>,
    worker: usize,
    connection: Option<SendRequest<ProxyBody>>,
}

impl Load {
    fn new(endpoint: &Arc<EndpointState>, worker: usize) -> Load {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Load {
            endpoint: Arc::clone(endpoint),
            worker,
            connection: None,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(connection) = self.connection.take() {
            self.endpoint.pool.give_back(self.worker, connection);
        }
    }
}

/// Why a request found no response: whether it could not connect, and the
/// error.
type SendError = (bool, BoxError);

/// Sends `request` on a pooled connection of this worker's to `endpoint`.
/// A reused connection the upstream closed before the request went out is
/// replaced by a new one; the request was not sent, so this is no retry.
async fn send_pooled(
    shared: &Shared,
    endpoint: &EndpointState,
    mut request: Request<ProxyBody>,
    load: &mut Load,
) -> Result<Response<hyper::body::Incoming>, SendError> {
    loop {
        let (mut sender, reused) = pool::checkout(endpoint, shared.worker)
            .await
            .map_err(|e| (true, BoxError::from(e)))?;
        match sender.try_send_request(request).await {
            Ok(response) => {
                load.connection = Some(sender);
                return Ok(response);
            }
            Err(mut error) => match error.take_message() {
                Some(unsent) if reused => request = unsent,
                _ => return Err((false, BoxError::from(error.into_error()))),
            },
        }
    }
}

/// One try on `endpoint`, started at `now` and over by `deadline` at the
/// latest: the response head, or why there is none.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    tier: &PlanTier,
    endpoint: &Arc<EndpointState>,
    parts: &http::request::Parts,
    path_and_query: &PathAndQuery,
    body: ProxyBody,
    client_authorization: bool,
    shared: &Shared,
    config: &RouterConfig,
    (now, deadline): (Instant, Instant),
) -> Result<(Response<hyper::body::Incoming>, Load), Attempt> {
    let id = tier.tier();
    let failed = |error: String, timed_out: bool| {
        Attempt::Failed(Failure {
            tier: id,
            endpoint: endpoint.endpoint.id.clone(),
            error,
            response: None,
            timed_out,
        })
    };
    // Most endpoints have no base path: the client's path goes as it came.
    let path_and_query = if endpoint.base_path.is_empty() {
        path_and_query.clone()
    } else {
        PathAndQuery::try_from(format!("{}{path_and_query}", endpoint.base_path))
            .map_err(|e| failed(format!("cannot build the upstream URL: {e}"), false))?
    };
    // A pooled connection takes the origin form; hyper-util's client the
    // absolute one, to choose its connection by.
    let pooled = endpoint.scheme == Scheme::HTTP;
    let uri = if pooled {
        Uri::from(path_and_query)
    } else {
        Uri::builder()
            .scheme(endpoint.scheme.clone())
            .authority(endpoint.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| failed(format!("cannot build the upstream URL: {e}"), false))?
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = parts.headers.clone();

    let per_try = match tier.info().cold_start_timeout {
        Some(cold) if tier.runtime.cold(now) => cold,
        _ => config.request_timeout(id),
    };
    let try_deadline = deadline.min(now + per_try);

    let mut token: Option<HeaderValue> = None;
    if let RequestAuth::IdToken(credentials) = &tier.info().auth {
        let fetching = {
            let credentials = Arc::clone(credentials);
            shared
                .control
                .spawn(async move { credentials.authorization().await })
        };
        let fetched = Box::pin(tokio::time::timeout_at(try_deadline, fetching)).await;
        let value = match fetched {
            Ok(Ok(Ok(value))) => value,
            Ok(Err(e)) => return Err(failed(format!("ID token: the fetch failed: {e}"), false)),
            // Not the endpoint's fault: the tier's probes report token problems.
            Ok(Ok(Err(e))) => return Err(failed(format!("ID token: {e}"), false)),
            Err(_) => return Err(failed("ID token: not fetched in time".into(), true)),
        };
        let name = if client_authorization {
            headers::X_SERVERLESS_AUTHORIZATION
        } else {
            header::AUTHORIZATION
        };
        request.headers_mut().insert(name, value.clone());
        token = Some(value);
    }

    let mut load = Load::new(endpoint, shared.worker);
    let sent = if pooled {
        let sending = send_pooled(shared, endpoint, request, &mut load);
        timer::within(&shared.tries, try_deadline, sending).await
    } else {
        let sending = shared.client.request(request);
        timer::within(&shared.tries, try_deadline, sending)
            .await
            .map(|sent| sent.map_err(|e| (e.is_connect(), BoxError::from(e))))
    };
    let response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err((connect, error))) => {
            if let Some(max) = body::too_large(error.as_ref()) {
                return Err(Attempt::TooLarge(max));
            }
            let error = describe_send_error(connect, error.as_ref());
            tier.report(endpoint, Some(error.clone()));
            return Err(failed(error, false));
        }
        Err(_) => {
            let error = format!(
                "no response within {}",
                duration(try_deadline.saturating_duration_since(now))
            );
            tier.report(endpoint, Some(error.clone()));
            return Err(failed(error, true));
        }
    };
    let status = response.status();
    if matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) {
        let error = format!("HTTP {}", status.as_u16());
        tier.report(endpoint, Some(error.clone()));
        return Err(Attempt::Failed(Failure {
            tier: id,
            endpoint: endpoint.endpoint.id.clone(),
            error,
            response: Some(response),
            timed_out: false,
        }));
    }
    if status == StatusCode::UNAUTHORIZED
        && let (Some(value), RequestAuth::IdToken(credentials)) = (&token, &tier.info().auth)
    {
        // Dropping a cached token is local work; bounded all the same.
        let (credentials, value) = (Arc::clone(credentials), value.clone());
        let dropping = shared
            .control
            .spawn(async move { credentials.rejected(&value).await });
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), dropping)).await;
    }
    tier.report(endpoint, None);
    Ok((response, load))
}

/// The error of a try, as the breaker and the client read it.
fn describe_send_error(connect: bool, error: &(dyn std::error::Error + 'static)) -> String {
    let cause = root_cause(error);
    if connect {
        format!("cannot connect: {cause}")
    } else {
        format!("no response: {cause}")
    }
}

/// The upstream's response on its way to the client.
fn forward(
    response: Response<hyper::body::Incoming>,
    tier: TierId,
    attempts: u32,
    idle: Duration,
    guard: (InFlight, Load),
) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::mark(&mut parts.headers, tier.as_str(), attempts);
    let body = Tracked::new(incoming, idle, guard).boxed_unsync();
    Response::from_parts(parts, body)
}

/// The answer when the last try failed and `why` there is no other: the
/// upstream's own 502/503/504 if it sent one, else cascade's 502 (504 after
/// a timeout) naming the tier.
fn fail(failure: Failure, attempts: u32, why: &str) -> (Response<ProxyBody>, Option<TierId>, u32) {
    let tier = failure.tier;
    if let Some(response) = failure.response {
        let (mut parts, incoming) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::mark(&mut parts.headers, tier.as_str(), attempts);
        return (
            Response::from_parts(parts, incoming.map_err(BoxError::from).boxed_unsync()),
            Some(tier),
            attempts,
        );
    }
    let status = if failure.timed_out {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let message = format!(
        "{tier} ({}): {}; not retried: {why}",
        failure.endpoint, failure.error
    );
    let mut response = json_response(
        status,
        &json!({ "error": message, "tier": tier, "attempts": attempts }),
    );
    headers::mark(response.headers_mut(), tier.as_str(), attempts);
    (response, Some(tier), attempts)
}

fn too_large(max: u64) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {max} bytes (router.max_body)"),
    )
}

/// 503 when no tier serves: every tier and why, and when to come back.
fn no_tier(plan: &Plan, config: &RouterConfig) -> Refusal {
    let tiers: Vec<serde_json::Value> = plan
        .table
        .tiers
        .iter()
        .map(|t| json!({ "tier": t.tier, "state": t.state, "reason": t.reason }))
        .collect();
    let retry_after = config.start_wait.max(Duration::from_secs(1));
    let error = if plan.table.stopping {
        "cascade is shutting down".to_owned()
    } else if plan.coming_up() {
        format!(
            "no tier is serving yet; waited {} (router.start_wait)",
            duration(config.start_wait)
        )
    } else {
        "no tier is serving".to_owned()
    };
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: json!({ "error": error, "decision": plan.table.decision, "tiers": tiers }),
        retry_after: Some(retry_after),
    }
}

impl Refusal {
    fn with_retry_after(mut self, after: Duration) -> Refusal {
        self.retry_after = Some(after);
        self
    }
}

fn refuse(
    refusal: Refusal,
    tier: Option<TierId>,
    attempts: u32,
) -> (Response<ProxyBody>, Option<TierId>, u32) {
    let mut response = json_response(refusal.status, &refusal.body);
    if let Some(after) = refusal.retry_after {
        let secs = after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    headers::mark(
        response.headers_mut(),
        tier.map_or("none", TierId::as_str),
        attempts,
    );
    (response, None, attempts)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
