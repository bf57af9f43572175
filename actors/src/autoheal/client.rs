//! Autoheal's Docker calls: the container event stream, the replay and
//! container list that follow a reconnect, and the restart itself.
//!
//! The only file of autoheal that talks to the daemon. Invariant: every
//! request is bounded in time — lists and inspects through
//! [`Connector::call`], the restart by `call_timeout` plus the container's
//! stop timeout (the daemon waits that long before SIGKILL, so `call_timeout`
//! alone would cut short a legitimate restart), the replay by `call_timeout`.
//! The one exception is the live event stream, which is meant to stay open
//! while nothing happens; its consumer selects on it against cancellation.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{ContainerSummaryHealthStatusEnum, ContainerSummaryStateEnum, EventMessage};
use bollard::query_parameters::{
    EventsOptions, InspectContainerOptions, ListContainersOptions, RestartContainerOptions,
};
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};

use super::event::{Listed, ListedState};
use crate::resilience::with_deadline;
use crate::tiers::docker::connect::{Connector, DockerError, classify};

/// The container events autoheal decides on.
const EVENTS: [&str; 7] = [
    "die",
    "oom",
    "kill",
    "stop",
    "start",
    "health_status",
    "destroy",
];

/// The Docker calls autoheal's runner makes: a small seam, so the runner
/// can be driven without an engine.
pub(crate) trait Engine: Send + Sync + 'static {
    /// See [`connect`].
    fn connect(&self, query: Query) -> BoxFuture<'static, Result<Connected, DockerError>>;
    /// See [`restart`].
    fn restart(
        &self,
        id: String,
        stop_timeout: Duration,
    ) -> BoxFuture<'static, Result<(), DockerError>>;
}

/// The real daemon, through a [`Connector`].
#[derive(Clone)]
pub(crate) struct Daemon(pub Connector);

impl Engine for Daemon {
    fn connect(&self, query: Query) -> BoxFuture<'static, Result<Connected, DockerError>> {
        Box::pin(connect(self.0.clone(), query))
    }

    fn restart(
        &self,
        id: String,
        stop_timeout: Duration,
    ) -> BoxFuture<'static, Result<(), DockerError>> {
        let connector = self.0.clone();
        Box::pin(async move { restart(&connector, &id, stop_timeout).await })
    }
}

/// The live event stream: open for as long as the daemon keeps it open.
pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<EventMessage, bollard::errors::Error>> + Send>>;

/// What to ask the daemon for when (re)connecting.
pub(crate) struct Query {
    /// Time (ns since the epoch) of the last event seen before the stream
    /// broke; `None` on the first connection.
    pub resume_from: Option<i64>,
    /// Label filters (`key=value`) of the containers to list, one list
    /// each; `None` lists every container.
    pub lists: Vec<Option<String>>,
    /// A label (`key=value`) every considered container must also carry.
    pub scope: Option<String>,
}

/// A connection to the event stream, with what happened while there was none.
pub(crate) struct Connected {
    /// Events from `resume_from` up to `live_from`, oldest first.
    pub replay: Vec<EventMessage>,
    /// The labelled containers as they were around `live_from`.
    pub listing: Vec<Listed>,
    /// Where the replay ends and the live stream starts (ns since the epoch).
    pub live_from: i64,
    pub stream: EventStream,
}

/// Opens the event stream; on a reconnect, first collects the events missed
/// since `resume_from` and the exit times of exited containers, so the
/// caller can replay them and reconcile before going live.
pub(crate) async fn connect(connector: Connector, query: Query) -> Result<Connected, DockerError> {
    let timeout = connector.call_timeout();
    if query.resume_from.is_some() {
        // The stream broke: the daemon may have restarted as another version.
        connector.forget().await;
    }
    let docker = connector.client(timeout).await?;
    let live_from = query
        .resume_from
        .map_or(now_nanos(), |r| r.max(now_nanos()));
    let filters = event_filters(query.scope.as_deref());

    let mut replay = Vec::new();
    if let Some(since) = query.resume_from {
        // `until` in the past makes the daemon send what it buffered and end
        // the response, so the replay is complete before reconciling.
        let options = EventsOptions {
            since: Some(timestamp(since)),
            until: Some(timestamp(live_from)),
            filters: Some(filters.clone()),
        };
        let mut past = docker.events(Some(options));
        let collect = async {
            while let Some(item) = past.next().await {
                replay.push(item?);
            }
            Ok::<(), bollard::errors::Error>(())
        };
        match with_deadline(timeout, "event replay", collect).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(classify("event replay", e)),
            Err(_) => {
                return Err(DockerError::NotResponding {
                    what: "event replay".into(),
                    after: timeout,
                });
            }
        }
    }

    let mut listing: Vec<Listed> = Vec::new();
    for label in &query.lists {
        let mut wanted: Vec<String> = label.iter().cloned().collect();
        wanted.extend(query.scope.clone());
        for listed in list(&connector, wanted).await? {
            if !listing.iter().any(|l| l.id == listed.id) {
                listing.push(listed);
            }
        }
    }
    if query.resume_from.is_some() {
        for listed in listing
            .iter_mut()
            .filter(|l| l.state == ListedState::Exited)
        {
            listed.finished_at = finished_at(&connector, &listed.id).await?;
        }
    }

    let options = EventsOptions {
        since: Some(timestamp(live_from)),
        until: None,
        filters: Some(filters),
    };
    Ok(Connected {
        replay,
        listing,
        live_from,
        stream: Box::pin(docker.events(Some(options))),
    })
}

