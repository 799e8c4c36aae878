//! The SQL API over a tenant's database: the request as the client sent it,
//! checked before it reaches the tenant's actor, and its execution inside
//! the actor's batch transaction.
//!
//! A request runs in a savepoint of the batch's transaction, so a failing
//! request leaves nothing behind while the batch's other requests commit
//! (and share one upload). What a request may do is decided by SQLite's
//! authorizer ([`guard`]) as each statement is prepared, and how long it
//! may run by the progress handler, both installed once per connection.

pub mod body;
pub mod guard;
pub mod limits;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode};
use serde::Deserialize;
use serde_json::{Map, Number, Value as Json};

pub use guard::Guard;

/// Bounds on what one request may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlLimits {
    /// Statements in one request.
    pub max_statements: usize,
    /// Rows returned by one request, all statements together.
    pub max_rows: usize,
    /// Approximate bytes of the returned values, all statements together.
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlErrorKind {
    /// Malformed request, wrong parameters, SQL errors.
    Invalid,
    /// A rule of the authorizer refused a statement (403).
    Denied,
    /// A limit was reached: rows, bytes, time, database size.
    Limit,
    /// An idempotency key already names another request (422).
    KeyReused,
}

impl SqlErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SqlErrorKind::Invalid => "invalid",
            SqlErrorKind::Denied => "denied",
            SqlErrorKind::Limit => "limit",
            SqlErrorKind::KeyReused => "idempotency_key_reused",
        }
    }
}

