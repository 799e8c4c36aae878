//! `tenantd chaos`: a Jepsen-style check that no acknowledged write is lost
//! and no two machines write at once. It starts a `tenantd dev` cluster (or
//! targets a deployed app), runs a recorded workload while nemeses
//! scheduled from a seed kill, pause, partition and scale machines, reads
//! the final counts once the cluster is quiet, and checks the history.

pub mod availability;
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod service_sim;
pub mod sim;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use crate::config::parse_duration;
use crate::dev::{Cluster, DevConfig};
use checker::Report;
use history::NemesisEvent;

#[derive(Args, Clone, Debug)]
pub struct ChaosArgs {
    /// How long the workload and nemeses run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the nemesis schedule and the workload's choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Customers to write to.
    #[arg(long, value_delimiter = ',', default_value = "100,200")]
    pub customers: Vec<String>,
    /// Machines per customer in the local cluster.
    #[arg(long, default_value_t = 2)]
    pub machines_per_customer: usize,
    /// Lease ttl of the local cluster.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Nemeses to use (default: all; `none` for none).
    #[arg(long, value_delimiter = ',')]
    pub nemeses: Vec<String>,
    /// Store faults on every machine from the start (JSON, as
    /// TENANTD_FAULTS); store nemeses are layered over them.
    #[arg(long)]
    pub faults: Option<String>,
    /// Print the machines' logs (stdout) instead of keeping them quiet.
    #[arg(long)]
    pub logs: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run against a deployed app's URL (no process nemeses) instead of a
    /// local cluster.
    #[arg(long)]
    pub target: Option<String>,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    crate::server::init_tracing(crate::config::LogFormat::Text);
    for customer in &args.customers {
        crate::TenantId::parse(customer)?;
    }
    let kinds: Vec<&'static str> = if args.nemeses.is_empty() {
        nemesis::KINDS.to_vec()
    } else if args.nemeses.iter().all(|n| n == "none") {
        Vec::new()
    } else {
        args.nemeses
            .iter()
            .map(|n| {
                nemesis::KINDS
                    .iter()
                    .find(|k| **k == n)
                    .copied()
                    .with_context(|| format!("unknown nemesis {n:?}; known: {:?}", nemesis::KINDS))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let baseline = match &args.faults {
        Some(json) => {
            serde_json::from_str::<crate::store::FaultConfig>(json)
                .with_context(|| format!("invalid --faults {json:?}"))?;
            json.clone()
        }
        None => "{}".to_string(),
    };
    let scratch = tempdir()?;
    let cluster = match &args.target {
        Some(_) => None,
        None => {
            let mut config = DevConfig::new(std::env::current_exe()?, &scratch);
            config.customers = args.customers.clone();
            config.machines_per_customer = args.machines_per_customer;
            config.lease_ttl = args.lease_ttl;
            config.restart_delay = Some(Duration::from_millis(availability::KILLED_FOR_MS));
            config.log_sink = if args.logs {
                crate::dev::logs::LogSink::Stdout
            } else {
                crate::dev::logs::LogSink::Quiet
            };
            if args.faults.is_some() {
                config
                    .extra_env
                    .push(("TENANTD_FAULTS".into(), baseline.clone()));
            }
            Some(Cluster::start(config).await?)
        }
    };
    let base = match (&args.target, &cluster) {
        (Some(target), _) => target.trim_end_matches('/').to_string(),
        (None, Some(cluster)) => cluster.edge_url(),
        _ => unreachable!(),
    };
    eprintln!(
        "chaos: {} for {:?}, seed {}, {} clients, customers {:?}",
        base, args.duration, args.seed, args.clients, args.customers
    );

    let mut rng = StdRng::seed_from_u64(args.seed);
    let plan = match &cluster {
        Some(_) if !kinds.is_empty() => {
            nemesis::schedule(&mut rng, args.duration, &args.customers, &kinds)
        }
        _ => Vec::new(),
    };
    let t0 = Instant::now();
    let load = workload::Workload::start(&base, &args.customers, args.clients, args.seed, t0);
    let mut nemeses: Vec<NemesisEvent> = Vec::new();
    for (at, kind, customer) in plan {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + at)).await;
        let cluster = cluster.as_ref().expect("nemeses only with a local cluster");
        if let Some(event) =
            nemesis::apply(cluster, kind, &customer, args.lease_ttl, &baseline, t0).await
        {
            eprintln!(
                "chaos: {:>6} ms  {:<18} customer {} {}",
                event.start_ms,
                event.kind,
                customer,
                event.machine.as_deref().unwrap_or("")
            );
            nemeses.push(event);
        }
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + args.duration)).await;
    let ops = load.stop().await;
    let run_ms = t0.elapsed().as_millis() as u64;

    // Quiesce: let restarts and takeovers finish, then read each count.
    eprintln!(
        "chaos: workload stopped after {} operations; reading final counts",
        ops.len()
    );
    let finals = final_counts(&base, &args.customers).await;
    let report = checker::check(&ops, &finals, &nemeses, run_ms);
    let throughput = availability::throughput(&ops, run_ms);
    print_report(&report, &nemeses);
    print_availability(&report, &throughput);
    if let Some(path) = &args.json {
        let doc = json!({
            "seed": args.seed,
            "duration_ms": run_ms,
            "violations": report.violations,
            "sent": report.sent,
            "acked": report.acked,
            "indeterminate": report.indeterminate,
            "success_ratio": report.success_ratio,
            "longest_gap_ms": report.longest_gap_ms,
            "throughput": throughput,
            "faults": serde_json::from_str::<serde_json::Value>(&baseline)?,
            "customers": report.customers,
            "nemeses": nemeses,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !report.violations.is_empty() {
        anyhow::bail!(
            "{} violation(s) found (seed {})",
            report.violations.len(),
            args.seed
        );
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tenantd-chaos-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn final_counts(base: &str, customers: &[String]) -> BTreeMap<String, u64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut finals = BTreeMap::new();
    for customer in customers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let reply = http
                .get(format!("{base}/customers/{customer}/count"))
                .header("accept", "application/json")
                .send()
                .await;
            if let Ok(reply) = reply
                && reply.status().is_success()
                && let Ok(body) = reply.json::<serde_json::Value>().await
                && let Some(count) = body["count"].as_u64()
            {
                finals.insert(customer.clone(), count);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    finals
}

fn print_availability(report: &Report, t: &availability::Throughput) {
    for (customer, r) in &report.customers {
        println!(
            "customer {customer}: success_ratio {:.4} ({} of {} acknowledged), longest_gap_ms {} (from {} ms)",
            r.success_ratio, r.acked, r.sent, r.longest_gap_ms, r.longest_gap_from_ms
        );
    }
    println!(
        "overall: success_ratio {:.4} ({} of {} acknowledged), longest_gap_ms {} (outside kills/pauses/partitions/stops of the holder and idle time), {:.1} acknowledged/s, latency p50 {} ms p99 {} ms max {} ms",
        report.success_ratio,
        report.acked,
        report.sent,
        report.longest_gap_ms,
        t.acked_per_sec,
        t.p50_ms,
        t.p99_ms,
        t.max_ms
    );
}

fn print_report(report: &Report, nemeses: &[NemesisEvent]) {
    println!();
    println!(
        "{:<10} {:>7} {:>13} {:>7} {:>7} {:>15} {:>22}",
        "customer",
        "acked",
        "indeterminate",
        "failed",
        "final",
        "longest gap ms",
        "recovery after kill ms"
    );
    for (customer, r) in &report.customers {
        println!(
            "{:<10} {:>7} {:>13} {:>7} {:>7} {:>15} {:>22}",
            customer,
            r.acked,
            r.indeterminate,
            r.failed,
            r.final_count,
            r.longest_gap_ms,
            format!("{:?}", r.recovery_after_kill_ms)
        );
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nemeses {
        *kinds.entry(n.kind.as_str()).or_default() += 1;
    }
    println!("nemeses: {kinds:?}");
    if report.violations.is_empty() {
        println!(
            "no violations: every acknowledged write is in the final state, no count was given twice, no phantom writes"
        );
    } else {
        println!("VIOLATIONS ({}):", report.violations.len());
        for v in &report.violations {
            println!("  - {v}");
        }
    }
}
