//! Layered configuration loading: built-in defaults, then an optional TOML
//! file, then `CASCADE_SECTION__KEY` environment variables, then
//! command-line overrides.
//!
//! This module owns merging those layers (through the `config` crate),
//! turning every kind of bad input into [`Problem`]s that name the key and
//! the place the bad value came from, reporting all of them at once, and
//! remembering each key's [`Provenance`] so later semantic checks can do the
//! same. It also renders the effective configuration with secrets redacted.
//! It knows nothing about the shape of cascade's own configuration: callers
//! pass the target type.

mod keys;
mod overlay;
mod provenance;
mod redact;
mod tree;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, ConfigBuilder, File, FileFormat, builder::DefaultState};
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use toml_edit::ImDocument;

use keys::{KeyPath, format_key, parse_strict};
use overlay::{EnvKey, OverlaySource, env_key, interpret};

pub use provenance::Provenance;
pub use redact::render_redacted;

/// Name used for the embedded defaults in syntax errors.
const DEFAULTS_NAME: &str = "<built-in defaults>";

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: Option<usize> },
    Env { var: String },
    Flag { flag: String },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("built-in default"),
            Self::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Self::File { path, line: None } => write!(f, "{}", path.display()),
            Self::Env { var } => write!(f, "environment variable {var}"),
            Self::Flag { flag } => write!(f, "flag {flag}"),
        }
    }
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `tiers.local.port` or `waterfall.order[2]`.
    pub key: String,
    pub message: String,
    pub source: Source,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = printable(&self.message);
        let source = self.source.to_string();
        let source = printable(&source);
        if self.key.is_empty() {
            write!(f, "{message} ({source})")
        } else {
            write!(f, "{}: {message} ({source})", printable(&self.key))
        }
    }
}

/// Whether the dotted key `outer` is `inner` or one of its ancestors
/// (`waterfall.order` covers `waterfall.order[2]` and `waterfall.order.x`).
pub fn covers(outer: &str, inner: &str) -> bool {
    !outer.is_empty()
        && inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Text from the user's input as it may reach a terminal or a log: control
/// characters (an escape sequence in a key, a NUL) written as escapes.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {}: {source}", printable(&path.display().to_string()))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not valid TOML: {}", printable(&path.display().to_string()), printable(message))]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    let stopped = problems
        .last()
        .is_some_and(|p| p.message == validate::STOPPED);
    let found = problems.len() - usize::from(stopped);
    let noun = if found == 1 { "problem" } else { "problems" };
    let mut out = if stopped {
        format!("configuration has at least {found} {noun}:")
    } else {
        format!("configuration has {found} {noun}:")
    };
    for problem in problems {
        out.push_str("\n  ");
        out.push_str(&problem.to_string());
    }
    out
}

/// The inputs to [`load`], lowest precedence first.
pub struct Layers<'a> {
    /// The embedded default TOML text. Its keys count as [`Source::Default`].
    pub defaults: &'a str,
    /// Optional user file; it must exist when given.
    pub file: Option<&'a Path>,
    /// Environment variables to consider (normally `std::env::vars()`). Only
    /// those starting with `prefix` and containing `__` after it are config
    /// keys: `CASCADE_TIERS__LOCAL__PORT` → `tiers.local.port`.
    pub env: Vec<(String, String)>,
    /// e.g. `"CASCADE_"`.
    pub prefix: &'a str,
    /// Command-line overrides: (dotted key, value as text, flag name for
    /// messages). Later entries win over earlier ones.
    pub overrides: Vec<(String, String, String)>,
    /// The schema's defaults with every optional section present (serialized),
    /// used to complete partly written tables; see `fill_leaves`.
    pub base: Option<Json>,
}

/// The typed configuration plus where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub value: T,
    pub provenance: Provenance,
}

/// Merges the layers and deserializes the result into `T`.
///
/// `T`'s structs are expected to use `#[serde(deny_unknown_fields, default)]`:
/// unknown keys are reported, and keys removed because of a problem fall back
/// to the type's default while the remaining keys are checked.
#[cfg(test)]
pub fn load<T: DeserializeOwned>(layers: Layers<'_>) -> Result<Loaded<T>, LoadError> {
    let (loaded, problems) = load_collecting(layers)?;
    if problems.is_empty() {
        Ok(loaded)
    } else {
        Err(LoadError::Invalid(problems))
    }
}

