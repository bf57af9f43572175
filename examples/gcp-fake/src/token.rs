//! The OAuth 2.0 token endpoint (`POST /token`, like https://oauth2.googleapis.com/token) for
//! the JWT-bearer grant a service-account key uses, and the signing key every fake ID token is
//! signed with.
//!
//! The RSA key pair in `test-sa-key.pem` / `test-sa-key.pub.pem` was generated for these tests
//! only; it protects nothing and must never be used outside the fake.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use crate::Shared;
use crate::server::unix_now;

/// PKCS#8 private key of the fake service account (test-only, see the module doc).
pub(crate) const PRIVATE_KEY_PEM: &str = include_str!("test-sa-key.pem");
const PUBLIC_KEY_PEM: &str = include_str!("test-sa-key.pub.pem");
/// `private_key_id` of the key file, and `kid` of every token the fake signs.
pub(crate) const PRIVATE_KEY_ID: &str = "3f1c6e0b9a2d4e5f8a7b6c5d4e3f2a1b0c9d8e7f";
/// The numeric id Google puts in `sub` for the fake service account.
pub(crate) const SERVICE_ACCOUNT_ID: &str = "104729351082647282920";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Longest assertion lifetime Google accepts.
const MAX_ASSERTION_LIFETIME: u64 = 3600;

/// The fake's signing and verifying keys.
pub(crate) struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    /// The keys are compiled in, so failing to parse them is a build defect.
    pub(crate) fn load() -> Keys {
        Keys {
            encoding: EncodingKey::from_rsa_pem(PRIVATE_KEY_PEM.as_bytes())
                .expect("test private key is a valid PKCS#8 RSA PEM"),
            decoding: DecodingKey::from_rsa_pem(PUBLIC_KEY_PEM.as_bytes())
                .expect("test public key is a valid RSA PEM"),
        }
    }

    /// An RS256 JWT with `kid` = [`PRIVATE_KEY_ID`].
    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(PRIVATE_KEY_ID.to_string());
        // Signing a JSON object with a valid RSA key cannot fail.
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap_or_default()
    }

    /// Verifies an RS256 signature and `exp` (no audience check), returning the claims.
    pub(crate) fn verify(&self, token: &str) -> Result<Value, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<Value>(token, &self.decoding, &validation).map(|data| data.claims)
    }
}

/// The email of the fake service account whose key [`crate::FakeGcp::service_account_key_json`]
/// hands out.
pub(crate) fn client_email(project: &str) -> String {
    format!("cascade-fake@{project}.iam.gserviceaccount.com")
}

/// Claims of a Google-signed ID token.
pub(crate) fn id_token_claims(audience: &str, email: &str, lifetime: Duration) -> Value {
    let now = unix_now();
    json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "azp": email,
        "sub": SERVICE_ACCOUNT_ID,
        "email": email,
        "email_verified": true,
        "iat": now,
        "exp": now + lifetime.as_secs(),
    })
}

pub(crate) fn router(shared: std::sync::Arc<Shared>) -> Router {
    Router::new()
        .route("/token", post(token))
        .with_state(shared)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token(State(shared): State<std::sync::Arc<Shared>>, body: String) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(status) = shared.lock().fail_token_requests {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return oauth_error(status, "internal_failure", "Injected failure.");
    }
    match field("grant_type") {
        Some(JWT_BEARER) => {}
        Some(other) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Invalid grant_type: ",
            );
        }
    }
    let Some(assertion) = field("assertion") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    let claims = match check_assertion(&shared, assertion) {
        Ok(claims) => claims,
        Err(description) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description);
        }
    };
    let email = client_email(&shared.options.project);
    let lifetime = shared.lock().token_lifetime;
    if let Some(audience) = claims["target_audience"].as_str().filter(|a| !a.is_empty()) {
        let id_token = shared
            .keys
            .sign(&id_token_claims(audience, &email, lifetime));
        shared.lock().id_tokens.token_endpoint += 1;
        return Json(json!({ "id_token": id_token })).into_response();
    }
    if claims["scope"].as_str().is_some_and(|s| !s.is_empty()) {
        let access_token = {
            let mut state = shared.lock();
            state.access_tokens += 1;
            format!("ya29.fake-access-token-{}", state.access_tokens)
        };
        return Json(json!({
            "access_token": access_token,
            "expires_in": lifetime.as_secs(),
            "token_type": "Bearer",
        }))
        .into_response();
    }
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_scope",
        "Invalid OAuth scope or ID token audience provided.",
    )
}

/// Checks a JWT-bearer assertion the way Google does; the error is Google's description.
fn check_assertion(shared: &Shared, assertion: &str) -> Result<Value, &'static str> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "Invalid JWT Signature.")?;
    if header.alg != Algorithm::RS256 {
        return Err("Invalid JWT Signature.");
    }
    let claims = shared.keys.verify(assertion).map_err(|error| {
        match error.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."
            }
            _ => "Invalid JWT Signature.",
        }
    })?;
    if claims["iss"].as_str() != Some(client_email(&shared.options.project).as_str()) {
        return Err("Invalid grant: account not found");
    }
    if claims["aud"].as_str() != Some(shared.endpoints.token_uri.as_str()) {
        return Err("Invalid JWT: Failed audience check.");
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    };
    if exp <= unix_now() || exp < iat || exp - iat > MAX_ASSERTION_LIFETIME {
        return Err(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    Ok(claims)
}
