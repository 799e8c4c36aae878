//! The tenant's SQLite file: the original app's `welcome(count)` table plus
//! tenantd's own bookkeeping.
//!
//! - `tenantd_meta(key, value)`: `epoch` of the holder that last wrote, and
//!   `seq`, bumped by every commit so that every upload changes the bytes
//!   (S3 ETags are content hashes: equal bytes would make a stale `If-Match`
//!   succeed).
//! - `tenantd_idempotency(key, count, epoch)`: answers of increments made
//!   with an `Idempotency-Key`, the oldest dropped beyond a bound.
//!
//! Only the tenant actor calls into this module, so a connection is never
//! shared between tasks.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::Answer;

/// How many idempotency keys a tenant remembers (oldest out first).
pub const IDEMPOTENCY_KEYS_KEPT: i64 = 10_000;

/// A database that could not be opened as tenantd's: not SQLite at all, or
/// SQLite with an incompatible `welcome` table.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Corrupt(pub String);

pub struct Db {
    conn: Connection,
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
        let conn = Connection::open(path).map_err(|e| Corrupt(format!("cannot open: {e}")))?;
        // Reading the schema forces SQLite to parse the header: a file that
        // is not a database fails here ("file is not a database").
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(|e| Corrupt(format!("not a SQLite database: {e}")))?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| Corrupt(format!("integrity check failed: {e}")))?;
        if check != "ok" {
            return Err(Corrupt(format!("integrity check failed: {check}")));
        }
        // The store, not this file, is what makes a write durable: a crash
        // drops the local copy anyway, so fsyncs here would buy nothing.
        conn.execute_batch(
            "PRAGMA synchronous = OFF;
             PRAGMA journal_mode = DELETE;
             CREATE TABLE IF NOT EXISTS welcome (count INTEGER);
             CREATE TABLE IF NOT EXISTS tenantd_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tenantd_idempotency (
                 key TEXT PRIMARY KEY, count INTEGER NOT NULL, epoch INTEGER NOT NULL);",
        )
        .map_err(|e| Corrupt(format!("cannot prepare the schema: {e}")))?;
        conn.query_row("SELECT count(*) FROM welcome", [], |r| r.get::<_, i64>(0))
            .map_err(|e| Corrupt(format!("table welcome is not the counter table: {e}")))?;
        Ok(Db { conn })
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

    /// Applies a batch of increments in one transaction. `keys[i]` is the
    /// idempotency key of the i-th increment, if any. Returns the answer of
    /// each: a repeated key gets its first answer (count and epoch).
    pub fn apply(
        &mut self,
        epoch: u64,
        keys: &[Option<&str>],
    ) -> rusqlite::Result<(Vec<Answer>, Committed)> {
        let tx = self.conn.transaction()?;
        if tx.query_row("SELECT count(*) FROM welcome", [], |r| r.get::<_, i64>(0))? == 0 {
            tx.execute("INSERT INTO welcome (count) VALUES (0)", [])?;
        }
        let mut current = count(&tx)?;
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(key) = key {
                let seen = tx
                    .query_row(
                        "SELECT count, epoch FROM tenantd_idempotency WHERE key = ?1",
                        [key],
                        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                    )
                    .optional()?;
                if let Some((count, first_epoch)) = seen {
                    answers.push(Answer {
                        count: count as u64,
                        epoch: first_epoch as u64,
                        repeated: true,
                    });
                    continue;
                }
                current += 1;
                tx.execute(
                    "INSERT INTO tenantd_idempotency (key, count, epoch) VALUES (?1, ?2, ?3)",
                    params![key, current as i64, epoch as i64],
                )?;
            } else {
                current += 1;
            }
            answers.push(Answer {
                count: current,
                epoch,
                repeated: false,
            });
        }
        tx.execute("UPDATE welcome SET count = ?1", [current as i64])?;
        tx.execute(
            "DELETE FROM tenantd_idempotency WHERE rowid <= (SELECT max(rowid) FROM tenantd_idempotency) - ?1",
            [IDEMPOTENCY_KEYS_KEPT],
        )?;
        set_meta(&tx, "epoch", epoch)?;
        let seq = bump_seq(&tx)?;
        tx.commit()?;
        Ok((
            answers,
            Committed {
                count: current,
                seq,
            },
        ))
    }
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
}
