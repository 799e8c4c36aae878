//! Reading a SQLite write-ahead log the way SQLite's own recovery does, to
//! find the pages a batch of committed transactions changed.
//!
//! The format is the one of sqlite.org/fileformat2.html §4 (and `wal.c`):
//! a 32-byte header, then frames of a 24-byte header and one page. A frame
//! belongs to the log only while its salts equal the header's and its
//! cumulative checksum matches; the first frame that fails ends the log,
//! and only frames up to the last commit frame (non-zero "database size
//! after commit") count. Frames after it are a transaction that was still
//! being written or was rolled back after spilling pages, or leftovers of
//! an older log generation: SQLite ignores them, so must we.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;

const HEADER_BYTES: usize = 32;
const FRAME_HEADER_BYTES: usize = 24;
/// The magic number's low bit says in which byte order the checksum reads
/// its 32-bit words: 0 little-endian, 1 big-endian.
const MAGIC: u32 = 0x377f_0682;
/// The only WAL format version SQLite has written (3.7.0).
const VERSION: u32 = 3_007_000;

/// The committed transactions of a WAL file, reduced to the newest version
/// of each page.
#[derive(Debug)]
pub struct WalCommit {
    pub page_size: u32,
    /// Database size in pages after the last committed transaction.
    pub db_pages: u32,
    /// Newest committed version of every page written, page number ->
    /// bytes; only pages <= db_pages.
    pub pages: BTreeMap<u32, Bytes>,
    /// Frames read (for metrics).
    pub frames: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("cannot read the write-ahead log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The 32-byte header is unusable. SQLite would ignore such a log (or
    /// refuse to open it), so its frames are not committed as far as SQLite
    /// is concerned; tenantd reads the log right after its own commit, so
    /// this means something other than SQLite wrote the file.
    #[error(
        "the write-ahead log {} has a bad header: {reason}; it was not written by SQLite as tenantd uses it, so the database's recent commits cannot be trusted",
        path.display()
    )]
    BadHeader { path: PathBuf, reason: String },
}

/// Reads the WAL at `path` by SQLite's own recovery rules. `Ok(None)` if
/// the file is missing, empty, or has no committed frame.
pub fn read_committed(path: &Path) -> Result<Option<WalCommit>, WalError> {
    let io_error = |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    let mut reader = BufReader::with_capacity(256 * 1024, file);

    let mut header = [0u8; HEADER_BYTES];
    let got = read_full(&mut reader, &mut header).map_err(io_error)?;
    if got == 0 {
        return Ok(None);
    }
    let bad_header = |reason: String| WalError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if got < HEADER_BYTES {
        return Err(bad_header(format!(
            "the file is {got} bytes long, shorter than the {HEADER_BYTES}-byte header"
        )));
    }
    let magic = be32(&header[0..]);
    if magic & !1 != MAGIC {
        return Err(bad_header(format!(
            "magic number {magic:#010x} is not a WAL's"
        )));
    }
    let big_endian = magic & 1 == 1;
    let version = be32(&header[4..]);
    if version != VERSION {
        return Err(bad_header(format!(
            "format version {version}, expected {VERSION}"
        )));
    }
    let page_size = be32(&header[8..]);
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(bad_header(format!("page size {page_size} is not valid")));
    }
    let salts = [be32(&header[16..]), be32(&header[20..])];
    let mut sum = checksum(big_endian, [0, 0], &header[..24]);
    let stored = [be32(&header[24..]), be32(&header[28..])];
    if sum != stored {
        return Err(bad_header(format!(
            "header checksum {stored:08x?} does not match its contents ({sum:08x?})"
        )));
    }

    let mut committed = BTreeMap::new();
    // Pages of the transaction being read, not yet committed.
    let mut pending: BTreeMap<u32, Bytes> = BTreeMap::new();
    let mut db_pages = 0;
    let mut frames = 0;
    let mut pending_frames = 0;
    let mut frame_header = [0u8; FRAME_HEADER_BYTES];
    loop {
        if read_full(&mut reader, &mut frame_header).map_err(io_error)? < FRAME_HEADER_BYTES {
            break;
        }
        let mut page = vec![0u8; page_size as usize];
        if read_full(&mut reader, &mut page).map_err(io_error)? < page.len() {
            break;
        }
        let pgno = be32(&frame_header[0..]);
        let commit_size = be32(&frame_header[4..]);
        if pgno == 0 || [be32(&frame_header[8..]), be32(&frame_header[12..])] != salts {
            break;
        }
        let next = checksum(big_endian, sum, &frame_header[..8]);
        let next = checksum(big_endian, next, &page);
        if next != [be32(&frame_header[16..]), be32(&frame_header[20..])] {
            break;
        }
        sum = next;
        pending.insert(pgno, Bytes::from(page));
        pending_frames += 1;
        if commit_size != 0 {
            committed.append(&mut pending);
            frames += pending_frames;
            pending_frames = 0;
            db_pages = commit_size;
        }
    }
    if frames == 0 {
        return Ok(None);
    }
    // A transaction that shrank the database leaves pages beyond its end
    // in earlier frames; a checkpoint skips them, and so does the delta.
    committed.split_off(&(db_pages + 1));
    Ok(Some(WalCommit {
        page_size,
        db_pages,
        pages: committed,
        frames,
    }))
}

