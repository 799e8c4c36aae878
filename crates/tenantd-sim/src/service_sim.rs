//! Deterministic simulation of the service itself, not a model of it: three
//! machines, each a real `Registry` with real tenant actors (SQLite working
//! copies, group commit, pipelined uploads, standby takeover, idempotency
//! keys) and one session heartbeat for all the tenants it holds, on one
//! in-memory store seen through a seeded fault layer and the retrying layer
//! per machine, as `tenantd serve` stacks them, under tokio's paused clock.
//!
//! Clients route like Fly Proxy (replay to the named holder, elsewhere when
//! there is none), give up on an attempt after a timeout, and retry with the
//! same idempotency key, as the contract tells clients to. Nemeses, drawn
//! from the seed: crash a machine (cut off for good, restarted under the
//! same machine id), pause one (its store traffic arrives seconds late:
//! uploads sent before the pause land after the lease has moved on),
//! partition it, cut off just its heartbeat (every tenant it holds must be
//! given up together), lose responses of its writes, fail its requests,
//! stop it gracefully. The history and the count in the stored database go through
//! the same checker as real chaos runs.
//!
//! The nemesis schedule and every fault decision come from the seed; tokio
//! randomises `select!` fairness itself, so a replayed seed runs the same
//! faults but not always the same interleaving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use crate::sim::HeartbeatCut;
use tenantd_chaos::checker::{self, Report};
use tenantd_chaos::history::{NemesisEvent, Op, Outcome};
use tenantd_chaos::read_checker;
use tenantd_core::TenantId;
use tenantd_core::lease::{LockState, read_lock};
use tenantd_core::metrics::Metrics;
use tenantd_core::store::fault::{FaultHandle, WriteTimes};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, FaultConfig, FaultStore, MemoryStore, ObjectStore, RetryingStore, keys,
};
use tenantd_core::tenant::actor::ActorContext;
use tenantd_core::tenant::db::Db;
use tenantd_core::tenant::follower::Followers;
use tenantd_core::tenant::sql::hrana::Program;
use tenantd_core::tenant::{
    Op as TenantOp, Registry, RegistryConfig, Route, TenantError, TenantHandle,
};

const TTL: Duration = Duration::from_secs(1);
/// Single-tenant mode serves the first; pool mode all of them.
const CUSTOMERS: [&str; 4] = ["sim", "simpool", "simpool2", "simpool3"];
/// Pool mode: tenants one machine holds at once (of the four).
const POOL_MAX_TENANTS: usize = 3;
const MACHINES: usize = 3;
const CLIENTS: u64 = 4;
const ATTEMPTS: usize = 8;
/// A client's patience with one attempt (an HTTP client timeout).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const BASE_LATENCY: Duration = Duration::from_millis(5);
const BASE_JITTER: Duration = Duration::from_millis(15);

mod reads;
mod rebirth;

pub use rebirth::Rebirth;

pub struct ServiceSimOutcome {
    pub report: Report,
    pub ops: usize,
    pub acked: usize,
    /// Reads sent, answered, and answered by followers (with readers on).
    pub reads: usize,
    pub reads_answered: usize,
    pub follower_reads: usize,
    /// Epoch of the stored database at the end: one per holder change.
    pub final_epoch: u64,
    /// Claims whose fences went out before their lock write, in one round
    /// (`tenantd_claims_fenced_before_lock_write_total`).
    pub claims_fenced_early: u64,
    pub nemeses: Vec<NemesisEvent>,
}

/// Runs one seed for `duration` of simulated time, with working copies
/// under `data_dir`. `ack_before_upload` is the bench's unsafe mode (answer
/// at commit, before the upload): the simulation must then find lost writes.
pub fn run_seed(
    seed: u64,
    duration: Duration,
    data_dir: &Path,
    mode: Mode,
    ack_before_upload: bool,
) -> ServiceSimOutcome {
    run_seed_with(
        seed,
        duration,
        data_dir,
        mode,
        ack_before_upload,
        Paths::default(),
    )
}

