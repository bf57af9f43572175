//! The router in-process against real HTTP backends on loopback (the demo
//! backend, and an echo server that shows what arrived), with a routing
//! table the test publishes itself and a recording actor for outcomes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::{Path, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use cascade_actors::contract::{TierError, TierMsg};
use cascade_actors::routing::{
    Endpoint, RequestAuth, RequestCredentials, RequestOutcome, RequestReporter, RouteInfo,
    RouteTier, RoutingTable,
};
use cascade_actors::{TierId, TierState};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::*;

// === backends ===

/// An echo server: answers with what it received, or misbehaves by path.
struct Echo {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn start(name: &'static str) -> Echo {
        Echo::with_mode(name, Mode::Normal).await
    }

    /// Answers every request with `code`.
    async fn failing(code: u16) -> Echo {
        Echo::with_mode("failing", Mode::Status(code)).await
    }

    /// Waits `ms` before every answer.
    async fn slow(ms: u64) -> Echo {
        Echo::with_mode("slow", Mode::Slow(ms)).await
    }

    async fn with_mode(name: &'static str, mode: Mode) -> Echo {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new()
            .route(
                "/status/{code}",
                any(|Path(code): Path<u16>| async move {
                    (
                        axum::http::StatusCode::from_u16(code).unwrap(),
                        format!("status {code}"),
                    )
                }),
            )
            .route(
                "/slow/{ms}",
                any(|Path(ms): Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    "slow"
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    let chunks = futures_util::stream::unfold(0, |i| async move {
                        match i {
                            0 => Some((Ok::<_, std::io::Error>("first\n"), 1)),
                            1 => {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                                Some((Ok("second\n"), 2))
                            }
                            _ => None,
                        }
                    });
                    AxumBody::from_stream(chunks)
                }),
            )
            .fallback(move |request: Request| async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let headers: BTreeMap<String, String> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                    .collect();
                let mut response = axum::Json(serde_json::json!({
                    "backend": name,
                    "method": parts.method.as_str(),
                    "uri": parts.uri.to_string(),
                    "headers": headers,
                    "body_len": body.len(),
                }))
                .into_response();
                response
                    .headers_mut()
                    .insert("connection", "x-hop-from-backend".parse().unwrap());
                response
                    .headers_mut()
                    .insert("x-hop-from-backend", "1".parse().unwrap());
                response
            })
            .layer(axum::middleware::from_fn(
                move |request: Request, next: axum::middleware::Next| {
                    let hits = counted.clone();
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        match mode {
                            Mode::Normal => {}
                            Mode::Status(code) => {
                                let status = axum::http::StatusCode::from_u16(code).unwrap();
                                return (status, format!("status {code}")).into_response();
                            }
                            Mode::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        }
                        let response: Response = next.run(request).await;
                        response
                    }
                },
            ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Echo { addr, hits, task }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Normal,
    Status(u16),
    Slow(u64),
}

/// A port nothing listens on.
async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

// === outcomes ===

/// Records the request outcomes reported to a tier.
struct Recorder;

type Outcomes = Arc<Mutex<Vec<RequestOutcome>>>;

impl Actor for Recorder {
    type Msg = TierMsg;
    type State = Outcomes;
    type Arguments = Outcomes;

    async fn pre_start(
        &self,
        _: ActorRef<TierMsg>,
        args: Outcomes,
    ) -> Result<Outcomes, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<TierMsg>,
        msg: TierMsg,
        state: &mut Outcomes,
    ) -> Result<(), ActorProcessingErr> {
        if let TierMsg::RequestOutcome(outcome) = msg {
            state.lock().unwrap().push(outcome);
        }
        Ok(())
    }
}

async fn recorder(tier: TierId) -> (RequestReporter, Outcomes) {
    let outcomes: Outcomes = Arc::default();
    let (actor, _) = Actor::spawn(None, Recorder, outcomes.clone())
        .await
        .unwrap();
    (RequestReporter::new(tier, actor), outcomes)
}

// === tables ===

fn tier(id: TierId, state: TierState, urls: &[String]) -> RouteTier {
    RouteTier {
        tier: id,
        state,
        reason: format!("{state} for the test"),
        endpoints: urls
            .iter()
            .enumerate()
            .map(|(i, u)| Endpoint::new(format!("{id}-{i}"), u.clone()))
            .collect(),
        info: RouteInfo::default(),
        reporter: None,
    }
}

