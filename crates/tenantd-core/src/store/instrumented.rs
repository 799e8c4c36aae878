//! Counts and times every store request by operation and outcome.

use std::path::Path;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    DynStore, ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreResult,
};
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct InstrumentedStore {
    inner: DynStore,
    metrics: MetricsHandle,
}

/// `Metrics` holds prometheus types without `Debug`; this keeps the store
/// printable.
#[derive(Clone)]
struct MetricsHandle(Metrics);

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl InstrumentedStore {
    pub fn new(inner: DynStore, metrics: Metrics) -> InstrumentedStore {
        InstrumentedStore {
            inner,
            metrics: MetricsHandle(metrics),
        }
    }

    fn record<T>(&self, op: &str, key: &str, started: Instant, result: &StoreResult<T>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        // One line per request, for breaking a cold start or a handoff down
        // by round trip (`RUST_LOG=tenantd_core::store::instrumented=trace`).
        tracing::trace!(
            op,
            key,
            outcome,
            took_ms = started.elapsed().as_secs_f64() * 1000.0,
            "store request"
        );
        let m = &self.metrics.0;
        m.store_requests.with_label_values(&[op, outcome]).inc();
        m.store_requests_by_object
            .with_label_values(&[op, object_kind(key)])
            .inc();
        m.store_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }
}

impl InstrumentedStore {
    fn count_snapshot_read(&self, op: &str, key: &str) {
        if key.starts_with("customer/") && key.ends_with("/db.sqlite3") {
            self.metrics.0.snapshot_reads.with_label_values(&[op]).inc();
        }
    }
}

/// The metrics label of the object a request names (a list: its prefix).
fn object_kind(key: &str) -> &'static str {
    if key.starts_with("machines/") && key.ends_with("/heartbeat.json") {
        "heartbeat"
    } else if key.ends_with("/machine.lock") {
        "lock"
    } else if key.contains("/log/") {
        "log"
    } else if key.ends_with("/db.sqlite3") {
        "snapshot"
    } else {
        "other"
    }
}

/// The metrics label of a write: one per condition, whether the body came
/// from memory or from a file.
fn put_op(condition: &Precondition) -> &'static str {
    match condition {
        Precondition::None => "put",
        Precondition::IfAbsent => "put_if_absent",
        Precondition::IfMatch(_) => "put_if_match",
    }
}

#[async_trait]
impl ObjectStore for InstrumentedStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        let started = Instant::now();
        let result = self.inner.get(key).await;
        self.record("get", key, started, &result);
        self.count_snapshot_read("get", key);
        result
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let started = Instant::now();
        let result = self.inner.head(key).await;
        self.record("head", key, started, &result);
        result
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let started = Instant::now();
        let result = self.inner.get_to_file(key, path).await;
        self.record("get", key, started, &result);
        self.count_snapshot_read("get_to_file", key);
        result
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let op = put_op(&condition);
        let started = Instant::now();
        let result = self.inner.put_file(key, path, metadata, condition).await;
        self.record(op, key, started, &result);
        result
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let op = put_op(&condition);
        let started = Instant::now();
        let result = self.inner.put(key, body, metadata, condition).await;
        self.record(op, key, started, &result);
        result
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        let started = Instant::now();
        let result = self.inner.list(prefix, start_after).await;
        self.record("list", prefix, started, &result);
        result
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let started = Instant::now();
        let result = self.inner.delete(key).await;
        self.record("delete", key, started, &result);
        result
    }

    async fn abort_incomplete_uploads(&self, key: &str) -> StoreResult<usize> {
        let started = Instant::now();
        let result = self.inner.abort_incomplete_uploads(key).await;
        self.record("abort_uploads", key, started, &result);
        result
    }

    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
