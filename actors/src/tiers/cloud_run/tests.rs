//! The `cloud_run` tier: its pure parts (Retry-After, token lifetimes,
//! redaction, configuration), the driver against `cascade-gcp-fake` (the
//! metadata server, the token endpoint, the service, the Admin API), the
//! driver against scripted servers (hanging, 401 once, absurd token expiries),
//! and the real tier actor and root failing over to a fake tier and back.

use std::sync::Arc;
use std::time::Duration;

use cascade_gcp_fake::{FakeGcp, FakeOptions, ServiceFault};

use super::auth::{TokenTimes, b64_decode, b64_encode, redact, refresh_slack, token_times};
use super::*;
use crate::contract::{DriverFactory, StopReason, TierState};
use crate::resilience::BreakerState;
use crate::supervisor::{self, Snapshot, SupervisorConfig};
use crate::tier::TierSpec;
use crate::waterfall::WaterfallConfig;

// === helpers ===

async fn sink() -> EventSink {
    EventSink::discarding().await
}

async fn fake() -> FakeGcp {
    fake_with(FakeOptions::default()).await
}

async fn fake_with(options: FakeOptions) -> FakeGcp {
    FakeGcp::start(options).await.expect("fake GCP starts")
}

fn config(fake: &FakeGcp) -> CloudRunConfig {
    CloudRunConfig {
        url: fake.service_url(),
        cold_start_timeout: Duration::from_secs(3),
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
        },
        ..CloudRunConfig::default()
    }
}

fn metadata_env(fake: &FakeGcp) -> GcpEnv {
    GcpEnv {
        metadata_host: Some(fake.metadata_host()),
        credentials_file: None,
    }
}

/// Writes `key` to a file in `dir` and returns an environment naming it.
fn key_env(fake: &FakeGcp, dir: &tempfile::TempDir, key: &str) -> (GcpEnv, PathBuf) {
    let path = dir.path().join("sa-key.json");
    std::fs::write(&path, key).expect("key file written");
    let env = GcpEnv {
        metadata_host: Some(fake.metadata_host()),
        credentials_file: Some(path.clone()),
    };
    (env, path)
}

async fn driver(config: CloudRunConfig, env: GcpEnv) -> CloudRunDriver {
    let problems = config.validate();
    assert!(problems.is_empty(), "test config is valid: {problems:?}");
    CloudRunDriver::new(config, env, sink().await).expect("driver builds")
}

fn bearers(fake: &FakeGcp) -> Vec<String> {
    fake.service_requests()
        .into_iter()
        .filter_map(|r| r.bearer)
        .collect()
}

/// Asserts no token the service ever received appears in `text`.
fn assert_no_token(fake: &FakeGcp, text: &str) {
    for token in bearers(fake) {
        assert!(!token.is_empty());
        assert!(!text.contains(&token), "a bearer token leaked into: {text}");
        // Not even its signature, or its payload.
        for part in token.split('.').filter(|p| p.len() > 16) {
            assert!(!text.contains(part), "part of a token leaked into: {text}");
        }
    }
}

