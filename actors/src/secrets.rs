//! What is secret, decided in one place. Everything cascade shows — logs,
//! `/status`, `/events`, restart plans, `check-config`, error messages —
//! goes through these functions before a configured value reaches a person.
//!
//! The rules:
//! - every value of a backend's environment (`env`) is secret: that is where
//!   services take their credentials, and their names are no reliable guide
//!   (`DATABASE_URL`, `HF_HUB_…`, `SENTRY_DSN`);
//! - a value whose name (config key, env variable, header, label, `--flag`,
//!   query parameter) contains token, secret, password, passwd, credential,
//!   key, auth, cookie, session, private or signature is secret, except names
//!   of files, paths and directories (`credentials_file` names where a
//!   secret is, it is not one);
//! - the user part of a URL (`user:password@`) is secret wherever the URL
//!   appears, and so are query parameters named like secrets;
//! - a webhook URL is secret as a whole (for Slack or Discord the URL *is*
//!   the credential), so logs show URLs as scheme and host only.
//!
//! Invariant: pure functions, no I/O; a value that cannot be judged (a URL
//! that does not parse) is treated as secret.

use std::borrow::Cow;

use serde_json::Value as Json;

/// What a hidden value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Parts of a name that make its value a credential's.
const SECRET_WORDS: [&str; 11] = [
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "key",
    "auth",
    "cookie",
    "session",
    "private",
    "signature",
];

/// Endings that make a name refer to where a secret is stored rather than
/// the secret itself.
const LOCATION_SUFFIXES: [&str; 3] = ["file", "path", "dir"];

/// Configuration keys named like secrets that hold something else, as
/// dotted paths: `tiers.cloud_run.auth` chooses how probes authenticate
/// (`id_token` or `none`).
const NOT_SECRET_KEYS: [&str; 1] = ["tiers.cloud_run.auth"];

/// Whether the value of something called `name` (an env variable, header,
/// config key, label, command-line flag or query parameter) is a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let lower = lower.trim_start_matches('-');
    if LOCATION_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
        return false;
    }
    SECRET_WORDS.iter().any(|w| lower.contains(w))
}

/// Whether the configuration value at `path` (key names from the root, array
/// indices left out) is secret or may hold secrets beneath it: a key named
/// like a secret, anything in an `env` table, command arguments, a webhook
/// URL. Problems about such a value never quote it; unlike
/// [`redact_config`], no key is exempt here (a mode named `auth` holds no
/// secret when valid, but a wrong value there may well be a token).
pub fn is_secret_key<S: AsRef<str>>(path: &[S]) -> bool {
    let mut parent = "";
    for name in path {
        let name = name.as_ref();
        let secret = match name {
            "env" | "args" | "command" => true,
            "url" => parent == "webhook",
            _ => is_secret_name(name),
        };
        if secret {
            return true;
        }
        parent = name;
    }
    false
}

/// A backend environment value as it may be shown: never the value.
pub fn env_value(value: &str) -> &'static str {
    if value.is_empty() { "" } else { REDACTED }
}

/// A URL as logs may show it: scheme, host and port, nothing else (no user,
/// password, path or query, any of which can carry a credential).
pub fn url_for_logs(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}", parsed.scheme()),
            (None, _) => format!("{}:{REDACTED}", parsed.scheme()),
        },
        Err(_) => REDACTED.to_owned(),
    }
}

/// A webhook URL as configuration output shows it: scheme and host, the rest
/// hidden (the path is the credential).
pub fn webhook_url(url: &str) -> String {
    let shown = url_for_logs(url);
    if shown == REDACTED {
        shown
    } else {
        format!("{shown}/{REDACTED}")
    }
}

/// `text` with the secrets inside every URL it contains hidden: the user
/// part (`user:password@`) and query parameters named like secrets. The rest
/// of the text is kept, so error messages stay readable.
pub fn scrub(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = at + "://".len();
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after.find(url_end).unwrap_or(after.len());
        out.push_str(&scrub_url_tail(&after[..end]));
        rest = &after[end..];
    }
    out.push_str(rest);
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

/// Where a URL ends inside free text.
fn url_end(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | ')' | ']' | '}' | ',')
}

