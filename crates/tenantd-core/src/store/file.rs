//! The embedded store: each object is a plain file at `<root>/<key>`, so the
//! `sqlite3` shell opens a database object directly.
//!
//! ETags are the MD5 of the bytes, as on S3. They live with the metadata in
//! a *tag* per data file, `<root>/.tenantd/meta/<key>.json.<inode>`, which
//! a put writes and syncs *before* its data file becomes the object, and
//! which never changes after. A reader opens the data file and reads the tag
//! of the inode it opened, so reads take no lock and the bytes, ETag and
//! metadata they return belong together; a tag missing while the key names
//! another file means the object was replaced or deleted meanwhile, and the
//! read starts over.
//!
//! No lock is held across a data write: a process stopped inside a put
//! (SIGSTOP, a frozen VM, `tenantd dev pause`) must not stall every other
//! process's requests for the key, which S3 never does.
//! - Create-if-absent writes the data to a temporary file and `link`s it to
//!   the key's name, which fails if the name exists: atomic, and a writer
//!   stopped before the link has created nothing.
//! - Replace-if-match (and an unconditional put) writes everything first,
//!   then holds an exclusive `flock` on `<root>/.tenantd/locks/<hash>` only
//!   to compare the current ETag and rename the data into place.
//! - A delete moves the data file away under the same lock, then removes
//!   it and its tag.
//!
//! A put returns once the folder of its data file is synced too (after the
//! lock is released); a replaced or deleted file's tag goes once the file
//! is gone, while a temporary name still holds its inode, so that the tag
//! of a new file that reuses the inode number is never the one removed.
//!
//! Sidecars of older builds (`<key>.json`, one per key, naming the data
//! file they describe and the one before it) are still read for a file
//! that has no tag. A tag or sidecar that matches no file (the store folder
//! was copied, so inodes changed) is checked against the data's MD5 instead;
//! failing that, the object reads like a file put there by hand (its MD5,
//! no metadata).
//!
//! A listing walks the folders under the prefix and returns every data
//! file (a file put there by hand too, as `get` reads it), never the
//! private `.tenantd` folder or a put's temporary file; size and time are
//! the data file's. A delete removes the data file, then the sidecar,
//! under the key's lock, so a concurrent read sees the object or nothing.
//! Emptied folders are left in place (a put may be creating a file in
//! them); they hold no keys.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::memory::check_condition;
use super::{
    ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
    stream,
};

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    /// Test hook: the next put fails to rename its data file into place,
    /// after its sidecar was renamed (a half-done put).
    #[cfg(test)]
    fail_next_data_rename: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Test hook (see [`FileStore::stop_inside_next_put`]).
    stop_inside_next_put: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Sidecar {
    etag: String,
    metadata: Metadata,
    /// The data file this sidecar describes; absent in sidecars written
    /// before it was recorded (trusted as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<DataId>,
    /// The sidecar this one replaced (without its own `previous`): what the
    /// object still is when the put stopped before renaming its data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Box<Sidecar>>,
}

/// A data file's identity: which file (device, inode), its size, and when
/// its bytes were written (absent in sidecars of older builds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DataId {
    dev: u64,
    ino: u64,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtime_ns: Option<i64>,
}

impl DataId {
    fn of(meta: &fs::Metadata) -> DataId {
        DataId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: Some(
                meta.mtime()
                    .saturating_mul(1_000_000_000)
                    .saturating_add(meta.mtime_nsec()),
            ),
        }
    }

    /// `file` is the file this id was recorded for.
    fn same_file(&self, file: DataId) -> bool {
        (self.dev, self.ino, self.size) == (file.dev, file.ino, file.size)
            && self.mtime_ns.is_none_or(|t| Some(t) == file.mtime_ns)
    }
}

impl Sidecar {
    /// This sidecar if it describes the data file `id`: by identity, or,
    /// when the identity differs (a copied folder) or was never recorded, by
    /// the data's hash. `hash` is computed at most once, by the caller.
    fn describes(
        &self,
        id: DataId,
        hash: &mut impl FnMut() -> StoreResult<ETag>,
    ) -> StoreResult<bool> {
        match self.data {
            Some(recorded) if recorded.same_file(id) => Ok(true),
            None => Ok(true),
            Some(recorded) if recorded.size != id.size => Ok(false),
            Some(_) => Ok(hash()? == ETag(self.etag.clone())),
        }
    }

