//! Tenants held by this machine: one actor per held tenant owns its SQLite
//! working copy and is the only writer of its database object, and the
//! registry decides which tenants this machine holds.

pub mod actor;
pub(crate) mod claim;
mod context;
pub mod copy;
pub mod db;
pub mod delta;
pub mod follower;
pub mod lifecycle;
pub mod log;
pub mod migrations;
pub mod prefetch;
pub mod registry;
pub mod sql;
pub mod wal;

use std::sync::Arc;

pub use actor::TenantHandle;
pub use registry::{Registry, RegistryConfig, Route};

/// What a request asks of a tenant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Add one to the counter; with a key, at most once per key.
    Increment { idempotency_key: Option<String> },
    /// Read the durable count.
    Read,
    /// Run statements in one transaction; with a key, at most once per key.
    Sql {
        request: Arc<sql::SqlRequest>,
        idempotency_key: Option<String>,
    },
    /// A Hrana pipeline; answered as `Reply::Sql` with `{baton, results}`
    /// (or `{stream_error}` when its stream is gone).
    Hrana(Arc<sql::hrana::Program>),
    /// Apply one published schema migration unless it is applied already.
    Migrate(Arc<migrations::Migration>),
}

/// What a tenant answers: a count for the counter's operations, results
/// for SQL.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Count(Answer),
    Sql(SqlAnswer),
    Migrated(migrations::Migrated),
}

/// A SQL request's durable answer.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlAnswer {
    pub epoch: u64,
    /// True when an idempotency key was seen before and this is its first answer.
    pub repeated: bool,
    /// The `results` array: one `{columns, rows, rows_affected,
    /// last_insert_rowid}` per statement.
    pub results: Arc<serde_json::Value>,
}

/// A durable answer: given only after the state it reports is in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub count: u64,
    pub epoch: u64,
    /// True when an idempotency key was seen before and this is its first answer.
    pub repeated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    /// This machine does not (or no longer) write this tenant, and nothing of
    /// this request was written: safe to hand to the holder.
    #[error("this machine is not the tenant's writer")]
    NotHolder,
    /// The store could not be reached in time; the request may or may not
    /// have been applied, so it must not be replayed blindly.
    #[error("{0}")]
    Unavailable(String),
    /// The tenant's database object is unusable; it is left untouched.
    #[error("{0}")]
    Corrupt(String),
    /// A SQL request was refused; nothing of it was applied.
    #[error("{0}")]
    Sql(sql::SqlError),
}
