//! HTTP routes: the counter (HTML or JSON), the SQL API ([`sql`]),
//! `/healthz`, `/metrics`, `/_status`, and the token-guarded `/_admin`
//! endpoints.
//!
//! A counter request is routed by the [`Registry`]: served here when this
//! machine holds the tenant, otherwise handed to the holder with
//! `fly-replay` (or proxied in forward mode). Every count in an answer is
//! durable in the store before the answer leaves.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::TenantId;
use crate::config::ReplayMode;
use crate::metrics::Metrics;
use crate::replay::{self, ReplaySource, Target};
use crate::store::FaultConfig;
use crate::store::fault::FaultHandle;
use crate::tenant::follower::Followers;
use crate::tenant::follower::bookmark::{self, Role};
use crate::tenant::sql::SqlLimits;
use crate::tenant::{Answer, Op, Registry, Route, TenantError, TenantHandle};

mod admin;
mod auth;
mod hrana;
mod internal;
mod sql;

/// Finds started machines of a tenant (Fly's internal DNS).
#[async_trait::async_trait]
pub trait MachineFinder: Send + Sync {
    async fn machines_of(&self, id: &TenantId) -> anyhow::Result<Vec<String>>;
}

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub machine_id: String,
    pub replay_mode: ReplayMode,
    pub finder: Option<Arc<dyn MachineFinder>>,
    pub faults: FaultHandle,
    pub admin_token: Option<String>,
    /// Enables the SQL API; `None`: `/customers/<id>/sql` answers 404.
    pub api_token: Option<String>,
    /// Verifies tenant tokens; `None`: only the API token opens tenants.
    pub tokens: Option<Arc<crate::token::TokenVerifier>>,
    pub sql_limits: SqlLimits,
    pub client: reqwest::Client,
    /// Replicas that answer read-only requests for tenants held elsewhere.
    pub followers: Arc<Followers>,
}

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/customers/{id}", get(page))
        .route("/customers/{id}/increment", post(increment))
        .route("/customers/{id}/count", get(count))
        .route("/customers/{id}/sql", post(sql::sql))
        .route("/customers/{id}/v2", get(hrana::version))
        .route("/customers/{id}/v3", get(hrana::version))
        .route("/customers/{id}/v2/pipeline", post(hrana::pipeline))
        .route("/customers/{id}/v3/pipeline", post(hrana::pipeline))
        .route("/customers/{id}/v3/cursor", post(hrana::cursor))
        .route("/customers/v2/pipeline", any(hrana::missing_slash))
        .route("/customers/v3/pipeline", any(hrana::missing_slash))
        .route("/customers/v3/cursor", any(hrana::missing_slash))
        .route("/customers/", any(empty_id))
        .route("/customers/{id}/{*rest}", any(bad_path))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/_status", get(status))
        .route("/_admin/faults", get(get_faults).put(put_faults))
        .route("/_internal/tenants/{id}/position", get(internal::position))
        .route("/_internal/tenants/{id}/push", post(internal::push))
        .route(
            "/_admin/tenants/{id}",
            post(admin::create_tenant).delete(admin::delete_tenant),
        )
        .route("/_admin/tenants/{id}/migrate", post(admin::migrate_tenant))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Html,
    Json,
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

async fn page(
    state: State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let format = if wants_json(&headers) {
        Format::Json
    } else {
        Format::Html
    };
    counter(
        state,
        "page",
        &id,
        CounterOp::Increment,
        format,
        Forwardable {
            method,
            uri,
            headers,
            body,
        },
    )
    .await
}

async fn increment(
    state: State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    counter(
        state,
        "increment",
        &id,
        CounterOp::Increment,
        Format::Json,
        Forwardable {
            method,
            uri,
            headers,
            body,
        },
    )
    .await
}

async fn count(
    state: State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    counter(
        state,
        "count",
        &id,
        CounterOp::Read,
        Format::Json,
        Forwardable {
            method,
            uri,
            headers,
            body,
        },
    )
    .await
}

async fn empty_id(State(state): State<AppState>) -> Response {
    state
        .metrics
        .requests
        .with_label_values(&["counter", "bad_request"])
        .inc();
    error(
        StatusCode::BAD_REQUEST,
        "invalid tenant id \"\": ids are 1-63 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit",
    )
}

