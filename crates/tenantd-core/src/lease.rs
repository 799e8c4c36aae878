//! Tenant leases: which machine may write a tenant's database.
//!
//! Protocol (DESIGN.md, docs/protocol.md "Session leases"):
//! - Acquire an absent `machine.lock` with `If-None-Match: *`, a released or
//!   stale one with `If-Match: <etag seen>`; the new epoch is the old one +
//!   1. The store's conditional write lets exactly one contender win.
//! - The lock names the holder's session (`incarnation`, `session: true`)
//!   and is not renewed: the machine renews one heartbeat for all its
//!   leases ([`Session`]). Every lease is valid exactly while its session
//!   is: until `S + ttl - margin`, `S` the send time of the last credited
//!   heartbeat write.
//! - Stale: a contender may take over a session lock once the holder's
//!   heartbeat, still naming the lock's incarnation, has been seen with the
//!   same ETag for a full ttl on the contender's monotonic clock. Wall
//!   clocks (`renewed_at`) decide nothing: a holder whose clock is far
//!   behind is still alive. A heartbeat that is missing, unparsable or names another
//!   incarnation leaves only the observation rule on the lock itself: the
//!   lock and what the heartbeat shows unchanged for a full ttl.
//! - Locks without `session` (written by a machine that renews each lock)
//!   are judged by the lock's own ETag, as before.
//!
//! A lock naming this machine's own id is taken over at once unless this
//! process holds it through a live [`Lease`]: it was left by an earlier,
//! crashed process of the same machine (machine ids are unique per
//! process), or by an acquisition of this process whose lease has ended. A
//! lease ends only after its holder has settled every upload it made, and
//! every database write is fenced by the commit log anyway, so retaking it
//! at once spares the tenant a ttl-long outage and risks nothing. "Live"
//! is judged across every contender of the process (they share the
//! [`Session`]): the standby loop must not take back a lock that request
//! routing holds, or two leases of one machine would overlap.

mod heartbeat;
mod observer;
mod session;

pub use heartbeat::HeartbeatRecord;
pub use observer::{Beat, Observation};
use session::Begun;
pub use session::{Credited, Incarnation, Session};

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
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
    pub wall_clock: Arc<dyn WallClock>,
}

impl LeaseConfig {
    pub fn new(machine_id: impl Into<String>, addr: impl Into<String>, ttl: Duration) -> Self {
        LeaseConfig {
            machine_id: machine_id.into(),
            addr: addr.into(),
            ttl,
            margin: ttl / 5,
            wall_clock: Arc::new(SystemWallClock),
        }
    }

    pub(crate) fn renew_interval(&self) -> Duration {
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
    /// The holder's session incarnation (session locks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<Uuid>,
    /// True when the lock is kept alive by the holder's heartbeat rather
    /// than renewed itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
    /// On a release whose snapshot does not hold every acknowledged write:
    /// the holder's last confirmed log slot (every slot up to it exists).
    /// A hint for the next claim's reads; never what decides its fences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_end: Option<u64>,
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

/// What a contender's own observation timer is keyed on: the lock's ETag
/// and, for a session lock whose heartbeat does not vouch for it, what the
/// heartbeat shows. Any change restarts the timer.
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Lock(ETag),
    LockAndBeat(ETag, BeatKey),
}

#[derive(Clone, Debug, PartialEq)]
enum BeatKey {
    Missing,
    Unparsable(Option<ETag>),
    Other(Uuid),
}

/// A machine that wants the lease. Remembers what it has seen of the lock
/// (and when it first saw it) across attempts, for the stale rule.
pub struct Contender {
    store: DynStore,
    key: String,
    session: Session,
    observed: Option<(Seen, Instant)>,
    /// Highest epoch seen, so that a takeover of an unparsable lock still
    /// continues the sequence as far as this machine knows it.
    max_epoch: u64,
    /// The last lock read, for [`Contender::watch`].
    last_read: Option<(Instant, LockState)>,
    /// The acquisition planned for the attempt under way ([`Contender::plan`]).
    planned: Option<Planned>,
}

/// An acquisition chosen before its lock write: the epoch and token the
/// lock will carry if the write wins, and the log end the released lock
/// it replaces names.
#[derive(Clone, Debug)]
pub struct Planned {
    pub epoch: u64,
    pub token: Uuid,
    pub log_end: u64,
    /// The token of the released lock's acquisition.
    pub replaces: Uuid,
}

impl Contender {
    pub fn new(store: DynStore, key: String, session: Session) -> Contender {
        Contender {
            store,
            key,
            session,
            observed: None,
            max_epoch: 0,
            last_read: None,
            planned: None,
        }
    }