/// The nemeses of issue 26 besides the usual ones (all off by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paths {
    /// An operator deletes `machine.lock` of a held tenant.
    pub lock_deleted: bool,
    /// LIST hides log objects younger than 1-10 s on every machine.
    pub list_lag: bool,
    /// The holder crashes and its successor's store fails most requests
    /// while it takes over: a claim that fails after its acquisition.
    pub claim_failure: bool,
    /// Clients also increment through Hrana interactive transactions: a
    /// BEGIN pipeline, then a COMMIT pipeline on its baton, whose commit is
    /// its own writing path (issue 23).
    pub interactive: Interactive,
    /// Readers besides the writers, answered by followers too.
    pub reads: Reads,
    /// An operator deletes the last tenant and creates it again, again and
    /// again (pool mode).
    pub rebirth: Rebirth,
}

/// Whether the run has readers, and how followers treat pushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reads {
    #[default]
    Off,
    /// Writers record each write's op next to the count and hand their
    /// bookmarks to paired readers; readers go to any machine.
    Followers,
    /// The negative control: holders push each slot to followers when its
    /// upload starts, before it is confirmed; the read checker must see a
    /// reader shown a lost state.
    UnconfirmedPushes,
}

/// How many of the clients' increments are interactive transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interactive {
    #[default]
    Off,
    /// One in three.
    Mixed,
    /// Every one (the negative control: answered before their upload, only
    /// transactions can be the lost writes found).
    Only,
}

impl Paths {
    pub const ALL: Paths = Paths {
        lock_deleted: true,
        list_lag: true,
        claim_failure: true,
        interactive: Interactive::Mixed,
        reads: Reads::Off,
        rebirth: Rebirth::Off,
    };

    /// Any of issue 26's nemeses.
    fn nemeses(&self) -> bool {
        self.lock_deleted || self.list_lag || self.claim_failure
    }
}

/// [`run_seed`] with the nemeses of `paths` as well.
pub fn run_seed_with(
    seed: u64,
    duration: Duration,
    data_dir: &Path,
    mode: Mode,
    ack_before_upload: bool,
    paths: Paths,
) -> ServiceSimOutcome {
    run(
        seed,
        duration,
        data_dir,
        mode,
        ack_before_upload,
        paths,
        false,
    )
}

/// The negative control of releases with the log: every release skips
/// the snapshot and names the slot before its last confirmed one as the
/// log's end; the next claims must report it (a violation).
pub fn run_seed_misnaming_log_end(
    seed: u64,
    duration: Duration,
    data_dir: &Path,
    mode: Mode,
) -> ServiceSimOutcome {
    run(
        seed,
        duration,
        data_dir,
        mode,
        false,
        Paths::default(),
        true,
    )
}

fn run(
    seed: u64,
    duration: Duration,
    data_dir: &Path,
    mode: Mode,
    ack_before_upload: bool,
    paths: Paths,
    misname_log_end: bool,
) -> ServiceSimOutcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let world = World {
        shared: Arc::new(MemoryStore::new()),
        tenants: match mode {
            Mode::Single => &CUSTOMERS[..1],
            Mode::Pool => &CUSTOMERS[..],
        }
        .iter()
        .map(|c| TenantId::parse(c).expect("valid tenant id"))
        .collect(),
        mode,
        machines: Mutex::new(
            (0..MACHINES)
                .map(|i| Machine {
                    id: format!("{:014x}", 0xa1 + i),
                    up: None,
                })
                .collect(),
        ),
        data_dir: data_dir.to_path_buf(),
        ack_before_upload,
        start: runtime.block_on(async { Instant::now() }),
        incarnations: Mutex::new(0),
        graveyard: Mutex::new(Vec::new()),
        times: WriteTimes::default(),
        paths,
        misname_log_end,
        all_metrics: Mutex::new(Vec::new()),
        me: Default::default(),
        handed: Mutex::new(BTreeMap::new()),
        lives: Mutex::default(),
    };
    let world = Arc::new(world);
    let _ = world.me.set(Arc::downgrade(&world));
    let outcome = runtime.block_on(simulate(world, seed, duration));
    // Crashed machines' tasks are still parked on the runtime; dropping it
    // ends them.
    drop(runtime);
    outcome
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every machine serves one tenant (`CUSTOMER_ID` set), with standby
    /// takeover.
    Single,
    /// Any machine serves four tenants, holds at most three at a time under
    /// one session, and releases each after 700 ms idle: leases change
    /// hands constantly.
    Pool,
}

/// One machine id and what currently runs under it.
struct Machine {
    id: String,
    up: Option<Incarnation>,
}

