//! `migrate apply` for a tenant that no machine holds: the command takes
//! the tenant's lease and runs a tenant actor for it in its own process.
//! The actor's start is the claim every holder makes (fences, epochs,
//! the log replayed) and applies what is pending before anything else;
//! its stop commits, writes the snapshot and releases the lease.

use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

use super::Scratch;
use super::apply::{Outcome, bring_up_to_date_recorded};
use crate::TenantId;
use crate::lease::{Acquire, Contender, LockRecord, Session};
use crate::metrics::Metrics;
use crate::store::{DynStore, keys};
use crate::tenant::TenantError;
use crate::tenant::actor::{ActorContext, TenantActor};

/// How a tenant was brought up to date.
pub enum Via {
    /// Under this process's lease.
    OwnLease(Outcome),
    /// A machine holds it: ask that one.
    HeldBy(LockRecord),
    /// The lease was lost while taking the tenant over (nothing of this
    /// apply was acknowledged): try again.
    Lost,
}

/// Applies what is pending to `id` under `session`'s lease, waiting up to
/// `wait` for a holder that may be gone to go stale.
pub async fn apply(
    store: &DynStore,
    id: &TenantId,
    session: &Session,
    machine_id: &str,
    metrics: &Metrics,
    wait: Duration,
) -> anyhow::Result<Via> {
    if !crate::tenant::lifecycle::tenant_exists(store, id).await? {
        bail!("{}", crate::tenant::lifecycle::not_found_message(id));
    }
    let lock = keys::lock(id.as_str());
    let mut contender = Contender::new(store.clone(), lock.clone(), session.clone());
    let lease = match contender.acquire_until(Instant::now() + wait).await? {
        Acquire::Acquired(lease) => lease,
        Acquire::HeldBy { record, .. } => return Ok(Via::HeldBy(record)),
        Acquire::Unknown { stale_in } => bail!(
            "customer {id}: {lock} cannot be parsed; it counts as held until it stays unchanged for a lease ttl ({stale_in:?} more)"
        ),
    };
    let scratch = Scratch::new()?;
    let ctx = ActorContext::new(
        store.clone(),
        metrics.clone(),
        machine_id.to_string(),
        scratch.0.clone(),
    );
    let (handle, task) = match TenantActor::start(id.clone(), ctx, lease).await {
        Ok(started) => started,
        Err(TenantError::NotHolder) => return Ok(Via::Lost),
        Err(e) => bail!("customer {id}: {e}"),
    };
    let outcome = bring_up_to_date_recorded(id, store, &handle).await;
    handle.stop();
    let _ = task.await;
    match outcome {
        Ok(outcome) => Ok(Via::OwnLease(outcome)),
        Err(TenantError::NotHolder) => Ok(Via::Lost),
        Err(e) => bail!("customer {id}: {e}"),
    }
}
