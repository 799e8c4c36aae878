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
