//! The object in a commit-log slot (`customer/<id>/log/<seq:020>`): the
//! pages one batch of transactions changed, or an empty fence a new holder
//! puts in a slot to close it to the holder it deposed.
//!
//! Deltas chain by a database checksum, as Litestream's LTX files do: the
//! XOR over all pages of CRC-64/NVME(page number as big-endian u32 ‖ page
//! bytes). XOR makes it cheap to update page by page, and each delta
//! carries the checksum before and after it, so a reader applying the log
//! to a snapshot notices a missing or foreign delta at the first mismatch.
//!
//! Encoding (integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `TDLT` |
//! | 2 | version (1) |
//! | 1 | kind: 0 delta, 1 fence |
//! | 8 | epoch |
//! | 8 | seq (the slot number) |
//! | 8 | committed_at_ms |
//! | 4 | page_size (0 in a fence) |
//! | 4 | db_pages (0 in a fence) |
//! | 8 | pre_checksum (0 in a fence) |
//! | 8 | post_checksum (0 in a fence) |
//! | 4 | page count |
//! | per page: 4 + page_size | page number, page bytes |
//! | 8 | CRC-64/NVME of everything before it |

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use crc_fast::{CrcAlgorithm, Digest};

use crate::store::keys;

const MAGIC: &[u8; 4] = b"TDLT";
const VERSION: u16 = 1;
/// Everything before the pages.
const HEADER_BYTES: usize = 4 + 2 + 1 + 8 + 8 + 8 + 4 + 4 + 8 + 8 + 4;
const TRAILER_BYTES: usize = 8;
const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 65536;

/// Any log object of at most this many bytes is a fence: a listing tells
/// fences from deltas by size alone. An encoded fence is
/// `HEADER_BYTES + TRAILER_BYTES` (67) bytes; a delta carries at least one
/// page of at least 512 bytes (decoding refuses a delta without pages).
pub const FENCE_MAX_BYTES: u64 = 256;

const _: () = assert!((HEADER_BYTES + TRAILER_BYTES) as u64 <= FENCE_MAX_BYTES);
const _: () =
    assert!((HEADER_BYTES + TRAILER_BYTES + 4 + MIN_PAGE_SIZE as usize) as u64 > FENCE_MAX_BYTES);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Delta,
    Fence,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub kind: Kind,
    pub epoch: u64,
    pub seq: u64,
    /// Unix milliseconds when the holder committed it (point-in-time restore).
    pub committed_at_ms: u64,
    pub page_size: u32,
    /// Database size in pages after applying (0 for a fence).
    pub db_pages: u32,
    /// Database checksum before and after applying (fences: both 0).
    pub pre_checksum: u64,
    pub post_checksum: u64,
    /// Sorted by page number, each exactly page_size bytes.
    pub pages: Vec<(u32, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("log object {key} is truncated: {have} bytes, its header says {need}")]
    Truncated { key: String, have: usize, need: u64 },
    #[error("log object {key} has a bad magic number (not a tenantd log object)")]
    BadMagic { key: String },
    #[error(
        "log object {key} has format version {version}, this tenantd reads version {VERSION}: it was written by a newer tenantd; upgrade this one"
    )]
    UnknownVersion { key: String, version: u16 },
    #[error(
        "log object {key} is corrupt: checksum mismatch (stored {stored:016x}, computed {computed:016x})"
    )]
    ChecksumMismatch {
        key: String,
        stored: u64,
        computed: u64,
    },
    #[error(
        "log object {key}: slot number in the object ({in_object}) differs from its key ({in_key})"
    )]
    SlotMismatch {
        key: String,
        in_object: u64,
        in_key: u64,
    },
    #[error("{key} is not a log slot key (customer/<id>/log/<20 digits>)")]
    NotALogKey { key: String },
    #[error("log object {key} is malformed: {reason}")]
    Malformed { key: String, reason: String },
    #[error(
        "refusing to write a delta without pages for slot {seq} (epoch {epoch}): every commit changes at least one page, and readers refuse such an object"
    )]
    Empty { seq: u64, epoch: u64 },
}

