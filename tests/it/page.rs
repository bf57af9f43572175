//! The status page: tiers in waterfall order, updated live over server-sent events.
//!
//! The page itself is checked in a real browser (headless Chromium), because
//! what matters is what its script renders, not the HTML the server sends.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::{Cascade, SHORT, Setup, backend_pid, http_client, tool};

// === the page and the event stream over plain HTTP ===

#[tokio::test]
async fn page_is_one_self_contained_html_file() {
    let cascade = Cascade::start(Setup::default()).await;
    let response = http_client()
        .get(cascade.url("/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        content_type.starts_with("text/html") && content_type.contains("charset=utf-8"),
        "content-type: {content_type}"
    );
    let body = response.text().await.expect("read the page");
    let lower = body.to_ascii_lowercase();
    for external in [
        "http://",
        "https://",
        "<script src",
        "<link",
        "@import",
        "url(",
    ] {
        assert!(
            !lower.contains(external),
            "the page must not load anything from elsewhere, found `{external}`"
        );
    }
    assert!(lower.starts_with("<!doctype html>"), "not an HTML page");
    assert!(
        body.contains("EventSource(\"/events\")"),
        "the page must follow /events"
    );
}

#[tokio::test]
async fn events_stream_the_snapshot_then_every_change() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let mut events = EventStream::connect(&cascade.url("/events")).await;

    let first = events.next_snapshot(SHORT).await;
    assert_eq!(first["tiers"][0]["tier"], "local", "{first}");
    let before = backend_pid(&first["tiers"][0])
        .unwrap_or_else(|| panic!("the first snapshot has no backend pid: {first}"));

    let (code, body) = cascade.post_authorized("/tiers/local/restart").await;
    assert_eq!(code, 200, "restart: {body}");

    // The restart must reach this open stream by itself: no new request is made.
    let deadline = Instant::now() + SHORT;
    loop {
        let snapshot = events
            .next_snapshot(deadline.saturating_duration_since(Instant::now()))
            .await;
        let tier = &snapshot["tiers"][0];
        if backend_pid(tier).is_some_and(|pid| pid != before) {
            break;
        }
    }
}

/// The body of one `GET /events`, read frame by frame.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn connect(url: &str) -> EventStream {
        // No overall timeout: the body never ends; each read has its own deadline.
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("build an HTTP client");
        let response = client.get(url).send().await.expect("GET /events");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content-type: {content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The data of the next `snapshot` event, parsed; panics after `timeout`.
    async fn next_snapshot(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut event = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(name) = line.strip_prefix("event:") {
                        event = Some(name.trim().to_owned());
                    } else if let Some(text) = line.strip_prefix("data:") {
                        data.push_str(text.strip_prefix(' ').unwrap_or(text));
                    }
                }
                if event.as_deref() == Some("snapshot") {
                    return serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("snapshot data is not JSON ({e}): {data}"));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no snapshot event within {timeout:?}; unparsed: {:?}",
                        self.buffer
                    )
                })
                .expect("read /events")
                .expect("/events ended");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

// === the page in a browser ===
//
// Headless Chromium's one-shot modes (`--dump-dom`, `--screenshot`) do not fit
// a live page: they capture at the load event, before the first server-sent
// event, and `--virtual-time-budget` never ends because the open /events
// request counts as a pending fetch that pauses virtual time (with or without
// `--timeout`). So the tests drive the browser over the DevTools protocol on
// a pipe (`--remote-debugging-pipe`: no port, nothing else can connect) and
// poll the live DOM with a deadline.

/// The tier row and state badges as the page's script renders them; none of
/// these strings is in the HTML the server sends, so finding them proves the
/// script ran on data from /events.
const LOCAL_ACTIVE_ROW: &str = r#"<td class="tier">local<span class="marker">active</span></td>"#;
const HEALTHY_BADGE: &str = r#"<span class="badge s-healthy">healthy</span>"#;
const UNHEALTHY_BADGE: &str = r#"<span class="badge s-unhealthy">unhealthy</span>"#;

#[tokio::test]
async fn browser_renders_the_tiers() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let mut browser = Browser::launch(&chromium).await;
    let cascade = Cascade::start_ready(Setup::default()).await;
    let (_, source) = cascade.get("/").await;
    for rendered in [LOCAL_ACTIVE_ROW, HEALTHY_BADGE] {
        assert!(!source.contains(rendered), "`{rendered}` is in the source");
    }

    browser.open(&cascade.url("/")).await;
    browser
        .wait_dom("the tiers to render", |html| {
            html.contains(LOCAL_ACTIVE_ROW)
                && html.contains(HEALTHY_BADGE)
                && html.contains("active tier: local")
        })
        .await;

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 10_000, "screenshot is only {} bytes", png.len());
    if std::env::var("CI").as_deref() != Ok("true") {
        // For people to look at; CI has nobody to look.
        let _ = std::fs::write("/tmp/cascade-status-page.png", &png);
    }
}

