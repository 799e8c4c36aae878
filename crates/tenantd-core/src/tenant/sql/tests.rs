//! The SQL API against real SQLite files: results, errors, the guard's
//! rules and the limits, each with what it leaves behind.

use std::time::Duration;

use serde_json::{Value as Json, json};

use super::*;
use crate::tenant::db::{Applied, Db, Work};
use crate::tenant::{Reply, SqlAnswer};

fn fresh() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
    (dir, db)
}

fn request(body: Json) -> SqlRequest {
    SqlRequest::parse(body.to_string().as_bytes(), &SqlLimits::default()).expect("valid request")
}

fn run_with(db: &mut Db, limits: &SqlLimits, requests: &[SqlRequest]) -> Applied {
    let work: Vec<Work> = requests.iter().map(|r| Work::Sql(r, None)).collect();
    db.apply_batch(1, &work, limits, false).unwrap()
}

fn run(db: &mut Db, body: Json) -> Result<SqlAnswer, SqlError> {
    let applied = run_with(db, &SqlLimits::default(), &[request(body)]);
    match applied.replies.into_iter().next().unwrap() {
        Ok(Reply::Sql(answer)) => Ok(answer),
        Ok(other) => panic!("not a SQL answer: {other:?}"),
        Err(e) => Err(e),
    }
}

fn query(db: &mut Db, sql: &str) -> Json {
    let answer = run(db, json!({"statements": [{"sql": sql}], "read_only": true})).unwrap();
    answer.results[0]["rows"].clone()
}

fn setup(db: &mut Db) {
    run(
        db,
        json!({"statements": [{"sql": "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, data BLOB)"}]}),
    )
    .unwrap();
}

#[test]
fn positional_and_named_params_and_the_answer_format() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let answer = run(
        &mut db,
        json!({"statements": [
            {"sql": "INSERT INTO notes(body, data) VALUES (?, ?)", "params": ["hi", {"base64": "AAEC"}]},
            {"sql": "SELECT id, body, data, 1.5 AS f, NULL AS n FROM notes WHERE id > :after", "params": {":after": 0}}
        ]}),
    )
    .unwrap();
    assert_eq!(
        *answer.results,
        json!([
            {"columns": [], "rows": [], "rows_affected": 1, "last_insert_rowid": 1},
            {"columns": ["id", "body", "data", "f", "n"],
             "rows": [[1, "hi", {"base64": "AAEC"}, 1.5, null]],
             "rows_affected": 0, "last_insert_rowid": null}
        ])
    );
}

#[test]
fn a_failing_statement_undoes_its_whole_request_but_not_the_rest_of_the_batch() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let good = request(json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('kept')"}]}));
    let bad = request(json!({"statements": [
        {"sql": "INSERT INTO notes(body) VALUES ('undone')"},
        {"sql": "INSERT INTO no_such_table VALUES (1)"}
    ]}));
    let applied = run_with(&mut db, &SqlLimits::default(), &[good, bad]);
    assert!(applied.replies[0].is_ok());
    let error = applied.replies[1].clone().unwrap_err();
    assert_eq!(error.statement, Some(1));
    assert!(error.message.contains("no such table"), "{error}");
    assert!(applied.committed.is_some());
    assert_eq!(query(&mut db, "SELECT body FROM notes"), json!([["kept"]]));
}

#[test]
fn a_batch_that_wrote_nothing_commits_nothing() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let seq = db.seq().unwrap();
    let read = request(json!({"statements": [{"sql": "SELECT count(*) FROM notes"}]}));
    let applied = run_with(&mut db, &SqlLimits::default(), &[read]);
    assert!(applied.committed.is_none(), "a read needs no upload");
    assert_eq!(db.seq().unwrap(), seq);
}

#[test]
fn read_only_requests_refuse_writes() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let error = run(
        &mut db,
        json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('x')"}], "read_only": true}),
    )
    .unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Invalid);
    assert!(error.message.contains("read_only"), "{error}");
    assert_eq!(query(&mut db, "SELECT count(*) FROM notes"), json!([[0]]));
}

