//! The SQL API over a tenant's database: the request as the client sent it,
//! checked before it reaches the tenant's actor, and its execution inside
//! the actor's batch transaction.
//!
//! A request runs in a savepoint of the batch's transaction, so a failing
//! request leaves nothing behind while the batch's other requests commit
//! (and share one upload). What a request may do is decided by SQLite's
//! authorizer ([`guard`]) as each statement is prepared, and how long it
//! may run by the progress handler and the [`watchdog`]. The answer is
//! measured as it is built, in the bytes it will take on the wire
//! ([`answer`]), before a value is copied out of SQLite.

mod answer;
pub mod body;
mod cursor;
pub mod guard;
pub mod hrana;
pub mod limits;
pub mod memory;
pub mod watchdog;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, InterruptHandle};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use cursor::{Cursor, PrepareError};
pub use guard::Guard;
use watchdog::Cause;

/// Bounds on what one request may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlLimits {
    /// Statements in one request.
    pub max_statements: usize,
    /// Rows returned by one request, all statements together.
    pub max_rows: usize,
    /// Bytes of the answer as sent (JSON: column names, escapes and
    /// base64 included), all statements together.
    pub max_result_bytes: usize,
    /// Wall time of one request's statements; past it SQLite is interrupted
    /// and the request rolled back.
    pub timeout: Duration,
    /// Largest size the tenant's database may grow to through SQL.
    pub max_db_bytes: u64,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            max_statements: 100,
            max_rows: 10_000,
            max_result_bytes: 4 << 20,
            timeout: Duration::from_secs(2),
            max_db_bytes: 1 << 30,
        }
    }
}

/// Why a SQL request was refused; nothing of it was applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SqlError {
    pub kind: SqlErrorKind,
    pub message: String,
    /// Index of the statement at fault, when there is one.
    pub statement: Option<usize>,
    /// SQLite's extended result code, when SQLite refused the statement
    /// (Hrana answers name it: `SQLITE_CONSTRAINT_UNIQUE` …).
    pub sqlite_code: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlErrorKind {
    /// Malformed request, wrong parameters, SQL errors.
    Invalid,
    /// A rule of the authorizer refused a statement (403).
    Denied,
    /// A limit was reached: rows, time, memory, database size.
    Limit,
    /// The answer would be larger than its budget (413).
    TooLarge,
    /// The counter's own statements failed on the tenant's changes to its
    /// table (409): the reason names the table and the constraint.
    Conflict,
    /// The machine is shutting down (503); nothing was applied.
    Unavailable,
    /// An idempotency key already names another request (422).
    KeyReused,
}

impl SqlErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SqlErrorKind::Invalid => "invalid",
            SqlErrorKind::Denied => "denied",
            SqlErrorKind::Limit | SqlErrorKind::TooLarge => "limit",
            SqlErrorKind::Conflict => "conflict",
            SqlErrorKind::Unavailable => "unavailable",
            SqlErrorKind::KeyReused => "idempotency_key_reused",
        }
    }
}

impl SqlError {
    pub fn new(
        kind: SqlErrorKind,
        statement: Option<usize>,
        message: impl Into<String>,
    ) -> SqlError {
        SqlError {
            kind,
            message: message.into(),
            statement,
            sqlite_code: None,
        }
    }

    /// The same error, naming the SQLite error behind it.
    pub fn with_sqlite_code(mut self, error: &rusqlite::Error) -> SqlError {
        if let Some(e) = error.sqlite_error() {
            self.sqlite_code = Some(e.extended_code);
        }
        self
    }

    pub fn invalid(statement: Option<usize>, message: impl Into<String>) -> SqlError {
        SqlError::new(SqlErrorKind::Invalid, statement, message)
    }
}

/// A checked request: what the actor runs.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlRequest {
    pub statements: Vec<Statement>,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Params,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Params {
    Positional(Vec<Value>),
    /// Names as written in the SQL, with their prefix (`:after`, `$x`, `@y`).
    Named(Vec<(String, Value)>),
}

/// The request body as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    statements: Vec<BodyStatement>,
    #[serde(default)]
    read_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyStatement {
    sql: String,
    #[serde(default)]
    params: Json,
}

