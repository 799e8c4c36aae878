//! A request's statement on the raw SQLite API.
//!
//! rusqlite reads a column by asking SQLite for the value first and its
//! size second: a `zeroblob(999999999)` is then expanded into a gigabyte
//! before anyone can look at its size (and a failed expansion is a panic).
//! Here a value's size is known (`sqlite3_column_bytes`, which does not
//! expand a zero-blob) before it is materialised, so the answer's budget
//! refuses it first.

use std::ffi::{CStr, c_char, c_int};
use std::ptr;

use rusqlite::Connection;
use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};

pub struct Cursor<'c> {
    conn: &'c Connection,
    stmt: *mut ffi::sqlite3_stmt,
}

/// A column's type and its size in bytes (text and blobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Null,
    Integer,
    Real,
    Text(usize),
    Blob(usize),
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        // SAFETY: `stmt` came from sqlite3_prepare_v3 on this connection and
        // is finalized once.
        unsafe {
            ffi::sqlite3_finalize(self.stmt);
        }
    }
}

/// Why a statement could not be prepared.
pub enum PrepareError {
    Sqlite(rusqlite::Error),
    /// Only whitespace and comments.
    Empty,
    /// More than one statement in the text.
    Multiple,
}

impl<'c> Cursor<'c> {
    pub fn prepare(conn: &'c Connection, sql: &str) -> Result<Cursor<'c>, PrepareError> {
        let len = c_int::try_from(sql.len())
            .map_err(|_| PrepareError::Sqlite(sqlite_error(ffi::SQLITE_TOOBIG, None)))?;
        let mut stmt = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        // SAFETY: the handle is valid while `conn` lives; `sql` outlives the
        // call and its length is passed, so no terminator is needed.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                conn.handle(),
                sql.as_ptr().cast(),
                len,
                0,
                &mut stmt,
                &mut tail,
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(PrepareError::Sqlite(last_error(conn, rc)));
        }
        if stmt.is_null() {
            return Err(PrepareError::Empty);
        }
        let cursor = Cursor { conn, stmt };
        let used = if tail.is_null() {
            sql.len()
        } else {
            (tail as usize).saturating_sub(sql.as_ptr() as usize)
        };
        if !only_comments(sql.as_bytes().get(used..).unwrap_or_default()) {
            return Err(PrepareError::Multiple);
        }
        Ok(cursor)
    }

    /// The name of parameter `i` (1-based) as written, prefix included;
    /// `None` for a nameless `?`.
    pub fn parameter_name(&self, i: usize) -> Option<String> {
        // SAFETY: a live statement; the name is copied at once.
        unsafe {
            let name = ffi::sqlite3_bind_parameter_name(self.stmt, i as c_int);
            (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
        }
    }

    /// The declared type of result column `i`, when it is a table column.
    pub fn column_decltype(&self, i: usize) -> Option<String> {
        // SAFETY: a live statement; the type is copied at once.
        unsafe {
            let decltype = ffi::sqlite3_column_decltype(self.stmt, i as c_int);
            (!decltype.is_null()).then(|| CStr::from_ptr(decltype).to_string_lossy().into_owned())
        }
    }

    pub fn is_explain(&self) -> bool {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_stmt_isexplain(self.stmt) != 0 }
    }

