//! `tenants delete` and `tenants create` of one tenant, again and again, by
//! an operator process of its own (its own store stack and session) while
//! the machines serve it and the nemeses run: the delete takes the lease
//! and fences like a takeover, the creation starts the new life's log after
//! what the delete left. A life begins as `tenants create` makes it (an
//! empty database), as `--from-file` imports one, or as `--from` forks
//! another tenant (its count then starts at the fork's: counts of the life
//! are checked relative to it).
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
use tenantd_chaos::history::{NemesisEvent, Outcome};
use tenantd_core::TenantId;
use tenantd_core::lease::{LeaseConfig, Session};
use tenantd_core::store::hooked::{Hooked, Hooks, Op};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, FaultStore, MemoryStore, Precondition, RetryingStore, StoreError,
    StoreResult, keys,
};
use tenantd_core::tenant::db::Db;
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
    /// The negative control of a delete stalled past its lease: every
    /// delete stalls, and once it goes on, what it lists is removed as
    /// the delete did before (everything but its fences, its tombstone and
    /// the lock), the new life's objects with it.
    UnboundedAfterStall,
}

/// Where the reborn tenant is in its lives.
#[derive(Default)]
pub(super) struct Lives {
    life: u32,
    /// The count the current life began with (a fork's).
    base: u64,
    deleting: bool,
    in_flight: u32,
    /// Final counts of the lives before the current one.
    finals: BTreeMap<String, u64>,
    /// Lives whose stored state could not be read before their delete or
    /// restore.
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
pub(super) fn begin(world: &World, tenant: &TenantId) -> Option<Customer> {
    if phoenix(world) != Some(tenant) {
        return Some(Customer::plain(tenant));
    }
    let mut lives = world.lives.lock().unwrap();
    if lives.deleting {
        return None;
    }
    lives.in_flight += 1;
    Some(lives.current(tenant))
}

impl Lives {
    /// The current life of the reborn `tenant`.
    fn current(&self, tenant: &TenantId) -> Customer {
        Customer {
            label: format!("{tenant}#{}", self.life),
            base: self.base,
        }
    }
}

/// What an operation is checked as.
pub(super) struct Customer {
    pub label: String,
    /// Subtracted from the counts it was answered with.
    pub base: u64,
}

impl Customer {
    /// A tenant that lives once.
    fn plain(tenant: &TenantId) -> Customer {
        Customer {
            label: tenant.to_string(),
            base: 0,
        }
    }

    pub fn relative(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Ok {
                count,
                epoch,
                machine,
            } => Outcome::Ok {
                count: count.saturating_sub(self.base),
                epoch,
                machine,
            },
            other => other,
        }
    }
}

pub(super) fn end(world: &World, tenant: &TenantId) {
    if phoenix(world) == Some(tenant) {
        world.lives.lock().unwrap().in_flight -= 1;
    }
}

