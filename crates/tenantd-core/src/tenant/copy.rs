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
}

impl WorkingCopy {
    pub fn new(db: Db, sums: PageSums, path: &Path, slot: u64) -> WorkingCopy {
        WorkingCopy {
            db,
            sums,
            path: path.to_path_buf(),
            slot,
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
