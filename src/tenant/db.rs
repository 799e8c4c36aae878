//! The tenant's SQLite file: the original app's `welcome(count)` table plus
//! tenantd's own bookkeeping.
//!
//! - `tenantd_meta(key, value)`: `epoch` of the holder that last wrote, and
//!   `seq`, a count of commits (every commit changes the database, so no
//!   two snapshots of different commits have equal bytes or ETags).
//! - `tenantd_idempotency(key, count, epoch)`: answers of increments made
//!   with an `Idempotency-Key`, the oldest dropped beyond a bound. `key` is
//!   the SHA-256 of the header (a 32-byte BLOB, whatever the header's
//!   length); databases written before keys were hashed hold the header as
//!   TEXT, and those rows are still honoured (see [`KeyHash`]).
//! - `tenantd_sql_answers(key, epoch, results, request)`: the same for SQL
//!   requests that wrote, with the fingerprint of the request (NULL in rows
//!   written before it was kept): a key repeated with another request is
//!   refused rather than answered with the first one's results.
//!
//! Everything else belongs to the tenant's application, reached through
//! the SQL API ([`super::sql`]) under the rules of its guard.
//!
//! The file is kept in WAL mode (see [`super::copy`]): each commit's pages
//! are read from the WAL and shipped as one log slot.
//!
//! Only the tenant actor calls into this module, so a connection is never
//! shared between tasks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sql::{self, ExecError, Guard, SqlError, SqlErrorKind, SqlLimits, SqlRequest, limits};
use super::{Answer, Reply, SqlAnswer};

/// How many idempotency keys a tenant remembers (oldest out first).
pub const IDEMPOTENCY_KEYS_KEPT: i64 = 10_000;

/// How many SQL answers are kept for idempotency keys: fewer than for
/// increments, since each holds a whole result.
pub const SQL_ANSWERS_KEPT: i64 = 1_000;

/// A database that could not be opened as tenantd's: not SQLite at all, or
/// SQLite with an incompatible `welcome` table.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Corrupt(pub String);

pub struct Db {
    conn: Connection,
    guard: Guard,
}

/// One request of a batch, as the database sees it.
#[derive(Clone, Copy, Debug)]
pub enum Work<'a> {
    /// An increment, with its idempotency key if any.
    Increment(Option<&'a str>),
    /// The count after the batch.
    Read,
    Sql(&'a SqlRequest, Option<&'a str>),
}

/// A batch applied: one result per request, in order, and the committed
/// state when anything changed (`None`: nothing to upload).
#[derive(Debug)]
pub struct Applied {
    pub replies: Vec<Result<Reply, SqlError>>,
    pub committed: Option<Committed>,
    /// The count after the batch, committed or not.
    pub count: u64,
}

/// The state of a committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub count: u64,
    pub seq: u64,
}

