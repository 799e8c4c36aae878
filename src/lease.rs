//! The `machine.lock` lease: which machine may write a tenant's database.
//!
//! Protocol (DESIGN.md):
//! - Acquire an absent lock with `If-None-Match: *`, a released or stale one
//!   with `If-Match: <etag seen>`; the new epoch is the old one + 1. The
//!   store's conditional write lets exactly one contender win.
//! - Renew every ttl/3 with `If-Match: <own last etag>`. Every renewal
//!   changes `renewed_at`, so the bytes and the ETag change.
//! - Self-fencing: the holder stops claiming the lease at `S + ttl - margin`,
//!   where `S` is the *send* time of its last successful write of the lock.
//! - Stale: a contender may take over a lock only after it has seen the same
//!   ETag for a full ttl on its own monotonic clock (or at once when the
//!   lock's `renewed_at` is older than ttl + a clock-skew allowance).
//!
//! Why two machines are never both valid holders: a contender first sees an
//! ETag after the holder sent the write that made it, at `S' >= S`, and
//! takes over no earlier than `S' + ttl`, while the holder's claim ended at
//! `S + ttl - margin < S' + ttl` (monotonic clocks may differ in rate by far
//! less than `margin`). A holder that renewed in between changed the ETag,
//! which restarts the contender's observation. The database object is also
//! fenced by its own ETag chain (see `tenant::actor`), so even a holder that
//! outlives its claim cannot overwrite its successor's writes.
//!
//! A lock object that cannot be parsed is treated as held by an unknown
//! machine: it is only taken over by the observation rule. A lock naming
//! this machine's own id is taken over at once unless this process holds
//! it through a live [`Lease`]: it was left by an earlier, crashed process
//! of the same machine (machine ids are unique per process), or by an
//! acquisition of this process whose lease has ended. A lease ends only
//! after its holder has settled every upload it made, and every database
//! write is fenced by the ETag chain anyway, so retaking it at once spares
//! the tenant a ttl-long outage and risks nothing.

use std::fmt::Debug;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::store::{DynStore, ETag, Metadata, Precondition, StoreError, StoreResult};

/// Wall-clock time, injectable so that tests control `renewed_at`.
pub trait WallClock: Send + Sync + Debug {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub machine_id: String,
    /// Address written into the lock so that others can reach the holder.
    pub addr: String,
    pub ttl: Duration,
    /// The holder stops claiming the lease this long before a contender
    /// could take it over.
    pub margin: Duration,
    /// A lock whose `renewed_at` is older than ttl + this may be taken at once.
    pub skew_allowance: Duration,
    pub wall_clock: Arc<dyn WallClock>,
}

impl LeaseConfig {
    pub fn new(machine_id: impl Into<String>, addr: impl Into<String>, ttl: Duration) -> Self {
        LeaseConfig {
            machine_id: machine_id.into(),
            addr: addr.into(),
            ttl,
            margin: ttl / 5,
            skew_allowance: Duration::from_secs(30),
            wall_clock: Arc::new(SystemWallClock),
        }
    }

    fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }
}

/// The JSON content of `machine.lock` (contract). Unknown fields are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockRecord {
    pub holder: String,
    pub addr: String,
    pub epoch: u64,
    pub token: Uuid,
    pub ttl_ms: u64,
    pub renewed_at: DateTime<Utc>,
    pub released: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl LockRecord {
    fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("lock records serialize"))
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// The lock as read from the store.
#[derive(Clone, Debug)]
pub enum LockState {
    Absent,
    Held { record: LockRecord, etag: ETag },
    Released { record: LockRecord, etag: ETag },
    Unparsable { etag: ETag },
}

pub async fn read_lock(store: &DynStore, key: &str) -> StoreResult<LockState> {
    let Some(object) = store.get(key).await? else {
        return Ok(LockState::Absent);
    };
    Ok(match serde_json::from_slice::<LockRecord>(&object.body) {
        Ok(record) if record.released => LockState::Released {
            record,
            etag: object.etag,
        },
        Ok(record) => LockState::Held {
            record,
            etag: object.etag,
        },
        Err(e) => {
            warn!(key, error = %e, "lock object cannot be parsed; treating it as held by an unknown machine");
            LockState::Unparsable { etag: object.etag }
        }
    })
}

