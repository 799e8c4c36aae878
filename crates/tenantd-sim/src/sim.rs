//! Deterministic simulation of the lease and writer protocol: three
//! machines sharing three tenants, one shared in-memory store, tokio's
//! paused clock, and one seeded RNG for every choice — so a seed is a
//! reproducible schedule of requests, crashes, restarts under the same
//! machine id, pauses of a machine with everything it holds, partitions
//! (whole, or of just the machine's heartbeat), lost responses and
//! late-applied writes (2% of every machine's puts land up to 500 ms after
//! it was told they failed).
//!
//! The machines run the real session leases (`tenantd_core::lease`: one heartbeat
//! per machine process for all its tenants) and the writer protocol
//! of `tenant::actor` (download with ETag, claim with the new epoch, upload
//! each batch with `If-Match`, acknowledge only after the upload). The
//! database is a small JSON document instead of SQLite. The recorded
//! history goes through the same checker as real chaos runs.
//!
//! `fencing: false` makes uploads unconditional: the simulation must then
//! find lost writes (a paused ex-holder overwriting its successor).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use tenantd_chaos::checker::{self, Report};
use tenantd_chaos::history::{Op, Outcome};
use tenantd_core::lease::{Acquire, Contender, Lease, LeaseConfig, Session};
use tenantd_core::store::fault::FaultHandle;
use tenantd_core::store::hooked::{self, Hooked, Hooks};
use tenantd_core::store::{
    DynStore, ETag, FaultConfig, FaultStore, MemoryStore, Metadata, ObjectStore, Precondition,
    StoreError, StoreResult, keys,
};

const TTL: Duration = Duration::from_millis(1000);
const MACHINES: usize = 3;
const TENANTS: usize = 3;

fn tenant(t: usize) -> String {
    format!("sim{t}")
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct SimDb {
    count: u64,
    epoch: u64,
    seq: u64,
}

/// One machine process: its path to the store, one session for all its
/// tenants, and per tenant what it holds.
struct Machine {
    id: String,
    store: DynStore,
    faults: FaultHandle,
    /// Cuts this machine off from its own heartbeat only.
    heartbeat_cut: Arc<AtomicBool>,
    tenants: Vec<Held>,
    /// An upload (of tenant `.0`) prepared before the machine froze
    /// (SIGSTOP, GC pause) with everything it holds: it is sent when the
    /// machine wakes, however much later.
    frozen: Option<(usize, Upload)>,
}

struct Held {
    contender: Contender,
    lease: Option<Lease>,
    db: Option<(SimDb, ETag)>,
}

struct Upload {
    next: SimDb,
    base: SimDb,
    condition: Precondition,
    keys: Vec<String>,
    epoch: u64,
    start_ms: u64,
}

impl Machine {
    fn start(id: String, store: DynStore, faults: FaultHandle, cut: Arc<AtomicBool>) -> Machine {
        let mut m = Machine {
            id,
            store,
            faults,
            heartbeat_cut: cut,
            tenants: Vec::new(),
            frozen: None,
        };
        m.restart();
        m
    }

    /// A new process under the same machine id: a new session, nothing
    /// held (the old process's leases end as in a crash).
    fn restart(&mut self) {
        let session = Session::new(
            self.store.clone(),
            LeaseConfig::new(self.id.clone(), format!("{}:1", self.id), TTL),
        );
        self.tenants = (0..TENANTS)
            .map(|t| Held {
                contender: Contender::new(
                    self.store.clone(),
                    keys::lock(&tenant(t)),
                    session.clone(),
                ),
                lease: None,
                db: None,
            })
            .collect();
    }
}

impl Held {
    fn step_down(&mut self) {
        self.lease = None;
        self.db = None;
    }
}

/// Hooks of a machine's view of the store in which its own heartbeat can
/// be cut off while everything else still answers.
#[derive(Debug)]
pub(crate) struct HeartbeatCut {
    key: String,
    cut: Arc<AtomicBool>,
}

impl HeartbeatCut {
    pub(crate) fn new(
        inner: DynStore,
        machine_id: &str,
        cut: Arc<AtomicBool>,
    ) -> Hooked<HeartbeatCut> {
        let hooks = HeartbeatCut {
            key: keys::heartbeat(machine_id),
            cut,
        };
        Hooked::new(inner, hooks)
    }
}

#[async_trait]
impl Hooks for HeartbeatCut {
    async fn before(&self, op: hooked::Op, key: &str) -> StoreResult<()> {
        if op != hooked::Op::List && key == self.key && self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::transient(key, "heartbeat partitioned"));
        }
        Ok(())
    }
}

