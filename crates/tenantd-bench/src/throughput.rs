//! Throughput and latency against concurrency: two machines of one tenant,
//! clients spread over both (the non-holder replays to the holder), once
//! with durable acknowledgements and once answering before the upload.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::load;
use super::machines::{Machine, Setup, store_requests};

/// One concurrency level of one mode.
#[derive(Clone, Debug, Serialize)]
pub struct Level {
    pub clients: usize,
    pub acked: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Store PUTs (database uploads and lock renewals) per 1,000 acks.
    pub puts_per_1000_writes: f64,
}

impl Level {
    /// Runs `clients` closed-loop clients doing `work` for `duration`
    /// against the tenant's machines, and counts the store PUTs they cost.
    async fn measure(
        machines: &[Machine],
        by_id: &HashMap<String, std::net::SocketAddr>,
        clients: usize,
        duration: Duration,
        work: load::Work,
    ) -> anyhow::Result<Level> {
        let (_, puts_before) = store_requests(machines).await?;
        let samples = load::run(by_id.clone(), CUSTOMER, clients, duration, work).await;
        let (_, puts_after) = store_requests(machines).await?;
        let puts = puts_after - puts_before;
        let acked = samples.latencies.len();
        Ok(Level {
            clients,
            acked,
            errors: samples.errors,
            rps: acked as f64 / duration.as_secs_f64(),
            p50_ms: samples.percentile_ms(0.50),
            p99_ms: samples.percentile_ms(0.99),
            puts_per_1000_writes: if acked == 0 {
                0.0
            } else {
                puts * 1000.0 / acked as f64
            },
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    pub levels: Vec<Level>,
    /// Acknowledged increments over all levels, and the count read back at
    /// the end: durable mode must not have lost any.
    pub acked_total: u64,
    pub final_count: u64,
}

pub const CUSTOMER: &str = "bench";

/// Durable SQL transactions: one level of closed-loop clients, each request
/// a transfer of three statements in one transaction.
#[derive(Clone, Debug, Serialize)]
pub struct SqlResult {
    pub statements_per_request: usize,
    pub level: Level,
    /// Transfers acknowledged, and those read back at the end (all of them
    /// must be there), and whether the sum of balances is what it was.
    pub acked_total: u64,
    pub transfers_stored: u64,
    pub sum_conserved: bool,
    /// The same transfers as Hrana batches (what `@libsql/client` sends),
    /// at the same clients, after the `/sql` level.
    pub hrana: Level,
}

/// Durable SQL transfers at `clients`: two machines of one tenant (fresh,
/// like the counter's), the tables created in one request, then the level.
pub async fn run_sql(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<SqlResult> {
    let setup = Setup {
        customer: Some(CUSTOMER.into()),
        ..Setup::new(scratch, faults, lease_ttl)
    };
    let machines = vec![
        Machine::start(&setup, "a0000000000001").await?,
        Machine::start(&setup, "b0000000000002").await?,
    ];
    let by_id: HashMap<String, _> = machines.iter().map(|m| (m.id.clone(), m.addr)).collect();
    let http = load::client();
    let first = &machines[0].id;
    load::sql(&http, &by_id, first, CUSTOMER, &load::sql_setup())
        .await
        .ok_or_else(|| anyhow::anyhow!("the SQL API did not create the bench tables"))?;
    let level = Level::measure(
        &machines,
        &by_id,
        clients,
        duration,
        load::Work::SqlTransfer,
    )
    .await?;
    eprintln!(
        "bench:   {:<21} {clients:>4} clients  {:>8.0} transactions/s  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} PUTs/1000  {} errors",
        "durable SQL (3 stmts)",
        level.rps,
        level.p50_ms,
        level.p99_ms,
        level.puts_per_1000_writes,
        level.errors
    );
    let hrana = Level::measure(
        &machines,
        &by_id,
        clients,
        duration,
        load::Work::HranaTransfer,
    )
    .await?;
    eprintln!(
        "bench:   {:<21} {clients:>4} clients  {:>8.0} transactions/s  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} PUTs/1000  {} errors",
        "durable Hrana batch",
        hrana.rps,
        hrana.p50_ms,
        hrana.p99_ms,
        hrana.puts_per_1000_writes,
        hrana.errors
    );
    let check = serde_json::json!({"statements": [
        {"sql": "SELECT count(*) FROM bench_transfers"},
        {"sql": "SELECT sum(balance) FROM bench_accounts"},
    ], "read_only": true});
    let answer = load::sql(&http, &by_id, first, CUSTOMER, &check)
        .await
        .ok_or_else(|| anyhow::anyhow!("could not read the bench tables back"))?;
    let cell = |i: usize| answer["results"][i]["rows"][0][0].as_i64();
    let transfers_stored = cell(0).unwrap_or(0) as u64;
    let sum_conserved = cell(1) == Some(load::SQL_ACCOUNTS * load::SQL_INITIAL_BALANCE);
    for machine in machines {
        machine.stop().await?;
    }
    Ok(SqlResult {
        statements_per_request: 3,
        acked_total: (level.acked + hrana.acked) as u64,
        level,
        transfers_stored,
        sum_conserved,
        hrana,
    })
}

pub async fn run(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    ack_before_upload: bool,
    levels: &[usize],
    duration: Duration,
) -> anyhow::Result<ModeResult> {
    let mode = if ack_before_upload {
        "answer-before-upload"
    } else {
        "durable"
    };
    let setup = Setup {
        customer: Some(CUSTOMER.into()),
        ack_before_upload,
        ..Setup::new(scratch, faults, lease_ttl)
    };
    let machines = vec![
        Machine::start(&setup, "a0000000000001").await?,
        Machine::start(&setup, "b0000000000002").await?,
    ];
    let by_id: HashMap<String, _> = machines.iter().map(|m| (m.id.clone(), m.addr)).collect();
    // The first request settles who holds the lease.
    let http = load::client();
    let mut acked_total = 0u64;
    if load::increment(&http, &by_id, &machines[0].id, CUSTOMER).await {
        acked_total += 1;
    }
    let mut results = Vec::new();
    for &clients in levels {
        let level =
            Level::measure(&machines, &by_id, clients, duration, load::Work::Increment).await?;
        acked_total += level.acked as u64;
        eprintln!(
            "bench:   {mode:<21} {clients:>4} clients  {:>8.0} increments/s  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} PUTs/1000  {} errors",
            level.rps, level.p50_ms, level.p99_ms, level.puts_per_1000_writes, level.errors
        );
        results.push(level);
    }
    let final_count = load::read_count(&http, &by_id, &machines[0].id, CUSTOMER).await?;
    for machine in machines {
        machine.stop().await?;
    }
    Ok(ModeResult {
        levels: results,
        acked_total,
        final_count,
    })
}