fn table(active: Option<TierId>, tiers: Vec<RouteTier>) -> RoutingTable {
    RoutingTable {
        active,
        tiers,
        starting: None,
        decision: "decided by the test".into(),
        stopping: false,
    }
}

// === the router under test ===

struct Harness {
    routes: watch::Sender<RoutingTable>,
    router: Option<Router>,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Harness {
    async fn start(config: RouterConfig, initial: RoutingTable) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (routes, rx) = watch::channel(initial);
        let router = Router::start(listener, config, rx, true).unwrap();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Harness {
            routes,
            router: Some(router),
            addr,
            http,
        }
    }

    /// A router whose one tier, `local`, is healthy at `url`.
    async fn local(config: RouterConfig, url: String) -> Harness {
        let local = tier(TierId::Local, TierState::Healthy, &[url]);
        Harness::start(config, table(Some(TierId::Local), vec![local])).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (up to 2 s) until `n` requests are in flight.
    async fn wait_in_flight(&self, n: u64) {
        let handle = self.router.as_ref().unwrap().handle();
        for _ in 0..200 {
            if handle.status().in_flight >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.status().in_flight, n);
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn config() -> RouterConfig {
    RouterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        start_wait: Duration::from_secs(3),
        ..RouterConfig::default()
    }
}

/// One second of 16 kHz mono 16-bit PCM, as a WAV file.
fn wav() -> Vec<u8> {
    let samples: Vec<i16> = (0..16_000)
        .map(|i| ((i * 37) % 2000) as i16 - 1000)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&16_000u32.to_le_bytes());
    out.extend_from_slice(&32_000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

async fn demo_backend() -> (String, tokio::task::JoinHandle<()>) {
    let options = cascade_demo::Options {
        port: 0,
        ..cascade_demo::Options::default()
    };
    let server = cascade_demo::bind(options).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    let task = tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    (url, task)
}

// === tests ===

#[tokio::test]
async fn health_and_embed_reach_the_demo_backend() {
    let (url, backend) = demo_backend().await;
    let h = Harness::local(config(), url).await;
    let health = h.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(header(&health, "x-cascade-tier"), "local");
    assert_eq!(header(&health, "x-cascade-attempts"), "1");
    let embed = h.post("/embed", wav()).await;
    assert_eq!(embed.status(), 200);
    let body: Value = embed.json().await.unwrap();
    assert_eq!(body["dim"], 192);
    assert_eq!(body["embedding"].as_array().unwrap().len(), 192);
    backend.abort();
}

#[tokio::test]
async fn a_failed_try_goes_to_the_next_tier_and_is_reported() {
    let echo = Echo::start("local").await;
    let (reporter, outcomes) = recorder(TierId::Docker).await;
    let mut docker = tier(TierId::Docker, TierState::Healthy, &[dead_url().await]);
    docker.reporter = Some(reporter);
    let h = Harness::start(
        config(),
        table(
            Some(TierId::Docker),
            vec![
                docker,
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    let response = h.post("/embed", b"audio".to_vec()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-tier"), "local");
    assert_eq!(header(&response, "x-cascade-attempts"), "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["body_len"], 5, "the buffered body was sent again");
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0].endpoint, "docker-0");
    let error = outcomes[0].error.as_deref().unwrap();
    assert!(error.contains("cannot connect"), "{error}");
}

#[tokio::test]
async fn another_endpoint_of_the_same_tier_comes_first() {
    let a = Echo::failing(503).await;
    let b = Echo::start("b").await;
    let local = Echo::start("local").await;
    let (reporter, outcomes) = recorder(TierId::GcpVm).await;
    let mut pool = tier(TierId::GcpVm, TierState::Healthy, &[a.url(), b.url()]);
    pool.reporter = Some(reporter);
    let h = Harness::start(
        config(),
        table(
            Some(TierId::GcpVm),
            vec![
                pool,
                tier(TierId::Local, TierState::Healthy, &[local.url()]),
            ],
        ),
    )
    .await;
    // Both endpoints get requests; every answer comes from b, some after a 503 on a.
    for _ in 0..6 {
        let response = h.get("/x").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cascade-tier"), "gcp_vm");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["backend"], "b");
    }
    assert!(a.hits() > 0 && b.hits() >= 6);
    assert_eq!(local.hits(), 0);
    // The tier's breaker counts failed requests in a row: b's answer after
    // each of a's 503s is reported, so a run never spans an answered request.
    let reported = cascade_actors::resilience::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        "the outcomes to arrive",
        || async {
            let reported: Vec<(String, Option<String>)> = outcomes
                .lock()
                .unwrap()
                .iter()
                .map(|o| (o.endpoint.clone(), o.error.clone()))
                .collect();
            (reported.len() >= 2 * a.hits()).then_some(reported)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", outcomes.lock().unwrap()));
    let expected: Vec<(String, Option<String>)> = (0..a.hits())
        .flat_map(|_| {
            [
                ("gcp_vm-0".to_owned(), Some("HTTP 503".to_owned())),
                ("gcp_vm-1".to_owned(), None),
            ]
        })
        .collect();
    assert_eq!(reported, expected);
}

#[tokio::test]
async fn a_request_that_is_not_replay_safe_is_not_retried() {
    let echo = Echo::start("local").await;
    let h = Harness::start(
        config(),
        table(
            Some(TierId::Docker),
            vec![
                tier(TierId::Docker, TierState::Healthy, &[dead_url().await]),
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    let response = h.post("/enroll", b"x".to_vec()).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-cascade-tier"), "docker");
    assert_eq!(header(&response, "x-cascade-attempts"), "1");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("docker (docker-0): cannot connect"),
        "{error}"
    );
    assert!(error.contains("POST /enroll is not replay-safe"), "{error}");
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn a_body_over_the_replay_buffer_is_not_retried() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        max_replay_body: bytesize::ByteSize::kib(1),
        ..config()
    };
    let h = Harness::start(
        config,
        table(
            Some(TierId::Docker),
            vec![
                tier(TierId::Docker, TierState::Healthy, &[dead_url().await]),
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    let response = h.post("/embed", vec![7u8; 4096]).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("max_replay_body"),
        "{body}"
    );
    // A small one is.
    let response = h.post("/embed", vec![7u8; 100]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-attempts"), "2");
    // A large body through a healthy tier streams whole.
    h.routes.send_modify(|t| t.active = Some(TierId::Local));
    let response = h.post("/embed", vec![7u8; 100_000]).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["body_len"], 100_000);
}

#[tokio::test]
async fn with_no_tier_serving_the_answer_is_503_naming_every_tier() {
    let mut t = table(
        None,
        vec![
            tier(TierId::Docker, TierState::Unavailable, &[]),
            tier(TierId::Local, TierState::Unhealthy, &[]),
        ],
    );
    t.tiers[0].reason = "daemon not running".into();
    t.tiers[1].reason = "crash loop: exited 5 times".into();
    t.decision = "no tier is healthy (docker: daemon not running; local: crash loop)".into();
    let h = Harness::start(config(), t).await;
    let started = std::time::Instant::now();
    let response = h.get("/health").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "nothing is starting: no wait"
    );
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "3");
    assert_eq!(header(&response, "x-cascade-tier"), "none");
    assert_eq!(header(&response, "x-cascade-attempts"), "0");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["tiers"][0]["tier"], "docker");
    assert_eq!(body["tiers"][0]["reason"], "daemon not running");
    assert_eq!(body["tiers"][1]["state"], "unhealthy");
    assert!(
        body["decision"]
            .as_str()
            .unwrap()
            .contains("no tier is healthy")
    );
}

#[tokio::test]
async fn requests_wait_for_a_tier_that_is_starting() {
    let echo = Echo::start("local").await;
    let mut t = table(None, vec![tier(TierId::Local, TierState::Starting, &[])]);
    t.starting = Some(TierId::Local);
    let h = Harness::start(config(), t).await;
    let url = echo.url();
    let routes = h.routes.clone();
    let publish = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        routes.send_replace(table(
            Some(TierId::Local),
            vec![tier(TierId::Local, TierState::Healthy, &[url])],
        ));
    });
    let response = h.get("/waited").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-tier"), "local");
    publish.await.unwrap();
}

#[tokio::test]
async fn the_time_spent_waiting_for_a_tier_is_not_taken_from_its_first_try() {
    // The tier comes up after 500 ms and answers in 300 ms, within its
    // 600 ms per-try timeout: 800 ms after the request arrived.
    let slow = Echo::slow(300).await;
    let mut config = config();
    config.tiers.insert(
        TierId::Local,
        config::TierRoute {
            request_timeout: Some(Duration::from_millis(600)),
        },
    );
    let mut t = table(None, vec![tier(TierId::Local, TierState::Starting, &[])]);
    t.starting = Some(TierId::Local);
    let h = Harness::start(config, t).await;
    let url = slow.url();
    let routes = h.routes.clone();
    let publish = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        routes.send_replace(table(
            Some(TierId::Local),
            vec![tier(TierId::Local, TierState::Healthy, &[url])],
        ));
    });
    let response = h.get("/waited").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-attempts"), "1");
    publish.await.unwrap();
}

#[tokio::test]
async fn a_start_that_takes_too_long_ends_in_503_after_start_wait() {
    let mut t = table(None, vec![tier(TierId::Local, TierState::Starting, &[])]);
    t.starting = Some(TierId::Local);
    let config = RouterConfig {
        start_wait: Duration::from_millis(300),
        ..config()
    };
    let h = Harness::start(config, t).await;
    let started = std::time::Instant::now();
    let response = h.get("/x").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("router.start_wait"),
        "{body}"
    );
}

#[tokio::test]
async fn beyond_max_pending_requests_are_refused_at_once() {
    let mut t = table(None, vec![tier(TierId::Local, TierState::Starting, &[])]);
    t.starting = Some(TierId::Local);
    let config = RouterConfig {
        max_pending: 1,
        start_wait: Duration::from_secs(2),
        ..config()
    };
    let h = Harness::start(config, t).await;
    let waiting = {
        let http = h.http.clone();
        let url = h.url("/first");
        tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
    };
    // Only once the first is in (and so holds the one place) does the
    // second go: sent together, either could take the place.
    let handle = h.router.as_ref().unwrap().handle();
    for _ in 0..500 {
        if handle.status().in_flight > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.status().in_flight, 1, "the first request is waiting");
    let mut refused = None;
    for _ in 0..100 {
        let response = h.get("/second").await;
        let body: Value = response.json().await.unwrap();
        if body["error"].as_str().unwrap_or("").contains("max_pending") {
            refused = Some(body);
            break;
        }
    }
    assert!(
        refused.is_some(),
        "the second request was never refused for max_pending"
    );
    assert_eq!(waiting.await.unwrap(), 503);
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let failing = Echo::failing(503).await;
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        retry_budget: cascade_actors::resilience::RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 0.2,
            window: Duration::from_secs(10),
        },
        ..config()
    };
    let h = Harness::start(
        config,
        table(
            Some(TierId::Docker),
            vec![
                tier(TierId::Docker, TierState::Healthy, &[failing.url()]),
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    // A reserve of two retries (0.2/s over 10 s), nothing earned.
    for _ in 0..2 {
        let response = h.get("/x").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cascade-tier"), "local");
    }
    let response = h.get("/x").await;
    assert_eq!(
        response.status(),
        503,
        "the upstream's own 503 is forwarded"
    );
    assert_eq!(header(&response, "x-cascade-tier"), "docker");
    assert_eq!(header(&response, "x-cascade-attempts"), "1");
    assert_eq!(response.text().await.unwrap(), "status 503");
}

#[tokio::test]
async fn at_most_max_attempts_tries_and_never_the_same_endpoint_twice() {
    let failing = Echo::failing(502).await;
    let url = failing.url();
    let config = RouterConfig {
        max_attempts: 2,
        ..config()
    };
    let h = Harness::start(
        config,
        table(
            Some(TierId::GcpVm),
            vec![tier(
                TierId::GcpVm,
                TierState::Healthy,
                &[url.clone(), url.clone(), url],
            )],
        ),
    )
    .await;
    let response = h.get("/x").await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-cascade-attempts"), "2");
    assert_eq!(failing.hits(), 2);
}

#[tokio::test]
async fn a_try_that_times_out_moves_on() {
    let slow = Echo::slow(5000).await;
    let echo = Echo::start("local").await;
    let mut config = config();
    config.tiers.insert(
        TierId::Docker,
        config::TierRoute {
            request_timeout: Some(Duration::from_millis(200)),
        },
    );
    let h = Harness::start(
        config,
        table(
            Some(TierId::Docker),
            vec![
                tier(TierId::Docker, TierState::Healthy, &[slow.url()]),
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let response = h.get("/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-tier"), "local");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn headers_are_rewritten_as_a_proxy_should() {
    let echo = Echo::start("local").await;
    let h = Harness::local(config(), echo.url()).await;
    let response = h
        .http
        .get(h.url("/echo?q=1"))
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("x-hop-from-backend").is_none(),
        "a header the backend's Connection named is dropped"
    );
    let body: Value = response.json().await.unwrap();
    let headers = &body["headers"];
    assert_eq!(body["uri"], "/echo?q=1");
    assert!(headers.get("x-drop-me").is_none(), "{headers}");
    assert!(headers.get("keep-alive").is_none(), "{headers}");
    assert_eq!(
        headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(headers["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(
        headers["host"],
        echo.addr.to_string(),
        "Host is the upstream's"
    );
    assert_eq!(
        headers["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{}\"", h.addr)
    );
}

#[tokio::test]
async fn responses_stream_to_the_client() {
    let echo = Echo::start("local").await;
    let h = Harness::local(config(), echo.url()).await;
    let started = std::time::Instant::now();
    let mut response = h.get("/stream").await;
    let first = response.chunk().await.unwrap().unwrap();
    assert_eq!(first, "first\n");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the first chunk arrived before the backend finished"
    );
    let second = response.chunk().await.unwrap().unwrap();
    assert_eq!(second, "second\n");
}

#[tokio::test]
async fn upgrades_get_a_clear_501_and_big_bodies_413() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        max_body: bytesize::ByteSize::kib(64),
        max_replay_body: bytesize::ByteSize::kib(8),
        ..config()
    };
    let h = Harness::local(config, echo.url()).await;
    let response = h
        .http
        .get(h.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501);
    assert_eq!(header(&response, "x-cascade-attempts"), "0");
    assert!(response.text().await.unwrap().contains("WebSocket"));
    let response = h.post("/embed", vec![0u8; 100 * 1024]).await;
    assert_eq!(response.status(), 413);
    assert!(response.text().await.unwrap().contains("router.max_body"));
    assert_eq!(
        echo.hits(),
        0,
        "a body declared too large never reaches the backend"
    );
    // Chunked, no length given: cut off when it passes the limit.
    let chunks = futures_util::stream::iter((0..20).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![
            1u8;
            8 * 1024
        ])))
    }));
    let response = h
        .http
        .post(h.url("/other"))
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn a_refused_body_is_read_on_so_the_connection_survives_its_413() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        max_body: bytesize::ByteSize::kib(64),
        max_replay_body: bytesize::ByteSize::kib(8),
        ..config()
    };
    let h = Harness::local(config, echo.url()).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let length = 100 * 1024;
    stream
        .write_all(
            format!("POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    // The 413 comes at once, before any of the body is sent.
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // The body still goes; the router reads it rather than resetting the
    // connection, which then serves the next request.
    stream.write_all(&vec![7u8; length]).await.unwrap();
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("an answer to the next request")
        .expect("the connection was not reset");
    let next = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    assert_eq!(echo.hits(), 1, "only the next request reached the backend");
}

#[tokio::test]
async fn a_client_slow_to_send_headers_is_cut_off_on_any_request_of_a_connection() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        header_read_timeout: Duration::from_millis(600),
        ..config()
    };
    let h = Harness::local(config, echo.url()).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    // Requests 200 ms apart, 1.2 s in all: each waits less than the
    // timeout, which starts again for every request.
    let mut buffer = vec![0u8; 4096];
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            buffer[..n].starts_with(b"HTTP/1.1 200"),
            "the connection lives on: {}",
            String::from_utf8_lossy(&buffer[..n])
        );
    }
    // Then a head that never ends is cut off after the timeout.
    stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The router still serves others.
    assert_eq!(h.get("/x").await.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let echo = Echo::start("local").await;
    // Two workers: the limit counts the connections of both.
    let config = RouterConfig {
        max_connections: 1,
        workers: 2,
        ..config()
    };
    let h = Harness::local(config, echo.url()).await;
    let mut first = TcpStream::connect(h.addr).await.unwrap();
    first
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut second = TcpStream::connect(h.addr).await.unwrap();
    second
        .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("router.max_connections"), "{answer}");
    drop(first);
}