impl SqlRequest {
    /// Parses and checks a request body; the error names what is wrong.
    pub fn parse(body: &[u8], limits: &SqlLimits) -> Result<SqlRequest, SqlError> {
        self::body::check_integers(body).map_err(|e| SqlError::invalid(None, e))?;
        let body: Body = serde_json::from_slice(body).map_err(|e| {
            SqlError::invalid(
                None,
                format!(
                    "invalid request body: {e}; expected {{\"statements\": [{{\"sql\": \"...\", \"params\": [...]}}], \"read_only\": false}}"
                ),
            )
        })?;
        if body.statements.is_empty() {
            return Err(SqlError::invalid(
                None,
                "the request has no statements: send at least one in \"statements\"",
            ));
        }
        if body.statements.len() > limits.max_statements {
            return Err(SqlError::new(
                SqlErrorKind::Limit,
                None,
                format!(
                    "the request has {} statements; at most {} are allowed in one request",
                    body.statements.len(),
                    limits.max_statements
                ),
            ));
        }
        let statements = body
            .statements
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                if s.sql.contains('\0') {
                    return Err(SqlError::invalid(
                        Some(index),
                        format!("statement {index} contains a NUL character, after which SQLite would ignore the text; remove it"),
                    ));
                }
                if s.sql.trim().is_empty() {
                    return Err(SqlError::invalid(
                        Some(index),
                        format!("statement {index} is empty"),
                    ));
                }
                Ok(Statement {
                    params: parse_params(index, s.params)?,
                    sql: s.sql,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SqlRequest {
            statements,
            read_only: body.read_only,
        })
    }
}

fn parse_params(index: usize, params: Json) -> Result<Params, SqlError> {
    match params {
        Json::Null => Ok(Params::Positional(Vec::new())),
        Json::Array(values) => values
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_value(index, &i.to_string(), v))
            .collect::<Result<_, _>>()
            .map(Params::Positional),
        Json::Object(map) => map
            .into_iter()
            .map(|(name, v)| {
                if !name.starts_with([':', '@', '$']) {
                    return Err(SqlError::invalid(
                        Some(index),
                        format!(
                            "statement {index}: parameter name {name:?} must be written as in the SQL, with its ':', '@' or '$'"
                        ),
                    ));
                }
                let value = parse_value(index, &name, v)?;
                Ok((name, value))
            })
            .collect::<Result<_, _>>()
            .map(Params::Named),
        other => Err(SqlError::invalid(
            Some(index),
            format!(
                "statement {index}: params must be an array (positional) or an object (named), not {}",
                json_type(&other)
            ),
        )),
    }
}

fn parse_value(index: usize, name: &str, value: Json) -> Result<Value, SqlError> {
    let bad = |what: &str| {
        SqlError::invalid(
            Some(index),
            format!(
                "statement {index}, parameter {name}: {what}; values are null, integers, floats, strings or {{\"base64\": \"...\"}} for blobs"
            ),
        )
    };
    match value {
        Json::Null => Ok(Value::Null),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Value::Integer(i)),
            (None, Some(_)) if n.is_u64() => Err(bad("integer out of the 64-bit signed range")),
            (None, Some(f)) => Ok(Value::Real(f)),
            (None, None) => Err(bad("number out of range")),
        },
        Json::String(s) => Ok(Value::Text(s)),
        Json::Bool(_) => Err(bad("booleans are not a SQLite type (send 0 or 1)")),
        Json::Object(map) => match map.get("base64") {
            Some(Json::String(text)) if map.len() == 1 => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(Value::Blob)
                .map_err(|e| bad(&format!("invalid base64: {e}"))),
            _ => Err(bad("an object must be {\"base64\": \"...\"}")),
        },
        Json::Array(_) => Err(bad("arrays are not a SQLite type")),
    }
}

fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A request that ran to its end.
#[derive(Clone, Debug, PartialEq)]
pub struct Executed {
    /// The `results` array of the answer.
    pub results: Json,
    /// Whether anything may have changed (any statement that is not
    /// read-only): only then does the batch need a commit and an upload.
    pub wrote: bool,
}

