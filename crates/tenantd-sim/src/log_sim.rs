//! Deterministic model simulation of the commit-log protocol (issues 14
//! and 26): one tenant, several writers that each believe they hold it,
//! one shared in-memory store, tokio's paused clock and one seeded RNG, so
//! that a seed is a reproducible schedule.
//!
//! The model keeps the protocol and drops SQLite: the database is a counter
//! with a digest standing in for the database checksum (each commit's
//! digest hashes its parent's, so a digest names one history). Log objects
//! are real [`Delta`]s (a one-page delta carrying the counter, pre/post
//! checksum = digest before/after) and real fences, under the real keys,
//! with the acquisition's token, epoch and slot in their metadata.
//!
//! - A writer commits a batch into slot `s` and PUTs it with `If-None-Match`
//!   only while every slot `<= s - WINDOW` is confirmed. A commit is
//!   acknowledged when it and every slot before it are confirmed. A 412 on
//!   its own slot is resolved by reading the object back (R4: its token;
//!   the old rule: its epoch and slot): its own write that landed late
//!   confirms the slot, anything else means it was fenced.
//! - Requests are in flight independently: the network delivers them in
//!   any order, a machine's requests still land after it paused or
//!   crashed, and each writer's [`FaultStore`] loses responses, fails
//!   requests, applies some PUTs after telling the caller they failed, and
//!   at times lists only objects older than a lag.
//! - `machine.lock` is modelled as its state (epoch, token, `released`):
//!   each acquisition takes the next epoch, or (the lock deleted by hand)
//!   1 or an epoch a contender remembers. The previous writers go on as
//!   zombies (maybe paused).
//! - A claim (see `claim`), one store request per step: read the
//!   snapshot, list the log after it, read the contiguous prefix, replay
//!   it, check epochs (R3), fence `E+1..=E+WINDOW` resolving taken slots
//!   by reading them (R2), re-check the snapshot, write from `E+WINDOW+1`.
//! - The other paths (see `paths`): compaction abandoned at any step,
//!   release, claim failures, `restore --in-place`, `tenants delete` and
//!   re-creation, the lock deleted by hand, a lagging LIST, a snapshot
//!   re-uploaded without metadata.
//!
//! The checker: every claim that completes recovers a state containing
//! every increment of its incarnation acknowledged before its last fence
//! landed, and no write of a deleted incarnation; no write of an
//! incarnation is acknowledged in a slot past the fences of the delete
//! that removed it (it landed after the delete fenced, and went with the
//! snapshot); at the end a writer
//! recovers the log under a LIST that hides everything (liveness), and its
//! state holds every acknowledged increment, only attempted ones, each
//! once, and every state a claim of that incarnation recovered is a prefix
//! of it. Each old rule ([`Rules`]) and `fences`, `keep_fences`,
//! `window_from_acked`, `recheck: Never` are negative controls.

mod claim;
mod paths;
mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

pub use rules::{Paths, Rules};

use claim::ClaimStep;
use paths::{Compaction, Deleting};
use tenantd_core::store::fault::{FaultHandle, WriteTimes};
use tenantd_core::store::{
    DynStore, ETag, FaultConfig, FaultStore, MemoryStore, Metadata, Precondition, StoreResult, keys,
};
use tenantd_core::tenant::delta::{Delta, Kind};

const TENANT: &str = "sim";
/// Slots a writer may have in flight past its acknowledged prefix.
pub const WINDOW: u64 = 4;
const PAGE_SIZE: u32 = 512;
/// Writers running at once (crashed ones aside); a takeover beyond this
/// crashes the oldest.
const MAX_LIVE_WRITERS: usize = 4;
/// The longest a late-applied PUT waits before it lands.
const LATE_APPLY: Duration = Duration::from_secs(10);
/// The final recovery's LIST lag: longer than the whole run.
const FINAL_LAG: Duration = Duration::from_secs(24 * 3600);
/// Steps the final recovery may take (one store request each).
const FINAL_STEPS: usize = 20_000;

/// Metadata of log objects and snapshots (as tenantd writes them).
const TOKEN_KEY: &str = "tenantd-token";
const EPOCH_KEY: &str = "tenantd-epoch";
const FORMAT_KEY: &str = "tenantd-format";

#[derive(Clone, Copy, Debug)]
pub struct LogSimConfig {
    /// A new holder fences the empty slots after the prefix. Off: negative
    /// control.
    pub fences: bool,
    /// Compaction keeps fences. Off: negative control.
    pub keep_fences: bool,
    /// A writer sends slot `s` only once every slot up to `s - WINDOW` is
    /// confirmed. Off (negative control): only while fewer than `WINDOW`
    /// uploads are unconfirmed, so that it can run past a hole further
    /// than a successor's fences reach.
    pub window_from_acked: bool,
    /// When a claim checks that the snapshot it started from is still the
    /// current one.
    pub recheck: Recheck,
    /// Whether claims may fence as soon as the log is listed, before its
    /// deltas are read (half of them, chosen by the seed).
    pub fence_ahead: FenceAhead,
    /// Whether a contender that read a holder's release naming the log's
    /// end fences the window after it before its lock write.
    pub early_fences: EarlyFences,
    pub rules: Rules,
    pub paths: Paths,
    pub steps: usize,
    /// Record every event in [`LogSimOutcome::trace`] (to debug a seed).
    pub trace: bool,
}