impl Db {
    /// Opens the working copy at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Db, Corrupt> {
        Db::open_with(path, true)
    }

    /// [`Db::open`] without `PRAGMA quick_check` (a pass over the whole
    /// file): for a file whose bytes were just verified against the
    /// checksum recorded when a sound database was written, and the log
    /// replayed onto it checksum by checksum.
    pub fn open_verified(path: &Path) -> Result<Db, Corrupt> {
        Db::open_with(path, false)
    }

    fn open_with(path: &Path, quick_check: bool) -> Result<Db, Corrupt> {
        let conn = Connection::open(path).map_err(|e| Corrupt(format!("cannot open: {e}")))?;
        without_lookaside(&conn);
        // tenantd's own statements are few; the cache holds them, not
        // every statement an app ever sent.
        conn.set_prepared_statement_cache_capacity(8);
        // Reading the schema forces SQLite to parse the header: a file that
        // is not a database fails here ("file is not a database").
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(|e| Corrupt(format!("not a SQLite database: {e}")))?;
        if quick_check {
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| Corrupt(format!("integrity check failed: {e}")))?;
            if check != "ok" {
                return Err(Corrupt(format!("integrity check failed: {check}")));
            }
        }
        // The store, not this file, is what makes a write durable: a crash
        // drops the local copy anyway, so fsyncs here would buy nothing.
        // WAL mode lets each commit's pages be read back from the WAL (the
        // delta to upload); exclusive locking keeps the WAL index in memory
        // (no -shm file: one descriptor less per tenant), and no automatic
        // checkpoint may fold frames into the file before they are read.
        conn.query_row("PRAGMA locking_mode = EXCLUSIVE", [], |_| Ok(()))
            .map_err(|e| Corrupt(format!("cannot lock: {e}")))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| Corrupt(format!("cannot switch to WAL mode: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Corrupt(format!("cannot switch to WAL mode (got {mode})")));
        }
        conn.execute_batch(
            "PRAGMA synchronous = OFF;
             PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS welcome (count INTEGER);
             CREATE TABLE IF NOT EXISTS tenantd_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tenantd_idempotency (
                 key BLOB PRIMARY KEY, count INTEGER NOT NULL, epoch INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tenantd_sql_answers (
                 key BLOB PRIMARY KEY, epoch INTEGER NOT NULL, results TEXT NOT NULL, request BLOB);",
        )
        .map_err(|e| Corrupt(format!("cannot prepare the schema: {e}")))?;
        add_request_column(&conn)
            .map_err(|e| Corrupt(format!("cannot prepare the schema: {e}")))?;
        conn.query_row("SELECT count(*) FROM welcome", [], |r| r.get::<_, i64>(0))
            .map_err(|e| Corrupt(format!("table welcome is not the counter table: {e}")))?;
        let mut conn = conn;
        // Last, so that tenantd's own setup above ran without them.
        limits::harden(&conn, &limits::configured())
            .map_err(|e| Corrupt(format!("cannot set SQLite's limits: {e}")))?;
        let guard = Guard::install(&mut conn)
            .map_err(|e| Corrupt(format!("cannot install the SQL guard: {e}")))?;
        Ok(Db { conn, guard })
    }

    /// Folds the WAL into the main file and empties it.
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        let (busy, _, _): (i64, i64, i64) =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
        if busy != 0 {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("checkpoint could not complete".into()),
            ));
        }
        // Give back the page cache between commits: the pages are in the
        // OS's cache anyway (a re-read costs microseconds), and an idle held
        // tenant should cost the machine as little memory as possible.
        self.conn.execute_batch("PRAGMA shrink_memory")?;
        Ok(())
    }

    /// The epoch written by the last holder (0 for a new database).
    pub fn epoch(&self) -> rusqlite::Result<u64> {
        meta(&self.conn, "epoch")
    }

    pub fn seq(&self) -> rusqlite::Result<u64> {
        meta(&self.conn, "seq")
    }

    pub fn count(&self) -> rusqlite::Result<u64> {
        count(&self.conn)
    }

    /// Claims the database for a new holder: writes its epoch and bumps seq.
    pub fn claim(&mut self, epoch: u64) -> rusqlite::Result<Committed> {
        let tx = self.conn.transaction()?;
        set_meta(&tx, "epoch", epoch)?;
        let seq = bump_seq(&tx)?;
        let count = count(&tx)?;
        tx.commit()?;
        Ok(Committed { count, seq })
    }

    /// Applies a batch of increments in one transaction, and commits even
    /// when it is empty. `keys[i]` is the idempotency key of the i-th
    /// increment, if any. Returns the answer of each: a repeated key gets
    /// its first answer (count and epoch).
    pub fn apply(
        &mut self,
        epoch: u64,
        keys: &[Option<&str>],
    ) -> rusqlite::Result<(Vec<Answer>, Committed)> {
        let work: Vec<Work> = keys.iter().map(|k| Work::Increment(*k)).collect();
        let applied = self.apply_batch(epoch, &work, &SqlLimits::default(), true)?;
        let answers = applied
            .replies
            .into_iter()
            .map(|reply| match reply {
                Ok(Reply::Count(answer)) => answer,
                other => unreachable!("an increment answers with a count: {other:?}"),
            })
            .collect();
        Ok((answers, applied.committed.expect("forced commit")))
    }

    /// Applies a batch in one transaction. Each SQL request runs in a
    /// savepoint of it: a failing one leaves nothing behind and is answered
    /// with its error, the others commit together. The transaction commits
    /// (epoch written, seq bumped) only when something may have changed, or
    /// when `force_commit`; otherwise it is rolled back and there is nothing
    /// to upload. An `Err` is a failure of the database itself.
    pub fn apply_batch(
        &mut self,
        epoch: u64,
        work: &[Work],
        limits: &SqlLimits,
        force_commit: bool,
    ) -> rusqlite::Result<Applied> {
        let mut refused = BTreeMap::new();
        loop {
            match self.try_apply(epoch, work, limits, force_commit, &refused)? {
                Ok(applied) => return Ok(applied),
                // SQLite rolled the transaction back: again, without it.
                Err((index, error)) => {
                    refused.insert(index, error);
                }
            }
        }
    }

    /// One attempt of [`Db::apply_batch`], answering the requests in
    /// `refused` with their errors without running them.
    fn try_apply(
        &mut self,
        epoch: u64,
        work: &[Work],
        limits: &SqlLimits,
        force_commit: bool,
        refused: &BTreeMap<usize, SqlError>,
    ) -> rusqlite::Result<Result<Applied, (usize, SqlError)>> {
        let tx = self.conn.transaction()?;
        if tx.query_row("SELECT count(*) FROM welcome", [], |r| r.get::<_, i64>(0))? == 0 {
            tx.execute("INSERT INTO welcome (count) VALUES (0)", [])?;
        }
        let mut current = count(&tx)?;
        let mut dirty = force_commit;
        let mut increments_pending = false;
        let mut replies = Vec::with_capacity(work.len());
        // Reads answer with the count after the batch: filled in below.
        let mut reads = Vec::new();
        for (index, item) in work.iter().enumerate() {
            if let Some(error) = refused.get(&index) {
                replies.push(Err(error.clone()));
                continue;
            }
            match *item {
                Work::Read => {
                    reads.push(replies.len());
                    replies.push(Ok(Reply::Count(Answer {
                        count: 0,
                        epoch,
                        repeated: false,
                    })));
                }
                Work::Increment(key) => {
                    let answer = increment(&tx, epoch, key, &mut current)?;
                    if !answer.repeated {
                        dirty = true;
                        increments_pending = true;
                    }
                    replies.push(Ok(Reply::Count(answer)));
                }
                Work::Sql(request, key) => {
                    if let Some(key) = key
                        && let Some(answer) = sql_answer(&tx, key, request)?
                    {
                        replies.push(answer.map(Reply::Sql));
                        continue;
                    }
                    // The request may read or change the counter's row:
                    // show it the increments before it, take its changes.
                    if increments_pending {
                        tx.execute("UPDATE welcome SET count = ?1", [current as i64])?;
                        increments_pending = false;
                    }
                    let executed = match sql::execute(&tx, &self.guard, request, limits) {
                        Ok(executed) => executed,
                        Err(ExecError::Refused(error)) => {
                            replies.push(Err(error));
                            continue;
                        }
                        Err(ExecError::TransactionLost(error)) => return Ok(Err((index, error))),
                        Err(ExecError::Db(e)) => return Err(e),
                    };
                    current = count(&tx)?;
                    let wrote = executed.wrote && !request.read_only;
                    if wrote && let Some(key) = key {
                        limits::with_internal_length(&tx, || {
                            tx.execute(
                                "INSERT INTO tenantd_sql_answers (key, epoch, results, request) VALUES (?1, ?2, ?3, ?4)",
                                params![
                                    KeyHash::of(key).as_blob(),
                                    epoch as i64,
                                    executed.results.to_string(),
                                    &sql::body::fingerprint(request)[..]
                                ],
                            )
                        })?;
                    }
                    dirty |= wrote;
                    replies.push(Ok(Reply::Sql(SqlAnswer {
                        epoch,
                        repeated: false,
                        results: Arc::new(executed.results),
                    })));
                }
            }
        }
        if increments_pending {
            tx.execute("UPDATE welcome SET count = ?1", [current as i64])?;
        }
        for index in reads {
            if let Ok(Reply::Count(answer)) = &mut replies[index] {
                answer.count = current;
            }
        }
        if !dirty {
            tx.rollback()?;
            return Ok(Ok(Applied {
                replies,
                committed: None,
                count: current,
            }));
        }
        tx.execute(
            "DELETE FROM tenantd_idempotency WHERE rowid <= (SELECT max(rowid) FROM tenantd_idempotency) - ?1",
            [IDEMPOTENCY_KEYS_KEPT],
        )?;
        tx.execute(
            "DELETE FROM tenantd_sql_answers WHERE rowid <= (SELECT max(rowid) FROM tenantd_sql_answers) - ?1",
            [SQL_ANSWERS_KEPT],
        )?;
        set_meta(&tx, "epoch", epoch)?;
        let seq = bump_seq(&tx)?;
        tx.commit()?;
        Ok(Ok(Applied {
            replies,
            committed: Some(Committed {
                count: current,
                seq,
            }),
            count: current,
        }))
    }
}

