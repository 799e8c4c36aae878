//! A tenant's life: it exists when its objects exist, and only an explicit
//! `create` brings it into being (`tenantd tenants create`, `POST
//! /_admin/tenants/<id>`, a single-tenant machine for its own tenant, or
//! pool mode with `--create-on-first-request`). Requests for a tenant that
//! does not exist write nothing to the store.
//!
//! Shared by the `tenantd tenants` commands and the HTTP admin routes.
//!
//! Deletion never leaves a tenant that looks whole but is not: the
//! deleter first takes the tenant's lease and fences its log like any new
//! holder (so no machine writes it meanwhile, and a paused holder's late
//! upload finds its slot taken), then removes the original app's copy,
//! then `db.sqlite3` (from here on the tenant does not exist, and no
//! machine recreates it: a request is answered 404 before any lease is
//! contended for), then the rest of the deleted life (its log below its
//! own fences, its archives), and the lock last if it is still its own: a
//! tenant created again meanwhile, and a machine serving it after the
//! delete stalled past its lease, keep everything of theirs. The fences
//! stay: removed, a late upload could land in their slots. A tenant
//! created again under the same id starts its log after them.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;
use tracing::info;

use crate::TenantId;
use crate::lease::{Acquire, Contender, LockState, Session, read_lock};
use crate::store::{DynStore, Metadata, Precondition, StoreError, StoreResult, keys};

/// Does the tenant exist: is there a `customer/<id>/db.sqlite3`, or the
/// original app's copy (imported on first use)? Reads only.
pub async fn tenant_exists(store: &DynStore, id: &TenantId) -> StoreResult<bool> {
    if store.head(&keys::database(id.as_str())).await?.is_some() {
        return Ok(true);
    }
    Ok(store
        .head(&keys::legacy_database(id.as_str()))
        .await?
        .is_some())
}

/// The message of a request for a tenant that does not exist.
pub fn not_found_message(id: &TenantId) -> String {
    format!(
        "customer {id} does not exist; create it with `tenantd tenants create {id}` or POST /_admin/tenants/{id}"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// It existed already (its database, or the original app's copy).
    Exists,
}

impl Created {
    pub fn as_str(self) -> &'static str {
        match self {
            Created::Created => "created",
            Created::Exists => "exists",
        }
    }
}

/// The metadata of a new database object: what a holder's upload carries,
/// before any holder. Its log starts after slot `seq`.
fn new_database_metadata(seq: u64) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert("tenantd-epoch".into(), "0".into());
    metadata.insert("tenantd-seq".into(), seq.to_string());
    metadata.insert("tenantd-format".into(), "log".into());
    metadata
}

/// The last slot a deleted incarnation of the tenant left (its deleter's
/// fences): a new incarnation's log starts after it. Slots a listing does
/// not show yet are found by reading past the last one it shows; any
/// missed still make the first holder's fences read them (its claim
/// applies them as fences and raises its epoch above theirs).
async fn leftover_end(store: &DynStore, id: &TenantId) -> anyhow::Result<u64> {
    let listed = store
        .list(&keys::log_prefix(id.as_str()), None)
        .await?
        .into_iter()
        .filter_map(|l| keys::log_seq(&l.key))
        .max();
    // A listing may not show a recent delete's fences at all (an eventually
    // consistent LIST): its tombstone, read directly, names the last one.
    let tombstone = read_tombstone(store, id).await?;
    let Some(mut end) = listed.max(tombstone.map(|t| t.log_end)) else {
        return Ok(0);
    };
    while store
        .head(&keys::log_slot(id.as_str(), end + 1))
        .await?
        .is_some()
    {
        end += 1;
    }
    Ok(end)
}

/// What a delete leaves besides its fences (`keys::tombstone`).
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
struct Tombstone {
    /// The last log slot of the deleted incarnation (its deleter's last
    /// fence).
    log_end: u64,
}

/// The last slot a tombstone's body names; `None` when it is not one.
pub(crate) fn tombstone_end(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Tombstone>(body)
        .ok()
        .map(|t| t.log_end)
}

async fn read_tombstone(store: &DynStore, id: &TenantId) -> anyhow::Result<Option<Tombstone>> {
    let key = keys::tombstone(id.as_str());
    let Some(object) = store.get(&key).await? else {
        return Ok(None);
    };
    let tombstone = serde_json::from_slice(&object.body).with_context(|| {
        format!(
            "{key} is not a tenantd tombstone; delete it only if no log objects are left under {}",
            keys::log_prefix(id.as_str())
        )
    })?;
    Ok(Some(tombstone))
}