impl Default for LogSimConfig {
    fn default() -> LogSimConfig {
        LogSimConfig {
            fences: true,
            keep_fences: true,
            window_from_acked: true,
            recheck: Recheck::AfterFences,
            fence_ahead: FenceAhead::ThenRecheck,
            early_fences: EarlyFences::OnRelease,
            rules: Rules::NEW,
            paths: Paths::ALL,
            steps: 1000,
            trace: false,
        }
    }
}

/// Whether a claim re-reads the snapshot's ETag once its fences landed. A
/// compaction writes the snapshot before it deletes the slots it covers,
/// so an unchanged ETag proves that nothing after the snapshot the claim
/// started from was deleted while it listed, read and fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recheck {
    /// The protocol.
    AfterFences,
    /// Never (negative control): the listing may miss slots a compaction
    /// deleted, and look like an older log or a log with a gap.
    Never,
}

/// A cold start's claim (`tenant/claim.rs`, `fence_ahead`): the window
/// after the listed run is fenced while the run's deltas are still being
/// read, and when the fences took the whole window at once, the snapshot's
/// HEAD right after them is the recheck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceAhead {
    /// Every claim reads the run before it fences.
    Off,
    /// The protocol: half of the claims whose lock was a holder's release
    /// naming the log's end fence ahead, then HEAD the snapshot, then
    /// read the run.
    ThenRecheck,
    /// Negative control: any claim may fence ahead, whatever the lock it
    /// replaced (its epoch may be below a deposed holder's deltas).
    Unguarded,
}

/// A cold start's fences before the lock write (`tenant/claim.rs`,
/// `fence_early`): a contender that read a lock released by a holder
/// naming the log's end `L` fences `L + 1 ..= L + WINDOW` under the epoch
/// and token of the acquisition it is about to attempt, before (or while)
/// it lists the log; its listing then may show those fences. Contenders
/// whose lock write lost (or that read a release long gone) leave theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyFences {
    Off,
    /// The protocol: half of the acquisitions of such a release fence
    /// early, the run read stops at `L` (slots past it are the fences'
    /// to find), and the window after `L` counts as the claim's first
    /// round, with no recheck when nothing else was fenced; a third of
    /// the takeovers also bring a contender that lost with fences planned
    /// on some earlier release.
    OnRelease,
    /// Negative control: the run read goes on through the claim's own
    /// early fences, and the window is taken as fenced after that run's
    /// end (the claim writes from there on with no more fences).
    WindowAfterTheRun,
}

/// What one seed did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogSimOutcome {
    pub violations: Vec<String>,
    /// Increments attempted and acknowledged.
    pub attempted: usize,
    pub acked: usize,
    /// The counter the final recovery found.
    pub recovered: u64,
    pub takeovers: usize,
    /// Claims that completed (fences written, ready to write).
    pub claims: usize,
    /// Writers stopped by a fence or a successor's slot.
    pub fenced: usize,
    /// Writers that found themselves deposed while claiming.
    pub deposed: usize,
    /// Snapshots written by compaction, and log objects it deleted.
    pub snapshots: usize,
    pub deleted: usize,
    /// Deleted log slots that some zombie's PUT created again.
    pub recreated: usize,
    /// Objects of deposed writers a claim skipped.
    pub garbage_skipped: usize,
    /// Taken slots a claim read directly (R2), and those it applied.
    pub probes: usize,
    pub probed_applied: usize,
    /// Claims completed on fences sent ahead of reading the run, the HEAD
    /// after them serving as the recheck ([`FenceAhead`]).
    pub fenced_ahead: usize,
    /// Claims that took fences sent before their lock write as their
    /// window ([`EarlyFences`]); fences landed by contenders that lost.
    pub fenced_early: usize,
    pub loser_fences: usize,
    /// Claims that raised their lock's epoch (R3).
    pub epoch_raises: usize,
    /// Releases that said `released`, and those that did not end with a
    /// current snapshot (their compaction failed: released with the log,
    /// or not released at all).
    pub releases: usize,
    pub releases_unclean: usize,
    pub claim_failures: usize,
    /// Restores that wrote their commit, and those that failed.
    pub restores: usize,
    pub restores_failed: usize,
    /// Tenants deleted, and created again.
    pub deletes: usize,
    pub creates: usize,
    /// Locks deleted by hand, and claims that began with no lock.
    pub locks_deleted: usize,
    /// Snapshots re-uploaded without metadata, and claims that refused one.
    pub bare_snapshots: usize,
    pub bare_refused: usize,
    /// Claims that refused a life whose delete had fenced it and not
    /// finished (`Rules::claims_read_tombstone`).
    pub refused_for_delete: usize,
    /// Times LIST started lagging.
    pub lags: usize,
    /// What happened, step by step, when [`LogSimConfig::trace`] is set.
    pub trace: Vec<String>,
}

