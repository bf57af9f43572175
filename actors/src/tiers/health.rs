//! The service's health check over HTTP, one implementation for every tier
//! that checks a URL it knows (a process, a container, a VM).
//!
//! Invariant: one GET, bounded by its deadline, the body drained up to a
//! small limit and never kept.

use std::time::Duration;

use crate::resilience::with_deadline;
use crate::text::{duration, root_cause};

/// How much of a healthy answer's body is read, so the connection can be
/// reused; the rest is dropped with the connection.
const DRAIN_LIMIT: usize = 64 * 1024;

/// GET `url`: Ok on a 2xx within `timeout`, else what went wrong, naming the URL.
pub async fn check(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let mut response = http.get(url).send().await?;
        let status = response.status();
        let mut read = 0;
        while read < DRAIN_LIMIT {
            match response.chunk().await? {
                Some(chunk) => read += chunk.len(),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>(status)
    };
    match with_deadline(timeout, "health check", exchange).await {
        Err(_) => Err(format!(
            "health check {url} took longer than {}",
            duration(timeout)
        )),
        Ok(Err(e)) => Err(format!("health check {url} failed: {}", root_cause(&e))),
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!(
            "health check {url} answered HTTP {}",
            status.as_u16()
        )),
    }
}
