//! Rendering the effective configuration as TOML without leaking secrets.

use serde_json::Value as Json;
use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

/// Renders `value` as TOML with every secret hidden as
/// `cascade_actors::secrets` decides (keys named like secrets, every `env`
/// value, webhook URLs, secret arguments, passwords inside URLs), keeping
/// the shape so the output is itself a configuration. Unset optional values
/// (`None`) are left out, since TOML has no null.
pub fn render_redacted<T: serde::Serialize>(value: &T) -> Result<String, String> {
    let mut json =
        serde_json::to_value(value).map_err(|e| format!("cannot serialize configuration: {e}"))?;
    cascade_actors::secrets::redact_config(&mut json);
    let Json::Object(map) = json else {
        return Err("configuration does not serialize to a table".to_owned());
    };
    let mut doc = DocumentMut::new();
    fill_table(doc.as_table_mut(), &map);
    Ok(doc.to_string())
}

fn fill_table(table: &mut Table, map: &serde_json::Map<String, Json>) {
    for (key, value) in map {
        match value {
            Json::Null => {}
            Json::Object(inner) => {
                let mut child = Table::new();
                fill_table(&mut child, inner);
                // Hides headers of tables that only hold tables (`[tiers]`
                // above `[tiers.local]`) while keeping empty ones visible.
                child.set_implicit(!inner.is_empty());
                table.insert(key, Item::Table(child));
            }
            Json::Array(items) if !items.is_empty() && items.iter().all(Json::is_object) => {
                let mut array = ArrayOfTables::new();
                for item in items {
                    let mut child = Table::new();
                    if let Json::Object(inner) = item {
                        fill_table(&mut child, inner);
                    }
                    array.push(child);
                }
                table.insert(key, Item::ArrayOfTables(array));
            }
            other => {
                if let Some(v) = to_value(other) {
                    table.insert(key, Item::Value(v));
                }
            }
        }
    }
}

fn to_value(value: &Json) -> Option<Value> {
    Some(match value {
        Json::Null => return None,
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            // Integers beyond i64 do not fit TOML; a string keeps every digit.
            _ if n.is_u64() => Value::from(n.to_string()),
            (None, Some(f)) => Value::from(f),
            (None, None) => Value::from(n.to_string()),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => {
            let mut array = Array::new();
            for item in items {
                if let Some(v) = to_value(item) {
                    array.push(v);
                }
            }
            Value::Array(array)
        }
        Json::Object(map) => {
            let mut inline = InlineTable::new();
            for (k, v) in map {
                if let Some(v) = to_value(v) {
                    inline.insert(k, v);
                }
            }
            Value::InlineTable(inline)
        }
    })
}