    fn config(&self) -> &LeaseConfig {
        self.session.config()
    }

    /// How long this contender has seen `seen` unchanged.
    fn observe(&mut self, seen: Seen) -> Duration {
        match &self.observed {
            Some((was, since)) if *was == seen => since.elapsed(),
            _ => {
                self.observed = Some((seen, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// One attempt: reads the lock and acquires it if absent, released or
    /// stale. Never waits.
    pub async fn try_acquire(&mut self) -> StoreResult<Acquire> {
        let state = read_lock(&self.store, &self.key).await?;
        self.last_read = Some((Instant::now(), state.clone()));
        self.decide(state, true).await
    }

    /// The acquisition this contender would attempt from `early`, a
    /// released lock naming where its holder's log ended: its epoch and
    /// a token chosen now, so that a takeover can fence that log's window
    /// under them while the lock write is still to come (docs/protocol.md,
    /// "Fences before the lock write"). `None` for any other lock.
    pub fn plan(&self, early: &LockState) -> Option<Planned> {
        match early {
            LockState::Released { record, .. } => Some(Planned {
                epoch: record.epoch.max(self.max_epoch) + 1,
                token: Uuid::new_v4(),
                log_end: record.log_end?,
                replaces: record.token,
            }),
            _ => None,
        }
    }

    /// [`Contender::try_acquire`] starting from a read of the lock made
    /// earlier (beside the tenant's existence check): used when it showed
    /// the lock absent or released, which the conditional write itself
    /// checks again (`If-None-Match` / `If-Match` its ETag). A held lock is
    /// read again: the stale rule counts from the send time of the read
    /// that saw it, which an early read would overstate. The lock carries
    /// `planned`'s token when the attempt is the one planned (the same
    /// released lock, the same epoch); any other attempt draws its own.
    pub async fn try_acquire_planned(
        &mut self,
        early: Option<LockState>,
        planned: Option<Planned>,
    ) -> StoreResult<Acquire> {
        self.planned = planned;
        let outcome = match early {
            Some(state @ (LockState::Absent | LockState::Released { .. })) => {
                self.decide(state, true).await
            }
            _ => self.try_acquire().await,
        };
        self.planned = None;
        outcome
    }

    /// A standby's cheap attempt: while the last lock read showed a session
    /// lock whose holder's heartbeat still names it and is not stale, only
    /// the (shared, cached) heartbeat is looked at; the lock is read again
    /// when the heartbeat changes incarnation, goes quiet, or `reread`
    /// has passed since the last lock read.
    pub async fn watch(&mut self, reread: Duration) -> StoreResult<Acquire> {
        if let Some((at, LockState::Held { record, .. })) = &self.last_read
            && at.elapsed() < reread
            && record.session
            && record.holder != self.config().machine_id
        {
            let record = record.clone();
            let ttl = record.ttl().max(self.config().ttl);
            // Standbys pace their own polls (at least ttl/6 apart): read
            // the heartbeat unless another tenant's poll just did.
            let max_age = self.config().renew_interval() / 3;
            let seen = self
                .session
                .observer()
                .observe_until_due(&record.holder, ttl, max_age)
                .await?;
            if let Beat::Live(beat) = &seen.beat
                && Some(beat.incarnation) == record.incarnation
                && seen.unchanged_for() < ttl / 2
            {
                return Ok(Acquire::HeldBy {
                    stale_in: seen.stale_in(ttl),
                    record,
                });
            }
        }
        self.try_acquire().await
    }

    /// When this contender last read the lock itself.
    pub fn last_read_at(&self) -> Option<Instant> {
        self.last_read.as_ref().map(|(at, _)| *at)
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
                let ttl = record.ttl().max(self.config().ttl);
                // A record naming this machine but no live lease of this
                // process was written by an earlier process of it (machine
                // ids are unique per process: Fly runs one per machine),
                // which is gone, or by a lease of ours that has ended: no
                // need to wait it out.
                // Any contender of this process: the standby loop and
                // request routing each have one.
                let live_here = self.session.holds_token(record.token);
                let ours = record.holder == self.config().machine_id && !live_here;
                let (stale, stale_in, why) = if ours {
                    (
                        true,
                        Duration::ZERO,
                        "left by an earlier process of this machine",
                    )
                } else {
                    self.judge(&record, &etag, ttl).await?
                };
                if stale && may_write {
                    info!(key = %self.key, holder = %record.holder, epoch = record.epoch, why, "lock is stale; taking over");
                    let epoch = record.epoch.max(self.max_epoch) + 1;
                    return self
                        .attempt(Precondition::IfMatch(etag), epoch, Some(record))
                        .await;
                }
                Ok(Acquire::HeldBy { stale_in, record })
            }
            LockState::Unparsable { etag } => {
                let seen_for = self.observe(Seen::Lock(etag.clone()));
                let ttl = self.config().ttl;
                if seen_for >= ttl && may_write {
                    warn!(key = %self.key, "unparsable lock unchanged for a full ttl; taking over");
                    return self
                        .attempt(Precondition::IfMatch(etag), self.max_epoch + 1, None)
                        .await;
                }
                Ok(Acquire::Unknown {
                    stale_in: ttl.saturating_sub(seen_for),
                })
            }
        }
    }

    /// Whether a held lock of another machine (or an older process) is
    /// stale, and if not, how soon it may be.
    async fn judge(
        &mut self,
        record: &LockRecord,
        etag: &ETag,
        ttl: Duration,
    ) -> StoreResult<(bool, Duration, &'static str)> {
        let incarnation = match (record.session, record.incarnation) {
            (true, Some(incarnation)) => incarnation,
            _ => {
                // A lock renewed by its holder: its own ETag is the signal.
                let seen_for = self.observe(Seen::Lock(etag.clone()));
                let stale = seen_for >= ttl;
                return Ok((
                    stale,
                    ttl.saturating_sub(seen_for),
                    "lock unchanged for a ttl",
                ));
            }
        };
        let observer = self.session.observer();
        let mut beat = observer.observe(&record.holder, ttl).await?;
        let vouches = |beat: &Observation| matches!(&beat.beat, Beat::Live(hb) if hb.incarnation == incarnation);
        if !vouches(&beat) {
            // The cached heartbeat may predate the lock (a holder that
            // restarted and took its locks back): look again before
            // concluding that its session is gone.
            let max_age = self.config().renew_interval() / 3;
            beat = observer
                .observe_within(&record.holder, ttl, max_age)
                .await?;
        }
        let key = match &beat.beat {
            Beat::Live(hb) if hb.incarnation == incarnation => {
                self.observed = None;
                let seen_for = beat.unchanged_for();
                let stale = seen_for >= ttl;
                return Ok((
                    stale,
                    beat.stale_in(ttl),
                    "holder's heartbeat unchanged for a ttl",
                ));
            }
            Beat::Live(hb) => BeatKey::Other(hb.incarnation),
            Beat::Missing => BeatKey::Missing,
            Beat::Unparsable => BeatKey::Unparsable(beat.etag.clone()),
        };
        let seen_for = self.observe(Seen::LockAndBeat(etag.clone(), key));
        Ok((
            seen_for >= ttl,
            ttl.saturating_sub(seen_for),
            "holder's session is gone and the lock unchanged for a ttl",
        ))
    }

    async fn attempt(
        &mut self,
        condition: Precondition,
        epoch: u64,
        previous: Option<LockRecord>,
    ) -> StoreResult<Acquire> {
        // The lock goes out beside the session's start when one is under
        // way: it names the incarnation whose heartbeat write was just sent.
        let (named, starting) = match self.session.begin().await? {
            Begun::Running(incarnation) => (incarnation.id(), Ok(incarnation)),
            Begun::Starting { id, started, .. } => (id, Err(started)),
        };
        let config = self.config().clone();
        // The planned token only for the planned write: a token is one
        // acquisition's, and fences may already carry this one.
        let token = match self.planned.take() {
            Some(planned)
                if planned.epoch == epoch
                    && previous
                        .as_ref()
                        .is_some_and(|p| p.released && p.token == planned.replaces) =>
            {
                planned.token
            }
            _ => Uuid::new_v4(),
        };
        let record = LockRecord {
            holder: config.machine_id.clone(),
            addr: config.addr.clone(),
            epoch,
            token,
            ttl_ms: config.ttl.as_millis() as u64,
            renewed_at: config.wall_clock.now(),
            released: false,
            incarnation: Some(named),
            session: true,
            log_end: None,
            extra: Default::default(),
        };
        // Remembered before sending: if the write lands but its answer is
        // lost, the lock is still recognised as this process's own (and,
        // with no lease alive, taken back at once).
        self.session.remember_token(record.token);
        let created = matches!(condition, Precondition::IfAbsent);
        let sent = Instant::now();
        let put = self
            .store
            .put(&self.key, record.to_bytes(), Metadata::new(), condition);
        let (written, incarnation) = match starting {
            Ok(running) => (put.await, Ok(running)),
            Err(started) => {
                let (written, started) = tokio::join!(put, started);
                let started = started.unwrap_or_else(|e| {
                    Err(StoreError::transient(
                        &self.key,
                        format!("the session's start ended early: {e}"),
                    ))
                });
                (written, started)
            }
        };
        match written {
            Ok(etag) => {
                // A lock whose session did not start leaves no lease: it
                // names this machine, so the next attempt takes it back
                // at once.
                let incarnation = incarnation?;
                let (etag, record, sent) =
                    self.cover(incarnation.as_ref(), etag, record, sent).await?;
                self.observed = None;
                self.last_read = None;
                self.max_epoch = epoch;
                info!(key = %self.key, epoch, holder = %record.holder, incarnation = %incarnation.id(), "lease acquired");
                let alive = Arc::new(());
                self.session.token_alive(record.token, &alive);
                Ok(Acquire::Acquired(Lease {
                    store: self.store.clone(),
                    key: self.key.clone(),
                    config,
                    incarnation,
                    etag,
                    record,
                    previous,
                    created,
                    written_at: sent,
                    _alive: alive,
                }))
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                // Another contender won: report what it wrote.
                debug!(key = %self.key, "lost the race for the lease");
                let state = read_lock(&self.store, &self.key).await?;
                self.last_read = Some((Instant::now(), state.clone()));
                Box::pin(self.decide(state, false)).await
            }
            Err(e) => Err(e),
        }
    }

    /// A lock written beside its session's start is covered by the session
    /// only if it names the incarnation that started and was sent after
    /// the heartbeat write that started it; otherwise (that write failed
    /// and a later one or another incarnation started) it is written once
    /// more, `If-Match` the ETag just written, naming the incarnation now
    /// running: its clock starts again from that send.
    async fn cover(
        &self,
        incarnation: &Incarnation,
        etag: ETag,
        mut record: LockRecord,
        sent: Instant,
    ) -> StoreResult<(ETag, LockRecord, Instant)> {
        if record.incarnation == Some(incarnation.id()) && incarnation.started_at() <= sent {
            return Ok((etag, record, sent));
        }
        debug!(key = %self.key, "the lock was written beside a session start that was not the one credited; writing it again");
        record.incarnation = Some(incarnation.id());
        let (etag, again) = write_over(&self.store, &self.key, &record, etag).await?;
        Ok((etag, record, again))
    }

    /// Tries until acquired or `until` passes, polling every ttl/3 (or
    /// sooner when the lock becomes stale sooner).
    pub async fn acquire_until(&mut self, until: Instant) -> StoreResult<Acquire> {
        loop {
            let outcome = self.try_acquire().await?;
            let wait = match &outcome {
                Acquire::Acquired(_) => return Ok(outcome),
                Acquire::HeldBy { stale_in, .. } | Acquire::Unknown { stale_in } => (*stale_in)
                    .min(self.config().renew_interval())
                    .max(Duration::from_millis(10)),
            };
            if Instant::now() + wait > until {
                return Ok(outcome);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Writes `record` over this acquisition's own lock (`If-Match` the ETag
/// it last wrote); returns the new ETag and when the write was sent.
async fn write_over(
    store: &DynStore,
    key: &str,
    record: &LockRecord,
    etag: ETag,
) -> StoreResult<(ETag, Instant)> {
    let sent = Instant::now();
    let etag = store
        .put(
            key,
            record.to_bytes(),
            Metadata::new(),
            Precondition::IfMatch(etag),
        )
        .await?;
    Ok((etag, sent))
}

/// A held lease, valid while its session incarnation is. Dropping it
/// behaves like a crash of this one tenant: no release is written, and the
/// incarnation ends once no lease holds it.
pub struct Lease {
    store: DynStore,
    key: String,
    config: LeaseConfig,
    incarnation: Arc<Incarnation>,
    /// The lock's ETag as written at acquisition (never renewed).
    etag: ETag,
    record: LockRecord,
    previous: Option<LockRecord>,
    /// Acquired by creating an absent lock (`If-None-Match: *`).
    created: bool,
    /// When the write that last made the lock name this acquisition was
    /// sent: the lock named it at some moment after this.
    written_at: Instant,
    /// Tells this process's contender that the lease is still held.
    _alive: Arc<()>,
}

impl Lease {
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    pub fn token(&self) -> Uuid {
        self.record.token
    }

    /// The session incarnation this lease lives by.
    pub fn incarnation(&self) -> Uuid {
        self.incarnation.id()
    }

    /// The record as written by this holder.
    pub fn record(&self) -> LockRecord {
        self.record.clone()
    }

    /// The record this lease replaced, if any.
    pub fn previous(&self) -> Option<LockRecord> {
        self.previous.clone()
    }

    /// When the lock was last written naming this acquisition (the send
    /// time of that write): as good as a read of the lock at that time.
    pub fn written_at(&self) -> Instant {
        self.written_at
    }

    /// True while this machine may act as the holder.
    pub fn is_valid(&self) -> bool {
        self.incarnation.is_valid()
    }

    /// The current self-fencing deadline (the session's).
    pub fn deadline(&self) -> Instant {
        self.incarnation.deadline()
    }

    /// Resolves once the session is lost or its deadline passes. Cancel-safe.
    pub async fn lost(&self) {
        self.incarnation.lost().await
    }

    /// Raises this lease's epoch to `epoch` by rewriting its own lock
    /// (`If-Match` the ETag this lease wrote; the token stays): a claim
    /// that finds the tenant's objects written under this epoch or a newer
    /// one by another acquisition (the lock deleted or reset by hand, two
    /// leases overlapping) must outrank them. A 412 means the lock is no
    /// longer this lease's: it must not take the tenant over.
    pub async fn raise_epoch(&mut self, epoch: u64) -> StoreResult<()> {
        if epoch <= self.record.epoch {
            return Ok(());
        }
        let mut record = self.record.clone();
        record.epoch = epoch;
        let (etag, sent) = write_over(&self.store, &self.key, &record, self.etag.clone()).await?;
        info!(key = %self.key, from = self.record.epoch, epoch, "lease epoch raised");
        self.etag = etag;
        self.record = record;
        self.written_at = sent;
        Ok(())
    }

    /// Whether the lock still names this acquisition, read now. A lock
    /// deleted or reset by hand is taken by the next machine at once while
    /// this session goes on renewing: only the lock itself tells a holder
    /// that serves reads without writing that it has been replaced.
    pub async fn still_ours(&self) -> StoreResult<bool> {
        Ok(match read_lock(&self.store, &self.key).await? {
            LockState::Held { record, .. } => record.token == self.record.token,
            LockState::Absent | LockState::Released { .. } | LockState::Unparsable { .. } => false,
        })
    }

    /// Whether this lease created the lock (it was absent). For a tenant
    /// with a history that means the lock was deleted by hand, and the
    /// holder it named may not know yet.
    pub fn created_the_lock(&self) -> bool {
        self.created
    }

    /// The lease's ttl.
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// Writes the lock as released (same epoch), so that another machine
    /// can take over at once. A lock someone else has taken meanwhile (only
    /// possible once this session looked dead) is left alone.
    pub async fn release(self) -> StoreResult<()> {
        self.release_at(None).await
    }

    /// [`Self::release`] of a tenant whose snapshot does not hold every
    /// acknowledged write: the record names `log_end`, the last slot this
    /// holder confirmed, so the next holder knows how far the log it must
    /// replay reaches (its fences still decide; docs/protocol.md).
    pub async fn release_with_log(self, log_end: u64) -> StoreResult<()> {
        self.release_at(Some(log_end)).await
    }

    async fn release_at(self, log_end: Option<u64>) -> StoreResult<()> {
        let mut record = self.record.clone();
        record.released = true;
        record.log_end = log_end;
        record.renewed_at = self.config.wall_clock.now();
        match self
            .store
            .put(
                &self.key,
                record.to_bytes(),
                Metadata::new(),
                Precondition::IfMatch(self.etag.clone()),
            )
            .await
        {
            Ok(_) => {
                info!(key = %self.key, epoch = record.epoch, ?log_end, "lease released");
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                warn!(key = %self.key, epoch = record.epoch, "lock was taken over before the release; nothing to release");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
