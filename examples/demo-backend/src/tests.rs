//! Behavioural tests: the router driven in-process through `tower::ServiceExt`,
//! and the real server bound on 127.0.0.1:0 and spoken to over raw TCP.

use std::io::Cursor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::*;

const DEADLINE: Duration = Duration::from_secs(5);

fn state() -> AppState {
    AppState::new("test-backend", None, Duration::ZERO).unwrap()
}

fn test_opts() -> Options {
    Options {
        port: 0,
        ..Options::default()
    }
}

fn wav_spec(
    channels: u16,
    sample_rate: u32,
    bits: u16,
    format: hound::SampleFormat,
) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: bits,
        sample_format: format,
    }
}

fn pcm16_wav(channels: u16, sample_rate: u32, samples: &[i16]) -> Vec<u8> {
    let mut buf = Vec::new();
    let spec = wav_spec(channels, sample_rate, 16, hound::SampleFormat::Int);
    let mut w = hound::WavWriter::new(Cursor::new(&mut buf), spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    buf
}

fn tone(freq: f64, seconds: f64, sample_rate: u32) -> Vec<i16> {
    let n = (seconds * f64::from(sample_rate)) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(sample_rate);
            (8000.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
        })
        .collect()
}

async fn call(app: axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, json)
}

async fn get_health(app: axum::Router) -> (StatusCode, Value) {
    call(app, Request::get("/health").body(Body::empty()).unwrap()).await
}

async fn post_embed(app: axum::Router, body: Vec<u8>) -> (StatusCode, Value) {
    let req = Request::post("/embed")
        .header("content-type", "audio/wav")
        .body(Body::from(body))
        .unwrap();
    call(app, req).await
}

fn embedding_of(json: &Value) -> Vec<f32> {
    json["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    dot / (norm(a) * norm(b))
}

/// Minimal HTTP/1.1 client: one request per connection, `Connection: close`.
async fn raw_http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: audio/wav\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "client does not decode chunked: {head}"
    );
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_slice(&raw[split + 4..]).unwrap())
}

