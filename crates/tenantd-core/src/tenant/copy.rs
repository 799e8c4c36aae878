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

    /// The main file's bytes: the state at `self.slot`, with its checksum.
    pub fn snapshot(&self) -> std::io::Result<(u64, Bytes, u64)> {
        let body = std::fs::read(&self.path)?;
        Ok((self.slot, Bytes::from(body), self.sums.checksum()))
    }

    /// Size of the main file.
    pub fn db_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}
