//! The actor's upload pipeline: each committed batch is put as the next
//! log slot (`If-None-Match: *`), up to [`WINDOW`](crate::tenant::log::WINDOW) at once; confirmations
//! are taken strictly in slot order, an unclear outcome is resolved by
//! reading the slot back, and a failed or fenced upload makes the holder
//! step down. Owns the in-flight queue and the answers it holds back; does
//! not apply batches or compact.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Exit, Replier, TenantActor};
use crate::store::{Metadata, Precondition, StoreError, StoreResult, keys};
use crate::tenant::{Reply, TenantError};

/// The slowest store throughput an upload is given time for.
pub(super) const MIN_UPLOAD_BYTES_PER_SEC: f64 = 4.0 * 1024.0 * 1024.0;

/// How long one upload attempt of `len` bytes may take: a lease ttl for
/// the round trip, plus the body at [`MIN_UPLOAD_BYTES_PER_SEC`].
pub(super) fn upload_budget(ttl: Duration, len: usize) -> Duration {
    ttl + Duration::from_secs_f64(len as f64 / MIN_UPLOAD_BYTES_PER_SEC)
}

/// What a read-back says of an upload whose outcome was unclear.
pub(super) enum ReadBack {
    Landed,
    NotLanded,
    /// Another holder's object is in the slot.
    Taken,
    Unknown(StoreError),
}

/// A batch's requests with their answers, sent once the batch is durable.
pub(super) type Unanswered = Vec<(Replier, Reply)>;

/// A committed batch and its upload.
pub(super) struct InFlight {
    /// `None` when answered before the upload (bench-only setting).
    pub(super) unanswered: Option<Unanswered>,
    pub(super) epoch: u64,
    /// The log slot.
    pub(super) seq: u64,
    pub(super) count: u64,
    pub(super) batch_len: usize,
    pub(super) bytes: Bytes,
    pub(super) metadata: Metadata,
    /// Sent while earlier uploads were under way.
    pub(super) pipelined: bool,
    pub(super) started: Instant,
    pub(super) task: tokio::task::JoinHandle<StoreResult<()>>,
}

/// The oldest upload's result; pending forever when none is under way.
pub(super) async fn front_upload(in_flight: &mut VecDeque<InFlight>) -> StoreResult<()> {
    match in_flight.front_mut() {
        Some(upload) => (&mut upload.task).await.unwrap_or_else(|e| {
            Err(StoreError::Fatal {
                message: format!("upload task failed: {e}"),
            })
        }),
        None => std::future::pending().await,
    }
}

pub(super) fn send_all(pending: Unanswered) {
    for (reply, answer) in pending {
        let _ = reply.send(Ok(answer));
    }
}

impl TenantActor {
    /// One conditional PUT of a log slot, given up after a time that fits
    /// its size ([`upload_budget`]). Not at the lease's deadline: a slot
    /// can be created once, so one that lands after the lease ended is
    /// still correct (and read back as such).
    pub(super) fn put(
        &self,
        seq: u64,
        bytes: Bytes,
        metadata: Metadata,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        let store = self.ctx.store.clone();
        let key = keys::log_slot(self.id.as_str(), seq);
        let budget = upload_budget(self.ttl, bytes.len());
        async move {
            let put = store.put(&key, bytes, metadata, Precondition::IfAbsent);
            match tokio::time::timeout(budget, put).await {
                Ok(result) => result.map(|_| ()),
                Err(_) => Err(StoreError::transient(
                    &key,
                    format!("the store did not confirm the upload within {budget:?}"),
                )),
            }
        }
    }

