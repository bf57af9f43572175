//! Configuration through the binary: `check-config` output and exit codes,
//! problems naming their key and source (file:line, env var), all problems
//! at once, layer precedence, and secret redaction.

use crate::support::{ConfigFile, cli};

/// The 1-based line of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

#[tokio::test]
async fn unknown_key_names_the_key_a_suggestion_and_the_file_line() {
    let text = "[api]\nlisten = \"127.0.0.1:0\"\n\n[tiers.local]\nprot = 1\n";
    let config = ConfigFile::new(text);

    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("tiers.local.prot"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("did you mean `port`?"),
        "{}",
        out.describe()
    );
    let at = format!("{}:{}", config.path_str(), line_of(text, "prot"));
    assert!(
        out.stderr.contains(&at),
        "expected {at}: {}",
        out.describe()
    );
    assert!(
        out.stdout.is_empty(),
        "nothing printed for an invalid config: {}",
        out.describe()
    );
}

#[tokio::test]
async fn parse_problems_are_all_reported_in_one_run() {
    let text = "\
[tiers.local]
prot = 1
port = \"abc\"
crash_loop_cap = -1

[tiers.local.restart]
jitter = \"ful\"
";
    let config = ConfigFile::new(text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    let file = config.path_str();
    for (key, message, needle) in [
        ("tiers.local.prot", "did you mean `port`?", "prot"),
        ("tiers.local.port", "expected u16, found a string", "port ="),
        (
            "tiers.local.crash_loop_cap",
            "expected u32, found -1",
            "crash_loop_cap",
        ),
        (
            "tiers.local.restart.jitter",
            "did you mean `full`?",
            "jitter",
        ),
    ] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no problem reported for {key}: {}", out.describe()));
        assert!(line.contains(message), "{key}: {line}");
        let at = format!("({file}:{})", line_of(text, needle));
        assert!(line.contains(&at), "{key} should point at {at}: {line}");
    }
    assert!(out.stderr.contains("4 problems"), "{}", out.describe());
}

