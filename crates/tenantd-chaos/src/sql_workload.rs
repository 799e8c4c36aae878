//! The SQL workload: closed-loop clients moving money between the rows of
//! each customer's `chaos_accounts` table through `POST /customers/<id>/sql`,
//! each transfer one request of three statements (debit, credit, and a row
//! in `chaos_transfers` named by the client-chosen transfer id), sent with
//! that id as its `Idempotency-Key` and sent again with the same key after
//! an unclear outcome. Every eighth request of a client is a read-only
//! `SELECT count(*), sum(balance)` instead, which may land on a follower;
//! it also counts the rows of the client's last acknowledged transfer to
//! that customer (it must see it: no read older than the client's own
//! acknowledged write), and every other one carries that transfer's
//! `tenantd-bookmark` (the others rely on the follower's ReadIndex). At the end the tables are read
//! back through the API and, for a local cluster, from the database object
//! in the store once every machine has stopped.
//!
//! `chaos_transfers.id` is deliberately not unique: a transfer applied twice
//! must show up as two rows for the checker, not be masked by a constraint
//! error. Balances are `CHECK (balance >= 0)`, so an overdraft is refused
//! (400) and must leave nothing behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::sql_checker::{
    Accounts, FinalState, Finals, ReadOp, TransferOp, TransferOutcome, TransferRow,
};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{FaultConfig, StoreUrl, open_store};
use tenantd_core::tenant::log::Until;

/// Attempts of one transfer (the first and the retries with its key).
const MAX_ATTEMPTS: u32 = 5;
/// Transfers are 1..=this; a customer's accounts start at 500 each, so
/// overdrafts (refused, 400) happen now and then.
const MAX_AMOUNT: i64 = 200;
/// Rows per page when reading `chaos_transfers` back through the API.
const PAGE: usize = 4000;

/// The statements of one transfer.
pub fn transfer_body(id: &str, from: i64, to: i64, amount: i64) -> Value {
    json!({"statements": [
        {"sql": "UPDATE chaos_accounts SET balance = balance - ? WHERE id = ?", "params": [amount, from]},
        {"sql": "UPDATE chaos_accounts SET balance = balance + ? WHERE id = ?", "params": [amount, to]},
        {"sql": "INSERT INTO chaos_transfers (id, src, dst, amount) VALUES (?, ?, ?, ?)", "params": [id, from, to, amount]},
    ]})
}

