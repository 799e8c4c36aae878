//! `tenants delete` and `tenants create` of one tenant, again and again, by
//! an operator process of its own (its own store stack and session) while
//! the machines serve it and the nemeses run: the delete takes the lease
//! and fences like a takeover, the creation starts the new life's log after
//! what the delete left.
//!
//! Each life of the tenant is checked as a customer of its own
//! (`<tenant>#<life>`): clients stop sending to the tenant and wait for
//! what they sent to end before a delete, and start again once it exists
//! again, so every operation belongs to one life. A life's final count is
//! read from the store just before its delete (every answer it gave came
//! from an upload confirmed before that read), the last life's at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use super::{BASE_JITTER, BASE_LATENCY, TTL, World, stored};
use tenantd_chaos::history::NemesisEvent;
use tenantd_core::TenantId;
use tenantd_core::lease::{LeaseConfig, Session};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, FaultStore, MemoryStore, Precondition, RetryingStore, keys,
};
use tenantd_core::tenant::lifecycle::{self, Deleter};

/// Whether a tenant is deleted and created again during the run (pool
/// mode only: the operator's delete waits for the holder's idle release).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rebirth {
    #[default]
    Off,
    On,
    /// The negative control: the new life's database object starts its
    /// log at slot 0, ignoring the fences and the tombstone the delete
    /// left (as creation did before issue 26).
    FromSlotZero,
}

/// Where the reborn tenant is in its lives.
#[derive(Default)]
pub(super) struct Lives {
    life: u32,
    deleting: bool,
    in_flight: u32,
    /// Final counts of the lives before the current one.
    finals: BTreeMap<String, u64>,
    /// Lives whose stored state could not be read before their delete.
    violations: Vec<String>,
}

fn phoenix(world: &World) -> Option<&TenantId> {
    (world.paths.rebirth != Rebirth::Off && world.mode == super::Mode::Pool)
        .then(|| world.tenants.last())
        .flatten()
}

/// The customer an operation on `tenant` is checked as, and it counts as
/// in flight until [`end`]; `None` while the tenant is being deleted and
/// created again (the client sends nothing to it then).
pub(super) fn begin(world: &World, tenant: &TenantId) -> Option<String> {
    if phoenix(world) != Some(tenant) {
        return Some(tenant.to_string());
    }
    let mut lives = world.lives.lock().unwrap();
    if lives.deleting {
        return None;
    }
    lives.in_flight += 1;
    Some(format!("{tenant}#{}", lives.life))
}

pub(super) fn end(world: &World, tenant: &TenantId) {
    if phoenix(world) == Some(tenant) {
        world.lives.lock().unwrap().in_flight -= 1;
    }
}

/// The customer `tenant`'s operations are checked as now.
pub(super) fn label(world: &World, tenant: &TenantId) -> String {
    match phoenix(world) {
        Some(p) if p == tenant => format!("{tenant}#{}", world.lives.lock().unwrap().life),
        _ => tenant.to_string(),
    }
}

/// What the operator found wrong.
pub(super) fn violations(world: &World) -> Vec<String> {
    world.lives.lock().unwrap().violations.clone()
}

/// The final counts of the lives that ended.
pub(super) fn earlier_finals(world: &World) -> BTreeMap<String, u64> {
    world.lives.lock().unwrap().finals.clone()
}

/// The operator: every few seconds until `until`, deletes the tenant and
/// creates it again. Returns what it did, as nemeses.
pub(super) async fn operator(world: Arc<World>, seed: u64, until: Instant) -> Vec<NemesisEvent> {
    let Some(tenant) = phoenix(&world).cloned() else {
        return Vec::new();
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0be7_a70e);
    let fault = FaultStore::seeded(
        world.shared.clone() as DynStore,
        FaultConfig {
            latency: BASE_LATENCY,
            jitter: BASE_JITTER,
            error_rate: 0.05,
            ..FaultConfig::default()
        },
        seed ^ 0x0be7,
    );
    let store: DynStore = Arc::new(RetryingStore::new(Arc::new(fault), RetryPolicy::default()));
    let session = Session::new(
        store.clone(),
        LeaseConfig::new("operator", "operator:3000", TTL),
    );
    let deleter = Deleter {
        lease: session,
        wait: 5 * TTL,
    };
    let mut events = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..5_000))).await;
        if Instant::now() >= until {
            return events;
        }
        world.lives.lock().unwrap().deleting = true;
        while world.lives.lock().unwrap().in_flight > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start_ms = world.now_ms();
        let count = match stored(&world, tenant.as_str()).await {
            Ok((count, _, _)) => count,
            Err(e) => {
                world.lives.lock().unwrap().violations.push(e);
                0
            }
        };
        // Until it is done: a delete that fails midway leaves a tenant
        // that does not exist, which only finishing it repairs.
        while let Err(e) = lifecycle::delete(&store, &tenant, &deleter).await {
            tracing::info!(customer_id = %tenant, error = %e, "the operator's delete failed; again");
            tokio::time::sleep(TTL).await;
        }
        match world.paths.rebirth {
            Rebirth::FromSlotZero => create_from_slot_zero(&store, &tenant).await,
            _ => {
                while let Err(e) = lifecycle::create(&store, &tenant).await {
                    tracing::info!(customer_id = %tenant, error = %e, "the operator's create failed; again");
                    tokio::time::sleep(TTL).await;
                }
            }
        }
        let mut lives = world.lives.lock().unwrap();
        let ended = format!("{tenant}#{}", lives.life);
        lives.finals.insert(ended, count);
        lives.life += 1;
        lives.deleting = false;
        drop(lives);
        events.push(NemesisEvent {
            kind: "delete-and-create".into(),
            customer: Some(tenant.to_string()),
            machine: None,
            start_ms,
            end_ms: world.now_ms(),
        });
    }
}

/// The negative control's creation: a new database whose log starts at
/// slot 0, whatever the delete left.
async fn create_from_slot_zero(store: &DynStore, tenant: &TenantId) {
    let scratch: DynStore = Arc::new(MemoryStore::new());
    lifecycle::create(&scratch, tenant)
        .await
        .expect("creating in a memory store");
    let key = keys::database(tenant.as_str());
    let new = scratch
        .get(&key)
        .await
        .expect("memory store")
        .expect("just created");
    let body: Bytes = new.body;
    while let Err(e) = store
        .put(
            &key,
            body.clone(),
            new.metadata.clone(),
            Precondition::IfAbsent,
        )
        .await
    {
        if e.is_precondition() {
            return;
        }
        tokio::time::sleep(TTL).await;
    }
}
