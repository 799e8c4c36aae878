//! Hrana streams on the holder: batons, the one interactive transaction
//! that may be open, and the requests waiting for it to end.
//!
//! A baton names a stream and its next pipeline: HMAC-SHA256 under a key
//! drawn for this acquisition, over the tenant, the lease (epoch, token),
//! the stream and a sequence number. Another tenant's, an earlier
//! holder's, another process's, a forged or a replayed baton is refused
//! with `STREAM_EXPIRED` before anything runs.
//!
//! While a stream's transaction is open it holds the writer: other
//! requests wait in `held` (answered after it ends, not failed), and the
//! transaction is rolled back [`TX_BOUND`] after its BEGIN. Its COMMIT is
//! uploaded and answered like any batch; the rest of its pipelines are
//! answered at once (nothing in them is acknowledged as durable). Uploads
//! in flight are confirmed before it begins, so what it reads is durable.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::time::Instant;
use tracing::warn;

use super::upload::{InFlight, send_all};
use super::{Exit, Request, TenantActor};
use crate::tenant::db::stream::RanOpen;
use crate::tenant::log;
use crate::tenant::sql::hrana::{self, StreamState};
use crate::tenant::{Op, Reply, SqlAnswer, TenantError};

/// A stream not used for this long is gone (its transaction rolled back).
pub const STREAM_IDLE: Duration = Duration::from_secs(10);
/// Longest an interactive transaction holds the tenant's writer.
pub const TX_BOUND: Duration = Duration::from_secs(5);
/// Streams one tenant keeps; the least recently used goes first.
const MAX_STREAMS: usize = 1024;

type Stream = Arc<Mutex<StreamState>>;

struct Entry {
    state: Stream,
    /// The sequence number the next baton of this stream must carry.
    seq: u64,
    last_used: Instant,
}

pub(super) struct Streams {
    key: [u8; 32],
    /// Tenant, epoch and lease token: what a baton is bound to.
    binding: Vec<u8>,
    next_id: u64,
    live: HashMap<u64, Entry>,
    /// Streams ended by the holder (a transaction rolled back at its bound):
    /// why, for their next pipeline.
    ended: HashMap<u64, String>,
    /// The stream whose transaction is open, and when it began.
    open: Option<(u64, Instant)>,
    /// Requests that arrived while the transaction was open, oldest first.
    held: VecDeque<Request>,
}

/// Where a request goes.
pub(super) enum Route {
    /// Into the next group commit, with its stream if it keeps one.
    Batch(Option<Stream>),
    /// Into the open transaction (started first if none is open).
    Open(u64, Stream),
    /// Refused: its stream is gone.
    Dead(String),
    /// Waits for the open transaction to end.
    Hold,
}

impl Streams {
    pub(super) fn new(tenant: &str, epoch: u64, token: &str) -> Streams {
        let mut binding = Vec::new();
        for part in [tenant.as_bytes(), &epoch.to_be_bytes(), token.as_bytes()] {
            binding.extend_from_slice(&(part.len() as u64).to_be_bytes());
            binding.extend_from_slice(part);
        }
        Streams {
            key: rand::random(),
            binding,
            next_id: 1,
            live: HashMap::new(),
            ended: HashMap::new(),
            open: None,
            held: VecDeque::new(),
        }
    }

    fn mac(&self, id: u64, seq: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(&self.binding);
        mac.update(&id.to_be_bytes());
        mac.update(&seq.to_be_bytes());
        mac
    }