    pub fn readonly(&self) -> bool {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_stmt_readonly(self.stmt) != 0 }
    }

    pub fn parameter_count(&self) -> usize {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_bind_parameter_count(self.stmt).max(0) as usize }
    }

    /// The 1-based position of a named parameter.
    pub fn parameter_index(&self, name: &str) -> Option<usize> {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: a live statement and a NUL-terminated name.
        let i = unsafe { ffi::sqlite3_bind_parameter_index(self.stmt, name.as_ptr()) };
        (i > 0).then_some(i as usize)
    }

    pub fn bind(&mut self, position: usize, value: &Value) -> rusqlite::Result<()> {
        let i = position as c_int;
        // SAFETY: a live statement; SQLITE_TRANSIENT makes SQLite copy text
        // and blobs before the call returns.
        let rc = unsafe {
            match value {
                Value::Null => ffi::sqlite3_bind_null(self.stmt, i),
                Value::Integer(n) => ffi::sqlite3_bind_int64(self.stmt, i, *n),
                Value::Real(f) => ffi::sqlite3_bind_double(self.stmt, i, *f),
                Value::Text(t) => ffi::sqlite3_bind_text64(
                    self.stmt,
                    i,
                    t.as_ptr().cast(),
                    t.len() as u64,
                    ffi::SQLITE_TRANSIENT(),
                    ffi::SQLITE_UTF8 as u8,
                ),
                Value::Blob(b) => ffi::sqlite3_bind_blob64(
                    self.stmt,
                    i,
                    b.as_ptr().cast(),
                    b.len() as u64,
                    ffi::SQLITE_TRANSIENT(),
                ),
            }
        };
        match rc {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(last_error(self.conn, rc)),
        }
    }

    pub fn column_count(&self) -> usize {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_column_count(self.stmt).max(0) as usize }
    }

    /// A column's name as SQLite gives it (bytes: names need not be
    /// UTF-8); `None` when SQLite could not allocate it.
    pub fn column_name(&self, i: usize) -> Option<&[u8]> {
        // SAFETY: a live statement; the name stays valid until the
        // statement is finalized or re-prepared, which needs `&mut self`.
        unsafe {
            let name = ffi::sqlite3_column_name(self.stmt, i as c_int);
            (!name.is_null()).then(|| CStr::from_ptr(name).to_bytes())
        }
    }

    /// Runs to the next row: `true` when there is one.
    pub fn step(&mut self) -> rusqlite::Result<bool> {
        // SAFETY: a live statement.
        match unsafe { ffi::sqlite3_step(self.stmt) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            rc => Err(last_error(self.conn, rc)),
        }
    }

    /// The current row's column `i`: type and size, nothing copied.
    pub fn column(&self, i: usize) -> Column {
        let i = i as c_int;
        // SAFETY: a live statement on a row. sqlite3_column_bytes does not
        // expand a zero-blob and, for text, reports its UTF-8 length.
        unsafe {
            match ffi::sqlite3_column_type(self.stmt, i) {
                ffi::SQLITE_INTEGER => Column::Integer,
                ffi::SQLITE_FLOAT => Column::Real,
                ffi::SQLITE_TEXT => Column::Text(ffi::sqlite3_column_bytes(self.stmt, i) as usize),
                ffi::SQLITE_BLOB => Column::Blob(ffi::sqlite3_column_bytes(self.stmt, i) as usize),
                _ => Column::Null,
            }
        }
    }

    /// The current row's column `i`, after [`Cursor::column`] said what it
    /// is; an error when SQLite could not materialise it (out of memory).
    pub fn value(&self, i: usize, column: Column) -> rusqlite::Result<ValueRef<'_>> {
        let c = i as c_int;
        // SAFETY: a live statement on a row; the pointers stay valid until
        // the next step, which needs `&mut self`.
        unsafe {
            Ok(match column {
                Column::Null => ValueRef::Null,
                Column::Integer => ValueRef::Integer(ffi::sqlite3_column_int64(self.stmt, c)),
                Column::Real => ValueRef::Real(ffi::sqlite3_column_double(self.stmt, c)),
                Column::Text(_) => {
                    let p = ffi::sqlite3_column_text(self.stmt, c);
                    let n = ffi::sqlite3_column_bytes(self.stmt, c) as usize;
                    if p.is_null() {
                        return Err(nomem_or_empty(self.conn, ValueRef::Text(b"")));
                    }
                    ValueRef::Text(std::slice::from_raw_parts(p, n))
                }
                Column::Blob(size) => {
                    let p = ffi::sqlite3_column_blob(self.stmt, c);
                    if size == 0 {
                        return Ok(ValueRef::Blob(&[]));
                    }
                    if p.is_null() {
                        return Err(nomem_or_empty(self.conn, ValueRef::Blob(&[])));
                    }
                    ValueRef::Blob(std::slice::from_raw_parts(p.cast(), size))
                }
            })
        }
    }
}

fn nomem_or_empty(conn: &Connection, _empty: ValueRef<'_>) -> rusqlite::Error {
    // SAFETY: a valid handle.
    let rc = unsafe { ffi::sqlite3_errcode(conn.handle()) };
    let rc = if rc == ffi::SQLITE_OK || rc == ffi::SQLITE_ROW {
        ffi::SQLITE_NOMEM
    } else {
        rc
    };
    sqlite_error(rc, Some("out of memory while reading a value".into()))
}

