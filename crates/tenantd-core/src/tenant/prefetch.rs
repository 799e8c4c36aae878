//! A takeover's reads started before its lease is settled: the snapshot's
//! HEAD, its download into a file of its own and the log after it (listed,
//! the first deltas fetched), while the lock is read and written. A cold
//! start then costs about the download plus the round trips that need the
//! lease (its lock write, the fences, the snapshot checked again).
//!
//! Safe because nothing read here is used before the lease is held: the
//! claim takes the file and the plan only under the lease, and then does
//! what it does with bytes it read itself (docs/protocol.md, "Claim"): the
//! snapshot's ETag must match its HEAD, the checksum chain is checked, the
//! fences find every slot the listing missed, and the snapshot is read
//! again after the fences, so a compaction since these reads means "read
//! again", never state. Log objects are put-if-absent and never rewritten,
//! so reading them early reads the same bytes.

use std::path::{Path, PathBuf};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::claim::remove_copy;
use super::log::{self, LogError, Plan, Until};
use crate::TenantId;
use crate::store::{DynStore, ObjectMeta, keys};

/// Reads under way for one takeover. Dropped unused (the lock was held by
/// a live holder, the claim failed), it stops them and removes its file.
pub struct Prefetch {
    task: Option<JoinHandle<Result<Prefetched, String>>>,
    temp: PathBuf,
}

/// What a prefetch read: a commit-log snapshot in a file, and its log.
pub(crate) struct Prefetched {
    pub head: ObjectMeta,
    pub object: ObjectMeta,
    pub plan: Result<Plan, LogError>,
    /// When the reads began and how long each took (for the claim's log line).
    pub began: Instant,
    pub head_ms: u64,
    pub download_ms: u64,
}

/// Starts the reads of a takeover of `id` whose working copies live in
/// `dir`. Only a commit-log snapshot is fetched; anything else (a new
/// tenant, a database to convert) is left to the claim.
pub fn start(store: &DynStore, dir: &Path, id: &TenantId) -> Prefetch {
    let temp = dir.join(format!("{id}.prefetch-{}.sqlite3", uuid::Uuid::new_v4()));
    let (store, owned, id, dir) = (store.clone(), temp.clone(), id.clone(), dir.to_path_buf());
    let task = tokio::spawn(async move {
        let began = Instant::now();
        let key = keys::database(id.as_str());
        let head = store
            .head(&key)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no snapshot")?;
        if !head.metadata.contains_key(log::FORMAT_KEY) {
            return Err("not a commit-log snapshot".to_string());
        }
        let snapshot = log::describe_snapshot(&key, head.etag.clone(), &head.metadata)
            .map_err(|e| e.to_string())?;
        let head_ms = began.elapsed().as_millis() as u64;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (object, plan) = tokio::join!(
            store.get_to_file(&key, &owned),
            log::plan(&store, id.as_str(), &snapshot, Until::End)
        );
        let object = object
            .map_err(|e| e.to_string())?
            .ok_or("the snapshot vanished")?;
        Ok(Prefetched {
            head,
            object,
            plan,
            began,
            head_ms,
            download_ms: began.elapsed().as_millis() as u64 - head_ms,
        })
    });
    Prefetch {
        task: Some(task),
        temp,
    }
}

impl Prefetch {
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
