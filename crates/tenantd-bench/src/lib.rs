//! `tenantd bench`: durable throughput and latency against concurrency, side
//! by side with the answer-before-upload upper bound, on the file store
//! under the fault layer's added latency (like Tigris); durable SQL
//! transactions of three statements; the store's own PUT latency; PUTs per acknowledged write; the cost of an idle tenant;
//! failover and handoff with real processes; cold starts by database size;
//! store writes caused by requests for tenants that do not exist.

// The bench report is one `json!` literal with many keys.
#![recursion_limit = "256"]

mod cold_start;
mod failover;
mod followers;
mod followers_kill;
mod held_tenants;
mod idle;
mod kill_by_size;
mod load;
mod machines;
mod report;
mod svg;
mod throughput;
mod unknown;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;

use tenantd_core::config::parse_duration;
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{FaultConfig, Metadata, Precondition, StoreUrl, open_store};

pub use report::Report;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Shorter runs (3 s per concurrency level, fewer samples): finishes
    /// within 3 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of throughput and p99 against concurrency.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write an SVG plot of commit cost (p50 and bytes uploaded) against
    /// database size.
    #[arg(long)]
    pub commit_svg: Option<PathBuf>,
    /// Latency added to every store request (Tigris: tens of milliseconds).
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub store_latency: Duration,
    /// Uniform extra latency in [0, jitter] on every store request.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub store_jitter: Duration,
    /// Concurrent clients, one level after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256,512")]
    pub concurrency: Vec<usize>,
    /// Time per concurrency level [default: 10s, 3s with --quick].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Lease ttl of the machines timed for throughput, failover and handoff
    /// (the many-tenants section always runs at the serve default).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// SIGKILLs of the holder to time failover over.
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// SIGTERMs of the holder to time the handoff over [default: 3, 2 with --quick].
    #[arg(long)]
    pub stops: Option<usize>,
    /// Database sizes for the commit-cost and cold-start figures, in MB
    /// [default: 1,10,100,1000; 1,10,100 with --quick].
    #[arg(long, value_delimiter = ',')]
    pub sizes_mb: Option<Vec<u64>>,
    /// Where to put the scratch stores [default: a new folder under the
    /// system's temporary folder, removed at the end].
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

/// Idle tenants one pool machine holds for the per-tenant cost figures
/// (contract keys of `store_requests_per_held_tenant_hour_by_count`).
const HELD_TENANT_COUNTS: [usize; 3] = [1, 100, 1000];

