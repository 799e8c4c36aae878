//! libSQL's remote protocol (Hrana over HTTP, JSON) per tenant, under the
//! base URL `/customers/<id>/`: `GET v2`, `GET v3`, `POST v2/pipeline`,
//! `POST v3/pipeline`, `POST v3/cursor`.
//!
//! A pipeline is checked here (token, body, size), then routed exactly
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
        Ok((baton, requests)) => run(&state, &id, request, baton, requests, Shape::Pipeline).await,
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
            let requests = vec![StreamRequest::Batch { batch: body.batch }];
            run(&state, &id, request, body.baton, requests, Shape::Cursor).await
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

fn parse_pipeline(body: &[u8]) -> Result<(Option<String>, Vec<StreamRequest>), String> {
    let body: PipelineBody = serde_json::from_slice(body).map_err(|e| {
        format!(
            "invalid pipeline request: {e}; expected {{\"baton\": null, \"requests\": [{{\"type\": \"execute\", \"stmt\": {{\"sql\": \"...\"}}}}, {{\"type\": \"close\"}}]}} (request types: execute, batch, sequence, describe, store_sql, close_sql, get_autocommit, close)"
        )
    })?;
    Ok((body.baton, body.requests))
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
    baton: Option<String>,
    requests: Vec<StreamRequest>,
    shape: Shape,
) -> (Response, &'static str) {
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
    let wanted = match bookmark::wanted(&request.headers) {
        Ok(wanted) => wanted,
        Err(message) => return hrana_error(StatusCode::BAD_REQUEST, &message, "HTTP_PARSE_ERROR"),
    };
    let program = Arc::new(program);
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
        Served::Here((answer, slot)) => (respond(state, answer, slot, shape), "served"),
        Served::Done(response, outcome) => (as_hrana(response).await, outcome),
    }
}

/// Every answer a pipeline gets from this machine is built here.
fn respond(state: &AppState, answer: SqlAnswer, slot: u64, shape: Shape) -> Response {
    if let Some(error) = answer.results.get("stream_error") {
        let mut response = (StatusCode::BAD_REQUEST, axum::Json(error.clone())).into_response();
        answered_by(&mut response, &state.machine_id, false);
        return response;
    }
    let mut response = match shape {
        Shape::Pipeline => axum::Json(json!({
            "baton": answer.results["baton"],
            "base_url": null,
            "results": answer.results["results"],
        }))
        .into_response(),
        Shape::Cursor => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            cursor::entries(&answer.results["results"][0], &answer.results["baton"]),
        )
            .into_response(),
    };
    answered_by(&mut response, &state.machine_id, false);
    bookmark::stamp(
        response.headers_mut(),
        slot,
        &state.machine_id,
        Role::Holder,
    );
    response
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