/// SQLite's WAL checksum: Fibonacci-weighted sums over pairs of 32-bit
/// words, read in the byte order the magic number names, continuing from
/// `seed`. `data.len()` is a multiple of 8 everywhere SQLite uses it.
fn checksum(big_endian: bool, seed: [u32; 2], data: &[u8]) -> [u32; 2] {
    let word = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let [mut s0, mut s1] = seed;
    for chunk in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word(&chunk[0..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&chunk[4..8])).wrapping_add(s0);
    }
    [s0, s1]
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Fills `buf` as far as the file goes; returns how many bytes were read
/// (fewer than `buf.len()` only at the end of the file).
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::delta::{Delta, Kind};
    use crate::tenant::delta::{PageSums, apply_to_file};
    use rusqlite::Connection;

    /// A database in tenantd's WAL setup, with the main file holding the
    /// state before the transactions under test.
    struct WalDb {
        dir: tempfile::TempDir,
        conn: Connection,
    }

    impl WalDb {
        fn new() -> WalDb {
            let dir = tempfile::tempdir().unwrap();
            let conn = Connection::open(dir.path().join("db.sqlite3")).unwrap();
            conn.execute_batch(
                "PRAGMA locking_mode=EXCLUSIVE;
                 PRAGMA journal_mode=WAL;
                 PRAGMA wal_autocheckpoint=0;
                 PRAGMA synchronous=OFF;
                 CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
                 CREATE TABLE doomed(id INTEGER PRIMARY KEY, b BLOB);
                 WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM n WHERE x<200)
                   INSERT INTO t(v) SELECT printf('row %d', x) FROM n;
                 WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM n WHERE x<40)
                   INSERT INTO doomed(b) SELECT randomblob(3000) FROM n;",
            )
            .unwrap();
            let db = WalDb { dir, conn };
            db.checkpoint();
            db
        }

        fn main(&self) -> PathBuf {
            self.dir.path().join("db.sqlite3")
        }

        fn wal(&self) -> PathBuf {
            self.dir.path().join("db.sqlite3-wal")
        }

        fn checkpoint(&self) {
            let (busy, _, _): (i64, i64, i64) = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap();
            assert_eq!(busy, 0, "checkpoint blocked");
        }

        /// A copy of the main file as it is now (before a checkpoint).
        fn copy_main(&self, name: &str) -> PathBuf {
            let copy = self.dir.path().join(name);
            std::fs::copy(self.main(), &copy).unwrap();
            copy
        }

        fn count(&self, table: &str) -> i64 {
            self.conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        }
    }

    fn as_delta(commit: &WalCommit) -> Delta {
        Delta {
            kind: Kind::Delta,
            epoch: 1,
            seq: 1,
            committed_at_ms: 0,
            page_size: commit.page_size,
            db_pages: commit.db_pages,
            pre_checksum: 0,
            post_checksum: 0,
            pages: commit.pages.iter().map(|(n, p)| (*n, p.clone())).collect(),
        }
    }

    /// The transactions every test below starts from: inserts, updates, a
    /// rolled-back transaction that spilled pages into the log, a blob on
    /// overflow pages, and a dropped table that shrinks the file.
    fn mixed_transactions(db: &WalDb) {
        let c = &db.conn;
        c.execute_batch("INSERT INTO t(v) VALUES ('a'), ('b'), ('c')")
            .unwrap();
        c.execute_batch("UPDATE t SET v = v || ' updated' WHERE id % 7 = 0")
            .unwrap();
        // A tiny page cache makes this transaction spill frames into the
        // log before it rolls back.
        c.execute_batch(
            "PRAGMA cache_size=2;
             BEGIN;
             UPDATE t SET v = printf('%.500c', 'x');
             INSERT INTO doomed(b) VALUES (randomblob(50000));
             ROLLBACK;
             PRAGMA cache_size=-2000;",
        )
        .unwrap();
        c.execute("INSERT INTO t(v) VALUES (?1)", [&"big".repeat(40_000)])
            .unwrap();
        c.execute_batch("DROP TABLE doomed; PRAGMA incremental_vacuum;")
            .unwrap();
        c.execute_batch("DELETE FROM t WHERE id BETWEEN 50 AND 120")
            .unwrap();
    }

    #[test]
    fn applying_the_committed_pages_equals_a_checkpoint() {
        let db = WalDb::new();
        db.conn
            .execute_batch("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")
            .unwrap();
        db.checkpoint();
        let before = db.copy_main("before.sqlite3");
        let sums_before = PageSums::of_file(&before).unwrap();
        mixed_transactions(&db);
        assert_eq!(db.count("t"), 200 + 3 + 1 - 71);

        let commit = read_committed(&db.wal())
            .unwrap()
            .expect("committed frames");
        assert_eq!(commit.page_size, 4096);
        assert!(commit.pages.keys().all(|&n| n >= 1 && n <= commit.db_pages));
        let delta = as_delta(&commit);
        apply_to_file(&before, &delta).unwrap();
        let mut sums = sums_before;
        sums.apply(delta.db_pages, &delta.pages);

        db.checkpoint();
        let after = std::fs::read(db.main()).unwrap();
        assert_eq!(after.len(), commit.db_pages as usize * 4096);
        assert!(std::fs::read(&before).unwrap() == after, "files differ");
        assert_eq!(
            sums.checksum(),
            PageSums::of_file(&db.main()).unwrap().checksum()
        );
        assert_eq!(sums.page_count(), commit.db_pages);
    }

    #[test]
    fn a_dropped_table_shrinks_the_database_and_drops_pages_beyond_it() {
        let db = WalDb::new();
        db.conn
            .execute_batch("PRAGMA auto_vacuum=FULL; VACUUM;")
            .unwrap();
        db.checkpoint();
        let before = db.copy_main("before.sqlite3");
        let pages_before = std::fs::metadata(&before).unwrap().len() / 4096;
        // Write pages near the end first, then drop them: the earlier
        // frames hold pages beyond the final size.
        db.conn
            .execute_batch("UPDATE doomed SET b = randomblob(3000)")
            .unwrap();
        db.conn.execute_batch("DROP TABLE doomed").unwrap();

        let commit = read_committed(&db.wal()).unwrap().unwrap();
        assert!(
            u64::from(commit.db_pages) < pages_before,
            "the database shrank"
        );
        assert!(commit.pages.keys().all(|&n| n <= commit.db_pages));
        let delta = as_delta(&commit);
        let mut sums = PageSums::of_file(&before).unwrap();
        apply_to_file(&before, &delta).unwrap();
        sums.apply(delta.db_pages, &delta.pages);
        db.checkpoint();
        assert!(std::fs::read(&before).unwrap() == std::fs::read(db.main()).unwrap());
        assert_eq!(
            sums.checksum(),
            PageSums::of_file(&db.main()).unwrap().checksum()
        );
    }

    #[test]
    fn a_rolled_back_transaction_is_not_read() {
        let db = WalDb::new();
        db.conn
            .execute_batch("INSERT INTO t(v) VALUES ('kept')")
            .unwrap();
        let first = read_committed(&db.wal()).unwrap().unwrap();
        db.conn
            .execute_batch(
                "PRAGMA cache_size=2;
                 BEGIN;
                 UPDATE t SET v = printf('%.900c', 'y');
                 ROLLBACK;",
            )
            .unwrap();
        let wal_len = std::fs::metadata(db.wal()).unwrap().len();
        let frame = (FRAME_HEADER_BYTES + 4096) as u64;
        assert!(
            wal_len > HEADER_BYTES as u64 + first.frames as u64 * frame,
            "the rolled-back transaction spilled frames into the log"
        );
        let again = read_committed(&db.wal()).unwrap().unwrap();
        assert_eq!(again.frames, first.frames);
        assert_eq!(again.pages, first.pages);
        assert_eq!(again.db_pages, first.db_pages);
    }

    /// The WAL after three transactions, with the frame count at each commit.
    fn three_commits() -> (WalDb, Vec<usize>, Vec<u8>) {
        let db = WalDb::new();
        let mut commits = vec![];
        for v in ["one", "two", "three"] {
            db.conn
                .execute("INSERT INTO t(v) VALUES (?1)", [&v.repeat(3000)])
                .unwrap();
            commits.push(read_committed(&db.wal()).unwrap().unwrap().frames);
        }
        let bytes = std::fs::read(db.wal()).unwrap();
        (db, commits, bytes)
    }

    #[test]
    fn a_log_cut_mid_frame_keeps_the_transactions_before_the_cut() {
        let (db, commits, bytes) = three_commits();
        let frame = FRAME_HEADER_BYTES + 4096;
        let cut = db.dir.path().join("cut-wal");
        let read_cut = |len: usize| {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            read_committed(&cut).unwrap().map(|c| c.frames)
        };
        for (i, &frames) in commits.iter().enumerate() {
            let start = HEADER_BYTES + frame * if i == 0 { 0 } else { commits[i - 1] };
            let end = HEADER_BYTES + frame * frames;
            let before = i.checked_sub(1).map(|j| commits[j]);
            for len in [start + 1, start + 30, end - frame / 2, end - 1] {
                assert_eq!(read_cut(len), before, "cut at {len} in transaction {i}");
            }
            assert_eq!(read_cut(end), Some(frames), "cut after transaction {i}");
        }
        assert_eq!(read_cut(HEADER_BYTES), None);
    }

    #[test]
    fn a_corrupted_frame_ends_the_log() {
        let (db, commits, bytes) = three_commits();
        let frame = FRAME_HEADER_BYTES + 4096;
        let bad = db.dir.path().join("bad-wal");
        // Corrupt the first frame of the second transaction: in its page,
        // in its salt, in its checksum.
        let second = HEADER_BYTES + frame * commits[0];
        for offset in [second + FRAME_HEADER_BYTES + 100, second + 9, second + 20] {
            let mut corrupt = bytes.clone();
            corrupt[offset] ^= 0x40;
            std::fs::write(&bad, &corrupt).unwrap();
            let read = read_committed(&bad).unwrap().unwrap();
            assert_eq!(read.frames, commits[0], "corrupted byte {offset}");
        }
        // A corrupted last frame (the third commit frame) drops only the third.
        let mut corrupt = bytes.clone();
        let last = bytes.len() - 1;
        corrupt[last] ^= 1;
        std::fs::write(&bad, &corrupt).unwrap();
        assert_eq!(read_committed(&bad).unwrap().unwrap().frames, commits[1]);
    }

    #[test]
    fn a_restarted_log_ignores_the_frames_of_the_generation_before() {
        let (db, commits, _) = three_commits();
        // A complete passive checkpoint leaves the file in place; the next
        // write starts the log over with new salts from its first frame.
        db.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        let before = db.copy_main("before.sqlite3");
        db.conn
            .execute_batch("UPDATE t SET v = 'again' WHERE id = 1")
            .unwrap();
        let wal_len = std::fs::metadata(db.wal()).unwrap().len() as usize;
        let frame = FRAME_HEADER_BYTES + 4096;
        assert_eq!(
            wal_len,
            HEADER_BYTES + frame * commits[2],
            "the file was reused, not cut"
        );
        let commit = read_committed(&db.wal()).unwrap().unwrap();
        assert!(commit.frames < commits[0], "{} frames", commit.frames);
        apply_to_file(&before, &as_delta(&commit)).unwrap();
        db.checkpoint();
        assert!(std::fs::read(&before).unwrap() == std::fs::read(db.main()).unwrap());
    }

    #[derive(Clone, Debug)]
    enum Change {
        Insert(usize),
        Update(u8),
        Delete(u8),
        Blob(usize),
        RolledBack,
    }

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        prop_oneof![
            (1usize..2000).prop_map(Change::Insert),
            any::<u8>().prop_map(Change::Update),
            any::<u8>().prop_map(Change::Delete),
            (1usize..30_000).prop_map(Change::Blob),
            Just(Change::RolledBack),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Any run of transactions: the committed pages turn the file as it
        /// was into the file a checkpoint makes, and the sums follow.
        #[test]
        fn any_transactions_apply_like_a_checkpoint(
            changes in proptest::collection::vec(change(), 1..12),
        ) {
            let db = WalDb::new();
            let before = db.copy_main("before.sqlite3");
            let mut sums = PageSums::of_file(&before).unwrap();
            for change in changes {
                let c = &db.conn;
                match change {
                    Change::Insert(len) => c
                        .execute("INSERT INTO t(v) VALUES (?1)", [&"i".repeat(len)])
                        .map(drop),
                    Change::Update(m) => c
                        .execute("UPDATE t SET v = v || 'u' WHERE id % 256 = ?1", [m])
                        .map(drop),
                    Change::Delete(m) => c
                        .execute("DELETE FROM t WHERE id % 7 = ?1 % 7", [m])
                        .map(drop),
                    Change::Blob(len) => c
                        .execute("INSERT INTO doomed(b) VALUES (zeroblob(?1))", [len as i64])
                        .map(drop),
                    Change::RolledBack => c.execute_batch(
                        "BEGIN; DELETE FROM doomed; UPDATE t SET v = 'gone'; ROLLBACK;",
                    ),
                }
                .unwrap();
            }
            if let Some(commit) = read_committed(&db.wal()).unwrap() {
                let delta = as_delta(&commit);
                apply_to_file(&before, &delta).unwrap();
                sums.apply(delta.db_pages, &delta.pages);
            }
            db.checkpoint();
            proptest::prop_assert!(std::fs::read(&before).unwrap() == std::fs::read(db.main()).unwrap());
            proptest::prop_assert_eq!(sums, PageSums::of_file(&db.main()).unwrap());
        }
    }

    #[test]
    fn missing_and_empty_logs_have_nothing_committed_and_bad_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x-wal");
        assert!(read_committed(&path).unwrap().is_none());
        std::fs::write(&path, b"").unwrap();
        assert!(read_committed(&path).unwrap().is_none());

        let (_db, _, bytes) = three_commits();
        for (offset, what) in [
            (0, "magic"),
            (5, "version"),
            (10, "page size"),
            (17, "checksum"),
        ] {
            let mut corrupt = bytes.clone();
            corrupt[offset] ^= 0x11;
            std::fs::write(&path, &corrupt).unwrap();
            let err = read_committed(&path).unwrap_err().to_string();
            assert!(
                err.contains("bad header") && err.contains("x-wal"),
                "{what}: {err}"
            );
        }
        std::fs::write(&path, &bytes[..20]).unwrap();
        let err = read_committed(&path).unwrap_err().to_string();
        assert!(err.contains("shorter than the 32-byte header"), "{err}");
    }

    #[test]
    fn both_checksum_byte_orders_are_read() {
        // Rewrite a little-endian-checksummed log as a big-endian one, with
        // every checksum recomputed: the reader must accept both.
        let (db, commits, bytes) = three_commits();
        let original = read_committed(&db.wal()).unwrap().unwrap();
        let mut other = bytes.clone();
        let big_endian = be32(&bytes) & 1 == 0;
        other[3] ^= 1;
        let mut sum = checksum(big_endian, [0, 0], &other[..24]);
        other[24..28].copy_from_slice(&sum[0].to_be_bytes());
        other[28..32].copy_from_slice(&sum[1].to_be_bytes());
        let frame = FRAME_HEADER_BYTES + 4096;
        for start in (HEADER_BYTES..other.len()).step_by(frame) {
            sum = checksum(big_endian, sum, &other[start..start + 8]);
            sum = checksum(
                big_endian,
                sum,
                &other[start + FRAME_HEADER_BYTES..start + frame],
            );
            other[start + 16..start + 20].copy_from_slice(&sum[0].to_be_bytes());
            other[start + 20..start + 24].copy_from_slice(&sum[1].to_be_bytes());
        }
        let path = db.dir.path().join("other-wal");
        std::fs::write(&path, &other).unwrap();
        let read = read_committed(&path).unwrap().unwrap();
        assert_eq!(read.frames, *commits.last().unwrap());
        assert_eq!(read.pages, original.pages);
        // And the original, read with the wrong byte order, fails at once.
        std::fs::write(&path, {
            let mut wrong = bytes.clone();
            wrong[3] ^= 1;
            wrong
        })
        .unwrap();
        assert!(read_committed(&path).is_err(), "header checksum must fail");
    }
}
