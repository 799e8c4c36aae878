//! The conformance suite every store runs: the same functions, called from
//! each backend's tests (`tests/store_conformance.rs`), so that the memory,
//! file and S3 stores are held to one set of semantics. Each function takes
//! a key prefix so that runs never collide, and panics with a message that
//! names the broken property.

use std::sync::Arc;

use bytes::Bytes;

use super::{DynStore, ETag, Metadata, Precondition, StoreError};

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
}
