//! SQLite's own limits (`sqlite3_limit`) and hardening switches
//! (`sqlite3_db_config`) on every tenant connection.
//!
//! The limits bound what one statement can make SQLite build inside a
//! single step of its virtual machine, where neither the progress handler
//! nor the answer budget can see it: a `printf('%.*c', 999999999, 'x')` is
//! refused before it allocates, not after. They hold for tenantd's own
//! statements too (a trigger fired by an increment is the tenant's code);
//! the one exception is tenantd's stored idempotent answers, which may be
//! larger than any value a request may make ([`with_internal_length`]).
//!
//! The values are the process's: set once from the command line
//! ([`configure`]) and read by every connection as it opens, like the
//! rest of SQLite's configuration.

use std::ffi::c_int;
use std::sync::RwLock;

use rusqlite::{Connection, ErrorCode, ffi};

use super::{SqlError, SqlErrorKind};

/// Not in the bindings of the bundled SQLite (3.54), which has them.
const SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE: c_int = 1020;
const SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE: c_int = 1021;

/// The largest value SQLite can hold (its compile-time `SQLITE_MAX_LENGTH`).
const SQLITE_MAX_LENGTH: c_int = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqliteLimits {
    /// Longest string or blob, and longest row (`SQLITE_LIMIT_LENGTH`).
    pub value_bytes: i32,
    /// Longest statement text (`SQLITE_LIMIT_SQL_LENGTH`).
    pub sql_bytes: i32,
    /// Columns of a table, an index, a result, an ORDER or GROUP BY.
    pub columns: i32,
    /// Depth of an expression tree, and of nested subqueries.
    pub expr_depth: i32,
    /// Terms of a compound SELECT (UNION, EXCEPT, ...).
    pub compound_select: i32,
    /// Arguments of one function call.
    pub function_args: i32,
    /// Triggers fired from triggers, nested.
    pub trigger_depth: i32,
    /// Highest parameter number (`?NNN`), so most parameters of a statement.
    pub variables: i32,
    /// Longest LIKE or GLOB pattern.
    pub like_pattern_bytes: i32,
}

impl SqliteLimits {
    /// Cloudflare D1's published limits where it has one (value, statement,
    /// columns, function arguments, parameters, LIKE pattern); SQLite's
    /// own defaults or a bound on work elsewhere.
    pub const DEFAULT: SqliteLimits = SqliteLimits {
        value_bytes: 2_000_000,
        sql_bytes: 100_000,
        columns: 100,
        expr_depth: 1000,
        compound_select: 500,
        function_args: 32,
        trigger_depth: 100,
        variables: 100,
        like_pattern_bytes: 50,
    };
}

impl Default for SqliteLimits {
    fn default() -> Self {
        SqliteLimits::DEFAULT
    }
}

/// One limit: SQLite's id and name, the flag that sets it, and the words
/// of the errors SQLite gives when a statement goes over it.
struct Limit {
    id: c_int,
    name: &'static str,
    flag: &'static str,
    unit: &'static str,
    field: fn(&mut SqliteLimits) -> &mut i32,
    errors: &'static [&'static str],
}

