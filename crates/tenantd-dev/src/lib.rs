//! `tenantd dev`: the whole Fly setup of a tenantd app on one laptop.
//!
//! - [`supervisor`]: machines as real `tenantd serve` child processes, with
//!   Fly's identity and env, restart policy, auto-stop, signals.
//! - [`edge`]: the Fly Proxy stand-in: random machine, `fly-replay`,
//!   auto-start.
//! - [`dns`]: the internal DNS stand-in (`.internal` AAAA, PTR, TXT).
//! - [`admin`]: the flyctl stand-in: HTTP API and `tenantd dev ls|scale|...`.
//! - [`logs`]: every machine's output on one stream, prefixed.
//!
//! The same cluster is a library ([`Cluster`]) for the chaos checker and the
//! benchmark, which drive it in-process.

pub mod admin;
pub mod dns;
pub mod edge;
pub mod logs;
pub mod machines_api;
pub mod rate_limit;
pub mod supervisor;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use tenantd_core::TenantId;
use tenantd_core::store::StoreUrl;

pub use admin::MachineStatus;
pub use edge::EdgeStats;
pub use logs::LogSink;
pub use supervisor::{MachineError, MachineInfo, MachineState};

/// Everything a dev cluster is made of.
#[derive(Clone, Debug)]
pub struct DevConfig {
    /// Customers with their own machines (`CUSTOMER_ID` set). Empty: pool mode.
    pub customers: Vec<String>,
    pub machines_per_customer: usize,
    /// Pool machines (no `CUSTOMER_ID`), started in addition to customers'.
    pub pool_machines: usize,
    /// Tenants created in the store at start besides `customers` (which
    /// always are): those the pool machines serve.
    pub tenants: Vec<String>,
    pub edge_addr: SocketAddr,
    /// `None`: no admin API (library use).
    pub admin_addr: Option<SocketAddr>,
    pub dns_addr: SocketAddr,
    pub store: StoreUrl,
    /// Machines' working copies go to `<data_dir>/machines/<id>`.
    pub data_dir: PathBuf,
    pub lease_ttl: Duration,
    /// `None`: a crashed or killed machine stays stopped.
    pub restart_delay: Option<Duration>,
    /// `None`: machines are never stopped for idleness.
    pub auto_stop: Option<Duration>,
    pub app_name: String,
    /// The `tenantd` binary and the arguments that make it serve.
    pub program: PathBuf,
    pub program_args: Vec<String>,
    /// First machine address; the next machines count up from it.
    pub ip_base: Ipv4Addr,
    /// `None`: a free port per machine.
    pub machine_port: Option<u16>,
    /// Extra env for every machine (e.g. `TENANTD_FAULTS`, `RUST_LOG`).
    pub extra_env: Vec<(String, String)>,
    /// `TENANTD_API_TOKEN` of every machine (the SQL API); `None`: a
    /// random one is made at start ([`Cluster::api_token`]).
    pub api_token: Option<String>,
    pub log_sink: LogSink,
    /// Let machines colour their log lines (only when stdout is a terminal).
    pub color_logs: bool,
    /// Most `fly-replay` hops the edge follows for one request.
    pub max_hops: usize,
    /// Grace between SIGTERM and SIGKILL (Fly's `kill_timeout`).
    pub kill_timeout: Duration,
    /// How long the edge waits for a replay target or any machine to start.
    pub replay_timeout: Duration,
    /// How long a machine may take to answer `/healthz` at start.
    pub start_timeout: Duration,
    /// How long the edge waits for one machine's answer (a paused machine
    /// holds requests this long).
    pub request_timeout: Duration,
    /// The Machines API stand-in's rate limit (Fly's by default); `None`:
    /// unlimited.
    pub machines_api_limit: Option<rate_limit::RateLimit>,
}

