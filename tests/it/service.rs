//! cascade under a service manager: the notify protocol with a real
//! `NOTIFY_SOCKET`, and the units `install-unit` writes.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::support::{BIN, Cascade, Setup, Signal, cli, tool};

/// Messages received on a datagram socket, in order.
fn receive_all(
    socket: &UnixDatagram,
    until: impl Fn(&[String]) -> bool,
    within: Duration,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !until(&got) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out; received so far: {got:?}"
        );
        if let Ok(n) = socket.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                got.push(line.to_owned());
            }
        }
    }
    got
}

fn position(got: &[String], prefix: &str) -> usize {
    got.iter()
        .position(|m| m.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {got:?}"))
}

#[tokio::test]
async fn notify_socket_receives_ready_status_watchdog_and_stopping_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let setup = Setup {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            // 400 ms: cascade pings every 200 ms from its root loop.
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..Setup::default()
    };
    let mut cascade = Cascade::start(setup).await;
    cascade.wait_ready().await;

    let receiving = std::thread::spawn(move || {
        let got = receive_all(
            &socket,
            |got| got.iter().any(|m| m == "STOPPING=1"),
            Duration::from_secs(30),
        );
        (socket, got)
    });
    // Let a few watchdog pings go out after READY, then stop.
    tokio::time::sleep(Duration::from_millis(700)).await;
    cascade.signal(Signal::Term);
    let status = cascade
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("cascade exits");
    assert!(status.success(), "{status}");
    let (_socket, got) = receiving.join().expect("receiver thread");

    let ready = position(&got, "READY=1");
    let status_at = ready + position(&got[ready..], "STATUS=");
    let watchdog = status_at + position(&got[status_at..], "WATCHDOG=1");
    let stopping = position(&got, "STOPPING=1");
    assert!(
        ready < status_at && status_at < watchdog && watchdog < stopping,
        "{got:?}"
    );
    assert!(
        got.iter().any(|m| m == "STATUS=active tier: local"),
        "{got:?}"
    );
    let pings = got.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        pings >= 3,
        "expected regular watchdog pings, got {pings}: {got:?}"
    );
}

#[tokio::test]
async fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cascade.toml");
    std::fs::write(&config, "").expect("config");
    let unit = dir.path().join("cascade.service");
    let out = cli(
        &[
            "install-unit",
            "--systemd",
            "--config",
            config.to_str().unwrap(),
            "--output",
            unit.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let text = std::fs::read_to_string(&unit).expect("unit written");
    assert!(
        text.contains(&format!(
            "ExecStart={BIN} run --config {}",
            config.canonicalize().unwrap().display()
        )),
        "{text}"
    );
    assert!(
        text.contains("Type=notify")
            && text.contains("WatchdogSec=")
            && text.contains("NoNewPrivileges=yes")
    );
    let verify = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[tokio::test]
async fn the_launchd_plist_is_a_valid_property_list() {
    let Some(python) = tool("python3") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cascade.toml");
    std::fs::write(&config, "").expect("config");
    let out = cli(
        &[
            "install-unit",
            "--launchd",
            "--config",
            config.to_str().unwrap(),
            "--output",
            "-",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // An independent parser: Python's plistlib, as launchd's format is defined.
    let check = "import plistlib,sys; d=plistlib.loads(sys.stdin.buffer.read()); \
                 assert d['KeepAlive']=={'SuccessfulExit': False}, d; assert d['ThrottleInterval']==10, d; \
                 print(d['ProgramArguments'][0])";
    let mut child = std::process::Command::new(python)
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(out.stdout.as_bytes())
        .expect("write plist");
    let result = child.wait_with_output().expect("python3 finishes");
    assert!(
        result.status.success(),
        "plistlib rejected it: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&result.stdout).trim(), BIN);
}
