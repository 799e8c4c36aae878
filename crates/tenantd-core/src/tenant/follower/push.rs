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
use crate::store::{Metadata, keys};
use crate::tenant::TenantHandle;
use crate::tenant::actor::ConfirmedSlot;
use crate::tenant::log::{self, Fetched};

/// A follower keeps receiving pushes this long after its last position
/// query.
const REGISTRATION: Duration = Duration::from_secs(60);
/// One push's bound; a follower that misses it reads the log instead.
pub(super) const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The metadata a push carries as headers.
pub const PUSHED_HEADERS: [&str; 4] = [
    log::SEQ_KEY,
    log::EPOCH_KEY,
    log::TOKEN_KEY,
    log::HOLDER_KEY,
];

/// The internal route a follower accepts pushes on.
pub fn push_path(id: &TenantId) -> String {
    format!("/_internal/tenants/{id}/push")
}

/// Followers registered with this holder, per tenant.
#[derive(Default)]
pub struct Pushes {
    tenants: Mutex<HashMap<TenantId, Arc<PushSet>>>,
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
        set.followers.lock().unwrap().insert(addr, Instant::now());
        if !set.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(push_loop(set, handle.commits(), id.clone(), peers.clone()));
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
/// per follower; ends with the actor, or when no follower is left.
async fn push_loop(
    set: Arc<PushSet>,
    mut commits: broadcast::Receiver<Arc<ConfirmedSlot>>,
    id: TenantId,
    peers: Arc<dyn Peers>,
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
        let sends = targets
            .iter()
            .map(|addr| tokio::time::timeout(PUSH_TIMEOUT, peers.push(&id, addr, &slot)));
        futures::future::join_all(sends).await;
    }
    set.running
        .store(false, std::sync::atomic::Ordering::SeqCst);
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
