//! `tenantd serve`: checks the configuration and the store, then wires
//! store, registry, router and HTTP together and runs until a signal.
//!
//! Shutdown (SIGTERM or SIGINT, Fly's default kill signal): requests keep
//! being accepted but are handed to other machines; every held tenant
//! commits what it has queued, uploads, and releases its lease; then the
//! listener closes and in-flight requests finish. A second signal exits at
//! once. Every SQLite statement still running is interrupted at the
//! signal (its request answers 503, nothing applied). The whole shutdown
//! ends within `--drain-timeout` (keep it below fly.toml's
//! `kill_timeout`): leases that could not be released by then expire after
//! their ttl, and the process does not wait for blocking threads.
//!
//! On Fly (FLY_APP_NAME or FLY_MACHINE_ID set) a store must be configured:
//! the local file store default would give each machine its own.

use std::future::{Future, IntoFuture};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpSocket};
use tracing::{error, info, warn};

use crate::TenantId;
use crate::config::{LogFormat, ReplayMode, ServeConfig};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::store::retry::RetryPolicy;
use crate::store::{FaultConfig, open_store};
use crate::tenant::actor::ActorContext;
use crate::tenant::{Registry, RegistryConfig};

/// Fly Proxy does not replay request bodies over 1 MB.
const FLY_REPLAY_MAX_BODY: usize = 1024 * 1024;
/// How long the store check at start may take before giving up.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(8);
/// After the leases are released, keep answering (with replays) this long
/// beyond the other machines' lock cache, so that no machine replays to
/// this one after it has gone.
const DRAIN_LINGER_EXTRA: Duration = Duration::from_millis(500);

pub async fn main(args: ServeConfig) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    raise_open_file_limit();
    crate::config::check_store_configured(args.store.as_ref()).map_err(anyhow::Error::msg)?;
    let listen = listen_addr(&args);
    let listener = bind(listen)
        .with_context(|| format!("cannot listen on {listen}: fix --listen / TENANTD_LISTEN"))?;
    if listen != args.listen {
        info!(listen = %listen, "on Fly: listening on IPv6 and IPv4 (the 6PN network is IPv6)");
    }
    run(args, listener, shutdown_signal()).await
}

/// Each held tenant keeps its SQLite file and journal open: a thousand
/// tenants need more descriptors than the usual soft limit of 1024, so the
/// soft limit is raised to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "cannot raise the open file limit; tenants beyond about {} may fail to open", soft / 2);
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open file limit"),
    }
}

/// `--listen`, except that on Fly (FLY_PRIVATE_IP set) `0.0.0.0` becomes
/// `[::]`: other machines reach this one at its 6PN (IPv6) address.
fn listen_addr(args: &ServeConfig) -> SocketAddr {
    let on_6pn = args.private_ip.as_deref().is_some_and(|ip| !ip.is_empty());
    if on_6pn && args.listen.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), args.listen.port())
    } else {
        args.listen
    }
}

