//! Request validation against Google's own discovery documents (vendored gzipped in
//! `discovery/`): finds the method a request calls from its verb and path, then checks its path
//! parameters, query parameters and JSON body the way Google's front end does, answering with
//! Google's wording so a failing test shows what the real API would have said.
//!
//! Invariant: nothing here does I/O or keeps state; the parsed documents are loaded once per
//! process and shared read-only.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// The two APIs the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Compute,
    Run,
}

static COMPUTE_GZ: &[u8] = include_bytes!("../discovery/compute.v1.json.gz");
static RUN_GZ: &[u8] = include_bytes!("../discovery/run.v2.json.gz");

/// Query parameters google-cloud-rust adds to every call that are not in the documents:
/// `$alt` (`json`, or `json;enum-encoding=int` for Cloud Run) and `$apiVersion`.
const CLIENT_SYSTEM_PARAMS: &[&str] = &["$apiVersion"];

/// One parsed discovery document.
pub(crate) struct Document {
    /// Path prefix every method path is relative to ("/compute/v1/" or "/").
    prefix: String,
    methods: Vec<Method>,
    schemas: Map<String, Value>,
    system_params: BTreeMap<String, Param>,
}

/// One REST method of a document.
#[derive(Debug)]
pub(crate) struct Method {
    /// e.g. "compute.instances.insert".
    pub id: String,
    pub http_method: String,
    /// `flatPath` (single-segment variables only), used to route.
    flat: Template,
    /// `path` (may hold `{+name}` multi-segment variables), used to extract parameter values.
    path: Template,
    params: BTreeMap<String, Param>,
    /// Schema id of the request body, if the method takes one.
    pub request: Option<String>,
}

#[derive(Debug, Clone)]
struct Param {
    location: Location,
    ty: String,
    format: Option<String>,
    pattern: Option<String>,
    enum_values: Option<Vec<String>>,
    required: bool,
    repeated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    Path,
    Query,
}

#[derive(Debug)]
struct Template {
    parts: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Literal(String),
    /// `{name}` (one segment) or `{+name}` (one or more segments).
    Var {
        name: String,
        multi: bool,
    },
}

/// A request matched to a method, with its decoded path parameters.
pub(crate) struct Routed<'d> {
    pub method: &'d Method,
    pub path_params: BTreeMap<String, String>,
}

/// Why a request was refused: the HTTP status and Google's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub status: u16,
    pub message: String,
}

impl Rejection {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

/// Both documents, parsed once per process.
pub(crate) fn document(api: Api) -> &'static Document {
    static COMPUTE: OnceLock<Document> = OnceLock::new();
    static RUN: OnceLock<Document> = OnceLock::new();
    match api {
        Api::Compute => COMPUTE.get_or_init(|| Document::load(COMPUTE_GZ)),
        Api::Run => RUN.get_or_init(|| Document::load(RUN_GZ)),
    }
}

// === impl Document ===

impl Document {
    /// Parses a vendored document. The documents are compiled in, so a failure here is a build
    /// defect, not bad input.
    fn load(gz: &[u8]) -> Document {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .expect("vendored discovery document is valid gzip");
        let doc: Value = serde_json::from_str(&text).expect("vendored discovery document is JSON");
        let prefix = format!("/{}", doc["servicePath"].as_str().unwrap_or_default());
        let mut methods = Vec::new();
        collect_methods(&doc, &mut methods);
        let system_params = doc["parameters"]
            .as_object()
            .map(|params| {
                params
                    .iter()
                    .filter_map(|(name, p)| Some((name.clone(), Param::parse(p)?)))
                    .collect()
            })
            .unwrap_or_default();
        Document {
            prefix,
            methods,
            schemas: doc["schemas"].as_object().cloned().unwrap_or_default(),
            system_params,
        }
    }

