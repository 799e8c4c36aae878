//! One tenant's replica on a machine that does not hold it: the snapshot
//! plus the log's objects, applied with the claim's own rules
//! ([`log::replay`] and [`Replayed::extend`]: contiguous slots only, a
//! deposed holder's objects skipped by epoch, every checksum checked).
//!
//! Why it never shows a state that could be lost: it applies only objects
//! that are in the store's log, in slot order, with no gap. Every later
//! claim replays that same contiguous run with the same rules (slots are
//! put-if-absent and deltas are deleted only under a snapshot that covers
//! them), so the state after any slot it shows is the state every future
//! holder has after that slot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;
use tokio::time::Instant;

use crate::TenantId;
use crate::store::{DynStore, keys};
use crate::tenant::delta::PageSums;
use crate::tenant::log::{self, Fetched, LogError, Replayed, Until};

/// Slots fetched at once while catching up.
const FETCH_AHEAD: usize = 8;

pub struct Replica {
    pub id: TenantId,
    pub path: PathBuf,
    /// `None` until built (and again after anything went wrong with it).
    pub state: Arc<RwLock<Option<State>>>,
    pub last_used: std::sync::Mutex<Instant>,
    /// The replica's slot after each change (pushes wake readers).
    pub applied: tokio::sync::watch::Sender<u64>,
    /// Slots applied, by source.
    counted: prometheus::IntCounterVec,
}

pub struct State {
    replayed: Replayed,
    sums: PageSums,
    /// When the replica last held every write acknowledged by then: the
    /// send time of a position query it caught up to, or the start of a
    /// catch-up that read the log to its end.
    pub fresh_at: Option<Instant>,
}

impl State {
    /// The last slot applied: the bookmark of what it answers.
    pub fn slot(&self) -> u64 {
        self.replayed.contiguous_end
    }
}

/// How far to catch up.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// At least this slot (a bookmark, or the holder's confirmed slot).
    Slot(u64),
    /// Every object in the log as of `asked` (when the request arrived):
    /// every write acknowledged by then is there.
    LogEnd { asked: Instant },
}

impl Replica {
    pub fn new(id: TenantId, path: PathBuf, counted: prometheus::IntCounterVec) -> Replica {
        Replica {
            id,
            path,
            state: Arc::new(RwLock::new(None)),
            last_used: std::sync::Mutex::new(Instant::now()),
            applied: tokio::sync::watch::channel(0).0,
            counted,
        }
    }

    /// Brings the replica to `target` before `deadline`. On an error the
    /// replica is dropped, to be built again from the store.
    ///
    /// Runs as its own task: an apply cut off part way (the reader's
    /// connection closed) would leave the run advanced, the sums taken and
    /// the file still being written while readers come in.
    pub async fn catch_up(
        self: &Arc<Self>,
        store: &DynStore,
        target: Target,
        deadline: Instant,
    ) -> Result<u64, LogError> {
        let (replica, store) = (self.clone(), store.clone());
        tokio::spawn(async move { replica.catch_up_whole(&store, target, deadline).await })
            .await
            .map_err(|e| LogError::Local(format!("catching the replica up failed: {e}")))?
    }

