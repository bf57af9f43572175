//! How cascade writes errors and durations for people: one way each, so a
//! log line, a status reason and an HTTP error read alike.
//!
//! Invariant: no I/O; pure formatting.

use std::error::Error;
use std::time::Duration;

/// The innermost error of a chain, which is the part worth reading
/// ("Connection refused (os error 111)" rather than "error sending request").
/// Callers name what failed (and where) themselves.
pub fn root_cause(error: &(dyn Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A duration to the millisecond, as humans write it: `1s 500ms`, `150ms`,
/// `5m`; never `799ms 971us 788ns`. Absurd values saturate.
pub fn duration(d: Duration) -> String {
    let ms = d.as_micros().saturating_add(500) / 1000;
    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_to_the_millisecond() {
        assert_eq!(duration(Duration::from_nanos(799_971_788)), "800ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(duration(Duration::ZERO), "0s");
        assert!(!duration(Duration::MAX).is_empty());
    }

    #[test]
    fn the_root_cause_is_the_innermost_error() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::other("connection refused"));
        assert_eq!(root_cause(&error), "connection refused");
    }
}
