//! libSQL's remote protocol (Hrana over HTTP, JSON) per tenant, under the
//! base URL `/customers/<id>/`: `GET v2`, `GET v3`, `POST v2/pipeline`,
//! `POST v3/pipeline`, `POST v3/cursor`.
//!
//! A pipeline is checked here (token, body, size). One that only reads
//! outside a transaction (no baton, nothing left on the stream, every
//! statement read-only) reaching a machine that does not hold the tenant
//! is answered by its replica, under the rules of a `/sql` read_only
//! request (bookmark or `replication_index`, else ReadIndex; with no
//! baton back: the replica keeps no stream). Anything else is routed exactly
//! like `/sql` (served by the holder, `fly-replay` elsewhere) and run by
//! the tenant's actor through the SQL executor
//! ([`crate::tenant::sql::hrana`]); its writes are answered once durable.
//! Batons are minted and checked by the holder alone (a non-holder replays
//! the pipeline with its baton like any other); a stream the holder does
//! not know answers 400 `STREAM_EXPIRED`, which the clients treat as a
//! dead stream.

mod cursor;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::{AppState, Forwardable, Served, answered_by, serve};
use crate::TenantId;
use crate::tenant::SqlAnswer;
use crate::tenant::follower::bookmark::{self, Role};
use crate::tenant::follower::{FollowError, FollowerAnswer, ReadRoute};
use crate::tenant::sql::hrana::Program;
use crate::tenant::sql::hrana::proto::{CursorBody, PipelineBody, StreamRequest, error_json};

/// `GET …/v2`, `GET …/v3`: the versions spoken here.
pub(super) async fn version() -> Response {
    (StatusCode::OK, "tenantd speaks Hrana over HTTP (JSON)\n").into_response()
}

/// `…/v2/pipeline` reached without the tenant: the client's URL lacks
/// its trailing slash, so the last path segment was replaced. Plain text
/// exactly: `@libsql/client` shows only such a body (or JSON `message`).
pub(super) async fn missing_slash(State(state): State<AppState>) -> Response {
    state
        .metrics
        .requests
        .with_label_values(&["hrana", "bad_request"])
        .inc();
    let message = "this is a tenant's libSQL path without the tenant: the database URL lacks its trailing slash. use http://host/customers/<id>/ with a trailing slash (libSQL clients resolve v2/pipeline relative to the URL, and drop its last segment without one)\n";
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        message,
    )
        .into_response()
}

pub(super) async fn pipeline(
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
    let (response, outcome) = match parse_pipeline(&request.body) {
        Ok(body) => {
            let (baton, requests, index) = (body.baton, body.requests, body.replication_index);
            run(
                &state,
                &id,
                request,
                Sent {
                    baton,
                    requests,
                    index,
                },
                Shape::Pipeline,
            )
            .await
        }
        Err(message) => hrana_error(StatusCode::BAD_REQUEST, &message, "HTTP_PARSE_ERROR"),
    };
    count(&state, outcome);
    response
}

pub(super) async fn cursor(
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
    let parsed = serde_json::from_slice::<CursorBody>(&request.body).map_err(|e| {
        format!(
            "invalid cursor request: {e}; expected {{\"baton\": null, \"batch\": {{\"steps\": [{{\"stmt\": {{\"sql\": \"...\"}}}}]}}}}"
        )
    });
    let (response, outcome) = match parsed {
        Ok(body) => {
            let sent = Sent {
                baton: body.baton,
                requests: vec![StreamRequest::Batch { batch: body.batch }],
                index: body.replication_index,
            };
            run(&state, &id, request, sent, Shape::Cursor).await
        }
        Err(message) => hrana_error(StatusCode::BAD_REQUEST, &message, "HTTP_PARSE_ERROR"),
    };
    count(&state, outcome);
    response
}

fn count(state: &AppState, outcome: &'static str) {
    state
        .metrics
        .requests
        .with_label_values(&["hrana", outcome])
        .inc();
}

