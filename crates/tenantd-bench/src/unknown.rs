//! What requests for tenants that do not exist cost the store: a real
//! `tenantd serve` process in pool mode, 1,000 requests for distinct ids
//! that were never created, and the store writes (PUTs and DELETEs) its
//! `/metrics` counts meanwhile. The target is none: a loop over random ids
//! must not create objects, locks or anything else.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct UnknownResult {
    pub requests: usize,
    /// Answers that were 404 (all of them, when all is well).
    pub not_found: usize,
    /// Store PUTs and DELETEs caused by the requests.
    pub store_writes: u64,
    /// Store reads caused by the requests (existence checks).
    pub store_reads: u64,
}

/// Kills the server if the bench stops early.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(scratch: &Path, requests: usize) -> anyhow::Result<UnknownResult> {
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    std::fs::create_dir_all(scratch)?;
    let log = std::fs::File::create(scratch.join("serve.log"))?;
    let store = format!("file://{}", scratch.join("store").display());
    let child = Command::new(std::env::current_exe().context("locating the tenantd binary")?)
        .args(["serve", "--listen", &addr.to_string(), "--store", &store])
        .args(["--data-dir", &scratch.join("local").display().to_string()])
        .args(["--machine-id", "u0000000000001"])
        .env_remove("CUSTOMER_ID")
        // /metrics is read below: open without an admin token.
        .env_remove("TENANTD_ADMIN_TOKEN")
        .env_remove("BUCKET_NAME")
        .env_remove("TENANTD_STORE")
        .env_remove("TENANTD_CREATE_ON_FIRST_REQUEST")
        .env_remove("FLY_APP_NAME")
        .env_remove("FLY_MACHINE_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting tenantd serve")?;
    let _server = Server(child);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!(
                "tenantd serve did not become healthy within 20 s; see {}",
                scratch.join("serve.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = store_counts(&http, &base).await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let not_found = futures::stream::iter(0..requests)
        .map(|n| {
            let http = http.clone();
            // Distinct ids, some at the 63-character limit.
            let id = if n % 2 == 0 {
                format!("nobody-{}-{n}", &run[..8])
            } else {
                format!("{n:0>31}{run}")
            };
            let url = match n % 3 {
                0 => format!("{base}/customers/{id}/increment"),
                1 => format!("{base}/customers/{id}/count"),
                _ => format!("{base}/customers/{id}"),
            };
            async move {
                let request = if url.ends_with("/increment") {
                    http.post(url)
                } else {
                    http.get(url)
                };
                request
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
            }
        })
        .buffer_unordered(32)
        .filter(|found| std::future::ready(*found))
        .count()
        .await;
    let after = store_counts(&http, &base).await?;
    Ok(UnknownResult {
        requests,
        not_found,
        store_writes: after.0 - before.0,
        store_reads: after.1 - before.1,
    })
}

/// (writes, reads) the server has sent to its store so far.
async fn store_counts(http: &reqwest::Client, base: &str) -> anyhow::Result<(u64, u64)> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut writes = 0.0;
    let mut reads = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tenantd_store_requests_total{") else {
            continue;
        };
        let Some(value) = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
        else {
            continue;
        };
        if rest.contains("op=\"put") || rest.contains("op=\"delete") {
            writes += value;
        } else {
            reads += value;
        }
    }
    Ok((writes as u64, reads as u64))
}
