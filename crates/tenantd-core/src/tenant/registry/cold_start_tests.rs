//! The store requests of a cold start, in the order they are sent: which
//! round trips a fresh machine's first read pays (issue 22, item 5).

use std::path::Path;
use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::metrics::Metrics;
use crate::store::{
    ETag, Listed, MemoryStore, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreResult,
};
use crate::tenant::Op;
use crate::tenant::lifecycle;

/// Records every request as it is sent: `(op, key)`.
/// Requests of one op on keys under a prefix can be held until let go.
#[derive(Debug)]
struct Recording {
    inner: DynStore,
    sent: StdMutex<Vec<(&'static str, String)>>,
    held: StdMutex<Vec<(&'static str, String)>>,
    go: tokio::sync::Notify,
}

impl Recording {
    fn note(&self, op: &'static str, key: &str) {
        self.sent.lock().unwrap().push((op, key.to_string()));
    }

    /// Records the request, then waits while it is held.
    async fn pass(&self, op: &'static str, key: &str) {
        self.note(op, key);
        loop {
            let go = self.go.notified();
            let held = self
                .held
                .lock()
                .unwrap()
                .iter()
                .any(|(o, prefix)| *o == op && key.starts_with(prefix.as_str()));
            if !held {
                return;
            }
            go.await;
        }
    }

    fn hold(&self, op: &'static str, prefix: &str) {
        self.held.lock().unwrap().push((op, prefix.to_string()));
    }

    fn let_go(&self) {
        self.held.lock().unwrap().clear();
        self.go.notify_waiters();
    }

    /// Waits (up to 10 s) until a request matching `wanted` was sent.
    async fn until_sent(&self, wanted: impl Fn(&(&'static str, String)) -> bool) {
        for _ in 0..1000 {
            if self.sent.lock().unwrap().iter().any(&wanted) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never sent: {:#?}", self.sent.lock().unwrap());
    }

    fn take(&self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

#[async_trait]
impl ObjectStore for Recording {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        self.pass("get", key).await;
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.pass("head", key).await;
        self.inner.head(key).await
    }
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        self.pass("put", key).await;
        self.inner.put(key, body, metadata, condition).await
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        self.pass("get", key).await;
        self.inner.get_to_file(key, path).await
    }
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        self.pass("put", key).await;
        self.inner.put_file(key, path, metadata, condition).await
    }
    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        self.pass("list", prefix).await;
        self.inner.list(prefix, start_after).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.note("delete", key);
        self.inner.delete(key).await
    }
    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn machine(store: DynStore, name: &str, dir: &Path) -> Arc<Registry> {
    let metrics = Metrics::new();
    Registry::new(
        RegistryConfig::new(name, "127.0.0.1:1", Duration::from_secs(2), None),
        ActorContext::new(store, metrics, name.into(), dir.into()),
    )
}

/// A tenant with a few commits, left released by its holder `m1`; then a
/// fresh machine `m2` reads it once. Returns what `m2` sent.
async fn cold_read() -> Vec<(&'static str, String)> {
    cold_read_with(false).await
}

/// [`cold_read`], `m2` taking over from follower replicas when it has one
/// (as `serve` sets it up; it has none of this tenant).
async fn cold_read_with(replicas: bool) -> Vec<(&'static str, String)> {
    let dir = tempfile::tempdir().unwrap();
    let memory: DynStore = Arc::new(MemoryStore::new());
    let tenant = released(&memory, dir.path(), None).await;
    let recording = recording(memory.clone());
    let m2 = machine(recording.clone(), "m2", dir.path());
    if replicas {
        let store: DynStore = recording.clone();
        m2.take_over_from_replicas(Arc::new(crate::tenant::follower::Followers::new(
            store,
            dir.path().into(),
            "m2",
            "127.0.0.1:1".into(),
            None,
            Default::default(),
            &Metrics::new(),
        )));
    }
    let Route::Local(handle) = m2.route(&tenant, false).await else {
        panic!("m2 must take the released tenant over");
    };
    assert_eq!(handle.call(Op::Read).await.unwrap().count, 3);
    recording.take()
}

fn count(sent: &[(&'static str, String)], op: &str, key: &str) -> usize {
    sent.iter().filter(|(o, k)| *o == op && k == key).count()
}

/// The acquisition's own lock write names it: the first read after a claim
/// needs no second read of the lock.
#[tokio::test]
async fn a_cold_start_reads_the_lock_once() {
    let sent = cold_read().await;
    assert_eq!(count(&sent, "get", &keys::lock("cold")), 1, "{sent:#?}");
}

/// The snapshot's GET is the first read of the takeover, not behind a
/// HEAD: after the existence check, the next request naming the snapshot
/// is its GET (its HEAD and the log go beside the download).
#[tokio::test]
async fn a_cold_start_sends_the_snapshot_get_before_any_other_read_of_it() {
    for replicas in [false, true] {
        snapshot_get_first(cold_read_with(replicas).await);
    }
}

fn snapshot_get_first(sent: Vec<(&'static str, String)>) {
    let snapshot = keys::database("cold");
    let reads: Vec<&str> = sent
        .iter()
        .filter(|(op, key)| *key == snapshot && (*op == "get" || *op == "head"))
        .map(|(op, _)| *op)
        .collect();
    assert_eq!(
        reads.first(),
        Some(&"head"),
        "the existence check: {sent:#?}"
    );
    assert_eq!(reads.get(1), Some(&"get"), "{sent:#?}");
    assert_eq!(
        reads.iter().filter(|op| **op == "get").count(),
        1,
        "{sent:#?}"
    );
}

/// The published migrations are read beside the claim, not after it: the
/// read is sent before the fences.
#[tokio::test]
async fn a_cold_start_reads_the_migrations_before_fencing() {
    let sent = cold_read().await;
    let position = |wanted: &dyn Fn(&(&'static str, String)) -> bool| {
        sent.iter()
            .position(wanted)
            .unwrap_or_else(|| panic!("{sent:#?}"))
    };
    let migrations =
        position(&|(op, key)| *op == "get" && key == crate::tenant::migrations::HEAD_KEY);
    let first_fence =
        position(&|(op, key)| *op == "put" && key.starts_with(&keys::log_prefix("cold")));
    assert!(migrations < first_fence, "{sent:#?}");
}

fn recording(inner: DynStore) -> Arc<Recording> {
    Arc::new(Recording {
        inner,
        sent: StdMutex::new(Vec::new()),
        held: StdMutex::new(Vec::new()),
        go: tokio::sync::Notify::new(),
    })
}

/// A machine's heartbeat read ahead of its session's start (a standby
/// waiting, a first request being checked): the start writes on that read,
/// one round trip instead of two before the lock can be written.
#[tokio::test]
async fn a_primed_session_starts_with_one_write() {
    let memory: DynStore = Arc::new(MemoryStore::new());
    for earlier in [false, true] {
        if earlier {
            // An earlier process of the machine left its heartbeat.
            let old = crate::lease::Session::new(
                memory.clone(),
                crate::lease::LeaseConfig::new("m", "a", Duration::from_secs(2)),
            );
            drop(old.incarnation().await.unwrap());
        }
        let store = recording(memory.clone());
        let session = crate::lease::Session::new(
            store.clone(),
            crate::lease::LeaseConfig::new("m", "a", Duration::from_secs(2)),
        );
        session.prime().await;
        assert_eq!(store.take(), [("get", keys::heartbeat("m"))]);
        let incarnation = session.incarnation().await.unwrap();
        assert!(incarnation.is_valid());
        assert_eq!(
            store.take(),
            [("put", keys::heartbeat("m"))],
            "earlier: {earlier}"
        );
    }
}

/// A read ahead that went stale (the heartbeat written since, here by the
/// machine's earlier process) costs a refused write and a read, never a
/// session started on a wrong view. Nothing of this process has landed
/// yet, so the heartbeat found is not taken for a second live process (a
/// live one would find this one's at its next renewal and stop:
/// `tests/lease.rs`).
#[tokio::test]
async fn a_stale_primed_read_is_read_again() {
    let memory: DynStore = Arc::new(MemoryStore::new());
    let store = recording(memory.clone());
    let config = crate::lease::LeaseConfig::new("m", "a", Duration::from_secs(2));
    let session = crate::lease::Session::new(store.clone(), config.clone());
    session.prime().await;
    let earlier = crate::lease::Session::new(memory.clone(), config);
    drop(earlier.incarnation().await.unwrap());
    store.take();
    let started = session.incarnation().await.expect("starts over it");
    let heartbeat = keys::heartbeat("m");
    assert_eq!(
        store.take(),
        [
            ("put", heartbeat.clone()),
            ("get", heartbeat.clone()),
            ("put", heartbeat.clone())
        ]
    );
    let stored = memory.get(&heartbeat).await.unwrap().unwrap();
    let record: crate::lease::HeartbeatRecord = serde_json::from_slice(&stored.body).unwrap();
    assert_eq!(record.incarnation, started.id());
}

/// A tenant with three commits, released by its holder without bringing
/// the snapshot up to date (a zero release budget): the next holder
/// replays deltas.
async fn released_with_log(memory: &DynStore, dir: &Path) -> TenantId {
    released(memory, dir, Some(Duration::ZERO)).await
}

/// The tenant `cold` created, held by `m1` (with this release budget)
/// for three commits, and released.
async fn released(memory: &DynStore, dir: &Path, release_budget: Option<Duration>) -> TenantId {
    let tenant = TenantId::parse("cold").unwrap();
    lifecycle::create(memory, &tenant).await.unwrap();
    let mut ctx = ActorContext::new(memory.clone(), Metrics::new(), "m1".into(), dir.into());
    ctx.release_budget = release_budget;
    let m1 = Registry::new(
        RegistryConfig::new("m1", "127.0.0.1:1", Duration::from_secs(2), None),
        ctx,
    );
    let Route::Local(handle) = m1.route(&tenant, false).await else {
        panic!("m1 must hold the tenant");
    };
    for _ in 0..3 {
        handle
            .call(Op::Increment {
                idempotency_key: None,
            })
            .await
            .unwrap();
    }
    handle.stop();
    handle.ended().await;
    tenant
}

/// A fresh machine `m2` routes a request for the tenant `m1` released,
/// while `op` requests on keys under `prefix` are held; `meanwhile` runs
/// (and checks what was sent), then they are let go and `m2` must hold
/// the tenant with every commit.
async fn take_over_holding(
    op: &'static str,
    prefix: &str,
    meanwhile: impl AsyncFnOnce(&Recording),
) {
    let dir = tempfile::tempdir().unwrap();
    let memory: DynStore = Arc::new(MemoryStore::new());
    let tenant = released_with_log(&memory, dir.path()).await;
    let store = recording(memory.clone());
    store.hold(op, prefix);
    let m2 = machine(store.clone(), "m2", dir.path());
    let routed = tokio::spawn({
        let (m2, tenant) = (m2.clone(), tenant.clone());
        async move { m2.route(&tenant, false).await }
    });
    meanwhile(&store).await;
    store.let_go();
    let Ok(Route::Local(handle)) = routed.await else {
        panic!("m2 must take the released tenant over");
    };
    assert_eq!(handle.call(Op::Read).await.unwrap().count, 3);
}

/// A fresh machine's first request reads the lock and downloads the
/// snapshot while the existence check is still unanswered, and writes
/// nothing (not even its heartbeat) before it answers: its session and
/// lock writes then follow the check at once.
#[tokio::test]
async fn a_first_request_reads_the_lock_and_the_snapshot_beside_the_existence_check() {
    take_over_holding("head", &keys::database("cold"), async |store| {
        for wanted in [("get", keys::lock("cold")), ("get", keys::database("cold"))] {
            store.until_sent(|sent| *sent == wanted).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = store.take();
        assert!(
            !sent.iter().any(|(op, _)| *op == "put"),
            "nothing is written before the tenant is known to exist: {sent:#?}"
        );
    })
    .await;
}

/// The takeover's first fences go out once the log after the snapshot is
/// listed, while its deltas are still being fetched (held here until the
/// fences were sent), and the state is still every commit.
#[tokio::test]
async fn a_takeover_fences_while_the_deltas_are_still_fetched() {
    let log = keys::log_prefix("cold");
    take_over_holding("get", &log, async |store| {
        store
            .until_sent(|(op, key)| *op == "get" && key.starts_with(&log))
            .await;
        store
            .until_sent(|(op, key)| *op == "put" && key.starts_with(&log))
            .await;
    })
    .await;
}

/// Requests for tenants that do not exist write nothing at all, though
/// each starts the reads of a takeover beside its existence check.
#[tokio::test]
async fn requests_for_absent_tenants_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let memory: DynStore = Arc::new(MemoryStore::new());
    let store = recording(memory.clone());
    let m = machine(store.clone(), "m", dir.path());
    for n in 0..5 {
        let tenant = TenantId::parse(&format!("absent{n}")).unwrap();
        assert!(matches!(m.route(&tenant, false).await, Route::NotFound(_)));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = store.take();
    assert!(
        sent.iter()
            .any(|(op, key)| *op == "get" && *key == keys::lock("absent0")),
        "the lock is read beside the check: {sent:#?}"
    );
    assert!(
        !sent.iter().any(|(op, _)| *op == "put" || *op == "delete"),
        "{sent:#?}"
    );
}

/// The log objects of `tenant` in the store: `(slot, is a fence, token)`.
async fn log_objects(memory: &DynStore, tenant: &str) -> Vec<(u64, bool, Option<String>)> {
    let mut objects = vec![];
    for listed in memory.list(&keys::log_prefix(tenant), None).await.unwrap() {
        let seq = keys::log_seq(&listed.key).unwrap();
        let object = memory.get(&listed.key).await.unwrap().unwrap();
        let token = object.metadata.get(crate::tenant::log::TOKEN_KEY).cloned();
        objects.push((seq, crate::tenant::log::is_fence_size(listed.size), token));
    }
    objects
}

/// After a release naming the log's end, a fresh machine fences the
/// window after that end beside its session's start, before its lock
/// write, and fetches the log up to that end beside the listing. Here the
/// listing is held until the fences landed, so it shows them: the claim
/// still takes them as its window (no second round of fences, no hole
/// before its first commit), and with its lock written over the release
/// they were planned on, needs no HEAD of the snapshot after them.
#[tokio::test]
async fn a_cold_start_after_a_release_fences_before_the_lock_write() {
    let dir = tempfile::tempdir().unwrap();
    let memory: DynStore = Arc::new(MemoryStore::new());
    let tenant = released_with_log(&memory, dir.path()).await;
    let before = log_objects(&memory, "cold").await;
    let end = before.last().unwrap().0;
    let store = recording(memory.clone());
    let log = keys::log_prefix("cold");
    store.hold("list", &log);
    store.hold("put", &keys::lock("cold"));
    let m2 = machine(store.clone(), "m2", dir.path());
    let routed = tokio::spawn({
        let (m2, tenant) = (m2.clone(), tenant.clone());
        async move { m2.route(&tenant, false).await }
    });
    // Every fence of the window, and the log up to the released end,
    // while the lock write and the listing are held.
    for slot in 1..=crate::tenant::log::WINDOW {
        let fence = keys::log_slot("cold", end + slot);
        store
            .until_sent(|(op, key)| *op == "put" && *key == fence)
            .await;
    }
    let last = keys::log_slot("cold", end);
    store
        .until_sent(|(op, key)| *op == "get" && *key == last)
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.take();
    store.let_go();
    let Ok(Route::Local(handle)) = routed.await else {
        panic!("m2 must take the released tenant over");
    };
    assert_eq!(handle.call(Op::Read).await.unwrap().count, 3);
    let sent = store.take();
    assert!(
        !sent
            .iter()
            .any(|(op, key)| *op == "put" && key.starts_with(&log)),
        "the fences sent before the lock write were the claim's only round: {sent:#?}"
    );
    assert!(
        !sent
            .iter()
            .any(|(op, key)| *op == "head" && *key == keys::database("cold")),
        "no recheck of the snapshot after fences planned on the release the lock write replaced: {sent:#?}"
    );
    let next = handle
        .call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert_eq!(next.count, 4);
    let after = log_objects(&memory, "cold").await;
    let fences: Vec<u64> = after[before.len()..]
        .iter()
        .filter(|(_, fence, _)| *fence)
        .map(|(seq, _, _)| *seq)
        .collect();
    assert_eq!(
        fences,
        (end + 1..=end + crate::tenant::log::WINDOW).collect::<Vec<_>>()
    );
    let (seq, fence, _) = after.last().unwrap();
    assert_eq!(
        (*seq, *fence),
        (end + crate::tenant::log::WINDOW + 1, false),
        "the first commit right after the window: {after:?}"
    );
    handle.stop();
    handle.ended().await;
    // A third machine replays the whole log to the same state.
    replays_to(&memory, dir.path(), &tenant, 4).await;
}

/// A fresh machine takes `tenant` over and reads `count`.
async fn replays_to(memory: &DynStore, dir: &Path, tenant: &TenantId, count: u64) {
    let fresh = machine(memory.clone(), "fresh", dir);
    let Route::Local(handle) = fresh.route(tenant, false).await else {
        panic!("a fresh machine must take the tenant over");
    };
    assert_eq!(handle.call(Op::Read).await.unwrap().count, count);
}

/// A contender that fenced after a release and then lost the lock race
/// (or died before its lock write) leaves fences under the epoch it
/// planned, the winner's own: the winner finds them in the window, raises
/// its epoch above them, and loses nothing; the release's `log_end` is
/// still the end the winner finds (the service simulation found every
/// such claim reported as a mismatch).
#[tokio::test]
async fn fences_of_a_contender_that_lost_the_lock_race_are_outranked() {
    let dir = tempfile::tempdir().unwrap();
    let memory: DynStore = Arc::new(MemoryStore::new());
    let tenant = released_with_log(&memory, dir.path()).await;
    let end = log_objects(&memory, "cold").await.last().unwrap().0;
    // The loser: read the released lock, planned its acquisition, fenced.
    let lock = crate::lease::read_lock(&memory, &keys::lock("cold"))
        .await
        .unwrap();
    let session = crate::lease::Session::new(
        memory.clone(),
        crate::lease::LeaseConfig::new("m3", "a", Duration::from_secs(2)),
    );
    let contender = crate::lease::Contender::new(memory.clone(), keys::lock("cold"), session);
    let planned = contender.plan(&lock).expect("a release naming its log end");
    let prefetch =
        crate::tenant::prefetch::start(&memory, &dir.path().join("m3"), &tenant, None, None);
    let fences =
        crate::tenant::claim::fence_early(&memory, &tenant, "m3", &planned, prefetch.described());
    let ahead = fences.await.unwrap();
    assert!(ahead.took_the_window(), "the loser's fences landed");
    drop(prefetch);
    // The winner, whose acquisition has the same epoch.
    let m2 = machine(memory.clone(), "m2", dir.path());
    let Route::Local(handle) = m2.route(&tenant, false).await else {
        panic!("m2 must take the released tenant over");
    };
    assert_eq!(handle.call(Op::Read).await.unwrap().count, 3);
    assert!(
        handle.epoch() > planned.epoch,
        "the winner outranks the loser's fences: epoch {} after {}",
        handle.epoch(),
        planned.epoch
    );
    // The loser's fences are not the log the release left: its log_end
    // still matches what the winner found.
    assert_eq!(m2.actor.metrics.release_log_end_mismatches.get(), 0);
    let next = handle
        .call(Op::Increment {
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert_eq!(next.count, 4);
    let objects = log_objects(&memory, "cold").await;
    let theirs = planned.token.to_string();
    assert_eq!(
        objects
            .iter()
            .filter(|(_, _, token)| token.as_deref() == Some(theirs.as_str()))
            .map(|(seq, _, _)| *seq)
            .collect::<Vec<_>>(),
        (end + 1..=end + crate::tenant::log::WINDOW).collect::<Vec<_>>()
    );
    handle.stop();
    handle.ended().await;
    replays_to(&memory, dir.path(), &tenant, 4).await;
}

/// A lease's lock goes out beside its session's start: it names the
/// incarnation whose heartbeat write was just sent (held here until the
/// lock write was sent too). When that write is the one credited, the
/// lock is written once; when it was refused (an earlier process of the
/// machine left its heartbeat, and the start guessed there was none) and
/// a later write started the session, the lock is written again, so that
/// its clock starts after the write that covers it.
#[tokio::test]
async fn a_lock_goes_out_beside_the_session_start() {
    for earlier in [false, true] {
        let memory: DynStore = Arc::new(MemoryStore::new());
        let config = crate::lease::LeaseConfig::new("m", "a", Duration::from_secs(2));
        if earlier {
            let old = crate::lease::Session::new(memory.clone(), config.clone());
            drop(old.incarnation().await.unwrap());
        }
        let store = recording(memory.clone());
        let heartbeat = keys::heartbeat("m");
        store.hold("put", &heartbeat);
        let session = crate::lease::Session::new(store.clone(), config.clone());
        let lock = keys::lock("t");
        let mut contender = crate::lease::Contender::new(store.clone(), lock.clone(), session);
        let acquiring = tokio::spawn(async move { contender.try_acquire().await });
        store
            .until_sent(|(op, key)| *op == "put" && *key == lock)
            .await;
        store.let_go();
        let Ok(Ok(crate::lease::Acquire::Acquired(lease))) = acquiring.await else {
            panic!("the lock is free");
        };
        assert!(lease.is_valid());
        let sent = store.take();
        assert_eq!(
            count(&sent, "put", &lock),
            if earlier { 2 } else { 1 },
            "earlier: {earlier}: {sent:#?}"
        );
        let stored = memory.get(&lock).await.unwrap().unwrap();
        let record: crate::lease::LockRecord = serde_json::from_slice(&stored.body).unwrap();
        assert_eq!(record.incarnation, Some(lease.incarnation()));
        assert_eq!(record.token, lease.token());
    }
}
