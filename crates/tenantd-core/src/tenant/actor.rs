//! The tenant actor: the only owner of one tenant's SQLite working copy.
//!
//! Requests arrive through a channel. The actor takes everything queued as
//! one batch, applies it in one transaction, and uploads the pages that
//! transaction changed as the next slot of the tenant's commit log
//! (`If-None-Match: *`, see [`super::log`]); the batch is answered only
//! after that upload is confirmed (group commit).
//!
//! Pipelining: up to [`WINDOW`] uploads are under way at once, each into its
//! own slot; batches are confirmed and answered strictly in slot order, so
//! an answer never reports a state that an unconfirmed slot before it
//! could still lose.
//!
//! Fencing: a slot can be created once. A new holder fences the slots an
//! old one could still reach, so the old holder's next upload fails and it
//! steps down without acknowledging anything more.
//!
//! Compaction: after enough deltas, a copy of the working file (the state
//! at a slot) is written as the snapshot once every slot up to it is
//! confirmed, in the background; on release the snapshot is brought up to
//! date when the release's budget allows, else the tenant is released with
//! its log ([`release`]).
//!
//! This file owns the actor's life (start, the batching loop, the end) and
//! applying a batch; [`upload`] owns the slots in flight and their
//! confirmation, [`compaction`] the background snapshot.

mod compaction;
mod release;
mod streams;
mod upload;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use compaction::{Running, compaction_result};
use upload::{InFlight, front_upload, send_all};

use super::claim::{claim, remove_copy};
pub use super::context::ActorContext;
use super::copy::WorkingCopy;
use super::db::{Applied, Work};
use super::log::{self, Snapshot, WINDOW, Writer};
use super::sql::SqlRequest;
use super::{Answer, Op, Reply, SqlAnswer, TenantError};
use crate::TenantId;
use crate::lease::Lease;

/// Most requests applied in one transaction; bounds a batch's latency.
const MAX_BATCH: usize = 4096;
/// Longest wait for a batch to fill once its first request is in; never
/// more than half an upload either, so a fast store is not slowed down.
const MAX_LINGER: Duration = Duration::from_millis(10);

struct Request {
    op: Op,
    reply: Replier,
    /// A Hrana pipeline's stream, when it keeps one (set by the actor).
    stream: Option<Arc<Mutex<super::sql::hrana::StreamState>>>,
}

type Replier = oneshot::Sender<Result<Reply, TenantError>>;

/// A cheap handle to a running actor.
#[derive(Clone, Debug)]
pub struct TenantHandle {
    tx: mpsc::Sender<Request>,
    epoch: u64,
    stop: CancellationToken,
    /// Cancelled when the actor has fully ended (lease released or lost).
    done: CancellationToken,
    /// Every slot up to this one is confirmed: the bookmark of what the
    /// holder answers, and the position followers catch up to.
    confirmed: watch::Receiver<u64>,
    /// Each confirmed upload, in slot order, for followers (pushed to them).
    commits: broadcast::Sender<Arc<ConfirmedSlot>>,
}

/// A log object this holder uploaded and confirmed: the store holds these
/// exact bytes in its slot.
#[derive(Debug)]
pub struct ConfirmedSlot {
    pub seq: u64,
    pub body: Bytes,
    pub metadata: crate::store::Metadata,
}

impl TenantHandle {
    /// A counter operation (increment or read).
    pub async fn call(&self, op: Op) -> Result<Answer, TenantError> {
        match self.request(op).await? {
            Reply::Count(answer) => Ok(answer),
            _ => unreachable!("counter operations answer with a count"),
        }
    }

    /// A SQL request.
    pub async fn sql(
        &self,
        request: Arc<SqlRequest>,
        idempotency_key: Option<String>,
    ) -> Result<SqlAnswer, TenantError> {
        let op = Op::Sql {
            request,
            idempotency_key,
        };
        match self.request(op).await? {
            Reply::Sql(answer) => Ok(answer),
            _ => unreachable!("SQL requests answer with results"),
        }
    }

    /// A Hrana pipeline; the answer's `results` are Hrana's.
    pub async fn hrana(
        &self,
        program: Arc<super::sql::hrana::Program>,
    ) -> Result<SqlAnswer, TenantError> {
        match self.request(Op::Hrana(program)).await? {
            Reply::Sql(answer) => Ok(answer),
            _ => unreachable!("Hrana pipelines answer with results"),
        }
    }

