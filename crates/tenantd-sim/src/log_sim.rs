//! Deterministic model simulation of the commit-log protocol (issue 14):
//! one tenant, several writers that each believe they hold it, one shared
//! in-memory store, tokio's paused clock and one seeded RNG, so that a seed
//! is a reproducible schedule.
//!
//! The model keeps the protocol and drops SQLite: the database is a counter
//! with a digest standing in for the database checksum (each commit's
//! digest hashes its parent's, so a digest names one history). Log objects
//! are real [`Delta`]s (a one-page delta carrying the counter, pre/post
//! checksum = digest before/after) and real fences, under the real keys.
//!
//! - A writer commits a batch into slot `s` and PUTs it with `If-None-Match`
//!   only while every slot `<= s - WINDOW` is confirmed (at most `WINDOW`
//!   slots past its acknowledged prefix). A commit is acknowledged when it
//!   and every slot before it are confirmed. A 412 on its own slot is
//!   resolved by reading the object back: its own bytes (a write that
//!   landed late) confirm the slot, anything else means it was fenced: it
//!   stops and acknowledges nothing more.
//! - Requests are in flight independently: the network delivers them in
//!   any order, a machine's requests still land after it paused or
//!   crashed, and each writer's [`FaultStore`] loses responses, fails
//!   requests and applies some PUTs after telling the caller they failed.
//! - A takeover starts a writer with the next epoch while the old one goes
//!   on as a zombie (maybe paused). Its claim, one store request per step:
//!   read the snapshot, LIST the log after it, read the contiguous prefix
//!   `(S, P]`, replay it (objects of an epoch below the running maximum
//!   are a deposed writer's garbage; fences raise the maximum; a higher
//!   maximum than its own means it is deposed itself), fence every empty
//!   slot of `(P, P + WINDOW]` (any 412: start over), check that the
//!   snapshot is still the one it read (else a compaction may have deleted
//!   what it listed, and its fences may sit in deleted slots: start over),
//!   and write from `P + WINDOW + 1`. A slot listed more than `WINDOW`
//!   past the hole at `P + 1` is a gap only if the snapshot is unchanged.
//! - Compaction by any writer, abandoned at any step: write the snapshot of
//!   its acknowledged prefix (`If-Match` the ETag it knows; on 412 re-read
//!   and replace only an older one), then delete the log slots it covers,
//!   except fences. A zombie may re-create a deleted slot: it lies below
//!   the snapshot, where no reader looks, and the outcome counts those.
//!
//! The checker: every claim that completes recovers a state containing
//! every increment acknowledged before its last fence landed; at the end a clean writer recovers
//! the log, and its state holds every acknowledged increment, only
//! attempted ones, each once, and every state any claim recovered is a
//! prefix of it (one history). `fences: false`, `keep_fences: false`,
//! `window_from_acked: false` and `recheck: Never` are negative controls:
//! the simulation must find violations with each.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use tenantd_core::store::fault::FaultHandle;
use tenantd_core::store::{
    DynStore, ETag, FaultConfig, FaultStore, MemoryStore, Metadata, Precondition, StoreResult, keys,
};
use tenantd_core::tenant::delta::{Delta, FENCE_MAX_BYTES, Kind};

const TENANT: &str = "sim";
/// Slots a writer may have in flight past its acknowledged prefix.
pub const WINDOW: u64 = 4;
const PAGE_SIZE: u32 = 512;
/// Writers running at once (crashed ones aside); a takeover beyond this
/// crashes the oldest.
const MAX_LIVE_WRITERS: usize = 4;
/// The longest a late-applied PUT waits before it lands.
const LATE_APPLY: Duration = Duration::from_secs(10);

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
            steps: 1000,
            trace: false,
        }
    }
}

/// Whether a claim re-reads the snapshot's ETag once its fences landed. A
/// compaction writes the snapshot before it deletes the slots it covers,
/// so an unchanged ETag proves that nothing after the snapshot the claim
/// started from was deleted while it listed, read and fenced. Checked
/// after the fences, not before: a compaction between the check and the
/// fences could delete slots the fences then fill, under the old holder's
/// acknowledged commits (argued; this schedule has not produced it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recheck {
    /// The protocol.
    AfterFences,
    /// Never (negative control): the listing may miss slots a compaction
    /// deleted, and look like an older log or a log with a gap.
    Never,
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
    /// What happened, step by step, when [`LogSimConfig::trace`] is set.
    pub trace: Vec<String>,
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

