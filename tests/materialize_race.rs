//! A reader rebuilding a tenant (`tenantd restore`, the simulations'
//! checkers) while its holder keeps compacting: the snapshot it chose may
//! be replaced, and the slots after it deleted, before its download
//! starts. What it rebuilds must still be a state the holder confirmed,
//! named by the slot it really reaches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use tenantd_core::TenantId;
use tenantd_core::lease::{Acquire, Contender, LeaseConfig, Session};
use tenantd_core::metrics::Metrics;
use tenantd_core::store::hooked::{self, Hooked, Hooks};
use tenantd_core::store::{DynStore, MemoryStore, StoreResult, keys};
use tenantd_core::tenant::actor::{ActorContext, TenantActor};
use tenantd_core::tenant::log::{self, Retention, Until};
use tenantd_core::tenant::{Op, TenantHandle};

const ID: &str = "7";

type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Where the holder overtakes the reader.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Point {
    /// Before the snapshot's bytes are read.
    SnapshotRead,
    /// Before the log after the snapshot is listed.
    LogList,
}

/// The memory store as a reader sees it: the first request at `point`
/// runs `hook` first (what the holder does meanwhile).
#[derive(Debug)]
struct Reader {
    point: Point,
    hook: Mutex<Option<HookBox>>,
}

impl Reader {
    async fn at(&self, point: Point) {
        if point != self.point {
            return;
        }
        let hook = self.hook.lock().unwrap().take();
        if let Some(HookBox(hook)) = hook {
            hook().await;
        }
    }
}

struct HookBox(Hook);

impl std::fmt::Debug for HookBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hook")
    }
}

#[async_trait]
impl Hooks for Reader {
    async fn before(&self, op: hooked::Op, key: &str) -> StoreResult<()> {
        match op {
            hooked::Op::Get if key == keys::database(ID) => self.at(Point::SnapshotRead).await,
            hooked::Op::List if key == keys::log_prefix(ID) => self.at(Point::LogList).await,
            _ => {}
        }
        Ok(())
    }
}

async fn increment(handle: &TenantHandle) -> u64 {
    handle
        .call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .unwrap()
        .count
}

async fn snapshot_seq(store: &DynStore) -> u64 {
    let meta = store.head(&keys::database(ID)).await.unwrap().unwrap();
    log::describe_snapshot(&keys::database(ID), meta.etag, &meta.metadata)
        .unwrap()
        .seq
}

/// Increments until the holder has compacted past `seq` (it compacts
/// every other delta and keeps nothing older).
async fn until_compacted_past(store: &DynStore, handle: &TenantHandle, seq: u64) -> u64 {
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while snapshot_seq(store).await <= seq {
        assert!(tokio::time::Instant::now() < deadline, "no compaction");
        count = increment(handle).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_before_the_snapshot_download_is_not_replayed_from_the_older_slot() {
    race(Point::SnapshotRead, true).await;
}

/// The compaction deletes every slot after the downloaded snapshot, so the
/// listing shows no gap at all: only the replaced snapshot tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_before_the_log_listing_does_not_hide_confirmed_commits() {
    race(Point::LogList, false).await;
}

/// A reader overtaken at `point` by a compaction (and, if `then_commit`,
/// one more commit) still rebuilds the state at the end of the log.
async fn race(point: Point, then_commit: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(MemoryStore::new());
    let session = Session::new(
        store.clone(),
        LeaseConfig::new("a", "a", Duration::from_secs(5)),
    );
    let mut contender = Contender::new(store.clone(), keys::lock(ID), session);
    let Acquire::Acquired(lease) = contender
        .acquire_until(tokio::time::Instant::now() + Duration::from_secs(10))
        .await
        .unwrap()
    else {
        panic!("the lease is free");
    };
    let mut ctx = ActorContext::new(
        store.clone(),
        Metrics::new(),
        "a".into(),
        dir.path().join("a"),
    );
    ctx.retention = Retention {
        keep: Duration::ZERO,
        max_deltas: 2,
        max_delta_bytes: u64::MAX,
    };
    let (handle, _actor) = TenantActor::start(TenantId::parse(ID).unwrap(), ctx, lease)
        .await
        .unwrap();
    until_compacted_past(&store, &handle, 0).await;

    // Between the reader's look at the snapshot and its download, the
    // holder compacts (deleting the slots the reader would replay) and
    // commits once more.
    let confirmed = Arc::new(Mutex::new(0));
    let hook: Hook = {
        let (store, handle, confirmed) = (store.clone(), handle.clone(), confirmed.clone());
        Box::new(move || {
            Box::pin(async move {
                let before = snapshot_seq(&store).await;
                let mut count = until_compacted_past(&store, &handle, before + 2).await;
                if then_commit {
                    count = increment(&handle).await;
                }
                *confirmed.lock().unwrap() = count;
            })
        })
    };
    let reader: DynStore = Arc::new(Hooked::new(
        store.clone(),
        Reader {
            point,
            hook: Mutex::new(Some(HookBox(hook))),
        },
    ));
    let path = dir.path().join("restored.sqlite3");
    let done = log::materialize(&reader, ID, &path, Until::End)
        .await
        .expect("a restore overtaken by a compaction reads the log again");
    let count: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap();
    let confirmed = *confirmed.lock().unwrap();
    assert!(confirmed > 0, "the hook ran");
    assert_eq!(count as u64, confirmed, "the state at the end of the log");
    let listed = store.list(&keys::log_prefix(ID), None).await.unwrap();
    let last = listed
        .iter()
        .filter_map(|l| keys::log_seq(&l.key))
        .chain([snapshot_seq(&store).await])
        .max()
        .unwrap();
    assert_eq!(done.seq, last, "named by the slot it reaches");
}