    fn mint(&self, id: u64, seq: u64) -> String {
        let mut bytes = Vec::with_capacity(48);
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.extend_from_slice(&self.mac(id, seq).finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The stream and sequence number a baton names, if this holder gave it.
    fn verify(&self, baton: &str) -> Option<(u64, u64)> {
        let bytes = URL_SAFE_NO_PAD.decode(baton).ok()?;
        if bytes.len() != 48 {
            return None;
        }
        let id = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let seq = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
        self.mac(id, seq).verify_slice(&bytes[16..]).ok()?;
        Some((id, seq))
    }

    /// The open transaction's deadline, if one is open.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.open.map(|(_, began)| began + TX_BOUND)
    }

    pub(super) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub(super) fn hold(&mut self, request: Request) {
        self.held.push_back(request);
    }

    pub(super) fn take_held(&mut self) -> Vec<Request> {
        self.held.drain(..).collect()
    }

    /// Decides where a request goes; for a pipeline that keeps its stream,
    /// the baton its answer carries is minted here.
    pub(super) fn route(&mut self, op: &Op) -> Route {
        let Op::Hrana(program) = op else {
            return match self.open {
                Some(_) => Route::Hold,
                None => Route::Batch(None),
            };
        };
        let now = Instant::now();
        self.live
            .retain(|_, entry| now.duration_since(entry.last_used) < STREAM_IDLE);
        let id = match &program.baton {
            Some(baton) => match self.verify(baton) {
                None => {
                    return Route::Dead(
                        "this baton was not given by this tenant's current holder (another tenant's, an earlier holder's, or altered): the stream is gone; open a new stream".into(),
                    );
                }
                Some((id, seq)) => match self.live.get(&id) {
                    Some(entry) if entry.seq == seq => id,
                    Some(_) => {
                        return Route::Dead(
                            "this baton was already used (each baton is good for one pipeline): the stream is gone; open a new stream".into(),
                        );
                    }
                    None => {
                        let why = self.ended.remove(&id).unwrap_or_else(|| {
                            format!(
                                "the stream has ended (closed, or idle for over {}s): open a new stream",
                                STREAM_IDLE.as_secs()
                            )
                        });
                        return Route::Dead(why);
                    }
                },
            },
            None if program.ends_with_close() => {
                return match self.open {
                    Some(_) => Route::Hold,
                    None => Route::Batch(None),
                };
            }
            None if self.open.is_some() => return Route::Hold,
            None => {
                if self.live.len() >= MAX_STREAMS
                    && let Some(oldest) = self
                        .live
                        .iter()
                        .filter(|(id, _)| Some(**id) != self.open.map(|(open, _)| open))
                        .min_by_key(|(_, entry)| entry.last_used)
                        .map(|(id, _)| *id)
                {
                    self.live.remove(&oldest);
                }
                let id = self.next_id;
                self.next_id += 1;
                self.live.insert(
                    id,
                    Entry {
                        state: Arc::default(),
                        seq: 0,
                        last_used: now,
                    },
                );
                id
            }
        };
        let in_open = self.open.map(|(open, _)| open);
        if in_open.is_some() && in_open != Some(id) {
            return Route::Hold;
        }
        let next = self.live.get(&id).map(|entry| entry.seq + 1).unwrap_or(1);
        let baton = self.mint(id, next);
        let entry = self.live.get_mut(&id).expect("live");
        entry.seq = next;
        entry.last_used = now;
        let state = entry.state.clone();
        let begins = {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            state.baton = Some(baton);
            !program.ends_with_close() && program.may_begin(&state.sqls)
        };
        if in_open == Some(id) || begins {
            Route::Open(id, state)
        } else {
            Route::Batch(Some(state))
        }
    }

    /// Forgets streams closed by their pipelines.
    pub(super) fn forget_closed(&mut self) {
        self.live
            .retain(|_, entry| !entry.state.lock().unwrap_or_else(|e| e.into_inner()).closed);
    }

    /// Ends a stream: its next pipeline is refused with `why`.
    fn end(&mut self, id: u64, why: String) {
        self.live.remove(&id);
        if self.ended.len() >= MAX_STREAMS {
            self.ended.clear();
        }
        self.ended.insert(id, why);
    }
}

fn dead(request: Request, why: &str) {
    let answer = SqlAnswer {
        epoch: 0,
        repeated: false,
        results: Arc::new(hrana::stream_error(why)),
    };
    let _ = request.reply.send(Ok(Reply::Sql(answer)));
}

impl TenantActor {
    /// Runs a batch of requests: group commits, with the pipelines of an
    /// interactive transaction run on their own and what arrives during one
    /// held back until it ends.
    pub(super) async fn dispatch(&mut self, batch: Vec<Request>) -> Result<(), Exit> {
        let mut queue: VecDeque<Request> = batch.into();
        let mut grouped = Vec::new();
        while let Some(mut request) = queue.pop_front() {
            match self.streams.route(&request.op) {
                Route::Dead(why) => dead(request, &why),
                Route::Hold => self.streams.hold(request),
                Route::Batch(stream) => {
                    request.stream = stream;
                    grouped.push(request);
                }
                Route::Open(id, stream) => {
                    if !grouped.is_empty() {
                        self.process(std::mem::take(&mut grouped)).await?;
                        self.streams.forget_closed();
                    }
                    if !self.run_open(id, stream, request).await? {
                        // Those held arrived before the rest of this batch.
                        let held = self.streams.take_held();
                        for request in held.into_iter().rev() {
                            queue.push_front(request);
                        }
                    }
                }
            }
        }
        if !grouped.is_empty() {
            self.process(grouped).await?;
            self.streams.forget_closed();
        }
        Ok(())
    }