/// Binds `addr`; `[::]` accepts IPv4 too (IPV6_V6ONLY off, whatever the
/// system default).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        use std::os::fd::AsRawFd;
        let off: nix::libc::c_int = 0;
        // SAFETY: a valid socket descriptor and an int option of the right size.
        let rc = unsafe {
            nix::libc::setsockopt(
                socket.as_raw_fd(),
                nix::libc::IPPROTO_IPV6,
                nix::libc::IPV6_V6ONLY,
                (&off as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs a server on `listener` until `shutdown` completes.
pub async fn run(
    args: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(args, listener, shutdown, false).await
}

/// `run`, with the bench-only setting that answers before the upload.
pub async fn run_with(
    args: ServeConfig,
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
    let linger = (args.lease_ttl / 5).min(Duration::from_secs(1)) + DRAIN_LINGER_EXTRA;
    if release_budget(args.drain_timeout, linger) < Duration::from_millis(500) {
        bail!(
            "--drain-timeout / TENANTD_DRAIN_TIMEOUT {:?} leaves no time to release leases: at least {:?} with --lease-ttl {:?}",
            args.drain_timeout,
            linger + IN_FLIGHT_GRACE + Duration::from_millis(500),
            args.lease_ttl
        );
    }
    if args.replay_mode == ReplayMode::Fly && args.max_body_bytes > FLY_REPLAY_MAX_BODY {
        warn!(
            max_body = args.max_body_bytes,
            "TENANTD_MAX_BODY is over 1 MiB: Fly Proxy cannot replay such bodies to the holder"
        );
    }
    let heap_limit = args.sqlite_heap_limit.apply();
    info!(
        sqlite_heap_limit = heap_limit,
        setting = %args.sqlite_heap_limit,
        "SQLite's heap is capped (--sqlite-heap-limit)"
    );
    let sqlite =
        crate::tenant::sql::limits::configure(args.sqlite).context("cannot set SQLite's limits")?;
    if sqlite != args.sqlite {
        warn!(
            ?sqlite,
            "SQLite lowered some --sql-max-* limits to its own maximum"
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

    if let Some(id) = &customer_id {
        // As the original app did: a single-tenant machine's tenant exists
        // from its first start (idempotent; never overwrites).
        let created = crate::tenant::lifecycle::create(&store, id)
            .await
            .with_context(|| format!("cannot create customer {id} (CUSTOMER_ID) in {url}"))?;
        if created == crate::tenant::lifecycle::Created::Created {
            info!(customer_id = %id, "created the tenant's database (first start)");
        }
    }
    let lock_cache_ttl = (args.lease_ttl / 5).min(Duration::from_secs(1));
    let follower_advertise = advertise.clone();
    let registry = Registry::new(
        RegistryConfig {
            machine_id: machine_id.clone(),
            advertise,
            lease_ttl: args.lease_ttl,
            customer_id: customer_id.clone(),
            max_tenants: args.max_tenants.max(1),
            lock_cache_ttl,
            max_known_tenants: args.max_known_tenants.max(1),
            create_on_first_request: args.create_on_first_request,
        },
        ActorContext {
            idle_timeout: Some(args.idle_timeout),
            ack_before_upload,
            release_budget: Some(release_budget(
                args.drain_timeout,
                lock_cache_ttl + DRAIN_LINGER_EXTRA,
            )),
            sql: args.sql_limits(),
            retention: args.retention(),
            ..ActorContext::new(
                store.clone(),
                metrics.clone(),
                machine_id.clone(),
                args.data_dir.clone(),
            )
        },
    );
    {
        // The machine's own heartbeat, read once at boot (nothing written):
        // its first takeover's session start then only writes, beside the
        // first request's existence check.
        let session = registry.session().clone();
        tokio::spawn(async move { session.prime().await });
    }
    if let Some(id) = customer_id.clone() {
        tokio::spawn(registry.clone().standby(id));
    }
    let followers = Arc::new(crate::tenant::follower::Followers::new(
        store.clone(),
        args.data_dir.clone(),
        &machine_id,
        follower_advertise,
        args.api_token.clone().filter(|t| !t.is_empty()),
        args.sql_limits(),
        &metrics,
    ));
    followers.sweep_idle();
    registry.take_over_from_replicas(followers.clone());
    tokio::spawn(crate::tenant::migrations::watcher::run(
        registry.clone(),
        crate::tenant::migrations::watcher::interval(),
    ));
    let state = AppState {
        registry: registry.clone(),
        metrics,
        machine_id,
        replay_mode: args.replay_mode,
        finder: finder(&args, args.max_known_tenants.max(1)),
        faults: fault_handle,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        api_token: args.api_token.clone().filter(|t| !t.is_empty()),
        tokens: match args
            .token_public_key
            .as_deref()
            .filter(|k| !k.trim().is_empty())
        {
            Some(keys) => Some(Arc::new(
                crate::token::TokenVerifier::parse(keys).map_err(anyhow::Error::msg)?,
            )),
            None => None,
        },
        sql_limits: args.sql_limits(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        followers,
    };
    let app = http::router(state, args.max_body_bytes);
    let draining = registry.clone();
    let linger = lock_cache_ttl + DRAIN_LINGER_EXTRA;
    let release_budget = release_budget(args.drain_timeout, linger);
    let drain_timeout = args.drain_timeout;
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<tokio::time::Instant>();
    let serve = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = began_tx.send(tokio::time::Instant::now());
            // Statements still running (and any started from now on) end at
            // once: a tenant's queue drains in milliseconds, not at the
            // statement's own deadline, and no blocking thread outlives
            // the drain.
            crate::tenant::sql::watchdog::global().shut_down();
            info!(?drain_timeout, "shutting down: handing tenants over");
            if tokio::time::timeout(release_budget, draining.drain()).await.is_err() {
                warn!("tenants did not release within {release_budget:?}; exiting anyway (their locks expire after the ttl)");
            }
            tokio::time::sleep(linger).await;
            info!("leases released; closing the listener");
        })
        .into_future();
    // The whole shutdown ends within --drain-timeout, whatever in-flight
    // requests still do: past fly.toml's kill_timeout the machine is killed.
    let deadline = async move {
        match began_rx.await {
            Ok(began) => tokio::time::sleep_until(began + drain_timeout).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serve => served?,
        _ = deadline => warn!("drain budget of {drain_timeout:?} used up: closing the remaining connections"),
    }
    info!("stopped");
    Ok(())
}

/// Time from the signal until in-flight requests must be done, of which the
/// leases get what the linger and a short grace for requests leave.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(500);

fn release_budget(drain_timeout: Duration, linger: Duration) -> Duration {
    drain_timeout.saturating_sub(linger + IN_FLIGHT_GRACE)
}

/// Fly's internal DNS, when the app name is known (on Fly, or under
/// `tenantd dev`, which also sets TENANTD_DNS_SERVER), and the Machines API
/// for stopped machines when FLY_API_TOKEN is set (FLY_API_URL, else the
/// API's address inside Fly's network).
fn finder(args: &ServeConfig, max_cached: usize) -> Option<Arc<dyn http::MachineFinder>> {
    let app = args.app_name.as_deref().filter(|a| !a.is_empty())?;
    let dns = crate::fly_dns::FlyDns::new(app, args.dns_server).with_cache_bound(max_cached);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let api = env("FLY_API_TOKEN").map(|token| {
        let url = env("FLY_API_URL").unwrap_or_else(|| crate::fly::INTERNAL_API_URL.to_string());
        (url, token)
    });
    Some(Arc::new(crate::fly::TenantFinder::new(dns, api)))
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
///
/// The handlers are installed here, before the future is first polled:
/// the server polls it only once it serves, and a signal arriving before
/// that (a deploy stopping a machine that is still claiming) would
/// otherwise kill the process with the default action, releasing nothing.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
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