    pub async fn request(&self, op: Op) -> Result<Reply, TenantError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                op,
                reply,
                stream: None,
            })
            .await
            .map_err(|_| TenantError::NotHolder)?;
        // A dropped reply means the actor stepped down before it got to this
        // request, which it does only when nothing of it was written.
        rx.await.unwrap_or(Err(TenantError::NotHolder))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last slot such that it and every slot before it are confirmed.
    /// Read after an answer, it is at least the state the answer reflects
    /// (confirmation is published before the batch is answered).
    pub fn confirmed(&self) -> u64 {
        *self.confirmed.borrow()
    }

    /// Confirmed uploads from now on (a slow receiver misses some: a
    /// follower reads what it missed from the log).
    pub fn commits(&self) -> broadcast::Receiver<Arc<ConfirmedSlot>> {
        self.commits.subscribe()
    }

    /// Waits until every slot up to `seq` is confirmed; false if the actor
    /// ended first.
    pub async fn reach(&self, seq: u64) -> bool {
        let mut confirmed = self.confirmed.clone();
        confirmed.wait_for(|c| *c >= seq).await.is_ok()
    }

    /// False once the actor has ended.
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Asks the actor to commit what it has, release the lease and end.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves when the actor has ended: its last batch answered, its
    /// lease released (or lost) and its working copy dropped.
    pub async fn ended(&self) {
        self.done.cancelled().await
    }
}

/// Why an actor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Stopped,
    Idle,
    LeaseLost,
    Fenced,
    StoreFailed,
}

pub struct TenantActor {
    id: TenantId,
    ctx: ActorContext,
    lease: Lease,
    /// This acquisition, as its log objects and snapshots name it.
    writer: Writer,
    /// The lease's ttl: the base of every upload's time budget.
    ttl: Duration,
    /// Used only inside `spawn_blocking`, one call at a time: SQLite work
    /// (a batch, a request's statements) must not hold a runtime worker
    /// that lease renewals need.
    copy: Arc<Mutex<WorkingCopy>>,
    path: PathBuf,
    count: u64,
    /// The slot the next commit goes into.
    next_slot: u64,
    /// Every slot up to this one is confirmed (compaction waits on it).
    confirmed: watch::Sender<u64>,
    commits: broadcast::Sender<Arc<ConfirmedSlot>>,
    /// The snapshot as this holder last wrote or read it.
    snapshot: Snapshot,
    /// Deltas (and their bytes) in the log after the snapshot.
    since_snapshot: (u64, u64),
    compaction: Option<Running>,
    /// How fast this holder's compactions went: what a release expects.
    speed: release::CompactionSpeed,
    /// No new compaction before this (after a failed one).
    compact_after: Instant,
    /// When the lock was last read (or, at the claim, written) naming
    /// this acquisition: what lets a batch that commits nothing be answered
    /// ([`TenantActor::still_holder`]).
    lock_read_at: Option<Instant>,
    /// Requests in the previous batch: how many to expect in the next.
    last_batch: usize,
    /// How long the last upload took.
    last_upload: Duration,
    /// Committed batches whose uploads are under way, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Hrana streams and the interactive transaction that may be open.
    streams: streams::Streams,
    rx: mpsc::Receiver<Request>,
    stop: CancellationToken,
    done: CancellationToken,
}

impl TenantActor {
    /// Takes over the tenant: rebuilds its database from the snapshot and
    /// the log, fences off the previous holder, then spawns the actor loop.
    /// Fails without writing anything when the tenant's objects are not
    /// usable.
    pub async fn start(
        id: TenantId,
        ctx: ActorContext,
        lease: Lease,
    ) -> Result<(TenantHandle, tokio::task::JoinHandle<Exit>), TenantError> {
        Self::start_from(id, ctx, lease, None).await
    }

