//! `tenantd chaos`: a Jepsen-style check that no acknowledged write is lost
//! and no two machines write at once. It starts a `tenantd dev` cluster (or
//! targets a deployed app), runs a recorded workload while nemeses
//! scheduled from a seed kill, pause, partition and scale machines, reads
//! the final counts once the cluster is quiet, and checks the history.
//! `--workload sql` runs transfers between the rows of an accounts table
//! through the SQL API instead ([`sql_workload`], [`sql_checker`]).

pub mod availability;
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod read_checker;
pub mod sql_checker;
pub mod sql_hostile;
pub mod sql_workload;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use checker::Report;
use history::NemesisEvent;
use sql_checker::{Accounts, SqlReport};
use tenantd_core::config::parse_duration;
use tenantd_dev::{Cluster, DevConfig};

/// Between two requests of the hostile client: often enough to share
/// batches with transfers, rarely enough that runaway queries (each up to
/// --sql-timeout of its tenant's queue) leave the transfers room to run.
const HOSTILE_PAUSE: Duration = Duration::from_millis(300);

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Increments with unique `Idempotency-Key`s; the checker reasons
    /// about counts.
    Counter,
    /// Transfers between the rows of an accounts table through the SQL API,
    /// three statements in one request; the checker verifies that the sum
    /// is conserved and every transfer applied exactly once or not at all.
    Sql,
}

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
    /// What the clients do: `counter` (increments) or `sql` (transfers
    /// between accounts through the SQL API).
    #[arg(long, value_enum, default_value = "counter")]
    pub workload: WorkloadKind,
    /// Accounts per customer for `--workload sql`.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(2..=1000))]
    pub accounts: i64,
    /// Token of the SQL API (`--workload sql`): the local cluster's machines
    /// are started with it (a random one when unset); with `--target` it
    /// must be the app's.
    #[arg(long, env = "TENANTD_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    tenantd_core::server::init_tracing(tenantd_core::config::LogFormat::Text);
    for customer in &args.customers {
        tenantd_core::TenantId::parse(customer)?;
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
    let api_token = match (&args.api_token, args.workload, &args.target) {
        (Some(token), _, _) if !token.is_empty() => token.clone(),
        (_, WorkloadKind::Sql, Some(_)) => {
            anyhow::bail!(
                "--workload sql with --target needs the app's --api-token (TENANTD_API_TOKEN)"
            )
        }
        _ => uuid::Uuid::new_v4().simple().to_string(),
    };
    let baseline = match &args.faults {
        Some(json) => {
            serde_json::from_str::<tenantd_core::store::FaultConfig>(json)
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
                tenantd_dev::logs::LogSink::Stdout
            } else {
                tenantd_dev::logs::LogSink::Quiet
            };
            config.api_token = Some(api_token.clone());
            // Compaction and garbage collection every few commits, so that
            // kills, pauses and store faults land in the middle of them too.
            config.extra_env.extend([
                ("TENANTD_COMPACT_AFTER".into(), "50".into()),
                ("TENANTD_RETENTION".into(), "0s".into()),
            ]);
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
        "chaos: {} for {:?}, seed {}, {} clients, customers {:?}, {:?} workload",
        base, args.duration, args.seed, args.clients, args.customers, args.workload
    );
    if args.workload == WorkloadKind::Sql {
        let outcome = run_sql(&args, &api_token, &base, cluster, &kinds, &scratch).await;
        let _ = std::fs::remove_dir_all(&scratch);
        return outcome;
    }

    let mut rng = StdRng::seed_from_u64(args.seed);
    let plan = match &cluster {
        Some(_) if !kinds.is_empty() => {
            nemesis::schedule(&mut rng, args.duration, &args.customers, &kinds)
        }
        _ => Vec::new(),
    };
    let t0 = Instant::now();
    let load = workload::Workload::start(&base, &args.customers, args.clients, args.seed, t0);
    let nemeses = run_nemeses(cluster.as_ref(), plan, args.lease_ttl, &baseline, t0).await;
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

/// Applies the nemeses of `plan`, each at its time, and returns what was
/// done.
async fn run_nemeses(
    cluster: Option<&Cluster>,
    plan: Vec<(Duration, &'static str, String)>,
    ttl: Duration,
    baseline: &str,
    t0: Instant,
) -> Vec<NemesisEvent> {
    let mut nemeses: Vec<NemesisEvent> = Vec::new();
    for (at, kind, customer) in plan {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + at)).await;
        let cluster = cluster.expect("nemeses only with a local cluster");
        if let Some(event) = nemesis::apply(cluster, kind, &customer, ttl, baseline, t0).await {
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
    nemeses
}

/// The SQL workload: set up each customer's accounts, run transfers under
/// the nemeses, read the tables back through the API, stop the cluster,
/// read them from the store, and check.
async fn run_sql(
    args: &ChaosArgs,
    token: &str,
    base: &str,
    cluster: Option<Cluster>,
    kinds: &[&'static str],
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let accounts = Accounts {
        count: args.accounts,
        initial_balance: 500,
    };
    let client = sql_workload::Client::new(base, token);
    let run = format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    for customer in &args.customers {
        if let Err(e) = client.setup(customer, accounts, &run).await {
            if let Some(cluster) = cluster {
                cluster.shutdown().await;
            }
            return Err(e);
        }
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let plan = match &cluster {
        Some(_) => nemesis::schedule(&mut rng, args.duration, &args.customers, kinds),
        None => Vec::new(),
    };
    let t0 = Instant::now();
    let load = sql_workload::SqlWorkload::start(sql_workload::Start {
        client: &client,
        customers: &args.customers,
        clients: args.clients,
        seed: args.seed,
        accounts,
        run: &run,
        t0,
    });
    let hostile = sql_hostile::Hostile::start(&client, &args.customers, HOSTILE_PAUSE);
    let baseline = args.faults.clone().unwrap_or_else(|| "{}".to_string());
    let nemeses = run_nemeses(cluster.as_ref(), plan, args.lease_ttl, &baseline, t0).await;
    tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + args.duration)).await;
    let (transfers, reads) = load.stop().await;
    let hostile = hostile.stop().await;
    eprintln!(
        "chaos: the hostile client's attacks, by answer: {}",
        serde_json::to_string(&hostile.outcomes).unwrap_or_default()
    );
    let run_ms = t0.elapsed().as_millis() as u64;
    eprintln!(
        "chaos: workload stopped after {} transfers and {} reads; reading the tables back",
        transfers.len(),
        reads.len()
    );
    let mut api = sql_checker::Finals {
        source: "api".into(),
        states: BTreeMap::new(),
    };
    for customer in &args.customers {
        match client.final_state(customer).await {
            Ok(state) => {
                api.states.insert(customer.clone(), state);
            }
            Err(e) => eprintln!("chaos: customer {customer}: final read through the API: {e}"),
        }
    }
    let mut finals = vec![api];
    if let Some(cluster) = cluster {
        // Stopped machines hold nothing: the stored object is the database.
        let store = cluster.config().store.clone();
        cluster.shutdown().await;
        finals.insert(
            0,
            sql_workload::store_finals(&store, &args.customers, scratch).await,
        );
    }
    let mut report = sql_checker::check(
        accounts,
        &args.customers,
        &transfers,
        &reads,
        &finals,
        &nemeses,
        run_ms,
    );
    // An attack carried out is a hole in the sandbox.
    report.violations.extend(hostile.answered.iter().cloned());
    print_sql_report(&report, &nemeses);
    if let Some(path) = &args.json {
        let doc = json!({
            "workload": "sql",
            "seed": args.seed,
            "duration_ms": run_ms,
            "violations": report.violations,
            "acked": report.acked,
            "indeterminate": report.indeterminate,
            "refused": report.refused,
            "reads": report.reads,
            "success_ratio": report.success_ratio(),
            "longest_gap_ms": report.longest_gap_ms(),
            "follower_read_share": report.follower_read_share(),
            "follower_reads": report.follower_reads,
            "accounts": accounts,
            "sources": report.sources,
            "customers": report.customers,
            "nemeses": nemeses,
            "hostile": hostile,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
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

fn print_sql_report(report: &SqlReport, nemeses: &[NemesisEvent]) {
    println!();
    println!(
        "{:<10} {:>7} {:>19} {:>7} {:>7} {:>8} {:>7} {:>9} {:>7} {:>15} {:>22}",
        "customer",
        "acked",
        "indeterminate (app)",
        "refused",
        "retried",
        "replayed",
        "reads",
        "transfers",
        "sum",
        "longest gap ms",
        "recovery after kill ms"
    );
    for (customer, r) in &report.customers {
        println!(
            "{:<10} {:>7} {:>19} {:>7} {:>7} {:>8} {:>7} {:>9} {:>7} {:>15} {:>22}",
            customer,
            r.acked,
            format!("{} ({})", r.indeterminate, r.indeterminate_applied),
            r.refused,
            r.retried,
            r.replayed,
            r.reads,
            r.transfers_stored,
            format!("{}/{}", r.sum_of_balances, r.expected_sum),
            r.longest_gap_ms,
            format!("{:?}", r.recovery_after_kill_ms)
        );
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nemeses {
        *kinds.entry(n.kind.as_str()).or_default() += 1;
    }
    println!("nemeses: {kinds:?}");
    println!("final state read from: {}", report.sources.join(", "));
    println!(
        "reads: {} answered, {} by followers ({:.0}%); each must see the client's last acknowledged transfer",
        report.reads,
        report.follower_reads,
        100.0 * report.follower_read_share()
    );
    if report.violations.is_empty() {
        println!(
            "no violations: the sum of balances is conserved, every acknowledged transfer is stored exactly once, none twice or in part, no refused one, every read saw the whole sum"
        );
    } else {
        println!("VIOLATIONS ({}):", report.violations.len());
        for v in &report.violations {
            println!("  - {v}");
        }
    }
}
