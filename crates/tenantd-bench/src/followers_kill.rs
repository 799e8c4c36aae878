//! Reads during a holder kill: a `tenantd dev` cluster of three machines
//! for one tenant, writers and readers through the edge (read-only SQL
//! lands on whichever machine the edge picks), the holder SIGKILLed and
//! restarted only after another machine took over.
//!
//! - `follower_read_availability_during_kill`: read-only requests started
//!   in the window after the kill that were answered (200).
//! - `follower_read_longest_gap_ms`: the longest stretch in that window
//!   without an answered read (from the kill to the first answer, between
//!   answers, and from the last answer to the window's end).
//!
//! Half the readers send `/sql` with `read_only`, half a Hrana pipeline
//! (`v3/pipeline`, an `execute` outside a transaction, as the libSQL
//! clients do): both are counted apart as well.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use tenantd_dev::{Cluster, DevConfig, LogSink};

const CUSTOMER: &str = "reads";
const WRITERS: usize = 4;
const READERS: usize = 8;
/// How long after the kill reads are counted.
const WINDOW: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(30);
/// A read slower than this counts as not answered.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct KillResult {
    pub follower_read_availability_during_kill: f64,
    pub follower_read_longest_gap_ms: u64,
    /// Read-only requests started in the window, answered, and answered
    /// by a follower.
    pub reads: u64,
    pub answered: u64,
    pub follower_answers: u64,
    /// Writes acknowledged over the whole run.
    pub commits: u64,
    pub window_ms: u64,
    /// The same three counts and availability for each way of reading.
    pub sql: ProtocolCounts,
    pub hrana: ProtocolCounts,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProtocolCounts {
    pub reads: u64,
    pub answered: u64,
    pub follower_answers: u64,
    /// Answered / reads.
    pub availability: f64,
    /// Follower answers / answered.
    pub follower_share: f64,
}

/// One read: when it started and ended (ms from the start), and whether
/// it was answered, and by a follower.
#[derive(Clone, Copy)]
struct Read {
    start_ms: u64,
    end_ms: u64,
    ok: bool,
    follower: bool,
    /// Sent as a Hrana pipeline rather than `/sql`.
    hrana: bool,
}

