//! What the Google Cloud tiers (`cloud_run`, `gcp_vm`) share: where
//! credentials come from, which endpoints may receive them, and how a
//! `Retry-After` header is read.
//!
//! Credentials travel only over TLS or to loopback: every URL that receives
//! one (the Cloud Run service, the Cloud Run Admin API, Compute Engine, a key
//! file's `token_uri`) must be `https://`, or `http://` to a loopback
//! address (the local fake). The metadata server is the exception Google
//! makes itself: it is plain HTTP on a link-local address and receives no
//! credential, it hands them out.
//!
//! Invariant: only the process reads the environment, in
//! [`GcpEnv::from_env`] (when it builds tier specs: at start and on reload);
//! drivers take a `GcpEnv` value, so tests point them at a fake metadata
//! server without touching environment variables.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Where Google credentials come from, read from the environment by the
/// process and passed in, so tests point the driver at a fake without
/// touching environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcpEnv {
    /// `GCE_METADATA_HOST`: `host[:port]` of the metadata server; else
    /// `metadata.google.internal`.
    pub metadata_host: Option<String>,
    /// `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key file.
    pub credentials_file: Option<PathBuf>,
}

impl GcpEnv {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        GcpEnv {
            metadata_host: var("GCE_METADATA_HOST"),
            credentials_file: var("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from),
        }
    }

    /// `host[:port]` of the metadata server.
    pub fn metadata_host(&self) -> &str {
        self.metadata_host
            .as_deref()
            .unwrap_or("metadata.google.internal")
    }
}

/// Why `url` may not receive a credential, if it may not: not an http(s) URL
/// with a host, credentials in the URL itself, or plain `http://` to a host
/// that is not loopback. `what` names what is sent (`an ID token`, `an
/// access token`, `a signed assertion`).
pub fn credential_url_problem(url: &str, what: &str) -> Option<String> {
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(e) => return Some(format!("is not a URL: {e}")),
    };
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Some("must be an http(s) URL with a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some(format!(
            "must not hold a user or password: requests carry {what}"
        ));
    }
    if parsed.scheme() == "http" && !is_loopback(&parsed) {
        return Some(format!(
            "must use https: requests carry {what} (plain http is allowed only for loopback)"
        ));
    }
    None
}

/// Whether the URL's host is `localhost` or a loopback address.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The key file's `token_uri`, if it has one, checked before any signed
/// assertion is posted there.
pub fn check_token_uri(key: &serde_json::Value) -> Result<(), String> {
    match key.get("token_uri") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(uri)) => {
            match credential_url_problem(uri, "a signed assertion") {
                None => Ok(()),
                Some(problem) => Err(format!(
                    "token_uri {} {problem}",
                    crate::secrets::url_for_logs(uri)
                )),
            }
        }
        Some(_) => Err("token_uri is not a string".into()),
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3, all
/// three date formats, years 1970 to 9999); a date in the past is zero.
/// Anything else is a broken header and reads as absent.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_over_tls_or_to_loopback() {
        for ok in [
            "https://compute.googleapis.com",
            "https://run.googleapis.com/",
            "http://127.0.0.1:8080",
            "http://127.0.0.53",
            "http://localhost:9000",
            "http://LOCALHOST",
            "http://[::1]:8080/token",
        ] {
            assert_eq!(credential_url_problem(ok, "a token"), None, "{ok}");
        }
        for (bad, expected) in [
            ("http://compute.googleapis.com", "must use https"),
            ("http://10.0.0.5:8080", "must use https"),
            ("http://localhost.evil.example", "must use https"),
            ("http://127.0.0.1.nip.io", "must use https"),
            ("ftp://127.0.0.1", "http(s) URL"),
            ("compute.googleapis.com", "not a URL"),
            ("https://user:pw@compute.googleapis.com", "user or password"),
        ] {
            let problem = credential_url_problem(bad, "a token").unwrap_or_default();
            assert!(problem.contains(expected), "{bad}: {problem}");
        }
        assert_eq!(check_token_uri(&serde_json::json!({})), Ok(()));
        assert_eq!(
            check_token_uri(
                &serde_json::json!({"token_uri": "https://oauth2.googleapis.com/token"})
            ),
            Ok(())
        );
        let error =
            check_token_uri(&serde_json::json!({"token_uri": "http://tokens.example/token?x=1"}))
                .expect_err("plain http elsewhere");
        assert!(error.contains("must use https"), "{error}");
        assert!(
            !error.contains("x=1"),
            "only scheme and host are shown: {error}"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, at - Duration::from_secs(90)),
                Some(Duration::from_secs(90)),
                "{date:?}"
            );
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at + Duration::from_secs(5)),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            parse_retry_after(" 120 ", SystemTime::now()),
            Some(Duration::from_secs(120))
        );
        for bad in [
            "",
            "soon",
            "-3",
            "1.5",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 99999999999999 08:49:37 GMT",
            "Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            "Sat, 01 Jan 10000 00:00:00 GMT",
            "Wed, 31 Dec 1969 23:59:59 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, SystemTime::now()), None, "{bad:?}");
        }
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(253_402_300_799))
        );
    }
}