/// Like [`load`], but hands back the best-effort value (offending keys
/// dropped, so their defaults apply) with the problems found, so the caller
/// can add its semantic checks and report everything at once.
pub fn load_collecting<T: DeserializeOwned>(
    layers: Layers<'_>,
) -> Result<(Loaded<T>, Vec<Problem>), LoadError> {
    let mut provenance = Provenance::default();
    let mut problems = Vec::new();

    check_syntax(layers.defaults, Path::new(DEFAULTS_NAME))?;
    let mut builder =
        Config::builder().add_source(File::from_str(layers.defaults, FileFormat::Toml));
    build(&builder, Path::new(DEFAULTS_NAME))?;

    if let Some(path) = layers.file {
        let text = read_file(path)?;
        let doc = check_syntax(&text, path)?;
        provenance.set_file(path.to_path_buf(), &doc);
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
    }
    // Which keys hold arrays decides how "a,b" from env or flags is read.
    let lower = build(&builder, layers.file.unwrap_or(Path::new(DEFAULTS_NAME)))?;

    let mut alternates: BTreeMap<KeyPath, Vec<Json>> = BTreeMap::new();
    let mut add =
        |builder: ConfigBuilder<DefaultState>, path: KeyPath, raw: &str, origin: &String| {
            let is_array = matches!(tree::get(&lower, &path), Some(Json::Array(_)));
            let interpreted = interpret(raw, is_array);
            for (below, readings) in interpreted.alternates {
                let mut full = path.clone();
                full.extend(below);
                alternates.insert(full, readings);
            }
            builder.add_source(OverlaySource::new(
                format_key(&path),
                &interpreted.value,
                origin,
            ))
        };

    // Sorted so the outcome never depends on the caller's order: a shorter
    // key (`A__B`) sorts before a longer one (`A__B__C`), so the more
    // specific variable wins.
    let mut env = layers.env;
    env.sort();
    for (var, raw) in &env {
        match env_key(var, layers.prefix) {
            EnvKey::NotConfig => {}
            EnvKey::Invalid => problems.push(Problem {
                key: String::new(),
                message: format!(
                    "name does not map to a config key (expected {}SECTION__KEY)",
                    layers.prefix
                ),
                source: Source::Env { var: var.clone() },
            }),
            EnvKey::Key(path) => {
                builder = add(builder, path.clone(), raw, var);
                provenance.add_env(path, var.clone());
            }
        }
    }
    for (key, raw, flag) in &layers.overrides {
        match parse_strict(key) {
            Some(path) => {
                builder = add(builder, path.clone(), raw, flag);
                provenance.add_flag(path, flag.clone());
            }
            None => problems.push(Problem {
                key: key.clone(),
                message: "not a valid config key".to_owned(),
                source: Source::Flag { flag: flag.clone() },
            }),
        }
    }

    let merged = builder.build().map_err(|e| {
        LoadError::Invalid(vec![Problem {
            key: String::new(),
            message: format!("cannot merge configuration layers: {e}"),
            source: Source::Default,
        }])
    })?;
    let mut merged = tree::config_to_json(&merged.cache);
    if let Some(base) = &layers.base {
        fill_leaves(&mut merged, base);
    }

    let (value, found) = validate::deserialize_all::<T>(merged, &provenance, alternates);
    problems.extend(found);
    match value {
        Some(value) => Ok((Loaded { value, provenance }, problems)),
        None => Err(LoadError::Invalid(problems)),
    }
}

/// Gives every table that the layers set the missing scalar keys of its own
/// default, so a partly written table (`[tiers.local.restart] base = "1s"`)
/// keeps the section's defaults for the other keys instead of the generic
/// defaults of its type. Tables nobody set stay absent: optional sections
/// stay off, and serde's field defaults cover whole missing tables.
fn fill_leaves(merged: &mut Json, base: &Json) {
    let (Json::Object(merged), Json::Object(base)) = (merged, base) else {
        return;
    };
    for (key, default) in base {
        match merged.get_mut(key) {
            Some(present) => fill_leaves(present, default),
            None if !default.is_object() => {
                merged.insert(key.clone(), default.clone());
            }
            None => {}
        }
    }
}

/// The largest configuration file read; anything bigger is a mistake (or
/// `/dev/zero`), and reading it would only use memory.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads the user's file: a regular file only (a FIFO or a device would
/// block or never end), at most [`MAX_FILE_BYTES`], and UTF-8, with the line
/// of the first byte that is not.
fn read_file(path: &Path) -> Result<String, LoadError> {
    use std::io::Read as _;
    let read_error = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_file() {
        let kind = metadata.file_type();
        let what = if kind.is_dir() {
            "a directory"
        } else {
            use std::os::unix::fs::FileTypeExt as _;
            if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            }
        };
        return Err(read_error(std::io::Error::other(format!(
            "{what}; a configuration must be a regular file"
        ))));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_BYTES / 1024 / 1024
        ))));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let text = std::str::from_utf8(valid).unwrap_or_default();
        let line = text.matches('\n').count() + 1;
        let column = text.len() - text.rfind('\n').map_or(0, |at| at + 1) + 1;
        LoadError::Syntax {
            path: path.to_path_buf(),
            line,
            message: format!("not UTF-8 (the byte at column {column})"),
        }
    })
}

/// Parses with toml_edit first because its errors carry a byte span, which
/// becomes the line number in the message.
fn check_syntax<'t>(text: &'t str, path: &Path) -> Result<ImDocument<&'t str>, LoadError> {
    ImDocument::parse(text).map_err(|e| {
        let at = e.span().map(|span| span.start);
        let mut message = one_line(e.message());
        if message.is_empty() {
            // toml_edit gives no words for some characters it refuses (a
            // NUL in a comment); name the character instead.
            let found = at
                .and_then(|at| text.get(at..))
                .and_then(|rest| rest.chars().next());
            message = match found {
                Some(c) => format!("character U+{:04X} is not allowed here", u32::from(c)),
                None => "unexpected end of file".to_owned(),
            };
        }
        LoadError::Syntax {
            path: path.to_path_buf(),
            line: at.map_or(1, |at| provenance::Lines::new(text).of(at)),
            message,
        }
    })
}

/// Builds the layers added so far. toml_edit has already accepted the text,
/// so a failure here means the `toml` parser inside `config` disagrees with
/// it; its message carries the line.
fn build(builder: &ConfigBuilder<DefaultState>, last: &Path) -> Result<Json, LoadError> {
    let config = builder.build_cloned().map_err(|e| {
        let message = e.to_string();
        LoadError::Syntax {
            path: last.to_path_buf(),
            line: line_in_message(&message).unwrap_or(1),
            message: one_line(&message),
        }
    })?;
    Ok(tree::config_to_json(&config.cache))
}

fn line_in_message(message: &str) -> Option<usize> {
    let at = message.find("line ")? + "line ".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
