//! Which layer set which key, so problems can point at the file line, env var
//! or flag a bad value came from.

use std::path::PathBuf;

use toml_edit::{ImDocument, InlineTable, Item, Table, Value};

use super::keys::{KeyPath, Seg, is_prefix, split_key};
use super::{Problem, Source};

/// Where every key of the effective configuration came from.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    file: Option<PathBuf>,
    file_keys: Vec<FileKey>,
    env: Vec<(KeyPath, String)>,
    flags: Vec<(KeyPath, String)>,
}

#[derive(Debug, Clone)]
struct FileKey {
    path: KeyPath,
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
            .iter()
            .filter(|k| is_prefix(path, &k.path))
            .map(|k| k.line)
            .min()
        {
            return self.file_source(line);
        }
        Source::Default
    }

    fn file_line_covering(&self, path: &[Seg]) -> Option<usize> {
        self.file_keys
            .iter()
            .filter(|k| k.path == path || (k.leaf && is_prefix(&k.path, path)))
            .max_by_key(|k| (k.path.len(), std::cmp::Reverse(k.line)))
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
        let text = doc.raw();
        let mut keys = Vec::new();
        walk_table(doc.as_table(), &mut Vec::new(), text, &mut keys);
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

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn walk_table(table: &Table, path: &mut KeyPath, text: &str, out: &mut Vec<FileKey>) {
    for (name, item) in table.iter() {
        path.push(Seg::Key(name.to_owned()));
        let key_line = table
            .key(name)
            .and_then(|k| k.span())
            .map(|s| line_of(text, s.start));
        walk_item(item, key_line, path, text, out);
        path.pop();
    }
}

fn walk_item(
    item: &Item,
    key_line: Option<usize>,
    path: &mut KeyPath,
    text: &str,
    out: &mut Vec<FileKey>,
) {
    match item {
        Item::None => {}
        Item::Value(value) => walk_value(value, key_line, path, text, out),
        Item::Table(table) => {
            // Implicit and dotted tables have no header line of their own;
            // their keys carry the lines.
            let header = table
                .span()
                .filter(|_| !table.is_implicit() && !table.is_dotted());
            if let Some(span) = header {
                out.push(FileKey {
                    path: path.clone(),
                    line: line_of(text, span.start),
                    leaf: false,
                });
            }
            walk_table(table, path, text, out);
        }
        Item::ArrayOfTables(array) => {
            for (index, table) in array.iter().enumerate() {
                path.push(Seg::Index(index));
                if let Some(span) = table.span() {
                    out.push(FileKey {
                        path: path.clone(),
                        line: line_of(text, span.start),
                        leaf: false,
                    });
                }
                walk_table(table, path, text, out);
                path.pop();
            }
        }
    }
}

fn walk_value(
    value: &Value,
    key_line: Option<usize>,
    path: &mut KeyPath,
    text: &str,
    out: &mut Vec<FileKey>,
) {
    let line = key_line.or_else(|| value.span().map(|s| line_of(text, s.start)));
    match value {
        Value::InlineTable(table) => {
            if let Some(line) = line {
                out.push(FileKey {
                    path: path.clone(),
                    line,
                    leaf: false,
                });
            }
            walk_inline(table, path, text, out);
        }
        Value::Array(array) => {
            if let Some(line) = line {
                out.push(FileKey {
                    path: path.clone(),
                    line,
                    leaf: true,
                });
            }
            for (index, element) in array.iter().enumerate() {
                path.push(Seg::Index(index));
                walk_value(element, None, path, text, out);
                path.pop();
            }
        }
        _ => {
            if let Some(line) = line {
                out.push(FileKey {
                    path: path.clone(),
                    line,
                    leaf: true,
                });
            }
        }
    }
}

fn walk_inline(table: &InlineTable, path: &mut KeyPath, text: &str, out: &mut Vec<FileKey>) {
    for (name, value) in table.iter() {
        path.push(Seg::Key(name.to_owned()));
        let key_line = table
            .key(name)
            .and_then(|k| k.span())
            .map(|s| line_of(text, s.start));
        walk_value(value, key_line, path, text, out);
        path.pop();
    }
}
