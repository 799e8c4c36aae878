//! Hrana pipelines against real SQLite files, through the actor's batch
//! (the same path as `/sql`): values, batches and their conditions,
//! transactions as savepoints, errors with SQLite's code names.

use serde_json::{Value as Json, json};

use super::Program;
use super::proto::PipelineBody;
use crate::tenant::Reply;
use crate::tenant::db::{Db, Work};
use crate::tenant::sql::SqlLimits;

fn fresh() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
    (dir, db)
}

fn program(requests: Json, read_only: bool) -> Program {
    let body: PipelineBody =
        serde_json::from_value(json!({"baton": null, "requests": requests})).unwrap();
    Program {
        requests: body.requests,
        read_only,
        baton: None,
    }
}

/// The pipeline's `results`, and whether the batch committed.
fn pipeline(db: &mut Db, requests: Json) -> (Vec<Json>, bool) {
    pipeline_as(db, requests, false)
}

fn pipeline_as(db: &mut Db, requests: Json, read_only: bool) -> (Vec<Json>, bool) {
    let program = program(requests, read_only);
    let applied = db
        .apply_batch(
            1,
            &[Work::Hrana(&program, None)],
            &SqlLimits::default(),
            false,
        )
        .unwrap();
    let committed = applied.committed.is_some();
    match applied.replies.into_iter().next().unwrap() {
        Ok(Reply::Sql(answer)) => (
            answer.results["results"].as_array().unwrap().clone(),
            committed,
        ),
        other => panic!("not a pipeline answer: {other:?}"),
    }
}

fn execute(sql: &str) -> Json {
    json!({"type": "execute", "stmt": {"sql": sql}})
}

fn rows(db: &mut Db, sql: &str) -> Json {
    let (results, _) = pipeline(db, json!([execute(sql)]));
    results[0]["response"]["result"]["rows"].clone()
}

#[test]
fn values_round_trip_in_hranas_encoding() {
    let (_dir, mut db) = fresh();
    let (results, committed) = pipeline(
        &mut db,
        json!([
            execute("CREATE TABLE t (i INTEGER, f REAL, s TEXT, b BLOB, n)"),
            {"type": "execute", "stmt": {
                "sql": "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                "args": [
                    {"type": "integer", "value": "9007199254740993"},
                    {"type": "float", "value": 1.0},
                    {"type": "text", "value": "héllo"},
                    {"type": "blob", "base64": "AAEC"},
                    {"type": "null"}
                ]
            }},
            {"type": "execute", "stmt": {"sql": "SELECT * FROM t WHERE i = :i", "named_args": [
                {"name": "i", "value": {"type": "integer", "value": "9007199254740993"}}
            ]}},
            {"type": "close"}
        ]),
    );
    assert!(committed);
    assert_eq!(results[1]["type"], "ok", "{results:?}");
    let insert = &results[1]["response"]["result"];
    assert_eq!(insert["affected_row_count"], 1);
    assert_eq!(insert["last_insert_rowid"], "1");
    let select = &results[2]["response"]["result"];
    assert_eq!(select["cols"][0]["name"], "i");
    assert_eq!(
        select["rows"][0],
        json!([
            {"type": "integer", "value": "9007199254740993"},
            {"type": "float", "value": 1.0},
            {"type": "text", "value": "héllo"},
            {"type": "blob", "base64": "AAEC"},
            {"type": "null"}
        ])
    );
    assert_eq!(
        results[3],
        json!({"type": "ok", "response": {"type": "close"}})
    );
}

#[test]
fn errors_carry_sqlites_extended_code_names_and_later_requests_still_run() {
    let (_dir, mut db) = fresh();
    let (results, _) = pipeline(
        &mut db,
        json!([
            execute("CREATE TABLE u (k TEXT UNIQUE)"),
            execute("INSERT INTO u VALUES ('a')"),
            execute("INSERT INTO u VALUES ('a')"),
            execute("SELEC nonsense"),
            execute("ATTACH DATABASE 'x.db' AS x"),
            execute("INSERT INTO u VALUES ('b')"),
        ]),
    );
    assert_eq!(results[2]["type"], "error");
    assert_eq!(results[2]["error"]["code"], "SQLITE_CONSTRAINT_UNIQUE");
    assert_eq!(
        results[2]["error"]["message"],
        "UNIQUE constraint failed: u.k"
    );
    assert_eq!(results[3]["error"]["code"], "SQLITE_ERROR");
    assert_eq!(results[4]["error"]["code"], "SQLITE_AUTH");
    assert_eq!(results[5]["type"], "ok");
    assert_eq!(
        rows(&mut db, "SELECT k FROM u ORDER BY k"),
        json!([[{"type": "text", "value": "a"}], [{"type": "text", "value": "b"}]])
    );
}