const LIMITS: &[Limit] = &[
    Limit {
        id: ffi::SQLITE_LIMIT_LENGTH,
        name: "SQLITE_LIMIT_LENGTH",
        flag: "--sql-max-value-bytes",
        unit: "bytes per value or row",
        field: |l| &mut l.value_bytes,
        errors: &["string or blob too big"],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_SQL_LENGTH,
        name: "SQLITE_LIMIT_SQL_LENGTH",
        flag: "--sql-max-sql-bytes",
        unit: "bytes of statement text",
        field: |l| &mut l.sql_bytes,
        errors: &["statement too long"],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_COLUMN,
        name: "SQLITE_LIMIT_COLUMN",
        flag: "--sql-max-columns",
        unit: "columns",
        field: |l| &mut l.columns,
        errors: &[
            "too many columns",
            "too many terms in ORDER BY",
            "too many terms in GROUP BY",
        ],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_EXPR_DEPTH,
        name: "SQLITE_LIMIT_EXPR_DEPTH",
        flag: "--sql-max-expr-depth",
        unit: "levels of expression or subquery",
        field: |l| &mut l.expr_depth,
        errors: &[
            "Expression tree is too large",
            "subqueries nested too deep",
            "Nested too deep",
        ],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_COMPOUND_SELECT,
        name: "SQLITE_LIMIT_COMPOUND_SELECT",
        flag: "--sql-max-compound-select",
        unit: "terms of a compound SELECT",
        field: |l| &mut l.compound_select,
        errors: &["too many terms in compound SELECT"],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_FUNCTION_ARG,
        name: "SQLITE_LIMIT_FUNCTION_ARG",
        flag: "--sql-max-function-args",
        unit: "arguments of a function",
        field: |l| &mut l.function_args,
        errors: &["too many arguments on function"],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_TRIGGER_DEPTH,
        name: "SQLITE_LIMIT_TRIGGER_DEPTH",
        flag: "--sql-max-trigger-depth",
        unit: "levels of nested triggers",
        field: |l| &mut l.trigger_depth,
        errors: &[
            "too many levels of trigger recursion",
            "triggers nested too deep",
        ],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_VARIABLE_NUMBER,
        name: "SQLITE_LIMIT_VARIABLE_NUMBER",
        flag: "--sql-max-variables",
        unit: "parameters",
        field: |l| &mut l.variables,
        errors: &["variable number must be between", "too many SQL variables"],
    },
    Limit {
        id: ffi::SQLITE_LIMIT_LIKE_PATTERN_LENGTH,
        name: "SQLITE_LIMIT_LIKE_PATTERN_LENGTH",
        flag: "--sql-max-like-pattern-bytes",
        unit: "bytes of LIKE or GLOB pattern",
        field: |l| &mut l.like_pattern_bytes,
        errors: &["LIKE or GLOB pattern too complex"],
    },
];

static CONFIGURED: RwLock<SqliteLimits> = RwLock::new(SqliteLimits::DEFAULT);

/// Sets the limits of every connection opened from now on, and returns
/// them as SQLite will enforce them: it lowers a value above its
/// compile-time maximum silently, so the answer's messages quote these.
pub fn configure(requested: SqliteLimits) -> rusqlite::Result<SqliteLimits> {
    let conn = Connection::open_in_memory()?;
    let mut effective = requested;
    for limit in LIMITS {
        *(limit.field)(&mut effective) = set(&conn, limit.id, limit.of(requested));
    }
    *CONFIGURED.write().unwrap_or_else(|e| e.into_inner()) = effective;
    Ok(effective)
}

/// The limits [`configure`] set (D1's until then).
pub fn configured() -> SqliteLimits {
    *CONFIGURED.read().unwrap_or_else(|e| e.into_inner())
}

impl Limit {
    fn of(&self, mut limits: SqliteLimits) -> i32 {
        *(self.field)(&mut limits)
    }
}

/// Sets a limit and returns the value SQLite took.
fn set(conn: &Connection, id: c_int, value: i32) -> i32 {
    // SAFETY: the handle is valid while `conn` lives; sqlite3_limit only
    // writes the connection's limit array.
    unsafe {
        ffi::sqlite3_limit(conn.handle(), id, value);
        ffi::sqlite3_limit(conn.handle(), id, -1)
    }
}

/// Applies `limits` to `conn`, no database attachable at all, and SQLite's
/// hardening switches: defensive mode (shadow tables of virtual tables
/// read-only to SQL, no writable schema), ATTACH unable to create or write
/// files, no extension loading, no FTS3 tokenizer registration.
pub fn harden(conn: &Connection, limits: &SqliteLimits) -> rusqlite::Result<()> {
    for limit in LIMITS {
        set(conn, limit.id, limit.of(*limits));
    }
    set(conn, ffi::SQLITE_LIMIT_ATTACHED, 0);
    let switches = [
        (ffi::SQLITE_DBCONFIG_DEFENSIVE, 1),
        (SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, 0),
        (SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, 0),
        (ffi::SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0),
        (ffi::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0),
    ];
    for (op, on) in switches {
        let mut now: c_int = -1;
        // SAFETY: these options take (int, int*), and `now` outlives the call.
        let rc = unsafe {
            ffi::sqlite3_db_config(conn.handle(), op, on as c_int, &mut now as *mut c_int)
        };
        if rc != ffi::SQLITE_OK || now != on {
            return Err(rusqlite::Error::SqliteFailure(
                ffi::Error::new(if rc == ffi::SQLITE_OK {
                    ffi::SQLITE_ERROR
                } else {
                    rc
                }),
                Some(format!("sqlite3_db_config({op}, {on}) did not take")),
            ));
        }
    }
    Ok(())
}

