//! A closed-loop load generator: `clients` tasks, each sending increments
//! (or SQL transfers) one after the other for a fixed time, following
//! `fly-replay` to the named machine like Fly Proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::machines::API_TOKEN;

/// What each client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// `POST /customers/<id>/increment`.
    Increment,
    /// `POST /customers/<id>/sql`: a transfer of three statements (debit,
    /// credit, a row in `bench_transfers`) in one transaction, on the
    /// tables [`SQL_SETUP`] creates.
    SqlTransfer,
    /// `POST /customers/<id>/v2/pipeline`: the same transfer as the Hrana
    /// `batch` `@libsql/client` sends for `batch([...], "write")`.
    HranaTransfer,
}

/// Accounts the SQL transfers move money between.
pub const SQL_ACCOUNTS: i64 = 64;
/// What every account starts with.
pub const SQL_INITIAL_BALANCE: i64 = 1_000_000;

/// The SQL tables of [`Work::SqlTransfer`], created in one request.
pub fn sql_setup() -> Value {
    json!({"statements": [
        {"sql": "CREATE TABLE bench_accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"},
        {"sql": "CREATE TABLE bench_transfers (id TEXT PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL, amount INTEGER NOT NULL)"},
        {"sql": "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) INSERT INTO bench_accounts (id, balance) SELECT i, ? FROM n",
         "params": [SQL_ACCOUNTS, SQL_INITIAL_BALANCE]},
    ]})
}

/// One transfer of `amount` from account `from` to the next one.
pub fn sql_transfer(id: &str, from: i64, amount: i64) -> Value {
    let to = (from + 1) % SQL_ACCOUNTS;
    json!({"statements": [
        {"sql": "UPDATE bench_accounts SET balance = balance - ? WHERE id = ?", "params": [amount, from]},
        {"sql": "UPDATE bench_accounts SET balance = balance + ? WHERE id = ?", "params": [amount, to]},
        {"sql": "INSERT INTO bench_transfers (id, src, dst, amount) VALUES (?, ?, ?, ?)", "params": [id, from, to, amount]},
    ]})
}

/// [`sql_transfer`] as a Hrana pipeline: `BEGIN IMMEDIATE`, the three
/// statements each on the one before, `COMMIT`, `ROLLBACK` unless it
/// committed, then `close`.
pub fn hrana_transfer(id: &str, from: i64, amount: i64) -> Value {
    let to = (from + 1) % SQL_ACCOUNTS;
    let int = |n: i64| json!({"type": "integer", "value": n.to_string()});
    let stmt = |sql: &str, args: Vec<Value>| json!({"sql": sql, "args": args});
    let steps = vec![
        json!({"stmt": stmt("BEGIN IMMEDIATE", vec![])}),
        json!({"condition": {"type": "ok", "step": 0}, "stmt": stmt("UPDATE bench_accounts SET balance = balance - ? WHERE id = ?", vec![int(amount), int(from)])}),
        json!({"condition": {"type": "ok", "step": 1}, "stmt": stmt("UPDATE bench_accounts SET balance = balance + ? WHERE id = ?", vec![int(amount), int(to)])}),
        json!({"condition": {"type": "ok", "step": 2}, "stmt": stmt("INSERT INTO bench_transfers (id, src, dst, amount) VALUES (?, ?, ?, ?)", vec![json!({"type": "text", "value": id}), int(from), int(to), int(amount)])}),
        json!({"condition": {"type": "ok", "step": 3}, "stmt": stmt("COMMIT", vec![])}),
        json!({"condition": {"type": "not", "cond": {"type": "ok", "step": 4}}, "stmt": stmt("ROLLBACK", vec![])}),
    ];
    json!({"baton": null, "requests": [
        {"type": "batch", "batch": {"steps": steps}},
        {"type": "close"},
    ]})
}

/// Latencies of successful requests, and the instants they completed.
#[derive(Default)]
pub struct Samples {
    pub latencies: Vec<Duration>,
    pub completed_at: Vec<Instant>,
    pub errors: usize,
}

impl Samples {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()
        .expect("http client")
}

/// One increment through `machines` (id → address), starting at `first`.
pub async fn increment(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
) -> bool {
    let path = format!("/customers/{customer}/increment");
    match send(http, machines, first, reqwest::Method::POST, &path, None).await {
        Some(reply) => reply.status().is_success(),
        None => false,
    }
}