/// Everything of a URL after `scheme://`, with its secrets hidden.
fn scrub_url_tail(tail: &str) -> String {
    let authority_end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
    let (authority, path) = tail.split_at(authority_end);
    let mut out = match authority.rfind('@') {
        Some(at) => format!("{REDACTED}@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    match path.split_once('?') {
        Some((before, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            out.push_str(before);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, value)) if is_secret_name(name) && !value.is_empty() => {
                        format!("{name}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
        }
        None => out.push_str(path),
    }
    out
}

/// Command-line arguments as they may be shown: the value of a secret flag
/// (`--api-key=…`, `--token …`) or assignment (`API_KEY=…`) hidden, and
/// URLs scrubbed. Arguments holding several words (`sh -c "…"`) are judged
/// word by word.
pub fn args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for arg in args {
        if hide_next && !arg.starts_with('-') {
            out.push(REDACTED.to_owned());
            hide_next = false;
            continue;
        }
        let (shown, next) = words(arg);
        out.push(shown);
        hide_next = next;
    }
    out
}

/// `program` and `args` as one line for logs and plans.
pub fn command_line(program: &str, arguments: &[String]) -> String {
    let mut line = scrub(program).into_owned();
    for arg in args(arguments) {
        line.push(' ');
        line.push_str(&arg);
    }
    line
}

/// One argument judged word by word; the flag says whether the next word
/// (in the next argument) is a secret flag's value.
fn words(arg: &str) -> (String, bool) {
    let mut out = String::with_capacity(arg.len());
    let mut hide_next = false;
    let mut rest = arg;
    while !rest.is_empty() {
        let space = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..space]);
        rest = &rest[space..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        if hide_next && !word.starts_with('-') {
            out.push_str(REDACTED);
            hide_next = false;
            continue;
        }
        hide_next = false;
        out.push_str(&word_shown(word, &mut hide_next));
    }
    (out, hide_next)
}

fn word_shown(word: &str, hide_next: &mut bool) -> String {
    // `--name=value`, `NAME=value`, `-H Authorization:…` style assignments.
    if let Some((name, value)) = word.split_once('=')
        && !name.contains("://")
        && !value.is_empty()
        && is_secret_name(name.trim_start_matches(['-', '"', '\'']))
    {
        // Shell punctuation after the value (`A=b; next`) is not the value.
        let kept = value.len() - value.trim_end_matches([';', '&', '|', ')']).len();
        return format!("{name}={REDACTED}{}", &value[value.len() - kept..]);
    }
    if let Some(flag) = word.strip_prefix('-')
        && is_secret_name(flag)
    {
        *hide_next = true;
        return word.to_owned();
    }
    // `Authorization: Bearer …` as a header argument.
    if let Some((name, value)) = word.split_once(':')
        && !value.starts_with("//")
        && !value.is_empty()
        && is_secret_name(name)
    {
        return format!("{name}:{REDACTED}");
    }
    scrub(word).into_owned()
}

/// Hides every secret in a configuration tree (serialized with serde), for
/// `check-config` and anything else that prints configuration: the values
/// of keys named like secrets (every string beneath them, keeping the
/// shape so the output still parses), every `env` value, webhook URLs,
/// command arguments, and the secrets inside every other URL.
pub fn redact_config(value: &mut Json) {
    redact_at(value, &mut Vec::new());
}

fn redact_at(value: &mut Json, path: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, child) in map.iter_mut() {
                path.push(key.clone());
                let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
                if key == "env" && child.is_object() {
                    hide_all(child);
                } else if key == "url" && parent == Some("webhook") {
                    if let Json::String(url) = child {
                        *url = webhook_url(url);
                    }
                } else if (key == "args" || key == "command") && child.is_array() {
                    redact_args_json(child);
                } else if is_secret_name(key) && !NOT_SECRET_KEYS.contains(&path.join(".").as_str())
                {
                    hide_all(child);
                } else {
                    redact_at(child, path);
                }
                path.pop();
            }
        }
        Json::Array(items) => {
            for item in items {
                redact_at(item, path);
            }
        }
        Json::String(text) => {
            if let Cow::Owned(scrubbed) = scrub(text) {
                *text = scrubbed;
            }
        }
        Json::Null | Json::Bool(_) | Json::Number(_) => {}
    }
}

/// Replaces every non-empty leaf beneath `value`, keeping tables and arrays.
fn hide_all(value: &mut Json) {
    match value {
        Json::Object(map) => map.values_mut().for_each(hide_all),
        Json::Array(items) => items.iter_mut().for_each(hide_all),
        Json::String(s) if s.is_empty() => {}
        Json::Null => {}
        leaf => *leaf = Json::String(REDACTED.to_owned()),
    }
}

