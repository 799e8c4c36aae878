//! Deterministic simulation of the lease and writer protocol: three
//! machines, one shared in-memory store, tokio's paused clock, and one
//! seeded RNG for every choice — so a seed is a reproducible schedule of
//! requests, crashes, pauses, partitions, lost responses and late-applied
//! writes (2% of every machine's puts land up to 500 ms after it was told
//! they failed).
//!
//! The machines run the real lease (`crate::lease`) and the writer protocol
//! of `tenant::actor` (download with ETag, claim with the new epoch, upload
//! each batch with `If-Match`, acknowledge only after the upload). The
//! database is a small JSON document instead of SQLite. The recorded
//! history goes through the same checker as real chaos runs.
//!
//! `fencing: false` makes uploads unconditional: the simulation must then
//! find lost writes (a paused ex-holder overwriting its successor).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::checker::{self, Report};
use super::history::{Op, Outcome};
use crate::lease::{Acquire, Contender, Lease, LeaseConfig, Session};
use crate::store::fault::FaultHandle;
use crate::store::{
    DynStore, ETag, FaultConfig, FaultStore, MemoryStore, Metadata, ObjectStore, Precondition,
    StoreError, StoreResult,
};

const TTL: Duration = Duration::from_millis(1000);
const DB_KEY: &str = "customer/sim/db.sqlite3";
const LOCK_KEY: &str = "customer/sim/machine.lock";

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct SimDb {
    count: u64,
    epoch: u64,
    seq: u64,
}

struct Machine {
    store: DynStore,
    faults: FaultHandle,
    contender: Contender,
    lease: Option<Lease>,
    db: Option<(SimDb, ETag)>,
    /// An upload prepared before the machine froze (SIGSTOP, GC pause): it
    /// is sent when the machine wakes, however much later.
    frozen: Option<Upload>,
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
    fn step_down(&mut self) {
        self.lease = None;
        self.db = None;
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
    let mut machines: Vec<Machine> = (0..3)
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
            let store: DynStore = Arc::new(fault);
            let contender = Contender::new(
                store.clone(),
                LOCK_KEY.into(),
                Session::new(
                    store.clone(),
                    LeaseConfig::new(format!("m{i}"), format!("m{i}:1"), TTL),
                ),
            );
            Machine {
                store,
                faults,
                contender,
                lease: None,
                db: None,
                frozen: None,
            }
        })
        .collect();
    let start = tokio::time::Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let mut ops: Vec<Op> = Vec::new();
    let mut next_key = 0u64;
    let mut takeovers = 0;

    for _ in 0..steps {
        let i = rng.random_range(0..machines.len());
        if let Some(upload) = machines[i].frozen.take() {
            // The frozen machine wakes and sends what it had prepared.
            machines[i].faults.partition(false);
            send(
                &mut machines[i],
                i,
                upload,
                false,
                false,
                &mut ops,
                now_ms(),
            )
            .await;
            continue;
        }
        match rng.random_range(0..100) {
            0..=59 => {
                // A batch of increments arrives at machine i.
                let batch = rng.random_range(1..=4u64);
                let start_ms = now_ms();
                let m = &mut machines[i];
                if m.lease.as_ref().is_none_or(|l| !l.is_valid()) {
                    m.step_down();
                    if let Ok(Acquire::Acquired(lease)) = m.contender.try_acquire().await {
                        takeovers += 1;
                        m.db = claim(&m.store, &lease, fencing).await;
                        m.lease = m.db.is_some().then_some(lease);
                    }
                }
                let (Some(lease), Some((db, etag))) = (&m.lease, m.db.clone()) else {
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
                // machine freezes before its upload goes out. Frozen, it
                // renews nothing (cut off); others act meanwhile.
                if rng.random_range(0..6) == 0 {
                    m.faults.partition(true);
                    m.frozen = Some(upload);
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
                    send_pipelined(m, i, [upload, second], faults, overtake, &mut ops, &now_ms)
                        .await;
                    continue;
                }
                send(m, i, upload, lose_response, fail_before, &mut ops, now_ms()).await;
            }
            60..=69 => machines[i].step_down(), // crash (a frozen one wakes first)
            70..=79 => {
                let m = &machines[i];
                m.faults.partition(true);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..2500))).await;
                m.faults.partition(false);
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.random_range(10..800))).await,
        }
    }
    for (i, m) in machines.iter_mut().enumerate() {
        m.faults.partition(false);
        if let Some(upload) = m.frozen.take() {
            let never = Outcome::Indeterminate {
                error: "never answered".into(),
            };
            record(&mut ops, i, &upload, now_ms(), Some(never));
        }
    }
    let final_count = match shared.get(DB_KEY).await {
        Ok(Some(object)) => decode(&object.body).map(|db| db.count).unwrap_or(0),
        _ => 0,
    };
    let finals = BTreeMap::from([("sim".to_string(), final_count)]);
    let report = checker::check(&ops, &finals, &[], now_ms());
    SimOutcome {
        report,
        ops: ops.len(),
        takeovers,
    }
}