/// Each of these is refused by a named rule, and nothing of its request
/// (an insert before it) is applied.
#[test]
fn the_guard_denies_what_reaches_outside_the_tenants_data() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.db");
    let cases = [
        (
            format!("ATTACH DATABASE '{}' AS x", outside.display()),
            "ATTACH",
        ),
        ("DETACH DATABASE main".to_string(), "DETACH"),
        (format!("VACUUM INTO '{}'", outside.display()), "VACUUM"),
        ("/* hidden */ vacuum".to_string(), "VACUUM"),
        (
            "SELECT load_extension('/tmp/x.so')".to_string(),
            "load_extension",
        ),
        ("SELECT * FROM tenantd_meta".to_string(), "tenantd_meta"),
        (
            "UPDATE tenantd_meta SET value = 0".to_string(),
            "tenantd_meta",
        ),
        (
            "DELETE FROM tenantd_idempotency".to_string(),
            "tenantd_idempotency",
        ),
        ("CREATE TABLE tenantd_mine(x)".to_string(), "tenantd_mine"),
        ("PRAGMA journal_mode = WAL".to_string(), "journal_mode"),
        ("PRAGMA synchronous = FULL".to_string(), "synchronous"),
        ("PRAGMA writable_schema = ON".to_string(), "writable_schema"),
        ("PRAGMA page_size = 1024".to_string(), "page_size"),
        ("PRAGMA database_list".to_string(), "database_list"),
        ("CREATE TEMP TABLE t(x)".to_string(), "temp"),
        ("BEGIN".to_string(), "transaction control"),
        ("SAVEPOINT s".to_string(), "transaction control"),
        ("DROP TABLE welcome".to_string(), "welcome"),
        (
            "CREATE TRIGGER t AFTER UPDATE ON welcome BEGIN SELECT 1; END".to_string(),
            "welcome",
        ),
        ("SELECT * FROM temp.sqlite_master".to_string(), "\"temp\""),
    ];
    for (sql, rule) in cases {
        let (_dir, mut db) = fresh();
        setup(&mut db);
        let error = run(
            &mut db,
            json!({"statements": [
                {"sql": "INSERT INTO notes(body) VALUES ('before')"},
                {"sql": sql}
            ]}),
        )
        .expect_err(&sql);
        assert_eq!(error.kind, SqlErrorKind::Denied, "{sql}: {error}");
        assert_eq!(error.statement, Some(1), "{sql}");
        assert!(error.message.contains(rule), "{sql}: {error}");
        assert_eq!(
            query(&mut db, "SELECT count(*) FROM notes"),
            json!([[0]]),
            "{sql}"
        );
    }
    assert!(
        !outside.exists(),
        "nothing may be written outside the tenant's file"
    );
}

/// The file-naming denials hold whatever spells the file name: a
/// parameter and a concatenation, not only a literal.
#[test]
fn vacuum_into_and_load_extension_are_denied_in_every_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.db");
    let path = outside.display().to_string();
    let (head, tail) = path.split_at(path.len() / 2);
    let cases = [
        (json!({"sql": "VACUUM INTO ?", "params": [path]}), "VACUUM"),
        (
            json!({"sql": format!("VACUUM INTO '{head}' || '{tail}'")}),
            "VACUUM",
        ),
        (
            json!({"sql": "SELECT load_extension(?)", "params": [path]}),
            "load_extension",
        ),
        (
            json!({"sql": format!("SELECT load_extension('{head}' || '{tail}')")}),
            "load_extension",
        ),
    ];
    for (statement, rule) in cases {
        let (_dir, mut db) = fresh();
        setup(&mut db);
        let error =
            run(&mut db, json!({"statements": [statement]})).expect_err(&statement.to_string());
        assert_eq!(error.kind, SqlErrorKind::Denied, "{statement}: {error}");
        assert!(error.message.contains(rule), "{statement}: {error}");
    }
    assert!(
        !outside.exists(),
        "nothing may be written outside the tenant's file"
    );
}

#[test]
fn a_view_over_tenantds_tables_cannot_be_read() {
    let (_dir, mut db) = fresh();
    // SQLite checks a view's reads when it is used, not when it is made.
    run(
        &mut db,
        json!({"statements": [{"sql": "CREATE VIEW v AS SELECT * FROM tenantd_meta"}]}),
    )
    .unwrap();
    let error = run(&mut db, json!({"statements": [{"sql": "SELECT * FROM v"}]})).unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Denied, "{error}");
    assert!(error.message.contains("tenantd_meta"), "{error}");
}

