//! Whether a tenant exists (its database object, see
//! [`crate::tenant::lifecycle`]) as the registry sees it: checked before any
//! lease is contended for, absent answers cached briefly and bounded, and
//! checked again before a takeover. Owns the negative cache; does not route
//! requests or touch leases.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{ABSENT_TTL, EXISTS_TTL, Registry, Route, Slot};
use crate::TenantId;
use crate::tenant::lifecycle::{self, Created};

impl Registry {
    /// Whether the tenant exists, from the bounded caches or the store.
    /// `None`: it does not (and `create_on_first_request` is off). A slot
    /// is made only for a tenant that exists.
    pub(super) async fn existing_slot(&self, id: &TenantId) -> Result<Option<Arc<Slot>>, String> {
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
    pub(super) async fn exists_uncached(&self, id: &TenantId) -> Result<bool, String> {
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
    pub(super) async fn still_exists(&self, id: &TenantId, slot: &Slot) -> Result<bool, String> {
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

    pub(super) fn recently_absent(&self, id: &TenantId) -> bool {
        self.absent
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|at| at.elapsed() < ABSENT_TTL)
    }

    /// Forgets a tenant that turned out not to exist.
    pub(super) fn forget_absent(&self, id: &TenantId) {
        self.forget(id);
        self.absent.lock().unwrap().put(id.clone(), Instant::now());
    }

    /// A tenant was just created through this machine: serve it at once.
    pub fn created(&self, id: &TenantId) {
        self.absent.lock().unwrap().pop(id);
    }

    /// Whether the tenant still exists, checked under a lease just acquired.
    /// A deleter holds the lease while it deletes and removes the lock
    /// last, so only a lock found absent can follow a deletion, and this
    /// check under our lease is final: a deleted tenant is taken nothing
    /// of, and its new lock is removed again.
    pub(super) async fn exists_under(
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
}
