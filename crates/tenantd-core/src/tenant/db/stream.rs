//! A Hrana stream's interactive transaction on the tenant's connection:
//! opened (`BEGIN IMMEDIATE`) by the actor for a pipeline that starts one
//! without ending it, kept open across the stream's pipelines, and
//! committed like a batch (epoch written, seq bumped) or rolled back.

use serde_json::Value as Json;

use super::{Committed, Db, bump_seq, count, set_max_page_count, set_meta};
use crate::tenant::sql::{self, ExecError, SqlError, SqlLimits, hrana};

/// A pipeline run in the open transaction.
pub struct RanOpen {
    /// The pipeline's answer (`results` and the next baton).
    pub answer: Json,
    /// The client's transaction is still open.
    pub open: bool,
    /// Anything may have changed since the transaction began: ending it
    /// needs a commit.
    pub wrote: bool,
}

impl Db {
    /// Opens the transaction a stream's pipelines run in; the tenant's
    /// size limit applies to what they write.
    pub fn begin_open(&mut self, limits: &SqlLimits) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let page_size = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))?
            .max(512) as u64;
        if let Err(e) = set_max_page_count(&self.conn, (limits.max_db_bytes / page_size).max(1)) {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        Ok(())
    }

    /// Runs a pipeline of the stream in the open transaction. An `Err`
    /// means the transaction is gone (SQLite rolled it back, or a statement
    /// failed the database itself): the caller rolls back what is left.
    pub fn run_open(
        &mut self,
        program: &hrana::Program,
        stream: &mut hrana::StreamState,
        limits: &SqlLimits,
    ) -> Result<RanOpen, SqlError> {
        let ctx = sql::Context {
            guard: &self.guard,
            interrupt: &self.interrupt,
            limits,
        };
        let ran = match hrana::run(&self.conn, &ctx, program, stream, true) {
            Ok(ran) => ran,
            Err(ExecError::Refused(error) | ExecError::TransactionLost(error)) => {
                return Err(error);
            }
            Err(ExecError::Db(e)) => {
                return Err(sql::limit_error(&e, None, "the pipeline", limits, None)
                    .unwrap_or_else(|| SqlError::invalid(None, format!("SQLite error: {e}"))));
            }
        };
        if self.conn.is_autocommit() {
            return Err(SqlError::invalid(
                None,
                "SQLite rolled the transaction back (a statement failed it)",
            ));
        }
        stream.open_wrote |= ran.wrote;
        let wrote = stream.open_wrote;
        if !stream.in_tx {
            stream.open_wrote = false;
        }
        Ok(RanOpen {
            answer: hrana::answer(ran.results, stream),
            open: stream.in_tx,
            wrote,
        })
    }

    /// Commits the open transaction as a batch: the caller captures and
    /// uploads it, and answers once the upload is confirmed.
    pub fn commit_open(&mut self, epoch: u64) -> rusqlite::Result<Committed> {
        set_max_page_count(&self.conn, u32::MAX as u64 - 1)?;
        set_meta(&self.conn, "epoch", epoch)?;
        let seq = bump_seq(&self.conn)?;
        let count = count(&self.conn).unwrap_or(0);
        self.conn.execute_batch("COMMIT")?;
        Ok(Committed { count, seq })
    }

    /// Undoes the open transaction, whatever is left of it.
    pub fn rollback_open(&mut self) -> rusqlite::Result<()> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        set_max_page_count(&self.conn, u32::MAX as u64 - 1)
    }
}