impl DevConfig {
    /// Defaults for `program` (the `tenantd` binary), storing under `data_dir`.
    pub fn new(program: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> DevConfig {
        let data_dir = data_dir.into();
        DevConfig {
            customers: vec!["100".into(), "200".into()],
            machines_per_customer: 2,
            pool_machines: 0,
            tenants: Vec::new(),
            edge_addr: ([127, 0, 0, 1], 0).into(),
            admin_addr: None,
            dns_addr: ([127, 0, 0, 1], 0).into(),
            store: StoreUrl::File(data_dir.join("store")),
            data_dir,
            lease_ttl: Duration::from_secs(5),
            restart_delay: Some(Duration::from_secs(2)),
            auto_stop: None,
            app_name: "tenantd-dev".into(),
            program: program.into(),
            program_args: vec!["serve".into()],
            ip_base: Ipv4Addr::new(127, 0, 0, 2),
            machine_port: None,
            extra_env: Vec::new(),
            api_token: None,
            log_sink: LogSink::Stdout,
            color_logs: false,
            max_hops: 5,
            kill_timeout: Duration::from_secs(5),
            replay_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(60),
            machines_api_limit: Some(rate_limit::RateLimit::FLY),
        }
    }
}

/// State shared by the edge, the admin API and [`Cluster`].
pub struct ClusterShared {
    pub cfg: Arc<DevConfig>,
    pub sup: Arc<supervisor::Supervisor>,
    pub edge: Arc<edge::Edge>,
    pub edge_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub admin_token: String,
    /// Machine names given through the Machines API (id → name).
    pub names: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The Machines API's calls per action, and its rate limit.
    pub api_calls: rate_limit::RateLimiter,
    http: reqwest::Client,
}

impl ClusterShared {
    /// Every machine with its lock role, read from each running machine's
    /// `/_status` (in parallel, bounded by a short timeout).
    pub async fn statuses(&self) -> Vec<MachineStatus> {
        let machines = self.sup.machines();
        let futures = machines.into_iter().map(|m| async move {
            let running = matches!(m.state, MachineState::Started | MachineState::Starting);
            let status = if running {
                self.machine_status(&m).await
            } else {
                None
            };
            let (holder, epoch, holds) = match status {
                Some((holder, epoch, holds)) => (Some(holder), epoch, holds),
                None if running => (None, None, Vec::new()),
                None => (Some(false), None, Vec::new()),
            };
            MachineStatus {
                machine: m,
                holder,
                epoch,
                holds,
            }
        });
        futures::future::join_all(futures).await
    }

    async fn machine_status(&self, m: &MachineInfo) -> Option<(bool, Option<u64>, Vec<String>)> {
        let url = format!("http://{}/_status", m.address);
        // Every dev machine has the cluster's admin token, which /_status needs.
        let request = self.http.get(url).bearer_auth(&self.admin_token);
        let body: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
        let tenants = body.get("tenants")?.as_array()?;
        let mut holds = Vec::new();
        let mut epoch = None;
        for t in tenants {
            let customer = t
                .get("customer_id")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let is_holder = t.get("role").and_then(|v| v.as_str()) == Some("holder");
            if is_holder {
                holds.push(customer.to_string());
            }
            if m.customer_id.as_deref() == Some(customer) {
                epoch = t.get("epoch").and_then(|v| v.as_u64());
            }
        }
        let holder = match &m.customer_id {
            Some(c) => holds.contains(c),
            None => !holds.is_empty(),
        };
        Some((holder, epoch, holds))
    }
}

/// A running dev cluster. Dropping it SIGKILLs the machines; call
/// [`Cluster::shutdown`] for an orderly stop.
pub struct Cluster {
    shared: Arc<ClusterShared>,
    dns: Option<dns::DnsServer>,
    admin_addr: Option<SocketAddr>,
    cancel: CancellationToken,
}

/// Creates the cluster's tenants in its store (idempotent), as an
/// operator would with `tenantd tenants create`: machines answer 404 for
/// tenants that do not exist.
async fn create_tenants(cfg: &DevConfig) -> anyhow::Result<()> {
    use tenantd_core::store::{FaultConfig, open_store, retry::RetryPolicy};
    let ids: Vec<&String> = cfg.customers.iter().chain(&cfg.tenants).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let (store, _) = open_store(
        &cfg.store,
        FaultConfig::default(),
        RetryPolicy::default(),
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open the store {}: {e}", cfg.store))?;
    for id in ids {
        tenantd_core::tenant::lifecycle::create(&store, &TenantId::parse(id)?).await?;
    }
    Ok(())
}

impl Cluster {
    /// Starts DNS, the edge, the admin API (if configured) and the
    /// configured machines, and returns once every machine answers
    /// `/healthz`.
    pub async fn start(mut cfg: DevConfig) -> anyhow::Result<Cluster> {
        for c in cfg.customers.iter().chain(&cfg.tenants) {
            TenantId::parse(c)?;
        }
        let cwd = std::env::current_dir()?;
        // components() drops the `.` of `./data`, for readable paths in logs.
        cfg.data_dir = cwd.join(&cfg.data_dir).components().collect();
        if let StoreUrl::File(path) = &cfg.store {
            let abs: PathBuf = cwd.join(path).components().collect();
            std::fs::create_dir_all(&abs)
                .with_context(|| format!("creating the file store {}", abs.display()))?;
            cfg.store = StoreUrl::File(abs);
        }
        std::fs::create_dir_all(cfg.data_dir.join("machines"))
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        create_tenants(&cfg).await?;
        let api_token = cfg
            .api_token
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        cfg.extra_env
            .push(("TENANTD_API_TOKEN".into(), api_token.clone()));
        cfg.api_token = Some(api_token);
        let admin_token = uuid::Uuid::new_v4().simple().to_string();
        // Bound before the machines exist, so that they can be told where
        // the Machines API is (FLY_API_URL, FLY_API_TOKEN): they look up
        // stopped machines of a tenant there.
        let admin_listener = match cfg.admin_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("admin API: bind {addr}"))?;
                let url = format!("http://{}", listener.local_addr()?);
                cfg.extra_env.push(("FLY_API_URL".into(), url));
                cfg.extra_env
                    .push(("FLY_API_TOKEN".into(), admin_token.clone()));
                Some(listener)
            }
            None => None,
        };
        let cfg = Arc::new(cfg);
        let logs = logs::Logs::new(cfg.log_sink);
        let table = Arc::new(RwLock::new(Vec::new()));
        let dns = dns::DnsServer::start(cfg.dns_addr, &cfg.app_name, table.clone()).await?;
        let dns_addr = dns.addr();
        let sup =
            supervisor::Supervisor::new(cfg.clone(), dns_addr, table, logs, admin_token.clone());
        let edge = edge::Edge::new(sup.clone(), &cfg);
        let cancel = CancellationToken::new();