/// What one seed did.
#[derive(Debug)]
pub struct SimOutcome {
    pub report: Report,
    pub ops: usize,
    pub takeovers: u64,
}

/// Runs one seed to completion on its own current-thread runtime.
pub fn run_seed(seed: u64, fencing: bool, steps: usize) -> SimOutcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(simulate(seed, fencing, steps))
}

async fn simulate(seed: u64, fencing: bool, steps: usize) -> SimOutcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let shared = Arc::new(MemoryStore::new());
    let mut machines: Vec<Machine> = (0..MACHINES)
        .map(|i| {
            // Now and then a write lands after its sender was told it
            // failed (a request that sat in the store's queue): the
            // fencing must hold against those too.
            let fault = FaultStore::seeded(
                shared.clone() as DynStore,
                FaultConfig {
                    late_apply_rate: 0.02,
                    late_apply_delay: Duration::from_millis(500),
                    ..FaultConfig::default()
                },
                seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let faults = fault.handle();
            let id = format!("m{i}");
            let cut = Arc::new(AtomicBool::new(false));
            let store: DynStore = Arc::new(HeartbeatCut::new(Arc::new(fault), &id, cut.clone()));
            Machine::start(id, store, faults, cut)
        })
        .collect();
    let start = tokio::time::Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let mut ops: Vec<Op> = Vec::new();
    let mut next_key = 0u64;
    let mut takeovers = 0;
    let mut overlaps = Vec::new();

    for _ in 0..steps {
        // The lease's own promise, checked at every step: no two machines
        // (frozen ones included: they believe what their clocks say) claim
        // one tenant at once.
        for t in 0..TENANTS {
            let claiming: Vec<&str> = machines
                .iter()
                .filter(|m| m.tenants[t].lease.as_ref().is_some_and(Lease::is_valid))
                .map(|m| m.id.as_str())
                .collect();
            if claiming.len() > 1 {
                overlaps.push(format!(
                    "at {} ms machines {claiming:?} all claim tenant {}",
                    now_ms(),
                    tenant(t)
                ));
            }
        }
        let i = rng.random_range(0..machines.len());
        if let Some((t, upload)) = machines[i].frozen.take() {
            // The frozen machine wakes and sends what it had prepared.
            machines[i].faults.partition(false);
            send(
                &mut machines[i],
                i,
                t,
                upload,
                false,
                false,
                &mut ops,
                now_ms(),
            )
            .await;
            continue;
        }
        let t = rng.random_range(0..TENANTS);
        match rng.random_range(0..100) {
            0..=57 => {
                // A batch of increments for tenant t arrives at machine i.
                let batch = rng.random_range(1..=4u64);
                let start_ms = now_ms();
                let m = &mut machines[i];
                let store = m.store.clone();
                let h = &mut m.tenants[t];
                if h.lease.as_ref().is_none_or(|l| !l.is_valid()) {
                    h.step_down();
                    if let Ok(Acquire::Acquired(lease)) = h.contender.try_acquire().await {
                        takeovers += 1;
                        h.db = claim(&store, t, &lease, fencing).await;
                        h.lease = h.db.is_some().then_some(lease);
                    }
                }
                let (Some(lease), Some((db, etag))) = (&h.lease, h.db.clone()) else {
                    continue;
                };
                if !lease.is_valid() {
                    continue;
                }
                let epoch = lease.epoch();
                let next = SimDb {
                    count: db.count + batch,
                    epoch,
                    seq: db.seq + 1,
                };
                let condition = if fencing {
                    Precondition::IfMatch(etag.clone())
                } else {
                    Precondition::None
                };
                let keys = fresh_keys(&mut next_key, batch);
                let upload = Upload {
                    next,
                    base: db,
                    condition,
                    keys,
                    epoch,
                    start_ms,
                };
                // The dangerous window: the lease was checked, then the
                // machine freezes, with every tenant it holds, before its
                // upload goes out. Frozen, it renews nothing (cut off);
                // others act meanwhile.
                if rng.random_range(0..6) == 0 {
                    m.faults.partition(true);
                    m.frozen = Some((t, upload));
                    continue;
                }
                let lose_response = rng.random_range(0..20) == 0;
                let fail_before = rng.random_range(0..20) == 0;
                if fencing && rng.random_range(0..3) == 0 {
                    // A second batch arrives while the first one's upload is
                    // in flight: pipelined behind it, possibly overtaking it.
                    let batch = rng.random_range(1..=4u64);
                    let keys = fresh_keys(&mut next_key, batch);
                    let second = Upload {
                        next: SimDb {
                            count: upload.next.count + batch,
                            epoch,
                            seq: upload.next.seq + 1,
                        },
                        base: upload.next,
                        condition: Precondition::IfMatch(ETag::of(&encode(&upload.next))),
                        keys,
                        epoch,
                        start_ms: now_ms(),
                    };
                    let faults = [
                        (lose_response, fail_before),
                        (rng.random_range(0..20) == 0, rng.random_range(0..20) == 0),
                    ];
                    let overtake = rng.random_range(0..2) == 0;
                    send_pipelined(
                        m,
                        i,
                        t,
                        [upload, second],
                        faults,
                        overtake,
                        &mut ops,
                        &now_ms,
                    )
                    .await;
                    continue;
                }
                send(
                    m,
                    i,
                    t,
                    upload,
                    lose_response,
                    fail_before,
                    &mut ops,
                    now_ms(),
                )
                .await;
            }
            // One tenant's actor crashes (a frozen machine wakes first).
            58..=64 => machines[i].tenants[t].step_down(),
            // The process restarts under the same machine id: a new session,
            // its locks taken back at once.
            65..=67 => machines[i].restart(),
            68..=75 => {
                let m = &machines[i];
                m.faults.partition(true);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..2500))).await;
                m.faults.partition(false);
            }
            76..=81 => {
                // Only the heartbeat is cut off: the machine still reaches
                // its tenants' objects, but its session runs out.
                let m = &machines[i];
                m.heartbeat_cut.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..2500))).await;
                m.heartbeat_cut.store(false, Ordering::SeqCst);
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.random_range(10..800))).await,
        }
    }
    for (i, m) in machines.iter_mut().enumerate() {
        m.faults.partition(false);
        if let Some((t, upload)) = m.frozen.take() {
            let never = Outcome::Indeterminate {
                error: "never answered".into(),
            };
            record(&mut ops, i, t, &upload, now_ms(), Some(never));
        }
    }
    let mut finals = BTreeMap::new();
    for t in 0..TENANTS {
        let count = match shared.get(&keys::database(&tenant(t))).await {
            Ok(Some(object)) => decode(&object.body).map(|db| db.count).unwrap_or(0),
            _ => 0,
        };
        finals.insert(tenant(t), count);
    }
    let mut report = checker::check(&ops, &finals, &[], now_ms());
    report.violations.extend(overlaps);
    SimOutcome {
        report,
        ops: ops.len(),
        takeovers,
    }
}

