//! Holder push: after each confirmed upload the holder POSTs the log
//! object it wrote (the exact bytes in its slot) to the followers that
//! asked it for its position lately, so a follower in steady state reads
//! no store object per commit. A follower applies a pushed object only if
//! it continues its replica (the next slot), through the same
//! [`Replayed::extend`](crate::tenant::log::Replayed::extend) as a log
//! read: chain, epoch and token rules alike. Anything else (a gap, a
//! restart) is left to the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;

use super::transport::Peers;
use crate::TenantId;
use crate::lease::{HeartbeatRecord, Session};
use crate::store::ETag;
use crate::store::{Metadata, keys};
use crate::tenant::TenantHandle;
use crate::tenant::actor::ConfirmedSlot;
use crate::tenant::log::{self, Fetched};

/// A follower keeps receiving pushes this long after its last position
/// query.
const REGISTRATION: Duration = Duration::from_secs(60);
/// One push's bound; a follower that misses it reads the log instead.
pub(super) const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The holder's heartbeat ETag as of a push ([`Session::vouch`]).
pub const HEARTBEAT_ETAG_KEY: &str = "tenantd-heartbeat-etag";
/// The heartbeat record that ETag names, as base64 of its JSON.
pub const HEARTBEAT_KEY: &str = "tenantd-heartbeat";

/// The metadata a push carries as headers.
pub const PUSHED_HEADERS: [&str; 6] = [
    log::SEQ_KEY,
    log::EPOCH_KEY,
    log::TOKEN_KEY,
    log::HOLDER_KEY,
    HEARTBEAT_ETAG_KEY,
    HEARTBEAT_KEY,
];

/// The internal route a follower accepts pushes on.
pub fn push_path(id: &TenantId) -> String {
    format!("/_internal/tenants/{id}/push")
}

/// Followers registered with this holder, per tenant, and the machines
/// they run on, which get each heartbeat renewal once whatever the number
/// of tenants they follow here.
#[derive(Default)]
pub struct Pushes {
    tenants: Mutex<HashMap<TenantId, Arc<PushSet>>>,
    beats: Arc<Beats>,
}

/// Follower addresses registered lately, each with a tenant it follows
/// (the push route names one).
#[derive(Default)]
struct Beats {
    followers: Mutex<HashMap<String, (TenantId, Instant)>>,
    running: std::sync::atomic::AtomicBool,
}

struct PushSet {
    /// The acquisition whose commits are pushed.
    epoch: u64,
    followers: Mutex<HashMap<String, Instant>>,
    running: std::sync::atomic::AtomicBool,
}

impl Pushes {
    /// Registers `addr` for `id`'s commits at this holder.
    pub fn register(
        &self,
        id: &TenantId,
        handle: &TenantHandle,
        addr: String,
        peers: &Arc<dyn Peers>,
        session: Option<Session>,
    ) {
        use std::sync::atomic::Ordering;
        let set = {
            let mut tenants = self.tenants.lock().unwrap();
            let set = tenants.entry(id.clone()).or_insert_with(|| new_set(handle));
            if set.epoch != handle.epoch() || !set.running.load(Ordering::SeqCst) {
                *set = new_set(handle);
            }
            set.clone()
        };
        set.followers
            .lock()
            .unwrap()
            .insert(addr.clone(), Instant::now());
        if !set.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(push_loop(
                set,
                handle.commits(),
                id.clone(),
                peers.clone(),
                session.clone(),
            ));
        }
        let Some(session) = session else {
            return;
        };
        self.beats
            .followers
            .lock()
            .unwrap()
            .insert(addr, (id.clone(), Instant::now()));
        if !self.beats.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(beat_loop(self.beats.clone(), session, peers.clone()));
        }
    }
}

fn new_set(handle: &TenantHandle) -> Arc<PushSet> {
    Arc::new(PushSet {
        epoch: handle.epoch(),
        followers: Mutex::new(HashMap::new()),
        running: std::sync::atomic::AtomicBool::new(false),
    })
}

