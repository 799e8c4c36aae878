//! `tenantd migrate push|apply|status`: schema migrations for every tenant
//! (the work is in `tenantd_core::tenant::migrations`).
//!
//! `apply` brings each tenant up to date where it is: through its holder
//! (`POST /_admin/tenants/<id>/migrate` at the address in its lock) when a
//! machine holds it, else under this command's own lease. It skips tenants
//! whose record says they are at the latest version, so a re-run after an
//! interruption resumes; a migration already recorded in a tenant's
//! database is never run again whoever asks.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use tenantd_core::TenantId;
use tenantd_core::config::{check_store_configured, parse_duration, store_url};
use tenantd_core::lease::{LeaseConfig, LockRecord, LockState, Session, read_lock};
use tenantd_core::metrics::Metrics;
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{DynStore, FaultConfig, StoreUrl, keys, open_store};
use tenantd_core::tenant::lifecycle;
use tenantd_core::tenant::migrations::own_lease::{self, Via};
use tenantd_core::tenant::migrations::{publish, read_head, status};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Object store: s3://bucket[/prefix], file:///abs/path or file://rel/path
    /// [default: s3://$BUCKET_NAME if BUCKET_NAME is set, else file://./data/store].
    #[arg(long, env = "TENANTD_STORE", global = true)]
    pub store: Option<StoreUrl>,

    /// Print the number of store requests this command made (stderr), by
    /// operation: for measuring.
    #[arg(long, global = true)]
    pub store_requests: bool,

    #[command(subcommand)]
    pub command: MigrateCommand,
}