        let edge_listener = tokio::net::TcpListener::bind(cfg.edge_addr)
            .await
            .with_context(|| format!("edge: bind {}", cfg.edge_addr))?;
        let edge_addr = edge_listener.local_addr()?;
        let app = edge
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        let token = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(edge_listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });

        let shared = Arc::new(ClusterShared {
            cfg: cfg.clone(),
            sup: sup.clone(),
            edge,
            edge_addr,
            dns_addr,
            admin_token,
            names: Default::default(),
            api_calls: rate_limit::RateLimiter::new(cfg.machines_api_limit),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_millis(800))
                .build()?,
        });

        let admin_addr = match admin_listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let router =
                    admin::router(shared.clone()).merge(machines_api::router(shared.clone()));
                let token = cancel.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async move { token.cancelled().await })
                        .await;
                });
                Some(addr)
            }
            None => None,
        };

        let cluster = Cluster {
            shared,
            dns: Some(dns),
            admin_addr,
            cancel,
        };
        let mut ids = Vec::new();
        for customer in &cfg.customers {
            for _ in 0..cfg.machines_per_customer {
                ids.push(sup.create(Some(customer.clone()))?);
            }
        }
        for _ in 0..cfg.pool_machines {
            ids.push(sup.create(None)?);
        }
        for id in &ids {
            sup.start(id).await?;
        }
        for id in &ids {
            if let Err(e) = sup.ensure_started(id, cfg.start_timeout).await {
                let recent = sup.logs().recent(30).join("\n");
                cluster.shutdown().await;
                anyhow::bail!("{e}; last log lines:\n{recent}");
            }
        }
        if let Some(idle) = cfg.auto_stop {
            sup.spawn_auto_stop(idle);
        }
        Ok(cluster)
    }

    pub fn edge_url(&self) -> String {
        format!("http://{}", self.shared.edge_addr)
    }

    pub fn edge_addr(&self) -> SocketAddr {
        self.shared.edge_addr
    }

    pub fn admin_url(&self) -> Option<String> {
        self.admin_addr.map(|a| format!("http://{a}"))
    }

    /// The DNS server the machines use (`TENANTD_DNS_SERVER`).
    pub fn dns_addr(&self) -> SocketAddr {
        self.shared.dns_addr
    }

    pub fn app_name(&self) -> &str {
        &self.shared.cfg.app_name
    }

    /// The `TENANTD_API_TOKEN` every machine was started with.
    pub fn api_token(&self) -> &str {
        self.shared.cfg.api_token.as_deref().expect("set at start")
    }

    /// The `TENANTD_ADMIN_TOKEN` every machine was started with.
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    pub fn config(&self) -> &DevConfig {
        &self.shared.cfg
    }

    /// Calls of one Machines API action so far (`list`, `create`, ...),
    /// answered and refused by its rate limit.
    pub fn machines_api_calls(&self, action: &str) -> rate_limit::Calls {
        self.shared.api_calls.calls(action)
    }

    pub fn machines(&self) -> Vec<MachineInfo> {
        self.shared.sup.machines()
    }

    /// Machines with their lock roles (what `tenantd dev ls` shows).
    pub async fn statuses(&self) -> Vec<MachineStatus> {
        self.shared.statuses().await
    }

    pub fn kill(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.kill(id)
    }

    pub fn pause(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.pause(id)
    }

    pub fn resume(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.resume(id)
    }

    pub fn stop(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.stop(id)
    }

    /// `fly machine destroy`: the machine is gone for good (after a kill:
    /// as if its host had died).
    pub fn destroy(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.destroy(id)
    }

    pub async fn start_machine(&self, id: &str) -> Result<(), MachineError> {
        self.shared.sup.start(id).await
    }

    /// Waits until `id` answers `/healthz` (starting it if stopped).
    pub async fn wait_started(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, MachineError> {
        self.shared.sup.ensure_started(id, timeout).await
    }

    /// `fly scale count`: `customer` `None` means the pool machines.
    pub async fn scale(&self, customer: Option<&str>, count: usize) -> anyhow::Result<()> {
        self.shared.sup.scale(customer, count).await
    }

    pub fn edge_stats(&self) -> EdgeStats {
        self.shared.edge.stats()
    }

    /// The last `n` log lines of all machines and the cluster.
    pub fn recent_logs(&self, n: usize) -> Vec<String> {
        self.shared.sup.logs().recent(n)
    }

    /// Stops machines with SIGTERM (they release their locks), then the
    /// edge, admin API and DNS.
    pub async fn shutdown(mut self) {
        self.shared.sup.shutdown().await;
        self.cancel.cancel();
        if let Some(dns) = self.dns.take() {
            dns.stop().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test that panicked, or a caller that forgot `shutdown`: no child
        // may outlive the cluster.
        self.shared.sup.kill_all();
        self.cancel.cancel();
    }
}

/// `tenantd dev` arguments: without a subcommand it runs the cluster; with
/// one it talks to a running cluster's admin API.
#[derive(Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    #[command(flatten)]
    pub run: Box<RunArgs>,
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Customers, each with its own machines (CUSTOMER_ID) [default: 100,200
    /// unless --machines is given].
    #[arg(long, value_delimiter = ',')]
    pub customers: Vec<String>,
    /// Machines per customer.
    #[arg(long, default_value_t = 2)]
    pub machines_per_customer: usize,
    /// Pool machines (no CUSTOMER_ID); without --customers: pool mode.
    #[arg(long)]
    pub machines: Option<usize>,
    /// Edge proxy address (the app's public URL).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub edge: SocketAddr,
    /// Admin API address (used by `tenantd dev ls` etc.).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Internal DNS server address (UDP and TCP; port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub dns: SocketAddr,
    /// Object store [default: file store under <data-dir>/store; s3://...
    /// uses the AWS environment].
    #[arg(long)]
    pub store: Option<StoreUrl>,
    /// Folder for the file store and the machines' working copies.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Lease TTL of machine.lock.
    #[arg(long, default_value = "5s", value_parser = tenantd_core::config::parse_duration)]
    pub lease_ttl: Duration,
    /// Delay before a crashed or killed machine restarts, or `never`.
    #[arg(long, default_value = "2s", value_parser = parse_optional_duration)]
    pub restart_delay: OptionalDuration,
    /// Stop machines idle for this long (SIGTERM), or `off`.
    #[arg(long, default_value = "off", value_parser = parse_optional_duration)]
    pub auto_stop: OptionalDuration,
    /// Fly app name (FLY_APP_NAME, DNS names).
    #[arg(long, default_value = "tenantd-dev")]
    pub app_name: String,
    /// Address of the first machine; later machines count up from it.
    #[arg(long, default_value = "127.0.0.2")]
    pub ip_base: Ipv4Addr,
    /// Port every machine listens on [default: a free port per machine].
    #[arg(long)]
    pub machine_port: Option<u16>,
    /// Most fly-replay hops followed for one request.
    #[arg(long, default_value_t = 5)]
    pub max_hops: usize,
}

/// A duration or "never"/"off".
#[derive(Clone, Copy, Debug)]
pub struct OptionalDuration(pub Option<Duration>);

fn parse_optional_duration(text: &str) -> Result<OptionalDuration, String> {
    match text {
        "never" | "off" | "none" => Ok(OptionalDuration(None)),
        _ => tenantd_core::config::parse_duration(text).map(|d| OptionalDuration(Some(d))),
    }
}

#[derive(Args, Clone, Debug)]
pub struct AdminArg {
    /// Admin API of the running `tenantd dev`.
    #[arg(
        long,
        env = "TENANTD_DEV_ADMIN",
        default_value = "http://127.0.0.1:8081"
    )]
    pub admin: String,
}

