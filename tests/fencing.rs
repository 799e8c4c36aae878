//! Fencing against a real S3 server (moto): holder A is paused, B takes the
//! lease over and writes; A's late upload fails with a precondition error,
//! and B's data is intact. The steps are the tenant actor's own: the lease,
//! the SQLite file with its epoch in `tenantd_meta`, and uploads with
//! `If-Match`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use tenantd::lease::{Acquire, Contender, LeaseConfig, Session};
use tenantd::store::{Metadata, Precondition, StoreError, keys};
use tenantd::tenant::db::Db;

fn bytes_of(path: &std::path::Path) -> Bytes {
    Bytes::from(std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_late_upload_is_refused_and_the_new_holders_data_survives() {
    let (store, _bucket) = support::s3_store().await;
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_millis(800);
    let (lock_key, db_key) = (keys::lock("42"), keys::database("42"));

    // A takes the lease and writes the database: count 1, epoch 1.
    let mut a = Contender::new(
        store.clone(),
        lock_key.clone(),
        Session::new(store.clone(), LeaseConfig::new("a", "a:1", ttl)),
    );
    let Acquire::Acquired(lease_a) = a.try_acquire().await.unwrap() else {
        panic!("a must acquire")
    };
    let path_a = dir.path().join("a.sqlite3");
    let mut db_a = Db::open(&path_a).unwrap();
    db_a.claim(lease_a.epoch()).unwrap();
    db_a.apply(lease_a.epoch(), &[None]).unwrap();
    let etag_a = store
        .put(
            &db_key,
            bytes_of(&path_a),
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();

    // A is paused: it stops renewing, with one more commit prepared.
    drop(lease_a);
    db_a.apply(1, &[None]).unwrap();
    let late_upload = bytes_of(&path_a);

    // B waits out a full ttl of an unchanged lock, takes over, downloads,
    // claims the database with its epoch and writes.
    let mut b = Contender::new(
        store.clone(),
        lock_key.clone(),
        Session::new(store.clone(), LeaseConfig::new("b", "b:1", ttl)),
    );
    let lease_b = match b
        .acquire_until(tokio::time::Instant::now() + ttl * 4)
        .await
        .unwrap()
    {
        Acquire::Acquired(lease) => lease,
        _ => panic!("b must take over a paused holder's lease"),
    };
    assert_eq!(lease_b.epoch(), 2);
    let object = store.get(&db_key).await.unwrap().unwrap();
    let path_b = dir.path().join("b.sqlite3");
    std::fs::write(&path_b, &object.body).unwrap();
    let mut db_b = Db::open(&path_b).unwrap();
    db_b.claim(lease_b.epoch()).unwrap();
    let claimed = store
        .put(
            &db_key,
            bytes_of(&path_b),
            Metadata::new(),
            Precondition::IfMatch(object.etag),
        )
        .await
        .unwrap();
    let (answers, _) = db_b.apply(lease_b.epoch(), &[None, None]).unwrap();
    assert_eq!(answers.last().unwrap().count, 3);
    let etag_b = store
        .put(
            &db_key,
            bytes_of(&path_b),
            Metadata::new(),
            Precondition::IfMatch(claimed),
        )
        .await
        .unwrap();

    // A wakes and uploads with the ETag it last wrote: refused.
    let late = store
        .put(
            &db_key,
            late_upload,
            Metadata::new(),
            Precondition::IfMatch(etag_a),
        )
        .await;
    assert!(
        matches!(late, Err(StoreError::PreconditionFailed { .. })),
        "late upload: {late:?}"
    );

    // B's data is intact.
    let stored = store.get(&db_key).await.unwrap().unwrap();
    assert_eq!(stored.etag, etag_b);
    let check = dir.path().join("check.sqlite3");
    std::fs::write(&check, &stored.body).unwrap();
    let db = Db::open(&check).unwrap();
    assert_eq!(db.count().unwrap(), 3);
    assert_eq!(db.epoch().unwrap(), 2);
}