/// Restarts a container, giving it `stop_timeout` to stop before SIGKILL.
pub(crate) async fn restart(
    connector: &Connector,
    id: &str,
    stop_timeout: Duration,
) -> Result<(), DockerError> {
    let options = RestartContainerOptions {
        signal: None,
        t: Some(i32::try_from(stop_timeout.as_secs()).unwrap_or(i32::MAX)),
    };
    // The daemon waits out the stop timeout before it answers.
    let within = connector.call_timeout().saturating_add(stop_timeout);
    connector
        .call_within("restart container", within, |docker| async move {
            docker.restart_container(id, Some(options)).await
        })
        .await
}

async fn list(connector: &Connector, labels: Vec<String>) -> Result<Vec<Listed>, DockerError> {
    let filters = (!labels.is_empty()).then(|| HashMap::from([("label".to_owned(), labels)]));
    let options = ListContainersOptions {
        all: true,
        filters,
        ..ListContainersOptions::default()
    };
    let summaries = connector
        .call("list containers", |d| async move {
            d.list_containers(Some(options)).await
        })
        .await?;
    Ok(summaries
        .into_iter()
        .filter_map(|s| {
            let id = s.id?;
            let name = s
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.clone());
            // API 1.41 has no Health field in the list; the status text
            // ("Up 3 minutes (unhealthy)") says it there.
            let unhealthy = s.health.and_then(|h| h.status)
                == Some(ContainerSummaryHealthStatusEnum::UNHEALTHY)
                || s.status
                    .as_deref()
                    .is_some_and(|t| t.contains("(unhealthy)"));
            let state = match s.state {
                Some(ContainerSummaryStateEnum::RUNNING) => ListedState::Running { unhealthy },
                Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                    ListedState::Exited
                }
                _ => ListedState::Other,
            };
            Some(Listed {
                id,
                name,
                image: s.image.unwrap_or_default(),
                labels: s.labels.unwrap_or_default(),
                state,
                finished_at: None,
            })
        })
        .collect())
}

/// When the container last stopped; `None` if it never did or is gone.
async fn finished_at(connector: &Connector, id: &str) -> Result<Option<i64>, DockerError> {
    let id = id.to_owned();
    let inspected = connector
        .call("inspect container", |d| async move {
            d.inspect_container(&id, None::<InspectContainerOptions>)
                .await
        })
        .await;
    let inspected = match inspected {
        Ok(inspected) => inspected,
        // Removed since the list: nothing to heal.
        Err(e) if e.status() == Some(404) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(inspected
        .state
        .and_then(|s| s.finished_at)
        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_nanos()).ok()))
}

fn event_filters(scope: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "event".to_owned(),
            EVENTS.iter().map(|e| (*e).to_owned()).collect(),
        ),
    ]);
    if let Some(scope) = scope {
        filters.insert("label".to_owned(), vec![scope.to_owned()]);
    }
    filters
}

/// Docker's `since`/`until` form: `seconds.nanoseconds`.
fn timestamp(nanos: i64) -> String {
    format!(
        "{}.{:09}",
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000)
    )
}

pub(crate) fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn timestamps_keep_nanoseconds() {
        assert_eq!(timestamp(1_795_356_610_266_123_709), "1795356610.266123709");
        assert_eq!(timestamp(5), "0.000000005");
    }

    #[test]
    fn event_filters_name_every_event_and_the_scope() {
        let f = event_filters(Some("cascade.test.scope=x"));
        assert_eq!(f["type"], ["container"]);
        assert_eq!(f["event"].len(), EVENTS.len());
        assert_eq!(f["label"], ["cascade.test.scope=x"]);
        assert!(!event_filters(None).contains_key("label"));
    }
}
