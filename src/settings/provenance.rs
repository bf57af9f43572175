//! Which layer set which key, so problems can point at the file line, env var
//! or flag a bad value came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use toml_edit::{ImDocument, InlineTable, Item, Table, Value};

use super::keys::{KeyPath, Seg, is_prefix, split_key};
use super::{Problem, Source};

/// Where every key of the effective configuration came from.
///
/// Lookups cost the depth of the key times a map lookup, never the size of
/// the file: a configuration with tens of thousands of keys (and as many
/// problems) is still described at once.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    file: Option<PathBuf>,
    /// Ordered, so the keys beneath a table are one contiguous range.
    file_keys: BTreeMap<KeyPath, FileKey>,
    env: Vec<(KeyPath, String)>,
    flags: Vec<(KeyPath, String)>,
}

#[derive(Debug, Clone, Copy)]
struct FileKey {
    line: usize,
    /// Leaves replace whatever lower layers had; tables only merge into them,
    /// so a table entry says nothing about keys beneath it that it lacks.
    leaf: bool,
}

impl Provenance {
    /// Where the effective value of `key` (dotted path) came from: the
    /// highest layer that set it (flag > env > file > default), with the file
    /// line if known. For keys nobody set, [`Source::Default`].
    pub fn source_of(&self, key: &str) -> Source {
        self.source_of_path(&split_key(key))
    }

    /// Build a [`Problem`] for `key` with its source filled in.
    pub fn problem(&self, key: impl Into<String>, message: impl Into<String>) -> Problem {
        let key = key.into();
        let source = self.source_of(&key);
        Problem {
            key,
            message: message.into(),
            source,
        }
    }

    pub(crate) fn source_of_path(&self, path: &[Seg]) -> Source {
        // A layer that set the key itself or a whole value above it decides
        // the effective value outright.
        if let Some(flag) = deepest_covering(&self.flags, path) {
            return Source::Flag { flag: flag.clone() };
        }
        if let Some(var) = deepest_covering(&self.env, path) {
            return Source::Env { var: var.clone() };
        }
        if let Some(line) = self.file_line_covering(path) {
            return self.file_source(line);
        }
        // Otherwise the key is a table some layers only contributed to; name
        // the highest one that touched anything beneath it.
        if let Some((_, flag)) = self.flags.iter().find(|(k, _)| is_prefix(path, k)) {
            return Source::Flag { flag: flag.clone() };
        }
        if let Some((_, var)) = self.env.iter().find(|(k, _)| is_prefix(path, k)) {
            return Source::Env { var: var.clone() };
        }
        if let Some(line) = self
            .file_keys
            .range(path.to_vec()..)
            .take_while(|(k, _)| is_prefix(path, k))
            .map(|(_, k)| k.line)
            .min()
        {
            return self.file_source(line);
        }
        Source::Default
    }

    /// The line of `path` itself, else of the deepest leaf above it (a
    /// value that replaced the whole subtree).
    fn file_line_covering(&self, path: &[Seg]) -> Option<usize> {
        if let Some(key) = self.file_keys.get(path) {
            return Some(key.line);
        }
        (0..path.len())
            .rev()
            .filter_map(|len| self.file_keys.get(&path[..len]))
            .find(|k| k.leaf)
            .map(|k| k.line)
    }

    fn file_source(&self, line: usize) -> Source {
        match &self.file {
            Some(path) => Source::File {
                path: path.clone(),
                line: Some(line),
            },
            None => Source::Default,
        }
    }

    pub(crate) fn set_file(&mut self, path: PathBuf, doc: &ImDocument<&str>) {
        let lines = Lines::new(doc.raw());
        let mut keys = BTreeMap::new();
        walk_table(doc.as_table(), &mut Vec::new(), &lines, &mut keys);
        self.file = Some(path);
        self.file_keys = keys;
    }

    pub(crate) fn add_env(&mut self, path: KeyPath, var: String) {
        self.env.push((path, var));
    }