impl LogSimOutcome {
    /// Adds another seed's counts (not its violations or trace).
    pub fn add(&mut self, o: &LogSimOutcome) {
        self.attempted += o.attempted;
        self.acked += o.acked;
        self.recovered += o.recovered;
        self.takeovers += o.takeovers;
        self.claims += o.claims;
        self.fenced += o.fenced;
        self.deposed += o.deposed;
        self.snapshots += o.snapshots;
        self.deleted += o.deleted;
        self.recreated += o.recreated;
        self.garbage_skipped += o.garbage_skipped;
        self.probes += o.probes;
        self.probed_applied += o.probed_applied;
        self.fenced_ahead += o.fenced_ahead;
        self.fenced_early += o.fenced_early;
        self.loser_fences += o.loser_fences;
        self.epoch_raises += o.epoch_raises;
        self.releases += o.releases;
        self.releases_unclean += o.releases_unclean;
        self.claim_failures += o.claim_failures;
        self.restores += o.restores;
        self.restores_failed += o.restores_failed;
        self.deletes += o.deletes;
        self.creates += o.creates;
        self.locks_deleted += o.locks_deleted;
        self.bare_snapshots += o.bare_snapshots;
        self.bare_refused += o.bare_refused;
        self.refused_for_delete += o.refused_for_delete;
        self.lags += o.lags;
    }
}

/// Runs one seed to completion on its own current-thread runtime.
pub fn run_seed(seed: u64, config: LogSimConfig) -> LogSimOutcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(Sim::new(seed, config).run())
}

/// A position in the history: the state after slot `seq`, the highest
/// epoch of the history up to it, and the tenant's incarnation (the
/// snapshot object's body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    seq: u64,
    value: u64,
    digest: u64,
    epoch: u64,
    #[serde(default)]
    inc: u64,
}

struct Slot {
    body: Bytes,
    ids: Vec<u64>,
    after: Position,
    confirmed: bool,
}

enum Phase {
    Claiming(Box<ClaimStep>),
    Active,
    Stopped(&'static str),
}

/// Why a writer exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A machine serving the tenant.
    Holder,
    /// `tenantd restore --in-place`: one commit, a compaction, a release.
    Restore { wrote: bool },
    /// `tenantd tenants delete`.
    Delete,
    /// The end of the run: recovers the log.
    Final,
}

/// `machine.lock`, as its content.
#[derive(Clone, Copy, Debug, Default)]
struct Lock {
    present: bool,
    epoch: u64,
    token: u64,
    released: bool,
    /// Released by a holder that had completed its claim, naming the
    /// log's end (a failed claim's or a restore's release does not).
    log_end: bool,
    /// That end: the holder's last confirmed slot.
    end: u64,
}

struct Writer {
    epoch: u64,
    /// The lock it replaced was a holder's release naming the log's end:
    /// its claim may fence before reading the run ([`FenceAhead`]).
    ahead_safe: bool,
    /// Its acquisition's token (R4), unique per writer.
    token: u64,
    /// The end named by the release its lock replaced, while its claim
    /// may still fence after it before reading ([`EarlyFences`]), and
    /// those fences once sent.
    early_anchor: Option<u64>,
    early: Option<(u64, claim::Ahead)>,
    /// A contender whose lock write lost: it only fences early.
    loser: bool,
    /// Asked to release (SIGTERM): sends nothing more, and releases once
    /// its uploads are answered.
    draining: bool,
    role: Role,
    /// The lock said `released` when it was acquired.
    clean: bool,
    /// The lock was absent when it was acquired (deleted by hand).
    lock_was_absent: bool,
    /// The incarnation of the snapshot its claim started from.
    inc: u64,
    store: DynStore,
    faults: FaultHandle,
    phase: Phase,
    paused: bool,
    /// Not scheduled before this step of the run (a process stalled for a
    /// while, as a delete after its snapshot: see `Deleting::Snapshot`).
    stalled_until: usize,
    /// The state after its last commit.
    head: Position,
    /// Its acknowledged prefix: every slot up to `acked.seq` confirmed.
    acked: Position,
    /// Slots after `acked.seq`, up to `head.seq`.
    slots: BTreeMap<u64, Slot>,
    /// Slots it fenced in its claim (a delete keeps them).
    fenced_slots: BTreeSet<u64>,
    /// Answers to its PUTs, not yet handled.
    inbox: Vec<(u64, StoreResult<ETag>)>,
    /// The snapshot it last read or wrote.
    snapshot_etag: Option<ETag>,
    snapshot_seq: u64,
    compaction: Option<Compaction>,
    deleting: Option<Deleting>,
}

impl Writer {
    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Stopped(_))
    }

    fn active(&self) -> bool {
        matches!(self.phase, Phase::Active) && !self.paused
    }
}

/// A PUT of a log slot on its way to the store.
struct Request {
    writer: usize,
    seq: u64,
    body: Bytes,
    metadata: Metadata,
}

#[derive(Default)]
struct Checker {
    /// Every commit any writer made: digest -> (parent digest, increments,
    /// incarnation).
    commits: HashMap<u64, (u64, Vec<u64>, u64)>,
    attempted: usize,
    /// Acknowledged increments, with the incarnation they belong to.
    acked: Vec<(u64, u64)>,
    /// Acknowledged slots, with their incarnation.
    acked_slots: Vec<(u64, u64)>,
    /// Deleted incarnations, with the last slot their delete fenced.
    deleted: HashMap<u64, u64>,
    /// Digests recovered by completed claims, with their incarnation.
    recovered: Vec<(u64, u64)>,
    violations: Vec<String>,
}

