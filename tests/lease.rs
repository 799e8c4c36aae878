//! The `machine.lock` protocol and the machine sessions that keep locks
//! alive, on the memory store with tokio's paused clock: no sockets, no
//! real sleeps, every instant under the test's control.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use std::sync::atomic::Ordering;
use tenantd_core::lease::{
    Acquire, Contender, HeartbeatRecord, Lease, LeaseConfig, LockState, Session, read_lock,
};
use tenantd_core::metrics::Metrics;
use tenantd_core::store::fault::FaultHandle;
use tenantd_core::store::hooked::{Hooked, Hooks, Op};
use tenantd_core::store::instrumented::InstrumentedStore;
use tenantd_core::store::{
    DynStore, FaultConfig, FaultStore, MemoryStore, Metadata, ObjectStore, Precondition,
    StoreError, StoreResult, keys,
};
use tokio::time::Instant;

const KEY: &str = "customer/1/machine.lock";
const TTL: Duration = Duration::from_millis(3000);

/// One machine process: its own fault layer over the shared store (each
/// machine has its own path to the bucket), its request counters, and one
/// session for all its leases.
struct Machine {
    store: DynStore,
    faults: FaultHandle,
    metrics: Metrics,
    session: Session,
}

impl Machine {
    fn start(shared: &Arc<MemoryStore>, id: &str) -> Machine {
        Machine::start_on(shared.clone() as DynStore, id)
    }

    /// A machine whose path to the bucket is `store`.
    fn start_on(store: DynStore, id: &str) -> Machine {
        let fault = FaultStore::new(store, FaultConfig::default());
        let faults = fault.handle();
        let metrics = Metrics::new();
        let store: DynStore = Arc::new(InstrumentedStore::new(Arc::new(fault), metrics.clone()));
        let session = Session::new(
            store.clone(),
            LeaseConfig::new(id, format!("{id}:3000"), TTL),
        );
        Machine {
            store,
            faults,
            metrics,
            session,
        }
    }

    fn contender(&self, key: &str) -> Contender {
        Contender::new(self.store.clone(), key.into(), self.session.clone())
    }

    /// Successful store requests of one operation so far.
    fn requests(&self, op: &str) -> u64 {
        self.metrics
            .store_requests
            .with_label_values(&[op, "ok"])
            .get()
    }
}

/// A machine with one contender for `KEY`.
fn contender(shared: &Arc<MemoryStore>, id: &str) -> (Contender, FaultHandle) {
    let machine = Machine::start(shared, id);
    (machine.contender(KEY), machine.faults)
}

fn tenant_key(n: usize) -> String {
    keys::lock(&format!("t{n}"))
}

