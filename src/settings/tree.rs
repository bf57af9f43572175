//! Conversions between `config` values and JSON, and path edits on JSON.
//!
//! Validation works on a `serde_json::Value` because it can be edited (bad
//! keys removed) and re-deserialized cheaply; `config::Value` cannot.

use config::ValueKind;
use serde_json::{Number, Value as Json};

use super::keys::Seg;

pub(crate) fn config_to_json(value: &config::Value) -> Json {
    match &value.kind {
        ValueKind::Nil => Json::Null,
        ValueKind::Boolean(b) => Json::Bool(*b),
        ValueKind::I64(i) => Json::from(*i),
        ValueKind::U64(u) => Json::from(*u),
        ValueKind::I128(i) => match (i64::try_from(*i), u64::try_from(*i)) {
            (Ok(i), _) => Json::from(i),
            (_, Ok(u)) => Json::from(u),
            _ => Json::String(i.to_string()),
        },
        ValueKind::U128(u) => match u64::try_from(*u) {
            Ok(u) => Json::from(u),
            Err(_) => Json::String(u.to_string()),
        },
        // JSON has no NaN or infinity; keeping the spelling as a string lets
        // the type error show the user what they wrote.
        ValueKind::Float(f) => {
            Number::from_f64(*f).map_or_else(|| Json::String(f.to_string()), Json::Number)
        }
        ValueKind::String(s) => Json::String(s.clone()),
        ValueKind::Table(table) => Json::Object(
            table
                .iter()
                .map(|(k, v)| (k.clone(), config_to_json(v)))
                .collect(),
        ),
        ValueKind::Array(array) => Json::Array(array.iter().map(config_to_json).collect()),
    }
}

pub(crate) fn json_to_config(value: &Json, origin: &String) -> config::Value {
    let kind = match value {
        Json::Null => ValueKind::Nil,
        Json::Bool(b) => ValueKind::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ValueKind::I64(i),
            (None, Some(u), _) => ValueKind::U64(u),
            (None, None, Some(f)) => ValueKind::Float(f),
            (None, None, None) => ValueKind::String(n.to_string()),
        },
        Json::String(s) => ValueKind::String(s.clone()),
        Json::Array(items) => {
            ValueKind::Array(items.iter().map(|v| json_to_config(v, origin)).collect())
        }
        Json::Object(map) => ValueKind::Table(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_config(v, origin)))
                .collect(),
        ),
    };
    config::Value::new(Some(origin), kind)
}

pub(crate) fn get<'a>(root: &'a Json, path: &[Seg]) -> Option<&'a Json> {
    path.iter().try_fold(root, |node, seg| match (node, seg) {
        (Json::Object(map), Seg::Key(k)) => map.get(k),
        (Json::Array(items), Seg::Index(i)) => items.get(*i),
        _ => None,
    })
}

pub(crate) fn get_mut<'a>(root: &'a mut Json, path: &[Seg]) -> Option<&'a mut Json> {
    path.iter().try_fold(root, |node, seg| match (node, seg) {
        (Json::Object(map), Seg::Key(k)) => map.get_mut(k),
        (Json::Array(items), Seg::Index(i)) => items.get_mut(*i),
        _ => None,
    })
}

/// Removes the node at `path`; false when there is nothing to remove (the
/// root cannot be removed).
pub(crate) fn remove(root: &mut Json, path: &[Seg]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match (get_mut(root, parent), last) {
        (Some(Json::Object(map)), Seg::Key(k)) => map.remove(k).is_some(),
        (Some(Json::Array(items)), Seg::Index(i)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

/// Mirror of a JSON tree that remembers each array element's index in the
/// merged configuration, so problems found after earlier elements were
/// removed still name the index the user wrote.
#[derive(Debug)]
pub(crate) enum Shadow {
    Leaf,
    Object(std::collections::BTreeMap<String, Shadow>),
    Array(Vec<(usize, Shadow)>),
}

impl Shadow {
    pub(crate) fn of(value: &Json) -> Self {
        match value {
            Json::Object(map) => {
                Self::Object(map.iter().map(|(k, v)| (k.clone(), Self::of(v))).collect())
            }
            Json::Array(items) => Self::Array(items.iter().map(Self::of).enumerate().collect()),
            _ => Self::Leaf,
        }
    }

    pub(crate) fn original(&self, path: &[Seg]) -> Vec<Seg> {
        let mut node = Some(self);
        path.iter()
            .map(|seg| match (node, seg) {
                (Some(Self::Object(map)), Seg::Key(k)) => {
                    node = map.get(k);
                    seg.clone()
                }
                (Some(Self::Array(items)), Seg::Index(i)) => match items.get(*i) {
                    Some((original, child)) => {
                        node = Some(child);
                        Seg::Index(*original)
                    }
                    None => {
                        node = None;
                        seg.clone()
                    }
                },
                _ => {
                    node = None;
                    seg.clone()
                }
            })
            .collect()
    }

    pub(crate) fn remove(&mut self, path: &[Seg]) {
        let Some((last, parent)) = path.split_last() else {
            return;
        };
        let mut node = self;
        for seg in parent {
            let next = match (node, seg) {
                (Self::Object(map), Seg::Key(k)) => map.get_mut(k),
                (Self::Array(items), Seg::Index(i)) => items.get_mut(*i).map(|(_, c)| c),
                _ => None,
            };
            match next {
                Some(child) => node = child,
                None => return,
            }
        }
        match (node, last) {
            (Self::Object(map), Seg::Key(k)) => {
                map.remove(k);
            }
            (Self::Array(items), Seg::Index(i)) if *i < items.len() => {
                items.remove(*i);
            }
            _ => {}
        }
    }
}
