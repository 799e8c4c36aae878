//! How a release ends: with a snapshot that holds every acknowledged write,
//! or with the log. Every acknowledged commit is already in the log, so the
//! snapshot is an optimisation for the next holder; a release never waits
//! past its budget for one. Without a current snapshot the `released`
//! record names the last confirmed slot (`log_end`) and the next holder
//! replays the log after the snapshot, fencing as every takeover does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::TenantActor;
use super::upload::MIN_UPLOAD_BYTES_PER_SEC;
use crate::lease::LockRecord;

/// Databases up to this size are brought up to date whenever the budget
/// allows: their upload costs little more than a round trip, and a
/// snapshot that alone holds the tenant is what `sqlite3` on the object
/// and the next cold start read fastest.
const SMALL_DATABASE: u64 = 64 << 20;
/// Above [`SMALL_DATABASE`], deltas under this fraction of the database
/// go to the next holder in the log: it reads them in a fraction of the
/// time the snapshot would take to upload now, and the background
/// compaction still bounds the log (`--compact-after`, a quarter of the
/// database).
const DELTA_SHARE: u64 = 16;
/// The least the `released` lock write keeps of the budget.
const LOCK_WRITE_RESERVE: Duration = Duration::from_millis(250);

/// The measured speed of this holder's compactions (bytes of database per
/// second, all of a compaction's transfers included): 0 until one of at
/// least a MiB has finished. Shared with the compaction task.
#[derive(Clone, Default)]
pub(super) struct CompactionSpeed(Arc<AtomicU64>);

impl CompactionSpeed {
    pub(super) fn record(&self, bytes: u64, took: Duration) {
        // Below a MiB the round trip, not the bandwidth, decides.
        if bytes >= 1 << 20 && !took.is_zero() {
            let speed = bytes as f64 / took.as_secs_f64();
            self.0.store(speed as u64, Ordering::Relaxed);
        }
    }

    fn get(&self) -> Option<f64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            speed => Some(speed as f64),
        }
    }
}

/// When the release's snapshot must be confirmed, for a release that
/// began at `stopped` with `budget` for all of it: the `released` lock
/// write (one conditional PUT of a few hundred bytes, perhaps a retry)
/// keeps a quarter of the budget, at least [`LOCK_WRITE_RESERVE`]; the
/// drain's linger comes after the budget (server.rs).
pub(super) fn snapshot_deadline(stopped: Instant, budget: Duration) -> Instant {
    let reserve = (budget / 4).max(LOCK_WRITE_RESERVE).min(budget);
    stopped + (budget - reserve)
}

/// Whether a release tries to bring the snapshot up to date.
#[derive(Debug, PartialEq)]
pub(super) enum Plan {
    Snapshot,
    /// Release with the log, for this reason.
    Log(String),
}

/// The release's choice, before any transfer: the log when the deltas are
/// small beside a big database (cheaper for the next holder to read than
/// the snapshot is to write now), or when the database cannot upload
/// before `left` runs out at the measured compaction speed (at
/// [`MIN_UPLOAD_BYTES_PER_SEC`] before one is measured).
pub(super) fn plan(
    db_bytes: u64,
    delta_bytes: u64,
    speed: Option<f64>,
    left: Option<Duration>,
) -> Plan {
    if db_bytes > SMALL_DATABASE && delta_bytes.saturating_mul(DELTA_SHARE) < db_bytes {
        return Plan::Log(format!(
            "{delta_bytes} bytes of deltas beside a {db_bytes}-byte database: the next holder reads them for less than the snapshot costs"
        ));
    }
    let Some(left) = left else {
        return Plan::Snapshot;
    };
    let speed = speed.unwrap_or(MIN_UPLOAD_BYTES_PER_SEC);
    let needs = Duration::from_secs_f64(db_bytes as f64 / speed);
    if needs > left {
        return Plan::Log(format!(
            "a {db_bytes}-byte snapshot needs about {needs:?} at {:.1} MB/s; the release has {left:?}",
            speed / 1e6
        ));
    }
    Plan::Snapshot
}

/// Compares where this claim found the log's end, without its own objects
/// (fences it wrote before reading again, when the snapshot changed under
/// it, are its own, not the previous holder's), with what the lock it
/// replaced said when it was released with its log. A release drains its
/// uploads first and nothing but the next holder writes after it, so they
/// agree; the hint decided nothing here (the fences did), so a mismatch is
/// only reported: an end before the hint means confirmed slots are gone
/// from the store, one after it a release that misnamed its end.
pub(super) fn check_log_end(
    id: &crate::TenantId,
    ctx: &super::ActorContext,
    previous: Option<&LockRecord>,
    end: u64,
) {
    let Some(hint) = previous.filter(|r| r.released).and_then(|r| r.log_end) else {
        return;
    };
    if end != hint {
        ctx.metrics.release_log_end_mismatches.inc();
        warn!(customer_id = %id, log_end = hint, found = end, "the released lock named another end of the log than this claim found after its fences (a store that lost slots, or a release that misnamed its end); the fences decided what was replayed");
    }
}