/// A position in the history: the state after slot `seq`, and the highest
/// epoch of the history up to it (the snapshot object's body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    seq: u64,
    value: u64,
    digest: u64,
    epoch: u64,
}

struct Slot {
    body: Bytes,
    ids: Vec<u64>,
    after: Position,
    confirmed: bool,
}

enum Phase {
    Claiming(ClaimStep),
    Active,
    Stopped(&'static str),
}

/// Where a claim is; each step is one store request.
enum ClaimStep {
    ReadSnapshot,
    List {
        snap: Position,
        etag: Option<ETag>,
    },
    Read {
        snap: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        occupied: BTreeSet<u64>,
        objects: Vec<Delta>,
    },
    /// Re-reads the snapshot's ETag; then, by what is known: reports a
    /// gap, fences, or completes.
    Recheck {
        state: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        occupied: BTreeSet<u64>,
        /// A slot listed beyond the prefix end plus the window.
        gap: Option<u64>,
        fenced: bool,
        /// Increments acknowledged when the last fence landed: from then
        /// on no older holder can acknowledge anything the claim misses.
        acked_before: usize,
    },
    Fence {
        state: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        todo: Vec<u64>,
    },
}

impl ClaimStep {
    fn describe(&self) -> String {
        match self {
            ClaimStep::ReadSnapshot => "reads the snapshot".into(),
            ClaimStep::List { snap, .. } => format!("lists the log after slot {}", snap.seq),
            ClaimStep::Read {
                snap,
                prefix_end,
                objects,
                ..
            } => format!(
                "reads slot {} of the prefix ending at {prefix_end}",
                snap.seq + objects.len() as u64 + 1
            ),
            ClaimStep::Recheck {
                state, gap, fenced, ..
            } => {
                format!("rechecks the snapshot (recovered {state:?}, gap {gap:?}, fenced {fenced})")
            }
            ClaimStep::Fence { todo, .. } => format!("fences slot {:?}", todo.first()),
        }
    }
}

enum Compaction {
    Put {
        target: Position,
        condition: Precondition,
    },
    List {
        upto: u64,
    },
    Delete {
        keys: Vec<String>,
    },
}

impl Compaction {
    fn describe(&self) -> String {
        match self {
            Compaction::Put { target, .. } => format!("writes the snapshot {target:?}"),
            Compaction::List { upto } => format!("lists the log up to slot {upto}"),
            Compaction::Delete { keys } => format!("deletes {:?}", keys.last()),
        }
    }
}

struct Writer {
    epoch: u64,
    store: DynStore,
    faults: FaultHandle,
    phase: Phase,
    paused: bool,
    /// The state after its last commit.
    head: Position,
    /// Its acknowledged prefix: every slot up to `acked.seq` confirmed.
    acked: Position,
    /// Slots after `acked.seq`, up to `head.seq`.
    slots: std::collections::BTreeMap<u64, Slot>,
    /// Answers to its PUTs, not yet handled.
    inbox: Vec<(u64, StoreResult<ETag>)>,
    /// The snapshot it last read or wrote.
    snapshot_etag: Option<ETag>,
    snapshot_seq: u64,
    compaction: Option<Compaction>,
}

impl Writer {
    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Stopped(_))
    }
}

/// A PUT of a log slot on its way to the store.
struct Request {
    writer: usize,
    seq: u64,
    body: Bytes,
}

#[derive(Default)]
struct Checker {
    /// Every commit any writer made: digest -> (parent digest, increments).
    commits: HashMap<u64, (u64, Vec<u64>)>,
    attempted: usize,
    acked: Vec<u64>,
    /// Digests recovered by completed claims, in completion order.
    recovered: Vec<u64>,
    violations: Vec<String>,
}

impl Checker {
    /// The increments of the history ending at `digest`, oldest first.
    fn ids(&self, digest: u64) -> Result<Vec<u64>, String> {
        let mut ids = vec![];
        let mut at = digest;
        while at != 0 {
            let (parent, added) = self
                .commits
                .get(&at)
                .ok_or_else(|| format!("digest {at:016x} is no commit any writer made"))?;
            ids.extend(added.iter().rev());
            at = *parent;
        }
        ids.reverse();
        Ok(ids)
    }