impl SqlError {
    fn new(kind: SqlErrorKind, statement: Option<usize>, message: impl Into<String>) -> SqlError {
        SqlError {
            kind,
            message: message.into(),
            statement,
        }
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

/// Runs `request` in a savepoint of the open transaction on `conn`:
/// released when every statement succeeded (rolled back for `read_only`),
/// rolled back on any error.
pub fn execute(
    conn: &Connection,
    guard: &Guard,
    request: &SqlRequest,
    limits: &SqlLimits,
) -> Result<Executed, ExecError> {
    conn.execute_batch("SAVEPOINT tenantd_request")
        .map_err(ExecError::Db)?;
    let page_size: u64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .map_err(ExecError::Db)?
        .max(512) as u64;
    let max_pages = (limits.max_db_bytes / page_size).max(1);
    set_max_page_count(conn, max_pages).map_err(ExecError::Db)?;
    let outcome = {
        let _user = guard.enter(limits.timeout);
        run_statements(conn, guard, request, limits)
    };
    set_max_page_count(conn, u32::MAX as u64 - 1).map_err(ExecError::Db)?;
    let outcome = outcome.map_err(|e| e.describe(limits, max_pages * page_size));
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

fn set_max_page_count(conn: &Connection, pages: u64) -> rusqlite::Result<()> {
    conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
}

/// A statement's failure before it is put into words.
enum Failure {
    Sqlite(usize, rusqlite::Error, Option<String>),
    Other(SqlError),
}

impl Failure {
    fn describe(self, limits: &SqlLimits, max_bytes: u64) -> SqlError {
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
        match error.sqlite_error_code() {
            Some(ErrorCode::OperationInterrupted) => SqlError::new(
                SqlErrorKind::Limit,
                at,
                format!(
                    "statement {index} ran past the time limit of {} (--sql-timeout) and was interrupted; nothing of the request was applied",
                    humantime::format_duration(limits.timeout)
                ),
            ),
            Some(ErrorCode::DiskFull) => SqlError::new(
                SqlErrorKind::Limit,
                at,
                format!(
                    "statement {index} would grow the database past its limit of {max_bytes} bytes (--max-db-bytes); nothing of the request was applied"
                ),
            ),
            _ => limits::refusal(index, &error)
                .unwrap_or_else(|| SqlError::invalid(at, format!("statement {index}: {error}"))),
        }
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
    };
    for (index, statement) in request.statements.iter().enumerate() {
        let sqlite = |e: rusqlite::Error| Failure::Sqlite(index, e, guard.take_denial());
        if let Some(rule) = guard::denied_by_keyword(&statement.sql) {
            return Err(Failure::Other(SqlError::new(
                SqlErrorKind::Denied,
                Some(index),
                format!("statement {index} is not allowed: {rule}"),
            )));
        }
        let mut stmt = conn.prepare(&statement.sql).map_err(sqlite)?;
        if request.read_only && !stmt.readonly() {
            return Err(Failure::Other(SqlError::invalid(
                Some(index),
                format!(
                    "statement {index} writes to the database, but the request is read_only; send it with \"read_only\": false"
                ),
            )));
        }
        bind(&mut stmt, index, &statement.params).map_err(Failure::Other)?;
        let columns: Vec<String> = stmt.column_names().map(String::from).collect();
        let total_before = conn.total_changes();
        let rowid_before = conn.last_insert_rowid();
        let mut rows = Vec::new();
        {
            let mut cursor = stmt.raw_query();
            while let Some(row) = cursor.next().map_err(sqlite)? {
                let mut values = Vec::with_capacity(columns.len());
                for i in 0..columns.len() {
                    let value = row.get_ref(i).map_err(sqlite)?;
                    values.push(to_json(value, &mut budget.bytes));
                }
                if budget.rows == 0 || budget.bytes == 0 {
                    return Err(Failure::Other(SqlError::new(
                        SqlErrorKind::Limit,
                        Some(index),
                        format!(
                            "statement {index}: the result is larger than allowed ({} rows or {} bytes per request); add a LIMIT or select fewer columns",
                            limits.max_rows, limits.max_result_bytes
                        ),
                    )));
                }
                budget.rows -= 1;
                rows.push(Json::Array(values));
            }
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
        result.insert("columns".into(), Json::from(columns));
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

struct Budget {
    rows: usize,
    bytes: usize,
}

fn bind(stmt: &mut rusqlite::Statement<'_>, index: usize, params: &Params) -> Result<(), SqlError> {
    let expected = stmt.parameter_count();
    let given = match params {
        Params::Positional(values) => {
            for (i, value) in values.iter().enumerate() {
                if i >= expected {
                    break;
                }
                stmt.raw_bind_parameter(i + 1, value)
                    .map_err(|e| bind_error(index, &e))?;
            }
            values.len()
        }
        Params::Named(values) => {
            let mut seen = BTreeMap::new();
            for (name, value) in values {
                let position = stmt.parameter_index(name).ok().flatten().ok_or_else(|| {
                    SqlError::invalid(
                        Some(index),
                        format!("statement {index} has no parameter named {name}"),
                    )
                })?;
                stmt.raw_bind_parameter(position, value)
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

/// A column value as JSON; blobs as `{"base64": ...}`. Charges its
/// approximate size to `bytes` (saturating at zero).
fn to_json(value: ValueRef<'_>, bytes: &mut usize) -> Json {
    let (json, size) = match value {
        ValueRef::Null => (Json::Null, 4),
        ValueRef::Integer(i) => (Json::from(i), 20),
        // JSON has no NaN or infinity; SQLite has no NaN, and an infinite
        // REAL is rare enough to answer as null.
        ValueRef::Real(f) => (Number::from_f64(f).map_or(Json::Null, Json::Number), 24),
        ValueRef::Text(t) => {
            let text = String::from_utf8_lossy(t).into_owned();
            let len = text.len() + 2;
            (Json::String(text), len)
        }
        ValueRef::Blob(b) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(b);
            let len = encoded.len() + 12;
            let mut map = Map::new();
            map.insert("base64".into(), Json::String(encoded));
            (Json::Object(map), len)
        }
    };
    *bytes = bytes.saturating_sub(size);
    json
}

#[cfg(test)]
mod tests;
