//! The conformance suite every store runs: the same functions, called from
//! each backend's tests (`tests/store_conformance.rs`), so that the memory,
//! file and S3 stores are held to one set of semantics. Each function takes
//! a key prefix so that runs never collide, and panics with a message that
//! names the broken property.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{DynStore, ETag, Listed, Metadata, Precondition, StoreError};

fn body(text: &str) -> Bytes {
    Bytes::from(text.to_string())
}

/// A missing key is `None` for `get` and `head`, never an error.
pub async fn missing_key_is_none(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/missing");
    assert!(
        store
            .get(&key)
            .await
            .expect("get of a missing key")
            .is_none(),
        "get of a missing key"
    );
    assert!(
        store
            .head(&key)
            .await
            .expect("head of a missing key")
            .is_none(),
        "head of a missing key"
    );
}

/// Bytes and metadata come back as written, with the ETag `put` returned.
pub async fn round_trip(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/round-trip");
    let mut metadata = Metadata::new();
    metadata.insert("tenantd-epoch".into(), "3".into());
    let etag = store
        .put(&key, body("hello"), metadata, Precondition::IfAbsent)
        .await
        .expect("put");
    let object = store.get(&key).await.unwrap().expect("object exists");
    assert_eq!(object.body, body("hello"));
    assert_eq!(object.etag, etag, "get returns the ETag put returned");
    assert_eq!(
        object.metadata.get("tenantd-epoch").map(String::as_str),
        Some("3"),
        "metadata round trip"
    );
    let meta = store.head(&key).await.unwrap().expect("head");
    assert_eq!(meta.etag, etag);
    assert_eq!(meta.size, 5);
    assert_eq!(
        meta.metadata.get("tenantd-epoch").map(String::as_str),
        Some("3")
    );
}

/// The ETag changes when the bytes change (and the new one is returned).
pub async fn etag_changes_with_bytes(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/etag");
    let first = store
        .put(&key, body("one"), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    let second = store
        .put(
            &key,
            body("two"),
            Metadata::new(),
            Precondition::IfMatch(first.clone()),
        )
        .await
        .unwrap();
    assert_ne!(first, second, "ETag must change when bytes change");
    assert_eq!(store.head(&key).await.unwrap().unwrap().etag, second);
}

/// `IfAbsent` on an existing key fails with `PreconditionFailed`.
pub async fn create_twice_fails(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/create-twice");
    store
        .put(&key, body("a"), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    let second = store
        .put(&key, body("b"), Metadata::new(), Precondition::IfAbsent)
        .await;
    assert!(
        matches!(second, Err(StoreError::PreconditionFailed { .. })),
        "second create: {second:?}"
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().body,
        body("a"),
        "the loser must not write"
    );
}

/// `IfMatch` with a stale ETag, or on a missing key, fails.
pub async fn stale_if_match_fails(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/stale");
    let old = store
        .put(&key, body("v1"), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    store
        .put(
            &key,
            body("v2"),
            Metadata::new(),
            Precondition::IfMatch(old.clone()),
        )
        .await
        .unwrap();
    let stale = store
        .put(
            &key,
            body("v3"),
            Metadata::new(),
            Precondition::IfMatch(old),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed { .. })),
        "stale If-Match: {stale:?}"
    );
    assert_eq!(store.get(&key).await.unwrap().unwrap().body, body("v2"));
    let missing = store
        .put(
            &format!("{prefix}/stale-missing"),
            body("x"),
            Metadata::new(),
            Precondition::IfMatch(ETag("\"0123\"".into())),
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::PreconditionFailed { .. })),
        "If-Match on a missing key: {missing:?}"
    );
}

