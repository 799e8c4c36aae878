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

    /// A heartbeat its machine vouched for in a push ([`crate::lease::Session::vouch`]):
    /// a new ETag is taken as first seen now, as if a read had just
    /// answered it. Safe for the stale rule because the push left after
    /// the write that made the ETag was sent; `checked` moves only with a
    /// store read of the same ETag, so a takeover is still decided by a
    /// read that saw the heartbeat unchanged for a ttl. A push never
    /// overwrites a newer heartbeat (by `renewed_at`, the holder's own
    /// clock) nor waits for a read in flight.
    pub fn learn(&self, etag: ETag, record: HeartbeatRecord) {
        let cell = self.cell(&record.machine_id);
        let Ok(mut cached) = cell.try_lock() else {
            return;
        };
        if let Some(seen) = cached.as_ref() {
            if seen.etag.as_ref() == Some(&etag) {
                return;
            }
            if let Beat::Live(was) = &seen.beat
                && was.renewed_at >= record.renewed_at
            {
                return;
            }
        }
        let lag = lag_with(cached.as_ref(), &record);
        let now = Instant::now();
        *cached = Some(Observation {
            beat: Beat::Live(record),
            etag: Some(etag),
            first_seen: now,
            checked: now,
            lag,
        });
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
        self.observe_inner(machine, ttl, max_age, false).await
    }

    /// [`Observer::observe_within`] for a standby's poll, which also keeps
    /// a read up to one refresh interval old while the holder's next
    /// renewal is not due yet ([`Observation::next_beat`]): a read then
    /// could only show what is known. With pushes vouching for each
    /// renewal as it happens, a standby of a busy tenant reads nothing.
    pub async fn observe_until_due(
        &self,
        machine: &str,
        ttl: Duration,
        max_age: Duration,
    ) -> StoreResult<Observation> {
        self.observe_inner(machine, ttl, max_age, true).await
    }

    async fn observe_inner(
        &self,
        machine: &str,
        ttl: Duration,
        max_age: Duration,
        until_due: bool,
    ) -> StoreResult<Observation> {
        let cell = self.cell(machine);
        let mut cached = cell.lock().await;
        let now = Instant::now();
        if let Some(seen) = cached.as_ref() {
            let decisive = now >= seen.first_seen + ttl && seen.checked < seen.first_seen + ttl;
            let age = now.saturating_duration_since(seen.checked);
            // Bounded by the refresh interval: a holder's clock that jumps
            // ahead moves its next beat, never the polls' pace.
            let not_due =
                until_due && age < self.refresh && seen.next_beat().is_some_and(|due| now < due);
            if (age < max_age || not_due) && !decisive {
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
        let lag = match &beat {
            Beat::Live(record) if !unchanged => lag_with(cached.as_ref(), record),
            // The same ETag: the same record, and its samples.
            Beat::Live(_) => cached
                .as_ref()
                .map(|seen| seen.lag.clone())
                .unwrap_or_default(),
            _ => VecDeque::new(),
        };
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

    /// The cached observation of `machine`, made empty if there is none;
    /// entries long unread are dropped once there are many.
    fn cell(&self, machine: &str) -> Arc<tokio::sync::Mutex<Option<Observation>>> {
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
    }
}

/// The lag samples after a new heartbeat `record` was first seen now: the
/// earlier ones of the same incarnation, and this one.
fn lag_with(seen: Option<&Observation>, record: &HeartbeatRecord) -> VecDeque<chrono::Duration> {
    let mut lag = match seen.map(|seen| (&seen.beat, &seen.lag)) {
        Some((Beat::Live(was), lag)) if was.incarnation == record.incarnation => lag.clone(),
        _ => VecDeque::new(),
    };
    lag.push_back(chrono::Utc::now() - record.renewed_at);
    if lag.len() > LAG_SAMPLES {
        lag.pop_front();
    }
    lag
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Metadata, Precondition};

    const TTL: Duration = Duration::from_secs(3);

    fn record(seq: u64, renewed_at: chrono::DateTime<chrono::Utc>) -> HeartbeatRecord {
        HeartbeatRecord {
            machine_id: "h".into(),
            incarnation: uuid::Uuid::nil(),
            addr: "127.0.0.1:1".into(),
            ttl_ms: TTL.as_millis() as u64,
            renewed_at,
            seq,
            extra: Default::default(),
        }
    }

    async fn write(store: &DynStore, record: &HeartbeatRecord) -> ETag {
        store
            .put(
                &keys::heartbeat("h"),
                record.to_bytes(),
                Metadata::new(),
                Precondition::None,
            )
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pushed_heartbeat_is_first_seen_on_arrival_and_only_a_read_makes_it_stale() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let observer = Observer::new(store.clone(), TTL / 3);
        let first = record(1, chrono::Utc::now());
        let etag = write(&store, &first).await;
        observer.learn(etag.clone(), first.clone());
        let seen = observer.peek("h").unwrap();
        assert_eq!(seen.etag.as_ref(), Some(&etag));
        assert_eq!(seen.unchanged_for(), Duration::ZERO);
        // Pushes of the same heartbeat for a whole ttl: each vouches, none
        // counts as having seen it still current.
        for _ in 0..10 {
            tokio::time::advance(TTL / 10).await;
            observer.learn(etag.clone(), first.clone());
        }
        let seen = observer.peek("h").unwrap();
        assert_eq!(
            seen.unchanged_for(),
            Duration::ZERO,
            "a push moved `checked`"
        );
        // The read that may decide a takeover is a store read.
        let read = observer.observe_within("h", TTL, TTL).await.unwrap();
        assert!(read.unchanged_for() >= TTL, "{read:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_push_never_replaces_a_newer_heartbeat() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let observer = Observer::new(store.clone(), TTL / 3);
        let old = record(1, chrono::Utc::now() - chrono::Duration::seconds(1));
        let old_etag = write(&store, &old).await;
        let new = record(2, chrono::Utc::now());
        let new_etag = write(&store, &new).await;
        observer.observe("h", TTL).await.unwrap();
        observer.learn(old_etag, old);
        assert_eq!(observer.peek("h").unwrap().etag, Some(new_etag));
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_skips_reads_until_a_renewal_is_due_and_never_for_longer_than_one_interval() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let observer = Observer::new(store.clone(), TTL / 3);
        let max_age = TTL / 9;
        // Renewed just now: past max_age but before the next renewal,
        // a read could show nothing new.
        let first = record(1, chrono::Utc::now());
        observer.learn(write(&store, &first).await, first);
        tokio::time::advance(max_age * 2).await;
        assert!(
            !store_reads(&observer, max_age).await,
            "read although no renewal was due"
        );
        // The paused clock moves, the wall clock does not: to the observer
        // the holder's next renewal stays a third of a ttl ahead, as if its
        // clock had jumped. One refresh interval on, it reads all the same.
        tokio::time::advance(TTL / 3).await;
        assert!(
            store_reads(&observer, max_age).await,
            "no read one refresh interval after the last"
        );
    }

    /// Whether a standby's poll now reads the store.
    async fn store_reads(observer: &Observer, max_age: Duration) -> bool {
        let was = observer.peek("h").unwrap().checked;
        let seen = observer.observe_until_due("h", TTL, max_age).await.unwrap();
        seen.checked != was
    }
}
