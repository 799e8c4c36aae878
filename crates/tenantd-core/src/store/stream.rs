//! Moving object bodies between the store and local files without holding
//! them whole in memory: what the backends' `get_to_file` and `put_file`
//! share.
//!
//! A download writes the file it was given and, if anything goes wrong (the
//! body is shorter or longer than the store said, the disk fills, the
//! connection drops), removes what it wrote: a caller never finds a partial
//! file where an object should be. Errors about the local file name the
//! path; errors about the object name the key.

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use md5::{Digest, Md5};

use super::{ETag, StoreError, StoreResult};

/// Bytes moved per read or write: big enough for throughput, small enough
/// that memory stays flat whatever the object's size.
pub const CHUNK: usize = 1 << 20;

/// An error writing the local file `path` while downloading `key` (a full
/// disk, a missing folder): not the store's fault, and not cured by asking
/// the store again.
pub fn local_write_error(key: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Fatal {
        message: format!(
            "cannot write {} while downloading key={key}: {e}; free space on that disk (or fix the folder) and try again",
            path.display()
        ),
    }
}

/// An error reading the local file `path` to upload it as `key`.
pub fn local_read_error(key: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Fatal {
        message: format!(
            "cannot read {} to upload it as key={key}: {e}",
            path.display()
        ),
    }
}

/// A body that did not have the size the store announced for it.
pub fn size_mismatch(key: &str, received: u64, expected: u64) -> StoreError {
    let how = if received < expected {
        format!("the body ended after {received} of {expected} bytes")
    } else {
        format!("the body ran past its recorded size ({received} bytes, {expected} recorded)")
    };
    StoreError::transient(key, format!("{how}; nothing was kept"))
}

/// Removes a download's partial file at `path`: only a regular file (never
/// a device such as `/dev/full` a caller named).
pub fn remove_partial(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Writes chunks to a new file at `path`, checking the total against
/// `expected` (when the store said), and removes the file on any error.
pub struct Download<'a> {
    key: &'a str,
    path: &'a Path,
    file: Option<tokio::fs::File>,
    written: u64,
    expected: Option<u64>,
}

impl<'a> Download<'a> {
    pub async fn create(key: &'a str, path: &'a Path, expected: Option<u64>) -> StoreResult<Self> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| local_write_error(key, path, e))?;
        Ok(Download {
            key,
            path,
            file: Some(file),
            written: 0,
            expected,
        })
    }

    pub async fn write(&mut self, chunk: &[u8]) -> StoreResult<()> {
        use tokio::io::AsyncWriteExt;
        self.written += chunk.len() as u64;
        if let Some(expected) = self.expected
            && self.written > expected
        {
            return Err(size_mismatch(self.key, self.written, expected));
        }
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(chunk)
            .await
            .map_err(|e| local_write_error(self.key, self.path, e))
    }

    /// Flushes and checks the size; the file stays only if this succeeds.
    pub async fn finish(mut self) -> StoreResult<u64> {
        use tokio::io::AsyncWriteExt;
        if let Some(expected) = self.expected
            && self.written != expected
        {
            return Err(size_mismatch(self.key, self.written, expected));
        }
        let file = self.file.as_mut().expect("open until finished");
        file.flush()
            .await
            .map_err(|e| local_write_error(self.key, self.path, e))?;
        // No fsync: a download is a local copy of what the store keeps
        // durable, and a cold start must not wait for the disk.
        self.file = None;
        Ok(self.written)
    }
}

impl Drop for Download<'_> {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            remove_partial(self.path);
        }
    }
}

/// Writes `body` to a new file at `path` (the default `get_to_file` of a
/// store that keeps bodies in memory).
pub async fn write_body(key: &str, path: &Path, body: &Bytes) -> StoreResult<()> {
    let mut download = Download::create(key, path, Some(body.len() as u64)).await?;
    for chunk in body.chunks(CHUNK) {
        download.write(chunk).await?;
    }
    download.finish().await.map(|_| ())
}

/// Reads the whole file at `path` (the default `put_file` of a store that
/// keeps bodies in memory).
pub async fn read_body(key: &str, path: &Path) -> StoreResult<Bytes> {
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|e| local_read_error(key, path, e))
}

/// The size of the file at `path`, for an upload's time allowance.
pub async fn file_len(key: &str, path: &Path) -> StoreResult<u64> {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .map_err(|e| local_read_error(key, path, e))
}

/// Copies `from` to `to` in chunks, returning the ETag of what was copied
/// (the MD5 of the bytes, computed on the way) and its size. Blocking.
pub fn copy_hashing(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<(ETag, u64)> {
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        to.write_all(&buffer[..n])?;
        total += n as u64;
    }
    Ok((
        ETag(format!("\"{}\"", hex::encode(hasher.finalize()))),
        total,
    ))
}

/// The ETag of everything `from` yields, read in chunks. Blocking.
pub fn hash_reader(from: &mut impl Read) -> std::io::Result<ETag> {
    copy_hashing(from, &mut std::io::sink()).map(|(etag, _)| etag)
}