fn parse_pipeline(body: &[u8]) -> Result<PipelineBody, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "invalid pipeline request: {e}; expected {{\"baton\": null, \"requests\": [{{\"type\": \"execute\", \"stmt\": {{\"sql\": \"...\"}}}}, {{\"type\": \"close\"}}]}} (request types: execute, batch, sequence, describe, store_sql, close_sql, get_autocommit, close)"
        )
    })
}

/// What a pipeline or cursor request sent.
struct Sent {
    baton: Option<String>,
    requests: Vec<StreamRequest>,
    /// Its `replication_index`, if any.
    index: Option<Json>,
}

/// The bookmark a request's `replication_index` names (a string of
/// digits as libSQL sends it, or a number); the error says what to send.
fn replication_index(value: &Json) -> Result<Option<u64>, String> {
    let slot = match value {
        Json::Null => return Ok(None),
        Json::String(text) => bookmark::parse(text),
        Json::Number(n) => n.as_u64(),
        _ => None,
    };
    slot.map(Some).ok_or_else(|| {
        format!(
            "replication_index {value} is not one tenantd gave: send back the replication_index (or the {} header) of an earlier answer unchanged, or none",
            bookmark::BOOKMARK
        )
    })
}

#[derive(Clone, Copy)]
enum Shape {
    Pipeline,
    Cursor,
}

async fn run(
    state: &AppState,
    id: &str,
    request: Forwardable,
    sent: Sent,
    shape: Shape,
) -> (Response, &'static str) {
    let Sent {
        baton,
        requests,
        index,
    } = sent;
    let access = match super::auth::authorize(state, &request.headers, id) {
        Ok(access) => access,
        Err((status, message, outcome)) => {
            let code = match status {
                StatusCode::FORBIDDEN => "FORBIDDEN",
                StatusCode::NOT_FOUND => "NOT_FOUND",
                _ => "UNAUTHORIZED",
            };
            let (response, _) = hrana_error(status, &message, code);
            return (response, outcome);
        }
    };
    let id = match TenantId::parse(id) {
        Ok(id) => id,
        Err(e) => return hrana_error(StatusCode::BAD_REQUEST, &e.to_string(), "HTTP_PARSE_ERROR"),
    };
    let program = Program {
        requests,
        read_only: access.read_only,
        baton,
    };
    if let Err(message) = program.check(&state.sql_limits) {
        return hrana_error(StatusCode::BAD_REQUEST, &message, "SQLITE_TOOBIG");
    }
    let mut wanted = match bookmark::wanted(&request.headers) {
        Ok(wanted) => wanted,
        Err(message) => return hrana_error(StatusCode::BAD_REQUEST, &message, "HTTP_PARSE_ERROR"),
    };
    match index.as_ref().map(replication_index).transpose() {
        // Both sent: the newer state is the one asked for.
        Ok(Some(Some(slot))) => wanted.bookmark = wanted.bookmark.max(Some(slot)),
        Ok(_) => {}
        Err(message) => return hrana_error(StatusCode::BAD_REQUEST, &message, "HTTP_PARSE_ERROR"),
    }
    let program = Arc::new(program);
    if program.may_run_on_replica()
        && let Some(done) = follower_read(state, &id, &program, wanted, shape).await
    {
        return done;
    }
    let served = serve(state, &id, request, |handle| {
        let program = program.clone();
        async move {
            super::sql::reach_bookmark(&handle, wanted).await?;
            let answer = handle.hrana(program).await?;
            Ok((answer, handle.confirmed()))
        }
    })
    .await;
    match served {
        Served::Here((answer, slot)) => {
            (respond(state, answer, slot, shape, Role::Holder), "served")
        }
        Served::Done(response, outcome) => (as_hrana(response).await, outcome),
    }
}

