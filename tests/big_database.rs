//! Big databases on slow stores: a commit's upload gets a time budget that
//! fits its size, and the SQLite and file work of a claim runs off the
//! async runtime, so that one worker thread still renews every other
//! tenant's lease.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tenantd_core::TenantId;
use tenantd_core::metrics::Metrics;
use tenantd_core::store::fault::FaultHandle;
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, Metadata, Precondition, StoreUrl, keys, open_store,
};
use tenantd_core::tenant::actor::ActorContext;
use tenantd_core::tenant::{Op, Registry, RegistryConfig, Route, log};

/// A tenant database of about `mb` megabytes holding count 41.
fn big_database(dir: &Path, mb: usize) -> Bytes {
    let path = dir.join(format!("big-{mb}.sqlite3"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (41);
         CREATE TABLE ballast (b BLOB);
         INSERT INTO ballast SELECT zeroblob(1048576) FROM generate_series(1, {mb});"
    ))
    .or_else(|_| {
        // generate_series is an extension in some builds: a recursive CTE.
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS welcome (count INTEGER);
             DELETE FROM welcome; INSERT INTO welcome VALUES (41);
             CREATE TABLE IF NOT EXISTS ballast (b BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {mb})
             INSERT INTO ballast SELECT zeroblob(1048576) FROM n;"
        ))
    })
    .unwrap();
    drop(conn);
    Bytes::from(std::fs::read(&path).unwrap())
}

/// A memory store, layered as the service uses it, holding tenant "big"
/// with a database of `mb` megabytes (put before any fault applies).
async fn store_with_big_tenant(dir: &Path, mb: usize) -> (DynStore, FaultHandle) {
    let (store, faults) = open_store(
        &StoreUrl::Memory,
        FaultConfig::default(),
        RetryPolicy::default(),
        None,
    )
    .await
    .unwrap();
    store
        .put(
            &keys::database("big"),
            big_database(dir, mb),
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();
    (store, faults)
}

fn registry(store: DynStore, dir: &Path, ttl: Duration) -> Arc<Registry> {
    Registry::new(
        RegistryConfig {
            machine_id: "m1".into(),
            advertise: "127.0.0.1:1".into(),
            lease_ttl: ttl,
            customer_id: None,
            max_tenants: 10,
            lock_cache_ttl: ttl / 5,
            max_known_tenants: 100,
            create_on_first_request: false,
        },
        ActorContext::new(store, Metrics::new(), "m1".into(), dir.join("local")),
    )
}

async fn local(registry: &Arc<Registry>, id: &TenantId) -> tenantd_core::tenant::TenantHandle {
    match registry.route(id, true).await {
        Route::Local(handle) => handle,
        other => panic!("expected to hold {id}, got {other:?}"),
    }
}

/// A 200 MB database, stored the old way (whole file only), through a store
/// that moves 20 MB/s: the claim downloads it and converts it, uploading it
/// once as a snapshot (10 s each way, longer than the 2 s lease, and not cut
/// at the lease deadline); after that, an increment uploads only the pages
/// it changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_database_commits_through_a_20_mb_per_s_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = store_with_big_tenant(dir.path(), 200).await;
    let id = TenantId::parse("big").unwrap();
    faults.set(FaultConfig {
        bandwidth_bytes_per_sec: 20_000_000,
        ..FaultConfig::default()
    });
    let registry = registry(store.clone(), dir.path(), Duration::from_secs(2));
    let handle = local(&registry, &id).await;
    let answer = handle
        .call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .expect("the commit is acknowledged");
    assert_eq!(answer.count, 42);
    assert_eq!(answer.epoch, handle.epoch(), "no step-down on the way");
    faults.set(FaultConfig::default());
    let snapshot = store.head(&keys::database("big")).await.unwrap().unwrap();
    assert_eq!(
        snapshot.metadata.get("tenantd-format").map(String::as_str),
        Some("log"),
        "converted on its first claim"
    );
    let log = store.list(&keys::log_prefix("big"), None).await.unwrap();
    let largest = log.iter().map(|l| l.size).max().unwrap_or(0);
    assert!(
        largest < 64 * 1024,
        "a commit uploads its pages, not the database: {log:?}"
    );
    let copy = dir.path().join("stored.sqlite3");
    log::materialize(&store, "big", &copy, log::Until::End)
        .await
        .unwrap();
    let count: i64 = rusqlite::Connection::open(&copy)
        .unwrap()
        .query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 42, "the acknowledged count is in the store");
}

/// With one runtime worker (a shared-cpu-1x machine), claiming a 100 MB
/// tenant — writing, checking and reading back its working copy, hashing
/// its upload — does not stop another tenant's renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn claiming_a_100_mb_tenant_on_one_worker_costs_no_other_tenant_its_lease() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    // The memory store: no disk shared between the big tenant's uploads
    // and the small one's renewals, so only the runtime is tested.
    let (store, _) = store_with_big_tenant(dir.path(), 100).await;
    let ttl = Duration::from_millis(1500);
    let registry = registry(store.clone(), dir.path(), ttl);
    let small = TenantId::parse("small").unwrap();
    tenantd_core::tenant::lifecycle::create(&store, &small)
        .await
        .unwrap();
    let held = local(&registry, &small).await;
    held.call(Op::Increment {
        idempotency_key: None,
    })
    .await
    .unwrap();
    for _ in 0..3 {
        let big = local(&registry, &TenantId::parse("big").unwrap()).await;
        big.call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .unwrap();
        big.stop();
        big.ended().await;
    }
    assert!(held.is_alive(), "the small tenant's actor ended");
    let answer = held
        .call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .expect("the small tenant is still held");
    assert_eq!(
        answer.epoch,
        held.epoch(),
        "the small tenant's lease lapsed"
    );
}