/// `contenders` concurrent creates of one key: exactly one wins, per round.
pub async fn one_creator_wins(store: &DynStore, prefix: &str, contenders: usize, rounds: usize) {
    for round in 0..rounds {
        let key = Arc::new(format!("{prefix}/race-create-{round}"));
        let tasks: Vec<_> = (0..contenders)
            .map(|i| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    store
                        .put(
                            &key,
                            body(&format!("writer {i}")),
                            Metadata::new(),
                            Precondition::IfAbsent,
                        )
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(_) => winners.push(i),
                Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = store.get(&key).await.unwrap().unwrap().body;
        assert_eq!(
            stored,
            body(&format!("writer {}", winners[0])),
            "round {round}: the winner's bytes are stored"
        );
    }
}

/// `contenders` concurrent swaps from the same ETag: exactly one wins.
pub async fn one_swapper_wins(store: &DynStore, prefix: &str, contenders: usize, rounds: usize) {
    let key = Arc::new(format!("{prefix}/race-swap"));
    let mut etag = store
        .put(&key, body("start"), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    for round in 0..rounds {
        let tasks: Vec<_> = (0..contenders)
            .map(|i| {
                let (store, key, etag) = (store.clone(), key.clone(), etag.clone());
                tokio::spawn(async move {
                    store
                        .put(
                            &key,
                            body(&format!("round {round} writer {i}")),
                            Metadata::new(),
                            Precondition::IfMatch(etag),
                        )
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(new) => winners.push(new),
                Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} swaps won",
            winners.len()
        );
        etag = winners.pop().unwrap();
    }
}

/// `workers` × `each` compare-and-swap increments of one counter object:
/// none that succeeded is lost, none is applied twice. An increment whose
/// outcome the store reports as unknown (`Ambiguous`) is not retried, so it
/// may or may not be counted.
pub async fn cas_increments_lose_nothing(
    store: &DynStore,
    prefix: &str,
    workers: usize,
    each: usize,
) {
    let key = Arc::new(format!("{prefix}/counter"));
    store
        .put(&key, body("0"), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let mut succeeded = 0;
                for i in 0..each {
                    loop {
                        let current = store.get(&key).await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&current.body)
                            .unwrap()
                            .split(':')
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap();
                        // The writer's name in the bytes keeps equal counts
                        // from producing equal bytes (and equal ETags).
                        let next = body(&format!("{}:{w}-{i}", n + 1));
                        match store
                            .put(
                                &key,
                                next,
                                Metadata::new(),
                                Precondition::IfMatch(current.etag),
                            )
                            .await
                        {
                            Ok(_) => {
                                succeeded += 1;
                                break;
                            }
                            Err(StoreError::PreconditionFailed { .. }) => continue,
                            Err(StoreError::Ambiguous { .. }) => break,
                            Err(e) => panic!("worker {w}: {e}"),
                        }
                    }
                }
                succeeded
            })
        })
        .collect();
    let mut succeeded = 0;
    for task in tasks {
        succeeded += task.await.unwrap();
    }
    let stored = store.get(&key).await.unwrap().unwrap().body;
    let n: usize = std::str::from_utf8(&stored)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        n >= succeeded,
        "CAS increments lost: counter {n} < {succeeded} acknowledged"
    );
    assert!(
        n <= workers * each,
        "CAS increments doubled: counter {n} > {} attempted",
        workers * each
    );
}

/// The keys of a listing.
fn keys_of(listed: &[Listed]) -> Vec<String> {
    listed.iter().map(|l| l.key.clone()).collect()
}