/// A pipeline that only reads, on a machine that does not hold the
/// tenant: its replica answers, or `None` (the holder answers as before).
async fn follower_read(
    state: &AppState,
    id: &TenantId,
    program: &Arc<Program>,
    wanted: bookmark::Wanted,
    shape: Shape,
) -> Option<(Response, &'static str)> {
    let ReadRoute::Follow(holder) = state.registry.read_route(id).await else {
        return None;
    };
    match state
        .followers
        .read_hrana(id, program.clone(), wanted, &holder)
        .await
    {
        Ok(FollowerAnswer { results, slot }) => {
            let answer = SqlAnswer {
                epoch: holder.epoch,
                repeated: false,
                results,
            };
            let response = respond(state, answer, slot, shape, Role::Follower);
            Some((response, "follower"))
        }
        // Whatever the replica cannot answer as the holder would (a
        // write, a lost transaction, a replica behind) is the holder's.
        Err(FollowError::Refused(e)) => {
            tracing::debug!(customer_id = %id, error = %e.message, "a pipeline the replica refused goes to the holder");
            None
        }
        Err(FollowError::Behind(why)) => {
            tracing::debug!(customer_id = %id, why, "the replica cannot answer the pipeline; the holder will");
            None
        }
    }
}

/// Every answer a pipeline gets from this machine is built here.
fn respond(state: &AppState, answer: SqlAnswer, slot: u64, shape: Shape, role: Role) -> Response {
    if let Some(error) = answer.results.get("stream_error") {
        let mut response = (StatusCode::BAD_REQUEST, axum::Json(error.clone())).into_response();
        answered_by(&mut response, &state.machine_id, false);
        return response;
    }
    let mut results = answer.results["results"].clone();
    with_replication_index(&mut results, slot);
    let mut response = match shape {
        Shape::Pipeline => axum::Json(json!({
            "baton": answer.results["baton"],
            "base_url": null,
            "results": results,
        }))
        .into_response(),
        Shape::Cursor => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            cursor::entries(&results[0], &answer.results["baton"]),
        )
            .into_response(),
    };
    answered_by(&mut response, &state.machine_id, false);
    bookmark::stamp(response.headers_mut(), slot, &state.machine_id, role);
    response
}

/// Every statement and batch result carries the bookmark as libSQL's
/// `replication_index` (a string, as libSQL's server sends it), for the
/// clients that read it there rather than in the header.
fn with_replication_index(results: &mut Json, slot: u64) {
    let index = Json::String(bookmark::format(slot));
    for result in results.as_array_mut().into_iter().flatten() {
        let Some(response) = result.get_mut("response") else {
            continue;
        };
        if matches!(response["type"].as_str(), Some("execute" | "batch"))
            && let Some(result) = response.get_mut("result").and_then(Json::as_object_mut)
        {
            result.insert("replication_index".into(), index.clone());
        }
    }
}

/// A refused pipeline: Hrana's `{message, code}` (the clients show the
/// message of a JSON body only under that name).
fn hrana_error(status: StatusCode, message: &str, code: &str) -> (Response, &'static str) {
    let outcome = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        _ => "bad_request",
    };
    (
        (status, axum::Json(error_json(message, code))).into_response(),
        outcome,
    )
}

/// A routing answer (`{"error": …}`) with the message where the clients
/// look for it; a replay (`fly-replay`) goes out untouched.
async fn as_hrana(response: Response) -> Response {
    if response.status().is_redirection() || response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let Ok(Json::Object(mut map)) = serde_json::from_slice::<Json>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let code = match map.get("code").and_then(Json::as_str) {
        Some(_) => Json::String(
            // A refusal of the SQL executor: the nearest SQLite code.
            "SQLITE_ERROR".into(),
        ),
        None => Json::String(
            match parts.status {
                StatusCode::SERVICE_UNAVAILABLE => "SERVER_UNAVAILABLE",
                StatusCode::NOT_FOUND => "NOT_FOUND",
                _ => "SERVER_ERROR",
            }
            .into(),
        ),
    };
    if let Some(message) = map.remove("error") {
        map.insert("message".into(), message);
    }
    map.insert("code".into(), code);
    let mut response = (parts.status, axum::Json(Json::Object(map))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}