async fn bad_path(
    State(state): State<AppState>,
    Path((id, _rest)): Path<(String, String)>,
) -> Response {
    state
        .metrics
        .requests
        .with_label_values(&["counter", "bad_request"])
        .inc();
    match TenantId::parse(&id) {
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            "no such route: use /customers/<id>, /customers/<id>/increment, /customers/<id>/count or /customers/<id>/sql",
        ),
    }
}

#[derive(Clone, Copy)]
enum CounterOp {
    Increment,
    Read,
}

/// The original request, kept to proxy it in forward mode.
struct Forwardable {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

async fn counter(
    State(state): State<AppState>,
    route: &'static str,
    id: &str,
    op: CounterOp,
    format: Format,
    request: Forwardable,
) -> Response {
    let (response, outcome) = counter_inner(&state, id, op, format, request).await;
    state
        .metrics
        .requests
        .with_label_values(&[route, outcome])
        .inc();
    response
}

async fn counter_inner(
    state: &AppState,
    id: &str,
    op: CounterOp,
    format: Format,
    request: Forwardable,
) -> (Response, &'static str) {
    let id = match TenantId::parse(id) {
        Ok(id) => id,
        Err(e) => {
            return (
                error(StatusCode::BAD_REQUEST, &e.to_string()),
                "bad_request",
            );
        }
    };
    let op = match op {
        CounterOp::Read => Op::Read,
        CounterOp::Increment => match idempotency_key(&request.headers) {
            Ok(idempotency_key) => Op::Increment { idempotency_key },
            Err(message) => return (error(StatusCode::BAD_REQUEST, &message), "bad_request"),
        },
    };
    let wanted = match bookmark::wanted(&request.headers) {
        Ok(wanted) => wanted,
        Err(message) => return (error(StatusCode::BAD_REQUEST, &message), "bad_request"),
    };
    match serve(state, &id, request, |handle| {
        let op = op.clone();
        async move {
            sql::reach_bookmark(&handle, wanted).await?;
            let answer = handle.call(op).await?;
            Ok((answer, handle.confirmed()))
        }
    })
    .await
    {
        Served::Here((answer, slot)) => (
            {
                let mut response = render(state, &id, answer, format);
                bookmark::stamp(
                    response.headers_mut(),
                    slot,
                    &state.machine_id,
                    Role::Holder,
                );
                response
            },
            if answer.repeated {
                "repeated"
            } else {
                "served"
            },
        ),
        Served::Done(response, outcome) => (response, outcome),
    }
}

/// How a request for a tenant ended.
enum Served<T> {
    /// This machine holds the tenant and it answered.
    Here(T),
    /// Handed to another machine, or refused: the response to send.
    Done(Response, &'static str),
}

/// Routes a request for `id`: runs `call` on the tenant's actor when this
/// machine holds it, otherwise hands the request to the holder
/// (`fly-replay`, or proxied in forward mode) or says why it cannot.
async fn serve<T, F, Fut>(
    state: &AppState,
    id: &TenantId,
    request: Forwardable,
    call: F,
) -> Served<T>
where
    F: Fn(TenantHandle) -> Fut,
    Fut: Future<Output = Result<T, TenantError>>,
{
    let done = |(response, outcome)| Served::Done(response, outcome);
    let hops = incoming_hops(&request.headers);
    // A request handed to us by another machine means its view was stale
    // or it is leaving: look at the lock itself, not at a cached copy.
    let mut fresh = hops > 0;
    for _ in 0..3 {
        match state.registry.route(id, fresh).await {
            Route::Local(handle) => match call(handle).await {
                Ok(answer) => return Served::Here(answer),
                // Nothing was written: route again from the lock.
                Err(TenantError::NotHolder) => fresh = true,
                Err(TenantError::Unavailable(message)) => {
                    return done((
                        error(StatusCode::SERVICE_UNAVAILABLE, &message),
                        "unavailable",
                    ));
                }
                Err(TenantError::Corrupt(message)) => {
                    return done((
                        error(StatusCode::INTERNAL_SERVER_ERROR, &message),
                        "corrupt",
                    ));
                }
                Err(TenantError::Sql(refused)) => return done(sql::refused(&refused)),
            },
            Route::Holder(record) => {
                if record.holder == state.machine_id {
                    fresh = true;
                    continue;
                }
                return done(
                    handoff(
                        state,
                        Target::Instance(record.holder),
                        Some(record.addr),
                        hops,
                        request,
                    )
                    .await,
                );
            }
            Route::Elsewhere => {
                return done(handoff(state, Target::Elsewhere, None, hops, request).await);
            }
            Route::Lookup { last_holder } => {
                if let Some(finder) = &state.finder {
                    match finder.machines_of(id).await {
                        Ok(machines) => {
                            if let Some(machine) =
                                machines.into_iter().find(|m| *m != state.machine_id)
                            {
                                return done(
                                    handoff(state, Target::Instance(machine), None, hops, request)
                                        .await,
                                );
                            }
                        }
                        Err(e) => {
                            tracing::warn!(customer_id = %id, error = %e, "DNS lookup of the tenant's machines failed")
                        }
                    }
                }
                if let Some(record) = last_holder
                    && record.holder != state.machine_id
                {
                    return done(
                        handoff(
                            state,
                            Target::Instance(record.holder),
                            Some(record.addr),
                            hops,
                            request,
                        )
                        .await,
                    );
                }
                let message = format!(
                    "customer {id} is not served here and no machine of it is known (no lock object, no machine in DNS)"
                );
                return done((error(StatusCode::NOT_FOUND, &message), "not_found"));
            }
            Route::NotFound(message) => {
                return done((error(StatusCode::NOT_FOUND, &message), "not_found"));
            }
            Route::Unavailable(message) => {
                return done((
                    error(StatusCode::SERVICE_UNAVAILABLE, &message),
                    "unavailable",
                ));
            }
            Route::Corrupt(message) => {
                return done((
                    error(StatusCode::INTERNAL_SERVER_ERROR, &message),
                    "corrupt",
                ));
            }
        }
    }
    done((
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("customer {id}: the holder changed several times while routing; retry"),
        ),
        "unavailable",
    ))
}

/// How many times a request was handed between machines before it got
/// here (`fly-replay-src`, or our own header in forward mode).
fn incoming_hops(headers: &HeaderMap) -> u32 {
    let source = headers
        .get(replay::FLY_REPLAY_SRC)
        .and_then(|v| v.to_str().ok())
        .map(ReplaySource::parse);
    let forwarded_hops = headers
        .get(replay::FORWARD_HOPS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    source
        .as_ref()
        .map(|s| s.hops)
        .or(forwarded_hops)
        .unwrap_or(0)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| "Idempotency-Key must be visible ASCII".to_string())?;
    if text.is_empty() || text.len() > 200 || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("Idempotency-Key must be 1-200 visible ASCII characters".to_string());
    }
    Ok(Some(text.to_string()))
}