/// Records the deleted incarnation's last slot before the tenant stops
/// existing; never lowered (a delete of an incarnation that started after
/// an earlier one's tombstone ends later).
pub(crate) async fn write_tombstone(
    store: &DynStore,
    id: &TenantId,
    log_end: u64,
) -> anyhow::Result<()> {
    let key = keys::tombstone(id.as_str());
    let log_end = match read_tombstone(store, id).await? {
        Some(old) => old.log_end.max(log_end),
        None => log_end,
    };
    let body = serde_json::to_vec(&Tombstone { log_end }).expect("a tombstone serializes");
    store
        .put(&key, body.into(), Metadata::new(), Precondition::None)
        .await
        .with_context(|| format!("cannot write {key}"))?;
    Ok(())
}

/// Creates the tenant with a new, empty database (`If-None-Match: *`).
/// Idempotent: a tenant that exists is left as it is.
pub async fn create(store: &DynStore, id: &TenantId) -> anyhow::Result<Created> {
    // Reads first: a single-tenant machine creates its tenant at every
    // start, and the tenant nearly always exists. The original app's copy
    // is imported by the first holder; a new database would hide it.
    if tenant_exists(store, id)
        .await
        .with_context(|| format!("cannot tell whether customer {id} exists"))?
    {
        return Ok(Created::Exists);
    }
    // At the latest published schema version: a new tenant never serves
    // below it, and never needs a migration run at its first claim.
    let migrations = super::migrations::published(store)
        .await
        .with_context(|| format!("cannot create customer {id}"))?;
    let version = migrations.len() as u32;
    let bytes =
        tokio::task::spawn_blocking(move || super::migrations::new_database_bytes(&migrations))
            .await
            .context("building a new database")??;
    let key = keys::database(id.as_str());
    let after = leftover_end(store, id)
        .await
        .with_context(|| format!("cannot read what a delete left of customer {id}"))?;
    match store
        .put(
            &key,
            bytes,
            new_database_metadata(after),
            Precondition::IfAbsent,
        )
        .await
    {
        Ok(_) => {
            info!(customer_id = %id, version, "tenant created");
            record_version(store, id, version).await;
            Ok(Created::Created)
        }
        Err(StoreError::PreconditionFailed { .. }) => Ok(Created::Exists),
        Err(e) => Err(anyhow::anyhow!("cannot create customer {id}: {e}")),
    }
}

/// The new tenant's migration record (advisory: `migrate status` reads it).
/// None at version 0: with nothing published there is nothing to report,
/// and a tenant without a record is at version 0 anyway.
async fn record_version(store: &DynStore, id: &TenantId, version: u32) {
    if version == 0 {
        return;
    }
    if let Err(e) = super::migrations::status::write(store, id.as_str(), version, None).await {
        tracing::warn!(customer_id = %id, error = %e, "could not write the new tenant's migration record");
    }
}