fn details_text(driver: &CloudRunDriver) -> String {
    format!("{:?}", driver.details())
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn expect_up(outcome: &ProbeOutcome) {
    assert!(
        matches!(outcome, ProbeOutcome::Up { .. }),
        "expected Up, got {outcome:?}"
    );
}

// === pure parts ===

#[test]
fn the_largest_retry_after_is_capped_at_open_max() {
    let url = Url::parse("https://ecapa-x.a.run.app/health").unwrap();
    let cap = Duration::from_secs(60);
    for retry_after in ["18446744073709551615", "Fri, 31 Dec 9999 23:59:59 GMT"] {
        let answer = Ok(Answer {
            status: 503,
            retry_after: Some(retry_after.into()),
            excerpt: String::new(),
        });
        match classify(&url, answer, true, cap) {
            ProbeOutcome::Throttled { retry_after, .. } => assert_eq!(retry_after, cap),
            other => panic!("expected Throttled, got {other:?}"),
        }
    }
}

#[test]
fn answers_map_to_outcomes() {
    let url = Url::parse("https://ecapa-x.a.run.app/health").unwrap();
    let cap = Duration::from_secs(60);
    let answer = |status, retry_after: Option<&str>| {
        Ok(Answer {
            status,
            retry_after: retry_after.map(str::to_owned),
            excerpt: "busy".into(),
        })
    };
    assert_eq!(
        classify(&url, answer(200, None), true, cap),
        ProbeOutcome::Up {
            note: "ready (HTTP 200)".into()
        }
    );
    match classify(&url, answer(503, Some("7")), true, cap) {
        ProbeOutcome::Throttled { error, retry_after } => {
            assert_eq!(retry_after, Duration::from_secs(7));
            assert!(
                error.contains("HTTP 503") && error.contains("busy"),
                "{error}"
            );
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    match classify(&url, answer(429, Some("3600")), true, cap) {
        ProbeOutcome::Throttled { retry_after, .. } => {
            assert_eq!(
                retry_after, cap,
                "Retry-After is capped at breaker.open_max"
            )
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    // Cloud Run's 503 is a definitive answer: not serving now, without waiting for the breaker.
    match classify(&url, answer(503, None), true, cap) {
        ProbeOutcome::Gone { reason } => {
            assert!(reason.contains("answered HTTP 503: busy"), "{reason}")
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    assert!(matches!(
        classify(&url, answer(429, None), true, cap),
        ProbeOutcome::Down { .. }
    ));
    assert!(matches!(
        classify(&url, answer(500, Some("5")), true, cap),
        ProbeOutcome::Down { .. }
    ));
    match classify(&url, answer(403, None), true, cap) {
        ProbeOutcome::Down { error } => {
            assert!(
                error.contains("rejected the ID token (HTTP 403:"),
                "{error}"
            )
        }
        other => panic!("expected Down, got {other:?}"),
    }
    match classify(&url, Err("connection refused".into()), true, cap) {
        ProbeOutcome::Down { error } => assert_eq!(error, "connection refused"),
        other => panic!("expected Down, got {other:?}"),
    }
}

#[test]
fn token_lifetimes_and_refresh_slack() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let jwt = |claims: &str| {
        format!(
            "{}.{}.c2ln",
            b64_encode(br#"{"alg":"RS256"}"#),
            b64_encode(claims.as_bytes())
        )
    };
    let times = |lifetime, left| TokenTimes {
        lifetime: Duration::from_secs(lifetime),
        left: Duration::from_secs(left),
    };
    assert_eq!(
        token_times(&jwt(r#"{"iat":1000000,"exp":1003600}"#), now),
        times(3600, 3600)
    );
    assert_eq!(
        token_times(&jwt(r#"{"iat":999000,"exp":1002600}"#), now),
        times(3600, 2600),
        "what is left is measured against now"
    );
    assert_eq!(
        token_times(&jwt(r#"{"iat":1005000,"exp":1008600}"#), now),
        times(3600, 3600),
        "a clock running behind does not stretch a token"
    );
    assert_eq!(token_times(&jwt(r#"{"exp":1000004}"#), now), times(4, 4));
    assert_eq!(
        token_times(&jwt(r#"{"iat":1,"exp":2}"#), now),
        times(1, 0),
        "expired on arrival: used once, replaced at the next probe"
    );
    assert_eq!(
        token_times("not-a-jwt", now),
        times(3600, 3600),
        "an opaque token is taken to live an hour, like Google's"
    );
    assert_eq!(
        refresh_slack(Duration::from_secs(3600)),
        Duration::from_secs(240)
    );
    assert_eq!(
        refresh_slack(Duration::from_secs(4)),
        Duration::from_secs(2)
    );
    for bytes in [
        &b""[..],
        b"f",
        b"fo",
        b"foo",
        b"foob",
        b"\xff\x00\xfe{\"a\":1}",
    ] {
        assert_eq!(b64_decode(&b64_encode(bytes)).as_deref(), Some(bytes));
    }
    assert_eq!(b64_encode(b"\xfb\xff"), "-_8");
    assert_eq!(b64_decode("Zm9vYg=="), Some(b"foob".to_vec()));
    assert_eq!(b64_decode("a b"), None);
}

/// An unsigned JWT with these claims (the services here do not check it).
fn jwt_with(claims: &str) -> String {
    format!(
        "{}.{}.c2ln",
        b64_encode(br#"{"alg":"RS256"}"#),
        b64_encode(claims.as_bytes())
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
fn absurd_token_expiries_are_bounded_not_a_panic() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let times = |lifetime, left| TokenTimes {
        lifetime: Duration::from_secs(lifetime),
        left: Duration::from_secs(left),
    };
    // Past what the clock can hold: as if the token did not say.
    for claims in [
        r#"{"iat":1000000,"exp":18446744073709551615}"#,
        r#"{"exp":18446744073709551615}"#,
    ] {
        assert_eq!(
            token_times(&jwt_with(claims), now),
            times(3600, 3600),
            "{claims}"
        );
    }
    // Far off but representable: trusted for a day at most.
    for claims in [
        r#"{"iat":1000000,"exp":9000000000000000000}"#,
        r#"{"exp":100000000000}"#,
        r#"{"iat":0,"exp":100000000000}"#,
    ] {
        assert_eq!(
            token_times(&jwt_with(claims), now),
            times(86_400, 86_400),
            "{claims}"
        );
    }
}

#[test]
fn redaction_blanks_tokens_and_keeps_the_rest() {
    let jwt = format!(
        "{}.{}.{}",
        b64_encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64_encode(br#"{"aud":"https://x","exp":1}"#),
        "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
    );
    let text = format!("bad token: Bearer {jwt}, also ya29.a0AfH6SMB and \"{jwt}\"");
    let redacted = redact(&text);
    assert_eq!(
        redacted,
        "bad token: Bearer [redacted], also [redacted] and \"[redacted]\""
    );
    let plain = "health check https://ecapa-abc123-ew.a.run.app/health answered HTTP 503: \
                 run-abcdefgh.europe-west1.googleapis.com 1.2.3 sa@demo-project.iam.gserviceaccount.com";
    assert_eq!(redact(plain), plain);
}

#[test]
fn config_problems_name_their_key() {
    let keys = |config: CloudRunConfig| -> Vec<String> {
        config.validate().into_iter().map(|(key, _)| key).collect()
    };
    assert_eq!(keys(CloudRunConfig::default()), ["url"]);
    let ok = CloudRunConfig {
        url: "https://ecapa-abc123-ew.a.run.app".into(),
        ..CloudRunConfig::default()
    };
    assert!(keys(ok.clone()).is_empty());
    assert_eq!(
        keys(CloudRunConfig {
            url: "ftp://host".into(),
            ..ok.clone()
        }),
        ["url"]
    );
    let plaintext = CloudRunConfig {
        url: "http://ecapa.example.com".into(),
        ..ok.clone()
    };
    let problems = plaintext.validate();
    assert!(problems[0].1.contains("https"), "{problems:?}");
    assert!(
        keys(CloudRunConfig {
            auth: AuthMode::None,
            ..plaintext
        })
        .is_empty(),
        "plain http is fine without a token"
    );
    assert!(
        keys(CloudRunConfig {
            url: "http://127.0.0.1:8080".into(),
            ..ok.clone()
        })
        .is_empty()
    );
    assert_eq!(
        keys(CloudRunConfig {
            health_path: "health".into(),
            admin: Some(AdminConfig {
                project: "p".into(),
                ..AdminConfig::default()
            }),
            ..ok.clone()
        }),
        ["health_path", "admin.region", "admin.service"]
    );
    // The Admin API gets an access token: TLS, or loopback only.
    let admin = |endpoint: &str| CloudRunConfig {
        admin: Some(AdminConfig {
            project: "p".into(),
            region: "r".into(),
            service: "s".into(),
            endpoint: endpoint.into(),
            ..AdminConfig::default()
        }),
        ..ok.clone()
    };
    assert!(keys(admin("https://run.googleapis.com")).is_empty());
    assert!(keys(admin("http://127.0.0.1:9000")).is_empty());
    let problems = admin("http://run.internal.example").validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "admin.endpoint");
    assert!(problems[0].1.contains("must use https"), "{problems:?}");
    let config = CloudRunConfig {
        cold_start_timeout: Duration::from_secs(20),
        ..ok
    };
    assert_eq!(config.probe_deadline(), Duration::from_secs(21));
    assert_eq!(config.audience(), "https://ecapa-abc123-ew.a.run.app");

    let parsed: CloudRunConfig = serde_json::from_value(serde_json::json!({
        "url": "https://x.a.run.app/",
        "auth": "none",
        "admin": { "project": "p", "region": "r", "service": "s" },
    }))
    .expect("parses");
    assert_eq!(parsed.auth, AuthMode::None);
    assert_eq!(parsed.audience(), "https://x.a.run.app");
    let admin = parsed.admin.expect("admin set");
    assert_eq!(admin.endpoint, "https://run.googleapis.com");
    assert_eq!(admin.resource_name(), "projects/p/locations/r/services/s");
    assert!(
        serde_json::from_value::<CloudRunConfig>(serde_json::json!({ "url": "x", "token": "y" }))
            .is_err(),
        "unknown keys are refused"
    );
}

#[tokio::test]
async fn cannot_be_started_and_restart_drops_the_caches() {
    let config = CloudRunConfig {
        url: "http://127.0.0.1:9".into(),
        admin: Some(AdminConfig {
            project: "p".into(),
            region: "r".into(),
            service: "s".into(),
            ..AdminConfig::default()
        }),
        ..CloudRunConfig::default()
    };
    let driver = driver(config, GcpEnv::default()).await;
    assert!(!driver.startable());
    assert!(
        driver
            .start()
            .await
            .unwrap_err()
            .to_string()
            .contains("Cloud Run starts and scales the service itself")
    );
    driver
        .stop(StopReason::Exiting)
        .await
        .expect("stop is a no-op");
    let report = driver
        .restart(RestartRequest {
            force: false,
            dry_run: true,
        })
        .await
        .expect("dry run");
    assert!(report.dry_run);
    let plan = report.plan.join("\n");
    assert!(
        plan.contains("drop the cached ID token")
            && plan.contains("metadata server metadata.google.internal")
            && plan.contains("projects/p/locations/r/services/s"),
        "{plan}"
    );
    assert_eq!(
        driver.details().get("auth").map(String::as_str),
        Some("metadata server metadata.google.internal")
    );
}

// === a slow service: the cold-start allowance ===

/// A service that answers 200 after `delay`, every time.
async fn slow_service(delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    tokio::time::sleep(delay).await;
                    let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn the_first_probe_allows_for_a_cold_start_and_later_ones_do_not() {
    let url = slow_service(Duration::from_millis(400)).await;
    let config = CloudRunConfig {
        url,
        auth: AuthMode::None,
        cold_start_timeout: Duration::from_secs(5),
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(150),
        },
        ..CloudRunConfig::default()
    };
    let driver = driver(config, GcpEnv::default()).await;
    expect_up(&driver.probe().await);
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.contains("did not answer within 150ms"), "{error}")
        }
        other => panic!("a warm probe gets the short timeout: {other:?}"),
    }
    driver
        .restart(RestartRequest::default())
        .await
        .expect("restart");
    expect_up(&driver.probe().await);
}

// === ID tokens from the metadata server ===

#[tokio::test]
async fn metadata_tokens_are_fetched_once_and_sent_on_every_probe() {
    let fake = fake().await;
    let driver = driver(config(&fake), metadata_env(&fake)).await;
    for _ in 0..5 {
        expect_up(&driver.probe().await);
    }
    assert_eq!(
        fake.id_tokens_issued().metadata,
        1,
        "one token for five probes"
    );
    assert_eq!(fake.id_tokens_issued().token_endpoint, 0);
    let sent = bearers(&fake);
    assert_eq!(sent.len(), 5, "every probe carried the token");
    assert!(sent.iter().all(|b| *b == sent[0]));
    let details = driver.details();
    assert_eq!(details["url"], fake.service_url());
    assert_eq!(details["audience"], fake.service_url());
    assert_eq!(
        details["auth"],
        format!("metadata server {}", fake.metadata_host())
    );
    assert!(details.contains_key("token_refreshed"), "{details:?}");
    assert_no_token(&fake, &details_text(&driver));
}

#[tokio::test]
async fn metadata_tokens_are_refreshed_before_they_expire() {
    let fake = fake().await;
    // Half of a 4 s lifetime is left after 2 s: the refresh is due then.
    fake.set_token_lifetime(Duration::from_secs(4));
    let driver = driver(config(&fake), metadata_env(&fake)).await;
    expect_up(&driver.probe().await);
    assert_eq!(fake.id_tokens_issued().metadata, 1);
    eventually("a second token", || async {
        expect_up(&driver.probe().await);
        fake.id_tokens_issued().metadata >= 2
    })
    .await;
    let sent = bearers(&fake);
    assert_ne!(sent.first(), sent.last(), "the new token is the one sent");
    assert!(
        fake.service_requests().iter().all(|r| r.status == 200),
        "no probe went out with an expired token"
    );
}

#[tokio::test]
async fn a_failing_token_source_is_an_id_token_error_not_a_down_service() {
    let fake = fake().await;
    fake.fail_token_requests(Some(500));
    let driver = driver(config(&fake), metadata_env(&fake)).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.starts_with("ID token: metadata server"), "{error}");
            assert!(error.contains("HTTP 500"), "{error}");
        }
        other => panic!("expected an ID token failure, got {other:?}"),
    }
    assert!(
        fake.service_requests().is_empty(),
        "no request without a token"
    );
    fake.fail_token_requests(None);
    expect_up(&driver.probe().await);
}

#[tokio::test]
async fn a_private_service_rejects_probes_without_a_token() {
    let fake = fake().await;
    let config = CloudRunConfig {
        auth: AuthMode::None,
        ..config(&fake)
    };
    let driver = driver(config, metadata_env(&fake)).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.contains("without credentials"), "{error}")
        }
        other => panic!("expected Down, got {other:?}"),
    }
    assert_eq!(fake.id_tokens_issued().metadata, 0);
}

#[tokio::test]
async fn a_token_for_another_audience_is_reported_as_rejected() {
    let fake = fake().await;
    let config = CloudRunConfig {
        audience: Some("https://another-service.a.run.app".into()),
        ..config(&fake)
    };
    let driver = driver(config, metadata_env(&fake)).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.contains("rejected the ID token (HTTP 40"), "{error}");
            assert_no_token(&fake, &error);
        }
        other => panic!("expected Down, got {other:?}"),
    }
}

// === routed requests: the tier's one token cache ===

/// The credentials the router attaches: the probes' cached token (no second fetch), valid at the
/// service for any path, dropped on a 401 so the next request (or probe) fetches a new one.
#[tokio::test]
async fn routed_requests_share_the_probes_token_and_a_401_drops_it() {
    let fake = fake().await;
    let driver = driver(config(&fake), metadata_env(&fake)).await;
    let info = driver.route_info();
    assert_eq!(info.cold_start_timeout, Some(Duration::from_secs(3)));
    let RequestAuth::IdToken(credentials) = info.auth else {
        panic!("a private service's requests carry ID tokens: {info:?}");
    };
    expect_up(&driver.probe().await);
    assert_eq!(fake.id_tokens_issued().metadata, 1);

    let value = credentials.authorization().await.expect("a token");
    assert!(
        value.is_sensitive(),
        "marked sensitive, so no debug output shows it"
    );
    assert_eq!(
        fake.id_tokens_issued().metadata,
        1,
        "the probes' cached token, not a second fetch"
    );
    let response = reqwest::Client::new()
        .get(format!("{}/health", fake.service_url()))
        .header(reqwest::header::AUTHORIZATION, value.clone())
        .send()
        .await
        .expect("the service answers");
    assert_eq!(response.status(), 200);

    // Many requests at once: still one token, still no fetch.
    let all = futures_util::future::join_all((0..50).map(|_| credentials.authorization())).await;
    assert!(all.iter().all(|v| v.as_ref().ok() == Some(&value)));
    assert_eq!(fake.id_tokens_issued().metadata, 1);

    // Another lifetime, so the next token differs from this one even within the same second.
    fake.set_token_lifetime(Duration::from_secs(1800));
    credentials.rejected(&value).await;
    let fresh = credentials.authorization().await.expect("a new token");
    assert_ne!(fresh, value, "a rejected token is never handed out again");
    assert_eq!(fake.id_tokens_issued().metadata, 2);
    // A late 401 for the old token does not drop the new one.
    credentials.rejected(&value).await;
    assert_eq!(credentials.authorization().await.expect("cached"), fresh);
    expect_up(&driver.probe().await);
    assert_eq!(fake.id_tokens_issued().metadata, 2, "the probe uses it too");

    // An unreachable token source is an error naming it, never a token.
    fake.fail_token_requests(Some(503));
    driver
        .restart(RestartRequest::default())
        .await
        .expect("restart");
    let error = credentials.authorization().await.expect_err("no token");
    assert!(error.0.starts_with("ID token: metadata server"), "{error}");
    assert!(error.0.contains("503"), "{error}");
    assert_no_token(&fake, &error.0);
}

#[tokio::test]
async fn a_public_service_routes_without_credentials() {
    let fake = fake().await;
    let config = CloudRunConfig {
        auth: AuthMode::None,
        ..config(&fake)
    };
    let driver = driver(config, metadata_env(&fake)).await;
    assert_eq!(driver.route_info().auth, RequestAuth::None);
}

// === ID tokens from a service-account key ===

#[tokio::test]
async fn key_file_tokens_come_from_the_keys_token_endpoint_and_are_cached() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (env, path) = key_env(&fake, &dir, &fake.service_account_key_json().to_string());
    let driver = driver(config(&fake), env).await;
    for _ in 0..3 {
        expect_up(&driver.probe().await);
    }
    let issued = fake.id_tokens_issued();
    assert_eq!(issued.token_endpoint, 1, "{issued:?}");
    assert_eq!(issued.metadata, 0, "{issued:?}");
    let details = driver.details();
    assert_eq!(
        details["auth"],
        format!("service-account key {}", path.display())
    );
    let text = details_text(&driver);
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert_no_token(&fake, &text);
}

#[tokio::test]
async fn the_config_key_file_wins_over_the_environment() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut env, path) = key_env(&fake, &dir, &fake.service_account_key_json().to_string());
    env.credentials_file = Some(dir.path().join("not-this-one.json"));
    let config = CloudRunConfig {
        credentials_file: Some(path),
        ..config(&fake)
    };
    let driver = driver(config, env).await;
    expect_up(&driver.probe().await);
    assert_eq!(fake.id_tokens_issued().token_endpoint, 1);
}

#[tokio::test]
async fn a_failing_token_endpoint_is_an_id_token_error() {
    let fake = fake().await;
    fake.fail_token_requests(Some(503));
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = key_env(&fake, &dir, &fake.service_account_key_json().to_string());
    let driver = driver(config(&fake), env).await;
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.starts_with("ID token: token endpoint"), "{error}");
            assert!(error.contains("HTTP 503"), "{error}");
        }
        other => panic!("expected an ID token failure, got {other:?}"),
    }
    assert!(fake.service_requests().is_empty());
}

#[tokio::test]
async fn bad_key_files_are_unavailable_with_the_file_and_the_problem() {
    let fake = fake().await;
    let good = fake.service_account_key_json();
    let pem = good["private_key"].as_str().unwrap_or_default().to_owned();
    let mut no_private_key = good.clone();
    no_private_key
        .as_object_mut()
        .expect("key is an object")
        .remove("private_key");
    let mut user = good.clone();
    user["type"] = "authorized_user".into();
    let mut plain_token_uri = good.clone();
    plain_token_uri["token_uri"] = "http://tokens.example.com/token".into();
    let mut bad_pem = good.clone();
    bad_pem["private_key"] =
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
    let cases = [
        (
            "{\n  \"type\": \"service_account\",\n  \"client_email\": oops\n}\n".to_owned(),
            "not valid JSON at line 3",
        ),
        (no_private_key.to_string(), "missing field private_key"),
        (
            user.to_string(),
            "type is \"authorized_user\", expected \"service_account\"",
        ),
        (
            bad_pem.to_string(),
            "private_key is not a usable PKCS#8 RSA key",
        ),
        (
            plain_token_uri.to_string(),
            "token_uri http://tokens.example.com must use https",
        ),
    ];
    for (content, problem) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (env, path) = key_env(&fake, &dir, &content);
        let driver = driver(config(&fake), env).await;
        match driver.probe().await {
            ProbeOutcome::Unavailable { reason } => {
                let named = format!("ID token: service-account key {}: ", path.display());
                assert!(reason.starts_with(&named), "{reason}");
                assert!(reason.contains(problem), "{reason}");
                assert!(!reason.contains("BEGIN PRIVATE KEY") && !reason.contains("AAAA"));
                if !pem.is_empty() {
                    assert!(!reason.contains(&pem[30..60]), "key material in {reason}");
                }
            }
            other => panic!("expected Unavailable for {problem}, got {other:?}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = GcpEnv {
        metadata_host: None,
        credentials_file: Some(dir.path().join("absent.json")),
    };
    match driver(config(&fake), missing).await.probe().await {
        ProbeOutcome::Unavailable { reason } => {
            assert!(reason.contains("absent.json: cannot be read"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(fake.id_tokens_issued().token_endpoint, 0);
    assert!(fake.service_requests().is_empty());
}

// === throttling and the Admin API ===

#[tokio::test]
async fn a_503_or_429_with_retry_after_is_throttled() {
    let fake = fake().await;
    let driver = driver(config(&fake), metadata_env(&fake)).await;
    for status in [503, 429] {
        fake.set_service_fault(Some(ServiceFault {
            status,
            retry_after: Some(7),
        }));
        match driver.probe().await {
            ProbeOutcome::Throttled { error, retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(7));
                assert!(error.contains(&format!("HTTP {status}")), "{error}");
                assert_no_token(&fake, &error);
            }
            other => panic!("expected Throttled, got {other:?}"),
        }
    }
    fake.set_service_fault(Some(ServiceFault {
        status: 503,
        retry_after: None,
    }));
    assert!(matches!(driver.probe().await, ProbeOutcome::Gone { .. }));
    fake.set_service_fault(None);
    expect_up(&driver.probe().await);
}

/// A 404 or 403 from the Admin API is a configuration error: a failed check, in the status,
/// not a silently disabled one.
#[tokio::test]
async fn an_admin_api_that_does_not_know_the_service_fails_the_check() {
    let fake = fake().await;
    let mut config = admin_config(&fake);
    if let Some(admin) = config.admin.as_mut() {
        admin.service = "no-such-service".into();
    }
    let driver = driver(config, metadata_env(&fake)).await;
    let reason = match driver.probe().await {
        ProbeOutcome::Unavailable { reason } => reason,
        other => panic!("a refused Admin check must fail the tier, got {other:?}"),
    };
    assert!(
        reason.starts_with("Cloud Run Admin API check failed: services.get projects/"),
        "{reason}"
    );
    assert!(reason.contains("no-such-service"), "{reason}");
    assert!(reason.contains("404"), "{reason}");
    assert!(
        reason.contains("check tiers.cloud_run.admin: project, region and service"),
        "{reason}"
    );
    let details = driver.details();
    assert!(
        details["admin_ready"].starts_with("check failed: "),
        "{details:?}"
    );
    // Asked again at every probe, so a fix shows at once.
    let asked = fake.admin_requests();
    assert!(matches!(
        driver.probe().await,
        ProbeOutcome::Unavailable { .. }
    ));
    assert_eq!(fake.admin_requests(), asked + 1);
    assert_no_token(&fake, &reason);
}

fn admin_config(fake: &FakeGcp) -> CloudRunConfig {
    let options = fake.options();
    CloudRunConfig {
        admin: Some(AdminConfig {
            project: options.project.clone(),
            region: options.region.clone(),
            service: options.run_service.clone(),
            endpoint: fake.run_admin_endpoint(),
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }),
        ..config(fake)
    }
}

#[tokio::test]
async fn a_service_cloud_run_reports_not_ready_is_unavailable_with_its_message() {
    let fake = fake().await;
    let mut config = admin_config(&fake);
    if let Some(admin) = config.admin.as_mut() {
        admin.interval = Duration::from_millis(300);
    }
    let driver = driver(config, metadata_env(&fake)).await;
    expect_up(&driver.probe().await);
    expect_up(&driver.probe().await);
    assert_eq!(fake.admin_requests(), 1, "a Ready answer is cached");
    assert_eq!(driver.details()["admin_ready"], "true");

    let message = "Revision 'ecapa-00002-abc' is not ready and cannot serve traffic.";
    fake.set_service_ready(false, message);
    // The cached Ready stands until `interval` passes (or a health probe fails).
    expect_up(&driver.probe().await);
    let deadline = Instant::now() + Duration::from_secs(15);
    let outcome = loop {
        let outcome = driver.probe().await;
        if !matches!(outcome, ProbeOutcome::Up { .. }) || Instant::now() > deadline {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match outcome {
        ProbeOutcome::Unavailable { reason } => assert_eq!(
            reason,
            format!("Cloud Run reports the service not ready: {message}")
        ),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(driver.details()["admin_ready"], format!("false: {message}"));
    fake.set_service_ready(true, "");
    expect_up(&driver.probe().await);
    assert_eq!(fake.rejections(), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_health_probe_asks_the_admin_api_at_once() {
    let fake = fake().await;
    let driver = driver(admin_config(&fake), metadata_env(&fake)).await;
    expect_up(&driver.probe().await);
    let asked = fake.admin_requests();
    fake.set_service_ready(false, "Quota exceeded for instances.");
    fake.set_service_fault(Some(ServiceFault {
        status: 500,
        retry_after: None,
    }));
    match driver.probe().await {
        ProbeOutcome::Unavailable { reason } => {
            assert!(
                reason.ends_with("Quota exceeded for instances."),
                "{reason}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(fake.admin_requests(), asked + 1);
}

#[tokio::test]
async fn the_admin_api_is_asked_with_the_key_files_credentials() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut env, _) = key_env(&fake, &dir, &fake.service_account_key_json().to_string());
    env.metadata_host = None;
    let driver = driver(admin_config(&fake), env).await;
    expect_up(&driver.probe().await);
    assert_eq!(driver.details()["admin_ready"], "true");
    assert_eq!(fake.admin_requests(), 1);
    assert_eq!(fake.rejections(), Vec::<String>::new());
}

#[tokio::test]
async fn an_unreachable_admin_api_leaves_the_verdict_to_the_health_check() {
    let fake = fake().await;
    let mut config = admin_config(&fake);
    if let Some(admin) = config.admin.as_mut() {
        admin.endpoint = "http://127.0.0.1:9".into();
    }
    let driver = driver(config, metadata_env(&fake)).await;
    expect_up(&driver.probe().await);
    let details = driver.details();
    assert_eq!(details["admin_ready"], "unknown");
    assert!(
        details["admin_error"]
            .contains("projects/demo-project/locations/europe-west1/services/ecapa"),
        "{details:?}"
    );
}

// === hanging or misbehaving token sources and Admin API ===

/// A scripted HTTP/1.1 server on 127.0.0.1:0: `answer` gets each request's
/// number (from 1) and head and returns the whole response, or `None` to
/// leave that request hanging on its open connection forever. Returns the
/// server's URL and the heads of the requests it got. Requests must have no
/// body.
async fn scripted_server<F>(answer: F) -> (String, Arc<std::sync::Mutex<Vec<String>>>)
where
    F: Fn(usize, &str) -> Option<String> + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let answer = Arc::new(answer);
    let requests = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (answer, requests) = (answer.clone(), requests.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let number = {
                        let mut requests = requests.lock().unwrap();
                        requests.push(head.clone());
                        requests.len()
                    };
                    match answer(number, &head) {
                        Some(reply) => {
                            if socket.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn response(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The `Authorization` header of each request head, in order.
fn authorizations(heads: &std::sync::Mutex<Vec<String>>) -> Vec<Option<String>> {
    heads
        .lock()
        .unwrap()
        .iter()
        .map(|head| {
            head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
        })
        .collect()
}

fn scripted_env(metadata_url: &str) -> GcpEnv {
    GcpEnv {
        metadata_host: Some(metadata_url.trim_start_matches("http://").to_owned()),
        credentials_file: None,
    }
}

/// `timeout` for every probe, cold or warm.
fn scripted_config(url: String, timeout: Duration) -> CloudRunConfig {
    CloudRunConfig {
        url,
        cold_start_timeout: timeout,
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout,
        },
        ..CloudRunConfig::default()
    }
}

/// A hanging Admin API costs each probe at most its share of time, and is asked once at a time:
/// the check in flight is joined, not sent again, until its own `admin.timeout` ends it.
#[tokio::test]
async fn a_hanging_admin_api_leaves_the_health_check_its_time() {
    let fake = fake().await;
    let (hanging, asked) = scripted_server(|_, _| None).await;
    let timeout = Duration::from_millis(500);
    let mut config = CloudRunConfig {
        cold_start_timeout: timeout,
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout,
        },
        ..admin_config(&fake)
    };
    if let Some(admin) = config.admin.as_mut() {
        admin.endpoint = hanging;
        // Asked at every probe.
        admin.interval = Duration::from_millis(1);
        admin.timeout = Duration::from_secs(3);
    }
    let driver = driver(config, metadata_env(&fake)).await;
    let started = Instant::now();
    for _ in 0..3 {
        let probe_started = Instant::now();
        expect_up(&driver.probe().await);
        assert!(
            probe_started.elapsed() < timeout * 2,
            "{:?}",
            probe_started.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // The scripted server records a request once it has read its head,
    // which on a loaded machine may come after the probes returned.
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        asked.lock().unwrap().len(),
        1,
        "one check in flight, joined by every probe: {:?}",
        driver.details()
    );
    assert_eq!(driver.details()["admin_ready"], "unknown");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !driver.details().contains_key("admin_error") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let details = driver.details();
    assert!(
        details["admin_error"].contains("did not answer within 3s"),
        "the check's own timeout: {details:?}"
    );
}

/// An Admin API slower than the probe still answers: the check outlives the probe that started
/// it, and a later probe acts on its answer.
#[tokio::test]
async fn an_admin_api_slower_than_the_probe_still_gets_its_answer_in() {
    let fake = fake().await;
    let timeout = Duration::from_millis(300);
    let mut config = CloudRunConfig {
        cold_start_timeout: timeout,
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout,
        },
        ..admin_config(&fake)
    };
    if let Some(admin) = config.admin.as_mut() {
        admin.timeout = Duration::from_secs(5);
    }
    let message = "Revision 'ecapa-00007' is not ready: slow news.";
    fake.set_service_ready(false, message);
    fake.set_admin_latency(Duration::from_millis(1000));
    let driver = driver(config, metadata_env(&fake)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        let outcome = driver.probe().await;
        if matches!(outcome, ProbeOutcome::Unavailable { .. }) || Instant::now() > deadline {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match outcome {
        ProbeOutcome::Unavailable { reason } => assert_eq!(
            reason,
            format!("Cloud Run reports the service not ready: {message}")
        ),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(driver.details()["admin_ready"], format!("false: {message}"));
}

#[tokio::test]
async fn a_hanging_metadata_server_does_not_starve_the_probe_while_the_token_is_valid() {
    let now = unix_now();
    // Valid for 100 s more, so due for a refresh (under 4 minutes left).
    let token = jwt_with(&format!(r#"{{"iat":{},"exp":{}}}"#, now - 3500, now + 100));
    let answered = token.clone();
    let (metadata, fetches) =
        scripted_server(move |n, _| (n == 1).then(|| response(200, &answered))).await;
    let (service, probes) = scripted_server(|_, _| Some(response(200, "ok"))).await;
    let timeout = Duration::from_millis(800);
    let driver = driver(scripted_config(service, timeout), scripted_env(&metadata)).await;
    expect_up(&driver.probe().await);
    for _ in 0..2 {
        let started = Instant::now();
        expect_up(&driver.probe().await);
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    }
    assert_eq!(
        fetches.lock().unwrap().len(),
        3,
        "each probe tried to refresh"
    );
    let sent = authorizations(&probes);
    assert_eq!(sent, vec![Some(format!("Bearer {token}")); 3]);
    let error = driver.details()["token_error"].clone();
    assert!(
        error.starts_with("ID token: metadata server") && error.ends_with("within 200ms"),
        "a quarter of the probe's budget: {error}"
    );
}

#[tokio::test]
async fn a_401_drops_the_cached_token_and_the_next_probe_fetches_a_new_one() {
    let (metadata, fetches) =
        scripted_server(|n, _| Some(response(200, &format!("token-{n}")))).await;
    let (service, probes) = scripted_server(|n, _| {
        Some(if n == 2 {
            response(401, "")
        } else {
            response(200, "ok")
        })
    })
    .await;
    let driver = driver(
        scripted_config(service, Duration::from_secs(2)),
        scripted_env(&metadata),
    )
    .await;
    expect_up(&driver.probe().await);
    match driver.probe().await {
        ProbeOutcome::Down { error } => {
            assert!(error.contains("rejected the ID token (HTTP 401"), "{error}")
        }
        other => panic!("expected Down, got {other:?}"),
    }
    expect_up(&driver.probe().await);
    expect_up(&driver.probe().await);
    let bearer = |n: u32| Some(format!("Bearer token-{n}"));
    assert_eq!(
        authorizations(&probes),
        [bearer(1), bearer(1), bearer(2), bearer(2)]
    );
    assert_eq!(fetches.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn tokens_with_absurd_expiries_are_used_and_shown_without_a_panic() {
    for exp in [u64::MAX, 100_000_000_000_000_000] {
        let token = jwt_with(&format!(r#"{{"iat":{},"exp":{exp}}}"#, unix_now()));
        let (metadata, _) = scripted_server(move |_, _| Some(response(200, &token))).await;
        let (service, _) = scripted_server(|_, _| Some(response(200, "ok"))).await;
        let driver = driver(
            scripted_config(service, Duration::from_secs(2)),
            scripted_env(&metadata),
        )
        .await;
        expect_up(&driver.probe().await);
        expect_up(&driver.probe().await);
        let details = driver.details();
        let expires = humantime::parse_rfc3339(&details["token_expires"]).expect("a date");
        assert!(
            expires < SystemTime::now() + Duration::from_secs(86_400 + 60),
            "{details:?}"
        );
    }
}

// === the real tier actor and root ===

/// The other tier: always healthy.
struct Healthy;

#[async_trait]
impl Driver for Healthy {
    fn endpoint(&self) -> Option<String> {
        Some("http://local.invalid".into())
    }
    fn startable(&self) -> bool {
        false
    }
    async fn probe(&self) -> ProbeOutcome {
        ProbeOutcome::Up {
            note: "ready".into(),
        }
    }
    async fn start(&self) -> Result<(), TierError> {
        Err(TierError::new("not startable"))
    }
    async fn stop(&self, _reason: StopReason) -> Result<(), TierError> {
        Ok(())
    }
    async fn restart(&self, r: RestartRequest) -> Result<RestartReport, TierError> {
        Ok(RestartReport {
            tier: TierId::Local,
            dry_run: r.dry_run,
            plan: vec![],
        })
    }
}

fn cloud_run_spec(config: CloudRunConfig, env: GcpEnv) -> TierSpec {
    let probe = ProbeConfig {
        interval: config.probe.interval,
        timeout: config.probe_deadline(),
    };
    let (breaker, start_timeout, stop_grace) = (
        config.breaker.clone(),
        config.start_timeout,
        config.stop_grace,
    );
    let factory: DriverFactory = Arc::new(move |events| {
        Ok(Arc::new(CloudRunDriver::new(config.clone(), env.clone(), events)?) as Arc<dyn Driver>)
    });
    TierSpec {
        id: TierId::CloudRun,
        factory,
        probe,
        breaker,
        start_timeout,
        stop_grace,
        fingerprint: "cloud_run".into(),
    }
}

fn healthy_spec() -> TierSpec {
    let factory: DriverFactory = Arc::new(|_| Ok(Arc::new(Healthy) as Arc<dyn Driver>));
    TierSpec {
        id: TierId::Local,
        factory,
        probe: ProbeConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        },
        breaker: BreakerConfig::default(),
        start_timeout: Duration::from_secs(1),
        stop_grace: Duration::from_secs(1),
        fingerprint: "local".into(),
    }
}

async fn wait_snapshot(
    running: &mut supervisor::Running,
    what: &str,
    ok: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let waited = tokio::time::timeout(
        Duration::from_secs(15),
        running.snapshots.wait_for(|s| ok(s)),
    )
    .await
    .map(|r| r.map(|s| s.clone()));
    match waited {
        Ok(Ok(snapshot)) => snapshot,
        _ => panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            *running.snapshots.borrow()
        ),
    }
}

fn cloud_run_status(snapshot: &Snapshot) -> &crate::contract::TierStatus {
    &snapshot
        .tiers
        .iter()
        .find(|t| t.status.tier == TierId::CloudRun)
        .expect("cloud_run in the snapshot")
        .status
}

#[tokio::test]
async fn failure_storms_open_the_breaker_and_the_waterfall_fails_over_and_back() {
    let fake = fake().await;
    let config = CloudRunConfig {
        breaker: BreakerConfig {
            consecutive_failures: 2,
            open_base: Duration::from_millis(200),
            open_max: Duration::from_secs(1),
            ..BreakerConfig::default()
        },
        ..admin_config(&fake)
    };
    let order = [TierId::CloudRun, TierId::Local];
    let mut running = supervisor::start(
        vec![cloud_run_spec(config, metadata_env(&fake)), healthy_spec()],
        WaterfallConfig {
            order: order.to_vec(),
            failback_after: Duration::from_millis(300),
            ..WaterfallConfig::default()
        },
        SupervisorConfig::default(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    let mut seen = Vec::new();

    let snap = wait_snapshot(&mut running, "cloud_run active", |s| {
        s.active == Some(TierId::CloudRun)
    })
    .await;
    assert_eq!(cloud_run_status(&snap).details["admin_ready"], "true");
    seen.push(snap);

    // Plain failures: the breaker opens on consecutive failures.
    fake.set_service_fault(Some(ServiceFault {
        status: 500,
        retry_after: None,
    }));
    let snap = wait_snapshot(&mut running, "failover on 500s", |s| {
        s.active == Some(TierId::Local) && cloud_run_status(s).breaker == BreakerState::Open
    })
    .await;
    let status = cloud_run_status(&snap);
    assert!(
        status.reason.contains("2 consecutive failures") && status.reason.contains("HTTP 500"),
        "{}",
        status.reason
    );
    seen.push(snap);
    fake.set_service_fault(None);
    seen.push(
        wait_snapshot(&mut running, "failback after the 500s", |s| {
            s.active == Some(TierId::CloudRun)
        })
        .await,
    );

    // The service asks to be left alone: the breaker opens at once for Retry-After.
    let before = fake.service_requests().len();
    fake.set_service_fault(Some(ServiceFault {
        status: 503,
        retry_after: Some(1),
    }));
    let snap = wait_snapshot(&mut running, "failover to local", |s| {
        s.active == Some(TierId::Local) && cloud_run_status(s).breaker == BreakerState::Open
    })
    .await;
    let status = cloud_run_status(&snap);
    assert_eq!(status.state, TierState::Unhealthy);
    let error = status.last_error.clone().unwrap_or_default();
    assert!(error.contains("HTTP 503"), "{error}");
    assert!(
        status.reason.contains("Retry-After 1s"),
        "{}",
        status.reason
    );
    let throttled = fake
        .service_requests()
        .iter()
        .skip(before)
        .filter(|r| r.status == 503)
        .count();
    assert_eq!(throttled, 1, "one 503 with Retry-After opens the breaker");
    seen.push(snap);
    let storm_requests = fake.service_requests().len();
    // The breaker holds probes off for the Retry-After second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.service_requests().len() <= storm_requests + 1,
        "the open breaker stops probes"
    );

    fake.set_service_fault(None);
    let snap = wait_snapshot(&mut running, "failback to cloud_run", |s| {
        s.active == Some(TierId::CloudRun)
            && cloud_run_status(s).state == TierState::Healthy
            && cloud_run_status(s).breaker == BreakerState::Closed
    })
    .await;
    seen.push(snap);
    seen.push(running.snapshots.borrow().clone());

    for snapshot in &seen {
        let text = serde_json::to_string(snapshot).expect("snapshot serializes");
        assert_no_token(&fake, &text);
    }
    assert!(!bearers(&fake).is_empty());
    let _ = running
        .root
        .call(supervisor::RootMsg::Shutdown, Some(Duration::from_secs(5)))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), running.join).await;
}

#[tokio::test]
async fn token_trouble_shows_in_the_status_as_such_and_never_the_token() {
    let fake = fake_with(FakeOptions {
        token_lifetime: Duration::from_secs(4),
        ..FakeOptions::default()
    })
    .await;
    let config = CloudRunConfig {
        breaker: BreakerConfig {
            consecutive_failures: 2,
            open_base: Duration::from_millis(200),
            open_max: Duration::from_millis(400),
            ..BreakerConfig::default()
        },
        ..config(&fake)
    };
    let order = [TierId::CloudRun, TierId::Local];
    let mut running = supervisor::start(
        vec![cloud_run_spec(config, metadata_env(&fake)), healthy_spec()],
        WaterfallConfig {
            order: order.to_vec(),
            failback_after: Duration::from_millis(300),
            ..WaterfallConfig::default()
        },
        SupervisorConfig::default(),
        Arc::new(crate::notify::NoNotify),
        crate::Instance::from_state_dir("/nonexistent/cascade-test".as_ref()),
    )
    .await
    .expect("root starts");
    let mut seen = Vec::new();
    seen.push(
        wait_snapshot(&mut running, "cloud_run active", |s| {
            s.active == Some(TierId::CloudRun)
        })
        .await,
    );

    fake.fail_token_requests(Some(500));
    // Halfway through its life the token is due for a refresh, which
    // fails: the current token is still used, and the status says so.
    let snap = wait_snapshot(&mut running, "a failed refresh in the details", |s| {
        cloud_run_status(s).details.contains_key("token_error")
    })
    .await;
    let status = cloud_run_status(&snap);
    assert!(
        status.details["token_error"].starts_with("ID token: metadata server"),
        "{:?}",
        status.details
    );
    seen.push(snap);
    // Once it expires, probes fail as token failures and the waterfall moves on.
    let snap = wait_snapshot(&mut running, "failover on token failure", |s| {
        s.active == Some(TierId::Local)
    })
    .await;
    let error = cloud_run_status(&snap)
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(error.starts_with("ID token: metadata server"), "{error}");
    assert!(error.contains("HTTP 500"), "{error}");
    assert!(!error.contains("health check"), "{error}");
    seen.push(snap);

    fake.fail_token_requests(None);
    seen.push(
        wait_snapshot(&mut running, "failback to cloud_run", |s| {
            s.active == Some(TierId::CloudRun)
        })
        .await,
    );
    assert!(bearers(&fake).len() >= 2);
    for snapshot in &seen {
        let text = serde_json::to_string(snapshot).expect("snapshot serializes");
        assert_no_token(&fake, &text);
    }
    let _ = running
        .root
        .call(supervisor::RootMsg::Shutdown, Some(Duration::from_secs(5)))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), running.join).await;
}