#[test]
fn a_view_or_trigger_cannot_reach_tenantds_tables_from_tenantds_own_statements() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    // A trigger on the tenant's own table that tries to reach tenantd's:
    // refused when it is prepared as part of a request.
    let error = run(
        &mut db,
        json!({"statements": [
            {"sql": "CREATE TRIGGER t AFTER INSERT ON notes BEGIN UPDATE tenantd_meta SET value = 0; END"},
            {"sql": "INSERT INTO notes(body) VALUES ('x')"}
        ]}),
    )
    .unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Denied, "{error}");
    // And the counter keeps counting.
    let (answers, _) = db.apply(1, &[None]).unwrap();
    assert_eq!(answers[0].count, 1);
}

#[test]
fn read_only_pragmas_and_user_version_are_allowed() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let answer = run(
        &mut db,
        json!({"statements": [
            {"sql": "PRAGMA table_info(notes)"},
            {"sql": "PRAGMA user_version = 7"},
            {"sql": "PRAGMA user_version"},
            {"sql": "SELECT name FROM pragma_table_list WHERE name = 'notes'"}
        ]}),
    )
    .unwrap();
    assert_eq!(answer.results[0]["rows"].as_array().unwrap().len(), 3);
    assert_eq!(answer.results[2]["rows"], json!([[7]]));
    assert_eq!(answer.results[3]["rows"], json!([["notes"]]));
}

#[test]
fn a_runaway_query_is_interrupted_and_the_rest_of_the_batch_commits() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let limits = SqlLimits {
        timeout: Duration::from_millis(100),
        ..SqlLimits::default()
    };
    let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) ";
    let runaway_read =
        request(json!({"statements": [{"sql": format!("{forever} SELECT max(x) FROM c")}]}));
    // An interrupted write makes SQLite roll back the whole transaction:
    // the batch is applied again without it.
    let runaway_write = request(
        json!({"statements": [{"sql": format!("{forever} INSERT INTO notes(body) SELECT x FROM c")}]}),
    );
    let good = request(json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('kept')"}]}));
    let work = vec![
        Work::Increment(None),
        Work::Sql(&good, None),
        Work::Sql(&runaway_read, None),
        Work::Sql(&runaway_write, None),
        Work::Increment(None),
    ];
    let started = std::time::Instant::now();
    let applied = db.apply_batch(1, &work, &limits, false).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    for index in [2, 3] {
        let error = applied.replies[index].clone().unwrap_err();
        assert_eq!(error.kind, SqlErrorKind::Limit, "{error}");
        assert!(error.message.contains("time limit"), "{error}");
    }
    assert_eq!(applied.committed.unwrap().count, 2);
    assert_eq!(query(&mut db, "SELECT body FROM notes"), json!([["kept"]]));
    assert_eq!(db.count().unwrap(), 2);
}

#[test]
fn the_database_cannot_grow_past_its_limit() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let limits = SqlLimits {
        max_db_bytes: 256 * 1024,
        ..SqlLimits::default()
    };
    let big = request(
        json!({"statements": [{"sql": "INSERT INTO notes(data) VALUES (zeroblob(1048576))"}]}),
    );
    let small =
        request(json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('small')"}]}));
    let applied = run_with(&mut db, &limits, &[small, big]);
    let error = applied.replies[1].clone().unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Limit, "{error}");
    assert!(error.message.contains("--max-db-bytes"), "{error}");
    assert_eq!(query(&mut db, "SELECT body FROM notes"), json!([["small"]]));
    // Increments still work at the limit: it binds requests only.
    db.apply(1, &[None]).unwrap();
}

#[test]
fn results_are_bounded() {
    let (_dir, mut db) = fresh();
    let limits = SqlLimits {
        max_rows: 10,
        ..SqlLimits::default()
    };
    let many = request(
        json!({"statements": [{"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 11) SELECT x FROM c"}]}),
    );
    let error = run_with(&mut db, &limits, &[many]).replies[0]
        .clone()
        .unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Limit);
    assert!(error.message.contains("LIMIT"), "{error}");
}