/// Why [`execute`] did not run a request to its end.
#[derive(Debug)]
pub enum ExecError {
    /// The request's own error; its savepoint was rolled back, the rest of
    /// the batch's transaction stands.
    Refused(SqlError),
    /// The request's error made SQLite roll back the whole transaction (an
    /// interrupted write, a full database): the batch must be applied again
    /// without this request.
    TransactionLost(SqlError),
    /// The connection itself failed: the batch fails.
    Db(rusqlite::Error),
}

/// What a request's statements run with besides the connection.
pub struct Context<'a> {
    pub guard: &'a Guard,
    /// Interrupts the connection from the watchdog's thread.
    pub interrupt: &'a Arc<InterruptHandle>,
    pub limits: &'a SqlLimits,
}

/// Runs `request` in a savepoint of the open transaction on `conn`:
/// released when every statement succeeded (rolled back for `read_only`),
/// rolled back on any error. The statements run under the request's
/// deadline, enforced by the guard's progress handler and by the watchdog.
pub fn execute(
    conn: &Connection,
    ctx: &Context<'_>,
    request: &SqlRequest,
) -> Result<Executed, ExecError> {
    let limits = ctx.limits;
    conn.execute_batch("SAVEPOINT tenantd_request")
        .map_err(ExecError::Db)?;
    let (outcome, cause) = {
        let _user = ctx.guard.enter(limits.timeout);
        let armed = watchdog::global().arm(ctx.interrupt, limits.timeout);
        let outcome = run_statements(conn, ctx.guard, request, limits);
        (outcome, armed.fired())
    };
    let outcome = outcome.map_err(|e| e.describe(limits, cause));
    if conn.is_autocommit() {
        // SQLite ended the transaction itself (see ExecError).
        return Err(match outcome {
            Err(e) => ExecError::TransactionLost(e),
            Ok(_) => ExecError::Db(rusqlite::Error::ExecuteReturnedResults),
        });
    }
    let keep = matches!(&outcome, Ok(executed) if !request.read_only && executed.wrote);
    let end = if keep {
        "RELEASE tenantd_request"
    } else {
        "ROLLBACK TO tenantd_request; RELEASE tenantd_request"
    };
    conn.execute_batch(end).map_err(ExecError::Db)?;
    outcome.map_err(ExecError::Refused)
}

/// A statement's failure before it is put into words.
enum Failure {
    Sqlite(usize, rusqlite::Error, Option<String>),
    Other(SqlError),
}

impl Failure {
    fn describe(self, limits: &SqlLimits, cause: Option<Cause>) -> SqlError {
        let (index, error, denied) = match self {
            Failure::Other(e) => return e,
            Failure::Sqlite(index, error, denied) => (index, error, denied),
        };
        let at = Some(index);
        if let Some(rule) = denied {
            return SqlError::new(
                SqlErrorKind::Denied,
                at,
                format!("statement {index} is not allowed: {rule}"),
            );
        }
        let what = format!("statement {index}");
        limit_error(&error, at, &what, limits, cause)
            .unwrap_or_else(|| SqlError::invalid(at, format!("{what}: {error}")))
            .with_sqlite_code(&error)
    }
}

/// The request's error for a SQLite error that a limit caused (time,
/// memory, size, shutdown); `None` for any other error.
pub fn limit_error(
    error: &rusqlite::Error,
    at: Option<usize>,
    what: &str,
    limits: &SqlLimits,
    cause: Option<Cause>,
) -> Option<SqlError> {
    let limit = |message: String| Some(SqlError::new(SqlErrorKind::Limit, at, message));
    match error.sqlite_error_code()? {
        ErrorCode::OperationInterrupted if cause == Some(Cause::Shutdown) => Some(SqlError::new(
            SqlErrorKind::Unavailable,
            at,
            format!(
                "{what} was interrupted: this machine is shutting down; nothing of the request was applied, send it again"
            ),
        )),
        ErrorCode::OperationInterrupted => limit(format!(
            "{what} ran past the time limit of {} (--sql-timeout) and was interrupted; nothing of the request was applied",
            humantime::format_duration(limits.timeout)
        )),
        ErrorCode::DiskFull => limit(format!(
            "{what} would grow the database past its limit of {} bytes (--max-db-bytes); nothing of the request was applied",
            limits.max_db_bytes
        )),
        ErrorCode::OutOfMemory => limit(format!(
            "{what} ran out of memory: SQLite may use {} bytes on this machine (--sqlite-heap-limit), all tenants together; nothing of the request was applied",
            memory::current_limit()
        )),
        // A statement's own limit names its flag; what no statement made
        // (an answer stored for its key) says what it was.
        ErrorCode::TooBig => at
            .and_then(|index| limits::refusal(index, error))
            .or_else(|| {
                limit(format!(
                    "{what}: a string or blob is larger than allowed ({error}); nothing of the request was applied"
                ))
            }),
        _ => at.and_then(|index| limits::refusal(index, error)),
    }
}