async fn heartbeat(shared: &Arc<MemoryStore>, machine: &str) -> HeartbeatRecord {
    let object = shared
        .get(&keys::heartbeat(machine))
        .await
        .unwrap()
        .unwrap();
    serde_json::from_slice(&object.body).unwrap()
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

/// A lock whose `renewed_at` is ancient by this machine's clock is still
/// only taken after a full ttl of unchanged observation: wall clocks are
/// not trusted (a holder whose clock runs years behind is alive).
#[tokio::test(start_paused = true)]
async fn a_lock_renewed_long_ago_is_not_taken_before_a_full_ttl_of_observation() {
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
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(acquired(b.try_acquire().await.unwrap()).epoch(), 8);
}

/// The same for a session lock whose holder's heartbeat says it was
/// renewed years ago: a heartbeat is judged by its ETag staying unchanged
/// for a ttl, never by its timestamp.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_renewed_long_ago_is_not_stale_before_a_full_ttl_of_observation() {
    let shared = Arc::new(MemoryStore::new());
    let incarnation = uuid::Uuid::new_v4();
    write_session_lock(&shared, incarnation).await;
    let beat = serde_json::json!({
        "machine_id": "x", "incarnation": incarnation, "addr": "x:1",
        "ttl_ms": TTL.as_millis() as u64, "renewed_at": "2020-01-01T00:00:00Z", "seq": 1,
    });
    shared
        .put(
            &keys::heartbeat("x"),
            Bytes::from(beat.to_string()),
            Metadata::new(),
            Precondition::None,
        )
        .await
        .unwrap();
    let (mut b, _) = contender(&shared, "b");
    let first = Instant::now();
    loop {
        match b.try_acquire().await.unwrap() {
            Acquire::Acquired(lease) => {
                assert!(first.elapsed() >= TTL, "taken after {:?}", first.elapsed());
                assert_eq!(lease.epoch(), 6);
                break;
            }
            Acquire::HeldBy { .. } => {}
            Acquire::Unknown { .. } => panic!("lock unreadable"),
        }
        assert!(first.elapsed() < TTL * 2, "never taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

// Session leases: one heartbeat per machine keeps every lock of it alive.

/// A machine holding many tenants writes one heartbeat per ttl/3 and
/// nothing per tenant; its locks keep their ETags.
#[tokio::test(start_paused = true)]
async fn one_heartbeat_renewal_covers_every_lease_of_a_machine() {
    let shared = Arc::new(MemoryStore::new());
    let a = Machine::start(&shared, "a");
    let mut leases = Vec::new();
    for n in 0..50 {
        leases.push(acquired(
            a.contender(&tenant_key(n)).try_acquire().await.unwrap(),
        ));
    }
    let locks_before: Vec<_> = futures_lock_etags(&shared, 50).await;
    let puts_before = a.requests("put_if_match");
    let seq_before = heartbeat(&shared, "a").await.seq;
    tokio::time::sleep(TTL * 3).await;
    let renewals = a.requests("put_if_match") - puts_before;
    assert!(
        (8..=9).contains(&renewals),
        "{renewals} writes in 3 ttl for 50 tenants: one heartbeat per ttl/3 expected"
    );
    assert_eq!(heartbeat(&shared, "a").await.seq, seq_before + renewals);
    assert_eq!(
        futures_lock_etags(&shared, 50).await,
        locks_before,
        "tenant locks were rewritten"
    );
    for lease in &leases {
        assert!(lease.is_valid());
        assert_eq!(lease.incarnation(), leases[0].incarnation());
        let record = lease.record();
        assert!(record.session);
        assert_eq!(record.incarnation, Some(lease.incarnation()));
    }
}

async fn futures_lock_etags(shared: &Arc<MemoryStore>, n: usize) -> Vec<String> {
    let mut etags = Vec::new();
    for i in 0..n {
        let object = shared.get(&tenant_key(i)).await.unwrap().unwrap();
        etags.push(object.etag.normalized().to_string());
    }
    etags
}

/// Cut off from the store, a machine's leases all end at the same instant
/// (its session's deadline), and `lost()` fires for each.
#[tokio::test(start_paused = true)]
async fn session_expiry_invalidates_every_lease_at_once() {
    let shared = Arc::new(MemoryStore::new());
    let a = Machine::start(&shared, "a");
    let mut leases = Vec::new();
    for n in 0..5 {
        leases.push(acquired(
            a.contender(&tenant_key(n)).try_acquire().await.unwrap(),
        ));
    }
    a.faults.partition(true);
    let start = Instant::now();
    loop {
        let valid = leases.iter().filter(|l| l.is_valid()).count();
        assert!(
            valid == 0 || valid == leases.len(),
            "{valid} of 5 leases valid"
        );
        if valid == 0 {
            break;
        }
        assert!(
            start.elapsed() < TTL,
            "leases outlived a ttl without renewal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for lease in &leases {
        tokio::time::timeout(Duration::from_millis(1), lease.lost())
            .await
            .expect("lost() resolves for every lease");
    }
}

/// Another process writing this machine's heartbeat (a 412 on renewal)
/// ends the session before its deadline.
#[tokio::test(start_paused = true)]
async fn a_412_on_the_heartbeat_loses_the_session() {
    let shared = Arc::new(MemoryStore::new());
    let a = Machine::start(&shared, "a");
    let mut leases = Vec::new();
    for n in 0..3 {
        leases.push(acquired(
            a.contender(&tenant_key(n)).try_acquire().await.unwrap(),
        ));
    }
    // What its pushes vouch for: the heartbeat as stored.
    let (etag, record) = a.session.vouch().expect("a running session vouches");
    let stored = shared.get(&keys::heartbeat("a")).await.unwrap().unwrap();
    assert_eq!(etag, stored.etag);
    assert_eq!(record, heartbeat(&shared, "a").await);
    let mut intruder = heartbeat(&shared, "a").await;
    intruder.incarnation = uuid::Uuid::new_v4();
    shared
        .put(
            &keys::heartbeat("a"),
            Bytes::from(serde_json::to_vec(&intruder).unwrap()),
            Metadata::new(),
            Precondition::None,
        )
        .await
        .unwrap();
    tokio::time::timeout(TTL, leases[0].lost())
        .await
        .expect("session lost at the next renewal");
    for lease in &leases {
        assert!(!lease.is_valid());
        assert!(
            Instant::now() < lease.deadline(),
            "lost by the 412, not by the deadline"
        );
    }
    assert!(
        a.session.vouch().is_none(),
        "a lost session still vouches for a heartbeat"
    );
    // This process does not fight the other one for the machine id.
    assert!(a.contender(&tenant_key(9)).try_acquire().await.is_err());
}

/// A contender takes a session lock over only once it has seen the
/// holder's heartbeat unchanged for a full ttl; a renewing heartbeat keeps
/// every lock of its machine, and one heartbeat read serves all of them.
#[tokio::test(start_paused = true)]
async fn a_contender_takes_over_only_after_seeing_the_heartbeat_unchanged_for_a_ttl() {
    let shared = Arc::new(MemoryStore::new());
    let a = Machine::start(&shared, "a");
    let b = Machine::start(&shared, "b");
    let mut leases = Vec::new();
    let mut watchers = Vec::new();
    for n in 0..20 {
        leases.push(acquired(
            a.contender(&tenant_key(n)).try_acquire().await.unwrap(),
        ));
        watchers.push(b.contender(&tenant_key(n)));
    }
    for w in &mut watchers {
        assert!(matches!(
            w.try_acquire().await.unwrap(),
            Acquire::HeldBy { .. }
        ));
    }
    // Healthy holder: b polls all 20 tenants every ttl/3 and reads one
    // heartbeat per poll, no lock.
    let gets_before = b.requests("get");
    for _ in 0..9 {
        tokio::time::sleep(TTL / 3).await;
        for w in &mut watchers {
            assert!(matches!(
                w.watch(TTL * 100).await.unwrap(),
                Acquire::HeldBy { .. }
            ));
        }
    }
    let gets = b.requests("get") - gets_before;
    assert!(
        gets <= 9,
        "{gets} reads for 9 polls of 20 tenants of one holder"
    );
    assert_eq!(
        b.requests("put_if_match"),
        0,
        "a standby wrote while the holder was healthy"
    );

    // The holder freezes: its heartbeat stops changing.
    a.faults.partition(true);
    let frozen = Instant::now();
    let mut took = 0;
    let mut taken = Vec::new();
    while took < watchers.len() {
        for w in &mut watchers {
            match w.try_acquire().await.unwrap() {
                Acquire::Acquired(lease) => {
                    assert!(frozen.elapsed() >= TTL, "taken over before a full ttl");
                    assert!(
                        leases.iter().all(|l| !l.is_valid()),
                        "taken over while the old holder still claimed"
                    );
                    assert_eq!(lease.previous().unwrap().holder, "a");
                    assert!(!lease.previous().unwrap().released);
                    took += 1;
                    taken.push(lease);
                }
                Acquire::HeldBy { .. } => {}
                Acquire::Unknown { .. } => panic!("lock unreadable"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(frozen.elapsed() < TTL * 2, "no takeover of a frozen holder");
    }
}

/// Locks written by machines that renew each lock (no `session` field)
/// are judged by their own ETag, as before sessions.
#[tokio::test(start_paused = true)]
async fn an_old_format_lock_is_judged_by_its_own_etag() {
    let shared = Arc::new(MemoryStore::new());
    let write_old = |n: u64| {
        let shared = shared.clone();
        async move {
            let old = serde_json::json!({
                "holder": "old", "addr": "old:1", "epoch": 3, "token": uuid::Uuid::new_v4(),
                "ttl_ms": TTL.as_millis() as u64, "renewed_at": chrono::Utc::now(), "released": false,
                "renewal": n,
            });
            shared
                .put(
                    KEY,
                    Bytes::from(old.to_string()),
                    Metadata::new(),
                    Precondition::None,
                )
                .await
                .unwrap();
        }
    };
    write_old(0).await;
    let (mut b, _) = contender(&shared, "b");
    // Renewed every ttl/2: never stale.
    for n in 1..6 {
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquire::HeldBy { .. }
        ));
        tokio::time::sleep(TTL / 2).await;
        write_old(n).await;
    }
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(acquired(b.try_acquire().await.unwrap()).epoch(), 4);
}

/// A process restarted under the same machine id starts a new incarnation
/// over the old heartbeat and takes its locks back at once; the earlier
/// process, if it still ran, loses its session at its next renewal.
#[tokio::test(start_paused = true)]
async fn a_restart_with_the_same_id_retakes_at_once_and_ends_the_old_session() {
    let shared = Arc::new(MemoryStore::new());
    let first = Machine::start(&shared, "a");
    let old: Vec<Lease> = futures_acquire(&first, 3).await;
    let old_incarnation = heartbeat(&shared, "a").await.incarnation;
    let second = Machine::start(&shared, "a");
    let new = futures_acquire(&second, 3).await;
    assert!(new.iter().all(|l| l.epoch() == 2));
    assert_ne!(new[0].incarnation(), old_incarnation);
    assert_eq!(
        heartbeat(&shared, "a").await.incarnation,
        new[0].incarnation()
    );
    tokio::time::timeout(TTL, old[0].lost())
        .await
        .expect("the first process's session ends");
    assert!(old.iter().all(|l| !l.is_valid()));
    tokio::time::sleep(TTL * 2).await;
    assert!(
        new.iter().all(Lease::is_valid),
        "the new process keeps renewing"
    );
}

async fn futures_acquire(machine: &Machine, n: usize) -> Vec<Lease> {
    let mut leases = Vec::new();
    for i in 0..n {
        leases.push(acquired(
            machine
                .contender(&tenant_key(i))
                .try_acquire()
                .await
                .unwrap(),
        ));
    }
    leases
}

/// A session lock of machine `x` with incarnation `incarnation`.
async fn write_session_lock(shared: &Arc<MemoryStore>, incarnation: uuid::Uuid) {
    let lock = serde_json::json!({
        "holder": "x", "addr": "x:1", "epoch": 5, "token": uuid::Uuid::new_v4(),
        "ttl_ms": TTL.as_millis() as u64, "renewed_at": chrono::Utc::now(), "released": false,
        "incarnation": incarnation, "session": true,
    });
    shared
        .put(
            KEY,
            Bytes::from(lock.to_string()),
            Metadata::new(),
            Precondition::None,
        )
        .await
        .unwrap();
}

/// An unparsable heartbeat vouches for nothing: the lock is taken over
/// only once the lock and the heartbeat stayed unchanged for a full ttl;
/// a heartbeat that keeps changing (a holder this machine cannot read)
/// keeps it.
#[tokio::test(start_paused = true)]
async fn an_unparsable_heartbeat_leaves_only_the_observation_rule() {
    let shared = Arc::new(MemoryStore::new());
    write_session_lock(&shared, uuid::Uuid::new_v4()).await;
    let garbage = |n: usize| Bytes::from(format!("{{ not a heartbeat {n}"));
    let put_beat = |n: usize| {
        let shared = shared.clone();
        async move {
            shared
                .put(
                    &keys::heartbeat("x"),
                    garbage(n),
                    Metadata::new(),
                    Precondition::None,
                )
                .await
                .unwrap();
        }
    };
    put_beat(0).await;
    let (mut b, _) = contender(&shared, "b");
    for n in 1..8 {
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquire::HeldBy { .. }
        ));
        tokio::time::sleep(TTL / 2).await;
        put_beat(n).await;
    }
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquire::HeldBy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(acquired(b.try_acquire().await.unwrap()).epoch(), 6);
}

/// A heartbeat that is missing, or names another incarnation than the
/// lock, no longer vouches for the lock: a full ttl of an unchanged lock
/// is enough, however lively the heartbeat of the new incarnation is.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_of_another_incarnation_or_none_leaves_the_observation_rule() {
    for heartbeat_present in [false, true] {
        let shared = Arc::new(MemoryStore::new());
        write_session_lock(&shared, uuid::Uuid::new_v4()).await;
        // Machine x runs again under a new incarnation and renews.
        let x = Machine::start(&shared, "x");
        let _x_lease = heartbeat_present.then(|| x.contender(&tenant_key(99)));
        let mut x_own = None;
        if let Some(mut c) = _x_lease {
            x_own = Some(acquired(c.try_acquire().await.unwrap()));
        }
        let (mut b, _) = contender(&shared, "b");
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquire::HeldBy { .. }
        ));
        tokio::time::sleep(TTL - Duration::from_millis(1)).await;
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquire::HeldBy { .. }
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(acquired(b.try_acquire().await.unwrap()).epoch(), 6);
        if let Some(lease) = x_own {
            assert!(lease.is_valid(), "x's own session is untouched");
        }
    }
}

