//! A SQL script split into statements as the `sqlite3` shell splits it: at
//! each `;` that ends a complete statement (SQLite's own
//! `sqlite3_complete` decides, so a `;` inside a string, a comment or a
//! trigger's body does not split). Comment-only pieces are dropped.

use crate::tenant::sql::guard::first_keyword;

pub fn split(script: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut start = 0;
    for (index, c) in script.char_indices() {
        if c != ';' {
            continue;
        }
        let candidate = &script[start..=index];
        if is_complete(candidate) {
            statements.push(candidate.trim().trim_end_matches(';').trim().to_string());
            start = index + 1;
        }
    }
    let rest = script[start..].trim();
    if !rest.is_empty() {
        statements.push(rest.to_string());
    }
    statements.retain(|s| first_keyword(s).is_some());
    statements
}

fn is_complete(sql: &str) -> bool {
    let Ok(text) = std::ffi::CString::new(sql) else {
        return false;
    };
    // SAFETY: sqlite3_complete reads a NUL-terminated string and keeps no
    // pointer to it.
    unsafe { rusqlite::ffi::sqlite3_complete(text.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_at_statement_ends_only() {
        let script = "CREATE TABLE t(a); -- one\nINSERT INTO t VALUES ('x;y');\n\
            CREATE TRIGGER g AFTER INSERT ON t BEGIN UPDATE t SET a = 1; END;\n-- trailing comment\n";
        let statements = split(script);
        assert_eq!(statements.len(), 3, "{statements:?}");
        assert_eq!(statements[1], "-- one\nINSERT INTO t VALUES ('x;y')");
        assert!(statements[2].ends_with("END"));
        assert_eq!(split("SELECT 1"), ["SELECT 1"]);
        assert!(split("-- nothing\n;").is_empty());
    }
}