#[tokio::test]
async fn semantic_problems_are_all_reported_in_one_run() {
    let text = "\
[waterfall]
order = [\"local\", \"local\"]
failback_after = \"0s\"

[tiers.local]
health_path = \"health\"
port = 0
";
    let config = ConfigFile::new(text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    for key in [
        "waterfall.order[1]",
        "waterfall.failback_after",
        "tiers.local.health_path",
        "tiers.local.port",
    ] {
        assert!(
            out.stderr.contains(&format!("{key}:")),
            "{key} missing: {}",
            out.describe()
        );
    }
    let port_at = format!("{}:{}", config.path_str(), line_of(text, "port = 0"));
    assert!(out.stderr.contains(&port_at), "{}", out.describe());
}

#[tokio::test]
async fn parse_and_semantic_problems_are_reported_together() {
    let text = "[waterfall]\norder = [\"nowhere\"]\n\n[tiers.local]\nprot = 1\nport = \"abc\"\n";
    let config = ConfigFile::new(text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    for key in ["tiers.local.prot", "tiers.local.port", "waterfall.order[0]"] {
        assert!(
            out.stderr.contains(&format!("{key}:")),
            "{key} missing: {}",
            out.describe()
        );
    }
}

#[tokio::test]
async fn env_var_type_error_names_the_variable() {
    let config = ConfigFile::new("[tiers.local]\nport = 9000\n");
    let out = cli(
        &["check-config", "--config", config.path_str()],
        &[("CASCADE_TIERS__LOCAL__PORT", "abc")],
    )
    .await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("tiers.local.port"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains("environment variable CASCADE_TIERS__LOCAL__PORT"),
        "{}",
        out.describe()
    );
    // The value is not quoted (it could be a secret in the wrong place);
    // the variable's name says where it is.
    assert!(
        out.stderr.contains("expected u16, found a string"),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("abc"), "{}", out.describe());
}

#[tokio::test]
async fn syntax_error_names_the_file_and_line() {
    let config = ConfigFile::new("[api]\nlisten = \"127.0.0.1:0\"\n[tiers.local\nport = 1\n");
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("{}:3", config.path_str())),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn run_with_an_invalid_config_exits_78_without_starting() {
    let config = ConfigFile::new("[api]\nlisten = \"127.0.0.1:0\"\n\n[tiers.local]\nprot = 1\n");
    let state = config.dir.path().join("state");
    let out = cli(
        &[
            "run",
            "--config",
            config.path_str(),
            "--state-dir",
            state.to_str().expect("UTF-8"),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("tiers.local.prot"),
        "{}",
        out.describe()
    );
    assert!(
        !state.join("token").exists(),
        "an invalid config must not start anything"
    );
}

#[tokio::test]
async fn valid_config_prints_the_effective_values_from_every_layer() {
    let text = "\
[general]
state_dir = \"/from/file\"

[tiers.local]
port = 4242
stop_grace = \"750ms\"
crash_loop_cap = 4
";
    let config = ConfigFile::new(text);
    let out = cli(
        &[
            "check-config",
            "--config",
            config.path_str(),
            "--state-dir",
            "/from/flag",
        ],
        &[
            ("CASCADE_TIERS__LOCAL__CRASH_LOOP_CAP", "7"),
            ("CASCADE_GENERAL__STATE_DIR", "/from/env"),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("configuration is valid"),
        "{}",
        out.describe()
    );
    let effective: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    for expected in [
        "port = 4242",                    // file over default
        "stop_grace = \"750ms\"",         // file
        "crash_loop_cap = 7",             // env over file
        "state_dir = \"/from/flag\"",     // flag over env over file
        "health_path = \"/health\"",      // built-in default
        "order = [\"local\"]",            // built-in default
        "min_free_memory = \"64.0 MiB\"", // built-in default
    ] {
        assert!(
            effective.contains(&expected),
            "missing `{expected}`:\n{}",
            out.stdout
        );
    }

    // The printed configuration is itself a valid configuration with the same values.
    let again = ConfigFile::new(&out.stdout);
    let round = cli(&["check-config", "--config", again.path_str()], &[]).await;
    assert_eq!(round.code, Some(0), "{}", round.describe());
    assert_eq!(
        round.stdout, out.stdout,
        "check-config output does not round-trip"
    );
}

#[tokio::test]
async fn every_backend_environment_value_is_redacted() {
    let text = "\
[tiers.local]
env = { HF_TOKEN = \"hf_s3cr3t\", DB_PASSWORD = \"pw-s3cr3t\", CLIENT_SECRET = \"cs-s3cr3t\", API_KEY = \"ak-s3cr3t\", APIKEY = \"ak2-s3cr3t\", OPENAI_API_KEY = \"oa-s3cr3t\", PRIVATE_KEY = \"pk-s3cr3t\", PASSWD = \"pwd-s3cr3t\", AUTH = \"au-s3cr3t\", SESSION_COOKIE = \"sc-s3cr3t\", DATABASE_URL = \"postgres://app:db-s3cr3t@db/x\", LOG_LEVEL = \"debug-s3cr3t\", EMPTY = \"\" }
";
    let config = ConfigFile::new(text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        !out.stdout.contains("s3cr3t") && !out.stderr.contains("s3cr3t"),
        "a secret leaked:\n{}",
        out.describe()
    );
    for key in [
        "HF_TOKEN",
        "DB_PASSWORD",
        "CLIENT_SECRET",
        "API_KEY",
        "APIKEY",
        "OPENAI_API_KEY",
        "PRIVATE_KEY",
        "PASSWD",
        "AUTH",
        "SESSION_COOKIE",
        "DATABASE_URL",
        "LOG_LEVEL",
    ] {
        assert!(
            out.stdout.contains(&format!("{key} = \"<redacted>\"")),
            "{key} not redacted:\n{}",
            out.stdout
        );
    }
    // Nothing to hide in an empty value; the names stay readable.
    assert!(out.stdout.contains("EMPTY = \"\""), "{}", out.stdout);
}

#[tokio::test]
async fn setting_one_restart_key_keeps_the_other_defaults() {
    let defaults = cli(&["check-config"], &[]).await;
    assert_eq!(defaults.code, Some(0), "{}", defaults.describe());
    let restart_table = |text: &str| -> Vec<String> {
        text.split("[tiers.local.restart]")
            .nth(1)
            .unwrap_or_default()
            .lines()
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.trim().is_empty() && !l.starts_with("base"))
            .map(str::to_owned)
            .collect()
    };
    let config = ConfigFile::new("[tiers.local.restart]\nbase = \"20ms\"\n");
    let partial = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(partial.code, Some(0), "{}", partial.describe());
    assert_eq!(
        restart_table(&partial.stdout),
        restart_table(&defaults.stdout)
    );
}

#[tokio::test]
async fn problems_never_quote_a_secret() {
    let text = "\
[telemetry]
secret_headers = \"Bearer hdr-s3cr3t\"
otlp_endpoint = 4318

[tiers.local]
env = { A = 1, B = [\"env-s3cr3t\"] }

[tiers.cloud_run]
url = \"https://run.example\"
auth = \"Bearer auth-s3cr3t\"
";
    let config = ConfigFile::new(text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(!out.stderr.contains("s3cr3t"), "{}", out.describe());
    for key in [
        "telemetry.secret_headers:",
        "tiers.local.env.B:",
        "tiers.cloud_run.auth:",
    ] {
        assert!(out.stderr.contains(key), "{key}: {}", out.describe());
    }
    assert!(
        out.stderr
            .contains("tiers.cloud_run.auth: unknown value; expected `id_token`, `none`"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn thousands_of_problems_are_all_counted_and_reported() {
    let mut text = String::from("[tiers.local]\n");
    for i in 0..3_000 {
        text.push_str(&format!("unknown{i} = 1\n"));
    }
    text.push_str("[tiers.local.probe]\nbogus = 1\n");
    let config = ConfigFile::new(&text);
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("configuration has 3001 problems:"),
        "{}",
        &out.stderr[..out.stderr.len().min(500)]
    );
    let file = config.path_str();
    assert!(
        out.stderr.contains("tiers.local.unknown2999: unknown key;"),
        "the last one is reported too"
    );
    assert!(
        out.stderr.contains(&format!("({file}:3001)")),
        "lines are kept"
    );
    assert!(
        out.stderr.contains("tiers.local.probe.bogus"),
        "other tables too"
    );
}

#[tokio::test]
async fn a_wrongly_typed_key_reports_one_problem_not_its_default_s() {
    let config = ConfigFile::new("[waterfall]\norder = \"local\"\n");
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("configuration has 1 problem:"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains("waterfall.order: expected a sequence, found a string"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn tiers_outside_the_order_are_validated_too() {
    let config = ConfigFile::new(
        "[waterfall]\norder = [\"local\"]\n\n[tiers.cloud_run]\nurl = \"ftp://nope\"\n",
    );
    let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("tiers.cloud_run.url:"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn bytes_that_are_not_toml_are_named_with_their_line() {
    let config = ConfigFile::new("");
    let cases: [(&[u8], &str); 3] = [
        (
            b"[api]\n# a comment \0 here\n",
            ":2: not valid TOML: character U+0000",
        ),
        (
            b"[api]\nlisten = \"127.0.0.1:0\"\n# \xff\xfe\n",
            ":3: not valid TOML: not UTF-8",
        ),
        (
            b"[api]\n\"lis\\u001b[2Jten\" = 1\n",
            "api.lis\\u{1b}[2Jten: unknown key",
        ),
    ];
    for (bytes, expected) in cases {
        std::fs::write(&config.path, bytes).expect("write the config");
        let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
        assert_eq!(out.code, Some(78), "{}", out.describe());
        assert!(
            out.stderr.contains(expected),
            "{expected}: {}",
            out.describe()
        );
        assert!(
            !out.stderr.contains('\u{1b}') && !out.stderr.contains('\0'),
            "a control character reached the terminal: {}",
            out.describe()
        );
    }
}

#[tokio::test]
async fn a_fifo_as_the_configuration_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("cascade.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let out = cli(
        &["check-config", "--config", fifo.to_str().expect("UTF-8")],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(out.stderr.contains("a FIFO"), "{}", out.describe());
}

#[tokio::test]
async fn install_unit_refuses_an_invalid_configuration() {
    let config = ConfigFile::new("[tiers.local]\nprot = 1\n");
    let unit = config.dir.path().join("cascade.service");
    let out = cli(
        &[
            "install-unit",
            "--systemd",
            "--config",
            config.path_str(),
            "--output",
            unit.to_str().expect("UTF-8"),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(78), "{}", out.describe());
    assert!(
        out.stderr.contains("tiers.local.prot"),
        "{}",
        out.describe()
    );
    assert!(!unit.exists(), "a unit was written for an invalid config");
}

#[tokio::test]
async fn every_kind_of_duration_has_a_ceiling() {
    let huge = "\"18446744073709551615s\"";
    for (key, line, limit) in [
        (
            "waterfall.failback_after",
            format!("[waterfall]\nfailback_after = {huge}\n"),
            "7days",
        ),
        (
            "tiers.local.stop_grace",
            format!("[tiers.local]\nstop_grace = {huge}\n"),
            "1h",
        ),
        (
            "tiers.local.start_timeout",
            "[tiers.local]\nstart_timeout = \"2h\"\n".to_owned(),
            "1h",
        ),
        (
            "tiers.local.probe.interval",
            format!("[tiers.local.probe]\ninterval = {huge}\n"),
            "7days",
        ),
        (
            "supervisor.restart_backoff.cap",
            "[supervisor.restart_backoff]\ncap = \"8d\"\n".to_owned(),
            "7days",
        ),
        (
            "tiers.docker.containers[0].stop_timeout",
            format!(
                "[[tiers.docker.containers]]\nname = \"a\"\nimage = \"i\"\nstop_timeout = {huge}\n"
            ),
            "1h",
        ),
    ] {
        let config = ConfigFile::new(&line);
        let out = cli(&["check-config", "--config", config.path_str()], &[]).await;
        assert_eq!(out.code, Some(78), "{key}: {}", out.describe());
        let expected = format!("{key}: must be at most {limit}");
        assert!(
            out.stderr.contains(&expected),
            "{expected}: {}",
            out.describe()
        );
    }
}

#[tokio::test]
async fn the_unit_waits_longer_than_cascade_takes_to_stop() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/gcp-waterfall.toml"
    );
    let out = cli(
        &[
            "install-unit",
            "--systemd",
            "--config",
            example,
            "--output",
            "-",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let secs: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no TimeoutStopSec in seconds:\n{}", out.stdout));
    // The example's tiers stop within 15s + 5s + 10s + 2m of grace, one
    // after another, and cascade adds its own margins on top.
    assert!(
        secs > 150,
        "TimeoutStopSec={secs}s would cut a clean stop short"
    );
    assert!(
        out.stdout
            .contains("\nDocumentation=http://127.0.0.1:7373/\n"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("github.com"), "{}", out.stdout);
}
