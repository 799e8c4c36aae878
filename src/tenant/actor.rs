//! The tenant actor: the only owner of one tenant's SQLite working copy.
//!
//! Requests arrive through a channel. The actor takes everything queued as
//! one batch, applies it in one transaction, uploads the whole database with
//! `If-Match: <etag it last wrote>`, and answers the batch only after that
//! upload succeeded (group commit).
//!
//! Pipelining: when the store's ETags are the MD5 of the body (checked on
//! every confirmed upload), the next batch's upload is sent while the
//! previous one is in flight, with `If-Match: <MD5 of the previous body>`.
//! It can only succeed on top of exactly that body, so fencing is intact; if
//! it overtook its predecessor on the way it fails with 412 and is sent
//! again, in order, against the confirmed ETag. Batches are confirmed and
//! answered strictly in order.
//!
//! Fencing: every upload is conditional on the ETag this actor last read or
//! wrote, and every commit bumps `tenantd_meta.seq`, so the bytes (and the
//! ETag) always change. A new holder claims the database by writing its
//! epoch and uploading at once; from then on an older holder's upload fails
//! with 412 and that holder steps down without acknowledging anything.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::db::{Applied, Corrupt, Db, Work};
use super::sql::{SqlLimits, SqlRequest};
use super::{Answer, Op, Reply, SqlAnswer, TenantError};
use crate::TenantId;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::store::{DynStore, ETag, Metadata, Precondition, StoreError, StoreResult, keys};

/// Most requests applied in one transaction; bounds a batch's latency.
const MAX_BATCH: usize = 4096;
/// Uploads under way at once: the next batch's upload is sent while the
/// previous one is in flight, against the ETag it will have.
const PIPELINE_DEPTH: usize = 2;
/// Longest wait for a batch to fill once its first request is in; never
/// more than half an upload either, so a fast store is not slowed down.
const MAX_LINGER: Duration = Duration::from_millis(10);

struct Request {
    op: Op,
    reply: Replier,
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
}

impl TenantHandle {
    /// A counter operation (increment or read).
    pub async fn call(&self, op: Op) -> Result<Answer, TenantError> {
        match self.request(op).await? {
            Reply::Count(answer) => Ok(answer),
            Reply::Sql(_) => unreachable!("only SQL requests answer with results"),
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
            Reply::Count(_) => unreachable!("SQL requests answer with results"),
        }
    }