#[tokio::test]
async fn drain_lets_a_slow_request_finish_and_refuses_new_connections() {
    let echo = Echo::start("local").await;
    let mut h = Harness::local(config(), echo.url()).await;
    let slow = {
        let http = h.http.clone();
        let url = h.url("/slow/800");
        tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
    };
    h.wait_in_flight(1).await;
    let router = h.router.take().unwrap();
    let drained = tokio::spawn(router.drain());
    assert_eq!(slow.await.unwrap(), 200, "the request in flight finished");
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(h.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn drain_closes_idle_keep_alive_connections_at_once() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        drain_timeout: Duration::from_secs(30),
        ..config()
    };
    let mut h = Harness::local(config, echo.url()).await;
    // One answered request, then the connection stays open, idle.
    let mut idle = TcpStream::connect(h.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let router = h.router.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), router.drain())
        .await
        .expect("an idle connection does not hold the drain for router.drain_timeout");
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("the idle connection is closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

#[tokio::test]
async fn drain_cuts_requests_still_in_flight_after_the_drain_timeout() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        drain_timeout: Duration::from_millis(300),
        ..config()
    };
    let mut h = Harness::local(config, echo.url()).await;
    let slow = {
        let http = h.http.clone();
        let url = h.url("/slow/10000");
        tokio::spawn(async move { http.get(url).send().await })
    };
    h.wait_in_flight(1).await;
    let router = h.router.take().unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), router.drain())
        .await
        .expect("the drain ends soon after router.drain_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let cut = tokio::time::timeout(Duration::from_secs(2), slow)
        .await
        .expect("the client learns its request was cut")
        .unwrap();
    assert!(cut.is_err(), "the cut request failed: {cut:?}");
}