    /// The checks a recovered state must pass: it is a history some
    /// writers made, holds each increment once, its counter is its
    /// increments, and it holds the first `acked_before` increments
    /// acknowledged (those acknowledged before the claim took hold).
    fn recovered(&mut self, who: &str, state: Position, acked_before: usize) {
        let ids = match self.ids(state.digest) {
            Ok(ids) => ids,
            Err(e) => return self.violations.push(format!("{who}: {e}")),
        };
        let set: HashSet<u64> = ids.iter().copied().collect();
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
        let lost: Vec<u64> = self.acked[..acked_before]
            .iter()
            .copied()
            .filter(|id| !set.contains(id))
            .collect();
        if !lost.is_empty() {
            self.violations.push(format!(
                "{who}: recovered counter {} at slot {} without acknowledged increments {lost:?}",
                state.value, state.seq
            ));
        }
        self.recovered.push(state.digest);
    }
}

struct Sim {
    config: LogSimConfig,
    seed: u64,
    rng: StdRng,
    shared: Arc<MemoryStore>,
    writers: Vec<Writer>,
    network: Vec<Request>,
    next_epoch: u64,
    next_id: u64,
    start: tokio::time::Instant,
    check: Checker,
    outcome: LogSimOutcome,
    /// Log keys some compaction deleted, and those seen again afterwards.
    deleted_keys: HashSet<String>,
    recreated_keys: HashSet<String>,
}

impl Sim {
    fn new(seed: u64, config: LogSimConfig) -> Sim {
        Sim {
            config,
            seed,
            rng: StdRng::seed_from_u64(seed),
            shared: Arc::new(MemoryStore::new()),
            writers: vec![],
            network: vec![],
            next_epoch: 0,
            next_id: 0,
            start: tokio::time::Instant::now(),
            check: Checker::default(),
            outcome: LogSimOutcome::default(),
            deleted_keys: HashSet::new(),
            recreated_keys: HashSet::new(),
        }
    }

