//! Failover and handoff with real processes: a `tenantd dev` cluster of two
//! machines for one tenant, traffic through the edge, the holder SIGKILLed
//! (restarted by the cluster's restart policy) and SIGTERMed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use tenantd_chaos::history::{Op, Outcome};
use tenantd_chaos::workload::Workload;
use tenantd_dev::{Cluster, DevConfig, LogSink};

#[derive(Clone, Debug, Serialize)]
pub struct FailoverResult {
    /// SIGKILL of the holder, which never comes back (destroyed, like a
    /// dead host) → next acknowledged write (the other machine takes over
    /// by the stale rule), per kill.
    pub failover_ms: Vec<u64>,
    /// SIGKILL of the holder, restarted 500 ms later under the same machine
    /// id like Fly's restart policy → next acknowledged write, per kill.
    pub failover_restart_ms: Vec<u64>,
    /// SIGTERM of the holder → longest stretch without an acknowledged
    /// write until the new holder acknowledged one, per stop.
    pub handoff_gap_ms: Vec<u64>,
    /// Requests that failed (or timed out) in the SIGTERM windows.
    pub handoff_failed_requests: usize,
    pub rss_idle_mb: f64,
    pub rss_load_mb: f64,
    pub acked: usize,
    pub unacknowledged: usize,
}

const CUSTOMER: &str = "failover";
const WAIT: Duration = Duration::from_secs(30);
const RESTART_DELAY: Duration = Duration::from_millis(500);

pub async fn run(
    program: &Path,
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    kills: usize,
    stops: usize,
    clients: usize,
) -> anyhow::Result<FailoverResult> {
    let mut config = DevConfig::new(program.to_path_buf(), scratch);
    config.customers = vec![CUSTOMER.into()];
    config.machines_per_customer = 2;
    config.lease_ttl = lease_ttl;
    // Restarts are done by hand below, to time both kinds of failover.
    config.restart_delay = None;
    config.log_sink = LogSink::Quiet;
    config.extra_env = vec![("TENANTD_FAULTS".into(), faults.into())];
    // For breaking a handoff down: the machines' logs, at this filter, on
    // stdout beside the bench's own trace.
    if let Ok(filter) = std::env::var("TENANTD_BENCH_MACHINE_LOG") {
        config.log_sink = LogSink::Stdout;
        config.extra_env.push(("RUST_LOG".into(), filter));
    }
    let cluster = Cluster::start(config).await?;

    let http = reqwest::Client::new();
    http.post(format!(
        "{}/customers/{CUSTOMER}/increment",
        cluster.edge_url()
    ))
    .send()
    .await?
    .error_for_status()
    .context("first request through the edge")?;
    let rss_idle_mb = max_rss_mb(&cluster);

    let t0 = Instant::now();
    let load = Workload::start(&cluster.edge_url(), &[CUSTOMER.into()], clients, 1, t0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_load_mb = max_rss_mb(&cluster);

    let mut failover_ms = Vec::new();
    let mut failover_restart_ms = Vec::new();
    for n in 1..=kills {
        for restart in [false, true] {
            let (holder, epoch) = holder(&cluster).await?;
            let at = t0.elapsed().as_millis() as u64;
            cluster.kill(&holder)?;
            if !restart {
                // As if its host died: the machine never comes back, so the
                // other one must take over by the stale rule.
                cluster.destroy(&holder)?;
            } else {
                tokio::time::sleep(RESTART_DELAY).await;
                cluster.wait_started(&holder, WAIT).await?;
            }
            let next = next_ack(&load, at, epoch).await?;
            let how = if restart {
                "restarted after 500 ms"
            } else {
                "destroyed"
            };
            eprintln!(
                "bench:   kill {n}/{kills}: holder {holder} (epoch {epoch}) SIGKILLed, {how}; next acknowledged write after {} ms",
                next - at
            );
            if restart {
                failover_restart_ms.push(next - at);
            } else {
                failover_ms.push(next - at);
                cluster.scale(Some(CUSTOMER), 2).await?;
            }
            tokio::time::sleep(lease_ttl / 2).await;
        }
    }

    let mut handoff_gap_ms = Vec::new();
    let mut handoff_failed_requests = 0;
    for n in 1..=stops {
        let (holder, epoch) = holder(&cluster).await?;
        let at = t0.elapsed().as_millis() as u64;
        tracing::debug!(%holder, epoch, "handoff: SIGTERM");
        cluster.stop(&holder)?;
        let next = next_ack(&load, at, epoch).await?;
        tracing::debug!(%holder, after_ms = next - at, "handoff: first write acknowledged under a new epoch");
        let ops = load.ops.lock().unwrap().clone();
        let gap = longest_gap(&ops, at, next);
        handoff_failed_requests += ops
            .iter()
            .filter(|op| op.end_ms >= at && op.start_ms <= next)
            .filter(|op| !matches!(op.outcome, Outcome::Ok { .. }))
            .count();
        eprintln!(
            "bench:   stop {n}/{stops}: holder {holder} (epoch {epoch}) SIGTERMed; longest gap between acknowledged writes {gap} ms"
        );
        handoff_gap_ms.push(gap);
        cluster.wait_started(&holder, WAIT).await?;
        tokio::time::sleep(lease_ttl / 2).await;
    }

    let ops = load.stop().await;
    cluster.shutdown().await;
    let acked = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Ok { .. }))
        .count();
    Ok(FailoverResult {
        failover_ms,
        failover_restart_ms,
        handoff_gap_ms,
        handoff_failed_requests,
        rss_idle_mb,
        rss_load_mb,
        acked,
        unacknowledged: ops.len() - acked,
    })
}