    /// Finds the method `verb path` calls. When several templates match (a custom verb such as
    /// `:getIamPolicy` also matches a plain `{id}` segment), the one with the most literal text wins.
    pub(crate) fn route(&self, verb: &str, path: &str) -> Option<Routed<'_>> {
        let rest = path.strip_prefix(&self.prefix)?;
        let method = self
            .methods
            .iter()
            .filter(|m| m.http_method.eq_ignore_ascii_case(verb))
            .filter(|m| m.flat.matches(rest).is_some())
            .max_by_key(|m| m.flat.literal_len())?;
        let raw = method
            .path
            .matches(rest)
            .or_else(|| method.flat.matches(rest))?;
        let path_params = raw
            .into_iter()
            .map(|(k, v)| (k, percent_decode(&v)))
            .collect();
        Some(Routed {
            method,
            path_params,
        })
    }

    /// The method with this id (e.g. "compute.instances.insert").
    #[cfg(test)]
    pub(crate) fn method(&self, id: &str) -> Option<&Method> {
        self.methods.iter().find(|m| m.id == id)
    }

    /// Checks a routed request's path parameters, query string and body; returns the parsed
    /// body (if the method takes one).
    pub(crate) fn validate(
        &self,
        routed: &Routed<'_>,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Option<Value>, Rejection> {
        let method = routed.method;
        self.check_path_params(method, &routed.path_params)?;
        self.check_query(method, query)?;
        self.check_body(method, body)
    }

    fn check_path_params(
        &self,
        method: &Method,
        values: &BTreeMap<String, String>,
    ) -> Result<(), Rejection> {
        for (name, param) in method.params.iter() {
            if param.location != Location::Path {
                continue;
            }
            let Some(value) = values.get(name) else {
                if param.required {
                    return Err(Rejection::invalid(format!(
                        "Required field '{name}' not specified"
                    )));
                }
                continue;
            };
            if let Some(pattern) = &param.pattern
                && !full_match(pattern, value)
            {
                return Err(Rejection::invalid(format!(
                    "Invalid value for field '{name}': '{value}'. Must be a match of regex '{pattern}'"
                )));
            }
        }
        Ok(())
    }

    fn check_query(&self, method: &Method, query: &[(String, String)]) -> Result<(), Rejection> {
        let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
        for (name, value) in query {
            *seen.entry(name.as_str()).or_default() += 1;
            if name == "$alt" {
                if value != "json" && value != "json;enum-encoding=int" {
                    return Err(Rejection::invalid(format!(
                        "Invalid value at '$alt' (TYPE_STRING), \"{value}\""
                    )));
                }
                continue;
            }
            if CLIENT_SYSTEM_PARAMS.contains(&name.as_str()) {
                continue;
            }
            let param = method
                .params
                .get(name)
                .filter(|p| p.location == Location::Query)
                .or_else(|| self.system_params.get(name))
                .or_else(|| {
                    name.strip_prefix('$')
                        .and_then(|bare| self.system_params.get(bare))
                });
            let Some(param) = param else {
                return Err(Rejection::invalid(format!(
                    "Invalid JSON payload received. Unknown name \"{name}\": Cannot bind query parameter. Field '{name}' could not be found in request message."
                )));
            };
            check_scalar(param, name, value)?;
            if !param.repeated && seen[name.as_str()] > 1 {
                return Err(Rejection::invalid(format!(
                    "Invalid JSON payload received. Duplicate value for non-repeated query parameter \"{name}\"."
                )));
            }
        }
        for (name, param) in method.params.iter() {
            if param.location == Location::Query
                && param.required
                && !seen.contains_key(name.as_str())
            {
                return Err(Rejection::invalid(format!(
                    "Required field '{name}' not specified"
                )));
            }
        }
        Ok(())
    }

    fn check_body(&self, method: &Method, body: &[u8]) -> Result<Option<Value>, Rejection> {
        let text = std::str::from_utf8(body)
            .map_err(|_| Rejection::invalid("Invalid JSON payload received. Invalid UTF-8."))?;
        let Some(schema_id) = &method.request else {
            check_no_body(method, text)?;
            return Ok(None);
        };
        let root = body_field_name(schema_id);
        if text.trim().is_empty() {
            return Err(Rejection::invalid(format!(
                "Required field '{root}' not specified"
            )));
        }
        let value: Value = serde_json::from_str(text).map_err(|error| {
            Rejection::invalid(format!("Invalid JSON payload received. {error}"))
        })?;
        if !value.is_object() {
            return Err(Rejection::invalid(NOT_A_MESSAGE));
        }
        self.check_value(
            &Value::String(schema_id.clone()),
            true,
            &value,
            &root,
            &method.id,
        )
        .map_err(Rejection::invalid)?;
        Ok(Some(value))
    }

    /// Checks `value` against the document schema `schema_id` (e.g. "Instance"); the error names
    /// the offending field under `root`. Used on request bodies and, in tests, on the fake's own
    /// responses.
    #[cfg(test)]
    pub(crate) fn check_schema(
        &self,
        schema_id: &str,
        value: &Value,
        root: &str,
        method_id: &str,
    ) -> Result<(), String> {
        self.check_value(
            &Value::String(schema_id.to_string()),
            true,
            value,
            root,
            method_id,
        )
    }

    /// `schema` is either a schema object or (with `is_ref`) a schema id.
    fn check_value(
        &self,
        schema: &Value,
        is_ref: bool,
        value: &Value,
        at: &str,
        method_id: &str,
    ) -> Result<(), String> {
        let schema = if is_ref {
            let id = schema.as_str().unwrap_or_default();
            self.schemas
                .get(id)
                .ok_or_else(|| format!("Discovery document has no schema '{id}'"))?
        } else if let Some(id) = schema.get("$ref") {
            return self.check_value(id, true, value, at, method_id);
        } else {
            schema
        };
        if value.is_null() {
            return Ok(());
        }
        let ty = schema["type"].as_str().unwrap_or("any");
        let format = schema["format"].as_str();
        match ty {
            "object" => self.check_object(schema, value, at, method_id),
            "array" => {
                let items = value
                    .as_array()
                    .ok_or_else(|| type_error(at, "TYPE_LIST", value))?;
                for (i, item) in items.iter().enumerate() {
                    self.check_value(
                        &schema["items"],
                        false,
                        item,
                        &format!("{at}[{i}]"),
                        method_id,
                    )?;
                }
                Ok(())
            }
            "any" => Ok(()),
            _ => check_json_scalar(schema, ty, format, value, at),
        }
    }

    fn check_object(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        method_id: &str,
    ) -> Result<(), String> {
        let fields = value
            .as_object()
            .ok_or_else(|| type_error(at, "TYPE_MESSAGE", value))?;
        if schema["format"].as_str() == Some("google.protobuf.Any") {
            return Ok(());
        }
        if let Some(map_values) = schema.get("additionalProperties") {
            for (key, item) in fields {
                self.check_value(map_values, false, item, &format!("{at}[{key}]"), method_id)?;
            }
            return Ok(());
        }
        let empty = Map::new();
        let properties = schema["properties"].as_object().unwrap_or(&empty);
        for (key, item) in fields {
            let Some(property) = properties.get(key) else {
                return Err(format!(
                    "Invalid JSON payload received. Unknown name \"{key}\" at '{at}': Cannot find field."
                ));
            };
            self.check_value(property, false, item, &format!("{at}.{key}"), method_id)?;
        }
        for (key, property) in properties {
            let required = property["annotations"]["required"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id.as_str() == Some(method_id)));
            if required && fields.get(key).is_none_or(Value::is_null) {
                return Err(format!("Required field '{at}.{key}' not specified"));
            }
        }
        Ok(())
    }
}

