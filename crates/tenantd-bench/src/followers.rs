//! Follower reads: three machines of one tenant under a mixed load —
//! writers at the holder, each followed by a read carrying its bookmark at
//! a follower, and readers spread over all three machines without one.
//!
//! - `follower_read_share`: read-only answers given by followers.
//! - `follower_lag_p99_ms`: from a write's answer to a follower's answer at
//!   that write's bookmark (an upper bound of the lag: it includes the
//!   read's own round trip).
//! - `follower_log_reads_per_1000_commits`: log objects the followers read
//!   from the store (the rest came pushed by the holder).
//! - `follower_store_requests_per_1000_commits`: store requests of every
//!   kind per follower in steady state (after a first read built its
//!   replica; reads of the holder's lock and heartbeat included), per
//!   1,000 commits at the holder; by `op/object` and per second besides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

use super::machines::{API_TOKEN, Machine, Setup, metric_sum, store_requests};

const CUSTOMER: &str = "7";
const WRITERS: usize = 4;
const READERS: usize = 8;

#[derive(Clone, Debug, Serialize)]
pub struct FollowersResult {
    pub follower_read_share: f64,
    pub follower_lag_p99_ms: f64,
    pub follower_lag_p50_ms: f64,
    pub reads: u64,
    pub follower_reads: u64,
    pub failed_reads: u64,
    pub commits: u64,
    pub follower_log_reads_per_1000_commits: f64,
    pub follower_store_requests_per_1000_commits: f64,
    /// The same by store operation (`op` label), per follower.
    pub follower_store_requests_by_op: std::collections::BTreeMap<String, f64>,
    /// Store requests per follower over the run (not per 1,000 commits) by
    /// `op/object` (`get/heartbeat`, `get/lock`, `list/log`, ...): what
    /// the steady state is made of.
    pub follower_store_requests_by_object: std::collections::BTreeMap<String, f64>,
    /// The run's length, for the figures above.
    pub seconds: f64,
    /// Store requests per follower per second: the cost that stays when
    /// commits stop (the per-1,000-commits figure hides it under load).
    pub follower_store_requests_per_second: f64,
}