/// Pushes each confirmed slot to every registered follower, in slot order
/// per follower, with this machine's heartbeat as of the push; ends with
/// the actor, or when no follower is left.
async fn push_loop(
    set: Arc<PushSet>,
    mut commits: broadcast::Receiver<Arc<ConfirmedSlot>>,
    id: TenantId,
    peers: Arc<dyn Peers>,
    session: Option<Session>,
) {
    loop {
        let slot = match commits.recv().await {
            Ok(slot) => slot,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => break,
        };
        let targets: Vec<String> = {
            let mut followers = set.followers.lock().unwrap();
            followers.retain(|_, at| at.elapsed() < REGISTRATION);
            followers.keys().cloned().collect()
        };
        if targets.is_empty() {
            break;
        }
        let slot = match vouched(session.as_ref()) {
            Some(beat) => {
                let mut metadata = slot.metadata.clone();
                metadata.extend(beat);
                Arc::new(ConfirmedSlot {
                    seq: slot.seq,
                    body: slot.body.clone(),
                    metadata,
                })
            }
            None => slot,
        };
        let sends = targets
            .iter()
            .map(|addr| tokio::time::timeout(PUSH_TIMEOUT, peers.push(&id, addr, &slot)));
        futures::future::join_all(sends).await;
    }
    set.running
        .store(false, std::sync::atomic::Ordering::SeqCst);
}

/// Pushes each heartbeat renewal, as it is credited, to every machine
/// with a follower registered here (a push without a slot), so that a
/// follower's standby learns of renewals without reading them even when
/// no commit follows; ends when no follower is left.
async fn beat_loop(beats: Arc<Beats>, session: Session, peers: Arc<dyn Peers>) {
    let mut renewals = session.renewals();
    while renewals.changed().await.is_ok() {
        let targets: Vec<(String, TenantId)> = {
            let mut followers = beats.followers.lock().unwrap();
            followers.retain(|_, (_, at)| at.elapsed() < REGISTRATION);
            followers
                .iter()
                .map(|(addr, (id, _))| (addr.clone(), id.clone()))
                .collect()
        };
        if targets.is_empty() {
            break;
        }
        let Some(metadata) = vouched(Some(&session)) else {
            continue;
        };
        let beat = ConfirmedSlot {
            seq: 0,
            body: Bytes::new(),
            metadata,
        };
        let sends = targets
            .iter()
            .map(|(addr, id)| tokio::time::timeout(PUSH_TIMEOUT, peers.push(id, addr, &beat)));
        futures::future::join_all(sends).await;
    }
    beats
        .running
        .store(false, std::sync::atomic::Ordering::SeqCst);
}

/// Whether a push carries no slot, only its holder's heartbeat.
pub fn beat_only(headers: &Metadata, body: &[u8]) -> bool {
    body.is_empty() && !headers.contains_key(log::SEQ_KEY)
}

/// The headers that carry this machine's heartbeat as its session vouches
/// for it now; none without a valid session, or for an ETag that cannot
/// travel as a header.
fn vouched(session: Option<&Session>) -> Option<Metadata> {
    use base64::Engine;
    let (etag, record) = session?.vouch()?;
    if !etag.0.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let json = serde_json::to_vec(&record).expect("heartbeat records serialize");
    let mut metadata = Metadata::new();
    metadata.insert(HEARTBEAT_ETAG_KEY.into(), etag.0);
    metadata.insert(
        HEARTBEAT_KEY.into(),
        base64::engine::general_purpose::STANDARD.encode(json),
    );
    Some(metadata)
}

/// The heartbeat a push vouches for, if it carries a readable one.
pub fn heartbeat(headers: &Metadata) -> Option<(ETag, HeartbeatRecord)> {
    use base64::Engine;
    let etag = headers.get(HEARTBEAT_ETAG_KEY)?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(headers.get(HEARTBEAT_KEY)?)
        .ok()?;
    let record = serde_json::from_slice(&json).ok()?;
    Some((ETag(etag.clone()), record))
}

/// A pushed object as a follower decodes it: the same checks as a log
/// object read from its slot (magic, CRC, slot number).
pub async fn decode(id: &TenantId, headers: &Metadata, body: Bytes) -> Result<Fetched, String> {
    let seq = log::number(headers, log::SEQ_KEY)
        .ok_or_else(|| format!("a push needs a numeric {} header", log::SEQ_KEY))?;
    let key = keys::log_slot(id.as_str(), seq);
    let token = headers.get(log::TOKEN_KEY).cloned();
    let bytes = body.len() as u64;
    let delta = tokio::task::spawn_blocking(move || {
        crate::tenant::delta::Delta::decode(&key, &body).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Fetched {
        delta,
        token,
        bytes,
    })
}