/// Creates the tenant with the database in `file` (a fork's materialised
/// state, or an imported file already checked by
/// [`super::migrations::import::prepare`]). Unlike [`create`], an existing
/// tenant is an error: nothing of it is touched.
pub async fn create_from_file(
    store: &DynStore,
    id: &TenantId,
    file: &std::path::Path,
    version: u32,
) -> anyhow::Result<()> {
    if tenant_exists(store, id)
        .await
        .with_context(|| format!("cannot tell whether customer {id} exists"))?
    {
        bail!(
            "customer {id} exists already; nothing was written: choose another id, or delete it first with `tenantd tenants delete {id}`"
        );
    }
    let after = leftover_end(store, id)
        .await
        .with_context(|| format!("cannot read what a delete left of customer {id}"))?;
    let key = keys::database(id.as_str());
    // Streamed from the file: an imported gigabyte is never in memory.
    match store
        .put_file(
            &key,
            file,
            new_database_metadata(after),
            Precondition::IfAbsent,
        )
        .await
    {
        Ok(_) => {
            info!(customer_id = %id, version, "tenant created from a file");
            record_version(store, id, version).await;
            Ok(())
        }
        Err(StoreError::PreconditionFailed { .. }) => {
            bail!("customer {id} was created by someone else meanwhile; nothing was written")
        }
        Err(e) => Err(anyhow::anyhow!("cannot create customer {id}: {e}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// Nothing of it was in the store.
    Absent,
}

impl Deleted {
    pub fn as_str(self) -> &'static str {
        match self {
            Deleted::Deleted => "deleted",
            Deleted::Absent => "absent",
        }
    }
}

/// Who deletes: the lease this deleter takes names it (and lives by its
/// session: a machine deleting through its registry shares its heartbeat).
#[derive(Clone, Debug)]
pub struct Deleter {
    pub lease: Session,
    /// How long to wait for a live holder to let go.
    pub wait: Duration,
}

/// Deletes every object of the tenant, under its lease (see the module
/// comment for the order). Idempotent: a tenant of which nothing is left
/// is `Absent`; a half-deleted one (an earlier run that failed midway) is
/// finished.
pub async fn delete(store: &DynStore, id: &TenantId, deleter: &Deleter) -> anyhow::Result<Deleted> {
    let prefix = keys::tenant_prefix(id.as_str());
    let legacy = keys::legacy_database(id.as_str());
    let lock = keys::lock(id.as_str());
    let listed = store
        .list(&prefix, None)
        .await
        .with_context(|| format!("cannot list {prefix}"))?;
    // What an earlier delete keeps: fences and its tombstone.
    let tombstone = keys::tombstone(id.as_str());
    let kept = |l: &crate::store::Listed| {
        l.key == tombstone
            || (keys::log_seq(&l.key).is_some() && crate::tenant::log::is_fence_size(l.size))
    };
    if listed.iter().all(kept) && store.head(&legacy).await?.is_none() {
        return Ok(Deleted::Absent);
    }
    let mut contender = Contender::new(store.clone(), lock.clone(), deleter.lease.clone());
    let lease = match contender
        .acquire_until(Instant::now() + deleter.wait)
        .await
        .with_context(|| format!("cannot read {lock}"))?
    {
        Acquire::Acquired(lease) => lease,
        Acquire::HeldBy { record, .. } => bail!(
            "customer {id} is held by machine {holder} ({addr}, lease epoch {epoch}), which did not let go within {wait:?}: \
             send DELETE /_admin/tenants/{id} to the app (the holder stops the tenant, then deletes it), \
             or stop that machine, or retry with a longer --wait",
            holder = record.holder,
            addr = record.addr,
            epoch = record.epoch,
            wait = deleter.wait,
        ),
        Acquire::Unknown { stale_in } => bail!(
            "customer {id}: the lock object {lock} cannot be parsed, and it counts as held until it has stayed unchanged for a lease ttl \
             ({stale_in:?} more): retry with --wait longer than that"
        ),
    };
    let check = || {
        if lease.is_valid() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "customer {id}: lost the lease while deleting (the store was too slow to renew it); nothing is half-visible: run the delete again to finish"
            ))
        }
    };
    // Fenced like any takeover: a holder paused with uploads under way
    // must find its slots taken when it wakes, not land them after the
    // delete.
    let holder = lease.record().holder;
    let fences = crate::tenant::claim::fence_for_delete(store, id, &lease, &holder)
        .await
        .map_err(|e| anyhow::anyhow!("customer {id}: cannot fence its log for the delete: {e}"))?;
    let first_fence = fences
        .iter()
        .filter_map(|k| keys::log_seq(k))
        .min()
        .expect("a delete always fences a window");
    let log_end = first_fence + fences.len() as u64 - 1;
    check()?;
    write_tombstone(store, id, log_end).await?;
    // The original app's copy first: with db.sqlite3 gone, it would be
    // imported as the tenant's database.
    check()?;
    delete_key(store, &legacy).await?;
    check()?;
    delete_key(store, &keys::database(id.as_str())).await?;
    // The tenant no longer exists, and may be created again at any moment:
    // from here on only the deleted life's objects go (`of_the_deleted_life`),
    // whatever a stall past the lease let happen meanwhile.
    check()?;
    let rest = store
        .list(&prefix, None)
        .await
        .with_context(|| format!("cannot list {prefix}"))?;
    let rest: Vec<String> = rest
        .into_iter()
        .map(|l| l.key)
        .filter(|k| of_the_deleted_life(id, k, first_fence))
        .collect();
    let objects = rest.len() + 2;
    let mut deletions = futures::stream::iter(rest.into_iter().map(|key| {
        let store = store.clone();
        async move { delete_key(&store, &key).await }
    }))
    .buffer_unordered(8);
    while let Some(done) = deletions.next().await {
        done?;
    }
    if let Err(e) = super::migrations::status::remove(store, id.as_str()).await {
        tracing::warn!(customer_id = %id, error = %e, "could not remove the tenant's migration records");
    }
    // The lock last, and only while it is still this delete's: a machine
    // that took it after a stall serves the tenant created again. (A lock
    // taken between this read and the delete is lost as one deleted by
    // hand is: its holder's fences keep the log safe, docs/protocol.md.)
    if lease.is_valid()
        && lease
            .still_ours()
            .await
            .with_context(|| format!("cannot read {lock}"))?
    {
        // Stop renewing (no release: the lock goes), then delete it.
        drop(lease);
        delete_key(store, &lock).await?;
    } else {
        tracing::warn!(customer_id = %id, "this delete's lease lapsed, or the lock names another acquisition now (the tenant may have been created again while the delete stalled); the lock is left to its next holder");
    }
    info!(customer_id = %id, objects, "tenant deleted");
    Ok(Deleted::Deleted)
}

