//! SIGHUP: a valid change is applied to the tiers it touches; an invalid one is refused.

use crate::support::{Cascade, SHORT, Setup, Signal, backend_pid, wait_gone};

/// Polls cascade's log until it contains `needle`.
async fn wait_log(cascade: &Cascade, needle: &str) {
    let found = crate::support::poll(SHORT, async || {
        if cascade.logs().contains(needle) {
            Ok(())
        } else {
            Err(format!("no {needle:?} in the log yet"))
        }
    })
    .await;
    cascade.or_fail(found, &format!("{needle:?} in the log"), SHORT);
}

/// `[tiers.local]` is the last table the harness writes, so a line appended
/// to the file belongs to it.
fn add_local_line(line: &'static str) -> impl FnOnce(String) -> String {
    move |text| format!("{text}\n{line}\n")
}

/// Waits until the local tier runs a backend other than `old`, healthy and
/// active; returns the new pid.
async fn wait_new_backend(cascade: &Cascade, old: i32) -> i32 {
    let tier = cascade
        .wait_local("a new, healthy local backend", SHORT, |t| {
            t["state"] == "healthy"
                && t["active"] == true
                && backend_pid(t).is_some_and(|pid| pid != old)
        })
        .await;
    backend_pid(&tier).expect("checked above")
}

#[tokio::test]
async fn a_changed_tier_is_restarted_with_its_new_settings() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let before = cascade.wait_backend_pid().await;

    cascade.edit_config(add_local_line("env = { RELOADED = \"1\" }"));
    cascade.signal(Signal::Hup);

    wait_log(
        &cascade,
        "configuration reloaded: local restarted (changed)",
    )
    .await;
    let after = wait_new_backend(&cascade, before).await;
    assert_ne!(after, before);
    wait_gone(before, SHORT, "the old backend to be stopped").await;
    let environ = std::fs::read(format!("/proc/{after}/environ")).unwrap_or_default();
    assert!(
        environ.split(|&b| b == 0).any(|var| var == b"RELOADED=1"),
        "the new backend runs with the reloaded env"
    );
    cascade.wait_readyz(200, SHORT).await;
}

#[tokio::test]
async fn a_change_that_does_not_touch_the_tier_keeps_its_backend() {
    let cascade = Cascade::start_ready(Setup::default()).await;
    let before = cascade.wait_backend_pid().await;

    cascade.edit_config(|text| {
        text.replacen(
            "order = [\"local\"]\n",
            "order = [\"local\"]\nfailback_after = \"5s\"\n",
            1,
        )
    });
    cascade.signal(Signal::Hup);

    wait_log(
        &cascade,
        "configuration reloaded: tiers unchanged; waterfall settings changed",
    )
    .await;
    let tier = cascade.local().await;
    assert_eq!(
        backend_pid(&tier),
        Some(before),
        "backend untouched: {tier}"
    );
    assert_eq!(tier["state"], "healthy", "{tier}");
    assert_eq!(tier["active"], true, "{tier}");
    assert_eq!(tier["actor_restarts"], 0, "{tier}");
}

#[tokio::test]
async fn an_invalid_change_is_refused_and_a_later_valid_one_applies() {
    let mut cascade = Cascade::start_ready(Setup::default()).await;
    let before = cascade.wait_backend_pid().await;
    let valid = std::fs::read_to_string(&cascade.config_path).expect("read the config file");

    cascade.edit_config(add_local_line("reload_bogus_key = 1"));
    cascade.signal(Signal::Hup);

    wait_log(&cascade, "Configuration reload refused").await;
    let logs = cascade.logs();
    assert!(
        logs.contains("tiers.local.reload_bogus_key"),
        "the refusal names the key:\n{}",
        cascade.log_tail()
    );
    assert!(cascade.try_exit().is_none(), "cascade keeps running");
    cascade.wait_readyz(200, SHORT).await;
    assert_eq!(
        backend_pid(&cascade.local().await),
        Some(before),
        "the running backend is kept"
    );

    cascade.edit_config(|_| format!("{valid}\nenv = {{ RELOADED = \"2\" }}\n"));
    cascade.signal(Signal::Hup);
    wait_log(
        &cascade,
        "configuration reloaded: local restarted (changed)",
    )
    .await;
    wait_new_backend(&cascade, before).await;
    cascade.wait_readyz(200, SHORT).await;
}
