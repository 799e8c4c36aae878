//! Dead ends a new user hit in the README walkthrough, with the real binary.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::process::Command;

use cluster::{BIN, Setup};

const API: &str = "api-secret";

fn tenantd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("TENANTD_API_TOKEN", API)
        .env_remove("TENANTD_STORE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tenantd sql "CREATE TABLE t(a); INSERT INTO t VALUES (1)"` runs both
/// statements (as sqlite3 does), and `restore --at 3` on a fresh tenant
/// says why it wrote slot 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_argument_runs_and_restore_explains_the_fences() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    setup.ttl = "5s".into();
    setup.create_tenants(&["w"]);
    let m = setup.machine("a000000000wk01", None, &["--api-token", API]);
    let url = m.url("");
    let (code, out, err) = tenantd(&[
        "sql",
        "--url",
        &url,
        "--customer-id",
        "w",
        "CREATE TABLE t(a); INSERT INTO t VALUES (1)",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = tenantd(&[
        "sql",
        "--url",
        &url,
        "--customer-id",
        "w",
        "SELECT a FROM t",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(1 row)"), "{out}");
    // Parameters go with one statement only.
    let (code, _, err) = tenantd(&[
        "sql",
        "--url",
        &url,
        "--customer-id",
        "w",
        "SELECT ?; SELECT 2",
        "7",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("parameters go with one statement"), "{err}");

    let output = dir.path().join("w-at-3.sqlite3");
    let (code, out, err) = tenantd(&[
        "restore",
        "--store",
        &setup.store,
        "--customer-id",
        "w",
        "--at",
        "3",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("as of slot 0") && out.contains("fences"),
        "{out}"
    );
}