impl Delta {
    pub fn fence(epoch: u64, seq: u64, committed_at_ms: u64) -> Delta {
        Delta {
            kind: Kind::Fence,
            epoch,
            seq,
            committed_at_ms,
            page_size: 0,
            db_pages: 0,
            pre_checksum: 0,
            post_checksum: 0,
            pages: vec![],
        }
    }

    /// The object's bytes. A delta must hold at least one page (every
    /// SQLite commit writes one): a delta without pages would not decode,
    /// and could not be told from a fence by size, so it is refused in
    /// every build (a stored one would leave the tenant unreadable).
    pub fn encode(&self) -> Result<Bytes, DeltaError> {
        if self.kind == Kind::Delta && self.pages.is_empty() {
            return Err(DeltaError::Empty {
                seq: self.seq,
                epoch: self.epoch,
            });
        }
        Ok(self.encode_unchecked())
    }

    fn encode_unchecked(&self) -> Bytes {
        let page_bytes: usize = self.pages.iter().map(|(_, p)| 4 + p.len()).sum();
        let mut out = BytesMut::with_capacity(HEADER_BYTES + page_bytes + TRAILER_BYTES);
        out.put_slice(MAGIC);
        out.put_u16(VERSION);
        out.put_u8(match self.kind {
            Kind::Delta => 0,
            Kind::Fence => 1,
        });
        out.put_u64(self.epoch);
        out.put_u64(self.seq);
        out.put_u64(self.committed_at_ms);
        out.put_u32(self.page_size);
        out.put_u32(self.db_pages);
        out.put_u64(self.pre_checksum);
        out.put_u64(self.post_checksum);
        out.put_u32(self.pages.len() as u32);
        for (pgno, page) in &self.pages {
            out.put_u32(*pgno);
            out.put_slice(page);
        }
        let crc = crc64(&out);
        out.put_u64(crc);
        out.freeze()
    }

    /// Parses and checks the object stored at `key`: magic, version,
    /// length, trailer CRC, that its slot number is the key's, and that
    /// its pages are valid and in order.
    pub fn decode(key: &str, body: &[u8]) -> Result<Delta, DeltaError> {
        let malformed = |reason: String| DeltaError::Malformed {
            key: key.to_string(),
            reason,
        };
        let in_key = keys::log_seq(key).ok_or_else(|| DeltaError::NotALogKey {
            key: key.to_string(),
        })?;
        let truncated = |need: u64| DeltaError::Truncated {
            key: key.to_string(),
            have: body.len(),
            need,
        };
        if body.len() < MAGIC.len() + 2 {
            return Err(truncated((HEADER_BYTES + TRAILER_BYTES) as u64));
        }
        if &body[..4] != MAGIC {
            return Err(DeltaError::BadMagic {
                key: key.to_string(),
            });
        }
        let version = u16::from_be_bytes([body[4], body[5]]);
        if version != VERSION {
            return Err(DeltaError::UnknownVersion {
                key: key.to_string(),
                version,
            });
        }
        if body.len() < HEADER_BYTES + TRAILER_BYTES {
            return Err(truncated((HEADER_BYTES + TRAILER_BYTES) as u64));
        }
        let mut r = Reader(&body[6..]);
        let kind = r.u8();
        let epoch = r.u64();
        let seq = r.u64();
        let committed_at_ms = r.u64();
        let page_size = r.u32();
        let db_pages = r.u32();
        let pre_checksum = r.u64();
        let post_checksum = r.u64();
        let count = r.u32();
        let need = HEADER_BYTES as u64
            + u64::from(count) * (4 + u64::from(page_size))
            + TRAILER_BYTES as u64;

        let (content, trailer) = body.split_at(body.len() - TRAILER_BYTES);
        let stored = u64::from_be_bytes(trailer.try_into().expect("8 bytes"));
        let computed = crc64(content);
        if stored != computed {
            // A short object fails its CRC too; say which it is when the
            // header (itself unverified) is consistent with a cut.
            if (body.len() as u64) < need {
                return Err(truncated(need));
            }
            return Err(DeltaError::ChecksumMismatch {
                key: key.to_string(),
                stored,
                computed,
            });
        }
        if body.len() as u64 != need {
            return Err(malformed(format!(
                "{} bytes, but {count} pages of {page_size} bytes make {need}",
                body.len()
            )));
        }
        if seq != in_key {
            return Err(DeltaError::SlotMismatch {
                key: key.to_string(),
                in_object: seq,
                in_key,
            });
        }
        let kind = match kind {
            0 => Kind::Delta,
            1 => Kind::Fence,
            other => return Err(malformed(format!("unknown kind {other}"))),
        };
        match kind {
            Kind::Fence => {
                if (page_size, db_pages, pre_checksum, post_checksum, count) != (0, 0, 0, 0, 0) {
                    return Err(malformed(
                        "a fence with pages, a page size, a database size or checksums".into(),
                    ));
                }
            }
            Kind::Delta => {
                if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
                    || !page_size.is_power_of_two()
                {
                    return Err(malformed(format!("page size {page_size} is invalid")));
                }
                if count == 0 {
                    return Err(malformed("a delta without pages".into()));
                }
            }
        }
        let mut pages = Vec::with_capacity(count as usize);
        let mut data = &body[HEADER_BYTES..body.len() - TRAILER_BYTES];
        let mut previous = 0;
        for _ in 0..count {
            let pgno = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
            if pgno == 0 {
                return Err(malformed("page number 0 (pages count from 1)".into()));
            }
            if pgno <= previous {
                return Err(malformed(format!(
                    "pages not sorted or duplicated: page {pgno} after page {previous}"
                )));
            }
            if pgno > db_pages {
                return Err(malformed(format!(
                    "page number {pgno} > db_pages {db_pages}"
                )));
            }
            previous = pgno;
            let end = 4 + page_size as usize;
            pages.push((pgno, Bytes::copy_from_slice(&data[4..end])));
            data = &data[end..];
        }
        Ok(Delta {
            kind,
            epoch,
            seq,
            committed_at_ms,
            page_size,
            db_pages,
            pre_checksum,
            post_checksum,
            pages,
        })
    }
}

