//! Routes machines of one app call on each other over the private network.
//!
//! `GET /_internal/tenants/<id>/position`: the holder's confirmed slot, for
//! a follower's read without a bookmark (ReadIndex). Answered only through
//! the tenant's actor, which refuses once its lease is not valid: a
//! deposed holder never names a position that misses its successor's
//! acknowledged writes. With `--api-token` set, callers send it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, bearer_matches, error};
use crate::TenantId;
use crate::tenant::Op;

pub(super) async fn position(
    State(state): State<AppState>,
    Path(id): Path<String>,
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
    // Through the actor: it checks its lease before it answers.
    match handle.call(Op::Read).await {
        Ok(answer) => Json(json!({
            "customer_id": id.as_str(),
            "confirmed": handle.confirmed(),
            "epoch": answer.epoch,
            "machine_id": state.machine_id,
        }))
        .into_response(),
        Err(_) => not_holder(),
    }
}