#[tokio::test]
async fn several_workers_serve_side_by_side_and_all_drain() {
    let echo = Echo::start("local").await;
    let config = RouterConfig {
        workers: 3,
        ..config()
    };
    let mut h = Harness::local(config, echo.url()).await;
    // Three threads serve (another test's router has at most one per CPU;
    // under CI that is two, so a third is this one's). A new thread bears
    // its parent's name until it has set its own.
    let thread_names = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .collect()
    };
    let mut names = thread_names();
    for _ in 0..100 {
        if names.iter().any(|n| n == "router-worker-2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        names = thread_names();
    }
    assert!(
        names.iter().any(|n| n == "router-worker-2"),
        "no third worker thread among {names:?}"
    );
    // Slow requests at once, each on its own connection: they are spread
    // over the workers by whichever accepts first, and all are answered.
    let mut requests = Vec::new();
    for i in 0..12 {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = h.url(&format!("/slow/{}", 100 + i * 10));
        requests.push(tokio::spawn(async move {
            let response = http.get(url).send().await.unwrap();
            (response.status(), header(&response, "x-cascade-tier"))
        }));
    }
    for request in requests {
        let (status, tier) = request.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(tier, "local");
    }
    assert_eq!(h.router.as_ref().unwrap().handle().status().in_flight, 0);
    let router = h.router.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), router.drain())
        .await
        .expect("every worker drains and ends");
    assert!(
        TcpStream::connect(h.addr).await.is_err(),
        "no worker is accepting"
    );
}