/// The outcome of one acquisition attempt.
// Short-lived and moved once: boxing the lease would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Acquire {
    Acquired(Lease),
    /// Held by a live (or not yet provably dead) machine; it may be taken
    /// over in `stale_in` if it stays unchanged.
    HeldBy {
        record: LockRecord,
        stale_in: Duration,
    },
    /// The lock cannot be parsed; it may be taken over in `stale_in`.
    Unknown {
        stale_in: Duration,
    },
}

/// A machine that wants the lease. Remembers what it has seen of the lock
/// (ETag and when it first saw it) across attempts, for the stale rule.
pub struct Contender {
    store: DynStore,
    key: String,
    config: LeaseConfig,
    observed: Option<(ETag, Instant)>,
    /// Highest epoch seen, so that a takeover of an unparsable lock still
    /// continues the sequence as far as this machine knows it.
    max_epoch: u64,
    /// Tokens of this contender's acquisitions, each with a handle that
    /// lives as long as its [`Lease`] (dead for an attempt whose answer was
    /// lost): a lock carrying a live one is this process's current lease.
    own_tokens: Vec<(Uuid, Weak<()>)>,
}

impl Contender {
    pub fn new(store: DynStore, key: String, config: LeaseConfig) -> Contender {
        Contender {
            store,
            key,
            config,
            observed: None,
            max_epoch: 0,
            own_tokens: Vec::new(),
        }
    }

