//! Routing a request: the local actor, the holder the lock names (cached
//! briefly), a takeover when there is no live holder, or another machine for
//! a tenant this one is not configured for. Owns the decisions and lease
//! contention on the request path, and starting an actor once the lease is
//! won (making room under `max_tenants`); existence checks are in
//! [`super::existence`], the standby loop in [`super::standby`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::first_contact::EarlyReads;
use super::{Registry, Route, Seen, Slot};
use crate::TenantId;
use crate::lease::{Acquire, Beat, LockRecord, LockState, read_lock};
use crate::store::keys;
use crate::tenant::actor::TenantActor;
use crate::tenant::claim;
use crate::tenant::follower::ReadRoute;
use crate::tenant::lifecycle::{self};
use crate::tenant::prefetch::{self, LogEndHint, Prefetch};
use crate::tenant::{TenantError, TenantHandle};

impl Registry {
    /// Routes a request for `id`. `fresh` skips cached lock reads (the
    /// sender's view was stale).
    pub async fn route(self: &Arc<Self>, id: &TenantId, fresh: bool) -> Route {
        if !self.serves(id) {
            return self.route_other(id, fresh).await;
        }
        // A tenant not seen yet: the takeover's reads go beside the
        // existence check (nothing is written before it answers).
        let early = self.first_contact(id);
        if !self.is_draining() && self.local(id).is_none() {
            // Beside the existence check: a takeover then only writes the
            // heartbeat before the lock (read once per session, no more).
            let session = self.session.clone();
            tokio::spawn(async move { session.prime().await });
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
        let (mut prefetch, early_lock) = match early {
            Some(EarlyReads { prefetch, lock }) => (Some(prefetch), Some(lock)),
            None => (self.prefetch(id, &slot, fresh), None),
        };
        // A machine's first lease starts its session (the heartbeat read
        // and written): begun beside the lock read, not after it.
        let _session = prefetch.as_ref().map(|_| {
            let session = self.session.clone();
            tokio::spawn(async move { session.incarnation().await.ok() })
        });
        // Answered beside the existence check, as a rule; a store that
        // stopped answering since costs no more than the attempt's own
        // bound (then the contender reads the lock itself).
        let mut early_lock = match early_lock {
            Some(read) => tokio::time::timeout(self.config.lease_ttl, read)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            None => None,
        };
        // The new holder applies the published migrations before its first
        // answer: read beside the lease's writes, not after them.
        if let Some(prefetch) = prefetch.as_mut() {
            prefetch.read_migrations(&self.store);
        }
        // A lock released by a holder naming its log's end: the window
        // after that end is fenced now, under the acquisition about to be
        // attempted, beside the session's start rather than after the lock
        // write (the tenant is known to exist; docs/protocol.md, "Fences
        // before the lock write").
        let mut planned = early_lock.as_ref().and_then(|lock| contender.plan(lock));
        if let (Some(planned), Some(prefetch)) = (&planned, prefetch.as_mut()) {
            let fences = claim::fence_early(
                &self.store,
                id,
                &self.config.machine_id,
                planned,
                prefetch.described(),
            );
            prefetch.early_fences = Some((planned.token, fences));
        }
        loop {
            // A store that does not answer must not hold a request for the
            // retrying layer's whole budget: give up after one ttl.
            let attempt = tokio::time::timeout(
                self.config.lease_ttl,
                contender.try_acquire_planned(early_lock.take(), planned.take()),
            )
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
                    let route = self.start_actor(id, &slot, lease, prefetch.take()).await;
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
    pub(super) fn looks_live(&self, record: &LockRecord) -> bool {
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

    pub(super) fn cached_route(&self, slot: &Slot, fresh: bool) -> Option<Route> {
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

    /// Starts a takeover's reads while the lease is contended, unless the
    /// lock was last seen held by a live holder (then the request most
    /// likely goes there, and a download would be wasted) and the sender
    /// did not find that view stale (`fresh`: a holder handing the tenant
    /// over sends its requests on that way).
    fn prefetch(&self, id: &TenantId, slot: &Slot, fresh: bool) -> Option<Prefetch> {
        let likely_ours = fresh
            || match &slot.state.lock().unwrap().seen {
                Some((_, Seen::Held(record))) => !self.looks_live(record),
                _ => true,
            };
        likely_ours.then(|| self.prefetch_now(id, None))
    }

    pub(super) fn prefetch_now(&self, id: &TenantId, hint: Option<LogEndHint>) -> Prefetch {
        let dir = self.actor.data_dir.join(&self.actor.machine_id);
        prefetch::start(&self.store, &dir, id, self.followers.get().cloned(), hint)
    }

    pub(super) async fn start_actor(
        self: &Arc<Self>,
        id: &TenantId,
        slot: &Arc<Slot>,
        lease: crate::lease::Lease,
        prefetch: Option<Prefetch>,
    ) -> Route {
        self.make_room(id);
        let mut ctx = self.actor.clone();
        if self.config.customer_id.is_some() {
            ctx.idle_timeout = None;
        }
        match TenantActor::start_from(id.clone(), ctx, lease, prefetch).await {
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
    pub(super) fn make_room(&self, incoming: &TenantId) {
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
    pub(super) async fn route_other(&self, id: &TenantId, fresh: bool) -> Route {
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

    pub(super) async fn read_lock_cached(&self, slot: &Slot, fresh: bool) -> Result<Seen, String> {
        let max_age = match fresh {
            true => Duration::ZERO,
            false => self.config.lock_cache_ttl,
        };
        self.read_lock_within(slot, max_age).await
    }

    /// The tenant's lock as read no longer than `max_age` ago.
    async fn read_lock_within(&self, slot: &Slot, max_age: Duration) -> Result<Seen, String> {
        if let Some((at, seen)) = &slot.state.lock().unwrap().seen
            && at.elapsed() < max_age
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

    /// Where a read-only request may be answered (docs/protocol.md,
    /// "Follower reads"): here when this machine holds the tenant; from
    /// this machine's replica when the lock names another machine, live
    /// or not (a gone holder's acknowledged writes are all in the log);
    /// otherwise routed like any request. Never contends for the lease.
    pub async fn read_route(self: &Arc<Self>, id: &TenantId) -> ReadRoute {
        if !self.serves(id) || self.is_draining() {
            return ReadRoute::Normal;
        }
        let slot = match self.existing_slot(id).await {
            Ok(Some(slot)) => slot,
            _ => return ReadRoute::Normal,
        };
        if let Some(handle) = Self::live_handle(&slot) {
            return ReadRoute::Local(handle);
        }
        // The record only names whom a follower asks for its position: a
        // stale one costs a refused query and a read of the log to its
        // end, never a wrong answer. So it is reused for a whole lease ttl
        // (a follower's store requests do not grow with its reads). While
        // the holder it names keeps pushing commits of its epoch, it is
        // alive and still the holder: no read at all.
        let ttl = self.config.lease_ttl;
        let pushed = self.followers.get().and_then(|f| f.pushed_epoch(id, ttl));
        let vouched = match &slot.state.lock().unwrap().seen {
            Some((_, Seen::Held(record))) if Some(record.epoch) == pushed => Some(record.clone()),
            _ => None,
        };
        if let Some(record) = vouched
            && record.holder != self.config.machine_id
        {
            return ReadRoute::Follow(record);
        }
        match self.read_lock_within(&slot, ttl).await {
            Ok(Seen::Held(record)) if record.holder != self.config.machine_id => {
                ReadRoute::Follow(record)
            }
            _ => ReadRoute::Normal,
        }
    }

    /// This machine's live actor of `id`, if it holds it.
    pub fn local(&self, id: &TenantId) -> Option<TenantHandle> {
        let slot = self.known_slot(id)?;
        Self::live_handle(&slot)
    }
}