#[test]
fn a_repeated_idempotency_key_gets_the_first_answer_and_writes_once() {
    let (_dir, mut db) = fresh();
    setup(&mut db);
    let insert =
        request(json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('once')"}]}));
    let first = db
        .apply_batch(
            3,
            &[Work::Sql(&insert, Some("k"))],
            &SqlLimits::default(),
            false,
        )
        .unwrap();
    db.claim(4).unwrap();
    let again = db
        .apply_batch(
            4,
            &[Work::Sql(&insert, Some("k"))],
            &SqlLimits::default(),
            false,
        )
        .unwrap();
    let (Ok(Reply::Sql(a)), Ok(Reply::Sql(b))) = (&first.replies[0], &again.replies[0]) else {
        panic!("SQL answers expected");
    };
    assert!(!a.repeated && b.repeated);
    assert_eq!(a.results, b.results);
    assert_eq!(b.epoch, 3, "the epoch of the first answer");
    assert_eq!(query(&mut db, "SELECT count(*) FROM notes"), json!([[1]]));
}

#[test]
fn the_counter_and_sql_see_each_others_writes_within_a_batch() {
    let (_dir, mut db) = fresh();
    let read = request(json!({"statements": [{"sql": "SELECT count FROM welcome"}]}));
    let set = request(json!({"statements": [{"sql": "UPDATE welcome SET count = 100"}]}));
    let work = [
        Work::Increment(None),
        Work::Sql(&read, None),
        Work::Sql(&set, None),
        Work::Increment(None),
        Work::Read,
    ];
    let applied = db
        .apply_batch(1, &work, &SqlLimits::default(), false)
        .unwrap();
    let Ok(Reply::Sql(seen)) = &applied.replies[1] else {
        panic!("SQL answer expected")
    };
    assert_eq!(seen.results[0]["rows"], json!([[1]]));
    assert_eq!(applied.committed.unwrap().count, 101);
    let Ok(Reply::Count(read)) = &applied.replies[4] else {
        panic!("count expected")
    };
    assert_eq!(read.count, 101);
}

#[test]
fn malformed_requests_name_the_problem() {
    let limits = SqlLimits {
        max_statements: 2,
        ..SqlLimits::default()
    };
    let cases = [
        (json!({"statements": []}).to_string(), "no statements"),
        (
            json!({"statements": {"sql": "x"}}).to_string(),
            "invalid request body",
        ),
        (
            json!({"statements": [{"sql": "SELECT 1"}], "extra": 1}).to_string(),
            "unknown field",
        ),
        (
            json!({"statements": [{"sql": "SELECT ?", "params": [true]}]}).to_string(),
            "booleans",
        ),
        (
            json!({"statements": [{"sql": "SELECT ?", "params": "x"}]}).to_string(),
            "array",
        ),
        (
            json!({"statements": [{"sql": "SELECT :a", "params": {"a": 1}}]}).to_string(),
            "as in the SQL",
        ),
        (
            json!({"statements": [{"sql": "SELECT ?", "params": [{"base64": "!!"}]}]}).to_string(),
            "base64",
        ),
        (json!({"statements": [{"sql": " "}]}).to_string(), "empty"),
        (
            json!({"statements": [{"sql": "SELECT 1"}, {"sql": "SELECT 1"}, {"sql": "SELECT 1"}]})
                .to_string(),
            "at most 2",
        ),
        ("{not json".to_string(), "invalid request body"),
    ];
    for (body, expected) in cases {
        let error = SqlRequest::parse(body.as_bytes(), &limits).expect_err(&body);
        assert!(error.message.contains(expected), "{body}: {error}");
    }
}

#[test]
fn wrong_parameter_counts_and_names_are_errors() {
    let (_dir, mut db) = fresh();
    for (body, expected) in [
        (
            json!({"statements": [{"sql": "SELECT ?, ?", "params": [1]}]}),
            "takes 2 parameter(s), 1 given",
        ),
        (
            json!({"statements": [{"sql": "SELECT ?", "params": [1, 2]}]}),
            "takes 1 parameter(s), 2 given",
        ),
        (
            json!({"statements": [{"sql": "SELECT :a", "params": {":b": 1}}]}),
            "no parameter named :b",
        ),
        (json!({"statements": [{"sql": "SELEC 1"}]}), "syntax error"),
        (
            json!({"statements": [{"sql": "SELECT 1; SELECT 2"}]}),
            "Multiple statements",
        ),
    ] {
        let error = run(&mut db, body.clone()).expect_err(&body.to_string());
        assert_eq!(error.kind, SqlErrorKind::Invalid);
        assert!(error.message.contains(expected), "{body}: {error}");
    }
}
