//! Running a read-only SQL request on a replica file: the same checks and
//! limits as on the holder (authorizer, SQLite limits, watchdog), on a
//! connection that cannot write.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value as Json;

use crate::tenant::sql::hrana::{self, Program};
use crate::tenant::sql::{self, ExecError, Guard, SqlError, SqlLimits, SqlRequest, limits};

/// Why a replica did not answer.
pub enum RunError {
    /// The request's own error: answered as the holder would.
    Refused(SqlError),
    /// The replica could not be read: the holder answers instead.
    Failed(String),
}

/// Runs `request` (read-only) on the replica at `path`. The caller holds
/// the replica's read lock, so no apply changes the file meanwhile.
pub fn run(path: &Path, request: &SqlRequest, limits: &SqlLimits) -> Result<Json, RunError> {
    on_replica(path, limits, |conn, ctx| {
        sql::execute(conn, ctx, request).map(|executed| executed.results)
    })
}

/// Runs a Hrana pipeline on the replica at `path`, as [`run`] does a
/// `/sql` request; one that writes or controls a transaction is the
/// holder's (`Failed`).
pub fn run_hrana(path: &Path, program: &Program, limits: &SqlLimits) -> Result<Json, RunError> {
    let answer = on_replica(path, limits, |conn, ctx| {
        hrana::run_on_replica(conn, ctx, program)
    })?;
    answer.ok_or_else(|| {
        RunError::Failed("the pipeline writes or controls a transaction: the holder runs it".into())
    })
}

/// Opens the replica and runs `body` in a transaction it rolls back.
fn on_replica<T>(
    path: &Path,
    limits: &SqlLimits,
    body: impl FnOnce(&Connection, &sql::Context<'_>) -> Result<T, ExecError>,
) -> Result<T, RunError> {
    let failed = |e: rusqlite::Error| RunError::Failed(format!("replica {}: {e}", path.display()));
    // Immutable: no locks, no WAL or -shm files; the file changes only
    // under the write lock, and each read opens it anew.
    let uri = format!("file:{}?immutable=1", uri_path(path));
    let mut conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    limits::harden(&conn, &limits::configured()).map_err(failed)?;
    let guard = Guard::install(&mut conn).map_err(failed)?;
    let interrupt = Arc::new(conn.get_interrupt_handle());
    conn.execute_batch("BEGIN").map_err(failed)?;
    let ctx = sql::Context {
        guard: &guard,
        interrupt: &interrupt,
        limits,
    };
    let outcome = body(&conn, &ctx);
    let _ = conn.execute_batch("ROLLBACK");
    match outcome {
        Ok(answer) => Ok(answer),
        Err(ExecError::Refused(e)) | Err(ExecError::TransactionLost(e)) => {
            Err(RunError::Refused(e))
        }
        Err(ExecError::Db(e)) => Err(failed(e)),
    }
}

/// A path as a URI path: the characters a URI gives meaning to escaped.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tenant::sql::hrana::proto::PipelineBody;

    fn program(requests: Json) -> Program {
        let body: PipelineBody =
            serde_json::from_value(json!({"baton": null, "requests": requests})).unwrap();
        Program {
            requests: body.requests,
            read_only: false,
            baton: None,
        }
    }

    #[test]
    fn a_replica_answers_a_reading_pipeline_and_hands_anything_else_to_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.sqlite3");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (7);")
            .unwrap();
        let limits = SqlLimits::default();
        let execute = |sql: &str| json!({"type": "execute", "stmt": {"sql": sql}});
        let answer = match run_hrana(
            &path,
            &program(json!([execute("SELECT x FROM t"), {"type": "close"}])),
            &limits,
        ) {
            Ok(answer) => answer,
            Err(_) => panic!("a read is answered by the replica"),
        };
        assert_eq!(answer["baton"], Json::Null);
        assert_eq!(
            answer["results"][0]["response"]["result"]["rows"][0][0]["value"],
            "7"
        );
        // What SQLite judges a write, or transaction control, anywhere in
        // the pipeline: the holder's (the file is left as it was).
        for requests in [
            json!([
                execute("SELECT 1"),
                execute("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a")
            ]),
            json!([{"type": "sequence", "sql": "SELECT 1; DELETE FROM t"}]),
            json!([execute("SELECT 1"), execute("BEGIN")]),
        ] {
            assert!(
                matches!(
                    run_hrana(&path, &program(requests.clone()), &limits),
                    Err(RunError::Failed(_))
                ),
                "{requests}"
            );
        }
        let count: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1);
    }
}
