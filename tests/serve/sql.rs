//! The SQL API end to end: real machines, the token, replays to the
//! holder, durability in the store (file and S3), refusals that apply
//! nothing, and a runaway query that costs nobody the lease.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::cluster::{FlyClient, Machine, Setup};
use crate::routing::holder_of;

const TOKEN: &str = "s3cret-token";

fn token_args() -> Vec<&'static str> {
    vec!["--api-token", TOKEN]
}

async fn post_sql(m: &Machine, customer: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(m.url(&format!("/customers/{customer}/sql")))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// Rows of `sql` in the tenant's database as stored (rebuilt by
/// `tenantd restore` and opened with SQLite).
fn stored_rows(setup: &Setup, customer: &str, sql: &str) -> Vec<Vec<String>> {
    let copy = setup.stored_db(customer);
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let columns = stmt.column_count();
    stmt.query_map([], |r| {
        (0..columns)
            .map(|i| {
                let v: rusqlite::types::Value = r.get(i)?;
                Ok(format!("{v:?}"))
            })
            .collect()
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_api_exists_only_with_a_token_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let without = setup.machine("a0000000005101", Some("1"), &[]);
    let with = setup.machine("a0000000005102", Some("2"), &token_args());
    let body = json!({"statements": [{"sql": "SELECT 1"}]});
    let (status, reply) = post_sql(&without, "1", &body, Some(TOKEN)).await;
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("TENANTD_API_TOKEN")
    );
    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-token2"),
    ] {
        let (status, reply) = post_sql(&with, "2", &body, token).await;
        assert_eq!(status, 401, "{token:?}: {reply}");
    }
    holder_of(&setup, "2").await;
    let (status, reply) = post_sql(&with, "2", &body, Some(TOKEN)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["rows"], json!([[1]]));
}

async fn writes_are_in_the_store_when_answered(setup: Setup) {
    let a = setup.machine("a0000000005201", Some("7"), &token_args());
    let b = setup.machine("b0000000005202", Some("7"), &token_args());
    let holder = holder_of(&setup, "7").await;
    let other = if holder == a.id { &b } else { &a };
    // A non-holder hands the request on with fly-replay, body and all.
    let client = FlyClient::new(&[&a, &b]);
    let auth = format!("Bearer {TOKEN}");
    let send = async |body: Value| {
        client
            .send_body(
                &other.id,
                Method::POST,
                "/customers/7/sql",
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ],
                body.to_string().into_bytes(),
            )
            .await
            .unwrap()
    };
    let created = send(json!({"statements": [
        {"sql": "CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT)"},
        {"sql": "INSERT INTO notes(body) VALUES (?)", "params": ["hi"]},
        {"sql": "SELECT id, body FROM notes WHERE id > :after", "params": {":after": 0}}
    ]}))
    .await;
    assert_eq!(created.status, 200, "{}", created.json);
    assert!(
        created.hops >= 1,
        "the request went to the non-holder first"
    );
    assert_eq!(created.json["machine_id"], holder.as_str());
    assert_eq!(created.json["customer_id"], "7");
    assert_eq!(created.json["results"][1]["last_insert_rowid"], 1);
    assert_eq!(created.json["results"][2]["rows"], json!([[1, "hi"]]));
    // Answered, so in the store.
    assert_eq!(
        stored_rows(&setup, "7", "SELECT id, body FROM notes"),
        vec![vec!["Integer(1)".to_string(), "Text(\"hi\")".to_string()]]
    );
    // The counter works on the same database, and SQL sees it.
    let counted = client.increment(&holder, "7").await.unwrap();
    assert_eq!(counted.status, 200);
    let seen =
        send(json!({"statements": [{"sql": "SELECT count FROM welcome"}], "read_only": true}))
            .await;
    assert_eq!(
        seen.json["results"][0]["rows"],
        json!([[counted.json["count"]]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_writes_are_in_the_file_store_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    writes_are_in_the_store_when_answered(Setup::file_store(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_writes_are_in_s3_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    writes_are_in_the_store_when_answered(Setup::s3(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_apply_nothing_and_the_machine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine(
        "a0000000005301",
        Some("5"),
        &["--api-token", TOKEN, "--max-body-bytes", "4096"],
    );
    holder_of(&setup, "5").await;
    let (status, _) = post_sql(
        &m,
        "5",
        &json!({"statements": [{"sql": "CREATE TABLE t(x)"}, {"sql": "INSERT INTO t VALUES (1)"}]}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let insert = json!({"sql": "INSERT INTO t VALUES (2)"});
    let cases = [
        (
            json!({"statements": [insert, {"sql": "INSERT INTO nope VALUES (1)"}]}),
            400,
            Some(1),
            "no such table",
        ),
        (
            json!({"statements": [insert, {"sql": "SELEC 1"}]}),
            400,
            Some(1),
            "syntax error",
        ),
        (
            json!({"statements": [insert, {"sql": "SELECT ?", "params": [1, 2]}]}),
            400,
            Some(1),
            "parameter",
        ),
        (
            json!({"statements": [insert, {"sql": "ATTACH 'x.db' AS x"}]}),
            403,
            Some(1),
            "ATTACH",
        ),
        (
            json!({"statements": [insert, {"sql": "SELECT * FROM tenantd_meta"}]}),
            403,
            Some(1),
            "tenantd_",
        ),
        (
            json!({"statements": [insert, {"sql": "PRAGMA journal_mode = WAL"}]}),
            403,
            Some(1),
            "journal_mode",
        ),
        (
            json!({"statements": [insert], "read_only": true}),
            400,
            Some(0),
            "read_only",
        ),
        (json!({"statements": []}), 400, None, "no statements"),
        (
            json!({"statements": "INSERT INTO t VALUES (2)"}),
            400,
            None,
            "invalid request body",
        ),
        (
            json!({"statements": [insert], "unknown": 1}),
            400,
            None,
            "unknown field",
        ),
    ];
    for (body, code, statement, words) in cases {
        let (status, reply) = post_sql(&m, "5", &body, Some(TOKEN)).await;
        assert_eq!(status, code, "{body}: {reply}");
        assert_eq!(reply["statement"], json!(statement), "{body}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(words),
            "{body}: {reply}"
        );
    }
    // A body over the limit.
    let big = json!({"statements": [{"sql": format!("SELECT '{}'", "x".repeat(5000))}]});
    let (status, _) = post_sql(&m, "5", &big, Some(TOKEN)).await;
    assert_eq!(status, 413);
    // Not JSON at all.
    let reply = reqwest::Client::new()
        .post(m.url("/customers/5/sql"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    // Nothing of any of them was applied, and the machine still serves.
    let (status, reply) = post_sql(
        &m,
        "5",
        &json!({"statements": [{"sql": "SELECT x FROM t"}]}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["results"][0]["rows"], json!([[1]]));
    assert_eq!(
        stored_rows(&setup, "5", "SELECT x FROM t"),
        vec![vec!["Integer(1)".to_string()]]
    );
}

/// A query that would run for ever is interrupted at --sql-timeout, and
/// while it runs the holder keeps renewing its lease (the SQLite work is
/// off the runtime) and the standby never takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_is_interrupted_and_costs_no_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    setup.ttl = "1s".into();
    let args = ["--api-token", TOKEN, "--sql-timeout", "2500ms"];
    let a = setup.machine("a0000000005401", Some("8"), &args);
    let b = setup.machine("b0000000005402", Some("8"), &args);
    let holder = holder_of(&setup, "8").await;
    let epoch = setup.lock("8").unwrap()["epoch"].clone();
    let holder_m = if holder == a.id { &a } else { &b };
    let forever =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c";
    let started = Instant::now();
    let (status, reply) = post_sql(
        holder_m,
        "8",
        &json!({"statements": [{"sql": forever}]}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("time limit"),
        "{reply}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?} {reply}",
        started.elapsed()
    );
    let lock = setup.lock("8").unwrap();
    assert_eq!(
        lock["holder"],
        holder.as_str(),
        "the holder kept its lease: {lock}"
    );
    assert_eq!(lock["epoch"], epoch, "no takeover happened: {lock}");
    let (status, _) = post_sql(
        holder_m,
        "8",
        &json!({"statements": [{"sql": "SELECT 1"}]}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
}