/// What one request's answer was.
pub(super) enum Reply {
    Ok {
        epoch: u64,
        machine: String,
        replayed: bool,
        results: Vec<Value>,
        /// `tenantd-role` and `tenantd-bookmark` of the answer.
        role: Option<String>,
        bookmark: Option<u64>,
    },
    /// The SQL API refused it (a 4xx with a `code`): not applied.
    Refused { status: u16, error: String },
    /// Anything else: may or may not have been applied.
    Unclear(String),
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
            base: base.to_string(),
            token: token.to_string(),
        }
    }

    pub(super) async fn send(&self, customer: &str, body: &Value, key: Option<&str>) -> Reply {
        self.send_at(customer, body, key, None).await
    }

    /// [`Client::send`] asking for state at least as new as `bookmark`.
    async fn send_at(
        &self,
        customer: &str,
        body: &Value,
        key: Option<&str>,
        bookmark: Option<u64>,
    ) -> Reply {
        let mut request = self
            .http
            .post(format!("{}/customers/{customer}/sql", self.base))
            .bearer_auth(&self.token)
            .json(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(bookmark) = bookmark {
            request = request.header("tenantd-bookmark", bookmark.to_string());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Reply::Unclear(e.to_string()),
        };
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (role, bookmark) = (
            header("tenantd-role"),
            header("tenantd-bookmark").and_then(|b| b.parse().ok()),
        );
        let body: Value = match response.bytes().await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(
                |_| json!({"body": String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>()}),
            ),
            Err(e) => return Reply::Unclear(format!("{status}, body lost: {e}")),
        };
        match status {
            200 => match (body["epoch"].as_u64(), body["results"].as_array()) {
                (Some(epoch), Some(results)) => Reply::Ok {
                    epoch,
                    machine: body["machine_id"].as_str().unwrap_or_default().to_string(),
                    replayed,
                    results: results.clone(),
                    role,
                    bookmark,
                },
                _ => Reply::Unclear(format!("200 without results: {body}")),
            },
            400..=499 if body["code"].is_string() => Reply::Refused {
                status,
                error: body["error"].as_str().unwrap_or_default().to_string(),
            },
            _ => Reply::Unclear(format!("{status} {body}")),
        }
    }

    /// A read-only query's rows, or why not.
    async fn query(&self, customer: &str, statements: Value) -> Result<Vec<Vec<Value>>, String> {
        let body = json!({"statements": statements, "read_only": true});
        match self.send(customer, &body, None).await {
            Reply::Ok { results, .. } => Ok(results
                .iter()
                .flat_map(|r| r["rows"].as_array().cloned().unwrap_or_default())
                .map(|row| row.as_array().cloned().unwrap_or_default())
                .collect()),
            Reply::Refused { status, error } => Err(format!("{status}: {error}")),
            Reply::Unclear(e) => Err(e),
        }
    }

    /// Creates (or resets) the customer's tables: `accounts.count` rows of
    /// `accounts.initial_balance`, no transfers. One request with an
    /// `Idempotency-Key`, sent until it is acknowledged, so that a late
    /// copy of it cannot wipe transfers made after it.
    pub async fn setup(&self, customer: &str, accounts: Accounts, run: &str) -> anyhow::Result<()> {
        let body = json!({"statements": [
            {"sql": "CREATE TABLE IF NOT EXISTS chaos_accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0))"},
            {"sql": "CREATE TABLE IF NOT EXISTS chaos_transfers (id TEXT NOT NULL, src INTEGER NOT NULL, dst INTEGER NOT NULL, amount INTEGER NOT NULL)"},
            {"sql": "DELETE FROM chaos_transfers"},
            {"sql": "DELETE FROM chaos_accounts"},
            {"sql": "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) INSERT INTO chaos_accounts (id, balance) SELECT i, ? FROM n",
             "params": [accounts.count, accounts.initial_balance]},
        ]});
        let key = format!("{run}-setup");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.send(customer, &body, Some(&key)).await {
                Reply::Ok { .. } => return Ok(()),
                Reply::Refused { status, error } => {
                    anyhow::bail!(
                        "customer {customer}: the SQL API refused the chaos tables ({status}): {error}"
                    )
                }
                Reply::Unclear(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("customer {customer}: could not create the chaos tables in 60 s: {last}")
    }

    /// The customer's tables read back through the API, in pages, until
    /// two reads of the count agree around the pages.
    pub async fn final_state(&self, customer: &str) -> Result<FinalState, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.final_state_once(customer).await {
                Ok(Some(state)) => return Ok(state),
                Ok(None) => last = "the tables changed while they were read".into(),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last)
    }

    async fn final_state_once(&self, customer: &str) -> Result<Option<FinalState>, String> {
        let count_sql =
            json!({"sql": "SELECT count(*), coalesce(max(rowid), 0) FROM chaos_transfers"});
        let before = self.query(customer, json!([count_sql])).await?;
        let mut state = FinalState::default();
        for row in self
            .query(
                customer,
                json!([{"sql": "SELECT id, balance FROM chaos_accounts ORDER BY id"}]),
            )
            .await?
        {
            state.balances.insert(int(&row, 0)?, int(&row, 1)?);
        }
        let mut after_rowid = 0;
        loop {
            let rows = self
                .query(
                    customer,
                    json!([{"sql": "SELECT rowid, id, src, dst, amount FROM chaos_transfers WHERE rowid > ? ORDER BY rowid LIMIT ?",
                            "params": [after_rowid, PAGE]}]),
                )
                .await?;
            for row in &rows {
                after_rowid = int(row, 0)?;
                state.transfers.push(TransferRow {
                    id: row
                        .get(1)
                        .and_then(Value::as_str)
                        .ok_or("transfer id is not text")?
                        .to_string(),
                    src: int(row, 2)?,
                    dst: int(row, 3)?,
                    amount: int(row, 4)?,
                });
            }
            if rows.len() < PAGE {
                break;
            }
        }
        let after = self.query(customer, json!([count_sql])).await?;
        let balances_again = self
            .query(
                customer,
                json!([{"sql": "SELECT id, balance FROM chaos_accounts ORDER BY id"}]),
            )
            .await?;
        let same_balances = balances_again.len() == state.balances.len()
            && balances_again.iter().all(|row| {
                matches!((int(row, 0), int(row, 1)), (Ok(id), Ok(b)) if state.balances.get(&id) == Some(&b))
            });
        let read = before
            .first()
            .and_then(|r| r.first())
            .and_then(Value::as_i64);
        Ok(
            (before == after && same_balances && read == Some(state.transfers.len() as i64))
                .then_some(state),
        )
    }
}