/// Whether `key`, listed after a delete removed `db.sqlite3`, is the
/// deleted life's: its log below the delete's fences (every later life's
/// slots are above them: creation starts after the tombstone), snapshots
/// archived from those slots, and anything tenantd never writes. Never the
/// snapshot, the lock or the tombstone, which may be a later life's.
fn of_the_deleted_life(id: &TenantId, key: &str, first_fence: u64) -> bool {
    if let Some(seq) = keys::log_seq(key) {
        return seq < first_fence;
    }
    if let Some(seq) = keys::archive_seq(key) {
        return seq < first_fence;
    }
    let id = id.as_str();
    ![keys::database(id), keys::lock(id), keys::tombstone(id)].contains(&key.to_string())
}

async fn delete_key(store: &DynStore, key: &str) -> anyhow::Result<()> {
    store
        .delete(key)
        .await
        .with_context(|| format!("cannot delete {key}"))
}

/// One tenant of a listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TenantInfo {
    pub customer_id: String,
    /// Size of its database object.
    pub bytes: u64,
    /// When its database object was last written (RFC 3339).
    pub last_modified: Option<String>,
    /// The machine holding its lease, if one does.
    pub holder: Option<String>,
}

/// Every tenant in the store, by id: those with a `db.sqlite3`, and those
/// with only the original app's copy. `holder` is read from each lock.
pub async fn list(store: &DynStore) -> anyhow::Result<Vec<TenantInfo>> {
    let mut found = std::collections::BTreeMap::new();
    for (prefix, legacy) in [("customer/", false), ("/customer/", true)] {
        let listed = store
            .list(prefix, None)
            .await
            .with_context(|| format!("cannot list {prefix}"))?;
        for entry in listed {
            let Some(id) = entry
                .key
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix("/db.sqlite3"))
                .and_then(|id| TenantId::parse(id).ok())
            else {
                continue;
            };
            if legacy && found.contains_key(&id) {
                continue;
            }
            found.insert(id, (entry.size, entry.last_modified));
        }
    }
    let infos = futures::stream::iter(found.into_iter().map(|(id, (bytes, modified))| {
        let store = store.clone();
        async move { info_of(&store, id, bytes, modified).await }
    }))
    .buffered(16)
    .collect::<Vec<_>>()
    .await;
    infos
        .into_iter()
        .map(|i| i.context("cannot read a tenant's lock"))
        .collect()
}

async fn info_of(
    store: &DynStore,
    id: TenantId,
    bytes: u64,
    modified: Option<SystemTime>,
) -> StoreResult<TenantInfo> {
    let holder = match read_lock(store, &keys::lock(id.as_str())).await? {
        LockState::Held { record, .. } => Some(record.holder),
        _ => None,
    };
    Ok(TenantInfo {
        customer_id: id.to_string(),
        bytes,
        last_modified: modified.map(rfc3339),
        holder,
    })
}

fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::lease::LeaseConfig;
    use crate::store::MemoryStore;
    use crate::store::hooked::Op;

    fn id(text: &str) -> TenantId {
        TenantId::parse(text).unwrap()
    }

    #[tokio::test]
    async fn create_is_idempotent_and_makes_the_tenant_exist() {
        let store: DynStore = Arc::new(MemoryStore::new());
        assert!(!tenant_exists(&store, &id("7")).await.unwrap());
        assert_eq!(create(&store, &id("7")).await.unwrap(), Created::Created);
        assert!(tenant_exists(&store, &id("7")).await.unwrap());
        let first = store.head(&keys::database("7")).await.unwrap().unwrap();
        assert_eq!(create(&store, &id("7")).await.unwrap(), Created::Exists);
        let second = store.head(&keys::database("7")).await.unwrap().unwrap();
        assert_eq!(
            first.etag, second.etag,
            "an existing tenant is not rewritten"
        );
        assert_eq!(first.metadata["tenantd-epoch"], "0");
        assert_eq!(first.metadata["tenantd-seq"], "0");
    }

    #[tokio::test]
    async fn the_original_apps_copy_makes_a_tenant_exist() {
        let store: DynStore = Arc::new(MemoryStore::new());
        store
            .put(
                &keys::legacy_database("8"),
                "old".into(),
                Metadata::new(),
                Precondition::IfAbsent,
            )
            .await
            .unwrap();
        assert!(tenant_exists(&store, &id("8")).await.unwrap());
        assert_eq!(create(&store, &id("8")).await.unwrap(), Created::Exists);
        assert!(
            store.head(&keys::database("8")).await.unwrap().is_none(),
            "creating must not hide the original app's copy"
        );
    }

    fn deleter(store: &DynStore, machine: &str, wait: Duration) -> Deleter {
        Deleter {
            lease: Session::new(
                store.clone(),
                LeaseConfig::new(machine, "cli", Duration::from_secs(2)),
            ),
            wait,
        }
    }

    async fn keys_of(store: &DynStore, prefix: &str) -> Vec<String> {
        let listed = store.list(prefix, None).await.unwrap();
        listed.into_iter().map(|l| l.key).collect()
    }

    async fn put(store: &DynStore, key: &str) {
        store
            .put(key, "x".into(), Metadata::new(), Precondition::None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn list_finds_database_and_legacy_tenants_only() {
        let store: DynStore = Arc::new(MemoryStore::new());
        create(&store, &id("a")).await.unwrap();
        put(&store, &keys::legacy_database("old")).await;
        put(&store, &keys::log_slot("a", 1)).await;
        put(&store, "customer/b/machine.lock").await;
        put(&store, "machines/m1/heartbeat.json").await;
        let listed = list(&store).await.unwrap();
        let ids: Vec<&str> = listed.iter().map(|t| t.customer_id.as_str()).collect();
        assert_eq!(ids, ["a", "old"]);
        assert!(listed.iter().all(|t| t.holder.is_none() && t.bytes > 0));
    }

    #[tokio::test]
    async fn delete_removes_every_object_of_the_tenant_and_nothing_else() {
        let store: DynStore = Arc::new(MemoryStore::new());
        create(&store, &id("a")).await.unwrap();
        create(&store, &id("ab")).await.unwrap();
        put(&store, &keys::legacy_database("a")).await;
        for seq in 1..=3 {
            put(&store, &keys::log_slot("a", seq)).await;
        }
        put(&store, &keys::archive("a", 2)).await;
        let wait = Duration::from_secs(1);
        let deleted = delete(&store, &id("a"), &deleter(&store, "cli-1", wait))
            .await
            .unwrap();
        assert_eq!(deleted, Deleted::Deleted);
        assert!(!tenant_exists(&store, &id("a")).await.unwrap());
        // Only the deleter's fences stay, after the log's last slot, and
        // the tombstone that names the last of them.
        let left = keys_of(&store, "customer/a/").await;
        let mut kept: Vec<String> = vec![keys::tombstone("a")];
        kept.extend((4..=7).map(|seq| keys::log_slot("a", seq)));
        kept.sort();
        assert_eq!(left, kept);
        let tombstone = read_tombstone(&store, &id("a")).await.unwrap().unwrap();
        assert_eq!(tombstone.log_end, 7);
        assert!(
            tenant_exists(&store, &id("ab")).await.unwrap(),
            "a neighbour survives"
        );
        let again = delete(&store, &id("a"), &deleter(&store, "cli-1", wait))
            .await
            .unwrap();
        assert_eq!(again, Deleted::Absent);
    }

    /// Store hooks under which the tenant lives again the moment its delete has
    /// removed `db.sqlite3`: as if the delete stalled there past its lease
    /// (a paused CLI, a slow store) while the tenant was created again and
    /// another machine took its lock and committed.
    #[derive(Debug)]
    struct Reborn {
        inner: DynStore,
        id: TenantId,
        reborn: std::sync::Mutex<bool>,
    }

    impl Reborn {
        async fn live_again(&self) {
            let id = self.id.as_str();
            assert_eq!(
                create(&self.inner, &self.id).await.unwrap(),
                Created::Created
            );
            let start = read_tombstone(&self.inner, &self.id)
                .await
                .unwrap()
                .expect("the delete wrote its tombstone before the snapshot went")
                .log_end;
            put(&self.inner, &keys::log_slot(id, start + 1)).await;
            put(&self.inner, &keys::archive(id, start)).await;
            let lock = keys::lock(id);
            let mut record: serde_json::Value =
                serde_json::from_slice(&self.inner.get(&lock).await.unwrap().unwrap().body)
                    .unwrap();
            record["holder"] = "m-new".into();
            record["token"] = uuid::Uuid::new_v4().to_string().into();
            let body = serde_json::to_vec(&record).unwrap();
            self.inner
                .put(&lock, body.into(), Metadata::new(), Precondition::None)
                .await
                .unwrap();
        }
    }

    #[async_trait::async_trait]
    impl crate::store::Hooks for Reborn {
        async fn after(&self, op: Op, key: &str) {
            let first = op == Op::Delete
                && key == keys::database(self.id.as_str())
                && !std::mem::replace(&mut *self.reborn.lock().unwrap(), true);
            if first {
                self.live_again().await;
            }
        }
    }

    /// Found by the log model (seed 13077): a delete removed everything it
    /// listed after the snapshot, a re-created tenant's snapshot, log,
    /// archives and lock included.
    #[tokio::test]
    async fn a_delete_stalled_past_its_lease_leaves_the_tenant_created_again_whole() {
        let inner: DynStore = Arc::new(MemoryStore::new());
        create(&inner, &id("a")).await.unwrap();
        for seq in 1..=3 {
            put(&inner, &keys::log_slot("a", seq)).await;
        }
        put(&inner, &keys::archive("a", 2)).await;
        let reborn = Reborn {
            inner: inner.clone(),
            id: id("a"),
            reborn: Default::default(),
        };
        let store: DynStore = Arc::new(crate::store::Hooked::new(inner.clone(), reborn));
        let deleter = deleter(&store, "cli-1", Duration::from_secs(1));
        assert_eq!(
            delete(&store, &id("a"), &deleter).await.unwrap(),
            Deleted::Deleted
        );

        let left = keys_of(&inner, "customer/a/").await;
        // The old life's log (1..=3) and archive are gone; the delete's
        // fences (4..=7) and tombstone stay; the new life is whole.
        let mut whole = vec![
            keys::database("a"),
            keys::lock("a"),
            keys::tombstone("a"),
            keys::archive("a", 7),
        ];
        whole.extend((4..=8).map(|seq| keys::log_slot("a", seq)));
        whole.sort();
        assert_eq!(left, whole);
        let LockState::Held { record, .. } = read_lock(&inner, &keys::lock("a")).await.unwrap()
        else {
            panic!("the new holder's lock is gone");
        };
        assert_eq!(record.holder, "m-new");
        assert!(tenant_exists(&inner, &id("a")).await.unwrap());
    }

    #[tokio::test]
    async fn delete_waits_for_a_live_holder_and_then_names_it() {
        let store: DynStore = Arc::new(MemoryStore::new());
        create(&store, &id("a")).await.unwrap();
        let config = LeaseConfig::new("m-holder", "10.0.0.1:3000", Duration::from_secs(2));
        let mut holder = Contender::new(
            store.clone(),
            keys::lock("a"),
            Session::new(store.clone(), config),
        );
        let Acquire::Acquired(lease) = holder.try_acquire().await.unwrap() else {
            panic!("the holder must acquire");
        };
        let error = delete(
            &store,
            &id("a"),
            &deleter(&store, "cli-2", Duration::from_millis(300)),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("m-holder") && error.contains("DELETE /_admin/tenants/a"),
            "{error}"
        );
        assert!(
            tenant_exists(&store, &id("a")).await.unwrap(),
            "nothing deleted"
        );
        // Once the holder lets go, the delete goes through.
        lease.release().await.unwrap();
        let deleted = delete(
            &store,
            &id("a"),
            &deleter(&store, "cli-2", Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert_eq!(deleted, Deleted::Deleted);
    }
}
