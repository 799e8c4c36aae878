//! A wrapper that makes any store misbehave on purpose, the way a real S3 or
//! Tigris does now and then:
//!
//! - added latency with jitter;
//! - a bandwidth cap: a body of N bytes takes N / cap longer (per request;
//!   concurrent requests do not share the cap);
//! - transient errors that never reach the store (`error_rate`), 503
//!   SlowDown and 500 InternalError answers (`slowdown_rate`,
//!   `internal_error_rate`), optionally in bursts (`error_burst`: after one,
//!   every request fails the same way for that long);
//! - 409 Conflicts;
//! - lost responses: the write (or delete) happens but the caller sees a
//!   transient error;
//! - late-applied writes: the caller sees a transient error *first*, and the
//!   write is applied afterwards (within `late_apply_delay`), as a request
//!   that sat in a server's queue after the client gave up on it;
//! - a partition switch;
//! - a lagging LIST (`list_lag`): a listing leaves out objects created less
//!   than that long ago, as an eventually consistent LIST does (Tigris'
//!   global buckets across regions), optionally only under one key prefix.
//!   GET and HEAD still see them.
//!
//! All settings change at run time, so a running machine can be cut off from
//! its store. Configured as JSON (`TENANTD_FAULTS`, `PUT /_admin/faults`):
//! every field is optional, unknown fields are refused; see
//! docs/operations.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    DynStore, ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError,
    StoreResult, stream,
};

/// What the fault layer does to each request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Added to every request before it reaches the inner store.
    #[serde(with = "humantime_serde_opt")]
    pub latency: Duration,
    /// Uniform extra latency in `[0, jitter]`.
    #[serde(with = "humantime_serde_opt")]
    pub jitter: Duration,
    /// Probability in [0, 1] that a request fails with a transient error
    /// before reaching the store.
    pub error_rate: f64,
    /// Probability in [0, 1] that a `put` or `delete` reaches the store and
    /// succeeds but the caller is told it failed (a lost response: the
    /// ambiguous case).
    pub lost_response_rate: f64,
    /// Probability in [0, 1] that a `put` fails with a transient error and is
    /// applied *afterwards*, at a uniform time in `[0, late_apply_delay]`
    /// after the caller was told it failed.
    pub late_apply_rate: f64,
    /// Longest delay of a late-applied write (see `late_apply_rate`).
    #[serde(with = "humantime_serde_opt")]
    pub late_apply_delay: Duration,
    /// Probability in [0, 1] that a request is answered 503 SlowDown (not
    /// applied).
    pub slowdown_rate: f64,
    /// Probability in [0, 1] that a request is answered 500 InternalError
    /// (not applied).
    pub internal_error_rate: f64,
    /// After an injected SlowDown or InternalError, every request fails the
    /// same way for this long (zero: errors are independent).
    #[serde(with = "humantime_serde_opt")]
    pub error_burst: Duration,
    /// Bodies move at this many bytes per second (0: unlimited): a `put` or
    /// `get` of N bytes takes N / cap longer, and a listing takes the time
    /// of its answer ([`LISTED_ENTRY_BYTES`] per key plus the key).
    pub bandwidth_bytes_per_sec: u64,
    /// Probability in [0, 1] that a request fails with 409 Conflict.
    pub conflict_rate: f64,
    /// When true every request fails with a transient "partitioned" error.
    pub partitioned: bool,
    /// Every `put` to a key starting with one of these fails with a
    /// transient error and is not applied: an object that cannot be
    /// written, however often it is tried.
    pub failing_puts: Vec<String>,
    /// A listing leaves out every object created less than this long ago
    /// (zero: listings are current). The age is taken from when a fault
    /// layer sharing this one's [`WriteTimes`] saw the object land, else
    /// from the store's `last_modified`.
    #[serde(with = "humantime_serde_opt")]
    pub list_lag: Duration,
    /// Only keys starting with this prefix are left out by `list_lag`
    /// (empty: every key).
    pub list_lag_prefix: String,
}