    async fn run(mut self) -> LogSimOutcome {
        self.takeover();
        for _ in 0..self.config.steps {
            match self.rng.random_range(0..100) {
                0..=24 => {
                    if let Some(w) = self.pick_live() {
                        self.batch(w);
                    }
                }
                25..=49 => self.deliver_one().await,
                50..=74 => {
                    if let Some(w) = self.pick_live() {
                        self.tick(w).await;
                    }
                }
                75..=79 => {
                    if let Some(w) = self.pick_live() {
                        self.start_compaction(w);
                    }
                }
                80 => self.takeover(),
                81..=85 => {
                    if let Some(w) = self.pick_live() {
                        self.writers[w].paused ^= true;
                    }
                }
                86 => {
                    if let Some(w) = self.pick_live() {
                        self.writers[w].phase = Phase::Stopped("crashed");
                    }
                }
                87..=88 => {
                    // A compaction dies midway (the process restarted it
                    // later, or never).
                    if let Some(w) = self.pick_live() {
                        self.writers[w].compaction = None;
                    }
                }
                _ => {
                    let ms = self.rng.random_range(10..600);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            if self.writers.iter().all(|w| !w.live()) {
                self.takeover();
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

    fn new_writer(&mut self, store: Option<DynStore>) -> usize {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let fault = FaultStore::seeded(
            self.shared.clone() as DynStore,
            FaultConfig {
                error_rate: 0.03,
                lost_response_rate: 0.03,
                late_apply_rate: 0.05,
                late_apply_delay: LATE_APPLY,
                ..FaultConfig::default()
            },
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let faults = fault.handle();
        self.writers.push(Writer {
            epoch,
            store: store.unwrap_or_else(|| Arc::new(fault)),
            faults,
            phase: Phase::Claiming(ClaimStep::ReadSnapshot),
            paused: false,
            head: Position::default(),
            acked: Position::default(),
            slots: Default::default(),
            inbox: vec![],
            snapshot_etag: None,
            snapshot_seq: 0,
            compaction: None,
        });
        self.writers.len() - 1
    }

    /// A new writer with the next epoch starts claiming; the current ones
    /// go on as zombies, one of them perhaps paused.
    fn takeover(&mut self) {
        self.outcome.takeovers += 1;
        self.event(format!(
            "takeover: epoch {} starts claiming",
            self.next_epoch + 1
        ));
        let live: Vec<usize> = (0..self.writers.len())
            .filter(|&w| self.writers[w].live())
            .collect();
        if live.len() >= MAX_LIVE_WRITERS {
            self.writers[live[0]].phase = Phase::Stopped("crashed");
        }
        if let Some(&newest) = live.last()
            && self.rng.random_range(0..2) == 0
        {
            self.writers[newest].paused = true;
        }
        self.new_writer(None);
    }

    /// A batch of increments committed by writer `w`, if it is active and
    /// its window has room: the delta goes out at once.
    fn batch(&mut self, w: usize) {
        let committed_at_ms = self.now_ms();
        let n = self.rng.random_range(1..=3u64);
        let writer = &self.writers[w];
        let in_window = if self.config.window_from_acked {
            writer.slots.len()
        } else {
            writer.slots.values().filter(|s| !s.confirmed).count()
        };
        if !matches!(writer.phase, Phase::Active) || writer.paused || in_window as u64 >= WINDOW {
            return;
        }
        let ids: Vec<u64> = (0..n).map(|i| self.next_id + i + 1).collect();
        self.next_id += n;
        self.check.attempted += ids.len();
        let head = writer.head;
        let seq = head.seq + 1;
        let after = Position {
            seq,
            value: head.value + n,
            digest: digest(head.digest, writer.epoch, seq, &ids),
            epoch: writer.epoch,
        };
        self.check
            .commits
            .insert(after.digest, (head.digest, ids.clone()));
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
        let result = store
            .put(
                &keys::log_slot(TENANT, request.seq),
                request.body,
                Metadata::new(),
                Precondition::IfAbsent,
            )
            .await;
        self.writers[request.writer]
            .inbox
            .push((request.seq, result));
    }

    /// Writer `w` takes one step: of its claim, or handles an answer, or
    /// advances its compaction.
    async fn tick(&mut self, w: usize) {
        if self.writers[w].paused {
            return;
        }
        match self.writers[w].phase {
            Phase::Claiming(_) => self.claim_step(w).await,
            Phase::Active => {
                let has_answers = !self.writers[w].inbox.is_empty();
                if has_answers
                    && (self.writers[w].compaction.is_none() || self.rng.random_range(0..2) == 0)
                {
                    self.handle_answer(w).await;
                } else {
                    self.compaction_step(w).await;
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
            "epoch {}: answer for slot {seq}: {}",
            self.writers[w].epoch,
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok")
        ));
        let writer = &self.writers[w];
        if !matches!(writer.phase, Phase::Active) {
            return;
        }
        let Some(slot) = writer.slots.get(&seq) else {
            return;
        };
        match result {
            Ok(_) => self.confirm(w, seq),
            Err(e) if e.is_precondition() => {
                // Our own write that landed late, or someone else's object.
                let store = writer.store.clone();
                let body = slot.body.clone();
                match store.get(&keys::log_slot(TENANT, seq)).await {
                    Ok(Some(object)) if object.body == body => self.confirm(w, seq),
                    Ok(_) => {
                        self.outcome.fenced += 1;
                        self.writers[w].phase = Phase::Stopped("fenced");
                    }
                    Err(_) => self.writers[w].inbox.push((seq, Err(e))),
                }
            }
            Err(_) => {
                let body = slot.body.clone();
                self.network.push(Request {
                    writer: w,
                    seq,
                    body,
                });
            }
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
        while let Some(entry) = writer.slots.first_entry() {
            if !entry.get().confirmed {
                break;
            }
            let slot = entry.remove();
            writer.acked = slot.after;
            acked.push(format!(
                "epoch {}: acknowledges slot {} ({:?})",
                writer.epoch, slot.after.seq, slot.ids
            ));
            self.check.acked.extend(slot.ids);
        }
        for event in acked {
            self.event(event);
        }
    }

    async fn claim_step(&mut self, w: usize) {
        let Phase::Claiming(step) =
            std::mem::replace(&mut self.writers[w].phase, Phase::Stopped("claiming"))
        else {
            return;
        };
        let store = self.writers[w].store.clone();
        let epoch = self.writers[w].epoch;
        let db_key = keys::database(TENANT);
        self.event(format!("epoch {epoch}: claim {}", step.describe()));
        let next = match step {
            ClaimStep::ReadSnapshot => match store.get(&db_key).await {
                Ok(Some(object)) => match serde_json::from_slice::<Position>(&object.body) {
                    Ok(snap) => ClaimStep::List {
                        snap,
                        etag: Some(object.etag),
                    },
                    Err(e) => {
                        self.violation(format!("the snapshot is unreadable: {e}"));
                        return self.stop(w, "unreadable snapshot");
                    }
                },
                Ok(None) => ClaimStep::List {
                    snap: Position::default(),
                    etag: None,
                },
                Err(_) => ClaimStep::ReadSnapshot,
            },
            ClaimStep::List { snap, etag } => {
                let after = keys::log_slot(TENANT, snap.seq);
                match store.list(&keys::log_prefix(TENANT), Some(&after)).await {
                    Ok(listed) => {
                        let occupied: BTreeSet<u64> = listed
                            .iter()
                            .filter_map(|l| keys::log_seq(&l.key))
                            .collect();
                        let mut prefix_end = snap.seq;
                        while occupied.contains(&(prefix_end + 1)) {
                            prefix_end += 1;
                        }
                        // No holder leaves a wider hole: corrupt, unless a
                        // compaction deleted slots under the listing.
                        let gap = occupied.range(prefix_end + WINDOW + 1..).next().copied();
                        if gap.is_some() {
                            ClaimStep::Recheck {
                                state: snap,
                                etag,
                                prefix_end,
                                occupied,
                                gap,
                                fenced: false,
                                acked_before: 0,
                            }
                        } else {
                            ClaimStep::Read {
                                snap,
                                etag,
                                prefix_end,
                                occupied,
                                objects: vec![],
                            }
                        }
                    }
                    Err(_) => ClaimStep::List { snap, etag },
                }
            }
            ClaimStep::Read {
                snap,
                etag,
                prefix_end,
                occupied,
                mut objects,
            } => {
                let seq = snap.seq + objects.len() as u64 + 1;
                if seq > prefix_end {
                    let Some(state) = self.replay(w, snap, &objects) else {
                        return;
                    };
                    let state = Position {
                        seq: prefix_end,
                        ..state
                    };
                    self.fence_or_recheck(state, etag, prefix_end, &occupied)
                } else {
                    let key = keys::log_slot(TENANT, seq);
                    match store.get(&key).await {
                        Ok(Some(object)) => match Delta::decode(&key, &object.body) {
                            Ok(delta) => {
                                objects.push(delta);
                                ClaimStep::Read {
                                    snap,
                                    etag,
                                    prefix_end,
                                    occupied,
                                    objects,
                                }
                            }
                            Err(e) => {
                                self.violation(e.to_string());
                                return self.stop(w, "corrupt log");
                            }
                        },
                        // Deleted by a compaction since the listing.
                        Ok(None) => ClaimStep::ReadSnapshot,
                        Err(_) => ClaimStep::Read {
                            snap,
                            etag,
                            prefix_end,
                            occupied,
                            objects,
                        },
                    }
                }
            }
            ClaimStep::Recheck {
                state,
                etag,
                prefix_end,
                occupied,
                gap,
                fenced,
                acked_before,
            } => {
                let unchanged = match self.config.recheck {
                    Recheck::Never => Ok(true),
                    _ => store
                        .head(&db_key)
                        .await
                        .map(|current| current.as_ref().map(|m| &m.etag) == etag.as_ref()),
                };
                match unchanged {
                    Ok(true) => {
                        if let Some(beyond) = gap {
                            self.violation(format!(
                                "claim by epoch {epoch}: slot {beyond} is in the log beyond the prefix end {prefix_end} + window {WINDOW}"
                            ));
                            return self.stop(w, "gap");
                        }
                        if fenced {
                            return self.complete_claim(w, state, etag, prefix_end, acked_before);
                        }
                        self.fence_or_recheck(state, etag, prefix_end, &occupied)
                    }
                    // A compaction replaced the snapshot: what was listed
                    // may be gone, and fences may sit in deleted slots
                    // (below the new snapshot, where they are harmless).
                    Ok(false) => ClaimStep::ReadSnapshot,
                    Err(_) => ClaimStep::Recheck {
                        state,
                        etag,
                        prefix_end,
                        occupied,
                        gap,
                        fenced,
                        acked_before,
                    },
                }
            }
            ClaimStep::Fence {
                state,
                etag,
                prefix_end,
                mut todo,
            } => {
                let seq = todo[0];
                let fence = Delta::fence(epoch, seq, self.now_ms())
                    .encode()
                    .expect("a fence has no pages to miss");
                match store
                    .put(
                        &keys::log_slot(TENANT, seq),
                        fence,
                        Metadata::new(),
                        Precondition::IfAbsent,
                    )
                    .await
                {
                    Ok(_) => {
                        todo.remove(0);
                    }
                    Err(e) if e.is_precondition() => {
                        self.writers[w].phase = Phase::Claiming(ClaimStep::ReadSnapshot);
                        return;
                    }
                    Err(_) => {}
                }
                if todo.is_empty() {
                    ClaimStep::Recheck {
                        state,
                        etag,
                        prefix_end,
                        occupied: BTreeSet::new(),
                        gap: None,
                        fenced: true,
                        acked_before: self.check.acked.len(),
                    }
                } else {
                    ClaimStep::Fence {
                        state,
                        etag,
                        prefix_end,
                        todo,
                    }
                }
            }
        };
        self.writers[w].phase = Phase::Claiming(next);
    }

    /// The next step once the log is read (and, if wanted, rechecked):
    /// fence the empty slots of the window, or go on without fences.
    fn fence_or_recheck(
        &mut self,
        state: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        occupied: &BTreeSet<u64>,
    ) -> ClaimStep {
        let todo: Vec<u64> = if self.config.fences {
            (prefix_end + 1..=prefix_end + WINDOW)
                .filter(|s| !occupied.contains(s))
                .collect()
        } else {
            vec![]
        };
        if todo.is_empty() {
            ClaimStep::Recheck {
                state,
                etag,
                prefix_end,
                occupied: BTreeSet::new(),
                gap: None,
                fenced: true,
                acked_before: self.check.acked.len(),
            }
        } else {
            ClaimStep::Fence {
                state,
                etag,
                prefix_end,
                todo,
            }
        }
    }

    /// The claim holds from its last store request on: the writer is active
    /// from the slot after the window.
    fn complete_claim(
        &mut self,
        w: usize,
        state: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        acked_before: usize,
    ) {
        let epoch = self.writers[w].epoch;
        let start = Position {
            seq: prefix_end + WINDOW,
            epoch,
            ..state
        };
        let writer = &mut self.writers[w];
        writer.head = start;
        writer.acked = start;
        writer.snapshot_etag = etag;
        writer.snapshot_seq = prefix_end;
        writer.phase = Phase::Active;
        self.outcome.claims += 1;
        self.check
            .recovered(&format!("claim by epoch {epoch}"), state, acked_before);
    }

    /// The state after the snapshot and the log prefix read by a claim, or
    /// `None` when the writer stopped (deposed, or a broken chain).
    fn replay(&mut self, w: usize, snap: Position, objects: &[Delta]) -> Option<Position> {
        let epoch = self.writers[w].epoch;
        let mut state = snap;
        for delta in objects {
            match delta.kind {
                Kind::Fence => state.epoch = state.epoch.max(delta.epoch),
                Kind::Delta if delta.epoch < state.epoch => self.outcome.garbage_skipped += 1,
                Kind::Delta => {
                    if delta.pre_checksum != state.digest {
                        self.violation(format!(
                            "claim by epoch {epoch}: slot {} (epoch {}) does not follow the history before it (checksum {:016x}, expected {:016x})",
                            delta.seq, delta.epoch, delta.pre_checksum, state.digest
                        ));
                        self.stop(w, "broken chain");
                        return None;
                    }
                    state = Position {
                        seq: delta.seq,
                        value: counter_of(&delta.pages[0].1),
                        digest: delta.post_checksum,
                        epoch: delta.epoch,
                    };
                }
            }
        }
        if state.epoch > epoch {
            self.outcome.deposed += 1;
            self.stop(w, "deposed");
            return None;
        }
        Some(state)
    }

    fn start_compaction(&mut self, w: usize) {
        let writer = &mut self.writers[w];
        if !matches!(writer.phase, Phase::Active)
            || writer.paused
            || writer.compaction.is_some()
            || writer.acked.seq <= writer.snapshot_seq
        {
            return;
        }
        writer.compaction = Some(Compaction::Put {
            target: writer.acked,
            condition: writer
                .snapshot_etag
                .clone()
                .map_or(Precondition::IfAbsent, Precondition::IfMatch),
        });
    }

    async fn compaction_step(&mut self, w: usize) {
        let Some(step) = self.writers[w].compaction.take() else {
            return;
        };
        let store = self.writers[w].store.clone();
        let db_key = keys::database(TENANT);
        let epoch = self.writers[w].epoch;
        self.event(format!("epoch {epoch}: compaction {}", step.describe()));
        let next = match step {
            Compaction::Put { target, condition } => {
                let body = Bytes::from(serde_json::to_vec(&target).expect("serializes"));
                match store.put(&db_key, body, Metadata::new(), condition).await {
                    Ok(etag) => {
                        self.outcome.snapshots += 1;
                        let writer = &mut self.writers[w];
                        writer.snapshot_etag = Some(etag);
                        writer.snapshot_seq = target.seq;
                        Some(Compaction::List { upto: target.seq })
                    }
                    Err(e) if e.is_precondition() => match store.get(&db_key).await {
                        Ok(Some(object)) => {
                            let current = serde_json::from_slice::<Position>(&object.body)
                                .map(|p| p.seq)
                                .unwrap_or(0);
                            if current < target.seq {
                                Some(Compaction::Put {
                                    target,
                                    condition: Precondition::IfMatch(object.etag),
                                })
                            } else {
                                let writer = &mut self.writers[w];
                                writer.snapshot_etag = Some(object.etag);
                                writer.snapshot_seq = current;
                                None
                            }
                        }
                        Ok(None) => Some(Compaction::Put {
                            target,
                            condition: Precondition::IfAbsent,
                        }),
                        Err(_) => None,
                    },
                    // It may land later: delete nothing on an unknown outcome.
                    Err(_) => None,
                }
            }
            Compaction::List { upto } => match store.list(&keys::log_prefix(TENANT), None).await {
                Ok(listed) => {
                    for l in &listed {
                        if self.deleted_keys.contains(&l.key) {
                            self.recreated_keys.insert(l.key.clone());
                        }
                    }
                    let keep_fences = self.config.keep_fences;
                    let keys = listed
                        .into_iter()
                        .filter(|l| keys::log_seq(&l.key).is_some_and(|s| s <= upto))
                        .filter(|l| l.size > FENCE_MAX_BYTES || !keep_fences)
                        .map(|l| l.key)
                        .collect();
                    Some(Compaction::Delete { keys })
                }
                Err(_) => None,
            },
            Compaction::Delete { mut keys } => {
                if let Some(key) = keys.pop()
                    && store.delete(&key).await.is_ok()
                {
                    self.outcome.deleted += 1;
                    self.deleted_keys.insert(key);
                }
                (!keys.is_empty()).then_some(Compaction::Delete { keys })
            }
        };
        self.writers[w].compaction = next;
    }

    /// The end: every machine wakes, the store stops failing, late writes
    /// land, and every request in flight is delivered and answered.
    async fn drain(&mut self) {
        for writer in &mut self.writers {
            writer.paused = false;
            writer.faults.set(FaultConfig::default());
            writer.compaction = None;
            if matches!(writer.phase, Phase::Claiming(_)) {
                writer.phase = Phase::Stopped("claim abandoned");
            }
        }
        tokio::time::sleep(LATE_APPLY * 2).await;
        for _ in 0..10_000 {
            if self.network.is_empty() && self.writers.iter().all(|w| w.inbox.is_empty()) {
                return;
            }
            self.deliver_one().await;
            for w in 0..self.writers.len() {
                while !self.writers[w].inbox.is_empty() {
                    self.handle_answer(w).await;
                }
            }
        }
        self.violation("the network did not drain".into());
    }

    /// A clean writer recovers the log; its state must hold every
    /// acknowledged increment, and every state recovered before must be a
    /// prefix of it.
    async fn final_recovery(&mut self) {
        let w = self.new_writer(Some(self.shared.clone() as DynStore));
        for _ in 0..10_000 {
            if !matches!(self.writers[w].phase, Phase::Claiming(_)) {
                break;
            }
            self.claim_step(w).await;
        }
        let writer = &self.writers[w];
        if let Phase::Stopped(why) = writer.phase {
            self.violation(format!("the final recovery failed: {why}"));
            return;
        }
        self.outcome.recovered = writer.acked.value;
        let final_digest = writer.acked.digest;
        let mut history = HashSet::from([0u64]);
        let mut at = final_digest;
        while let Some((parent, _)) = self.check.commits.get(&at) {
            history.insert(at);
            at = *parent;
        }
        if let Some(other) = self.check.recovered.iter().find(|d| !history.contains(d)) {
            self.violation(format!(
                "a claim recovered state {other:016x}, which is not a prefix of the final history"
            ));
        }
    }

    fn stop(&mut self, w: usize, why: &'static str) {
        self.writers[w].phase = Phase::Stopped(why);
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