/// Reads big-endian fields from a slice known to be long enough.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, tail) = self.0.split_at(N);
        self.0 = tail;
        head.try_into().expect("length checked")
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

fn crc64(bytes: &[u8]) -> u64 {
    crc_fast::checksum(CrcAlgorithm::Crc64Nvme, bytes)
}

/// One page's share of the database checksum.
fn page_sum(pgno: u32, page: &[u8]) -> u64 {
    let mut digest = Digest::new(CrcAlgorithm::Crc64Nvme);
    digest.update(&pgno.to_be_bytes());
    digest.update(page);
    digest.finalize()
}

/// Per-page checksums of a database; their XOR is the database checksum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSums {
    /// 0 while unknown (an empty database).
    page_size: u32,
    /// `sums[i]` belongs to page `i + 1`.
    sums: Vec<u64>,
    xor: u64,
}

impl PageSums {
    /// Reads a database file (page size from its header bytes 16-17, 1
    /// meaning 65536); an empty or missing file has empty sums. Errors if
    /// the file length is not a multiple of the page size.
    pub fn of_file(path: &Path) -> io::Result<PageSums> {
        let mut sums = PageSums::default();
        let Some((file, page_size, pages)) = open_database(path)? else {
            return Ok(sums);
        };
        let mut file = BufReader::with_capacity(256 * 1024, file);
        sums.page_size = page_size;
        sums.sums.reserve(pages as usize);
        let mut page = vec![0u8; page_size as usize];
        for pgno in 1..=pages {
            file.read_exact(&mut page)?;
            let sum = page_sum(pgno, &page);
            sums.sums.push(sum);
            sums.xor ^= sum;
        }
        Ok(sums)
    }

    pub fn checksum(&self) -> u64 {
        self.xor
    }

    pub fn page_count(&self) -> u32 {
        self.sums.len() as u32
    }

