//! How a push reaches tenants that are already held: one task per machine
//! reads `migrations/head.json` every [`INTERVAL`] (one GET per machine,
//! whatever the number of tenants it holds) and, when the head changed,
//! brings every held tenant up to date through its actor. A tenant taken
//! since the last look is checked against the head too, so a push that
//! lands between a claim's read of the head and the first look here is not
//! missed. Bound: a running holder applies a push within `INTERVAL` plus
//! the migration's own time. A machine that holds no tenant reads nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::warn;

use super::apply::apply_head;
use super::read_head;
use crate::TenantId;
use crate::tenant::Registry;

/// How often a machine reads the head.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// [`INTERVAL`], or `TENANTD_MIGRATIONS_INTERVAL` (a duration: `2s`) for
/// tests and for apps that want a tighter bound.
pub fn interval() -> Duration {
    std::env::var("TENANTD_MIGRATIONS_INTERVAL")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(INTERVAL)
}

/// Runs until the registry drains.
pub async fn run(registry: Arc<Registry>, interval: Duration) {
    let store = registry.store().clone();
    let mut last_etag = None;
    let mut seen: HashSet<TenantId> = HashSet::new();
    loop {
        if registry.is_draining() {
            return;
        }
        // A machine holding nothing reads nothing: each claim reads the
        // head itself.
        if registry.held().is_empty() {
            seen.clear();
            tokio::time::sleep(interval).await;
            continue;
        }
        match read_head(&store).await {
            Ok((head, etag)) => {
                let changed = etag != last_etag;
                last_etag = etag;
                let held = registry.held();
                let now: HashSet<TenantId> = held.iter().map(|(id, _)| id.clone()).collect();
                let due: Vec<_> = held
                    .into_iter()
                    .filter(|(id, _)| changed || !seen.contains(id))
                    .collect();
                seen = now;
                if head.latest > 0 && !due.is_empty() {
                    let head = &head;
                    let store = &store;
                    let failed: Vec<Option<TenantId>> =
                        futures::stream::iter(due.into_iter().map(|(id, handle)| async move {
                            match apply_head(&id, store, &handle, head).await {
                                Ok(_) => None,
                                Err(e) => {
                                    warn!(customer_id = %id, error = %e, "could not apply the published migrations; trying again at the next look");
                                    Some(id)
                                }
                            }
                        }))
                        .buffer_unordered(8)
                        .collect()
                        .await;
                    for id in failed.into_iter().flatten() {
                        seen.remove(&id);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read the published migrations; trying again"),
        }
        tokio::time::sleep(interval).await;
    }
}
