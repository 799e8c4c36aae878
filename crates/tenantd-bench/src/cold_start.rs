//! Commit cost and cold start by database size, on the commit log.
//!
//! Each tenant starts as a database written by hand (a ballast table of the
//! size wanted) and stored the old way, as a whole file without
//! `tenantd-format`: the first claim converts it, and is left out of every
//! figure. Then one client increments sequentially (the commit p50, and the
//! delta bytes each commit uploads, from `/metrics`). For the cold start the
//! tenant is left as a holder that never compacted leaves it: the snapshot
//! written at conversion plus the deltas after it. A fresh machine's first
//! read is timed beside a plain download of the same snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::load;
use super::machines::{Machine, Setup, metric_sum};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, Metadata, Precondition, StoreUrl, keys, open_store,
};

/// Increments measured after the first one (whose commit is a delta
/// too): a cold start replays one more delta than this.
pub const DELTAS_AFTER_SNAPSHOT: usize = 100;

#[derive(Clone, Debug, Serialize)]
pub struct ColdStart {
    pub size_mb: u64,
    /// Size of the snapshot object as stored.
    pub object_bytes: u64,
    /// The first claim, which converts the whole-file object (not part of
    /// the other figures).
    pub conversion_ms: f64,
    /// Median latency of one increment from one client (commit + delta
    /// upload), over `commits` increments.
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub commits: usize,
    /// Mean delta bytes uploaded per increment (`tenantd_upload_bytes_total{kind="delta"}`).
    pub upload_bytes_per_commit: f64,
    /// Snapshot bytes uploaded by compaction during those increments.
    pub snapshot_upload_bytes: f64,
    /// A fresh machine's first read of the tenant: lease, snapshot, the
    /// deltas after it, replay.
    pub cold_start_ms: f64,
    /// Deltas after the snapshot at that cold start.
    pub deltas_replayed: usize,
    /// A plain GET of the same snapshot object under the same faults
    /// (median of three).
    pub snapshot_download_ms: f64,
    /// Increments answered with an error and sent again (their time is in
    /// the latencies above): a slow store or disk can cost the lease.
    pub retries: u32,
    /// A real `tenantd serve` process's peak RSS (VmHWM) after it took the
    /// tenant over (snapshot download, log replay) and released it again
    /// (the snapshot brought up to date), over its figure before: MB.
    pub claim_rss_growth_mb: f64,
    /// SIGKILL of the holder (a real `tenantd serve`) to the first answer
    /// of another machine that was already up: the stale rule's wait (one
    /// lease ttl) plus the cold start, ms (0 when not measured).
    pub failover_after_kill_ms: f64,
}

