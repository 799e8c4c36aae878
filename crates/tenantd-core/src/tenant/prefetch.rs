//! A takeover's reads started before its lease is settled: the snapshot's
//! download into a file of its own and, beside it, its HEAD and the log
//! after it (listed, the first deltas fetched), while the lock is read and
//! written ([`read_snapshot`], the claim's read step too). A cold
//! start then costs about the download plus the round trips that need the
//! lease (its lock write, the fences, the snapshot checked again).
//!
//! Safe because nothing read here is used before the lease is held: the
//! claim takes the file and the plan only under the lease, and then does
//! what it does with bytes it read itself (docs/protocol.md, "Claim"): the
//! snapshot's GET must show the ETag its HEAD showed, the checksum chain
//! is checked, the fences find every slot the listing missed, and the
//! snapshot is read again after the fences, so a compaction since these reads means "read
//! again", never state. Log objects are put-if-absent and never rewritten,
//! so reading them early reads the same bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::claim::remove_copy;
use super::delta::PageSums;
use super::follower::Followers;
use super::log::{self, LogError, Replayed, Snapshot, Until};
use super::migrations::{Head, read_head};
use crate::TenantId;
use crate::store::{DynStore, ETag, ObjectMeta, StoreError, keys};

/// Reads under way for one takeover. Dropped unused (the lock was held by
/// a live holder, the claim failed), it stops them and removes its file.
pub struct Prefetch {
    task: Option<JoinHandle<Result<Prefetched, String>>>,
    temp: PathBuf,
    /// Where the listed run after the snapshot ends, once listed.
    listed: watch::Receiver<Option<Listed>>,
    /// The snapshot as its HEAD showed it (`Some(None)`: no commit-log
    /// snapshot), once answered.
    described: watch::Receiver<Option<Option<Snapshot>>>,
    /// Fences sent at a released lock's `log_end` before the lock write,
    /// under the planned acquisition's token ([`super::claim::fence_early`]).
    pub(crate) early_fences: Option<(uuid::Uuid, JoinHandle<super::claim::Ahead>)>,
    /// The published migrations, read once the tenant was known to exist
    /// ([`Prefetch::read_migrations`]).
    migrations: Option<MigrationsRead>,
}

/// Where a released lock read beside the existence check says its
/// holder's log ended: `None` until the lock is read, then its `log_end`
/// (`None` for any other lock, or a failed read).
pub type LogEndHint = watch::Receiver<Option<Option<u64>>>;

/// The published migrations' head, being read.
pub(crate) type MigrationsRead = JoinHandle<Result<(Head, Option<ETag>), StoreError>>;

async fn hinted_end(hint: Option<LogEndHint>) -> Option<u64> {
    let mut hint = hint?;
    let seen = hint.wait_for(Option::is_some).await.ok()?;
    (*seen).flatten()
}

/// The snapshot a prefetch read (its ETag) and where the listing found
/// the contiguous run after it ending: enough to fence after, before the
/// deltas are fetched and replayed.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub snapshot: Option<ETag>,
    pub snapshot_epoch: u64,
    pub end: u64,
}

/// What a prefetch read and replayed, in its own file: a commit-log
/// snapshot (downloaded, or this machine's follower replica of the tenant)
/// and the log after it, every checksum checked as the claim checks them.
pub(crate) struct Prefetched {
    /// The snapshot as its HEAD showed it (checked again after the fences).
    pub snapshot: Snapshot,
    pub recorded: Option<u64>,
    pub sums: PageSums,
    pub replayed: Replayed,
    /// Whether it began from a follower replica rather than a download.
    pub from_replica: bool,
    /// When the reads began and when they were done (for the claim's log line).
    pub began: Instant,
    pub read_ms: u64,
    /// The claim's first fences, sent once the log was listed ([`super::claim`]).
    pub ahead: Option<JoinHandle<super::claim::Ahead>>,
}

