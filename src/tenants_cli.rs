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
    /// Create tenants with an empty database at the latest published schema
    /// version (idempotent: existing ones are left as they are), or one
    /// tenant as a fork of another (--from) or from a SQLite file (--from-file).
    Create {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Fork: start as this tenant is (or was, with --at); it is only read.
        #[arg(long, value_name = "SRC_ID", conflicts_with = "from_file")]
        from: Option<String>,
        /// With --from: an RFC 3339 time (the last commit at or before it) or
        /// a log slot number [default: the newest commit].
        #[arg(long, requires = "from")]
        at: Option<String>,
        /// Import: a SQLite file (e.g. what `tenantd restore --output` wrote).
        #[arg(long, value_name = "FILE")]
        from_file: Option<std::path::PathBuf>,
        /// Largest database a tenant may have, as the machines' --max-db-bytes.
        #[arg(long, env = "TENANTD_MAX_DB_BYTES", default_value_t = 1 << 30)]
        max_db_bytes: u64,
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
        TenantsCommand::Create {
            ids,
            from,
            at,
            from_file,
            max_db_bytes,
        } if from.is_some() || from_file.is_some() => {
            let [id] = &parse_ids(&ids)?[..] else {
                anyhow::bail!("--from and --from-file create one tenant: give one ID");
            };
            let source = match (&from, &from_file) {
                (Some(src), _) => Source::Fork {
                    src: TenantId::parse(src)
                        .map_err(|e| anyhow::anyhow!("--from {src:?}: {e}"))?,
                    at: crate::restore_cli::parse_at(at.as_deref())?,
                },
                (None, Some(file)) => Source::File(file.clone()),
                (None, None) => unreachable!("guarded above"),
            };
            create_from(&store, id, source, max_db_bytes).await?;
        }
        TenantsCommand::Create { ids, .. } => {
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

enum Source {
    Fork {
        src: TenantId,
        at: tenantd_core::tenant::log::Until,
    },
    File(std::path::PathBuf),
}

/// Fork or import: the database is made in a scratch folder (the source
/// tenant is only read, never locked), checked, and uploaded as the new
/// tenant's snapshot with an empty log; nothing is created on any error.
async fn create_from(
    store: &DynStore,
    id: &TenantId,
    source: Source,
    max_db_bytes: u64,
) -> anyhow::Result<()> {
    use tenantd_core::tenant::migrations::{Scratch, import};
    let scratch = Scratch::new()?;
    let (file, what) = match source {
        Source::Fork { src, at } => {
            if !lifecycle::tenant_exists(store, &src).await? {
                anyhow::bail!("--from {src}: {}", lifecycle::not_found_message(&src));
            }
            let path = scratch.0.join("fork.sqlite3");
            let done =
                tenantd_core::restore::materialize_retrying(store, src.as_str(), &path, at).await?;
            (path, format!("a fork of {src} as of slot {}", done.seq))
        }
        Source::File(file) => {
            let what = format!("an import of {}", file.display());
            (file, what)
        }
    };
    let dir = scratch.0.clone();
    let (ready, version) =
        tokio::task::spawn_blocking(move || import::prepare(&file, &dir, max_db_bytes)).await??;
    lifecycle::create_from_file(store, id, &ready, version).await?;
    println!("{id} created ({what}, schema version {version})");
    Ok(())
}
