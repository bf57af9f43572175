//! The router through the real binary: applications' requests reach the
//! active tier through cascade, wait for a tier that is starting, get a 503
//! naming every tier when nothing serves, and finish while cascade drains.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Cascade, SHORT, Setup, Signal, cli, wait_for};

/// One second of 16 kHz mono 16-bit PCM, as a WAV file.
pub fn wav() -> Vec<u8> {
    let samples: Vec<i16> = (0..16_000)
        .map(|i| ((i * 37) % 2000) as i16 - 1000)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
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

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("build an HTTP client")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn health_and_embed_reach_the_demo_backend_through_cascade() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    let http = client();
    let health = http
        .get(format!("http://{router}/health"))
        .send()
        .await
        .expect("GET /health through the router");
    assert_eq!(health.status(), 200);
    assert_eq!(header(&health, "x-cascade-tier"), "local");
    assert_eq!(header(&health, "x-cascade-attempts"), "1");
    let embed = http
        .post(format!("http://{router}/embed"))
        .body(wav())
        .send()
        .await
        .expect("POST /embed through the router");
    assert_eq!(embed.status(), 200);
    let body: Value = embed.json().await.expect("JSON");
    assert_eq!(body["embedding"].as_array().map(Vec::len), Some(192));
    let status = cascade.status().await;
    assert_eq!(status["router"]["address"], router.to_string());
    assert_eq!(status["router"]["in_flight"], 0);
    assert!(status["router"]["requests"].as_u64() >= Some(2), "{status}");
    let (code, history) = cascade.get_json("/router/history").await;
    assert_eq!(code, 200);
    let local = history["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == "local"))
        .cloned()
        .unwrap_or_else(|| panic!("no local series: {history}"));
    assert!(
        !local["points"].as_array().expect("points").is_empty(),
        "{local}"
    );
    assert_eq!(
        local["phases"]
            .as_array()
            .and_then(|p| p.last())
            .map(|p| p["phase"].clone()),
        Some("active".into()),
        "{local}"
    );

    let out = cli(&["status", "--state-dir", cascade.state_dir_str()], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout
            .contains(&format!("router: http://{router}  in flight 0")),
        "{}",
        out.describe()
    );

    let (code, metrics) = cascade.get("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "cascade_router_requests_total{backend_tier=\"local\",class=\"2xx\"",
        "cascade_router_duration_seconds_bucket{backend_tier=\"local\"",
        "cascade_router_attempts_bucket",
        "cascade_router_in_flight",
    ] {
        assert!(metrics.contains(line), "no {line} in /metrics:\n{metrics}");
    }
    // Every request answered so far is in the histograms too, though fewer
    // than a worker's batch were made: a scrape records what is held.
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let requests = sum("cascade_router_requests_total");
    assert!(requests > 0.0, "{metrics}");
    assert_eq!(sum("cascade_router_attempts_count"), requests, "{metrics}");
}

#[tokio::test]
async fn requests_sent_before_the_tier_is_up_wait_for_it() {
    let cascade = Cascade::start(Setup::demo(&["--startup-delay-ms", "1500"])).await;
    let router = cascade.router_addr().await;
    let started = std::time::Instant::now();
    let response = client()
        .get(format!("http://{router}/health"))
        .send()
        .await
        .expect("GET /health through the router");
    assert_eq!(
        response.status(),
        200,
        "waited {:?}: {}",
        started.elapsed(),
        response.text().await.unwrap_or_default()
    );
    assert_eq!(header(&response, "x-cascade-tier"), "local");
}

#[tokio::test]
async fn with_nothing_serving_the_answer_is_503_naming_each_tier() {
    // A backend that never listens: the local tier cannot become healthy.
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "exec sleep 60".into()],
        ..Setup::default()
    }
    .extra("[router]\nstart_wait = \"300ms\"\n");
    let cascade = Cascade::start(setup).await;
    let router = cascade.router_addr().await;
    let response = client()
        .get(format!("http://{router}/health"))
        .send()
        .await
        .expect("GET through the router");
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    assert_eq!(header(&response, "x-cascade-tier"), "none");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["tiers"][0]["tier"], "local", "{body}");
    assert!(
        body["tiers"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_before_the_tiers_stop() {
    // A backend that dies at once on SIGTERM, cutting whatever it serves:
    // the request survives only if the router drains before tiers stop.
    let script = format!(
        "trap 'kill -KILL $pid; exit 0' TERM; '{}' demo-backend --port {{port}} --latency-ms 300 & pid=$!; wait $pid",
        crate::support::BIN
    );
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        ..Setup::default()
    };
    let cascade = Cascade::start_ready(setup).await;
    let router = cascade.router_addr().await;
    let http = client();
    let slow = tokio::spawn(async move {
        http.get(format!("http://{router}/health"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    });
    wait_for(SHORT, "the request to be in flight", async || {
        let status = cascade.status().await;
        if status["router"]["in_flight"] == 1 {
            Ok(())
        } else {
            Err(status["router"].to_string())
        }
    })
    .await;
    cascade.signal(Signal::Term);
    let answered = slow.await.expect("the request task");
    assert_eq!(
        answered,
        Ok(200),
        "the request in flight was cut:\n{}",
        cascade.log_tail()
    );
    let mut cascade = cascade;
    let exit = cascade.wait_exit(SHORT).await.expect("cascade exits");
    assert!(exit.success(), "{exit:?}");
}

// === headers and protocol ===

/// One answer read off a raw connection: status, head fields (names in
/// lower case, in order) and the body, de-chunked.
struct Reply {
    status: u16,
    fields: Vec<(String, String)>,
    body: String,
}

impl Reply {
    /// Every value of `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends `head` (a raw HTTP/1.1 request head) on a new connection to
/// `addr` and reads one answer: up to its `Content-Length`, the last chunk,
/// or the connection's end.
async fn exchange(addr: std::net::SocketAddr, head: &str) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut bytes = Vec::new();
    let read = async {
        loop {
            if let Some(reply) = parse_reply(&bytes, false) {
                return reply;
            }
            let mut buf = [0u8; 8192];
            let n = stream
                .read(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
            if n == 0 {
                let text = String::from_utf8_lossy(&bytes);
                return parse_reply(&bytes, true)
                    .unwrap_or_else(|| panic!("{addr} closed before a whole answer: {text:?}"));
            }
            bytes.extend_from_slice(&buf[..n]);
        }
    };
    match tokio::time::timeout(SHORT, read).await {
        Ok(reply) => reply,
        Err(_) => panic!("no whole answer from {addr} within {SHORT:?}"),
    }
}

/// The answer in `bytes` if it is whole; a body without a length is whole
/// once the connection has `closed`.
fn parse_reply(bytes: &[u8], closed: bool) -> Option<Reply> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = crate::support::status_of(lines.next().unwrap_or_default())?;
    let fields: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if field("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else if let Some(length) = field("content-length") {
        let length: usize = length.parse().expect("a numeric Content-Length");
        body.get(..length)?.to_owned()
    } else if closed {
        body.to_owned()
    } else {
        return None;
    };
    Some(Reply {
        status,
        fields,
        body,
    })
}

/// The data of a chunked body, once its last chunk is there.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut data = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|e| panic!("bad chunk size {size:?}: {e}"));
        if size == 0 {
            return Some(data);
        }
        data.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A request to the demo backend's `/echo` carrying every kind of
/// hop-by-hop header, and end-to-end ones that must arrive unchanged.
fn echo_request() -> String {
    format!(
        "GET /echo?q=1 HTTP/1.1\r\n\
         Host: app.example:8700\r\n\
         Connection: close, x-foo\r\n\
         x-foo: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: gzip\r\n\
         Trailer: x-checksum\r\n\
         Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l\r\n\
         Proxy-Connection: keep-alive\r\n\
         traceparent: {TRACEPARENT}\r\n\
         x-end-to-end: kept\r\n\r\n"
    )
}

const HOP_BY_HOP_SENT: [&str; 6] = [
    "x-foo",
    "keep-alive",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
];

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_added() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    let backend: std::net::SocketAddr = ([127, 0, 0, 1], cascade.port).into();

    // Sent straight to the backend, every header arrives and its answer
    // carries hop-by-hop headers: what the router has to remove.
    let direct = exchange(backend, &echo_request()).await;
    assert_eq!(direct.status, 200, "{}", direct.body);
    let seen = direct.json();
    for name in HOP_BY_HOP_SENT {
        assert!(seen["headers"][name].is_array(), "{name}: {seen}");
    }
    // hyper adds `close` to the backend's `Connection`, as the client asked.
    for (name, value) in cascade_demo::ECHO_HOP_BY_HOP {
        assert!(
            direct.all(name).iter().any(|v| v.contains(value)),
            "{name}: {:?}",
            direct.fields
        );
    }

    let routed = exchange(router, &echo_request()).await;
    assert_eq!(routed.status, 200, "{}", routed.body);
    let seen = routed.json();
    let headers = &seen["headers"];
    for name in HOP_BY_HOP_SENT {
        assert!(
            headers.get(name).is_none(),
            "{name} reached the backend: {seen}"
        );
    }
    assert!(
        headers["connection"].as_array().is_none_or(|v| !v
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.contains("x-foo")))),
        "{seen}"
    );
    assert_eq!(seen["path"], "/echo");
    assert_eq!(seen["query"], "q=1");
    assert_eq!(headers["traceparent"], serde_json::json!([TRACEPARENT]));
    assert_eq!(headers["x-end-to-end"], serde_json::json!(["kept"]));
    assert_eq!(headers["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        headers["x-forwarded-host"],
        serde_json::json!(["app.example:8700"])
    );
    assert_eq!(
        headers["forwarded"],
        serde_json::json!(["for=127.0.0.1;proto=http;host=\"app.example:8700\""])
    );
    // Host names the upstream, as the backend was reached.
    assert_eq!(headers["host"], serde_json::json!([backend.to_string()]));

    // The answer lost the backend's hop-by-hop headers and kept the rest.
    assert!(routed.all("x-echo-hop").is_empty(), "{:?}", routed.fields);
    assert!(routed.all("keep-alive").is_empty(), "{:?}", routed.fields);
    assert!(
        routed
            .all("connection")
            .iter()
            .all(|v| !v.contains("x-echo-hop")),
        "{:?}",
        routed.fields
    );
    assert_eq!(routed.all("x-echo"), ["1"]);
    assert_eq!(routed.all("x-cascade-tier"), ["local"]);
    assert_eq!(routed.all("x-cascade-attempts"), ["1"]);
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_chunk_by_chunk() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    let backend = format!("http://127.0.0.1:{}", cascade.port);
    let http = client();
    let sent = http
        .get(format!("http://{router}/stream?chunks=3&hold=true"))
        .send();
    let mut response = tokio::time::timeout(SHORT, sent)
        .await
        .expect("the head reaches the client while the backend holds the body's rest")
        .expect("GET /stream through the router");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cascade-tier"), "local");

    // The backend sends the rest only when released: the first chunk has
    // to come through while the backend is still holding the others.
    let mut received = String::new();
    while !received.ends_with('\n') {
        let chunk = tokio::time::timeout(SHORT, response.chunk())
            .await
            .expect("the first chunk reaches the client while the backend holds the rest")
            .expect("read the body")
            .expect("the body goes on");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(received, "chunk 1 of 3\n");
    let released: Value = http
        .post(format!("{backend}/stream/release"))
        .send()
        .await
        .expect("POST /stream/release to the backend")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        released["released"], 1,
        "the backend was not holding the stream"
    );

    while let Some(chunk) = tokio::time::timeout(SHORT, response.chunk())
        .await
        .expect("the rest arrives once released")
        .expect("read the body")
    {
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(received, "chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n");
}

#[tokio::test]
async fn websocket_upgrades_and_connect_are_answered_501() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    for request in [
        "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ] {
        let reply = exchange(router, request).await;
        assert_eq!(reply.status, 501, "{request}: {}", reply.body);
        assert!(
            reply.json()["error"].as_str().is_some_and(
                |e| e.contains("does not proxy CONNECT or protocol upgrades (WebSocket)")
            ),
            "{}",
            reply.body
        );
        assert_eq!(reply.all("x-cascade-tier"), ["none"]);
        assert_eq!(reply.all("x-cascade-attempts"), ["0"]);
    }
    // The connection that asked for an upgrade was not left half-open:
    // the router still answers plain requests.
    let reply = exchange(
        router,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// What a load client saw: (status, x-cascade-tier, x-cascade-attempts) per request.
type Seen = Vec<(u16, String, String)>;

/// Sends `POST /embed` back to back from `workers` clients until `stop`.
fn embed_load(
    router: std::net::SocketAddr,
    workers: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let body = wav();
    (0..workers)
        .map(|_| {
            let (stop, body) = (stop.clone(), body.clone());
            tokio::spawn(async move {
                let http = client();
                let mut seen = Vec::new();
                while !stop.is_cancelled() {
                    let answer = http
                        .post(format!("http://{router}/embed"))
                        .body(body.clone())
                        .send()
                        .await;
                    match answer {
                        Ok(response) => seen.push((
                            response.status().as_u16(),
                            header(&response, "x-cascade-tier"),
                            header(&response, "x-cascade-attempts"),
                        )),
                        Err(error) => seen.push((0, error.to_string(), String::new())),
                    }
                }
                seen
            })
        })
        .collect()
}

/// A run of [`docker_dies_under_load`]: cascade (still running), what the
/// load clients saw, and `/status` just before the container was killed.
struct DockerDeath {
    cascade: Cascade,
    seen: Seen,
    before: Value,
    // Dropped after cascade: the container goes, then the next test may start.
    _removed: crate::docker::Removed,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

/// The docker tier first, every request to it taking 300 ms (so requests
/// are in flight when it dies, however loaded the machine is), the local
/// tier second as `local` makes it: four clients send `POST /embed` back
/// to back while the service container is SIGKILLed and removed, until
/// local is active. `warm` also waits for local to be healthy before the
/// kill. `None` without a Docker engine (outside CI).
async fn docker_dies_under_load(local: Setup, extra: &str, warm: bool) -> Option<DockerDeath> {
    use crate::docker::{IMAGE, ONE_AT_A_TIME, Removed, docker, engine, setup};
    if !engine() {
        return None;
    }
    let one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-router-{}", std::process::id());
    // A tag of its own, so removing it keeps the docker tier from coming back.
    let image = format!("cascade-demo:it-router-{}", std::process::id());
    docker(&["tag", IMAGE, &image]);
    let removed = Removed(name.clone());
    let docker_first = setup(&name, &image, crate::support::free_port(), false);
    let slow = docker_first.extra.replace(
        "USER_ID = \"1000\"",
        "USER_ID = \"1000\", DEMO_LATENCY_MS = \"300\"",
    );
    assert!(slow.contains("DEMO_LATENCY_MS"), "{slow}");
    let setup = Setup {
        env: docker_first.env,
        ..local
    }
    .extra(&slow)
    .extra(extra);
    let cascade = Cascade::start(setup).await;
    let before = wait_for(Duration::from_secs(60), "docker active", async || {
        let s = cascade.status().await;
        let local_ready = crate::support::local_tier(&s)["state"] == "healthy";
        if s["active"] == "docker" && (local_ready || !warm) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let router = cascade.router_addr().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = embed_load(router, 4, stop.clone());
    // Some requests are answered by docker before it dies.
    wait_for(SHORT, "requests answered by docker", async || {
        let (_, metrics) = cascade.get("/metrics").await;
        match metrics
            .contains("cascade_router_requests_total{backend_tier=\"docker\",class=\"2xx\"")
        {
            true => Ok(()),
            false => Err("none yet".to_owned()),
        }
    })
    .await;

    // Untagged first (the container runs on), so the tier cannot recreate
    // it; then SIGKILL and gone: requests in flight on it are cut, new ones
    // find it dead.
    docker(&["rmi", &image]);
    docker(&["rm", "-f", &name]);
    wait_for(Duration::from_secs(60), "failover to local", async || {
        let s = cascade.status().await;
        if s["active"] == "local" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    // Some requests are answered by local after the failover.
    let answered = |metrics: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("cascade_router_requests_total{backend_tier=\"local\",class=\"2xx\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let at_failover = answered(&cascade.get("/metrics").await.1);
    wait_for(SHORT, "requests answered by local", async || {
        let now = answered(&cascade.get("/metrics").await.1);
        match now >= at_failover + 4.0 {
            true => Ok(()),
            false => Err(format!("{now} answered by local")),
        }
    })
    .await;
    stop.cancel();
    let mut seen = Seen::new();
    for worker in load {
        seen.extend(worker.await.expect("a load worker"));
    }
    Some(DockerDeath {
        cascade,
        seen,
        before,
        _removed: removed,
        _one: one,
    })
}

/// Every request succeeded, docker answered some, local took over others
/// on their second try, and `/status` names that failover.
async fn assert_none_failed_and_some_retried_onto_local(run: &DockerDeath) {
    let (cascade, seen) = (&run.cascade, &run.seen);
    let failed: Vec<_> = seen.iter().filter(|(code, _, _)| *code != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        seen.len(),
        cascade.log_tail()
    );
    assert!(seen.iter().any(|(_, tier, _)| tier == "docker"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|(_, tier, attempts)| tier == "local" && attempts == "2"),
        "no request was retried onto local: {seen:?}\n{}",
        cascade.log_tail()
    );
    let status = cascade.status().await;
    let last = &status["router"]["last_retried_failover"];
    assert_eq!(last["from"], "docker", "{status}");
    assert_eq!(last["to"], "local", "{status}");
}

#[tokio::test]
async fn requests_survive_the_docker_tier_dying_under_load() {
    let Some(run) = docker_dies_under_load(Setup::default(), "", false).await else {
        return;
    };
    assert_none_failed_and_some_retried_onto_local(&run).await;
}

#[tokio::test]
async fn requests_survive_the_docker_tier_dying_onto_a_warm_standby_that_is_slow_to_start() {
    // Local takes 3 s to listen, three times what a request may wait for a
    // tier to come up: only a standby kept started can take the requests.
    let slow_local = Setup::demo(&["--startup-delay-ms", "3000"]).local("standby = true");
    let router = "[router]\nstart_wait = \"1s\"\n";
    let Some(run) = docker_dies_under_load(slow_local, router, true).await else {
        return;
    };
    assert_none_failed_and_some_retried_onto_local(&run).await;
    let local = crate::support::local_tier(&run.before);
    assert_eq!(local["standby"], true, "{local}");
    let pid = crate::support::backend_pid(&local);
    assert!(pid.is_some(), "{local}");
    assert_eq!(
        crate::support::backend_pid(&run.cascade.local().await),
        pid,
        "the local backend was started again instead of taking over warm"
    );
}

#[tokio::test]
async fn sighup_applies_router_settings_and_names_those_that_need_a_restart() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    let http = client();
    let embed = async || {
        http.post(format!("http://{router}/embed"))
            .body(wav())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    };
    assert_eq!(embed().await, Ok(200));
    cascade.edit_config(|text| {
        format!(
            "{text}\n[router]\nenabled = false\nmax_body = \"1 KiB\"\nmax_replay_body = \"1 KiB\"\n"
        )
    });
    cascade.signal(Signal::Hup);
    wait_for(SHORT, "the new max_body to apply", async || {
        match embed().await {
            Ok(413) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let logs = cascade.logs();
    assert!(
        logs.contains("router.enabled changed: needs a restart"),
        "{}",
        cascade.log_tail()
    );
}

// === Cloud Run through cascade-gcp-fake ===

/// The `cloud_run` tier on the fake's service. Probes' failures never open
/// its breaker here (the service is down while cascade starts); a run of
/// `request_failures` failed requests does, for a minute.
fn cloud_run_toml(fake: &cascade_gcp_fake::FakeGcp, request_failures: u32) -> String {
    use crate::support::toml_str;
    format!(
        "[tiers.cloud_run]\n\
         url = {url}\n\
         cold_start_timeout = \"5s\"\n\
         probe = {{ interval = \"100ms\", timeout = \"500ms\" }}\n\
         breaker = {{ consecutive_failures = 1000, minimum_volume = 1000, \
         consecutive_request_failures = {request_failures}, open_base = \"60s\", open_max = \"60s\" }}\n",
        url = toml_str(&fake.service_url()),
    )
}

/// cascade with the Cloud Run tier and the local one, in `order`: the
/// service answers 503 (so the start phase brings local up) until
/// [`cloud_run_serves`]. Returns once local is active.
async fn with_cloud_run(
    fake: &cascade_gcp_fake::FakeGcp,
    home: &std::path::Path,
    order: [&str; 2],
    request_failures: u32,
    router: &str,
) -> Cascade {
    use crate::gcp::{gcp_env, wait_active};
    fake.set_service_fault(Some(cascade_gcp_fake::ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let mut env = gcp_env(fake, home);
    env.push(("CASCADE_LOG".into(), "debug".into()));
    let setup = Setup {
        order: order.map(String::from).into(),
        waterfall: vec!["failback_after = \"300ms\"".into()],
        env,
        ..Setup::default()
    }
    .extra(&cloud_run_toml(fake, request_failures))
    .extra(router);
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "local", SHORT).await;
    cascade
}

/// The service answers again; returns once the tier is healthy.
async fn cloud_run_serves(fake: &cascade_gcp_fake::FakeGcp, cascade: &Cascade) {
    fake.set_service_fault(None);
    wait_for(SHORT, "cloud_run healthy", async || {
        let status = cascade.status().await;
        match crate::gcp::tier(&status, "cloud_run")["state"] == "healthy" {
            true => Ok(()),
            false => Err(status.to_string()),
        }
    })
    .await;
}

/// With the Cloud Run tier preferred: both up, Cloud Run active.
async fn cloud_run_then_local(
    fake: &cascade_gcp_fake::FakeGcp,
    home: &std::path::Path,
    request_failures: u32,
    router: &str,
) -> Cascade {
    let cascade =
        with_cloud_run(fake, home, ["cloud_run", "local"], request_failures, router).await;
    cloud_run_serves(fake, &cascade).await;
    let status = crate::gcp::wait_active(&cascade, "cloud_run", SHORT).await;
    assert_eq!(
        crate::gcp::tier(&status, "local")["state"],
        "healthy",
        "{status}"
    );
    cascade
}

/// Every ID token the service saw, checked against what an operator can
/// read: the debug log, `/status`, `/metrics` and `/router/history`.
async fn assert_no_token_shown(cascade: &Cascade, fake: &cascade_gcp_fake::FakeGcp) {
    let tokens: Vec<String> = fake
        .service_requests()
        .into_iter()
        .filter_map(|r| r.bearer)
        .collect();
    assert!(!tokens.is_empty(), "the service saw no ID token");
    let mut shown = vec![
        ("the log", cascade.logs()),
        ("/status", cascade.status().await.to_string()),
    ];
    for path in ["/metrics", "/router/history"] {
        shown.push((path, cascade.get(path).await.1));
    }
    for token in &tokens {
        for (place, text) in &shown {
            assert!(
                !text.contains(token.as_str()),
                "an ID token leaked into {place}"
            );
        }
    }
}

#[tokio::test]
async fn cloud_run_gets_the_tiers_id_token_and_the_clients_authorization_is_kept() {
    use crate::gcp::{fake, gcp_env, wait_active};
    let fake = fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    let mut env = gcp_env(&fake, home.path());
    env.push(("CASCADE_LOG".into(), "debug".into()));
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into()],
        env,
        ..Setup::default()
    }
    .extra(&cloud_run_toml(&fake, 5));
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "cloud_run", SHORT).await;
    let router = cascade.router_addr().await;
    let http = client();

    // The application holds no Google credentials.
    let embed = http
        .post(format!("http://{router}/embed"))
        .body(wav())
        .send()
        .await
        .expect("POST /embed through the router");
    assert_eq!(embed.status(), 200, "{}", cascade.log_tail());
    assert_eq!(header(&embed, "x-cascade-tier"), "cloud_run");
    assert_eq!(header(&embed, "x-cascade-attempts"), "1");
    let body: Value = embed.json().await.expect("JSON");
    assert_eq!(body["embedding"].as_array().map(Vec::len), Some(192));

    // The application's own Authorization reaches the service untouched.
    let own = http
        .post(format!("http://{router}/embed"))
        .header("authorization", "Bearer the-applications-own")
        .body(wav())
        .send()
        .await
        .expect("POST /embed with the client's Authorization");
    assert_eq!(own.status(), 200);
    assert_eq!(header(&own, "x-cascade-tier"), "cloud_run");

    let embeds: Vec<_> = fake
        .service_requests()
        .into_iter()
        .filter(|r| r.path == "/embed")
        .collect();
    assert_eq!(embeds.len(), 2, "{embeds:?}");
    let plain = &embeds[0];
    let token = plain.bearer.clone().expect("an ID token");
    assert!(!plain.serverless_authorization, "{plain:?}");
    assert_eq!(plain.authorization, Some(format!("Bearer {token}")));
    let kept = &embeds[1];
    assert!(kept.serverless_authorization, "{kept:?}");
    assert_eq!(
        kept.authorization.as_deref(),
        Some("Bearer the-applications-own")
    );
    assert!(
        kept.bearer
            .as_deref()
            .is_some_and(|b| b != "the-applications-own"),
        "{kept:?}"
    );
    // Probes and routed requests share the tier's one token cache.
    let probed: Vec<String> = fake
        .service_requests()
        .into_iter()
        .filter(|r| r.path == "/health")
        .filter_map(|r| r.bearer)
        .collect();
    for request in &embeds {
        assert!(
            probed.iter().any(|t| Some(t) == request.bearer.as_ref()),
            "a routed request's ID token was never a probe's"
        );
    }
    assert_no_token_shown(&cascade, &fake).await;
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

#[tokio::test]
async fn a_cloud_run_503_storm_opens_the_breaker_after_5_failed_requests_and_none_fails() {
    use crate::gcp::{fake, tier, wait_active};
    let fake = fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    let cascade = cloud_run_then_local(&fake, home.path(), 5, "").await;
    let router = cascade.router_addr().await;
    let http = client();
    let embed = async || {
        let response = http
            .post(format!("http://{router}/embed"))
            .body(wav())
            .send()
            .await
            .expect("POST /embed through the router");
        (
            response.status().as_u16(),
            header(&response, "x-cascade-tier"),
            header(&response, "x-cascade-attempts"),
        )
    };
    let failed_embeds = || {
        fake.service_requests()
            .iter()
            .filter(|r| r.path == "/embed" && r.status == 503)
            .count()
    };

    // Routed traffic fails; the service's health check still passes.
    fake.set_request_fault(Some(cascade_gcp_fake::ServiceFault {
        status: 503,
        retry_after: None,
    }));
    for i in 1..=5 {
        assert_eq!(
            embed().await,
            (200, "local".to_owned(), "2".to_owned()),
            "request {i} was not carried over to local"
        );
    }
    let status = wait_active(&cascade, "local", SHORT).await;
    let cloud_run = tier(&status, "cloud_run");
    assert_eq!(
        cloud_run["reason"], "breaker open after 5 consecutive request failures: HTTP 503",
        "{cloud_run}"
    );
    assert_eq!(cloud_run["breaker"], "open", "{cloud_run}");
    assert_eq!(failed_embeds(), 5);
    // With the breaker open, requests go to local first.
    for _ in 0..5 {
        assert_eq!(embed().await, (200, "local".to_owned(), "1".to_owned()));
    }
    assert_eq!(
        failed_embeds(),
        5,
        "cloud_run got requests while its breaker was open"
    );
    assert_no_token_shown(&cascade, &fake).await;
}

#[tokio::test]
async fn retries_during_a_cloud_run_storm_stay_within_the_retry_budget() {
    let fake = crate::gcp::fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    // A reserve of 6 retries, plus one for every five requests; a breaker
    // that does not open, so the storm lasts.
    let budget = "[router]\nretry_budget = { ratio = 0.2, min_per_sec = 0.1, window = \"60s\" }\n";
    let cascade = cloud_run_then_local(&fake, home.path(), 1000, budget).await;
    let router = cascade.router_addr().await;
    fake.set_request_fault(Some(cascade_gcp_fake::ServiceFault {
        status: 503,
        retry_after: None,
    }));
    const REQUESTS: usize = 40;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let sent = sent.clone();
            tokio::spawn(async move {
                let http = client();
                let mut seen = Seen::new();
                while sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < REQUESTS {
                    let response = http
                        .post(format!("http://{router}/embed"))
                        .body(wav())
                        .send()
                        .await
                        .expect("POST /embed through the router");
                    let (status, tier, attempts) = (
                        response.status().as_u16(),
                        header(&response, "x-cascade-tier"),
                        header(&response, "x-cascade-attempts"),
                    );
                    // What cascade said when it answered itself.
                    let tier = match status {
                        502 => format!("{tier}: {}", response.text().await.unwrap_or_default()),
                        _ => tier,
                    };
                    seen.push((status, tier, attempts));
                }
                seen
            })
        })
        .collect();
    let mut seen = Seen::new();
    for worker in workers {
        seen.extend(worker.await.expect("a load worker"));
    }
    assert_eq!(seen.len(), REQUESTS);
    let retried = seen
        .iter()
        .filter(|s| *s == &(200, "local".to_owned(), "2".to_owned()))
        .count();
    let refused = seen
        .iter()
        .filter(|s| *s == &(503, "cloud_run".to_owned(), "1".to_owned()))
        .count();
    // Retries refused by the budget answer with Cloud Run's own 503.
    assert_eq!(retried + refused, REQUESTS, "{seen:?}");
    // reserve (0.1/s × 60 s) + 0.2 × requests
    let allowed = 6 + REQUESTS / 5;
    assert!(retried > 0, "nothing was retried: {seen:?}");
    assert!(
        retried <= allowed,
        "{retried} retries for {REQUESTS} requests, the budget allows {allowed}"
    );
    // Every request went to Cloud Run once, and never again.
    let tried = fake
        .service_requests()
        .iter()
        .filter(|r| r.path == "/embed")
        .count();
    assert_eq!(tried, REQUESTS);
    let (_, metrics) = cascade.get("/metrics").await;
    assert!(
        metrics.contains("cascade_router_budget_exhausted_total"),
        "{metrics}"
    );
}

// === requests in flight ===

/// `POST /embed` of one second of audio on a connection of its own, sent
/// as far as `sent` bytes of its body; the rest is returned for later.
async fn held_embed(router: std::net::SocketAddr, sent: usize) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let body = wav();
    let mut stream = tokio::net::TcpStream::connect(router)
        .await
        .expect("connect to the router");
    let head = format!(
        "POST /embed HTTP/1.1\r\nHost: cascade\r\nContent-Type: audio/wav\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream
        .write_all(&body[..sent])
        .await
        .expect("send the body's start");
    (stream, body[sent..].to_vec())
}

/// Everything the router answers on `stream` until it closes:
/// (status, `x-cascade-tier`, `x-cascade-attempts`, the whole reply).
async fn reply(stream: &mut tokio::net::TcpStream) -> (u16, String, String, String) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    tokio::time::timeout(SHORT, stream.read_to_end(&mut bytes))
        .await
        .expect("the router answers and closes in time")
        .expect("read the reply");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    let field = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let status = crate::support::status_of(&text).unwrap_or(0);
    (
        status,
        field("x-cascade-tier"),
        field("x-cascade-attempts"),
        text,
    )
}

async fn wait_in_flight(cascade: &Cascade, n: u64) {
    wait_for(SHORT, "the request to be in flight", async || {
        let status = cascade.status().await;
        match status["router"]["in_flight"].as_u64() == Some(n) {
            true => Ok(()),
            false => Err(status["router"].to_string()),
        }
    })
    .await;
}

/// Holds a `POST /embed` in flight on the local tier (after `sent` bytes
/// of its body), SIGKILLs the local backend and returns the router's reply.
async fn embed_when_local_dies(cascade: &Cascade, sent: usize) -> (u16, String, String, String) {
    let router = cascade.router_addr().await;
    let pid = crate::support::backend_pid(&cascade.local().await).expect("the local backend's pid");
    let (mut held, _rest) = held_embed(router, sent).await;
    wait_in_flight(cascade, 1).await;
    crate::support::send_signal(pid, Signal::Kill);
    reply(&mut held).await
}

fn embeds_at(fake: &cascade_gcp_fake::FakeGcp) -> usize {
    fake.service_requests()
        .iter()
        .filter(|r| r.path == "/embed")
        .count()
}

#[tokio::test]
async fn a_request_that_is_not_replay_safe_in_flight_on_a_dying_tier_gets_502_naming_it() {
    let fake = crate::gcp::fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    let router = "[router]\nreplay_safe = []\n";
    let cascade = with_cloud_run(&fake, home.path(), ["local", "cloud_run"], 5, router).await;
    // Another tier serves, so only the policy keeps the request from it.
    cloud_run_serves(&fake, &cascade).await;
    let (status, tier, attempts, text) = embed_when_local_dies(&cascade, 1024).await;
    assert_eq!(
        (status, tier.as_str(), attempts.as_str()),
        (502, "local", "1"),
        "{text}"
    );
    assert!(
        text.contains("local ("),
        "the answer names the tier: {text}"
    );
    assert!(
        text.contains("not retried: POST /embed is not replay-safe (router.replay_safe)"),
        "{text}"
    );
    assert_eq!(embeds_at(&fake), 0, "the request was sent to cloud_run too");
}

#[tokio::test]
async fn a_body_over_max_replay_body_in_flight_on_a_dying_tier_is_not_retried() {
    let fake = crate::gcp::fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    let router = "[router]\nmax_replay_body = \"16 KiB\"\n";
    let cascade = with_cloud_run(&fake, home.path(), ["local", "cloud_run"], 5, router).await;
    cloud_run_serves(&fake, &cascade).await;
    // Past the replay buffer, so the try began with the body streaming.
    let (status, tier, attempts, text) = embed_when_local_dies(&cascade, 20 * 1024).await;
    assert_eq!(
        (status, tier.as_str(), attempts.as_str()),
        (502, "local", "1"),
        "{text}"
    );
    assert!(
        text.contains("larger than router.max_replay_body, so it was not kept for a retry"),
        "{text}"
    );
    assert_eq!(embeds_at(&fake), 0, "the request was sent to cloud_run too");
}

#[tokio::test]
async fn a_failback_never_cuts_a_request_in_flight_on_the_old_tier() {
    use tokio::io::AsyncWriteExt;
    let fake = crate::gcp::fake().await;
    let home = tempfile::TempDir::new().expect("temp home");
    // Not replay-safe, so the body streams to local as it arrives.
    let router = "[router]\nreplay_safe = []\n";
    let cascade = with_cloud_run(&fake, home.path(), ["cloud_run", "local"], 5, router).await;
    let addr = cascade.router_addr().await;
    let (mut held, rest) = held_embed(addr, 1024).await;
    wait_in_flight(&cascade, 1).await;

    cloud_run_serves(&fake, &cascade).await;
    crate::gcp::wait_active(&cascade, "cloud_run", SHORT).await;
    let health = client()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .expect("GET /health through the router");
    assert_eq!(header(&health, "x-cascade-tier"), "cloud_run");

    held.write_all(&rest)
        .await
        .expect("send the rest of the body");
    let (status, tier, attempts, text) = reply(&mut held).await;
    assert_eq!(
        (status, tier.as_str(), attempts.as_str()),
        (200, "local", "1"),
        "{text}"
    );
    assert!(text.contains("\"embedding\""), "{text}");
    assert_eq!(embeds_at(&fake), 0);
}

// === limits of the listener ===

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_beyond_the_limit_get_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let setup =
        Setup::default().extra("[router]\nheader_read_timeout = \"300ms\"\nmax_connections = 2\n");
    let cascade = Cascade::start_ready(setup).await;
    let router = cascade.router_addr().await;

    let mut slow = tokio::net::TcpStream::connect(router)
        .await
        .expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send part of the head");
    let started = std::time::Instant::now();
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(SHORT, slow.read_to_end(&mut bytes)).await;
    assert!(
        read.is_ok(),
        "a client that never finishes its head keeps its connection"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut after {:?}",
        started.elapsed()
    );

    // Two connections held open after an answer each; a third is refused.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(router)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send a request");
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.expect("read the answer");
        assert_eq!(&head, b"HTTP/1.1 200");
        open.push(stream);
    }
    let refused =
        crate::support::raw_http(router, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", SHORT).await;
    assert_eq!(crate::support::status_of(&refused), Some(503), "{refused}");
    assert!(
        refused.contains("2 connections are open already (router.max_connections)"),
        "{refused}"
    );
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );

    drop(open);
    wait_for(SHORT, "a connection to be accepted again", async || {
        let reply = crate::support::raw_http(
            router,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            SHORT,
        )
        .await;
        match crate::support::status_of(&reply) {
            Some(200) => Ok(()),
            _ => Err(reply),
        }
    })
    .await;
}

#[tokio::test]
async fn with_no_tier_serving_the_503_names_every_tier_and_its_reason() {
    use crate::gcp::{fake, gcp_env};
    let fake = fake().await;
    fake.set_service_fault(Some(cascade_gcp_fake::ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let home = tempfile::TempDir::new().expect("temp home");
    // Cloud Run answers 503; the local backend never listens.
    let setup = Setup {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "exec sleep 60".into()],
        order: vec!["cloud_run".into(), "local".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&cloud_run_toml(&fake, 5))
    .extra("[router]\nstart_wait = \"200ms\"\n");
    let cascade = Cascade::start(setup).await;
    let router = cascade.router_addr().await;
    let http = client();
    let body = wait_for(SHORT, "a 503 naming both tiers' reasons", async || {
        let response = http
            .get(format!("http://{router}/health"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let (status, tier) = (response.status(), header(&response, "x-cascade-tier"));
        let retry_after = header(&response, "retry-after");
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        let reason = |name: &str| {
            body["tiers"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["tier"] == name))
                .and_then(|t| t["reason"].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        match status == 503
            && tier == "none"
            && !retry_after.is_empty()
            && reason("cloud_run").contains("503")
            && !reason("local").is_empty()
        {
            true => Ok(body),
            false => Err(format!(
                "{status} {tier} retry-after {retry_after:?}: {body}"
            )),
        }
    })
    .await;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no tier is serving")),
        "{body}"
    );
}
