//! The client commands when no cascade is running: they must say they cannot
//! reach it and exit 69 (EX_UNAVAILABLE).

use crate::support::{ConfigFile, cli, free_port};

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