pub async fn run(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    sizes_mb: &[u64],
    rss_program: Option<&Path>,
) -> anyhow::Result<Vec<ColdStart>> {
    let mut setup = Setup::new(scratch, faults, lease_ttl);
    // A release uploads the whole snapshot: at 1 GB that outlasts the
    // serve default, and a lease left behind would put a lease ttl into
    // the next cold start.
    setup.drain_timeout = Duration::from_secs(600);
    let http = load::client();
    let fault_config: FaultConfig = serde_json::from_str(faults)?;
    let (faulty_store, _) = open_store(
        &StoreUrl::File(setup.store_root.clone()),
        fault_config,
        RetryPolicy::default(),
        None,
    )
    .await?;
    let store = setup.store()?;
    let mut results = Vec::new();
    for (n, size) in sizes_mb.iter().enumerate() {
        let customer = tenant(*size);
        plant(&store, &customer, *size, scratch)
            .await
            .with_context(|| format!("creating the {size} MB tenant's database"))?;

        let writer = Machine::start(&setup, &format!("e{n:013}")).await?;
        let machines = HashMap::from([(writer.id.clone(), writer.addr)]);
        let started = Instant::now();
        let mut retries = increment(&http, &machines, &writer.id, &customer, lease_ttl).await?;
        let conversion_ms = started.elapsed().as_secs_f64() * 1000.0;
        // The snapshot the conversion wrote: what the cold start begins from.
        let converted = store
            .get(&keys::database(&customer))
            .await?
            .with_context(|| format!("the {size} MB tenant has no snapshot after its claim"))?;

        let before = writer.metrics().await?;
        let mut latencies = Vec::with_capacity(DELTAS_AFTER_SNAPSHOT);
        for _ in 0..DELTAS_AFTER_SNAPSHOT {
            let started = Instant::now();
            retries += increment(&http, &machines, &writer.id, &customer, lease_ttl).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let after = writer.metrics().await?;
        let uploaded = |kind: &str| {
            let label = format!("kind=\"{kind}\"");
            metric_sum(&after, "tenantd_upload_bytes_total", &[&label])
                - metric_sum(&before, "tenantd_upload_bytes_total", &[&label])
        };
        let (delta_bytes, snapshot_bytes) = (uploaded("delta"), uploaded("snapshot"));
        // The release brings the snapshot up to date; putting the converted
        // one back leaves what a holder that never compacted leaves: the
        // snapshot and every delta after it (nothing deletes them before
        // the retention runs out).
        writer.stop().await?;
        let lock = store.get(&keys::lock(&customer)).await?;
        let released = lock
            .and_then(|l| serde_json::from_slice::<serde_json::Value>(&l.body).ok())
            .is_some_and(|l| l["released"] == true);
        if !released {
            bail!("the {size} MB tenant's holder stopped without releasing it");
        }
        let deltas_replayed = log_slots_after(&store, &customer, &converted.metadata).await?;
        store
            .put(
                &keys::database(&customer),
                converted.body.clone(),
                converted.metadata.clone(),
                Precondition::None,
            )
            .await?;

        let mut downloads = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            faulty_store
                .get(&keys::database(&customer))
                .await?
                .context("the snapshot vanished")?;
            downloads.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        downloads.sort_by(f64::total_cmp);

        let reader = Machine::start(&setup, &format!("f{n:013}")).await?;
        let machines = HashMap::from([(reader.id.clone(), reader.addr)]);
        // Brackets the cold start's store requests in a trace
        // (`RUST_LOG=tenantd_bench=debug,tenantd_core::store::instrumented=trace`).
        tracing::debug!(size_mb = size, "cold start begins");
        let started = Instant::now();
        let count = load::read_count(&http, &machines, &reader.id, &customer).await?;
        let cold_start_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(size_mb = size, cold_start_ms, "cold start done");
        reader.stop().await?;
        let expected = (DELTAS_AFTER_SNAPSHOT + 1) as u64;
        if count < expected {
            bail!("the {size} MB tenant's cold start read {count}, expected at least {expected}");
        }

        let claim_rss_growth_mb = match rss_program {
            Some(program) => {
                claim_rss_growth_mb(program, scratch, &setup, faults, lease_ttl, &customer, n)
                    .await?
            }
            None => 0.0,
        };
        let failover_after_kill_ms = match rss_program {
            Some(program) => {
                super::kill_by_size::failover_after_kill_ms(
                    program,
                    &setup,
                    faults,
                    lease_ttl,
                    &customer,
                    n,
                    &scratch.join(format!("kill-{n}")),
                )
                .await?
            }
            None => 0.0,
        };

        latencies.sort_by(f64::total_cmp);
        let pick = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        let result = ColdStart {
            size_mb: *size,
            object_bytes: converted.body.len() as u64,
            conversion_ms,
            commit_p50_ms: pick(0.5),
            commit_p99_ms: pick(0.99),
            commits: latencies.len(),
            upload_bytes_per_commit: delta_bytes / latencies.len() as f64,
            snapshot_upload_bytes: snapshot_bytes,
            cold_start_ms,
            deltas_replayed,
            snapshot_download_ms: downloads[1],
            retries,
            claim_rss_growth_mb,
            failover_after_kill_ms,
        };
        eprintln!(
            "bench:   {:>4} MB  commit p50 {:>6.1} ms  {:>7.0} B/commit  cold start {:>7.1} ms ({} deltas) vs download {:>7.1} ms  claim RSS +{:.1} MB  failover after SIGKILL {:.0} ms (ttl + 1 s = {} ms)",
            size,
            result.commit_p50_ms,
            result.upload_bytes_per_commit,
            result.cold_start_ms,
            result.deltas_replayed,
            result.snapshot_download_ms,
            result.claim_rss_growth_mb,
            result.failover_after_kill_ms,
            lease_ttl.as_millis() + 1000
        );
        results.push(result);
        // The big scratch files are not needed past this size.
        let _ = std::fs::remove_dir_all(setup.data_dir.clone());
    }
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
    let give_up = Instant::now() + 3 * lease_ttl + Duration::from_secs(30);
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

/// Log objects after the snapshot described by `metadata`.
async fn log_slots_after(
    store: &DynStore,
    customer: &str,
    metadata: &Metadata,
) -> anyhow::Result<usize> {
    let seq: u64 = metadata
        .get(tenantd_core::tenant::log::SEQ_KEY)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let slots = tenantd_core::tenant::log::list_slots(store, customer, seq)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list the log of {customer}: {e}"))?;
    Ok(slots.len())
}

/// Stores a database of `size_mb` for `customer` the way tenantd stored
/// them before the commit log (a whole file, no `tenantd-format`): the
/// counter table and a ballast table of random bytes (nothing on the way
/// compresses them).
async fn plant(
    store: &DynStore,
    customer: &str,
    size_mb: u64,
    scratch: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(scratch)?;
    let path = scratch.join(format!("{customer}.sqlite3"));
    let _ = std::fs::remove_file(&path);
    let owned = path.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let db = rusqlite::Connection::open(&owned)?;
        db.execute_batch(
            "CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (0);
             CREATE TABLE ballast (b BLOB);",
        )?;
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO ballast SELECT randomblob(65536) FROM n",
            [(size_mb * 16) as i64], // 64 KiB each
        )?;
        Ok(())
    })
    .await??;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    store
        .put(
            &keys::database(customer),
            bytes.into(),
            Metadata::new(),
            Precondition::None,
        )
        .await?;
    Ok(())
}

