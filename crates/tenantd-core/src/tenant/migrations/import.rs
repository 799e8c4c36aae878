//! A database file made ready to become a tenant (`tenants create --from`
//! and `--from-file`): checked, and stripped of what belonged to the tenant
//! it came from.
//!
//! Accepted: any sound SQLite file within `--max-db-bytes`, including what
//! `tenantd restore` writes (an export: it has tenantd's own tables, whose
//! shape is checked; its idempotency answers are dropped, they answered
//! another tenant's clients; its schema version is kept, so the migrations
//! it has are not run again). Refused: anything that is not a SQLite
//! database (a log slot, a lock, a WAL), a file that fails `PRAGMA
//! integrity_check`, one with `tenantd_*` tables tenantd does not know,
//! and one whose `welcome` table cannot be the counter.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags};

use crate::tenant::db::Db;

/// tenantd's own tables, as an export holds them.
const KNOWN_INTERNAL: &[&str] = &["tenantd_meta", "tenantd_idempotency", "tenantd_sql_answers"];

/// A checked copy of `source` in `scratch`, ready to upload, with its
/// schema version.
pub fn prepare(source: &Path, scratch: &Path, max_db_bytes: u64) -> anyhow::Result<(PathBuf, u32)> {
    let shown = source.display();
    let size = std::fs::metadata(source)
        .with_context(|| format!("cannot read {shown}"))?
        .len();
    if size > max_db_bytes {
        bail!(
            "{shown} is {size} bytes, more than the {max_db_bytes} bytes a tenant may have (--max-db-bytes); VACUUM it or raise --max-db-bytes"
        );
    }
    let mut header = [0u8; 16];
    let read = std::fs::File::open(source)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut header))
        .with_context(|| format!("cannot read {shown}"))?;
    if read < 16 || &header != b"SQLite format 3\0" {
        bail!(
            "{shown} is not a SQLite database (a tenantd log slot, lock or WAL file is not one either): export a tenant with `tenantd restore --customer-id <id> --output <file>`"
        );
    }
    let copy = scratch.join("import.sqlite3");
    // A copy: the user's file is never changed, and a WAL beside it (a
    // database open elsewhere) is not silently left out.
    for suffix in ["-wal", "-journal"] {
        let side = PathBuf::from(format!("{}{suffix}", source.display()));
        if side.exists() {
            bail!(
                "{} exists beside {shown}: the database is open or was not closed cleanly; close it (or run `sqlite3 {shown} 'PRAGMA wal_checkpoint(TRUNCATE)'`) and try again",
                side.display()
            );
        }
    }
    std::fs::copy(source, &copy).with_context(|| format!("cannot copy {shown}"))?;
    {
        let conn = Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .with_context(|| format!("cannot open {shown}"))?;
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| anyhow::anyhow!("{shown} is not a usable SQLite database: {e}"))?;
        if check != "ok" {
            bail!(
                "{shown} fails PRAGMA integrity_check: {check}; repair it (sqlite3 .recover) first"
            );
        }
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'tenantd\\_%' ESCAPE '\\'",
        )?;
        let internal: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        if let Some(unknown) = internal
            .iter()
            .find(|t| !KNOWN_INTERNAL.contains(&t.as_str()))
        {
            bail!(
                "{shown} has a table {unknown}: names starting with tenantd_ are tenantd's own, and this one is not; rename it before importing"
            );
        }
        if internal.iter().any(|t| t == "tenantd_idempotency") {
            conn.execute_batch("DELETE FROM tenantd_idempotency")
                .with_context(|| format!("{shown}: tenantd_idempotency is not tenantd's"))?;
        }
        if internal.iter().any(|t| t == "tenantd_sql_answers") {
            conn.execute_batch("DELETE FROM tenantd_sql_answers")
                .with_context(|| format!("{shown}: tenantd_sql_answers is not tenantd's"))?;
        }
        if internal.iter().any(|t| t == "tenantd_meta") {
            conn.execute_batch("DELETE FROM tenantd_meta WHERE key = 'epoch'")
                .with_context(|| format!("{shown}: tenantd_meta is not tenantd's"))?;
        }
        conn.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))?;
    }
    // tenantd's schema added where missing, and the counter table checked.
    let db = Db::open(&copy).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let version = db.schema_version()?;
    drop(db);
    let size = std::fs::metadata(&copy)?.len();
    if size > max_db_bytes {
        bail!(
            "{shown} grows to {size} bytes with tenantd's tables, more than --max-db-bytes {max_db_bytes}"
        );
    }
    Ok((copy, version))
}
