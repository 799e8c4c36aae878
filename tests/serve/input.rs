//! Bad input gets a clear error and loses nothing; idempotency keys; pool
//! mode; migration of the original app's database.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::cluster::{BIN, Setup, eventually, free_port};
use crate::routing::holder_of;

/// Sends a request with the path exactly as given (no client-side
/// normalisation of `..` or percent-escapes).
fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: application/json\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tenant_ids_are_rejected_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a0000000000b01", None, &[]);
    let long = "x".repeat(200);
    for path in [
        "/customers/../x".to_string(),
        "/customers/..%2Fx".to_string(),
        "/customers/a.b".to_string(),
        format!("/customers/{long}"),
        "/customers/".to_string(),
        "/customers/a%2Fb".to_string(),
        "/customers/a%2fb/count".to_string(),
        "/customers/a%00b".to_string(),
        "/customers/%00".to_string(),
        "/customers/a.b/count".to_string(),
    ] {
        let (code, body) = raw_get(m.addr, &path);
        assert_eq!(code, 400, "{path} → {code} {body}");
        assert!(body.contains("invalid tenant id"), "{path}: {body}");
    }
    assert!(
        !dir.path().join("store/customer").exists(),
        "an invalid id reached the store"
    );
    assert!(
        !dir.path().join("store/_slash_").exists(),
        "an invalid id reached the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_counts_once_and_returns_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a0000000000d01", Some("9"), &[]);
    holder_of(&setup, "9").await;
    let http = reqwest::Client::new();
    let send = |key: &'static str| {
        http.post(m.url("/customers/9/increment"))
            .header("idempotency-key", key)
            .send()
    };
    let first: serde_json::Value = send("abc").await.unwrap().json().await.unwrap();
    let other: serde_json::Value = send("def").await.unwrap().json().await.unwrap();
    let again = send("abc").await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["count"], first["count"]);
    assert_eq!(other["count"], 2);
    let count: serde_json::Value = http
        .get(m.url("/customers/9/count"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(count["count"], 2, "the repeated key did not count again");
    let r = http
        .post(m.url("/customers/9/increment"))
        .header("idempotency-key", "x".repeat(300))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_page_and_json_answers() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a0000000000h01", Some("5"), &[]);
    holder_of(&setup, "5").await;
    let http = reqwest::Client::new();
    let page = http.get(m.url("/customers/5")).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("<strong>1</strong>"));
    let json: serde_json::Value = http
        .get(m.url("/customers/5"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["customer_id"], "5");
    assert_eq!(json["count"], 2);
    assert_eq!(json["machine_id"], m.id.as_str());
    assert!(json["epoch"].as_u64().unwrap() >= 1);
    let metrics = http
        .get(m.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tenantd_http_requests_total",
        "tenantd_batch_size",
        "tenantd_upload_seconds",
        "tenantd_lease_holder",
        "tenantd_lease_epoch",
        "tenantd_store_requests_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let r = http
        .post(m.url("/customers/5/increment"))
        .body(vec![b'x'; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "oversized bodies are refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_answers_503_and_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a0000000000u01", Some("7"), &["--admin-token", "sesame"]);
    holder_of(&setup, "7").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            http.post(m.url("/customers/7/increment"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    // Without the token the admin API does not act.
    let r = http
        .put(m.url("/_admin/faults"))
        .body(r#"{"partitioned":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .put(m.url("/_admin/faults"))
        .bearer_auth("sesame")
        .body(r#"{"partitioned":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..3 {
        let r = http
            .post(m.url("/customers/7/increment"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("store") || message.contains("lock"),
            "unclear message: {message}"
        );
    }
    assert_eq!(setup.stored_count("7"), 3, "nothing more was stored");
    // Healed, the machine serves again from the durable state.
    http.put(m.url("/_admin/faults"))
        .bearer_auth("sesame")
        .body("{}")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = eventually(
        Duration::from_secs(15),
        "service after healing",
        async || {
            let r = http
                .post(m.url("/customers/7/increment"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())?;
            r.json().await.ok()
        },
    )
    .await;
    assert_eq!(body["count"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_do_not_exist_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let m = Setup::file_store(dir.path()).machine("a0000000000n01", None, &[]);
    let r = reqwest::Client::new()
        .put(m.url("/_admin/faults"))
        .body(r#"{"partitioned":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_object_that_is_not_sqlite_is_reported_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let path = setup.db_path("66");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let garbage =
        b"PK\x03\x04 definitely not a SQLite database, but a zip or something else entirely"
            .repeat(20);
    std::fs::write(&path, &garbage).unwrap();
    let m = setup.machine("a0000000000c01", None, &[]);
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let r = http
            .post(m.url("/customers/66/increment"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        let body: serde_json::Value = r.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("not a SQLite database") && message.contains("will not overwrite"),
            "{message}"
        );
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the object was modified"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_mode_releases_idle_tenants_and_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["1", "2", "3"]);
    let m = setup.machine(
        "a0000000000l01",
        None,
        &["--idle-timeout", "2s", "--max-tenants", "2"],
    );
    let http = reqwest::Client::new();
    for t in ["1", "2"] {
        assert_eq!(
            http.post(m.url(&format!("/customers/{t}/increment")))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(setup.lock("1").unwrap()["released"], false);
    // A third tenant pushes out the least recently used one.
    assert_eq!(
        http.post(m.url("/customers/3/increment"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    eventually(
        Duration::from_secs(5),
        "tenant 1 released to make room",
        async || (setup.lock("1")?["released"] == true).then_some(()),
    )
    .await;
    assert_eq!(setup.lock("2").unwrap()["released"], false);
    // After the idle timeout every tenant is released, epochs kept.
    let epoch = setup.lock("3").unwrap()["epoch"].clone();
    eventually(Duration::from_secs(10), "idle release", async || {
        (setup.lock("3")?["released"] == true).then_some(())
    })
    .await;
    assert_eq!(setup.lock("3").unwrap()["epoch"], epoch);
    // And a released tenant is taken again on the next request.
    let r: serde_json::Value = http
        .post(m.url("/customers/1/increment"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_apps_database_is_imported_once() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    // The original app wrote to the key "/customer/55/db.sqlite3".
    let legacy = dir.path().join("store/_slash_/customer/55/db.sqlite3");
    std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
    let conn = rusqlite::Connection::open(&legacy).unwrap();
    conn.execute_batch("CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (41);")
        .unwrap();
    drop(conn);
    let legacy_bytes = std::fs::read(&legacy).unwrap();
    let m = setup.machine("a0000000000m01", Some("55"), &[]);
    let r: serde_json::Value = reqwest::Client::new()
        .post(m.url("/customers/55/increment"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["count"], 42);
    assert_eq!(setup.stored_count("55"), 42);
    assert_eq!(
        std::fs::read(&legacy).unwrap(),
        legacy_bytes,
        "the original object is left as it was"
    );
}

#[test]
fn serve_refuses_a_bad_store_url_with_one_clear_line() {
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--store",
            "ftp://nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ftp://nope") && stderr.contains("--store"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_an_invalid_customer_id() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--customer-id",
            "../etc",
        ])
        .arg("--store")
        .arg(format!("file://{}", dir.path().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid tenant id") && stderr.contains("CUSTOMER_ID"),
        "{stderr}"
    );
}

/// Starts `tenantd serve` on `store` with `env`, expecting it to refuse to
/// start; returns its stderr and how long it took.
fn failed_start(store: &str, env: Vec<(String, String)>) -> (String, Duration) {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--store",
            store,
        ])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started on {store}");
    (
        String::from_utf8_lossy(&out.stderr).to_string(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_missing_bucket_with_one_clear_line() {
    crate::support::fresh_bucket().await; // moto is up
    let (stderr, took) = failed_start("s3://tenantd-no-such-bucket", crate::support::s3_env());
    assert!(
        stderr.contains("\"tenantd-no-such-bucket\" does not exist")
            && stderr.contains("BUCKET_NAME / --store"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn serve_refuses_an_unreachable_store_within_seconds() {
    let mut env = vec![
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
        ("AWS_ACCESS_KEY_ID".to_string(), "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "test".to_string()),
    ];
    env.push((
        "AWS_ENDPOINT_URL_S3".into(),
        format!("http://127.0.0.1:{}", free_port()),
    ));
    let (stderr, took) = failed_start("s3://tenantd-test", env);
    assert!(
        stderr.contains("cannot reach the store") && stderr.contains("AWS_ENDPOINT_URL_S3"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(
        stderr
            .trim()
            .lines()
            .filter(|l| l.contains("error"))
            .count(),
        1,
        "one clear line: {stderr}"
    );
}

#[test]
fn serve_refuses_wrong_credentials_with_one_clear_line() {
    let moto = crate::support::moto_checking_credentials();
    let env = vec![
        ("AWS_ENDPOINT_URL_S3".to_string(), moto.endpoint.clone()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
        (
            "AWS_ACCESS_KEY_ID".to_string(),
            "AKIAWRONGWRONGWRONG0".to_string(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".to_string(),
            "not-the-secret".to_string(),
        ),
    ];
    let (stderr, took) = failed_start("s3://tenantd-test", env);
    assert!(
        stderr.contains("the store rejected the credentials (403")
            && stderr.contains("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let error_lines = stderr.lines().filter(|l| l.contains("error")).count();
    assert_eq!(error_lines, 1, "one clear line: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_without_credentials() {
    crate::support::fresh_bucket().await;
    let env: Vec<(String, String)> = crate::support::s3_env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .collect();
    let (stderr, took) = failed_start("s3://tenantd-test", env);
    assert!(
        stderr.contains("no S3 credentials found") && stderr.contains("AWS_ACCESS_KEY_ID"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