async fn put_all(store: &DynStore, keys: &[String]) {
    for key in keys {
        store
            .put(key, body(key), Metadata::new(), Precondition::None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
}

/// `list` returns exactly the keys with the prefix (a folder-like prefix
/// does not match a longer sibling: `a/` is not `ab/`), in byte order
/// whatever the order of writing, each with its size and time; and only
/// those after `start_after`.
pub async fn list_filters_and_orders(store: &DynStore, prefix: &str) {
    let p = format!("{prefix}/list/customer/");
    let key = |tail: &str| format!("{p}{tail}");
    // Written out of order; '-' < '/' < '0' < 'b' in byte order, which is
    // not the order a folder walk meets them in.
    let tails = [
        "ab/db", "a/log/02", "a0", "a/db", "a-b/x", "a/log/01", "b/db",
    ];
    let started = SystemTime::now();
    put_all(store, &tails.map(key)).await;

    let listed = store.list(&key("a/"), None).await.expect("list a/");
    assert_eq!(
        keys_of(&listed),
        ["a/db", "a/log/01", "a/log/02"].map(key),
        "prefix {:?}: only its keys, in byte order",
        key("a/")
    );
    for entry in &listed {
        assert_eq!(entry.size, entry.key.len() as u64, "size of {}", entry.key);
        let modified = entry
            .last_modified
            .unwrap_or_else(|| panic!("no last_modified for {}", entry.key));
        // Loose bounds: S3 dates have whole seconds, and the server's clock
        // is not ours.
        let slack = Duration::from_secs(300);
        assert!(
            modified + slack >= started && modified <= SystemTime::now() + slack,
            "last_modified of {} is {modified:?}, not around now",
            entry.key
        );
    }
    assert_eq!(
        keys_of(&store.list(&key("a"), None).await.unwrap()),
        ["a-b/x", "a/db", "a/log/01", "a/log/02", "a0", "ab/db"].map(key),
        "a prefix that is not a folder"
    );
    assert_eq!(
        keys_of(&store.list(&p, None).await.unwrap()).len(),
        tails.len(),
        "everything under {p:?}"
    );

    let after = |start: &str| {
        let start = start.to_string();
        async move {
            keys_of(
                &store
                    .list(&key("a/"), Some(&start))
                    .await
                    .unwrap_or_else(|e| panic!("list after {start}: {e}")),
            )
        }
    };
    assert_eq!(after(&key("a/db")).await, ["a/log/01", "a/log/02"].map(key));
    assert_eq!(
        after(&key("a/log/00")).await,
        ["a/log/01", "a/log/02"].map(key),
        "start_after need not be a key"
    );
    assert!(
        after(&key("a/log/02")).await.is_empty(),
        "after the last key"
    );
    assert!(after(&key("b")).await.is_empty(), "after the whole prefix");
    assert_eq!(
        after(&p).await.len(),
        3,
        "start_after before the prefix changes nothing"
    );

    for empty in [key("c/"), key("a/db/"), format!("{prefix}/list-nothing/")] {
        let listed = store.list(&empty, None).await.expect("empty listing");
        assert!(listed.is_empty(), "{empty:?} lists {listed:?}");
    }
}

/// `delete` removes the object for `get`, `head` and `list`; deleting a
/// missing key succeeds; a deleted key can be created again.
pub async fn delete_removes(store: &DynStore, prefix: &str) {
    let dir = format!("{prefix}/delete/");
    let (gone, kept) = (format!("{dir}gone"), format!("{dir}kept"));
    put_all(store, &[gone.clone(), kept.clone()]).await;
    store.delete(&gone).await.expect("delete");
    assert!(
        store.get(&gone).await.unwrap().is_none(),
        "get after delete"
    );
    assert!(
        store.head(&gone).await.unwrap().is_none(),
        "head after delete"
    );
    assert_eq!(
        keys_of(&store.list(&dir, None).await.unwrap()),
        [kept.as_str()],
        "list after delete"
    );
    assert_eq!(
        store.get(&kept).await.unwrap().expect("the other key").body,
        body(&kept)
    );
    store.delete(&gone).await.expect("deleting it again");
    store
        .delete(&format!("{dir}never/written/key"))
        .await
        .expect("deleting a key that never existed");
    store
        .put(
            &gone,
            body("again"),
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .expect("a deleted key is absent for IfAbsent");
    assert_eq!(store.get(&gone).await.unwrap().unwrap().body, body("again"));
}

/// Keys written with the original app's leading slash (`/customer/...`)
/// are other keys: listing `customer/x/` neither returns nor trips on
/// them, and they list under their own prefix.
pub async fn leading_slash_keys_list_apart(store: &DynStore, prefix: &str) {
    let key = format!("{prefix}/slash/customer/x/db.sqlite3");
    let legacy = format!("/{key}");
    put_all(store, &[key.clone(), legacy.clone()]).await;
    assert_eq!(
        keys_of(
            &store
                .list(&format!("{prefix}/slash/customer/x/"), None)
                .await
                .unwrap()
        ),
        [key.as_str()]
    );
    assert_eq!(
        keys_of(
            &store
                .list(&format!("/{prefix}/slash/"), None)
                .await
                .unwrap()
        ),
        [legacy.as_str()]
    );
    store.delete(&legacy).await.expect("delete a legacy key");
    assert!(store.get(&legacy).await.unwrap().is_none());
    assert!(store.get(&key).await.unwrap().is_some());
}

/// `count` keys (more than a page of the backend's listing) come back
/// complete and in order, also from a `start_after` in the middle.
pub async fn list_spans_pages(store: &DynStore, prefix: &str, count: usize) {
    let dir = format!("{prefix}/pages/");
    let keys: Vec<String> = (0..count).map(|i| format!("{dir}{i:05}")).collect();
    put_all(store, &keys).await;
    assert_eq!(keys_of(&store.list(&dir, None).await.unwrap()), keys);
    let middle = count / 2;
    assert_eq!(
        keys_of(&store.list(&dir, Some(&keys[middle])).await.unwrap()),
        keys[middle + 1..],
        "after {}",
        keys[middle]
    );
}

/// A folder for a test's files, removed on drop (the suite is library code,
/// without the `tempfile` dev-dependency).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("tenantd-conformance-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes of a test file: `len` bytes that differ with `seed`, so that
/// versions are byte-distinct.
fn file_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 31 + u64::from(seed) * 7 + (i as u64 >> 12)) as u8)
        .collect()
}

