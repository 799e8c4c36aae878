//! Routes machines of one app call on each other over the private network.
//!
//! `GET /_internal/tenants/<id>/position`: the holder's confirmed slot, for
//! a follower's read without a bookmark (ReadIndex). Answered only through
//! the tenant's actor, which refuses once its lease is not valid: a
//! deposed holder never names a position that misses its successor's
//! acknowledged writes. With `--api-token` set, callers send it.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, bearer_matches, error};
use crate::TenantId;
use crate::tenant::follower::push;

pub(super) async fn position(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = &state.api_token
        && !bearer_matches(&headers, token)
    {
        let message = "missing or wrong API token: send Authorization: Bearer $TENANTD_API_TOKEN";
        return error(StatusCode::UNAUTHORIZED, message);
    }
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let not_holder = || {
        error(
            StatusCode::CONFLICT,
            &format!("this machine does not hold customer {id}"),
        )
    };
    let Some(handle) = state.registry.local(&id) else {
        return not_holder();
    };
    let follower = query.get("follower").map(String::as_str);
    match state
        .followers
        .answer_position(&id, &handle, follower)
        .await
    {
        Ok((confirmed, epoch)) => Json(json!({
            "customer_id": id.as_str(),
            "confirmed": confirmed,
            "epoch": epoch,
            "machine_id": state.machine_id,
        }))
        .into_response(),
        Err(_) => not_holder(),
    }
}

/// `POST /_internal/tenants/<id>/push`: a confirmed log object from the
/// tenant's holder (metadata as headers). Needs the API token: a pushed
/// object is checked like one read from the log (chain, epoch, token),
/// but only a machine of the app may send one.
pub(super) async fn push(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = state.followers.api_token() else {
        return error(
            StatusCode::NOT_FOUND,
            "follower reads are off on this machine: set TENANTD_API_TOKEN (--api-token)",
        );
    };
    if !bearer_matches(&headers, token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API token");
    }
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut metadata = crate::store::Metadata::new();
    for name in push::PUSHED_HEADERS {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            metadata.insert(name.to_string(), value.to_string());
        }
    }
    match state.followers.accept(&id, &metadata, body).await {
        Ok(applied) => Json(json!({"applied": applied})).into_response(),
        Err(message) => error(StatusCode::BAD_REQUEST, &message),
    }
}
