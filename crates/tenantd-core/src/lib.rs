//! tenantd: per-tenant SQLite databases in an S3-compatible bucket, served by
//! any number of machines that coordinate through one `machine.lock` object.
//!
//! The map of the crate:
//! - [`store`]: the object-store trait with conditional writes, its backends
//!   (S3, file, memory) and wrappers (fault injection, retrying).
//! - [`lease`]: the `machine.lock` protocol: acquire, renew, self-fence,
//!   stale takeover, release.
//! - [`tenant`]: one actor per held tenant: the SQLite file, group commit,
//!   fenced uploads, idempotency keys.
//! - [`router`]: per request, serve here, replay to the holder, acquire, or 404.
//! - [`http`]: routes, content negotiation, the SQL API, `/metrics`, `/_status`.
//! - [`server`]: wires it all together for `tenantd serve`.
//! - [`tenants_cli`]: `tenantd tenants create|delete|ls` (the lifecycle in
//!   [`tenant::lifecycle`]).
//! - [`dev`], [`chaos`], [`bench`], [`fly`]: the local Fly stand-in, the
//!   chaos checker, the benchmark and the Machines API client.

// The bench report is one `json!` literal with many keys.
#![recursion_limit = "256"]

pub mod bench;
pub mod chaos;
pub mod config;
pub mod dev;
pub mod fly;
pub mod fly_dns;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod replay;
pub mod restore;
pub mod server;
pub mod sql_client;
pub mod store;
pub mod tenant;
pub mod tenant_id;
pub mod tenants_cli;

pub use tenant_id::TenantId;
