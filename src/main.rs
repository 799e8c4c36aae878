//! The `tenantd` binary: parses arguments and hands over to the core
//! library (`tenantd-core`) or to a tool crate (`tenantd-dev`,
//! `tenantd-chaos`, `tenantd-bench`). The CLI-only commands (`sql`,
//! `restore`'s flags, `tenants`, `tokens`, `fly`) live here.

mod fly;
mod migrate_cli;
mod restore_cli;
mod serve_args;
mod sql_client;
mod tenants_cli;
mod tokens_cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tenantd",
    version,
    about = "Per-tenant SQLite on object storage, for Fly.io"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve tenants' databases (one tenant with CUSTOMER_ID, else pool mode).
    Serve(Box<serve_args::ServeArgs>),
    /// Run a local stand-in for a Fly app: machines, edge proxy, internal DNS.
    Dev(tenantd_dev::DevArgs),
    /// Run the chaos workload and check that no acknowledged write is lost.
    Chaos(tenantd_chaos::ChaosArgs),
    /// Measure durable throughput, latency, failover and cold starts.
    Bench(tenantd_bench::BenchArgs),
    /// Provision and scale tenants' machines through the Fly Machines API.
    Fly(fly::FlyArgs),
    /// Run SQL against a tenant's database through the app's URL.
    Sql(sql_client::SqlArgs),
    /// Write a tenant's database as of any kept commit, or make that state
    /// the current one (`--in-place`).
    Restore(restore_cli::RestoreArgs),
    /// Create, delete and list tenants in the store.
    Tenants(tenants_cli::TenantsArgs),
    /// Make tenant tokens: a key pair, and tokens that open one tenant.
    Tokens(tokens_cli::TokensArgs),
    /// Publish schema migrations and apply them to every tenant.
    Migrate(migrate_cli::MigrateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => tenantd_core::server::main((*args).into()).await,
            Command::Dev(args) => tenantd_dev::run(args).await,
            Command::Chaos(args) => tenantd_chaos::run(args).await,
            Command::Bench(args) => tenantd_bench::run(args).await,
            Command::Fly(args) => fly::run(args).await,
            Command::Sql(args) => sql_client::run(args).await,
            Command::Restore(args) => restore_cli::run(args).await,
            Command::Tenants(args) => tenants_cli::run(args).await,
            Command::Tokens(args) => tokens_cli::run(args).await,
            Command::Migrate(args) => migrate_cli::run(args).await,
        }
    });
    // Blocking threads (a tenant's SQLite work) must not keep the process
    // alive past its drain: statements were interrupted at the signal, and
    // whatever SQLite cannot interrupt is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