fn int(row: &[Value], i: usize) -> Result<i64, String> {
    row.get(i)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("column {i} of {row:?} is not an integer"))
}

pub struct SqlWorkload {
    transfers: Arc<Mutex<Vec<TransferOp>>>,
    reads: Arc<Mutex<Vec<ReadOp>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

pub struct Start<'a> {
    pub client: &'a Client,
    pub customers: &'a [String],
    pub clients: usize,
    pub seed: u64,
    pub accounts: Accounts,
    /// Prefix of every transfer id (and key): unique per run.
    pub run: &'a str,
    pub t0: Instant,
}

impl SqlWorkload {
    pub fn start(s: Start<'_>) -> SqlWorkload {
        let transfers: Arc<Mutex<Vec<TransferOp>>> = Arc::default();
        let reads: Arc<Mutex<Vec<ReadOp>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..s.clients)
            .map(|client| {
                let (transfers, reads, stop) = (transfers.clone(), reads.clone(), stop.clone());
                let (http, customers, run) =
                    (s.client.clone(), s.customers.to_vec(), s.run.to_string());
                let (seed, accounts, t0) = (s.seed, s.accounts, s.t0);
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client as u64));
                    let mut n = 0u64;
                    // Per customer: this client's last acknowledged
                    // transfer and the bookmark of its answer.
                    let mut last: BTreeMap<String, (String, Option<u64>)> = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let customer = customers[rng.random_range(0..customers.len())].clone();
                        let start_ms = t0.elapsed().as_millis() as u64;
                        if n.is_multiple_of(8) {
                            let own = last.get(&customer).cloned();
                            let must_see = own.as_ref().map(|(id, _)| id.clone());
                            // Every other read carries the bookmark.
                            let bookmark_sent =
                                own.and_then(|(_, b)| b).filter(|_| n.is_multiple_of(16));
                            let read =
                                read_sum(&http, &customer, must_see.as_deref(), bookmark_sent)
                                    .await;
                            reads.lock().unwrap().push(ReadOp {
                                customer,
                                client,
                                start_ms,
                                end_ms: t0.elapsed().as_millis() as u64,
                                seen: read.as_ref().map(|r| r.seen),
                                must_see,
                                saw_own: read.as_ref().and_then(|r| r.saw_own),
                                bookmark_sent,
                                bookmark: read.as_ref().and_then(|r| r.bookmark),
                                role: read.and_then(|r| r.role),
                            });
                            continue;
                        }
                        let from = rng.random_range(0..accounts.count);
                        let to = (from + rng.random_range(1..accounts.count)) % accounts.count;
                        let amount = rng.random_range(1..=MAX_AMOUNT);
                        let id = format!("{run}-c{client}-{n}");
                        let (attempts, outcome, bookmark) =
                            transfer(&http, &customer, &id, from, to, amount, &stop).await;
                        if matches!(outcome, TransferOutcome::Ok { .. }) {
                            last.insert(customer.clone(), (id.clone(), bookmark));
                        }
                        transfers.lock().unwrap().push(TransferOp {
                            client,
                            customer,
                            id,
                            from,
                            to,
                            amount,
                            start_ms,
                            end_ms: t0.elapsed().as_millis() as u64,
                            attempts,
                            outcome,
                        });
                    }
                })
            })
            .collect();
        SqlWorkload {
            transfers,
            reads,
            tasks,
            stop,
        }
    }

    pub async fn stop(self) -> (Vec<TransferOp>, Vec<ReadOp>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let transfers = self.transfers.lock().unwrap().clone();
        let reads = self.reads.lock().unwrap().clone();
        (transfers, reads)
    }
}

/// What one read during the run saw.
struct Read {
    seen: (i64, i64),
    saw_own: Option<bool>,
    bookmark: Option<u64>,
    role: Option<String>,
}

