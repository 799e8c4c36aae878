//! The flags of `tenantd serve`: every contract flag (see docs/protocol.md
//! and DESIGN.md) is also read from the environment variable named in the
//! contract. They parse into the core's plain [`ServeConfig`], which keeps
//! the command-line parser out of the core.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use tenantd_core::config::{LogFormat, ReplayMode, ServeConfig, parse_duration, parse_size};
use tenantd_core::store::StoreUrl;
use tenantd_core::tenant::sql::limits::SqliteLimits;
use tenantd_core::tenant::sql::memory::HeapLimit;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on for HTTP (on Fly, 0.0.0.0 is widened to `[::]`,
    /// both IPv4 and IPv6: the 6PN network is IPv6).
    #[arg(long, env = "TENANTD_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,

    /// The one tenant this machine serves; unset = pool mode (any tenant).
    #[arg(long, env = "CUSTOMER_ID")]
    pub customer_id: Option<String>,

    /// This machine's id, as used in `fly-replay: instance=<id>`
    /// [default: 14 random hex characters].
    #[arg(long, env = "FLY_MACHINE_ID")]
    pub machine_id: Option<String>,

    /// Object store: s3://bucket[/prefix], file:///abs/path or file://rel/path
    /// [default: s3://$BUCKET_NAME if BUCKET_NAME is set, else file://./data/store].
    #[arg(long, env = "TENANTD_STORE")]
    pub store: Option<StoreUrl>,

    /// Folder for the working copies of held tenants' databases.
    #[arg(long, env = "DATABASE_PATH", default_value = "./data/local")]
    pub data_dir: PathBuf,

    /// Lease time-to-live of machine.lock (renewed every ttl/3).
    #[arg(long, env = "TENANTD_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Longest time from SIGTERM/SIGINT to exit: keep it below fly.toml's
    /// `kill_timeout` (leases are released, then the listener closes).
    #[arg(long, env = "TENANTD_DRAIN_TIMEOUT", default_value = "8s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Address other machines use to reach this one (forward mode, lock
    /// object) [default: [$FLY_PRIVATE_IP]:port on Fly, else the listen address].
    #[arg(long, env = "TENANTD_ADVERTISE")]
    pub advertise: Option<String>,

    /// How a non-holder hands a request to the holder.
    #[arg(long, env = "TENANTD_REPLAY_MODE", value_enum, default_value_t = ReplayModeArg::Fly)]
    pub replay_mode: ReplayModeArg,

    /// Fly app name; enables routing through Fly's internal DNS.
    #[arg(long, env = "FLY_APP_NAME")]
    pub app_name: Option<String>,

    /// Region of this machine (informational; from Fly).
    #[arg(long, env = "FLY_REGION")]
    pub region: Option<String>,

    /// This machine's 6PN address on Fly (used for the default --advertise).
    #[arg(long, env = "FLY_PRIVATE_IP", hide = true)]
    pub private_ip: Option<String>,

    /// DNS server for `.internal` lookups (host:port) [default: the system resolver].
    #[arg(long, env = "TENANTD_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Pool mode: release a tenant's lease after this long without requests.
    #[arg(long, env = "TENANTD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Pool mode: most tenants held at once (least recently used released
    /// first). An idle held tenant costs about 0.1 MiB: the default fits a
    /// 256 MB machine.
    #[arg(long, env = "TENANTD_MAX_TENANTS", default_value_t = 1_000)]
    pub max_tenants: usize,

    /// Most tenants this machine remembers (held or not: lock reads,
    /// routing state); those not held are forgotten beyond it, least
    /// recently used first. Also bounds the DNS cache.
    #[arg(long, env = "TENANTD_MAX_KNOWN_TENANTS", default_value_t = 10_000)]
    pub max_known_tenants: usize,

    /// Pool mode: create a tenant that does not exist on its first valid
    /// request instead of answering 404 (for demos: anyone who can reach
    /// the app can then create tenants).
    #[arg(
        long,
        env = "TENANTD_CREATE_ON_FIRST_REQUEST",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub create_on_first_request: bool,

    /// Largest accepted request body.
    #[arg(long, env = "TENANTD_MAX_BODY", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Token that enables the /_admin endpoints (fault injection, step down).
    #[arg(long, env = "TENANTD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Token that enables the SQL API (`POST /customers/<id>/sql` with
    /// `Authorization: Bearer <token>`); unset = no SQL API.
    #[arg(long, env = "TENANTD_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Public keys tenant tokens are verified with (`tenantd tokens
    /// keygen`); two, comma-separated, during a key rotation.
    #[arg(long, env = "TENANTD_TOKEN_PUBLIC_KEY")]
    pub token_public_key: Option<String>,

    /// Largest size a tenant's database may grow to through the SQL API.
    #[arg(long, env = "TENANTD_MAX_DB_BYTES", default_value_t = 1 << 30)]
    pub max_db_bytes: u64,

    /// Longest a SQL request's statements may run before they are
    /// interrupted and the request rolled back.
    #[arg(long, env = "TENANTD_SQL_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub sql_timeout: Duration,

    /// Most rows a SQL request may return (all statements together).
    #[arg(long, env = "TENANTD_SQL_MAX_ROWS", default_value_t = 10_000)]
    pub sql_max_rows: usize,

    /// Largest answer of a SQL request, in bytes as sent (JSON: column
    /// names, escapes and base64 included); past it the request is
    /// refused with 413.
    #[arg(long, env = "TENANTD_SQL_MAX_ANSWER_BYTES", default_value_t = 4 << 20, value_parser = parse_size)]
    pub sql_max_answer_bytes: usize,

    /// Most memory SQLite may use in this process, all tenants together
    /// (`auto`: half of the machine's memory, or of its cgroup's limit);
    /// an allocation past it fails the request that made it (400).
    #[arg(long, env = "TENANTD_SQLITE_HEAP_LIMIT", default_value = "auto", value_parser = HeapLimit::parse)]
    pub sqlite_heap_limit: HeapLimit,
    /// SQLite's own limits on every tenant connection (see docs/apps.md).
    #[command(flatten)]
    pub sqlite: SqliteLimitArgs,

    /// How far back point-in-time restore reaches: deltas and old
    /// snapshots younger than this are kept (`0s`: keep only what the
    /// current snapshot needs).
    #[arg(long, env = "TENANTD_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// Rewrite the snapshot after this many commits (or once the deltas
    /// after it reach a quarter of the database, at least 16 MiB).
    #[arg(long, env = "TENANTD_COMPACT_AFTER", default_value_t = 1000)]
    pub compact_after: u64,

    /// Fault injection at start: JSON of FaultConfig, e.g.
    /// '{"latency":"20ms","jitter":"5ms"}' (for benchmarks and chaos tests).
    #[arg(long, env = "TENANTD_FAULTS")]
    pub faults: Option<String>,

    /// Log format.
    #[arg(long, env = "TENANTD_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,
}

