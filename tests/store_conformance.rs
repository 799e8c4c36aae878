//! One conformance suite, the same code, against the memory store, the file
//! store and the S3 store on a real S3 server (moto); and through the fault
//! and retrying layers, so that 409s and transient errors are shown to be
//! retried without losing or doubling a write.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tenantd_core::store::conformance;
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, FaultStore, FileStore, MemoryStore, RetryingStore, S3Store,
};

/// Wraps `inner` in a fault layer that fails and loses responses often, and
/// a retrying layer above it.
fn flaky(inner: DynStore, rate: f64) -> DynStore {
    flaky_with(inner, rate, rate)
}

/// As [`flaky`], with late-applied writes at `late_rate` (a late write can
/// land after a later delete of its key, as on a real store).
fn flaky_with(inner: DynStore, rate: f64, late_rate: f64) -> DynStore {
    let faults = FaultConfig {
        error_rate: rate,
        conflict_rate: rate,
        lost_response_rate: rate,
        late_apply_rate: late_rate,
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
        let flaky_store = flaky(store.clone(), 0.2);
        let prefix = format!("{name}/flaky");
        conformance::missing_key_is_none(&flaky_store, &prefix).await;
        conformance::round_trip(&flaky_store, &prefix).await;
        conformance::cas_increments_lose_nothing(&flaky_store, &prefix, 4, 10).await;
        conformance::list_filters_and_orders(&flaky_store, &prefix).await;
        conformance::list_spans_pages(&flaky_store, &prefix, 10).await;
        conformance::files_round_trip(&flaky_store, &prefix).await;
        // Lost delete responses are resent and succeed; without late
        // writes, which could bring a deleted key back.
        conformance::delete_removes(&flaky_with(store, 0.2, 0.0), &prefix).await;
    }
}

/// Listings longer than a page (3 keys a page here) come back whole, and
/// a store with a key prefix lists and deletes its own keys only, without
/// the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_listings_span_pages_and_stay_inside_the_store_prefix() {
    let bucket = support::fresh_bucket().await;
    let open = |prefix: &'static str| {
        let bucket = bucket.clone();
        async move {
            let store = S3Store::from_env(&bucket, prefix)
                .await
                .expect("S3 store")
                .with_page_size(3);
            Arc::new(store) as DynStore
        }
    };
    let whole = open("").await;
    conformance::list_spans_pages(&whole, "paged", 10).await;
    conformance::list_filters_and_orders(&whole, "paged").await;

    let prefixed = open("tenants/eu").await;
    conformance::list_spans_pages(&prefixed, "p", 10).await;
    conformance::list_filters_and_orders(&prefixed, "p").await;
    conformance::delete_removes(&prefixed, "p").await;
    conformance::leading_slash_keys_list_apart(&prefixed, "p").await;
    let own = prefixed.list("", None).await.unwrap();
    assert!(
        own.iter()
            .all(|l| l.key.starts_with("p/") || l.key.starts_with("/p/")),
        "the prefixed store lists only its keys, without its prefix: {:?}",
        own.iter().map(|l| &l.key).collect::<Vec<_>>()
    );
    let seen_from_root = whole.list("tenants/eu/", None).await.unwrap();
    assert_eq!(seen_from_root.len(), own.len());
    assert!(
        seen_from_root
            .iter()
            .zip(&own)
            .all(|(root, own)| { root.key == format!("tenants/eu/{}", own.key) })
    );
}

#[tokio::test]
async fn without_retries_injected_faults_surface_as_their_kinds() {
    use tenantd_core::store::{Metadata, ObjectStore, Precondition, StoreError};
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