fn run_statements(
    conn: &Connection,
    guard: &Guard,
    request: &SqlRequest,
    limits: &SqlLimits,
) -> Result<Executed, Failure> {
    let mut results = Vec::with_capacity(request.statements.len());
    let mut wrote = false;
    let mut budget = Budget {
        rows: limits.max_rows,
        bytes: limits.max_result_bytes,
        max_rows: limits.max_rows,
        max_bytes: limits.max_result_bytes,
    };
    budget.charge(None, answer::ENVELOPE)?;
    for (index, statement) in request.statements.iter().enumerate() {
        let sqlite = |e: rusqlite::Error| Failure::Sqlite(index, e, guard.take_denial());
        if let Some(rule) = guard::denied_by_keyword(&statement.sql) {
            return Err(Failure::Other(SqlError::new(
                SqlErrorKind::Denied,
                Some(index),
                format!("statement {index} is not allowed: {rule}"),
            )));
        }
        if statement.sql.contains('\0') {
            return Err(Failure::Other(SqlError::invalid(
                Some(index),
                format!(
                    "statement {index} contains a NUL character; SQLite would ignore everything after it"
                ),
            )));
        }
        let mut stmt = match Cursor::prepare(conn, &statement.sql) {
            Ok(stmt) => stmt,
            Err(PrepareError::Sqlite(e)) => return Err(sqlite(e)),
            Err(PrepareError::Empty) => {
                return Err(Failure::Other(SqlError::invalid(
                    Some(index),
                    format!("statement {index} has only comments"),
                )));
            }
            Err(PrepareError::Multiple) => {
                return Err(Failure::Other(SqlError::invalid(
                    Some(index),
                    format!(
                        "statement {index}: Multiple statements provided; send each as its own entry of \"statements\""
                    ),
                )));
            }
        };
        if request.read_only && !stmt.readonly() {
            return Err(Failure::Other(SqlError::invalid(
                Some(index),
                format!(
                    "statement {index} writes to the database, but the request is read_only; send it with \"read_only\": false"
                ),
            )));
        }
        bind(&mut stmt, index, &statement.params).map_err(Failure::Other)?;
        budget.charge(Some(index), answer::STATEMENT)?;
        let mut columns = Vec::with_capacity(stmt.column_count());
        for i in 0..stmt.column_count() {
            let name = stmt.column_name(i).ok_or_else(|| {
                sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOMEM),
                    None,
                ))
            })?;
            budget.charge(Some(index), answer::text_len(name) + 1)?;
            columns.push(Json::String(String::from_utf8_lossy(name).into_owned()));
        }
        let total_before = conn.total_changes();
        let rowid_before = conn.last_insert_rowid();
        let mut rows = Vec::new();
        while stmt.step().map_err(sqlite)? {
            if budget.rows == 0 {
                return Err(Failure::Other(SqlError::new(
                    SqlErrorKind::Limit,
                    Some(index),
                    format!(
                        "statement {index}: the result has more than {} rows (--sql-max-rows, all statements of a request together); add a LIMIT or select fewer rows",
                        budget.max_rows
                    ),
                )));
            }
            budget.rows -= 1;
            budget.charge(Some(index), answer::ROW)?;
            let mut values = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                let column = stmt.column(i);
                // Text is measured exactly once it is read; it cannot be
                // shorter than its bytes and quotes, so a value over the
                // budget is refused before SQLite materialises it.
                budget.check(Some(index), answer::least_len(column))?;
                let value = stmt.value(i, column).map_err(sqlite)?;
                let (json, len) = answer::to_json(value);
                budget.charge(Some(index), len + 1)?;
                values.push(json);
            }
            rows.push(Json::Array(values));
        }
        let changed = conn.total_changes() != total_before;
        let statement_writes = !stmt.readonly();
        wrote |= statement_writes;
        let rows_affected = if changed { conn.changes() } else { 0 };
        let inserted = changed
            && (conn.last_insert_rowid() != rowid_before
                || guard::first_keyword(&statement.sql).is_some_and(|k| {
                    k.eq_ignore_ascii_case("insert") || k.eq_ignore_ascii_case("replace")
                }));
        let mut result = Map::new();
        result.insert("columns".into(), Json::Array(columns));
        result.insert("rows".into(), Json::Array(rows));
        result.insert("rows_affected".into(), Json::from(rows_affected));
        result.insert(
            "last_insert_rowid".into(),
            if inserted {
                Json::from(conn.last_insert_rowid())
            } else {
                Json::Null
            },
        );
        results.push(Json::Object(result));
    }
    Ok(Executed {
        results: Json::Array(results),
        wrote,
    })
}