pub async fn run(
    scratch: &std::path::Path,
    faults: &str,
    lease_ttl: Duration,
    duration: Duration,
) -> anyhow::Result<FollowersResult> {
    let mut setup = Setup::new(scratch, faults, lease_ttl);
    setup.customer = Some(CUSTOMER.into());
    setup.create_tenants(&[CUSTOMER]).await?;
    let holder = Machine::start(&setup, "holder").await?;
    let http = reqwest::Client::new();
    let create = post(
        &http,
        &holder,
        &statements(
            "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)",
            false,
        ),
        None,
    )
    .await?;
    anyhow::ensure!(create.0 == 200, "creating the table answered {}", create.0);
    let followers = [
        Machine::start(&setup, "follower-1").await?,
        Machine::start(&setup, "follower-2").await?,
    ];
    let machines: Vec<&Machine> = std::iter::once(&holder).chain(followers.iter()).collect();
    // Steady state: each follower's replica is built (the snapshot and
    // the log so far, once) before the store requests are counted.
    for follower in &followers {
        let read = post(
            &http,
            follower,
            &statements("SELECT count(*) FROM notes", true),
            None,
        )
        .await?;
        anyhow::ensure!(
            read.0 == 200,
            "a first read at a follower answered {}",
            read.0
        );
    }
    let log_before = log_reads(&followers).await?;
    let (requests_before, _) = store_requests(&followers).await?;
    let by_op_before = requests_by_op(&followers).await?;
    let by_object_before = requests_by_object(&followers).await?;
    let started = Instant::now();
    let (reads, follower_reads, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let commits = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let count = |reply: &(u16, Option<String>, Option<String>)| {
        reads.fetch_add(1, Ordering::Relaxed);
        if reply.0 != 200 {
            failed.fetch_add(1, Ordering::Relaxed);
        } else if reply.1.as_deref() == Some("follower") {
            follower_reads.fetch_add(1, Ordering::Relaxed);
        }
    };
    let writers = (0..WRITERS).map(|w| {
        let (http, holder, follower) = (&http, &holder, &followers[w % followers.len()]);
        let (count, commits) = (&count, &commits);
        async move {
            let mut lags = Vec::new();
            while Instant::now() < deadline {
                let insert =
                    json!({"statements": [{"sql": "INSERT INTO notes(body) VALUES ('x')"}]});
                let Ok((200, _, Some(bookmark))) = post(http, holder, &insert, None).await else {
                    continue;
                };
                commits.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let read = post(
                    http,
                    follower,
                    &statements("SELECT count(*) FROM notes", true),
                    Some(&bookmark),
                )
                .await;
                if let Ok(reply) = &read {
                    count(reply);
                    if reply.0 == 200 {
                        lags.push(started.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            lags
        }
    });
    let readers = (0..READERS).map(|r| {
        let (http, machines, count) = (&http, &machines, &count);
        async move {
            let mut n = r;
            while Instant::now() < deadline {
                let machine = machines[n % machines.len()];
                n += 1;
                if let Ok(reply) = post(
                    http,
                    machine,
                    &statements("SELECT count(*) FROM notes", true),
                    None,
                )
                .await
                {
                    count(&reply);
                }
            }
        }
    });
    let (lags, _) = tokio::join!(
        futures::future::join_all(writers),
        futures::future::join_all(readers)
    );
    let mut lags: Vec<f64> = lags.into_iter().flatten().collect();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let commits = commits.load(Ordering::Relaxed);
    let log_reads = log_reads(&followers).await? - log_before;
    let requests = store_requests(&followers).await?.0 - requests_before;
    let mut by_op = requests_by_op(&followers).await?;
    for (op, n) in by_op.iter_mut() {
        *n = (*n - by_op_before.get(op).copied().unwrap_or(0.0)) / followers.len() as f64;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut by_object = requests_by_object(&followers).await?;
    for (key, n) in by_object.iter_mut() {
        *n = (*n - by_object_before.get(key).copied().unwrap_or(0.0)) / followers.len() as f64;
    }
    by_object.retain(|_, n| *n > 0.0);
    let (reads, follower_reads) = (
        reads.load(Ordering::Relaxed),
        follower_reads.load(Ordering::Relaxed),
    );
    let result = FollowersResult {
        follower_read_share: follower_reads as f64 / reads.max(1) as f64,
        follower_lag_p99_ms: pct(0.99),
        follower_lag_p50_ms: pct(0.5),
        reads,
        follower_reads,
        failed_reads: failed.load(Ordering::Relaxed),
        commits,
        follower_log_reads_per_1000_commits: log_reads * 1000.0 / commits.max(1) as f64,
        follower_store_requests_per_1000_commits: requests * 1000.0
            / (commits.max(1) as f64 * followers.len() as f64),
        follower_store_requests_by_op: by_op,
        follower_store_requests_by_object: by_object,
        seconds,
        follower_store_requests_per_second: requests / (seconds * followers.len() as f64),
    };
    for machine in followers {
        machine.stop().await?;
    }
    holder.stop().await?;
    Ok(result)
}

fn statements(sql: &str, read_only: bool) -> Value {
    json!({"statements": [{"sql": sql}], "read_only": read_only})
}

/// Status, `tenantd-role` and `tenantd-bookmark` of one SQL request.
async fn post(
    http: &reqwest::Client,
    machine: &Machine,
    body: &Value,
    bookmark: Option<&str>,
) -> anyhow::Result<(u16, Option<String>, Option<String>)> {
    let mut request = http
        .post(format!("http://{}/customers/{CUSTOMER}/sql", machine.addr))
        .bearer_auth(API_TOKEN)
        .json(body);
    if let Some(bookmark) = bookmark {
        request = request.header("tenantd-bookmark", bookmark);
    }
    let reply = request.send().await.context("SQL request")?;
    let header = |name: &str| {
        reply
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answer = (
        reply.status().as_u16(),
        header("tenantd-role"),
        header("tenantd-bookmark"),
    );
    let _ = reply.bytes().await;
    Ok(answer)
}

/// Store requests of `machines` by their `op` label.
async fn requests_by_op(
    machines: &[Machine],
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut by_op = std::collections::BTreeMap::new();
    for machine in machines {
        let text = machine.metrics().await?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("tenantd_store_requests_total{") else {
                continue;
            };
            let op = rest
                .split("op=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *by_op.entry(op.to_string()).or_insert(0.0) += value;
        }
    }
    Ok(by_op)
}

/// Store requests of `machines` by `op/object`.
async fn requests_by_object(
    machines: &[Machine],
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut by_object = std::collections::BTreeMap::new();
    for machine in machines {
        let text = machine.metrics().await?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("tenantd_store_requests_by_object_total{") else {
                continue;
            };
            let label = |name: &str| {
                rest.split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
                    .to_string()
            };
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *by_object
                .entry(format!("{}/{}", label("op"), label("object")))
                .or_insert(0.0) += value;
        }
    }
    Ok(by_object)
}

async fn log_reads(followers: &[Machine]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for machine in followers {
        sum += metric_sum(
            &machine.metrics().await?,
            "tenantd_follower_slots_total",
            &["source=\"log\""],
        );
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    /// The follower step alone (the whole bench takes minutes):
    /// `cargo test -p tenantd-bench --lib followers -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by hand"]
    async fn follower_step_alone() {
        let dir = tempfile::tempdir().unwrap();
        let result = super::run(
            dir.path(),
            r#"{"latency":"5ms","jitter":"2ms"}"#,
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
        assert!(result.reads > 0 && result.commits > 0);
    }
}
