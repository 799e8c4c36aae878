//! Bringing one held tenant up to the published version, through its
//! actor: one request per pending migration, each awaited before the next
//! is sent, so that each is its own commit (and its own log slot, which
//! `restore --at` can go back before).

use serde::Serialize;
use tracing::{info, warn};

use super::{Head, load, read_head, status};
use crate::TenantId;
use crate::store::DynStore;
use crate::tenant::{Op, Reply, TenantError, TenantHandle};

/// Where a tenant stands after an apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub customer_id: String,
    /// The latest published version.
    pub latest: u32,
    /// The tenant's version now.
    pub version: u32,
    /// Migrations applied by this call.
    pub applied: Vec<u32>,
    /// The migration that failed, and why; later ones wait for it.
    pub failed: Option<Failed>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failed {
    pub version: u32,
    pub error: String,
}

/// Reads what is published and applies what the tenant lacks. A store
/// failure reading the head or a migration is `Unavailable` (the tenant
/// must not answer below the published version); a migration's own
/// failure is in the outcome, and the tenant stays at its version.
pub async fn bring_up_to_date(
    id: &TenantId,
    store: &DynStore,
    handle: &TenantHandle,
) -> Result<Outcome, TenantError> {
    let (head, _) = read_head(store).await.map_err(|e| {
        TenantError::Unavailable(format!(
            "customer {id}: cannot read the published migrations: {e}"
        ))
    })?;
    apply_head(id, store, handle, &head).await
}

/// [`bring_up_to_date`] for an explicit apply (`migrate apply`, the admin
/// route): the tenant's record is written even when nothing was pending, so
/// that a record left stale (an applier killed between the commit and the
/// record) is put right.
pub async fn bring_up_to_date_recorded(
    id: &TenantId,
    store: &DynStore,
    handle: &TenantHandle,
) -> Result<Outcome, TenantError> {
    let outcome = bring_up_to_date(id, store, handle).await?;
    if outcome.applied.is_empty()
        && outcome.failed.is_none()
        && outcome.latest > 0
        && let Err(e) = status::record(store, &outcome).await
    {
        warn!(customer_id = %id, error = %e, "could not write the tenant's migration status record");
    }
    Ok(outcome)
}

/// [`bring_up_to_date`] with the head already read.
pub async fn apply_head(
    id: &TenantId,
    store: &DynStore,
    handle: &TenantHandle,
    head: &Head,
) -> Result<Outcome, TenantError> {
    let mut outcome = Outcome {
        customer_id: id.to_string(),
        latest: head.latest,
        ..Outcome::default()
    };
    if head.latest == 0 {
        return Ok(outcome);
    }
    let mut index = 0;
    while index < head.migrations.len() {
        let entry = &head.migrations[index];
        let migration = load(store, entry).await.map_err(|e| {
            TenantError::Unavailable(format!(
                "customer {id}: cannot read migration {}: {e}",
                entry.name
            ))
        })?;
        match handle.request(Op::Migrate(migration)).await {
            Ok(Reply::Migrated(done)) => {
                outcome.version = done.version;
                if done.applied {
                    info!(customer_id = %id, version = done.version, "migration applied");
                    outcome.applied.push(done.version);
                    index += 1;
                } else {
                    // Already there: go straight to the next one it lacks.
                    index = (done.version as usize).max(index + 1);
                }
            }
            Ok(_) => unreachable!("a migration answers with Migrated"),
            Err(TenantError::Sql(error)) => {
                warn!(customer_id = %id, version = entry.version, error = %error.message, "migration failed; the tenant stays at its version");
                outcome.version = entry.version - 1;
                outcome.failed = Some(Failed {
                    version: entry.version,
                    error: format!("{}: {}", entry.name, error.message),
                });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if (!outcome.applied.is_empty() || outcome.failed.is_some())
        && let Err(e) = status::record(store, &outcome).await
    {
        warn!(customer_id = %id, error = %e, "could not write the tenant's migration status record; `migrate status` shows its previous one until the next apply");
    }
    Ok(outcome)
}
