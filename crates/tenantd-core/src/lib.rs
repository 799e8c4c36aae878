//! tenantd: per-tenant SQLite databases in an S3-compatible bucket, served by
//! any number of machines that coordinate through one `machine.lock` object.
//!
//! The map of the crate:
//! - [`store`]: the object-store trait with conditional writes, its backends
//!   (S3, file, memory) and wrappers (fault injection, retrying).
//! - [`lease`]: the `machine.lock` protocol: acquire, renew, self-fence,
//!   stale takeover, release.
//! - [`tenant`]: one actor per held tenant: the SQLite file, group commit,
//!   fenced uploads, idempotency keys; its registry decides per request:
//!   serve here, replay to the holder, acquire, or 404.
//! - [`replay`]: the `fly-replay` answer and its forwarding stand-in.
//! - [`http`]: routes, content negotiation, the SQL API, `/metrics`, `/_status`.
//! - [`server`]: wires it all together for `tenantd serve`, from a plain
//!   [`config::ServeConfig`].
//! - [`restore`]: a tenant's database as of a kept commit, to a file or in
//!   place.
//! - [`fly`], [`fly_dns`]: where a tenant is held on Fly (Machines API,
//!   internal DNS).
//!
//! This crate is the product alone: it parses no command line and depends
//! on no tool. The `tenantd` binary (CLI), `tenantd-dev`, `tenantd-chaos`,
//! `tenantd-bench` and `tenantd-sim` depend on it, never the reverse (see
//! docs/architecture.md).

pub mod config;
pub mod fly;
pub mod fly_dns;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod replay;
pub mod restore;
pub mod server;
pub mod store;
pub mod tenant;
pub mod tenant_id;
pub mod token;

pub use tenant_id::TenantId;