fn redact_args_json(value: &mut Json) {
    let Json::Array(items) = value else {
        return;
    };
    let texts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    for (item, shown) in items.iter_mut().zip(args(&texts)) {
        if let Json::String(s) = item {
            *s = shown;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_that_hold_credentials_are_secret_in_any_case() {
        for name in [
            "API_KEY",
            "APIKEY",
            "OPENAI_API_KEY",
            "PRIVATE_KEY",
            "PASSWD",
            "AUTH",
            "SESSION_COOKIE",
            "HF_TOKEN",
            "DB_PASSWORD",
            "client_secret",
            "Authorization",
            "X-Api-Key",
            "--access-token",
            "aws_credentials",
            "signature",
        ] {
            assert!(is_secret_name(name), "{name} should be secret");
        }
        assert!(is_secret_key(&[
            "telemetry",
            "secret_headers",
            "authorization"
        ]));
        assert!(is_secret_key(&["tiers", "local", "env", "LOG_LEVEL"]));
        assert!(is_secret_key(&["tiers", "docker", "webhook", "url"]));
        assert!(is_secret_key(&["tiers", "cloud_run", "auth"]));
        assert!(!is_secret_key(&["tiers", "cloud_run", "url"]));
        assert!(!is_secret_key(&["tiers", "local", "port"]));
        for name in [
            "LOG_LEVEL",
            "USER_ID",
            "port",
            "health_path",
            "credentials_file",
            "KEY_FILE",
            "--tls-key-path",
        ] {
            assert!(!is_secret_name(name), "{name} should not be secret");
        }
    }

    #[test]
    fn logs_see_scheme_and_host_only() {
        assert_eq!(
            url_for_logs("https://hooks.slack.com/services/T0/B0/XXXX"),
            "https://hooks.slack.com"
        );
        assert_eq!(
            url_for_logs("http://user:pa55@collector:4318/v1?token=x"),
            "http://collector:4318"
        );
        assert_eq!(url_for_logs("not a url pa55"), REDACTED);
        assert_eq!(
            webhook_url("https://discord.com/api/webhooks/1/abc"),
            "https://discord.com/<redacted>"
        );
    }

    #[test]
    fn urls_in_text_lose_their_user_part_and_secret_parameters() {
        assert_eq!(
            scrub("cannot reach postgres://app:pa55@db:5432/x (refused)"),
            "cannot reach postgres://<redacted>@db:5432/x (refused)"
        );
        assert_eq!(
            scrub("GET https://h/p?a=1&api_key=k3y&b=2#f"),
            "GET https://h/p?a=1&api_key=<redacted>&b=2#f"
        );
        assert_eq!(
            scrub("https://ghp_t0ken@github.com/x"),
            "https://<redacted>@github.com/x"
        );
        assert!(matches!(scrub("no urls here"), Cow::Borrowed(_)));
        assert!(matches!(scrub("http://plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn secret_arguments_are_hidden_and_the_rest_kept() {
        let given: Vec<String> = [
            "--port",
            "8701",
            "--api-key=k3y",
            "--token",
            "t0k",
            "--db",
            "postgres://u:pa55@h/db",
            "OPENAI_API_KEY=sk-1",
            "-c",
            "export HF_TOKEN=hf1; serve --password pw1 --verbose",
        ]
        .map(String::from)
        .into();
        let shown = args(&given);
        let line = shown.join(" ");
        for secret in ["k3y", "t0k", "pa55", "sk-1", "hf1", "pw1"] {
            assert!(!line.contains(secret), "{secret} leaked: {line}");
        }
        assert_eq!(shown[0..2], ["--port", "8701"]);
        assert_eq!(shown[2], "--api-key=<redacted>");
        assert_eq!(shown[4], REDACTED);
        assert_eq!(
            shown[9],
            "export HF_TOKEN=<redacted>; serve --password <redacted> --verbose"
        );
        assert!(line.contains("--verbose"));
        assert_eq!(
            command_line("/bin/serve", &["--key".into(), "k".into()]),
            "/bin/serve --key <redacted>"
        );
    }

    #[test]
    fn a_configuration_tree_keeps_its_shape_and_loses_its_secrets() {
        let mut tree = json!({
            "telemetry": {
                "otlp_endpoint": "https://u:otlp-pw@collector:4318",
                "secret_headers": { "authorization": "Bearer hdr-secret" },
            },
            "tiers": {
                "cloud_run": { "auth": "id_token", "credentials_file": "/etc/key.json" },
                "local": {
                    "env": { "LOG_LEVEL": "debug", "EMPTY": "" },
                    "args": ["--token", "arg-secret", "--port", "1"],
                    "port": 1,
                },
                "docker": {
                    "webhook": { "url": "https://hooks.slack.com/services/hook-secret" },
                    "containers": [{ "env": { "PASSWD": "pw" }, "command": ["--key=c-secret"] }],
                },
            },
        });
        redact_config(&mut tree);
        let text = tree.to_string();
        for secret in [
            "otlp-pw",
            "hdr-secret",
            "debug",
            "arg-secret",
            "hook-secret",
            "\"pw\"",
            "c-secret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(tree["tiers"]["cloud_run"]["auth"], "id_token");
        assert_eq!(
            tree["tiers"]["cloud_run"]["credentials_file"],
            "/etc/key.json"
        );
        assert_eq!(tree["tiers"]["local"]["env"]["EMPTY"], "");
        assert_eq!(tree["tiers"]["local"]["port"], 1);
        assert_eq!(
            tree["telemetry"]["secret_headers"]["authorization"],
            REDACTED
        );
        assert_eq!(
            tree["tiers"]["docker"]["webhook"]["url"],
            "https://hooks.slack.com/<redacted>"
        );
        assert_eq!(
            tree["telemetry"]["otlp_endpoint"],
            "https://<redacted>@collector:4318"
        );
    }
}