/// `put_file` and `get_to_file` move bodies between files and the store
/// with the semantics of `put` and `get`: the same ETags, conditions and
/// metadata; a missing key downloads nothing; a missing local file is an
/// error naming it. The bodies span several chunks of
/// [`stream::CHUNK`](super::stream::CHUNK).
pub async fn files_round_trip(store: &DynStore, prefix: &str) {
    let dir = TempDir::new();
    let key = format!("{prefix}/files/db.sqlite3");
    let first = file_bytes(3 * super::stream::CHUNK + 12_345, 1);
    let upload = dir.path().join("upload");
    std::fs::write(&upload, &first).unwrap();
    let mut metadata = Metadata::new();
    metadata.insert("tenantd-epoch".into(), "7".into());
    let etag = store
        .put_file(&key, &upload, metadata.clone(), Precondition::IfAbsent)
        .await
        .expect("put_file of a new key");
    assert_eq!(etag, ETag::of(&first), "put_file's ETag is the body's MD5");
    let again = store
        .put_file(&key, &upload, metadata.clone(), Precondition::IfAbsent)
        .await
        .expect_err("put_file if absent of an existing key");
    assert!(again.is_precondition(), "{again:?}");

    let download = dir.path().join("download");
    let meta = store
        .get_to_file(&key, &download)
        .await
        .expect("get_to_file")
        .expect("the object exists");
    assert_eq!(meta.etag, etag, "get_to_file returns the ETag put_file did");
    assert_eq!(meta.size, first.len() as u64);
    assert_eq!(
        meta.metadata.get("tenantd-epoch").map(String::as_str),
        Some("7")
    );
    assert!(
        std::fs::read(&download).unwrap() == first,
        "the downloaded file holds the uploaded bytes"
    );
    let head = store.head(&key).await.unwrap().expect("head");
    assert_eq!((head.etag, head.size), (etag.clone(), first.len() as u64));

    // Replacing: only under the current ETag; the download replaces the
    // file that was there.
    let second = file_bytes(2 * super::stream::CHUNK + 1, 2);
    std::fs::write(&upload, &second).unwrap();
    let stale = ETag::of(b"not the current body");
    let refused = store
        .put_file(
            &key,
            &upload,
            metadata.clone(),
            Precondition::IfMatch(stale),
        )
        .await
        .expect_err("put_file under a stale ETag");
    // Through a retrying layer whose first attempt failed, a refusal it
    // cannot prove is "may have landed"; either way nothing was written.
    assert!(
        refused.is_precondition() || matches!(refused, StoreError::Ambiguous { .. }),
        "{refused:?}"
    );
    assert_eq!(
        store.head(&key).await.unwrap().expect("head").etag,
        etag,
        "a put_file under a stale ETag changed the object"
    );
    let replaced = store
        .put_file(&key, &upload, metadata, Precondition::IfMatch(etag.clone()))
        .await
        .expect("put_file under the current ETag");
    assert_ne!(replaced, etag);
    let meta = store.get_to_file(&key, &download).await.unwrap().unwrap();
    assert_eq!((meta.etag, meta.size), (replaced, second.len() as u64));
    assert!(std::fs::read(&download).unwrap() == second);
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().body,
        Bytes::from(second),
        "get reads what put_file wrote"
    );

    let missing = dir.path().join("missing-download");
    assert!(
        store
            .get_to_file(&format!("{prefix}/files/missing"), &missing)
            .await
            .expect("get_to_file of a missing key")
            .is_none()
    );
    assert!(!missing.exists(), "a missing key leaves no file behind");

    let nowhere = dir.path().join("no-such-file");
    let error = store
        .put_file(
            &format!("{prefix}/files/other"),
            &nowhere,
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .expect_err("put_file of a missing local file");
    assert!(
        error.to_string().contains(&nowhere.display().to_string()),
        "the error names the file: {error}"
    );
    assert!(
        store
            .head(&format!("{prefix}/files/other"))
            .await
            .unwrap()
            .is_none(),
        "nothing was written"
    );
}

/// Runs every property above against `store`.
pub async fn run_all(store: DynStore, prefix: &str, contenders: usize, rounds: usize) {
    missing_key_is_none(&store, prefix).await;
    round_trip(&store, prefix).await;
    etag_changes_with_bytes(&store, prefix).await;
    create_twice_fails(&store, prefix).await;
    stale_if_match_fails(&store, prefix).await;
    one_creator_wins(&store, prefix, contenders, rounds).await;
    one_swapper_wins(&store, prefix, contenders, rounds).await;
    cas_increments_lose_nothing(&store, prefix, 5, 10).await;
    list_filters_and_orders(&store, prefix).await;
    delete_removes(&store, prefix).await;
    leading_slash_keys_list_apart(&store, prefix).await;
    list_spans_pages(&store, prefix, 10).await;
    files_round_trip(&store, prefix).await;
}
