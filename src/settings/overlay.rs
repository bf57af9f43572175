//! Environment variables and command-line overrides as `config` sources.
//!
//! `config::Environment` is not used: it cannot restrict itself to variables
//! containing `__` (so `CASCADE_LOG` would become a key), it decides list
//! parsing per variable name rather than per key type, and it parses `nan`
//! or `TRUE` as non-strings. Each env var and flag instead becomes its own
//! one-key source: `config` still does the merging, and because sources apply
//! in order (unlike `set_override`, which is backed by a hash map) a later
//! flag deterministically beats an earlier one.

use serde_json::Value as Json;

use super::keys::{KeyPath, Seg, is_ident};
use super::tree::json_to_config;

/// One key set by an env var or a flag.
#[derive(Debug, Clone)]
pub(crate) struct OverlaySource {
    key: String,
    value: config::Value,
}

impl OverlaySource {
    pub(crate) fn new(key: String, value: &Json, origin: &String) -> Self {
        Self {
            key,
            value: json_to_config(value, origin),
        }
    }
}

impl config::Source for OverlaySource {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        let mut map = config::Map::new();
        map.insert(self.key.clone(), self.value.clone());
        Ok(map)
    }
}

pub(crate) enum EnvKey {
    /// Not meant for the config (no prefix, or no `__` after it).
    NotConfig,
    /// Meant for the config but the name does not spell a valid key.
    Invalid,
    Key(KeyPath),
}

/// `CASCADE_TIERS__LOCAL__PORT` → `tiers.local.port`.
pub(crate) fn env_key(var: &str, prefix: &str) -> EnvKey {
    let Some(rest) = var.strip_prefix(prefix) else {
        return EnvKey::NotConfig;
    };
    if !rest.contains("__") {
        return EnvKey::NotConfig;
    }
    let lower = rest.to_ascii_lowercase();
    let mut path = Vec::new();
    for name in lower.split("__") {
        if !is_ident(name) {
            return EnvKey::Invalid;
        }
        path.push(Seg::Key(name.to_owned()));
    }
    EnvKey::Key(path)
}

/// How a textual env/flag value enters the config, plus other readings to
/// try if the first one does not fit the target type.
pub(crate) struct Interpreted {
    pub value: Json,
    /// `(path below the key, other readings in order of preference)`.
    pub alternates: Vec<(KeyPath, Vec<Json>)>,
}

/// Reads `raw` as a TOML number or boolean where it is one, else as a
/// string; for keys that currently hold an array, as a comma-separated list
/// of strings.
pub(crate) fn interpret(raw: &str, is_array: bool) -> Interpreted {
    let items = split_list(raw);
    if is_array {
        let alternates = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| scalar(item).map(|s| (vec![Seg::Index(i)], vec![s])))
            .collect();
        return Interpreted {
            value: Json::Array(items.into_iter().map(Json::String).collect()),
            alternates,
        };
    }
    let text = Json::String(raw.to_owned());
    let list = Json::Array(items.into_iter().map(Json::String).collect());
    // A key whose type is a string can receive "8080" or "true", and a key
    // with no array default (say, in a new map entry) can still be a list:
    // the validator tries these readings before reporting a type error.
    match scalar(raw) {
        Some(value) => Interpreted {
            value,
            alternates: vec![(Vec::new(), vec![text, list])],
        },
        None => Interpreted {
            value: text,
            alternates: vec![(Vec::new(), vec![list])],
        },
    }
}

fn split_list(raw: &str) -> Vec<String> {
    if raw.trim().is_empty() {
        return Vec::new();
    }
    raw.split(',').map(|s| s.trim().to_owned()).collect()
}

fn scalar(raw: &str) -> Option<Json> {
    let value: toml_edit::Value = raw.trim().parse().ok()?;
    if let Some(b) = value.as_bool() {
        return Some(Json::Bool(b));
    }
    if let Some(i) = value.as_integer() {
        return Some(Json::from(i));
    }
    // nan and inf are valid TOML floats but almost certainly meant as text.
    value
        .as_float()
        .and_then(serde_json::Number::from_f64)
        .map(Json::Number)
}
