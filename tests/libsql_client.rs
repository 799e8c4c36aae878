//! The official TypeScript libSQL client (`@libsql/client`, unmodified,
//! installed by scripts/test into target/node-libsql) against real
//! `tenantd serve` processes: values, batches, interactive transactions,
//! error codes, tenant tokens, and every acknowledged write present (and
//! nothing of a transaction left open) after its holder is SIGKILLed.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use cluster::{BIN, Machine, Setup};

const API_TOKEN: &str = "libsql-test-api-token";

/// The client's node_modules; the test fails (never skips) without it.
fn node_modules() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/node-libsql/node_modules");
    assert!(
        dir.join("@libsql/client/package.json").exists(),
        "@libsql/client is not installed in {}: run scripts/test (it installs it), or npm install --prefix target/node-libsql @libsql/client@0.15",
        dir.display()
    );
    dir
}

fn tokens(args: &[&str], env: &[(String, String)]) -> String {
    let output = Command::new(BIN)
        .arg("tokens")
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Runs the client script; its findings.
fn client(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/libsql/client.cjs");
    let output = Command::new("node")
        .arg(script)
        .args(args)
        .env("NODE_PATH", node_modules())
        .output()
        .expect("node runs (install Node.js 18+)");
    assert!(
        output.status.success(),
        "the libSQL client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn sql(m: &Machine, customer: &str, sql: &str) -> Value {
    let reply = reqwest::Client::new()
        .post(m.url(&format!("/customers/{customer}/sql")))
        .bearer_auth(API_TOKEN)
        .json(&json!({"statements": [{"sql": sql}], "read_only": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn libsql_client_values_batches_errors_tokens_and_a_holder_sigkill() {
    node_modules();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["7"]);
    let pair = tokens(&["keygen"], &[]);
    let key = |name: &str| {
        pair.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_string()
    };
    let signing = vec![(
        "TENANTD_TOKEN_SIGNING_KEY".to_string(),
        key("TENANTD_TOKEN_SIGNING_KEY"),
    )];
    // `=`: a base64url key may start with '-', which would read as a flag.
    let public = format!("--token-public-key={}", key("TENANTD_TOKEN_PUBLIC_KEY"));
    let args = [
        "--replay-mode",
        "forward",
        "--api-token",
        API_TOKEN,
        &public,
    ];
    let a = setup.machine("a00000000023a1", Some("7"), &args);
    let b = setup.machine("b00000000023b2", Some("7"), &args);
    let rw = tokens(&["create", "--customer-id", "7"], &signing);
    let ro = tokens(&["create", "--customer-id", "7", "--read-only"], &signing);
    let other = tokens(&["create", "--customer-id", "8"], &signing);

    let url = a.url("/customers/7/");
    let written = client(&["write", &url, &rw, &ro, &other]);
    assert_eq!(written["acknowledged"], 20);
    let holder = a.status()["tenants"][0]["customer_id"].clone();
    assert_eq!(holder, "7", "machine a holds the tenant: {:?}", a.status());

    a.signal(Signal::SIGKILL);
    let url = b.url("/customers/7/");
    cluster::eventually(Duration::from_secs(20), "b serves after the kill", async || {
        let reply = reqwest::Client::new()
            .post(b.url("/customers/7/v2/pipeline"))
            .bearer_auth(API_TOKEN)
            .json(&json!({"baton": null, "requests": [{"type": "execute", "stmt": {"sql": "SELECT 1"}}]}))
            .send()
            .await
            .ok()?;
        (reply.status() == 200).then_some(())
    })
    .await;
    let read = client(&["read", &url, &rw]);
    assert_eq!(
        read["acknowledged"], 20,
        "every acknowledged write survives the SIGKILL"
    );
    assert_eq!(read["batch"], 2);
    assert_eq!(
        read["uncommitted"], 0,
        "nothing of a transaction open at the SIGKILL survives"
    );
    assert_eq!(read["committed_tx"], 2, "a committed transaction survives");
    // The same data through tenantd's own API.
    let through_sql = sql(&b, "7", "SELECT count(*) FROM kv WHERE k LIKE 'ack%'").await;
    assert_eq!(through_sql["results"][0]["rows"][0][0], 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn libsql_client_reads_through_a_follower_and_reads_its_own_write() {
    node_modules();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["7"]);
    let args = ["--replay-mode", "forward", "--api-token", API_TOKEN];
    let a = setup.machine("a", Some("7"), &args);
    for statement in [
        "CREATE TABLE kv (k TEXT PRIMARY KEY, v)",
        "INSERT INTO kv VALUES ('first', 1)",
    ] {
        let reply = reqwest::Client::new()
            .post(a.url("/customers/7/sql"))
            .bearer_auth(API_TOKEN)
            .json(&json!({"statements": [{"sql": statement}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    let b = setup.machine("b", Some("7"), &args);
    let found = client(&["follower", &b.url("/customers/7/"), API_TOKEN]);
    assert_eq!(found["before"], 1, "{found}");
    assert_eq!(found["read_role"], "follower", "{found}");
    assert_eq!(found["write_role"], "holder", "{found}");
    assert_eq!(
        found["after"], 1,
        "the read after the write sees it: {found}"
    );
    drop(a);
}
