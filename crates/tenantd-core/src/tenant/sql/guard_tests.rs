//! The sandbox around a tenant's connection, on real SQLite files: ATTACH
//! however the file is named, SQLite's limits, shadow tables, names that
//! must never panic, and tenantd's own statements under the limits.

use proptest::prelude::*;
use rusqlite::hooks::{AuthAction, AuthContext};
use serde_json::{Value as Json, json};

use super::*;
use crate::tenant::db::{Db, Work};
use crate::tenant::sql::{SqlError, SqlErrorKind, SqlLimits, SqlRequest};
use crate::tenant::{Reply, SqlAnswer};

fn fresh() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
    (dir, db)
}

fn request(body: Json) -> SqlRequest {
    SqlRequest::parse(body.to_string().as_bytes(), &SqlLimits::default()).expect("valid request")
}

fn run_keyed(db: &mut Db, body: Json, key: Option<&str>) -> Result<SqlAnswer, SqlError> {
    let request = request(body);
    let applied = db
        .apply_batch(1, &[Work::Sql(&request, key)], &SqlLimits::default(), false)
        .unwrap();
    match applied.replies.into_iter().next().unwrap() {
        Ok(Reply::Sql(answer)) => Ok(answer),
        Ok(other) => panic!("not a SQL answer: {other:?}"),
        Err(e) => Err(e),
    }
}

fn run(db: &mut Db, body: Json) -> Result<SqlAnswer, SqlError> {
    run_keyed(db, body, None)
}

fn one(db: &mut Db, sql: &str, params: Json) -> Result<SqlAnswer, SqlError> {
    run(db, json!({"statements": [{"sql": sql, "params": params}]}))
}

fn rows(db: &mut Db, sql: &str) -> Json {
    one(db, sql, json!([])).unwrap().results[0]["rows"].clone()
}

#[test]
fn attach_is_denied_whatever_names_the_file_and_creates_nothing() {
    let (dir, mut db) = fresh();
    let target = dir.path().join("other.sqlite3");
    let text = target.display().to_string();
    let codes: Vec<String> = text.chars().map(|c| (c as u32).to_string()).collect();
    let spellings = [
        ("ATTACH ? AS e".to_string(), json!([text])),
        (
            "ATTACH ? AS e".to_string(),
            json!([format!("file:{text}?mode=rwc")]),
        ),
        (format!("ATTACH '{text}' || '' AS e"), json!([])),
        (format!("ATTACH char({}) AS e", codes.join(",")), json!([])),
        ("DETACH ?".to_string(), json!(["main"])),
    ];
    for (sql, params) in spellings {
        for read_only in [false, true] {
            let error = run(
                &mut db,
                json!({"statements": [{"sql": sql, "params": params}], "read_only": read_only}),
            )
            .unwrap_err();
            assert_eq!(error.kind, SqlErrorKind::Denied, "{sql}: {error}");
            assert!(error.message.contains("ATTACH"), "{sql}: {error}");
            assert!(!target.exists(), "{sql} created the file");
        }
    }
}

#[test]
fn actions_the_guard_does_not_know_are_denied_in_every_mode() {
    let unknown = || AuthContext {
        action: AuthAction::Unknown {
            code: 99,
            arg1: None,
            arg2: None,
        },
        database_name: Some("main"),
        accessor: None,
    };
    for user in [true, false] {
        let state = State {
            user,
            ..State::default()
        };
        assert!(rule(&state, &unknown()).is_some(), "user mode {user}");
    }
}

#[test]
fn no_database_can_be_attached_even_by_tenantd() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("a.sqlite3")).unwrap();
    crate::tenant::sql::limits::harden(&conn, &crate::tenant::sql::limits::SqliteLimits::DEFAULT)
        .unwrap();
    let target = dir.path().join("b.sqlite3");
    let error = conn
        .execute("ATTACH ? AS b", [target.display().to_string()])
        .unwrap_err();
    assert!(error.to_string().contains("too many attached"), "{error}");
    assert!(!target.exists());
}

