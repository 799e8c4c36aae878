//! The first request for a tenant this machine knows nothing of: the
//! takeover's reads (the snapshot's download, the log after it, the lock)
//! go out beside the existence check, so that a cold start's session and
//! lock writes follow the check's round trip at once.
//!
//! Nothing is written before the tenant is known to exist (not even the
//! machine's heartbeat: a request for a tenant that does not exist writes
//! nothing at all): the lock is only read here, and written by the routing
//! once the existence check answered yes (and checked again under the
//! lease when it was absent).

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Registry;
use crate::TenantId;
use crate::lease::{LockState, read_lock};
use crate::store::keys;
use crate::tenant::prefetch::Prefetch;

/// Reads started for a tenant's first request. Dropped unused (the tenant
/// does not exist, another holder answers), the download stops and its
/// file is removed.
pub(super) struct EarlyReads {
    pub prefetch: Prefetch,
    /// The lock as read (`None`: the read failed; the contender reads for
    /// itself).
    pub lock: JoinHandle<Option<LockState>>,
}

impl Registry {
    /// Starts the early reads for `id` when this machine has no slot for
    /// it (so nothing seen of its lock, no actor) and it was not just
    /// found absent.
    pub(super) fn first_contact(&self, id: &TenantId) -> Option<EarlyReads> {
        if self.is_draining()
            || self.recently_absent(id)
            || self.deleting.lock().unwrap().contains(id)
            || self.slots.lock().unwrap().contains_key(id)
        {
            return None;
        }
        let (store, key) = (self.store.clone(), keys::lock(id.as_str()));
        // A released lock names where its holder's log ended: the
        // download's log reads fetch up to there beside the listing.
        let (tell, hint) = watch::channel(None);
        let lock = tokio::spawn(async move {
            let lock = read_lock(&store, &key).await.ok();
            let log_end = match &lock {
                Some(LockState::Released { record, .. }) => record.log_end,
                _ => None,
            };
            tell.send_replace(Some(log_end));
            lock
        });
        Some(EarlyReads {
            prefetch: self.prefetch_now(id, Some(hint)),
            lock,
        })
    }
}
