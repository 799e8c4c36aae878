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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::actor::{ActorContext, TenantActor};
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
    Unavailable(String),
    Corrupt(String),
}

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

#[derive(Default)]
struct SlotState {
    handle: Option<TenantHandle>,
    last_used: Option<Instant>,
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
            config,
            actor,
            slots: Mutex::new(HashMap::new()),
            draining: CancellationToken::new(),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
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

    fn slot(&self, id: &TenantId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap();
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    lock_key: keys::lock(id.as_str()),
                    contender: tokio::sync::Mutex::new(Contender::new(
                        self.store.clone(),
                        keys::lock(id.as_str()),
                        self.session.clone(),
                    )),
                    state: Mutex::new(SlotState::default()),
                })
            })
            .clone()
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
        let slot = self.slot(id);
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
        self.await_ended(&slot).await;
        if let Some(route) = self.cached_route(&slot, fresh) {
            return route;
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
                let id = id.clone();
                tokio::spawn(async move {
                    if let Ok(exit) = task.await {
                        debug!(customer_id = %id, ?exit, "tenant actor ended");
                    }
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
            Ok(Seen::Absent) | Ok(Seen::Unparsable) => Route::Lookup { last_holder: None },
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
            let slot = self.slot(&id);
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
                match contender.watch(reread).await {
                    Ok(Acquire::Acquired(lease)) => {
                        let route = self.start_actor(&id, &slot, lease).await;
                        drop(contender);
                        Some(route)
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

    pub fn status(&self) -> Vec<TenantStatus> {
        let slots = self.slots.lock().unwrap();
        let mut out: Vec<TenantStatus> = slots
            .iter()
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
