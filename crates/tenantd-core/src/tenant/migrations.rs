//! Published schema migrations, applied to every tenant exactly once.
//!
//! `tenantd migrate push` publishes `NNNN_<name>.sql` files under
//! `migrations/` in the store ([`publish`]); `migrations/head.json` lists
//! them with their SHA-256, so "what is published" is one GET. A published
//! file never changes (put with `If-None-Match: *`, checked against the
//! head's checksum when read).
//!
//! A tenant's holder applies what is pending: at claim, before the first
//! answer ([`bring_up_to_date`], called from the actor's start), when the
//! machine's [`watcher`] sees a new head, and when asked through
//! `POST /_admin/tenants/<id>/migrate`. Each migration is one request
//! through the tenant's actor ([`super::Op::Migrate`]): its statements run
//! under the SQL guard and the version is recorded in `tenantd_meta`
//! (`schema_version`) in the same transaction, so it is one durable commit
//! (its own log slot) and never runs twice. A failing migration rolls back
//! alone; the tenant keeps serving at its previous version and later
//! migrations wait for it.
//!
//! After each apply the holder writes the tenant's record under
//! `migrations/status/<id>/` ([`status`]): `migrate status` reads the whole
//! fleet with one LIST per 1,000 tenants, without waking any of them.

pub mod apply;
pub mod import;
pub mod own_lease;
pub mod publish;
pub mod script;
pub mod status;
pub mod watcher;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::sql::{Params, SqlLimits, SqlRequest, Statement};
use crate::store::{DynStore, ETag, StoreError};

pub use apply::{Outcome, bring_up_to_date};

/// The `tenantd_meta` key of the last migration applied.
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Where published migrations live.
pub const PREFIX: &str = "migrations/";

/// The list of published migrations.
pub const HEAD_KEY: &str = "migrations/head.json";

/// Metadata of a published file: its SHA-256 (hex).
pub const SHA256_KEY: &str = "tenantd-sha256";

pub fn file_key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// One published migration, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Migration {
    pub version: u32,
    /// The file name (`0003_add_email.sql`).
    pub name: String,
    pub sha256: String,
    /// The file's text, as published.
    pub text: String,
    /// Its statements, in order.
    pub request: SqlRequest,
}

impl Migration {
    /// A migration from a file's text; refused when it has no statement.
    pub fn new(version: u32, name: &str, sql: &str) -> Result<Migration, String> {
        if sql.contains('\0') {
            return Err(format!("{name} contains a NUL character; remove it"));
        }
        let statements: Vec<Statement> = script::split(sql)
            .into_iter()
            .map(|sql| Statement {
                sql,
                params: Params::Positional(Vec::new()),
            })
            .collect();
        if statements.is_empty() {
            return Err(format!("{name} has no SQL statement"));
        }
        Ok(Migration {
            version,
            name: name.to_string(),
            sha256: sha256_hex(sql.as_bytes()),
            text: sql.to_string(),
            request: SqlRequest {
                statements,
                read_only: false,
            },
        })
    }
}

/// What applying one migration to a tenant did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    /// The tenant's version after it.
    pub version: u32,
    /// False: it was applied before (nothing ran).
    pub applied: bool,
}

/// A migration runs under the tenant's SQL guard (no ATTACH, no tenantd_*
/// tables), but a schema change of a large table takes longer than a
/// request may, and its SELECTs answer nobody.
pub fn limits(base: &SqlLimits) -> SqlLimits {
    SqlLimits {
        max_statements: usize::MAX,
        max_rows: usize::MAX,
        max_result_bytes: usize::MAX,
        timeout: base.timeout.max(Duration::from_secs(120)),
        max_db_bytes: base.max_db_bytes,
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// One entry of the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: u32,
    pub name: String,
    pub sha256: String,
}

/// `migrations/head.json`: every published migration, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub latest: u32,
    pub migrations: Vec<Entry>,
}

/// The head as read, with its ETag (`None`: nothing published yet).
pub async fn read_head(store: &DynStore) -> Result<(Head, Option<ETag>), StoreError> {
    let Some(object) = store.get(HEAD_KEY).await? else {
        return Ok((Head::default(), None));
    };
    let head: Head = serde_json::from_slice(&object.body).map_err(|e| StoreError::Fatal {
        message: format!(
            "{HEAD_KEY} is not a tenantd migrations head ({e}); run `tenantd migrate push` again"
        ),
    })?;
    Ok((head, Some(object.etag)))
}