/// Sends a prepared upload and records its outcome for each key.
async fn send(
    m: &mut Machine,
    i: usize,
    upload: Upload,
    lose_response: bool,
    fail_before: bool,
    ops: &mut Vec<Op>,
    end_ms: u64,
) {
    let condition = upload.condition.clone();
    let result = put(m, &upload, condition, (lose_response, fail_before)).await;
    settle(m, i, &upload, result, ops, end_ms);
}

/// The last upload in flight is settled: acknowledged and the machine's new
/// state when it landed, otherwise recorded as failed and the machine steps
/// down.
fn settle(
    m: &mut Machine,
    i: usize,
    upload: &Upload,
    result: StoreResult<ETag>,
    ops: &mut Vec<Op>,
    end_ms: u64,
) {
    match result {
        Ok(etag) => {
            record(ops, i, upload, end_ms, None);
            m.db = Some((upload.next, etag));
        }
        Err(e) => {
            record(ops, i, upload, end_ms, Some(failed(&e)));
            m.step_down();
        }
    }
}

/// Records the outcome of each request of `upload`: acknowledged with its
/// own count (`None`), or `outcome`.
fn record(ops: &mut Vec<Op>, i: usize, upload: &Upload, end_ms: u64, outcome: Option<Outcome>) {
    for (n, key) in upload.keys.iter().enumerate() {
        let outcome = outcome.clone().unwrap_or(Outcome::Ok {
            count: upload.base.count + n as u64 + 1,
            epoch: upload.epoch,
            machine: format!("m{i}"),
        });
        ops.push(Op {
            client: 0,
            customer: "sim".into(),
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
    upload: &Upload,
    condition: Precondition,
    faults: (bool, bool),
) -> StoreResult<ETag> {
    let (lose_response, fail_before) = faults;
    if fail_before {
        return Err(StoreError::transient(DB_KEY, "injected"));
    }
    let result = m
        .store
        .put(DB_KEY, encode(&upload.next), Metadata::new(), condition)
        .await;
    match result {
        Ok(_) if lose_response => Err(StoreError::transient(DB_KEY, "response lost")),
        other => other,
    }
}

/// Two uploads in flight at once, as the tenant actor pipelines them: the
/// second is conditional on the first's body MD5 and may reach the store
/// first. Confirmed in order: a 412 on the second after the first succeeded
/// is resent once against the real ETag; if the first fails, the second
/// still counts when it landed (it contains the first), and the machine
/// steps down.
async fn send_pipelined(
    m: &mut Machine,
    i: usize,
    uploads: [Upload; 2],
    faults: [(bool, bool); 2],
    overtake: bool,
    ops: &mut Vec<Op>,
    now_ms: &impl Fn() -> u64,
) {
    let [first, second] = uploads;
    let (r1, mut r2) = if overtake {
        let r2 = put(m, &second, second.condition.clone(), faults[1]).await;
        (put(m, &first, first.condition.clone(), faults[0]).await, r2)
    } else {
        let r1 = put(m, &first, first.condition.clone(), faults[0]).await;
        (
            r1,
            put(m, &second, second.condition.clone(), faults[1]).await,
        )
    };
    let end_ms = now_ms();
    match r1 {
        Ok(etag) => {
            record(ops, i, &first, end_ms, None);
            if matches!(&r2, Err(e) if e.is_precondition()) {
                r2 = put(
                    m,
                    &second,
                    Precondition::IfMatch(etag.clone()),
                    (false, false),
                )
                .await;
            }
            settle(m, i, &second, r2, ops, end_ms);
        }
        Err(e1) => {
            match &r2 {
                Ok(_) => {
                    record(ops, i, &first, end_ms, None);
                    record(ops, i, &second, end_ms, None);
                }
                Err(e2) => {
                    record(ops, i, &first, end_ms, Some(failed(&e1)));
                    record(ops, i, &second, end_ms, Some(failed(e2)));
                }
            }
            m.step_down();
        }
    }
}

/// A new holder's claim: download, write its epoch, upload at once.
async fn claim(store: &DynStore, lease: &Lease, fencing: bool) -> Option<(SimDb, ETag)> {
    let (db, condition) = match store.get(DB_KEY).await.ok()? {
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
        .put(DB_KEY, encode(&claimed), Metadata::new(), condition)
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