/// SQLite's limits (`sqlite3_limit`) on every tenant connection; a
/// statement over one answers 400 with code "limit" and the flag's name.
/// The defaults are Cloudflare D1's where it publishes one.
#[derive(Args, Clone, Debug)]
pub struct SqliteLimitArgs {
    /// Longest string, blob or row a statement may make or read.
    #[arg(long, env = "TENANTD_SQL_MAX_VALUE_BYTES", default_value_t = SqliteLimits::DEFAULT.value_bytes, value_parser = limit_value(1_000_000_000))]
    pub sql_max_value_bytes: i32,

    /// Longest statement text.
    #[arg(long, env = "TENANTD_SQL_MAX_SQL_BYTES", default_value_t = SqliteLimits::DEFAULT.sql_bytes, value_parser = limit_value(1_000_000_000))]
    pub sql_max_sql_bytes: i32,

    /// Most columns of a table, index, result, ORDER BY or GROUP BY
    /// (lowering it below a tenant's existing tables makes their schema
    /// unreadable).
    #[arg(long, env = "TENANTD_SQL_MAX_COLUMNS", default_value_t = SqliteLimits::DEFAULT.columns, value_parser = limit_value(2000))]
    pub sql_max_columns: i32,

    /// Deepest expression tree or nesting of subqueries.
    #[arg(long, env = "TENANTD_SQL_MAX_EXPR_DEPTH", default_value_t = SqliteLimits::DEFAULT.expr_depth, value_parser = limit_value(1000))]
    pub sql_max_expr_depth: i32,

