//! Which tenants this machine holds, and how a request for a tenant is
//! routed: to the local actor, to the holder named by the lock, or into a
//! takeover when there is no live holder.
//!
//! Invariants:
//! - At most one actor per tenant on this machine; acquisition of a tenant
//!   is serialised by the tenant's slot mutex.
//! - An actor exists only while its lease does; it drops its working copy
//!   when it ends.
//! - A tenant this machine is not configured for is never acquired (no
//!   database is ever created for a tenant that has no machine).
//! - A tenant that does not exist (no database object, see
//!   [`super::lifecycle`]) is answered [`Route::NotFound`] before any lease
//!   is contended for: requests for unknown ids write nothing to the store
//!   and leave no slot behind. Served tenants get a slot only once they are
//!   known to exist.
//! - State is bounded: slots of tenants not held are pruned, least recently
//!   used first, beyond `max_known_tenants`; negative existence answers are
//!   kept briefly in a bounded cache.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::actor::{ActorContext, TenantActor};
use super::lifecycle::{self, Created};
use super::{TenantError, TenantHandle};
use crate::TenantId;
use crate::lease::{
    Acquire, Beat, Contender, LeaseConfig, LockRecord, LockState, Session, read_lock,
};
use crate::store::{DynStore, keys};

/// A standby reads the lock itself at least once every this many polls,
/// even while the holder's heartbeat vouches for it.
const LOCK_REREAD_TICKS: u32 = 30;

/// Where a request for a tenant goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// This machine holds the tenant.
    Local(TenantHandle),
    /// Another machine holds it (or held it last, if released).
    Holder(LockRecord),
    /// No holder is known; any other machine of the tenant may take it.
    Elsewhere,
    /// A tenant this machine does not serve, with no live holder in its
    /// lock: find one of its machines through DNS, else the last holder.
    Lookup {
        last_holder: Option<LockRecord>,
    },
    /// The tenant does not exist (or is being deleted here).
    NotFound(String),
    Unavailable(String),
    Corrupt(String),
}

/// How long a "does not exist" answer is reused: short, so that a tenant
/// created elsewhere is served within a second.
const ABSENT_TTL: Duration = Duration::from_secs(1);

/// How long a "does exist" answer is trusted before a takeover checks
/// again (a tenant deleted through another machine).
const EXISTS_TTL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub machine_id: String,
    pub advertise: String,
    pub lease_ttl: Duration,
    /// `Some(id)`: this machine serves that one tenant; `None`: pool mode.
    pub customer_id: Option<TenantId>,
    pub max_tenants: usize,
    /// How long a lock read is reused for routing decisions.
    pub lock_cache_ttl: Duration,
    /// Most tenants remembered (slots); those not held are pruned beyond
    /// it, least recently used first.
    pub max_known_tenants: usize,
    /// Pool mode: create a tenant that does not exist on its first valid
    /// request (for demos) instead of answering 404.
    pub create_on_first_request: bool,
}

impl RegistryConfig {
    /// A configuration with the defaults of `tenantd serve` for the rest.
    pub fn new(
        machine_id: impl Into<String>,
        advertise: impl Into<String>,
        lease_ttl: Duration,
        customer_id: Option<TenantId>,
    ) -> RegistryConfig {
        RegistryConfig {
            machine_id: machine_id.into(),
            advertise: advertise.into(),
            lease_ttl,
            customer_id,
            max_tenants: 2_000,
            lock_cache_ttl: (lease_ttl / 5).min(Duration::from_secs(1)),
            max_known_tenants: 10_000,
            create_on_first_request: false,
        }
    }
}

/// One tenant as seen from this machine.
struct Slot {
    lock_key: String,
    /// Serialises acquisition; holds the contender's observation memory.
    contender: tokio::sync::Mutex<Contender>,
    state: Mutex<SlotState>,
}

/// A lock as last seen, without its ETag (routing does not need it).
#[derive(Clone, Debug)]
enum Seen {
    Absent,
    Held(LockRecord),
    Released(LockRecord),
    Unparsable,
}

impl From<LockState> for Seen {
    fn from(state: LockState) -> Seen {
        match state {
            LockState::Absent => Seen::Absent,
            LockState::Held { record, .. } => Seen::Held(record),
            LockState::Released { record, .. } => Seen::Released(record),
            LockState::Unparsable { .. } => Seen::Unparsable,
        }
    }
}