#[derive(Clone)]
struct Incarnation {
    /// Which start of the machine this is (messages of a dead one are
    /// dropped).
    n: u64,
    registry: Arc<Registry>,
    followers: Arc<Followers>,
    faults: FaultHandle,
    /// Cuts this process off from its own heartbeat only.
    heartbeat_cut: Arc<AtomicBool>,
}

struct World {
    shared: Arc<MemoryStore>,
    tenants: Vec<TenantId>,
    mode: Mode,
    machines: Mutex<Vec<Machine>>,
    data_dir: PathBuf,
    ack_before_upload: bool,
    start: Instant,
    incarnations: Mutex<u64>,
    /// Crashed incarnations: cut off from the store for good, kept so that
    /// their tasks stay parked rather than being dropped mid-flight.
    graveyard: Mutex<Vec<Incarnation>>,
    /// Creation times shared by every machine's fault layer (a lagging
    /// LIST hides young objects whoever wrote them).
    times: WriteTimes,
    paths: Paths,
    /// The negative control of [`run_seed_misnaming_log_end`].
    misname_log_end: bool,
    /// Every incarnation's metrics, for the claims' log-end checks.
    all_metrics: Mutex<Vec<Metrics>>,
    /// For the machines' network (set once the world is shared).
    me: std::sync::OnceLock<std::sync::Weak<World>>,
    /// Per (writer, tenant): the bookmark and count of its last
    /// acknowledged write, for its paired reader.
    handed: Mutex<BTreeMap<(u64, TenantId), (u64, u64)>>,
    /// The lives of the tenant an operator deletes and creates again.
    lives: Mutex<rebirth::Lives>,
}

