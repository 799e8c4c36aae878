//! Follower reads: a machine of a tenant that does not hold it answers
//! read-only requests from a replica that follows the tenant's log
//! ([`replica`]), never weaker than the request asks ([`bookmark`]):
//!
//! - with a bookmark: from state at least that new;
//! - with nothing: from state that holds every write acknowledged before
//!   the request arrived. The follower asks the holder for its confirmed
//!   slot (Raft's ReadIndex: the holder answers only while its lease is
//!   valid) and catches up to it from the log; when the holder does not
//!   answer (it is gone, or deposed), it reads the log to its end, where
//!   every acknowledged write is;
//! - with `tenantd-max-staleness`: at once, if the replica held every
//!   acknowledged write no longer ago than that.
//!
//! Whatever cannot be answered within a short bound goes to the holder
//! as before.

pub mod bookmark;
pub mod push;
mod read;
mod replica;
pub mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use tokio::time::Instant;
use tracing::debug;

use crate::TenantId;
use crate::lease::LockRecord;
use crate::store::DynStore;
use crate::tenant::TenantHandle;
use crate::tenant::sql::hrana::Program;
use crate::tenant::sql::{SqlError, SqlLimits, SqlRequest};
use bookmark::Wanted;
use read::RunError;
use replica::{Replica, Target};

/// How long a follower tries before the holder answers instead.
const CATCH_UP_BOUND: Duration = Duration::from_secs(1);
/// How long the holder has to say where it is.
const POSITION_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a reader waits for the holder's push before reading the log.
const PUSH_WAIT: Duration = Duration::from_millis(100);
/// A replica unused this long is dropped.
const IDLE: Duration = Duration::from_secs(300);
/// Most replicas one machine keeps.
const MAX_REPLICAS: usize = 64;

/// The internal route a holder answers its confirmed slot on.
pub fn position_path(id: &TenantId) -> String {
    format!("/_internal/tenants/{id}/position")
}

/// The holder pushes what it confirmed: in steady state a slot a reader
/// needs is here, or about to be. Waits a little for it before the log is
/// read (only for a replica that exists: a new one is built from the store).
async fn await_push(replica: &Replica, slot: u64) {
    if replica.state.read().await.is_none() {
        return;
    }
    let mut applied = replica.applied.subscribe();
    let _ = tokio::time::timeout(PUSH_WAIT, applied.wait_for(|s| *s >= slot)).await;
}

/// A query parameter value with the characters of an address escaped.
fn query_value(text: &str) -> String {
    text.replace('%', "%25")
        .replace('[', "%5B")
        .replace(']', "%5D")
        .replace(':', "%3A")
        .replace('&', "%26")
}

/// Where a read-only request for a tenant may be answered.
pub enum ReadRoute {
    /// This machine holds it.
    Local(TenantHandle),
    /// Another machine holds it (or held it last and may be gone).
    Follow(LockRecord),
    /// Route it as any request.
    Normal,
}

/// A read answered by a follower.
pub struct FollowerAnswer {
    pub results: Arc<Json>,
    /// The replica's slot when it answered.
    pub slot: u64,
}

pub enum FollowError {
    /// The request's own error, answered as the holder would.
    Refused(SqlError),
    /// The replica could not answer in time: the holder answers.
    Behind(String),
}

pub struct Followers {
    store: DynStore,
    /// This machine's address, for holders to push to.
    advertise: String,
    /// Followers of tenants this machine holds.
    pub pushes: push::Pushes,
    dir: PathBuf,
    /// How this machine reaches holders and followers.
    peers: Arc<dyn transport::Peers>,
    api_token: Option<String>,
    limits: SqlLimits,
    replicas: Mutex<HashMap<TenantId, Arc<Replica>>>,
    /// Per tenant, the epoch of the last push received and when: a holder
    /// that pushes is alive and holds that epoch's lease.
    pushed: Mutex<HashMap<TenantId, (u64, Instant)>>,
    counted: prometheus::IntCounterVec,
    /// This machine's session: its heartbeat goes with each push, and
    /// holders' heartbeats that come with theirs go to its observer.
    session: std::sync::OnceLock<crate::lease::Session>,
}

impl Followers {
    pub fn new(
        store: DynStore,
        data_dir: PathBuf,
        machine_id: &str,
        advertise: String,
        api_token: Option<String>,
        limits: SqlLimits,
        metrics: &crate::metrics::Metrics,
    ) -> Followers {
        Followers {
            store,
            advertise,
            pushes: push::Pushes::default(),
            dir: data_dir.join(machine_id).join("followers"),
            peers: Arc::new(transport::Http::new(POSITION_TIMEOUT, api_token.clone())),
            api_token,
            limits,
            replicas: Mutex::new(HashMap::new()),
            pushed: Mutex::new(HashMap::new()),
            counted: metrics.follower_slots.clone(),
            session: std::sync::OnceLock::new(),
        }
    }