impl Checker {
    /// Slot `seq` of incarnation `inc` is acknowledged; the violation, if
    /// a delete removed that incarnation after fencing below `seq`.
    fn acked_slot(&mut self, inc: u64, seq: u64) -> Option<String> {
        self.acked_slots.push((inc, seq));
        let fenced_to = *self.deleted.get(&inc)?;
        late_ack(inc, seq, fenced_to)
    }

    /// Incarnation `inc` was deleted by a delete that fenced up to
    /// `fenced_to`: a write of it acknowledged in a slot past those fences
    /// landed after the delete fenced, and went with the snapshot.
    fn life_deleted(&mut self, inc: u64, fenced_to: u64) -> Option<String> {
        self.deleted.insert(inc, fenced_to);
        self.acked_slots
            .iter()
            .filter(|(i, _)| *i == inc)
            .find_map(|&(_, seq)| late_ack(inc, seq, fenced_to))
    }

    /// The increments of the history ending at `digest`, oldest first,
    /// each with its incarnation.
    fn ids(&self, digest: u64) -> Result<Vec<(u64, u64)>, String> {
        let mut ids = vec![];
        let mut at = digest;
        while at != 0 {
            let (parent, added, inc) = self
                .commits
                .get(&at)
                .ok_or_else(|| format!("digest {at:016x} is no commit any writer made"))?;
            ids.extend(added.iter().rev().map(|id| (*id, *inc)));
            at = *parent;
        }
        ids.reverse();
        Ok(ids)
    }

    /// The checks a recovered state must pass: it is a history some
    /// writers of its incarnation made, holds each increment once, its
    /// counter is its increments, and it holds the first `acked_before`
    /// increments acknowledged in its incarnation.
    fn recovered(&mut self, who: &str, state: Position, acked_before: usize) {
        let ids = match self.ids(state.digest) {
            Ok(ids) => ids,
            Err(e) => return self.violations.push(format!("{who}: {e}")),
        };
        if let Some((id, inc)) = ids.iter().find(|(_, inc)| *inc != state.inc) {
            self.violations.push(format!(
                "{who}: increment {id} of the deleted incarnation {inc} is in incarnation {}",
                state.inc
            ));
        }
        let set: HashSet<u64> = ids.iter().map(|(id, _)| *id).collect();
        if set.len() != ids.len() {
            self.violations
                .push(format!("{who}: an increment is applied twice"));
        }
        if ids.len() as u64 != state.value {
            self.violations.push(format!(
                "{who}: counter {} but its history holds {} increments",
                state.value,
                ids.len()
            ));
        }
        let lost: Vec<u64> = self.acked[..acked_before.min(self.acked.len())]
            .iter()
            .filter(|(id, inc)| *inc == state.inc && !set.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if !lost.is_empty() {
            self.violations.push(format!(
                "{who}: recovered counter {} at slot {} without acknowledged increments {lost:?}",
                state.value, state.seq
            ));
        }
        self.recovered.push((state.digest, state.inc));
    }
}

struct Sim {
    config: LogSimConfig,
    rules: Rules,
    seed: u64,
    rng: StdRng,
    shared: Arc<MemoryStore>,
    /// Creation times of objects, shared by every writer's fault layer.
    times: WriteTimes,
    writers: Vec<Writer>,
    network: Vec<Request>,
    lock: Lock,
    /// The highest epoch any acquisition got.
    max_epoch: u64,
    next_id: u64,
    start: tokio::time::Instant,
    check: Checker,
    outcome: LogSimOutcome,
    /// Whether `db.sqlite3` exists (the tenant exists), and its
    /// incarnation: a delete and a creation start the next.
    exists: bool,
    incarnation: u64,
    /// How long LIST lags now (zero: current).
    lag: Duration,
    /// The run's current step.
    step: usize,
    /// Log keys some compaction deleted, and those seen again afterwards.
    deleted_keys: HashSet<String>,
    recreated_keys: HashSet<String>,
    /// Every release naming the log's end so far, `(epoch, end)`: what a
    /// contender with a stale read of the lock may plan on.
    releases_seen: Vec<(u64, u64)>,
}

impl Sim {
    fn new(seed: u64, config: LogSimConfig) -> Sim {
        Sim {
            config,
            rules: config.rules,
            seed,
            rng: StdRng::seed_from_u64(seed),
            shared: Arc::new(MemoryStore::new()),
            times: WriteTimes::default(),
            writers: vec![],
            network: vec![],
            lock: Lock::default(),
            max_epoch: 0,
            next_id: 0,
            start: tokio::time::Instant::now(),
            check: Checker::default(),
            outcome: LogSimOutcome::default(),
            exists: false,
            incarnation: 0,
            lag: Duration::ZERO,
            step: 0,
            deleted_keys: HashSet::new(),
            recreated_keys: HashSet::new(),
            releases_seen: vec![],
        }
    }