/// Google's answer to a JSON body that is not an object.
const NOT_A_MESSAGE: &str =
    "Invalid JSON payload received. Unknown name \"\": Root element must be a message.";

/// The body of a method that takes none: a GET or DELETE must send nothing; a POST (such as
/// `zoneOperations.wait`) may send an empty object, as google-cloud-rust does, but no field.
fn check_no_body(method: &Method, text: &str) -> Result<(), Rejection> {
    if text.trim().is_empty() {
        return Ok(());
    }
    if !matches!(method.http_method.as_str(), "POST" | "PUT" | "PATCH") {
        return Err(Rejection::invalid(format!(
            "Invalid JSON payload received. {} is a {} method and takes no request body.",
            method.id, method.http_method
        )));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|error| Rejection::invalid(format!("Invalid JSON payload received. {error}")))?;
    let Some(fields) = value.as_object() else {
        return Err(Rejection::invalid(NOT_A_MESSAGE));
    };
    if let Some(name) = fields.keys().next() {
        return Err(Rejection::invalid(format!(
            "Invalid JSON payload received. Unknown name \"{name}\": Cannot find field."
        )));
    }
    Ok(())
}

fn collect_methods(node: &Value, out: &mut Vec<Method>) {
    if let Some(methods) = node["methods"].as_object() {
        for method in methods.values() {
            if let Some(parsed) = Method::parse(method) {
                out.push(parsed);
            }
        }
    }
    if let Some(resources) = node["resources"].as_object() {
        for resource in resources.values() {
            collect_methods(resource, out);
        }
    }
}

