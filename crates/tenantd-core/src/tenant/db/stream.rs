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

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};

    use super::*;
    use crate::tenant::sql::hrana::proto::PipelineBody;

    fn program(requests: Json) -> hrana::Program {
        let body: PipelineBody =
            serde_json::from_value(json!({"baton": null, "requests": requests})).unwrap();
        hrana::Program {
            requests: body.requests,
            read_only: false,
            baton: None,
        }
    }

    fn execute(sql: &str) -> Json {
        json!({"type": "execute", "stmt": {"sql": sql}})
    }

    fn rows(db: &Db, sql: &str) -> i64 {
        db.conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn an_open_transaction_spans_pipelines_and_commits_or_rolls_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
        db.conn.execute_batch("CREATE TABLE t (x)").unwrap();
        let limits = SqlLimits::default();
        let seq = db.seq().unwrap();
        for commit in [true, false] {
            let mut stream = hrana::StreamState::default();
            db.begin_open(&limits).unwrap();
            let first = db
                .run_open(
                    &program(json!([
                        execute("BEGIN"),
                        execute("INSERT INTO t VALUES (1)")
                    ])),
                    &mut stream,
                    &limits,
                )
                .unwrap();
            assert!(first.open && first.wrote);
            let second = db
                .run_open(
                    &program(json!([execute("SELECT count(*) FROM t")])),
                    &mut stream,
                    &limits,
                )
                .unwrap();
            assert!(second.open);
            let seen = &second.answer["results"][0]["response"]["result"]["rows"][0][0]["value"];
            assert_eq!(
                seen,
                &json!(if commit { "1" } else { "2" }),
                "reads see the transaction's own writes"
            );
            let end = if commit { "COMMIT" } else { "ROLLBACK" };
            let last = db
                .run_open(&program(json!([execute(end)])), &mut stream, &limits)
                .unwrap();
            assert!(!last.open);
            assert!(
                last.wrote,
                "the end of a transaction that wrote is committed or undone whole"
            );
            if commit {
                assert_eq!(db.commit_open(7).unwrap().seq, seq + 1);
            } else {
                db.commit_open(7).unwrap();
            }
        }
        // The committed transaction's row; nothing of the rolled back one.
        assert_eq!(rows(&db, "SELECT count(*) FROM t"), 1);
        assert!(db.conn.is_autocommit());
    }

    #[test]
    fn rollback_open_undoes_everything_since_begin() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("db.sqlite3")).unwrap();
        db.conn.execute_batch("CREATE TABLE t (x)").unwrap();
        let limits = SqlLimits::default();
        let mut stream = hrana::StreamState::default();
        db.begin_open(&limits).unwrap();
        db.run_open(
            &program(json!([
                execute("BEGIN"),
                execute("INSERT INTO t VALUES (1)")
            ])),
            &mut stream,
            &limits,
        )
        .unwrap();
        db.rollback_open().unwrap();
        assert_eq!(rows(&db, "SELECT count(*) FROM t"), 0);
        assert!(db.conn.is_autocommit());
    }
}