    pub async fn request(&self, op: Op) -> Result<Reply, TenantError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .await
            .map_err(|_| TenantError::NotHolder)?;
        // A dropped reply means the actor stepped down before it got to this
        // request, which it does only when nothing of it was written.
        rx.await.unwrap_or(Err(TenantError::NotHolder))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
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

/// Everything an actor needs besides its lease.
#[derive(Clone)]
pub struct ActorContext {
    pub store: DynStore,
    pub metrics: Metrics,
    pub machine_id: String,
    /// Folder for this machine's working copies.
    pub data_dir: PathBuf,
    /// Release the lease after this long without requests (pool mode).
    pub idle_timeout: Option<Duration>,
    /// Bounds on SQL requests.
    pub sql: SqlLimits,
    /// Bench-only: answer before the upload, as the original app did. Not
    /// reachable from `tenantd serve` (no flag, no env var).
    pub(crate) ack_before_upload: bool,
}

impl ActorContext {
    /// A context with the defaults of `tenantd serve`: no idle release,
    /// default SQL limits.
    pub fn new(store: DynStore, metrics: Metrics, machine_id: String, data_dir: PathBuf) -> Self {
        ActorContext {
            store,
            metrics,
            machine_id,
            data_dir,
            idle_timeout: None,
            sql: SqlLimits::default(),
            ack_before_upload: false,
        }
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
    /// The lease's ttl: the base of every upload's time budget.
    ttl: Duration,
    /// Used only inside `spawn_blocking`, one call at a time: SQLite work
    /// (a batch, a request's statements) must not hold a runtime worker
    /// that lease renewals need.
    db: Arc<Mutex<Db>>,
    path: PathBuf,
    etag: ETag,
    count: u64,
    /// Requests in the previous batch: how many to expect in the next.
    last_batch: usize,
    /// How long the last upload took.
    last_upload: Duration,
    /// Committed batches whose uploads are under way, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Whether the store's ETags are the MD5 of the body (S3 single-part
    /// PUTs, the file and memory stores): only then may the next upload be
    /// sent before the last one is confirmed. `None` until the first upload
    /// is confirmed; checked again on every upload whose ETag was predicted.
    etags_predictable: Option<bool>,
    rx: mpsc::Receiver<Request>,
    stop: CancellationToken,
    done: CancellationToken,
}

impl TenantActor {
    /// Takes over the tenant's database under `lease`: downloads it (or
    /// imports the original app's copy, or starts empty), writes the new
    /// epoch and uploads at once, then spawns the actor loop. Fails without
    /// writing anything when the database object is not usable.
    pub async fn start(
        id: TenantId,
        ctx: ActorContext,
        lease: Lease,
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
        let result = claim(&id, &ctx, &lease, &path).await;
        let (db, etag, count) = match result {
            Ok(claimed) => claimed,
            Err(e) => {
                remove_copy(&path);
                let _ = lease.release().await;
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let handle = TenantHandle {
            tx,
            epoch: lease.epoch(),
            stop: stop.clone(),
            done: done.clone(),
        };
        ctx.metrics
            .lease_holder
            .with_label_values(&[id.as_str()])
            .set(1);
        ctx.metrics
            .lease_epoch
            .with_label_values(&[id.as_str()])
            .set(lease.epoch() as i64);
        info!(customer_id = %id, epoch = lease.epoch(), count, "holding tenant");
        let actor = TenantActor {
            id,
            ctx,
            ttl: Duration::from_millis(lease.record().ttl_ms),
            lease,
            db: Arc::new(Mutex::new(db)),
            path,
            etag,
            count,
            last_batch: 1,
            last_upload: Duration::ZERO,
            in_flight: VecDeque::new(),
            etags_predictable: None,
            rx,
            stop,
            done,
        };
        let task = tokio::spawn(actor.run());
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
            let depth = if self.etags_predictable == Some(true) {
                PIPELINE_DEPTH
            } else {
                1
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
                request = self.rx.recv(), if self.in_flight.len() < depth => match request {
                    Some(request) => request,
                    None => break Exit::Stopped,
                },
                _ = idle => break Exit::Idle,
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
            if let Err(exit) = self.process(batch).await {
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
            let answer = Answer {
                count: self.count,
                epoch,
                repeated: false,
            };
            answer_all(batch, Ok(Reply::Count(answer)));
            return Ok(());
        }
        let (applied, bytes) = match self.apply(epoch, &batch).await {
            Ok(applied) => applied,
            Err(message) => {
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
        let (Some(committed), Some(bytes)) = (applied.committed, bytes) else {
            match self.in_flight.back_mut() {
                Some(InFlight {
                    unanswered: Some(waiting),
                    ..
                }) => waiting.extend(pending),
                _ => send_all(pending),
            }
            return Ok(());
        };
        let batch_len = pending.len();
        let mut unanswered = Some(pending);
        if self.ctx.ack_before_upload {
            // Bench-only (the original app's behaviour, an upper bound):
            // answer before the write is durable.
            send_all(unanswered.take().expect("not answered yet"));
        }
        // Sent before the previous upload is confirmed, against the ETag
        // that upload will have: the MD5 of its body. Out of order or
        // mispredicted, it fails with 412 and is sent again in order.
        // The MD5 pass over the body is paid only here, when it saves a
        // store round trip.
        let (condition, pipelined) = match self.in_flight.back_mut() {
            Some(previous) => {
                let predicted = match &previous.predicted {
                    Some(predicted) => predicted.clone(),
                    None => etag_off_runtime(previous.bytes.clone()).await,
                };
                previous.predicted = Some(predicted.clone());
                (predicted, true)
            }
            None => (self.etag.clone(), false),
        };
        let metadata = upload_metadata(epoch, committed.seq, &self.ctx.machine_id);
        let put = self.put(bytes.clone(), metadata.clone(), condition);
        self.in_flight.push_back(InFlight {
            unanswered,
            epoch,
            seq: committed.seq,
            count: committed.count,
            batch_len,
            predicted: None,
            bytes,
            metadata,
            pipelined,
            started: Instant::now(),
            task: tokio::spawn(put),
        });
        Ok(())
    }

    /// Applies a batch to the working copy off the runtime, and reads the
    /// copy back when it changed.
    async fn apply(
        &self,
        epoch: u64,
        batch: &[Request],
    ) -> Result<(Applied, Option<Bytes>), String> {
        let ops: Vec<Op> = batch.iter().map(|r| r.op.clone()).collect();
        let db = self.db.clone();
        let path = self.path.clone();
        let limits = self.ctx.sql.clone();
        let work = move || {
            let mut db = db.lock().unwrap_or_else(|e| e.into_inner());
            let work: Vec<Work> = ops
                .iter()
                .map(|op| match op {
                    Op::Increment { idempotency_key } => {
                        Work::Increment(idempotency_key.as_deref())
                    }
                    Op::Read => Work::Read,
                    Op::Sql {
                        request,
                        idempotency_key,
                    } => Work::Sql(request, idempotency_key.as_deref()),
                })
                .collect();
            let applied = db
                .apply_batch(epoch, &work, &limits, false)
                .map_err(|e| format!("SQLite error while applying a batch: {e}"))?;
            let bytes = match applied.committed {
                Some(_) => Some(read_copy(&path).map_err(|e| e.to_string())?),
                None => None,
            };
            Ok((applied, bytes))
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(format!("the batch's SQLite work failed: {e}")))
    }

    /// One conditional PUT of the database, given up after a time that
    /// fits its size ([`upload_budget`]). Not at the lease's deadline: the
    /// upload is fenced by its ETag condition, so one that lands after the
    /// lease ended is still correct (and read back as such), while cutting
    /// a big upload at every deadline would never let it finish.
    fn put(
        &self,
        bytes: Bytes,
        metadata: Metadata,
        condition: ETag,
    ) -> impl Future<Output = StoreResult<ETag>> + Send + 'static {
        let store = self.ctx.store.clone();
        let key = keys::database(self.id.as_str());
        let budget = upload_budget(self.ttl, bytes.len());
        async move {
            let put = store.put(&key, bytes, metadata, Precondition::IfMatch(condition));
            match tokio::time::timeout(budget, put).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::transient(
                    &key,
                    format!("the store did not confirm the upload within {budget:?}"),
                )),
            }
        }
    }

    /// Settles the oldest upload: answers its batch when it is durable,
    /// otherwise sends it again in order or ends the actor.
    ///
    /// An unclear outcome (a transient error, an ambiguous write, a 412
    /// after an attempt that may have landed late) is resolved by reading
    /// the object back: this epoch and this upload's seq or a later one in
    /// the object's metadata mean it landed; the object still at the last
    /// confirmed ETag means it did not, and it is sent again against that
    /// ETag (which can land at most once, whatever an earlier attempt
    /// does); a newer epoch means another machine took over. Only then,
    /// or when the lease is gone and nothing is known, does the actor end.
    async fn confirm_front(&mut self, first: StoreResult<ETag>) -> Result<(), Exit> {
        let mut upload = self.in_flight.pop_front().expect("an upload in flight");
        // A 412 for an upload sent only against a predicted ETag says
        // nothing yet: the previous upload is confirmed by now, so send it
        // again against the real ETag, once.
        let mut maybe_applied = false;
        let mut result = first;
        let mut retry_412 = upload.pipelined;
        let mut pause = Duration::from_millis(25);
        loop {
            match result {
                Ok(etag) => {
                    if upload.pipelined {
                        self.pipelined_outcome("ok");
                    }
                    let predicted = match &upload.predicted {
                        Some(predicted) => Some(predicted.clone()),
                        None if self.etags_predictable.is_none() => {
                            Some(etag_off_runtime(upload.bytes.clone()).await)
                        }
                        None => None,
                    };
                    self.confirmed(upload, etag, predicted);
                    return Ok(());
                }
                Err(e) if e.is_precondition() && retry_412 => {
                    retry_412 = false;
                    self.pipelined_outcome("resent");
                }
                Err(e) if e.is_precondition() && !maybe_applied => {
                    return Err(self.fail(upload, e, true).await);
                }
                Err(e) => {
                    maybe_applied = true;
                    match self.read_back(&upload).await {
                        ReadBack::Landed(etag) => {
                            info!(customer_id = %self.id, seq = upload.seq, error = %e, "upload outcome was unclear; read back: it landed");
                            result = Ok(etag);
                            continue;
                        }
                        ReadBack::Superseded => {
                            return Err(self.fail(upload, e, false).await);
                        }
                        ReadBack::NotLanded | ReadBack::Unknown(_) if !self.lease.is_valid() => {
                            return Err(self.fail(upload, e, false).await);
                        }
                        ReadBack::NotLanded => {
                            warn!(customer_id = %self.id, seq = upload.seq, error = %e, "upload failed and did not land; sending it again");
                        }
                        ReadBack::Unknown(read) => {
                            warn!(customer_id = %self.id, seq = upload.seq, error = %e, read_back = %read, "upload outcome unknown; sending it again against the confirmed ETag");
                        }
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
            result = self
                .put(
                    upload.bytes.clone(),
                    upload.metadata.clone(),
                    self.etag.clone(),
                )
                .await;
            upload.pipelined = false;
        }
    }

    /// Reads the database object's metadata to learn whether `upload`
    /// landed (see `confirm_front`).
    async fn read_back(&self, upload: &InFlight) -> ReadBack {
        let key = keys::database(self.id.as_str());
        let meta = match self.ctx.store.head(&key).await {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                return ReadBack::Unknown(StoreError::Fatal {
                    message: format!("{key} is missing"),
                });
            }
            Err(e) => return ReadBack::Unknown(e),
        };
        let number = |name: &str| meta.metadata.get(name).and_then(|v| v.parse::<u64>().ok());
        match (number("tenantd-epoch"), number("tenantd-seq")) {
            (Some(epoch), Some(seq)) if epoch == upload.epoch && seq == upload.seq => {
                ReadBack::Landed(meta.etag)
            }
            // A later upload of this actor landed, and it was sent against
            // this one's ETag (pipelined), so this one landed before it.
            (Some(epoch), Some(seq)) if epoch == upload.epoch && seq > upload.seq => {
                ReadBack::Landed(
                    upload
                        .predicted
                        .clone()
                        .unwrap_or_else(|| ETag::of(&upload.bytes)),
                )
            }
            (Some(epoch), _) if epoch > upload.epoch => ReadBack::Superseded,
            _ if meta.etag == self.etag => ReadBack::NotLanded,
            _ => ReadBack::Unknown(StoreError::Fatal {
                message: format!(
                    "{key} is at ETag {} with metadata {:?}, neither this upload nor the one before it",
                    meta.etag, meta.metadata
                ),
            }),
        }
    }

    fn pipelined_outcome(&self, outcome: &str) {
        self.ctx
            .metrics
            .pipelined_uploads
            .with_label_values(&[outcome])
            .inc();
    }

    fn confirmed(&mut self, upload: InFlight, etag: ETag, predicted: Option<ETag>) {
        if let Some(predicted) = predicted {
            self.etags_predictable = Some(etag == predicted);
        }
        self.etag = etag;
        self.count = upload.count;
        self.last_upload = upload.started.elapsed();
        self.ctx
            .metrics
            .upload_seconds
            .with_label_values::<&str>(&[])
            .observe(self.last_upload.as_secs_f64());
        self.ctx
            .metrics
            .batch_size
            .with_label_values::<&str>(&[])
            .observe(upload.batch_len as f64);
        if let Some(pending) = upload.unanswered {
            send_all(pending);
        }
    }

    /// The oldest upload failed for good: this actor steps down. Later
    /// uploads were sent against its body, so one of them that succeeded
    /// anyway (the failed one had been applied after all) carries every
    /// batch up to it; the rest are answered with the failure.
    async fn fail(&mut self, upload: InFlight, error: StoreError, not_applied: bool) -> Exit {
        let epoch = upload.epoch;
        let exit = if error.is_precondition() {
            warn!(customer_id = %self.id, epoch, "upload fenced off (412): another machine took over; stepping down");
            Exit::Fenced
        } else {
            warn!(customer_id = %self.id, epoch, error = %error, "upload failed; nothing of this batch was acknowledged; stepping down");
            Exit::StoreFailed
        };
        let mut settled = vec![(upload, Err(error), not_applied)];
        while !self.in_flight.is_empty() {
            let result = front_upload(&mut self.in_flight).await;
            let later = self.in_flight.pop_front().expect("awaited above");
            let not_applied = matches!(&result, Err(e) if e.is_precondition());
            settled.push((later, result, not_applied));
        }
        let durable_upto = settled.iter().rposition(|(_, result, _)| result.is_ok());
        for (index, (upload, result, not_applied)) in settled.into_iter().enumerate() {
            let Some(pending) = upload.unanswered else {
                continue;
            };
            if durable_upto.is_some_and(|last| index <= last) {
                send_all(pending);
                continue;
            }
            let answer = match result {
                // Definitely not written, and another machine holds the
                // tenant: the request may go there and be applied.
                Err(_) if not_applied && matches!(exit, Exit::Fenced) => {
                    Err(TenantError::NotHolder)
                }
                Err(e) => Err(TenantError::Unavailable(format!(
                    "customer {}: could not store the write ({e}); it was not acknowledged and may or may not be applied",
                    self.id
                ))),
                Ok(_) => unreachable!("durable uploads are answered above"),
            };
            for (reply, _) in pending {
                let _ = reply.send(answer.clone());
            }
        }
        exit
    }

    /// Settles every upload under way, oldest first.
    async fn drain_uploads(&mut self) -> Result<(), Exit> {
        while !self.in_flight.is_empty() {
            let result = front_upload(&mut self.in_flight).await;
            self.confirm_front(result).await?;
        }
        Ok(())
    }

    /// Ends the actor: on a clean stop, commits what is queued and releases
    /// the lease; in every case drops the working copy.
    async fn finish(mut self, exit: Exit) -> Exit {
        let mut exit = exit;
        // Uploads under way decide their batches' answers, whatever the exit.
        if let Err(e) = self.drain_uploads().await {
            exit = e;
        }
        if matches!(exit, Exit::Stopped | Exit::Idle) {
            self.rx.close();
            let mut rest = Vec::new();
            while let Ok(request) = self.rx.try_recv() {
                rest.push(request);
            }
            if !rest.is_empty() {
                let done = match self.process(rest).await {
                    Ok(()) => self.drain_uploads().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    exit = e;
                }
            }
        }
        self.rx.close();
        while let Ok(request) = self.rx.try_recv() {
            let _ = request.reply.send(Err(TenantError::NotHolder));
        }
        remove_copy(&self.path);
        let id = self.id.clone();
        self.ctx
            .metrics
            .lease_holder
            .with_label_values(&[id.as_str()])
            .set(0);
        match exit {
            Exit::Stopped | Exit::Idle => match self.lease.release().await {
                Ok(()) => info!(customer_id = %id, ?exit, "released tenant"),
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

/// The slowest store throughput an upload is given time for.
const MIN_UPLOAD_BYTES_PER_SEC: f64 = 4.0 * 1024.0 * 1024.0;

/// How long one upload attempt of `len` bytes may take: a lease ttl for
/// the round trip, plus the body at [`MIN_UPLOAD_BYTES_PER_SEC`].
fn upload_budget(ttl: Duration, len: usize) -> Duration {
    ttl + Duration::from_secs_f64(len as f64 / MIN_UPLOAD_BYTES_PER_SEC)
}

/// What a read-back says of an upload whose outcome was unclear.
enum ReadBack {
    Landed(ETag),
    NotLanded,
    /// Another machine wrote the database under a newer epoch.
    Superseded,
    Unknown(StoreError),
}

/// The ETag a body will have on a store whose ETags are MD5s, computed
/// off the runtime (a pass over the whole database).
async fn etag_off_runtime(bytes: Bytes) -> ETag {
    let copy = bytes.clone();
    tokio::task::spawn_blocking(move || ETag::of(&copy))
        .await
        .unwrap_or_else(|_| ETag::of(&bytes))
}

/// A batch's requests with their answers, sent once the batch is durable.
type Unanswered = Vec<(Replier, Reply)>;

/// A committed batch and its upload.
struct InFlight {
    /// `None` when answered before the upload (bench-only setting).
    unanswered: Option<Unanswered>,
    epoch: u64,
    /// `tenantd_meta.seq` of this commit, also in the upload's metadata.
    seq: u64,
    count: u64,
    batch_len: usize,
    bytes: Bytes,
    metadata: Metadata,
    /// The ETag this upload will have if the store's ETags are body MD5s;
    /// computed when the next upload is pipelined behind this one.
    predicted: Option<ETag>,
    /// Sent before the previous upload was confirmed.
    pipelined: bool,
    started: Instant,
    task: tokio::task::JoinHandle<StoreResult<ETag>>,
}

/// The oldest upload's result; pending forever when none is under way.
async fn front_upload(in_flight: &mut VecDeque<InFlight>) -> StoreResult<ETag> {
    match in_flight.front_mut() {
        Some(upload) => (&mut upload.task).await.unwrap_or_else(|e| {
            Err(StoreError::Fatal {
                message: format!("upload task failed: {e}"),
            })
        }),
        None => std::future::pending().await,
    }
}

fn send_all(pending: Unanswered) {
    for (reply, answer) in pending {
        let _ = reply.send(Ok(answer));
    }
}

fn answer_all(batch: Vec<Request>, result: Result<Reply, TenantError>) {
    for request in batch {
        let _ = request.reply.send(result.clone());
    }
}

fn upload_metadata(epoch: u64, seq: u64, machine_id: &str) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert("tenantd-epoch".into(), epoch.to_string());
    metadata.insert("tenantd-seq".into(), seq.to_string());
    metadata.insert("tenantd-holder".into(), machine_id.to_string());
    metadata
}

fn read_copy(path: &std::path::Path) -> Result<Bytes, StoreError> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| StoreError::Fatal {
            message: format!("cannot read the working copy {}: {e}", path.display()),
        })
}

fn remove_copy(path: &std::path::Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Downloads the database, writes this holder's epoch and uploads it.
/// Retried when a late upload of the previous holder slips in between.
async fn claim(
    id: &TenantId,
    ctx: &ActorContext,
    lease: &Lease,
    path: &std::path::Path,
) -> Result<(Db, ETag, u64), TenantError> {
    let key = keys::database(id.as_str());
    let unavailable = |e: StoreError| {
        TenantError::Unavailable(format!(
            "customer {id}: the store failed while taking over: {e}"
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !lease.is_valid() || Instant::now() > deadline {
            return Err(TenantError::NotHolder);
        }
        let (body, condition, source) = match ctx.store.get(&key).await.map_err(unavailable)? {
            Some(object) => {
                // SQLite would open an empty file as a new, empty database:
                // starting the tenant over silently is the one thing not to do.
                if object.body.is_empty() {
                    return Err(corrupt(id, &key, "the object is empty"));
                }
                (
                    Some(object.body),
                    Precondition::IfMatch(object.etag),
                    key.clone(),
                )
            }
            None => {
                let legacy = keys::legacy_database(id.as_str());
                match ctx.store.get(&legacy).await.map_err(unavailable)? {
                    Some(object) => {
                        info!(customer_id = %id, legacy_key = %legacy, "importing the original app's database");
                        (Some(object.body), Precondition::IfAbsent, legacy)
                    }
                    None => (None, Precondition::IfAbsent, key.clone()),
                }
            }
        };
        // Writing, checking and reading back a database of any size is
        // work for a blocking thread, not for a runtime worker that other
        // tenants' renewals need.
        let (db, committed, bytes) = {
            let (owned_id, path, source, epoch) = (
                id.clone(),
                path.to_path_buf(),
                source.clone(),
                lease.epoch(),
            );
            tokio::task::spawn_blocking(move || {
                open_and_claim(&owned_id, &path, body, &source, epoch)
            })
            .await
            .map_err(|e| {
                TenantError::Unavailable(format!("customer {id}: taking over failed: {e}"))
            })??
        };
        let metadata = upload_metadata(lease.epoch(), committed.seq, &ctx.machine_id);
        match ctx.store.put(&key, bytes, metadata, condition).await {
            Ok(etag) => return Ok((db, etag, committed.count)),
            Err(e) if e.is_precondition() => {
                // The previous holder's last upload landed after our read; its
                // writes are durable, so read again and claim on top of them.
                warn!(customer_id = %id, "database changed while taking over; reading it again");
                continue;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
}

/// Writes the downloaded body as the working copy (none: a new tenant),
/// opens and checks it, and writes this holder's epoch into it.
fn open_and_claim(
    id: &TenantId,
    path: &std::path::Path,
    body: Option<Bytes>,
    source: &str,
    epoch: u64,
) -> Result<(Db, super::db::Committed, Bytes), TenantError> {
    remove_copy(path);
    if let Some(body) = body {
        write_copy(path, &body)?;
    }
    let mut db = Db::open(path).map_err(|Corrupt(reason)| corrupt(id, source, &reason))?;
    let previous = db
        .epoch()
        .map_err(|e| corrupt(id, source, &e.to_string()))?;
    if previous >= epoch {
        // Only possible if the lock object was deleted or reset by hand:
        // the ETag chain still fences writers, so carry on, but say so.
        warn!(customer_id = %id, previous, epoch, "database was written under a newer epoch than this lease's: was machine.lock deleted? epochs restart");
    }
    // The object opened fine, so a failure to write the local copy is
    // this machine's problem, not the object's.
    let committed = db.claim(epoch).map_err(|e| {
        TenantError::Unavailable(format!(
            "customer {id}: cannot write the working copy {}: {e}",
            path.display()
        ))
    })?;
    let bytes =
        read_copy(path).map_err(|e| TenantError::Unavailable(format!("customer {id}: {e}")))?;
    Ok((db, committed, bytes))
}

fn corrupt(id: &TenantId, key: &str, reason: &str) -> TenantError {
    TenantError::Corrupt(format!(
        "customer {id}: the database object {key} is unusable ({reason}); tenantd will not overwrite it: restore a good copy of that object, or delete it to start the tenant over"
    ))
}

fn write_copy(path: &std::path::Path, bytes: &[u8]) -> Result<(), TenantError> {
    std::fs::write(path, bytes).map_err(|e| {
        TenantError::Unavailable(format!(
            "cannot write the working copy {}: {e}",
            path.display()
        ))
    })
}