    /// [`Self::start`], beginning from reads started while the lease was
    /// contended ([`super::prefetch`]).
    pub async fn start_from(
        id: TenantId,
        ctx: ActorContext,
        mut lease: Lease,
        prefetch: Option<super::prefetch::Prefetch>,
    ) -> Result<(TenantHandle, tokio::task::JoinHandle<Exit>), TenantError> {
        let dir = ctx.data_dir.join(&ctx.machine_id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            TenantError::Unavailable(format!(
                "cannot create the data folder {}: {e}; fix --data-dir / DATABASE_PATH",
                dir.display()
            ))
        })?;
        // One file per acquisition: nothing of an earlier holding (or a
        // crashed process) can be mistaken for this one's copy.
        let path = dir.join(format!("{id}.{}.sqlite3", lease.epoch()));
        crate::tenant::copy::remove_leftover_snapshots(&dir, id.as_str());
        // The published migrations are read beside the claim, not after it
        // (a push landing meanwhile is caught by the migrations watcher).
        let mut prefetch = prefetch;
        let head = match prefetch.as_mut().and_then(|p| p.migrations()) {
            Some(read) => read,
            None => {
                let store = ctx.store.clone();
                tokio::spawn(async move { super::migrations::read_head(&store).await })
            }
        };
        let (head, claimed) = tokio::join!(
            async {
                head.await.unwrap_or_else(|e| {
                    Err(crate::store::StoreError::transient(
                        super::migrations::HEAD_KEY,
                        format!("the read ended early: {e}"),
                    ))
                })
            },
            claim(&id, &ctx, &mut lease, &path, prefetch)
        );
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                remove_copy(&path);
                let _ = lease.release().await;
                return Err(e);
            }
        };
        release::check_log_end(&id, &ctx, lease.previous().as_ref(), claimed.previous_end);
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let (confirmed, confirmed_rx) = watch::channel(claimed.next_slot - 1);
        let (commits, _) = broadcast::channel(64);
        let handle = TenantHandle {
            tx,
            epoch: lease.epoch(),
            stop: stop.clone(),
            done: done.clone(),
            confirmed: confirmed_rx,
            commits: commits.clone(),
        };
        ctx.metrics
            .lease_holder
            .with_label_values(&[id.as_str()])
            .set(1);
        ctx.metrics
            .lease_epoch
            .with_label_values(&[id.as_str()])
            .set(lease.epoch() as i64);
        info!(
            customer_id = %id,
            epoch = lease.epoch(),
            count = claimed.count,
            snapshot_seq = claimed.snapshot.seq,
            next_slot = claimed.next_slot,
            deltas_after_snapshot = claimed.since_snapshot.0,
            "holding tenant"
        );
        let writer = Writer {
            holder: ctx.machine_id.clone(),
            token: lease.token().to_string(),
        };
        let streams = streams::Streams::new(id.as_str(), lease.epoch(), &lease.token().to_string());
        // The acquisition's own lock write counts as a read of the lock
        // naming it: the first read after a cold start needs no other.
        let lock_written_at = lease.written_at();
        let actor = TenantActor {
            streams,
            id,
            ctx,
            writer,
            ttl: Duration::from_millis(lease.record().ttl_ms),
            lease,
            copy: Arc::new(Mutex::new(claimed.copy)),
            path,
            count: claimed.count,
            next_slot: claimed.next_slot,
            confirmed,
            commits,
            snapshot: claimed.snapshot,
            since_snapshot: claimed.since_snapshot,
            compaction: None,
            speed: Default::default(),
            compact_after: Instant::now(),
            lock_read_at: Some(lock_written_at),
            last_batch: 1,
            last_upload: Duration::ZERO,
            in_flight: VecDeque::new(),
            rx,
            stop,
            done,
        };
        let (id, store) = (actor.id.clone(), actor.ctx.store.clone());
        let task = tokio::spawn(actor.run());
        // No answer below the published schema version: pending migrations
        // go first (a migration's own failure leaves the tenant serving at
        // its version; only a store failure gives the tenant up).
        let brought_up = match head {
            Ok((head, _)) => {
                super::migrations::apply::apply_head(&id, &store, &handle, &head).await
            }
            Err(e) => Err(TenantError::Unavailable(format!(
                "customer {id}: cannot read the published migrations: {e}"
            ))),
        };
        if let Err(e) = brought_up {
            handle.stop();
            handle.ended().await;
            return Err(e);
        }
        Ok((handle, task))
    }

    async fn run(self) -> Exit {
        let done = self.done.clone();
        let exit = self.serve().await;
        done.cancel();
        exit
    }

    async fn serve(mut self) -> Exit {
        let exit = loop {
            let idle_after = match self.in_flight.is_empty() {
                true => self.ctx.idle_timeout,
                false => None,
            };
            let idle = async {
                match idle_after {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break Exit::Stopped,
                _ = self.lease.lost() => break Exit::LeaseLost,
                result = front_upload(&mut self.in_flight) => {
                    if let Err(exit) = self.confirm_front(result).await {
                        break exit;
                    }
                    continue;
                }
                result = compaction_result(&mut self.compaction) => {
                    self.compacted(result);
                    continue;
                }
                request = self.rx.recv(), if (self.in_flight.len() as u64) < WINDOW => match request {
                    Some(request) => request,
                    None => break Exit::Stopped,
                },
                _ = idle => break Exit::Idle,
                _ = until(self.streams.deadline()) => {
                    if let Err(exit) = self.transaction_timed_out().await {
                        break exit;
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.linger(&mut batch).await;
            self.last_batch = batch.len();
            if let Err(exit) = self.dispatch(batch).await {
                break exit;
            }
        };
        self.finish(exit).await
    }

    /// Clients answered together come back together, a little apart:
    /// without a short wait the first of them would start an upload alone,
    /// the rest would wait for two, and the clients would stay split in two
    /// cohorts. So wait for as many requests as the last batch had, but only
    /// while they arrive fast enough to all be in within half an upload (a
    /// longer wait costs more than it saves). A lone client never waits.
    async fn linger(&mut self, batch: &mut Vec<Request>) {
        let expected = self.last_batch.min(MAX_BATCH);
        let cap = (self.last_upload / 2).min(MAX_LINGER);
        let start = tokio::time::Instant::now();
        let initial = batch.len();
        while batch.len() < expected {
            match tokio::time::timeout_at(start + cap, self.rx.recv()).await {
                Ok(Some(request)) => batch.push(request),
                _ => break,
            }
            let elapsed = start.elapsed();
            if elapsed >= cap / 3 {
                let rate = (batch.len() - initial) as f64 / elapsed.as_secs_f64();
                let rest = Duration::from_secs_f64((expected - batch.len()) as f64 / rate);
                if elapsed + rest > cap {
                    break;
                }
            }
        }
    }

    /// Commits one batch and starts its upload; the batch is answered when
    /// the upload is confirmed (`confirm_front`). A batch that changed
    /// nothing is answered once every upload before it is. An `Err` means
    /// this actor must end; the batch has been answered by then.
    async fn process(&mut self, batch: Vec<Request>) -> Result<(), Exit> {
        if !self.lease.is_valid() {
            answer_all(batch, Err(TenantError::NotHolder));
            return Err(Exit::LeaseLost);
        }
        let epoch = self.lease.epoch();
        // Counter reads only: the last confirmed count is what every
        // acknowledged increment has seen; uploads still under way are not
        // acknowledged.
        if batch.iter().all(|r| matches!(r.op, Op::Read)) {
            if let Err((e, exit)) = self.still_holder(Instant::now()).await {
                answer_all(batch, Err(e));
                return exit.map_or(Ok(()), Err);
            }
            let answer = Answer {
                count: self.count,
                epoch,
                repeated: false,
            };
            answer_all(batch, Ok(Reply::Count(answer)));
            return Ok(());
        }
        let seq = self.next_slot;
        let applied = self.apply(epoch, seq, &batch).await;
        let computed = Instant::now();
        let (applied, delta) = match applied {
            Ok(applied) => applied,
            // SQLite rolled the batch back: the working copy is as the last
            // commit left it, so the holder stays (no request can make it
            // step down); the batch's clients may send it again.
            Err(BatchError::RolledBack(message)) => {
                warn!(customer_id = %self.id, error = %message, "batch failed and was rolled back; still holding the tenant");
                let message = format!(
                    "customer {}: {message}; nothing of the request was applied, send it again",
                    self.id
                );
                answer_all(batch, Err(TenantError::Unavailable(message)));
                return Ok(());
            }
            Err(BatchError::Copy(message)) => {
                warn!(customer_id = %self.id, error = %message, "batch failed");
                let message = format!("customer {}: {message}", self.id);
                answer_all(batch, Err(TenantError::Unavailable(message)));
                return Err(Exit::StoreFailed);
            }
        };
        // A refused SQL request applied nothing: it is answered at once.
        let mut pending = Vec::with_capacity(batch.len());
        for (request, reply) in batch.into_iter().zip(applied.replies) {
            match reply {
                Ok(reply) => pending.push((request.reply, reply)),
                Err(refused) => {
                    let _ = request.reply.send(Err(TenantError::Sql(refused)));
                }
            }
        }
        let (Some(committed), Some(delta)) = (applied.committed, delta) else {
            if let Err((e, exit)) = self.still_holder(computed).await {
                for (reply, _) in pending {
                    let _ = reply.send(Err(e.clone()));
                }
                return exit.map_or(Ok(()), Err);
            }
            match self.in_flight.back_mut() {
                Some(InFlight {
                    unanswered: Some(waiting),
                    ..
                }) => waiting.extend(pending),
                _ => send_all(pending),
            }
            return Ok(());
        };
        self.next_slot += 1;
        let batch_len = pending.len();
        let mut unanswered = Some(pending);
        if self.ctx.ack_before_upload {
            // Bench-only (the original app's behaviour, an upper bound):
            // answer before the write is durable.
            send_all(unanswered.take().expect("not answered yet"));
        }
        let metadata = log::slot_metadata(epoch, seq, &self.writer);
        if self.ctx.push_before_upload && self.commits.receiver_count() > 0 {
            let _ = self.commits.send(Arc::new(ConfirmedSlot {
                seq,
                body: delta.clone(),
                metadata: metadata.clone(),
            }));
        }
        let put = self.put(seq, delta.clone(), metadata.clone());
        let pipelined = !self.in_flight.is_empty();
        self.in_flight.push_back(InFlight {
            pipelined,
            unanswered,
            epoch,
            seq,
            count: committed.count,
            batch_len,
            bytes: delta,
            metadata,
            started: Instant::now(),
            task: tokio::spawn(put),
        });
        self.maybe_compact(false).await;
        Ok(())
    }

    /// Whether answers computed at `computed` that commit nothing may be
    /// sent. A batch that commits proves its holder by its upload (a
    /// successor's fences come after it), but a read proves nothing, and
    /// the session's heartbeat goes on while a lock deleted by hand is
    /// taken over. So the lock must have named this acquisition after
    /// `computed`, or at most half a ttl before it: a successor that found
    /// the lock without the tenant's history waits a whole ttl before its
    /// first answer (`claim`), so nothing it acknowledged is missed.
    /// `Err` carries the answer and, when the lock is gone, the exit.
    async fn still_holder(&mut self, computed: Instant) -> Result<(), (TenantError, Option<Exit>)> {
        if self
            .lock_read_at
            .is_some_and(|at| computed <= at + self.ttl / 2)
        {
            return Ok(());
        }
        let sent = Instant::now();
        match self.lease.still_ours().await {
            Ok(true) => {
                self.lock_read_at = Some(sent);
                Ok(())
            }
            Ok(false) => {
                warn!(customer_id = %self.id, epoch = self.lease.epoch(), "machine.lock no longer names this holder (deleted or reset by hand, then taken): stepping down");
                Err((TenantError::NotHolder, Some(Exit::LeaseLost)))
            }
            Err(e) => {
                warn!(customer_id = %self.id, error = %e, "cannot read machine.lock to confirm this holder before answering a read; refusing it rather than risk a stale answer");
                Err((
                    TenantError::Unavailable(format!(
                        "customer {}: cannot confirm this machine still holds the tenant ({e}); retry",
                        self.id
                    )),
                    None,
                ))
            }
        }
    }

    /// Applies a batch to the working copy off the runtime, and captures
    /// what it changed as the delta for slot `seq`.
    async fn apply(
        &self,
        epoch: u64,
        seq: u64,
        batch: &[Request],
    ) -> Result<(Applied, Option<Bytes>), BatchError> {
        let ops: Vec<_> = batch
            .iter()
            .map(|r| (r.op.clone(), r.stream.clone()))
            .collect();
        let copy = self.copy.clone();
        let limits = self.ctx.sql.clone();
        let work = move || {
            let mut copy = copy.lock().unwrap_or_else(|e| e.into_inner());
            let work: Vec<Work> = ops
                .iter()
                .map(|(op, stream)| match op {
                    Op::Increment { idempotency_key } => {
                        Work::Increment(idempotency_key.as_deref())
                    }
                    Op::Read => Work::Read,
                    Op::Sql {
                        request,
                        idempotency_key,
                    } => Work::Sql(request, idempotency_key.as_deref()),
                    Op::Hrana(program) => Work::Hrana(program, stream.as_deref()),
                    Op::Migrate(migration) => Work::Migrate(migration),
                })
                .collect();
            let applied = copy
                .db
                .apply_batch(epoch, &work, &limits, false)
                .map_err(|e| {
                    BatchError::RolledBack(format!("SQLite error while applying a batch: {e}"))
                })?;
            let delta = match applied.committed {
                Some(_) => {
                    let now = log::unix_ms(SystemTime::now());
                    let delta = copy
                        .capture(epoch, seq, now)
                        .map_err(BatchError::Copy)?
                        .ok_or_else(|| {
                            BatchError::Copy("a committed batch left nothing in the WAL".into())
                        })?;
                    Some(
                        delta
                            .encode()
                            .map_err(|e| BatchError::Copy(e.to_string()))?,
                    )
                }
                None => None,
            };
            Ok((applied, delta))
        };
        tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
            Err(BatchError::Copy(format!(
                "the batch's SQLite work failed: {e}"
            )))
        })
    }

    /// Ends the actor: on a clean stop, commits what is queued, brings the
    /// snapshot up to date within the release's budget and releases the
    /// lease (naming the log's end when the snapshot is behind); in every
    /// case drops the working copy.
    async fn finish(mut self, exit: Exit) -> Exit {
        let stopped = Instant::now();
        let mut exit = exit;
        // Never half a transaction: an open one is undone, its stream gone.
        self.end_open(format!(
            "the tenant's holder is stepping down ({exit:?}): the stream's transaction was rolled back, nothing of it was applied; open a new stream and run it again"
        ))
        .await;
        // Requests held for it are handled like those queued.
        let held = self.held_requests();
        // Uploads under way decide their batches' answers, whatever the exit.
        if let Err(e) = self.drain_uploads().await {
            exit = e;
        }
        let mut rest = held;
        if matches!(exit, Exit::Stopped | Exit::Idle) {
            self.rx.close();
            while let Ok(request) = self.rx.try_recv() {
                rest.push(request);
            }
            // A stream's pipeline goes to the next holder, which tells it
            // its stream is gone.
            let (streamed, plain): (Vec<_>, Vec<_>) = std::mem::take(&mut rest)
                .into_iter()
                .partition(|r| matches!(&r.op, Op::Hrana(p) if p.baton.is_some()));
            rest = streamed;
            if !plain.is_empty() {
                let done = match self.process(plain).await {
                    Ok(()) => self.drain_uploads().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    exit = e;
                }
            }
        }
        self.rx.close();
        for request in rest {
            let _ = request.reply.send(Err(TenantError::NotHolder));
        }
        while let Ok(request) = self.rx.try_recv() {
            let _ = request.reply.send(Err(TenantError::NotHolder));
        }
        // Every acknowledged write is in the log: the snapshot is brought
        // up to date only within the release's budget, else the tenant is
        // released with its log (`release`).
        let snapshot_current = if matches!(exit, Exit::Stopped | Exit::Idle) {
            self.release_snapshot(stopped).await
        } else {
            if let Some(running) = self.compaction.take() {
                running.task.abort();
            }
            false
        };
        remove_copy(&self.path);
        let id = self.id.clone();
        self.ctx
            .metrics
            .lease_holder
            .with_label_values(&[id.as_str()])
            .set(0);
        // Every slot up to it exists: the previous holder's, fenced, or
        // this holder's, each read back.
        let log_end = *self.confirmed.borrow() - self.ctx.release_log_end_behind as u64;
        match exit {
            Exit::Stopped | Exit::Idle => match self.release(log_end).await {
                Ok(()) => {
                    info!(customer_id = %id, ?exit, snapshot_current, log_end, "released tenant")
                }
                Err(e) => {
                    warn!(customer_id = %id, error = %e, "could not release the lease; others take over once it is stale")
                }
            },
            _ => {
                warn!(customer_id = %id, ?exit, "stopped holding tenant; local copy dropped");
            }
        }
        exit
    }
}

impl TenantActor {
    /// Every release of a holder that completed its claim names the
    /// log's end, whether or not the snapshot covers it: besides the
    /// next holder's check, it tells a cold start that this lock's epoch
    /// is above every epoch in the log (a failed claim releases without
    /// it), which fencing before the run is read relies on (`claim.rs`).
    async fn release(self, log_end: u64) -> crate::store::StoreResult<()> {
        self.lease.release_with_log(log_end).await
    }
}

/// Why a batch was not applied.
enum BatchError {
    /// SQLite failed and rolled the transaction back: nothing changed.
    RolledBack(String),
    /// The working copy may not match the log any more.
    Copy(String),
}

/// Resolves at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn answer_all(batch: Vec<Request>, result: Result<Reply, TenantError>) {
    for request in batch {
        let _ = request.reply.send(result.clone());
    }
}
