//! `tenantd fly` against a local server that answers the Machines API's
//! request and response shapes (GET/POST /v1/apps/{app}/machines, POST
//! .../{id}/stop, GET .../{id}/wait, DELETE .../{id}), run as a real
//! process. Like the real API: machine names are unique within the app,
//! a stop takes a while (`stopping`, then `stopped`), waiting for
//! `stopped` needs the instance id, and a delete without force refuses a
//! machine that is not stopped.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
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
    /// Lists still to refuse with 429 and `Retry-After: 1`, as the real API
    /// does past 1 request/s per action per app.
    refuse_lists: u32,
    /// When each list arrived.
    listed_at: Vec<std::time::Instant>,
}

type Shared = Arc<Mutex<Fake>>;

/// A plain token as `Bearer`, a macaroon token (`fm2_...`) as `FlyV1`.
fn authorized(headers: &HeaderMap) -> bool {
    matches!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer secret-token" | "FlyV1 fm2_secret,fm2_discharge")
    )
}

async fn list(
    State(s): State<Shared>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut s = s.lock().unwrap();
    s.requests.push(format!("GET {app}"));
    s.listed_at.push(std::time::Instant::now());
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        )
            .into_response();
    }
    if s.refuse_lists > 0 {
        s.refuse_lists -= 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"error": "rate limit exceeded"})),
        )
            .into_response();
    }
    if app != "my-app" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "app not found"})),
        )
            .into_response();
    }
    (StatusCode::OK, Json(Value::Array(s.machines.clone()))).into_response()
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
    let name = body["name"].as_str().unwrap_or_default().to_string();
    if !name.is_empty() && s.machines.iter().any(|m| m["name"] == name.as_str()) {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("machine name {name} already exists")})),
        );
    }
    s.next += 1;
    let machine = json!({
        "id": format!("m{:013}", s.next),
        "name": name,
        "state": "started",
        "instance_id": format!("I{:025}", s.next),
        "region": body["region"].as_str().unwrap_or("ams"),
        "created_at": format!("2026-11-25T00:00:{:02}Z", s.next),
        "config": body["config"],
    });
    s.machines.push(machine.clone());
    (StatusCode::OK, Json(machine))
}

/// `stopping` at once, `stopped` 300 ms later (the machine drains).
async fn stop(State(s): State<Shared>, Path((_app, id)): Path<(String, String)>) -> Json<Value> {
    {
        let mut s = s.lock().unwrap();
        s.requests.push(format!("STOP {id}"));
        for m in s.machines.iter_mut().filter(|m| m["id"] == id.as_str()) {
            m["state"] = json!("stopping");
        }
    }
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut s = s.lock().unwrap();
        for m in s.machines.iter_mut().filter(|m| m["id"] == id.as_str()) {
            m["state"] = json!("stopped");
        }
    });
    Json(json!({"ok": true}))
}

async fn wait(
    State(s): State<Shared>,
    Path((_app, id)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    s.lock().unwrap().requests.push(format!(
        "WAIT {id} {} {}",
        q.get("state").map(String::as_str).unwrap_or("-"),
        q.get("instance_id").map(String::as_str).unwrap_or("-")
    ));
    for _ in 0..100 {
        {
            let s = s.lock().unwrap();
            let Some(m) = s.machines.iter().find(|m| m["id"] == id.as_str()) else {
                return (StatusCode::NOT_FOUND, Json(json!({"error": "not found"})));
            };
            if q.get("state").map(String::as_str) == Some("stopped")
                && q.get("instance_id").map(String::as_str) != m["instance_id"].as_str()
            {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "instance_id is required to wait for stopped"})),
                );
            }
            if Some(m["state"].as_str().unwrap()) == q.get("state").map(String::as_str) {
                return (StatusCode::OK, Json(json!({"ok": true})));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (
        StatusCode::REQUEST_TIMEOUT,
        Json(json!({"error": "timeout"})),
    )
}