    /// The ETag and metadata of the data file `id`, from the first of
    /// `candidates` (or the one it replaced) that describes it, else from
    /// the data's hash.
    fn resolve(
        candidates: Vec<Sidecar>,
        id: DataId,
        mut hash: impl FnMut() -> StoreResult<ETag>,
    ) -> StoreResult<Sidecar> {
        let mut cached: Option<ETag> = None;
        let mut hash_once = || -> StoreResult<ETag> {
            if cached.is_none() {
                cached = Some(hash()?);
            }
            Ok(cached.clone().expect("just computed"))
        };
        for mut sidecar in candidates {
            if sidecar.describes(id, &mut hash_once)? {
                return Ok(sidecar);
            }
            if let Some(previous) = sidecar.previous.take()
                && previous.describes(id, &mut hash_once)?
            {
                return Ok(*previous);
            }
        }
        // A file put there by hand, or a sidecar that matches nothing: its
        // ETag is its hash.
        Ok(Sidecar {
            etag: hash_once()?.0,
            metadata: Metadata::new(),
            data: Some(id),
            previous: None,
        })
    }
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
        Ok(FileStore {
            root,
            #[cfg(test)]
            fail_next_data_rename: Default::default(),
            stop_inside_next_put: Default::default(),
        })
    }

    /// Test hook for tests that run a writer in a child process: the next
    /// put stops this whole process (SIGSTOP) once its bytes are written
    /// and it starts making them the object, as a machine paused by
    /// `tenantd dev pause` or a frozen VM may stop at any instant.
    #[doc(hidden)]
    pub fn stop_inside_next_put(&self) {
        self.stop_inside_next_put
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn maybe_stop_inside_put(&self) {
        if self
            .stop_inside_next_put
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
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

    /// The sidecar of an older build (one per key); `None` if there is
    /// none (or it cannot be parsed).
    fn read_sidecar(key: &str, paths: &KeyPaths) -> StoreResult<Option<Sidecar>> {
        match fs::read(&paths.sidecar) {
            Ok(bytes) => Ok(serde_json::from_slice::<Sidecar>(&bytes).ok()),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(Self::io_error(key, "reading metadata", e)),
        }
    }

    /// The tag of the data file `id`, if it has one.
    fn read_tag(key: &str, paths: &KeyPaths, id: DataId) -> StoreResult<Option<Sidecar>> {
        match fs::read(paths.tag(id.ino)) {
            Ok(bytes) => Ok(serde_json::from_slice::<Sidecar>(&bytes)
                .ok()
                .filter(|tag| tag.data == Some(id))),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(Self::io_error(key, "reading metadata", e)),
        }
    }

    /// Every tag of the key (of any inode): candidates for a data file whose
    /// inode changed (a copied store folder).
    fn other_tags(key: &str, paths: &KeyPaths) -> StoreResult<Vec<Sidecar>> {
        let dir = paths.sidecar.parent().expect("sidecar paths have a parent");
        let name = paths
            .sidecar
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if is_absent(&e) => return Ok(Vec::new()),
            Err(e) => return Err(Self::io_error(key, "reading metadata", e)),
        };
        let mut tags = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let is_tag = file
                .to_str()
                .and_then(|f| f.strip_prefix(name.as_ref()))
                .and_then(|f| f.strip_prefix('.'))
                .is_some_and(|ino| !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit()));
            if is_tag
                && let Ok(bytes) = fs::read(entry.path())
                && let Ok(tag) = serde_json::from_slice::<Sidecar>(&bytes)
            {
                tags.push(tag);
            }
        }
        Ok(tags)
    }

    /// The object now, read without a lock: its data file opened, the tag
    /// of that very file (or what an older build or a copy left), and, with
    /// `with_body`, its bytes.
    fn read_object(key: &str, paths: &KeyPaths, want: Want<'_>) -> StoreResult<Option<Found>> {
        // Each retry follows a replacement or deletion that happened during
        // the read; a handful is plenty unless the key is rewritten
        // without pause.
        for _ in 0..64 {
            let mut file = match File::open(&paths.data) {
                Ok(file) => file,
                Err(e) if is_absent(&e) => return Ok(None),
                Err(e) => return Err(Self::io_error(key, "open", e)),
            };
            let stat = file
                .metadata()
                .map_err(|e| Self::io_error(key, "stat", e))?;
            if !stat.is_file() {
                // A folder of other keys is no object.
                return Ok(None);
            }
            let id = DataId::of(&stat);
            let body = match want {
                Want::Body => {
                    let mut body = Vec::with_capacity(stat.len() as usize);
                    file.read_to_end(&mut body)
                        .map_err(|e| Self::io_error(key, "read", e))?;
                    Some(body)
                }
                Want::Meta => None,
                Want::File(path) => {
                    Self::copy_out(key, &mut file, path, id.size)?;
                    None
                }
            };
            if let Some(tag) = Self::read_tag(key, paths, id)? {
                return Ok(Some(Found { tag, id, body }));
            }
            match fs::metadata(&paths.data) {
                Ok(now) if DataId::of(&now) == id => {}
                Ok(_) => continue,
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(Self::io_error(key, "stat", e)),
            }
            // No tag, and still the object: written by an older build, by
            // hand, or copied.
            let mut candidates: Vec<Sidecar> =
                Self::read_sidecar(key, paths)?.into_iter().collect();
            candidates.extend(Self::other_tags(key, paths)?);
            let hash = || match &body {
                Some(body) => Ok(ETag::of(body)),
                None => {
                    use std::io::{Seek, SeekFrom};
                    (&file)
                        .seek(SeekFrom::Start(0))
                        .and_then(|_| stream::hash_reader(&mut &file))
                        .map_err(|e| Self::io_error(key, "read", e))
                }
            };
            let tag = Sidecar::resolve(candidates, id, hash)?;
            return Ok(Some(Found { tag, id, body }));
        }
        Err(StoreError::transient(
            key,
            "the object kept changing while it was read",
        ))
    }

    /// Copies the opened data file (`size` bytes by its stat) to a new file
    /// at `path`; the copy is removed if it fails or comes out another size
    /// (a data file is never changed in place, so that is damage).
    fn copy_out(key: &str, file: &mut File, path: &Path, size: u64) -> StoreResult<()> {
        let copied = (|| {
            let mut out = File::create(path)?;
            // Not synced: a download is a local copy (see stream.rs).
            std::io::copy(file, &mut out)
        })();
        match copied {
            Ok(copied) if copied == size => Ok(()),
            Ok(copied) => {
                stream::remove_partial(path);
                Err(stream::size_mismatch(key, copied, size))
            }
            Err(e) => {
                stream::remove_partial(path);
                Err(stream::local_write_error(key, path, e))
            }
        }
    }

    fn get_to_file_blocking(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let paths = self.paths(key)?;
        let found = Self::read_object(key, &paths, Want::File(path));
        if !matches!(found, Ok(Some(_))) {
            // Absent, or failed after the copy (its tag unreadable): no
            // file stays behind either way.
            stream::remove_partial(path);
        }
        Ok(found?.map(|found| ObjectMeta {
            etag: ETag(found.tag.etag),
            size: found.id.size,
            metadata: found.tag.metadata,
        }))
    }

    /// A key with no data file reads as absent.
    fn surely_absent(paths: &KeyPaths) -> bool {
        matches!(fs::symlink_metadata(&paths.data), Err(e) if is_absent(&e))
    }

    fn get_blocking(&self, key: &str) -> StoreResult<Option<Object>> {
        let paths = self.paths(key)?;
        Ok(
            Self::read_object(key, &paths, Want::Body)?.map(|found| Object {
                body: Bytes::from(found.body.unwrap_or_default()),
                etag: ETag(found.tag.etag),
                metadata: found.tag.metadata,
            }),
        )
    }

    fn head_blocking(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let paths = self.paths(key)?;
        Ok(
            Self::read_object(key, &paths, Want::Meta)?.map(|found| ObjectMeta {
                etag: ETag(found.tag.etag),
                size: found.id.size,
                metadata: found.tag.metadata,
            }),
        )
    }

    fn put_blocking(
        &self,
        key: &str,
        body: Source<'_>,
        metadata: Metadata,
        condition: &Precondition,
    ) -> StoreResult<ETag> {
        let paths = self.paths(key)?;
        if matches!(condition, Precondition::IfAbsent) && !Self::surely_absent(&paths) {
            return Err(StoreError::PreconditionFailed {
                key: key.to_string(),
            });
        }
        // Everything is written and synced before the object changes: the
        // data under a temporary name, then its tag.
        let (mut data_tmp, etag) = match body {
            Source::Bytes(bytes) => (
                Temp::write(&paths.data, bytes).map_err(|e| Self::io_error(key, "write", e))?,
                ETag::of(bytes),
            ),
            Source::File(from) => {
                let mut from =
                    File::open(from).map_err(|e| stream::local_read_error(key, from, e))?;
                Temp::copy(&paths.data, &mut from).map_err(|e| Self::io_error(key, "write", e))?
            }
        };
        let data_id =
            DataId::of(&fs::metadata(&data_tmp.tmp).map_err(|e| Self::io_error(key, "stat", e))?);
        let tag = Sidecar {
            etag: etag.0.clone(),
            metadata,
            data: Some(data_id),
            previous: None,
        };
        let tag_path = paths.tag(data_id.ino);
        let mut tag_tmp = Temp::write(
            &tag_path,
            &serde_json::to_vec(&tag).expect("tags serialize"),
        )
        .map_err(|e| Self::io_error(key, "writing metadata", e))?;
        tag_tmp
            .rename()
            .and_then(|()| sync_parent(&tag_path))
            .map_err(|e| Self::io_error(key, "writing metadata", e))?;
        // Declared after `data_tmp`, so dropped before it: the tag goes
        // while the temporary file still holds its inode.
        let mut unpublished = Unpublished(Some(tag_path));
        self.maybe_stop_inside_put();
        let replaced = match condition {
            Precondition::IfAbsent => {
                if !data_tmp
                    .link_new()
                    .map_err(|e| Self::io_error(key, "write", e))?
                {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_string(),
                    });
                }
                None
            }
            Precondition::IfMatch(_) | Precondition::None => {
                let _guard = Self::lock(key, &paths)?;
                let current = Self::read_object(key, &paths, Want::Meta)?;
                check_condition(
                    key,
                    current.as_ref().map(|c| ETag(c.tag.etag.clone())).as_ref(),
                    condition,
                )?;
                // The replaced file keeps a name until its tag is gone.
                let grave = match &current {
                    Some(_) => {
                        Some(Grave::of(&paths.data).map_err(|e| Self::io_error(key, "write", e))?)
                    }
                    None => None,
                };
                #[cfg(test)]
                if self
                    .fail_next_data_rename
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(Self::io_error(
                        key,
                        "write",
                        std::io::Error::other("injected rename failure"),
                    ));
                }
                data_tmp
                    .rename()
                    .map_err(|e| Self::io_error(key, "write", e))?;
                current.zip(grave)
            }
        };
        unpublished.0 = None;
        sync_parent(&paths.data).map_err(|e| Self::io_error(key, "fsync", e))?;
        if let Some((old, grave)) = replaced {
            let _ = fs::remove_file(paths.tag(old.id.ino));
            let _ = fs::remove_file(&paths.sidecar);
            drop(grave);
        }
        Ok(etag)
    }
}