impl World {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Starts the machine unless it is up: one process per machine id.
    fn boot(&self, index: usize, seed: u64) {
        if self.incarnation(index).is_some() {
            return;
        }
        let n = {
            let mut count = self.incarnations.lock().unwrap();
            *count += 1;
            *count
        };
        let id = self.machines.lock().unwrap()[index].id.clone();
        let fault = FaultStore::seeded(
            self.shared.clone() as DynStore,
            FaultConfig {
                latency: BASE_LATENCY,
                jitter: BASE_JITTER,
                ..FaultConfig::default()
            },
            seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
        .with_write_times(self.times.clone());
        let faults = fault.handle();
        let heartbeat_cut = Arc::new(AtomicBool::new(false));
        let cut = HeartbeatCut::new(Arc::new(fault), &id, heartbeat_cut.clone());
        let store: DynStore = Arc::new(RetryingStore::new(Arc::new(cut), RetryPolicy::default()));
        let metrics = Metrics::new();
        self.all_metrics.lock().unwrap().push(metrics.clone());
        let data_dir = self.data_dir.join(format!("incarnation-{n}"));
        let followers = Followers::new(
            store.clone(),
            data_dir.clone(),
            &id,
            format!("{id}:3000"),
            None,
            Default::default(),
            &metrics,
        )
        .with_peers(Arc::new(reads::SimPeers {
            world: self.me.get().expect("set at start").clone(),
            index,
            n,
        }));
        let registry = Registry::new(
            RegistryConfig {
                machine_id: id.clone(),
                advertise: format!("{id}:3000"),
                lease_ttl: TTL,
                customer_id: match self.mode {
                    Mode::Single => Some(self.tenants[0].clone()),
                    Mode::Pool => None,
                },
                max_tenants: POOL_MAX_TENANTS,
                lock_cache_ttl: TTL / 5,
                max_known_tenants: 10_000,
                create_on_first_request: false,
            },
            ActorContext {
                store,
                metrics,
                machine_id: id,
                data_dir,
                idle_timeout: match self.mode {
                    Mode::Single => None,
                    Mode::Pool => Some(Duration::from_millis(700)),
                },
                ack_before_upload: self.ack_before_upload,
                push_before_upload: self.paths.reads == Reads::UnconfirmedPushes,
                upload_bound: None,
                // On a third of the seeds no release has time for a
                // snapshot: every release hands the tenant over with its
                // log (the `released` record naming the log's end).
                release_budget: (self.misname_log_end || seed % 3 == 1).then_some(Duration::ZERO),
                release_log_end_behind: self.misname_log_end,
                claim_retries_for: Duration::from_secs(30),
                sql: Default::default(),
                // Compaction and garbage collection often, so that crashes
                // and pauses land in the middle of them.
                retention: tenantd_core::tenant::log::Retention {
                    keep: Duration::ZERO,
                    max_deltas: 5,
                    max_delta_bytes: 64 << 20,
                },
            },
        );
        let followers = Arc::new(followers);
        if self.paths.reads != Reads::Off {
            // As `tenantd serve` does: a takeover starts from this machine's
            // replica when it is current, so the runs with readers also walk
            // that start and the claim's early reads.
            registry.take_over_from_replicas(followers.clone());
        }
        if self.mode == Mode::Single {
            tokio::spawn(registry.clone().standby(self.tenants[0].clone()));
        }
        self.machines.lock().unwrap()[index].up = Some(Incarnation {
            n,
            registry,
            followers,
            faults,
            heartbeat_cut,
        });
    }

    /// SIGKILL: nothing of this process reaches the store any more.
    fn crash(&self, index: usize) {
        let gone = self.machines.lock().unwrap()[index].up.take();
        if let Some(gone) = gone {
            gone.faults.partition(true);
            self.graveyard.lock().unwrap().push(gone);
        }
    }

    /// SIGTERM: stops taking requests, then commits, uploads and releases.
    async fn stop(&self, index: usize) {
        let gone = self.machines.lock().unwrap()[index].up.take();
        if let Some(gone) = gone {
            gone.registry.drain().await;
        }
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        let machines = self.machines.lock().unwrap();
        machines.iter().position(|m| m.id == id)
    }

    fn incarnation(&self, index: usize) -> Option<Incarnation> {
        self.machines.lock().unwrap()[index].up.clone()
    }

    fn registry_of(&self, id: &str) -> Option<Arc<Registry>> {
        let machines = self.machines.lock().unwrap();
        let m = machines.iter().find(|m| m.id == id)?;
        m.up.as_ref().map(|up| up.registry.clone())
    }

    /// A machine that is up, other than `not`, chosen like Fly Proxy would.
    fn pick(&self, rng: &mut StdRng, not: Option<&str>) -> Option<String> {
        let machines = self.machines.lock().unwrap();
        let up: Vec<&Machine> = machines
            .iter()
            .filter(|m| m.up.is_some() && Some(m.id.as_str()) != not)
            .collect();
        (!up.is_empty()).then(|| up[rng.random_range(0..up.len())].id.clone())
    }
}

async fn simulate(world: Arc<World>, seed: u64, duration: Duration) -> ServiceSimOutcome {
    // The tenants exist before any machine starts, as an operator (or a
    // single-tenant machine at start) creates them: machines answer 404
    // for tenants that do not.
    let store: DynStore = world.shared.clone();
    for tenant in &world.tenants {
        tenantd_core::tenant::lifecycle::create(&store, tenant)
            .await
            .expect("creating a tenant in the memory store");
    }
    for i in 0..MACHINES {
        world.boot(i, seed);
    }
    if world.paths.reads != Reads::Off {
        reads::set_up(&world, seed).await;
    }
    let until = world.start + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(world.clone(), n, seed, until)))
        .collect();
    let readers: Vec<_> = match world.paths.reads {
        Reads::Off => Vec::new(),
        _ => (0..CLIENTS)
            .map(|n| tokio::spawn(reads::reader(world.clone(), n, seed, until)))
            .collect(),
    };
    // Two independent streams, so faults overlap: a holder paused while
    // its successor crashes, a partition during a graceful stop.
    let second = tokio::spawn({
        let world = world.clone();
        async move { nemeses(&world, seed ^ 0x5eed, until).await }
    });
    let operator = tokio::spawn(rebirth::operator(world.clone(), seed, until));
    let mut nemeses = nemeses(&world, seed, until).await;
    nemeses.extend(second.await.expect("nemesis task"));
    nemeses.extend(operator.await.expect("operator task"));
    nemeses.sort_by_key(|n| n.start_ms);

    let mut ops = Vec::new();
    for client in clients {
        ops.extend(client.await.expect("client task"));
    }
    let mut sent_reads = Vec::new();
    for reader in readers {
        sent_reads.extend(reader.await.expect("reader task"));
    }
    // Quiet: every machine up and healthy, late uploads landed or refused.
    for i in 0..MACHINES {
        match world.incarnation(i) {
            Some(up) => up.faults.set(FaultConfig::default()),
            None => world.boot(i, seed),
        }
    }
    tokio::time::sleep(4 * TTL).await;
    // Every tenant answers again once the faults healed (a tenant that
    // stopped answering for good is a violation).
    let mut unanswered = Vec::new();
    if world.paths.nemeses() {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xf1a1);
        for tenant in &world.tenants {
            let key = format!("final-{tenant}");
            let start_ms = world.now_ms();
            let mut outcome = None;
            for _ in 0..3 * ATTEMPTS {
                let attempt = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    increment(&world, &mut rng, tenant, &key),
                );
                if let Ok(Ok((count, epoch, machine))) = attempt.await {
                    outcome = Some(Outcome::Ok {
                        count,
                        epoch,
                        machine,
                    });
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if outcome.is_none() {
                unanswered.push(format!(
                    "customer {tenant}: no answer within {} s after the faults healed",
                    (world.now_ms() - start_ms) / 1000
                ));
            }
            let customer = rebirth::now(&world, tenant);
            let outcome = customer.relative(outcome.unwrap_or(Outcome::Indeterminate {
                error: "no answer".into(),
            }));
            ops.push(Op {
                client: CLIENTS as usize,
                customer: customer.label,
                key,
                start_ms,
                end_ms: world.now_ms(),
                outcome,
            });
        }
    }
    let mut finals = rebirth::earlier_finals(&world);
    let mut durable = BTreeMap::new();
    let mut final_epoch = 0;
    let mut unreadable = rebirth::violations(&world);
    for tenant in &world.tenants {
        let (count, epoch, ops) = stored(&world, tenant.as_str()).await.unwrap_or_else(|e| {
            unreadable.push(e);
            (0, 0, BTreeMap::new())
        });
        let customer = rebirth::now(&world, tenant);
        finals.insert(customer.label.clone(), count.saturating_sub(customer.base));
        durable.insert(customer.label, ops);
        final_epoch += epoch;
    }
    let mut report = checker::check(&ops, &finals, &nemeses, world.now_ms());
    report.violations.extend(unanswered);
    report.violations.extend(unreadable);
    // A released lock's log_end is exactly where the log ends: every claim
    // after such a release compares it with what its fences found.
    let mismatches: u64 = world
        .all_metrics
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.release_log_end_mismatches.get())
        .sum();
    if mismatches > 0 {
        report.violations.push(format!(
            "{mismatches} claims found the log ending elsewhere than the released lock's log_end said"
        ));
    }
    let claims_fenced_early: u64 = world
        .all_metrics
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.claims_fenced_before_lock_write.get())
        .sum();
    let read_report = read_checker::check(&sent_reads, &ops, &durable);
    report
        .violations
        .extend(read_report.violations.iter().cloned());
    ServiceSimOutcome {
        reads: read_report.reads,
        reads_answered: read_report.answered,
        follower_reads: read_report.by_followers,
        acked: ops.iter().filter(|op| op.acked().is_some()).count(),
        ops: ops.len(),
        report,
        final_epoch,
        claims_fenced_early,
        nemeses,
    }
}

