//! The working copy: the holder's SQLite file, in WAL mode so that each
//! commit's pages can be read back from the WAL and shipped as a delta.
//!
//! Invariant: the main database file always holds exactly the state after
//! the last captured slot, and `sums` describes it. A commit adds frames to
//! the WAL only; [`WorkingCopy::capture`] reads them, updates the sums and
//! checkpoints them into the main file in one step. So a byte copy of the
//! main file taken between captures is the state at `slot`, whatever the
//! WAL holds — which is what a snapshot must be.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::db::Db;
use super::delta::{Delta, Kind, PageSums};
use super::wal;

pub struct WorkingCopy {
    pub db: Db,
    pub sums: PageSums,
    path: PathBuf,
    /// The slot whose state the main file holds.
    pub slot: u64,
    /// Bumped before every checkpoint (the only write to the main file):
    /// a copy taken without the lock is the state at `slot` if this did
    /// not move meanwhile.
    generation: u64,
}

impl WorkingCopy {
    pub fn new(db: Db, sums: PageSums, path: &Path, slot: u64) -> WorkingCopy {
        WorkingCopy {
            db,
            sums,
            path: path.to_path_buf(),
            slot,
            generation: 0,
        }
    }

    fn wal_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push("-wal");
        PathBuf::from(p)
    }

    /// Turns everything committed since the last capture into the delta
    /// for slot `seq`, and checkpoints it into the main file. `None` when
    /// nothing was committed.
    pub fn capture(&mut self, epoch: u64, seq: u64, now_ms: u64) -> Result<Option<Delta>, String> {
        let wal_path = self.wal_path();
        let Some(commit) = wal::read_committed(&wal_path).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let pre_checksum = self.sums.checksum();
        let pages: Vec<(u32, Bytes)> = commit.pages.into_iter().collect();
        self.sums.apply(commit.db_pages, &pages);
        self.generation += 1;
        self.db
            .checkpoint()
            .map_err(|e| format!("cannot checkpoint {}: {e}", wal_path.display()))?;
        self.slot = seq;
        Ok(Some(Delta {
            kind: Kind::Delta,
            epoch,
            seq,
            committed_at_ms: now_ms,
            page_size: commit.page_size,
            db_pages: commit.db_pages,
            pre_checksum,
            post_checksum: self.sums.checksum(),
            pages,
        }))
    }

    /// A copy of the main file (the state at `self.slot`) beside it, with
    /// its checksum: uploaded from disk, never read into memory.
    pub fn snapshot(&self) -> std::io::Result<(u64, SnapshotFile, u64)> {
        let file = SnapshotFile::copy_of(&self.path)?;
        Ok((self.slot, file, self.sums.checksum()))
    }

    /// A snapshot copied while commits go on: the copy is made without
    /// holding `copy`'s lock (commits only append to the WAL; only a
    /// capture's checkpoint writes the main file) and kept if no
    /// checkpoint ran meanwhile and its pages give the checksum recorded
    /// for that slot. After a few tries it falls back to a copy under the
    /// lock (commits wait for that one).
    pub fn snapshot_unlocked(
        copy: &std::sync::Mutex<WorkingCopy>,
    ) -> std::io::Result<(u64, SnapshotFile, u64)> {
        Self::snapshot_unlocked_by(copy, SnapshotFile::copy_of)
    }

    /// [`WorkingCopy::snapshot_unlocked`] with the byte copy made by
    /// `copier` (a test runs commits from inside it).
    fn snapshot_unlocked_by(
        copy: &std::sync::Mutex<WorkingCopy>,
        copier: impl Fn(&Path) -> std::io::Result<SnapshotFile>,
    ) -> std::io::Result<(u64, SnapshotFile, u64)> {
        let lock = || copy.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..3 {
            let (path, slot, checksum, generation) = {
                let copy = lock();
                (
                    copy.path.clone(),
                    copy.slot,
                    copy.sums.checksum(),
                    copy.generation,
                )
            };
            let file = copier(&path)?;
            if lock().generation != generation {
                continue;
            }
            // Belt and braces: the bytes are the state at `slot`.
            if super::delta::PageSums::of_file(file.path())?.checksum() == checksum {
                return Ok((slot, file, checksum));
            }
        }
        lock().snapshot()
    }

    /// Size of the main file.
    pub fn db_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// A snapshot's bytes in a file of their own (a copy of the working
/// database, or a download), removed when the last clone is dropped: what
/// a snapshot upload streams from, so that a database of any size moves
/// without being held in memory.
#[derive(Clone, Debug)]
pub struct SnapshotFile(Arc<Owned>);

#[derive(Debug)]
struct Owned {
    path: PathBuf,
    len: u64,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the snapshot files (`<id>.<epoch>.sqlite3.snapshot.<uuid>`) of
/// tenant `id`'s earlier holdings in `dir`: only a killed process leaves
/// them (a running one removes its own on drop), and a new acquisition's
/// copy has a name of its own, so none of them is ever read as state; this
/// only frees the disk.
pub fn remove_leftover_snapshots(dir: &Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{id}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.contains(".sqlite3.snapshot.") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl SnapshotFile {
    /// A new, unused name beside `path` (`<name>.snapshot.<uuid>`).
    pub fn name_beside(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".snapshot.{}", uuid::Uuid::new_v4().simple()));
        PathBuf::from(name)
    }

