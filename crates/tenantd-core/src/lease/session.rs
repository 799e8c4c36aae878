//! The machine's session: one heartbeat object renewed for every lease the
//! process holds (like a Chubby KeepAlive or a ZooKeeper session).
//!
//! An *incarnation* is one run of renewals under a fresh uuid. It starts
//! when the process first needs it (a standby that never acquires writes
//! nothing) and ends when its last lease is gone, when its deadline passes
//! without a renewal, or when another process writes the heartbeat. Every
//! lease of an incarnation is valid exactly while the incarnation is.
//!
//! Deadline rule (as for a per-lock renewal): after a renewal sent at `S`
//! whose answer came back before the current deadline, the incarnation is
//! valid until `S + ttl - margin`. A renewal answered after the current
//! deadline is not credited, so no contender that saw the previous ETag
//! unchanged for a full ttl can have been overtaken by it (docs/protocol.md,
//! "Session leases").

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::LeaseConfig;
use super::heartbeat::HeartbeatRecord;
use super::observer::Observer;
use crate::metrics::Metrics;
use crate::store::{DynStore, ETag, Metadata, Precondition, StoreError, StoreResult, keys};

/// The heartbeat as last written with credit: its ETag, its record, and
/// the deadline that write gave the incarnation.
pub type Credited = Option<(ETag, HeartbeatRecord, Instant)>;

/// What the renewal task tells the leases of an incarnation.
#[derive(Clone, Copy, Debug)]
struct Status {
    deadline: Instant,
    lost: bool,
}

/// One run of renewals. Leases hold it; when the last one lets go, the
/// renewal task is aborted and the heartbeat goes quiet.
pub struct Incarnation {
    id: Uuid,
    /// When the heartbeat write that started it was sent.
    started_at: Instant,
    status: watch::Receiver<Status>,
    renewal: tokio::task::JoinHandle<()>,
}

/// The incarnation a lock about to be written will name
/// ([`Session::begin`]).
pub(crate) enum Begun {
    Running(Arc<Incarnation>),
    /// A start whose heartbeat write naming `id` was sent, not answered
    /// yet; `started` ends with the incarnation (which may be another
    /// one, or started by a later write, if that one failed).
    Starting {
        id: Uuid,
        started: tokio::task::JoinHandle<StoreResult<Arc<Incarnation>>>,
    },
}

impl Incarnation {
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// When the heartbeat write that started this incarnation was sent:
    /// a lock naming it written no earlier than this is covered by the
    /// session from its own send on (docs/protocol.md, "Session leases").
    pub(crate) fn started_at(&self) -> Instant {
        self.started_at
    }

    pub fn is_valid(&self) -> bool {
        let s = *self.status.borrow();
        !s.lost && Instant::now() < s.deadline
    }

    pub fn deadline(&self) -> Instant {
        self.status.borrow().deadline
    }

    /// Resolves once the incarnation is lost or its deadline passes.
    /// Cancel-safe.
    pub async fn lost(&self) {
        let mut status = self.status.clone();
        loop {
            let s = *status.borrow_and_update();
            if s.lost || Instant::now() >= s.deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(s.deadline) => return,
                changed = status.changed() => if changed.is_err() {
                    tokio::time::sleep_until(s.deadline).await;
                    return;
                },
            }
        }
    }
}