async fn destroy(
    State(s): State<Shared>,
    Path((_app, id)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let mut s = s.lock().unwrap();
    let force = q.get("force").is_some_and(|f| f == "true");
    let state = s
        .machines
        .iter()
        .find(|m| m["id"] == id.as_str())
        .map(|m| m["state"].as_str().unwrap().to_string());
    s.requests
        .push(format!("DELETE {id} {}", state.as_deref().unwrap_or("-")));
    if !force && state.as_deref() != Some("stopped") {
        return (
            StatusCode::PRECONDITION_FAILED,
            Json(json!({"error": "failed_precondition: machine still active, stop it first"})),
        );
    }
    s.machines.retain(|m| m["id"] != id.as_str());
    (StatusCode::OK, Json(json!({"ok": true})))
}

async fn fake_api() -> (String, Shared) {
    let shared: Shared = Arc::default();
    shared.lock().unwrap().machines.push(json!({
        "id": "base0000000001", "name": "quiet-sun-1234", "state": "started", "region": "ams",
        "instance_id": "I0000000000000000000000000", "created_at": "2026-01-01T00:00:00Z",
        "config": {"image": "registry.fly.io/my-app:v1", "init": {"cmd": ["serve", "--customer-id", "100"]},
                   "env": {"TENANTD_LEASE_TTL": "5s"},
                   "metadata": {"fly_process_group": "customer100", "fly_platform_version": "v2"},
                   "services": [{"internal_port": 3000}]}
    }));
    let app = Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop))
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait))
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

const FLY_TOML: &str = r#"
app = "my-app"
[processes]
  customer100 = "serve --customer-id 100"
  customer300 = "serve --customer-id 300"
[http_service]
  internal_port = 3000
  processes = ["customer100", "customer300"]
"#;