/// The accounts' count and sum, and whether transfer `must_see` is
/// stored; `None` when the read failed.
async fn read_sum(
    client: &Client,
    customer: &str,
    must_see: Option<&str>,
    bookmark: Option<u64>,
) -> Option<Read> {
    let mut statements =
        vec![json!({"sql": "SELECT count(*), coalesce(sum(balance), 0) FROM chaos_accounts"})];
    if let Some(id) = must_see {
        statements.push(
            json!({"sql": "SELECT count(*) FROM chaos_transfers WHERE id = ?", "params": [id]}),
        );
    }
    let body = json!({"statements": statements, "read_only": true});
    let Reply::Ok {
        results,
        role,
        bookmark,
        ..
    } = client.send_at(customer, &body, None, bookmark).await
    else {
        return None;
    };
    let row = |i: usize| -> Option<Vec<Value>> {
        results.get(i)?["rows"]
            .as_array()?
            .first()?
            .as_array()
            .cloned()
    };
    let sums = row(0)?;
    let saw_own = match must_see {
        Some(_) => Some(int(&row(1)?, 0).ok()? > 0),
        None => None,
    };
    Some(Read {
        seen: (int(&sums, 0).ok()?, int(&sums, 1).ok()?),
        saw_own,
        bookmark,
        role,
    })
}

/// Sends one transfer until its outcome is clear, at most
/// [`MAX_ATTEMPTS`] times, always with the same key; the bookmark of an
/// acknowledgement.
async fn transfer(
    client: &Client,
    customer: &str,
    id: &str,
    from: i64,
    to: i64,
    amount: i64,
    stop: &AtomicBool,
) -> (u32, TransferOutcome, Option<u64>) {
    let body = transfer_body(id, from, to, amount);
    let mut attempts = 0;
    let mut unclear: Option<String> = None;
    loop {
        attempts += 1;
        match client.send(customer, &body, Some(id)).await {
            Reply::Ok {
                epoch,
                machine,
                replayed,
                results,
                bookmark,
                ..
            } => {
                let rows_affected = results
                    .iter()
                    .map(|r| r["rows_affected"].as_i64().unwrap_or(-1))
                    .collect();
                return (
                    attempts,
                    TransferOutcome::Ok {
                        epoch,
                        machine,
                        replayed,
                        rows_affected,
                    },
                    bookmark,
                );
            }
            // A refusal after an unclear attempt proves nothing: the
            // earlier attempt may still be on its way to the holder.
            Reply::Refused { status, error } => {
                let outcome = match unclear {
                    None => TransferOutcome::Refused { status, error },
                    Some(earlier) => TransferOutcome::Indeterminate {
                        error: format!(
                            "refused ({status}: {error}) after an unclear attempt ({earlier})"
                        ),
                    },
                };
                return (attempts, outcome, None);
            }
            Reply::Unclear(error) => {
                if attempts >= MAX_ATTEMPTS || stop.load(Ordering::Relaxed) {
                    return (attempts, TransferOutcome::Indeterminate { error }, None);
                }
                unclear = Some(error);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempts))).await;
            }
        }
    }
}

/// The customers' tables as the store holds them (snapshot and log,
/// rebuilt as a new holder would).
pub async fn store_finals(store: &StoreUrl, customers: &[String], scratch: &Path) -> Finals {
    let mut finals = Finals {
        source: "store".into(),
        states: BTreeMap::new(),
    };
    let opened = open_store(store, FaultConfig::default(), RetryPolicy::default(), None).await;
    let Ok((store, _)) = opened else {
        return finals;
    };
    for customer in customers {
        let path = scratch.join(format!("final-{customer}.sqlite3"));
        if let Err(e) =
            tenantd_core::restore::materialize_retrying(&store, customer, &path, Until::End).await
        {
            tracing::warn!(customer, "rebuilding the stored database: {e:#}");
            continue;
        }
        match read_tables(&path) {
            Ok(state) => {
                finals.states.insert(customer.clone(), state);
            }
            Err(e) => tracing::warn!(customer, "reading the stored database: {e:#}"),
        }
    }
    finals
}

fn read_tables(path: &Path) -> anyhow::Result<FinalState> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut state = FinalState::default();
    let mut stmt = conn.prepare("SELECT id, balance FROM chaos_accounts")?;
    for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        let (id, balance) = row?;
        state.balances.insert(id, balance);
    }
    let mut stmt =
        conn.prepare("SELECT id, src, dst, amount FROM chaos_transfers ORDER BY rowid")?;
    for row in stmt.query_map([], |r| {
        Ok(TransferRow {
            id: r.get(0)?,
            src: r.get(1)?,
            dst: r.get(2)?,
            amount: r.get(3)?,
        })
    })? {
        state.transfers.push(row?);
    }
    Ok(state)
}