fn last_error(conn: &Connection, rc: c_int) -> rusqlite::Error {
    // SAFETY: a valid handle; the message is copied before the next call.
    let (code, message) = unsafe {
        let db = conn.handle();
        let code = ffi::sqlite3_extended_errcode(db);
        let message = ffi::sqlite3_errmsg(db);
        let message =
            (!message.is_null()).then(|| CStr::from_ptr(message).to_string_lossy().into_owned());
        (if code == ffi::SQLITE_OK { rc } else { code }, message)
    };
    sqlite_error(code, message)
}

fn sqlite_error(code: c_int, message: Option<String>) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), message)
}

/// The length of the first statement of `sql` (its text up to where
/// SQLite stopped reading), or `None` when only comments are left. The
/// statement is prepared and dropped, never run: a later statement of a
/// sequence may name a table an earlier one creates.
pub fn first_statement_len(conn: &Connection, sql: &str) -> rusqlite::Result<Option<usize>> {
    if only_comments(sql.as_bytes()) {
        return Ok(None);
    }
    let len = c_int::try_from(sql.len()).map_err(|_| sqlite_error(ffi::SQLITE_TOOBIG, None))?;
    let mut stmt = ptr::null_mut();
    let mut tail: *const c_char = ptr::null();
    // SAFETY: as in Cursor::prepare; the statement is finalized at once.
    let rc = unsafe {
        let rc = ffi::sqlite3_prepare_v3(
            conn.handle(),
            sql.as_ptr().cast(),
            len,
            0,
            &mut stmt,
            &mut tail,
        );
        ffi::sqlite3_finalize(stmt);
        rc
    };
    if rc != ffi::SQLITE_OK {
        return Err(last_error(conn, rc));
    }
    let used = if tail.is_null() {
        sql.len()
    } else {
        (tail as usize).saturating_sub(sql.as_ptr() as usize)
    };
    Ok(Some(used.max(1)))
}

/// Whether `rest` holds nothing but whitespace, `;` and comments.
fn only_comments(mut rest: &[u8]) -> bool {
    loop {
        match rest {
            [] => return true,
            [c, tail @ ..] if c.is_ascii_whitespace() || *c == b';' => rest = tail,
            [b'-', b'-', tail @ ..] => {
                rest = match tail.iter().position(|&c| c == b'\n') {
                    Some(i) => &tail[i + 1..],
                    None => &[],
                }
            }
            [b'/', b'*', tail @ ..] => {
                rest = match tail.windows(2).position(|w| w == b"*/") {
                    Some(i) => &tail[i + 2..],
                    None => &[],
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_of_comments_are_one_statement() {
        assert!(only_comments(b"  ; -- done\n /* and */ ;"));
        assert!(!only_comments(b"; SELECT 2"));
        assert!(!only_comments(b"\0 SELECT 2"));
    }

    #[test]
    fn a_zeroblob_is_measured_without_being_expanded() {
        let conn = Connection::open_in_memory().unwrap();
        let mut c = match Cursor::prepare(&conn, "SELECT zeroblob(999999999), 'é'") {
            Ok(c) => c,
            Err(_) => panic!("prepares"),
        };
        assert!(c.step().unwrap());
        assert_eq!(c.column(0), Column::Blob(999_999_999));
        assert_eq!(c.column(1), Column::Text(2));
        assert_eq!(
            c.value(1, c.column(1)).unwrap(),
            ValueRef::Text("é".as_bytes())
        );
        assert!(!c.step().unwrap());
    }

    #[test]
    fn two_statements_and_comments_alone_are_told_apart() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(matches!(
            Cursor::prepare(&conn, "SELECT 1; SELECT 2"),
            Err(PrepareError::Multiple)
        ));
        assert!(matches!(
            Cursor::prepare(&conn, "-- nothing"),
            Err(PrepareError::Empty)
        ));
        assert!(matches!(
            Cursor::prepare(&conn, "SELECT 1\0; DROP TABLE x"),
            Err(PrepareError::Multiple)
        ));
    }
}