impl Drop for Incarnation {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// The incarnations this process wrote the heartbeat for, and whether one
/// of those writes is known to have landed. Until one has, a heartbeat
/// naming another incarnation is an earlier process's (Fly restarts a
/// crashed machine under the same id, and a write the crashed process sent
/// may still land); once one has, only a live process can have written
/// over it (a dead one's conditional write fails on the changed ETag).
#[derive(Default)]
struct Own {
    /// Every incarnation whose write may have landed.
    written: Vec<Uuid>,
    landed: bool,
}

impl Own {
    fn foreign(&self, theirs: Uuid) -> bool {
        self.landed && !self.written.contains(&theirs)
    }
}

struct Shared {
    store: DynStore,
    config: LeaseConfig,
    key: String,
    metrics: Option<Metrics>,
    /// The incarnation leases are being given to, if it is still alive.
    current: tokio::sync::Mutex<Weak<Incarnation>>,
    /// This process's heartbeat writes so far.
    own: Mutex<Own>,
    /// Set when another process took the heartbeat over: this process must
    /// not fight it (machine ids are unique per process).
    displaced: Mutex<Option<Uuid>>,
    observer: Observer,
    /// This machine's heartbeat as read ahead of a start ([`Session::prime`]),
    /// used (and dropped) by the next start; the lock is held while the
    /// read is in flight, so a start waits for it rather than reading too.
    primed: tokio::sync::Mutex<Option<Option<crate::store::Object>>>,
    /// Tokens of every acquisition made under this session, by any
    /// contender of the process, each with a handle that lives as long as
    /// its [`super::Lease`]: a lock carrying a live one is a current lease
    /// of this process, never "left by an earlier process".
    live_tokens: Mutex<Vec<(Uuid, Weak<()>)>>,
    /// The heartbeat as last written with credit, until the deadline that
    /// write gave the incarnation: what a push vouches for ([`Session::vouch`]).
    /// Watched by the push loops, which send each renewal to followers.
    credited: watch::Sender<Credited>,
    /// The start under way, once its heartbeat write is sent: the
    /// incarnation it names and the write's send time ([`Session::begin`]).
    starting: watch::Sender<Option<(Uuid, Instant)>>,
}

/// The session of this process. Cheap to clone; all clones share one
/// heartbeat and one cache of other machines' heartbeats.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("machine_id", &self.shared.config.machine_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Remembers an acquisition about to be sent (its handle dead until
    /// the lease exists: an attempt whose answer was lost is not live).
    pub(crate) fn remember_token(&self, token: Uuid) {
        let mut tokens = self.shared.live_tokens.lock().unwrap();
        tokens.retain(|(_, alive)| alive.strong_count() > 0);
        tokens.push((token, Weak::new()));
    }

    /// Ties an acquisition's token to its lease's life.
    pub(crate) fn token_alive(&self, token: Uuid, alive: &Arc<()>) {
        let mut tokens = self.shared.live_tokens.lock().unwrap();
        if let Some(entry) = tokens.iter_mut().find(|(t, _)| *t == token) {
            entry.1 = Arc::downgrade(alive);
        }
    }

    /// Whether a lease of this process with this token is alive.
    pub(crate) fn holds_token(&self, token: Uuid) -> bool {
        self.shared
            .live_tokens
            .lock()
            .unwrap()
            .iter()
            .any(|(t, alive)| *t == token && alive.strong_count() > 0)
    }

    pub fn new(store: DynStore, config: LeaseConfig) -> Session {
        Session::with_metrics(store, config, None)
    }

