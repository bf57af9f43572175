//! Deserializes the merged configuration into the caller's type, collecting
//! every unknown key and type error instead of stopping at the first.
//!
//! serde stops at the first error, so the loop records it, removes the
//! offending key (the type's `#[serde(default)]` then fills the gap) and
//! tries again until the value deserializes or nothing more can be removed.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use serde_path_to_error::Segment;

use super::Problem;
use super::keys::{KeyPath, Seg, format_key};
use super::provenance::Provenance;
use super::tree::{Shadow, get_mut, remove};

/// Generous: every round removes a key or tries one alternate reading, and a
/// config with this many problems is better reported in part than slowly.
const MAX_ROUNDS: usize = 500;

/// Deserializes `json`, collecting every problem. The value is what remains
/// after the offending keys were removed (their defaults apply), so later
/// semantic checks can still run; `None` only when nothing deserializes.
pub(crate) fn deserialize_all<T: DeserializeOwned>(
    mut json: Json,
    provenance: &Provenance,
    mut alternates: BTreeMap<KeyPath, Vec<Json>>,
) -> (Option<T>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut shadow = Shadow::of(&json);
    // The first complaint about an env/flag value is the one to report: it
    // describes the reading the user most likely meant.
    let mut first_message: BTreeMap<KeyPath, String> = BTreeMap::new();

    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, T>(json.clone()) {
            Ok(value) => return (Some(value), problems),
            Err(error) => error,
        };
        let current = convert_path(error.path());
        let original = shadow.original(&current);
        let message = error.inner().to_string();

        let alternate = if message.starts_with("unknown field") {
            None
        } else {
            next_alternate(&mut alternates, &original)
        };
        if let (Some(next), Some(slot)) = (alternate, get_mut(&mut json, &current)) {
            first_message.entry(original).or_insert(message);
            *slot = next;
            continue;
        }
        let message = first_message.remove(&original).unwrap_or(message);

        let (key, text, removal) = describe(&message, original, current);
        problems.push(Problem {
            key: format_key(&key),
            message: text,
            source: provenance.source_of_path(&key),
        });
        if !remove(&mut json, &removal) {
            return (None, problems);
        }
        shadow.remove(&removal);
    }
    if problems.is_empty() {
        problems.push(Problem {
            key: String::new(),
            message: "configuration could not be checked completely".to_owned(),
            source: super::Source::Default,
        });
    }
    (None, problems)
}

fn next_alternate(alternates: &mut BTreeMap<KeyPath, Vec<Json>>, path: &[Seg]) -> Option<Json> {
    let queue = alternates.get_mut(path)?;
    if queue.is_empty() {
        None
    } else {
        Some(queue.remove(0))
    }
}

fn convert_path(path: &serde_path_to_error::Path) -> KeyPath {
    let mut out = Vec::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push(Seg::Index(*index)),
            Segment::Map { key } => out.push(Seg::Key(key.clone())),
            // Externally tagged enums are a one-key object in JSON.
            Segment::Enum { variant } => out.push(Seg::Key(variant.clone())),
            // Stopping here removes a larger subtree, which still makes
            // progress.
            Segment::Unknown => break,
        }
    }
    out
}

/// Turns a serde message into (problem key, user-facing text, path to
/// remove before retrying).
fn describe(message: &str, original: KeyPath, current: KeyPath) -> (KeyPath, String, KeyPath) {
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.strip_suffix('`').unwrap_or(rest);
        let mut key = original;
        key.push(Seg::Key(field.to_owned()));
        return (key, "missing required key".to_owned(), current);
    }
    let text = if message.starts_with("unknown field `") {
        let name = match original.last() {
            Some(Seg::Key(name)) => name.as_str(),
            _ => "",
        };
        unknown_key(name, message)
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        unknown_variant(rest)
    } else {
        humanize_type_error(message)
    };
    (original, text, current)
}

fn unknown_key(name: &str, message: &str) -> String {
    if message.ends_with("there are no fields") {
        return "unknown key; this section takes no keys".to_owned();
    }
    let candidates = expected_names(message);
    match closest(name, &candidates) {
        Some(best) => format!("unknown key; did you mean `{best}`?"),
        None => format!("unknown key; valid keys are {}", quote_list(&candidates)),
    }
}

fn unknown_variant(rest: &str) -> String {
    // rest is "value`, expected ..." (or "value`, there are no variants").
    let (value, tail) = rest.split_once("`, ").unwrap_or((rest, ""));
    let candidates = expected_names(tail);
    match closest(value, &candidates) {
        Some(best) => format!("unknown value `{value}`; did you mean `{best}`?"),
        None if candidates.is_empty() => format!("unknown value `{value}`"),
        None => format!(
            "unknown value `{value}`; expected {}",
            quote_list(&candidates)
        ),
    }
}

/// The backtick-quoted names after "expected" in a serde message.
fn expected_names(message: &str) -> Vec<String> {
    let Some(at) = message.find("expected") else {
        return Vec::new();
    };
    message[at..]
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn closest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a String> {
    let name = name.to_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&name, &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn quote_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `invalid type: string "abc", expected u16` → `expected u16, found "abc"`.
fn humanize_type_error(message: &str) -> String {
    let body = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some(body) = body else {
        return message.to_owned();
    };
    // rfind: the found part may quote user text containing ", expected ".
    let Some(at) = body.rfind(", expected ") else {
        return message.to_owned();
    };
    let found = &body[..at];
    let expected = &body[at + ", expected ".len()..];
    format!("expected {expected}, found {}", found_phrase(found))
}

fn found_phrase(found: &str) -> String {
    for prefix in [
        "string ",
        "integer ",
        "floating point ",
        "boolean ",
        "character ",
    ] {
        if let Some(rest) = found.strip_prefix(prefix) {
            let rest = rest
                .strip_prefix('`')
                .and_then(|r| r.strip_suffix('`'))
                .unwrap_or(rest);
            return rest.to_owned();
        }
    }
    match found {
        "sequence" => "an array".to_owned(),
        "map" => "a table".to_owned(),
        "unit value" | "null" => "an empty value".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn type_errors_read_expected_then_found() {
        assert_eq!(
            humanize_type_error(r#"invalid type: string "abc", expected u16"#),
            r#"expected u16, found "abc""#
        );
        assert_eq!(
            humanize_type_error("invalid value: integer `70000`, expected u16"),
            "expected u16, found 70000"
        );
        assert_eq!(
            humanize_type_error("invalid type: sequence, expected a string"),
            "expected a string, found an array"
        );
        assert_eq!(humanize_type_error("something else"), "something else");
    }

    #[test]
    fn unknown_keys_get_a_suggestion_only_when_close() {
        let msg = "unknown field `prot`, expected `port` or `host`";
        assert_eq!(
            unknown_key("prot", msg),
            "unknown key; did you mean `port`?"
        );
        let msg = "unknown field `zzzz`, expected `port` or `host`";
        assert_eq!(
            unknown_key("zzzz", msg),
            "unknown key; valid keys are `port`, `host`"
        );
        assert_eq!(
            unknown_key("x", "unknown field `x`, there are no fields"),
            "unknown key; this section takes no keys"
        );
    }

    #[test]
    fn unknown_variants_get_a_suggestion() {
        assert_eq!(
            unknown_variant("fsat`, expected `fast` or `slow`"),
            "unknown value `fsat`; did you mean `fast`?"
        );
    }
}