    /// How long this contender has seen `etag` unchanged.
    fn observe(&mut self, etag: &ETag) -> Duration {
        match &self.observed {
            Some((seen, since)) if seen == etag => since.elapsed(),
            _ => {
                self.observed = Some((etag.clone(), Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// One attempt: reads the lock and acquires it if absent, released or
    /// stale. Never waits.
    pub async fn try_acquire(&mut self) -> StoreResult<Acquire> {
        let state = read_lock(&self.store, &self.key).await?;
        self.decide(state, true).await
    }

    async fn decide(&mut self, state: LockState, may_write: bool) -> StoreResult<Acquire> {
        match state {
            LockState::Absent => {
                self.observed = None;
                if !may_write {
                    return Ok(Acquire::Unknown {
                        stale_in: Duration::ZERO,
                    });
                }
                self.attempt(Precondition::IfAbsent, self.max_epoch + 1, None)
                    .await
            }
            LockState::Released { record, etag } => {
                self.max_epoch = self.max_epoch.max(record.epoch);
                self.observed = None;
                if !may_write {
                    return Ok(Acquire::HeldBy {
                        record,
                        stale_in: Duration::ZERO,
                    });
                }
                let epoch = record.epoch.max(self.max_epoch) + 1;
                self.attempt(Precondition::IfMatch(etag), epoch, Some(record))
                    .await
            }
            LockState::Held { record, etag } => {
                self.max_epoch = self.max_epoch.max(record.epoch);
                let ttl = record.ttl().max(self.config.ttl);
                let seen_for = self.observe(&etag);
                let age = self
                    .config
                    .wall_clock
                    .now()
                    .signed_duration_since(record.renewed_at)
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                // A record naming this machine but no live lease of this
                // process was written by an earlier process of it (machine
                // ids are unique per process: Fly runs one per machine),
                // which is gone, or by a lease of ours that has ended: no
                // need to wait it out.
                let live_here = self
                    .own_tokens
                    .iter()
                    .any(|(token, alive)| *token == record.token && alive.strong_count() > 0);
                let ours = record.holder == self.config.machine_id && !live_here;
                let stale = ours || seen_for >= ttl || age > ttl + self.config.skew_allowance;
                if stale && may_write {
                    info!(key = %self.key, holder = %record.holder, epoch = record.epoch, ?seen_for, ?age, "lock is stale; taking over");
                    let epoch = record.epoch.max(self.max_epoch) + 1;
                    return self
                        .attempt(Precondition::IfMatch(etag), epoch, Some(record))
                        .await;
                }
                Ok(Acquire::HeldBy {
                    stale_in: ttl.saturating_sub(seen_for),
                    record,
                })
            }
            LockState::Unparsable { etag } => {
                let seen_for = self.observe(&etag);
                if seen_for >= self.config.ttl && may_write {
                    warn!(key = %self.key, "unparsable lock unchanged for a full ttl; taking over");
                    return self
                        .attempt(Precondition::IfMatch(etag), self.max_epoch + 1, None)
                        .await;
                }
                Ok(Acquire::Unknown {
                    stale_in: self.config.ttl.saturating_sub(seen_for),
                })
            }
        }
    }

    async fn attempt(
        &mut self,
        condition: Precondition,
        epoch: u64,
        previous: Option<LockRecord>,
    ) -> StoreResult<Acquire> {
        let record = LockRecord {
            holder: self.config.machine_id.clone(),
            addr: self.config.addr.clone(),
            epoch,
            token: Uuid::new_v4(),
            ttl_ms: self.config.ttl.as_millis() as u64,
            renewed_at: self.config.wall_clock.now(),
            released: false,
            extra: Default::default(),
        };
        // Remembered before sending: if the write lands but its answer is
        // lost, the lock is still recognised as this process's own (and,
        // with no lease alive, taken back at once).
        self.own_tokens
            .retain(|(_, alive)| alive.strong_count() > 0);
        self.own_tokens.push((record.token, Weak::new()));
        let sent_at = Instant::now();
        match self
            .store
            .put(&self.key, record.to_bytes(), Metadata::new(), condition)
            .await
        {
            Ok(etag) => {
                self.observed = None;
                self.max_epoch = epoch;
                info!(key = %self.key, epoch, holder = %record.holder, "lease acquired");
                let alive = Arc::new(());
                if let Some(entry) = self.own_tokens.iter_mut().find(|(t, _)| *t == record.token) {
                    entry.1 = Arc::downgrade(&alive);
                }
                Ok(Acquire::Acquired(Lease::start(
                    self.store.clone(),
                    self.key.clone(),
                    self.config.clone(),
                    record,
                    etag,
                    sent_at,
                    previous,
                    alive,
                )))
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                // Another contender won: report what it wrote.
                debug!(key = %self.key, "lost the race for the lease");
                let state = read_lock(&self.store, &self.key).await?;
                Box::pin(self.decide(state, false)).await
            }
            Err(e) => Err(e),
        }
    }

    /// Tries until acquired or `until` passes, polling every ttl/3 (or
    /// sooner when the lock becomes stale sooner).
    pub async fn acquire_until(&mut self, until: Instant) -> StoreResult<Acquire> {
        loop {
            let outcome = self.try_acquire().await?;
            let wait = match &outcome {
                Acquire::Acquired(_) => return Ok(outcome),
                Acquire::HeldBy { stale_in, .. } | Acquire::Unknown { stale_in } => (*stale_in)
                    .min(self.config.renew_interval())
                    .max(Duration::from_millis(10)),
            };
            if Instant::now() + wait > until {
                return Ok(outcome);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// What the renewal task tells the lease's owner.
#[derive(Clone, Debug)]
struct LeaseStatus {
    deadline: Instant,
    lost: bool,
    etag: ETag,
    record: LockRecord,
}

/// A held lease. Renewed in the background until released, lost, or
/// dropped (a drop behaves like a crash: no release is written).
pub struct Lease {
    store: DynStore,
    key: String,
    config: LeaseConfig,
    status: watch::Receiver<LeaseStatus>,
    renewal: tokio::task::JoinHandle<()>,
    previous: Option<LockRecord>,
    record: LockRecord,
    /// Tells this process's contender that the lease is still held.
    _alive: Arc<()>,
}

impl Lease {
    #[allow(clippy::too_many_arguments)]
    fn start(
        store: DynStore,
        key: String,
        config: LeaseConfig,
        record: LockRecord,
        etag: ETag,
        sent_at: Instant,
        previous: Option<LockRecord>,
        alive: Arc<()>,
    ) -> Lease {
        let status = LeaseStatus {
            deadline: sent_at + config.ttl.saturating_sub(config.margin),
            lost: false,
            etag,
            record: record.clone(),
        };
        let (tx, rx) = watch::channel(status);
        let renewal = tokio::spawn(renew(
            store.clone(),
            key.clone(),
            config.clone(),
            tx,
            sent_at,
        ));
        Lease {
            store,
            key,
            config,
            status: rx,
            renewal,
            previous,
            record,
            _alive: alive,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    pub fn token(&self) -> Uuid {
        self.record.token
    }

    /// The record as last written by this holder.
    pub fn record(&self) -> LockRecord {
        self.status.borrow().record.clone()
    }

    /// The record this lease replaced, if any.
    pub fn previous(&self) -> Option<LockRecord> {
        self.previous.clone()
    }

    /// True while this machine may act as the holder.
    pub fn is_valid(&self) -> bool {
        let status = self.status.borrow();
        !status.lost && Instant::now() < status.deadline
    }

    /// The current self-fencing deadline.
    pub fn deadline(&self) -> Instant {
        self.status.borrow().deadline
    }

    /// Resolves once the lease is lost or its deadline passes. Cancel-safe.
    pub async fn lost(&self) {
        let mut status = self.status.clone();
        loop {
            let (lost, deadline) = {
                let s = status.borrow_and_update();
                (s.lost, s.deadline)
            };
            if lost || Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = status.changed() => if changed.is_err() {
                    // The renewal task ended without marking the lease lost:
                    // the deadline still decides.
                    tokio::time::sleep_until(deadline).await;
                    return;
                },
            }
        }
    }

    /// Stops renewing and writes the lock as released (same epoch), so that
    /// another machine can take over at once.
    pub async fn release(mut self) -> StoreResult<()> {
        self.renewal.abort();
        let _ = (&mut self.renewal).await;
        let status = self.status.borrow().clone();
        if status.lost {
            return Ok(());
        }
        let mut etag = status.etag;
        let mut record = status.record;
        record.released = true;
        record.renewed_at = self.config.wall_clock.now();
        for _ in 0..3 {
            match self
                .store
                .put(
                    &self.key,
                    record.to_bytes(),
                    Metadata::new(),
                    Precondition::IfMatch(etag.clone()),
                )
                .await
            {
                Ok(_) => {
                    info!(key = %self.key, epoch = record.epoch, "lease released");
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    // An aborted renewal may have landed after all: if the
                    // lock is still ours, release on top of it.
                    match read_lock(&self.store, &self.key).await? {
                        LockState::Held {
                            record: current,
                            etag: current_etag,
                        } if current.token == record.token => {
                            etag = current_etag;
                        }
                        _ => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.key.clone(),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// The renewal loop: every ttl/3 after the last successful renewal's send
/// time, rewrite the lock with `If-Match`. Ends when the lease is lost.
async fn renew(
    store: DynStore,
    key: String,
    config: LeaseConfig,
    tx: watch::Sender<LeaseStatus>,
    mut last_sent: Instant,
) {
    let mut next = last_sent + config.renew_interval();
    loop {
        tokio::time::sleep_until(next).await;
        let (etag, mut record, deadline) = {
            let s = tx.borrow();
            (s.etag.clone(), s.record.clone(), s.deadline)
        };
        if Instant::now() >= deadline {
            warn!(
                key,
                epoch = record.epoch,
                "lease deadline passed without a renewal; stepping down"
            );
            tx.send_modify(|s| s.lost = true);
            return;
        }
        record.renewed_at = config.wall_clock.now();
        let sent_at = Instant::now();
        let put = store.put(
            &key,
            record.to_bytes(),
            Metadata::new(),
            Precondition::IfMatch(etag),
        );
        match tokio::time::timeout_at(deadline, put).await {
            Ok(Ok(etag)) => {
                last_sent = sent_at;
                let deadline = sent_at + config.ttl.saturating_sub(config.margin);
                tx.send_modify(|s| {
                    s.etag = etag;
                    s.record = record;
                    s.deadline = deadline;
                });
                next = last_sent + config.renew_interval();
            }
            Ok(Err(StoreError::PreconditionFailed { .. })) => {
                warn!(
                    key,
                    "lock changed under us (412): another machine took over; lease lost"
                );
                tx.send_modify(|s| s.lost = true);
                return;
            }
            Ok(Err(e)) => {
                warn!(key, error = %e, "lease renewal failed; retrying until the deadline");
                next =
                    Instant::now() + (config.renew_interval() / 4).max(Duration::from_millis(10));
            }
            Err(_) => {
                warn!(
                    key,
                    "lease renewal did not finish before the deadline; lease lost"
                );
                tx.send_modify(|s| s.lost = true);
                return;
            }
        }
    }
}
