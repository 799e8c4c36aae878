//! `tenantd fly` against a local server that answers the Machines API's
//! request and response shapes (GET/POST /v1/apps/{app}/machines, POST
//! .../{id}/stop, DELETE .../{id}?force=true), run as a real process.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_tenantd");

#[derive(Default)]
struct Fake {
    machines: Vec<Value>,
    requests: Vec<String>,
    next: u32,
}

type Shared = Arc<Mutex<Fake>>;

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer secret-token")
}

async fn list(
    State(s): State<Shared>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("GET {app}"));
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        );
    }
    if app != "my-app" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "app not found"})),
        );
    }
    (StatusCode::OK, Json(Value::Array(s.machines.clone())))
}

async fn create(
    State(s): State<Shared>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("POST {app}"));
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, Json(json!({})));
    }
    s.next += 1;
    let machine = json!({
        "id": format!("m{:013}", s.next),
        "state": "started",
        "region": body["region"].as_str().unwrap_or("ams"),
        "created_at": format!("2026-11-25T00:00:{:02}Z", s.next),
        "config": body["config"],
    });
    s.machines.push(machine.clone());
    (StatusCode::OK, Json(machine))
}

async fn stop(State(s): State<Shared>, Path((_app, id)): Path<(String, String)>) -> Json<Value> {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("STOP {id}"));
    for m in s.machines.iter_mut().filter(|m| m["id"] == id.as_str()) {
        m["state"] = json!("stopped");
    }
    Json(json!({"ok": true}))
}

async fn destroy(State(s): State<Shared>, Path((_app, id)): Path<(String, String)>) -> Json<Value> {
    let mut s = s.lock().unwrap();
    s.requests.push(format!("DELETE {id}"));
    s.machines.retain(|m| m["id"] != id.as_str());
    Json(json!({"ok": true}))
}

async fn fake_api() -> (String, Shared) {
    let shared: Shared = Arc::default();
    shared.lock().unwrap().machines.push(json!({
        "id": "base0000000001", "state": "started", "region": "ams", "created_at": "2026-01-01T00:00:00Z",
        "config": {"image": "registry.fly.io/my-app:v1", "init": {"cmd": ["serve", "--customer-id", "100"]},
                   "env": {"CUSTOMER_ID": "100"}, "metadata": {"customer_id": "100", "fly_process_group": "customer100"},
                   "services": [{"internal_port": 3000}]}
    }));
    let app = Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop))
        .route(
            "/v1/apps/{app}/machines/{id}",
            axum::routing::delete(destroy),
        )
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, shared)
}

async fn fly(url: &str, token: Option<&str>, app: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("fly")
        .args(args)
        .env("FLY_API_URL", url)
        .env("FLY_APP_NAME", app)
        .env_remove("FLY_API_TOKEN");
    if let Some(token) = token {
        cmd.env("FLY_API_TOKEN", token);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn of_customer(s: &Shared, customer: &str) -> Vec<Value> {
    s.lock()
        .unwrap()
        .machines
        .iter()
        .filter(|m| m["config"]["metadata"]["customer_id"] == customer)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_is_idempotent_and_sets_metadata_and_env() {
    let (url, s) = fake_api().await;
    let token = Some("secret-token");
    let (ok, out) = fly(
        &url,
        token,
        "my-app",
        &["provision", "--customer", "300", "--count", "2"],
    )
    .await;
    assert!(ok, "{out}");
    let created = of_customer(&s, "300");
    assert_eq!(created.len(), 2);
    for m in &created {
        assert_eq!(m["config"]["env"]["CUSTOMER_ID"], "300");
        assert_eq!(
            m["config"]["init"]["cmd"],
            json!(["serve"]),
            "a cloned --customer-id 100 must not survive"
        );
        assert_eq!(
            m["config"]["image"], "registry.fly.io/my-app:v1",
            "cloned from the app's machine"
        );
        assert_eq!(m["region"], "ams");
    }
    let (ok, out) = fly(
        &url,
        token,
        "my-app",
        &["provision", "--customer", "300", "--count", "2"],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        of_customer(&s, "300").len(),
        2,
        "provisioning twice creates nothing more"
    );
    assert_eq!(
        s.lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.starts_with("POST"))
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_creates_and_destroys_only_that_tenants_machines() {
    let (url, s) = fake_api().await;
    let token = Some("secret-token");
    assert!(
        fly(
            &url,
            token,
            "my-app",
            &["scale", "--customer", "300", "--count", "3"]
        )
        .await
        .0
    );
    assert_eq!(of_customer(&s, "300").len(), 3);
    let (ok, out) = fly(
        &url,
        token,
        "my-app",
        &["scale", "--customer", "300", "--count", "1"],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(of_customer(&s, "300").len(), 1);
    assert_eq!(
        of_customer(&s, "100").len(),
        1,
        "another tenant's machine was touched"
    );
    let requests = s.lock().unwrap().requests.clone();
    let stops = requests.iter().filter(|r| r.starts_with("STOP")).count();
    let deletes = requests.iter().filter(|r| r.starts_with("DELETE")).count();
    assert_eq!(
        (stops, deletes),
        (2, 2),
        "each destroyed machine is stopped first: {requests:?}"
    );
    let (ok, out) = fly(&url, token, "my-app", &["ls", "--json"]).await;
    assert!(ok);
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_fix() {
    let (url, _s) = fake_api().await;
    let (ok, out) = fly(&url, None, "my-app", &["ls"]).await;
    assert!(
        !ok && out.contains("FLY_API_TOKEN is not set") && out.contains("fly tokens create deploy"),
        "{out}"
    );
    let (ok, out) = fly(&url, Some("wrong"), "my-app", &["ls"]).await;
    assert!(!ok && out.contains("rejected FLY_API_TOKEN"), "{out}");
    let (ok, out) = fly(&url, Some("secret-token"), "other-app", &["ls"]).await;
    assert!(
        !ok && out.contains("\"other-app\"") && out.contains("FLY_APP_NAME"),
        "{out}"
    );
    let (ok, out) = fly(
        &url,
        Some("secret-token"),
        "my-app",
        &["provision", "--customer", "../x"],
    )
    .await;
    assert!(!ok && out.contains("invalid tenant id"), "{out}");
}