/// A new, empty tenant database as bytes: the schema [`Db::open`] creates,
/// with no count and no epoch yet. What `tenantd tenants create` uploads.
pub fn new_database_bytes() -> anyhow::Result<bytes::Bytes> {
    use anyhow::Context;
    let dir = tempfile_dir()?;
    let path = dir.join("new.sqlite3");
    let result = (|| {
        let db = Db::open(&path).map_err(|Corrupt(e)| anyhow::anyhow!("{e}"))?;
        // Closing the connection checkpoints a WAL into the main file, so
        // that the file alone is the whole database.
        drop(db);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read back {}", path.display()))?;
        Ok(bytes::Bytes::from(bytes))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A private folder under the system's temporary folder.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tenantd-new-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create a temporary folder {}: {e}; set TMPDIR to a writable folder",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// Turns off the connection's lookaside allocator: a per-connection arena
/// (about 150 KiB) that speeds up small allocations, paid by every held
/// tenant even when idle; a machine holding thousands of tenants needs the
/// memory more than their commits need the speed.
fn without_lookaside(conn: &Connection) {
    // SAFETY: the handle is valid while `conn` lives, and lookaside may be
    // reconfigured while none of it is in use, which holds right after
    // opening (SQLite answers SQLITE_BUSY otherwise, leaving it as it was).
    unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
}

/// One increment; a repeated key answers with its first answer.
fn increment(
    tx: &Transaction,
    epoch: u64,
    key: Option<&str>,
    current: &mut u64,
) -> rusqlite::Result<Answer> {
    if let Some(key) = key {
        let hash = KeyHash::of(key);
        let seen = tx
            .query_row(
                "SELECT count, epoch FROM tenantd_idempotency WHERE key IN (?1, ?2)",
                params![hash.as_blob(), key],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        if let Some((count, first_epoch)) = seen {
            return Ok(Answer {
                count: count as u64,
                epoch: first_epoch as u64,
                repeated: true,
            });
        }
        *current += 1;
        tx.execute(
            "INSERT INTO tenantd_idempotency (key, count, epoch) VALUES (?1, ?2, ?3)",
            params![hash.as_blob(), *current as i64, epoch as i64],
        )?;
    } else {
        *current += 1;
    }
    Ok(Answer {
        count: *current,
        epoch,
        repeated: false,
    })
}

/// How an idempotency key is stored: its SHA-256, so that every row costs
/// 32 bytes whatever the header's length (up to 200 characters).
///
/// Rows written before keys were hashed hold the header itself as TEXT.
/// A lookup asks for both forms (`key IN (hash, text)`): a BLOB never
/// equals a TEXT in SQLite, so neither form can match the other's rows, and
/// old rows keep deduplicating until the bound ages them out.
struct KeyHash([u8; 32]);

impl KeyHash {
    fn of(key: &str) -> KeyHash {
        use sha2::{Digest, Sha256};
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    fn as_blob(&self) -> &[u8] {
        &self.0
    }
}

/// The first answer of a SQL request made with `key`, if it wrote; an
/// error if that request was not `request`.
fn sql_answer(
    tx: &Transaction,
    key: &str,
    request: &SqlRequest,
) -> rusqlite::Result<Option<Result<SqlAnswer, SqlError>>> {
    let stored = limits::with_internal_length(tx, || {
        tx.query_row(
            "SELECT epoch, results, request FROM tenantd_sql_answers WHERE key IN (?1, ?2)",
            params![KeyHash::of(key).as_blob(), key],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            },
        )
        .optional()
    })?;
    let Some((epoch, results, fingerprint)) = stored else {
        return Ok(None);
    };
    if fingerprint.is_some_and(|f| f[..] != sql::body::fingerprint(request)[..]) {
        return Ok(Some(Err(SqlError {
            kind: SqlErrorKind::KeyReused,
            statement: None,
            message: "this Idempotency-Key was first sent with another request (other statements, parameters or read_only); a key names one request: send a new key for a new request".into(),
        })));
    }
    Ok(Some(Ok(SqlAnswer {
        epoch: epoch as u64,
        repeated: true,
        // Written by this module from a serde_json::Value.
        results: Arc::new(serde_json::from_str(&results).unwrap_or(serde_json::Value::Null)),
    })))
}

/// Databases written before request fingerprints were kept lack the
/// column; their rows stay NULL (answered without the check).
fn add_request_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('tenantd_sql_answers') WHERE name = 'request'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE tenantd_sql_answers ADD COLUMN request BLOB")?;
    }
    Ok(())
}

fn count(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(conn
        .query_row("SELECT count FROM welcome LIMIT 1", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten()
        .unwrap_or(0)
        .max(0) as u64)
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    Ok(conn
        .query_row(
            "SELECT value FROM tenantd_meta WHERE key = ?1",
            [key],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

fn set_meta(tx: &Transaction, key: &str, value: u64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO tenantd_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value as i64],
    )?;
    Ok(())
}

fn bump_seq(tx: &Transaction) -> rusqlite::Result<u64> {
    let seq = meta(tx, "seq")? + 1;
    set_meta(tx, "seq", seq)?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(answers: &[Answer]) -> Vec<(u64, bool)> {
        answers.iter().map(|a| (a.count, a.repeated)).collect()
    }

    fn fresh() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
        (dir, db)
    }

    #[test]
    fn increments_count_and_bump_seq() {
        let (_dir, mut db) = fresh();
        let (answers, c) = db.apply(3, &[None, None, None]).unwrap();
        assert_eq!(counts(&answers), vec![(1, false), (2, false), (3, false)]);
        assert_eq!(c.count, 3);
        let (_, c2) = db.apply(3, &[]).unwrap();
        assert_eq!(c2.count, 3);
        assert!(c2.seq > c.seq, "every commit must change the bytes");
        assert_eq!(db.epoch().unwrap(), 3);
    }

    #[test]
    fn idempotency_key_counts_once_even_within_a_batch() {
        let (_dir, mut db) = fresh();
        let (answers, _) = db.apply(1, &[Some("k"), None, Some("k")]).unwrap();
        assert_eq!(counts(&answers), vec![(1, false), (2, false), (1, true)]);
        let (answers, c) = db.apply(1, &[Some("k")]).unwrap();
        assert_eq!(counts(&answers), vec![(1, true)]);
        assert_eq!(c.count, 2);
    }

    #[test]
    fn a_repeated_key_answers_with_the_epoch_it_was_first_applied_under() {
        let (_dir, mut db) = fresh();
        db.apply(4, &[Some("k")]).unwrap();
        db.claim(5).unwrap();
        let (answers, _) = db.apply(5, &[Some("k"), Some("new")]).unwrap();
        let first = Answer {
            count: 1,
            epoch: 4,
            repeated: true,
        };
        let new = Answer {
            count: 2,
            epoch: 5,
            repeated: false,
        };
        assert_eq!(answers, vec![first, new]);
    }

    #[test]
    fn idempotency_keys_are_bounded_oldest_first() {
        let (_dir, mut db) = fresh();
        let keys: Vec<String> = (0..IDEMPOTENCY_KEYS_KEPT + 5)
            .map(|i| format!("k{i}"))
            .collect();
        let refs: Vec<Option<&str>> = keys.iter().map(|k| Some(k.as_str())).collect();
        db.apply(1, &refs).unwrap();
        let (answers, _) = db
            .apply(1, &[Some("k0"), Some(keys.last().unwrap())])
            .unwrap();
        assert!(
            !answers[0].repeated,
            "the oldest key must have been dropped"
        );
        assert!(answers[1].repeated, "the newest key must be remembered");
    }

    #[test]
    fn rejects_a_file_that_is_not_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        std::fs::write(
            &path,
            b"this is not a database, it is a text file of some length......",
        )
        .unwrap();
        let err = Db::open(&path).err().expect("must fail");
        assert!(err.0.contains("not a SQLite database"), "{err}");
    }

    #[test]
    fn opens_the_original_apps_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (41);",
        )
        .unwrap();
        drop(conn);
        let mut db = Db::open(&path).unwrap();
        let (answers, _) = db.apply(1, &[None]).unwrap();
        assert_eq!(answers[0].count, 42);
    }
    #[test]
    fn idempotency_keys_are_stored_as_32_byte_hashes() {
        let (dir, mut db) = fresh();
        let long = "k".repeat(200);
        db.apply(1, &[Some(long.as_str())]).unwrap();
        let (answers, c) = db.apply(1, &[Some(long.as_str())]).unwrap();
        assert_eq!(
            counts(&answers),
            vec![(1, true)],
            "the repeat is deduplicated"
        );
        assert_eq!(c.count, 1);
        drop(db);
        let conn = Connection::open(dir.path().join("db.sqlite3")).unwrap();
        let (kind, len): (String, i64) = conn
            .query_row(
                "SELECT typeof(key), length(key) FROM tenantd_idempotency",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((kind.as_str(), len), ("blob", 32));
    }

    #[test]
    fn text_keys_of_older_databases_are_still_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let conn = Connection::open(&path).unwrap();
        // The tables as tenantd created them before keys were hashed.
        conn.execute_batch(
            "CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (7);
             CREATE TABLE tenantd_idempotency (
                 key TEXT PRIMARY KEY, count INTEGER NOT NULL, epoch INTEGER NOT NULL);
             INSERT INTO tenantd_idempotency VALUES ('old-key', 7, 2);
             CREATE TABLE tenantd_sql_answers (
                 key TEXT PRIMARY KEY, epoch INTEGER NOT NULL, results TEXT NOT NULL);
             INSERT INTO tenantd_sql_answers VALUES ('old-sql', 2, '[{\"rows\":[]}]');",
        )
        .unwrap();
        drop(conn);
        let mut db = Db::open(&path).unwrap();
        let (answers, c) = db.apply(3, &[Some("old-key"), Some("new-key")]).unwrap();
        let old = Answer {
            count: 7,
            epoch: 2,
            repeated: true,
        };
        assert_eq!(answers[0], old);
        assert_eq!((answers[1].count, answers[1].repeated), (8, false));
        assert_eq!(c.count, 8);
        let (answers, _) = db.apply(3, &[Some("new-key")]).unwrap();
        assert_eq!(
            counts(&answers),
            vec![(8, true)],
            "new rows in an old table"
        );
        let tx = db.conn.transaction().unwrap();
        let any = SqlRequest::parse(
            br#"{"statements": [{"sql": "SELECT 1"}]}"#,
            &SqlLimits::default(),
        )
        .unwrap();
        let answer = sql_answer(&tx, "old-sql", &any)
            .unwrap()
            .expect("old SQL answer")
            .unwrap();
        assert_eq!((answer.epoch, answer.repeated), (2, true));
        assert_eq!(*answer.results, serde_json::json!([{"rows": []}]));
    }

    #[test]
    fn a_new_database_is_a_plain_sqlite_file_with_the_schema() {
        let bytes = new_database_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        std::fs::write(&path, &bytes).unwrap();
        let conn = Connection::open(&path).unwrap();
        let count: i64 = conn
            .query_row("SELECT count(*) FROM welcome", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0, "no counter row yet");
        drop(conn);
        let db = Db::open(&path).unwrap();
        assert_eq!((db.epoch().unwrap(), db.seq().unwrap()), (0, 0));
    }
}
