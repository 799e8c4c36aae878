//! Fencing of the commit log against a real S3 server (moto), with real
//! tenant actors: holder A is paused with uploads under way, B takes the
//! lease over and writes; nothing of A's after the takeover becomes part
//! of the tenant's state — neither its late uploads (refused: B fenced
//! their slots) nor an object of A's that landed past a hole (skipped: an
//! older epoch behind B's fence).

mod support;

use std::time::Duration;

use tenantd_core::TenantId;
use tenantd_core::lease::{Acquire, Contender, LeaseConfig, Session};
use tenantd_core::metrics::Metrics;
use tenantd_core::store::{DynStore, FaultConfig, FaultStore, Precondition, keys};
use tenantd_core::tenant::actor::{ActorContext, TenantActor};
use tenantd_core::tenant::delta::Delta;
use tenantd_core::tenant::log::{self, Until};
use tenantd_core::tenant::{Op, TenantError};

fn increment() -> Op {
    Op::Increment {
        idempotency_key: None,
    }
}

async fn stored_count(store: &DynStore, dir: &std::path::Path, name: &str) -> i64 {
    let path = dir.join(name);
    log::materialize(store, "42", &path, Until::End)
        .await
        .expect("the stored log replays");
    rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_uploads_after_a_takeover_never_become_state() {
    let (store, _bucket) = support::s3_store().await;
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_millis(800);
    let id = TenantId::parse("42").unwrap();
    let lock_key = keys::lock("42");

    // A holds the tenant through a store whose traffic can be delayed.
    let a_view = FaultStore::new(store.clone(), FaultConfig::default());
    let a_faults = a_view.handle();
    let a_store: DynStore = std::sync::Arc::new(a_view);
    let mut a = Contender::new(
        a_store.clone(),
        lock_key.clone(),
        Session::new(a_store.clone(), LeaseConfig::new("a", "a:1", ttl)),
    );
    let Acquire::Acquired(lease_a) = a.try_acquire().await.unwrap() else {
        panic!("a must acquire")
    };
    let ctx_a = ActorContext::new(a_store, Metrics::new(), "a".into(), dir.path().join("a"));
    let (handle_a, task_a) = TenantActor::start(id.clone(), ctx_a, lease_a)
        .await
        .unwrap();
    for expected in 1..=3 {
        assert_eq!(handle_a.call(increment()).await.unwrap().count, expected);
    }

    // A is paused: everything it sends reaches the store 4 s late, its
    // lease renewals included. Requests keep arriving at it.
    a_faults.set(FaultConfig {
        latency: Duration::from_secs(4),
        ..FaultConfig::default()
    });
    let at_a: Vec<_> = (0..3)
        .map(|_| {
            let handle = handle_a.clone();
            tokio::spawn(async move { handle.call(increment()).await })
        })
        .collect();

    // Meanwhile an object of A's lands past a hole (one of its uploads
    // overtook the one before it): A's last commit copied to slot end + 2.
    let listed = log::list_slots(&store, "42", 0).await.unwrap();
    let end = listed.last().unwrap().0;
    let last = store
        .get(&keys::log_slot("42", end))
        .await
        .unwrap()
        .unwrap();
    let mut stray = Delta::decode(&keys::log_slot("42", end), &last.body).unwrap();
    stray.seq = end + 2;
    store
        .put(
            &keys::log_slot("42", end + 2),
            stray.encode().unwrap(),
            log::slot_metadata(
                stray.epoch,
                end + 2,
                &log::Writer {
                    holder: "a".into(),
                    token: "a's token".into(),
                },
            ),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();

    // B sees the lock unchanged for a ttl, takes over and writes.
    let mut b = Contender::new(
        store.clone(),
        lock_key.clone(),
        Session::new(store.clone(), LeaseConfig::new("b", "b:1", ttl)),
    );
    let lease_b = match b
        .acquire_until(tokio::time::Instant::now() + ttl * 6)
        .await
        .unwrap()
    {
        Acquire::Acquired(lease) => lease,
        _ => panic!("b must take over a paused holder's lease"),
    };
    assert!(lease_b.epoch() > 1);
    let ctx_b = ActorContext::new(
        store.clone(),
        Metrics::new(),
        "b".into(),
        dir.path().join("b"),
    );
    let (handle_b, task_b) = TenantActor::start(id.clone(), ctx_b, lease_b)
        .await
        .unwrap();
    let first_b = handle_b.call(increment()).await.unwrap();
    assert_eq!(
        first_b.count, 4,
        "A's stray object is not part of the state"
    );
    assert_eq!(handle_b.call(increment()).await.unwrap().count, 5);
    let fences = log::list_slots(&store, "42", end).await.unwrap();
    assert!(
        fences
            .iter()
            .any(|(seq, size)| *seq == end + 1 && log::is_fence_size(*size)),
        "B fenced the hole: {fences:?}"
    );

    // A wakes: none of its requests is acknowledged, and it steps down.
    for request in at_a {
        let answer = request.await.unwrap();
        assert!(
            matches!(
                answer,
                Err(TenantError::NotHolder | TenantError::Unavailable(_))
            ),
            "the paused holder acknowledged {answer:?}"
        );
    }
    let exit = task_a.await.unwrap();
    eprintln!("A ended: {exit:?}");
    a_faults.set(FaultConfig::default());

    // The tenant's state is B's: 5, whatever A sent.
    assert_eq!(stored_count(&store, dir.path(), "check1.sqlite3").await, 5);
    handle_b.stop();
    task_b.await.unwrap();
    assert_eq!(stored_count(&store, dir.path(), "check2.sqlite3").await, 5);
    let snapshot = store.get(&keys::database("42")).await.unwrap().unwrap();
    let released = dir.path().join("released.sqlite3");
    std::fs::write(&released, &snapshot.body).unwrap();
    let count: i64 = rusqlite::Connection::open(&released)
        .unwrap()
        .query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        count, 5,
        "the released tenant's snapshot alone holds every write"
    );
}