/// One SQL request through `machines`; its answer's JSON when it was a 200.
pub async fn sql(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
    body: &Value,
) -> Option<Value> {
    let path = format!("/customers/{customer}/sql");
    let reply = send(
        http,
        machines,
        first,
        reqwest::Method::POST,
        &path,
        Some(body),
    )
    .await?;
    if !reply.status().is_success() {
        return None;
    }
    reply.json().await.ok()
}

/// A Hrana pipeline whose batch committed (no step failed).
pub async fn hrana(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
    body: &Value,
) -> bool {
    let path = format!("/customers/{customer}/v2/pipeline");
    let Some(reply) = send(
        http,
        machines,
        first,
        reqwest::Method::POST,
        &path,
        Some(body),
    )
    .await
    else {
        return false;
    };
    if !reply.status().is_success() {
        return false;
    }
    let Ok(answer) = reply.json::<Value>().await else {
        return false;
    };
    let batch = &answer["results"][0]["response"]["result"];
    batch["step_errors"]
        .as_array()
        .is_some_and(|errors| errors.iter().all(Value::is_null))
}

/// The tenant's count, read from its holder.
pub async fn read_count(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
) -> anyhow::Result<u64> {
    let path = format!("/customers/{customer}/count");
    let reply = send(http, machines, first, reqwest::Method::GET, &path, None)
        .await
        .ok_or_else(|| anyhow::anyhow!("no machine answered GET {path}"))?;
    let body: serde_json::Value = reply.json().await?;
    body["count"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("GET {path} answered without a count: {body}"))
}

/// Sends one request like Fly Proxy would: to `first`, then wherever
/// `fly-replay` says, skipping machines that do not answer.
async fn send(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Option<reqwest::Response> {
    let mut target = first.to_string();
    let other = |id: &str| machines.keys().find(|other| *other != id).cloned();
    for _ in 0..4 {
        let addr = machines.get(&target)?;
        let mut request = http
            .request(method.clone(), format!("http://{addr}{path}"))
            .header("accept", "application/json");
        if let Some(body) = body {
            request = request.bearer_auth(API_TOKEN).json(body);
        }
        let Ok(reply) = request.send().await else {
            target = other(&target)?;
            continue;
        };
        let Some(replay) = reply.headers().get("fly-replay") else {
            return Some(reply);
        };
        target = match replay
            .to_str()
            .ok()
            .and_then(tenantd_core::replay::parse_replay)
        {
            Some(tenantd_core::replay::Target::Instance(id)) => id,
            _ => other(&target)?,
        };
    }
    None
}

/// Runs `clients` closed loops against `machines` for `duration`.
pub async fn run(
    machines: HashMap<String, SocketAddr>,
    customer: &str,
    clients: usize,
    duration: Duration,
    work: Work,
) -> Samples {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let machines = Arc::new(machines);
    let ids: Vec<String> = machines.keys().cloned().collect();
    let deadline = Instant::now() + duration;
    let http = client();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (samples, machines, http) = (samples.clone(), machines.clone(), http.clone());
            let first = ids[c % ids.len()].clone();
            let customer = customer.to_string();
            tokio::spawn(async move {
                let mut n: i64 = 0;
                while Instant::now() < deadline {
                    n += 1;
                    let started = Instant::now();
                    let ok = match work {
                        Work::Increment => increment(&http, &machines, &first, &customer).await,
                        Work::HranaTransfer => {
                            let from = (c as i64 + n) % SQL_ACCOUNTS;
                            let body = hrana_transfer(&format!("h{clients}-{c}-{n}"), from, 1);
                            hrana(&http, &machines, &first, &customer, &body).await
                        }
                        Work::SqlTransfer => {
                            let from = (c as i64 + n) % SQL_ACCOUNTS;
                            let body = sql_transfer(&format!("{clients}-{c}-{n}"), from, 1);
                            sql(&http, &machines, &first, &customer, &body)
                                .await
                                .is_some()
                        }
                    };
                    let mut s = samples.lock().unwrap();
                    if ok {
                        s.latencies.push(started.elapsed());
                        s.completed_at.push(Instant::now());
                    } else {
                        s.errors += 1;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    Arc::try_unwrap(samples)
        .ok()
        .expect("all clients done")
        .into_inner()
        .unwrap()
}