/// The batch `@libsql/client` sends for `client.batch([...], "write")`.
fn client_batch(statements: &[&str]) -> Json {
    let n = statements.len() as u32;
    let mut steps = vec![json!({"stmt": {"sql": "BEGIN IMMEDIATE"}})];
    for (i, sql) in statements.iter().enumerate() {
        steps.push(json!({"condition": {"type": "ok", "step": i}, "stmt": {"sql": sql}}));
    }
    steps.push(json!({"condition": {"type": "ok", "step": n}, "stmt": {"sql": "COMMIT"}}));
    steps.push(json!({
        "condition": {"type": "not", "cond": {"type": "ok", "step": n + 1}},
        "stmt": {"sql": "ROLLBACK"}
    }));
    json!({"type": "batch", "batch": {"steps": steps}})
}

#[test]
fn a_batch_in_a_transaction_is_all_or_nothing() {
    let (_dir, mut db) = fresh();
    pipeline(
        &mut db,
        json!([execute("CREATE TABLE a (x INTEGER UNIQUE)")]),
    );
    let (results, _) = pipeline(
        &mut db,
        json!([client_batch(&["INSERT INTO a VALUES (1)", "INSERT INTO a VALUES (2)"]), {"type": "get_autocommit"}]),
    );
    let result = &results[0]["response"]["result"];
    assert!(
        result["step_errors"]
            .as_array()
            .unwrap()
            .iter()
            .all(Json::is_null)
    );
    assert!(result["step_results"][4].is_null(), "ROLLBACK skipped");
    assert_eq!(results[1]["response"]["is_autocommit"], true);

    let (results, _) = pipeline(
        &mut db,
        json!([client_batch(&[
            "INSERT INTO a VALUES (3)",
            "INSERT INTO a VALUES (1)",
            "INSERT INTO a VALUES (4)"
        ])]),
    );
    let result = &results[0]["response"]["result"];
    assert_eq!(result["step_errors"][2]["code"], "SQLITE_CONSTRAINT_UNIQUE");
    assert!(
        result["step_results"][3].is_null(),
        "skipped after the error"
    );
    assert!(result["step_results"][4].is_null(), "COMMIT skipped");
    assert!(!result["step_results"][5].is_null(), "ROLLBACK ran");
    assert_eq!(
        rows(&mut db, "SELECT count(*) FROM a"),
        json!([[{"type": "integer", "value": "2"}]])
    );
}