    /// Updates the sums for pages written and the new size (pages beyond
    /// `db_pages` dropped). Pages a growing database gains without being
    /// written count as zeros, as [`apply_to_file`] leaves them.
    pub fn apply(&mut self, db_pages: u32, pages: &[(u32, Bytes)]) {
        if self.page_size == 0
            && let Some((_, page)) = pages.first()
        {
            self.page_size = page.len() as u32;
        }
        let new_len = db_pages as usize;
        for dropped in self.sums.drain(new_len.min(self.sums.len())..) {
            self.xor ^= dropped;
        }
        if self.sums.len() < new_len {
            let zeros = vec![0u8; self.page_size as usize];
            for pgno in self.sums.len() as u32 + 1..=db_pages {
                let sum = page_sum(pgno, &zeros);
                self.sums.push(sum);
                self.xor ^= sum;
            }
        }
        for (pgno, page) in pages {
            if *pgno == 0 || *pgno > db_pages {
                continue;
            }
            let slot = &mut self.sums[*pgno as usize - 1];
            let sum = page_sum(*pgno, page);
            self.xor ^= *slot ^ sum;
            *slot = sum;
        }
    }
}

/// Writes a delta's pages into a database file at `(pgno-1)*page_size`
/// and sets its length to `db_pages*page_size`; creates the file if
/// missing. A fence changes nothing. Does not sync: a caller applying a
/// run of deltas syncs once at the end.
pub fn apply_to_file(path: &Path, delta: &Delta) -> io::Result<()> {
    if delta.kind == Kind::Fence {
        return Ok(());
    }
    if let Some((pgno, page)) = delta
        .pages
        .iter()
        .find(|(_, page)| page.len() != delta.page_size as usize)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "delta {} has page {pgno} of {} bytes, its page size is {}",
                delta.seq,
                page.len(),
                delta.page_size
            ),
        ));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let size = u64::from(delta.page_size);
    for (pgno, page) in &delta.pages {
        file.seek(SeekFrom::Start(u64::from(*pgno - 1) * size))?;
        file.write_all(page)?;
    }
    file.set_len(u64::from(delta.db_pages) * size)
}

/// The pages in which two database files differ, plus `b`'s size in pages:
/// a delta that turns `a` into `b` (restore --in-place). Both must have the
/// same page size; a missing or empty `a` yields all of `b`. Identical
/// files yield no pages: there is nothing to ship then (a delta without
/// pages is not a valid log object).
pub fn diff_files(a: &Path, b: &Path) -> io::Result<(u32, Vec<(u32, Bytes)>)> {
    let Some((b_file, page_size, b_pages)) = open_database(b)? else {
        return Ok((0, vec![]));
    };
    let mut b_file = BufReader::with_capacity(256 * 1024, b_file);
    let (mut a_file, a_pages) = match open_database(a)? {
        None => (None, 0),
        Some((_, a_size, _)) if a_size != page_size => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has pages of {a_size} bytes and {} of {page_size}: a page diff needs one page size",
                    a.display(),
                    b.display()
                ),
            ));
        }
        Some((file, _, pages)) => (Some(BufReader::with_capacity(256 * 1024, file)), pages),
    };
    let mut changed = vec![];
    let mut a_page = vec![0u8; page_size as usize];
    let mut b_page = vec![0u8; page_size as usize];
    for pgno in 1..=b_pages {
        b_file.read_exact(&mut b_page)?;
        let same = match &mut a_file {
            Some(file) if pgno <= a_pages => {
                file.read_exact(&mut a_page)?;
                a_page == b_page
            }
            _ => false,
        };
        if !same {
            changed.push((pgno, Bytes::copy_from_slice(&b_page)));
        }
    }
    Ok((b_pages, changed))
}

