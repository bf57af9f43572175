//! Deserializes the merged configuration into the caller's type, collecting
//! every unknown key and type error instead of stopping at the first.
//!
//! serde stops at the first error, so the loop records it, removes the
//! offending key (the type's `#[serde(default)]` then fills the gap) and
//! tries again until the value deserializes or nothing more can be removed.

use std::collections::BTreeMap;

use cascade_actors::secrets;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use serde_path_to_error::Segment;

use super::Problem;
use super::keys::{KeyPath, Seg, format_key};
use super::provenance::Provenance;
use super::tree::{Shadow, get, get_mut, remove};

/// Every round deserializes the whole tree once. Unknown keys are removed a
/// section at a time and cost one round per section, so this bounds only
/// configurations with thousands of *type* errors; past it the report says
/// that checking stopped.
const MAX_ROUNDS: usize = 2_000;

/// The message of the problem added when checking stopped at [`MAX_ROUNDS`].
pub(crate) const STOPPED: &str = "checking stopped here: too many problems to check the rest at once; fix these and run it again";

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
        let error = match serde_path_to_error::deserialize::<_, T>(&json) {
            Ok(value) => return (Some(value), problems),
            Err(error) => error,
        };
        let current = convert_path(error.path());
        let original = shadow.original(&current);
        let message = error.inner().to_string();

        if message.starts_with("unknown field `")
            && let Some(unknown) = unknown_siblings(&json, &current, &message)
        {
            // Every unknown key of this table at once: one round per table
            // however many there are.
            let parent = &current[..current.len() - 1];
            for name in unknown {
                let mut at = parent.to_vec();
                at.push(Seg::Key(name.clone()));
                let key = shadow.original(&at);
                problems.push(Problem {
                    key: format_key(&key),
                    message: unknown_key(&name, &message),
                    source: provenance.source_of_path(&key),
                });
                remove(&mut json, &at);
                shadow.remove(&at);
            }
            continue;
        }

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

        let found = get(&json, &current);
        let (key, text, removal) = describe(&message, original, current.clone(), found);
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
    problems.push(Problem {
        key: String::new(),
        message: STOPPED.to_owned(),
        source: super::Source::Default,
    });
    (None, problems)
}

/// The keys of the table holding the unknown key at `path` that the
/// message does not list as valid; `None` when the message does not say
/// which keys are valid.
fn unknown_siblings(json: &Json, path: &[Seg], message: &str) -> Option<Vec<String>> {
    let (Seg::Key(_), parent) = path.split_last()? else {
        return None;
    };
    let Json::Object(map) = get(json, parent)? else {
        return None;
    };
    let valid = if message.ends_with("there are no fields") {
        Vec::new()
    } else {
        let names = expected_names(message);
        if names.is_empty() {
            return None;
        }
        names
    };
    Some(map.keys().filter(|k| !valid.contains(k)).cloned().collect())
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
/// remove before retrying). `found` is the offending value, if the error
/// points at one. A value is quoted only when it is not a string and its key
/// is not secret (`cascade_actors::secrets`): the message names the line
/// where it is, and a mistyped secret must not reach a log.
fn describe(
    message: &str,
    original: KeyPath,
    current: KeyPath,
    found: Option<&Json>,
) -> (KeyPath, String, KeyPath) {
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.strip_suffix('`').unwrap_or(rest);
        let mut key = original;
        key.push(Seg::Key(field.to_owned()));
        return (key, "missing required key".to_owned(), current);
    }
    let names: Vec<&str> = original
        .iter()
        .filter_map(|seg| match seg {
            Seg::Key(name) => Some(name.as_str()),
            Seg::Index(_) => None,
        })
        .collect();
    let secret = secrets::is_secret_key(&names);
    let text = if message.starts_with("unknown field `") {
        let name = names.last().copied().unwrap_or_default();
        unknown_key(name, message)
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        unknown_variant(rest, secret)
    } else {
        let text = humanize_type_error(message, secret);
        match found {
            // A custom message (a parser's) may quote the value itself.
            Some(Json::String(value)) if secret && !value.is_empty() => {
                text.replace(value.as_str(), secrets::REDACTED)
            }
            _ => text,
        }
    };
    (original, secrets::scrub(&text).into_owned(), current)
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

fn unknown_variant(rest: &str, secret: bool) -> String {
    // rest is "value`, expected ..." (or "value`, there are no variants").
    let (value, tail) = rest.split_once("`, ").unwrap_or((rest, ""));
    let candidates = expected_names(tail);
    if secret {
        return match candidates.is_empty() {
            true => "unknown value".to_owned(),
            false => format!("unknown value; expected {}", quote_list(&candidates)),
        };
    }
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

/// `invalid value: integer `70000`, expected u16` → `expected u16, found
/// 70000`; strings (and, for secret keys, every value) only by their kind.
fn humanize_type_error(message: &str, secret: bool) -> String {
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
    format!("expected {expected}, found {}", found_phrase(found, secret))
}

fn found_phrase(found: &str, secret: bool) -> String {
    for (prefix, kind) in [
        ("string ", "a string"),
        ("character ", "a string"),
        ("integer ", "an integer"),
        ("floating point ", "a number"),
        ("boolean ", "a boolean"),
    ] {
        if let Some(rest) = found.strip_prefix(prefix) {
            if secret || kind == "a string" {
                return kind.to_owned();
            }
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
            humanize_type_error(r#"invalid type: string "abc", expected u16"#, false),
            "expected u16, found a string"
        );
        assert_eq!(
            humanize_type_error("invalid value: integer `70000`, expected u16", false),
            "expected u16, found 70000"
        );
        assert_eq!(
            humanize_type_error("invalid value: integer `70000`, expected u16", true),
            "expected u16, found an integer"
        );
        assert_eq!(
            humanize_type_error("invalid type: sequence, expected a string", false),
            "expected a string, found an array"
        );
        assert_eq!(
            humanize_type_error("something else", false),
            "something else"
        );
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
            unknown_variant("fsat`, expected `fast` or `slow`", false),
            "unknown value `fsat`; did you mean `fast`?"
        );
        assert_eq!(
            unknown_variant("Bearer x`, expected `id_token` or `none`", true),
            "unknown value; expected `id_token`, `none`"
        );
    }
}