impl TenantActor {
    /// Brings the snapshot up to date for a release that began at
    /// `stopped`, within the release's budget; true when it holds every
    /// confirmed slot. A snapshot not confirmed in time is cancelled:
    /// the object is written by one conditional PUT (or a multipart upload
    /// completed conditionally), so nothing half-written is ever read, and
    /// a multipart upload left behind is aborted by the next claim's sweep.
    /// A write that still lands later is a deposed holder's compaction of
    /// confirmed state, which docs/protocol.md (point 6) shows harmless.
    pub(super) async fn release_snapshot(&mut self, stopped: Instant) -> bool {
        let deadline = self
            .ctx
            .release_budget
            .map(|budget| snapshot_deadline(stopped, budget));
        if let Some(running) = self.compaction.take() {
            // The background compaction may already cover everything.
            if !self.await_compaction(running, deadline).await {
                return false;
            }
        }
        if self.since_snapshot.0 == 0 {
            return true;
        }
        let db_bytes = {
            let copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
            copy.db_bytes()
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Plan::Log(why) = plan(db_bytes, self.since_snapshot.1, self.speed.get(), left) {
            info!(customer_id = %self.id, reason = %why, deltas_after_snapshot = self.since_snapshot.0, "release without a snapshot: the tenant goes to the next holder with its log");
            return false;
        }
        self.compact_after = Instant::now();
        self.maybe_compact(true).await;
        if let Some(running) = self.compaction.take()
            && !self.await_compaction(running, deadline).await
        {
            return false;
        }
        self.since_snapshot.0 == 0
    }

    /// Waits for a compaction until `deadline`; past it, cancels it (false).
    async fn await_compaction(
        &mut self,
        mut running: super::compaction::Running,
        deadline: Option<Instant>,
    ) -> bool {
        let finished = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, &mut running.task)
                .await
                .ok(),
            None => Some((&mut running.task).await),
        };
        match finished {
            Some(result) => {
                let result = result
                    .map(|r| (r, running.covers))
                    .map_err(|e| e.to_string());
                self.compacted(result);
                true
            }
            None => {
                running.task.abort();
                warn!(customer_id = %self.id, deltas_after_snapshot = self.since_snapshot.0, "the snapshot was not confirmed within the release's budget: cancelled; the tenant goes to the next holder with its log");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn a_small_database_is_snapshotted_when_time_allows() {
        assert_eq!(plan(MB, 10_000, None, None), Plan::Snapshot);
        assert_eq!(
            plan(MB, 10_000, None, Some(Duration::from_secs(2))),
            Plan::Snapshot
        );
    }

    #[test]
    fn small_deltas_beside_a_big_database_go_in_the_log() {
        assert!(matches!(plan(200 * MB, 50_000, None, None), Plan::Log(_)));
        // Deltas of a sixth of the database: worth a snapshot.
        assert_eq!(plan(200 * MB, 34 * MB, Some(1e9), None), Plan::Snapshot);
    }

    #[test]
    fn a_database_too_big_for_the_measured_speed_is_not_tried() {
        let left = Some(Duration::from_secs(2));
        // 20 MB at 5 MB/s: 4 s.
        assert!(matches!(
            plan(20 * MB, 20 * MB, Some(5e6), left),
            Plan::Log(_)
        ));
        assert_eq!(plan(20 * MB, 20 * MB, Some(50e6), left), Plan::Snapshot);
        // Nothing measured yet: the slowest speed an upload is allowed.
        assert!(matches!(plan(20 * MB, 20 * MB, None, left), Plan::Log(_)));
        assert!(matches!(
            plan(1, 1, None, Some(Duration::ZERO)),
            Plan::Log(_)
        ));
    }

    #[test]
    fn the_lock_write_keeps_a_quarter_of_the_budget() {
        let now = Instant::now();
        assert_eq!(
            snapshot_deadline(now, Duration::from_secs(4)),
            now + Duration::from_secs(3)
        );
        assert_eq!(
            snapshot_deadline(now, Duration::from_millis(600)),
            now + Duration::from_millis(350)
        );
        assert_eq!(snapshot_deadline(now, Duration::ZERO), now);
    }
}