    pub(crate) fn add_flag(&mut self, path: KeyPath, flag: String) {
        self.flags.push((path, flag));
    }
}

/// Among `(key, name)` entries that cover `path` (equal or ancestor), the one
/// with the longest key; later entries win ties because they were applied
/// later.
fn deepest_covering<'a>(entries: &'a [(KeyPath, String)], path: &[Seg]) -> Option<&'a String> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| is_prefix(k, path))
        .max_by_key(|(i, (k, _))| (k.len(), *i))
        .map(|(_, (_, name))| name)
}

/// Byte offset → line number, by binary search over where lines start.
pub(crate) struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    pub(crate) fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(
                text.bytes()
                    .enumerate()
                    .filter(|(_, b)| *b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        Lines { starts }
    }

    /// The 1-based line holding `offset`.
    pub(crate) fn of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset).max(1)
    }
}

/// Records `path` at `line`; the first entry for a path wins (TOML forbids
/// defining a key twice, so a second one is a table header seen again).
fn record(out: &mut BTreeMap<KeyPath, FileKey>, path: &KeyPath, line: usize, leaf: bool) {
    out.entry(path.clone()).or_insert(FileKey { line, leaf });
}

fn walk_table(
    table: &Table,
    path: &mut KeyPath,
    lines: &Lines,
    out: &mut BTreeMap<KeyPath, FileKey>,
) {
    for (name, item) in table.iter() {
        path.push(Seg::Key(name.to_owned()));
        let key_line = table
            .key(name)
            .and_then(|k| k.span())
            .map(|s| lines.of(s.start));
        walk_item(item, key_line, path, lines, out);
        path.pop();
    }
}

fn walk_item(
    item: &Item,
    key_line: Option<usize>,
    path: &mut KeyPath,
    lines: &Lines,
    out: &mut BTreeMap<KeyPath, FileKey>,
) {
    match item {
        Item::None => {}
        Item::Value(value) => walk_value(value, key_line, path, lines, out),
        Item::Table(table) => {
            // Implicit and dotted tables have no header line of their own;
            // their keys carry the lines.
            let header = table
                .span()
                .filter(|_| !table.is_implicit() && !table.is_dotted());
            if let Some(span) = header {
                record(out, path, lines.of(span.start), false);
            }
            walk_table(table, path, lines, out);
        }
        Item::ArrayOfTables(array) => {
            for (index, table) in array.iter().enumerate() {
                path.push(Seg::Index(index));
                if let Some(span) = table.span() {
                    record(out, path, lines.of(span.start), false);
                }
                walk_table(table, path, lines, out);
                path.pop();
            }
        }
    }
}

fn walk_value(
    value: &Value,
    key_line: Option<usize>,
    path: &mut KeyPath,
    lines: &Lines,
    out: &mut BTreeMap<KeyPath, FileKey>,
) {
    let line = key_line.or_else(|| value.span().map(|s| lines.of(s.start)));
    match value {
        Value::InlineTable(table) => {
            if let Some(line) = line {
                record(out, path, line, false);
            }
            walk_inline(table, path, lines, out);
        }
        Value::Array(array) => {
            if let Some(line) = line {
                record(out, path, line, true);
            }
            for (index, element) in array.iter().enumerate() {
                path.push(Seg::Index(index));
                walk_value(element, None, path, lines, out);
                path.pop();
            }
        }
        _ => {
            if let Some(line) = line {
                record(out, path, line, true);
            }
        }
    }
}

fn walk_inline(
    table: &InlineTable,
    path: &mut KeyPath,
    lines: &Lines,
    out: &mut BTreeMap<KeyPath, FileKey>,
) {
    for (name, value) in table.iter() {
        path.push(Seg::Key(name.to_owned()));
        let key_line = table
            .key(name)
            .and_then(|k| k.span())
            .map(|s| lines.of(s.start));
        walk_value(value, key_line, path, lines, out);
        path.pop();
    }
}
