//! Hrana's stream requests run on a tenant's connection: the encoding
//! layer over the SQL executor. Every statement goes through
//! [`super::execute`] (authorizer, limits, watchdog, answer budget), one
//! statement per call; this module only decides which statements run
//! (batch conditions, stored SQL, sequences) and puts the executor's
//! answers into Hrana's shapes.
//!
//! A pipeline runs inside the actor's batch transaction, so its writes
//! join the group commit and are answered once durable. `BEGIN`, `COMMIT`
//! and `ROLLBACK` become a savepoint of that transaction (the executor
//! refuses transaction control of its own): a client's transaction is
//! all or nothing within the batch that commits it. A pipeline that
//! leaves its transaction open for the stream's next one runs instead in
//! a transaction of its own that the actor keeps open
//! (`tenant::actor::streams`).

pub mod codes;
pub mod proto;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::{Map, Value as Json, json};

use super::cursor::{Cursor, PrepareError, first_statement_len};
use super::{Context, ExecError, Params, SqlError, SqlLimits, SqlRequest, Statement};
use proto::{Batch, Cond, Stmt, StreamRequest, error_json, value_json};

/// Stored SQL texts one stream may keep.
const MAX_STORED_SQL: usize = 1_000;

/// One pipeline's requests, checked for size before they reach the actor.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub requests: Vec<StreamRequest>,
    /// A read-only token's pipeline: every statement is run read-only.
    pub read_only: bool,
    /// The stream it continues (checked by the holder), if any.
    pub baton: Option<String>,
}

impl Program {
    /// Refuses a pipeline over the statement limit of one `/sql` request.
    pub fn check(&self, limits: &SqlLimits) -> Result<(), String> {
        let statements: usize = self.requests.iter().map(StreamRequest::statements).sum();
        if statements > limits.max_statements {
            return Err(format!(
                "the pipeline has {statements} statements; at most {} are allowed in one pipeline, as in one /sql request: send them in several pipelines",
                limits.max_statements
            ));
        }
        Ok(())
    }

    /// The pipeline closes its stream last: nothing of it outlives it.
    pub fn ends_with_close(&self) -> bool {
        matches!(self.requests.last(), Some(StreamRequest::Close))
    }

    /// Whether a follower may try the pipeline: it continues no stream,
    /// leaves nothing on one (stored SQL only when it closes the stream),
    /// and every statement it names by text looks like a read (a cheap
    /// first look, so that a write reaching a follower goes to the holder
    /// without the follower catching up first; the replica's connection
    /// decides, as SQLite judges each statement).
    pub fn may_run_on_replica(&self) -> bool {
        if self.baton.is_some() {
            return false;
        }
        let reads = |stmt: &Stmt| stmt.sql.as_deref().is_none_or(looks_like_a_read);
        let closes = self.ends_with_close();
        self.requests.iter().all(|request| match request {
            StreamRequest::Execute { stmt } => reads(stmt),
            StreamRequest::Batch { batch } => batch.steps.iter().all(|step| reads(&step.stmt)),
            StreamRequest::Sequence { sql, .. } => sql.as_deref().is_none_or(looks_like_a_read),
            StreamRequest::Describe { .. }
            | StreamRequest::GetAutocommit
            | StreamRequest::Close => true,
            StreamRequest::StoreSql { .. } | StreamRequest::CloseSql { .. } => closes,
        })
    }