    pub fn with_metrics(store: DynStore, config: LeaseConfig, metrics: Option<Metrics>) -> Session {
        let observer = Observer::new(store.clone(), config.renew_interval());
        Session {
            shared: Arc::new(Shared {
                key: keys::heartbeat(&config.machine_id),
                store,
                config,
                metrics,
                current: tokio::sync::Mutex::new(Weak::new()),
                primed: tokio::sync::Mutex::new(None),
                live_tokens: Mutex::new(Vec::new()),
                own: Mutex::default(),
                displaced: Mutex::new(None),
                credited: watch::Sender::new(None),
                starting: watch::Sender::new(None),
                observer,
            }),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.shared.config
    }

    /// Reads this machine's heartbeat ahead of a start (a standby
    /// waiting for its tenant, a first request whose tenant is being
    /// checked), so that the start only writes: one round trip before the
    /// first lock write instead of two. Only reads; does nothing while a
    /// session runs or a read is kept. A read gone stale costs the start a
    /// refused conditional write and a read again, nothing else: the start
    /// judges it as it judges its own reads.
    pub async fn prime(&self) {
        let shared = &self.shared;
        match shared.current.try_lock() {
            Ok(current) if current.upgrade().is_some_and(|i| i.is_valid()) => return,
            Ok(_) => {}
            // A start is under way: it reads for itself.
            Err(_) => return,
        }
        let mut primed = shared.primed.lock().await;
        if primed.is_some() {
            return;
        }
        match shared.store.get(&shared.key).await {
            Ok(read) => *primed = Some(read),
            Err(e) => {
                debug!(key = %shared.key, error = %e, "could not read the heartbeat ahead; the session's start reads it")
            }
        }
    }

    pub(crate) fn observer(&self) -> &Observer {
        &self.shared.observer
    }

    /// This machine's heartbeat as last written, while the incarnation
    /// that write credited is valid: sent with each push, so that a
    /// follower learns of a renewal without reading the heartbeat (the
    /// write was sent before the push, which is all the observer's stale
    /// rule asks of the moment it first sees an ETag).
    pub fn vouch(&self) -> Option<(ETag, HeartbeatRecord)> {
        let credited = self.shared.credited.borrow();
        let (etag, record, deadline) = credited.as_ref()?;
        (Instant::now() < *deadline).then(|| (etag.clone(), record.clone()))
    }

    /// Changes whenever a heartbeat write is credited (or the session is
    /// lost): a holder's push loop sends each renewal on at once.
    pub fn renewals(&self) -> watch::Receiver<Credited> {
        self.shared.credited.subscribe()
    }

    /// The incarnation new leases belong to: the running one, or a new one
    /// (which writes the heartbeat first).
    pub async fn incarnation(&self) -> StoreResult<Arc<Incarnation>> {
        let mut current = self.shared.current.lock().await;
        if let Some(running) = current.upgrade()
            && running.is_valid()
        {
            return Ok(running);
        }
        let started = self.start().await?;
        *current = Arc::downgrade(&started);
        Ok(started)
    }

    /// The incarnation a lock about to be written will name, without
    /// waiting for a session's start to be answered: the running one, or
    /// the one whose heartbeat write a start (begun here if none is under
    /// way) has just sent. A lock naming it may go out beside that write:
    /// until the write lands the heartbeat does not vouch for the lock,
    /// which contenders then judge by the lock's own ETag, first seen after
    /// the lock's send; so the session covers the lock from the start
    /// write's send on, if that write is the one credited and was sent
    /// first ([`Incarnation::started_at`]).
    pub(crate) async fn begin(&self) -> StoreResult<Begun> {
        if let Ok(current) = self.shared.current.try_lock()
            && let Some(running) = current.upgrade()
            && running.is_valid()
        {
            return Ok(Begun::Running(running));
        }
        let mut starting = self.shared.starting.subscribe();
        let session = self.clone();
        let mut started = tokio::spawn(async move { session.incarnation().await });
        tokio::select! {
            seen = starting.wait_for(Option::is_some) => match *seen.expect("the session keeps its sender") {
                Some((id, _)) => Ok(Begun::Starting { id, started }),
                None => unreachable!("waited for a start"),
            },
            done = &mut started => Ok(Begun::Running(done.map_err(|e| {
                StoreError::transient(&self.shared.key, format!("the session's start ended early: {e}"))
            })??)),
        }
    }

    async fn start(&self) -> StoreResult<Arc<Incarnation>> {
        let started = self.start_telling().await;
        self.shared.starting.send_replace(None);
        started
    }

    async fn start_telling(&self) -> StoreResult<Arc<Incarnation>> {
        let shared = &self.shared;
        if let Some(by) = *shared.displaced.lock().unwrap() {
            return Err(StoreError::Fatal {
                message: format!(
                    "the heartbeat {} was taken over by incarnation {by} of another process with machine id {}: two processes share one machine id; stop one of them",
                    shared.key, shared.config.machine_id
                ),
            });
        }
        let id = Uuid::new_v4();
        // The process's first start with no read of the heartbeat at hand
        // (none made yet, or the read ahead still under way) assumes there
        // is none: a new machine's id has none, and `If-None-Match` makes
        // the guess safe (a 412 costs one round trip, then the read
        // decides; later starts find their own earlier heartbeat).
        let first = shared.own.lock().unwrap().written.is_empty();
        let mut guess_absent = first
            && match shared.primed.try_lock() {
                Ok(primed) => primed.is_none(),
                Err(_) => true,
            };
        for _ in 0..5 {
            let guessed = std::mem::take(&mut guess_absent);
            let read = if guessed {
                None
            } else {
                let primed = shared.primed.lock().await.take();
                match primed {
                    Some(read) => read,
                    None => shared.store.get(&shared.key).await?,
                }
            };
            let condition = match read {
                None => Precondition::IfAbsent,
                Some(object) => {
                    let theirs = serde_json::from_slice::<HeartbeatRecord>(&object.body)
                        .ok()
                        .map(|r| r.incarnation);
                    let foreign =
                        theirs.filter(|&theirs| shared.own.lock().unwrap().foreign(theirs));
                    if let Some(theirs) = foreign {
                        *shared.displaced.lock().unwrap() = Some(theirs);
                        return Box::pin(self.start_telling()).await;
                    }
                    // An earlier process of this machine (Fly restarts a
                    // crashed machine under the same id), or an earlier
                    // incarnation of this one.
                    Precondition::IfMatch(object.etag)
                }
            };
            let record = HeartbeatRecord {
                machine_id: shared.config.machine_id.clone(),
                incarnation: id,
                addr: shared.config.addr.clone(),
                ttl_ms: shared.config.ttl.as_millis() as u64,
                renewed_at: shared.config.wall_clock.now(),
                seq: 0,
                extra: Default::default(),
            };
            shared.own.lock().unwrap().written.push(id);
            let sent_at = Instant::now();
            shared.starting.send_replace(Some((id, sent_at)));
            match shared
                .store
                .put(&shared.key, record.to_bytes(), Metadata::new(), condition)
                .await
            {
                Ok(etag) => {
                    shared.own.lock().unwrap().landed = true;
                    let deadline = sent_at + shared.config.ttl.saturating_sub(shared.config.margin);
                    if Instant::now() >= deadline {
                        warn!(key = %shared.key, "heartbeat write answered after its own deadline; starting again");
                        continue;
                    }
                    info!(key = %shared.key, incarnation = %id, "session started");
                    self.count("started");
                    shared
                        .credited
                        .send_replace(Some((etag.clone(), record.clone(), deadline)));
                    let (tx, rx) = watch::channel(Status {
                        deadline,
                        lost: false,
                    });
                    let renewal =
                        tokio::spawn(renew(self.shared.clone(), record, etag, sent_at, tx));
                    return Ok(Arc::new(Incarnation {
                        id,
                        started_at: sent_at,
                        status: rx,
                        renewal,
                    }));
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    // Certainly not written (the retrying layer passes a
                    // 412 on only when no attempt of it can have landed).
                    shared.own.lock().unwrap().written.retain(|own| *own != id);
                    continue;
                }
                Err(StoreError::Ambiguous { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::transient(
            &shared.key,
            "the heartbeat kept changing while this machine started its session",
        ))
    }

    fn count(&self, outcome: &str) {
        count(&self.shared, outcome);
    }
}

fn count(shared: &Shared, outcome: &str) {
    if let Some(m) = &shared.metrics {
        m.heartbeat_writes.with_label_values(&[outcome]).inc();
    }
}

/// Renews the heartbeat every ttl/3 after the last credited send. Each
/// attempt gets its own short deadline (the next renewal slot, or the
/// incarnation's deadline if sooner), so that the retrying layer's backoff
/// cannot use up the whole ttl on one request.
async fn renew(
    shared: Arc<Shared>,
    mut record: HeartbeatRecord,
    mut etag: ETag,
    mut last_sent: Instant,
    tx: watch::Sender<Status>,
) {
    let config = &shared.config;
    let interval = config.renew_interval();
    // Writes sent but not (yet) known to have landed: a later 412 may turn
    // out to be one of them.
    let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut next = last_sent + interval;
    let incarnation = record.incarnation;
    let lose = |why: &str| {
        warn!(key = %shared.key, %incarnation, "{why}; every lease of this session is lost");
        shared.credited.send_replace(None);
        tx.send_modify(|s| s.lost = true);
    };
    loop {
        tokio::time::sleep_until(next).await;
        let deadline = tx.borrow().deadline;
        if Instant::now() >= deadline {
            count(&shared, "expired");
            lose("session deadline passed without a renewal (paused or cut off from the store)");
            return;
        }
        record.seq += 1;
        record.renewed_at = config.wall_clock.now();
        let sent_at = Instant::now();
        pending.push_back((record.seq, sent_at));
        if pending.len() > 16 {
            pending.pop_front();
        }
        let put = shared.store.put(
            &shared.key,
            record.to_bytes(),
            Metadata::new(),
            Precondition::IfMatch(etag.clone()),
        );
        let attempt_deadline = deadline.min(sent_at + interval);
        let credited = match tokio::time::timeout_at(attempt_deadline, put).await {
            Ok(Ok(new)) => Some((new, sent_at, record.clone())),
            Ok(Err(StoreError::PreconditionFailed { .. }))
            | Ok(Err(StoreError::Ambiguous { .. })) => {
                // Either an earlier attempt of ours landed late, or another
                // process wrote the heartbeat.
                let read = tokio::time::timeout_at(deadline, shared.store.get(&shared.key)).await;
                match read {
                    Ok(Ok(Some(object))) => {
                        match serde_json::from_slice::<HeartbeatRecord>(&object.body) {
                            Ok(current) if current.incarnation == record.incarnation => {
                                match pending.iter().find(|(seq, _)| *seq == current.seq) {
                                    Some((seq, sent)) => {
                                        record.seq = record.seq.max(*seq);
                                        Some((object.etag, *sent, current))
                                    }
                                    None => {
                                        count(&shared, "lost");
                                        lose(
                                            "the heartbeat names this session with a write it does not know",
                                        );
                                        return;
                                    }
                                }
                            }
                            Ok(current) => {
                                count(&shared, "lost");
                                error!(key = %shared.key, theirs = %current.incarnation, "another process with this machine id wrote the heartbeat");
                                *shared.displaced.lock().unwrap() = Some(current.incarnation);
                                lose("heartbeat taken over by another process (412)");
                                return;
                            }
                            Err(_) => {
                                count(&shared, "lost");
                                lose("heartbeat overwritten with something unreadable (412)");
                                return;
                            }
                        }
                    }
                    Ok(Ok(None)) => {
                        count(&shared, "lost");
                        lose("heartbeat deleted (412)");
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(key = %shared.key, error = %e, "cannot read the heartbeat after a 412; retrying");
                        None
                    }
                    Err(_) => None,
                }
            }
            Ok(Err(e)) => {
                count(&shared, "error");
                warn!(key = %shared.key, error = %e, "heartbeat renewal failed; retrying until the deadline");
                None
            }
            Err(_) => {
                count(&shared, "timeout");
                warn!(key = %shared.key, "heartbeat renewal did not answer in time; retrying until the deadline");
                None
            }
        };
        match credited {
            // Credited only if answered before the deadline in force (the
            // timeouts above ensure it; checked again for clarity).
            Some((new, sent, written)) if Instant::now() < deadline => {
                count(&shared, "ok");
                etag = new;
                last_sent = last_sent.max(sent);
                pending.retain(|(_, at)| *at > sent);
                let deadline = last_sent + config.ttl.saturating_sub(config.margin);
                tx.send_modify(|s| s.deadline = s.deadline.max(deadline));
                let deadline = tx.borrow().deadline;
                shared
                    .credited
                    .send_replace(Some((etag.clone(), written, deadline)));
                next = last_sent + interval;
            }
            Some(_) => {
                count(&shared, "expired");
                lose("heartbeat renewal answered after the session deadline");
                return;
            }
            None => {
                next = Instant::now() + (interval / 4).max(Duration::from_millis(10));
            }
        }
    }
}
