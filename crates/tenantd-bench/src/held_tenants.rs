//! What holding many idle tenants costs one pool machine: store requests
//! per held tenant-hour at several counts, and resident memory per held
//! tenant. A real `tenantd serve` process (its own RSS, its own open file
//! limit) on the file store, pool mode: each tenant is touched once, then
//! the store request counters of its `/metrics` are read over a quiet
//! window and scaled to one tenant-hour.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use tokio::process::{Child, Command};

use super::machines::metric_sum;

#[derive(Clone, Debug, Serialize)]
pub struct HeldTenantsResult {
    pub lease_ttl_ms: u64,
    /// Quiet time counted at each tenant count.
    pub window_ms: u64,
    /// Tenant count → store requests per held tenant per hour.
    pub store_requests_per_held_tenant_hour_by_count: BTreeMap<String, f64>,
    /// VmRSS of the machine holding no tenant, then the largest count.
    pub rss_mb_empty: f64,
    pub rss_mb_full: f64,
    pub rss_mb_per_held_tenant: f64,
    /// Tenants the machine reported holding at the largest count.
    pub held_at_largest: usize,
}

/// Concurrent first requests while filling the machine.
const TOUCH_CONCURRENCY: usize = 32;
const MACHINE_ID: &str = "bench-pool";

pub async fn run(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    counts: &[usize],
    window: Duration,
) -> anyhow::Result<HeldTenantsResult> {
    let mut counts = counts.to_vec();
    counts.sort_unstable();
    let largest = *counts.last().context("no tenant counts")?;
    let machine = Serve::start(scratch, faults, lease_ttl, largest * 2).await?;
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_mb_empty = machine.rss_mb()?;

    let mut by_count = BTreeMap::new();
    let mut touched = 0;
    for &count in &counts {
        let ids: Vec<String> = (touched..count).map(tenant).collect();
        let failures: Vec<String> = futures::stream::iter(ids)
            .map(|id| {
                let http = http.clone();
                let url = format!("http://{}/customers/{id}/increment", machine.addr);
                async move { first_request(&http, &id, &url).await }
            })
            .buffer_unordered(TOUCH_CONCURRENCY)
            .filter_map(|outcome| std::future::ready(outcome.err()))
            .collect()
            .await;
        if !failures.is_empty() {
            let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
            bail!(
                "{} of the first requests to {count} tenants failed, e.g.:\n  {}\nthe end of the machine's log ({}):\n{}",
                failures.len(),
                shown.join("\n  "),
                machine.log.display(),
                log_tail(&machine.log, 20)
            );
        }
        touched = count;
        // Let the first uploads settle before counting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = machine.store_requests(&http).await?;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let after = machine.store_requests(&http).await?;
        let per_hour = (after - before) * 3600.0 / started.elapsed().as_secs_f64() / count as f64;
        eprintln!("bench:   {count} held tenants: {per_hour:.1} store requests per tenant-hour");
        by_count.insert(count.to_string(), per_hour);
    }
    let rss_mb_full = machine.rss_mb()?;
    let held_at_largest = machine.held(&http).await?;
    machine.stop().await?;
    if held_at_largest < largest {
        bail!("the machine held {held_at_largest} tenants, not the {largest} touched");
    }
    Ok(HeldTenantsResult {
        lease_ttl_ms: lease_ttl.as_millis() as u64,
        window_ms: window.as_millis() as u64,
        store_requests_per_held_tenant_hour_by_count: by_count,
        rss_mb_empty,
        rss_mb_full,
        rss_mb_per_held_tenant: (rss_mb_full - rss_mb_empty) / largest as f64,
        held_at_largest,
    })
}

/// One tenant's first request; on failure, what the machine answered.
async fn first_request(http: &reqwest::Client, id: &str, url: &str) -> Result<(), String> {
    let reply = http
        .post(url)
        .send()
        .await
        .map_err(|e| format!("{id}: {e}"))?;
    let status = reply.status();
    if status.is_success() {
        return Ok(());
    }
    let body = reply.text().await.unwrap_or_default();
    Err(format!("{id}: {status} {}", body.trim()))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn tenant(n: usize) -> String {
    format!("held-{n:05}")
}

/// A `tenantd serve` child process in pool mode.
struct Serve {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Serve {
    async fn start(
        scratch: &Path,
        faults: &str,
        lease_ttl: Duration,
        max_tenants: usize,
    ) -> anyhow::Result<Serve> {
        std::fs::create_dir_all(scratch)?;
        let scratch = std::fs::canonicalize(scratch)?;
        // A free port: bound, read and let go (the child binds it at once).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(scratch.join("serve.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", &addr.to_string()])
            .args(["--machine-id", MACHINE_ID, "--customer-id", ""])
            // /metrics is read below: open without an admin token.
            .env_remove("TENANTD_ADMIN_TOKEN")
            .arg("--store")
            .arg(format!("file://{}", scratch.join("store").display()))
            .arg("--data-dir")
            .arg(scratch.join("local"))
            .args([
                "--lease-ttl",
                &humantime::format_duration(lease_ttl).to_string(),
            ])
            .args(["--idle-timeout", "1h", "--faults", faults])
            .args(["--max-tenants", &max_tenants.to_string()])
            // Tenants exist once created; this bench's are created by their
            // first request.
            .env("TENANTD_CREATE_ON_FIRST_REQUEST", "true")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `tenantd serve` for the held-tenants bench")?;
        let mut serve = Serve {
            child,
            addr,
            log: scratch.join("serve.log"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = serve.child.try_wait()? {
                bail!(
                    "`tenantd serve` exited at start ({status}); see {}",
                    scratch.join("serve.log").display()
                );
            }
            if let Ok(reply) = http.get(format!("http://{addr}/healthz")).send().await
                && reply.status().is_success()
            {
                return Ok(serve);
            }
            if Instant::now() > deadline {
                bail!("`tenantd serve` not healthy within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_mb(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("the machine has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kb / 1024.0)
    }

    async fn store_requests(&self, http: &reqwest::Client) -> anyhow::Result<f64> {
        let text = http
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_sum(&text, "tenantd_store_requests_total", &[]))
    }

    async fn held(&self, http: &reqwest::Client) -> anyhow::Result<usize> {
        let held = http
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_sum(&held, "tenantd_lease_holder", &[]) as usize)
    }

    /// SIGTERM, then wait for the drain (every lease released).
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("`tenantd serve` did not exit within 60 s of SIGTERM");
            }
        }
        Ok(())
    }
}
