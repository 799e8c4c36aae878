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
//!
//! This file owns the registry's state (one slot per known tenant, the
//! pruning bound) and its read-only views (`status`); the concerns that act
//! on that state each have a file: [`routing`] (the request path and lease
//! contention), [`existence`] (whether a tenant exists), [`standby`] (the
//! single-tenant standby loop) and [`teardown`] (drain and delete).

mod existence;
mod first_contact;
mod routing;
mod standby;
mod teardown;

pub use teardown::DeleteGuard;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::TenantHandle;
use super::actor::ActorContext;
use crate::TenantId;
use crate::lease::{Contender, LeaseConfig, LockRecord, LockState, Session};
use crate::store::{DynStore, keys};

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
pub(super) const ABSENT_TTL: Duration = Duration::from_secs(1);

/// How long a "does exist" answer is trusted before a takeover checks
/// again (a tenant deleted through another machine).
pub(super) const EXISTS_TTL: Duration = Duration::from_secs(30);

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
    /// This machine's follower replicas: a takeover starts from one.
    followers: std::sync::OnceLock<Arc<crate::tenant::follower::Followers>>,
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
            followers: std::sync::OnceLock::new(),
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

    /// Lets takeovers start from this machine's follower replicas.
    pub fn take_over_from_replicas(&self, followers: Arc<crate::tenant::follower::Followers>) {
        followers.use_session(self.session.clone());
        let _ = self.followers.set(followers);
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

    /// Drops the slot of a tenant not held here.
    fn forget(&self, id: &TenantId) {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(id)
            && slot.state.lock().unwrap().handle.is_none()
        {
            slots.remove(id);
        }
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

    /// Is this machine holding the tenant right now?
    /// The tenants this machine holds now, with their actors.
    pub fn held(&self) -> Vec<(TenantId, TenantHandle)> {
        let slots = self.slots.lock().unwrap();
        slots
            .iter()
            .filter_map(|(id, slot)| {
                let handle = slot.state.lock().unwrap().handle.clone()?;
                handle.is_alive().then(|| (id.clone(), handle))
            })
            .collect()
    }

    pub fn holds(&self, id: &TenantId) -> bool {
        self.known_slot(id)
            .is_some_and(|slot| Self::live_handle(&slot).is_some())
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

#[cfg(test)]
mod cold_start_tests;
#[cfg(test)]
mod tests;
