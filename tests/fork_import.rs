//! `tenantd tenants create <id> --from <src> [--at …]` (fork) and
//! `--from-file` (import) with the real binary and a serving machine.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use cluster::{Machine, Setup};

/// The file store, with a lease ttl that a loaded CI machine does not
/// mistake for a dead holder (these tests are about migrations, not
/// takeovers).
fn setup(dir: &Path) -> Setup {
    let mut setup = Setup::file_store(dir);
    setup.ttl = "5s".into();
    setup
}

const API: &str = "api-secret";

async fn sql(m: &Machine, id: &str, statement: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(m.url(&format!("/customers/{id}/sql")))
        .bearer_auth(API)
        .json(&json!({"statements": [{"sql": statement}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn ok(m: &Machine, id: &str, statement: &str) {
    let (code, body) = sql(m, id, statement).await;
    assert_eq!(code, 200, "{id}: {statement}: {body}");
}

async fn rows(m: &Machine, id: &str, query: &str) -> Value {
    let (code, body) = sql(m, id, query).await;
    assert_eq!(code, 200, "{id}: {body}");
    body["results"][0]["rows"].clone()
}

/// Every key the tenant has in the file store.
fn keys_of(setup: &Setup, id: &str) -> Vec<String> {
    let dir = setup.root.join("store/customer").join(id);
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                out.push(e.path().display().to_string());
            }
        }
    }
    walk(&dir, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_starts_as_the_source_was_at_a_slot_or_a_time_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    setup.create_tenants(&["src"]);
    let m = setup.machine("a000000000fk01", None, &["--api-token", API]);
    ok(&m, "src", "CREATE TABLE notes(n INTEGER)").await;
    ok(&m, "src", "INSERT INTO notes VALUES (1)").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    ok(&m, "src", "INSERT INTO notes VALUES (2)").await;

    // Forked while the source is held: read only, never locked.
    let lock_before = setup.object("customer/src/machine.lock");
    let (code, out, err) = setup.tenants(&["create", "at-time", "--from", "src", "--at", &between]);
    assert_eq!(code, 0, "{err}");
    let slot: u64 = out
        .split("as of slot ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no slot in {out:?}"));
    let (code, _, err) = setup.tenants(&[
        "create",
        "at-slot",
        "--from",
        "src",
        "--at",
        &slot.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = setup.tenants(&["create", "now", "--from", "src"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        setup.object("customer/src/machine.lock"),
        lock_before,
        "source not locked"
    );

    let one = json!([[1]]);
    let both = json!([[1], [2]]);
    assert_eq!(rows(&m, "at-time", "SELECT n FROM notes").await, one);
    assert_eq!(rows(&m, "at-slot", "SELECT n FROM notes").await, one);
    assert_eq!(
        rows(&m, "now", "SELECT n FROM notes ORDER BY n").await,
        both
    );
    // Each has its own log; the source is untouched by the forks' writes.
    assert_eq!(
        sql(&m, "at-time", "INSERT INTO notes VALUES (9)").await.0,
        200
    );
    assert_eq!(
        rows(&m, "src", "SELECT n FROM notes ORDER BY n").await,
        both
    );
    // An existing id is refused, nothing of it changed.
    let (code, _, err) = setup.tenants(&["create", "now", "--from", "src"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");
    let (code, _, err) = setup.tenants(&["create", "x", "--from", "nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    assert!(keys_of(&setup, "x").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn import_takes_a_sound_file_or_an_export_and_refuses_the_rest_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let plain = dir.path().join("plain.sqlite3");
    {
        let conn = rusqlite::Connection::open(&plain).unwrap();
        conn.execute_batch("CREATE TABLE items(name TEXT); INSERT INTO items VALUES ('pen');")
            .unwrap();
    }
    let (code, out, err) =
        setup.tenants(&["create", "imp", "--from-file", plain.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imp created"), "{out}");
    let m = setup.machine("a000000000im01", None, &["--api-token", API]);
    assert_eq!(
        rows(&m, "imp", "SELECT name FROM items").await,
        json!([["pen"]])
    );
    assert_eq!(
        sql(&m, "imp", "INSERT INTO items VALUES ('cup')").await.0,
        200
    );

    // An export (`tenantd restore`) imports again as another tenant.
    let export = setup.stored_db("imp");
    let (code, _, err) =
        setup.tenants(&["create", "again", "--from-file", export.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        rows(&m, "again", "SELECT name FROM items ORDER BY name").await,
        json!([["cup"], ["pen"]])
    );

    let not_sqlite = dir.path().join("not.sqlite3");
    std::fs::write(&not_sqlite, b"customer/1/log/00000000000000000001").unwrap();
    let corrupt = dir.path().join("corrupt.sqlite3");
    {
        let conn = rusqlite::Connection::open(&corrupt).unwrap();
        conn.execute_batch(
            "CREATE TABLE t(x TEXT); CREATE INDEX tx ON t(x);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO t SELECT hex(randomblob(20)) FROM n;",
        )
        .unwrap();
    }
    let mut bytes = std::fs::read(&corrupt).unwrap();
    for b in &mut bytes[4096 * 3..4096 * 3 + 2000] {
        *b = 0x5a;
    }
    std::fs::write(&corrupt, bytes).unwrap();
    let internal = dir.path().join("internal.sqlite3");
    rusqlite::Connection::open(&internal)
        .unwrap()
        .execute_batch("CREATE TABLE tenantd_secret(x)")
        .unwrap();
    let cases = [
        (&not_sqlite, vec![], "not a SQLite database"),
        (&corrupt, vec![], "integrity"),
        (&internal, vec![], "tenantd_secret"),
        (&plain, vec!["--max-db-bytes", "1000"], "--max-db-bytes"),
    ];
    for (i, (file, extra, expected)) in cases.into_iter().enumerate() {
        let id = format!("bad{i}");
        let mut args = vec!["create", &id, "--from-file", file.to_str().unwrap()];
        args.extend(extra);
        let (code, _, err) = setup.tenants(&args);
        assert_eq!(code, 1, "{id}: {err}");
        assert!(
            err.contains(expected) || err.to_lowercase().contains("malformed"),
            "{id}: {err}"
        );
        assert!(keys_of(&setup, &id).is_empty(), "{id}: nothing created");
    }
    let (code, _, err) = setup.tenants(&["create", "imp", "--from-file", plain.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");
}