/// Answers the first write of a heartbeat as the retrying layer answers a
/// write it cannot resolve (`Ambiguous`), without applying it: the store
/// erred, the resend was refused, and the read-back could not tell whose
/// heartbeat it found.
#[derive(Debug)]
struct FirstHeartbeatWriteAmbiguous {
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Hooks for FirstHeartbeatWriteAmbiguous {
    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        if op == Op::Put
            && key.ends_with("heartbeat.json")
            && self.armed.swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Ambiguous { key: key.into() });
        }
        Ok(())
    }
}

/// Found by the service simulation (CI, seed 1): a machine restarted under
/// the same id whose first heartbeat write was ambiguous read the earlier
/// process's heartbeat next and took it for a second live process: it
/// refused every lease from then on, and its tenant never answered again.
/// A write of this process that may not have landed proves nothing about
/// who wrote the heartbeat since.
#[tokio::test(start_paused = true)]
async fn a_restart_whose_first_heartbeat_write_is_ambiguous_still_takes_its_locks_back() {
    let shared = Arc::new(MemoryStore::new());
    let earlier = Machine::start(&shared, "a");
    let old = acquired(earlier.contender(KEY).try_acquire().await.unwrap());
    // Crashed: it never reaches the store again.
    earlier.faults.partition(true);
    let store: DynStore = Arc::new(Hooked::new(
        shared.clone(),
        FirstHeartbeatWriteAmbiguous { armed: true.into() },
    ));
    let restarted = Machine::start_on(store, "a");
    let outcome = restarted.contender(KEY).try_acquire().await;
    let lease = acquired(outcome.expect("the restarted process takes its lock back"));
    assert_eq!(lease.epoch(), old.epoch() + 1);
    assert_eq!(
        heartbeat(&shared, "a").await.incarnation,
        lease.incarnation()
    );
}