#[tokio::test]
async fn browser_draws_the_routers_rate_latency_and_state_strip() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let cascade = Cascade::start_ready(Setup::default()).await;
    let router = cascade.router_addr().await;
    let http = http_client();
    for _ in 0..20 {
        let response = http
            .get(format!("http://{router}/health"))
            .send()
            .await
            .expect("GET through the router");
        assert_eq!(response.status().as_u16(), 200);
    }
    let mut browser = Browser::launch(&chromium).await;
    browser.open(&cascade.url("/")).await;
    let html = browser
        .wait_dom("the router's charts to render", |html| {
            html.contains(r#"data-tier="local" data-phase-now="active""#)
                && !html.contains(r#"data-points="0""#)
                && html.contains(&router.to_string())
                && html.contains("now active")
                && html.contains(" ms · max ")
        })
        .await;
    assert!(html.contains("req/s"), "{html}");
    // The canvases were drawn: the strip of an active tier is blue.
    let colour = browser
        .evaluate(
            "(function () { var c = document.querySelector('[data-tier=local] canvas'); \
             var p = c.getContext('2d').getImageData(c.width - 1, 2, 1, 1).data; \
             return [p[0], p[1], p[2]]; })()",
        )
        .await;
    let png = browser.screenshot().await;
    if std::env::var("CI").as_deref() != Ok("true") {
        let _ = std::fs::write("/tmp/cascade-status-page-router.png", &png);
    }
    assert_eq!(
        colour,
        json!([0x2f, 0x6f, 0xdb]),
        "the state strip ends active"
    );
}

#[tokio::test]
async fn browser_page_follows_a_failure_without_reloading() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    // Launched first, so the page opens well within the backend's 2 healthy seconds.
    let mut browser = Browser::launch(&chromium).await;
    let cascade = Cascade::start_ready(Setup::demo(&["--fail-health-after", "2"])).await;
    browser.open(&cascade.url("/")).await;
    browser
        .wait_dom("the healthy tier to render", |html| {
            html.contains(HEALTHY_BADGE)
        })
        .await;
    // Survives only as long as this document does: a reload would drop it.
    browser.evaluate("window.loadedOnce = true").await;

    let html = browser
        .wait_dom("the failure to render", |html| {
            html.contains(UNHEALTHY_BADGE) || html.contains("no tier is healthy")
        })
        .await;
    assert_eq!(
        browser.evaluate("window.loadedOnce === true").await,
        true,
        "the page was reloaded:\n{html}"
    );
    assert!(
        html.contains("active tier: local"),
        "the feed must keep the earlier decision:\n{html}"
    );
}

/// Headless Chromium driven over `--remote-debugging-pipe`, in its own process
/// group so dropping it kills the whole browser.
struct Browser {
    child: tokio::process::Child,
    group: u32,
    commands: tokio::process::ChildStdin,
    replies: BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

/// Bound for one protocol call and for a page to show what a test waits for.
const BROWSER: Duration = Duration::from_secs(20);

impl Browser {
    async fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("create a temp dir");
        // The protocol pipe is fds 3 (to the browser) and 4 (from it); the test
        // crate has no libc, so a shell maps them onto stdin and stdout.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >&2"#)
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1200,800",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let group = child.id().expect("chromium has a pid");
        let commands = child.stdin.take().expect("piped stdin");
        let replies = BufReader::new(child.stdout.take().expect("piped stdout"));
        Browser {
            child,
            group,
            commands,
            replies,
            next_id: 0,
            session: None,
            _profile: profile,
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", json!({ "url": url }))
            .await;
        let target = target["targetId"].clone();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        let session = attached["sessionId"].as_str().expect("a session id");
        self.session = Some(session.to_owned());
    }

    /// Evaluates `expression` in the page; returns its value.
    async fn evaluate(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Polls the page's DOM until `accept` takes it; returns that DOM.
    async fn wait_dom(&mut self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + BROWSER;
        loop {
            let html = self
                .evaluate("document.documentElement.outerHTML")
                .await
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if accept(&html) {
                return html;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {BROWSER:?} waiting for {what}; the page:\n{html}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page as a PNG.
    async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }

    /// One protocol call (on the attached page, if any); returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        let exchange = async {
            self.commands
                .write_all(&bytes)
                .await
                .expect("write to chromium");
            loop {
                let mut reply = Vec::new();
                let read = self
                    .replies
                    .read_until(0, &mut reply)
                    .await
                    .expect("read from chromium");
                assert!(read > 0, "chromium closed the protocol pipe");
                reply.pop_if(|b| *b == 0);
                let reply: Value = serde_json::from_slice(&reply).expect("protocol JSON");
                // Events and other sessions' replies are not what this call waits for.
                if reply["id"] == id {
                    return reply;
                }
            }
        };
        let reply = tokio::time::timeout(BROWSER, exchange)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method} within {BROWSER:?}"));
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group is the shell-turned-browser and every helper it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.group)])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.start_kill();
    }
}

/// Standard base64 (the protocol's encoding of binary data).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", c as char),
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        bits = bits << 6 | u32::from(value(c));
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}