struct SlotState {
    handle: Option<TenantHandle>,
    last_used: Option<Instant>,
    /// Last time a request or the standby loop asked for this slot.
    touched: Instant,
    /// When the tenant was last seen to exist.
    exists_at: Instant,
    /// Last lock read (for routing without a store round trip).
    seen: Option<(Instant, Seen)>,
    /// A database that failed to open, with when we saw it (answered fast).
    corrupt: Option<(Instant, String)>,
}

/// Status of one tenant, for `/_status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TenantStatus {
    pub customer_id: String,
    pub role: &'static str,
    pub epoch: u64,
    pub holder: Option<String>,
}

pub struct Registry {
    config: RegistryConfig,
    actor: ActorContext,
    store: DynStore,
    /// This process's heartbeat, and its cache of other machines'.
    session: Session,
    slots: Mutex<HashMap<TenantId, Arc<Slot>>>,
    /// Tenants recently found not to exist, with when.
    absent: Mutex<lru::LruCache<TenantId, Instant>>,
    /// Tenants being deleted through this machine: answered 404.
    deleting: Mutex<HashSet<TenantId>>,
    draining: CancellationToken,
}

impl Registry {
    pub fn new(config: RegistryConfig, actor: ActorContext) -> Arc<Registry> {
        let session = Session::with_metrics(
            actor.store.clone(),
            LeaseConfig::new(
                config.machine_id.clone(),
                config.advertise.clone(),
                config.lease_ttl,
            ),
            Some(actor.metrics.clone()),
        );
        Arc::new(Registry {
            store: actor.store.clone(),
            session,
            actor,
            slots: Mutex::new(HashMap::new()),
            absent: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(config.max_known_tenants.max(1)).expect("at least 1"),
            )),
            deleting: Mutex::new(HashSet::new()),
            config,
            draining: CancellationToken::new(),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    fn is_held(slot: &Slot) -> bool {
        slot.state
            .lock()
            .unwrap()
            .handle
            .as_ref()
            .is_some_and(|h| h.is_alive())
    }

    /// May this machine hold `id`?
    pub fn serves(&self, id: &TenantId) -> bool {
        self.config.customer_id.as_ref().is_none_or(|own| own == id)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// This machine's session (one heartbeat for every tenant it holds).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The tenant's slot, made if new (pruning others beyond the bound).
    fn slot(&self, id: &TenantId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(id) {
            slot.state.lock().unwrap().touched = Instant::now();
            return slot.clone();
        }
        if slots.len() >= self.config.max_known_tenants {
            self.prune(&mut slots);
        }
        let now = Instant::now();
        let slot = Arc::new(Slot {
            lock_key: keys::lock(id.as_str()),
            contender: tokio::sync::Mutex::new(Contender::new(
                self.store.clone(),
                keys::lock(id.as_str()),
                self.session.clone(),
            )),
            state: Mutex::new(SlotState {
                handle: None,
                last_used: None,
                touched: now,
                exists_at: now,
                seen: None,
                corrupt: None,
            }),
        });
        slots.insert(id.clone(), slot.clone());
        slot
    }

    /// The slot of a tenant this machine already knows.
    fn known_slot(&self, id: &TenantId) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().unwrap();
        let slot = slots.get(id)?.clone();
        slot.state.lock().unwrap().touched = Instant::now();
        Some(slot)
    }

    /// Forgets slots of tenants not held here and not in use by any task,
    /// least recently used first, down to 90% of the bound (so that the
    /// scan is paid once per many new tenants, not once per tenant). The
    /// configured tenant of a single-tenant machine is never forgotten:
    /// its slot carries the standby's observation of the lock.
    fn prune(&self, slots: &mut HashMap<TenantId, Arc<Slot>>) {
        let target = self.config.max_known_tenants * 9 / 10;
        let mut idle: Vec<(Instant, TenantId)> = slots
            .iter()
            .filter(|(id, slot)| {
                Arc::strong_count(slot) == 1 && self.config.customer_id.as_ref() != Some(*id)
            })
            .filter_map(|(id, slot)| {
                let state = slot.state.lock().unwrap();
                state.handle.is_none().then(|| (state.touched, id.clone()))
            })
            .collect();
        let excess = (slots.len() + 1).saturating_sub(target).min(idle.len());
        if excess == 0 {
            return;
        }
        idle.select_nth_unstable_by_key(excess - 1, |(at, _)| *at);
        for (_, id) in idle.iter().take(excess) {
            slots.remove(id);
        }
        debug!(
            pruned = excess,
            known = slots.len(),
            "forgot tenants not held here"
        );
    }

    /// How many tenants this machine remembers (held or not).
    pub fn known_tenants(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Whether the tenant exists, from the bounded caches or the store.
    /// `None`: it does not (and `create_on_first_request` is off). A slot
    /// is made only for a tenant that exists.
    async fn existing_slot(&self, id: &TenantId) -> Result<Option<Arc<Slot>>, String> {
        if self.deleting.lock().unwrap().contains(id) {
            return Ok(None);
        }
        if let Some(slot) = self.known_slot(id) {
            return Ok(Some(slot));
        }
        if self.exists_uncached(id).await? {
            return Ok(Some(self.slot(id)));
        }
        if self.config.create_on_first_request && self.config.customer_id.is_none() {
            match lifecycle::create(&self.store, id).await {
                Ok(Created::Created) => {
                    info!(customer_id = %id, "created on its first request (--create-on-first-request)")
                }
                Ok(Created::Exists) => {}
                Err(e) => return Err(format!("{e:#}")),
            }
            self.absent.lock().unwrap().pop(id);
            return Ok(Some(self.slot(id)));
        }
        Ok(None)
    }

    /// Whether a tenant this machine holds no slot for exists: a recent
    /// "no" is reused, anything else asks the store.
    async fn exists_uncached(&self, id: &TenantId) -> Result<bool, String> {
        if self.recently_absent(id) {
            return Ok(false);
        }
        let exists = lifecycle::tenant_exists(&self.store, id)
            .await
            .map_err(|e| format!("customer {id}: cannot tell whether it exists: {e}"))?;
        if !exists {
            self.absent.lock().unwrap().put(id.clone(), Instant::now());
        }
        Ok(exists)
    }

    /// Checks again, before a takeover, that a tenant known for a while
    /// still exists (it may have been deleted through another machine).
    async fn still_exists(&self, id: &TenantId, slot: &Slot) -> Result<bool, String> {
        if slot.state.lock().unwrap().exists_at.elapsed() < EXISTS_TTL {
            return Ok(true);
        }
        let exists = lifecycle::tenant_exists(&self.store, id)
            .await
            .map_err(|e| format!("customer {id}: cannot tell whether it exists: {e}"))?;
        if exists {
            slot.state.lock().unwrap().exists_at = Instant::now();
        }
        Ok(exists)
    }

    fn recently_absent(&self, id: &TenantId) -> bool {
        self.absent
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|at| at.elapsed() < ABSENT_TTL)
    }

    /// Forgets a tenant that turned out not to exist.
    fn forget_absent(&self, id: &TenantId) {
        self.forget(id);
        self.absent.lock().unwrap().put(id.clone(), Instant::now());
    }

    /// Drops the slot of a tenant not held here.
    fn forget(&self, id: &TenantId) {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(id)
            && slot.state.lock().unwrap().handle.is_none()
        {
            slots.remove(id);
        }
    }

    /// A tenant was just created through this machine: serve it at once.
    pub fn created(&self, id: &TenantId) {
        self.absent.lock().unwrap().pop(id);
    }

    fn live_handle(slot: &Slot) -> Option<TenantHandle> {
        let mut state = slot.state.lock().unwrap();
        match state.handle.clone() {
            Some(h) if h.is_alive() => {
                state.last_used = Some(Instant::now());
                Some(h)
            }
            _ => None,
        }
    }

    /// Waits (at most one ttl) for this machine's last actor of the tenant
    /// to finish ending: settling its uploads, releasing or dropping its
    /// lease. Until then its lock is still this process's live lease, and a
    /// request would be routed to this very machine.
    async fn await_ended(&self, slot: &Slot) {
        let ending = {
            let state = slot.state.lock().unwrap();
            state.handle.clone().filter(|h| !h.is_alive())
        };
        if let Some(handle) = ending {
            let _ = tokio::time::timeout(self.config.lease_ttl, handle.ended()).await;
        }
    }

    /// Routes a request for `id`. `fresh` skips cached lock reads (the
    /// sender's view was stale).
    pub async fn route(self: &Arc<Self>, id: &TenantId, fresh: bool) -> Route {
        if !self.serves(id) {
            return self.route_other(id, fresh).await;
        }
        let slot = match self.existing_slot(id).await {
            Ok(Some(slot)) => slot,
            Ok(None) => return Route::NotFound(lifecycle::not_found_message(id)),
            Err(e) => return Route::Unavailable(e),
        };
        if let Some(handle) = Self::live_handle(&slot) {
            return Route::Local(handle);
        }
        if let Some(route) = self.cached_route(&slot, fresh) {
            return route;
        }
        if self.is_draining() {
            // Our own actor may still be committing and releasing: wait for
            // it, so that the lock names the next holder or none.
            self.await_ended(&slot).await;
            return match self.read_lock_cached(&slot, true).await {
                Ok(Seen::Held(record)) if record.holder != self.config.machine_id => {
                    Route::Holder(record)
                }
                Ok(_) => Route::Elsewhere,
                Err(e) => Route::Unavailable(e),
            };
        }
        let mut contender = slot.contender.lock().await;
        // Someone may have acquired while we waited for the mutex.
        if let Some(handle) = Self::live_handle(&slot) {
            return Route::Local(handle);
        }
        if self.deleting.lock().unwrap().contains(id) {
            return Route::NotFound(lifecycle::not_found_message(id));
        }
        self.await_ended(&slot).await;
        if let Some(route) = self.cached_route(&slot, fresh) {
            return route;
        }
        match self.still_exists(id, &slot).await {
            Ok(true) => {}
            Ok(false) => {
                drop(contender);
                self.forget_absent(id);
                return Route::NotFound(lifecycle::not_found_message(id));
            }
            Err(e) => return Route::Unavailable(e),
        }
        // A holder that looks dead by its own timestamps is probably gone:
        // hold the request for up to one ttl while the stale rule runs out,
        // rather than sending it to a machine that will not answer.
        let patience = Instant::now() + self.config.lease_ttl + Duration::from_millis(500);
        loop {
            // A store that does not answer must not hold a request for the
            // retrying layer's whole budget: give up after one ttl.
            let attempt = tokio::time::timeout(self.config.lease_ttl, contender.try_acquire())
                .await
                .unwrap_or_else(|_| {
                    Err(crate::store::StoreError::transient(
                        &slot.lock_key,
                        "no answer within one lease ttl",
                    ))
                });
            match attempt {
                Ok(Acquire::Acquired(lease)) => {
                    let lease = match self.exists_under(id, &slot, lease).await {
                        Ok(lease) => lease,
                        Err(route) => {
                            drop(contender);
                            if matches!(route, Route::NotFound(_)) {
                                self.forget_absent(id);
                            }
                            return route;
                        }
                    };
                    // Keep the contender locked until the actor runs: no
                    // other path of this machine may acquire meanwhile.
                    let route = self.start_actor(id, &slot, lease).await;
                    drop(contender);
                    return route;
                }
                Ok(Acquire::HeldBy { record, stale_in }) => {
                    if !self.looks_live(&record) && Instant::now() + stale_in <= patience {
                        tokio::time::sleep(stale_in.max(Duration::from_millis(50))).await;
                        continue;
                    }
                    slot.state.lock().unwrap().seen =
                        Some((Instant::now(), Seen::Held(record.clone())));
                    return Route::Holder(record);
                }
                Ok(Acquire::Unknown { stale_in }) => {
                    if Instant::now() + stale_in <= patience {
                        tokio::time::sleep(stale_in.max(Duration::from_millis(50))).await;
                        continue;
                    }
                    return Route::Unavailable(format!(
                        "customer {id}: the lock object {} cannot be parsed; it is treated as held and can be taken over in {stale_in:?}",
                        keys::lock(id.as_str())
                    ));
                }
                Err(e) => {
                    // Cut off from the store: the holder we saw last is the
                    // best guess, and it may well still reach the store.
                    let last = match &slot.state.lock().unwrap().seen {
                        Some((_, Seen::Held(record)))
                            if record.holder != self.config.machine_id =>
                        {
                            Some(record.clone())
                        }
                        _ => None,
                    };
                    if let Some(record) = last {
                        warn!(customer_id = %id, error = %e, holder = %record.holder, "cannot read the lock; handing the request to the last known holder");
                        return Route::Holder(record);
                    }
                    return Route::Unavailable(format!("customer {id}: cannot read the lock: {e}"));
                }
            }
        }
    }

    /// Whether the tenant still exists, checked under a lease just acquired.
    /// A deleter holds the lease while it deletes and removes the lock
    /// last, so only a lock found absent can follow a deletion, and this
    /// check under our lease is final: a deleted tenant is taken nothing
    /// of, and its new lock is removed again.
    async fn exists_under(
        &self,
        id: &TenantId,
        slot: &Slot,
        lease: crate::lease::Lease,
    ) -> Result<crate::lease::Lease, Route> {
        let check = if lease.previous().is_none() {
            lifecycle::tenant_exists(&self.store, id).await
        } else {
            Ok(true)
        };
        match check {
            Ok(true) => {
                slot.state.lock().unwrap().exists_at = Instant::now();
                Ok(lease)
            }
            Ok(false) => {
                drop(lease);
                if let Err(e) = self.store.delete(&slot.lock_key).await {
                    warn!(customer_id = %id, error = %e, "could not remove the lock of a tenant deleted meanwhile");
                }
                Err(Route::NotFound(lifecycle::not_found_message(id)))
            }
            Err(e) => {
                let _ = lease.release().await;
                Err(Route::Unavailable(format!(
                    "customer {id}: cannot tell whether it exists: {e}"
                )))
            }
        }
    }

    /// A lock not released whose holder wrote recently by its own clock:
    /// the lock itself, or for a session lock the holder's heartbeat as
    /// last seen here (a holder whose heartbeat was not looked at yet gets
    /// the benefit of the doubt).
    fn looks_live(&self, record: &LockRecord) -> bool {
        if record.released {
            return false;
        }
        let ttl = Duration::from_millis(record.ttl_ms);
        let recent = |at: chrono::DateTime<chrono::Utc>| {
            chrono::Utc::now()
                .signed_duration_since(at)
                .to_std()
                .map(|age| age < ttl)
                .unwrap_or(true)
        };
        if !record.session {
            return recent(record.renewed_at);
        }
        match self.session.observer().peek(&record.holder) {
            None => true,
            Some(seen) => match &seen.beat {
                Beat::Live(beat) if Some(beat.incarnation) == record.incarnation => {
                    seen.unchanged_for() < ttl && recent(beat.renewed_at)
                }
                _ => false,
            },
        }
    }

    fn cached_route(&self, slot: &Slot, fresh: bool) -> Option<Route> {
        let state = slot.state.lock().unwrap();
        if let Some((at, reason)) = &state.corrupt
            && at.elapsed() < Duration::from_secs(5)
        {
            return Some(Route::Corrupt(reason.clone()));
        }
        if fresh {
            return None;
        }
        match &state.seen {
            Some((at, Seen::Held(record)))
                if at.elapsed() < self.config.lock_cache_ttl
                    && record.holder != self.config.machine_id
                    && self.looks_live(record) =>
            {
                Some(Route::Holder(record.clone()))
            }
            _ => None,
        }
    }

    async fn start_actor(
        self: &Arc<Self>,
        id: &TenantId,
        slot: &Arc<Slot>,
        lease: crate::lease::Lease,
    ) -> Route {
        self.make_room(id);
        let mut ctx = self.actor.clone();
        if self.config.customer_id.is_some() {
            ctx.idle_timeout = None;
        }
        match TenantActor::start(id.clone(), ctx, lease).await {
            Ok((handle, task)) => {
                {
                    let mut state = slot.state.lock().unwrap();
                    state.handle = Some(handle.clone());
                    state.last_used = Some(Instant::now());
                    state.seen = None;
                    state.corrupt = None;
                }
                if self.is_draining() {
                    // Acquired while shutdown began: hand it straight back.
                    handle.stop();
                }
                let (id, slot, metrics) = (id.clone(), slot.clone(), self.actor.metrics.clone());
                tokio::spawn(async move {
                    if let Ok(exit) = task.await {
                        debug!(customer_id = %id, ?exit, "tenant actor ended");
                    }
                    // Under the contender lock, so that no new actor of the
                    // tenant is being started: its series stay.
                    let _contender = slot.contender.lock().await;
                    Self::clear_ended(&metrics, &id, &slot);
                });
                Route::Local(handle)
            }
            Err(TenantError::Corrupt(reason)) => {
                warn!(customer_id = %id, %reason, "tenant database unusable");
                slot.state.lock().unwrap().corrupt = Some((Instant::now(), reason.clone()));
                Route::Corrupt(reason)
            }
            Err(TenantError::NotHolder) => Route::Elsewhere,
            Err(TenantError::Unavailable(reason)) => Route::Unavailable(reason),
            Err(TenantError::Sql(refused)) => Route::Unavailable(refused.message),
        }
    }

    /// Pool mode: release the least recently used tenant when full.
    fn make_room(&self, incoming: &TenantId) {
        let slots = self.slots.lock().unwrap();
        let mut held: Vec<(Instant, TenantHandle, TenantId)> = slots
            .iter()
            .filter(|(id, _)| *id != incoming)
            .filter_map(|(id, slot)| {
                let state = slot.state.lock().unwrap();
                match &state.handle {
                    Some(h) if h.is_alive() => Some((
                        state.last_used.unwrap_or_else(Instant::now),
                        h.clone(),
                        id.clone(),
                    )),
                    _ => None,
                }
            })
            .collect();
        if held.len() < self.config.max_tenants {
            return;
        }
        held.sort_by_key(|(at, _, _)| *at);
        for (_, handle, id) in held.iter().take(held.len() + 1 - self.config.max_tenants) {
            info!(customer_id = %id, "releasing least recently used tenant to make room");
            handle.stop();
        }
    }

    /// A tenant this machine does not serve: find its holder, never acquire.
    async fn route_other(&self, id: &TenantId, fresh: bool) -> Route {
        if self.recently_absent(id) {
            return Route::NotFound(lifecycle::not_found_message(id));
        }
        let slot = self.slot(id);
        let seen = self.read_lock_cached(&slot, fresh).await;
        if let Ok(Seen::Held(record)) = &seen
            && record.session
        {
            // Whether its holder lives is in the holder's heartbeat (read
            // at most once per ttl/3 per holder machine).
            let ttl = Duration::from_millis(record.ttl_ms);
            if let Err(e) = self.session.observer().observe(&record.holder, ttl).await {
                debug!(customer_id = %id, error = %e, "cannot read the holder's heartbeat");
            }
        }
        match seen {
            Ok(Seen::Held(record)) if self.looks_live(&record) => Route::Holder(record),
            // Released, stale-looking or unknown holder: the router asks DNS
            // for a started machine of the tenant, and falls back to the
            // last holder (Fly Proxy starts a stopped machine it names).
            Ok(Seen::Held(record)) | Ok(Seen::Released(record)) => Route::Lookup {
                last_holder: Some(record),
            },
            Ok(Seen::Unparsable) => Route::Lookup { last_holder: None },
            // No lock: a tenant that never had a holder, or none at all.
            Ok(Seen::Absent) => match self.exists_uncached(id).await {
                Ok(true) => Route::Lookup { last_holder: None },
                Ok(false) => {
                    self.forget(id);
                    Route::NotFound(lifecycle::not_found_message(id))
                }
                Err(e) => Route::Unavailable(e),
            },
            Err(e) => Route::Unavailable(e),
        }
    }

    async fn read_lock_cached(&self, slot: &Slot, fresh: bool) -> Result<Seen, String> {
        if !fresh
            && let Some((at, seen)) = &slot.state.lock().unwrap().seen
            && at.elapsed() < self.config.lock_cache_ttl
        {
            return Ok(seen.clone());
        }
        let seen = Seen::from(
            read_lock(&self.store, &slot.lock_key)
                .await
                .map_err(|e| format!("cannot read {}: {e}", slot.lock_key))?,
        );
        slot.state.lock().unwrap().seen = Some((Instant::now(), seen.clone()));
        Ok(seen)
    }

    /// Single-tenant mode: keep watching the tenant's holder and take the
    /// lock over as soon as it is absent, released or stale, so that a dead
    /// holder is replaced without waiting for a request.
    ///
    /// Cost: one store request per ttl/3: the holder's heartbeat (a read
    /// shared with every other tenant of that holder this machine watches),
    /// and the lock only when the heartbeat stops vouching for it or every
    /// [`LOCK_REREAD_TICKS`] polls. Nothing is written while the holder is
    /// healthy. A dead holder is noticed within one poll and taken over one
    /// ttl after its heartbeat's last change was first seen.
    pub async fn standby(self: Arc<Self>, id: TenantId) {
        let interval = (self.config.lease_ttl / 3).max(Duration::from_millis(50));
        let reread = interval * LOCK_REREAD_TICKS;
        loop {
            if self.is_draining() {
                return;
            }
            // A deleted tenant stays deleted: a standby claims only a
            // tenant that exists (and checks again under a lease it got
            // for an absent lock, see `exists_under`).
            let slot = match self.existing_slot(&id).await {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    tokio::select! {
                        _ = tokio::time::sleep(interval.max(ABSENT_TTL)) => {}
                        _ = self.draining.cancelled() => return,
                    }
                    continue;
                }
                Err(e) => {
                    warn!(customer_id = %id, error = %e, "standby cannot tell whether its tenant exists");
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = self.draining.cancelled() => return,
                    }
                    continue;
                }
            };
            if let Some(handle) = Self::live_handle(&slot) {
                tokio::select! {
                    _ = handle.ended() => {}
                    _ = self.draining.cancelled() => return,
                }
                continue;
            }
            let mut wait = interval;
            let route = {
                let mut contender = slot.contender.lock().await;
                if self.is_draining() {
                    return;
                }
                self.await_ended(&slot).await;
                let deleting = self.deleting.lock().unwrap().contains(&id);
                let exists = match deleting {
                    true => Ok(false),
                    false => self.still_exists(&id, &slot).await,
                };
                match exists {
                    Ok(true) => {}
                    Ok(false) => {
                        drop(contender);
                        self.forget_absent(&id);
                        tokio::select! {
                            _ = tokio::time::sleep(interval.max(ABSENT_TTL)) => {}
                            _ = self.draining.cancelled() => return,
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!(customer_id = %id, error = %e, "standby cannot tell whether its tenant exists");
                        drop(contender);
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            _ = self.draining.cancelled() => return,
                        }
                        continue;
                    }
                }
                match contender.watch(reread).await {
                    Ok(Acquire::Acquired(lease)) => {
                        match self.exists_under(&id, &slot, lease).await {
                            Ok(lease) => {
                                let route = self.start_actor(&id, &slot, lease).await;
                                drop(contender);
                                Some(route)
                            }
                            Err(route) => {
                                drop(contender);
                                if matches!(route, Route::NotFound(_)) {
                                    self.forget_absent(&id);
                                }
                                Some(route)
                            }
                        }
                    }
                    Ok(Acquire::HeldBy { record, stale_in }) => {
                        // Look again just after the holder's next heartbeat
                        // should be visible (keeps detection lag small at
                        // one read per ttl/3), or the moment the lock may
                        // be taken over.
                        if let Some(due) = self
                            .session
                            .observer()
                            .peek(&record.holder)
                            .and_then(|seen| seen.next_beat())
                        {
                            let after = (interval / 20).max(Duration::from_millis(25));
                            wait = (due + after - Instant::now()).clamp(interval / 2, interval);
                        }
                        // Routing may reuse the lock as of its last read,
                        // never as of a heartbeat-only poll.
                        if let Some(read_at) = contender.last_read_at() {
                            slot.state.lock().unwrap().seen = Some((read_at, Seen::Held(record)));
                        }
                        wait = wait.min(stale_in.max(Duration::from_millis(10)));
                        None
                    }
                    Ok(Acquire::Unknown { stale_in }) => {
                        wait = wait.min(stale_in.max(Duration::from_millis(10)));
                        None
                    }
                    Err(e) => {
                        warn!(customer_id = %id, error = %e, "standby cannot read the lock");
                        None
                    }
                }
            };
            if let Some(Route::Corrupt(_)) = route {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.draining.cancelled() => return,
            }
        }
    }

    /// Graceful shutdown: stop taking tenants, let every actor commit what
    /// it has and release its lease. Returns when all have ended.
    pub async fn drain(&self) {
        self.draining.cancel();
        let handles: Vec<TenantHandle> = {
            let slots = self.slots.lock().unwrap();
            slots
                .values()
                .filter_map(|slot| slot.state.lock().unwrap().handle.clone())
                .collect()
        };
        for handle in &handles {
            handle.stop();
        }
        for handle in &handles {
            handle.ended().await;
        }
    }

    /// Keeps requests for `id` away (404) while it is deleted through this
    /// machine, and stops this machine's actor for it: its last batch is
    /// committed and its lease released, so the deleter can take it. The
    /// mark goes when the guard drops.
    pub async fn begin_delete(self: &Arc<Self>, id: &TenantId) -> DeleteGuard {
        self.deleting.lock().unwrap().insert(id.clone());
        let guard = DeleteGuard {
            registry: self.clone(),
            id: id.clone(),
        };
        let slot = self.known_slot(id);
        if let Some(slot) = slot {
            // Waits for an acquisition in progress; none starts after it.
            let _contender = slot.contender.lock().await;
            let handle = slot.state.lock().unwrap().handle.clone();
            if let Some(handle) = handle {
                handle.stop();
                handle.ended().await;
                Self::clear_ended(&self.actor.metrics, id, &slot);
            }
        }
        guard
    }

    /// Forgets an actor that has ended; call with the contender locked, so
    /// that no new actor of the tenant is being started (its series stay).
    fn clear_ended(metrics: &crate::metrics::Metrics, id: &TenantId, slot: &Slot) {
        let mut state = slot.state.lock().unwrap();
        if state.handle.as_ref().is_some_and(|h| !h.is_alive()) {
            state.handle = None;
            // A tenant no longer held leaves no series behind (thousands
            // of tenants pass through a machine).
            let _ = metrics.lease_holder.remove_label_values(&[id.as_str()]);
            let _ = metrics.lease_epoch.remove_label_values(&[id.as_str()]);
        }
    }

    /// Is this machine holding the tenant right now?
    pub fn holds(&self, id: &TenantId) -> bool {
        self.known_slot(id)
            .is_some_and(|slot| Self::live_handle(&slot).is_some())
    }

    /// The live holder named by the tenant's lock, when it is another
    /// machine (read from the store, not from a cache).
    pub async fn other_holder(&self, id: &TenantId) -> Result<Option<LockRecord>, String> {
        let state = read_lock(&self.store, &keys::lock(id.as_str()))
            .await
            .map_err(|e| format!("cannot read {}: {e}", keys::lock(id.as_str())))?;
        Ok(match state {
            LockState::Held { record, .. }
                if record.holder != self.config.machine_id && self.looks_live(&record) =>
            {
                Some(record)
            }
            _ => None,
        })
    }

    /// This machine's session, for a deleter acting for it (its lease
    /// must live by this machine's heartbeat, not start a rival one).
    pub fn lease_settings(&self) -> Session {
        self.session.clone()
    }

    /// Held tenants only (`all`: every tenant this machine remembers).
    pub fn status(&self, all: bool) -> Vec<TenantStatus> {
        let slots = self.slots.lock().unwrap();
        let mut out: Vec<TenantStatus> = slots
            .iter()
            .filter(|(_, slot)| all || Self::is_held(slot))
            .map(|(id, slot)| {
                let state = slot.state.lock().unwrap();
                match (&state.handle, &state.seen) {
                    (Some(h), _) if h.is_alive() => TenantStatus {
                        customer_id: id.to_string(),
                        role: "holder",
                        epoch: h.epoch(),
                        holder: Some(self.config.machine_id.clone()),
                    },
                    (_, Some((_, Seen::Held(record)))) => TenantStatus {
                        customer_id: id.to_string(),
                        role: "follower",
                        epoch: record.epoch,
                        holder: Some(record.holder.clone()),
                    },
                    (_, Some((_, Seen::Released(record)))) => TenantStatus {
                        customer_id: id.to_string(),
                        role: "idle",
                        epoch: record.epoch,
                        holder: None,
                    },
                    _ => TenantStatus {
                        customer_id: id.to_string(),
                        role: "idle",
                        epoch: 0,
                        holder: None,
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        out
    }
}

/// Marks a tenant as being deleted through this machine; see
/// [`Registry::begin_delete`].
pub struct DeleteGuard {
    registry: Arc<Registry>,
    id: TenantId,
}

impl DeleteGuard {
    /// The tenant is gone: forget it, and answer 404 without asking the
    /// store for a moment.
    pub fn deleted(&self) {
        self.registry.forget_absent(&self.id);
    }
}

impl Drop for DeleteGuard {
    fn drop(&mut self) {
        self.registry.deleting.lock().unwrap().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::{InstrumentedStore, MemoryStore};
    use crate::tenant::Op;
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
}