#[test]
fn values_over_the_length_limit_are_limit_errors() {
    let (_dir, mut db) = fresh();
    one(&mut db, "CREATE TABLE t(v)", json!([])).unwrap();
    for (sql, params) in [
        ("SELECT zeroblob(2000001)", json!([])),
        ("SELECT printf('%.*c', 999999999, 'x')", json!([])),
        ("SELECT randomblob(3000000)", json!([])),
        ("INSERT INTO t VALUES (zeroblob(2000001))", json!([])),
        ("SELECT length(?)", json!(["x".repeat(2_000_001)])),
    ] {
        let error = one(&mut db, sql, params).unwrap_err();
        assert_eq!(error.kind, SqlErrorKind::Limit, "{sql}: {error}");
        assert!(error.message.contains("--sql-max-value-bytes"), "{error}");
    }
    assert_eq!(
        rows(&mut db, "SELECT length(zeroblob(2000000))"),
        json!([[2000000]])
    );
}

/// A stored answer may be larger than any value a request may make: the
/// answer of a keyed request is written and read back by tenantd.
#[test]
fn an_idempotent_answer_larger_than_the_value_limit_is_stored_and_replayed() {
    let (_dir, mut db) = fresh();
    let body = json!({"statements": [
        {"sql": "CREATE TABLE big(v)"},
        {"sql": "INSERT INTO big SELECT printf('%.*c', 1000000, 'x') FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)"},
        {"sql": "SELECT v FROM big"}
    ]});
    let first = run_keyed(&mut db, body.clone(), Some("big")).unwrap();
    assert!(first.results.to_string().len() > 3_000_000);
    let again = run_keyed(&mut db, body, Some("big")).unwrap();
    assert!(again.repeated);
    assert_eq!(first.results, again.results);
}

#[test]
fn a_reused_key_with_another_request_is_refused() {
    let (_dir, mut db) = fresh();
    let first =
        json!({"statements": [{"sql": "CREATE TABLE k(x)"}, {"sql": "INSERT INTO k VALUES (1)"}]});
    let other =
        json!({"statements": [{"sql": "CREATE TABLE k(x)"}, {"sql": "INSERT INTO k VALUES (2)"}]});
    run_keyed(&mut db, first.clone(), Some("key")).unwrap();
    let error = run_keyed(&mut db, other, Some("key")).unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::KeyReused, "{error}");
    assert!(run_keyed(&mut db, first, Some("key")).unwrap().repeated);
    assert_eq!(rows(&mut db, "SELECT x FROM k"), json!([[1]]));
}

#[test]
fn shadow_tables_can_be_read_but_not_written() {
    let (_dir, mut db) = fresh();
    run(
        &mut db,
        json!({"statements": [
            {"sql": "CREATE VIRTUAL TABLE rt USING rtree(id, minx, maxx)"},
            {"sql": "INSERT INTO rt VALUES (1, 0, 1)"},
            {"sql": "CREATE VIRTUAL TABLE ft USING fts5(body)"},
            {"sql": "INSERT INTO ft VALUES ('hello')"}
        ]}),
    )
    .unwrap();
    // Also on a connection that has not used the virtual tables yet.
    for reopen in [false, true] {
        if reopen {
            drop(db);
            db = Db::open(&_dir.path().join("db.sqlite3")).unwrap();
        }
        for sql in [
            "UPDATE rt_node SET data = x'0000'",
            "DELETE FROM ft_data",
            "DROP TABLE ft_idx",
        ] {
            assert!(
                one(&mut db, sql, json!([])).is_err(),
                "{sql}, reopened {reopen}"
            );
        }
    }
    assert_eq!(rows(&mut db, "SELECT count(*) FROM rt_node"), json!([[1]]));
    assert_eq!(rows(&mut db, "PRAGMA quick_check"), json!([["ok"]]));
}

#[test]
fn fts_options_that_name_functions_are_refused() {
    let (_dir, mut db) = fresh();
    for sql in [
        "CREATE VIRTUAL TABLE f USING fts4(body, compress=zeroblob, uncompress=zeroblob)",
        "create virtual table f using FTS4(body, UNCOMPRESS=hex)",
        "CREATE /* c */ VIRTUAL TABLE f USING fts3(body, compress = hex)",
    ] {
        let error = one(&mut db, sql, json!([])).unwrap_err();
        assert_eq!(error.kind, SqlErrorKind::Denied, "{sql}: {error}");
        assert!(error.message.contains("compress"), "{error}");
    }
    // Ordinary options and a column named like one are fine.
    one(
        &mut db,
        "CREATE VIRTUAL TABLE g USING fts4(compressed, body, tokenize=porter)",
        json!([]),
    )
    .unwrap();
    one(
        &mut db,
        "CREATE TABLE plain(note DEFAULT 'compress=x')",
        json!([]),
    )
    .unwrap();
}