/// Durations as humantime strings ("20ms") in JSON, for the admin endpoint.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A cheap handle to change a [`FaultStore`]'s behaviour while it runs.
#[derive(Clone, Debug, Default)]
pub struct FaultHandle(Arc<Mutex<FaultConfig>>);

impl FaultHandle {
    pub fn get(&self) -> FaultConfig {
        self.0.lock().unwrap().clone()
    }

    pub fn set(&self, config: FaultConfig) {
        *self.0.lock().unwrap() = config;
    }

    pub fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        f(&mut self.0.lock().unwrap());
    }

    pub fn partition(&self, partitioned: bool) {
        self.update(|c| c.partitioned = partitioned);
    }
}

/// When objects were created, as the fault layers sharing it saw them land
/// (tokio's clock, so that it follows a simulation's paused time). Every
/// machine of a simulation shares one, so that a lagging LIST hides young
/// objects whoever wrote them.
#[derive(Clone, Debug, Default)]
pub struct WriteTimes(Arc<Mutex<std::collections::HashMap<String, Instant>>>);

impl WriteTimes {
    /// A write landed: the key's creation time, unless it existed before
    /// (a replacement does not make a key young to a listing).
    fn landed(&self, key: &str, condition: &Precondition) {
        let mut times = self.0.lock().unwrap();
        match condition {
            Precondition::IfAbsent => {
                times.insert(key.to_string(), Instant::now());
            }
            Precondition::None => {
                times.entry(key.to_string()).or_insert_with(Instant::now);
            }
            Precondition::IfMatch(_) => {}
        }
    }

    fn deleted(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }

    /// How long ago `listed` was created, as far as anyone knows.
    fn age(&self, listed: &Listed) -> Option<Duration> {
        if let Some(at) = self.0.lock().unwrap().get(&listed.key) {
            return Some(at.elapsed());
        }
        let modified = listed.last_modified?;
        Some(
            std::time::SystemTime::now()
                .duration_since(modified)
                .unwrap_or(Duration::ZERO),
        )
    }
}

#[derive(Debug)]
pub struct FaultStore {
    inner: DynStore,
    handle: FaultHandle,
    written: WriteTimes,
    rng: Mutex<StdRng>,
    /// A burst of SlowDown/InternalError answers in progress: until when,
    /// and which.
    burst: Mutex<Option<(Instant, Burst)>>,
}

#[derive(Clone, Copy, Debug)]
enum Burst {
    SlowDown,
    InternalError,
}

impl Burst {
    fn error(self, key: &str) -> StoreError {
        match self {
            Burst::SlowDown => StoreError::transient(
                key,
                "503 SlowDown: Please reduce your request rate. (fault injection)",
            ),
            Burst::InternalError => StoreError::transient(
                key,
                "500 InternalError: We encountered an internal error. Please try again. (fault injection)",
            ),
        }
    }
}

/// What a put sends: bytes, or a file of this many bytes.
enum Body {
    Bytes(Bytes),
    File(PathBuf, u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(bytes) => bytes.len() as u64,
            Body::File(_, len) => *len,
        }
    }

    async fn apply(
        &self,
        inner: &DynStore,
        key: &str,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        match self {
            Body::Bytes(bytes) => inner.put(key, bytes.clone(), metadata, condition).await,
            Body::File(path, _) => inner.put_file(key, path, metadata, condition).await,
        }
    }

    /// A body that outlives the caller's file: a second name for it (a
    /// hard link, else a copy) beside it. tenantd writes a new file for
    /// every upload, so the link keeps the bytes that were sent.
    fn keep(self, key: &str) -> StoreResult<Body> {
        let Body::File(path, len) = self else {
            return Ok(self);
        };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let kept = path.with_file_name(format!(".{name}.late.{}", uuid::Uuid::new_v4().simple()));
        std::fs::hard_link(&path, &kept)
            .or_else(|_| std::fs::copy(&path, &kept).map(|_| ()))
            .map_err(|e| stream::local_read_error(key, &path, e))?;
        Ok(Body::File(kept, len))
    }

    /// Removes what [`Body::keep`] made.
    fn discard(self) {
        if let Body::File(path, _) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Injected {
    Pass,
    Fail(StoreError),
    LoseResponse,
    /// Fail now, apply after this delay.
    LateApply(Duration),
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Put,
    Delete,
}

/// About what one key costs in a ListObjectsV2 answer besides the key
/// itself (the XML of its size, date, ETag and storage class).
pub const LISTED_ENTRY_BYTES: u64 = 200;

/// How long `bytes` take at `bytes_per_sec` (0: no cap).
fn transfer_time(bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 || bytes == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64)
    }
}