#[derive(Subcommand, Debug)]
pub enum MigrateCommand {
    /// Publish a folder of NNNN_<name>.sql files (published files are immutable).
    Push {
        /// The folder holding every migration, from 0001 on.
        dir: PathBuf,
    },
    /// Bring tenants up to the latest published version now.
    Apply {
        /// Every tenant in the store.
        #[arg(long, conflicts_with = "customer_id")]
        all: bool,
        /// These tenants (repeat the flag, or separate with commas).
        #[arg(long, value_delimiter = ',', required_unless_present = "all")]
        customer_id: Vec<String>,
        /// Apply to this many tenants first, and stop if any of them failed.
        #[arg(long)]
        canary: Option<usize>,
        /// Tenants brought up to date at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The machines' admin token, to ask a tenant's holder to apply.
        #[arg(long, env = "TENANTD_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Lease ttl of this command's own lock (as the machines' --lease-ttl).
        #[arg(long, env = "TENANTD_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
        lease_ttl: Duration,
        /// Apply to tenants whose record says they are up to date too.
        #[arg(long)]
        recheck: bool,
    },
    /// Versions of all tenants, from their records (no tenant is woken).
    Status {
        /// {"latest", "versions": {"<n>": tenants}, "failed": [{"customer_id", "version", "error"}]}
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    tenantd_core::server::init_tracing_at(tenantd_core::config::LogFormat::Text, "warn");
    check_store_configured(args.store.as_ref()).map_err(anyhow::Error::msg)?;
    let url = store_url(args.store.as_ref())
        .map_err(|e| anyhow::anyhow!("{e}: fix --store / TENANTD_STORE"))?;
    let counted = Metrics::new();
    let (store, _) = open_store(
        &url,
        FaultConfig::default(),
        RetryPolicy::default(),
        Some(&counted),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open the store {url}: {e}"))?;
    let result = command(store, args.command).await;
    if args.store_requests {
        eprintln!("store requests: {}", store_requests(&counted));
    }
    result
}

/// `tenantd_store_requests_total` summed by operation.
fn store_requests(metrics: &Metrics) -> String {
    let mut by_op = std::collections::BTreeMap::<String, f64>::new();
    for line in metrics.render().lines() {
        let Some(rest) = line.strip_prefix("tenantd_store_requests_total{") else {
            continue;
        };
        let op = rest
            .split("op=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        *by_op.entry(op.to_string()).or_default() += n;
    }
    let total: f64 = by_op.values().sum();
    let parts: Vec<String> = by_op.iter().map(|(op, n)| format!("{op} {n}")).collect();
    format!("{total} ({})", parts.join(", "))
}

async fn command(store: DynStore, command: MigrateCommand) -> anyhow::Result<()> {
    match command {
        MigrateCommand::Push { dir } => push(&store, &dir).await,
        MigrateCommand::Status { json } => {
            let fleet = status::fleet(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet)?);
            } else {
                println!("latest published: {}", fleet.latest);
                for (version, tenants) in &fleet.versions {
                    println!("version {version}: {tenants} tenant(s)");
                }
                for f in &fleet.failed {
                    println!(
                        "FAILED {} at migration {}: {}",
                        f.customer_id, f.version, f.error
                    );
                }
            }
            Ok(())
        }
        MigrateCommand::Apply {
            all,
            customer_id,
            canary,
            concurrency,
            admin_token,
            lease_ttl,
            recheck,
        } => {
            let ids = if all {
                lifecycle::list(&store)
                    .await?
                    .into_iter()
                    .filter_map(|t| TenantId::parse(&t.customer_id).ok())
                    .collect()
            } else {
                customer_id
                    .iter()
                    .map(|id| TenantId::parse(id).map_err(|e| anyhow::anyhow!("{e}")))
                    .collect::<anyhow::Result<Vec<_>>>()?
            };
            let applier = Applier::new(store, admin_token.filter(|t| !t.is_empty()), lease_ttl)?;
            applier.run(ids, canary, concurrency.max(1), recheck).await
        }
    }
}

async fn push(store: &DynStore, dir: &std::path::Path) -> anyhow::Result<()> {
    let migrations = publish::read_dir(dir)?;
    let pushed = publish::push(store, &migrations).await?;
    for name in &pushed.published {
        println!("published {name}");
    }
    println!(
        "latest published version: {} ({} new, {} already published)",
        pushed.latest,
        pushed.published.len(),
        pushed.unchanged
    );
    Ok(())
}

struct Applier {
    store: DynStore,
    admin_token: Option<String>,
    lease_ttl: Duration,
    session: Session,
    machine_id: String,
    metrics: Metrics,
    client: reqwest::Client,
}

/// One tenant's result.
struct Done {
    id: TenantId,
    result: Result<Value, String>,
}

impl Done {
    fn failed(&self) -> Option<String> {
        match &self.result {
            Err(e) => Some(e.clone()),
            Ok(outcome) => outcome["failed"]["error"].as_str().map(str::to_string),
        }
    }
}

impl Applier {
    fn new(
        store: DynStore,
        admin_token: Option<String>,
        lease_ttl: Duration,
    ) -> anyhow::Result<Self> {
        // Never a machine's id: a machine treats a lock naming itself as
        // its own leftover.
        let machine_id = format!(
            "tenantd-migrate-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let session = Session::new(
            store.clone(),
            LeaseConfig::new(machine_id.clone(), "tenantd-migrate", lease_ttl),
        );
        Ok(Applier {
            store,
            admin_token,
            lease_ttl,
            session,
            machine_id,
            metrics: Metrics::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()?,
        })
    }

    async fn run(
        self,
        ids: Vec<TenantId>,
        canary: Option<usize>,
        concurrency: usize,
        recheck: bool,
    ) -> anyhow::Result<()> {
        let (head, _) = read_head(&self.store).await?;
        if head.latest == 0 {
            println!(
                "no migration is published: nothing to apply (tenantd migrate push <dir> first)"
            );
            return Ok(());
        }
        let records = status::tenants(&self.store).await?;
        let total = ids.len();
        let todo: Vec<TenantId> = ids
            .into_iter()
            .filter(|id| recheck || records.get(id) != Some(&(head.latest, None)))
            .collect();
        let skipped = total - todo.len();
        let bar = progress(todo.len() as u64);
        let this = Arc::new(self);
        let started = Instant::now();
        let mut done: Vec<Done> = Vec::with_capacity(todo.len());
        let (first, rest) = match canary {
            Some(n) => todo.split_at(n.min(todo.len())),
            None => (&todo[..0], &todo[..]),
        };
        let stopped = {
            this.clone()
                .batch(first, concurrency, &bar, &mut done)
                .await;
            canary.is_some() && done.iter().any(|d| d.failed().is_some())
        };
        if !stopped {
            this.clone().batch(rest, concurrency, &bar, &mut done).await;
        }
        bar.finish_and_clear();
        let failed: Vec<(&TenantId, String)> = done
            .iter()
            .filter_map(|d| d.failed().map(|e| (&d.id, e)))
            .collect();
        println!(
            "{} tenant(s) brought to version {} in {:.1}s, {} failed, {} already up to date{}",
            done.len() - failed.len(),
            head.latest,
            started.elapsed().as_secs_f64(),
            failed.len(),
            skipped,
            if stopped {
                format!(
                    "; canary failed: stopped after {} tenant(s), {} not tried",
                    done.len(),
                    todo.len() - done.len()
                )
            } else {
                String::new()
            }
        );
        for (id, error) in &failed {
            println!("FAILED {id}: {error}");
        }
        if !failed.is_empty() {
            bail!(
                "{} tenant(s) failed; they keep serving at their previous version. Fix their data (tenantd sql) and run `tenantd migrate apply --customer-id <id>` again",
                failed.len()
            );
        }
        Ok(())
    }