#[tokio::test]
async fn health_reports_ok_and_identity() {
    let (status, json) = get_health(router(state())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "ok");
    assert_eq!(json["name"], "test-backend");
    assert_eq!(json["model"], MODEL_LABEL);
    assert_eq!(json["embedding_dim"], 192);
    assert!(json["uptime_s"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn health_starts_failing_after_fail_health_after() {
    let started = Instant::now();
    let app = router(AppState::new("x", Some(0.2), Duration::ZERO).unwrap());
    let (status, _) = get_health(app.clone()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "must be healthy before the deadline"
    );
    let json = loop {
        let (status, json) = get_health(app.clone()).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break json;
        }
        assert!(started.elapsed() < DEADLINE, "health never started failing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(json["status"], "failing");
    assert_eq!(json["reason"], "health failure injected after 0.2 s");
    // It stays failing.
    assert_eq!(get_health(app).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn embed_returns_unit_vector_with_metadata() {
    let (status, json) = post_embed(
        router(state()),
        pcm16_wav(1, 16000, &tone(220.0, 1.5, 16000)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let v = embedding_of(&json);
    assert_eq!(v.len(), EMBEDDING_DIM);
    assert!((norm(&v) - 1.0).abs() < 1e-5, "norm {}", norm(&v));
    assert_eq!(json["dim"], 192);
    assert_eq!(json["sample_rate"], 16000);
    assert_eq!(json["duration_s"], 1.5);
    assert_eq!(json["model"], MODEL_LABEL);
}

#[tokio::test]
async fn embed_is_deterministic_and_discriminates() {
    let a = pcm16_wav(1, 16000, &tone(220.0, 1.0, 16000));
    let b = pcm16_wav(1, 16000, &tone(330.0, 1.0, 16000));
    let (_, a1) = post_embed(router(state()), a.clone()).await;
    let (_, a2) = post_embed(router(state()), a).await;
    let (_, b1) = post_embed(router(state()), b).await;
    let (a1, a2, b1) = (embedding_of(&a1), embedding_of(&a2), embedding_of(&b1));
    assert_eq!(a1, a2);
    assert!(
        cosine(&a1, &b1) < 0.9,
        "different audio too similar: {}",
        cosine(&a1, &b1)
    );
}

#[test]
fn embed_function_properties() {
    let mono = tone(440.0, 0.5, 8000);
    let stereo: Vec<i16> = mono.iter().flat_map(|&s| [s, s]).collect();
    let v = embed(&mono, 8000, 1);
    assert_eq!(v.len(), EMBEDDING_DIM);
    // Identical channels mix down to the mono signal.
    assert_eq!(embed(&stereo, 8000, 2), v);
    // Gain does not change the direction.
    let quieter: Vec<i16> = mono.iter().map(|&s| s / 2).collect();
    assert!(cosine(&embed(&quieter, 8000, 1), &v) > 0.999);
    // The sample rate is part of the input.
    assert_ne!(embed(&mono, 16000, 1), v);
    // Silence still yields a unit vector, and degenerate input does not panic.
    assert!((norm(&embed(&[0; 100], 16000, 1)) - 1.0).abs() < 1e-6);
    assert_eq!(embed(&[1, 2, 3], 16000, 0).len(), EMBEDDING_DIM);
}

#[tokio::test]
async fn bad_audio_is_rejected_with_a_reason() {
    let mut noise = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..4096 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 24) as u8);
    }

    let float_wav = {
        let mut buf = Vec::new();
        let spec = wav_spec(1, 16000, 32, hound::SampleFormat::Float);
        let mut w = hound::WavWriter::new(Cursor::new(&mut buf), spec).unwrap();
        for i in 0..1600 {
            w.write_sample(i as f32 / 1600.0).unwrap();
        }
        w.finalize().unwrap();
        buf
    };
    let eight_bit = {
        let mut buf = Vec::new();
        let spec = wav_spec(1, 16000, 8, hound::SampleFormat::Int);
        let mut w = hound::WavWriter::new(Cursor::new(&mut buf), spec).unwrap();
        for i in 0..1600 {
            w.write_sample((i % 100) as i8).unwrap();
        }
        w.finalize().unwrap();
        buf
    };
    let three_channels = pcm16_wav(3, 16000, &[1; 300]);
    // 61 s at a low rate keeps the body small while exceeding the cap.
    let too_long = pcm16_wav(1, 1000, &vec![100; 61_000]);
    let mut truncated = pcm16_wav(1, 16000, &tone(200.0, 0.1, 16000));
    truncated.truncate(truncated.len() - 101);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", noise, "not a WAV file"),
        ("no body", Vec::new(), "not a WAV file"),
        (
            "32-bit float",
            float_wav,
            "unsupported sample format: 32-bit float; expected 16-bit PCM",
        ),
        (
            "8-bit",
            eight_bit,
            "unsupported sample format: 8-bit integer PCM",
        ),
        ("empty", pcm16_wav(1, 16000, &[]), "audio is empty"),
        ("3 channels", three_channels, "unsupported channel count: 3"),
        ("61 s", too_long, "audio too long: max 60 s"),
        ("truncated", truncated, "corrupt or truncated"),
    ];
    for (label, body, expected) in cases {
        let (status, json) = post_embed(router(state()), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{label}: {json}");
        let reason = json["error"].as_str().unwrap();
        assert!(
            reason.contains(expected),
            "{label}: {reason:?} lacks {expected:?}"
        );
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let (status, json) = post_embed(router(state()), vec![0; MAX_BODY_BYTES + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["error"], "request body too large: max 16 MiB");
}

#[tokio::test]
async fn unknown_path_is_404() {
    let (status, json) = call(
        router(state()),
        Request::get("/nope").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "not found");
}

#[tokio::test]
async fn latency_knob_delays_every_response() {
    let app = router(AppState::new("x", None, Duration::from_millis(300)).unwrap());
    for req in [
        Request::get("/health").body(Body::empty()).unwrap(),
        Request::get("/nope").body(Body::empty()).unwrap(),
    ] {
        let started = Instant::now();
        let _ = call(app.clone(), req).await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn end_to_end_over_tcp() {
    let server = bind(test_opts()).await.unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let (status, health) = raw_http(addr, "GET", "/health", b"").await;
    assert_eq!(status, 200);
    assert_eq!(health["name"], "demo-ecapa");

    let samples = tone(180.0, 0.75, 16000);
    let stereo: Vec<i16> = samples.iter().flat_map(|&s| [s, s / 3]).collect();
    let (status, json) = raw_http(addr, "POST", "/embed", &pcm16_wav(2, 16000, &stereo)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["duration_s"], 0.75);
    let expected = embed(&stereo, 16000, 2);
    let got = embedding_of(&json);
    assert!(expected.iter().zip(&got).all(|(e, g)| (e - g).abs() < 1e-6));

    stop.send(()).unwrap();
    let outcome = tokio::time::timeout(DEADLINE, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Shutdown);
}

#[tokio::test]
async fn exit_after_returns_exit_requested_with_code() {
    let opts = Options {
        exit_after: Some(0.2),
        exit_code: 7,
        ..test_opts()
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(DEADLINE, serve(opts, std::future::pending()))
        .await
        .expect("exit_after never fired")
        .unwrap();
    assert_eq!(outcome, Outcome::ExitRequested(7));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn startup_delay_postpones_binding() {
    let opts = Options {
        startup_delay_ms: 200,
        ..test_opts()
    };
    let started = Instant::now();
    let _server = bind(opts).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn invalid_durations_are_rejected_not_panicking() {
    for opts in [
        Options {
            exit_after: Some(-1.0),
            ..test_opts()
        },
        Options {
            fail_health_after: Some(f64::NAN),
            ..test_opts()
        },
    ] {
        let err = bind(opts).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}

#[derive(Debug, clap::Parser)]
struct TestCli {
    #[command(flatten)]
    opts: Options,
}

#[test]
fn cli_parses_flags_and_validates_seconds() {
    use clap::CommandFactory;
    TestCli::command().debug_assert();
    let cli = TestCli::try_parse_from([
        "demo",
        "--host=0.0.0.0",
        "--port=0",
        "--fail-health-after=1.5",
        "--exit-after=2",
        "--exit-code=-3",
        "--latency-ms=5",
        "--startup-delay-ms=6",
        "--name=tier-b",
    ])
    .unwrap();
    let o = cli.opts;
    assert_eq!(o.host.to_string(), "0.0.0.0");
    assert_eq!(o.port, 0);
    assert_eq!(o.fail_health_after, Some(1.5));
    assert_eq!(o.exit_after, Some(2.0));
    assert_eq!(o.exit_code, -3);
    assert_eq!((o.latency_ms, o.startup_delay_ms), (5, 6));
    assert_eq!(o.name, "tier-b");
    assert!(TestCli::try_parse_from(["demo", "--exit-after=-1"]).is_err());
    assert!(TestCli::try_parse_from(["demo", "--fail-health-after=soon"]).is_err());
}

#[test]
fn port_env_fallback() {
    assert_eq!(port_or_default(None), DEFAULT_PORT);
    assert_eq!(port_or_default(Some("9090")), 9090);
    assert_eq!(port_or_default(Some("not-a-port")), DEFAULT_PORT);
}

#[tokio::test]
async fn echo_answers_the_request_it_received_with_hop_by_hop_headers_of_its_own() {
    let req = Request::post("/echo?a=1")
        .header("x-trace", "one")
        .header("x-trace", "two")
        .body(Body::from("12345"))
        .unwrap();
    let resp = router(state()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for (name, value) in ECHO_HOP_BY_HOP {
        assert_eq!(resp.headers()[name], value);
    }
    assert_eq!(resp.headers()["x-echo"], "1");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo");
    assert_eq!(json["query"], "a=1");
    assert_eq!(json["body_bytes"], 5);
    assert_eq!(
        json["headers"]["x-trace"],
        serde_json::json!(["one", "two"])
    );
}

#[tokio::test]
async fn a_held_stream_sends_its_first_chunk_and_the_rest_only_after_release() {
    use http_body_util::BodyExt;
    let app = router(state());
    let resp = app
        .clone()
        .oneshot(
            Request::get("/stream?chunks=3&hold=true")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("the first chunk comes at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk 1 of 3\n");
    // Nothing more comes while the stream is held.
    let next = body.frame();
    tokio::pin!(next);
    assert!(futures_util::poll!(next.as_mut()).is_pending());

    let (status, released) = call(
        app,
        Request::post("/stream/release")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(released["released"], 1);
    let second = tokio::time::timeout(DEADLINE, next)
        .await
        .expect("released")
        .unwrap()
        .unwrap();
    assert_eq!(second.into_data().unwrap(), "chunk 2 of 3\n");
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "chunk 3 of 3\n");
}

#[tokio::test]
async fn bad_stream_parameters_get_a_400_naming_them() {
    for (query, expected) in [
        ("chunks=0", "chunks must be between 1 and 1000, got 0"),
        ("gap_ms=60001", "gap_ms must be at most 60000, got 60001"),
        ("chunks=x", "chunks"),
        ("speed=2", "speed"),
    ] {
        let (status, json) = call(
            router(state()),
            Request::get(format!("/stream?{query}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(
            json["error"].as_str().is_some_and(|e| e.contains(expected)),
            "{query}: {json}"
        );
    }
}