impl FaultStore {
    pub fn new(inner: DynStore, config: FaultConfig) -> FaultStore {
        Self::seeded(inner, config, rand::rng().random())
    }

    /// With its dice seeded: a simulation replays the same faults.
    pub fn seeded(inner: DynStore, config: FaultConfig, seed: u64) -> FaultStore {
        let handle = FaultHandle::default();
        handle.set(config);
        FaultStore {
            inner,
            handle,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            burst: Mutex::new(None),
            written: WriteTimes::default(),
        }
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    /// Records creation times in `times`, shared with other fault layers
    /// over the same store.
    pub fn with_write_times(mut self, times: WriteTimes) -> FaultStore {
        self.written = times;
        self
    }

    pub fn write_times(&self) -> WriteTimes {
        self.written.clone()
    }

    /// Leaves out what an eventually consistent LIST would not show yet.
    fn lagging(&self, listed: Vec<Listed>) -> Vec<Listed> {
        let config = self.handle.get();
        if config.list_lag.is_zero() {
            return listed;
        }
        listed
            .into_iter()
            .filter(|l| {
                !l.key.starts_with(&config.list_lag_prefix)
                    || self.written.age(l).is_none_or(|age| age >= config.list_lag)
            })
            .collect()
    }

    /// Sleeps the configured latency (and, for a put, the upload time of
    /// `body_len` bytes), then decides this request's fate.
    async fn before(&self, key: &str, op: Op, body_len: u64) -> Injected {
        let config = self.handle.get();
        let (delay, rolls, late_delay) = {
            let mut rng = self.rng.lock().unwrap();
            let jitter = if config.jitter.is_zero() {
                Duration::ZERO
            } else {
                config.jitter.mul_f64(rng.random::<f64>())
            };
            let rolls: [f64; 5] = std::array::from_fn(|_| rng.random::<f64>());
            let late_delay = config.late_apply_delay.mul_f64(rng.random::<f64>());
            (config.latency + jitter, rolls, late_delay)
        };
        let [
            roll_error,
            roll_conflict,
            roll_lost,
            roll_throttle,
            roll_late,
        ] = rolls;
        let upload = if op == Op::Put {
            transfer_time(body_len, config.bandwidth_bytes_per_sec)
        } else {
            Duration::ZERO
        };
        if !(delay + upload).is_zero() {
            tokio::time::sleep(delay + upload).await;
        }
        // Read the switch again after the delay: a partition that starts
        // while a request is in flight cuts that request off too.
        if self.handle.get().partitioned {
            return Injected::Fail(StoreError::transient(
                key,
                "partitioned from the store (fault injection)",
            ));
        }
        if op == Op::Put
            && config
                .failing_puts
                .iter()
                .any(|p| key.starts_with(p.as_str()))
        {
            return Injected::Fail(StoreError::transient(
                key,
                "this key cannot be written (fault injection: failing_puts)",
            ));
        }
        if let Some(burst) = self.burst_now(&config, roll_throttle) {
            return Injected::Fail(burst.error(key));
        }
        if roll_error < config.error_rate {
            return Injected::Fail(StoreError::transient(
                key,
                "injected error (fault injection)",
            ));
        }
        if roll_conflict < config.conflict_rate {
            return Injected::Fail(StoreError::Conflict {
                key: key.to_string(),
            });
        }
        if matches!(op, Op::Put | Op::Delete) && roll_lost < config.lost_response_rate {
            return Injected::LoseResponse;
        }
        if op == Op::Put && roll_late < config.late_apply_rate {
            return Injected::LateApply(late_delay);
        }
        Injected::Pass
    }

    /// A SlowDown or InternalError for this request: one in progress
    /// (a burst), or a new one by the dice (which may start a burst).
    fn burst_now(&self, config: &FaultConfig, roll: f64) -> Option<Burst> {
        let mut burst = self.burst.lock().unwrap();
        let now = Instant::now();
        match *burst {
            Some((until, kind)) if now < until => return Some(kind),
            Some(_) => *burst = None,
            None => {}
        }
        let kind = if roll < config.slowdown_rate {
            Burst::SlowDown
        } else if roll < config.slowdown_rate + config.internal_error_rate {
            Burst::InternalError
        } else {
            return None;
        };
        if !config.error_burst.is_zero() {
            *burst = Some((now + config.error_burst, kind));
        }
        Some(kind)
    }

    /// A put of bytes or of a file, with the faults of a put.
    async fn write(
        &self,
        key: &str,
        body: Body,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        match self.before(key, Op::Put, body.len()).await {
            Injected::Fail(e) => Err(e),
            Injected::Pass => {
                let result = body
                    .apply(&self.inner, key, metadata, condition.clone())
                    .await;
                if result.is_ok() {
                    self.written.landed(key, &condition);
                }
                result
            }
            Injected::LoseResponse => {
                if body
                    .apply(&self.inner, key, metadata, condition.clone())
                    .await
                    .is_ok()
                {
                    self.written.landed(key, &condition);
                }
                Err(StoreError::transient(
                    key,
                    "response lost (fault injection)",
                ))
            }
            Injected::LateApply(delay) => {
                // The server has the bytes already: the caller may remove
                // its file once told the write failed.
                let body = body.keep(key)?;
                let (inner, owned_key) = (self.inner.clone(), key.to_string());
                let written = self.written.clone();
                tokio::spawn(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let result = body
                        .apply(&inner, &owned_key, metadata, condition.clone())
                        .await;
                    body.discard();
                    if result.is_ok() {
                        written.landed(&owned_key, &condition);
                    }
                    tracing::debug!(key = %owned_key, ?delay, ok = result.is_ok(), "late-applied write (fault injection)");
                });
                Err(StoreError::transient(
                    key,
                    "timed out; the request may still be applied (fault injection: late apply)",
                ))
            }
        }
    }

