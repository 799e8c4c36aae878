//! The subset of the Fly Machines API that tenantd uses, served by the dev
//! cluster's admin server so that `tenantd fly` and the machines' own
//! lookups (stopped machines included) run against the dev cluster:
//!
//! - `GET    /v1/apps/<app>/machines` (every machine, stopped ones too);
//! - `POST   /v1/apps/<app>/machines` (`{"name", "config": {"metadata":
//!   {"customer_id" | "fly_process_group"}, "env": {"CUSTOMER_ID"}}}`;
//!   names are unique within the app: 409 otherwise);
//! - `POST   /v1/apps/<app>/machines/<id>/{stop,start}`;
//! - `GET    /v1/apps/<app>/machines/<id>/wait?state=stopped|started&instance_id=..&timeout=<s>`
//!   (`instance_id` required for `stopped`; 408 when the timeout passes);
//! - `DELETE /v1/apps/<app>/machines/<id>[?force=true]` (412 for a machine
//!   that is not stopped, unless forced).
//!
//! Requests need `Authorization: Bearer <token>` (or `FlyV1 <token>`) with
//! the cluster's admin token, which machines get as `FLY_API_TOKEN`. Each
//! action is rate-limited as on Fly ([`crate::rate_limit`]): 429 with
//! `Retry-After` past the limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::ClusterShared;
use super::supervisor::{MachineInfo, MachineState, process_group};

pub fn router(shared: Arc<ClusterShared>) -> axum::Router {
    axum::Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}", get(show).delete(destroy))
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait))
        .route("/v1/apps/{app}/machines/{id}/{action}", post(action))
        .with_state(shared)
}

type Q = Query<HashMap<String, String>>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The answer when the token or the app is wrong.
fn check(c: &ClusterShared, headers: &HeaderMap, app: &str) -> Option<Response> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("FlyV1 "))
        .unwrap_or_default();
    if token != c.admin_token {
        return Some(error(StatusCode::UNAUTHORIZED, "unauthorized"));
    }
    if app != c.cfg.app_name {
        return Some(error(StatusCode::NOT_FOUND, format!("app {app} not found")));
    }
    None
}

/// [`check`], then a token of `action`'s rate limit.
fn admit(c: &ClusterShared, headers: &HeaderMap, app: &str, action: &str) -> Option<Response> {
    if let Some(refused) = check(c, headers, app) {
        return Some(refused);
    }
    let wait = c.api_calls.take(action).err()?;
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("rate limit exceeded for {action}: 1 request/s per action per app, burst 3"),
    );
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    response
        .headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from(secs));
    Some(response)
}

/// The API's state names.
fn state_name(state: MachineState) -> &'static str {
    match state {
        MachineState::Starting => "starting",
        MachineState::Started | MachineState::Paused => "started",
        MachineState::Stopping => "stopping",
        MachineState::Stopped => "stopped",
        MachineState::Restarting => "replacing",
        MachineState::Destroying => "destroying",
    }
}

fn instance_id(id: &str) -> String {
    format!("{id}0000000000001")
}

fn to_json(c: &ClusterShared, m: &MachineInfo) -> Value {
    let name = c
        .names
        .lock()
        .unwrap()
        .get(&m.id)
        .cloned()
        .unwrap_or_else(|| m.id.clone());
    let mut metadata = json!({
        "fly_process_group": process_group(m.customer_id.as_deref()),
        "fly_platform_version": "v2",
    });
    let mut env = json!({});
    if let Some(customer) = &m.customer_id {
        metadata["customer_id"] = json!(customer);
        env["CUSTOMER_ID"] = json!(customer);
    }
    json!({
        "id": m.id,
        "name": name,
        "state": state_name(m.state),
        "region": super::dns::REGION,
        "instance_id": instance_id(&m.id),
        "private_ip": m.private_ip,
        "created_at": "2026-01-01T00:00:00Z",
        "config": {
            "image": "tenantd-dev",
            "init": {"cmd": c.cfg.program_args},
            "env": env,
            "metadata": metadata,
        },
    })
}

async fn list(
    State(c): State<Arc<ClusterShared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, "list") {
        return r;
    }
    let machines: Vec<Value> = c.sup.machines().iter().map(|m| to_json(&c, m)).collect();
    Json(machines).into_response()
}

