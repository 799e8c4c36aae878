//! Each tenant's migration record, readable for the whole fleet without
//! waking a tenant: one key per tenant under `migrations/status/<id>/`
//! whose name says its version (`v0003`) or its version and the migration
//! that failed (`v0003.failed-0004`, the error in the body). A LIST of the
//! prefix (one request per 1,000 tenants) reads every version; only failed
//! records are read with a GET.
//!
//! The record is written by whoever applied (the holder, or `migrate
//! apply` under its own lease) after the commit is durable; it is advisory
//! (the tenant's database is what counts) and corrected by the next apply.

use std::collections::BTreeMap;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;

use super::apply::Outcome;
use super::read_head;
use crate::TenantId;
use crate::store::{DynStore, Metadata, Precondition};

pub const STATUS_PREFIX: &str = "migrations/status/";

pub fn tenant_prefix(id: &str) -> String {
    format!("{STATUS_PREFIX}{id}/")
}

fn record_key(id: &str, version: u32, failed: Option<u32>) -> String {
    match failed {
        None => format!("{STATUS_PREFIX}{id}/v{version:04}"),
        Some(f) => format!("{STATUS_PREFIX}{id}/v{version:04}.failed-{f:04}"),
    }
}

/// A record key read back: tenant, version, failed migration.
fn parse_key(key: &str) -> Option<(TenantId, u32, Option<u32>)> {
    let rest = key.strip_prefix(STATUS_PREFIX)?;
    let (id, name) = rest.split_once('/')?;
    let id = TenantId::parse(id).ok()?;
    let name = name.strip_prefix('v')?;
    match name.split_once(".failed-") {
        None => Some((id, name.parse().ok()?, None)),
        Some((v, f)) => Some((id, v.parse().ok()?, Some(f.parse().ok()?))),
    }
}

/// Writes the tenant's record, then removes its older ones.
pub async fn record(store: &DynStore, outcome: &Outcome) -> anyhow::Result<()> {
    write(
        store,
        &outcome.customer_id,
        outcome.version,
        outcome
            .failed
            .as_ref()
            .map(|f| (f.version, f.error.as_str())),
    )
    .await
}

/// Writes a record for `id` at `version` (with a failure, if any).
pub async fn write(
    store: &DynStore,
    id: &str,
    version: u32,
    failed: Option<(u32, &str)>,
) -> anyhow::Result<()> {
    let key = record_key(id, version, failed.map(|f| f.0));
    let body = failed.map(|f| f.1.to_string()).unwrap_or_default();
    store
        .put(&key, body.into(), Metadata::new(), Precondition::None)
        .await
        .with_context(|| format!("cannot write {key}"))?;
    for old in store.list(&tenant_prefix(id), None).await? {
        if old.key != key {
            store.delete(&old.key).await?;
        }
    }
    Ok(())
}

/// Removes a deleted tenant's records.
pub async fn remove(store: &DynStore, id: &str) -> anyhow::Result<()> {
    for old in store.list(&tenant_prefix(id), None).await? {
        store.delete(&old.key).await?;
    }
    Ok(())
}

/// `tenantd migrate status --json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FleetStatus {
    pub latest: u32,
    /// Tenants by version.
    pub versions: BTreeMap<String, u64>,
    pub failed: Vec<FailedTenant>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailedTenant {
    pub customer_id: String,
    pub version: u32,
    pub error: String,
}

/// Per tenant: version and failure, from the records alone.
pub async fn tenants(store: &DynStore) -> anyhow::Result<BTreeMap<TenantId, (u32, Option<u32>)>> {
    let listed = store
        .list(STATUS_PREFIX, None)
        .await
        .with_context(|| format!("cannot list {STATUS_PREFIX}"))?;
    let mut by_tenant: BTreeMap<TenantId, (u32, Option<u32>, Option<std::time::SystemTime>)> =
        BTreeMap::new();
    for entry in listed {
        let Some((id, version, failed)) = parse_key(&entry.key) else {
            continue;
        };
        // Two records of a tenant: a writer stopped between the new one
        // and removing the old; the newer one counts.
        let newer = match by_tenant.get(&id) {
            None => true,
            Some((v, _, at)) => (entry.last_modified, version) > (*at, *v),
        };
        if newer {
            by_tenant.insert(id, (version, failed, entry.last_modified));
        }
    }
    Ok(by_tenant
        .into_iter()
        .map(|(id, (v, f, _))| (id, (v, f)))
        .collect())
}

/// The fleet's status: one GET of the head, the LIST of the records, a GET
/// per failed tenant.
pub async fn fleet(store: &DynStore) -> anyhow::Result<FleetStatus> {
    let (head, _) = read_head(store).await?;
    let mut status = FleetStatus {
        latest: head.latest,
        ..FleetStatus::default()
    };
    let mut failed = Vec::new();
    for (id, (version, failure)) in tenants(store).await? {
        *status.versions.entry(version.to_string()).or_default() += 1;
        if let Some(f) = failure {
            failed.push((id, version, f));
        }
    }
    let read = futures::stream::iter(failed.into_iter().map(|(id, version, f)| {
        let store = store.clone();
        async move {
            let key = record_key(id.as_str(), version, Some(f));
            let error = match store.get(&key).await {
                Ok(Some(o)) => String::from_utf8_lossy(&o.body).into_owned(),
                Ok(None) => format!("migration {f} failed (its record was replaced meanwhile)"),
                Err(e) => format!("migration {f} failed (cannot read {key}: {e})"),
            };
            FailedTenant {
                customer_id: id.to_string(),
                version: f,
                error,
            }
        }
    }))
    .buffered(16)
    .collect::<Vec<_>>()
    .await;
    status.failed = read;
    Ok(status)
}