    async fn run(mut self) -> LogSimOutcome {
        self.create().await;
        self.takeover(Role::Holder);
        let paths = self.config.paths;
        for step in 0..self.config.steps {
            self.step = step;
            match self.rng.random_range(0..1000) {
                0..=249 => {
                    if let Some(w) = self.pick_live() {
                        self.batch(w);
                    }
                }
                250..=499 => self.deliver_one().await,
                500..=749 => {
                    if let Some(w) = self.pick_live() {
                        self.tick(w).await;
                    }
                }
                750..=799 => {
                    if let Some(w) = self.pick_live() {
                        self.start_compaction(w);
                    }
                }
                800..=809 => self.takeover(Role::Holder),
                810..=859 => {
                    if let Some(w) = self.pick_live() {
                        self.writers[w].paused ^= true;
                    }
                }
                860..=869 => {
                    if let Some(w) = self.pick_live() {
                        self.stop(w, "crashed");
                    }
                }
                870..=889 => {
                    // A compaction dies midway (the process restarted it
                    // later, or never).
                    if let Some(w) = self.pick_live() {
                        self.writers[w].compaction = None;
                    }
                }
                890..=899 if paths.release => self.release_newest().await,
                900 if paths.claim_failure => self.fail_a_claim(),
                901 if paths.restore => self.takeover(Role::Restore { wrote: false }),
                902 if paths.delete => self.takeover(Role::Delete),
                903..=919 if paths.delete => self.create().await,
                920..=921 if paths.lock_deleted => self.delete_lock(),
                922..=929 if paths.list_lag => self.toggle_lag(),
                930 if paths.bare_snapshot => self.strip_snapshot_metadata().await,
                931..=949 if paths.bare_snapshot => self.repair_snapshot().await,
                _ => {
                    let ms = self.rng.random_range(10..600);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            // No machine serves the tenant: the next request starts one
            // (soon, not at once: a refused tenant is not retried in a loop).
            if self.writers.iter().all(|w| !w.live()) && self.rng.random_range(0..10) == 0 {
                self.takeover(Role::Holder);
            }
        }
        self.drain().await;
        self.final_recovery().await;
        let mut outcome = self.outcome;
        outcome.violations = self.check.violations;
        outcome.attempted = self.check.attempted;
        outcome.acked = self.check.acked.len();
        outcome.recreated = self.recreated_keys.len();
        outcome
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A live writer: most often the newest (the holder as the cluster
    /// sees it), otherwise any, zombies included.
    fn pick_live(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.writers.len())
            .filter(|&w| self.writers[w].live())
            .collect();
        let newest = *live.last()?;
        Some(if self.rng.random_range(0..2) == 0 {
            newest
        } else {
            live[self.rng.random_range(0..live.len())]
        })
    }

    /// A fault layer over the shared store, sharing the write times, with
    /// the run's faults and the current lag.
    fn fault_store(&self, salt: u64, faults: bool) -> FaultStore {
        let config = FaultConfig {
            error_rate: if faults { 0.03 } else { 0.0 },
            lost_response_rate: if faults { 0.03 } else { 0.0 },
            late_apply_rate: if faults { 0.05 } else { 0.0 },
            late_apply_delay: LATE_APPLY,
            list_lag: self.lag,
            list_lag_prefix: keys::log_prefix(TENANT),
            ..FaultConfig::default()
        };
        FaultStore::seeded(
            self.shared.clone() as DynStore,
            config,
            self.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
        .with_write_times(self.times.clone())
    }

    /// Takes `machine.lock`: the next epoch, or with the lock deleted by
    /// hand 1 or an epoch some contender remembers (possibly the live
    /// holder's own).
    fn acquire(&mut self, token: u64) -> (u64, bool, bool, bool) {
        let ahead_safe = self.lock.present && self.lock.released && self.lock.log_end;
        let (epoch, clean, absent) = if self.lock.present {
            (self.lock.epoch + 1, self.lock.released, false)
        } else if self.max_epoch == 0 || self.rng.random_range(0..2) == 0 {
            (1, false, self.max_epoch > 0)
        } else {
            (self.rng.random_range(1..=self.max_epoch), false, true)
        };
        self.lock = Lock {
            present: true,
            epoch,
            token,
            released: false,
            log_end: false,
            end: 0,
        };
        self.max_epoch = self.max_epoch.max(epoch);
        (epoch, clean, absent, ahead_safe)
    }

    /// A writer of this acquisition starting at `step`, over its own
    /// fault layer unless `store` is given; returns its index.
    fn push_writer(
        &mut self,
        token: u64,
        epoch: u64,
        role: Role,
        store: Option<DynStore>,
        step: ClaimStep,
    ) -> usize {
        let fault = self.fault_store(token, true);
        let faults = fault.handle();
        self.writers.push(Writer {
            epoch,
            token,
            role,
            clean: false,
            lock_was_absent: false,
            ahead_safe: false,
            early_anchor: None,
            early: None,
            loser: false,
            draining: false,
            inc: self.incarnation,
            store: store.unwrap_or_else(|| Arc::new(fault)),
            faults,
            phase: Phase::Claiming(Box::new(step)),
            paused: false,
            stalled_until: 0,
            head: Position::default(),
            acked: Position::default(),
            slots: BTreeMap::new(),
            fenced_slots: BTreeSet::new(),
            inbox: vec![],
            snapshot_etag: None,
            snapshot_seq: 0,
            compaction: None,
            deleting: None,
        });
        self.writers.len() - 1
    }

    fn new_writer(&mut self, role: Role, store: Option<DynStore>) -> usize {
        let token = self.writers.len() as u64 + 1;
        let released_end = self.lock.end;
        let (epoch, clean, lock_was_absent, ahead_safe) = self.acquire(token);
        let early_anchor = (ahead_safe
            && role == Role::Holder
            && self.config.early_fences != EarlyFences::Off
            && self.config.fences
            && self.rules.probe_taken_slots
            && self.rules.strict_epochs
            && self.rules.always_fence
            && self.rng.random_bool(0.5))
        .then_some(released_end);
        let w = self.push_writer(token, epoch, role, store, ClaimStep::ReadSnapshot);
        let writer = &mut self.writers[w];
        writer.clean = clean;
        writer.lock_was_absent = lock_was_absent;
        writer.ahead_safe = ahead_safe;
        writer.early_anchor = early_anchor;
        if role == Role::Delete && !self.rules.delete_claims {
            // The old delete: no claim, straight to deleting.
            self.writers[w].phase = Phase::Active;
            self.writers[w].deleting = Some(Deleting::Check);
        }
        w
    }

    /// A new writer starts claiming; the current ones go on as zombies,
    /// one of them perhaps paused.
    fn takeover(&mut self, role: Role) {
        if !self.exists {
            return;
        }
        self.outcome.takeovers += 1;
        let live: Vec<usize> = (0..self.writers.len())
            .filter(|&w| self.writers[w].live())
            .collect();
        if live.len() >= MAX_LIVE_WRITERS {
            self.stop(live[0], "crashed");
        }
        // A machine's takeover often follows its predecessor's pause; a
        // restore or a delete is a process of its own.
        if let Some(&newest) = live.last()
            && role == Role::Holder
            && self.rng.random_range(0..2) == 0
        {
            self.writers[newest].paused = true;
        }
        if role == Role::Holder
            && self.config.early_fences != EarlyFences::Off
            && !self.releases_seen.is_empty()
            && self.rng.random_range(0..3) == 0
        {
            self.loser();
        }
        let w = self.new_writer(role, None);
        self.event(format!(
            "takeover: {role:?} epoch {} token {} starts claiming (lock {:?})",
            self.writers[w].epoch, self.writers[w].token, self.lock
        ));
    }

    /// A contender that read some release naming the log's end (perhaps
    /// long gone), planned the acquisition after it and fenced that end's
    /// window, and whose lock write then lost: its fences stay.
    fn loser(&mut self) {
        let (epoch, end) = self.releases_seen[self.rng.random_range(0..self.releases_seen.len())];
        let token = self.writers.len() as u64 + 1;
        let lose = ClaimStep::Lose {
            anchor: end,
            placed: 0,
        };
        let w = self.push_writer(token, epoch + 1, Role::Holder, None, lose);
        self.writers[w].loser = true;
        self.event(format!(
            "a contender planned epoch {} token {token} on the release ending at {end}, and will lose the lock race",
            epoch + 1
        ));
    }

    /// A batch of increments committed by writer `w`, if it is active and
    /// its window has room: the delta goes out at once. A restore writes
    /// one commit without increments.
    fn batch(&mut self, w: usize) {
        let committed_at_ms = self.now_ms();
        let writer = &self.writers[w];
        let in_window = if self.config.window_from_acked {
            writer.slots.len()
        } else {
            writer.slots.values().filter(|s| !s.confirmed).count()
        };
        if !writer.active()
            || in_window as u64 >= WINDOW
            || writer.deleting.is_some()
            || writer.draining
        {
            return;
        }
        let n = match writer.role {
            Role::Holder => self.rng.random_range(1..=3u64),
            Role::Restore { wrote: false } => 0,
            _ => return,
        };
        if let Role::Restore { .. } = writer.role {
            self.writers[w].role = Role::Restore { wrote: true };
        }
        let ids: Vec<u64> = (0..n).map(|i| self.next_id + i + 1).collect();
        self.next_id += n;
        self.check.attempted += ids.len();
        let writer = &self.writers[w];
        let head = writer.head;
        let seq = head.seq + 1;
        let after = Position {
            seq,
            value: head.value + n,
            digest: digest(head.digest, writer.epoch, seq, &ids),
            epoch: writer.epoch,
            inc: head.inc,
        };
        self.check
            .commits
            .insert(after.digest, (head.digest, ids.clone(), head.inc));
        let body = Delta {
            kind: Kind::Delta,
            epoch: writer.epoch,
            seq,
            committed_at_ms,
            page_size: PAGE_SIZE,
            db_pages: 1,
            pre_checksum: head.digest,
            post_checksum: after.digest,
            pages: vec![(1, counter_page(after.value))],
        }
        .encode()
        .expect("a counter delta has a page");
        let metadata = slot_metadata(writer.token, writer.epoch);
        let writer = &mut self.writers[w];
        writer.head = after;
        writer.slots.insert(
            seq,
            Slot {
                body: body.clone(),
                ids,
                after,
                confirmed: false,
            },
        );
        self.network.push(Request {
            writer: w,
            seq,
            body,
            metadata,
        });
    }

    /// The network delivers one request in flight, chosen at random: its
    /// PUT reaches the store through the sender's fault layer, paused or
    /// crashed as the sender may be, and the answer waits in its inbox.
    async fn deliver_one(&mut self) {
        if self.network.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.network.len());
        let request = self.network.swap_remove(i);
        self.event(format!(
            "network: slot {} of epoch {} reaches the store",
            request.seq, self.writers[request.writer].epoch
        ));
        let store = self.writers[request.writer].store.clone();
        let key = keys::log_slot(TENANT, request.seq);
        let result = store
            .put(&key, request.body, request.metadata, Precondition::IfAbsent)
            .await;
        if result.is_ok() && self.deleted_keys.contains(&key) {
            self.recreated_keys.insert(key);
        }
        self.writers[request.writer]
            .inbox
            .push((request.seq, result));
    }

    /// Writer `w` takes one step: of its claim, or handles an answer, or
    /// advances its compaction, release or delete.
    async fn tick(&mut self, w: usize) {
        if self.writers[w].paused || self.step < self.writers[w].stalled_until {
            return;
        }
        match self.writers[w].phase {
            Phase::Claiming(_) => self.claim_step(w).await,
            Phase::Active => {
                let has_answers = !self.writers[w].inbox.is_empty();
                if self.writers[w].deleting.is_some() {
                    self.delete_step(w).await;
                } else if has_answers
                    && (self.writers[w].compaction.is_none() || self.rng.random_range(0..2) == 0)
                {
                    self.handle_answer(w).await;
                } else if self.writers[w].compaction.is_some() {
                    self.compaction_step(w).await;
                } else if self.writers[w].role == (Role::Restore { wrote: true })
                    && self.writers[w].slots.is_empty()
                {
                    self.release(w).await;
                } else if self.writers[w].draining && self.writers[w].slots.is_empty() {
                    self.release_and_hand_off(w).await;
                }
            }
            Phase::Stopped(_) => {}
        }
    }

    async fn handle_answer(&mut self, w: usize) {
        let inbox = &mut self.writers[w].inbox;
        if inbox.is_empty() {
            return;
        }
        let (seq, result) = inbox.swap_remove(self.rng.random_range(0..inbox.len()));
        self.event(format!(
            "epoch {} token {}: answer for slot {seq}: {}",
            self.writers[w].epoch,
            self.writers[w].token,
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok")
        ));
        let writer = &self.writers[w];
        if !matches!(writer.phase, Phase::Active) || !writer.slots.contains_key(&seq) {
            return;
        }
        match result {
            Ok(_) => self.confirm(w, seq),
            Err(e) if e.is_precondition() => {
                // Our own write that landed late, or someone else's object.
                let store = writer.store.clone();
                match store.get(&keys::log_slot(TENANT, seq)).await {
                    Ok(Some(object)) if self.is_mine(w, seq, &object.body, &object.metadata) => {
                        self.confirm(w, seq)
                    }
                    Ok(_) => {
                        self.outcome.fenced += 1;
                        self.event(format!(
                            "epoch {}: slot {seq} is not its own: fenced",
                            self.writers[w].epoch
                        ));
                        self.stop(w, "fenced");
                    }
                    Err(_) => self.writers[w].inbox.push((seq, Err(e))),
                }
            }
            Err(_) => {
                let writer = &self.writers[w];
                let body = writer.slots[&seq].body.clone();
                let metadata = slot_metadata(writer.token, writer.epoch);
                self.network.push(Request {
                    writer: w,
                    seq,
                    body,
                    metadata,
                });
            }
        }
    }

    /// Whether the object in slot `seq` is writer `w`'s: its token (R4), or
    /// (the old rule) its epoch and slot number.
    fn is_mine(&self, w: usize, seq: u64, body: &[u8], metadata: &Metadata) -> bool {
        let writer = &self.writers[w];
        if self.rules.token_identity {
            token_of(metadata) == Some(writer.token)
        } else {
            Delta::decode(&keys::log_slot(TENANT, seq), body)
                .is_ok_and(|d| d.epoch == writer.epoch && d.seq == seq)
        }
    }

    /// Slot `seq` is in the store: acknowledge every commit whose slots up
    /// to it are all confirmed.
    fn confirm(&mut self, w: usize, seq: u64) {
        let writer = &mut self.writers[w];
        if let Some(slot) = writer.slots.get_mut(&seq) {
            slot.confirmed = true;
        }
        let mut acked = vec![];
        let mut late = vec![];
        let inc = writer.inc;
        while let Some(entry) = writer.slots.first_entry() {
            if !entry.get().confirmed {
                break;
            }
            let slot = entry.remove();
            writer.acked = slot.after;
            acked.push(format!(
                "epoch {} token {}: acknowledges slot {} ({:?})",
                writer.epoch, writer.token, slot.after.seq, slot.ids
            ));
            self.check
                .acked
                .extend(slot.ids.iter().map(|id| (*id, inc)));
            late.extend(self.check.acked_slot(inc, slot.after.seq));
        }
        for event in acked {
            self.event(event);
        }
        // Slots are acknowledged in order: the newest late one says it.
        if let Some(violation) = late.pop() {
            self.violation(violation);
        }
    }

    /// The end: every machine wakes, the store stops failing and lagging,
    /// late writes land, every request in flight is delivered and
    /// answered, an operator repairs a snapshot without metadata, and a
    /// deleted tenant is created again.
    async fn drain(&mut self) {
        self.lag = Duration::ZERO;
        for writer in &mut self.writers {
            writer.paused = false;
            writer.faults.set(FaultConfig::default());
            writer.compaction = None;
            if matches!(writer.phase, Phase::Claiming(_)) || writer.deleting.is_some() {
                writer.phase = Phase::Stopped("abandoned at the end");
            }
        }
        tokio::time::sleep(LATE_APPLY * 2).await;
        for _ in 0..10_000 {
            if self.network.is_empty() && self.writers.iter().all(|w| w.inbox.is_empty()) {
                break;
            }
            self.deliver_one().await;
            for w in 0..self.writers.len() {
                while !self.writers[w].inbox.is_empty() {
                    self.handle_answer(w).await;
                }
            }
        }
        if !self.network.is_empty() {
            self.violation("the network did not drain".into());
        }
        self.repair_snapshot().await;
        if self.rules.claims_read_tombstone {
            // What the claim's refusal asks of the operator.
            self.finish_abandoned_delete().await;
        }
        // The repair the old claim's error names: the lock put back with
        // the highest epoch (a restarted epoch below the log's otherwise
        // deposes every claim of the old rules for good).
        self.lock = Lock {
            present: true,
            epoch: self.lock.epoch.max(self.max_epoch),
            token: 0,
            released: false,
            log_end: false,
            end: 0,
        };
        if !self.exists {
            self.create().await;
        }
    }

    /// A writer recovers the log, under a LIST that hides every object of
    /// the run when [`Paths::final_under_lag`]: it must finish (R2), its
    /// state must hold every acknowledged increment, and every state
    /// recovered before in this incarnation must be a prefix of it.
    async fn final_recovery(&mut self) {
        let lag = if self.config.paths.final_under_lag {
            FINAL_LAG
        } else {
            Duration::ZERO
        };
        let store = self.fault_store(u64::MAX, false);
        store.handle().update(|c| c.list_lag = lag);
        // Whatever the lock says, the final writer fences.
        self.lock.released = false;
        let w = self.new_writer(Role::Final, Some(Arc::new(store)));
        for _ in 0..FINAL_STEPS {
            if !matches!(self.writers[w].phase, Phase::Claiming(_)) {
                break;
            }
            self.claim_step(w).await;
        }
        let writer = &self.writers[w];
        match writer.phase {
            Phase::Stopped(why) => {
                return self.violation(format!("the final recovery failed: {why}"));
            }
            Phase::Claiming(_) => {
                return self.violation(format!(
                    "the final recovery did not finish in {FINAL_STEPS} steps under a LIST lagging by {lag:?}"
                ));
            }
            Phase::Active => {}
        }
        self.outcome.recovered = writer.acked.value;
        let final_digest = writer.acked.digest;
        let final_inc = writer.inc;
        let mut history = HashSet::from([0u64]);
        let mut at = final_digest;
        while let Some((parent, _, _)) = self.check.commits.get(&at) {
            history.insert(at);
            at = *parent;
        }
        if let Some((other, _)) = self
            .check
            .recovered
            .iter()
            .find(|(d, inc)| *inc == final_inc && !history.contains(d))
        {
            self.violation(format!(
                "a claim recovered state {other:016x}, which is not a prefix of the final history"
            ));
        }
    }

    fn stop(&mut self, w: usize, why: &'static str) {
        self.event(format!(
            "epoch {} token {}: stops ({why})",
            self.writers[w].epoch, self.writers[w].token
        ));
        self.writers[w].phase = Phase::Stopped(why);
        self.writers[w].deleting = None;
    }

    fn event(&mut self, what: String) {
        if self.config.trace {
            self.outcome.trace.push(what);
        }
    }

    fn violation(&mut self, what: String) {
        self.event(format!("VIOLATION: {what}"));
        if self.check.violations.len() < 20 {
            self.check.violations.push(what);
        }
    }
}

/// The violation of a write of incarnation `inc` acknowledged in slot
/// `seq`, past the fences (up to `fenced_to`) of the delete that removed it.
fn late_ack(inc: u64, seq: u64, fenced_to: u64) -> Option<String> {
    (seq > fenced_to).then(|| {
        format!(
            "slot {seq} of incarnation {inc} was acknowledged after the delete that removed that incarnation fenced up to {fenced_to}"
        )
    })
}

/// A log object's metadata: the acquisition's token and epoch.
fn slot_metadata(token: u64, epoch: u64) -> Metadata {
    Metadata::from([
        (TOKEN_KEY.to_string(), token.to_string()),
        (EPOCH_KEY.to_string(), epoch.to_string()),
    ])
}

/// A snapshot's metadata: the format marker and the writer's token.
fn snapshot_metadata(token: u64) -> Metadata {
    Metadata::from([
        (FORMAT_KEY.to_string(), "log".to_string()),
        (TOKEN_KEY.to_string(), token.to_string()),
    ])
}

fn token_of(metadata: &Metadata) -> Option<u64> {
    metadata.get(TOKEN_KEY)?.parse().ok()
}

/// The digest of a commit: names its whole history, as the database
/// checksum does for real deltas.
fn digest(parent: u64, epoch: u64, seq: u64, ids: &[u64]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (parent, epoch, seq, ids).hash(&mut hasher);
    hasher.finish().max(1)
}

/// The model database's only page: the counter, big-endian, then zeros.
fn counter_page(value: u64) -> Bytes {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    page[..8].copy_from_slice(&value.to_be_bytes());
    Bytes::from(page)
}

fn counter_of(page: &[u8]) -> u64 {
    u64::from_be_bytes(page[..8].try_into().expect("a page of 512 bytes"))
}