    /// Most terms of a compound SELECT (UNION, INTERSECT, EXCEPT).
    #[arg(long, env = "TENANTD_SQL_MAX_COMPOUND_SELECT", default_value_t = SqliteLimits::DEFAULT.compound_select, value_parser = limit_value(500))]
    pub sql_max_compound_select: i32,

    /// Most arguments of one function call.
    #[arg(long, env = "TENANTD_SQL_MAX_FUNCTION_ARGS", default_value_t = SqliteLimits::DEFAULT.function_args, value_parser = limit_value(1000))]
    pub sql_max_function_args: i32,

    /// Deepest nesting of triggers fired by triggers.
    #[arg(long, env = "TENANTD_SQL_MAX_TRIGGER_DEPTH", default_value_t = SqliteLimits::DEFAULT.trigger_depth, value_parser = limit_value(1000))]
    pub sql_max_trigger_depth: i32,

    /// Highest parameter number (?NNN), so most parameters of a statement.
    #[arg(long, env = "TENANTD_SQL_MAX_VARIABLES", default_value_t = SqliteLimits::DEFAULT.variables, value_parser = limit_value(32766))]
    pub sql_max_variables: i32,

    /// Longest LIKE or GLOB pattern.
    #[arg(long, env = "TENANTD_SQL_MAX_LIKE_PATTERN_BYTES", default_value_t = SqliteLimits::DEFAULT.like_pattern_bytes, value_parser = limit_value(50_000))]
    pub sql_max_like_pattern_bytes: i32,
}

/// A limit from 1 to SQLite's compile-time maximum `max`.
fn limit_value(max: i64) -> clap::builder::RangedI64ValueParser<i32> {
    clap::value_parser!(i32).range(1..=max)
}

impl SqliteLimitArgs {
    pub fn limits(&self) -> SqliteLimits {
        SqliteLimits {
            value_bytes: self.sql_max_value_bytes,
            sql_bytes: self.sql_max_sql_bytes,
            columns: self.sql_max_columns,
            expr_depth: self.sql_max_expr_depth,
            compound_select: self.sql_max_compound_select,
            function_args: self.sql_max_function_args,
            trigger_depth: self.sql_max_trigger_depth,
            variables: self.sql_max_variables,
            like_pattern_bytes: self.sql_max_like_pattern_bytes,
        }
    }
}

/// `--replay-mode`, as clap spells it (the core's [`ReplayMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReplayModeArg {
    /// Answer with `fly-replay: instance=<holder>` (Fly Proxy replays).
    Fly,
    /// Proxy the request to the holder's advertised address.
    Forward,
}

/// `--log-format`, as clap spells it (the core's [`LogFormat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<ServeArgs> for ServeConfig {
    fn from(a: ServeArgs) -> ServeConfig {
        ServeConfig {
            listen: a.listen,
            customer_id: a.customer_id,
            machine_id: a.machine_id,
            store: a.store,
            data_dir: a.data_dir,
            lease_ttl: a.lease_ttl,
            drain_timeout: a.drain_timeout,
            advertise: a.advertise,
            replay_mode: match a.replay_mode {
                ReplayModeArg::Fly => ReplayMode::Fly,
                ReplayModeArg::Forward => ReplayMode::Forward,
            },
            app_name: a.app_name,
            region: a.region,
            private_ip: a.private_ip,
            dns_server: a.dns_server,
            idle_timeout: a.idle_timeout,
            max_tenants: a.max_tenants,
            max_known_tenants: a.max_known_tenants,
            create_on_first_request: a.create_on_first_request,
            max_body_bytes: a.max_body_bytes,
            admin_token: a.admin_token,
            api_token: a.api_token,
            token_public_key: a.token_public_key,
            max_db_bytes: a.max_db_bytes,
            sql_timeout: a.sql_timeout,
            sql_max_rows: a.sql_max_rows,
            sql_max_answer_bytes: a.sql_max_answer_bytes,
            sqlite_heap_limit: a.sqlite_heap_limit,
            sqlite: a.sqlite.limits(),
            retention: a.retention,
            compact_after: a.compact_after,
            faults: a.faults,
            log_format: match a.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// Callers without a command line (the bench's in-process machines)
    /// start from `ServeConfig::default()`: it must be what the flags give.
    #[test]
    fn flag_defaults_are_the_core_defaults() {
        let parsed: ServeConfig = Flags::try_parse_from(["serve"]).unwrap().serve.into();
        let default = ServeConfig::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }
}
