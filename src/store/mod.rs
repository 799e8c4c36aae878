//! The object-store layer: one small trait with conditional writes as data,
//! and the backends and wrappers that implement it.
//!
//! Invariants every implementation keeps (checked by [`conformance`]):
//! - `put` with [`Precondition::IfAbsent`] succeeds for exactly one of any
//!   number of concurrent callers; the others get
//!   [`StoreError::PreconditionFailed`].
//! - `put` with [`Precondition::IfMatch`] succeeds only while the object's
//!   current ETag equals the given one.
//! - The ETag changes whenever the bytes change.
//! - `get`/`head` of a missing key is `Ok(None)`, never an error.
//!
//! Wrappers stack over any backend: [`fault::FaultStore`] injects latency,
//! errors and partitions; [`retry::RetryingStore`] retries what is safe to
//! retry and resolves ambiguous conditional writes by reading back.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod conformance;
pub mod fault;
pub mod file;
pub mod instrumented;
pub mod memory;
pub mod retry;
pub mod s3;
pub mod url;

pub use fault::{FaultConfig, FaultStore};
pub use file::FileStore;
pub use instrumented::InstrumentedStore;
pub use memory::MemoryStore;
pub use retry::RetryingStore;
pub use s3::S3Store;
pub use url::{StoreUrl, open_store};

/// User metadata stored with an object (`x-amz-meta-*` on S3). Keys are
/// lower-case ASCII.
pub type Metadata = BTreeMap<String, String>;

/// The metadata key the retrying layer tags every conditional write with, so
/// that an ambiguous outcome can be resolved by reading the object back.
pub const WRITE_ID_KEY: &str = "tenantd-write-id";

/// An entity tag as the store returns it (quotes included, as S3 sends them).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ETag(pub String);

impl ETag {
    /// The ETag of `bytes` as S3 computes it for single-part uploads: the
    /// quoted hex MD5 of the body. The file and memory stores use the same.
    pub fn of(bytes: &[u8]) -> ETag {
        use md5::{Digest, Md5};
        ETag(format!("\"{}\"", hex::encode(Md5::digest(bytes))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object with its body.
#[derive(Clone, Debug)]
pub struct Object {
    pub body: Bytes,
    pub etag: ETag,
    pub metadata: Metadata,
}

/// An object's attributes without its body (`HEAD`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub etag: ETag,
    pub size: u64,
    pub metadata: Metadata,
}

/// The condition a `put` is made under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Unconditional overwrite. Never used for lock or database objects.
    None,
    /// `If-None-Match: *`: create only if the key is absent.
    IfAbsent,
    /// `If-Match: <etag>`: replace only if the current ETag is this one.
    IfMatch(ETag),
}

/// What went wrong, precise enough that a caller knows what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The condition did not hold (HTTP 412): someone else wrote first.
    #[error("precondition failed on key={key}: the object changed since it was read")]
    PreconditionFailed { key: String },
    /// A concurrent conditional write raced this one (HTTP 409); safe to retry.
    #[error("conflicting concurrent write on key={key} (409); retry")]
    Conflict { key: String },
    /// Temporary failure (5xx, timeout, connection error, partition). For a
    /// conditional put the write may or may not have happened.
    #[error("transient store error on key={key}: {message}")]
    Transient { key: String, message: String },
    /// Will not get better by retrying: credentials, missing bucket, bad
    /// configuration, or an object that breaks the store's own invariants.
    #[error("{message}")]
    Fatal { message: String },
}

impl StoreError {
    /// True for errors that a retry may cure (409 and transient).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::Transient { .. }
        )
    }

    pub fn is_precondition(&self) -> bool {
        matches!(self, StoreError::PreconditionFailed { .. })
    }

    /// A short machine-readable name, used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::PreconditionFailed { .. } => "precondition",
            StoreError::Conflict { .. } => "conflict",
            StoreError::Transient { .. } => "transient",
            StoreError::Fatal { .. } => "fatal",
        }
    }

    pub fn transient(key: &str, message: impl Into<String>) -> StoreError {
        StoreError::Transient {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A key-value object store with conditional writes.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// Reads an object; `Ok(None)` when the key does not exist.
    async fn get(&self, key: &str) -> StoreResult<Option<Object>>;

    /// Reads an object's ETag, size and metadata; `Ok(None)` when absent.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>>;

    /// Writes `body` under `key` if `condition` holds, returning the new ETag.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag>;

    /// Checks that the store is reachable and usable (bucket exists,
    /// credentials valid) without writing anything.
    async fn check(&self) -> StoreResult<()>;

    /// A human-readable description for logs (`s3://bucket/prefix`, ...).
    fn describe(&self) -> String;
}

pub type DynStore = Arc<dyn ObjectStore>;

/// Object keys of a tenant, relative to the store's root/prefix.
pub mod keys {
    pub fn database(customer_id: &str) -> String {
        format!("customer/{customer_id}/db.sqlite3")
    }

    pub fn lock(customer_id: &str) -> String {
        format!("customer/{customer_id}/machine.lock")
    }

    /// Where the original (pre-tenantd) app kept the database: a key with a
    /// leading slash. Imported once when `database()` is absent.
    pub fn legacy_database(customer_id: &str) -> String {
        format!("/customer/{customer_id}/db.sqlite3")
    }
}
