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

use rusqlite::InterruptHandle;

use super::sql::watchdog::{self, Cause};
use super::sql::{self, ExecError, Guard, SqlError, SqlErrorKind, SqlLimits, SqlRequest, limits};
use super::{Answer, Reply, SqlAnswer};

pub mod stream;

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
    /// Lets the watchdog interrupt whatever runs on `conn`.
    interrupt: Arc<InterruptHandle>,
}

/// One request of a batch, as the database sees it.
#[derive(Clone, Copy, Debug)]
pub enum Work<'a> {
    /// An increment, with its idempotency key if any.
    Increment(Option<&'a str>),
    /// The count after the batch.
    Read,
    Sql(&'a SqlRequest, Option<&'a str>),
    /// A Hrana pipeline, with its stream's state when it has a baton
    /// (otherwise the stream ends with the pipeline).
    Hrana(
        &'a sql::hrana::Program,
        Option<&'a std::sync::Mutex<sql::hrana::StreamState>>,
    ),
    /// A published schema migration: run once, its version recorded in the
    /// same transaction (see [`super::migrations`]).
    Migrate(&'a super::migrations::Migration),
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
        // The page cache is bounded per tenant (2 MiB) and nothing is
        // memory-mapped, so a holder's memory does not grow with its
        // databases' sizes.
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
             PRAGMA cache_size = -2048;
             PRAGMA mmap_size = 0;
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
        let interrupt = Arc::new(conn.get_interrupt_handle());
        Ok(Db {
            conn,
            guard,
            interrupt,
        })
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

    /// The last migration recorded as applied (0: none).
    pub fn schema_version(&self) -> rusqlite::Result<u32> {
        Ok(meta(&self.conn, super::migrations::SCHEMA_VERSION_KEY)? as u32)
    }

    pub fn count(&self) -> rusqlite::Result<u64> {
        count(&self.conn)
    }

    /// Claims the database for a new holder: writes its epoch and bumps seq.
    pub fn claim(&mut self, epoch: u64) -> rusqlite::Result<Committed> {
        let tx = self.conn.transaction()?;
        set_meta(&tx, "epoch", epoch)?;
        let seq = bump_seq(&tx)?;
        // A count the tenant made unreadable is the counter requests'
        // problem (409), not a reason to refuse the tenant.
        let count = count(&tx).unwrap_or(0);
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
    /// with its error, the others commit together. Increments between two
    /// SQL requests share one savepoint and one UPDATE of the counter:
    /// when that fails (a constraint or trigger the tenant put on
    /// `welcome`, a value that is not an integer, the time or size limit)
    /// they fail together and the rest of the batch stands. Everything a
    /// request causes to run (its statements, the counter's UPDATE and the
    /// triggers it fires, its stored answer) runs under its deadline and
    /// within `--max-db-bytes`.
    ///
    /// The transaction commits (epoch written, seq bumped) only when
    /// something may have changed, or when `force_commit`; otherwise it is
    /// rolled back and there is nothing to upload. An `Err` is a failure of
    /// the database itself, not of a request.
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
                // SQLite rolled the transaction back: again, without them.
                Err((indices, error)) => {
                    for index in indices {
                        refused.insert(index, error.clone());
                    }
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
    ) -> rusqlite::Result<Result<Applied, Lost>> {
        let Db {
            conn,
            guard,
            interrupt,
        } = self;
        let ctx = sql::Context {
            guard: &*guard,
            interrupt: &*interrupt,
            limits,
        };
        let tx = conn.transaction()?;
        let page_size = tx
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))?
            .max(512) as u64;
        set_max_page_count(&tx, (limits.max_db_bytes / page_size).max(1))?;
        let mut batch = Batch {
            tx: &tx,
            ctx: &ctx,
            current: Ok(0),
            group: None,
            replies: Vec::with_capacity(work.len()),
            sql_wrote: false,
        };
        batch.current = batch.start_counter();
        // Reads answer with the count after the batch: filled in below.
        let mut reads = Vec::new();
        for (index, item) in work.iter().enumerate() {
            if let Some(error) = refused.get(&index) {
                batch.replies.push(Err(error.clone()));
                continue;
            }
            let step = match *item {
                Work::Read => {
                    reads.push(index);
                    batch
                        .replies
                        .push(Err(SqlError::invalid(None, "not yet read")));
                    Ok(())
                }
                Work::Increment(key) => batch.increment(epoch, index, key)?,
                Work::Sql(request, key) => batch.sql(epoch, index, request, key)?,
                Work::Hrana(program, stream) => batch.hrana(epoch, index, program, stream)?,
                Work::Migrate(migration) => batch.migrate(index, migration)?,
            };
            if let Err(lost) = step {
                return Ok(Err(lost));
            }
        }
        if let Err(lost) = batch.flush()? {
            return Ok(Err(lost));
        }
        for &index in &reads {
            batch.replies[index] = batch.current.clone().map(|count| {
                Reply::Count(Answer {
                    count,
                    epoch,
                    repeated: false,
                })
            });
        }
        let increments = work.iter().zip(&batch.replies).any(|(item, reply)| {
            matches!(item, Work::Increment(_))
                && matches!(reply, Ok(Reply::Count(a)) if !a.repeated)
        });
        let dirty = force_commit || increments || batch.sql_wrote;
        let count = batch.current.clone().unwrap_or(0);
        let replies = batch.replies;
        // tenantd's own bookkeeping is not the requests': never refused.
        set_max_page_count(&tx, u32::MAX as u64 - 1)?;
        if !dirty {
            tx.rollback()?;
            return Ok(Ok(Applied {
                replies,
                committed: None,
                count,
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
            committed: Some(Committed { count, seq }),
            count,
        }))
    }
}

/// Requests whose failure made SQLite roll back the whole transaction,
/// and their error: the batch is applied again without them.
type Lost = (Vec<usize>, SqlError);

/// The state of a batch being applied.
struct Batch<'a> {
    tx: &'a Transaction<'a>,
    ctx: &'a sql::Context<'a>,
    /// The counter as the batch has it so far, or why it cannot be read.
    current: Result<u64, SqlError>,
    /// Increments applied since the last UPDATE of the counter.
    group: Option<Group>,
    replies: Vec<Result<Reply, SqlError>>,
    sql_wrote: bool,
}