// === impl Method ===

impl Method {
    fn parse(method: &Value) -> Option<Method> {
        let path = method["path"].as_str()?;
        let flat = method["flatPath"].as_str().unwrap_or(path);
        Some(Method {
            id: method["id"].as_str()?.to_string(),
            http_method: method["httpMethod"].as_str()?.to_string(),
            flat: Template::parse(flat),
            path: Template::parse(path),
            params: method["parameters"]
                .as_object()
                .map(|params| {
                    params
                        .iter()
                        .filter_map(|(name, p)| Some((name.clone(), Param::parse(p)?)))
                        .collect()
                })
                .unwrap_or_default(),
            request: method["request"]["$ref"].as_str().map(str::to_string),
        })
    }
}

// === impl Param ===

impl Param {
    fn parse(p: &Value) -> Option<Param> {
        let location = match p["location"].as_str()? {
            "path" => Location::Path,
            "query" => Location::Query,
            _ => return None,
        };
        Some(Param {
            location,
            ty: p["type"].as_str().unwrap_or("string").to_string(),
            format: p["format"].as_str().map(str::to_string),
            pattern: p["pattern"].as_str().map(str::to_string),
            enum_values: p["enum"].as_array().map(|values| {
                values
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            }),
            required: p["required"].as_bool().unwrap_or(false),
            repeated: p["repeated"].as_bool().unwrap_or(false),
        })
    }
}

/// Checks one query-string value against its parameter's type, format and enum.
fn check_scalar(param: &Param, name: &str, value: &str) -> Result<(), Rejection> {
    let ok = match (param.ty.as_str(), param.format.as_deref()) {
        ("boolean", _) => value == "true" || value == "false",
        ("integer", Some("uint32")) => value.parse::<u32>().is_ok(),
        ("integer", _) => value.parse::<i32>().is_ok(),
        ("number", _) => value.parse::<f64>().is_ok(),
        ("string", Some("int64")) => value.parse::<i64>().is_ok(),
        ("string", Some("uint64")) => value.parse::<u64>().is_ok(),
        _ => true,
    };
    if !ok {
        return Err(Rejection::invalid(format!(
            "Invalid value at '{name}' ({}), \"{value}\"",
            proto_type(&param.ty, param.format.as_deref())
        )));
    }
    if let Some(values) = &param.enum_values
        && !values.iter().any(|v| v == value)
    {
        return Err(Rejection::invalid(format!(
            "Invalid value at '{name}' (TYPE_ENUM), \"{value}\""
        )));
    }
    if let Some(pattern) = &param.pattern
        && !full_match(pattern, value)
    {
        return Err(Rejection::invalid(format!(
            "Invalid value for field '{name}': '{value}'. Must be a match of regex '{pattern}'"
        )));
    }
    Ok(())
}