/// The machine holding the tenant's lock and its epoch, once one does.
async fn holder(cluster: &Cluster) -> anyhow::Result<(String, u64)> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let holders: Vec<_> = cluster
            .statuses()
            .await
            .into_iter()
            .filter(|s| s.holder == Some(true))
            .collect();
        if let [only] = holders.as_slice()
            && let Some(epoch) = only.epoch
        {
            return Ok((only.machine.id.clone(), epoch));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no single holder of customer {CUSTOMER} within {WAIT:?}")
}

/// When the first write under a newer epoch than `epoch` was acknowledged.
async fn next_ack(load: &Workload, at: u64, epoch: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let first = load
            .ops
            .lock()
            .unwrap()
            .iter()
            .filter(|op| op.end_ms >= at)
            .filter_map(|op| match op.outcome {
                Outcome::Ok { epoch: e, .. } if e > epoch => Some(op.end_ms),
                _ => None,
            })
            .min();
        if let Some(end) = first {
            return Ok(end);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no write acknowledged under a new epoch within {WAIT:?} of losing the holder")
}

/// Longest stretch in `[from, to]` with no acknowledged write.
pub fn longest_gap(ops: &[Op], from: u64, to: u64) -> u64 {
    let mut ends: Vec<u64> = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Ok { .. }))
        .map(|op| op.end_ms)
        .filter(|end| (from..=to).contains(end))
        .collect();
    ends.push(from);
    ends.push(to);
    ends.sort_unstable();
    ends.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// The largest resident set of the cluster's machines, in MiB.
fn max_rss_mb(cluster: &Cluster) -> f64 {
    cluster
        .machines()
        .iter()
        .filter_map(|m| m.pid)
        .filter_map(rss_mb)
        .fold(0.0, f64::max)
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(end_ms: u64, ok: bool) -> Op {
        Op {
            client: 0,
            customer: CUSTOMER.into(),
            key: String::new(),
            start_ms: end_ms.saturating_sub(5),
            end_ms,
            outcome: if ok {
                Outcome::Ok {
                    count: 1,
                    epoch: 1,
                    machine: String::new(),
                }
            } else {
                Outcome::Indeterminate {
                    error: "timeout".into(),
                }
            },
        }
    }

    /// The handoff alone (after `cargo build -p tenantd`), no kills:
    /// `RUST_LOG=tenantd_bench=debug TENANTD_BENCH_MACHINE_LOG=info cargo test -p tenantd-bench --lib handoff_alone -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by hand"]
    async fn handoff_alone() {
        tenantd_core::server::init_tracing_at(tenantd_core::config::LogFormat::Text, "warn");
        let dir = tempfile::tempdir().unwrap();
        let program =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/tenantd");
        let faults = r#"{"latency":"20ms","jitter":"5ms"}"#;
        let stops = std::env::var("HANDOFF_STOPS").map_or(3, |s| s.parse().unwrap());
        let result = run(
            &program,
            dir.path(),
            faults,
            Duration::from_secs(5),
            0,
            stops,
            16,
        )
        .await
        .unwrap();
        println!("handoff_gap_ms {:?}", result.handoff_gap_ms);
    }

    #[test]
    fn longest_gap_counts_only_acknowledged_writes_in_the_window() {
        let ops = [
            op(90, true),
            op(110, true),
            op(150, false),
            op(300, true),
            op(500, true),
        ];
        assert_eq!(longest_gap(&ops, 100, 320), 190);
        assert_eq!(longest_gap(&[], 100, 320), 220);
    }
}