#[derive(Subcommand, Clone, Debug)]
pub enum DevCommand {
    /// List machines: id, customer, state, address, lock holder, epoch.
    Ls {
        /// Print JSON (one object per machine) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Set a customer's machine count (`*` for the pool machines).
    Scale {
        customer: String,
        count: usize,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// SIGKILL a machine (it restarts after --restart-delay).
    Kill {
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// SIGSTOP a machine.
    Pause {
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// SIGCONT a paused machine.
    Resume {
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// SIGTERM a machine; it stays stopped until started or auto-started.
    Stop {
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Start a stopped machine.
    Start {
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    match args.command {
        Some(command) => run_client(command).await,
        None => run_cluster(*args.run).await,
    }
}

async fn run_client(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Ls { json, admin } => {
            let machines = admin::Client::new(&admin.admin).machines().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&machines)?);
            } else {
                print!("{}", admin::format_table(&machines));
            }
        }
        DevCommand::Scale {
            customer,
            count,
            admin,
        } => {
            let customer = (customer != "*").then_some(customer);
            let machines = admin::Client::new(&admin.admin)
                .scale(customer.as_deref(), count)
                .await?;
            print!("{}", admin::format_table(&machines));
        }
        DevCommand::Kill { id, admin } => action(&admin, &id, "kill").await?,
        DevCommand::Pause { id, admin } => action(&admin, &id, "pause").await?,
        DevCommand::Resume { id, admin } => action(&admin, &id, "resume").await?,
        DevCommand::Stop { id, admin } => action(&admin, &id, "stop").await?,
        DevCommand::Start { id, admin } => action(&admin, &id, "start").await?,
    }
    Ok(())
}

async fn action(admin: &AdminArg, id: &str, what: &str) -> anyhow::Result<()> {
    admin::Client::new(&admin.admin).action(id, what).await?;
    let done = match what {
        "kill" => "sent SIGKILL; it restarts after the restart delay",
        "pause" => "sent SIGSTOP",
        "resume" => "sent SIGCONT",
        "stop" => "sent SIGTERM; it releases its lock and stays stopped",
        _ => "started",
    };
    println!("machine {id}: {done}");
    Ok(())
}

async fn run_cluster(args: RunArgs) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("locating the tenantd binary")?;
    let mut cfg = DevConfig::new(program, &args.data_dir);
    cfg.customers = match (args.customers.is_empty(), args.machines) {
        (true, Some(_)) => Vec::new(),
        (true, None) => vec!["100".into(), "200".into()],
        (false, _) => args.customers.clone(),
    };
    cfg.machines_per_customer = args.machines_per_customer;
    cfg.pool_machines = args.machines.unwrap_or(0);
    if cfg.customers.is_empty() {
        // Pool mode: tenants for the pool machines to serve (the banner's examples).
        cfg.tenants = vec!["100".into(), "200".into()];
    }
    cfg.edge_addr = args.edge;
    cfg.admin_addr = Some(args.admin);
    cfg.dns_addr = args.dns;
    if let Some(store) = args.store {
        cfg.store = store;
    }
    cfg.lease_ttl = args.lease_ttl;
    cfg.restart_delay = args.restart_delay.0;
    cfg.auto_stop = args.auto_stop.0;
    cfg.app_name = args.app_name;
    cfg.ip_base = args.ip_base;
    cfg.machine_port = args.machine_port;
    cfg.max_hops = args.max_hops;
    cfg.color_logs = std::io::IsTerminal::is_terminal(&std::io::stdout());
    cfg.api_token = std::env::var("TENANTD_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    // Tenant tokens made with `tenantd tokens create` open their tenant
    // on every machine: each verifies them with these keys.
    if let Ok(keys) = std::env::var("TENANTD_TOKEN_PUBLIC_KEY")
        && !keys.trim().is_empty()
    {
        cfg.extra_env
            .push(("TENANTD_TOKEN_PUBLIC_KEY".into(), keys));
    }

    let cluster = Cluster::start(cfg).await?;
    print!("{}", banner(&cluster));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("[dev] stopping: SIGTERM to every machine (Ctrl-C again: SIGKILL)");
    tokio::select! {
        _ = cluster.shutdown() => println!("[dev] stopped"),
        // Dropping the shutdown future drops the cluster, which SIGKILLs.
        _ = tokio::signal::ctrl_c() => println!("[dev] SIGKILL to every machine"),
    }
    Ok(())
}

fn banner(cluster: &Cluster) -> String {
    let edge = cluster.edge_url();
    let admin = cluster.admin_url().unwrap_or_default();
    let cfg = cluster.config();
    let example = cfg
        .customers
        .first()
        .cloned()
        .unwrap_or_else(|| "100".into());
    let admin_flag = if admin == "http://127.0.0.1:8081" {
        String::new()
    } else {
        format!(" --admin {admin}")
    };
    let mut out = String::new();
    out.push_str(&format!(
        "\ntenantd dev: app {} with {} machines, store {}\n",
        cfg.app_name,
        cluster.machines().len(),
        cfg.store
    ));
    out.push_str(&format!("  edge (the app's URL): {edge}\n"));
    out.push_str(&format!("  admin API:            {admin}\n"));
    out.push_str(&format!(
        "  internal DNS:         {} (UDP+TCP)\n",
        cluster.dns_addr()
    ));
    out.push_str(&format!(
        "  SQL API token:        {} (TENANTD_API_TOKEN{})\n\n",
        cluster.api_token(),
        if std::env::var("TENANTD_API_TOKEN").is_ok_and(|t| !t.is_empty()) {
            ", from the environment"
        } else {
            ", made up for this run: set TENANTD_API_TOKEN to choose it"
        }
    ));
    out.push_str("Try:\n");
    out.push_str(&format!("  curl {edge}/customers/{example}\n"));
    out.push_str(&format!(
        "  curl -H 'Accept: application/json' -X POST {edge}/customers/{example}/increment\n"
    ));
    out.push_str(&format!("  curl {edge}/customers/{example}/count\n"));
    out.push_str(&format!(
        "  TENANTD_API_TOKEN={} tenantd sql --url {edge} --customer-id {example} \"SELECT count FROM welcome\"\n",
        cluster.api_token()
    ));
    out.push_str(&format!(
        "  tenantd tenants create --store {} <id>   (other ids are 404)\n",
        cfg.store
    ));
    out.push_str(&format!("  tenantd dev ls{admin_flag}\n"));
    out.push_str(&format!("  tenantd dev scale {example} 3{admin_flag}\n"));
    out.push_str(&format!("  tenantd dev kill <machine id>{admin_flag}\n"));
    out.push_str(&format!(
        "  dig @{} -p {} AAAA customer{example}.process.{}.internal\n",
        cluster.dns_addr().ip(),
        cluster.dns_addr().port(),
        cfg.app_name
    ));
    out.push_str(&format!(
        "  FLY_API_URL={admin} FLY_APP_NAME={} FLY_API_TOKEN={} tenantd fly ls\n",
        cfg.app_name,
        cluster.admin_token()
    ));
    out.push_str("Ctrl-C stops every machine (they release their locks).\n\n");
    out
}