/// Increments in the `tenantd_counter` savepoint, not yet written to
/// `welcome`.
struct Group {
    indices: Vec<usize>,
    start: u64,
}

impl Batch<'_> {
    /// The counter's row made sure of, and its value.
    fn start_counter(&self) -> Result<u64, SqlError> {
        let rows = self
            .tx
            .query_row("SELECT count(*) FROM welcome", [], |r| r.get::<_, i64>(0))
            .map_err(|e| self.counter_error(&e, None))?;
        if rows == 0 {
            self.tx
                .execute("INSERT INTO welcome (count) VALUES (0)", [])
                .map_err(|e| self.counter_error(&e, None))?;
        }
        self.read_count()
    }

    fn read_count(&self) -> Result<u64, SqlError> {
        let value = self
            .tx
            .query_row("SELECT count FROM welcome LIMIT 1", [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .optional()
            .map_err(|e| self.counter_error(&e, None))?;
        use rusqlite::types::Value;
        match value {
            None | Some(Value::Null) => Ok(0),
            Some(Value::Integer(n)) => Ok(n.max(0) as u64),
            Some(other) => Err(SqlError::new(
                SqlErrorKind::Conflict,
                None,
                format!(
                    "the counter cannot count: table welcome holds {other:?} in column count, not an integer (changed through the SQL API); set it to an integer with UPDATE welcome SET count = <n>"
                ),
            )),
        }
    }

    /// The request's error for a failed statement of the counter's.
    fn counter_error(&self, error: &rusqlite::Error, cause: Option<Cause>) -> SqlError {
        let what =
            "the counter's UPDATE of table welcome (with the triggers and foreign keys it fires)";
        sql::limit_error(error, None, what, self.ctx.limits, cause).unwrap_or_else(|| {
            SqlError::new(
                SqlErrorKind::Conflict,
                None,
                format!(
                    "the counter cannot be updated: {error} (a constraint, index, foreign key or trigger the tenant added around table welcome refuses UPDATE welcome SET count = <n>); nothing of the request was applied"
                ),
            )
        })
    }

    fn increment(
        &mut self,
        epoch: u64,
        index: usize,
        key: Option<&str>,
    ) -> rusqlite::Result<Result<(), Lost>> {
        if let Some(key) = key
            && let Some((count, first_epoch)) = seen_key(self.tx, key)?
        {
            self.replies.push(Ok(Reply::Count(Answer {
                count,
                epoch: first_epoch,
                repeated: true,
            })));
            return Ok(Ok(()));
        }
        let current = match &self.current {
            Ok(current) => *current,
            Err(e) => {
                self.replies.push(Err(e.clone()));
                return Ok(Ok(()));
            }
        };
        if self.group.is_none() {
            self.tx.execute_batch("SAVEPOINT tenantd_counter")?;
            self.group = Some(Group {
                indices: Vec::new(),
                start: current,
            });
        }
        let count = current + 1;
        self.current = Ok(count);
        self.group
            .as_mut()
            .expect("opened above")
            .indices
            .push(index);
        self.replies.push(Ok(Reply::Count(Answer {
            count,
            epoch,
            repeated: false,
        })));
        if let Some(key) = key {
            let stored = self.tx.execute(
                "INSERT INTO tenantd_idempotency (key, count, epoch) VALUES (?1, ?2, ?3)",
                params![KeyHash::of(key).as_blob(), count as i64, epoch as i64],
            );
            if let Err(e) = stored {
                let error = self.counter_error(&e, None);
                return self.fail_group(error);
            }
        }
        Ok(Ok(()))
    }

    /// Writes the group's increments to `welcome`, under the deadline.
    fn flush(&mut self) -> rusqlite::Result<Result<(), Lost>> {
        let Some(group) = &self.group else {
            return Ok(Ok(()));
        };
        let count = self.current.clone().unwrap_or(group.start);
        let (updated, cause) = {
            let armed = watchdog::global().arm(self.ctx.interrupt, self.ctx.limits.timeout);
            let updated = self
                .tx
                .execute("UPDATE welcome SET count = ?1", [count as i64]);
            (updated, armed.fired())
        };
        match updated {
            Ok(_) => {
                self.tx.execute_batch("RELEASE tenantd_counter")?;
                self.group = None;
                Ok(Ok(()))
            }
            Err(e) => {
                let error = self.counter_error(&e, cause);
                self.fail_group(error)
            }
        }
    }

    /// Undoes the group's increments and answers each with `error`.
    fn fail_group(&mut self, error: SqlError) -> rusqlite::Result<Result<(), Lost>> {
        let group = self.group.take().expect("a group is open");
        if self.tx.is_autocommit() {
            return Ok(Err((group.indices, error)));
        }
        self.tx
            .execute_batch("ROLLBACK TO tenantd_counter; RELEASE tenantd_counter")?;
        for &index in &group.indices {
            self.replies[index] = Err(error.clone());
        }
        self.current = Ok(group.start);
        Ok(Ok(()))
    }

    fn sql(
        &mut self,
        epoch: u64,
        index: usize,
        request: &SqlRequest,
        key: Option<&str>,
    ) -> rusqlite::Result<Result<(), Lost>> {
        if let Some(key) = key
            && let Some(answer) = sql_answer(self.tx, key, request)?
        {
            self.replies.push(answer.map(Reply::Sql));
            return Ok(Ok(()));
        }
        // The request may read or change the counter's row: show it the
        // increments before it, take its changes.
        if let Err(lost) = self.flush()? {
            return Ok(Err(lost));
        }
        // With a key, the stored answer is part of the request: it fits in
        // --max-db-bytes with the rest, or the request fails.
        if key.is_some() {
            self.tx.execute_batch("SAVEPOINT tenantd_item")?;
        }
        let outcome = match sql::execute(self.tx, self.ctx, request) {
            Ok(executed) => self.store_answer(epoch, request, key, executed),
            Err(ExecError::Refused(error)) => Err(error),
            Err(ExecError::TransactionLost(error)) => return Ok(Err((vec![index], error))),
            Err(ExecError::Db(e)) => {
                let what = format!("request {index}");
                match sql::limit_error(&e, None, &what, self.ctx.limits, None) {
                    Some(error) if self.tx.is_autocommit() => {
                        return Ok(Err((vec![index], error)));
                    }
                    Some(error) => Err(error),
                    None => return Err(e),
                }
            }
        };
        if key.is_some() {
            if self.tx.is_autocommit() {
                let error = outcome.err().unwrap_or_else(|| {
                    SqlError::invalid(None, "the transaction ended unexpectedly")
                });
                return Ok(Err((vec![index], error)));
            }
            let end = match outcome {
                Ok(_) => "RELEASE tenantd_item",
                Err(_) => "ROLLBACK TO tenantd_item; RELEASE tenantd_item",
            };
            self.tx.execute_batch(end)?;
        }
        self.replies.push(outcome.map(Reply::Sql));
        self.current = self.read_count();
        Ok(Ok(()))
    }

    /// A Hrana pipeline: its statements through the same executor as
    /// [`Batch::sql`]'s, its answer the pipeline's `results`.
    fn hrana(
        &mut self,
        epoch: u64,
        index: usize,
        program: &sql::hrana::Program,
        stream: Option<&std::sync::Mutex<sql::hrana::StreamState>>,
    ) -> rusqlite::Result<Result<(), Lost>> {
        if let Err(lost) = self.flush()? {
            return Ok(Err(lost));
        }
        let mut ended = sql::hrana::StreamState::default();
        let mut kept = stream.map(|s| s.lock().unwrap_or_else(|e| e.into_inner()));
        let stream = match kept.as_deref_mut() {
            Some(stream) => stream,
            None => &mut ended,
        };
        let outcome = match sql::hrana::run(self.tx, self.ctx, program, stream, false) {
            Ok(ran) => {
                // No transaction outlives a pipeline run in the batch's.
                sql::hrana::roll_back(self.tx, stream)?;
                self.sql_wrote |= ran.wrote;
                Ok(SqlAnswer {
                    epoch,
                    repeated: false,
                    results: Arc::new(sql::hrana::answer(ran.results, stream)),
                })
            }
            Err(ExecError::Refused(error)) => Err(error),
            Err(ExecError::TransactionLost(error)) => return Ok(Err((vec![index], error))),
            Err(ExecError::Db(e)) => {
                let what = format!("request {index}");
                match sql::limit_error(&e, None, &what, self.ctx.limits, None) {
                    Some(error) if self.tx.is_autocommit() => {
                        return Ok(Err((vec![index], error)));
                    }
                    Some(error) => Err(error),
                    None => return Err(e),
                }
            }
        };
        self.replies.push(outcome.map(Reply::Sql));
        self.current = self.read_count();
        Ok(Ok(()))
    }

    /// Runs a migration unless its version is recorded already; the
    /// version is recorded in the same transaction. A migration that is not
    /// the next one waits (answered with an error, nothing run).
    fn migrate(
        &mut self,
        index: usize,
        migration: &super::migrations::Migration,
    ) -> rusqlite::Result<Result<(), Lost>> {
        use super::migrations::{Migrated, SCHEMA_VERSION_KEY};
        let current = meta(self.tx, SCHEMA_VERSION_KEY)? as u32;
        if current >= migration.version {
            self.replies.push(Ok(Reply::Migrated(Migrated {
                version: current,
                applied: false,
            })));
            return Ok(Ok(()));
        }
        if current + 1 != migration.version {
            self.replies.push(Err(SqlError::invalid(
                None,
                format!(
                    "the tenant is at schema version {current}: migration {} waits for {} first",
                    migration.version,
                    current + 1
                ),
            )));
            return Ok(Ok(()));
        }
        if let Err(lost) = self.flush()? {
            return Ok(Err(lost));
        }
        let limits = super::migrations::limits(self.ctx.limits);
        let ctx = sql::Context {
            guard: self.ctx.guard,
            interrupt: self.ctx.interrupt,
            limits: &limits,
        };
        let outcome = match sql::execute(self.tx, &ctx, &migration.request) {
            Ok(_) => Ok(()),
            Err(ExecError::Refused(error)) => Err(error),
            Err(ExecError::TransactionLost(error)) => return Ok(Err((vec![index], error))),
            Err(ExecError::Db(e)) => {
                let what = format!("migration {}", migration.name);
                match sql::limit_error(&e, None, &what, &limits, None) {
                    Some(error) if self.tx.is_autocommit() => {
                        return Ok(Err((vec![index], error)));
                    }
                    Some(error) => Err(error),
                    None => return Err(e),
                }
            }
        };
        match outcome {
            Ok(()) => {
                set_meta(self.tx, SCHEMA_VERSION_KEY, migration.version as u64)?;
                self.sql_wrote = true;
                self.replies.push(Ok(Reply::Migrated(Migrated {
                    version: migration.version,
                    applied: true,
                })));
            }
            Err(error) => self.replies.push(Err(error)),
        }
        self.current = self.read_count();
        Ok(Ok(()))
    }

    /// The answer, stored first when it is to be kept for its key.
    fn store_answer(
        &mut self,
        epoch: u64,
        request: &SqlRequest,
        key: Option<&str>,
        executed: sql::Executed,
    ) -> Result<SqlAnswer, SqlError> {
        let wrote = executed.wrote && !request.read_only;
        if wrote && let Some(key) = key {
            // The answer may be larger than a value the tenant's own
            // statements may make: it is tenantd's, not the tenant's.
            limits::with_internal_length(self.tx, || {
                self.tx.execute(
                    "INSERT INTO tenantd_sql_answers (key, epoch, results, request) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        KeyHash::of(key).as_blob(),
                        epoch as i64,
                        executed.results.to_string(),
                        &sql::body::fingerprint(request)[..]
                    ],
                )
            })
            .map_err(|e| {
                    let what = "storing the answer for the Idempotency-Key";
                    sql::limit_error(&e, None, what, self.ctx.limits, None)
                        .unwrap_or_else(|| SqlError::invalid(None, format!("{what}: {e}")))
                })?;
        }
        self.sql_wrote |= wrote;
        Ok(SqlAnswer {
            epoch,
            repeated: false,
            results: Arc::new(executed.results),
        })
    }
}

