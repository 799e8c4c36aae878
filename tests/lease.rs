//! The `machine.lock` protocol on the memory store with tokio's paused
//! clock: no sockets, no real sleeps, every instant under the test's control.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tenantd::lease::{Acquire, Contender, Lease, LeaseConfig, LockState, read_lock};
use tenantd::store::fault::FaultHandle;
use tenantd::store::{
    DynStore, FaultConfig, FaultStore, MemoryStore, Metadata, ObjectStore, Precondition,
};
use tokio::time::Instant;

const KEY: &str = "customer/1/machine.lock";
const TTL: Duration = Duration::from_millis(3000);

/// A contender with its own fault layer over the shared store, as each
/// machine has its own path to the bucket.
fn contender(shared: &Arc<MemoryStore>, id: &str) -> (Contender, FaultHandle) {
    let fault = FaultStore::new(shared.clone() as DynStore, FaultConfig::default());
    let handle = fault.handle();
    let store: DynStore = Arc::new(fault);
    (
        Contender::new(
            store,
            KEY.into(),
            LeaseConfig::new(id, format!("{id}:3000"), TTL),
        ),
        handle,
    )
}

fn acquired(outcome: Acquire) -> Lease {
    match outcome {
        Acquire::Acquired(lease) => lease,
        Acquire::HeldBy { record, .. } => panic!("expected to acquire, held by {}", record.holder),
        Acquire::Unknown { .. } => panic!("expected to acquire, lock unparsable"),
    }
}

#[tokio::test(start_paused = true)]
async fn two_contenders_one_holder() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(a.try_acquire().await.unwrap());
    assert_eq!(lease.epoch(), 1);
    match b.try_acquire().await.unwrap() {
        Acquire::HeldBy { record, .. } => assert_eq!(record.holder, "a"),
        _ => panic!("b must see a as the holder"),
    }
}

