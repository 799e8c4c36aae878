//! The embedded store: each object is a plain file at `<root>/<key>`, so the
//! `sqlite3` shell opens a database object directly.
//!
//! Conditional writes are atomic across processes: a put writes and syncs
//! temporary files, then holds an exclusive `flock` on
//! `<root>/.tenantd/locks/<hash>` while it checks the condition and renames
//! them over the object; reads open the object under the same lock.
//! ETags are the MD5 of the bytes, as on S3, and live with the metadata in a
//! sidecar `<root>/.tenantd/meta/<key>.json` written under the same lock.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::memory::check_condition;
use super::{
    ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
};

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Sidecar {
    etag: String,
    metadata: Metadata,
}

/// Keys from the original app start with `/`; they live under this folder so
/// that they never escape the root.
const LEADING_SLASH_DIR: &str = "_slash_";

impl FileStore {
    /// Opens (and creates) a store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> StoreResult<FileStore> {
        let root = root.into();
        fs::create_dir_all(root.join(".tenantd/locks")).map_err(|e| StoreError::Fatal {
            message: format!(
                "cannot create the file store at {}: {e}; fix --store / TENANTD_STORE or the folder's permissions",
                root.display()
            ),
        })?;
        Ok(FileStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The relative path of `key`, refusing anything that could leave the root.
    fn relative(key: &str) -> StoreResult<PathBuf> {
        let (prefix, rest) = match key.strip_prefix('/') {
            Some(rest) => (Some(LEADING_SLASH_DIR), rest),
            None => (None, key),
        };
        let mut path = PathBuf::new();
        if let Some(prefix) = prefix {
            path.push(prefix);
        }
        for component in Path::new(rest).components() {
            match component {
                Component::Normal(part) if !part.to_string_lossy().starts_with(".tenantd") => {
                    path.push(part)
                }
                _ => {
                    return Err(StoreError::Fatal {
                        message: format!("invalid object key {key:?} for the file store"),
                    });
                }
            }
        }
        if rest.is_empty() || rest.ends_with('/') {
            return Err(StoreError::Fatal {
                message: format!("invalid object key {key:?} for the file store"),
            });
        }
        Ok(path)
    }

    fn paths(&self, key: &str) -> StoreResult<KeyPaths> {
        let rel = Self::relative(key)?;
        let hash = hex::encode(&md5_digest(key.as_bytes())[..8]);
        let mut sidecar = self.root.join(".tenantd/meta").join(&rel).into_os_string();
        sidecar.push(".json");
        Ok(KeyPaths {
            data: self.root.join(&rel),
            sidecar: PathBuf::from(sidecar),
            lock: self.root.join(".tenantd/locks").join(hash),
        })
    }

    fn io_error(key: &str, what: &str, e: std::io::Error) -> StoreError {
        // A local disk error is not going to heal by itself in milliseconds,
        // but the caller's bounded retry costs little and covers EAGAIN-like
        // cases; the message says what failed.
        StoreError::transient(key, format!("file store {what} failed: {e}"))
    }

    fn lock(key: &str, paths: &KeyPaths) -> StoreResult<Flock<File>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&paths.lock)
            .map_err(|e| Self::io_error(key, "opening the lock file", e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| Self::io_error(key, "flock", e.into()))
    }

    /// The object's sidecar; `None` for a file put there by hand.
    fn read_sidecar(key: &str, paths: &KeyPaths) -> StoreResult<Option<Sidecar>> {
        match fs::read(&paths.sidecar) {
            Ok(bytes) => Ok(serde_json::from_slice::<Sidecar>(&bytes).ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io_error(key, "reading metadata", e)),
        }
    }