/// Runs `f` with the value limit at SQLite's maximum: for tenantd's own
/// statements on its own tables, which no tenant code (trigger, view) can
/// reach, and whose rows (stored answers) may exceed a request's values.
pub fn with_internal_length<T>(conn: &Connection, f: impl FnOnce() -> T) -> T {
    // SAFETY: as in `set`.
    let before = unsafe { ffi::sqlite3_limit(conn.handle(), ffi::SQLITE_LIMIT_LENGTH, -1) };
    set(conn, ffi::SQLITE_LIMIT_LENGTH, SQLITE_MAX_LENGTH);
    let out = f();
    set(conn, ffi::SQLITE_LIMIT_LENGTH, before);
    out
}

/// The request's error when `error` is SQLite refusing statement `index`
/// for one of the limits.
pub fn refusal(index: usize, error: &rusqlite::Error) -> Option<SqlError> {
    let text = error.to_string();
    let toobig = error.sqlite_error_code() == Some(ErrorCode::TooBig);
    let limit = LIMITS
        .iter()
        .find(|l| l.errors.iter().any(|e| text.contains(e)))
        .or_else(|| toobig.then_some(&LIMITS[0]))?;
    let value = limit.of(configured());
    let env = limit
        .flag
        .trim_start_matches('-')
        .replace('-', "_")
        .to_uppercase();
    Some(SqlError {
        kind: SqlErrorKind::Limit,
        statement: Some(index),
        sqlite_code: error.sqlite_error().map(|e| e.extended_code),
        message: format!(
            "statement {index}: {text}: over the limit of {value} {} ({}; {} / TENANTD_{env}); nothing of the request was applied",
            limit.unit, limit.name, limit.flag
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(conn: &Connection, id: c_int) -> i32 {
        unsafe { ffi::sqlite3_limit(conn.handle(), id, -1) }
    }

    #[test]
    fn every_limit_is_set_and_nothing_can_be_attached() {
        let conn = Connection::open_in_memory().unwrap();
        let limits = SqliteLimits {
            value_bytes: 1234,
            columns: 7,
            ..SqliteLimits::DEFAULT
        };
        harden(&conn, &limits).unwrap();
        assert_eq!(get(&conn, ffi::SQLITE_LIMIT_LENGTH), 1234);
        assert_eq!(get(&conn, ffi::SQLITE_LIMIT_COLUMN), 7);
        assert_eq!(get(&conn, ffi::SQLITE_LIMIT_VARIABLE_NUMBER), 100);
        assert_eq!(get(&conn, ffi::SQLITE_LIMIT_ATTACHED), 0);
        let value = with_internal_length(&conn, || get(&conn, ffi::SQLITE_LIMIT_LENGTH));
        assert_eq!(value, SQLITE_MAX_LENGTH);
        assert_eq!(get(&conn, ffi::SQLITE_LIMIT_LENGTH), 1234, "restored");
    }

    #[test]
    fn every_limit_has_a_flag_and_its_errors_are_recognised() {
        let conn = Connection::open_in_memory().unwrap();
        harden(&conn, &SqliteLimits::DEFAULT).unwrap();
        let error = conn
            .query_row("SELECT zeroblob(2000001)", [], |_| Ok(()))
            .unwrap_err();
        let refused = refusal(3, &error).expect("a limit");
        assert_eq!(refused.kind, SqlErrorKind::Limit);
        assert!(refused.message.contains("SQLITE_LIMIT_LENGTH"), "{refused}");
        assert!(
            refused.message.contains("TENANTD_SQL_MAX_VALUE_BYTES"),
            "{refused}"
        );
        let error = conn.prepare("SELECT nosuchcolumn").unwrap_err();
        assert!(refusal(0, &error).is_none());
    }
}