/// Starts the reads of a takeover of `id` whose working copies live in
/// `dir`, from `replica` when this machine follows the tenant. Only a
/// commit-log snapshot is fetched; anything else (a new tenant, a database
/// to convert) is left to the claim.
pub fn start(
    store: &DynStore,
    dir: &Path,
    id: &TenantId,
    replica: Option<Arc<Followers>>,
    hint: Option<LogEndHint>,
) -> Prefetch {
    let temp = dir.join(format!("{id}.prefetch-{}.sqlite3", uuid::Uuid::new_v4()));
    let (store, owned, id, dir) = (store.clone(), temp.clone(), id.clone(), dir.to_path_buf());
    let (tell, listed) = watch::channel(None);
    let (describe, described) = watch::channel(None);
    let task = tokio::spawn(async move {
        let began = Instant::now();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Some(followers) = replica {
            match from_replica(&store, &id, &owned, &followers, began).await {
                Ok(prefetched) => return Ok(prefetched),
                Err(why) => {
                    debug!(customer_id = %id, why, "not taking over from the replica; downloading the snapshot");
                    remove_copy(&owned);
                }
            }
        }
        download(&store, &id, &owned, began, tell, describe, hint).await
    });
    Prefetch {
        task: Some(task),
        temp,
        listed,
        described,
        early_fences: None,
        migrations: None,
    }
}