/// The other side of that rule: once a heartbeat write of this process
/// landed, a heartbeat naming an incarnation it never wrote is another
/// live process's, and this one stops taking leases rather than fight it.
#[tokio::test(start_paused = true)]
async fn a_process_whose_landed_heartbeat_was_written_over_does_not_start_again() {
    let shared = Arc::new(MemoryStore::new());
    let a = Machine::start(&shared, "a");
    let first = acquired(a.contender(&tenant_key(0)).try_acquire().await.unwrap());
    // Cut off until its session runs out, so no renewal sees the intruder.
    a.faults.partition(true);
    tokio::time::timeout(TTL * 2, first.lost())
        .await
        .expect("the session runs out while cut off");
    let twin = Machine::start(&shared, "a");
    let theirs = acquired(twin.contender(&tenant_key(1)).try_acquire().await.unwrap());
    a.faults.partition(false);
    let Err(e) = a.contender(&tenant_key(2)).try_acquire().await else {
        panic!("started a session over another live process's heartbeat");
    };
    assert!(
        e.to_string().contains("two processes share one machine id"),
        "{e}"
    );
    assert!(theirs.is_valid(), "the other process keeps its lease");
}

/// One life of a machine's process in [`restarted_processes_always_start_again`].
#[derive(Clone, Debug)]
struct Life {
    error_rate: f64,
    lost_response_rate: f64,
    late_apply_rate: f64,
    primed: bool,
    /// How long it runs under those faults before it crashes.
    runs_ms: u64,
}