/// Hands a request to another machine: `fly-replay`, or a proxied request
/// in forward mode. Bounded by [`replay::MAX_HOPS`].
async fn handoff(
    state: &AppState,
    target: Target,
    addr: Option<String>,
    hops: u32,
    request: Forwardable,
) -> (Response, &'static str) {
    if hops >= replay::MAX_HOPS {
        let message = format!(
            "request handed between machines {hops} times without reaching the tenant's holder; retry shortly"
        );
        return (error(StatusCode::SERVICE_UNAVAILABLE, &message), "loop");
    }
    match state.replay_mode {
        // A replay that came back (Fly Proxy could not reach its target):
        // a fallback request may not replay again.
        ReplayMode::Fly if request.headers.contains_key(replay::FLY_REPLAY_FAILED) => {
            let failed = request
                .headers
                .get(replay::FLY_REPLAY_FAILED)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let message =
                format!("the tenant's machine could not be reached ({failed}); retry shortly");
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            (response, "replay_failed")
        }
        ReplayMode::Fly => {
            let value = replay::replay_header(&target, hops);
            let mut response = (
                StatusCode::TEMPORARY_REDIRECT,
                format!("replaying to {value}\n"),
            )
                .into_response();
            response.headers_mut().insert(
                replay::FLY_REPLAY,
                HeaderValue::from_str(&value).expect("ids are header-safe"),
            );
            (response, "replayed")
        }
        ReplayMode::Forward => {
            let Some(addr) = addr else {
                let message = "no holder address is known for this tenant yet; retry shortly";
                return (
                    error(StatusCode::SERVICE_UNAVAILABLE, message),
                    "unavailable",
                );
            };
            (forward(state, &addr, hops, request).await, "forwarded")
        }
    }
}

