//! SQLite's result codes by name, as Hrana errors carry them: the libSQL
//! clients raise their usual error types from these names.

use super::super::{SqlError, SqlErrorKind};

/// The name of a (primary or extended) SQLite result code.
pub fn name(code: i32) -> &'static str {
    match code {
        // Extended codes first: their low byte is the primary code.
        275 => "SQLITE_CONSTRAINT_CHECK",
        531 => "SQLITE_CONSTRAINT_COMMITHOOK",
        3091 => "SQLITE_CONSTRAINT_DATATYPE",
        787 => "SQLITE_CONSTRAINT_FOREIGNKEY",
        1043 => "SQLITE_CONSTRAINT_FUNCTION",
        1299 => "SQLITE_CONSTRAINT_NOTNULL",
        2835 => "SQLITE_CONSTRAINT_PINNED",
        1555 => "SQLITE_CONSTRAINT_PRIMARYKEY",
        2579 => "SQLITE_CONSTRAINT_ROWID",
        1811 => "SQLITE_CONSTRAINT_TRIGGER",
        2067 => "SQLITE_CONSTRAINT_UNIQUE",
        2323 => "SQLITE_CONSTRAINT_VTAB",
        257 => "SQLITE_ERROR_MISSING_COLLSEQ",
        513 => "SQLITE_ERROR_RETRY",
        769 => "SQLITE_ERROR_SNAPSHOT",
        264 => "SQLITE_READONLY_RECOVERY",
        520 => "SQLITE_READONLY_CANTLOCK",
        776 => "SQLITE_READONLY_ROLLBACK",
        1032 => "SQLITE_READONLY_DBMOVED",
        279 => "SQLITE_AUTH_USER",
        code => match code & 0xff {
            1 => "SQLITE_ERROR",
            2 => "SQLITE_INTERNAL",
            3 => "SQLITE_PERM",
            4 => "SQLITE_ABORT",
            5 => "SQLITE_BUSY",
            6 => "SQLITE_LOCKED",
            7 => "SQLITE_NOMEM",
            8 => "SQLITE_READONLY",
            9 => "SQLITE_INTERRUPT",
            10 => "SQLITE_IOERR",
            11 => "SQLITE_CORRUPT",
            12 => "SQLITE_NOTFOUND",
            13 => "SQLITE_FULL",
            14 => "SQLITE_CANTOPEN",
            15 => "SQLITE_PROTOCOL",
            16 => "SQLITE_EMPTY",
            17 => "SQLITE_SCHEMA",
            18 => "SQLITE_TOOBIG",
            19 => "SQLITE_CONSTRAINT",
            20 => "SQLITE_MISMATCH",
            21 => "SQLITE_MISUSE",
            22 => "SQLITE_NOLFS",
            23 => "SQLITE_AUTH",
            24 => "SQLITE_FORMAT",
            25 => "SQLITE_RANGE",
            26 => "SQLITE_NOTADB",
            _ => "SQLITE_UNKNOWN",
        },
    }
}

/// The code a refused request's error carries: SQLite's own when SQLite
/// refused it, otherwise the nearest SQLite code for tenantd's reason.
pub fn of(error: &SqlError) -> &'static str {
    if let Some(code) = error.sqlite_code {
        return name(code);
    }
    match error.kind {
        SqlErrorKind::Denied => "SQLITE_AUTH",
        SqlErrorKind::Limit | SqlErrorKind::TooLarge => "SQLITE_TOOBIG",
        SqlErrorKind::Unavailable => "SQLITE_BUSY",
        SqlErrorKind::Conflict => "SQLITE_CONSTRAINT",
        SqlErrorKind::Invalid | SqlErrorKind::KeyReused => "SQLITE_ERROR",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn extended_codes_are_named_and_unknown_ones_fall_back_to_their_primary() {
        assert_eq!(super::name(2067), "SQLITE_CONSTRAINT_UNIQUE");
        assert_eq!(super::name(19), "SQLITE_CONSTRAINT");
        assert_eq!(super::name(10 | (99 << 8)), "SQLITE_IOERR");
    }
}