    /// Runs one pipeline in the stream's transaction, beginning it first if
    /// needed. Returns whether the transaction is still open.
    async fn run_open(&mut self, id: u64, stream: Stream, request: Request) -> Result<bool, Exit> {
        let Op::Hrana(program) = request.op.clone() else {
            unreachable!("only Hrana pipelines run in a stream's transaction")
        };
        if !self.lease.is_valid() {
            // The actor ends, rolling back whatever is open; the pipeline
            // goes to the next holder, which finds its stream gone.
            let _ = request.reply.send(Err(TenantError::NotHolder));
            return Err(Exit::LeaseLost);
        }
        let epoch = self.lease.epoch();
        let begin = !self.streams.is_open();
        if begin {
            // What the transaction reads must be durable already.
            self.drain_uploads().await?;
        }
        let seq = self.next_slot;
        let copy = self.copy.clone();
        let limits = self.ctx.sql.clone();
        let state = stream.clone();
        let work = move || -> Result<Ran, String> {
            let mut copy = copy.lock().unwrap_or_else(|e| e.into_inner());
            if begin {
                copy.db
                    .begin_open(&limits)
                    .map_err(|e| format!("cannot begin the transaction: {e}"))?;
            }
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            let ran = match copy.db.run_open(&program, &mut state, &limits) {
                Ok(ran) => ran,
                Err(error) => {
                    let _ = copy.db.rollback_open();
                    return Ok(Ran::Failed(error));
                }
            };
            if ran.open {
                return Ok(Ran::Open(ran));
            }
            if !ran.wrote {
                copy.db
                    .rollback_open()
                    .map_err(|e| format!("cannot end the transaction: {e}"))?;
                return Ok(Ran::Ended(ran, None));
            }
            let committed = match copy.db.commit_open(epoch) {
                Ok(committed) => committed,
                Err(e) => {
                    let _ = copy.db.rollback_open();
                    return Ok(Ran::Failed(crate::tenant::sql::SqlError::invalid(
                        None,
                        format!("the transaction could not commit: {e}; nothing of it was applied"),
                    )));
                }
            };
            let now = log::unix_ms(SystemTime::now());
            let delta = copy
                .capture(epoch, seq, now)?
                .ok_or("a committed transaction left nothing in the WAL")?
                .encode()
                .map_err(|e| e.to_string())?;
            Ok(Ran::Ended(ran, Some((committed.count, delta))))
        };
        let ran = tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(format!("the transaction's SQLite work failed: {e}")));
        let computed = Instant::now();
        let answer = |json| {
            Reply::Sql(SqlAnswer {
                epoch,
                repeated: false,
                results: Arc::new(json),
            })
        };
        match ran {
            Ok(Ran::Open(ran)) => {
                if begin {
                    self.streams.open = Some((id, Instant::now()));
                }
                // What the transaction read so far is answered now, before
                // any commit could prove this holder: as for a batch that
                // commits nothing, the lock must vouch for it.
                if let Err((e, exit)) = self.still_holder(computed).await {
                    self.end_open(
                        "this machine could not confirm it still holds the tenant; the transaction was rolled back".into(),
                    )
                    .await;
                    let _ = request.reply.send(Err(e));
                    return exit.map_or(Ok(false), Err);
                }
                let _ = request.reply.send(Ok(answer(ran.answer)));
                Ok(true)
            }
            Ok(Ran::Failed(error)) => {
                self.streams.open = None;
                self.streams.end(
                    id,
                    format!(
                        "the stream's transaction was rolled back: {}",
                        error.message
                    ),
                );
                let _ = request.reply.send(Err(TenantError::Sql(error)));
                Ok(false)
            }
            Ok(Ran::Ended(ran, None)) => {
                self.streams.open = None;
                self.streams.forget_closed();
                if let Err((e, exit)) = self.still_holder(computed).await {
                    let _ = request.reply.send(Err(e));
                    return exit.map_or(Ok(false), Err);
                }
                let _ = request.reply.send(Ok(answer(ran.answer)));
                Ok(false)
            }
            Ok(Ran::Ended(ran, Some((count, delta)))) => {
                self.streams.open = None;
                self.streams.forget_closed();
                self.next_slot += 1;
                let mut unanswered = Some(vec![(request.reply, answer(ran.answer))]);
                if self.ctx.ack_before_upload {
                    // Bench-only, as for batches; the simulation's negative
                    // control must then find lost transactions.
                    send_all(unanswered.take().expect("not answered yet"));
                }
                let metadata = log::slot_metadata(epoch, seq, &self.writer);
                let put = self.put(seq, delta.clone(), metadata.clone());
                let pipelined = !self.in_flight.is_empty();
                self.in_flight.push_back(InFlight {
                    pipelined,
                    unanswered,
                    epoch,
                    seq,
                    count,
                    batch_len: 1,
                    bytes: delta,
                    metadata,
                    started: Instant::now(),
                    task: tokio::spawn(put),
                });
                Ok(false)
            }
            Err(message) => {
                warn!(customer_id = %self.id, error = %message, "a stream's transaction failed");
                self.streams.open = None;
                self.streams
                    .end(id, format!("the stream's transaction failed: {message}"));
                let _ = request.reply.send(Err(TenantError::Unavailable(format!(
                    "customer {}: {message}",
                    self.id
                ))));
                Err(Exit::StoreFailed)
            }
        }
    }