/// `program`: the `tenantd` binary the machines run.
pub async fn run(
    program: &std::path::Path,
    scratch: &std::path::Path,
    faults: &str,
    lease_ttl: Duration,
) -> anyhow::Result<KillResult> {
    let mut config = DevConfig::new(program, scratch);
    config.customers = vec![CUSTOMER.into()];
    config.machines_per_customer = 3;
    config.lease_ttl = lease_ttl;
    // Back only after another machine took over (one ttl of a silent
    // heartbeat, and some).
    config.restart_delay = Some(lease_ttl * 2 + Duration::from_secs(1));
    config.log_sink = LogSink::Quiet;
    config.extra_env = vec![("TENANTD_FAULTS".into(), faults.into())];
    let cluster = Cluster::start(config).await?;
    let url = format!("{}/customers/{CUSTOMER}/sql", cluster.edge_url());
    let token = cluster.api_token().to_string();
    let http = reqwest::Client::builder().timeout(READ_TIMEOUT).build()?;
    let pipeline = format!("{}/customers/{CUSTOMER}/v3/pipeline", cluster.edge_url());
    let hrana_read = || {
        http.post(&pipeline).bearer_auth(&token).json(&json!({
            "baton": null,
            "requests": [
                {"type": "execute", "stmt": {"sql": "SELECT count(*) FROM notes"}},
                {"type": "close"},
            ],
        }))
    };
    let sql = |sql: &str, read_only: bool| {
        http.post(&url)
            .bearer_auth(&token)
            .json(&json!({"statements": [{"sql": sql}], "read_only": read_only}))
    };
    let created = sql(
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)",
        false,
    )
    .send()
    .await
    .context("creating the table through the edge")?;
    anyhow::ensure!(
        created.status().is_success(),
        "creating the table answered {}",
        created.status()
    );

    let t0 = Instant::now();
    let stop_at = Arc::new(Mutex::new(None::<Instant>));
    let reads = Arc::new(Mutex::new(Vec::<Read>::new()));
    let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stopped = |stop_at: &Mutex<Option<Instant>>| {
        stop_at
            .lock()
            .unwrap()
            .is_some_and(|at| Instant::now() >= at)
    };
    let writers = (0..WRITERS).map(|_| {
        let (sql, stop_at, commits) = (&sql, &stop_at, &commits);
        async move {
            while !stopped(stop_at) {
                let sent = sql("INSERT INTO notes(body) VALUES ('x')", false)
                    .send()
                    .await;
                match sent {
                    Ok(reply) if reply.status().is_success() => {
                        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Writes wait for the new holder: try again soon.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    });
    let readers = (0..READERS).map(|r| {
        let (sql, hrana_read, stop_at, reads) = (&sql, &hrana_read, &stop_at, &reads);
        let hrana = r % 2 == 1;
        async move {
            while !stopped(stop_at) {
                let start_ms = t0.elapsed().as_millis() as u64;
                let reply = match hrana {
                    true => hrana_read().send().await,
                    false => sql("SELECT count(*) FROM notes", true).send().await,
                };
                let (ok, follower) = match reply {
                    Ok(reply) => {
                        let follower = reply
                            .headers()
                            .get("tenantd-role")
                            .is_some_and(|role| role == "follower");
                        let status = reply.status().is_success();
                        let ok = match reply.json::<serde_json::Value>().await {
                            // A pipeline's request may fail inside a 200.
                            Ok(body) if hrana => status && body["results"][0]["type"] == "ok",
                            Ok(_) => status,
                            Err(_) => false,
                        };
                        (ok, follower)
                    }
                    Err(_) => (false, false),
                };
                let end_ms = t0.elapsed().as_millis() as u64;
                reads.lock().unwrap().push(Read {
                    start_ms,
                    end_ms,
                    ok,
                    follower,
                    hrana,
                });
                if !ok {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let kill = async {
        tokio::time::sleep(WARM_UP).await;
        let killed = async {
            let holder = holder(&cluster).await?;
            let at = t0.elapsed().as_millis() as u64;
            cluster.kill(&holder)?;
            eprintln!(
                "bench:   holder {holder} SIGKILLed under load; reads counted for {WINDOW:?}"
            );
            anyhow::Ok(at)
        }
        .await;
        // The load ends after the window, or at once when nothing was killed.
        let until = Instant::now()
            + if killed.is_ok() {
                WINDOW
            } else {
                Duration::ZERO
            };
        *stop_at.lock().unwrap() = Some(until);
        killed
    };
    let (killed_at, _, _) = tokio::join!(
        kill,
        futures::future::join_all(writers),
        futures::future::join_all(readers)
    );
    let killed_at = match killed_at {
        Ok(at) => at,
        Err(e) => {
            // Stop the load that waits for the kill.
            cluster.shutdown().await;
            return Err(e);
        }
    };
    cluster.shutdown().await;
    let reads = reads.lock().unwrap().clone();
    let window_ms = WINDOW.as_millis() as u64;
    Ok(summarize(
        &reads,
        killed_at,
        window_ms,
        commits.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

fn summarize(reads: &[Read], at: u64, window_ms: u64, commits: u64) -> KillResult {
    let end = at + window_ms;
    let in_window: Vec<&Read> = reads
        .iter()
        .filter(|r| r.start_ms >= at && r.start_ms < end)
        .collect();
    let answered = in_window.iter().filter(|r| r.ok).count() as u64;
    let mut answers: Vec<u64> = reads
        .iter()
        .filter(|r| r.ok && r.end_ms >= at && r.end_ms <= end)
        .map(|r| r.end_ms)
        .collect();
    answers.sort_unstable();
    let mut longest = 0;
    let mut last = at;
    for answer in answers.into_iter().chain(std::iter::once(end)) {
        longest = longest.max(answer.saturating_sub(last));
        last = answer;
    }
    KillResult {
        follower_read_availability_during_kill: answered as f64 / in_window.len().max(1) as f64,
        follower_read_longest_gap_ms: longest,
        reads: in_window.len() as u64,
        answered,
        follower_answers: in_window.iter().filter(|r| r.ok && r.follower).count() as u64,
        commits,
        window_ms,
        sql: counts(&in_window, false),
        hrana: counts(&in_window, true),
    }
}

fn counts(in_window: &[&Read], hrana: bool) -> ProtocolCounts {
    let reads: Vec<&&Read> = in_window.iter().filter(|r| r.hrana == hrana).collect();
    let answered = reads.iter().filter(|r| r.ok).count() as u64;
    let follower_answers = reads.iter().filter(|r| r.ok && r.follower).count() as u64;
    ProtocolCounts {
        reads: reads.len() as u64,
        answered,
        follower_answers,
        availability: answered as f64 / reads.len().max(1) as f64,
        follower_share: follower_answers as f64 / answered.max(1) as f64,
    }
}

/// The machine holding the tenant's lock, once exactly one does.
async fn holder(cluster: &Cluster) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let holders: Vec<_> = cluster
            .statuses()
            .await
            .into_iter()
            .filter(|s| s.holder == Some(true))
            .collect();
        if let [only] = holders.as_slice() {
            return Ok(only.machine.id.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no single holder of customer {CUSTOMER} within {WAIT:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(start_ms: u64, end_ms: u64, ok: bool) -> Read {
        Read {
            start_ms,
            end_ms,
            ok,
            follower: ok,
            hrana: false,
        }
    }

    #[test]
    fn counts_reads_started_in_the_window_and_the_longest_gap_between_answers() {
        let reads = [
            read(900, 950, true),   // before the kill: not counted
            read(1000, 1100, true), // gap 100 from the kill
            read(1100, 1700, false),
            read(1100, 1900, true), // gap 800
            Read {
                hrana: true,
                ..read(1950, 2000, true) // then 1000 to the window's end
            },
        ];
        let result = summarize(&reads, 1000, 2000, 7);
        assert_eq!(result.reads, 4);
        assert_eq!(result.answered, 3);
        assert_eq!(result.follower_read_availability_during_kill, 0.75);
        assert_eq!(result.follower_read_longest_gap_ms, 1000);
        // The one at 1950 is a Hrana read.
        assert_eq!((result.sql.reads, result.sql.answered), (3, 2));
        assert_eq!((result.hrana.reads, result.hrana.answered), (1, 1));
        // No answer at all: the whole window is the gap.
        let result = summarize(&[read(1000, 2000, false)], 1000, 2000, 0);
        assert_eq!(result.follower_read_longest_gap_ms, 2000);
        assert_eq!(result.follower_read_availability_during_kill, 0.0);
    }

    /// The kill step alone (after `cargo build -p tenantd`):
    /// `cargo test -p tenantd-bench --lib followers_kill -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by hand"]
    async fn kill_step_alone() {
        let dir = tempfile::tempdir().unwrap();
        let program =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/tenantd");
        let result = run(&program, dir.path(), "{}", Duration::from_secs(5))
            .await
            .unwrap();
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
        assert!(result.reads > 0);
    }
}
