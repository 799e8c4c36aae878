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
//! - `list` returns every key with the prefix after `start_after`, in byte
//!   order, however many pages the backend needs; `delete` of a missing
//!   key succeeds, and after a delete the key is absent for every call.
//!
//! Wrappers stack over any backend: [`fault::FaultStore`] injects latency,
//! errors and partitions; [`retry::RetryingStore`] retries what is safe to
//! retry and resolves ambiguous conditional writes by reading back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod conformance;
pub mod fault;
pub mod file;
pub mod hooked;
pub mod instrumented;
pub mod memory;
pub mod multipart;
pub mod retry;
pub mod s3;
pub mod stream;
pub mod url;

pub use fault::{FaultConfig, FaultStore};
pub use file::FileStore;
pub use hooked::{Hooked, Hooks};
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

/// The metadata key the retrying layer records a conditional write's
/// condition under: `absent` for [`Precondition::IfAbsent`], `etag:<opaque
/// ETag>` for [`Precondition::IfMatch`]. A write that carries the same base
/// as ours replaced the very state ours needed, which proves that ours did
/// not land (see [`retry`]).
pub const WRITE_BASE_KEY: &str = "tenantd-write-base";

/// The slowest upload or download rate a store request is allowed before it
/// counts as stalled: per-attempt timeouts and retry budgets grow by
/// `size / MIN_THROUGHPUT_BYTES_PER_SEC` (a 200 MB body gets 40 s more).
pub const MIN_THROUGHPUT_BYTES_PER_SEC: u64 = 5_000_000;

/// Extra time a body of `bytes` is allowed at [`MIN_THROUGHPUT_BYTES_PER_SEC`].
pub fn transfer_allowance(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(bytes as f64 / MIN_THROUGHPUT_BYTES_PER_SEC as f64)
}

/// An entity tag as the store returns it (quotes included, as S3 sends them).
///
/// Equality (and hashing) ignore the form: surrounding whitespace, a weak
/// `W/` prefix and the quotes are dropped before comparing (see
/// [`ETag::normalized`]), so `"abc"`, `abc` and `W/"abc"` are one ETag. A
/// store, a proxy or an SDK version may send any of them for the same object,
/// and a spurious mismatch would read as "someone else wrote" (a wrong
/// verdict about a write).
#[derive(Clone)]
pub struct ETag(pub String);

impl PartialEq for ETag {
    fn eq(&self, other: &ETag) -> bool {
        self.normalized() == other.normalized()
    }
}

impl Eq for ETag {}

impl std::hash::Hash for ETag {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.normalized().hash(state);
    }
}

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

    /// The opaque part: without surrounding whitespace, a `W/` prefix and
    /// the surrounding quotes. What every comparison uses.
    pub fn normalized(&self) -> &str {
        let text = self.0.trim();
        let text = text.strip_prefix("W/").unwrap_or(text);
        text.strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text)
    }

    /// The form to send in `If-Match`: the opaque part in quotes, as S3
    /// returns it (a strong ETag: `If-Match` never matches a weak one).
    pub fn to_header(&self) -> String {
        format!("\"{}\"", self.normalized())
    }

    /// Checks that a store's ETag header is usable: non-empty once
    /// normalised, visible ASCII, no stray quotes. Anything else is an
    /// answer from something that is not a working S3 API (a proxy's error
    /// page, a broken gateway), and must not be compared as if it were one.
    pub fn parse_header(text: &str) -> Result<ETag, String> {
        let etag = ETag(text.to_string());
        let opaque = etag.normalized();
        if opaque.is_empty() {
            return Err(format!("an empty ETag ({text:?})"));
        }
        if opaque.len() > 1024 || !opaque.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
            return Err(format!("a malformed ETag ({text:?})"));
        }
        Ok(etag)
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