    /// The download time of `bytes` at the configured cap.
    async fn download(&self, bytes: u64) {
        let time = transfer_time(bytes, self.handle.get().bandwidth_bytes_per_sec);
        if !time.is_zero() {
            tokio::time::sleep(time).await;
        }
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        match self.before(key, Op::Read, 0).await {
            Injected::Fail(e) => Err(e),
            _ => {
                let object = self.inner.get(key).await?;
                if let Some(object) = &object {
                    self.download(object.body.len() as u64).await;
                }
                Ok(object)
            }
        }
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        match self.before(key, Op::Read, 0).await {
            Injected::Fail(e) => Err(e),
            _ => self.inner.head(key).await,
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        self.write(key, Body::Bytes(body), metadata, condition)
            .await
    }

    /// As `put`, the upload time taken from the file's size; a late-applied
    /// write applies the file's bytes as they were when it was sent.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let len = stream::file_len(key, path).await?;
        self.write(
            key,
            Body::File(path.to_path_buf(), len),
            metadata,
            condition,
        )
        .await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        match self.before(key, Op::Read, 0).await {
            Injected::Fail(e) => Err(e),
            _ => {
                let meta = self.inner.get_to_file(key, path).await?;
                if let Some(meta) = &meta {
                    self.download(meta.size).await;
                }
                Ok(meta)
            }
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        match self.before(prefix, Op::Read, 0).await {
            Injected::Fail(e) => Err(e),
            _ => {
                let listed = self.inner.list(prefix, start_after).await?;
                let answer: u64 = listed
                    .iter()
                    .map(|l| l.key.len() as u64 + LISTED_ENTRY_BYTES)
                    .sum();
                self.download(answer).await;
                Ok(self.lagging(listed))
            }
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self.before(key, Op::Delete, 0).await {
            Injected::Fail(e) => Err(e),
            Injected::LoseResponse => {
                if self.inner.delete(key).await.is_ok() {
                    self.written.deleted(key);
                }
                Err(StoreError::transient(
                    key,
                    "response lost (fault injection)",
                ))
            }
            _ => {
                self.inner.delete(key).await?;
                self.written.deleted(key);
                Ok(())
            }
        }
    }

    /// Passed through without faults: it runs in the background after a
    /// claim, and rolling dice for it would shift every seeded
    /// simulation's faults.
    async fn abort_incomplete_uploads(&self, key: &str) -> StoreResult<usize> {
        self.inner.abort_incomplete_uploads(key).await
    }

    async fn check(&self) -> StoreResult<()> {
        match self.before("", Op::Read, 0).await {
            Injected::Fail(e) => Err(e),
            _ => self.inner.check().await,
        }
    }

    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn the_json_form_takes_every_new_field_and_refuses_typos() {
        let config: FaultConfig = serde_json::from_str(
            r#"{"latency":"20ms","late_apply_rate":0.1,"late_apply_delay":"2s",
                "slowdown_rate":0.05,"internal_error_rate":0.01,"error_burst":"3s",
                "bandwidth_bytes_per_sec":20000000,"list_lag":"30s",
                "list_lag_prefix":"customer/1/log/"}"#,
        )
        .unwrap();
        assert_eq!(config.late_apply_delay, Duration::from_secs(2));
        assert_eq!(config.error_burst, Duration::from_secs(3));
        assert_eq!(config.bandwidth_bytes_per_sec, 20_000_000);
        assert_eq!(config.list_lag, Duration::from_secs(30));
        assert_eq!(config.list_lag_prefix, "customer/1/log/");
        assert_eq!(
            serde_json::from_str::<FaultConfig>("{}").unwrap(),
            FaultConfig::default()
        );
        let typo = serde_json::from_str::<FaultConfig>(r#"{"late_aply_rate":0.1}"#);
        assert!(typo.unwrap_err().to_string().contains("late_aply_rate"));
        let round: FaultConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round, config);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_move_at_the_bandwidth_cap() {
        let store = FaultStore::new(
            Arc::new(MemoryStore::new()),
            FaultConfig {
                bandwidth_bytes_per_sec: 1_000_000,
                ..FaultConfig::default()
            },
        );
        let started = Instant::now();
        store
            .put(
                "k",
                Bytes::from(vec![0; 2_000_000]),
                Metadata::new(),
                Precondition::None,
            )
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let started = Instant::now();
        store.get("k").await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let started = Instant::now();
        store.head("k").await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_write_lands_after_the_caller_was_told_it_failed() {
        let inner = Arc::new(MemoryStore::new());
        let store = FaultStore::new(
            inner.clone(),
            FaultConfig {
                late_apply_rate: 1.0,
                late_apply_delay: Duration::from_millis(500),
                ..FaultConfig::default()
            },
        );
        let e = store
            .put("k", "v".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        // Not there when the caller hears of the failure (unless the dice
        // chose no delay at all) ...
        tokio::time::sleep(Duration::from_millis(501)).await;
        // ... and there within the delay.
        assert_eq!(
            inner.get("k").await.unwrap().unwrap().body,
            Bytes::from("v")
        );
    }

    /// Files move under the same cap as bodies, and a late-applied
    /// `put_file` lands the bytes that were sent even though the caller
    /// removed its file when told the write failed.
    #[tokio::test(start_paused = true)]
    async fn files_move_at_the_cap_and_land_late_after_their_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("snapshot");
        std::fs::write(&file, vec![7u8; 2_000_000]).unwrap();
        let inner = Arc::new(MemoryStore::new());
        let store = FaultStore::new(
            inner.clone(),
            FaultConfig {
                bandwidth_bytes_per_sec: 1_000_000,
                ..FaultConfig::default()
            },
        );
        let started = Instant::now();
        store
            .put_file("k", &file, Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let download = dir.path().join("download");
        let started = Instant::now();
        let meta = store.get_to_file("k", &download).await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(meta.size, 2_000_000);
        assert_eq!(std::fs::read(&download).unwrap(), vec![7u8; 2_000_000]);

        store.handle().set(FaultConfig {
            late_apply_rate: 1.0,
            late_apply_delay: Duration::from_millis(500),
            ..FaultConfig::default()
        });
        std::fs::write(&file, b"sent late").unwrap();
        let e = store
            .put_file("late", &file, Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        std::fs::remove_file(&file).unwrap();
        tokio::time::sleep(Duration::from_millis(501)).await;
        for _ in 0..100 {
            if inner.head("late").await.unwrap().is_some() {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            inner.get("late").await.unwrap().unwrap().body,
            Bytes::from("sent late")
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec!["download"], "the late write's copy is removed");
    }

    #[tokio::test(start_paused = true)]
    async fn slowdown_bursts_last_their_length() {
        let store = FaultStore::new(
            Arc::new(MemoryStore::new()),
            FaultConfig {
                slowdown_rate: 1.0,
                error_burst: Duration::from_secs(2),
                ..FaultConfig::default()
            },
        );
        let e = store.head("k").await.unwrap_err();
        assert!(
            e.is_throttle() && e.to_string().contains("503 SlowDown"),
            "{e}"
        );
        store.handle().update(|c| c.slowdown_rate = 0.0);
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert!(
            store.head("k").await.unwrap_err().is_throttle(),
            "still in the burst"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            store.head("k").await.unwrap().is_none(),
            "the burst is over"
        );
        store.handle().update(|c| c.internal_error_rate = 1.0);
        let e = store.head("k").await.unwrap_err();
        assert!(
            e.is_retryable() && !e.is_throttle() && e.to_string().contains("500 InternalError")
        );
    }

    /// A delete whose response is lost happened all the same; through the
    /// retrying layer it is the success it was. Listings and deletes obey
    /// partitions like every other request.
    #[tokio::test(start_paused = true)]
    async fn lost_delete_responses_and_partitions() {
        use crate::store::{RetryingStore, retry::RetryPolicy};
        let inner = Arc::new(MemoryStore::new());
        for key in ["a", "b"] {
            inner
                .put(key, "v".into(), Metadata::new(), Precondition::IfAbsent)
                .await
                .unwrap();
        }
        let store = Arc::new(FaultStore::new(
            inner.clone(),
            FaultConfig {
                lost_response_rate: 1.0,
                ..FaultConfig::default()
            },
        ));
        let e = store.delete("a").await.unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("response lost"),
            "{e}"
        );
        assert!(
            inner.head("a").await.unwrap().is_none(),
            "the delete happened"
        );
        // Half the responses lost: every delete is resent until one answer
        // arrives, and a resend of a delete that happened succeeds.
        let lossy = FaultStore::seeded(
            inner.clone(),
            FaultConfig {
                lost_response_rate: 0.5,
                ..FaultConfig::default()
            },
            5,
        );
        RetryingStore::new(Arc::new(lossy), RetryPolicy::default())
            .delete("b")
            .await
            .expect("deletes are retried; a resend finds the key gone: success");
        assert!(inner.keys().is_empty());

        store.handle().partition(true);
        for e in [
            store.list("", None).await.unwrap_err(),
            store.delete("a").await.unwrap_err(),
        ] {
            assert!(
                e.is_retryable() && e.to_string().contains("partitioned"),
                "{e}"
            );
        }
    }

    fn keys_of(listed: &[Listed]) -> Vec<&str> {
        listed.iter().map(|l| l.key.as_str()).collect()
    }

    /// A lagging LIST leaves out young objects, whichever machine wrote
    /// them (the layers share their write times), only under its prefix;
    /// GET still sees them, a replacement does not make a key young again,
    /// and a deleted key is gone from the times too.
    #[tokio::test(start_paused = true)]
    async fn a_lagging_listing_hides_young_objects() {
        let inner: DynStore = Arc::new(MemoryStore::new());
        let lagging = FaultStore::new(
            inner.clone(),
            FaultConfig {
                list_lag: Duration::from_secs(10),
                list_lag_prefix: "t/log/".into(),
                ..FaultConfig::default()
            },
        );
        let writer = FaultStore::new(inner.clone(), FaultConfig::default())
            .with_write_times(lagging.write_times());
        for key in ["t/log/1", "t/db"] {
            writer
                .put(key, "v".into(), Metadata::new(), Precondition::IfAbsent)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        writer
            .put(
                "t/log/2",
                "v".into(),
                Metadata::new(),
                Precondition::IfAbsent,
            )
            .await
            .unwrap();
        assert_eq!(keys_of(&lagging.list("t/", None).await.unwrap()), ["t/db"]);
        assert!(lagging.get("t/log/2").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            keys_of(&lagging.list("t/", None).await.unwrap()),
            ["t/db", "t/log/1"]
        );
        let etag = inner.head("t/log/1").await.unwrap().unwrap().etag;
        writer
            .put(
                "t/log/1",
                "w".into(),
                Metadata::new(),
                Precondition::IfMatch(etag),
            )
            .await
            .unwrap();
        assert_eq!(
            keys_of(&lagging.list("t/", None).await.unwrap()),
            ["t/db", "t/log/1"],
            "a replaced object is not new"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(lagging.list("t/", None).await.unwrap().len(), 3);
        // Deleted and written again: young again.
        writer.delete("t/log/1").await.unwrap();
        writer
            .put(
                "t/log/1",
                "v".into(),
                Metadata::new(),
                Precondition::IfAbsent,
            )
            .await
            .unwrap();
        assert_eq!(
            keys_of(&lagging.list("t/", None).await.unwrap()),
            ["t/db", "t/log/2"]
        );
        lagging.handle().update(|c| c.list_lag = Duration::ZERO);
        assert_eq!(lagging.list("t/", None).await.unwrap().len(), 3);
    }

    /// Objects no fault layer saw land are aged by the store's
    /// `last_modified` (the wall clock: a real store, other processes).
    #[tokio::test]
    async fn a_lagging_listing_ages_unseen_objects_by_last_modified() {
        let inner: DynStore = Arc::new(MemoryStore::new());
        inner
            .put("k", "v".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        let lagging = FaultStore::new(
            inner,
            FaultConfig {
                list_lag: Duration::from_secs(3600),
                ..FaultConfig::default()
            },
        );
        assert!(lagging.list("", None).await.unwrap().is_empty());
        lagging
            .handle()
            .update(|c| c.list_lag = Duration::from_nanos(1));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(lagging.list("", None).await.unwrap().len(), 1);
    }

    /// A write applied late is young from when it lands.
    #[tokio::test(start_paused = true)]
    async fn a_late_write_is_young_from_when_it_lands() {
        let inner: DynStore = Arc::new(MemoryStore::new());
        let store = FaultStore::seeded(
            inner.clone(),
            FaultConfig {
                late_apply_rate: 1.0,
                late_apply_delay: Duration::from_secs(5),
                list_lag: Duration::from_secs(2),
                ..FaultConfig::default()
            },
            1,
        );
        let _ = store
            .put("k", "v".into(), Metadata::new(), Precondition::IfAbsent)
            .await;
        while inner.head("k").await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.list("", None).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(store.list("", None).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_moves_at_the_bandwidth_cap() {
        let inner = Arc::new(MemoryStore::new());
        for i in 0..10 {
            inner
                .put(
                    &format!("k{i:03}"),
                    "v".into(),
                    Metadata::new(),
                    Precondition::None,
                )
                .await
                .unwrap();
        }
        let store = FaultStore::new(
            inner,
            FaultConfig {
                bandwidth_bytes_per_sec: 10 * (4 + LISTED_ENTRY_BYTES),
                ..FaultConfig::default()
            },
        );
        let started = Instant::now();
        assert_eq!(store.list("k", None).await.unwrap().len(), 10);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