/// Checks a JSON scalar (string / integer / number / boolean, with format and enum) the way
/// proto3 JSON parsing does: 64-bit integers may be strings or numbers, enums names or numbers.
fn check_json_scalar(
    schema: &Value,
    ty: &str,
    format: Option<&str>,
    value: &Value,
    at: &str,
) -> Result<(), String> {
    let ok = match (ty, format) {
        ("boolean", _) => value.is_boolean(),
        ("integer", Some("uint32")) => integer_in(value, 0, u32::MAX as i128),
        ("integer", _) => integer_in(value, i32::MIN as i128, i32::MAX as i128),
        ("number", _) => {
            value.is_number()
                || value.as_str().is_some_and(|s| {
                    matches!(s, "NaN" | "Infinity" | "-Infinity") || s.parse::<f64>().is_ok()
                })
        }
        ("string", Some("int64")) => integer_in(value, i64::MIN as i128, i64::MAX as i128),
        ("string", Some("uint64")) => integer_in(value, 0, u64::MAX as i128),
        ("string", _) => value.is_string() || (schema.get("enum").is_some() && value.is_u64()),
        _ => true,
    };
    if !ok {
        return Err(type_error(at, proto_type(ty, format), value));
    }
    if let Some(values) = schema["enum"].as_array() {
        let known = match value {
            Value::String(s) => values.iter().any(|v| v.as_str() == Some(s)),
            Value::Number(n) => n.as_u64().is_some_and(|i| (i as usize) < values.len()),
            _ => false,
        };
        if !known {
            return Err(type_error(at, "TYPE_ENUM", value));
        }
    }
    Ok(())
}

fn integer_in(value: &Value, min: i128, max: i128) -> bool {
    let parsed = match value {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => s.parse::<i128>().ok(),
        _ => None,
    };
    parsed.is_some_and(|n| (min..=max).contains(&n))
}

fn type_error(at: &str, proto: &str, value: &Value) -> String {
    format!("Invalid value at '{at}' ({proto}), {value}")
}

fn proto_type(ty: &str, format: Option<&str>) -> &'static str {
    match (ty, format) {
        ("boolean", _) => "TYPE_BOOL",
        ("integer", Some("uint32")) => "TYPE_UINT32",
        ("integer", _) => "TYPE_INT32",
        ("number", Some("float")) => "TYPE_FLOAT",
        ("number", _) => "TYPE_DOUBLE",
        ("string", Some("int64")) => "TYPE_INT64",
        ("string", Some("uint64")) => "TYPE_UINT64",
        ("string", Some("byte")) => "TYPE_BYTES",
        _ => "TYPE_STRING",
    }
}