/// Sends a prepared upload of tenant `t` and records its outcome for each
/// key.
#[allow(clippy::too_many_arguments)]
async fn send(
    m: &mut Machine,
    i: usize,
    t: usize,
    upload: Upload,
    lose_response: bool,
    fail_before: bool,
    ops: &mut Vec<Op>,
    end_ms: u64,
) {
    let condition = upload.condition.clone();
    let result = put(m, t, &upload, condition, (lose_response, fail_before)).await;
    settle(&mut m.tenants[t], i, t, &upload, result, ops, end_ms);
}

/// The last upload in flight is settled: acknowledged and the machine's new
/// state when it landed, otherwise recorded as failed and the machine steps
/// down from the tenant.
fn settle(
    h: &mut Held,
    i: usize,
    t: usize,
    upload: &Upload,
    result: StoreResult<ETag>,
    ops: &mut Vec<Op>,
    end_ms: u64,
) {
    match result {
        Ok(etag) => {
            record(ops, i, t, upload, end_ms, None);
            h.db = Some((upload.next, etag));
        }
        Err(e) => {
            record(ops, i, t, upload, end_ms, Some(failed(&e)));
            h.step_down();
        }
    }
}

/// Records the outcome of each request of `upload`: acknowledged with its
/// own count (`None`), or `outcome`.
fn record(
    ops: &mut Vec<Op>,
    i: usize,
    t: usize,
    upload: &Upload,
    end_ms: u64,
    outcome: Option<Outcome>,
) {
    for (n, key) in upload.keys.iter().enumerate() {
        let outcome = outcome.clone().unwrap_or(Outcome::Ok {
            count: upload.base.count + n as u64 + 1,
            epoch: upload.epoch,
            machine: format!("m{i}"),
        });
        ops.push(Op {
            client: 0,
            customer: tenant(t),
            key: key.clone(),
            start_ms: upload.start_ms,
            end_ms,
            outcome,
        });
    }
}

