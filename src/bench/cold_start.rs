//! Cold start by database size: the first request on a fresh machine
//! (acquire the lease, download the database, upload the new epoch), then
//! the cost of each commit, which uploads the whole file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::load;
use super::machines::{Machine, Setup, metric_sum};
use crate::store::{DynStore, Precondition, keys};

#[derive(Clone, Debug, Serialize)]
pub struct ColdStart {
    pub size_mb: u64,
    /// Size of the database object as stored.
    pub object_bytes: u64,
    pub first_request_ms: f64,
    /// Median latency of one increment from one client (commit + upload).
    pub commit_p50_ms: f64,
    /// Mean database upload time per commit, from `tenantd_upload_seconds`.
    pub upload_mean_ms: f64,
    /// Increments answered with an error and sent again (their time is in
    /// the latencies above): a slow store or disk can cost the lease.
    pub retries: u32,
}

pub async fn run(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    sizes_mb: &[u64],
    commits: usize,
) -> anyhow::Result<Vec<ColdStart>> {
    let setup = Setup::new(scratch, faults, lease_ttl);
    let tenants: Vec<String> = sizes_mb.iter().map(|size| tenant(*size)).collect();
    setup
        .create_tenants(&tenants.iter().map(String::as_str).collect::<Vec<_>>())
        .await?;
    let http = load::client();

    // Each tenant gets its database from a first machine, which then leaves.
    let seeder = Machine::start(&setup, "d0000000000004").await?;
    let seeders = HashMap::from([(seeder.id.clone(), seeder.addr)]);
    for size in sizes_mb {
        increment(&http, &seeders, &seeder.id, &tenant(*size), lease_ttl)
            .await
            .with_context(|| format!("creating the {size} MB tenant's database"))?;
    }
    seeder.stop().await?;
    let mut object_bytes = HashMap::new();
    for size in sizes_mb {
        let bytes = grow(&setup.store()?, &tenant(*size), *size, scratch).await?;
        object_bytes.insert(*size, bytes);
    }

    let machine = Machine::start(&setup, "e0000000000005").await?;
    let machines = HashMap::from([(machine.id.clone(), machine.addr)]);
    let mut results = Vec::new();
    for size in sizes_mb {
        let customer = tenant(*size);
        let started = Instant::now();
        let mut retries = increment(&http, &machines, &machine.id, &customer, lease_ttl).await?;
        let first_request_ms = started.elapsed().as_secs_f64() * 1000.0;
        let metrics = machine.metrics().await?;
        let (sum_before, count_before) = upload_totals(&metrics);
        let mut latencies = Vec::with_capacity(commits);
        for _ in 0..commits {
            let started = Instant::now();
            retries += increment(&http, &machines, &machine.id, &customer, lease_ttl).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let metrics = machine.metrics().await?;
        let (sum_after, count_after) = upload_totals(&metrics);
        latencies.sort_by(f64::total_cmp);
        let result = ColdStart {
            size_mb: *size,
            object_bytes: object_bytes[size],
            first_request_ms,
            commit_p50_ms: latencies.get(latencies.len() / 2).copied().unwrap_or(0.0),
            upload_mean_ms: (sum_after - sum_before) * 1000.0
                / (count_after - count_before).max(1.0),
            retries,
        };
        eprintln!(
            "bench:   {:>4} MB  first request {:>7.1} ms  commit p50 {:>7.1} ms  upload {:>7.1} ms",
            size, result.first_request_ms, result.commit_p50_ms, result.upload_mean_ms
        );
        results.push(result);
    }
    machine.stop().await?;
    Ok(results)
}

/// One increment, sent again like a client would while the machine answers
/// with an error (it steps down when an upload outlives its lease, and
/// takes the lease back once the lock is stale). Returns the retries.
async fn increment(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    machine: &str,
    customer: &str,
    lease_ttl: Duration,
) -> anyhow::Result<u32> {
    let give_up = Instant::now() + 3 * lease_ttl + Duration::from_secs(10);
    let mut retries = 0;
    while !load::increment(http, machines, machine, customer).await {
        if Instant::now() > give_up {
            bail!("no increment of tenant {customer} succeeded after {retries} retries");
        }
        retries += 1;
        eprintln!("bench:   an increment of tenant {customer} failed; sending it again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(retries)
}

fn tenant(size_mb: u64) -> String {
    format!("cold{size_mb}mb")
}

fn upload_totals(metrics: &str) -> (f64, f64) {
    (
        metric_sum(metrics, "tenantd_upload_seconds_sum", &[]),
        metric_sum(metrics, "tenantd_upload_seconds_count", &[]),
    )
}

/// Pads the tenant's stored database with a ballast table to `size_mb`
/// (random bytes: nothing on the way compresses them), keeping its metadata.
/// No machine holds the tenant meanwhile, so an unconditional put is safe.
async fn grow(
    store: &DynStore,
    customer: &str,
    size_mb: u64,
    scratch: &Path,
) -> anyhow::Result<u64> {
    let key = keys::database(customer);
    let object = store
        .get(&key)
        .await?
        .with_context(|| format!("{key} is missing"))?;
    let path = scratch.join(format!("{customer}.sqlite3"));
    std::fs::write(&path, &object.body)?;
    {
        let db = rusqlite::Connection::open(&path)?;
        let chunks = (size_mb * 16) as i64; // 64 KiB each
        db.execute_batch("CREATE TABLE ballast (b BLOB)")?;
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO ballast SELECT randomblob(65536) FROM n",
            [chunks],
        )?;
    }
    let bytes = std::fs::read(&path)?;
    let len = bytes.len() as u64;
    // The pages changed, so the snapshot's recorded checksum no longer
    // holds: drop it (a snapshot without one is accepted), keep the rest.
    let mut metadata = object.metadata;
    metadata.remove(crate::tenant::log::CHECKSUM_KEY);
    store
        .put(&key, bytes.into(), metadata, Precondition::None)
        .await?;
    std::fs::remove_file(&path)?;
    Ok(len)
}