/// Takes `customer` over with a real `tenantd serve` process (this
/// binary), reads it once and releases it with SIGTERM, sampling the
/// process's peak RSS (VmHWM): how much more than at rest the claim, the
/// replay and the release's compaction needed, in MB.
async fn claim_rss_growth_mb(
    program: &Path,
    scratch: &Path,
    setup: &Setup,
    faults: &str,
    lease_ttl: Duration,
    customer: &str,
    n: usize,
) -> anyhow::Result<f64> {
    use std::process::Stdio;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let data_dir = scratch.join(format!("rss-local-{n}"));
    let log_path = scratch.join(format!("rss-serve-{n}.log"));
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let machine_id = format!("r{n:013}");
    let mut child = tokio::process::Command::new(program)
        .args(["serve", "--listen", &addr.to_string()])
        .args(["--machine-id", &machine_id, "--customer-id", ""])
        .env_remove("TENANTD_ADMIN_TOKEN")
        .arg("--store")
        .arg(format!("file://{}", setup.store_root.display()))
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--lease-ttl",
            &humantime::format_duration(lease_ttl).to_string(),
        ])
        .args(["--faults", faults, "--drain-timeout", "600s"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `tenantd serve` for the claim RSS figure")?;
    let pid = child.id().context("the machine exited at once")?;
    let http = load::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "`tenantd serve` exited at start ({status}); see {}",
                log_path.display()
            );
        }
        if let Ok(reply) = http.get(format!("http://{addr}/healthz")).send().await
            && reply.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("`tenantd serve` not healthy within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle = peak_rss_bytes(pid).context("no VmHWM for the machine")?;
    // VmHWM only grows: the last figure read before the exit is the peak.
    let (peak, stop) = (
        Arc::new(AtomicU64::new(idle)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(now) = peak_rss_bytes(pid) else {
                    return;
                };
                peak.fetch_max(now, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let machines = HashMap::from([(machine_id.clone(), addr)]);
    let read = load::read_count(&http, &machines, &machine_id, customer).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let exited = tokio::time::timeout(Duration::from_secs(600), child.wait()).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    read.context("the claim RSS machine could not read the tenant")?;
    exited
        .context("`tenantd serve` did not exit within 600 s of SIGTERM")?
        .context("waiting for `tenantd serve`")?;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(peak.load(Ordering::Relaxed).saturating_sub(idle) as f64 / 1e6)
}

/// A process's peak resident set (VmHWM) in bytes.
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cold starts alone, without the claim RSS figure (no `tenantd`
    /// binary needed), sizes from `COLD_SIZES_MB` (default 1,10,100):
    /// `RUST_LOG=tenantd_bench=debug,tenantd_core::store::instrumented=trace,tenantd_core::tenant::claim=info
    /// cargo test -p tenantd-bench --lib cold_start_alone -- --ignored --nocapture`
    /// prints every store request between "cold start begins" and "done".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by hand"]
    async fn cold_start_alone() {
        tenantd_core::server::init_tracing_at(tenantd_core::config::LogFormat::Text, "warn");
        let sizes: Vec<u64> = std::env::var("COLD_SIZES_MB")
            .unwrap_or_else(|_| "1,10,100".into())
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let faults = r#"{"latency":"20ms","jitter":"5ms"}"#;
        // With `COLD_WITH_PROCESSES=1` (after `cargo build -p tenantd`) also
        // the claim RSS and the failover after a SIGKILL, per size.
        let program =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/tenantd");
        let program = std::env::var("COLD_WITH_PROCESSES")
            .is_ok()
            .then_some(program.as_path());
        let results = run(dir.path(), faults, Duration::from_secs(5), &sizes, program)
            .await
            .unwrap();
        for r in &results {
            println!(
                "cold start {} MB: {:.1} ms vs download {:.1} ms (goal {:.1} ms); failover after SIGKILL {:.0} ms",
                r.size_mb,
                r.cold_start_ms,
                r.snapshot_download_ms,
                r.snapshot_download_ms * 1.2 + 50.0,
                r.failover_after_kill_ms
            );
        }
    }
}