    /// Rolls back the open transaction (its bound passed, or the holder is
    /// ending); its stream's next pipeline is refused with `why`.
    pub(super) async fn end_open(&mut self, why: String) {
        let Some((id, _)) = self.streams.open.take() else {
            return;
        };
        let copy = self.copy.clone();
        let rolled = tokio::task::spawn_blocking(move || {
            copy.lock()
                .unwrap_or_else(|e| e.into_inner())
                .db
                .rollback_open()
        })
        .await;
        if !matches!(rolled, Ok(Ok(()))) {
            warn!(customer_id = %self.id, "could not roll back a stream's transaction: {rolled:?}");
        }
        self.streams.end(id, why);
    }

    /// The open transaction passed its bound: rolled back, and the requests
    /// it held run.
    pub(super) async fn transaction_timed_out(&mut self) -> Result<(), Exit> {
        self.end_open(format!(
            "the stream's transaction was open for over {}s and was rolled back (an interactive transaction holds the tenant's writer; keep it short): nothing of it was applied; open a new stream and run it again",
            TX_BOUND.as_secs()
        ))
        .await;
        let held = self.streams.take_held();
        match held.is_empty() {
            true => Ok(()),
            false => self.dispatch(held).await,
        }
    }

    /// Requests held for a transaction that will not end normally.
    pub(super) fn held_requests(&mut self) -> Vec<Request> {
        self.streams.take_held()
    }
}

enum Ran {
    Open(RanOpen),
    Ended(RanOpen, Option<(u64, bytes::Bytes)>),
    Failed(crate::tenant::sql::SqlError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_baton_is_good_only_for_its_tenant_lease_and_holder() {
        let streams = Streams::new("7", 3, "token");
        let baton = streams.mint(5, 2);
        assert_eq!(streams.verify(&baton), Some((5, 2)));
        // Another tenant, another lease, another acquisition (its own key).
        assert_eq!(Streams::new("8", 3, "token").verify(&baton), None);
        let mut other_lease = Streams::new("7", 4, "token2");
        other_lease.key = streams.key;
        assert_eq!(other_lease.verify(&baton), None);
        assert_eq!(Streams::new("7", 3, "token").verify(&baton), None);
        // Altered: another stream id or sequence under the same MAC.
        let mut bytes = URL_SAFE_NO_PAD.decode(&baton).unwrap();
        bytes[7] ^= 1;
        assert_eq!(streams.verify(&URL_SAFE_NO_PAD.encode(&bytes)), None);
        assert_eq!(streams.verify("not a baton"), None);
    }
}
