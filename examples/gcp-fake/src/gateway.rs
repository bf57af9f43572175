//! The front door shared by the Compute and Cloud Run admin fakes: finds the discovery method a
//! request calls, checks its bearer token and validates it against the discovery document,
//! recording every refusal in [`crate::FakeGcp::rejections`].

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri, header};
use serde_json::Value;

use crate::Shared;
use crate::api_error::ApiError;
use crate::discovery::{self, Api};

/// A request that passed routing, authentication and validation.
pub(crate) struct Call {
    /// Discovery method id, e.g. "compute.instances.insert".
    pub method_id: String,
    /// Decoded path parameters by discovery name.
    pub params: BTreeMap<String, String>,
    pub query: Vec<(String, String)>,
    /// The parsed body, for methods that take one.
    pub body: Option<Value>,
}

impl Call {
    pub(crate) fn param(&self, name: &str) -> &str {
        self.params
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The first value of query parameter `name`.
    pub(crate) fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A refused request: the method id if it routed (else "unknown") and the answer.
pub(crate) struct Refusal {
    pub method_id: String,
    pub error: ApiError,
}

/// Routes, authenticates and validates one request.
pub(crate) fn admit(
    shared: &Shared,
    api: Api,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Call, Refusal> {
    let error = |status: u16, message: String| match api {
        Api::Compute => ApiError::compute(status, message),
        Api::Run => ApiError::run(status, message),
    };
    let document = discovery::document(api);
    let path = uri.path();
    let Some(routed) = document.route(method.as_str(), path) else {
        shared.reject(format!("{method} {path}: no discovery method matches"));
        return Err(Refusal {
            method_id: "unknown".into(),
            error: error(
                404,
                format!("The requested URL {path} was not found on this server."),
            ),
        });
    };
    let method_id = routed.method.id.clone();
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| !token.trim().is_empty());
    if !authorized {
        shared.reject(format!("{method_id}: no bearer token"));
        return Err(Refusal {
            method_id,
            error: ApiError::unauthenticated(api == Api::Compute),
        });
    }
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match document.validate(&routed, &query, body) {
        Ok(body) => Ok(Call {
            method_id,
            params: routed.path_params,
            query,
            body,
        }),
        Err(rejection) => {
            shared.reject(format!("{method_id}: {}", rejection.message));
            Err(Refusal {
                method_id,
                error: error(rejection.status, rejection.message),
            })
        }
    }
}
