//! The SQL API as a sandbox, against real machines: no statement reaches
//! another tenant's files (ATTACH in every spelling), SQLite's own limits
//! answer 400 naming the flag that sets them, shadow tables of virtual
//! tables stay tenantd's and SQLite's, and the smaller findings of the
//! security review (names, idempotency keys, numbers, NULs, who may read
//! `/_status` and `/metrics`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::cluster::{Machine, Setup};
use crate::routing::holder_of;

const TOKEN: &str = "sandbox-token";
const ADMIN: &str = "sandbox-admin";

async fn post(m: &Machine, customer: &str, body: String, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(m.url(&format!("/customers/{customer}/sql")))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

async fn sql(m: &Machine, customer: &str, body: Value) -> (u16, Value) {
    post(m, customer, body.to_string(), None).await
}

async fn one(m: &Machine, customer: &str, sql_text: &str, params: Value) -> (u16, Value) {
    sql(
        m,
        customer,
        json!({"statements": [{"sql": sql_text, "params": params}]}),
    )
    .await
}

async fn rows(m: &Machine, customer: &str, sql_text: &str) -> Value {
    let (status, reply) = one(m, customer, sql_text, json!([])).await;
    assert_eq!(status, 200, "{sql_text}: {reply}");
    reply["results"][0]["rows"].clone()
}

/// The one working copy of `customer` this machine holds.
fn working_copy(setup: &Setup, machine: &Machine, customer: &str) -> PathBuf {
    let dir = setup.root.join("local").join(&machine.id);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&format!("{customer}.")) && name.ends_with(".sqlite3")
        })
        .unwrap_or_else(|| panic!("no working copy of {customer} in {}", dir.display()))
}

/// Every way of naming a file to ATTACH that the authorizer is given no
/// literal file name for, and the literal URI besides.
fn attach_spellings(path: &Path) -> Vec<(String, String, Value)> {
    let text = path.display().to_string();
    let (head, tail) = text.split_at(text.len() / 2);
    // In calls of at most 16 arguments, under the function argument limit.
    let codes: Vec<String> = text
        .chars()
        .collect::<Vec<_>>()
        .chunks(16)
        .map(|chunk| {
            let codes: Vec<String> = chunk.iter().map(|c| (*c as u32).to_string()).collect();
            format!("char({})", codes.join(","))
        })
        .collect();
    let uri = format!("file:{text}?mode=rwc");
    vec![
        ("parameter".into(), "ATTACH ? AS e".into(), json!([text])),
        (
            "concatenation".into(),
            format!("ATTACH '{head}' || '{tail}' AS e"),
            json!([]),
        ),
        (
            "char()".into(),
            format!("ATTACH {} AS e", codes.join(" || ")),
            json!([]),
        ),
        ("URI parameter".into(), "ATTACH ? AS e".into(), json!([uri])),
        (
            "URI literal".into(),
            format!("ATTACH '{uri}' AS e"),
            json!([]),
        ),
        (
            "named parameter".into(),
            "ATTACH :f AS e".into(),
            json!({":f": text}),
        ),
    ]
}

