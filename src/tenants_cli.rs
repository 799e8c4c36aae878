//! `tenantd tenants create|delete|ls`: the tenant lifecycle acting on the
//! store directly, configured like `tenantd serve` (`--store`,
//! TENANTD_STORE, BUCKET_NAME and the AWS_* environment).

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use tenantd_core::TenantId;
use tenantd_core::config::{check_store_configured, parse_duration, store_url};
use tenantd_core::lease::{LeaseConfig, Session};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{DynStore, FaultConfig, StoreUrl, open_store};
use tenantd_core::tenant::lifecycle::{self, Deleter};

#[derive(Args, Debug)]
pub struct TenantsArgs {
    /// Object store: s3://bucket[/prefix], file:///abs/path or file://rel/path
    /// [default: s3://$BUCKET_NAME if BUCKET_NAME is set, else file://./data/store].
    #[arg(long, env = "TENANTD_STORE", global = true)]
    pub store: Option<StoreUrl>,

    #[command(subcommand)]
    pub command: TenantsCommand,
}

#[derive(Subcommand, Debug)]
pub enum TenantsCommand {
    /// Create tenants with an empty database (idempotent: existing ones are left as they are).
    Create {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Delete every object of the tenants, under their lease (idempotent).
    Delete {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// How long to wait for a machine holding a tenant to let it go.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
        /// Lease ttl of the deleter's lock (as the machines' --lease-ttl).
        #[arg(long, env = "TENANTD_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
        lease_ttl: Duration,
    },
    /// List the tenants in the store.
    Ls {
        /// One JSON array: [{"customer_id", "bytes", "last_modified", "holder"}].
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: TenantsArgs) -> anyhow::Result<()> {
    tenantd_core::server::init_tracing_at(tenantd_core::config::LogFormat::Text, "warn");
    check_store_configured(args.store.as_ref()).map_err(anyhow::Error::msg)?;
    let url = store_url(args.store.as_ref())
        .map_err(|e| anyhow::anyhow!("{e}: fix --store / TENANTD_STORE"))?;
    let (store, _) = open_store(&url, FaultConfig::default(), RetryPolicy::default(), None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store {url}: {e}"))?;
    match args.command {
        TenantsCommand::Create { ids } => {
            for id in parse_ids(&ids)? {
                let created = lifecycle::create(&store, &id).await?;
                println!("{id} {}", created.as_str());
            }
        }
        TenantsCommand::Delete {
            ids,
            wait,
            lease_ttl,
        } => {
            let ids = parse_ids(&ids)?;
            let deleter = Deleter {
                lease: Session::new(
                    store.clone(),
                    LeaseConfig::new(deleter_id(), "tenantd-cli", lease_ttl),
                ),
                wait,
            };
            for id in ids {
                let deleted = lifecycle::delete(&store, &id, &deleter)
                    .await
                    .with_context(|| format!("customer {id} was not deleted"))?;
                println!("{id} {}", deleted.as_str());
            }
        }
        TenantsCommand::Ls { json } => ls(&store, json).await?,
    }
    Ok(())
}

/// All ids checked before any is acted on.
fn parse_ids(ids: &[String]) -> anyhow::Result<Vec<TenantId>> {
    ids.iter()
        .map(|id| TenantId::parse(id).map_err(|e| anyhow::anyhow!("{e}")))
        .collect()
}

/// The holder name the deleter's lock carries: never a machine's id (a
/// machine treats a lock naming itself as its own leftover), and telling
/// whoever reads the lock what holds it.
fn deleter_id() -> String {
    format!(
        "tenantd-cli-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn ls(store: &DynStore, json: bool) -> anyhow::Result<()> {
    let tenants = lifecycle::list(store).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tenants)?);
        return Ok(());
    }
    println!("customer_id\tbytes\tlast_modified\tholder");
    for t in tenants {
        println!(
            "{}\t{}\t{}\t{}",
            t.customer_id,
            t.bytes,
            t.last_modified.as_deref().unwrap_or("-"),
            t.holder.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}