fn set_max_page_count(conn: &Connection, pages: u64) -> rusqlite::Result<()> {
    conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
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

/// The first answer of an increment made with `key`: its count and epoch.
fn seen_key(tx: &Transaction, key: &str) -> rusqlite::Result<Option<(u64, u64)>> {
    let hash = KeyHash::of(key);
    let seen = tx
        .query_row(
            "SELECT count, epoch FROM tenantd_idempotency WHERE key IN (?1, ?2)",
            params![hash.as_blob(), key],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?;
    Ok(seen.map(|(count, epoch)| (count as u64, epoch as u64)))
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
            sqlite_code: None,
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

fn set_meta(tx: &Connection, key: &str, value: u64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO tenantd_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value as i64],
    )?;
    Ok(())
}

fn bump_seq(tx: &Connection) -> rusqlite::Result<u64> {
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

    fn sql(db: &mut Db, statements: &[&str]) -> Result<Reply, SqlError> {
        let body = serde_json::json!({"statements": statements.iter().map(|s| serde_json::json!({"sql": s})).collect::<Vec<_>>()});
        let request =
            SqlRequest::parse(body.to_string().as_bytes(), &SqlLimits::default()).unwrap();
        let applied = db
            .apply_batch(
                1,
                &[Work::Sql(&request, None)],
                &SqlLimits::default(),
                false,
            )
            .unwrap();
        applied.replies.into_iter().next().unwrap()
    }

    #[test]
    fn a_broken_counter_fails_its_increments_alone() {
        let (_dir, mut db) = fresh();
        db.apply(1, &[None]).unwrap();
        sql(&mut db, &["UPDATE welcome SET count = 'many'"]).unwrap();
        let fix = SqlRequest::parse(
            br#"{"statements": [{"sql": "UPDATE welcome SET count = 5"}]}"#,
            &SqlLimits::default(),
        )
        .unwrap();
        let work = [
            Work::Increment(None),
            Work::Sql(&fix, None),
            Work::Increment(Some("k")),
            Work::Read,
        ];
        let applied = db
            .apply_batch(1, &work, &SqlLimits::default(), false)
            .unwrap();
        let error = applied.replies[0].clone().unwrap_err();
        assert_eq!(error.kind, SqlErrorKind::Conflict, "{error}");
        assert!(error.message.contains("welcome"), "{error}");
        assert!(applied.replies[1].is_ok());
        let counts: Vec<u64> = applied.replies[2..]
            .iter()
            .map(|r| match r {
                Ok(Reply::Count(a)) => a.count,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counts, vec![6, 6]);
        assert_eq!(db.count().unwrap(), 6);
    }

    #[test]
    fn a_unique_index_on_the_counter_is_a_conflict_and_rolls_back_the_group() {
        let (_dir, mut db) = fresh();
        db.apply(1, &[None]).unwrap();
        sql(
            &mut db,
            &[
                "INSERT INTO welcome (count) VALUES (100)",
                "CREATE UNIQUE INDEX u ON welcome(count)",
            ],
        )
        .unwrap();
        let applied = db
            .apply_batch(
                1,
                &[Work::Increment(Some("a")), Work::Increment(None)],
                &SqlLimits::default(),
                false,
            )
            .unwrap();
        for reply in &applied.replies {
            let error = reply.clone().unwrap_err();
            assert_eq!(error.kind, SqlErrorKind::Conflict);
            assert!(
                error
                    .message
                    .contains("UNIQUE constraint failed: welcome.count"),
                "{error}"
            );
        }
        assert!(applied.committed.is_none(), "nothing to upload");
        // The key was not kept: once repaired, it counts.
        sql(
            &mut db,
            &["DROP INDEX u", "DELETE FROM welcome WHERE count = 100"],
        )
        .unwrap();
        let (answers, _) = db.apply(1, &[Some("a")]).unwrap();
        assert_eq!(counts(&answers), vec![(2, false)]);
    }

    #[test]
    fn a_stored_answer_counts_against_max_db_bytes() {
        let (_dir, mut db) = fresh();
        let limits = SqlLimits {
            max_db_bytes: 1 << 20,
            ..SqlLimits::default()
        };
        let request = SqlRequest::parse(
            br#"{"statements": [{"sql": "CREATE TABLE IF NOT EXISTS t(x)"}, {"sql": "SELECT hex(randomblob(400000))"}]}"#,
            &limits,
        )
        .unwrap();
        let keys: Vec<String> = (0..4).map(|i| format!("k{i}")).collect();
        let work: Vec<Work> = keys.iter().map(|k| Work::Sql(&request, Some(k))).collect();
        let applied = db.apply_batch(1, &work, &limits, false).unwrap();
        let refused: Vec<&SqlError> = applied
            .replies
            .iter()
            .filter_map(|r| r.as_ref().err())
            .collect();
        assert!(
            !refused.is_empty(),
            "four answers of 800 kB cannot fit in 1 MiB"
        );
        for error in refused {
            assert_eq!(error.kind, SqlErrorKind::Limit);
            assert!(error.message.contains("--max-db-bytes"), "{error}");
        }
        let pages: i64 = db
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        let size: i64 = db
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert!((pages * size) as u64 <= 1 << 20);
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