/// From tenant t1, ATTACH aimed at t2's working copy, at t2's next log slot
/// in the store and at a new file: refused in every spelling, read_only or
/// not; no file is created, nothing stays attached, and t2 keeps serving
/// with its data sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_reaches_no_other_tenants_files_in_any_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["t1", "t2"]);
    let m = setup.machine("a00000000sb001", None, &["--api-token", TOKEN]);
    for (customer, value) in [("t1", "mine"), ("t2", "theirs")] {
        let (status, reply) = sql(
            &m,
            customer,
            json!({"statements": [
                {"sql": "CREATE TABLE secret(v TEXT)"},
                {"sql": "INSERT INTO secret VALUES (?)", "params": [value]}
            ]}),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    holder_of(&setup, "t2").await;
    let t2_copy = working_copy(&setup, &m, "t2");
    let t2_slot = setup
        .root
        .join("store/customer/t2/log")
        .join(format!("{:020}", 99_999));
    let fresh = setup.root.join("escape.sqlite3");
    let targets = [t2_copy.clone(), t2_slot.clone(), fresh.clone()];
    for target in &targets {
        for (spelling, attach, params) in attach_spellings(target) {
            for read_only in [false, true] {
                let mut statements = vec![
                    json!({"sql": attach, "params": params}),
                    json!({"sql": "SELECT name FROM e.sqlite_master"}),
                ];
                if !read_only {
                    statements.push(json!({"sql": "CREATE TABLE e.planted(x)"}));
                }
                let body = json!({"statements": statements, "read_only": read_only});
                let (status, reply) = sql(&m, "t1", body).await;
                let what = format!("{spelling} at {}, read_only {read_only}", target.display());
                assert_eq!(status, 403, "{what}: {reply}");
                assert_eq!(reply["statement"], 0, "{what}: the ATTACH itself: {reply}");
                assert!(
                    reply["error"].as_str().unwrap().contains("ATTACH"),
                    "{what}: {reply}"
                );
                assert!(!t2_slot.exists(), "{what} created {}", t2_slot.display());
                assert!(!fresh.exists(), "{what} created {}", fresh.display());
                // Nothing stays attached for the next request.
                let (status, reply) =
                    one(&m, "t1", "SELECT name FROM e.sqlite_master", json!([])).await;
                assert_eq!(status, 400, "{what}: still attached: {reply}");
            }
        }
    }
    // Both tenants serve, each with its own data, sound.
    assert_eq!(
        rows(&m, "t1", "SELECT v FROM secret").await,
        json!([["mine"]])
    );
    assert_eq!(
        rows(&m, "t2", "SELECT v FROM secret").await,
        json!([["theirs"]])
    );
    assert_eq!(rows(&m, "t2", "PRAGMA quick_check").await, json!([["ok"]]));
    let (status, reply) = sql(
        &m,
        "t2",
        json!({"statements": [{"sql": "INSERT INTO secret VALUES ('more')"}]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let r = reqwest::Client::new()
        .post(m.url("/customers/t2/increment"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        working_copy(&setup, &m, "t2"),
        t2_copy,
        "t2 was never re-claimed"
    );
    let stored = setup.stored_db("t2");
    let conn = rusqlite::Connection::open(&stored).unwrap();
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE name = 'planted'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.is_empty(), "{tables:?}");
}

/// Every SQLite limit set small by its flag: a statement over it answers
/// 400 with code "limit" and the flag's name; tenantd's own statements
/// (a stored idempotent answer larger than the value limit, the counter)
/// still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_limits_answer_400_naming_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine(
        "a00000000sb002",
        Some("lim"),
        &[
            "--api-token",
            TOKEN,
            "--sql-max-value-bytes",
            "10000",
            "--sql-max-sql-bytes",
            "2000",
            "--sql-max-columns",
            "10",
            "--sql-max-expr-depth",
            "20",
            "--sql-max-compound-select",
            "5",
            "--sql-max-function-args",
            "8",
            "--sql-max-trigger-depth",
            "3",
            "--sql-max-variables",
            "10",
            "--sql-max-like-pattern-bytes",
            "20",
        ],
    );
    holder_of(&setup, "lim").await;
    let (status, reply) = sql(
        &m,
        "lim",
        json!({"statements": [
            {"sql": "CREATE TABLE a(x)"}, {"sql": "CREATE TABLE b(x)"},
            {"sql": "CREATE TABLE c(x)"}, {"sql": "CREATE TABLE d(x)"},
            {"sql": "CREATE TABLE e(x)"},
            {"sql": "CREATE TRIGGER ab AFTER INSERT ON a BEGIN INSERT INTO b VALUES (new.x); END"},
            {"sql": "CREATE TRIGGER bc AFTER INSERT ON b BEGIN INSERT INTO c VALUES (new.x); END"},
            {"sql": "CREATE TRIGGER cd AFTER INSERT ON c BEGIN INSERT INTO d VALUES (new.x); END"},
            {"sql": "CREATE TRIGGER de AFTER INSERT ON d BEGIN INSERT INTO e VALUES (new.x); END"},
            {"sql": "CREATE TABLE big(v)"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let list = |n: usize| (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let columns: Vec<String> = (1..=11).map(|i| format!("c{i}")).collect();
    let compound = ["SELECT 1"; 7].join(" UNION ALL ");
    let cases: Vec<(&str, String, Value)> = vec![
        (
            "--sql-max-value-bytes",
            "SELECT zeroblob(20000)".into(),
            json!([]),
        ),
        (
            "--sql-max-value-bytes",
            "SELECT printf('%.*c', 20000, 'x')".into(),
            json!([]),
        ),
        (
            "--sql-max-value-bytes",
            "SELECT randomblob(20000)".into(),
            json!([]),
        ),
        (
            "--sql-max-value-bytes",
            "SELECT length(?)".into(),
            json!(["x".repeat(20000)]),
        ),
        (
            "--sql-max-value-bytes",
            "INSERT INTO big VALUES (printf('%.*c', 20000, 'x'))".into(),
            json!([]),
        ),
        (
            "--sql-max-sql-bytes",
            format!("SELECT 1 /* {} */", "x".repeat(3000)),
            json!([]),
        ),
        (
            "--sql-max-columns",
            format!("CREATE TABLE wide({})", columns.join(",")),
            json!([]),
        ),
        (
            "--sql-max-columns",
            format!("SELECT {}", list(11)),
            json!([]),
        ),
        (
            "--sql-max-expr-depth",
            format!("SELECT {}", ["1"; 30].join("+")),
            json!([]),
        ),
        ("--sql-max-compound-select", compound, json!([])),
        (
            "--sql-max-function-args",
            format!("SELECT max({})", list(10)),
            json!([]),
        ),
        (
            "--sql-max-trigger-depth",
            "INSERT INTO a VALUES (1)".into(),
            json!([]),
        ),
        (
            "--sql-max-variables",
            "SELECT ?11".into(),
            json!((1..=11).collect::<Vec<_>>()),
        ),
        (
            "--sql-max-like-pattern-bytes",
            "SELECT 'a' LIKE ?".into(),
            json!(["%".repeat(30)]),
        ),
    ];
    for (flag, text, params) in cases {
        let (status, reply) = one(&m, "lim", &text, params).await;
        let shown: String = text.chars().take(60).collect();
        assert_eq!(status, 400, "{shown}: {reply}");
        assert_eq!(reply["code"], "limit", "{shown}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(flag),
            "{shown}: the error names {flag}: {reply}"
        );
    }
    // Under the limits, the same statements run.
    let (status, reply) = sql(
        &m,
        "lim",
        json!({"statements": [
            {"sql": "SELECT length(zeroblob(10000)), length(?)", "params": ["x".repeat(9000)]},
            {"sql": format!("SELECT {}", list(10))},
            {"sql": format!("SELECT max({})", list(8))},
            {"sql": "SELECT ?10", "params": (1..=10).collect::<Vec<_>>()}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["rows"], json!([[10000, 9000]]));
    // tenantd stores and replays an answer larger than the value limit.
    let body = json!({"statements": [
        {"sql": "INSERT INTO big SELECT printf('%.*c', 9000, 'x') FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)"},
        {"sql": "SELECT v FROM big"}
    ]})
    .to_string();
    let (status, first) = post(&m, "lim", body.clone(), Some("big-answer")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = post(&m, "lim", body, Some("big-answer")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(first["results"], again["results"]);
    assert_eq!(
        rows(&m, "lim", "SELECT count(*) FROM big").await,
        json!([[3]])
    );
    let r = reqwest::Client::new()
        .post(m.url("/customers/lim/increment"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Without an admin token, /_status and /metrics stay open.
    for path in ["/_status", "/metrics", "/healthz"] {
        let r = reqwest::get(m.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

/// The defaults are D1's: 2,000,000-byte values, 100 bound parameters,
/// and no database may be attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limits_are_d1s() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a00000000sb003", Some("d1"), &["--api-token", TOKEN]);
    holder_of(&setup, "d1").await;
    assert_eq!(
        rows(&m, "d1", "SELECT length(zeroblob(2000000))").await,
        json!([[2000000]])
    );
    let (status, reply) = one(&m, "d1", "SELECT length(zeroblob(2000001))", json!([])).await;
    assert_eq!((status, &reply["code"]), (400, &json!("limit")), "{reply}");
    let (status, reply) = one(&m, "d1", "SELECT printf('%.*c', 999999999, 'x')", json!([])).await;
    assert_eq!((status, &reply["code"]), (400, &json!("limit")), "{reply}");
    let (status, reply) = one(
        &m,
        "d1",
        "SELECT ?101",
        json!((1..=101).collect::<Vec<_>>()),
    )
    .await;
    assert_eq!((status, &reply["code"]), (400, &json!("limit")), "{reply}");
    let (status, reply) = one(
        &m,
        "d1",
        "SELECT ?100",
        json!((1..=100).collect::<Vec<_>>()),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["rows"], json!([[100]]));
}

/// Shadow tables of R-tree and FTS3/4/5 tables can be read but not
/// written, dropped, altered or given triggers, even from a trigger; FTS4
/// options that name functions are refused; after all of it the database
/// passes `PRAGMA quick_check`, on the machine and as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_tables_are_read_only_and_the_database_stays_sound() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a00000000sb004", Some("sh"), &["--api-token", TOKEN]);
    holder_of(&setup, "sh").await;
    let (status, reply) = sql(
        &m,
        "sh",
        json!({"statements": [
            {"sql": "CREATE VIRTUAL TABLE rt USING rtree(id, minx, maxx)"},
            {"sql": "INSERT INTO rt VALUES (1, 0, 1)"},
            {"sql": "CREATE VIRTUAL TABLE ft USING fts5(body)"},
            {"sql": "INSERT INTO ft VALUES ('hello world')"},
            {"sql": "CREATE VIRTUAL TABLE f4 USING fts4(body)"},
            {"sql": "INSERT INTO f4 VALUES ('hello there')"},
            {"sql": "CREATE VIRTUAL TABLE f3 USING fts3(body)"},
            {"sql": "INSERT INTO f3 VALUES ('hello again')"},
            {"sql": "CREATE TABLE src(x)"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let hostile = [
        "UPDATE rt_node SET data = x'0000'",
        "DELETE FROM rt_rowid",
        "INSERT INTO rt_parent VALUES (5, 1)",
        "DROP TABLE rt_node",
        "ALTER TABLE rt_node RENAME TO moved",
        "UPDATE ft_data SET block = x'00'",
        "DELETE FROM ft_idx",
        "INSERT INTO ft_config VALUES ('version', 99)",
        "DELETE FROM ft_docsize",
        "UPDATE ft_content SET c0 = 'changed'",
        "DELETE FROM f4_segdir",
        "DELETE FROM f4_segments",
        "DELETE FROM f4_docsize",
        "DELETE FROM f4_stat",
        "UPDATE f4_content SET c0body = 'changed'",
        "DELETE FROM f3_segdir",
        "UPDATE f3_content SET c0body = 'changed'",
        "CREATE TRIGGER on_shadow AFTER INSERT ON ft_data BEGIN SELECT 1; END",
        "CREATE VIRTUAL TABLE fz USING fts4(body, compress=zeroblob, uncompress=zeroblob)",
        "CREATE VIRTUAL TABLE fz USING fts4(body, COMPRESS = hex, \"uncompress\"=unhex)",
        "CREATE VIRTUAL TABLE fz USING fts3(body, uncompress=unhex)",
    ];
    for text in hostile {
        let (status, reply) = one(&m, "sh", text, json!([])).await;
        assert!(status == 400 || status == 403, "{text}: {status} {reply}");
    }
    // A trigger the request creates cannot write a shadow table either.
    let (status, reply) = sql(
        &m,
        "sh",
        json!({"statements": [
            {"sql": "CREATE TRIGGER via AFTER INSERT ON src BEGIN UPDATE rt_node SET data = x'0000'; END"},
            {"sql": "INSERT INTO src VALUES (1)"}
        ]}),
    )
    .await;
    assert!(status == 400 || status == 403, "{status} {reply}");
    // Reading shadow tables and using the virtual tables still work.
    assert_eq!(
        rows(&m, "sh", "SELECT count(*) FROM rt_node").await,
        json!([[1]])
    );
    let (status, reply) = sql(
        &m,
        "sh",
        json!({"statements": [
            {"sql": "INSERT INTO ft VALUES ('hello again')"},
            {"sql": "INSERT INTO f4 VALUES ('hello more')"},
            {"sql": "INSERT INTO rt VALUES (2, 5, 6)"},
            {"sql": "DELETE FROM ft WHERE rowid = 1"},
            {"sql": "INSERT INTO ft(ft) VALUES ('integrity-check')"},
            {"sql": "INSERT INTO f4(f4) VALUES ('optimize')"},
            {"sql": "SELECT count(*) FROM ft WHERE ft MATCH 'hello'"},
            {"sql": "SELECT id FROM rt WHERE minx >= 4"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][6]["rows"], json!([[1]]));
    assert_eq!(reply["results"][7]["rows"], json!([[2]]));
    assert_eq!(rows(&m, "sh", "PRAGMA quick_check").await, json!([["ok"]]));
    assert_eq!(
        rows(&m, "sh", "PRAGMA integrity_check").await,
        json!([["ok"]])
    );
    let stored = setup.stored_db("sh");
    let conn = rusqlite::Connection::open(&stored).unwrap();
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// The smaller findings: a multibyte character at byte 8 of a name, an
/// idempotency key reused with another body, integers beyond 64 bits,
/// text after a NUL, and `/_status` and `/metrics` behind the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_keys_numbers_nuls_and_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine(
        "a00000000sb005",
        Some("small"),
        &["--api-token", TOKEN, "--admin-token", ADMIN],
    );
    holder_of(&setup, "small").await;
    for name in [
        "abcdefgé",
        "tenantdé",
        "ab\u{1F600}xyzw",
        "tenantd\u{1F600}",
    ] {
        let (status, reply) = one(
            &m,
            "small",
            &format!("CREATE TABLE \"{name}\"(x)"),
            json!([]),
        )
        .await;
        assert_eq!(status, 200, "{name}: {reply}");
    }
    let (status, reply) = one(&m, "small", "CREATE TABLE \"TENANTD_é\"(x)", json!([])).await;
    assert_eq!(status, 403, "{reply}");

    // An idempotency key names one request.
    let first =
        json!({"statements": [{"sql": "CREATE TABLE k(x)"}, {"sql": "INSERT INTO k VALUES (1)"}]});
    let other =
        json!({"statements": [{"sql": "CREATE TABLE k(x)"}, {"sql": "INSERT INTO k VALUES (2)"}]});
    let (status, reply) = post(&m, "small", first.to_string(), Some("key-1")).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = post(&m, "small", other.to_string(), Some("key-1")).await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["code"], "idempotency_key_reused", "{reply}");
    // The same request, even spelt differently, is a repeat.
    let spaced = serde_json::to_string_pretty(&first).unwrap();
    let (status, reply) = post(&m, "small", spaced, Some("key-1")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(rows(&m, "small", "SELECT x FROM k").await, json!([[1]]));

    // Integers outside the 64-bit range are refused, not made REAL.
    for (number, expected) in [
        ("-99999999999999999999", None),
        ("-9223372036854775809", None),
        ("99999999999999999999", None),
        ("9223372036854775808", None),
        ("-9223372036854775808", Some(json!([["integer"]]))),
        ("-1e20", Some(json!([["real"]]))),
        ("-100000000000000000000.0", Some(json!([["real"]]))),
    ] {
        let body =
            format!(r#"{{"statements": [{{"sql": "SELECT typeof(?)", "params": [{number}]}}]}}"#);
        let (status, reply) = post(&m, "small", body, None).await;
        match expected {
            None => {
                assert_eq!(status, 400, "{number}: {reply}");
                assert!(
                    reply["error"].as_str().unwrap().contains("64-bit"),
                    "{reply}"
                );
            }
            Some(rows) => {
                assert_eq!(status, 200, "{number}: {reply}");
                assert_eq!(reply["results"][0]["rows"], rows, "{number}");
            }
        }
    }
    let body = format!(
        r#"{{"statements": [{{"sql": "SELECT 1;\u0000 DROP TABLE k"}}], "read_only": {}}}"#,
        false
    );
    let (status, reply) = post(&m, "small", body, None).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("NUL"), "{reply}");
    assert_eq!(rows(&m, "small", "SELECT x FROM k").await, json!([[1]]));

    // Tenant ids are the admin's to read.
    let http = reqwest::Client::new();
    for path in ["/_status", "/metrics"] {
        let r = http.get(m.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without the admin token");
        let r = http
            .get(m.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with the API token");
        let r = http
            .get(m.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the admin token");
        assert!(r.text().await.unwrap().contains("small"), "{path}");
    }
    let r = http.get(m.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
