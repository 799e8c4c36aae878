//! `POST /customers/<id>/sql`: statements run in one transaction on the
//! tenant's holder, answered once what they wrote is durable in the store.
//!
//! The request is checked here (token, id, body) before it is routed, so
//! a malformed one is refused by whichever machine it reaches first; a
//! well-formed one is routed exactly like a counter request.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, Forwardable, Served, answered_by, error, idempotency_key, serve};
use crate::TenantId;
use crate::tenant::SqlAnswer;
use crate::tenant::sql::{SqlError, SqlErrorKind, SqlRequest};

pub(super) async fn sql(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Forwardable {
        method,
        uri,
        headers,
        body,
    };
    let (response, outcome) = sql_inner(&state, &id, request).await;
    state
        .metrics
        .requests
        .with_label_values(&["sql", outcome])
        .inc();
    response
}

async fn sql_inner(state: &AppState, id: &str, request: Forwardable) -> (Response, &'static str) {
    let access = match super::auth::authorize(state, &request.headers, id) {
        Ok(access) => access,
        Err((status, message, outcome)) => return (error(status, &message), outcome),
    };
    let id = match TenantId::parse(id) {
        Ok(id) => id,
        Err(e) => {
            return (
                error(StatusCode::BAD_REQUEST, &e.to_string()),
                "bad_request",
            );
        }
    };
    let key = match idempotency_key(&request.headers) {
        Ok(key) => key,
        Err(message) => return (error(StatusCode::BAD_REQUEST, &message), "bad_request"),
    };
    let parsed = match SqlRequest::parse(&request.body, &state.sql_limits) {
        Ok(parsed) => Arc::new(parsed),
        Err(e) => return refused(&e),
    };
    if access.read_only && !parsed.read_only {
        let message = "this token is read-only: send \"read_only\": true (writes need a read-write token: tenantd tokens create without --read-only)";
        return (error(StatusCode::FORBIDDEN, message), "denied");
    }
    let served = serve(state, &id, request, |handle| {
        let (parsed, key) = (parsed.clone(), key.clone());
        async move { handle.sql(parsed, key).await }
    })
    .await;
    match served {
        Served::Here(answer) => {
            let outcome = if answer.repeated {
                "repeated"
            } else {
                "served"
            };
            (render(state, &id, answer), outcome)
        }
        Served::Done(response, outcome) => (response, outcome),
    }
}

fn render(state: &AppState, id: &TenantId, answer: SqlAnswer) -> Response {
    let mut response = Json(json!({
        "customer_id": id.as_str(),
        "machine_id": state.machine_id,
        "epoch": answer.epoch,
        "results": &*answer.results,
    }))
    .into_response();
    answered_by(&mut response, &state.machine_id, answer.repeated);
    response
}

/// A refused request: 403 when a rule denied it, 413 for an answer over
/// its budget, 409 when the counter's statements fail on the tenant's
/// changes to `welcome`, 503 when shutdown interrupted it, 400 otherwise,
/// 422 when its idempotency key names another request; the body names
/// the statement at fault.
pub(super) fn refused(refused: &SqlError) -> (Response, &'static str) {
    let (status, outcome) = match refused.kind {
        SqlErrorKind::Denied => (StatusCode::FORBIDDEN, "denied"),
        SqlErrorKind::Invalid | SqlErrorKind::Limit => (StatusCode::BAD_REQUEST, "bad_request"),
        SqlErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        SqlErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
        SqlErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        SqlErrorKind::KeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "key_reused"),
    };
    let body = json!({
        "error": refused.message,
        "statement": refused.statement,
        "code": refused.kind.as_str(),
    });
    ((status, Json(body)).into_response(), outcome)
}
