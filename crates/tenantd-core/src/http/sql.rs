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
use crate::tenant::follower::bookmark::{self, Role, Wanted};
use crate::tenant::follower::{FollowError, FollowerAnswer, ReadRoute};
use crate::tenant::sql::{SqlError, SqlErrorKind, SqlRequest};
use crate::tenant::{SqlAnswer, TenantError, TenantHandle};

/// How long a holder waits for a bookmark it has not confirmed yet (a
/// follower may have read an upload from the log before the holder's
/// read-back confirmed it).
const BOOKMARK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    let wanted = match bookmark::wanted(&request.headers) {
        Ok(wanted) => wanted,
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
    if parsed.read_only
        && key.is_none()
        && let Some(done) = follower_read(state, &id, &parsed, wanted).await
    {
        return done;
    }
    let served = serve(state, &id, request, |handle| {
        let (parsed, key) = (parsed.clone(), key.clone());
        async move {
            reach_bookmark(&handle, wanted).await?;
            let answer = handle.sql(parsed, key).await?;
            Ok((answer, handle.confirmed()))
        }
    })
    .await;
    match served {
        Served::Here((answer, slot)) => {
            let outcome = if answer.repeated {
                "repeated"
            } else {
                "served"
            };
            (render(state, &id, answer, slot), outcome)
        }
        Served::Done(response, outcome) => (response, outcome),
    }
}

/// On the holder: a request's bookmark is a state the holder has
/// confirmed, or is about to.
pub(super) async fn reach_bookmark(
    handle: &TenantHandle,
    wanted: Wanted,
) -> Result<(), TenantError> {
    let Some(slot) = wanted.bookmark else {
        return Ok(());
    };
    match tokio::time::timeout(BOOKMARK_WAIT, handle.reach(slot)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(TenantError::NotHolder),
        Err(_) => Err(TenantError::Unavailable(format!(
            "{} {slot} names a state newer than the holder has confirmed ({}): it was not given by this tenant, or a newer holder gave it; retry",
            bookmark::BOOKMARK,
            handle.confirmed()
        ))),
    }
}

/// A read-only request on a machine that does not hold the tenant: its
/// replica answers, or `None` (the request goes to the holder as before).
async fn follower_read(
    state: &AppState,
    id: &TenantId,
    parsed: &Arc<SqlRequest>,
    wanted: Wanted,
) -> Option<(Response, &'static str)> {
    let ReadRoute::Follow(holder) = state.registry.read_route(id).await else {
        return None;
    };
    match state
        .followers
        .read(id, parsed.clone(), wanted, &holder)
        .await
    {
        Ok(FollowerAnswer { results, slot }) => {
            let answer = SqlAnswer {
                epoch: holder.epoch,
                repeated: false,
                results,
            };
            let mut response = render(state, id, answer, slot);
            bookmark::stamp(
                response.headers_mut(),
                slot,
                &state.machine_id,
                Role::Follower,
            );
            Some((response, "follower"))
        }
        Err(FollowError::Refused(e)) => {
            let (mut response, outcome) = refused(&e);
            bookmark::stamp_role(response.headers_mut(), &state.machine_id, Role::Follower);
            Some((response, outcome))
        }
        Err(FollowError::Behind(why)) => {
            tracing::debug!(customer_id = %id, why, "the replica cannot answer; the holder will");
            None
        }
    }
}

fn render(state: &AppState, id: &TenantId, answer: SqlAnswer, slot: u64) -> Response {
    let mut response = Json(json!({
        "customer_id": id.as_str(),
        "machine_id": state.machine_id,
        "epoch": answer.epoch,
        "results": &*answer.results,
    }))
    .into_response();
    answered_by(&mut response, &state.machine_id, answer.repeated);
    bookmark::stamp(
        response.headers_mut(),
        slot,
        &state.machine_id,
        Role::Holder,
    );
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