    /// Answers a read-only request from this machine's replica of `id`,
    /// held by `holder`'s machine.
    pub async fn read(
        &self,
        id: &TenantId,
        request: Arc<SqlRequest>,
        wanted: Wanted,
        holder: &LockRecord,
    ) -> Result<FollowerAnswer, FollowError> {
        let limits = self.limits.clone();
        self.answer(id, wanted, holder, move |path| {
            read::run(path, &request, &limits)
        })
        .await
    }

    /// Answers a Hrana pipeline that may run on a replica
    /// ([`Program::may_run_on_replica`]) as [`Followers::read`] does a
    /// `/sql` request; `Behind` when it turns out to write.
    pub async fn read_hrana(
        &self,
        id: &TenantId,
        program: Arc<Program>,
        wanted: Wanted,
        holder: &LockRecord,
    ) -> Result<FollowerAnswer, FollowError> {
        let limits = self.limits.clone();
        self.answer(id, wanted, holder, move |path| {
            read::run_hrana(path, &program, &limits)
        })
        .await
    }

    /// Brings the replica to the state `wanted` asks for, then `run`s the
    /// request on it under its read lock.
    async fn answer(
        &self,
        id: &TenantId,
        wanted: Wanted,
        holder: &LockRecord,
        run: impl FnOnce(&std::path::Path) -> Result<Json, RunError> + Send + 'static,
    ) -> Result<FollowerAnswer, FollowError> {
        let replica = self.replica(id);
        let deadline = Instant::now() + CATCH_UP_BOUND;
        let ready = {
            let state = replica.state.read().await;
            state.as_ref().is_some_and(|state| {
                let fresh = wanted
                    .max_staleness
                    .is_some_and(|bound| state.fresh_at.is_some_and(|at| at.elapsed() <= bound));
                match (wanted.bookmark, wanted.max_staleness) {
                    (Some(slot), None) => state.slot() >= slot,
                    // Both asked: both hold, or the replica refreshes.
                    (Some(slot), Some(_)) => state.slot() >= slot && fresh,
                    (None, _) => fresh,
                }
            })
        };
        if !ready {
            let target = match (wanted.bookmark, wanted.max_staleness) {
                (Some(slot), None) => {
                    await_push(&replica, slot).await;
                    Target::Slot(slot)
                }
                (bookmark, _) => {
                    let asked = Instant::now();
                    match self.position(id, holder).await {
                        Ok(slot) => {
                            // A follower's bookmark may name a slot read
                            // from the log before its holder confirmed it.
                            let slot = slot.max(bookmark.unwrap_or(0));
                            await_push(&replica, slot).await;
                            self.catch_up(&replica, Target::Slot(slot), deadline)
                                .await?;
                            let mut state = replica.state.write().await;
                            if let Some(state) = state.as_mut() {
                                state.fresh_at =
                                    Some(state.fresh_at.map_or(asked, |at| at.max(asked)));
                            }
                            Target::Slot(slot)
                        }
                        Err(why) => {
                            debug!(customer_id = %id, why, "the holder did not say where it is; reading the log to its end");
                            Target::LogEnd { asked }
                        }
                    }
                }
            };
            self.catch_up(&replica, target, deadline).await?;
        }
        let state = replica.state.clone().read_owned().await;
        let Some(slot) = state.as_ref().map(|s| s.slot()) else {
            return Err(FollowError::Behind(format!(
                "customer {id}: the replica was dropped"
            )));
        };
        let path = replica.path.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let ran = run(&path);
            drop(state);
            ran
        })
        .await
        .map_err(|e| FollowError::Behind(e.to_string()))?;
        match ran {
            Ok(results) => Ok(FollowerAnswer {
                results: Arc::new(results),
                slot,
            }),
            Err(RunError::Refused(e)) => Err(FollowError::Refused(e)),
            Err(RunError::Failed(why)) => Err(FollowError::Behind(why)),
        }
    }

    async fn catch_up(
        &self,
        replica: &Arc<Replica>,
        target: Target,
        deadline: Instant,
    ) -> Result<u64, FollowError> {
        replica
            .catch_up(&self.store, target, deadline)
            .await
            .map_err(|e| FollowError::Behind(e.to_string()))
    }

    /// Reaches holders and followers through `peers` rather than HTTP
    /// (the service simulation's network).
    pub fn with_peers(mut self, peers: Arc<dyn transport::Peers>) -> Followers {
        self.peers = peers;
        self
    }

    /// The holder's confirmed slot, asked over the private network.
    async fn position(&self, id: &TenantId, holder: &LockRecord) -> Result<u64, String> {
        match tokio::time::timeout(
            POSITION_TIMEOUT,
            self.peers.position(id, holder, &self.advertise),
        )
        .await
        {
            Ok(answer) => answer,
            Err(_) => Err(format!("{} did not say where it is in time", holder.addr)),
        }
    }

    /// On the holder: its confirmed slot and epoch for a follower's
    /// ReadIndex, asked through the actor, which refuses once its lease is
    /// not valid (a deposed holder never names a position that misses its
    /// successor's acknowledged writes). Registers `follower` for pushes.
    pub async fn answer_position(
        &self,
        id: &TenantId,
        handle: &TenantHandle,
        follower: Option<&str>,
    ) -> Result<(u64, u64), crate::tenant::TenantError> {
        let answer = handle.call(crate::tenant::Op::Read).await?;
        if let Some(addr) = follower.filter(|a| !a.is_empty()) {
            self.register(id, handle, addr.to_string());
        }
        Ok((handle.confirmed(), answer.epoch))
    }

    /// Registers a follower of a tenant this machine holds for pushes.
    pub fn register(&self, id: &TenantId, handle: &TenantHandle, addr: String) {
        if self.peers.pushes() {
            let session = self.session.get().cloned();
            self.pushes.register(id, handle, addr, &self.peers, session);
        }
    }

    /// The session of the machine these followers run on (set once, by
    /// the registry that owns it).
    pub fn use_session(&self, session: crate::lease::Session) {
        let _ = self.session.set(session);
    }

    /// A pushed log object: applied when it is the replica's next slot.
    pub async fn accept(
        &self,
        id: &TenantId,
        metadata: &crate::store::Metadata,
        body: bytes::Bytes,
    ) -> Result<bool, String> {
        // The holder's renewal, learnt without a read: a standby of this
        // tenant (or of any other of that holder's) skips its next poll.
        if let (Some(session), Some((etag, record))) =
            (self.session.get(), push::heartbeat(metadata))
        {
            session.observer().learn(etag, record);
        }
        if push::beat_only(metadata, &body) {
            return Ok(false);
        }
        let Some(replica) = self.replicas.lock().unwrap().get(id).cloned() else {
            return Ok(false);
        };
        let fetched = push::decode(id, metadata, body).await?;
        if let Some(epoch) = crate::tenant::log::number(metadata, crate::tenant::log::EPOCH_KEY) {
            self.pushed
                .lock()
                .unwrap()
                .insert(id.clone(), (epoch, Instant::now()));
        }
        Ok(replica.accept(fetched).await)
    }

    /// The epoch of `id`'s holder as its pushes (API token checked,
    /// object decoded) named it within `within`: while a holder pushes,
    /// routing needs no read of the lock to know who it is.
    pub fn pushed_epoch(&self, id: &TenantId, within: Duration) -> Option<u64> {
        let pushed = self.pushed.lock().unwrap();
        let (epoch, at) = pushed.get(id)?;
        (at.elapsed() < within).then_some(*epoch)
    }

    /// Copies this machine's replica of `id` to `dest` for a takeover
    /// ([`crate::tenant::prefetch`]).
    pub(crate) async fn copy_replica(
        &self,
        id: &TenantId,
        dest: &std::path::Path,
    ) -> Option<(crate::tenant::delta::PageSums, crate::tenant::log::Replayed)> {
        let replica = self.replicas.lock().unwrap().get(id).cloned()?;
        replica.copy_to(dest).await
    }

    pub fn api_token(&self) -> Option<&str> {
        self.api_token.as_deref()
    }

    /// Drops idle replicas every minute, as an idle holder drops its copy.
    pub fn sweep_idle(self: &Arc<Self>) {
        let followers = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(followers) = followers.upgrade() else {
                    return;
                };
                let mut replicas = followers.replicas.lock().unwrap();
                followers.prune(&mut replicas);
                followers
                    .pushed
                    .lock()
                    .unwrap()
                    .retain(|id, _| replicas.contains_key(id));
            }
        });
    }

    /// This machine's replica of `id`; drops idle ones.
    fn replica(&self, id: &TenantId) -> Arc<Replica> {
        let mut replicas = self.replicas.lock().unwrap();
        if let Some(replica) = replicas.get(id) {
            *replica.last_used.lock().unwrap() = Instant::now();
            return replica.clone();
        }
        self.prune(&mut replicas);
        let path = self.dir.join(format!("{id}.sqlite3"));
        let replica = Arc::new(Replica::new(id.clone(), path, self.counted.clone()));
        replicas.insert(id.clone(), replica.clone());
        replica
    }

    /// Drops replicas idle for [`IDLE`], and the least recently used
    /// beyond [`MAX_REPLICAS`]; one in use is kept.
    fn prune(&self, replicas: &mut HashMap<TenantId, Arc<Replica>>) {
        let mut by_use: Vec<(Instant, TenantId)> = replicas
            .iter()
            .filter(|(_, r)| Arc::strong_count(r) == 1)
            .map(|(id, r)| (*r.last_used.lock().unwrap(), id.clone()))
            .collect();
        by_use.sort();
        // Room for one more: called before a replica is added.
        let excess = replicas.len().saturating_sub(MAX_REPLICAS - 1);
        for (n, (used, id)) in by_use.into_iter().enumerate() {
            if (n < excess || used.elapsed() > IDLE)
                && let Some(replica) = replicas.remove(&id)
            {
                let _ = std::fs::remove_file(&replica.path);
            }
        }
    }
}