#[tokio::test(start_paused = true)]
async fn racing_contenders_elect_exactly_one() {
    let shared = Arc::new(MemoryStore::new());
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (mut c, _) = contender(&shared, &format!("m{i}"));
        tasks.push(tokio::spawn(async move { c.try_acquire().await.unwrap() }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Acquire::Acquired(lease) = t.await.unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holder_is_replaced_only_after_a_full_ttl_of_observation() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(a.try_acquire().await.unwrap());
    drop(lease); // a crash: renewals stop, nothing is released
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    match b.try_acquire().await.unwrap() {
        Acquire::HeldBy { stale_in, .. } => assert_eq!(stale_in, Duration::from_millis(1)),
        _ => panic!("taken over before a full ttl of observation"),
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let lease = acquired(b.try_acquire().await.unwrap());
    assert_eq!(lease.epoch(), 2);
    assert_eq!(lease.previous().unwrap().holder, "a");
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_keeps_the_lease_by_renewing() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(a.try_acquire().await.unwrap());
    for _ in 0..20 {
        tokio::time::sleep(TTL / 2).await;
        assert!(
            matches!(b.try_acquire().await.unwrap(), Acquire::HeldBy { .. }),
            "took over a renewing holder"
        );
        assert!(
            lease.is_valid(),
            "at {:?}: deadline {:?}",
            Instant::now(),
            lease.deadline()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_cannot_renew_stops_claiming_before_anyone_may_take_over() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, a_faults) = contender(&shared, "a");
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(a.try_acquire().await.unwrap());
    let start = Instant::now();
    a_faults.partition(true);
    let mut holder_invalid_at = None;
    let mut takeover_at = None;
    let step = Duration::from_millis(10);
    while takeover_at.is_none() {
        if holder_invalid_at.is_none() && !lease.is_valid() {
            holder_invalid_at = Some(Instant::now());
        }
        match b.try_acquire().await.unwrap() {
            Acquire::Acquired(_) => takeover_at = Some(Instant::now()),
            _ => tokio::time::sleep(step).await,
        }
        assert!(Instant::now() - start < TTL * 3, "no takeover at all");
    }
    let (invalid, takeover) = (
        holder_invalid_at.expect("holder never stopped claiming"),
        takeover_at.unwrap(),
    );
    assert!(
        invalid < takeover,
        "holder claimed the lease until {invalid:?}, takeover at {takeover:?}"
    );
    assert!(takeover - start >= TTL, "takeover before a full ttl");
    // The holder also learns it lost: `lost()` has resolved.
    tokio::time::timeout(Duration::from_millis(1), lease.lost())
        .await
        .expect("lost() resolves");
}

#[tokio::test(start_paused = true)]
async fn release_allows_an_immediate_takeover_with_the_next_epoch() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(a.try_acquire().await.unwrap());
    lease.release().await.unwrap();
    match read_lock(&(shared.clone() as DynStore), KEY).await.unwrap() {
        LockState::Released { record, .. } => {
            assert_eq!(record.epoch, 1, "release keeps the epoch")
        }
        other => panic!("expected a released lock, got {other:?}"),
    }
    let lease = acquired(b.try_acquire().await.unwrap());
    assert_eq!(lease.epoch(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lock_renewed_long_ago_is_taken_at_once() {
    let shared = Arc::new(MemoryStore::new());
    let old = serde_json::json!({
        "holder": "gone", "addr": "x:1", "epoch": 7, "token": uuid::Uuid::new_v4(),
        "ttl_ms": 3000, "renewed_at": "2020-01-01T00:00:00Z", "released": false, "note": "extra fields are fine"
    });
    shared
        .put(
            KEY,
            Bytes::from(old.to_string()),
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();
    let (mut b, _) = contender(&shared, "b");
    let lease = acquired(b.try_acquire().await.unwrap());
    assert_eq!(lease.epoch(), 8);
}

#[tokio::test(start_paused = true)]
async fn an_unparsable_lock_is_only_taken_by_the_stale_rule() {
    let shared = Arc::new(MemoryStore::new());
    let garbage = Bytes::from_static(b"{ this is not a lock");
    shared
        .put(
            KEY,
            garbage.clone(),
            Metadata::new(),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();
    let (mut b, _) = contender(&shared, "b");
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::Unknown { .. }
    ));
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::Unknown { .. }
    ));
    assert_eq!(
        shared.get(KEY).await.unwrap().unwrap().body,
        garbage,
        "overwritten before the stale rule allowed"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    acquired(b.try_acquire().await.unwrap());
}

#[derive(Clone, Debug)]
enum Step {
    Acquire(usize),
    Crash(usize),
    Pause(usize),
    Resume(usize),
    Release(usize),
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize).prop_map(Step::Acquire),
        1 => (0..3usize).prop_map(Step::Crash),
        1 => (0..3usize).prop_map(Step::Pause),
        1 => (0..3usize).prop_map(Step::Resume),
        1 => (0..3usize).prop_map(Step::Release),
        3 => (1..2000u64).prop_map(Step::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    /// Over random acquire / crash / pause / resume / release / time steps
    /// of three machines: epochs of successive acquisitions strictly
    /// increase, and at no instant do two machines both claim the lease.
    #[test]
    fn epochs_increase_and_claims_never_overlap(steps in prop::collection::vec(step(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(async move {
            let shared = Arc::new(MemoryStore::new());
            let mut machines: Vec<(Contender, FaultHandle, Option<Lease>)> = (0..3)
                .map(|i| {
                    let (c, f) = contender(&shared, &format!("m{i}"));
                    (c, f, None)
                })
                .collect();
            let mut last_epoch = 0;
            for step in steps {
                match step {
                    Step::Acquire(i) => {
                        if machines[i].2.as_ref().is_some_and(Lease::is_valid) {
                            continue;
                        }
                        if let Ok(Acquire::Acquired(lease)) = machines[i].0.try_acquire().await {
                            assert!(lease.epoch() > last_epoch, "epoch {} after {}", lease.epoch(), last_epoch);
                            last_epoch = lease.epoch();
                            machines[i].2 = Some(lease);
                        }
                    }
                    Step::Crash(i) => machines[i].2 = None,
                    Step::Pause(i) => machines[i].1.partition(true),
                    Step::Resume(i) => machines[i].1.partition(false),
                    Step::Release(i) => {
                        if let Some(lease) = machines[i].2.take() {
                            let _ = lease.release().await;
                        }
                    }
                    Step::Advance(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
                let claiming = machines.iter().filter(|m| m.2.as_ref().is_some_and(Lease::is_valid)).count();
                assert!(claiming <= 1, "{claiming} machines claim the lease at once");
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_machine_takes_its_own_stale_lock_at_once() {
    let shared = Arc::new(MemoryStore::new());
    let (mut first_life, _) = contender(&shared, "a");
    drop(acquired(first_life.try_acquire().await.unwrap())); // killed
    let (mut second_life, _) = contender(&shared, "a");
    let lease = acquired(second_life.try_acquire().await.unwrap());
    assert_eq!(lease.epoch(), 2);
    let (mut other, _) = contender(&shared, "b");
    assert!(matches!(
        other.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_process_never_takes_over_its_own_live_lease() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let lease = acquired(a.try_acquire().await.unwrap());
    match a.try_acquire().await.unwrap() {
        Acquire::HeldBy { record, .. } => assert_eq!(record.token, lease.token()),
        _ => panic!("took over its own live lease"),
    }
}

/// After a lease of this process ends without a release (its holder failed
/// on the store and stepped down), the process takes its own lock back at
/// once instead of waiting out a ttl as if another machine held it.
#[tokio::test(start_paused = true)]
async fn a_process_takes_its_own_lock_back_at_once_when_its_lease_ended() {
    let shared = Arc::new(MemoryStore::new());
    let (mut a, _) = contender(&shared, "a");
    let first = acquired(a.try_acquire().await.unwrap());
    drop(first); // ended without a release
    let second = acquired(a.try_acquire().await.unwrap());
    assert_eq!(second.epoch(), 2);
    // And the new lease is this process's live one.
    match a.try_acquire().await.unwrap() {
        Acquire::HeldBy { record, .. } => assert_eq!(record.token, second.token()),
        _ => panic!("took over its own live lease"),
    }
}