/// The customer `tenant`'s operations are checked as now.
pub(super) fn now(world: &World, tenant: &TenantId) -> Customer {
    match phoenix(world) {
        Some(p) if p == tenant => world.lives.lock().unwrap().current(tenant),
        _ => Customer::plain(tenant),
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
        let count = stored_count(&world, &tenant).await;
        let restore = world.paths.rebirth == Rebirth::On && rng.random_range(0..4) == 0;
        if restore {
            let base = restore_in_place(&store, &world, &tenant).await;
            tracing::info!(customer_id = %tenant, from = count, to = base, "the operator restored the tenant in place");
            next_life(&world, &tenant, count, base);
            events.push(NemesisEvent {
                kind: "restore-in-place".into(),
                customer: Some(tenant.to_string()),
                machine: None,
                start_ms,
                end_ms: world.now_ms(),
            });
            continue;
        }
        // Some deletes stall (a paused process, a store that does not
        // answer) once the snapshot is gone, past their lease: the next
        // life begins and is served meanwhile, and the delete goes on.
        let stall = match world.paths.rebirth {
            Rebirth::UnboundedAfterStall => true,
            Rebirth::On => rng.random_range(0..3) == 0,
            _ => false,
        };
        let stalling = Arc::new(Stalling::new(
            store.clone(),
            &tenant,
            stall,
            world.paths.rebirth == Rebirth::UnboundedAfterStall,
        ));
        let deleting = tokio::spawn({
            let store: DynStore = Arc::new(Hooked::new(store.clone(), stalling.clone()));
            let (tenant, deleter) = (tenant.clone(), deleter.clone());
            let stalling = stalling.clone();
            async move {
                // Until it is done: a delete that fails midway leaves a
                // tenant that does not exist, which only finishing it
                // repairs. Not after a stall: the tenant lives again.
                while let Err(e) = lifecycle::delete(&store, &tenant, &deleter).await {
                    if stalling.went_on() {
                        tracing::info!(customer_id = %tenant, error = %e, "the operator's stalled delete failed after the stall; the tenant lives again");
                        return;
                    }
                    tracing::info!(customer_id = %tenant, error = %e, "the operator's delete failed; again");
                    tokio::time::sleep(TTL).await;
                }
            }
        });
        let mut deleting = Some(deleting);
        if stall {
            while !stalling.stalled() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else if let Some(done) = deleting.take() {
            done.await.expect("the delete task");
        }
        let (kind, base) = match world.paths.rebirth {
            Rebirth::FromSlotZero => {
                create_from_slot_zero(&store, &tenant).await;
                ("delete-and-create", 0)
            }
            _ => match rng.random_range(0..3) {
                0 => {
                    while let Err(e) = lifecycle::create(&store, &tenant).await {
                        tracing::info!(customer_id = %tenant, error = %e, "the operator's create failed; again");
                        tokio::time::sleep(TTL).await;
                    }
                    ("delete-and-create", 0)
                }
                1 => (
                    "delete-and-import",
                    import(&store, &world, &tenant, None).await,
                ),
                _ => {
                    let source = world.tenants[0].clone();
                    let base = import(&store, &world, &tenant, Some(&source)).await;
                    ("delete-and-fork", base)
                }
            },
        };
        next_life(&world, &tenant, count, base);
        let kind = match deleting {
            Some(deleting) => {
                // The new life is served (its lock taken over once the
                // delete's session is lost) before the delete goes on.
                tokio::time::sleep(3 * TTL).await;
                stalling.go_on();
                deleting.await.expect("the delete task");
                format!("stalled-{kind}")
            }
            None => kind.to_string(),
        };
        events.push(NemesisEvent {
            kind,
            customer: Some(tenant.to_string()),
            machine: None,
            start_ms,
            end_ms: world.now_ms(),
        });
    }
}

/// Ends the current life at `count` (as stored) and begins the next at
/// `base`; clients may send again.
fn next_life(world: &World, tenant: &TenantId, count: u64, base: u64) {
    let mut lives = world.lives.lock().unwrap();
    let ended = lives.current(tenant);
    lives
        .finals
        .insert(ended.label, count.saturating_sub(ended.base));
    lives.life += 1;
    lives.base = base;
    lives.deleting = false;
}

/// `tenantd restore --in-place --at <slot> --yes` to the state its snapshot
/// holds (the oldest one every retention keeps), which rolls back the
/// commits after it: the restore takes the lease and the tenant over
/// through the claim's code, appends the difference as the next slot and
/// releases. Returns the count the tenant has after it (the next life
/// begins there).
async fn restore_in_place(store: &DynStore, world: &World, tenant: &TenantId) -> u64 {
    for _ in 0..5 {
        let seq = match store.head(&keys::database(tenant.as_str())).await {
            Ok(Some(meta)) => meta
                .metadata
                .get(tenantd_core::tenant::log::SEQ_KEY)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => {
                tokio::time::sleep(TTL).await;
                continue;
            }
        };
        let until = tenantd_core::tenant::log::Until::Seq(seq);
        match tenantd_core::restore::in_place(store, tenant, until, true, 5 * TTL, TTL).await {
            Ok(()) => break,
            Err(e) => {
                tracing::info!(customer_id = %tenant, error = %e, "the operator's restore failed; again");
                tokio::time::sleep(TTL).await;
            }
        }
    }
    stored_count(world, tenant).await
}

/// The tenant's count as stored; a log that does not replay is recorded
/// as a violation (and counts 0).
async fn stored_count(world: &World, tenant: &TenantId) -> u64 {
    match stored(world, tenant.as_str()).await {
        Ok((count, _, _)) => count,
        Err(e) => {
            world.lives.lock().unwrap().violations.push(e);
            0
        }
    }
}

/// `tenants create --from-file` of an empty database, or `--from <source>`
/// (a fork of its whole log): the file made and checked as the CLI makes
/// it, then `lifecycle::create_from_file`. Returns the count the new life
/// begins with.
async fn import(
    store: &DynStore,
    world: &World,
    tenant: &TenantId,
    source: Option<&TenantId>,
) -> u64 {
    let dir = world.data_dir.join(format!("import-{}", world.now_ms()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let file = dir.join("source.sqlite3");
    let base = match source {
        Some(source) => loop {
            match tenantd_core::restore::materialize_retrying(
                store,
                source.as_str(),
                &file,
                tenantd_core::tenant::log::Until::End,
            )
            .await
            {
                Ok(_) => {
                    let db = Db::open(&file).expect("the fork opens");
                    break db.count().expect("the fork has a count");
                }
                Err(e) => {
                    tracing::info!(customer_id = %source, error = %e, "the operator's fork could not read its source; again");
                    tokio::time::sleep(TTL).await;
                }
            }
        },
        None => {
            let scratch: DynStore = Arc::new(MemoryStore::new());
            lifecycle::create(&scratch, tenant)
                .await
                .expect("creating in a memory store");
            let empty = scratch
                .get(&keys::database(tenant.as_str()))
                .await
                .expect("memory store")
                .expect("just created");
            std::fs::write(&file, &empty.body).expect("writing the file to import");
            0
        }
    };
    let (ready, version) = tenantd_core::tenant::migrations::import::prepare(&file, &dir, u64::MAX)
        .expect("the file to import is a sound database");
    loop {
        match lifecycle::create_from_file(store, tenant, &ready, version).await {
            Ok(()) => break,
            // An earlier attempt of this one landed after all.
            Err(e) if e.to_string().contains("exists already") => break,
            Err(e) => {
                tracing::info!(customer_id = %tenant, error = %e, "the operator's import failed; again");
                tokio::time::sleep(TTL).await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    base
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

/// Hooks of the operator's store for one delete. Stalled, they hold the
/// delete's listing of the tenant after the snapshot is gone, and fail the
/// operator's heartbeat meanwhile (its session, and with it the delete's
/// lease, is lost), until [`Stalling::go_on`]; the listing then shows the
/// next life.
#[derive(Debug)]
struct Stalling {
    inner: DynStore,
    tenant: TenantId,
    armed: bool,
    /// The control: remove what the listing shows as the delete did before.
    unbounded: bool,
    stalled: std::sync::atomic::AtomicBool,
    went_on: std::sync::atomic::AtomicBool,
    go: tokio::sync::Notify,
}

impl Stalling {
    fn new(inner: DynStore, tenant: &TenantId, armed: bool, unbounded: bool) -> Stalling {
        Stalling {
            inner,
            tenant: tenant.clone(),
            armed,
            unbounded,
            stalled: Default::default(),
            went_on: Default::default(),
            go: tokio::sync::Notify::new(),
        }
    }

    fn stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn went_on(&self) -> bool {
        self.went_on.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn go_on(&self) {
        self.went_on
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.go.notify_one();
    }

    /// The delete before the fix: everything under `prefix` but the lock,
    /// the tombstone and the window of fences the tombstone ends.
    async fn remove_unbounded(&self, prefix: &str) -> StoreResult<()> {
        let id = self.tenant.as_str();
        let listed = self.inner.list(prefix, None).await?;
        let end = match self.inner.get(&keys::tombstone(id)).await? {
            Some(t) => serde_json::from_slice::<serde_json::Value>(&t.body)
                .ok()
                .and_then(|v| v["log_end"].as_u64())
                .unwrap_or(0),
            None => 0,
        };
        for l in &listed {
            let fence = keys::log_seq(&l.key).is_some_and(|s| s + 4 > end && s <= end);
            if l.key != keys::lock(id) && l.key != keys::tombstone(id) && !fence {
                self.inner.delete(&l.key).await?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Hooks for Stalling {
    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        let id = self.tenant.as_str();
        match op {
            Op::Put if self.stalled() && !self.went_on() && key == keys::heartbeat("operator") => {
                Err(StoreError::transient(key, "the operator is stalled"))
            }
            Op::List
                if self.armed
                    && !self.stalled()
                    && key == keys::tenant_prefix(id)
                    && self.inner.head(&keys::database(id)).await?.is_none()
                    && self.inner.head(&keys::tombstone(id)).await?.is_some() =>
            {
                self.stalled
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.go.notified().await;
                if self.unbounded {
                    self.remove_unbounded(key).await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
