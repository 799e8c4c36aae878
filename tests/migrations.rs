//! Schema migrations with the real binary: `tenantd migrate push|apply|
//! status` on the file store, and `tenantd serve` machines that apply them
//! at claim and when a push reaches them.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use cluster::{BIN, Machine, Setup, eventually};

/// The file store, with a lease ttl that a loaded CI machine does not
/// mistake for a dead holder (these tests are about migrations, not
/// takeovers).
fn setup(dir: &Path) -> Setup {
    let mut setup = Setup::file_store(dir);
    setup.ttl = "5s".into();
    setup
}

const ADMIN: &str = "admin-secret";
const API: &str = "api-secret";

fn migrate(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .arg("migrate")
        .args(args)
        .arg("--store")
        .arg(&setup.store)
        .envs(setup.env.iter().cloned())
        .env("TENANTD_ADMIN_TOKEN", ADMIN)
        .env("TENANTD_LEASE_TTL", &setup.ttl)
        .env_remove("TENANTD_STORE")
        .output()
        .expect("run tenantd migrate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn status(setup: &Setup) -> Value {
    let (code, out, err) = migrate(setup, &["status", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn write(dir: &Path, name: &str, sql: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), sql).unwrap();
}

fn push(setup: &Setup, dir: &Path) -> (i32, String, String) {
    migrate(setup, &["push", dir.to_str().unwrap()])
}

async fn sql(m: &Machine, id: &str, statements: &[&str]) -> (u16, Value) {
    let statements: Vec<Value> = statements.iter().map(|s| json!({"sql": s})).collect();
    let r = reqwest::Client::new()
        .post(m.url(&format!("/customers/{id}/sql")))
        .bearer_auth(API)
        .json(&json!({"statements": statements}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn pool_machine(setup: &Setup, id: &str) -> Machine {
    let mut setup = setup.clone();
    setup
        .env
        .push(("TENANTD_MIGRATIONS_INTERVAL".into(), "200ms".into()));
    setup.machine(id, None, &["--admin-token", ADMIN, "--api-token", API])
}

/// Rows of a query on the tenant's stored database (snapshot and log).
fn stored_rows(setup: &Setup, id: &str, query: &str) -> Vec<i64> {
    let path = setup.stored_db(id);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn.prepare(query).unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn push_refuses_bad_folders_publishes_nothing_and_keeps_published_files_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let head = "migrations/head.json";
    // (case, files of the folder, what the error names)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a [u8])], &'a str);
    let cases: &[Case] = &[
        (
            "gap",
            &[
                ("0001_a.sql", b"CREATE TABLE a(x)"),
                ("0003_c.sql", b"CREATE TABLE c(x)"),
            ],
            "expected number 0002",
        ),
        (
            "dup",
            &[
                ("0001_a.sql", b"CREATE TABLE a(x)"),
                ("01_b.sql", b"CREATE TABLE b(x)"),
            ],
            "both have number 1",
        ),
        (
            "utf8",
            &[("0001_a.sql", b"CREATE TABLE a(x \xff)")],
            "not UTF-8",
        ),
        ("empty", &[("0001_a.sql", b"  \n")], "is empty"),
        (
            "attach",
            &[("0001_a.sql", b"CREATE TABLE a(x); ATTACH 'x.db' AS y;")],
            "ATTACH",
        ),
        (
            "internal",
            &[("0001_a.sql", b"DELETE FROM tenantd_meta;")],
            "0001_a.sql",
        ),
        (
            "name",
            &[("1a.sql", b"CREATE TABLE a(x)")],
            "NNNN_<name>.sql",
        ),
    ];
    for (what, files, expected) in cases {
        let folder = dir.path().join(what);
        std::fs::create_dir_all(&folder).unwrap();
        for (name, body) in *files {
            std::fs::write(folder.join(name), body).unwrap();
        }
        let (code, out, err) = push(&setup, &folder);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(err.contains(expected), "{what}: {err}");
        assert_eq!(setup.object(head), None, "{what}: nothing published");
        assert_eq!(setup.object("migrations/0001_a.sql"), None, "{what}");
    }

    let folder = dir.path().join("good");
    write(
        &folder,
        "0001_users.sql",
        "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT);",
    );
    let (code, out, err) = push(&setup, &folder);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published 0001_users.sql"), "{out}");
    // The same bytes again: nothing to do.
    let (code, out, _) = push(&setup, &folder);
    assert_eq!(code, 0);
    assert!(out.contains("0 new, 1 already published"), "{out}");
    // Changed after publishing: refused, naming the file and both checksums.
    write(
        &folder,
        "0001_users.sql",
        "CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT);",
    );
    write(&folder, "0002_more.sql", "CREATE TABLE more(x);");
    let (code, _, err) = push(&setup, &folder);
    assert_eq!(code, 1);
    let published = tenantd_core::tenant::migrations::sha256_hex(
        b"CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT);",
    );
    let changed = tenantd_core::tenant::migrations::sha256_hex(
        b"CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT);",
    );
    assert!(
        err.contains("0001_users.sql") && err.contains(&published) && err.contains(&changed),
        "{err}"
    );
    assert_eq!(
        setup.object("migrations/0002_more.sql"),
        None,
        "nothing published"
    );
    assert_eq!(status(&setup)["latest"], 1);
}

/// A tenant is brought up to date at claim before its first answer, and a
/// push reaches its running holder; a tenant whose data breaks a migration
/// keeps serving at its version with the error recorded, the others go
/// on, and once its data is fixed an apply finishes it.
#[tokio::test(flavor = "multi_thread")]
async fn lazy_apply_at_claim_push_to_running_holders_and_failure_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    setup.create_tenants(&["t1", "t2"]);
    let folder = dir.path().join("m");
    write(
        &folder,
        "0001_users.sql",
        "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT);",
    );
    assert_eq!(push(&setup, &folder).0, 0);
    // t1 and t2 were created at version 0: the claim applies 0001 first.
    let m = pool_machine(&setup, "a000000000mg01");
    for id in ["t1", "t2"] {
        let (code, body) = sql(&m, id, &["INSERT INTO users(email) VALUES ('a@x')"]).await;
        assert_eq!(code, 200, "{id}: {body}");
    }
    let (code, _) = sql(&m, "t2", &["INSERT INTO users(email) VALUES ('a@x')"]).await;
    assert_eq!(code, 200);
    // A new tenant is created at the latest version.
    setup.create_tenants(&["t3"]);
    assert_eq!(stored_rows(&setup, "t3", "SELECT count(*) FROM users"), [0]);

    write(
        &folder,
        "0002_unique.sql",
        "CREATE UNIQUE INDEX users_email ON users(email);",
    );
    write(
        &folder,
        "0003_name.sql",
        "ALTER TABLE users ADD COLUMN name TEXT;",
    );
    let (code, _, err) = push(&setup, &folder);
    assert_eq!(code, 0, "{err}");
    // The holder's watcher applies the push to t1 (held) without a request.
    eventually(
        Duration::from_secs(20),
        "the push reaching t1's holder",
        async || {
            let s = status(&setup);
            (s["versions"]["3"].as_u64() >= Some(1)
                && s["failed"].as_array().is_some_and(|f| !f.is_empty()))
            .then_some(())
        },
    )
    .await;
    let (code, body) = sql(&m, "t1", &["UPDATE users SET name = 'n'"]).await;
    assert_eq!(code, 200, "{body}");
    let s = status(&setup);
    assert_eq!(s["latest"], 3, "{s}");
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{s}");
    assert_eq!(failed[0]["customer_id"], "t2");
    assert_eq!(failed[0]["version"], 2);
    assert!(
        failed[0]["error"].as_str().unwrap().contains("UNIQUE"),
        "{s}"
    );
    // t2 still serves, at version 1: 0003 waited for 0002.
    let (code, body) = sql(&m, "t2", &["SELECT count(*) FROM users"]).await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = sql(&m, "t2", &["SELECT name FROM users"]).await;
    assert_eq!(code, 400, "0003 not applied");

    let (code, out, _) = migrate(&setup, &["apply", "--customer-id", "t2"]);
    assert_eq!(code, 1, "still failing: {out}");
    assert!(out.contains("FAILED t2") && out.contains("UNIQUE"), "{out}");
    // A canary that fails stops the rollout before the rest.
    let (code, out, _) = migrate(
        &setup,
        &[
            "apply",
            "--customer-id",
            "t2,t1",
            "--canary",
            "1",
            "--recheck",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("canary failed: stopped after 1 tenant(s), 1 not tried"),
        "{out}"
    );
    // Fixed through SQL, applied again (through the holder): done.
    let (code, _) = sql(&m, "t2", &["DELETE FROM users WHERE id > 1"]).await;
    assert_eq!(code, 200);
    let (code, out, err) = migrate(&setup, &["apply", "--all"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = status(&setup);
    assert_eq!(s["versions"], json!({"3": 3}), "{s}");
    assert_eq!(s["failed"], json!([]));
    let (code, body) = sql(&m, "t2", &["SELECT name FROM users"]).await;
    assert_eq!(code, 200, "{body}");
}

/// `migrate apply --all` killed with SIGKILL midway, then run again: every
/// tenant ends at the latest version and each migration ran once in each.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_apply_resumes_and_never_runs_a_migration_twice() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let ids: Vec<String> = (0..24).map(|i| format!("k{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    setup.create_tenants(&refs);
    let folder = dir.path().join("m");
    write(
        &folder,
        "0001_runs.sql",
        "CREATE TABLE runs(version INTEGER);\nINSERT INTO runs VALUES (1);",
    );
    write(
        &folder,
        "0002_more.sql",
        "INSERT INTO runs VALUES (2);\nALTER TABLE runs ADD COLUMN note TEXT;",
    );
    assert_eq!(push(&setup, &folder).0, 0);

    let mut child = Command::new(BIN)
        .args([
            "migrate",
            "apply",
            "--all",
            "--concurrency",
            "2",
            "--store",
            &setup.store,
        ])
        .env("TENANTD_LEASE_TTL", &setup.ttl)
        .env_remove("TENANTD_STORE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "some tenants migrated",
        async || (status(&setup)["versions"]["2"].as_u64() >= Some(3)).then_some(()),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let before = status(&setup);
    assert_ne!(
        before["versions"]["2"].as_u64(),
        Some(24),
        "killed midway: {before}"
    );

    let (code, out, err) = migrate(&setup, &["apply", "--all", "--concurrency", "4"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(status(&setup)["versions"], json!({"2": 24}));
    for id in &ids {
        assert_eq!(
            stored_rows(&setup, id, "SELECT version FROM runs ORDER BY rowid"),
            [1, 2],
            "customer {id}"
        );
    }
    // And again: nothing left to do, nothing run.
    let (code, out, _) = migrate(&setup, &["apply", "--all", "--recheck"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(stored_rows(&setup, "k00", "SELECT count(*) FROM runs"), [2]);
}
