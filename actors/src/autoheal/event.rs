//! Docker container events as autoheal reads them: parsed once from
//! bollard's `EventMessage`, with the container's labels, so every decision
//! works on plain values.
//!
//! Invariant: pure — no I/O, no clock.

use std::collections::HashMap;

use bollard::models::EventMessage;

/// What happened to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Start,
    Die {
        exit_code: Option<String>,
    },
    Oom,
    Kill,
    Stop,
    Unhealthy,
    Healthy,
    Destroy,
    /// Anything else (`health_status: starting`, ...).
    Other,
}

/// One container event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub id: String,
    pub name: String,
    pub image: String,
    pub action: Action,
    /// The daemon's own word for it, part of the event's identity.
    pub action_text: String,
    /// The container's labels, plus `name`, `image`, `exitCode`, `signal`.
    pub attributes: HashMap<String, String>,
    /// The daemon's `timeNano` (ns since the epoch).
    pub time_nanos: i64,
}

impl Event {
    /// `None` for a message that names no container, action or time.
    pub fn parse(message: EventMessage) -> Option<Event> {
        let action_text = message.action?;
        let actor = message.actor?;
        let id = actor.id?;
        let attributes = actor.attributes.unwrap_or_default();
        let time_nanos = message
            .time_nano
            .or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))?;
        let action = match action_text.as_str() {
            "start" => Action::Start,
            "die" => Action::Die {
                exit_code: attributes.get("exitCode").cloned(),
            },
            "oom" => Action::Oom,
            "kill" => Action::Kill,
            "stop" => Action::Stop,
            "destroy" => Action::Destroy,
            "health_status: unhealthy" => Action::Unhealthy,
            "health_status: healthy" => Action::Healthy,
            _ => Action::Other,
        };
        Some(Event {
            name: attributes
                .get("name")
                .cloned()
                .unwrap_or_else(|| id.clone()),
            image: attributes.get("image").cloned().unwrap_or_default(),
            id,
            action,
            action_text,
            attributes,
            time_nanos,
        })
    }

    /// Identity for de-duplicating a replay against the live stream.
    pub fn key(&self) -> (i64, String, String) {
        (self.time_nanos, self.id.clone(), self.action_text.clone())
    }
}

/// One container from a reconnect's list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Listed {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub state: ListedState,
    /// When an exited container stopped (ns since the epoch); looked up
    /// only for exited containers on a reconnect.
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListedState {
    Running {
        unhealthy: bool,
    },
    Exited,
    /// Created, paused, restarting, being removed: nothing to heal.
    Other,
}