/// The snapshot's HEAD, as a commit-log snapshot.
async fn head(store: &DynStore, key: &str) -> Result<(ObjectMeta, Snapshot), String> {
    let head = store
        .head(key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no snapshot")?;
    let snapshot = commit_log_snapshot(key, &head).ok_or("not a commit-log snapshot")?;
    Ok((head, snapshot))
}

/// The snapshot an object's metadata describes, when it is in the
/// commit-log format (anything else is the claim's to judge).
fn commit_log_snapshot(key: &str, meta: &ObjectMeta) -> Option<Snapshot> {
    if !meta.metadata.contains_key(log::FORMAT_KEY) {
        return None;
    }
    log::describe_snapshot(key, meta.etag.clone(), &meta.metadata)
        .ok()
        .filter(|snapshot| !snapshot.legacy)
}

/// The snapshot streamed into a file, with the log after it read beside
/// the download.
pub(crate) struct SnapshotRead {
    /// The object as its GET returned it (`None`: absent, no file
    /// written), its body at the path given.
    pub object: Option<ObjectMeta>,
    /// For a commit-log snapshot: how its HEAD described it and the log
    /// after it, listed with the first deltas fetched. Only when the HEAD
    /// showed the version the GET returned.
    pub planned: Option<(Snapshot, Result<log::Plan, LogError>)>,
    /// The HEAD and the GET saw different versions (a compaction between
    /// them): read again.
    pub changed: bool,
}

/// The read step of every takeover (the claim's, and a prefetch's): the
/// snapshot's GET starts at once, streaming its body to `path` (never
/// whole in memory; a failed download leaves no file there), while its
/// HEAD, and for a commit-log snapshot the log after it, are read beside
/// it. The download is on the critical path; the HEAD, the listing and
/// the first deltas are not (cold start ~ the download, not HEAD +
/// download).
pub(crate) async fn read_snapshot(
    store: &DynStore,
    id: &TenantId,
    key: &str,
    path: &Path,
) -> Result<SnapshotRead, StoreError> {
    read_snapshot_telling(store, id, key, path, Telling::default()).await
}

/// Who a prefetch's reads tell what as soon as they know it.
#[derive(Default)]
struct Telling {
    /// Where the listed run after the snapshot ends ([`log::plan_hinted`]),
    /// before the deltas are fetched.
    listed: Option<watch::Sender<Option<Listed>>>,
    /// The snapshot its HEAD describes.
    described: Option<watch::Sender<Option<Option<Snapshot>>>>,
    /// Where the log ends by the lock read beside (its slots fetched
    /// beside the listing).
    hint: Option<LogEndHint>,
}

/// [`read_snapshot`], telling what it learns as it goes ([`Telling`]).
async fn read_snapshot_telling(
    store: &DynStore,
    id: &TenantId,
    key: &str,
    path: &Path,
    telling: Telling,
) -> Result<SnapshotRead, StoreError> {
    let Telling {
        listed,
        described,
        hint,
    } = telling;
    let beside = async {
        let head = store.head(key).await;
        let snapshot = match &head {
            Ok(head) => head
                .as_ref()
                .and_then(|meta| commit_log_snapshot(key, meta)),
            Err(_) => None,
        };
        if let Some(described) = described {
            described.send_replace(Some(snapshot.clone()));
        }
        let head = head?;
        let planned = match snapshot {
            Some(snapshot) => {
                let plan = log::plan_hinted(
                    store,
                    id.as_str(),
                    &snapshot,
                    Until::End,
                    hinted_end(hint),
                    |end| {
                        if let Some(listed) = listed {
                            listed.send_replace(Some(Listed {
                                snapshot: snapshot.etag.clone(),
                                snapshot_epoch: snapshot.epoch,
                                end,
                            }));
                        }
                    },
                )
                .await;
                Some((snapshot, plan))
            }
            None => None,
        };
        Ok::<_, StoreError>((head, planned))
    };
    let (object, beside) = tokio::join!(store.get_to_file(key, path), beside);
    let object = object?;
    let (head, planned) = beside?;
    let changed =
        matches!((&head, &object), (Some(head), Some(object)) if head.etag != object.etag);
    let planned = match changed || object.is_none() {
        true => None,
        false => planned,
    };
    Ok(SnapshotRead {
        object,
        planned,
        changed,
    })
}

/// Downloads the snapshot into `temp` while the log after it is listed and
/// fetched, then replays it.
async fn download(
    store: &DynStore,
    id: &TenantId,
    temp: &Path,
    began: Instant,
    listed: watch::Sender<Option<Listed>>,
    described: watch::Sender<Option<Option<Snapshot>>>,
    hint: Option<LogEndHint>,
) -> Result<Prefetched, String> {
    let key = keys::database(id.as_str());
    let telling = Telling {
        listed: Some(listed),
        described: Some(described),
        hint,
    };
    let read = read_snapshot_telling(store, id, &key, temp, telling)
        .await
        .map_err(|e| e.to_string())?;
    if read.changed {
        return Err("the snapshot changed while it was read".to_string());
    }
    let object = read.object.ok_or("no snapshot")?;
    let (snapshot, plan) = read.planned.ok_or("not a commit-log snapshot")?;
    if object.size == 0 {
        return Err("the snapshot is empty".to_string());
    }
    let recorded = log::recorded_checksum(&key, &object.metadata).map_err(|e| e.to_string())?;
    let mut sums = sums_of(temp).await?;
    if let Some(recorded) = recorded
        && recorded != sums.checksum()
    {
        return Err("the snapshot does not match its recorded checksum".to_string());
    }
    let plan = plan.map_err(|e| e.to_string())?;
    let replayed = log::replay_planned(
        store,
        id.as_str(),
        temp,
        &snapshot,
        &mut sums,
        Until::End,
        plan,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Prefetched {
        snapshot,
        recorded,
        sums,
        replayed,
        from_replica: false,
        began,
        read_ms: began.elapsed().as_millis() as u64,
        ahead: None,
    })
}

/// Copies this machine's replica of the tenant into `temp` and replays the
/// log after it: no snapshot download, as long as the snapshot in the
/// store does not cover slots after the replica's (a compaction past it
/// may have deleted the deltas in between).
async fn from_replica(
    store: &DynStore,
    id: &TenantId,
    temp: &Path,
    followers: &Followers,
    began: Instant,
) -> Result<Prefetched, String> {
    let key = keys::database(id.as_str());
    // No replica here: give up at once, not after the HEAD (the download
    // waits for this). A copy under way is always waited for: the
    // download writes the same file next.
    let none = || "no replica of the tenant here".to_string();
    let (copy, head) = (followers.copy_replica(id, temp), head(store, &key));
    tokio::pin!(copy, head);
    let ((sums, mut replayed), head) = tokio::select! {
        // The copy first: without a replica it ends before the HEAD is sent.
        biased;
        copied = &mut copy => (copied.ok_or_else(none)?, head.await),
        head = &mut head => (copy.await.ok_or_else(none)?, head),
    };
    let (head, snapshot) = head?;
    if snapshot.seq > replayed.contiguous_end {
        return Err(format!(
            "the snapshot (slot {}) is newer than the replica (slot {})",
            snapshot.seq, replayed.contiguous_end
        ));
    }
    // The copy must be the state the replica's checksum chain ends in, as
    // a downloaded snapshot must match its recorded checksum.
    let mut copied = sums_of(temp).await?;
    if copied.checksum() != sums.checksum() {
        return Err(format!(
            "the replica's copy has checksum {:016x}, its chain says {:016x}",
            copied.checksum(),
            sums.checksum()
        ));
    }
    log::replay_onward(store, id.as_str(), temp, &mut copied, &mut replayed)
        .await
        .map_err(|e| e.to_string())?;
    let recorded = log::recorded_checksum(&key, &head.metadata).map_err(|e| e.to_string())?;
    Ok(Prefetched {
        snapshot,
        recorded,
        sums: copied,
        replayed,
        from_replica: true,
        began,
        read_ms: began.elapsed().as_millis() as u64,
        ahead: None,
    })
}

async fn sums_of(path: &Path) -> Result<PageSums, String> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || PageSums::of_file(&owned).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

impl Prefetch {
    /// Starts reading the published migrations, which the new holder
    /// applies before its first answer: beside the lease's writes rather
    /// than after them. Only once the tenant is known to exist.
    pub(crate) fn read_migrations(&mut self, store: &DynStore) {
        let store = store.clone();
        self.migrations = Some(tokio::spawn(async move { read_head(&store).await }));
    }

    /// The migrations read by [`Prefetch::read_migrations`], if started.
    pub(crate) fn migrations(&mut self) -> Option<MigrationsRead> {
        self.migrations.take()
    }

    /// The snapshot as its HEAD showed it, once answered (`None`: no
    /// commit-log snapshot, the HEAD failed, or the reads began from a
    /// replica).
    pub(crate) fn described(&self) -> impl std::future::Future<Output = Option<Snapshot>> + use<> {
        let mut described = self.described.clone();
        async move {
            let seen = described.wait_for(Option::is_some).await.ok()?;
            (*seen).clone().flatten()
        }
    }

    /// Waits until the log after the snapshot is listed (`None`: the
    /// reads ended without a listing, from a replica or failed).
    pub(crate) async fn listed(&mut self) -> Option<Listed> {
        let seen = self.listed.wait_for(|listed| listed.is_some()).await;
        seen.ok().and_then(|listed| listed.clone())
    }

    /// Waits for the reads and moves the downloaded snapshot to `path`, the
    /// claim's working copy. `None` when they failed: the claim reads
    /// everything itself.
    pub(crate) async fn take(mut self, id: &TenantId, path: &Path) -> Option<Prefetched> {
        let task = self.task.take()?;
        let prefetched = match task.await {
            Ok(Ok(prefetched)) => prefetched,
            Ok(Err(why)) => {
                debug!(customer_id = %id, why, "no prefetched snapshot; the claim reads it");
                return None;
            }
            Err(e) => {
                debug!(customer_id = %id, error = %e, "the prefetch ended early");
                return None;
            }
        };
        remove_copy(path);
        match std::fs::rename(&self.temp, path) {
            Ok(()) => Some(prefetched),
            Err(e) => {
                debug!(customer_id = %id, error = %e, "cannot move the prefetched snapshot; the claim reads it");
                None
            }
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        let temp = std::mem::take(&mut self.temp);
        match (self.task.take(), tokio::runtime::Handle::try_current()) {
            // A download stopped mid-write may still hold the file: remove
            // it once the task has really ended.
            (Some(task), Ok(runtime)) => {
                task.abort();
                runtime.spawn(async move {
                    let _ = task.await;
                    remove_copy(&temp);
                });
            }
            (task, _) => {
                if let Some(task) = task {
                    task.abort();
                }
                remove_copy(&temp);
            }
        }
    }
}
