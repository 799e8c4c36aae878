//! The first request for a tenant this machine knows nothing of: the
//! takeover's reads (the snapshot's download, the log after it, the lock)
//! and the machine's session start go out beside the existence check, so
//! that a cold start's lock write follows one round trip, not three.
//!
//! Nothing of the tenant is written before it is known to exist: the lock
//! is only read here, and written by the routing once the existence check
//! answered yes (and checked again under the lease when it was absent).
//! The session is the machine's: starting it early writes the machine's
//! heartbeat, at most once per lease ttl for requests that turn out to
//! name no tenant.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Registry;
use crate::TenantId;
use crate::lease::{Incarnation, LockState, read_lock};
use crate::store::keys;
use crate::tenant::prefetch::Prefetch;

/// Reads started for a tenant's first request. Dropped unused (the tenant
/// does not exist, another holder answers), the download stops and its
/// file is removed.
pub(super) struct EarlyReads {
    pub prefetch: Option<Prefetch>,
    lock: Option<JoinHandle<Option<LockState>>>,
    /// A session started here: the task's output is the incarnation, kept
    /// while this handle lives, so until the lease holds it.
    _session: Option<JoinHandle<Option<Arc<Incarnation>>>>,
}

impl EarlyReads {
    /// The lock as read beside the existence check (`None`: the read
    /// failed, or was taken already; the contender reads for itself).
    pub async fn lock(&mut self) -> Option<LockState> {
        self.lock.take()?.await.ok().flatten()
    }
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
        let lock = tokio::spawn(async move { read_lock(&store, &key).await.ok() });
        Some(EarlyReads {
            prefetch: Some(self.prefetch_now(id)),
            lock: Some(lock),
            _session: self.start_session_early(),
        })
    }

    /// Starts the session (its heartbeat written) unless an early start
    /// was made within the last lease ttl: a stream of requests for
    /// tenants that do not exist costs at most one heartbeat start per
    /// ttl. A session already running is only joined.
    fn start_session_early(&self) -> Option<JoinHandle<Option<Arc<Incarnation>>>> {
        {
            let mut last = self.early_session_at.lock().unwrap();
            if last.is_some_and(|at| at.elapsed() < self.config.lease_ttl) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let session = self.session.clone();
        Some(tokio::spawn(
            async move { session.incarnation().await.ok() },
        ))
    }
}