/// What is left of a request's answer: rows, and bytes as encoded in the
/// JSON answer.
struct Budget {
    rows: usize,
    bytes: usize,
    max_rows: usize,
    max_bytes: usize,
}

impl Budget {
    /// Fails when `len` more bytes do not fit.
    fn check(&self, index: Option<usize>, len: usize) -> Result<(), Failure> {
        if len <= self.bytes {
            return Ok(());
        }
        let what = index.map_or("the request".to_string(), |i| format!("statement {i}"));
        Err(Failure::Other(SqlError::new(
            SqlErrorKind::TooLarge,
            index,
            format!(
                "{what}: the answer would be larger than {} bytes (--sql-max-answer-bytes; counted as sent: JSON with column names, escapes and base64); add a LIMIT or select fewer or shorter values",
                self.max_bytes
            ),
        )))
    }

    fn charge(&mut self, index: Option<usize>, len: usize) -> Result<(), Failure> {
        self.check(index, len)?;
        self.bytes -= len;
        Ok(())
    }
}

fn bind(stmt: &mut Cursor<'_>, index: usize, params: &Params) -> Result<(), SqlError> {
    let expected = stmt.parameter_count();
    let given = match params {
        Params::Positional(values) => {
            for (i, value) in values.iter().enumerate() {
                if i >= expected {
                    break;
                }
                stmt.bind(i + 1, value).map_err(|e| bind_error(index, &e))?;
            }
            values.len()
        }
        Params::Named(values) => {
            let mut seen = BTreeMap::new();
            for (name, value) in values {
                // Hrana clients may name a parameter without its prefix
                // (`{"a": 1}` for `:a`); /sql requires it, so this finds
                // nothing more there.
                let position = stmt
                    .parameter_index(name)
                    .or_else(|| {
                        [":", "@", "$"]
                            .iter()
                            .find_map(|p| stmt.parameter_index(&format!("{p}{name}")))
                    })
                    .ok_or_else(|| {
                        SqlError::invalid(
                            Some(index),
                            format!("statement {index} has no parameter named {name}"),
                        )
                    })?;
                stmt.bind(position, value)
                    .map_err(|e| bind_error(index, &e))?;
                seen.insert(position, ());
            }
            seen.len()
        }
    };
    if given != expected {
        return Err(SqlError::invalid(
            Some(index),
            format!("statement {index} takes {expected} parameter(s), {given} given"),
        ));
    }
    Ok(())
}

fn bind_error(index: usize, e: &rusqlite::Error) -> SqlError {
    limits::refusal(index, e)
        .unwrap_or_else(|| SqlError::invalid(Some(index), format!("statement {index}: {e}")))
}

#[cfg(test)]
mod tests;