/// What a read of an object takes besides its tag.
#[derive(Clone, Copy)]
enum Want<'a> {
    Meta,
    Body,
    /// The bytes, copied to a new file at this path.
    File(&'a Path),
}

/// Where a put's bytes come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// An object as read: its tag (ETag and metadata), which file, and its
/// bytes when asked for.
struct Found {
    tag: Sidecar,
    id: DataId,
    body: Option<Vec<u8>>,
}

/// A put's tag whose data file has not become the object: removed when
/// the put gives up.
struct Unpublished(Option<PathBuf>);

impl Drop for Unpublished {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// A second, hidden name (a temporary file's) for a data file that is
/// about to be replaced or deleted: its inode stays allocated until its
/// tag is removed. Unlinked on drop.
struct Grave(PathBuf);

impl Grave {
    fn of(data: &Path) -> std::io::Result<Grave> {
        let grave = Temp::name_beside(data);
        fs::hard_link(data, &grave)?;
        Ok(Grave(grave))
    }
}

impl Drop for Grave {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Listing and deleting.
impl FileStore {
    fn list_blocking(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        let Some(start) = Self::listing_start(prefix) else {
            // No valid key lives there ("..", ".tenantd", ...).
            return Ok(Vec::new());
        };
        // Whether a folder whose keys all start with `dir` may hold a key
        // of the listing: it agrees with the prefix, and does not sort
        // wholly before `start_after`.
        let wanted_dir = |dir: &str| {
            (dir.starts_with(prefix) || prefix.starts_with(dir))
                && start_after.is_none_or(|after| dir >= after || after.starts_with(dir))
        };
        let wanted_key =
            |key: &str| key.starts_with(prefix) && start_after.is_none_or(|after| key > after);
        let failed = |path: &Path, e: std::io::Error| {
            StoreError::transient(
                prefix,
                format!(
                    "file store listing of prefix {prefix:?} failed at {}: {e}",
                    path.display()
                ),
            )
        };
        let mut listed = Vec::new();
        let mut folders = vec![start];
        while let Some(rel) = folders.pop() {
            let dir = self.root.join(&rel);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Gone, or never there: no keys.
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(failed(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| failed(&dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue; // not a key: keys are UTF-8
                };
                if name.starts_with(".tenantd") || is_temp_file(name) {
                    continue;
                }
                let rel = rel.join(name);
                let Some(key) = key_of(&rel) else { continue };
                let path = self.root.join(&rel);
                let kind = match entry.file_type() {
                    Ok(kind) => kind,
                    Err(e) if is_absent(&e) => continue, // deleted meanwhile
                    Err(e) => return Err(failed(&path, e)),
                };
                if kind.is_dir() {
                    let dir_key = if key.ends_with('/') { key } else { key + "/" };
                    if wanted_dir(&dir_key) {
                        folders.push(rel);
                    }
                    continue;
                }
                if !wanted_key(&key) {
                    continue;
                }
                // A symlink put there by hand is followed, as `get` would;
                // one to a folder is not walked (it could loop).
                let meta = match fs::metadata(&path) {
                    Ok(meta) => meta,
                    Err(e) if is_absent(&e) => continue,
                    Err(e) => return Err(failed(&path, e)),
                };
                if meta.is_file() {
                    listed.push(Listed {
                        key,
                        size: meta.len(),
                        last_modified: meta.modified().ok(),
                    });
                }
            }
        }
        listed.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    /// The folder (relative to the root) that holds every key starting
    /// with `prefix`: the prefix's folder part, mapped as keys are. `None`
    /// when that folder is no valid key's.
    fn listing_start(prefix: &str) -> Option<PathBuf> {
        let folder = prefix.rfind('/').map_or("", |end| &prefix[..end]);
        match folder {
            "" if prefix.starts_with('/') => Some(PathBuf::from(LEADING_SLASH_DIR)),
            "" => Some(PathBuf::new()),
            folder => Self::relative(folder).ok(),
        }
    }

    fn delete_blocking(&self, key: &str) -> StoreResult<()> {
        let paths = self.paths(key)?;
        let _guard = Self::lock(key, &paths)?;
        // The data first: a delete stopped halfway leaves a tag without
        // data, which reads as absent (the other order would leave the data
        // without its ETag and metadata). The file keeps a hidden name
        // until its tag is gone, so that no new file reuses its inode
        // meanwhile. Each removal is synced before the next, so a power
        // cut cannot keep the data and lose its tag.
        let file = match fs::symlink_metadata(&paths.data) {
            Ok(meta) if meta.is_file() => Some((
                DataId::of(&meta),
                Grave::of(&paths.data).map_err(|e| Self::io_error(key, "delete", e))?,
            )),
            _ => None,
        };
        let tag = file.as_ref().map(|(id, _)| paths.tag(id.ino));
        for (path, what) in [
            (Some(&paths.data), "delete"),
            (tag.as_ref(), "deleting metadata"),
            (Some(&paths.sidecar), "deleting metadata"),
        ] {
            let Some(path) = path else { continue };
            match fs::remove_file(path) {
                Ok(()) => sync_parent(path).map_err(|e| Self::io_error(key, "fsync", e))?,
                // Already gone, or a folder of other keys: not an object.
                Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => {}
                Err(e) => return Err(Self::io_error(key, what, e)),
            }
        }
        drop(file);
        Ok(())
    }
}

/// The key of a path relative to the root (the inverse of
/// [`FileStore::relative`]); `None` for a name that is not UTF-8.
fn key_of(rel: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            _ => return None,
        }
    }
    match parts.split_first() {
        Some((&LEADING_SLASH_DIR, rest)) => Some(format!("/{}", rest.join("/"))),
        _ => Some(parts.join("/")),
    }
}

/// A put's temporary file (`.<name>.<32 hex digits>.tmp`, see [`Temp`]):
/// never an object, even when a crash left it behind.
fn is_temp_file(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.rsplit_once('.'))
        .is_some_and(|(_, id)| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Not found, or a path through a file ("a/b" where "a" is an object).
fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

struct KeyPaths {
    data: PathBuf,
    /// The per-key sidecar of older builds; tags are beside it.
    sidecar: PathBuf,
    lock: PathBuf,
}

impl KeyPaths {
    /// The tag of the data file with inode `ino`.
    fn tag(&self, ino: u64) -> PathBuf {
        let mut path = self.sidecar.clone().into_os_string();
        path.push(format!(".{ino}"));
        PathBuf::from(path)
    }
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
    /// A new temporary name beside `path` (never listed as an object).
    fn name_beside(path: &Path) -> PathBuf {
        let dir = path.parent().expect("object paths have a parent");
        dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    fn write(path: &Path, bytes: &[u8]) -> std::io::Result<Temp> {
        let dir = path.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        let temp = Temp {
            tmp: Self::name_beside(path),
            path: path.to_path_buf(),
            renamed: false,
        };
        let mut file = File::create(&temp.tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(temp)
    }

    /// As [`Temp::write`], with the bytes of `from`, hashed on the way.
    fn copy(path: &Path, from: &mut File) -> std::io::Result<(Temp, ETag)> {
        let dir = path.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        let temp = Temp {
            tmp: Self::name_beside(path),
            path: path.to_path_buf(),
            renamed: false,
        };
        let mut file = File::create(&temp.tmp)?;
        let (etag, _) = stream::copy_hashing(from, &mut file)?;
        file.sync_all()?;
        Ok((temp, etag))
    }

    fn rename(&mut self) -> std::io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.renamed = true;
        Ok(())
    }

    /// Gives the bytes the final name only if nothing has it: `false` if
    /// the name exists (the temporary file stays, removed on drop).
    fn link_new(&mut self) -> std::io::Result<bool> {
        match fs::hard_link(&self.tmp, &self.path) {
            Ok(()) => {
                self.renamed = true;
                let _ = fs::remove_file(&self.tmp);
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
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
        blocking(move || store.put_blocking(&key, Source::Bytes(&body), metadata, &condition)).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let (store, key, path) = (self.clone(), key.to_string(), path.to_path_buf());
        blocking(move || store.put_blocking(&key, Source::File(&path), metadata, &condition)).await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let (store, key, path) = (self.clone(), key.to_string(), path.to_path_buf());
        blocking(move || store.get_to_file_blocking(&key, &path)).await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        let (store, prefix) = (self.clone(), prefix.to_string());
        let start_after = start_after.map(str::to_string);
        blocking(move || store.list_blocking(&prefix, start_after.as_deref())).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.delete_blocking(&key)).await
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
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::retry::{RetryPolicy, RetryingStore};
    use crate::store::{DynStore, WRITE_ID_KEY};

    fn tagged(k: &str, v: &str) -> Metadata {
        Metadata::from([(k.to_string(), v.to_string())])
    }

    /// The sidecar is renamed, the data rename fails: the object is still
    /// the old one, with its ETag and metadata, and the new write id is
    /// nowhere to be read back.
    #[tokio::test]
    async fn a_put_whose_data_rename_failed_reads_as_not_landed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let v1 = store
            .put("k", "one".into(), tagged("n", "1"), Precondition::IfAbsent)
            .await
            .unwrap();
        store.fail_next_data_rename.store(true, Ordering::SeqCst);
        let failed = store
            .put(
                "k",
                "two".into(),
                tagged(WRITE_ID_KEY, "mine"),
                Precondition::IfMatch(v1.clone()),
            )
            .await;
        assert!(
            matches!(failed, Err(StoreError::Transient { .. })),
            "{failed:?}"
        );
        let head = store.head("k").await.unwrap().unwrap();
        assert_eq!(head.etag, v1);
        assert_eq!(
            head.metadata,
            tagged("n", "1"),
            "the half-done put's metadata shows"
        );
        let object = store.get("k").await.unwrap().unwrap();
        assert_eq!((object.body, object.etag), (Bytes::from("one"), v1.clone()));
        // The condition of the failed put still holds: a resend succeeds.
        let v2 = store
            .put(
                "k",
                "two".into(),
                tagged("n", "2"),
                Precondition::IfMatch(v1.clone()),
            )
            .await
            .expect("the object is still v1");
        let object = store.get("k").await.unwrap().unwrap();
        assert_eq!((object.body, object.etag), (Bytes::from("two"), v2));
        // Also with bodies of equal size (the check cannot rely on sizes).
        store.fail_next_data_rename.store(true, Ordering::SeqCst);
        let v2 = store.head("k").await.unwrap().unwrap().etag;
        assert!(
            store
                .put(
                    "k",
                    "owt".into(),
                    Metadata::new(),
                    Precondition::IfMatch(v2.clone())
                )
                .await
                .is_err()
        );
        let head = store.head("k").await.unwrap().unwrap();
        assert_eq!((head.etag, head.metadata), (v2, tagged("n", "2")));
    }

    /// Through the retrying layer, which reads back after the failure:
    /// before the sidecar named its data file, the read-back found our write
    /// id and acknowledged bytes that were never stored.
    #[tokio::test]
    async fn a_half_done_put_is_never_acknowledged_by_a_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = FileStore::new(dir.path()).unwrap();
        let hook = file.fail_next_data_rename.clone();
        let store = RetryingStore::new(Arc::new(file.clone()) as DynStore, RetryPolicy::default());
        let v1 = store
            .put("k", "one".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        hook.store(true, Ordering::SeqCst);
        let etag = store
            .put(
                "k",
                "two".into(),
                Metadata::new(),
                Precondition::IfMatch(v1),
            )
            .await
            .expect("resent after the read-back");
        let object = file.get("k").await.unwrap().unwrap();
        assert_eq!(
            object.body,
            Bytes::from("two"),
            "acknowledged but not stored"
        );
        assert_eq!(object.etag, etag);
    }

    /// A copied store folder (new inodes) keeps its ETags and metadata: the
    /// sidecar is checked against the data's hash instead.
    #[tokio::test]
    async fn a_copied_store_keeps_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("a")).unwrap();
        let etag = store
            .put(
                "x/k",
                "body".into(),
                tagged("n", "1"),
                Precondition::IfAbsent,
            )
            .await
            .unwrap();
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(dir.path().join("a"))
            .arg(dir.path().join("b"))
            .status()
            .unwrap();
        assert!(status.success());
        let copy = FileStore::new(dir.path().join("b")).unwrap();
        let head = copy.head("x/k").await.unwrap().unwrap();
        assert_eq!((head.etag, head.metadata), (etag, tagged("n", "1")));
        // A file replaced by hand reads as itself, without the stale sidecar.
        fs::write(dir.path().join("b/x/k"), "edited").unwrap();
        let head = copy.head("x/k").await.unwrap().unwrap();
        assert_eq!(
            (head.etag, head.metadata),
            (ETag::of(b"edited"), Metadata::new())
        );
    }

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

    fn listed_keys(listed: &[Listed]) -> Vec<&str> {
        listed.iter().map(|l| l.key.as_str()).collect()
    }

    /// A listing is of objects only: files put there by hand count (as
    /// `get` reads them), a crashed put's temporary file, the sidecars and
    /// the lock files do not.
    #[tokio::test]
    async fn a_listing_holds_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        for key in [
            "customer/a/db.sqlite3",
            "customer/a/log/00000000000000000001",
        ] {
            store
                .put(key, "body".into(), tagged("n", "1"), Precondition::IfAbsent)
                .await
                .unwrap();
        }
        let folder = dir.path().join("customer/a");
        // What a put killed between writing and renaming leaves behind.
        fs::write(
            folder.join(format!(".db.sqlite3.{}.tmp", uuid::Uuid::new_v4().simple())),
            "half",
        )
        .unwrap();
        fs::write(folder.join("by-hand"), "hand").unwrap();
        fs::create_dir_all(folder.join("empty/folder")).unwrap();
        let listed = store.list("customer/a/", None).await.unwrap();
        assert_eq!(
            listed_keys(&listed),
            [
                "customer/a/by-hand",
                "customer/a/db.sqlite3",
                "customer/a/log/00000000000000000001"
            ]
        );
        assert_eq!(listed[0].size, 4);
        let everything = store.list("", None).await.unwrap();
        assert_eq!(everything.len(), 3, "{everything:?}");
        assert!(!is_temp_file("db.sqlite3") && !is_temp_file(".hidden.tmp"));
    }

    /// A delete under the key's lock: a reader racing it sees the whole
    /// object (bytes, ETag and metadata that belong together) or nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_read_racing_a_delete_sees_the_object_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let (mut seen, mut missed) = (0, 0);
                while !done.load(Ordering::SeqCst) {
                    match store.get("x/k").await.unwrap() {
                        Some(object) => {
                            assert_eq!(object.etag, ETag::of(&object.body));
                            let n = std::str::from_utf8(&object.body).unwrap();
                            assert_eq!(object.metadata, tagged("n", n), "metadata of {n}");
                            seen += 1;
                        }
                        None => missed += 1,
                    }
                }
                (seen, missed)
            })
        };
        for n in 0..50 {
            let n = n.to_string();
            store
                .put(
                    "x/k",
                    n.clone().into(),
                    tagged("n", &n),
                    Precondition::IfAbsent,
                )
                .await
                .expect("absent after the delete");
            store.delete("x/k").await.unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let (seen, missed) = reader.await.unwrap();
        tracing::debug!(seen, missed, "reads racing deletes");
        assert!(store.list("x/", None).await.unwrap().is_empty());
        assert!(
            !dir.path().join(".tenantd/meta/x/k.json").exists(),
            "the sidecar goes with the data"
        );
    }

    /// Deleting a "key" that is a folder of other keys, or one below a
    /// file, deletes nothing and succeeds (no such object).
    #[tokio::test]
    async fn deleting_a_folder_or_below_a_file_is_deleting_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        store
            .put("a/b", "v".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        store.delete("a").await.expect("a folder is no object");
        store.delete("a/b/c").await.expect("below a file");
        assert_eq!(listed_keys(&store.list("a", None).await.unwrap()), ["a/b"]);
        for bad in ["../x", ".tenantd/locks/x"] {
            assert!(
                matches!(store.delete(bad).await, Err(StoreError::Fatal { .. })),
                "{bad}"
            );
            assert!(store.list(bad, None).await.unwrap().is_empty(), "{bad}");
        }
    }
}
