//! Hrana over HTTP as the clients reach it, on real `tenantd serve`
//! processes: the routes, the forgotten trailing slash, replays from a
//! non-holder, tokens, and bad input that must leave the tenant and the
//! machine fine.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use serde_json::{Value, json};

use cluster::{Machine, Setup};

const API_TOKEN: &str = "hrana-test-api-token";

fn args() -> Vec<&'static str> {
    vec!["--api-token", API_TOKEN]
}

async fn post(m: &Machine, path: &str, body: Vec<u8>) -> (u16, String, String) {
    let reply = reqwest::Client::new()
        .post(m.url(path))
        .bearer_auth(API_TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = reply.status().as_u16();
    let content_type = reply
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, reply.text().await.unwrap())
}

async fn pipeline(m: &Machine, customer: &str, requests: Value) -> (u16, Value) {
    let body = json!({"baton": null, "requests": requests}).to_string();
    let (status, _, text) = post(
        m,
        &format!("/customers/{customer}/v2/pipeline"),
        body.into(),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn execute(sql: &str) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql}})
}

async fn count(m: &Machine, customer: &str) -> Value {
    let (status, answer) = pipeline(m, customer, json!([execute("SELECT count(*) FROM t")])).await;
    assert_eq!(status, 200, "{answer}");
    answer["results"][0]["response"]["result"]["rows"][0][0]["value"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_slash_and_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["5"]);
    let m = setup.machine("a00000000024a1", Some("5"), &args());
    let http = reqwest::Client::new();
    for path in ["/customers/5/v2", "/customers/5/v3"] {
        assert_eq!(
            http.get(m.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    for path in [
        "/customers/5/v3-protobuf",
        "/customers/5/v3-protobuf/pipeline",
    ] {
        assert_eq!(
            http.get(m.url(path)).send().await.unwrap().status(),
            404,
            "{path}"
        );
    }
    for path in [
        "/customers/v2/pipeline",
        "/customers/v3/pipeline",
        "/customers/v3/cursor",
    ] {
        let (status, content_type, text) = post(&m, path, b"{}".to_vec()).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(
            content_type, "text/plain",
            "{path}: exactly, or the client hides the text"
        );
        assert!(
            text.contains("http://host/customers/<id>/ with a trailing slash"),
            "{text}"
        );
    }
    let (status, answer) = pipeline(&m, "5", json!([execute("SELECT 1"), {"type": "close"}])).await;
    assert_eq!(status, 200);
    assert_eq!(answer["baton"], Value::Null);
    assert_eq!(
        answer["results"][0]["response"]["result"]["rows"],
        json!([[{"type": "integer", "value": "1"}]])
    );
    let cursor = json!({"baton": null, "batch": {"steps": [{"stmt": {"sql": "SELECT 1 AS one"}}]}});
    let (status, _, text) = post(&m, "/customers/5/v3/cursor", cursor.to_string().into()).await;
    assert_eq!(status, 200);
    let entries: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries[1]["type"], "step_begin");
    assert_eq!(
        entries[2],
        json!({"type": "row", "row": [{"type": "integer", "value": "1"}]})
    );
    assert_eq!(entries[3]["type"], "step_end");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_applies_nothing_and_leaves_the_stream_and_machine_fine() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["6"]);
    // Bodies up to 16 MiB are read, so the 10 MB text reaches the executor.
    let mut big_bodies = args();
    big_bodies.extend(["--max-body-bytes", "16777216"]);
    let m = setup.machine("a00000000025a1", Some("6"), &big_bodies);
    let (status, _) = pipeline(&m, "6", json!([execute("CREATE TABLE t (x)")])).await;
    assert_eq!(status, 200);
    let write = execute("INSERT INTO t VALUES (1)");
    let path = "/customers/6/v2/pipeline";

    // Malformed JSON, an unknown request type, a wrong field: 400 with a
    // message, nothing of the pipeline run (its valid write included).
    for body in [
        "{\"baton\": null, \"requests\": [".to_string(),
        json!({"baton": null, "requests": [write, {"type": "frobnicate"}]}).to_string(),
        json!({"baton": null, "requests": [write, {"type": "execute", "stmt": {"sql": 5}}]})
            .to_string(),
        json!({"requests": [write, {"type": "execute"}]}).to_string(),
    ] {
        let (status, content_type, text) = post(&m, path, body.clone().into()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(content_type.starts_with("application/json"));
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{text}"
        );
    }
    // A baton this machine never gave (another tenant's, an old lease's):
    // refused, nothing applied.
    let body = json!({"baton": "forged.baton", "requests": [write]}).to_string();
    let (status, _, text) = post(&m, path, body.into()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("STREAM_EXPIRED"), "{text}");
    // A 10 MB SQL text: SQLite's statement length limit refuses it.
    let big = json!({"baton": null, "requests": [execute(&format!("INSERT INTO t VALUES ('{}')", "x".repeat(10 << 20)))]});
    let (status, _, text) = post(&m, path, big.to_string().into()).await;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    assert_eq!(answer["results"][0]["type"], "error");
    assert_eq!(answer["results"][0]["error"]["code"], "SQLITE_TOOBIG");
    // Too many statements for one pipeline: 400, none run.
    let many: Vec<Value> = (0..101).map(|_| write.clone()).collect();
    let (status, answer) = pipeline(&m, "6", Value::Array(many)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        count(&m, "6").await,
        "0",
        "nothing of the refused pipelines was applied"
    );
    // The machine and the tenant are fine: the next pipeline writes.
    let (status, answer) = pipeline(&m, "6", json!([write])).await;
    assert_eq!(status, 200);
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    assert_eq!(count(&m, "6").await, "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_holder_replays_the_pipeline_to_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["9"]);
    let a = setup.machine("a00000000026a1", Some("9"), &args());
    let b = setup.machine("b00000000026b2", Some("9"), &args());
    let (status, answer) = pipeline(&a, "9", json!([execute("CREATE TABLE t (x)")])).await;
    assert_eq!(status, 200, "{answer}");
    let reply = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(b.url("/customers/9/v2/pipeline"))
        .bearer_auth(API_TOKEN)
        .body(json!({"baton": null, "requests": [execute("INSERT INTO t VALUES (1)")]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 307);
    let replay = reply.headers()["fly-replay"].to_str().unwrap().to_string();
    assert!(replay.contains("instance=a00000000026a1"), "{replay}");
    // Through a client that follows replays as Fly Proxy does.
    let fly = cluster::FlyClient::new(&[&a, &b]);
    let body = json!({"baton": null, "requests": [execute("INSERT INTO t VALUES (1)")]});
    let reply = fly
        .send_body(
            "b00000000026b2",
            reqwest::Method::POST,
            "/customers/9/v2/pipeline",
            &[("authorization", &format!("Bearer {API_TOKEN}"))],
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.hops, 1);
    assert_eq!(
        reply.json["results"][0]["response"]["result"]["affected_row_count"],
        1
    );
    assert_eq!(count(&a, "9").await, "1");
}

fn tenantd_tokens(args: &[&str], signing_key: Option<&str>) -> String {
    let mut command = std::process::Command::new(cluster::BIN);
    command.arg("tokens").args(args);
    if let Some(key) = signing_key {
        command.env("TENANTD_TOKEN_SIGNING_KEY", key);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

async fn post_as(m: &Machine, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let reply = reqwest::Client::new()
        .post(m.url(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_tokens_open_their_tenant_only_on_sql_and_hrana() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["11", "12"]);
    let keys = |pair: &str, name: &str| {
        pair.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_string()
    };
    let old = tenantd_tokens(&["keygen"], None);
    let new = tenantd_tokens(&["keygen"], None);
    let (old_secret, new_secret) = (
        keys(&old, "TENANTD_TOKEN_SIGNING_KEY"),
        keys(&new, "TENANTD_TOKEN_SIGNING_KEY"),
    );
    // A rotation under way: both public keys.
    let public = format!(
        "{},{}",
        keys(&new, "TENANTD_TOKEN_PUBLIC_KEY"),
        keys(&old, "TENANTD_TOKEN_PUBLIC_KEY")
    );
    // `=`: a base64url key may start with '-', which would read as a flag.
    let public = format!("--token-public-key={public}");
    let m = setup.machine("a00000000027a1", None, &[&public]);
    let create = |args: &[&str], secret: &str| {
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        tenantd_tokens(&all, Some(secret))
    };
    let rw_old = create(&["--customer-id", "11"], &old_secret);
    let rw_new = create(&["--customer-id", "11"], &new_secret);
    let ro = create(&["--customer-id", "11", "--read-only"], &new_secret);
    let short = create(&["--customer-id", "11", "--expires-in", "1s"], &new_secret);

    let write = json!({"statements": [{"sql": "CREATE TABLE IF NOT EXISTS t (x)"}, {"sql": "INSERT INTO t VALUES (1)"}]});
    let read = json!({"statements": [{"sql": "SELECT count(*) FROM t"}], "read_only": true});
    let hrana_write = json!({"baton": null, "requests": [execute("INSERT INTO t VALUES (2)")]});
    for token in [&rw_old, &rw_new] {
        let (status, answer) = post_as(&m, "/customers/11/sql", token, &write).await;
        assert_eq!(status, 200, "{answer}");
        let (status, answer) = post_as(&m, "/customers/11/v2/pipeline", token, &hrana_write).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    }
    // Another tenant: 403 on both APIs, whatever the token allows.
    let (status, answer) = post_as(&m, "/customers/12/sql", &rw_new, &read).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = post_as(&m, "/customers/12/v3/pipeline", &rw_new, &hrana_write).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("opens customer 11 only")
    );
    // Read-only: reads, never writes.
    let (status, answer) = post_as(&m, "/customers/11/sql", &ro, &read).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["rows"][0][0], 4);
    let (status, _) = post_as(&m, "/customers/11/sql", &ro, &write).await;
    assert_eq!(status, 403);
    let (status, answer) = post_as(&m, "/customers/11/v2/pipeline", &ro, &hrana_write).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer["results"][0]["error"]["code"], "SQLITE_READONLY",
        "{answer}"
    );
    // No token, a forged one, an expired one: 401.
    let (status, _) = post_as(&m, "/customers/11/sql", "nope", &read).await;
    assert_eq!(status, 401);
    let mut forged: Vec<&str> = rw_new.split('.').collect();
    forged[2] = "AAAA";
    let (status, _) = post_as(&m, "/customers/11/sql", &forged.join("."), &read).await;
    assert_eq!(status, 401);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, answer) = post_as(&m, "/customers/11/v2/pipeline", &short, &hrana_write).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("expired"),
        "{answer}"
    );
    let (status, answer) = post_as(&m, "/customers/11/sql", &rw_new, &read).await;
    assert_eq!(
        (status, &answer["results"][0]["rows"][0][0]),
        (200, &json!(4))
    );
}

#[test]
fn a_malformed_public_key_stops_the_machine_at_start_naming_it() {
    let output = std::process::Command::new(cluster::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-public-key",
            "not-a-key",
        ])
        .env("TENANTD_STORE", "file:///nonexistent-for-this-test")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TENANTD_TOKEN_PUBLIC_KEY"), "{stderr}");
}

/// Hrana answers carry the same consistency headers as `/sql`
/// (`tenantd-bookmark`, `tenantd-served-by`, `tenantd-role`): a write's
/// bookmark names the slot it was committed in, so a later request that
/// sends it back is answered from state at least that new, and a bookmark
/// tenantd never gave is refused.
#[tokio::test(flavor = "multi_thread")]
async fn hrana_answers_carry_bookmarks_and_honour_them() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["12"]);
    let a = setup.machine("a00000000027a1", Some("12"), &args());
    let send = |bookmark: Option<String>, sql: &'static str| {
        let mut request = reqwest::Client::new()
            .post(a.url("/customers/12/v2/pipeline"))
            .bearer_auth(API_TOKEN)
            .body(json!({"baton": null, "requests": [execute(sql)]}).to_string());
        if let Some(bookmark) = bookmark {
            request = request.header("tenantd-bookmark", bookmark);
        }
        request.send()
    };
    let created = send(None, "CREATE TABLE t (x)").await.unwrap();
    assert_eq!(created.status(), 200);
    let header =
        |reply: &reqwest::Response, name: &str| reply.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header(&created, "tenantd-served-by"), "a00000000027a1");
    assert_eq!(header(&created, "tenantd-role"), "holder");
    let first = header(&created, "tenantd-bookmark");
    let inserted = send(Some(first.clone()), "INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(inserted.status(), 200);
    let second = header(&inserted, "tenantd-bookmark");
    assert!(
        second.parse::<u64>().unwrap() > first.parse::<u64>().unwrap(),
        "a write moves the bookmark on: {first} then {second}"
    );
    let read = send(Some(second.clone()), "SELECT count(*) FROM t")
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(header(&read, "tenantd-bookmark"), second);
    let bogus = send(Some("not-a-bookmark".into()), "SELECT 1")
        .await
        .unwrap();
    assert_eq!(bogus.status(), 400, "{:?}", bogus.text().await);
}
