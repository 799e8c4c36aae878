//! Other machines' heartbeats as seen from this process, shared by every
//! tenant lock they hold: one read per holder machine per ttl/3, however
//! many of its tenants this process watches.
//!
//! Two times matter for the stale rule: `first_seen`, the moment an ETag
//! was first *answered* (no earlier than the write that made it was sent),
//! and `checked`, the moment the latest read that still saw it was *sent*
//! (no later than the store served it). A heartbeat is stale once
//! `checked - first_seen >= ttl`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::heartbeat::HeartbeatRecord;
use crate::store::{DynStore, ETag, StoreResult, keys};

/// A heartbeat as read.
#[derive(Clone, Debug)]
pub enum Beat {
    Missing,
    Unparsable,
    Live(HeartbeatRecord),
}

#[derive(Clone, Debug)]
pub struct Observation {
    pub beat: Beat,
    pub etag: Option<ETag>,
    pub first_seen: Instant,
    pub checked: Instant,
    /// Smallest recent (this machine's wall clock when a new heartbeat was
    /// first answered − its `renewed_at`): the holder's clock offset plus
    /// the shortest delay to see its writes. Only for scheduling reads.
    lag: VecDeque<chrono::Duration>,
}

/// New heartbeats remembered for [`Observation::next_beat`].
const LAG_SAMPLES: usize = 8;

impl Observation {
    /// How long this ETag is known to have stayed current.
    pub fn unchanged_for(&self) -> Duration {
        self.checked.saturating_duration_since(self.first_seen)
    }

    /// How long from now until this ETag may have been current for `ttl`
    /// (counted from when it was first seen, not from the cached read, so
    /// that a caller waiting this long reads again just in time).
    pub fn stale_in(&self, ttl: Duration) -> Duration {
        (self.first_seen + ttl).saturating_duration_since(Instant::now())
    }

    /// When the holder's next renewal should first be visible here, if it
    /// renews on time: its last `renewed_at` + ttl/3, moved onto this
    /// machine's clock by the smallest lag seen. A standby that reads just
    /// after it starts its observation of each heartbeat early, which is
    /// what keeps failover near one ttl at one read per ttl/3. Never used
    /// to decide anything, only when to look.
    pub fn next_beat(&self) -> Option<Instant> {
        let Beat::Live(record) = &self.beat else {
            return None;
        };
        let lag = self.lag.iter().min()?;
        let due =
            record.renewed_at + chrono::Duration::milliseconds(record.ttl_ms as i64 / 3) + *lag;
        let ahead = (due - chrono::Utc::now()).to_std().ok()?;
        Some(Instant::now() + ahead)
    }
}

/// Entries not looked at for this many refresh intervals are dropped.
const FORGET_AFTER: u32 = 30;

pub struct Observer {
    store: DynStore,
    refresh: Duration,
    machines: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Observation>>>>>,
}

impl Observer {
    pub fn new(store: DynStore, refresh: Duration) -> Observer {
        Observer {
            store,
            refresh,
            machines: Mutex::new(HashMap::new()),
        }
    }

    /// The last read of `machine`'s heartbeat, without reading it now.
    pub fn peek(&self, machine: &str) -> Option<Observation> {
        let cell = self.machines.lock().unwrap().get(machine)?.clone();
        cell.try_lock().ok()?.clone()
    }

    /// The heartbeat of `machine`, read again only when the cached read is
    /// older than the refresh interval, or when a read now could show it
    /// unchanged for `ttl` (the moment a takeover may be decided).
    pub async fn observe(&self, machine: &str, ttl: Duration) -> StoreResult<Observation> {
        self.observe_within(machine, ttl, self.refresh).await
    }

    /// [`Observer::observe`], reading again when the cached read is older
    /// than `max_age` (a standby that schedules its own reads).
    pub async fn observe_within(
        &self,
        machine: &str,
        ttl: Duration,
        max_age: Duration,
    ) -> StoreResult<Observation> {
        let cell = {
            let mut machines = self.machines.lock().unwrap();
            if machines.len() > 256 {
                let forget = self.refresh * FORGET_AFTER;
                machines.retain(|_, cell| {
                    cell.try_lock()
                        .map(|o| o.as_ref().is_some_and(|o| o.checked.elapsed() < forget))
                        .unwrap_or(true)
                });
            }
            machines.entry(machine.to_string()).or_default().clone()
        };
        let mut cached = cell.lock().await;
        let now = Instant::now();
        if let Some(seen) = cached.as_ref() {
            let decisive = now >= seen.first_seen + ttl && seen.checked < seen.first_seen + ttl;
            if now.saturating_duration_since(seen.checked) < max_age && !decisive {
                return Ok(seen.clone());
            }
        }
        let key = keys::heartbeat(machine);
        let sent = Instant::now();
        let object = self.store.get(&key).await?;
        let answered = Instant::now();
        let (beat, etag) = match object {
            None => (Beat::Missing, None),
            Some(object) => match serde_json::from_slice::<HeartbeatRecord>(&object.body) {
                Ok(record) => (Beat::Live(record), Some(object.etag)),
                Err(e) => {
                    warn!(key, error = %e, "heartbeat cannot be parsed; its holder's locks are only taken over when unchanged for a full ttl");
                    (Beat::Unparsable, Some(object.etag))
                }
            },
        };
        let unchanged = cached
            .as_ref()
            .is_some_and(|seen| seen.etag == etag && etag.is_some());
        let first_seen = match cached.as_ref() {
            Some(seen) if unchanged => seen.first_seen,
            _ => answered,
        };
        let mut lag = match (cached.as_ref(), &beat) {
            (Some(seen), Beat::Live(now)) => match &seen.beat {
                Beat::Live(was) if was.incarnation == now.incarnation => seen.lag.clone(),
                _ => VecDeque::new(),
            },
            _ => VecDeque::new(),
        };
        if let (Beat::Live(record), false) = (&beat, unchanged) {
            lag.push_back(chrono::Utc::now() - record.renewed_at);
            if lag.len() > LAG_SAMPLES {
                lag.pop_front();
            }
        }
        let seen = Observation {
            beat,
            etag,
            first_seen,
            checked: sent.max(first_seen),
            lag,
        };
        *cached = Some(seen.clone());
        Ok(seen)
    }
}