fn life() -> impl Strategy<Value = Life> {
    (
        0.0..0.6f64,
        0.0..0.4f64,
        0.0..0.4f64,
        any::<bool>(),
        0..4_000u64,
    )
        .prop_map(
            |(error_rate, lost_response_rate, late_apply_rate, primed, runs_ms)| Life {
                error_rate,
                lost_response_rate,
                late_apply_rate,
                primed,
                runs_ms,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Fly restarts a crashed machine under the same id, again and again,
    /// each process through the retrying layer over a store that errs,
    /// loses responses and applies writes after the client gave up, and
    /// each crash leaves writes in flight. Only one process lives at a
    /// time, so none may take another for a second live process with its
    /// id: once the store heals, every one of them starts its session.
    #[test]
    fn restarted_processes_always_start_again(seed in any::<u64>(), lives in prop::collection::vec(life(), 1..6)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(async move {
            let shared = Arc::new(MemoryStore::new());
            for (n, life) in lives.into_iter().enumerate() {
                let fault = FaultStore::seeded(
                    shared.clone() as DynStore,
                    FaultConfig {
                        latency: Duration::from_millis(20),
                        jitter: Duration::from_millis(10),
                        error_rate: life.error_rate,
                        lost_response_rate: life.lost_response_rate,
                        late_apply_rate: life.late_apply_rate,
                        late_apply_delay: Duration::from_millis(300),
                        ..FaultConfig::default()
                    },
                    seed ^ n as u64,
                );
                let faults = fault.handle();
                let store: DynStore = Arc::new(tenantd_core::store::RetryingStore::new(
                    Arc::new(fault),
                    tenantd_core::store::retry::RetryPolicy::default(),
                ));
                let session = Session::new(store, LeaseConfig::new("a", "a:3000", TTL));
                if life.primed {
                    session.prime().await;
                }
                let faulty = tokio::time::timeout(
                    Duration::from_millis(life.runs_ms),
                    session.incarnation(),
                )
                .await;
                if let Ok(Err(e)) = &faulty {
                    assert!(!e.to_string().contains("share one machine id"), "life {n} under faults: {e}");
                }
                faults.update(|c| {
                    c.error_rate = 0.0;
                    c.lost_response_rate = 0.0;
                    c.late_apply_rate = 0.0;
                });
                let mut started = None;
                for _ in 0..5 {
                    match session.incarnation().await {
                        Ok(incarnation) => {
                            started = Some(incarnation);
                            break;
                        }
                        Err(e) => {
                            assert!(!e.to_string().contains("share one machine id"), "life {n} after the faults healed: {e}");
                            tokio::time::sleep(TTL).await;
                        }
                    }
                }
                let started = started.unwrap_or_else(|| panic!("life {n} never started its session"));
                assert!(started.is_valid());
                // Crashed: cut off, with whatever it sent still in flight.
                faults.partition(true);
                drop(started);
                drop(session);
            }
        });
    }
}

/// Heartbeat reads and the second heartbeat write are slow: the write
/// lands, and is answered, `write_delay` after it was sent.
#[derive(Debug)]
struct SlowHeartbeat {
    read_delay: Duration,
    write_delay: Duration,
    writes: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for SlowHeartbeat {
    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        if !key.ends_with("heartbeat.json") {
            return Ok(());
        }
        match op {
            Op::Get => tokio::time::sleep(self.read_delay).await,
            Op::Put if self.writes.fetch_add(1, Ordering::SeqCst) == 1 => {
                tokio::time::sleep(self.write_delay).await
            }
            _ => {}
        }
        Ok(())
    }
}

/// A lock goes out beside its session's start, naming the incarnation
/// whose heartbeat write was just sent. Here that write is refused (an
/// earlier process of the machine left its heartbeat), and the write that
/// starts the session goes out a second later and lands 2.2 s after that,
/// still in time to be credited. Meanwhile another machine has watched
/// the lock, and the earlier heartbeat, unchanged for a full ttl, and
/// took the lock. The lease written beside must not outlive that: the
/// lock is written again once the session started, which fails, so no
/// lease exists (without that second write the lease lived on, renewed
/// until 5.6 s, while the other machine held the lock from 3.01 s).
#[tokio::test(start_paused = true)]
async fn a_lock_written_beside_a_late_session_start_never_overlaps_a_takeover() {
    let shared = Arc::new(MemoryStore::new());
    let earlier = Session::new(
        shared.clone() as DynStore,
        LeaseConfig::new("a", "a:3000", TTL),
    );
    drop(earlier.incarnation().await.unwrap());
    let slow: DynStore = Arc::new(Hooked::new(
        shared.clone(),
        SlowHeartbeat {
            read_delay: Duration::from_millis(1000),
            write_delay: Duration::from_millis(2200),
            writes: 0.into(),
        },
    ));
    let restarted = Machine::start_on(slow, "a");
    let began = Instant::now();
    let mut beside = restarted.contender(KEY);
    let acquiring = tokio::spawn(async move { beside.try_acquire().await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (mut other, _) = contender(&shared, "c");
    let taken_at = loop {
        if let Acquire::Acquired(lease) = other.try_acquire().await.unwrap() {
            break (Instant::now(), lease);
        }
        assert!(
            began.elapsed() < TTL * 3,
            "the other machine never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match acquiring.await.unwrap() {
        Ok(Acquire::Acquired(lease)) => assert!(
            lease.deadline() <= taken_at.0,
            "the lease written beside runs until {:?}, the other machine took the lock at {:?}",
            lease.deadline() - began,
            taken_at.0 - began
        ),
        Ok(_) => {}
        Err(e) => assert!(e.is_precondition(), "{e}"),
    }
    assert!(taken_at.1.is_valid());
}
