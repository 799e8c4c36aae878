//! The tenant lifecycle: `tenantd tenants create|delete|ls`, the admin
//! routes, and what a machine does with requests for tenants that do not
//! exist (404, nothing written, bounded state).

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::cluster::{Machine, Setup, eventually};

const ADMIN: &str = "admin-secret";

/// Every object key under the file store's root.
fn stored_keys(store: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(store, store, &mut out);
    out.sort();
    out
}

/// Sum of the store requests that write (PUTs and DELETEs) in /metrics
/// (behind the admin token when the machine has one).
async fn store_writes(m: &Machine) -> f64 {
    let text = reqwest::Client::new()
        .get(m.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("tenantd_store_requests_total{"))
        .filter(|l| l.contains("op=\"put") || l.contains("op=\"delete"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn status(m: &Machine, all: bool, token: Option<&str>) -> (u16, Value) {
    let mut request =
        reqwest::Client::new().get(m.url(if all { "/_status?all=true" } else { "/_status" }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn increment(m: &Machine, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(m.url(&format!("/customers/{id}/increment")))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn ls_json(setup: &Setup) -> Vec<Value> {
    let (code, out, err) = setup.tenants(&["ls", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// create (twice), ls, delete (twice) with the real binary, and a machine
/// serving the tenants in between.
async fn cli_creates_lists_and_deletes(setup: Setup) {
    let (code, out, err) = setup.tenants(&["create", "t1", "t2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t1 created\nt2 created\n");
    let (code, out, _) = setup.tenants(&["create", "t1"]);
    assert_eq!((code, out.as_str()), (0, "t1 exists\n"));

    let listed = ls_json(&setup);
    let ids: Vec<&str> = listed
        .iter()
        .map(|t| t["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t1", "t2"]);
    assert!(
        listed
            .iter()
            .all(|t| t["bytes"].as_u64().unwrap() > 0 && t["holder"].is_null())
    );
    assert!(
        listed.iter().all(|t| t["last_modified"].is_string()),
        "{listed:?}"
    );

    let m = setup.machine("a000000000lc01", None, &["--admin-token", ADMIN]);
    assert_eq!(increment(&m, "t1").await, (200, increment_body(&m, 1)));
    let listed = ls_json(&setup);
    assert_eq!(listed[0]["holder"], m.id.as_str(), "{listed:?}");

    // The CLI waits for the holder, then says who holds it and what to do.
    let (code, _, err) = setup.tenants(&["delete", "t1", "--wait", "1s"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&m.id) && err.contains("DELETE /_admin/tenants/t1"),
        "{err}"
    );
    assert!(
        setup.object("customer/t1/db.sqlite3").is_some(),
        "nothing deleted"
    );

    // The holder stops the tenant, then deletes it.
    let http = reqwest::Client::new();
    let r = http
        .delete(m.url("/_admin/tenants/t1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(setup.object("customer/t1/db.sqlite3"), None);
    assert_eq!(setup.object("customer/t1/machine.lock"), None);
    let r = http
        .delete(m.url("/_admin/tenants/t1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (code, body) = increment(&m, "t1").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        setup.object("customer/t1/db.sqlite3"),
        None,
        "not recreated"
    );

    let (code, out, err) = setup.tenants(&["delete", "t2"]);
    assert_eq!((code, out.as_str()), (0, "t2 deleted\n"), "{err}");
    let (code, out, _) = setup.tenants(&["delete", "t2", "t3"]);
    assert_eq!((code, out.as_str()), (0, "t2 absent\nt3 absent\n"));
    assert!(ls_json(&setup).is_empty());

    let (code, _, err) = setup.tenants(&["create", "ok", "not/valid"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid tenant id"), "{err}");
    assert_eq!(
        setup.object("customer/ok/db.sqlite3"),
        None,
        "ids checked before acting"
    );
}

fn increment_body(m: &Machine, count: u64) -> Value {
    serde_json::json!({"customer_id": "t1", "count": count, "machine_id": m.id, "epoch": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cli_on_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    cli_creates_lists_and_deletes(Setup::file_store(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cli_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    cli_creates_lists_and_deletes(Setup::s3(dir.path()).await).await;
}

/// Thousands of distinct ids that do not exist, some at the 63-character
/// limit, as fast as the machine takes them: every one is a 404 naming the
/// way to create it, nothing reaches the store as a write, and the machine
/// remembers none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenants_are_404_write_nothing_and_are_not_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine(
        "a000000000un01",
        None,
        &["--admin-token", ADMIN, "--max-known-tenants", "100"],
    );
    let before = store_writes(&m).await;
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..3000)
        .map(|n| match n % 3 {
            0 => format!("u{n}"),
            1 => format!("{n:0>63}"),
            _ => format!("x-{n}_{}", "y".repeat(40)),
        })
        .collect();
    let paths = ["increment", "count", ""];
    let answers: Vec<(u16, String)> = futures::stream::iter(ids.iter().enumerate())
        .map(|(n, id)| {
            let http = http.clone();
            let url = match paths[n % 3] {
                "" => m.url(&format!("/customers/{id}")),
                path => m.url(&format!("/customers/{id}/{path}")),
            };
            async move {
                let request = if url.ends_with("increment") {
                    http.post(url)
                } else {
                    http.get(url)
                };
                let r = request
                    .header("accept", "application/json")
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (code, body) in &answers {
        assert_eq!(*code, 404, "{body}");
        assert!(
            body.contains("does not exist") && body.contains("tenantd tenants create"),
            "{body}"
        );
    }
    assert_eq!(store_writes(&m).await, before);
    assert_eq!(stored_keys(&dir.path().join("store")), Vec::<String>::new());
    let (code, all) = status(&m, true, Some(ADMIN)).await;
    assert_eq!(code, 200);
    assert_eq!(all["known_tenants"], 0, "{all}");

    // A single-tenant machine answers the same for other tenants that do
    // not exist, and writes nothing for them.
    let single = setup.machine("a000000000un02", Some("own"), &["--admin-token", ADMIN]);
    for id in ids.iter().take(300) {
        let r = http
            .get(single.url(&format!("/customers/{id}/count")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body = r.text().await.unwrap();
        assert!(body.contains("does not exist"), "{body}");
    }
    let keys = stored_keys(&dir.path().join("store"));
    assert!(
        keys.iter().all(|k| k.starts_with("customer/own/")
            || k.starts_with(".tenantd/")
            || k.starts_with("machines/")),
        "{keys:?}"
    );
    let (_, all) = status(&single, true, Some(ADMIN)).await;
    assert!(all["known_tenants"].as_u64().unwrap() <= 1, "{all}");
}

/// Single-tenant mode creates its own tenant at start, as the original app
/// did, and pool mode with --create-on-first-request creates on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_tenant_machine_creates_its_tenant_and_the_demo_flag_creates_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let single = setup.machine("a000000000st01", Some("77"), &[]);
    assert!(
        setup.object("customer/77/db.sqlite3").is_some(),
        "created at start"
    );
    let (code, out, _) = setup.tenants(&["create", "77"]);
    assert_eq!((code, out.as_str()), (0, "77 exists\n"));
    drop(single);
    // Its own tenant is not deleted through it: its machines would take it back.
    let single = setup.machine("a000000000st02", Some("77"), &["--admin-token", ADMIN]);
    let r = reqwest::Client::new()
        .delete(single.url("/_admin/tenants/77"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("tenantd fly destroy"));
    drop(single);

    let demo = setup.machine("a000000000dm01", None, &["--create-on-first-request"]);
    let (code, body) = increment(&demo, "fresh").await;
    assert_eq!(
        (code, body["count"].clone()),
        (200, Value::from(1)),
        "{body}"
    );
    assert!(setup.object("customer/fresh/db.sqlite3").is_some());
}

/// The admin routes need the admin token, check ids, and create
/// idempotently; /_status shows held tenants, and all known ones only with
/// the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_and_status_views() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let open = setup.machine("a000000000ad00", None, &[]);
    let http = reqwest::Client::new();
    let r = http
        .post(open.url("/_admin/tenants/a1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "no admin token configured: no admin routes"
    );
    assert_eq!(status(&open, true, None).await.0, 404);
    drop(open);

    let m = setup.machine(
        "a000000000ad01",
        None,
        &[
            "--admin-token",
            ADMIN,
            "--max-known-tenants",
            "10",
            "--max-tenants",
            "3",
        ],
    );
    let r = http
        .post(m.url("/_admin/tenants/a1"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(m.url("/_admin/tenants/a.b"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Unknown first (a negative answer is cached briefly), then created here.
    assert_eq!(increment(&m, "a1").await.0, 404);
    let r = http
        .post(m.url("/_admin/tenants/a1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(m.url("/_admin/tenants/a1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["result"], "exists");
    assert_eq!(
        increment(&m, "a1").await.0,
        200,
        "served at once after creation here"
    );

    // More tenants than the machine may remember: it forgets those it
    // does not hold, and lists only those it holds.
    let ids: Vec<String> = (0..25).map(|n| format!("k{n}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    setup.create_tenants(&refs);
    for id in &ids {
        assert_eq!(increment(&m, id).await.0, 200);
        let (_, all) = status(&m, true, Some(ADMIN)).await;
        assert!(all["known_tenants"].as_u64().unwrap() <= 10, "{all}");
    }
    let held = eventually(Duration::from_secs(10), "at most 3 held", async || {
        let (_, view) = status(&m, false, Some(ADMIN)).await;
        let tenants = view["tenants"].as_array()?.clone();
        (tenants.len() <= 3).then_some(tenants)
    })
    .await;
    assert!(held.iter().all(|t| t["role"] == "holder"), "{held:?}");
    assert_eq!(status(&m, true, None).await.0, 401);
    let (_, all) = status(&m, true, Some(ADMIN)).await;
    assert!(all["tenants"].as_array().unwrap().len() >= held.len());
}

/// A DELETE that reaches a machine not holding the tenant is handed to the
/// holder (fly-replay, followed like Fly Proxy), which stops the tenant and
/// deletes it; the other machine then answers 404 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_reaching_another_machine_is_carried_out_by_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["d1"]);
    let a = setup.machine("a000000000dh01", None, &["--admin-token", ADMIN]);
    let b = setup.machine("b000000000dh02", None, &["--admin-token", ADMIN]);
    assert_eq!(increment(&a, "d1").await.0, 200);
    assert_eq!(setup.lock("d1").unwrap()["holder"], a.id.as_str());

    let client = crate::cluster::FlyClient::new(&[&a, &b]);
    let auth = format!("Bearer {ADMIN}");
    let reply = client
        .send(
            &b.id,
            reqwest::Method::DELETE,
            "/_admin/tenants/d1",
            &[("authorization", auth.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.json);
    assert_eq!(reply.hops, 1, "carried out by the holder");
    assert_eq!(reply.json["result"], "deleted");
    // Only the deleter's fences stay (a paused holder's late upload must
    // find its slot taken): one window of them, and the tombstone that
    // names the last.
    let left: Vec<String> = stored_keys(&dir.path().join("store"))
        .into_iter()
        .filter(|k| k.starts_with("customer/") && !k.ends_with("/deleted.json"))
        .collect();
    assert!(
        left.len() == 4 && left.iter().all(|k| k.contains("/log/")),
        "{left:?}"
    );
    for m in [&a, &b] {
        let (code, body) = increment(m, "d1").await;
        assert_eq!(code, 404, "{body}");
    }
    assert_eq!(
        setup.object("customer/d1/db.sqlite3"),
        None,
        "not recreated"
    );
}