    /// Copies `path` to a new file beside it (`copy_file_range` where the
    /// file system has it: no bytes pass through this process).
    pub fn copy_of(path: &Path) -> std::io::Result<SnapshotFile> {
        let target = Self::name_beside(path);
        match std::fs::copy(path, &target) {
            Ok(len) => Ok(Self::adopt(target, len)),
            Err(e) => {
                let _ = std::fs::remove_file(&target);
                Err(e)
            }
        }
    }

    /// Writes `bytes` to a new file beside `path`.
    pub fn write_beside(path: &Path, bytes: &[u8]) -> std::io::Result<SnapshotFile> {
        let target = Self::name_beside(path);
        match std::fs::write(&target, bytes) {
            Ok(()) => Ok(Self::adopt(target, bytes.len() as u64)),
            Err(e) => {
                let _ = std::fs::remove_file(&target);
                Err(e)
            }
        }
    }

    /// Takes ownership of the file at `path` (`len` bytes): removed on
    /// the last drop.
    pub fn adopt(path: PathBuf, len: u64) -> SnapshotFile {
        SnapshotFile(Arc::new(Owned { path, len }))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    pub fn len(&self) -> u64 {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::tenant::db::Work;
    use crate::tenant::delta::PageSums;
    use crate::tenant::sql::SqlLimits;

    /// Snapshots copied while another thread commits and captures without
    /// pause are each the exact state of the slot they name: their pages
    /// give the recorded checksum and SQLite reads the count of that slot.
    #[test]
    fn a_snapshot_copied_while_commits_continue_is_the_state_of_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite3");
        let db = Db::open(&path).unwrap();
        // The schema into the main file, as a claimed snapshot has it.
        db.checkpoint().unwrap();
        let sums = PageSums::of_file(&path).unwrap();
        let copy = Arc::new(Mutex::new(WorkingCopy::new(db, sums, &path, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (copy, stop) = (copy.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let mut copy = copy.lock().unwrap();
                    copy.db
                        .apply_batch(1, &[Work::Increment(None)], &SqlLimits::default(), false)
                        .unwrap();
                    copy.capture(1, seq, 0).unwrap().expect("a delta");
                }
                seq
            })
        };
        for n in 0..30 {
            let (slot, file, checksum) = WorkingCopy::snapshot_unlocked(&copy).unwrap();
            assert_eq!(
                PageSums::of_file(file.path()).unwrap().checksum(),
                checksum,
                "snapshot {n} at slot {slot}"
            );
            let conn = rusqlite::Connection::open(file.path()).unwrap();
            let count: i64 = conn
                .query_row("SELECT coalesce(max(count), 0) FROM welcome", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(count, slot as i64, "snapshot {n}: the count of slot {slot}");
        }
        stop.store(true, Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
    }

    /// What a killed process left of a tenant's snapshot copies goes; the
    /// working copies and other tenants' files stay.
    #[test]
    fn leftover_snapshot_copies_of_the_tenant_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "7.3.sqlite3.snapshot.0123abcd",
            "7.4.sqlite3",
            "7.4.sqlite3-wal",
            "77.1.sqlite3.snapshot.0123abcd",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_leftover_snapshots(dir.path(), "7");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, names[1..].to_vec());
    }

    /// The copy holds no lock: commits and captures run while it is being
    /// made (here from inside it, which would deadlock under the lock),
    /// and the snapshot kept is the state of the slot it names.
    #[test]
    fn commits_go_on_while_the_snapshot_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite3");
        let db = Db::open(&path).unwrap();
        db.checkpoint().unwrap();
        let sums = PageSums::of_file(&path).unwrap();
        let copy = Arc::new(Mutex::new(WorkingCopy::new(db, sums, &path, 0)));
        let commit = |copy: &mut WorkingCopy| {
            let seq = copy.slot + 1;
            copy.db
                .apply_batch(1, &[Work::Increment(None)], &SqlLimits::default(), false)
                .unwrap();
            copy.capture(1, seq, 0).unwrap().expect("a delta");
        };
        commit(&mut copy.lock().unwrap());
        let during = Mutex::new(Vec::new());
        let (slot, file, checksum) = WorkingCopy::snapshot_unlocked_by(&copy, |from| {
            let mut during = during.lock().unwrap();
            if during.len() < 2 {
                let mut held = copy.try_lock().expect("the copy is made without the lock");
                commit(&mut held);
                during.push(held.slot);
            }
            SnapshotFile::copy_of(from)
        })
        .unwrap();
        assert_eq!(
            *during.lock().unwrap(),
            vec![2, 3],
            "two commits during copies"
        );
        assert_eq!(slot, 3, "the copies a commit overlapped were not kept");
        assert_eq!(PageSums::of_file(file.path()).unwrap().checksum(), checksum);
        let count: i64 = rusqlite::Connection::open(file.path())
            .unwrap()
            .query_row("SELECT count FROM welcome", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 3, "the count of slot 3");
    }
}
