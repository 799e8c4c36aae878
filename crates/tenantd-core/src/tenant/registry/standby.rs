//! The single-tenant standby loop: a machine configured for one tenant
//! watches the holder's heartbeat and lock, and takes the tenant over when
//! the holder is gone by the stale rule (docs/protocol.md). Owns only that
//! loop; it reaches actors through the same start path as a request.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{ABSENT_TTL, Registry, Route, Seen};
use crate::TenantId;
use crate::lease::Acquire;

/// A standby reads the lock itself at least once every this many polls,
/// even while the holder's heartbeat vouches for it.
const LOCK_REREAD_TICKS: u32 = 30;

impl Registry {
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
                // The heartbeat read while waiting (once per session, no
                // more): a takeover then only writes it before the lock.
                let session = self.session.clone();
                tokio::spawn(async move { session.prime().await });
                match contender.watch(reread).await {
                    Ok(Acquire::Acquired(lease)) => {
                        match self.exists_under(&id, &slot, lease).await {
                            Ok(lease) => {
                                let route = self
                                    .start_actor(
                                        &id,
                                        &slot,
                                        lease,
                                        Some(self.prefetch_now(&id, None)),
                                    )
                                    .await;
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
}
