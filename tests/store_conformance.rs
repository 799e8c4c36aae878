//! One conformance suite, the same code, against the memory store, the file
//! store and the S3 store on a real S3 server (moto); and through the fault
//! and retrying layers, so that 409s and transient errors are shown to be
//! retried without losing or doubling a write.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tenantd::store::conformance;
use tenantd::store::retry::RetryPolicy;
use tenantd::store::{DynStore, FaultConfig, FaultStore, FileStore, MemoryStore, RetryingStore};

/// Wraps `inner` in a fault layer that fails and loses responses often, and
/// a retrying layer above it.
fn flaky(inner: DynStore, rate: f64) -> DynStore {
    let faults = FaultConfig {
        error_rate: rate,
        conflict_rate: rate,
        lost_response_rate: rate,
        late_apply_rate: rate,
        late_apply_delay: Duration::from_millis(20),
        internal_error_rate: rate / 4.0,
        slowdown_rate: rate / 4.0,
        ..FaultConfig::default()
    };
    let policy = RetryPolicy {
        max_attempts: 40,
        max_elapsed: Duration::from_secs(60),
        initial_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(20),
        throttle_initial_interval: Duration::from_millis(2),
        throttle_max_interval: Duration::from_millis(40),
    };
    Arc::new(RetryingStore::new(
        Arc::new(FaultStore::new(inner, faults)),
        policy,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    conformance::run_all(Arc::new(MemoryStore::new()), "t", 32, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(Arc::new(FileStore::new(dir.path()).unwrap()), "t", 32, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_on_moto_conforms() {
    let (store, _bucket) = support::s3_store().await;
    conformance::run_all(store, "t", 32, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_409s_and_transient_errors_lose_nothing_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let (s3, _bucket) = support::s3_store().await;
    let stores: Vec<(&str, DynStore)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        ("file", Arc::new(FileStore::new(dir.path()).unwrap())),
        ("s3", s3),
    ];
    for (name, store) in stores {
        let store = flaky(store, 0.2);
        conformance::missing_key_is_none(&store, &format!("{name}/flaky")).await;
        conformance::round_trip(&store, &format!("{name}/flaky")).await;
        conformance::cas_increments_lose_nothing(&store, &format!("{name}/flaky"), 4, 10).await;
    }
}

#[tokio::test]
async fn without_retries_injected_faults_surface_as_their_kinds() {
    use tenantd::store::{Metadata, ObjectStore, Precondition, StoreError};
    let inner: DynStore = Arc::new(MemoryStore::new());
    let conflicts = FaultStore::new(
        inner.clone(),
        FaultConfig {
            conflict_rate: 1.0,
            ..FaultConfig::default()
        },
    );
    let e = conflicts
        .put("k", "x".into(), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }) && e.is_retryable());
    let partitioned = FaultStore::new(
        inner.clone(),
        FaultConfig {
            partitioned: true,
            ..FaultConfig::default()
        },
    );
    let e = partitioned.get("k").await.unwrap_err();
    assert!(matches!(e, StoreError::Transient { .. }) && e.to_string().contains("partitioned"));
    // A lost response: the write happened although the caller saw an error,
    // and the retrying layer reports it as the success it was.
    let lossy: DynStore = Arc::new(FaultStore::new(
        inner.clone(),
        FaultConfig {
            lost_response_rate: 1.0,
            ..FaultConfig::default()
        },
    ));
    let retrying = RetryingStore::new(lossy, RetryPolicy::default());
    let etag = retrying
        .put("lost", "y".into(), Metadata::new(), Precondition::IfAbsent)
        .await
        .expect("resolved by reading back");
    assert_eq!(inner.head("lost").await.unwrap().unwrap().etag, etag);
}