/// `tenantd fly <args>` with fly.toml's text written next to it.
async fn fly_with(
    url: &str,
    token: Option<&str>,
    app: &str,
    fly_toml: &str,
    args: &[&str],
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fly.toml"), fly_toml).unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("fly")
        .args(args)
        .current_dir(dir.path())
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

async fn fly(url: &str, token: Option<&str>, app: &str, args: &[&str]) -> (bool, String) {
    fly_with(url, token, app, FLY_TOML, args).await
}

/// What `fly deploy` does to machines: it destroys those of process groups
/// that fly.toml does not list.
fn simulated_deploy(s: &Shared, fly_toml: &str) {
    let fly: toml::Table = fly_toml.parse().unwrap();
    let groups = fly["processes"].as_table().unwrap();
    s.lock().unwrap().machines.retain(|m| {
        m["config"]["metadata"]["fly_process_group"]
            .as_str()
            .is_some_and(|g| groups.contains_key(g))
    });
}

fn of_customer(s: &Shared, customer: &str) -> Vec<Value> {
    s.lock()
        .unwrap()
        .machines
        .iter()
        .filter(|m| m["config"]["metadata"]["fly_process_group"] == format!("customer{customer}"))
        .cloned()
        .collect()
}

fn requests(s: &Shared, prefix: &str) -> Vec<String> {
    s.lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with(prefix))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_is_idempotent_and_creates_machines_in_fly_tomls_group() {
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
    let mut names: Vec<&str> = created
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["customer300-1", "customer300-2"]);
    for m in &created {
        assert_eq!(m["config"]["env"]["CUSTOMER_ID"], "300");
        assert_eq!(m["config"]["metadata"]["customer_id"], "300");
        assert_eq!(
            m["config"]["init"]["cmd"],
            json!(["serve", "--customer-id", "300"]),
            "fly.toml's command for the group, not the cloned --customer-id 100"
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
    assert_eq!(requests(&s, "POST").len(), 2);
    simulated_deploy(&s, FLY_TOML);
    assert_eq!(
        of_customer(&s, "300").len(),
        2,
        "`fly deploy` keeps the machines of fly.toml's groups"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_refuses_until_fly_toml_has_the_group_and_prints_the_line() {
    let (url, s) = fake_api().await;
    let without = FLY_TOML
        .replace("  customer300 = \"serve --customer-id 300\"\n", "")
        .replace(", \"customer300\"", "");
    let (ok, out) = fly_with(
        &url,
        Some("secret-token"),
        "my-app",
        &without,
        &["provision", "--customer", "300", "--count", "2"],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("customer300 = \"serve --customer-id 300\"")
            && out.contains("http_service.processes")
            && out.contains("fly deploy"),
        "{out}"
    );
    assert!(requests(&s, "POST").is_empty(), "created a machine: {out}");
    // The group without the HTTP service is refused too.
    let unserved = FLY_TOML.replace(", \"customer300\"", "");
    let (ok, out) = fly_with(
        &url,
        Some("secret-token"),
        "my-app",
        &unserved,
        &["provision", "--customer", "300"],
    )
    .await;
    assert!(!ok && out.contains("http_service.processes"), "{out}");
    // fly.toml of another app.
    let (ok, out) = fly_with(
        &url,
        Some("secret-token"),
        "my-app",
        &FLY_TOML.replace("my-app", "other"),
        &["provision", "--customer", "300"],
    )
    .await;
    assert!(!ok && out.contains("--config"), "{out}");
    assert!(requests(&s, "POST").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_provisions_converge_on_the_same_machines() {
    let (url, s) = fake_api().await;
    let args = ["provision", "--customer", "300", "--count", "3"];
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { fly(&url, Some("secret-token"), "my-app", &args).await })
        })
        .collect();
    for run in runs {
        let (ok, out) = run.await.unwrap();
        assert!(ok, "{out}");
    }
    let mut names: Vec<String> = of_customer(&s, "300")
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["customer300-1", "customer300-2", "customer300-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_accepted_with_or_without_the_flyv1_prefix() {
    let (url, _s) = fake_api().await;
    for token in [
        "FlyV1 fm2_secret,fm2_discharge",
        "fm2_secret,fm2_discharge",
        "secret-token",
    ] {
        let (ok, out) = fly(&url, Some(token), "my-app", &["ls"]).await;
        assert!(ok, "{token:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_and_destroy_wait_for_stopped_before_deleting() {
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
    // One of them is stopped already (autostop): no stop call for it.
    let stopped_id = {
        let mut s = s.lock().unwrap();
        let m = s
            .machines
            .iter_mut()
            .find(|m| m["name"] == "customer300-3")
            .unwrap();
        m["state"] = json!("stopped");
        m["id"].as_str().unwrap().to_string()
    };
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
    let stops = requests(&s, "STOP");
    let deletes = requests(&s, "DELETE");
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert!(!stops[0].contains(&stopped_id), "stopped a stopped machine");
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    assert!(
        deletes.iter().all(|d| d.ends_with(" stopped")),
        "deleted before `stopped`: {deletes:?}"
    );
    assert!(
        requests(&s, "WAIT")
            .iter()
            .all(|w| w.contains(" stopped I")),
        "waits name the state and the instance id"
    );
    let (ok, out) = fly(&url, token, "my-app", &["ls", "--json"]).await;
    assert!(ok);
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);

    let (ok, out) = fly(&url, token, "my-app", &["destroy", "--customer", "300"]).await;
    assert!(ok, "{out}");
    assert!(of_customer(&s, "300").is_empty());
    assert!(
        requests(&s, "DELETE")
            .iter()
            .all(|d| d.ends_with(" stopped")),
        "{:?}",
        requests(&s, "DELETE")
    );
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

/// The API's rate limit answers 429: the call waits at least the
/// `Retry-After` it is given (1 s) before each retry, longer after each
/// refusal, and then succeeds; it does not fail, nor hammer the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_waits_as_asked_and_then_succeeds() {
    let (url, shared) = fake_api().await;
    shared.lock().unwrap().refuse_lists = 2;
    let (ok, out) = fly(&url, Some("secret-token"), "my-app", &["ls"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("base0000000001"), "{out}");
    let at = shared.lock().unwrap().listed_at.clone();
    assert_eq!(at.len(), 3, "two refusals, then the answer");
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= std::time::Duration::from_millis(990),
            "retried {gap:?} after a 429 that asked for 1 s"
        );
    }
}
