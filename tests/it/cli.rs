//! The client commands against no cascade (they say they cannot reach it
//! and exit 69, EX_UNAVAILABLE), one that never answers (they give up in
//! seconds), and odd replies (reported by their HTTP status).

use crate::support::{ConfigFile, FakeServer, cli, free_port, state_dir_for};

#[tokio::test]
async fn status_without_a_running_cascade_exits_69() {
    let port = free_port();
    let config = ConfigFile::new(&format!("[api]\nlisten = \"127.0.0.1:{port}\"\n"));
    let state = config.dir.path().join("empty-state");
    std::fs::create_dir(&state).expect("create an empty state dir");

    let out = cli(
        &[
            "status",
            "--state-dir",
            state.to_str().expect("UTF-8"),
            "--config",
            config.path_str(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(69), "{}", out.describe());
    assert!(
        out.stderr.contains("cannot reach cascade"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port}")),
        "{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
}

#[tokio::test]
async fn restart_without_a_running_cascade_exits_69() {
    let port = free_port();
    let config = ConfigFile::new(&format!("[api]\nlisten = \"127.0.0.1:{port}\"\n"));
    let state = config.dir.path().join("empty-state");
    std::fs::create_dir(&state).expect("create an empty state dir");

    let out = cli(
        &[
            "restart",
            "local",
            "--state-dir",
            state.to_str().expect("UTF-8"),
            "--config",
            config.path_str(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(69), "{}", out.describe());
}

#[tokio::test]
async fn restart_gives_up_in_seconds_on_an_api_that_never_answers() {
    let silent = FakeServer::start(None);
    let root = tempfile::tempdir().expect("temp dir");
    let state = state_dir_for(root.path(), silent.addr, "t");
    let started = std::time::Instant::now();
    let out = cli(
        &[
            "restart",
            "local",
            "--state-dir",
            state.to_str().expect("UTF-8"),
        ],
        &[],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(69), "{}", out.describe());
    assert!(
        out.stderr.contains("no answer in time"),
        "{}",
        out.describe()
    );
    // Before, it waited the whole restart budget (50 s by default).
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
}

#[tokio::test]
async fn replies_without_a_body_are_reported_by_their_status() {
    for (reply, expected) in [
        (
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "answered HTTP 404: Not Found",
        ),
        (
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "answered HTTP 431: Request Header Fields Too Large",
        ),
        (
            "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 9\r\nconnection: close\r\n\r\nupstream!",
            "answered HTTP 502: upstream!",
        ),
    ] {
        let server = FakeServer::start(Some(reply));
        let root = tempfile::tempdir().expect("temp dir");
        let state = state_dir_for(root.path(), server.addr, "t");
        let state = state.to_str().expect("UTF-8");
        for args in [
            vec!["status", "--state-dir", state],
            vec!["restart", "local", "--dry-run", "--state-dir", state],
        ] {
            let out = cli(&args, &[]).await;
            assert_eq!(out.code, Some(1), "{args:?}: {}", out.describe());
            assert!(
                out.stderr.contains(expected),
                "{args:?}: {}",
                out.describe()
            );
        }
    }
}