#[test]
fn text_after_a_nul_is_refused() {
    let error = SqlRequest::parse(
        br#"{"statements": [{"sql": "SELECT 1;\u0000 DROP TABLE t"}]}"#,
        &SqlLimits::default(),
    )
    .unwrap_err();
    assert_eq!(error.kind, SqlErrorKind::Invalid);
    assert!(error.message.contains("NUL"), "{error}");
}

#[test]
fn integers_beyond_64_bits_are_refused_not_made_real() {
    for number in [
        "-99999999999999999999",
        "-9223372036854775809",
        "18446744073709551616",
        "9223372036854775808",
    ] {
        let body = format!(r#"{{"statements": [{{"sql": "SELECT ?", "params": [{number}]}}]}}"#);
        let error = SqlRequest::parse(body.as_bytes(), &SqlLimits::default()).unwrap_err();
        assert!(error.message.contains("64-bit"), "{number}: {error}");
        let body =
            format!(r#"{{"statements": [{{"sql": "SELECT :n", "params": {{":n": {number}}}}}]}}"#);
        assert!(SqlRequest::parse(body.as_bytes(), &SqlLimits::default()).is_err());
    }
    for number in [
        "-9223372036854775808",
        "-1e20",
        "-1.5",
        "100000000000000000000.0",
    ] {
        let body = format!(
            r#"{{"statements": [{{"sql": "SELECT '99999999999999999999', ?", "params": [{number}]}}]}}"#
        );
        SqlRequest::parse(body.as_bytes(), &SqlLimits::default()).expect(number);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_name_panics_the_guard(name in "\\PC{0,24}") {
        let _ = is_internal(&name);
        let _ = first_keyword(&name);
        let _ = denied_by_keyword(&name);
        let _ = denied_by_keyword(&format!("CREATE VIRTUAL TABLE {name}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Names with characters of every width at every byte position, as
    /// tables, through SQLite and the authorizer.
    #[test]
    fn any_table_name_is_created_or_refused_without_a_panic(
        prefix in prop::sample::select(vec!["", "tenantd", "tenantd_", "abcdefg", "TENANTD"]),
        rest in "[a-zé\u{1F600}_]{1,6}",
    ) {
        let (_dir, mut db) = fresh();
        let name = format!("{prefix}{rest}");
        let outcome = one(&mut db, &format!("CREATE TABLE \"{name}\"(x)"), json!([]));
        let internal = name.len() >= 8 && name.as_bytes()[..8].eq_ignore_ascii_case(b"tenantd_");
        match outcome {
            Ok(_) => prop_assert!(!internal, "{name} was created"),
            Err(e) => {
                prop_assert!(internal || name == "welcome", "{name}: {e}");
                prop_assert_eq!(e.kind, SqlErrorKind::Denied);
            }
        }
    }
}

/// The limits hold when SQLite reads the schema back too (after a failed
/// request's DDL is rolled back, say): no request may leave a schema they
/// cannot read, or every later statement of the tenant would fail.
#[test]
fn no_request_leaves_a_schema_the_limits_cannot_read_back() {
    let (dir, mut db) = fresh();
    one(&mut db, "CREATE TABLE t(a)", json!([])).unwrap();
    let name = "c".repeat(60_000);
    for i in 0..3 {
        let _ = one(
            &mut db,
            &format!("ALTER TABLE t ADD COLUMN \"{name}{i}\""),
            json!([]),
        );
    }
    assert_eq!(
        rows(&mut db, "SELECT count(*) FROM pragma_table_info('t')"),
        json!([[2]]),
        "the second column would make the table's CREATE longer than a statement may be"
    );
    for _ in 0..2 {
        // DDL rolled back: SQLite reads the schema again.
        let failed = run(
            &mut db,
            json!({"statements": [{"sql": "CREATE TABLE u(a)"}, {"sql": "SELECT nope"}]}),
        );
        assert!(failed.is_err());
        assert_eq!(rows(&mut db, "SELECT count(*) FROM t"), json!([[0]]));
        db.apply(2, &[None]).unwrap();
        drop(db);
        db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
    }
}