    async fn catch_up_whole(
        &self,
        store: &DynStore,
        target: Target,
        deadline: Instant,
    ) -> Result<u64, LogError> {
        let mut guard = self.state.write().await;
        let started = Instant::now();
        // Held every write acknowledged by the time this request arrived:
        // a catch-up (or a position query) that began after it did the work.
        if let (Target::LogEnd { asked }, Some(state)) = (target, guard.as_ref())
            && state.fresh_at.is_some_and(|at| at >= asked)
        {
            return Ok(state.slot());
        }
        // The deadline is checked between steps, never by dropping one: an
        // apply cut off half way would leave the file ahead of its sums.
        let result = loop {
            if Instant::now() > deadline {
                return Err(LogError::Raced(format!(
                    "customer {}: the replica could not catch up in time",
                    self.id
                )));
            }
            if guard.is_none() {
                match build(store, &self.id, &self.path).await {
                    Ok(state) => *guard = Some(state),
                    Err(e) => break Err(e),
                }
            }
            let state = guard.as_mut().expect("built above");
            let before = state.slot();
            let advanced = advance(store, &self.id, &self.path, state, target, deadline).await;
            if state.slot() > before {
                self.counted
                    .with_label_values(&["log"])
                    .inc_by(state.slot() - before);
                self.applied.send_replace(state.slot());
            }
            match advanced {
                Ok(Advanced::Done) => break Ok(state.slot()),
                // A compaction removed deltas the replica still needed:
                // the snapshot covers them now.
                Ok(Advanced::Compacted) => *guard = None,
                Ok(Advanced::Waiting) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(slot) => {
                if let (Target::LogEnd { .. }, Some(state)) = (target, guard.as_mut()) {
                    state.fresh_at = Some(started);
                }
                Ok(slot)
            }
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }
}

impl Replica {
    /// Copies the replica's file to `dest` (a new holder's start), with
    /// the checksums and run it stands for; `None` when there is none.
    pub(crate) async fn copy_to(&self, dest: &Path) -> Option<(PageSums, Replayed)> {
        let guard = self.state.read().await;
        let state = guard.as_ref()?;
        let (from, to) = (self.path.clone(), dest.to_path_buf());
        let copied = tokio::task::spawn_blocking(move || std::fs::copy(&from, &to)).await;
        matches!(copied, Ok(Ok(_))).then(|| (state.sums.clone(), state.replayed.clone()))
    }

    /// Applies a pushed object when it is the replica's next slot (the
    /// claim's rules decide whether it is history); false otherwise. Runs
    /// as its own task, as [`Replica::catch_up`] does: a push handler is
    /// dropped when the holder's connection closes (a killed holder).
    pub async fn accept(self: &Arc<Self>, fetched: Fetched) -> bool {
        let replica = self.clone();
        tokio::spawn(async move { replica.accept_whole(fetched).await })
            .await
            .unwrap_or(false)
    }

    async fn accept_whole(&self, fetched: Fetched) -> bool {
        let mut guard = self.state.write().await;
        let Some(state) = guard.as_mut() else {
            return false;
        };
        if fetched.delta.seq != state.slot() + 1 {
            return false;
        }
        match state
            .replayed
            .extend(self.id.as_str(), &self.path, &mut state.sums, fetched)
            .await
        {
            Ok(()) => {
                self.counted.with_label_values(&["push"]).inc();
                self.applied.send_replace(state.slot());
                true
            }
            Err(e) => {
                tracing::warn!(customer_id = %self.id, error = %e, "a pushed object does not continue the replica; dropping it");
                *guard = None;
                false
            }
        }
    }
}

enum Advanced {
    Done,
    Compacted,
    /// The slot asked for is not readable yet.
    Waiting,
}

/// Applies the log after the replica's last slot, up to `target`.
async fn advance(
    store: &DynStore,
    id: &TenantId,
    path: &Path,
    state: &mut State,
    target: Target,
    deadline: Instant,
) -> Result<Advanced, LogError> {
    // Reading to the log's end, a replica is usually at it or near it (the
    // holder pushes): the next slot alone is asked first, and the window
    // doubles while every slot asked for was there.
    let mut window = 1;
    loop {
        let from = state.slot() + 1;
        let upto = match target {
            Target::Slot(slot) if state.slot() >= slot => return Ok(Advanced::Done),
            Target::Slot(slot) => slot.min(from + FETCH_AHEAD as u64 - 1),
            Target::LogEnd { .. } => from + window - 1,
        };
        window = (window * 2).min(FETCH_AHEAD as u64);
        let fetches = futures::future::try_join_all(
            (from..=upto).map(|seq| log::fetch_slot(store, id.as_str(), seq)),
        );
        let Ok(fetched) = tokio::time::timeout_at(deadline, fetches).await else {
            return Ok(Advanced::Waiting);
        };
        let fetched: Vec<Option<Fetched>> = fetched?;
        for object in fetched {
            match object {
                Some(object) => {
                    state
                        .replayed
                        .extend(id.as_str(), path, &mut state.sums, object)
                        .await?
                }
                None => {
                    if compacted_past(store, id, state.slot()).await? {
                        return Ok(Advanced::Compacted);
                    }
                    return Ok(match target {
                        Target::LogEnd { .. } => Advanced::Done,
                        Target::Slot(_) => Advanced::Waiting,
                    });
                }
            }
        }
    }
}

/// Whether the snapshot now covers the slot after `slot` (deltas it
/// covers may be gone).
async fn compacted_past(store: &DynStore, id: &TenantId, slot: u64) -> Result<bool, LogError> {
    let key = keys::database(id.as_str());
    Ok(match store.head(&key).await? {
        Some(meta) => log::describe_snapshot(&key, meta.etag, &meta.metadata)?.seq > slot,
        None => false,
    })
}

/// The snapshot and the log after it, as a new holder would rebuild them.
async fn build(store: &DynStore, id: &TenantId, path: &Path) -> Result<State, LogError> {
    let key = keys::database(id.as_str());
    let object = store.get(&key).await?.ok_or_else(|| {
        LogError::Local(format!("customer {id} has no snapshot ({key}) to follow"))
    })?;
    let snapshot = log::describe_snapshot(&key, object.etag.clone(), &object.metadata)?;
    if snapshot.legacy {
        return Err(LogError::Local(format!(
            "{key} is not in the commit-log format yet (its first holder converts it); the holder answers"
        )));
    }
    let recorded = log::recorded_checksum(&key, &object.metadata)?;
    let (owned, body) = (path.to_path_buf(), object.body);
    let sums = tokio::task::spawn_blocking(move || -> Result<PageSums, String> {
        if let Some(dir) = owned.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::write(&owned, &body).map_err(|e| e.to_string())?;
        PageSums::of_file(&owned).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| LogError::Local(e.to_string()))?
    .map_err(|e| LogError::Local(format!("cannot write the replica {}: {e}", path.display())))?;
    if let Some(recorded) = recorded
        && recorded != sums.checksum()
    {
        return Err(LogError::Corrupt(format!(
            "checksum mismatch in {key}: its metadata says {recorded:016x}, its pages give {:016x}",
            sums.checksum()
        )));
    }
    let mut sums = sums;
    let replayed = log::replay(store, id.as_str(), path, &snapshot, &mut sums, Until::End).await?;
    Ok(State {
        replayed,
        sums,
        fresh_at: None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{Replica, Target};
    use crate::TenantId;
    use crate::metrics::Metrics;
    use crate::store::{DynStore, InstrumentedStore, MemoryStore};
    use crate::tenant::delta::{self, Delta, Kind, PageSums};
    use crate::tenant::log::Fetched;

    /// A replica that is at the log's end and reads it to its end again
    /// (a follower whose holder did not say where it is) costs the next
    /// slot's read and the snapshot's head, not a whole fetch-ahead window.
    #[tokio::test]
    async fn reading_to_the_log_end_at_its_end_reads_one_slot() {
        let metrics = Metrics::new();
        let store: DynStore = Arc::new(InstrumentedStore::new(
            Arc::new(MemoryStore::new()),
            metrics.clone(),
        ));
        let id = TenantId::parse("7").unwrap();
        crate::tenant::lifecycle::create(&store, &id).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let replica = Arc::new(Replica::new(
            id.clone(),
            dir.path().join("7.sqlite3"),
            metrics.follower_slots.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        replica.catch_up(&store, log_end(), deadline).await.unwrap();
        let before = requests(&metrics);
        replica.catch_up(&store, log_end(), deadline).await.unwrap();
        let cost = requests(&metrics) - before;
        assert!(
            cost <= 2,
            "reading to the log's end from its end cost {cost} store requests"
        );
    }

    /// A push whose handler is dropped part way (the holder was killed and
    /// its connection closed) leaves a replica that either has the slot
    /// applied whole, its sums matching its file, or none to answer from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_apply_cut_off_part_way_never_leaves_a_replica_to_answer_from() {
        let metrics = Metrics::new();
        let store: DynStore = Arc::new(MemoryStore::new());
        let id = TenantId::parse("7").unwrap();
        crate::tenant::lifecycle::create(&store, &id).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("7.sqlite3");
        let replica = Arc::new(Replica::new(
            id.clone(),
            path.clone(),
            metrics.follower_slots.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        replica.catch_up(&store, log_end(), deadline).await.unwrap();
        let fetched = big_delta(&path, dir.path());
        // One poll: the apply is under way on a blocking thread when the
        // future is dropped.
        let cut = futures::FutureExt::now_or_never(replica.accept(fetched));
        assert!(cut.is_none(), "the apply finished within one poll");
        let consistent = || async {
            let state = replica.state.read().await;
            if let Some(state) = state.as_ref() {
                let on_disk = PageSums::of_file(&path).unwrap().checksum();
                assert_eq!(
                    state.sums.checksum(),
                    on_disk,
                    "the replica answers at slot {} from a file its sums do not describe",
                    state.slot()
                );
            }
            state.as_ref().map(|s| s.slot())
        };
        consistent().await;
        // The push, once begun, is applied whole.
        let mut applied = replica.applied.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|s| *s >= 1)).await;
        assert_eq!(consistent().await, Some(1));
    }

    /// Slot 1 on a new tenant's snapshot: a table with a few MB of rows.
    fn big_delta(base: &std::path::Path, dir: &std::path::Path) -> Fetched {
        let changed = dir.join("changed.sqlite3");
        std::fs::copy(base, &changed).unwrap();
        {
            let conn = rusqlite::Connection::open(&changed).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE blobs(b BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO blobs SELECT randomblob(4000) FROM n;
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        }
        let before = PageSums::of_file(base).unwrap();
        let after = PageSums::of_file(&changed).unwrap();
        let (db_pages, pages) = delta::diff_files(base, &changed).unwrap();
        let delta = Delta {
            kind: Kind::Delta,
            epoch: 1,
            seq: 1,
            committed_at_ms: 0,
            page_size: 4096,
            db_pages,
            pre_checksum: before.checksum(),
            post_checksum: after.checksum(),
            pages,
        };
        Fetched {
            delta,
            token: None,
            bytes: 0,
        }
    }

    fn log_end() -> Target {
        Target::LogEnd {
            asked: Instant::now(),
        }
    }

    /// Readers that arrived before a read of the log's end began need no
    /// read of their own once it is done: under load, when the holder is
    /// slow to say where it is, they queue behind one another.
    #[tokio::test]
    async fn reads_to_the_log_end_queued_behind_one_share_it() {
        let metrics = Metrics::new();
        let store: DynStore = Arc::new(InstrumentedStore::new(
            Arc::new(MemoryStore::new()),
            metrics.clone(),
        ));
        let id = TenantId::parse("7").unwrap();
        crate::tenant::lifecycle::create(&store, &id).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let replica = Arc::new(Replica::new(
            id.clone(),
            dir.path().join("7.sqlite3"),
            metrics.follower_slots.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let asked = Target::LogEnd {
            asked: Instant::now(),
        };
        replica.catch_up(&store, asked, deadline).await.unwrap();
        let before = requests(&metrics);
        replica.catch_up(&store, asked, deadline).await.unwrap();
        let cost = requests(&metrics) - before;
        assert_eq!(
            cost, 0,
            "a second read of the log's end for the same arrival"
        );
        // One that arrived after it began reads again.
        replica.catch_up(&store, log_end(), deadline).await.unwrap();
        assert!(requests(&metrics) > before);
    }

    fn requests(metrics: &Metrics) -> u64 {
        ["get", "head", "list"]
            .iter()
            .map(|op| metrics.store_requests.with_label_values(&[op, "ok"]).get())
            .sum()
    }
}