struct Token {
    fetched: AtomicUsize,
    rejected: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl RequestCredentials for Token {
    async fn authorization(&self) -> Result<http::HeaderValue, TierError> {
        let n = self.fetched.fetch_add(1, Ordering::SeqCst);
        let mut value = http::HeaderValue::from_str(&format!("Bearer id-token-{n}")).unwrap();
        value.set_sensitive(true);
        Ok(value)
    }

    async fn rejected(&self, value: &http::HeaderValue) {
        self.rejected
            .lock()
            .unwrap()
            .push(value.to_str().unwrap().to_owned());
    }
}

#[tokio::test]
async fn cloud_run_requests_carry_the_tiers_id_token() {
    let echo = Echo::start("cloud_run").await;
    let token = Arc::new(Token {
        fetched: AtomicUsize::new(0),
        rejected: Mutex::new(Vec::new()),
    });
    let mut cloud_run = tier(TierId::CloudRun, TierState::Healthy, &[echo.url()]);
    cloud_run.info = RouteInfo {
        auth: RequestAuth::IdToken(token.clone()),
        cold_start_timeout: Some(Duration::from_secs(30)),
    };
    let h = Harness::start(config(), table(Some(TierId::CloudRun), vec![cloud_run])).await;
    let body: Value = h.get("/echo").await.json().await.unwrap();
    assert_eq!(body["headers"]["authorization"], "Bearer id-token-0");
    assert!(body["headers"].get("x-serverless-authorization").is_none());
    let body: Value = h
        .http
        .get(h.url("/echo"))
        .header("authorization", "Bearer the-apps-own")
        .header("x-serverless-authorization", "Bearer forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["headers"]["authorization"], "Bearer the-apps-own");
    assert_eq!(
        body["headers"]["x-serverless-authorization"],
        "Bearer id-token-1"
    );
    let response = h.get("/status/401").await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        token.rejected.lock().unwrap().as_slice(),
        ["Bearer id-token-2"]
    );
}

#[tokio::test]
async fn reload_applies_new_settings_to_new_requests() {
    let failing = Echo::failing(503).await;
    let echo = Echo::start("local").await;
    let h = Harness::start(
        config(),
        table(
            Some(TierId::Docker),
            vec![
                tier(TierId::Docker, TierState::Healthy, &[failing.url()]),
                tier(TierId::Local, TierState::Healthy, &[echo.url()]),
            ],
        ),
    )
    .await;
    assert_eq!(h.get("/x").await.status(), 200);
    h.router.as_ref().unwrap().reload(RouterConfig {
        max_attempts: 1,
        ..config()
    });
    assert_eq!(h.get("/x").await.status(), 503);
}

#[tokio::test]
async fn a_burst_of_connections_waits_in_the_backlog_instead_of_being_dropped() {
    // Nobody accepts: every connection must be completed by the kernel and
    // queued. With std's backlog of 128 the rest of the SYNs are dropped
    // and their clients wait a 1 s retransmission (here: time out).
    let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let burst = 600;
    let connects = (0..burst).map(|_| async move {
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
            .await
            .ok()
            .and_then(Result::ok)
    });
    let streams = futures_util::future::join_all(connects).await;
    let connected = streams.iter().filter(|s| s.is_some()).count();
    assert_eq!(connected, burst, "connections completed by the kernel");
}

/// What a [`counting_backend`] does after answering a request.
#[derive(Clone, Copy)]
enum Then {
    /// Reads the next request on the connection.
    KeepAlive,
    /// Closes the connection, without a `Connection: close`.
    Close,
    /// Sends nothing more on it for 30 s.
    Hold,
}

/// A bare HTTP/1.1 backend that counts the connections it accepts and
/// answers every (bodiless) request with what `answer` makes of its head.
async fn counting_backend(
    answer: fn(&[u8]) -> (&'static [u8], Then),
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let (bytes, then) = answer(&buffer);
                    buffer.clear();
                    if stream.write_all(bytes).await.is_err() {
                        return;
                    }
                    match then {
                        Then::KeepAlive => {}
                        Then::Close => return,
                        Then::Hold => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, accepted, task)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_closed_ones_replaced() {
    for close_idle in [false, true] {
        let answer = if close_idle {
            |_: &[u8]| (OK, Then::Close)
        } else {
            |_: &[u8]| (OK, Then::KeepAlive)
        };
        let (url, accepted, _backend) = counting_backend(answer).await;
        let config = RouterConfig {
            workers: 1,
            ..config()
        };
        let h = Harness::local(config, url).await;
        for _ in 0..3 {
            // Not replay-safe: a try on a connection the backend closed
            // would come back as a 502, not be tried again.
            let response = h.post("/not-replay-safe", Vec::new()).await;
            assert_eq!(response.status(), 200, "close_idle: {close_idle}");
            assert_eq!(header(&response, "x-cascade-attempts"), "1");
            // Time for the router to see the close.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected = if close_idle { 3 } else { 1 };
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            expected,
            "connections the backend accepted (close_idle: {close_idle})"
        );
    }
}

#[tokio::test]
async fn a_connection_whose_response_was_not_read_to_the_end_is_not_reused() {
    // `/partial` gets half the body its length announces, and then nothing;
    // anything else gets `ok`.
    let (url, accepted, backend) = counting_backend(|head| {
        if head.starts_with(b"GET /partial ") {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
                Then::Hold,
            )
        } else {
            (OK, Then::KeepAlive)
        }
    })
    .await;
    let config = RouterConfig {
        workers: 1,
        ..config()
    };
    let h = Harness::local(config, url).await;

    let mut response = h.get("/partial").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.chunk().await.unwrap().unwrap(), "hello");
    drop(response);
    for _ in 0..2 {
        let response = h.get("/whole").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cascade-attempts"), "1");
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the half-read connection is closed, the next one kept alive"
    );
    backend.abort();
}
