//! `tenantd serve`: checks the configuration and the store, then wires
//! store, registry, router and HTTP together and runs until a signal.
//!
//! Shutdown (SIGTERM or SIGINT, Fly's default kill signal): requests keep
//! being accepted but are handed to other machines; every held tenant
//! commits what it has queued, uploads, and releases its lease; then the
//! listener closes and in-flight requests finish. A second signal exits at
//! once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::TenantId;
use crate::config::{LogFormat, ServeArgs};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::store::retry::RetryPolicy;
use crate::store::{FaultConfig, open_store};
use crate::tenant::actor::ActorContext;
use crate::tenant::{Registry, RegistryConfig};

/// How long the store check at start may take before giving up.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(8);
/// After the leases are released, keep answering (with replays) this long
/// beyond the other machines' lock cache, so that no machine replays to
/// this one after it has gone.
const DRAIN_LINGER_EXTRA: Duration = Duration::from_millis(500);

pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: fix --listen / TENANTD_LISTEN",
            args.listen
        )
    })?;
    run(args, listener, shutdown_signal()).await
}

/// Runs a server on `listener` until `shutdown` completes.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(args, listener, shutdown, false).await
}

/// `run`, with the bench-only setting that answers before the upload.
pub(crate) async fn run_with(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ack_before_upload: bool,
) -> anyhow::Result<()> {
    let machine_id = args.machine_id();
    let customer_id = match &args.customer_id {
        Some(id) if !id.is_empty() => Some(
            TenantId::parse(id)
                .map_err(|e| anyhow::anyhow!("{e} (from --customer-id / CUSTOMER_ID)"))?,
        ),
        _ => None,
    };
    let url = args
        .store_url()
        .map_err(|e| anyhow::anyhow!("{e}: fix --store / TENANTD_STORE"))?;
    let faults: FaultConfig = match &args.faults {
        Some(json) => serde_json::from_str(json)
            .with_context(|| format!("invalid --faults / TENANTD_FAULTS {json:?}"))?,
        None => FaultConfig::default(),
    };
    if args.lease_ttl < Duration::from_millis(300) {
        bail!(
            "--lease-ttl {:?} is too short: at least 300ms (renewals every ttl/3 need a few store round trips)",
            args.lease_ttl
        );
    }
    let metrics = Metrics::new();
    let (store, fault_handle) = open_store(&url, faults, RetryPolicy::default(), Some(&metrics))
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store {url}: {e}"))?;
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.check()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("the store {url} is not usable: {e}"),
        Err(_) => bail!(
            "the store {url} did not answer within {STORE_CHECK_TIMEOUT:?}: check AWS_ENDPOINT_URL_S3 and the network"
        ),
    }
    let advertise = match args.advertise.clone() {
        Some(a) => a,
        None => match listener.local_addr() {
            Ok(local) if args.private_ip.is_none() => local.to_string(),
            _ => args.advertise(),
        },
    };
    let local = listener.local_addr()?;
    info!(%machine_id, listen = %local, %advertise, store = %url, customer_id = ?customer_id.as_ref().map(|c| c.as_str()), lease_ttl = ?args.lease_ttl, "tenantd serving");

    let lock_cache_ttl = (args.lease_ttl / 5).min(Duration::from_secs(1));
    let registry = Registry::new(
        RegistryConfig {
            machine_id: machine_id.clone(),
            advertise,
            lease_ttl: args.lease_ttl,
            customer_id: customer_id.clone(),
            max_tenants: args.max_tenants.max(1),
            lock_cache_ttl,
        },
        ActorContext {
            store: store.clone(),
            metrics: metrics.clone(),
            machine_id: machine_id.clone(),
            data_dir: args.data_dir.clone(),
            idle_timeout: Some(args.idle_timeout),
            ack_before_upload,
            sql: args.sql_limits(),
        },
    );
    if let Some(id) = customer_id.clone() {
        tokio::spawn(registry.clone().standby(id));
    }
    let state = AppState {
        registry: registry.clone(),
        metrics,
        machine_id,
        replay_mode: args.replay_mode,
        finder: finder(&args),
        faults: fault_handle,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        api_token: args.api_token.clone().filter(|t| !t.is_empty()),
        sql_limits: args.sql_limits(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
    };
    let app = http::router(state, args.max_body_bytes);
    let draining = registry.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            info!("shutting down: handing tenants over");
            if tokio::time::timeout(Duration::from_secs(20), draining.drain()).await.is_err() {
                warn!("tenants did not release within 20s; exiting anyway (their locks expire after the ttl)");
            }
            tokio::time::sleep(lock_cache_ttl + DRAIN_LINGER_EXTRA).await;
            info!("leases released; closing the listener");
        })
        .await?;
    info!("stopped");
    Ok(())
}

/// Fly's internal DNS, when the app name is known (on Fly, or under
/// `tenantd dev`, which also sets TENANTD_DNS_SERVER).
fn finder(args: &ServeArgs) -> Option<Arc<dyn http::MachineFinder>> {
    let app = args.app_name.as_deref().filter(|a| !a.is_empty())?;
    Some(Arc::new(crate::fly_dns::FlyDns::new(app, args.dns_server)))
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        error!("second signal: exiting without releasing");
        std::process::exit(130);
    });
}

pub fn init_tracing(format: LogFormat) {
    init_tracing_at(format, "info");
}

/// Logging with `level` as the default (`RUST_LOG` overrides it).
pub fn init_tracing_at(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},aws_config=error,aws_smithy_runtime=warn,hyper=warn,hickory_server=warn"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
