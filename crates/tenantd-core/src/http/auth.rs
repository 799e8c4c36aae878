//! Who may reach a tenant's data: the API token (every tenant), or a
//! tenant token (its tenant only, perhaps read-only), verified here with
//! the configured public keys, without a store round trip.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, header};

use super::{AppState, bearer_matches};
use crate::token::{TokenError, TokenVerifier};

/// What the presented token allows on the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Access {
    pub read_only: bool,
}

/// A refusal: status, message and the metrics outcome.
pub(super) type Refusal = (StatusCode, String, &'static str);

pub(super) fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<Access, Refusal> {
    if state.api_token.is_none() && state.tokens.is_none() {
        return Err((
            StatusCode::NOT_FOUND,
            "the SQL API is disabled on this machine: set TENANTD_API_TOKEN (--api-token) or TENANTD_TOKEN_PUBLIC_KEY to enable it".into(),
            "not_found",
        ));
    }
    if let Some(token) = &state.api_token
        && bearer_matches(headers, token)
    {
        return Ok(Access { read_only: false });
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = |message: String| Err((StatusCode::UNAUTHORIZED, message, "unauthorized"));
    let (Some(verifier), Some(presented)) = (&state.tokens, presented) else {
        return unauthorized(
            "missing or wrong token: send Authorization: Bearer <token> with $TENANTD_API_TOKEN or a tenant token (tenantd tokens create)".into(),
        );
    };
    if !TokenVerifier::looks_like_token(presented) {
        return unauthorized(
            "wrong token: neither the API token nor a tenant token (tenantd tokens create)".into(),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match verifier.verify(presented, now) {
        Ok(claims) if claims.id == id => Ok(Access {
            read_only: claims.read_only(),
        }),
        Ok(claims) => Err((
            StatusCode::FORBIDDEN,
            format!(
                "this token opens customer {} only, not customer {id}: create one with tenantd tokens create --customer-id {id}",
                claims.id
            ),
            "forbidden",
        )),
        Err(e @ TokenError::Expired(_)) => unauthorized(e.to_string()),
        Err(e) => unauthorized(e.to_string()),
    }
}