/// The concurrency the headline figures (`durable_rps`, ...) are taken at.
const HEADLINE_CLIENTS: usize = 256;
const WRITERS_AND_READERS: &str =
    "4 writers (each then reads its bookmark at a follower), 8 readers on all machines";

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // The bench's own machines would drown the progress lines at info.
    tenantd_core::server::init_tracing_at(tenantd_core::config::LogFormat::Text, "warn");
    anyhow::ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|c| *c > 0),
        "--concurrency needs at least one level, each above 0"
    );
    let duration = args.duration.unwrap_or(if args.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    });
    let stops = args.stops.unwrap_or(if args.quick { 2 } else { 3 });
    let samples = if args.quick { 50 } else { 200 };
    let sizes_mb = args.sizes_mb.clone().unwrap_or(if args.quick {
        vec![1, 10, 100]
    } else {
        vec![1, 10, 100, 1000]
    });
    let faults = format!(
        r#"{{"latency":"{}","jitter":"{}"}}"#,
        humantime::format_duration(args.store_latency),
        humantime::format_duration(args.store_jitter)
    );
    let scratch = match &args.scratch {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tenantd-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let started = Instant::now();
    eprintln!(
        "bench: store latency {:?} ± {:?}, lease ttl {:?}, {:?} per level, scratch {}",
        args.store_latency,
        args.store_jitter,
        args.lease_ttl,
        duration,
        scratch.display()
    );

    eprintln!("bench: [1/10] store PUT latency ({samples} PUTs of 16 KiB)");
    let store_put_p50_ms = store_put_p50(&scratch.join("put"), &faults, samples).await?;
    eprintln!("bench:   PUT p50 {store_put_p50_ms:.1} ms");

    eprintln!("bench: [2/10] durable group commit");
    let durable = throughput::run(
        &scratch.join("durable"),
        &faults,
        args.lease_ttl,
        false,
        &args.concurrency,
        duration,
    )
    .await?;
    eprintln!("bench: [3/10] answer before upload (upper bound, bench-only)");
    let unsafe_ = throughput::run(
        &scratch.join("unsafe"),
        &faults,
        args.lease_ttl,
        true,
        &args.concurrency,
        duration,
    )
    .await?;

    let sql_clients = if args.concurrency.contains(&HEADLINE_CLIENTS) {
        HEADLINE_CLIENTS
    } else {
        *args.concurrency.iter().max().expect("checked above")
    };
    eprintln!("bench: [4/10] durable SQL transactions (3 statements) at {sql_clients} clients");
    let sql = throughput::run_sql(
        &scratch.join("sql"),
        &faults,
        args.lease_ttl,
        sql_clients,
        duration,
    )
    .await?;

    let window = args.lease_ttl.max(Duration::from_secs(3));
    eprintln!("bench: [5/10] idle tenant: store requests while held and after release");
    let idle = idle::run(&scratch.join("idle"), &faults, args.lease_ttl, window).await?;
    eprintln!(
        "bench:   held: {:.0} store requests/hour; released after {} ms; then {} requests in {} ms",
        idle.held_requests_per_hour,
        idle.released_after_ms,
        idle.requests_after_release,
        idle.after_release_window_ms
    );

    // A pool machine holding a thousand tenants runs at the serve default
    // ttl, whatever `--lease-ttl` the failover sections use: at a 1 s ttl a
    // loaded 2-core machine's heartbeat renewal can miss its deadline, and
    // the session then gives up every lease, as it must (seen in CI).
    let held_ttl = tenantd_core::config::ServeConfig::default().lease_ttl;
    let held_window = if args.quick { held_ttl } else { held_ttl * 3 };
    eprintln!(
        "bench: [6/10] many idle tenants held by one pool machine (a `tenantd serve` process, lease ttl {held_ttl:?})"
    );
    let held = held_tenants::run(
        &scratch.join("held"),
        &faults,
        held_ttl,
        &HELD_TENANT_COUNTS,
        held_window,
    )
    .await?;
    eprintln!(
        "bench:   RSS {:.1} MiB empty, {:.1} MiB with {} tenants: {:.3} MiB per held tenant",
        held.rss_mb_empty, held.rss_mb_full, held.held_at_largest, held.rss_mb_per_held_tenant
    );

    eprintln!("bench: [7/10] commit cost and cold start by database size");
    let cold = cold_start::run(
        &scratch.join("cold"),
        &faults,
        args.lease_ttl,
        &sizes_mb,
        Some(&std::env::current_exe()?),
    )
    .await?;

    eprintln!(
        "bench: [8/10] failover ({} SIGKILLs) and handoff ({stops} SIGTERMs) with real processes",
        args.kills
    );
    let failover = failover::run(
        &std::env::current_exe()?,
        &scratch.join("failover"),
        &faults,
        args.lease_ttl,
        args.kills,
        stops,
        16,
    )
    .await?;

    eprintln!("bench: [9/10] 1,000 requests for tenants that do not exist (a real tenantd serve)");
    let unknown = unknown::run(&scratch.join("unknown"), 1_000).await?;
    eprintln!(
        "bench:   {} of {} answered 404; {} store writes, {} store reads",
        unknown.not_found, unknown.requests, unknown.store_writes, unknown.store_reads
    );

    eprintln!("bench: [10/10] follower reads: 3 machines of one tenant, {WRITERS_AND_READERS}");
    let followers = followers::run(
        &scratch.join("followers"),
        &faults,
        args.lease_ttl,
        duration,
    )
    .await?;
    eprintln!(
        "bench:   {:.0}% of {} reads by followers ({} failed); bookmark read after a write p50 {:.1} ms, p99 {:.1} ms; {:.1} log reads per 1,000 commits",
        followers.follower_read_share * 100.0,
        followers.reads,
        followers.failed_reads,
        followers.follower_lag_p50_ms,
        followers.follower_lag_p99_ms,
        followers.follower_log_reads_per_1000_commits
    );
    eprintln!(
        "bench:   {:.1} store requests per follower per 1,000 commits",
        followers.follower_store_requests_per_1000_commits
    );
    eprintln!(
        "bench:   reads during a holder kill: 3 machines through the dev edge, 4 writers, 8 readers"
    );
    let kill = followers_kill::run(
        &std::env::current_exe()?,
        &scratch.join("followers-kill"),
        &faults,
        args.lease_ttl,
    )
    .await?;
    eprintln!(
        "bench:   {:.2}% of {} reads answered in the {} ms after the kill ({} by followers); longest read gap {} ms",
        kill.follower_read_availability_during_kill * 100.0,
        kill.reads,
        kill.window_ms,
        kill.follower_answers,
        kill.follower_read_longest_gap_ms
    );

    let mut report = Report::new(
        &args,
        duration,
        store_put_p50_ms,
        durable,
        unsafe_,
        sql,
        idle,
        held,
        cold,
        failover,
        started.elapsed(),
    );
    report.set_unknown_tenants(unknown);
    report.set_followers(followers);
    report.set_follower_kill(kill);
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report.svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    if let Some(path) = &args.commit_svg {
        std::fs::write(path, report.commit_svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    if args.scratch.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// The store's own PUT p50 under the configured faults: what one
/// acknowledged write cannot beat.
async fn store_put_p50(
    root: &std::path::Path,
    faults: &str,
    samples: usize,
) -> anyhow::Result<f64> {
    let faults: FaultConfig = serde_json::from_str(faults)?;
    let url = StoreUrl::File(root.to_path_buf());
    let (store, _) = open_store(&url, faults, RetryPolicy::default(), None).await?;
    let body = Bytes::from(vec![7u8; 16 * 1024]);
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let started = Instant::now();
        store
            .put(
                &format!("put/{n}"),
                body.clone(),
                Metadata::new(),
                Precondition::None,
            )
            .await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies[latencies.len() / 2])
}