    async fn batch(
        self: Arc<Self>,
        ids: &[TenantId],
        concurrency: usize,
        bar: &ProgressBar,
        done: &mut Vec<Done>,
    ) {
        let mut results = futures::stream::iter(ids.iter().cloned().map(|id| {
            let this = self.clone();
            async move {
                let result = this.one(&id).await;
                Done { id, result }
            }
        }))
        .buffer_unordered(concurrency);
        while let Some(d) = results.next().await {
            bar.inc(1);
            if d.failed().is_some() {
                bar.set_message(format!(
                    "{} failed,",
                    done.iter().filter(|d| d.failed().is_some()).count() + 1
                ));
            }
            done.push(d);
        }
    }

    /// One tenant: through its holder, or under this command's lease.
    async fn one(&self, id: &TenantId) -> Result<Value, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let lock = read_lock(&self.store, &keys::lock(id.as_str()))
                .await
                .map_err(|e| format!("cannot read its lock: {e}"))?;
            // A holder that cannot be reached may be gone: the own lease
            // below takes the tenant once its lock is stale.
            if let LockState::Held { record, .. } = lock
                && let Ok(outcome) = self.through_holder(id, &record).await
            {
                return Ok(outcome);
            }
            // Long enough for a holder that just vanished to go stale.
            let wait = self.lease_ttl * 2 + Duration::from_secs(1);
            match own_lease::apply(
                &self.store,
                id,
                &self.session,
                &self.machine_id,
                &self.metrics,
                wait,
            )
            .await
            {
                Ok(Via::OwnLease(outcome)) => {
                    return serde_json::to_value(outcome).map_err(|e| e.to_string());
                }
                Ok(Via::HeldBy(record)) => match self.through_holder(id, &record).await {
                    Ok(outcome) => return Ok(outcome),
                    Err(Unreached(e)) => last = e,
                },
                Ok(Via::Lost) => {
                    last = "lost its lease while taking the tenant over (a slow store); nothing was left half-done: run apply again".into();
                }
                Err(e) => return Err(format!("{e:#}")),
            }
        }
        Err(last)
    }

    async fn through_holder(&self, id: &TenantId, holder: &LockRecord) -> Result<Value, Unreached> {
        let Some(token) = &self.admin_token else {
            return Err(Unreached(format!(
                "held by machine {} ({}): set TENANTD_ADMIN_TOKEN (--admin-token) so that apply can ask it",
                holder.holder, holder.addr
            )));
        };
        let url = format!("http://{}/_admin/tenants/{id}/migrate", holder.addr);
        let reply = self
            .client
            .post(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| Unreached(format!("holder {} at {url}: {e}", holder.holder)))?;
        let status = reply.status();
        let body: Value = reply
            .json()
            .await
            .map_err(|e| Unreached(format!("{url} answered {status} without JSON: {e}")))?;
        if !status.is_success() {
            return Err(Unreached(format!(
                "{url} answered {status}: {}",
                body["error"].as_str().unwrap_or("no message")
            )));
        }
        Ok(body)
    }
}

struct Unreached(String);

fn progress(len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tenants, {msg} {per_sec} ETA {eta}")
            .expect("a valid template"),
    );
    bar.set_message("0 failed,");
    bar
}