    /// Whether the pipeline may start a transaction (`BEGIN` in an
    /// `execute` or a batch step, by text or by a stored SQL id).
    pub fn may_begin(&self, stored: &HashMap<i32, String>) -> bool {
        let mut stored = stored.clone();
        let begins = |stmt: &Stmt, stored: &HashMap<i32, String>| {
            let sql = match (&stmt.sql, stmt.sql_id) {
                (Some(sql), _) => Some(sql),
                (None, Some(id)) => stored.get(&id),
                _ => None,
            };
            sql.and_then(|sql| transaction_control(sql)) == Some(Control::Begin)
        };
        for request in &self.requests {
            match request {
                StreamRequest::StoreSql { sql_id, sql } => {
                    stored.insert(*sql_id, sql.clone());
                }
                StreamRequest::Execute { stmt } if begins(stmt, &stored) => return true,
                StreamRequest::Batch { batch }
                    if batch.steps.iter().any(|step| begins(&step.stmt, &stored)) =>
                {
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

/// What a stream carries from one request to the next.
#[derive(Clone, Debug, Default)]
pub struct StreamState {
    /// A `BEGIN` is open (the `hrana_tx` savepoint).
    pub in_tx: bool,
    pub sqls: HashMap<i32, String>,
    /// The baton the stream's next pipeline is to send (None: the stream
    /// ends with this pipeline).
    pub baton: Option<String>,
    /// A `close` request ended the stream.
    pub closed: bool,
    /// A pipeline of the transaction the actor keeps open may have
    /// written: ending it needs a commit.
    pub open_wrote: bool,
}

/// A pipeline run to its end: one `StreamResult` per request.
#[derive(Debug)]
pub struct Ran {
    pub results: Vec<Json>,
    /// Whether anything may have changed: the batch needs a commit.
    pub wrote: bool,
    /// The stream was closed by a `close` request.
    pub closed: bool,
    /// Run on a replica: a statement wrote or controlled a transaction,
    /// so the results stand for nothing and the holder answers.
    pub needs_holder: bool,
}

/// Runs a pipeline on `conn` inside the open batch transaction. A
/// transaction left open by a closed stream is rolled back, and so is one
/// left open at the end of the pipeline unless `may_stay_open` (the actor
/// keeps it open for the stream's next pipeline).
pub fn run(
    conn: &Connection,
    ctx: &Context<'_>,
    program: &Program,
    stream: &mut StreamState,
    may_stay_open: bool,
) -> Result<Ran, ExecError> {
    run_on(conn, ctx, program, stream, may_stay_open, false)
}

/// Runs a pipeline that [`Program::may_run_on_replica`] on a replica's
/// read-only connection: every statement read-only as SQLite judges it.
/// `None` when one writes or controls a transaction: the holder answers
/// the whole pipeline instead.
pub fn run_on_replica(
    conn: &Connection,
    ctx: &Context<'_>,
    program: &Program,
) -> Result<Option<Json>, ExecError> {
    let mut stream = StreamState::default();
    let ran = run_on(conn, ctx, program, &mut stream, false, true)?;
    if ran.needs_holder {
        return Ok(None);
    }
    // No baton: a replica keeps no stream, and the client's next
    // pipeline starts a new one (the spec's "the server closed it").
    stream.baton = None;
    Ok(Some(answer(ran.results, &stream)))
}

fn run_on(
    conn: &Connection,
    ctx: &Context<'_>,
    program: &Program,
    stream: &mut StreamState,
    may_stay_open: bool,
    on_replica: bool,
) -> Result<Ran, ExecError> {
    let mut runner = Runner {
        conn,
        ctx,
        read_only: program.read_only || on_replica,
        on_replica,
        needs_holder: false,
        stream,
        deadline: Instant::now() + ctx.limits.timeout,
        rows: ctx.limits.max_rows,
        bytes: ctx.limits.max_result_bytes,
        wrote: false,
    };
    let mut results = Vec::with_capacity(program.requests.len());
    let mut closed = false;
    // The request whose BEGIN opened the transaction still open.
    let mut opened_at = None;
    for (index, request) in program.requests.iter().enumerate() {
        let was_open = runner.stream.in_tx;
        if closed {
            results.push(failed(
                "the stream was closed by an earlier request of this pipeline",
                "STREAM_CLOSED",
            ));
            continue;
        }
        let outcome = runner.request(request)?;
        if matches!(request, StreamRequest::Close) {
            closed = true;
        }
        results.push(match outcome {
            Ok(response) => json!({"type": "ok", "response": response}),
            Err(error) => json!({"type": "error", "error": error}),
        });
        match (was_open, runner.stream.in_tx) {
            (false, true) => opened_at = Some(index),
            (_, false) => opened_at = None,
            (true, true) => {}
        }
    }
    if let Some(opened_at) = opened_at
        && !closed
        && !may_stay_open
    {
        // Only a pipeline the actor runs in a transaction of its own may
        // leave it open (one whose BEGIN it could see coming): what it did
        // is undone, and every answer from its BEGIN on says so; what came
        // before it stands.
        runner.end_transaction(false).map_err(ExecError::Db)?;
        for result in &mut results[opened_at..] {
            *result = failed(
                "a transaction begun inside a sequence cannot stay open past its pipeline: it was rolled back; send BEGIN as its own execute, or BEGIN … COMMIT in one pipeline",
                "TRANSACTION_NOT_SUPPORTED",
            );
        }
    }
    if closed {
        runner.end_transaction(false).map_err(ExecError::Db)?;
    }
    runner.stream.closed |= closed;
    Ok(Ran {
        results,
        wrote: runner.wrote,
        closed,
        needs_holder: runner.needs_holder,
    })
}

/// A pipeline's answer as the actor hands it on: `results`, and the baton
/// of the stream's next pipeline (null once the stream has ended).
pub fn answer(results: Vec<Json>, stream: &StreamState) -> Json {
    let baton = match stream.closed {
        true => None,
        false => stream.baton.clone(),
    };
    json!({"baton": baton, "results": results})
}

/// A pipeline refused as a whole: its stream is gone (an old, foreign or
/// forged baton, an expired stream, a transaction rolled back at its time
/// bound); nothing of it ran.
pub fn stream_error(message: &str) -> Json {
    json!({"stream_error": error_json(message, "STREAM_EXPIRED")})
}

/// Ends a stream's open transaction: what it wrote is undone.
pub fn roll_back(conn: &Connection, stream: &mut StreamState) -> rusqlite::Result<()> {
    if stream.in_tx {
        conn.execute_batch("ROLLBACK TO hrana_tx; RELEASE hrana_tx")?;
        stream.in_tx = false;
    }
    Ok(())
}

fn failed(message: &str, code: &str) -> Json {
    json!({"type": "error", "error": error_json(message, code)})
}

/// A request's answer, or its Hrana error.
type Outcome = Result<Json, Json>;

struct Runner<'a, 'c> {
    conn: &'c Connection,
    ctx: &'a Context<'a>,
    read_only: bool,
    /// On a follower's replica: what only the holder may run is noted
    /// in `needs_holder`, not answered.
    on_replica: bool,
    needs_holder: bool,
    stream: &'a mut StreamState,
    /// The pipeline's statements together get the time one `/sql`
    /// request gets, and its answers the same budget.
    deadline: Instant,
    rows: usize,
    bytes: usize,
    wrote: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Control {
    Begin,
    Commit,
    Rollback,
}

impl Runner<'_, '_> {
    fn request(&mut self, request: &StreamRequest) -> Result<Outcome, ExecError> {
        Ok(match request {
            StreamRequest::Close => Ok(json!({"type": "close"})),
            StreamRequest::Execute { stmt } => self
                .stmt(stmt)?
                .map(|result| json!({"type": "execute", "result": result})),
            StreamRequest::Batch { batch } => {
                let result = self.batch(batch)?;
                Ok(json!({"type": "batch", "result": result}))
            }
            StreamRequest::Sequence { sql, sql_id } => match self.sql_text(sql, sql_id) {
                Ok(sql) => self.sequence(&sql)?.map(|()| json!({"type": "sequence"})),
                Err(e) => Err(e),
            },
            StreamRequest::Describe { sql, sql_id } => match self.sql_text(sql, sql_id) {
                Ok(sql) => self
                    .describe(&sql)
                    .map(|result| json!({"type": "describe", "result": result})),
                Err(e) => Err(e),
            },
            StreamRequest::StoreSql { sql_id, sql } => {
                if self.stream.sqls.len() >= MAX_STORED_SQL
                    && !self.stream.sqls.contains_key(sql_id)
                {
                    Err(error_json(
                        &format!(
                            "a stream may store at most {MAX_STORED_SQL} SQL texts: close_sql the ones no longer used"
                        ),
                        "SQL_STORE_FULL",
                    ))
                } else {
                    self.stream.sqls.insert(*sql_id, sql.clone());
                    Ok(json!({"type": "store_sql"}))
                }
            }
            StreamRequest::CloseSql { sql_id } => {
                self.stream.sqls.remove(sql_id);
                Ok(json!({"type": "close_sql"}))
            }
            StreamRequest::GetAutocommit => Ok(json!({
                "type": "get_autocommit",
                "is_autocommit": !self.stream.in_tx,
            })),
        })
    }

    fn sql_text(&self, sql: &Option<String>, sql_id: &Option<i32>) -> Result<String, Json> {
        match (sql, sql_id) {
            (Some(sql), None) => Ok(sql.clone()),
            (None, Some(id)) => self.stream.sqls.get(id).cloned().ok_or_else(|| {
                error_json(
                    &format!("no SQL text is stored under sql_id {id} on this stream: send store_sql first"),
                    "SQL_NOT_FOUND",
                )
            }),
            _ => Err(error_json(
                "a statement needs exactly one of \"sql\" and \"sql_id\"",
                "SQL_INVALID",
            )),
        }
    }

    fn batch(&mut self, batch: &Batch) -> Result<Json, ExecError> {
        let mut outcomes: Vec<Option<bool>> = Vec::with_capacity(batch.steps.len());
        let mut step_results = Vec::with_capacity(batch.steps.len());
        let mut step_errors = Vec::with_capacity(batch.steps.len());
        for step in &batch.steps {
            let run = step
                .condition
                .as_ref()
                .is_none_or(|cond| self.holds(cond, &outcomes));
            if !run {
                outcomes.push(None);
                step_results.push(Json::Null);
                step_errors.push(Json::Null);
                continue;
            }
            match self.stmt(&step.stmt)? {
                Ok(result) => {
                    outcomes.push(Some(true));
                    step_results.push(result);
                    step_errors.push(Json::Null);
                }
                Err(error) => {
                    outcomes.push(Some(false));
                    step_results.push(Json::Null);
                    step_errors.push(error);
                }
            }
        }
        Ok(json!({"step_results": step_results, "step_errors": step_errors}))
    }

    /// A condition on the steps before this one (a step not yet run, or
    /// skipped, is neither ok nor an error).
    fn holds(&self, cond: &Cond, outcomes: &[Option<bool>]) -> bool {
        let outcome = |step: u32| outcomes.get(step as usize).copied().flatten();
        match cond {
            Cond::Ok { step } => outcome(*step) == Some(true),
            Cond::Error { step } => outcome(*step) == Some(false),
            Cond::Not { cond } => !self.holds(cond, outcomes),
            Cond::And { conds } => conds.iter().all(|c| self.holds(c, outcomes)),
            Cond::Or { conds } => conds.iter().any(|c| self.holds(c, outcomes)),
            Cond::IsAutocommit => !self.stream.in_tx,
        }
    }

    fn sequence(&mut self, sql: &str) -> Result<Result<(), Json>, ExecError> {
        let mut rest = sql;
        loop {
            let found = {
                let _user = self.ctx.guard.enter(self.ctx.limits.timeout);
                first_statement_len(self.conn, rest)
            };
            let len = match found {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(Ok(())),
                Err(e) => return Ok(Err(sql_error(&self.prepare_error(&e)))),
            };
            let (first, tail) = rest.split_at(len.min(rest.len()));
            let stmt = Stmt {
                sql: Some(first.to_string()),
                sql_id: None,
                args: Vec::new(),
                named_args: Vec::new(),
                want_rows: Some(false),
            };
            if let Err(error) = self.stmt(&stmt)? {
                return Ok(Err(error));
            }
            rest = tail;
        }
    }

    /// A statement SQLite would not prepare: the authorizer's rule when
    /// it was the one refusing (as `/sql` names it), else SQLite's error.
    fn prepare_error(&self, e: &rusqlite::Error) -> SqlError {
        match self.ctx.guard.take_denial() {
            Some(rule) => SqlError::new(
                super::SqlErrorKind::Denied,
                Some(0),
                format!("statement is not allowed: {rule}"),
            ),
            None => SqlError::invalid(Some(0), e.to_string()).with_sqlite_code(e),
        }
    }

    fn describe(&mut self, sql: &str) -> Outcome {
        let _user = self.ctx.guard.enter(self.ctx.limits.timeout);
        let cursor = match Cursor::prepare(self.conn, sql) {
            Ok(cursor) => cursor,
            Err(PrepareError::Sqlite(e)) => return Err(sql_error(&self.prepare_error(&e))),
            Err(PrepareError::Empty) => {
                return Err(error_json(
                    "the SQL text has only comments",
                    "SQLITE_MISUSE",
                ));
            }
            Err(PrepareError::Multiple) => {
                return Err(error_json(
                    "the SQL text holds more than one statement: describe one at a time",
                    "SQLITE_MISUSE",
                ));
            }
        };
        let params: Vec<Json> = (1..=cursor.parameter_count())
            .map(|i| json!({"name": cursor.parameter_name(i)}))
            .collect();
        let cols: Vec<Json> = (0..cursor.column_count())
            .map(|i| {
                json!({
                    "name": cursor.column_name(i).map(|n| String::from_utf8_lossy(n).into_owned()),
                    "decltype": cursor.column_decltype(i),
                })
            })
            .collect();
        Ok(json!({
            "params": params,
            "cols": cols,
            "is_explain": cursor.is_explain(),
            "is_readonly": cursor.readonly(),
        }))
    }

    /// One statement: transaction control here, everything else through
    /// the executor.
    fn stmt(&mut self, stmt: &Stmt) -> Result<Outcome, ExecError> {
        let sql = match self.sql_text(&stmt.sql, &stmt.sql_id) {
            Ok(sql) => sql,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(control) = transaction_control(&sql) {
            if self.on_replica {
                return Ok(Err(self.for_holder()));
            }
            return self.control(control).map_err(ExecError::Db);
        }
        let params = match params(stmt) {
            Ok(params) => params,
            Err(message) => return Ok(Err(error_json(&message, "SQLITE_RANGE"))),
        };
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_millis(1) {
            return Ok(Err(error_json(
                &format!(
                    "the pipeline ran past the time limit of {} (--sql-timeout, for one pipeline's statements together); the statement was not run",
                    humantime::format_duration(self.ctx.limits.timeout)
                ),
                "SQLITE_INTERRUPT",
            )));
        }
        let limits = SqlLimits {
            timeout: remaining,
            max_rows: self.rows,
            max_result_bytes: self.bytes,
            ..self.ctx.limits.clone()
        };
        let ctx = Context {
            guard: self.ctx.guard,
            interrupt: self.ctx.interrupt,
            limits: &limits,
        };
        let request = SqlRequest {
            statements: vec![Statement { sql, params }],
            read_only: self.read_only,
        };
        let executed = match super::execute(self.conn, &ctx, &request) {
            Ok(executed) => executed,
            // The executor's words for a read_only request would tell the
            // client to send another flag; here the token decides.
            Err(ExecError::Refused(error))
                if self.on_replica && error.message.contains("but the request is read_only") =>
            {
                return Ok(Err(self.for_holder()));
            }
            Err(ExecError::Refused(error))
                if self.read_only && error.message.contains("but the request is read_only") =>
            {
                return Ok(Err(error_json(
                    "this token is read-only: the statement writes to the database; writes need a read-write token (tenantd tokens create without --read-only)",
                    "SQLITE_READONLY",
                )));
            }
            Err(ExecError::Refused(error)) => return Ok(Err(sql_error(&error))),
            Err(other) => return Err(other),
        };
        self.wrote |= executed.wrote && !self.read_only;
        let size = executed.results.to_string().len();
        self.bytes = self.bytes.saturating_sub(size);
        let Some(result) = executed.results.get(0) else {
            return Ok(Err(error_json(
                "the statement gave no result",
                "SQLITE_INTERNAL",
            )));
        };
        let rows = result["rows"].as_array().map_or(&[][..], Vec::as_slice);
        self.rows = self.rows.saturating_sub(rows.len());
        Ok(Ok(stmt_result(result, stmt.want_rows.unwrap_or(true))))
    }

    /// A statement a replica must not answer; the answer is discarded.
    fn for_holder(&mut self) -> Json {
        self.needs_holder = true;
        error_json("only the holder runs this statement", "SQLITE_READONLY")
    }

    fn control(&mut self, control: Control) -> rusqlite::Result<Outcome> {
        let refused = |message: &str| Ok(Err(error_json(message, "SQLITE_ERROR")));
        match (control, self.stream.in_tx) {
            (Control::Begin, true) => {
                return refused("cannot start a transaction within a transaction");
            }
            (Control::Commit, false) => {
                return refused("cannot commit - no transaction is active");
            }
            (Control::Rollback, false) => {
                return refused("cannot rollback - no transaction is active");
            }
            (Control::Begin, false) => {
                self.conn.execute_batch("SAVEPOINT hrana_tx")?;
                self.stream.in_tx = true;
            }
            (Control::Commit, true) => self.end_transaction(true)?,
            (Control::Rollback, true) => self.end_transaction(false)?,
        }
        Ok(Ok(empty_result()))
    }

    fn end_transaction(&mut self, commit: bool) -> rusqlite::Result<()> {
        if !self.stream.in_tx {
            return Ok(());
        }
        if commit {
            self.conn.execute_batch("RELEASE hrana_tx")?;
            self.stream.in_tx = false;
            Ok(())
        } else {
            roll_back(self.conn, self.stream)
        }
    }
}

/// `BEGIN [DEFERRED|IMMEDIATE|EXCLUSIVE] [TRANSACTION]`, `COMMIT|END
/// [TRANSACTION]`, `ROLLBACK [TRANSACTION]`; anything else (`ROLLBACK TO`,
/// `SAVEPOINT`) goes to the executor, which refuses it.
fn transaction_control(sql: &str) -> Option<Control> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_ascii_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let (first, rest) = words.split_first()?;
    let transaction_only = |rest: &[String]| match rest {
        [] => true,
        [word] => word == "transaction",
        _ => false,
    };
    match first.as_str() {
        "begin" => {
            let rest = match rest.first().map(String::as_str) {
                Some("deferred" | "immediate" | "exclusive") => &rest[1..],
                _ => rest,
            };
            transaction_only(rest).then_some(Control::Begin)
        }
        "commit" | "end" => transaction_only(rest).then_some(Control::Commit),
        "rollback" => transaction_only(rest).then_some(Control::Rollback),
        _ => None,
    }
}

/// Whether a statement's first word is one a read starts with.
fn looks_like_a_read(sql: &str) -> bool {
    let mut rest = sql.trim_start();
    // Leading comments, as clients and ORMs prefix them.
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(
        word.as_str(),
        "select" | "with" | "values" | "explain" | "pragma"
    )
}

fn params(stmt: &Stmt) -> Result<Params, String> {
    if !stmt.args.is_empty() && !stmt.named_args.is_empty() {
        return Err("send either \"args\" or \"named_args\", not both".into());
    }
    if !stmt.named_args.is_empty() {
        return stmt
            .named_args
            .iter()
            .map(|arg| Ok((arg.name.clone(), arg.value.to_sql()?)))
            .collect::<Result<_, String>>()
            .map(Params::Named);
    }
    stmt.args
        .iter()
        .map(proto::Value::to_sql)
        .collect::<Result<_, _>>()
        .map(Params::Positional)
}

/// The executor's error as Hrana's `{message, code}`; the message loses
/// the `/sql` request's statement numbering (one statement per call).
pub fn sql_error(error: &SqlError) -> Json {
    let message = error
        .message
        .strip_prefix("statement 0: ")
        .or_else(|| error.message.strip_prefix("statement 0 "))
        .unwrap_or(&error.message);
    error_json(message, codes::of(error))
}

fn empty_result() -> Json {
    json!({
        "cols": [],
        "rows": [],
        "affected_row_count": 0,
        "last_insert_rowid": null,
        "rows_read": 0,
        "rows_written": 0,
        "query_duration_ms": 0.0,
    })
}

/// One statement's `/sql` result as Hrana's `StmtResult`.
fn stmt_result(result: &Json, want_rows: bool) -> Json {
    let cols: Vec<Json> = result["columns"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|name| json!({"name": name, "decltype": null}))
        .collect();
    let rows: Vec<Json> = match want_rows {
        false => Vec::new(),
        true => result["rows"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|row| {
                Json::Array(
                    row.as_array()
                        .map_or(&[][..], Vec::as_slice)
                        .iter()
                        .map(value_json)
                        .collect(),
                )
            })
            .collect(),
    };
    let affected = result["rows_affected"].as_u64().unwrap_or(0);
    let mut map = Map::new();
    map.insert("cols".into(), Json::Array(cols));
    map.insert("rows".into(), Json::Array(rows));
    map.insert("affected_row_count".into(), Json::from(affected));
    map.insert(
        "last_insert_rowid".into(),
        match result["last_insert_rowid"].as_i64() {
            Some(rowid) => Json::String(rowid.to_string()),
            None => Json::Null,
        },
    );
    map.insert("rows_read".into(), Json::from(0));
    map.insert("rows_written".into(), Json::from(affected));
    map.insert("query_duration_ms".into(), Json::from(0.0));
    Json::Object(map)
}

#[cfg(test)]
mod tests;