/// The request field a body binds to, as Google names it in messages: "Instance" → "instance",
/// "GoogleCloudRunV2Service" → "service".
fn body_field_name(schema_id: &str) -> String {
    let bare = schema_id
        .strip_prefix("GoogleCloudRunV2")
        .unwrap_or(schema_id);
    let mut chars = bare.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Whether `value` matches the whole of the RE2 `pattern` (discovery patterns are RE2; compute's
/// are unanchored, Cloud Run's anchored).
fn full_match(pattern: &str, value: &str) -> bool {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, Option<regex::Regex>>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let regex = cache
        .entry(pattern.to_string())
        .or_insert_with(|| regex::Regex::new(&format!("^(?:{pattern})$")).ok());
    // A pattern the regex crate cannot compile is not the client's fault: accept.
    regex.as_ref().is_none_or(|r| r.is_match(value))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

// === impl Template ===

impl Template {
    fn parse(template: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let inner = &rest[open + 1..open + close];
            let (name, multi) = match inner.strip_prefix('+') {
                Some(name) => (name, true),
                None => (inner, false),
            };
            parts.push(Part::Var {
                name: name.to_string(),
                multi,
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Template { parts }
    }

    fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.len(),
                Part::Var { .. } => 0,
            })
            .sum()
    }

    /// The variables' raw values if `path` matches the whole template.
    fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let mut values = BTreeMap::new();
        match_parts(&self.parts, path, &mut values).then_some(values)
    }
}

/// Backtracking match: a single-segment variable takes one or more characters without '/', a
/// multi-segment one any one or more characters.
fn match_parts(parts: &[Part], path: &str, values: &mut BTreeMap<String, String>) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return path.is_empty();
    };
    match first {
        Part::Literal(lit) => path
            .strip_prefix(lit.as_str())
            .is_some_and(|tail| match_parts(rest, tail, values)),
        Part::Var { name, multi } => {
            let limit = if *multi {
                path.len()
            } else {
                path.find('/').unwrap_or(path.len())
            };
            for end in (1..=limit).rev() {
                if !path.is_char_boundary(end) {
                    continue;
                }
                if match_parts(rest, &path[end..], values) {
                    values.insert(name.clone(), path[..end].to_string());
                    return true;
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INSTANCES: &str = "/compute/v1/projects/demo-project/zones/europe-west1-b/instances";

    fn good_instance() -> Value {
        json!({
            "name": "cascade-vm-1",
            "machineType": "zones/europe-west1-b/machineTypes/e2-small",
            "labels": {"cascade": "gcp_vm"},
            "disks": [{"boot": true, "autoDelete": true, "initializeParams": {
                "sourceImage": "projects/debian-cloud/global/images/family/debian-12",
                "diskSizeGb": "10"}}],
            "networkInterfaces": [{"network": "global/networks/default",
                "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}],
            "scheduling": {"provisioningModel": "SPOT", "preemptible": true,
                "instanceTerminationAction": "DELETE", "automaticRestart": false},
            "metadata": {"items": [{"key": "startup-script", "value": "#!/bin/sh\n"}]},
            "serviceAccounts": [{"email": "default", "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}],
        })
    }

    fn insert(query: &[(&str, &str)], body: &Value) -> Result<Option<Value>, Rejection> {
        let doc = document(Api::Compute);
        let routed = doc.route("POST", INSTANCES).expect("insert routes");
        assert_eq!(routed.method.id, "compute.instances.insert");
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        doc.validate(&routed, &query, body.to_string().as_bytes())
    }

    #[test]
    fn routes_compute_and_run_methods() {
        let compute = document(Api::Compute);
        let get = compute.route("GET", &format!("{INSTANCES}/vm-1")).unwrap();
        assert_eq!(get.method.id, "compute.instances.get");
        assert_eq!(get.path_params["instance"], "vm-1");
        assert_eq!(get.path_params["zone"], "europe-west1-b");
        let wait = compute
            .route(
                "POST",
                "/compute/v1/projects/p/zones/z/operations/operation-1/wait",
            )
            .unwrap();
        assert_eq!(wait.method.id, "compute.zoneOperations.wait");
        assert!(compute.route("GET", "/compute/v1/nowhere").is_none());
        assert!(
            compute
                .route("PUT", "/compute/v1/projects/p/zones/z/operations/op-1")
                .is_none()
        );

        let run = document(Api::Run);
        let get = run
            .route(
                "GET",
                "/v2/projects/p/locations/europe-west1/services/ecapa",
            )
            .unwrap();
        assert_eq!(get.method.id, "run.projects.locations.services.get");
        assert_eq!(
            get.path_params["name"],
            "projects/p/locations/europe-west1/services/ecapa"
        );
        let iam = run
            .route(
                "GET",
                "/v2/projects/p/locations/r/services/ecapa:getIamPolicy",
            )
            .unwrap();
        assert_eq!(
            iam.method.id,
            "run.projects.locations.services.getIamPolicy"
        );
    }

    #[test]
    fn good_insert_body_and_client_system_params_are_accepted() {
        let body = insert(
            &[
                ("$alt", "json"),
                ("$apiVersion", "2026-09-01"),
                ("requestId", "6c3c1b3e-4c1f-4d0a-9d6e-2f7f8f0c2a11"),
                ("prettyPrint", "false"),
            ],
            &good_instance(),
        )
        .expect("valid insert");
        assert_eq!(body.unwrap()["name"], "cascade-vm-1");
    }

    #[test]
    fn unknown_body_field_is_rejected_with_its_path() {
        let mut body = good_instance();
        body["scheduling"]["bogus"] = json!(1);
        let err = insert(&[], &body).unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(
            err.message,
            "Invalid JSON payload received. Unknown name \"bogus\" at 'instance.scheduling': Cannot find field."
        );
        let mut body = good_instance();
        body["foo"] = json!("x");
        let err = insert(&[], &body).unwrap_err();
        assert!(
            err.message.contains("Unknown name \"foo\" at 'instance'"),
            "{}",
            err.message
        );
    }

    #[test]
    fn wrong_types_are_rejected() {
        let mut body = good_instance();
        body["canIpForward"] = json!("yes");
        let err = insert(&[], &body).unwrap_err();
        assert!(
            err.message.contains("'instance.canIpForward' (TYPE_BOOL)"),
            "{}",
            err.message
        );

        let mut body = good_instance();
        body["disks"][0]["initializeParams"]["diskSizeGb"] = json!("ten");
        let err = insert(&[], &body).unwrap_err();
        assert!(
            err.message
                .contains("'instance.disks[0].initializeParams.diskSizeGb' (TYPE_INT64)"),
            "{}",
            err.message
        );

        let mut body = good_instance();
        body["labels"] = json!({"cascade": 5});
        let err = insert(&[], &body).unwrap_err();
        assert!(
            err.message
                .contains("'instance.labels[cascade]' (TYPE_STRING)"),
            "{}",
            err.message
        );

        let mut body = good_instance();
        body["networkInterfaces"] = json!({"network": "x"});
        let err = insert(&[], &body).unwrap_err();
        assert!(
            err.message
                .contains("'instance.networkInterfaces' (TYPE_LIST)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn int64_may_be_number_or_string() {
        let mut body = good_instance();
        body["disks"][0]["initializeParams"]["diskSizeGb"] = json!(10);
        assert!(insert(&[], &body).is_ok());
    }

    #[test]
    fn bad_enum_is_rejected() {
        let mut body = good_instance();
        body["scheduling"]["provisioningModel"] = json!("SPOTTY");
        let err = insert(&[], &body).unwrap_err();
        assert_eq!(
            err.message,
            "Invalid value at 'instance.scheduling.provisioningModel' (TYPE_ENUM), \"SPOTTY\""
        );
    }

    #[test]
    fn missing_required_body_field_is_rejected() {
        let mut body = good_instance();
        body.as_object_mut().unwrap().remove("name");
        let err = insert(&[], &body).unwrap_err();
        assert_eq!(err.message, "Required field 'instance.name' not specified");
        let doc = document(Api::Compute);
        let routed = doc.route("POST", INSTANCES).unwrap();
        let err = doc.validate(&routed, &[], b"").unwrap_err();
        assert_eq!(err.message, "Required field 'instance' not specified");
    }

    #[test]
    fn unknown_or_mistyped_query_params_are_rejected() {
        let err = insert(&[("x", "1")], &good_instance()).unwrap_err();
        assert_eq!(
            err.message,
            "Invalid JSON payload received. Unknown name \"x\": Cannot bind query parameter. Field 'x' could not be found in request message."
        );
        let err = insert(&[("$alt", "xml")], &good_instance()).unwrap_err();
        assert!(err.message.contains("'$alt'"), "{}", err.message);
        let err = insert(&[("alt", "xml")], &good_instance()).unwrap_err();
        assert!(err.message.contains("'alt' (TYPE_ENUM)"), "{}", err.message);

        let doc = document(Api::Compute);
        let list = doc.route("GET", INSTANCES).unwrap();
        let query = vec![("maxResults".to_string(), "lots".to_string())];
        let err = doc.validate(&list, &query, b"").unwrap_err();
        assert!(
            err.message.contains("'maxResults' (TYPE_UINT32)"),
            "{}",
            err.message
        );
        let query = vec![("prettyPrint".to_string(), "maybe".to_string())];
        let err = doc.validate(&list, &query, b"").unwrap_err();
        assert!(
            err.message.contains("'prettyPrint' (TYPE_BOOL)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn bad_path_param_is_rejected() {
        let doc = document(Api::Compute);
        let get = doc.route("GET", &format!("{INSTANCES}/Bad_Name")).unwrap();
        let err = doc.validate(&get, &[], b"").unwrap_err();
        assert!(
            err.message
                .starts_with("Invalid value for field 'instance': 'Bad_Name'"),
            "{}",
            err.message
        );
    }

    #[test]
    fn missing_required_query_param_is_rejected() {
        // No compute/run method the fake serves has a required query parameter; use one that does.
        let doc = document(Api::Compute);
        let (id, name) = doc
            .methods
            .iter()
            .find_map(|m| {
                m.params
                    .iter()
                    .find(|(_, p)| p.location == Location::Query && p.required)
                    .map(|(n, _)| (m.id.clone(), n.clone()))
            })
            .expect("compute has a method with a required query parameter");
        let method = doc.method(&id).unwrap();
        let routed = Routed {
            method,
            path_params: method
                .params
                .iter()
                .filter(|(_, p)| p.location == Location::Path)
                .map(|(n, _)| (n.clone(), "a1".to_string()))
                .collect(),
        };
        let body = if method.request.is_some() {
            &b"{}"[..]
        } else {
            b""
        };
        let err = doc.validate(&routed, &[], body).unwrap_err();
        assert_eq!(
            err.message,
            format!("Required field '{name}' not specified")
        );
    }

    #[test]
    fn body_on_a_method_without_one_is_rejected() {
        let doc = document(Api::Compute);
        let wait = doc
            .route(
                "POST",
                "/compute/v1/projects/p/zones/z/operations/op-1/wait",
            )
            .unwrap();
        assert!(doc.validate(&wait, &[], b"{}").is_ok());
        let err = doc
            .validate(&wait, &[], br#"{"timeout":"5s"}"#)
            .unwrap_err();
        assert!(
            err.message.contains("Unknown name \"timeout\""),
            "{}",
            err.message
        );
        for not_an_object in [&b"[]"[..], b"5", b"\"x\"", b"null", b"true"] {
            let err = doc.validate(&wait, &[], not_an_object).unwrap_err();
            assert_eq!(err.message, NOT_A_MESSAGE);
        }
        let err = doc.validate(&wait, &[], b"{").unwrap_err();
        assert!(err.message.starts_with("Invalid JSON payload received. "));

        let get = doc
            .route("GET", &format!("{INSTANCES}/vm-1"))
            .expect("get routes");
        assert!(doc.validate(&get, &[], b"").is_ok());
        for body in [&b"{}"[..], b"[]", b"x"] {
            let err = doc.validate(&get, &[], body).unwrap_err();
            assert!(
                err.message.contains("takes no request body"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn a_body_that_is_not_an_object_is_rejected() {
        for body in [json!([good_instance()]), json!("cascade-vm-1"), json!(7)] {
            let err = insert(&[], &body).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.message, NOT_A_MESSAGE);
        }
    }
}
