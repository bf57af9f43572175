//! Dotted key paths (`tiers.local.port`, `waterfall.order[2]`) as segment lists.
//!
//! Every layer names keys differently (TOML tables, `__`-separated env vars,
//! dotted flags, serde paths); comparing them as segments keeps provenance
//! lookups independent of spelling.

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

pub(crate) type KeyPath = Vec<Seg>;

/// Formats segments the way serde_path_to_error does, so problem keys look
/// the same whichever code path produced them.
pub(crate) fn format_key(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(name);
            }
            Seg::Index(index) => {
                // Writing to a String cannot fail.
                let _ = write!(out, "[{index}]");
            }
        }
    }
    out
}

/// Splits any caller-supplied key without rejecting it: a part that does not
/// parse as `name[0][1]` is kept verbatim as a key name, because lookups must
/// never fail.
pub(crate) fn split_key(text: &str) -> KeyPath {
    let mut path = Vec::new();
    if text.is_empty() || text == "." {
        return path;
    }
    for part in text.split('.') {
        match split_part(part) {
            Some((name, indices)) => {
                if !name.is_empty() {
                    path.push(Seg::Key(name.to_owned()));
                }
                path.extend(indices.into_iter().map(Seg::Index));
            }
            None => path.push(Seg::Key(part.to_owned())),
        }
    }
    path
}

/// Parses a key given on the command line or derived from an env var. Only
/// names the `config` crate's path grammar accepts are allowed, so the key
/// means the same thing to `config` as it does to provenance.
pub(crate) fn parse_strict(text: &str) -> Option<KeyPath> {
    let mut path = Vec::new();
    for part in text.split('.') {
        let (name, indices) = split_part(part)?;
        if !is_ident(name) {
            return None;
        }
        path.push(Seg::Key(name.to_owned()));
        path.extend(indices.into_iter().map(Seg::Index));
    }
    Some(path)
}

pub(crate) fn is_ident(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn split_part(part: &str) -> Option<(&str, Vec<usize>)> {
    let Some(open) = part.find('[') else {
        return Some((part, Vec::new()));
    };
    let name = &part[..open];
    let mut rest = &part[open..];
    let mut indices = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        let digits = &inner[..close];
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        indices.push(digits.parse().ok()?);
        rest = &inner[close + 1..];
    }
    Some((name, indices))
}

/// True when `prefix` is an ancestor of (or equal to) `path`.
pub(crate) fn is_prefix(prefix: &[Seg], path: &[Seg]) -> bool {
    prefix.len() <= path.len() && prefix.iter().zip(path).all(|(a, b)| a == b)
}