/// One key of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When the object was last written, as the store says.
    pub last_modified: Option<std::time::SystemTime>,
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
    /// A conditional write whose response was lost, and the object has been
    /// changed by someone else since: this write may or may not have landed
    /// (and been overwritten). Never treat it as "not written".
    #[error(
        "outcome unknown for a write on key={key}: the response was lost and the object has changed since; the write may have landed"
    )]
    Ambiguous { key: String },
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
            StoreError::Ambiguous { .. } => "ambiguous",
            StoreError::Fatal { .. } => "fatal",
        }
    }

    /// True for a store asking us to slow down (503 SlowDown, 429): retried
    /// with a longer backoff. Read from the message, which every backend
    /// starts with the HTTP status and S3 error code.
    pub fn is_throttle(&self) -> bool {
        match self {
            StoreError::Transient { message, .. } => {
                message.starts_with("503")
                    || message.starts_with("429")
                    || [
                        "SlowDown",
                        "TooManyRequests",
                        "RequestLimitExceeded",
                        "Throttl",
                    ]
                    .iter()
                    .any(|code| message.contains(code))
            }
            _ => false,
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

    /// Streams an object's bytes into a new file at `path` (replacing any
    /// file there) and returns its ETag, size and metadata; `Ok(None)`,
    /// with no file written, when the key does not exist. A body shorter or
    /// longer than the store's recorded size is an error naming the key; a
    /// local write failure (a full disk) is an error naming the path. On
    /// any error nothing is left at `path`.
    ///
    /// The default holds the body in memory (the memory store, which is
    /// for tests); real backends and every wrapper stream.
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let Some(object) = self.get(key).await? else {
            return Ok(None);
        };
        stream::write_body(key, path, &object.body).await?;
        Ok(Some(ObjectMeta {
            etag: object.etag,
            size: object.body.len() as u64,
            metadata: object.metadata,
        }))
    }

    /// Writes the bytes of the file at `path` under `key` if `condition`
    /// holds, as [`put`](ObjectStore::put) does with a body. The file must
    /// not change until this returns (a retry reads it again).
    ///
    /// The default reads the file into memory (see
    /// [`get_to_file`](ObjectStore::get_to_file)).
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let body = stream::read_body(key, path).await?;
        self.put(key, body, metadata, condition).await
    }

    /// Aborts every incomplete multipart upload of `key` (one a killed
    /// machine left) and says how many there were. Such uploads are never
    /// state (no read sees them); this frees their parts. Stores without
    /// multipart uploads have none.
    async fn abort_incomplete_uploads(&self, key: &str) -> StoreResult<usize> {
        let _ = key;
        Ok(0)
    }

    /// Every key that starts with `prefix` and sorts after `start_after`
    /// (when given), in ascending byte order, across all pages of the
    /// listing. Strongly consistent on S3 and Tigris.
    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>>;

    /// Deletes `key`. Deleting a key that does not exist succeeds.
    async fn delete(&self, key: &str) -> StoreResult<()>;

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

    /// Everything of one tenant lives under this prefix.
    pub fn tenant_prefix(customer_id: &str) -> String {
        format!("customer/{customer_id}/")
    }

    /// The tenant's commit log: one object per slot.
    pub fn log_prefix(customer_id: &str) -> String {
        format!("customer/{customer_id}/log/")
    }

    /// Slot `seq` of the commit log; zero-padded so that keys sort by
    /// number and a listing can start after any slot.
    pub fn log_slot(customer_id: &str, seq: u64) -> String {
        format!("customer/{customer_id}/log/{seq:020}")
    }

    /// The slot number of a log key, if it is one.
    pub fn log_seq(key: &str) -> Option<u64> {
        let (_, tail) = key.rsplit_once("/log/")?;
        (tail.len() == 20).then(|| tail.parse().ok())?
    }

    /// Older snapshots kept for point-in-time restore.
    pub fn archive_prefix(customer_id: &str) -> String {
        format!("customer/{customer_id}/snapshots/")
    }

    pub fn archive(customer_id: &str, seq: u64) -> String {
        format!("customer/{customer_id}/snapshots/{seq:020}.sqlite3")
    }

    /// The slot number an archived snapshot covers, if `key` is one.
    pub fn archive_seq(key: &str) -> Option<u64> {
        let (_, tail) = key.rsplit_once("/snapshots/")?;
        let digits = tail.strip_suffix(".sqlite3")?;
        (digits.len() == 20).then(|| digits.parse().ok())?
    }

    /// Left by a delete: the last log slot the deleted incarnation used.
    /// Creation reads it directly (a listing may not show the delete's
    /// fences yet) and starts the new incarnation's log after it.
    pub fn tombstone(customer_id: &str) -> String {
        format!("customer/{customer_id}/deleted.json")
    }

    /// One heartbeat object per machine (session leases).
    pub fn heartbeat(machine_id: &str) -> String {
        format!("machines/{machine_id}/heartbeat.json")
    }

    /// Where the original (pre-tenantd) app kept the database: a key with a
    /// leading slash. Imported once when `database()` is absent.
    pub fn legacy_database(customer_id: &str) -> String {
        format!("/customer/{customer_id}/db.sqlite3")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn etags_compare_after_normalising_quotes_and_weakness() {
        let strong = ETag("\"0123abcd\"".into());
        for same in [
            "0123abcd",
            "W/\"0123abcd\"",
            " \"0123abcd\"\t",
            "W/0123abcd",
        ] {
            assert_eq!(ETag(same.into()), strong, "{same:?}");
            assert_eq!(ETag(same.into()).normalized(), "0123abcd");
        }
        for other in ["\"0123abce\"", "\"0123ABCD\"", "\"\"", ""] {
            assert_ne!(ETag(other.into()), strong, "{other:?}");
        }
        let set: HashSet<ETag> = ["\"a\"", "a", "W/\"a\""]
            .into_iter()
            .map(|t| ETag(t.into()))
            .collect();
        assert_eq!(set.len(), 1, "hashing agrees with equality");
        assert_eq!(ETag("W/\"a\"".into()).to_header(), "\"a\"");
        assert_eq!(
            ETag::of(b"x"),
            ETag(hex::encode(<md5::Md5 as md5::Digest>::digest(b"x")))
        );
    }

    #[test]
    fn etag_headers_are_checked() {
        assert!(ETag::parse_header("\"abc\"").is_ok());
        assert!(ETag::parse_header("abc-12").is_ok());
        for bad in ["", "\"\"", "W/\"\"", "\"a\"b\"", "a b", "caf\u{e9}"] {
            assert!(ETag::parse_header(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Conditions are checked with normalised ETags by the memory store (and
    /// the file store, which shares the check).
    #[tokio::test]
    async fn conditions_match_an_etag_in_another_form() {
        let store = MemoryStore::new();
        let etag = store
            .put("k", "v".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        let unquoted = ETag(etag.normalized().to_string());
        store
            .put(
                "k",
                "w".into(),
                Metadata::new(),
                Precondition::IfMatch(unquoted),
            )
            .await
            .expect("an unquoted ETag matches");
    }
}