async fn show(
    State(c): State<Arc<ClusterShared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, "get") {
        return r;
    }
    match c.sup.machine(&id) {
        Some(m) => Json(to_json(&c, &m)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("machine {id} not found")),
    }
}

async fn create(
    State(c): State<Arc<ClusterShared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, "create") {
        return r;
    }
    let config = &body["config"];
    let customer = config
        .pointer("/metadata/customer_id")
        .and_then(Value::as_str)
        .or_else(|| {
            config
                .pointer("/metadata/fly_process_group")
                .and_then(Value::as_str)
                .and_then(|g| g.strip_prefix("customer"))
        })
        .or_else(|| config.pointer("/env/CUSTOMER_ID").and_then(Value::as_str))
        .map(str::to_string);
    if let Some(customer) = &customer
        && let Err(e) = tenantd_core::TenantId::parse(customer)
    {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let id = {
        // Held across create: two creates of one name cannot both pass.
        let mut names = c.names.lock().unwrap();
        if !name.is_empty() && names.values().any(|n| *n == name) {
            return error(
                StatusCode::CONFLICT,
                format!("a machine named {name} already exists"),
            );
        }
        let id = match c.sup.create(customer) {
            Ok(id) => id,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        };
        if !name.is_empty() {
            names.insert(id.clone(), name);
        }
        id
    };
    let sup = c.sup.clone();
    let started = id.clone();
    tokio::spawn(async move {
        let _ = sup.start(&started).await;
    });
    match c.sup.machine(&id) {
        Some(m) => Json(to_json(&c, &m)).into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "machine vanished"),
    }
}

async fn action(
    State(c): State<Arc<ClusterShared>>,
    Path((app, id, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, &action) {
        return r;
    }
    let result = match action.as_str() {
        "stop" => c.sup.stop(&id),
        "start" => {
            let sup = c.sup.clone();
            let target = id.clone();
            // Like the API: the start is under way when the call returns.
            tokio::spawn(async move {
                let _ = sup.start(&target).await;
            });
            Ok(())
        }
        _ => return error(StatusCode::NOT_FOUND, format!("unknown action {action}")),
    };
    match result {
        Ok(()) => Json(json!({"ok": true})).into_response(),
        Err(e @ super::supervisor::MachineError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => error(StatusCode::PRECONDITION_FAILED, e.to_string()),
    }
}

async fn wait(
    State(c): State<Arc<ClusterShared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, "wait") {
        return r;
    }
    let state = q.get("state").map(String::as_str).unwrap_or("started");
    if state == "stopped" && q.get("instance_id") != Some(&instance_id(&id)) {
        return error(
            StatusCode::BAD_REQUEST,
            "instance_id (the machine's current one) is required to wait for stopped",
        );
    }
    let secs: u64 = q
        .get("timeout")
        .and_then(|t| t.parse().ok())
        .unwrap_or(60)
        .min(60);
    if c.sup.machine(&id).is_none() {
        return error(StatusCode::NOT_FOUND, format!("machine {id} not found"));
    }
    let want = state.to_string();
    let reached = c
        .sup
        .wait_for(&id, Duration::from_secs(secs), move |s| match s {
            Some(s) => state_name(s) == want,
            None => want == "destroyed",
        })
        .await;
    if reached {
        Json(json!({"ok": true})).into_response()
    } else {
        error(
            StatusCode::REQUEST_TIMEOUT,
            format!("machine {id} did not reach {state} in {secs}s"),
        )
    }
}

async fn destroy(
    State(c): State<Arc<ClusterShared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    if let Some(r) = admit(&c, &headers, &app, "delete") {
        return r;
    }
    let Some(m) = c.sup.machine(&id) else {
        return error(StatusCode::NOT_FOUND, format!("machine {id} not found"));
    };
    let force = q.get("force").is_some_and(|f| f == "true");
    if !force && m.state != MachineState::Stopped {
        return error(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "failed_precondition: machine {id} is {}: stop it first or force",
                state_name(m.state)
            ),
        );
    }
    match c.sup.destroy(&id) {
        Ok(()) => {
            c.names.lock().unwrap().remove(&id);
            Json(json!({"ok": true})).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}