/// The count and epoch of the tenant as the store holds it (snapshot and
/// log): what is durable, and what a new holder starts from; with the
/// op → count pairs the writers recorded (readers on). A log that does not
/// replay is a violation, named.
async fn stored(world: &World, customer: &str) -> Result<Stored, String> {
    let exists = world
        .shared
        .get(&keys::database(customer))
        .await
        .expect("memory store")
        .is_some();
    if !exists {
        return Ok((0, 0, BTreeMap::new()));
    }
    let path = world.data_dir.join(format!("final-{customer}.sqlite3"));
    let store: DynStore = world.shared.clone();
    tenantd_core::tenant::log::materialize(
        &store,
        customer,
        &path,
        tenantd_core::tenant::log::Until::End,
    )
    .await
    .map_err(|e| format!("customer {customer}: the stored log does not replay: {e}"))?;
    let db = Db::open(&path).expect("the stored database opens");
    let result = (
        db.count().expect("count"),
        db.epoch().expect("epoch"),
        reads::recorded_ops(&path),
    );
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(result)
}

/// Count, epoch, and the op → count pairs of a stored tenant.
type Stored = (u64, u64, BTreeMap<String, u64>);

/// Increments with unique keys until `until`, each retried with its key.
async fn client(world: Arc<World>, n: u64, seed: u64, until: Instant) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(n));
    let mut ops = Vec::new();
    let mut k = 0;
    while Instant::now() < until {
        let key = format!("c{n}-{k}");
        k += 1;
        let tenant = &world.tenants[rng.random_range(0..world.tenants.len())];
        let Some(customer) = rebirth::begin(&world, tenant) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let interactive = match world.paths.interactive {
            Interactive::Off => false,
            Interactive::Mixed => rng.random_range(0..3) == 0,
            Interactive::Only => true,
        };
        let start_ms = world.now_ms();
        let mut outcome = None;
        let mut maybe_applied = false;
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            // A transaction has no idempotency key: once it may have been
            // applied, sending it again could count twice.
            if interactive && maybe_applied {
                break;
            }
            let attempt = async {
                match (interactive, world.paths.reads) {
                    (_, Reads::Followers | Reads::UnconfirmedPushes) => {
                        reads::write(&world, &mut rng, n, tenant, &key).await
                    }
                    (true, Reads::Off) => transaction(&world, &mut rng, tenant).await,
                    (false, Reads::Off) => increment(&world, &mut rng, tenant, &key).await,
                }
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(Ok((count, epoch, machine))) => {
                    outcome = Some(Outcome::Ok {
                        count,
                        epoch,
                        machine,
                    });
                    break;
                }
                Ok(Err(Attempt::NotApplied(e))) => last_error = e,
                Ok(Err(Attempt::Maybe(e))) => {
                    maybe_applied = true;
                    last_error = e;
                }
                Err(_) => {
                    maybe_applied = true;
                    last_error = "timed out".into();
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        }
        let outcome = outcome.unwrap_or(if maybe_applied {
            Outcome::Indeterminate { error: last_error }
        } else {
            Outcome::Failed {
                status: 503,
                error: last_error,
            }
        });
        rebirth::end(&world, tenant);
        let outcome = customer.relative(outcome);
        ops.push(Op {
            client: n as usize,
            customer: customer.label,
            key,
            start_ms,
            end_ms: world.now_ms(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
    }
    ops
}

enum Attempt {
    /// Nothing of it was written (no machine, not the writer, no lock read).
    NotApplied(String),
    /// It may have been written (the store did not confirm in time).
    Maybe(String),
}

/// What a request did on the machine the routing led to.
enum AtHolder<T> {
    Done(Result<T, Attempt>),
    /// That machine no longer writes the tenant; nothing was applied.
    NotHolder,
}

/// One request through the proxy: to a random machine, then wherever the
/// routing sends it, as `http.rs` does with `fly-replay`, until a machine
/// runs `request` on the tenant's handle. Answers with the machine too.
async fn through_proxy<T, F, Fut>(
    world: &World,
    rng: &mut StdRng,
    tenant: &TenantId,
    mut request: F,
) -> Result<(T, String), Attempt>
where
    F: FnMut(TenantHandle) -> Fut,
    Fut: std::future::Future<Output = AtHolder<T>>,
{
    let no_machine = || Attempt::NotApplied("no machine is up".into());
    let mut target = world.pick(rng, None).ok_or_else(no_machine)?;
    let mut fresh = false;
    for _hop in 0..6 {
        let registry = world
            .registry_of(&target)
            .ok_or_else(|| Attempt::NotApplied(format!("machine {target} is down")))?;
        match registry.route(tenant, fresh).await {
            Route::Local(handle) => match request(handle).await {
                AtHolder::Done(result) => return result.map(|answer| (answer, target)),
                AtHolder::NotHolder => fresh = true,
            },
            Route::Holder(record) => {
                target = record.holder;
                fresh = true;
            }
            Route::Elsewhere => {
                target = world.pick(rng, Some(&target)).ok_or_else(no_machine)?;
                fresh = true;
            }
            Route::Lookup { .. } => return Err(Attempt::NotApplied("lookup".into())),
            Route::Unavailable(e) | Route::Corrupt(e) | Route::NotFound(e) => {
                return Err(Attempt::NotApplied(e));
            }
        }
    }
    Err(Attempt::NotApplied("too many hops".into()))
}

/// One counter increment with its idempotency key.
async fn increment(
    world: &World,
    rng: &mut StdRng,
    tenant: &TenantId,
    key: &str,
) -> Result<(u64, u64, String), Attempt> {
    let ((count, epoch), machine) = through_proxy(world, rng, tenant, |handle| async move {
        let op = TenantOp::Increment {
            idempotency_key: Some(key.to_string()),
        };
        match handle.call(op).await {
            Ok(answer) => AtHolder::Done(Ok((answer.count, answer.epoch))),
            Err(TenantError::NotHolder) => AtHolder::NotHolder,
            Err(TenantError::Unavailable(e) | TenantError::Corrupt(e)) => {
                AtHolder::Done(Err(Attempt::Maybe(e)))
            }
            Err(TenantError::Sql(e)) => unreachable!("increments run no SQL: {e}"),
        }
    })
    .await?;
    Ok((count, epoch, machine))
}

/// One increment as an interactive transaction through Hrana: BEGIN,
/// UPDATE and a read of the count in one pipeline, which leaves the
/// transaction open on its stream, then COMMIT on the stream's baton,
/// answered once the commit is durable.
async fn transaction(
    world: &World,
    rng: &mut StdRng,
    tenant: &TenantId,
) -> Result<(u64, u64, String), Attempt> {
    let ((count, epoch), machine) = through_proxy(world, rng, tenant, |handle| async move {
        let opened = handle
            .hrana(pipeline(
                None,
                serde_json::json!([
                    execute("BEGIN"),
                    execute("UPDATE welcome SET count = count + 1"),
                    execute("SELECT count FROM welcome"),
                ]),
            ))
            .await;
        // Nothing is committed before the COMMIT: whatever goes wrong here
        // leaves at most an open transaction, which the holder rolls back.
        let opened = match opened {
            Ok(answer) => answer,
            Err(TenantError::NotHolder) => return AtHolder::NotHolder,
            Err(e) => return AtHolder::Done(Err(Attempt::NotApplied(e.to_string()))),
        };
        let results = &opened.results;
        let (Some(baton), Some(count)) = (
            results["baton"].as_str(),
            results["results"][2]["response"]["result"]["rows"][0][0]["value"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return AtHolder::Done(Err(Attempt::NotApplied(format!(
                "BEGIN answered {results}"
            ))));
        };
        let committed = handle
            .hrana(pipeline(
                Some(baton.to_string()),
                serde_json::json!([execute("COMMIT"), {"type": "close"}]),
            ))
            .await;
        AtHolder::Done(match committed {
            Ok(answer) if answer.results["results"][0]["type"] == "ok" => Ok((count, answer.epoch)),
            // The stream ended (bound, step-down) or COMMIT failed: rolled
            // back.
            Ok(answer) => Err(Attempt::NotApplied(answer.results.to_string())),
            // Never written, as a dropped reply means (the actor answers a
            // commit it uploaded, or may have, itself).
            Err(TenantError::NotHolder) => Err(Attempt::NotApplied("not the holder".into())),
            Err(TenantError::Sql(e)) => Err(Attempt::NotApplied(e.message)),
            Err(TenantError::Unavailable(e) | TenantError::Corrupt(e)) => Err(Attempt::Maybe(e)),
        })
    })
    .await?;
    Ok((count, epoch, machine))
}

fn pipeline(baton: Option<String>, requests: serde_json::Value) -> Arc<Program> {
    Arc::new(Program {
        requests: serde_json::from_value(requests).expect("valid Hrana requests"),
        read_only: false,
        baton,
    })
}

fn execute(sql: &str) -> serde_json::Value {
    serde_json::json!({"type": "execute", "stmt": {"sql": sql}})
}

/// Faults drawn from the seed until `until`; returns what was done.
async fn nemeses(world: &World, seed: u64, until: Instant) -> Vec<NemesisEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    loop {
        let pause = Duration::from_millis(rng.random_range(200..1500));
        tokio::time::sleep(pause).await;
        if Instant::now() >= until {
            return events;
        }
        // Mostly a holder: faults elsewhere rarely matter.
        let customer = &world.tenants[rng.random_range(0..world.tenants.len())];
        let lock = keys::lock(customer.as_str());
        let holder = match read_lock(&(world.shared.clone() as DynStore), &lock).await {
            Ok(LockState::Held { record, .. }) => world.index_of(&record.holder),
            _ => None,
        };
        let index = match holder {
            Some(holder) if rng.random_range(0..3) > 0 => holder,
            _ => rng.random_range(0..MACHINES),
        };
        let id = world.machines.lock().unwrap()[index].id.clone();
        let start_ms = world.now_ms();
        let Some(up) = world.incarnation(index) else {
            continue;
        };
        let lasting = Duration::from_millis(rng.random_range(300..3000));
        let kinds = if world.paths.nemeses() { 13 } else { 10 };
        let kind = match rng.random_range(0..kinds) {
            10 if world.paths.lock_deleted => {
                let _ = world.shared.delete(&lock).await;
                tokio::time::sleep(lasting).await;
                "lock-deleted"
            }
            11 if world.paths.list_lag => {
                let lag = Duration::from_millis(rng.random_range(1000..10_000));
                let machines: Vec<_> = (0..MACHINES).filter_map(|i| world.incarnation(i)).collect();
                for m in &machines {
                    m.faults.update(|c| {
                        c.list_lag = lag;
                        c.list_lag_prefix = keys::log_prefix(customer.as_str());
                    });
                }
                tokio::time::sleep(lasting.max(lag)).await;
                for m in &machines {
                    m.faults.update(|c| c.list_lag = Duration::ZERO);
                }
                "list-lag"
            }
            12 if world.paths.claim_failure => {
                // The holder dies; every other machine's store fails most
                // requests while one of them takes the tenant over.
                world.crash(index);
                let others: Vec<_> = (0..MACHINES)
                    .filter(|&i| i != index)
                    .filter_map(|i| world.incarnation(i))
                    .collect();
                for m in &others {
                    m.faults.update(|c| c.error_rate = 0.7);
                }
                tokio::time::sleep(TTL * 2 + lasting).await;
                for m in &others {
                    m.faults.update(|c| c.error_rate = 0.0);
                }
                world.boot(index, seed);
                "failed-claim"
            }
            0 => {
                world.crash(index);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..2000))).await;
                world.boot(index, seed);
                "kill"
            }
            1 => {
                // Everything it sends in this window arrives late, after
                // its lease ran out and another machine may have taken over.
                let late = TTL.mul_f64(rng.random_range(1.2..3.0));
                up.faults.update(|c| c.latency = late);
                tokio::time::sleep(lasting).await;
                up.faults.update(|c| c.latency = BASE_LATENCY);
                "pause"
            }
            2 => {
                up.faults.partition(true);
                tokio::time::sleep(lasting).await;
                up.faults.partition(false);
                "partition"
            }
            3 => {
                up.faults.update(|c| c.lost_response_rate = 0.3);
                tokio::time::sleep(lasting).await;
                up.faults.update(|c| c.lost_response_rate = 0.0);
                "lost-responses"
            }
            4 => {
                up.faults.update(|c| c.error_rate = 0.4);
                tokio::time::sleep(lasting).await;
                up.faults.update(|c| c.error_rate = 0.0);
                "store-errors"
            }
            6 => {
                // Writes applied after the machine was told they failed.
                up.faults.update(|c| {
                    c.late_apply_rate = 0.3;
                    c.late_apply_delay = Duration::from_millis(300);
                });
                tokio::time::sleep(lasting).await;
                up.faults.update(|c| c.late_apply_rate = 0.0);
                "late-writes"
            }
            7 => {
                // Throttling and server errors, in bursts.
                up.faults.update(|c| {
                    c.slowdown_rate = 0.1;
                    c.internal_error_rate = 0.05;
                    c.error_burst = Duration::from_millis(200);
                });
                tokio::time::sleep(lasting).await;
                up.faults.update(|c| {
                    c.slowdown_rate = 0.0;
                    c.internal_error_rate = 0.0;
                });
                "slowdown-bursts"
            }
            5 => {
                world.stop(index).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                world.boot(index, seed);
                "stop"
            }
            8 => {
                // Only its heartbeat is cut off: it still reaches every
                // tenant's objects, but its session runs out, and with it
                // every lease it holds.
                up.heartbeat_cut.store(true, Ordering::SeqCst);
                tokio::time::sleep(lasting).await;
                up.heartbeat_cut.store(false, Ordering::SeqCst);
                "heartbeat-partition"
            }
            _ => {
                tokio::time::sleep(lasting).await;
                "none"
            }
        };
        events.push(NemesisEvent {
            kind: kind.into(),
            customer: holder.map(|_| customer.to_string()),
            machine: Some(id),
            start_ms,
            end_ms: world.now_ms(),
        });
    }
}