/// A 412 was definitely not applied; anything else may have been.
fn failed(e: &StoreError) -> Outcome {
    if e.is_precondition() {
        Outcome::Failed {
            status: 412,
            error: e.to_string(),
        }
    } else {
        Outcome::Indeterminate {
            error: e.to_string(),
        }
    }
}

/// `n` idempotency keys never used before.
fn fresh_keys(next_key: &mut u64, n: u64) -> Vec<String> {
    (0..n)
        .map(|_| {
            *next_key += 1;
            format!("k{next_key}")
        })
        .collect()
}

/// One PUT of a prepared upload, with injected failures: `fail_before`
/// never reaches the store; `lose_response` reaches it, and succeeds, but
/// the answer is lost.
async fn put(
    m: &Machine,
    t: usize,
    upload: &Upload,
    condition: Precondition,
    faults: (bool, bool),
) -> StoreResult<ETag> {
    let (lose_response, fail_before) = faults;
    let key = keys::database(&tenant(t));
    if fail_before {
        return Err(StoreError::transient(&key, "injected"));
    }
    let result = m
        .store
        .put(&key, encode(&upload.next), Metadata::new(), condition)
        .await;
    match result {
        Ok(_) if lose_response => Err(StoreError::transient(&key, "response lost")),
        other => other,
    }
}

/// Two uploads in flight at once, as the tenant actor pipelines them: the
/// second is conditional on the first's body MD5 and may reach the store
/// first. Confirmed in order: a 412 on the second after the first succeeded
/// is resent once against the real ETag; if the first fails, the second
/// still counts when it landed (it contains the first), and the machine
/// steps down.
#[allow(clippy::too_many_arguments)]
async fn send_pipelined(
    m: &mut Machine,
    i: usize,
    t: usize,
    uploads: [Upload; 2],
    faults: [(bool, bool); 2],
    overtake: bool,
    ops: &mut Vec<Op>,
    now_ms: &impl Fn() -> u64,
) {
    let [first, second] = uploads;
    let (r1, mut r2) = if overtake {
        let r2 = put(m, t, &second, second.condition.clone(), faults[1]).await;
        (
            put(m, t, &first, first.condition.clone(), faults[0]).await,
            r2,
        )
    } else {
        let r1 = put(m, t, &first, first.condition.clone(), faults[0]).await;
        (
            r1,
            put(m, t, &second, second.condition.clone(), faults[1]).await,
        )
    };
    let end_ms = now_ms();
    match r1 {
        Ok(etag) => {
            record(ops, i, t, &first, end_ms, None);
            if matches!(&r2, Err(e) if e.is_precondition()) {
                r2 = put(
                    m,
                    t,
                    &second,
                    Precondition::IfMatch(etag.clone()),
                    (false, false),
                )
                .await;
            }
            settle(&mut m.tenants[t], i, t, &second, r2, ops, end_ms);
        }
        Err(e1) => {
            match &r2 {
                Ok(_) => {
                    record(ops, i, t, &first, end_ms, None);
                    record(ops, i, t, &second, end_ms, None);
                }
                Err(e2) => {
                    record(ops, i, t, &first, end_ms, Some(failed(&e1)));
                    record(ops, i, t, &second, end_ms, Some(failed(e2)));
                }
            }
            m.tenants[t].step_down();
        }
    }
}

/// A new holder's claim: download, write its epoch, upload at once.
async fn claim(store: &DynStore, t: usize, lease: &Lease, fencing: bool) -> Option<(SimDb, ETag)> {
    let key = keys::database(&tenant(t));
    let (db, condition) = match store.get(&key).await.ok()? {
        Some(object) => (decode(&object.body)?, Precondition::IfMatch(object.etag)),
        None => (SimDb::default(), Precondition::IfAbsent),
    };
    let claimed = SimDb {
        epoch: lease.epoch(),
        seq: db.seq + 1,
        ..db
    };
    let condition = if fencing {
        condition
    } else {
        Precondition::None
    };
    let etag = store
        .put(&key, encode(&claimed), Metadata::new(), condition)
        .await
        .ok()?;
    Some((claimed, etag))
}

fn encode(db: &SimDb) -> Bytes {
    Bytes::from(serde_json::to_vec(db).expect("serializes"))
}

fn decode(bytes: &[u8]) -> Option<SimDb> {
    serde_json::from_slice(bytes).ok()
}