async fn forward(state: &AppState, addr: &str, hops: u32, request: Forwardable) -> Response {
    let path = request
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("http://{addr}{path}");
    let mut builder = state
        .client
        .request(request.method.clone(), &url)
        .body(request.body.clone());
    for (name, value) in request.headers.iter() {
        if name != header::HOST
            && name != header::CONTENT_LENGTH
            && name.as_str() != replay::FORWARD_HOPS
        {
            builder = builder.header(name, value);
        }
    }
    builder = builder.header(replay::FORWARD_HOPS, (hops + 1).to_string());
    match builder.timeout(Duration::from_secs(30)).send().await {
        Ok(reply) => {
            let status = reply.status();
            let headers = reply.headers().clone();
            let body = reply.bytes().await.unwrap_or_default();
            let mut response = (status, body).into_response();
            let answer_headers = bookmark::ANSWER_HEADERS.map(header::HeaderName::from_static);
            for name in [
                header::CONTENT_TYPE,
                header::HeaderName::from_static("x-tenantd-machine"),
            ]
            .into_iter()
            .chain(answer_headers)
            {
                if let Some(value) = headers.get(&name) {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            response
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            &format!("could not forward the request to the holder at {addr}: {e}"),
        ),
    }
}

fn render(state: &AppState, id: &TenantId, answer: Answer, format: Format) -> Response {
    let mut response = match format {
        Format::Json => Json(json!({
            "customer_id": id.as_str(),
            "count": answer.count,
            "machine_id": state.machine_id,
            "epoch": answer.epoch,
        }))
        .into_response(),
        Format::Html => Html(format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Customer {id}</title></head>\n<body>\n<h1>Welcome, customer {id}!</h1>\n<p>This page has been visited <strong>{count}</strong> times.</p>\n<p><small>Served by machine {machine} (lease epoch {epoch}).</small></p>\n</body></html>\n",
            count = answer.count,
            machine = state.machine_id,
            epoch = answer.epoch,
        ))
        .into_response(),
    };
    answered_by(&mut response, &state.machine_id, answer.repeated);
    response
}

/// Names the answering machine, and marks the first answer of a repeated
/// idempotency key.
fn answered_by(response: &mut Response, machine_id: &str, repeated: bool) {
    let headers = response.headers_mut();
    headers.insert(
        "x-tenantd-machine",
        HeaderValue::from_str(machine_id).expect("machine ids are header-safe"),
    );
    if repeated {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_only_if_set(&state, &headers) {
        return denied;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    #[serde(default)]
    all: bool,
}

/// The tenants this machine holds (behind the admin token when one is
/// set); `?all=true` (admin token always) also lists every tenant it
/// remembers, held or not.
async fn status(
    State(state): State<AppState>,
    query: axum::extract::Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    let denied = if query.all {
        admin_denied(&state, &headers)
    } else {
        admin_only_if_set(&state, &headers)
    };
    if let Some(denied) = denied {
        return denied;
    }
    let config = state.registry.config();
    Json(json!({
        "machine_id": state.machine_id,
        "customer_id": config.customer_id.as_ref().map(|c| c.as_str()),
        "mode": if config.customer_id.is_some() { "single" } else { "pool" },
        "draining": state.registry.is_draining(),
        "lease_ttl_ms": config.lease_ttl.as_millis() as u64,
        "known_tenants": state.registry.known_tenants(),
        "tenants": state.registry.status(query.all),
    }))
    .into_response()
}

/// `None` when allowed; otherwise the response to send. Without a
/// configured token the admin endpoints do not exist.
fn admin_denied(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.admin_token else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "admin endpoints are disabled: set TENANTD_ADMIN_TOKEN to enable them",
        ));
    };
    if !bearer_matches(headers, token) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send Authorization: Bearer $TENANTD_ADMIN_TOKEN",
        ));
    }
    None
}

/// For `/_status` and `/metrics`, which name the tenants a machine serves:
/// open when no admin token is configured (a private deployment), behind
/// it when one is.
fn admin_only_if_set(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    state.admin_token.as_ref()?;
    admin_denied(state, headers)
}

/// Whether the request carries `Authorization: Bearer <token>`, compared
/// in constant time.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|presented| bool::from(presented.as_bytes().ct_eq(token.as_bytes())))
}

async fn get_faults(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&state, &headers) {
        return denied;
    }
    Json(state.faults.get()).into_response()
}

async fn put_faults(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(denied) = admin_denied(&state, &headers) {
        return denied;
    }
    match serde_json::from_slice::<FaultConfig>(&body) {
        Ok(config) => {
            tracing::warn!(
                ?config,
                "store fault injection changed through the admin API"
            );
            state.faults.set(config.clone());
            Json(config).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            &format!("invalid fault configuration: {e}"),
        ),
    }
}
