//! Ending what the registry holds: the graceful drain at shutdown and the
//! guard that keeps a tenant from being taken over while it is deleted.
//! Owns no routing decision; it stops actors and clears their slots.

use std::sync::Arc;

use super::{Registry, Slot};
use crate::TenantId;
use crate::tenant::TenantHandle;

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

impl Registry {
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
    pub(super) fn clear_ended(metrics: &crate::metrics::Metrics, id: &TenantId, slot: &Slot) {
        let mut state = slot.state.lock().unwrap();
        if state.handle.as_ref().is_some_and(|h| !h.is_alive()) {
            state.handle = None;
            // A tenant no longer held leaves no series behind (thousands
            // of tenants pass through a machine).
            let _ = metrics.lease_holder.remove_label_values(&[id.as_str()]);
            let _ = metrics.lease_epoch.remove_label_values(&[id.as_str()]);
        }
    }
}
