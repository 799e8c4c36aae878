//! The configuration of a serving machine ([`ServeConfig`]) and the store
//! defaults every command shares. Plain data: the binary's `tenantd serve`
//! flags (each also read from the environment variable the contract names,
//! see DESIGN.md) parse into it, and tools build it directly; this crate
//! parses no command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::store::StoreUrl;
use crate::tenant::sql::SqlLimits;
use crate::tenant::sql::limits::SqliteLimits;
use crate::tenant::sql::memory::HeapLimit;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on for HTTP (on Fly, 0.0.0.0 is widened to `[::]`,
    /// both IPv4 and IPv6: the 6PN network is IPv6).
    pub listen: SocketAddr,

    /// The one tenant this machine serves; unset = pool mode (any tenant).
    pub customer_id: Option<String>,

    /// This machine's id, as used in `fly-replay: instance=<id>`
    /// [default: 14 random hex characters].
    pub machine_id: Option<String>,

    /// Object store: s3://bucket[/prefix], file:///abs/path or file://rel/path
    /// [default: s3://$BUCKET_NAME if BUCKET_NAME is set, else file://./data/store].
    pub store: Option<StoreUrl>,

    /// Folder for the working copies of held tenants' databases.
    pub data_dir: PathBuf,

    /// Lease time-to-live of machine.lock (renewed every ttl/3).
    pub lease_ttl: Duration,

    /// Longest time from SIGTERM/SIGINT to exit: keep it below fly.toml's
    /// `kill_timeout` (leases are released, then the listener closes).
    pub drain_timeout: Duration,

    /// Address other machines use to reach this one (forward mode, lock
    /// object) [default: [$FLY_PRIVATE_IP]:port on Fly, else the listen address].
    pub advertise: Option<String>,

    /// How a non-holder hands a request to the holder.
    pub replay_mode: ReplayMode,

    /// Fly app name; enables routing through Fly's internal DNS.
    pub app_name: Option<String>,

    /// Region of this machine (informational; from Fly).
    pub region: Option<String>,

    /// This machine's 6PN address on Fly (used for the default --advertise).
    pub private_ip: Option<String>,

    /// DNS server for `.internal` lookups (host:port) [default: the system resolver].
    pub dns_server: Option<SocketAddr>,

    /// Pool mode: release a tenant's lease after this long without requests.
    pub idle_timeout: Duration,

    /// Pool mode: most tenants held at once (least recently used released
    /// first). An idle held tenant costs about 0.1 MiB: the default fits a
    /// 256 MB machine.
    pub max_tenants: usize,

    /// Most tenants this machine remembers (held or not: lock reads,
    /// routing state); those not held are forgotten beyond it, least
    /// recently used first. Also bounds the DNS cache.
    pub max_known_tenants: usize,

    /// Pool mode: create a tenant that does not exist on its first valid
    /// request instead of answering 404 (for demos: anyone who can reach
    /// the app can then create tenants).
    pub create_on_first_request: bool,

    /// Largest accepted request body.
    pub max_body_bytes: usize,

    /// Token that enables the /_admin endpoints (fault injection, step down).
    pub admin_token: Option<String>,

    /// Token that enables the SQL API (`POST /customers/<id>/sql` with
    /// `Authorization: Bearer <token>`); unset = no SQL API.
    pub api_token: Option<String>,

    /// Public keys (comma-separated, for rotation) that tenant tokens are
    /// verified with; unset = tenant tokens are refused.
    pub token_public_key: Option<String>,

    /// Largest size a tenant's database may grow to through the SQL API.
    pub max_db_bytes: u64,

    /// Longest a SQL request's statements may run before they are
    /// interrupted and the request rolled back.
    pub sql_timeout: Duration,

    /// Most rows a SQL request may return (all statements together).
    pub sql_max_rows: usize,

    /// Largest answer of a SQL request, in bytes as sent (JSON: column
    /// names, escapes and base64 included); past it the request is
    /// refused with 413.
    pub sql_max_answer_bytes: usize,

    /// Most memory SQLite may use in this process, all tenants together
    /// (`auto`: half of the machine's memory, or of its cgroup's limit);
    /// an allocation past it fails the request that made it (400).
    pub sqlite_heap_limit: HeapLimit,
    /// SQLite's own limits on every tenant connection (see docs/apps.md).
    pub sqlite: SqliteLimits,

    /// How far back point-in-time restore reaches: deltas and old
    /// snapshots younger than this are kept (`0s`: keep only what the
    /// current snapshot needs).
    pub retention: Duration,

    /// Rewrite the snapshot after this many commits (or once the deltas
    /// after it reach a quarter of the database, at least 16 MiB).
    pub compact_after: u64,

    /// Fault injection at start: JSON of FaultConfig, e.g.
    /// '{"latency":"20ms","jitter":"5ms"}' (for benchmarks and chaos tests).
    pub faults: Option<String>,

    /// Log format.
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayMode {
    /// Answer with `fly-replay: instance=<holder>` (Fly Proxy replays).
    Fly,
    /// Proxy the request to the holder's advertised address.
    Forward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn parse_size(text: &str) -> Result<usize, String> {
    crate::tenant::sql::memory::parse_size(text)
        .and_then(|n| usize::try_from(n).map_err(|_| format!("size {text:?} is too large")))
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 5s, 500ms)"))
}

/// The defaults of `tenantd serve`'s flags (the binary checks that its
/// flags parse to exactly these), for callers that start a server without
/// a command line: the benchmark's in-process machines, tests.
impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
            customer_id: None,
            machine_id: None,
            store: None,
            data_dir: PathBuf::from("./data/local"),
            lease_ttl: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(8),
            advertise: None,
            replay_mode: ReplayMode::Fly,
            app_name: None,
            region: None,
            private_ip: None,
            dns_server: None,
            idle_timeout: Duration::from_secs(60),
            max_tenants: 1_000,
            max_known_tenants: 10_000,
            create_on_first_request: false,
            max_body_bytes: 64 * 1024,
            admin_token: None,
            api_token: None,
            token_public_key: None,
            max_db_bytes: 1 << 30,
            sql_timeout: Duration::from_secs(2),
            sql_max_rows: 10_000,
            sql_max_answer_bytes: 4 << 20,
            sqlite_heap_limit: HeapLimit::Auto,
            sqlite: SqliteLimits::DEFAULT,
            retention: Duration::from_secs(24 * 3600),
            compact_after: 1000,
            faults: None,
            log_format: LogFormat::Text,
        }
    }
}