    /// Settles the oldest upload: answers its batch when it is durable,
    /// otherwise sends it again or ends the actor.
    ///
    /// An unclear outcome (a transient error, an ambiguous write, a 412) is
    /// resolved by reading the slot back: an object naming this
    /// acquisition's token means it landed; another's object means this holder
    /// was fenced off; no object means it did not land, and it is sent
    /// again (a slot is created at most once, whatever an earlier attempt
    /// does). Only a fence, or a lost lease with nothing known, ends the
    /// actor.
    pub(super) async fn confirm_front(&mut self, first: StoreResult<()>) -> Result<(), Exit> {
        let upload = self.in_flight.pop_front().expect("an upload in flight");
        let mut result = first;
        let mut pause = Duration::from_millis(25);
        loop {
            let error = match result {
                Ok(()) => {
                    self.confirmed(upload);
                    return Ok(());
                }
                Err(e) => e,
            };
            match self.read_back(&upload).await {
                ReadBack::Landed => {
                    if !error.is_precondition() {
                        info!(customer_id = %self.id, seq = upload.seq, error = %error, "upload outcome was unclear; read back: it landed");
                    }
                    self.confirmed(upload);
                    return Ok(());
                }
                ReadBack::Taken => {
                    let error = StoreError::PreconditionFailed {
                        key: keys::log_slot(self.id.as_str(), upload.seq),
                    };
                    return Err(self.fail(upload, error, true).await);
                }
                ReadBack::NotLanded | ReadBack::Unknown(_) if !self.lease.is_valid() => {
                    return Err(self.fail(upload, error, false).await);
                }
                _ if upload.started.elapsed() >= self.upload_bound(upload.bytes.len()) => {
                    warn!(customer_id = %self.id, seq = upload.seq, error = %error, tried_for = ?upload.started.elapsed(), "the log slot could not be written within the bound; stepping down so that the tenant can be claimed again");
                    return Err(self.fail(upload, error, false).await);
                }
                ReadBack::NotLanded => {
                    warn!(customer_id = %self.id, seq = upload.seq, error = %error, "upload failed and did not land; sending it again");
                }
                ReadBack::Unknown(read) => {
                    warn!(customer_id = %self.id, seq = upload.seq, error = %error, read_back = %read, "upload outcome unknown; sending it again (a slot is created at most once)");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            result = self
                .put(upload.seq, upload.bytes.clone(), upload.metadata.clone())
                .await;
        }
    }

    /// How long a slot may be tried before this holder steps down: a slot
    /// that cannot be written would otherwise hold every later commit (and
    /// the tenant) for as long as the lease lives. A new claim fences the
    /// slot and carries on. At least 10 s whatever the ttl: a short ttl
    /// (chaos and bench clusters run 1 s) on a busy machine must not turn
    /// a slow upload into a step-down.
    pub(super) fn upload_bound(&self, len: usize) -> Duration {
        let base = self
            .ctx
            .upload_bound
            .unwrap_or((self.ttl * 2).max(Duration::from_secs(10)));
        base + 2 * (upload_budget(self.ttl, len) - self.ttl)
    }

    /// Reads the slot's metadata to learn whether `upload` landed: the
    /// object names this acquisition's token.
    pub(super) async fn read_back(&self, upload: &InFlight) -> ReadBack {
        let key = keys::log_slot(self.id.as_str(), upload.seq);
        match self.ctx.store.head(&key).await {
            Ok(None) => ReadBack::NotLanded,
            // Epochs and slots can repeat (a lock deleted by hand); the
            // acquisition's token cannot.
            Ok(Some(meta)) if self.writer.wrote(&meta.metadata) => ReadBack::Landed,
            Ok(Some(_)) => ReadBack::Taken,
            Err(e) => ReadBack::Unknown(e),
        }
    }

    pub(super) fn confirmed(&mut self, upload: InFlight) {
        self.count = upload.count;
        self.last_upload = upload.started.elapsed();
        self.since_snapshot.0 += 1;
        self.since_snapshot.1 += upload.bytes.len() as u64;
        self.confirmed.send_replace(upload.seq);
        if self.commits.receiver_count() > 0 {
            let _ = self.commits.send(std::sync::Arc::new(super::ConfirmedSlot {
                seq: upload.seq,
                body: upload.bytes.clone(),
                metadata: upload.metadata.clone(),
            }));
        }
        let metrics = &self.ctx.metrics;
        if upload.pipelined {
            metrics.pipelined_uploads.with_label_values(&["ok"]).inc();
        }
        metrics
            .upload_seconds
            .with_label_values::<&str>(&[])
            .observe(self.last_upload.as_secs_f64());
        metrics
            .batch_size
            .with_label_values::<&str>(&[])
            .observe(upload.batch_len as f64);
        metrics
            .upload_bytes
            .with_label_values(&["delta"])
            .inc_by(upload.bytes.len() as u64);
        if let Some(pending) = upload.unanswered {
            send_all(pending);
        }
    }

    /// The oldest upload failed for good: this actor steps down. No later
    /// batch is acknowledged: slots after a failed one are not history
    /// (a new holder fences the hole and skips them).
    pub(super) async fn fail(
        &mut self,
        upload: InFlight,
        error: StoreError,
        not_applied: bool,
    ) -> Exit {
        let epoch = upload.epoch;
        let exit = if error.is_precondition() {
            warn!(customer_id = %self.id, epoch, seq = upload.seq, "log slot taken by another holder: fenced off; stepping down");
            Exit::Fenced
        } else {
            warn!(customer_id = %self.id, epoch, seq = upload.seq, error = %error, "upload failed; nothing of this batch was acknowledged; stepping down");
            Exit::StoreFailed
        };
        let mut settled = vec![(upload, Err(error), not_applied)];
        while !self.in_flight.is_empty() {
            let result = front_upload(&mut self.in_flight).await;
            let later = self.in_flight.pop_front().expect("awaited above");
            let not_applied = matches!(&result, Err(e) if e.is_precondition());
            settled.push((later, result, not_applied));
        }
        for (upload, result, not_applied) in settled {
            if upload.pipelined {
                self.ctx
                    .metrics
                    .pipelined_uploads
                    .with_label_values(&["failed"])
                    .inc();
            }
            let Some(pending) = upload.unanswered else {
                continue;
            };
            let answer = match result {
                // Definitely not written, and another machine holds the
                // tenant: the request may go there and be applied.
                Err(_) if not_applied && matches!(exit, Exit::Fenced) => {
                    Err(TenantError::NotHolder)
                }
                _ => Err(TenantError::Unavailable(format!(
                    "customer {}: could not store the write (slot {} of the log failed: {exit:?}); it was not acknowledged and may or may not be applied",
                    self.id, upload.seq
                ))),
            };
            for (reply, _) in pending {
                let _ = reply.send(answer.clone());
            }
        }
        exit
    }

    /// Settles every upload under way, oldest first.
    pub(super) async fn drain_uploads(&mut self) -> Result<(), Exit> {
        while !self.in_flight.is_empty() {
            let result = front_upload(&mut self.in_flight).await;
            self.confirm_front(result).await?;
        }
        Ok(())
    }
}
