//! Google's JSON error shape (`{"error": {"code", "message", "status", "errors": [...]}}`) and
//! the mapping from HTTP status to canonical status name and legacy `reason`, shared by the
//! Compute and Cloud Run admin fakes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer from a Google API.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    /// Legacy `errors[].reason`; None for APIs (Cloud Run v2) that send no `errors` array.
    pub reason: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the reason Compute Engine gives for `status`.
    pub(crate) fn compute(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason: Some(reason_for(status)),
            retry_after: None,
        }
    }

    /// An error in the AIP-193 shape Cloud Run v2 uses (no `errors` array).
    pub(crate) fn run(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason: None,
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, retry_after: Option<u64>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The 401 Google answers a request without a bearer token.
    pub(crate) fn unauthenticated(with_errors: bool) -> Self {
        let message = "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
        Self {
            status: 401,
            message: message.into(),
            reason: with_errors.then_some("required"),
            retry_after: None,
        }
    }

    pub(crate) fn body(&self) -> serde_json::Value {
        let mut error = json!({
            "code": self.status,
            "message": self.message,
            "status": status_name(self.status),
        });
        if let Some(reason) = self.reason {
            error["errors"] = json!([{
                "message": self.message,
                "domain": "global",
                "reason": reason,
            }]);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == 401 {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
            );
        }
        response
    }
}

/// The canonical status name Google pairs with an HTTP status.
pub(crate) fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ALREADY_EXISTS",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ if status >= 500 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

/// The legacy `errors[].reason` Compute Engine pairs with an HTTP status.
fn reason_for(status: u16) -> &'static str {
    match status {
        400 => "invalid",
        401 => "required",
        403 => "forbidden",
        404 => "notFound",
        409 => "alreadyExists",
        412 => "conditionNotMet",
        429 => "rateLimitExceeded",
        501 => "notImplemented",
        503 => "backendError",
        _ if status >= 500 => "backendError",
        _ => "invalid",
    }
}