impl ServeConfig {
    /// The store URL after defaults: `--store`, else `s3://$BUCKET_NAME`, else
    /// `file://./data/store`.
    pub fn store_url(&self) -> Result<StoreUrl, String> {
        store_url(self.store.as_ref())
    }

    pub fn sql_limits(&self) -> SqlLimits {
        SqlLimits {
            max_db_bytes: self.max_db_bytes,
            timeout: self.sql_timeout,
            max_rows: self.sql_max_rows,
            max_result_bytes: self.sql_max_answer_bytes,
            ..SqlLimits::default()
        }
    }

    pub fn retention(&self) -> crate::tenant::log::Retention {
        crate::tenant::log::Retention {
            keep: self.retention,
            max_deltas: self.compact_after.max(1),
            ..Default::default()
        }
    }

    pub fn machine_id(&self) -> String {
        self.machine_id.clone().unwrap_or_else(random_machine_id)
    }

    /// The address other machines reach this one at.
    pub fn advertise(&self) -> String {
        if let Some(addr) = &self.advertise {
            return addr.clone();
        }
        match &self.private_ip {
            Some(ip) if !ip.is_empty() => format!("[{ip}]:{}", self.listen.port()),
            _ => self.listen.to_string(),
        }
    }
}

/// The store URL after defaults: `explicit` (`--store`), else
/// `s3://$BUCKET_NAME`, else `file://./data/store`. Shared by every command
/// that reads the store, so they all find the same bucket.
pub fn store_url(explicit: Option<&StoreUrl>) -> Result<StoreUrl, String> {
    if let Some(url) = explicit {
        return Ok(url.clone());
    }
    match std::env::var("BUCKET_NAME") {
        Ok(bucket) if !bucket.is_empty() => StoreUrl::parse(&format!("s3://{bucket}"))
            .map_err(|e| format!("{e} (from BUCKET_NAME)")),
        _ => Ok(StoreUrl::File(PathBuf::from("./data/store"))),
    }
}

/// Whether this process runs on a Fly machine (or under `tenantd dev`,
/// which sets the same variables).
pub fn on_fly() -> bool {
    ["FLY_APP_NAME", "FLY_MACHINE_ID"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
}

/// On Fly, the file store default would give every machine (and every
/// command run there) a store of its own — split brain, and writes lost at
/// the next deploy: refuse instead. Every command that reads the store
/// checks this before [`store_url`].
pub fn check_store_configured(explicit: Option<&StoreUrl>) -> Result<(), String> {
    let bucket = std::env::var("BUCKET_NAME").is_ok_and(|b| !b.is_empty());
    if explicit.is_none() && !bucket && on_fly() {
        return Err(
            "running on Fly (FLY_APP_NAME / FLY_MACHINE_ID are set) but no store is configured: \
             set BUCKET_NAME (`fly storage create` does) or TENANTD_STORE / --store; \
             refusing to use a local file store that no other machine sees"
                .to_string(),
        );
    }
    Ok(())
}

/// 14 lower-case hex characters, like a Fly machine id.
pub fn random_machine_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..14].to_string()
}
