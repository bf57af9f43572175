//! Serving an axum router on a listener such that stopping the server (aborting its task) also
//! closes every connection it accepted — unlike `axum::serve`, whose connection tasks outlive it —
//! so a deleted VM or a dropped fake really stops answering, even on pooled keep-alive
//! connections. Also the timestamp formats Google uses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::warn;

/// Serves `router` on `listener` until the returned future is dropped; dropping it drops every
/// open connection too.
pub(crate) async fn serve(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = TowerToHyperService::new(router.clone());
                    connections.spawn(async move {
                        // A client hanging up mid-request is not the fake's problem.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(error) => {
                    warn!(%error, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Seconds since the Unix epoch, wall clock.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// RFC 3339 the way Compute Engine writes it: milliseconds and a -07:00 offset
/// ("2026-11-22T09:03:04.123-07:00"), so clients that assume "Z" get caught.
pub(crate) fn compute_timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let shifted = since.saturating_sub(Duration::from_secs(7 * 3600));
    format!(
        "{}.{:03}-07:00",
        civil(shifted.as_secs()),
        since.subsec_millis()
    )
}

/// RFC 3339 in UTC with microseconds, the way Cloud Run writes it.
pub(crate) fn run_timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}Z", civil(since.as_secs()), since.subsec_micros())
}

/// "YYYY-MM-DDTHH:MM:SS" for seconds since the epoch (Howard Hinnant's days-to-civil).
fn civil(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_google_formats() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(run_timestamp(at), "2023-11-14T22:13:20.123000Z");
        assert_eq!(compute_timestamp(at), "2023-11-14T15:13:20.123-07:00");
    }
}