/// Published files never change, so each is read from the store once per
/// process, and checked against the head's checksum.
fn cache() -> &'static Mutex<HashMap<String, Arc<Migration>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Migration>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The migration of a head entry.
pub async fn load(store: &DynStore, entry: &Entry) -> Result<Arc<Migration>, String> {
    if let Some(found) = cache().lock().unwrap().get(&entry.sha256)
        && found.version == entry.version
    {
        return Ok(found.clone());
    }
    let key = file_key(&entry.name);
    let object = store
        .get(&key)
        .await
        .map_err(|e| format!("cannot read {key}: {e}"))?
        .ok_or_else(|| format!("{key} is listed in {HEAD_KEY} but missing from the store"))?;
    let sha = sha256_hex(&object.body);
    if sha != entry.sha256 {
        return Err(format!(
            "{key} has SHA-256 {sha}, but {HEAD_KEY} published it as {}: the store was changed by hand; put the published file back",
            entry.sha256
        ));
    }
    let text = std::str::from_utf8(&object.body).map_err(|e| format!("{key}: {e}"))?;
    let migration = Arc::new(Migration::new(entry.version, &entry.name, text)?);
    cache()
        .lock()
        .unwrap()
        .insert(entry.sha256.clone(), migration.clone());
    Ok(migration)
}

/// A private folder under the system's temporary folder, removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("tenantd-migrate-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create a temporary folder {}: {e}; set TMPDIR to a writable folder",
                dir.display()
            )
        })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every published migration, in order (one GET of the head, and of each
/// file not read before by this process).
pub async fn published(store: &DynStore) -> anyhow::Result<Vec<Arc<Migration>>> {
    let (head, _) = read_head(store)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the published migrations: {e}"))?;
    let mut migrations = Vec::with_capacity(head.migrations.len());
    for entry in &head.migrations {
        migrations.push(load(store, entry).await.map_err(anyhow::Error::msg)?);
    }
    Ok(migrations)
}

/// A new tenant's database with every given migration applied: what
/// `tenants create` uploads.
pub fn new_database_bytes(migrations: &[Arc<Migration>]) -> anyhow::Result<bytes::Bytes> {
    let dir = Scratch::new()?;
    let path = dir.0.join("new.sqlite3");
    {
        let mut db = super::db::Db::open(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let owned: Vec<Migration> = migrations.iter().map(|m| (**m).clone()).collect();
        publish::run_all(&mut db, &owned, &SqlLimits::default())?;
        // Closing checkpoints the WAL into the file: the file alone is the
        // whole database.
    }
    let bytes = std::fs::read(&path)
        .map_err(|e| anyhow::anyhow!("cannot read back {}: {e}", path.display()))?;
    Ok(bytes::Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::db::{Db, Work};
    use crate::tenant::{Reply, sql::SqlError};

    fn run(db: &mut Db, m: &Migration) -> Result<Reply, SqlError> {
        let applied = db
            .apply_batch(1, &[Work::Migrate(m)], &SqlLimits::default(), false)
            .unwrap();
        applied.replies.into_iter().next().unwrap()
    }

    fn tables(dir: &std::path::Path) -> Vec<String> {
        let conn = rusqlite::Connection::open(dir.join("t.sqlite3")).unwrap();
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'tenantd_%' ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_migration_runs_once_in_order_and_a_failure_rolls_back_alone() {
        let dir = Scratch::new().unwrap();
        let mut db = Db::open(&dir.0.join("t.sqlite3")).unwrap();
        let one = Migration::new(
            1,
            "0001_a.sql",
            "CREATE TABLE a(x); INSERT INTO a VALUES (1);",
        )
        .unwrap();
        let two = Migration::new(
            2,
            "0002_b.sql",
            "CREATE TABLE b(x); INSERT INTO nope VALUES (1);",
        )
        .unwrap();
        let three = Migration::new(3, "0003_c.sql", "CREATE TABLE c(x);").unwrap();
        // Not the next one: waits, nothing run.
        assert!(run(&mut db, &three).is_err());
        assert_eq!(
            run(&mut db, &one).unwrap(),
            Reply::Migrated(Migrated {
                version: 1,
                applied: true
            })
        );
        assert_eq!(
            run(&mut db, &one).unwrap(),
            Reply::Migrated(Migrated {
                version: 1,
                applied: false
            }),
            "recorded: never run again"
        );
        let error = run(&mut db, &two).unwrap_err();
        assert!(error.message.contains("nope"), "{}", error.message);
        assert_eq!(db.schema_version().unwrap(), 1, "a failure records nothing");
        assert!(run(&mut db, &three).is_err(), "waits for 0002");
        drop(db);
        assert_eq!(
            tables(&dir.0),
            ["a", "welcome"],
            "0002's CREATE rolled back"
        );
    }

    #[test]
    fn a_migration_is_under_the_tenants_sql_guard() {
        let dir = Scratch::new().unwrap();
        let mut db = Db::open(&dir.0.join("t.sqlite3")).unwrap();
        let sneaky = Migration::new(
            1,
            "0001_x.sql",
            "UPDATE tenantd_meta SET value = 99 WHERE key = 'schema_version';",
        )
        .unwrap();
        assert!(run(&mut db, &sneaky).is_err());
        assert_eq!(db.schema_version().unwrap(), 0);
        assert!(Migration::new(1, "0001_x.sql", "-- only a comment\n").is_err());
    }
}
