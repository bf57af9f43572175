//! What the Google Cloud tiers (`cloud_run`, `gcp_vm`) share: where
//! credentials come from, and how a `Retry-After` header is read.
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
