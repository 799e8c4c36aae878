//! The registry's unit tests: routing, existence, pruning and deletes over
//! a memory store.

use super::*;
use crate::lease::Acquire;
use crate::metrics::Metrics;
use crate::store::{InstrumentedStore, MemoryStore};
use crate::tenant::Op;
use crate::tenant::lifecycle;
use crate::tenant::lifecycle::Deleter;
use crate::tenant::log;

struct Fixture {
    memory: Arc<MemoryStore>,
    metrics: Metrics,
    registry: Arc<Registry>,
    _dir: tempfile::TempDir,
}

fn fixture(config: impl FnOnce(&mut RegistryConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new());
    let metrics = Metrics::new();
    let store: DynStore = Arc::new(InstrumentedStore::new(memory.clone(), metrics.clone()));
    let mut registry_config =
        RegistryConfig::new("m1", "127.0.0.1:1", Duration::from_secs(2), None);
    config(&mut registry_config);
    let registry = Registry::new(
        registry_config,
        ActorContext::new(store, metrics.clone(), "m1".into(), dir.path().into()),
    );
    Fixture {
        memory,
        metrics,
        registry,
        _dir: dir,
    }
}

fn id(text: &str) -> TenantId {
    TenantId::parse(text).unwrap()
}

fn store_writes(metrics: &Metrics) -> u64 {
    let text = metrics.render();
    text.lines()
        .filter(|l| l.starts_with("tenantd_store_requests_total{"))
        .filter(|l| l.contains("op=\"put") || l.contains("op=\"delete"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn increment(registry: &Arc<Registry>, tenant: &TenantId) -> u64 {
    match registry.route(tenant, false).await {
        Route::Local(handle) => {
            handle
                .call(Op::Increment {
                    idempotency_key: None,
                })
                .await
                .unwrap()
                .count
        }
        other => panic!("expected to hold {tenant}, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_tenants_are_not_found_write_nothing_and_leave_no_slot() {
    let f = fixture(|_| {});
    for n in 0..50 {
        let tenant = id(&format!("nobody-{n}"));
        match f.registry.route(&tenant, n % 2 == 0).await {
            Route::NotFound(message) => {
                assert!(message.contains("does not exist"), "{message}");
                assert!(message.contains("tenantd tenants create"), "{message}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    assert!(tenant_keys(&f).is_empty(), "{:?}", tenant_keys(&f));
    assert_eq!(store_writes(&f.metrics), 0);
    assert_eq!(f.registry.known_tenants(), 0);
}

#[tokio::test]
async fn a_created_tenant_is_served_and_its_series_go_when_it_is_released() {
    let f = fixture(|_| {});
    let tenant = id("42");
    assert!(matches!(
        f.registry.route(&tenant, false).await,
        Route::NotFound(_)
    ));
    lifecycle::create(f.registry.store(), &tenant)
        .await
        .unwrap();
    f.registry.created(&tenant);
    assert_eq!(increment(&f.registry, &tenant).await, 1);
    assert!(f.metrics.render().contains("customer_id=\"42\""));
    assert_eq!(f.registry.status(false).len(), 1);
    f.registry.begin_delete(&tenant).await;
    // The actor released; its watcher forgets it under the contender lock.
    let mut tries = 0;
    while f.metrics.render().contains("customer_id=\"42\"") {
        tries += 1;
        assert!(tries < 200, "series still there: {}", f.metrics.render());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f.registry.status(false).is_empty(), "only held tenants");
    assert_eq!(f.registry.status(true).len(), 1, "all known tenants");
}

#[tokio::test]
async fn create_on_first_request_creates_in_pool_mode() {
    let f = fixture(|c| c.create_on_first_request = true);
    let tenant = id("demo");
    assert_eq!(increment(&f.registry, &tenant).await, 1);
    assert!(f.memory.keys().contains(&keys::database("demo")));
}

#[tokio::test]
async fn slots_of_tenants_not_held_are_pruned_to_the_bound() {
    let f = fixture(|c| {
        c.max_known_tenants = 20;
        c.max_tenants = 5;
    });
    for n in 0..60 {
        let tenant = id(&format!("t{n}"));
        lifecycle::create(f.registry.store(), &tenant)
            .await
            .unwrap();
        increment(&f.registry, &tenant).await;
        assert!(
            f.registry.known_tenants() <= 20,
            "{} known after {n}",
            f.registry.known_tenants()
        );
    }
    let held = f.registry.status(false).len();
    assert!((1..=5).contains(&held), "held {held}");
}

/// Keys of tenants (machine heartbeats are not a tenant's).
/// Tenant objects, but for the fences a delete keeps (docs/protocol.md,
/// "Tenant existence").
async fn left_after_delete(f: &Fixture) -> Vec<String> {
    f.registry
        .store()
        .list("customer/", None)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| !(keys::log_seq(&l.key).is_some() && log::is_fence_size(l.size)))
        .map(|l| l.key)
        .filter(|k| !k.ends_with("/deleted.json"))
        .collect()
}

fn tenant_keys(f: &Fixture) -> Vec<String> {
    f.memory
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("machines/"))
        .collect()
}

#[tokio::test]
async fn a_tenant_deleted_while_known_is_not_recreated() {
    let f = fixture(|_| {});
    let tenant = id("gone");
    lifecycle::create(f.registry.store(), &tenant)
        .await
        .unwrap();
    assert_eq!(increment(&f.registry, &tenant).await, 1);
    // Deleted through this machine: its actor stops first.
    let guard = f.registry.begin_delete(&tenant).await;
    assert!(matches!(
        f.registry.route(&tenant, false).await,
        Route::NotFound(_)
    ));
    let deleter = Deleter {
        lease: f.registry.lease_settings(),
        wait: Duration::from_secs(5),
    };
    let deleted = lifecycle::delete(f.registry.store(), &tenant, &deleter)
        .await
        .unwrap();
    assert_eq!(deleted, lifecycle::Deleted::Deleted);
    guard.deleted();
    drop(guard);
    let left = left_after_delete(&f).await;
    assert!(left.is_empty(), "{left:?}");
    let writes = store_writes(&f.metrics);
    for fresh in [false, true] {
        assert!(matches!(
            f.registry.route(&tenant, fresh).await,
            Route::NotFound(_)
        ));
    }
    let left = left_after_delete(&f).await;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(store_writes(&f.metrics), writes, "{}", f.metrics.render());
}

/// A single-tenant standby watching a tenant that is deleted: once the
/// deleter removed the lock, the standby finds it absent, and must not
/// claim (which would create a new, empty database: the deleted tenant
/// back) but check that the tenant still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_does_not_bring_a_deleted_tenant_back() {
    let tenant = id("solo");
    let ttl = Duration::from_millis(600);
    let f = fixture(|c| {
        c.customer_id = Some(tenant.clone());
        c.lease_ttl = ttl;
        c.lock_cache_ttl = ttl / 5;
    });
    lifecycle::create(f.registry.store(), &tenant)
        .await
        .unwrap();
    // Machine m0 holds the tenant; the standby m1 watches it.
    let m0 = Session::new(
        f.registry.store().clone(),
        LeaseConfig::new("m0", "m0:1", ttl),
    );
    let mut contender = Contender::new(
        f.registry.store().clone(),
        keys::lock(tenant.as_str()),
        m0.clone(),
    );
    let Acquire::Acquired(lease) = contender.try_acquire().await.unwrap() else {
        panic!("m0 must acquire");
    };
    let standby = tokio::spawn(f.registry.clone().standby(tenant.clone()));
    tokio::time::sleep(ttl).await;
    assert!(!f.registry.holds(&tenant), "m0 is alive");

    // m0 deletes the tenant (its actor stopped, its lease ended).
    drop(lease);
    let deleter = Deleter {
        lease: m0,
        wait: Duration::from_secs(5),
    };
    let deleted = lifecycle::delete(f.registry.store(), &tenant, &deleter)
        .await
        .unwrap();
    assert_eq!(deleted, lifecycle::Deleted::Deleted);
    tokio::time::sleep(ttl * 6).await;
    let left = tenant_keys(&f);
    standby.abort();
    assert!(!f.registry.holds(&tenant), "{left:?}");
    assert!(
        !left.contains(&keys::database(tenant.as_str())),
        "the deleted tenant is back: {left:?}"
    );
    assert!(
        !left.contains(&keys::lock(tenant.as_str())),
        "the standby wrote a lock for a deleted tenant: {left:?}"
    );
}

/// Deleted by someone else (the CLI) while this machine still knows
/// the tenant: the takeover finds no database under its new lease and
/// leaves nothing behind.
#[tokio::test]
async fn a_tenant_deleted_elsewhere_is_not_recreated_by_a_takeover() {
    let f = fixture(|_| {});
    let tenant = id("elsewhere");
    lifecycle::create(f.registry.store(), &tenant)
        .await
        .unwrap();
    assert_eq!(increment(&f.registry, &tenant).await, 1);
    drop(f.registry.begin_delete(&tenant).await);
    let deleter = Deleter {
        lease: Session::new(
            f.registry.store().clone(),
            LeaseConfig::new("tenantd-cli-test", "cli", Duration::from_secs(2)),
        ),
        wait: Duration::from_secs(5),
    };
    let deleted = lifecycle::delete(f.registry.store(), &tenant, &deleter)
        .await
        .unwrap();
    assert_eq!(deleted, lifecycle::Deleted::Deleted);
    assert!(matches!(
        f.registry.route(&tenant, false).await,
        Route::NotFound(_)
    ));
    let left = left_after_delete(&f).await;
    assert!(left.is_empty(), "{left:?}");
}

/// A delete that fenced and wrote its tombstone, then stalled before
/// removing the snapshot long enough to lose its lease: a machine that
/// takes the tenant over meanwhile must not serve it, or the writes it
/// acknowledged would go with the snapshot when the delete goes on.
#[tokio::test]
async fn a_takeover_during_a_stalled_delete_serves_nothing() {
    let f = fixture(|_| {});
    let tenant = id("doomed");
    let store = f.registry.store().clone();
    lifecycle::create(&store, &tenant).await.unwrap();
    let deleter = Session::new(
        store.clone(),
        LeaseConfig::new("tenantd-cli-test", "cli", Duration::from_secs(2)),
    );
    let mut contender = crate::lease::Contender::new(store.clone(), keys::lock("doomed"), deleter);
    let Acquire::Acquired(lease) = contender.try_acquire().await.unwrap() else {
        panic!("the deleter takes the lease");
    };
    let fences =
        crate::tenant::claim::fence_for_delete(&store, &tenant, &lease, "tenantd-cli-test")
            .await
            .unwrap();
    let log_end = fences
        .iter()
        .filter_map(|k| keys::log_seq(k))
        .max()
        .unwrap();
    lifecycle::write_tombstone(&store, &tenant, log_end)
        .await
        .unwrap();
    // The delete stalls here; its lease ends (the lock deleted by hand
    // stands for one gone stale: the next machine takes it at once).
    drop(lease);
    store.delete(&keys::lock("doomed")).await.unwrap();

    // The claim runs as the request arrives (first contact) or inside the
    // tenant's actor: either way the request is refused.
    let error = match f.registry.route(&tenant, false).await {
        Route::Unavailable(message) => message,
        Route::Local(handle) => handle
            .call(Op::Increment {
                idempotency_key: None,
            })
            .await
            .unwrap_err()
            .to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(
        error.contains("being deleted") && error.contains("tenantd tenants delete doomed"),
        "{error}"
    );
    let past_the_fences = store
        .list(&keys::log_prefix("doomed"), None)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| !log::is_fence_size(l.size))
        .count();
    assert_eq!(past_the_fences, 0, "nothing was committed");
}
