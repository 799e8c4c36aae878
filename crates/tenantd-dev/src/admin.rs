//! Control of a running dev cluster, like flyctl: an HTTP JSON API on the
//! admin address, and the client behind `tenantd dev ls|scale|kill|pause|
//! resume|stop|start`.
//!
//! API (all JSON):
//! - `GET  /v1/machines`: every machine with state, address, and whether it
//!   holds its customer's lock (from the machine's own `/_status`);
//! - `POST /v1/machines/<id>/{kill,pause,resume,stop,start}`;
//! - `POST /v1/scale` `{"customer": "100" | null, "count": 3}`;
//! - `GET  /v1/info`, `GET /v1/stats`, `GET /v1/logs?lines=N`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::ClusterShared;
use super::supervisor::{MachineError, MachineInfo};

/// A machine as `ls` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineStatus {
    #[serde(flatten)]
    pub machine: MachineInfo,
    /// Whether it holds its customer's `machine.lock` (pool machines: any
    /// tenant's). `None` when its `/_status` did not answer.
    pub holder: Option<bool>,
    /// Epoch of its customer's lock as the machine reports it.
    pub epoch: Option<u64>,
    /// Tenants this machine holds.
    pub holds: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub customer: Option<String>,
    pub count: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Info {
    pub app: String,
    pub edge: String,
    pub dns: String,
    pub store: String,
}

pub fn router(shared: Arc<ClusterShared>) -> axum::Router {
    axum::Router::new()
        .route("/v1/machines", get(list))
        .route("/v1/machines/{id}/{action}", post(action))
        .route("/v1/scale", post(scale))
        .route("/v1/info", get(info))
        .route("/v1/stats", get(stats))
        .route("/v1/logs", get(logs))
        .with_state(shared)
}

async fn list(State(c): State<Arc<ClusterShared>>) -> Json<Vec<MachineStatus>> {
    Json(c.statuses().await)
}

async fn action(
    State(c): State<Arc<ClusterShared>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let result = match action.as_str() {
        "kill" => c.sup.kill(&id),
        "pause" => c.sup.pause(&id),
        "resume" => c.sup.resume(&id),
        "stop" => c.sup.stop(&id),
        "start" => c.sup.start(&id).await,
        _ => return error(StatusCode::NOT_FOUND, format!("unknown action {action:?}")),
    };
    match result {
        Ok(()) => Json(c.sup.machine(&id)).into_response(),
        Err(e @ MachineError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn scale(State(c): State<Arc<ClusterShared>>, Json(req): Json<ScaleRequest>) -> Response {
    if let Some(customer) = &req.customer
        && let Err(e) = tenantd_core::TenantId::parse(customer)
    {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    match c.sup.scale(req.customer.as_deref(), req.count).await {
        Ok(()) => Json(c.statuses().await).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

async fn info(State(c): State<Arc<ClusterShared>>) -> Json<Info> {
    Json(Info {
        app: c.cfg.app_name.clone(),
        edge: format!("http://{}", c.edge_addr),
        dns: c.dns_addr.to_string(),
        store: c.cfg.store.to_string(),
    })
}

async fn stats(State(c): State<Arc<ClusterShared>>) -> Response {
    Json(c.edge.stats()).into_response()
}

#[derive(Deserialize)]
struct LogsQuery {
    lines: Option<usize>,
}

async fn logs(
    State(c): State<Arc<ClusterShared>>,
    Query(q): Query<LogsQuery>,
) -> Json<Vec<String>> {
    Json(c.sup.logs().recent(q.lines.unwrap_or(200)))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The CLI side: one call to the admin API.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let base = if base.contains("://") {
            base.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Client {
            base,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client builds"),
        }
    }

    pub async fn machines(&self) -> anyhow::Result<Vec<MachineStatus>> {
        self.call(self.http.get(format!("{}/v1/machines", self.base)))
            .await
    }

    pub async fn action(&self, id: &str, action: &str) -> anyhow::Result<Option<MachineInfo>> {
        self.call(
            self.http
                .post(format!("{}/v1/machines/{id}/{action}", self.base)),
        )
        .await
    }

    pub async fn scale(
        &self,
        customer: Option<&str>,
        count: usize,
    ) -> anyhow::Result<Vec<MachineStatus>> {
        let req = ScaleRequest {
            customer: customer.map(str::to_string),
            count,
        };
        self.call(self.http.post(format!("{}/v1/scale", self.base)).json(&req))
            .await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the dev cluster's admin API at {}: {e} (is `tenantd dev` running? see --admin)",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            anyhow::bail!("{status}: {message}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// `ls` as a table.
pub fn format_table(machines: &[MachineStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<10} {:<11} {:<22} {:<7} {:<6} {}\n",
        "ID", "CUSTOMER", "STATE", "ADDRESS", "HOLDER", "EPOCH", "RESTARTS"
    );
    for m in machines {
        let holder = match m.holder {
            Some(true) => "yes".to_string(),
            Some(false) => "no".to_string(),
            None => "?".to_string(),
        };
        let state = serde_json::to_value(m.machine.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<16} {:<10} {:<11} {:<22} {:<7} {:<6} {}\n",
            m.machine.id,
            m.machine.customer_id.as_deref().unwrap_or("(pool)"),
            state,
            m.machine.address.to_string(),
            holder,
            m.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            m.machine.restarts
        ));
    }
    out
}