#[test]
fn conditions_and_or_not_error_and_is_autocommit() {
    let (_dir, mut db) = fresh();
    let step = |cond: Json| json!({"condition": cond, "stmt": {"sql": "SELECT 1"}});
    let (results, _) = pipeline(
        &mut db,
        json!([{"type": "batch", "batch": {"steps": [
            {"stmt": {"sql": "SELECT 1"}},
            {"stmt": {"sql": "SELECT nope"}},
            step(json!({"type": "error", "step": 1})),
            step(json!({"type": "and", "conds": [{"type": "ok", "step": 0}, {"type": "ok", "step": 1}]})),
            step(json!({"type": "or", "conds": [{"type": "ok", "step": 1}, {"type": "ok", "step": 0}]})),
            step(json!({"type": "not", "cond": {"type": "is_autocommit"}})),
            step(json!({"type": "is_autocommit"})),
        ]}}]),
    );
    let ran: Vec<bool> = results[0]["response"]["result"]["step_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| !r.is_null())
        .collect();
    assert_eq!(ran, [true, false, true, false, true, false, true]);
}

#[test]
fn a_transaction_left_open_by_a_closed_stream_is_rolled_back() {
    let (_dir, mut db) = fresh();
    pipeline(&mut db, json!([execute("CREATE TABLE c (x)")]));
    let (results, _) = pipeline(
        &mut db,
        json!([execute("BEGIN"), execute("INSERT INTO c VALUES (1)"), {"type": "get_autocommit"}, {"type": "close"}]),
    );
    assert_eq!(results[2]["response"]["is_autocommit"], false);
    assert_eq!(
        rows(&mut db, "SELECT count(*) FROM c"),
        json!([[{"type": "integer", "value": "0"}]])
    );
}

#[test]
fn sequence_describe_and_stored_sql() {
    let (_dir, mut db) = fresh();
    let (results, _) = pipeline(
        &mut db,
        json!([
            {"type": "sequence", "sql": "CREATE TABLE s (x INTEGER NOT NULL); INSERT INTO s VALUES (1); -- done"},
            {"type": "store_sql", "sql_id": 7, "sql": "SELECT x FROM s WHERE x = ?"},
            {"type": "execute", "stmt": {"sql_id": 7, "args": [{"type": "integer", "value": "1"}]}},
            {"type": "describe", "sql_id": 7},
            {"type": "close_sql", "sql_id": 7},
            {"type": "execute", "stmt": {"sql_id": 7}},
            {"type": "sequence", "sql": "INSERT INTO s VALUES (2); INSERT INTO s VALUES (NULL); INSERT INTO s VALUES (3)"},
        ]),
    );
    assert_eq!(
        results[0],
        json!({"type": "ok", "response": {"type": "sequence"}})
    );
    assert_eq!(
        results[2]["response"]["result"]["rows"],
        json!([[{"type": "integer", "value": "1"}]])
    );
    let described = &results[3]["response"]["result"];
    assert_eq!(described["params"], json!([{"name": null}]));
    assert_eq!(
        described["cols"],
        json!([{"name": "x", "decltype": "INTEGER"}])
    );
    assert_eq!(described["is_readonly"], true);
    assert_eq!(results[5]["error"]["code"], "SQL_NOT_FOUND");
    assert_eq!(results[6]["error"]["code"], "SQLITE_CONSTRAINT_NOTNULL");
    assert_eq!(
        rows(&mut db, "SELECT x FROM s ORDER BY x"),
        json!([[{"type": "integer", "value": "1"}], [{"type": "integer", "value": "2"}]])
    );
}

#[test]
fn a_read_only_pipeline_refuses_writes_and_applies_nothing() {
    let (_dir, mut db) = fresh();
    pipeline(&mut db, json!([execute("CREATE TABLE r (x)")]));
    let (results, committed) = pipeline_as(
        &mut db,
        json!([
            execute("SELECT count(*) FROM r"),
            execute("INSERT INTO r VALUES (1)")
        ]),
        true,
    );
    assert_eq!(results[0]["type"], "ok");
    assert_eq!(results[1]["error"]["code"], "SQLITE_READONLY");
    assert!(!committed);
    assert_eq!(
        rows(&mut db, "SELECT count(*) FROM r"),
        json!([[{"type": "integer", "value": "0"}]])
    );
}

#[test]
fn the_pipeline_shares_one_requests_row_budget() {
    let (_dir, mut db) = fresh();
    let limits = SqlLimits {
        max_rows: 3,
        ..SqlLimits::default()
    };
    let program = program(
        json!([
            execute("SELECT 1 UNION ALL SELECT 2"),
            execute("SELECT 1 UNION ALL SELECT 2"),
        ]),
        false,
    );
    let applied = db
        .apply_batch(1, &[Work::Hrana(&program, None)], &limits, false)
        .unwrap();
    let Ok(Reply::Sql(answer)) = &applied.replies[0] else {
        panic!("{:?}", applied.replies)
    };
    assert_eq!(answer.results["results"][0]["type"], "ok");
    assert_eq!(
        answer.results["results"][1]["type"], "error",
        "{}",
        answer.results
    );
}

#[test]
fn a_transaction_left_open_at_the_end_of_a_pipeline_is_rolled_back_and_said_so() {
    let (_dir, mut db) = fresh();
    pipeline(&mut db, json!([execute("CREATE TABLE o (x)")]));
    let (results, _) = pipeline(
        &mut db,
        json!([
            execute("INSERT INTO o VALUES (1)"),
            execute("BEGIN"),
            execute("INSERT INTO o VALUES (2)")
        ]),
    );
    assert_eq!(results[0]["type"], "ok");
    assert_eq!(results[1]["error"]["code"], "TRANSACTION_NOT_SUPPORTED");
    assert_eq!(results[2]["error"]["code"], "TRANSACTION_NOT_SUPPORTED");
    assert_eq!(
        rows(&mut db, "SELECT x FROM o"),
        json!([[{"type": "integer", "value": "1"}]])
    );
}

#[test]
fn only_pipelines_that_continue_and_leave_no_stream_and_look_like_reads_may_run_on_a_replica() {
    let may = |requests: Json| program(requests, false).may_run_on_replica();
    assert!(may(json!([execute("SELECT 1"), {"type": "close"}])));
    assert!(may(json!([execute(
        "  /* orm */ -- x\n WITH a AS (SELECT 1) SELECT * FROM a"
    )])));
    assert!(may(
        json!([{"type": "batch", "batch": {"steps": [{"stmt": {"sql": "select 1"}}]}}])
    ));
    assert!(may(
        json!([{"type": "describe", "sql": "DELETE FROM t"}, {"type": "get_autocommit"}])
    ));
    assert!(may(
        json!([{"type": "store_sql", "sql_id": 1, "sql": "SELECT 1"}, {"type": "execute", "stmt": {"sql_id": 1}}, {"type": "close"}])
    ));
    assert!(!may(
        json!([{"type": "store_sql", "sql_id": 1, "sql": "SELECT 1"}])
    ));
    assert!(!may(json!([execute("INSERT INTO t VALUES (1)")])));
    assert!(!may(json!([execute("BEGIN"), execute("SELECT 1")])));
    assert!(!may(
        json!([{"type": "sequence", "sql": "BEGIN; SELECT 1"}])
    ));
    let mut continued = program(json!([execute("SELECT 1")]), false);
    continued.baton = Some("b".into());
    assert!(!continued.may_run_on_replica());
}
