//! The actor's background compaction: once enough deltas follow the
//! snapshot and every slot up to a copy is confirmed, that copy is written
//! as the snapshot and the log before it collected. Owns the running
//! compaction and its counters; never blocks a batch.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::TenantActor;
use crate::tenant::copy::WorkingCopy;
use crate::tenant::log::{self, Compacted, Compaction, LogError};

/// A finished compaction with the log counters it clears, or why its task
/// failed.
pub(super) type CompactionOutcome = Result<(Result<Compacted, LogError>, (u64, u64)), String>;

/// A compaction under way, and the log counters it will clear.
pub(super) struct Running {
    pub(super) covers: (u64, u64),
    pub(super) task: tokio::task::JoinHandle<Result<Compacted, LogError>>,
}

/// The running compaction's result; pending forever when none runs.
pub(super) async fn compaction_result(running: &mut Option<Running>) -> CompactionOutcome {
    let Some(current) = running.as_mut() else {
        return std::future::pending().await;
    };
    let result = (&mut current.task).await;
    let covers = current.covers;
    *running = None;
    result.map(|r| (r, covers)).map_err(|e| e.to_string())
}

impl TenantActor {
    /// Starts a compaction when the log after the snapshot costs enough
    /// (or, with `now`, whenever it holds anything). The copy is taken in
    /// the compaction's task while commits go on; its upload waits until
    /// every slot it covers is confirmed.
    pub(super) async fn maybe_compact(&mut self, now: bool) {
        if self.compaction.is_some() || (!now && Instant::now() < self.compact_after) {
            return;
        }
        let copy = self.copy.clone();
        let (deltas, bytes) = self.since_snapshot;
        let pending = self.in_flight.len() as u64;
        let due = if now {
            deltas + pending > 0
        } else if !self.ctx.retention.may_be_due(deltas + pending, bytes) {
            // The usual case after a commit: no need to look at the file.
            false
        } else {
            let db_bytes = copy.lock().unwrap_or_else(|e| e.into_inner()).db_bytes();
            self.ctx.retention.due(deltas + pending, bytes, db_bytes)
        };
        if !due {
            return;
        }
        let id = self.id.to_string();
        let epoch = self.lease.epoch();
        let writer = self.writer.clone();
        let store = self.ctx.store.clone();
        let known = self.snapshot.clone();
        let retention = self.ctx.retention.clone();
        let mut confirmed = self.confirmed.subscribe();
        let metrics = self.ctx.metrics.clone();
        let speed = self.speed.clone();
        // Every slot captured so far is in the copy (its slot is at least
        // the newest of them): what this compaction clears.
        let covers = (deltas + pending, bytes);
        let task = tokio::spawn(async move {
            // Copied in the task, while the actor goes on committing (see
            // `snapshot_unlocked`: the copy holds no lock either).
            let (seq, body, checksum) =
                tokio::task::spawn_blocking(move || WorkingCopy::snapshot_unlocked(&copy))
                    .await
                    .map_err(|e| LogError::Local(format!("snapshot copy failed: {e}")))?
                    .map_err(|e| {
                        LogError::Local(format!(
                            "cannot copy the working database for a snapshot: {e}"
                        ))
                    })?;
            if seq <= known.seq {
                return Ok(Compacted {
                    snapshot: known,
                    archived: false,
                    deleted: 0,
                });
            }
            let job = Compaction {
                id,
                seq,
                epoch,
                checksum,
                body,
                writer,
                collect: !now,
            };
            // Only confirmed state may become the snapshot.
            if confirmed.wait_for(|c| *c >= seq).await.is_err() {
                return Err(LogError::Raced(format!(
                    "the holder stepped down before slot {seq} was confirmed"
                )));
            }
            let len = job.body.len();
            let began = Instant::now();
            let result = log::compact(&store, &known, job, &retention).await;
            if let Ok(done) = &result {
                speed.record(len, began.elapsed());
                metrics
                    .upload_bytes
                    .with_label_values(&["snapshot"])
                    .inc_by(len * (1 + done.archived as u64));
            }
            result
        });
        self.compaction = Some(Running { covers, task });
    }

    pub(super) fn compacted(&mut self, result: CompactionOutcome) {
        let outcome = match result {
            Ok((Ok(done), covers)) => {
                info!(customer_id = %self.id, seq = done.snapshot.seq, archived = done.archived, deleted = done.deleted, "snapshot written");
                self.snapshot = done.snapshot;
                self.since_snapshot.0 = self.since_snapshot.0.saturating_sub(covers.0);
                self.since_snapshot.1 = self.since_snapshot.1.saturating_sub(covers.1);
                "ok"
            }
            Ok((Err(e), _)) => {
                warn!(customer_id = %self.id, error = %e, "compaction failed; the log still holds every commit; trying again later");
                self.compact_after = Instant::now() + Duration::from_secs(10);
                "failed"
            }
            Err(e) => {
                warn!(customer_id = %self.id, error = %e, "compaction task failed");
                self.compact_after = Instant::now() + Duration::from_secs(10);
                "failed"
            }
        };
        self.ctx
            .metrics
            .compactions
            .with_label_values(&[outcome])
            .inc();
    }
}
