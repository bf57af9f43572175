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

#[tokio::test]
async fn requests_survive_the_docker_tier_dying_under_load() {
    use crate::docker::{IMAGE, ONE_AT_A_TIME, Removed, docker, engine, setup};
    if !engine() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("cascade-it-router-{}", std::process::id());
    // A tag of its own, so removing it keeps the docker tier from coming back.
    let image = format!("cascade-demo:it-router-{}", std::process::id());
    docker(&["tag", IMAGE, &image]);
    let _removed = Removed(name.clone());
    let mut slow = setup(&name, &image, crate::support::free_port(), false);
    // Every request takes 300 ms, so requests are in flight when the
    // container dies, however loaded the machine is.
    slow.extra = slow.extra.replace(
        "USER_ID = \"1000\"",
        "USER_ID = \"1000\", DEMO_LATENCY_MS = \"300\"",
    );
    assert!(slow.extra.contains("DEMO_LATENCY_MS"), "{}", slow.extra);
    let cascade = Cascade::start(slow).await;
    wait_for(Duration::from_secs(60), "docker active", async || {
        let s = cascade.status().await;
        if s["active"] == "docker" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let router = cascade.router_addr().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = embed_load(router, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

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
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut seen = Seen::new();
    for worker in load {
        seen.extend(worker.await.expect("a load worker"));
    }
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
        "no request was retried onto local: {seen:?}"
    );
    let status = cascade.status().await;
    let last = &status["router"]["last_retried_failover"];
    assert_eq!(last["from"], "docker", "{status}");
    assert_eq!(last["to"], "local", "{status}");
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