    fn read_meta(key: &str, paths: &KeyPaths) -> StoreResult<Option<(ETag, Metadata, u64)>> {
        let size = match fs::metadata(&paths.data) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io_error(key, "stat", e)),
        };
        if let Some(sidecar) = Self::read_sidecar(key, paths)? {
            return Ok(Some((ETag(sidecar.etag), sidecar.metadata, size)));
        }
        // A file put there by hand (no sidecar): its ETag is its hash.
        let body = fs::read(&paths.data).map_err(|e| Self::io_error(key, "read", e))?;
        Ok(Some((ETag::of(&body), Metadata::new(), size)))
    }

    fn get_blocking(&self, key: &str) -> StoreResult<Option<Object>> {
        let paths = self.paths(key)?;
        // Under the lock only open the file and read its sidecar: the open
        // handle keeps these bytes even if a put renames new ones over them,
        // so the body is read after the lock is released. (A process stopped
        // while holding the lock stalls everyone: keep that window short.)
        let (mut file, sidecar) = {
            let _guard = Self::lock(key, &paths)?;
            let file = match File::open(&paths.data) {
                Ok(file) => file,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Self::io_error(key, "open", e)),
            };
            (file, Self::read_sidecar(key, &paths)?)
        };
        let mut body = Vec::new();
        file.read_to_end(&mut body)
            .map_err(|e| Self::io_error(key, "read", e))?;
        let (etag, metadata) = match sidecar {
            Some(sidecar) => (ETag(sidecar.etag), sidecar.metadata),
            None => (ETag::of(&body), Metadata::new()),
        };
        Ok(Some(Object {
            body: Bytes::from(body),
            etag,
            metadata,
        }))
    }

    fn head_blocking(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let paths = self.paths(key)?;
        let _guard = Self::lock(key, &paths)?;
        Ok(
            Self::read_meta(key, &paths)?.map(|(etag, metadata, size)| ObjectMeta {
                etag,
                size,
                metadata,
            }),
        )
    }

    fn put_blocking(
        &self,
        key: &str,
        body: &[u8],
        metadata: Metadata,
        condition: &Precondition,
    ) -> StoreResult<ETag> {
        let paths = self.paths(key)?;
        let etag = ETag::of(body);
        let sidecar = serde_json::to_vec(&Sidecar {
            etag: etag.0.clone(),
            metadata,
        })
        .expect("sidecar serializes");
        // Written and synced before taking the lock, which then covers only
        // the condition check, two renames and the directory syncs: a
        // process stopped (SIGSTOP) or slowed by the disk while holding it
        // stalls every other process's requests for this key, which S3
        // never does. The directory syncs stay inside, so that nobody sees
        // a write before it would survive a power cut.
        let data_tmp =
            Temp::write(&paths.data, body).map_err(|e| Self::io_error(key, "write", e))?;
        let sidecar_tmp = Temp::write(&paths.sidecar, &sidecar)
            .map_err(|e| Self::io_error(key, "writing metadata", e))?;
        {
            let _guard = Self::lock(key, &paths)?;
            let current = Self::read_meta(key, &paths)?.map(|(etag, _, _)| etag);
            check_condition(key, current.as_ref(), condition)?;
            sidecar_tmp
                .rename()
                .map_err(|e| Self::io_error(key, "writing metadata", e))?;
            data_tmp
                .rename()
                .map_err(|e| Self::io_error(key, "write", e))?;
            for path in [&paths.sidecar, &paths.data] {
                sync_parent(path).map_err(|e| Self::io_error(key, "fsync", e))?;
            }
        }
        Ok(etag)
    }
}

struct KeyPaths {
    data: PathBuf,
    sidecar: PathBuf,
    lock: PathBuf,
}

fn md5_digest(bytes: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    Md5::digest(bytes).to_vec()
}

/// New bytes for `path`, written and synced beside it under a temporary
/// name; `rename` puts them in place atomically, so a reader (or a crash)
/// sees the old or the new bytes, never a mix. Removed if never renamed.
struct Temp {
    tmp: PathBuf,
    path: PathBuf,
    renamed: bool,
}

impl Temp {
    fn write(path: &Path, bytes: &[u8]) -> std::io::Result<Temp> {
        let dir = path.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        let temp = Temp {
            tmp: dir.join(format!(
                ".{}.{}.tmp",
                path.file_name().unwrap_or_default().to_string_lossy(),
                uuid::Uuid::new_v4().simple()
            )),
            path: path.to_path_buf(),
            renamed: false,
        };
        let mut file = File::create(&temp.tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(temp)
    }

    fn rename(mut self) -> std::io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().expect("object paths have a parent"))?.sync_all()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Fatal {
            message: format!("file store task failed: {e}"),
        })?
}

#[async_trait]
impl ObjectStore for FileStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.get_blocking(&key)).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.head_blocking(&key)).await
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.put_blocking(&key, &body, metadata, &condition)).await
    }

    async fn check(&self) -> StoreResult<()> {
        let probe = self.root.join(".tenantd");
        let writable = tempfile_probe(&probe);
        writable.map_err(|e| StoreError::Fatal {
            message: format!(
                "the file store at {} is not writable: {e}; fix --store / TENANTD_STORE or the folder's permissions",
                self.root.display()
            ),
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// Checks that the store's private folder accepts a file, without touching
/// any object.
fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(format!(".probe.{}", uuid::Uuid::new_v4().simple()));
    File::create(&path)?;
    fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_escape_the_root() {
        for bad in [
            "../x",
            "a/../../b",
            "",
            "a/",
            ".tenantd/locks/x",
            "a//..",
            "/",
        ] {
            assert!(FileStore::relative(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            FileStore::relative("customer/1/db.sqlite3").unwrap(),
            PathBuf::from("customer/1/db.sqlite3")
        );
        assert_eq!(
            FileStore::relative("/customer/1/db.sqlite3").unwrap(),
            PathBuf::from("_slash_/customer/1/db.sqlite3")
        );
    }
}
