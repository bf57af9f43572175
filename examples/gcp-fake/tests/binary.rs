//! The `cascade-gcp-fake` binary as a person runs it: `--help` lists every fault knob,
//! `--port-base` puts every listener on a fixed port, it prints a cascade configuration for
//! those ports, and the control endpoint turns faults on and off over HTTP.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_cascade-gcp-fake");

/// Kills and reaps the fake when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A base port whose next seven ports were all free a moment ago (below the ephemeral range).
fn free_base() -> u16 {
    let offset = (std::process::id() % 1000) as u16 * 7;
    (0..1000u16)
        .map(|i| 21_000 + (offset + i * 7) % 9_000)
        .find(|base| (0..7).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .expect("seven free ports in a row")
}

/// Starts the fake on `base` and returns it with everything it printed up to "Ctrl-C".
fn start(base: u16) -> (Running, String) {
    let mut child = Command::new(BIN)
        .args([
            "--port-base",
            &base.to_string(),
            "--operation-delay-ms",
            "50",
        ])
        .args(["--boot-delay-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cascade-gcp-fake");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("Ctrl-C");
            printed.push_str(&line);
            printed.push('\n');
            if done {
                let _ = tx.send(printed);
                return;
            }
        }
        let _ = tx.send(printed);
    });
    let printed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the fake prints its endpoints");
    assert!(
        printed.contains("Ctrl-C"),
        "the fake stopped early: {printed}"
    );
    (running, printed)
}

#[test]
fn help_lists_every_knob_and_the_port_base() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for knob in [
        "--port-base",
        "/service/fault?status=503&retry_after=5",
        "/service/request-fault",
        "/service/ready?ready=false",
        "/compute/fault?method=compute.instances.insert&status=429&retry_after=5",
        "/compute/operations?complete=false",
        "/compute/preempt?instance=NAME",
        "/compute/preemption-grace",
        "/metadata/fault?status=500",
        "GET /state",
    ] {
        assert!(help.contains(knob), "--help lacks {knob}: {help}");
    }
}

#[tokio::test]
async fn fixed_ports_a_config_to_copy_and_faults_over_http() {
    let base = free_base();
    let (_fake, printed) = start(base);
    let at = |i: u16| format!("http://127.0.0.1:{}", base + i);
    for (what, url) in [
        ("compute endpoint:", at(0)),
        ("cloud run admin:", at(1)),
        ("metadata server:", at(2)),
        ("token endpoint:", format!("{}/token", at(3))),
        ("cloud run service:", at(4)),
        ("control endpoint:", at(5)),
    ] {
        let line = printed
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no `{what}` line: {printed}"));
        assert!(line.contains(&url), "{line} (want {url})");
    }
    // The configuration names the fake's own project, zone, endpoints and VM port.
    for expected in [
        format!("GCE_METADATA_HOST=127.0.0.1:{}", base + 2),
        format!("url = \"{}\"", at(4)),
        format!("endpoint = \"{}\"", at(1)),
        format!("endpoint = \"{}\"", at(0)),
        "project = \"demo-project\"".to_owned(),
        "zone = \"europe-west1-b\"".to_owned(),
        format!("service_port = {}", base + 6),
    ] {
        assert!(printed.contains(&expected), "no `{expected}` in: {printed}");
    }

    let http = reqwest::Client::new();
    let control = at(5);
    let knobs = http.get(&control).send().await.expect("GET /");
    assert_eq!(knobs.status(), 200);
    assert!(
        knobs
            .text()
            .await
            .expect("text")
            .contains("/compute/preempt")
    );

    // A 503 storm with Retry-After, on probes too; then over.
    let set = http
        .post(format!("{control}/service/fault?status=503&retry_after=7"))
        .send()
        .await
        .expect("POST /service/fault");
    assert_eq!(set.status(), 200);
    assert!(
        set.text()
            .await
            .expect("text")
            .contains("503 with Retry-After: 7")
    );
    let probe = http
        .get(format!("{}/health", at(4)))
        .send()
        .await
        .expect("GET the service");
    assert_eq!(probe.status(), 503);
    assert_eq!(probe.headers()["retry-after"], "7");
    let cleared = http
        .delete(format!("{control}/service/fault"))
        .send()
        .await
        .expect("DELETE /service/fault");
    assert_eq!(cleared.status(), 200);
    let probe = http
        .get(format!("{}/health", at(4)))
        .send()
        .await
        .expect("GET the service");
    assert_eq!(
        probe.status(),
        401,
        "a private service again: no ID token, 401"
    );

    // A Compute Engine storm: the API answers 429 with Retry-After.
    let set = http
        .post(format!(
            "{control}/compute/fault?method=compute.instances.list&status=429&retry_after=3"
        ))
        .send()
        .await
        .expect("POST /compute/fault");
    assert_eq!(set.status(), 200, "{:?}", set.text().await);
    let token = http
        .get(format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            at(2)
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("an access token")
        .json::<serde_json::Value>()
        .await
        .expect("JSON");
    let list = http
        .get(format!(
            "{}/compute/v1/projects/demo-project/zones/europe-west1-b/instances",
            at(0)
        ))
        .bearer_auth(token["access_token"].as_str().expect("access_token"))
        .send()
        .await
        .expect("instances.list");
    assert_eq!(list.status(), 429);
    assert_eq!(list.headers()["retry-after"], "3");

    // Metadata failures.
    let set = http
        .post(format!("{control}/metadata/fault?status=500"))
        .send()
        .await
        .expect("POST /metadata/fault");
    assert_eq!(set.status(), 200);
    let token = http
        .get(format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            at(2)
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("a token request");
    assert_eq!(token.status(), 500);

    // Bad input names what is wrong; an unknown VM is a 404.
    let bad = http
        .post(format!("{control}/service/fault?status=abc"))
        .send()
        .await
        .expect("POST");
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.expect("text").contains("`status=abc`"));
    let bad = http
        .post(format!(
            "{control}/compute/fault?method=compute.nothing&status=503"
        ))
        .send()
        .await
        .expect("POST");
    assert_eq!(bad.status(), 400);
    assert!(
        bad.text()
            .await
            .expect("text")
            .contains("compute.instances.insert")
    );
    let missing = http
        .post(format!("{control}/compute/preempt?instance=nope-0"))
        .send()
        .await
        .expect("POST");
    assert_eq!(missing.status(), 404);
}

#[test]
fn the_example_configuration_is_what_the_fake_prints_for_its_port_base() {
    let file = include_str!("../../../config/examples/gcp-fake.toml");
    let printed = cascade_gcp_fake::cascade_config_for_port_base(
        &cascade_gcp_fake::FakeOptions::default(),
        18600,
    );
    assert!(
        file.ends_with(&printed),
        "config/examples/gcp-fake.toml must end with what `--port-base 18600` prints:\n{printed}"
    );
}