/// Opens a database file positioned at its start, with its page size and
/// length in pages; `None` if it is missing or empty.
fn open_database(path: &Path) -> io::Result<Option<(File, u32, u32)>> {
    let invalid = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut header = [0u8; 18];
    file.read_exact(&mut header).map_err(|_| {
        invalid(format!(
            "{len} bytes: too short for a SQLite database header"
        ))
    })?;
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => MAX_PAGE_SIZE,
        n => u32::from(n),
    };
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(invalid(format!(
            "page size {page_size} in the header is not valid: not a SQLite database"
        )));
    }
    if len % u64::from(page_size) != 0 {
        return Err(invalid(format!(
            "{len} bytes is not a whole number of {page_size}-byte pages"
        )));
    }
    let pages = u32::try_from(len / u64::from(page_size))
        .map_err(|_| invalid(format!("{len} bytes is more pages than SQLite allows")))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(Some((file, page_size, pages)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "customer/acme/log/00000000000000000007";

    fn page(fill: u8, size: u32) -> Bytes {
        Bytes::from(vec![fill; size as usize])
    }

    fn sample() -> Delta {
        Delta {
            kind: Kind::Delta,
            epoch: 3,
            seq: 7,
            committed_at_ms: 1_780_000_000_000,
            page_size: 512,
            db_pages: 5,
            pre_checksum: 0x0123_4567_89ab_cdef,
            post_checksum: 0xfedc_ba98_7654_3210,
            pages: vec![(1, page(1, 512)), (4, page(4, 512))],
        }
    }

    /// Re-seals an edited encoding with a valid trailer, so that the check
    /// under test is the one that fires rather than the CRC.
    fn reseal(mut body: Vec<u8>) -> Vec<u8> {
        let len = body.len() - TRAILER_BYTES;
        let crc = crc64(&body[..len]);
        body[len..].copy_from_slice(&crc.to_be_bytes());
        body
    }

    fn error(body: &[u8]) -> String {
        Delta::decode(KEY, body).unwrap_err().to_string()
    }

    #[test]
    fn the_database_checksum_is_crc64_nvme() {
        // The check value of CRC-64/NVME (reveng catalogue).
        assert_eq!(crc64(b"123456789"), 0xae8b_1486_0a79_9888);
    }

    /// A delta without pages would not decode (and could not be told from
    /// a fence by size): writing one would make the tenant unreadable, so
    /// it is refused with an error in release builds too.
    #[test]
    fn a_delta_without_pages_is_refused_in_every_build() {
        let mut empty = sample();
        empty.pages.clear();
        let err = empty.encode().unwrap_err().to_string();
        assert!(err.contains("without pages"), "{err}");
        assert!(err.contains(&format!("slot {}", empty.seq)), "{err}");
        assert!(Delta::fence(3, empty.seq, 0).encode().is_ok());
    }

    #[test]
    fn fences_fit_under_the_bound_and_deltas_do_not() {
        let fence = Delta::fence(9, 7, 123);
        let body = fence.encode().unwrap();
        assert!(body.len() as u64 <= FENCE_MAX_BYTES, "{}", body.len());
        assert_eq!(Delta::decode(KEY, &body).unwrap(), fence);

        let mut smallest = sample();
        smallest.pages.truncate(1);
        assert!(smallest.encode().unwrap().len() as u64 > FENCE_MAX_BYTES);
    }

    #[test]
    fn every_byte_flip_and_every_truncation_is_rejected() {
        let body = sample().encode().unwrap().to_vec();
        assert_eq!(Delta::decode(KEY, &body).unwrap(), sample());
        for i in 0..body.len() {
            let mut flipped = body.clone();
            flipped[i] ^= 0xff;
            let err = error(&flipped);
            let expected = match i {
                0..4 => "bad magic",
                4..6 => "format version",
                _ => "",
            };
            assert!(err.contains(KEY), "byte {i}: {err}");
            assert!(
                err.contains(expected)
                    && (i < 6 || err.contains("checksum mismatch") || err.contains("truncated")),
                "byte {i}: {err}"
            );
        }
        for len in 0..body.len() {
            let err = error(&body[..len]);
            assert!(
                err.contains(KEY) && err.contains("truncated"),
                "length {len}: {err}"
            );
        }
    }

    #[test]
    fn an_object_in_the_wrong_slot_is_rejected() {
        let body = sample().encode().unwrap();
        let err = Delta::decode("customer/acme/log/00000000000000000008", &body)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("slot number in the object (7) differs from its key (8)"),
            "{err}"
        );
        let err = Delta::decode("customer/acme/db.sqlite3", &body)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a log slot key"), "{err}");
    }

    #[test]
    fn invalid_contents_are_rejected_even_with_a_valid_checksum() {
        type Edit = Box<dyn Fn(&mut Delta)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("pages not sorted", Box::new(|d| d.pages.reverse())),
            (
                "pages not sorted or duplicated",
                Box::new(|d| d.pages[1].0 = 1),
            ),
            ("page number 9 > db_pages 5", Box::new(|d| d.pages[1].0 = 9)),
            ("page number 0", Box::new(|d| d.pages[0].0 = 0)),
            (
                "page size 500 is invalid",
                Box::new(|d| {
                    d.page_size = 500;
                    d.pages = vec![(1, page(0, 500))];
                }),
            ),
            (
                "page size 0 is invalid",
                Box::new(|d| {
                    d.page_size = 0;
                    d.pages = vec![(1, Bytes::new())];
                }),
            ),
            ("a delta without pages", Box::new(|d| d.pages.clear())),
            ("a fence with pages", Box::new(|d| d.kind = Kind::Fence)),
        ];
        for (want, edit) in cases {
            let mut delta = sample();
            edit(&mut delta);
            let err = error(&delta.encode_unchecked());
            assert!(err.contains(want) && err.contains(KEY), "{want}: {err}");
        }

        let mut body = sample().encode().unwrap().to_vec();
        body[6] = 7;
        assert!(error(&reseal(body)).contains("unknown kind 7"));

        let mut body = sample().encode().unwrap().to_vec();
        body[5] = 2;
        let err = error(&body);
        assert!(
            err.contains("format version 2") && err.contains("newer tenantd"),
            "{err}"
        );

        // Bytes beyond the declared pages, sealed: malformed, not accepted.
        let mut body = sample().encode().unwrap().to_vec();
        body.splice(body.len() - 8..body.len() - 8, [0u8; 16]);
        let err = error(&reseal(body));
        assert!(err.contains("malformed") && err.contains("make"), "{err}");
    }

    fn arb_delta() -> impl Strategy<Value = Delta> {
        (
            prop_oneof![Just(512u32), Just(1024), Just(4096)],
            1u32..40,
            any::<(u64, u64, u64, u64, u64)>(),
            proptest::collection::btree_map(1u32..40, any::<u8>(), 1..8),
        )
            .prop_map(
                |(page_size, db_pages, (epoch, seq, at, pre, post), fills)| {
                    let pages = fills
                        .into_iter()
                        .filter(|(n, _)| *n <= db_pages)
                        .map(|(n, fill)| (n, page(fill, page_size)))
                        .collect::<Vec<_>>();
                    let pages = if pages.is_empty() {
                        vec![(db_pages, page(0, page_size))]
                    } else {
                        pages
                    };
                    Delta {
                        kind: Kind::Delta,
                        epoch,
                        seq,
                        committed_at_ms: at,
                        page_size,
                        db_pages,
                        pre_checksum: pre,
                        post_checksum: post,
                        pages,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn deltas_round_trip(delta in arb_delta()) {
            let key = keys::log_slot("t", delta.seq);
            let body = delta.encode().unwrap();
            prop_assert!(body.len() as u64 > FENCE_MAX_BYTES);
            prop_assert_eq!(Delta::decode(&key, &body).unwrap(), delta);
        }

        #[test]
        fn fences_round_trip(epoch: u64, seq: u64, at: u64) {
            let fence = Delta::fence(epoch, seq, at);
            let body = fence.encode().unwrap();
            prop_assert!(body.len() as u64 <= FENCE_MAX_BYTES);
            prop_assert_eq!(Delta::decode(&keys::log_slot("t", seq), &body).unwrap(), fence);
        }

        /// Applying pages to a file and to its sums agree, through growth
        /// (with pages never written) and shrinking.
        #[test]
        fn sums_follow_the_file(
            base in 0u32..12,
            steps in proptest::collection::vec(
                (0u32..16, proptest::collection::btree_map(2u32..16, any::<u8>(), 0..6)),
                1..6,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            let file: Vec<u8> = (1..=base).flat_map(|n| database_page(n, n as u8)).collect();
            std::fs::write(&path, file).unwrap();
            let mut sums = PageSums::of_file(&path).unwrap();
            for (db_pages, fills) in steps {
                let db_pages = db_pages.max(1);
                let mut pages = vec![(1, Bytes::from(database_page(1, 0xaa)))];
                pages.extend(
                    fills.into_iter()
                        .filter(|(n, _)| *n <= db_pages)
                        .map(|(n, fill)| (n, Bytes::from(database_page(n, fill)))),
                );
                let mut delta = sample();
                delta.page_size = 512;
                delta.db_pages = db_pages;
                delta.pages = pages;
                apply_to_file(&path, &delta).unwrap();
                sums.apply(db_pages, &delta.pages);
                let fresh = PageSums::of_file(&path).unwrap();
                prop_assert_eq!(sums.checksum(), fresh.checksum());
                prop_assert_eq!(sums.page_count(), db_pages);
                prop_assert_eq!(&sums, &fresh);
            }
        }
    }

    /// A 512-byte page; page 1 carries the page size where SQLite keeps it.
    fn database_page(pgno: u32, fill: u8) -> Vec<u8> {
        let mut page = vec![fill; 512];
        if pgno == 1 {
            page[16..18].copy_from_slice(&512u16.to_be_bytes());
        }
        page
    }

    #[test]
    fn sums_of_missing_empty_and_ragged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let sums = PageSums::of_file(&path).unwrap();
        assert_eq!((sums.checksum(), sums.page_count()), (0, 0));
        std::fs::write(&path, b"").unwrap();
        assert_eq!(PageSums::of_file(&path).unwrap(), PageSums::default());

        let mut ragged = database_page(1, 1);
        ragged.extend([0u8; 100]);
        std::fs::write(&path, &ragged).unwrap();
        let err = PageSums::of_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("not a whole number of 512-byte pages"),
            "{err}"
        );

        // Header value 1 means 65536.
        let mut big = vec![0u8; 65536];
        big[16..18].copy_from_slice(&1u16.to_be_bytes());
        std::fs::write(&path, &big).unwrap();
        assert_eq!(PageSums::of_file(&path).unwrap().page_count(), 1);

        let sums = PageSums::of_file(&path).unwrap();
        assert_eq!(sums.checksum(), page_sum(1, &big));
    }

    #[test]
    fn a_diff_turns_one_file_into_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let file = |fills: &[u8]| -> Vec<u8> {
            fills
                .iter()
                .enumerate()
                .flat_map(|(i, f)| database_page(i as u32 + 1, *f))
                .collect()
        };
        for (from, to) in [
            (&[1, 2, 3, 4][..], &[1, 9, 3, 4, 5, 6][..]),
            (&[1, 2, 3, 4, 5, 6], &[1, 2, 7]),
            (&[], &[1, 2]),
            (&[1, 2], &[1, 2]),
        ] {
            std::fs::write(&a, file(from)).unwrap();
            std::fs::write(&b, file(to)).unwrap();
            let (db_pages, pages) = diff_files(&a, &b).unwrap();
            assert_eq!(db_pages as usize, to.len());
            let changed: Vec<u32> = pages.iter().map(|(n, _)| *n).collect();
            let expected: Vec<u32> = (1..=to.len() as u32)
                .filter(|&n| from.get(n as usize - 1) != to.get(n as usize - 1))
                .collect();
            assert_eq!(changed, expected, "{from:?} -> {to:?}");
            let mut delta = sample();
            delta.page_size = 512;
            delta.db_pages = db_pages;
            delta.pages = pages;
            apply_to_file(&a, &delta).unwrap();
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        }

        let (db_pages, pages) = diff_files(&dir.path().join("missing"), &b).unwrap();
        assert_eq!((db_pages, pages.len()), (2, 2));

        let mut other = vec![0u8; 1024];
        other[16..18].copy_from_slice(&1024u16.to_be_bytes());
        std::fs::write(&a, other).unwrap();
        let err = diff_files(&a, &b).unwrap_err().to_string();
        assert!(err.contains("one page size"), "{err}");
    }

    #[test]
    fn fences_change_no_file_and_wrong_sized_pages_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, database_page(1, 3)).unwrap();
        apply_to_file(&path, &Delta::fence(1, 2, 3)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), database_page(1, 3));

        let mut delta = sample();
        delta.pages[1].1 = page(0, 100);
        let err = apply_to_file(&path, &delta).unwrap_err().to_string();
        assert!(err.contains("page 4 of 100 bytes"), "{err}");
    }
}
