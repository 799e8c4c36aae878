//! Taking a tenant over: rebuild its database from the snapshot and the
//! log, fence off whatever a deposed holder may still upload, and open the
//! working copy.
//!
//! Every takeover fences (docs/protocol.md, "Claim"), whatever the previous
//! lock says: `released` is advisory (a failed claim releases too), so it
//! only decides how soon a lease may be taken, never whether to fence.
//! `restore --in-place` and `tenants delete` take a tenant over through
//! this code as well.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::TenantError;
use super::context::ActorContext;
use super::copy::WorkingCopy;
use super::db::{Corrupt, Db};
use super::delta::PageSums;
use super::log::{self, Fetched, LogError, Snapshot, Until, WINDOW, Writer};
use super::prefetch::{Listed, Prefetch, Prefetched, SnapshotRead, read_snapshot};
use crate::TenantId;
use crate::lease::Lease;
use crate::store::{DynStore, ETag, Precondition, StoreError, keys, transfer_allowance};

/// A tenant taken over.
pub struct Claimed {
    pub copy: WorkingCopy,
    pub count: u64,
    pub snapshot: Snapshot,
    /// The first slot this holder writes.
    pub next_slot: u64,
    /// Deltas (and their bytes) after the snapshot.
    pub since_snapshot: (u64, u64),
    /// Where the log ended as the previous holders left it: the run
    /// without this acquisition's own fences (compared with a released
    /// lock's `log_end`).
    pub previous_end: u64,
    /// Its fences went out before its lock write, in one round.
    pub fenced_early: bool,
}

/// Where the body to start from came from.
enum Source {
    /// `db.sqlite3` in the commit-log format.
    Snapshot,
    /// `db.sqlite3` written before the commit log, the original app's copy,
    /// or nothing (a new tenant): converted by writing a snapshot at once.
    Convert {
        key: String,
        condition: Precondition,
    },
}

/// Rebuilds the tenant's database at `path` and claims it for `lease`.
/// Retried from the start when the log moves under it (a late upload of
/// the previous holder, a compaction).
pub async fn claim(
    id: &TenantId,
    ctx: &ActorContext,
    lease: &mut Lease,
    path: &Path,
    prefetch: Option<Prefetch>,
) -> Result<Claimed, TenantError> {
    let began = Instant::now();
    let epoch_at_start = lease.epoch();
    let mut early = match prefetch {
        Some(mut prefetch) => {
            // Fences sent before the lock write count for the acquisition
            // they were planned for, and for no other.
            let sent_early = match prefetch.early_fences.take() {
                Some((token, fences)) if token == lease.token() => Some(fences),
                _ => None,
            };
            // Otherwise the fences need only where the listing ended: sent
            // now, beside the deltas' fetches and replay (the snapshot is
            // checked again once they are in, as always).
            let ahead = match sent_early {
                Some(fences) => Some(fences),
                None => match prefetch.listed().await {
                    Some(listed) if lease.is_valid() && may_fence_ahead(lease, &listed) => {
                        Some(fence_ahead(
                            id,
                            &ctx.store,
                            lease.epoch(),
                            Writer {
                                holder: ctx.machine_id.clone(),
                                token: lease.token().to_string(),
                            },
                            listed,
                        ))
                    }
                    _ => None,
                },
            };
            prefetch.take(id, path).await.map(|mut prefetched| {
                prefetched.ahead = ahead;
                prefetched
            })
        }
        None => None,
    };
    // Counted from here: a big snapshot's download is not a retry (the
    // claim's own download adds its transfer time, `transfer_allowance`).
    let mut deadline = Instant::now() + ctx.claim_retries_for;
    loop {
        let rebuilt = take_over_from(
            id,
            &ctx.store,
            lease,
            &ctx.machine_id,
            path,
            &mut deadline,
            early.take(),
        )
        .await?;
        let opening = Instant::now();
        let had_holders = rebuilt.had_holders();
        match open(id, ctx, lease, path, rebuilt).await {
            Ok(claimed) => {
                if claimed.fenced_early {
                    ctx.metrics.claims_fenced_before_lock_write.inc();
                }
                info!(
                    customer_id = %id,
                    claim_ms = began.elapsed().as_millis() as u64,
                    open_ms = opening.elapsed().as_millis() as u64,
                    "claimed"
                );
                sweep_uploads(id, &ctx.store);
                if lease.epoch() > epoch_at_start || (lease.created_the_lock() && had_holders) {
                    // The lock was deleted or reset by hand: the epoch had
                    // to be raised, or the lock was absent although the
                    // tenant has had holders. The holder it named may not
                    // have noticed (its heartbeat goes on); it answers
                    // reads only within half a ttl of reading its lock
                    // (actor `still_holder`), a read made before this
                    // lease was acquired, before `began`. So wait one ttl
                    // from `began` before this holder acknowledges
                    // anything that holder could miss.
                    let wait = (began + lease.ttl()).saturating_duration_since(Instant::now());
                    warn!(customer_id = %id, wait_ms = wait.as_millis() as u64, "machine.lock did not know the tenant's history (deleted or reset by hand): waiting one lease ttl before answering, so that the holder it replaced has stopped answering reads");
                    tokio::time::sleep(wait).await;
                }
                return Ok(claimed);
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Again(why)) => {
                warn!(customer_id = %id, why, "the tenant's objects changed while taking over; reading them again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(Attempt::Raise(_)) => unreachable!("opening never raises the epoch"),
        }
    }
}

/// Aborts the multipart uploads of the snapshot that an earlier holder
/// left incomplete (killed mid-upload): never state, but their parts cost
/// storage. In the background, off the cold start's path; the takeover's
/// fences already keep the earlier holder from completing anything that
/// counts (store/multipart.rs).
fn sweep_uploads(id: &TenantId, store: &DynStore) {
    let (store, key, id) = (store.clone(), keys::database(id.as_str()), id.clone());
    tokio::spawn(async move {
        match store.abort_incomplete_uploads(&key).await {
            Ok(0) => {}
            Ok(aborted) => {
                info!(customer_id = %id, aborted, "aborted incomplete multipart uploads of the snapshot")
            }
            Err(e) => {
                warn!(customer_id = %id, error = %e, "could not list or abort incomplete multipart uploads of the snapshot; the next claim tries again")
            }
        }
    });
}

/// A tenant's state rebuilt at a path under a lease, with every slot a
/// deposed writer could still reach taken by this writer's fences.
pub(crate) struct Rebuilt {
    pub snapshot: Snapshot,
    pub sums: PageSums,
    /// The last delta applied.
    pub applied: u64,
    /// The first slot this writer may use.
    pub next_slot: u64,
    /// Deltas (and their bytes) after the snapshot.
    pub since: (u64, u64),
    /// The snapshot is not in the commit-log format yet (or absent).
    pub converting: bool,
    /// The run's end without this acquisition's objects ([`Claimed::previous_end`]).
    pub previous_end: u64,
    /// [`Claimed::fenced_early`].
    pub fenced_early: bool,
    source: Source,
    recorded: Option<u64>,
}

impl Rebuilt {
    /// Whether some acquisition held the tenant before this one: it wrote
    /// the snapshot, or log objects after it (every claim fences, so the
    /// run without this claim's own objects is not empty). A new or
    /// re-created tenant's snapshot has epoch 0 and nothing after it.
    fn had_holders(&self) -> bool {
        self.snapshot.epoch > 0 || self.previous_end > self.snapshot.seq
    }
}

/// Takes the tenant over for `lease`: rebuilds its state at `path` from
/// the snapshot and the log, and fences the log after it. Raises the
/// lease's epoch (its own lock, `If-Match`) when the tenant's objects carry
/// an epoch at least as high from another acquisition.
pub(crate) async fn take_over(
    id: &TenantId,
    store: &DynStore,
    lease: &mut Lease,
    holder: &str,
    path: &Path,
    deadline: &mut Instant,
) -> Result<Rebuilt, TenantError> {
    take_over_from(id, store, lease, holder, path, deadline, None).await
}

/// [`take_over`], the first attempt starting from reads made before the
/// lease was settled (`early`, its snapshot already at `path`).
async fn take_over_from(
    id: &TenantId,
    store: &DynStore,
    lease: &mut Lease,
    holder: &str,
    path: &Path,
    deadline: &mut Instant,
    mut early: Option<Prefetched>,
) -> Result<Rebuilt, TenantError> {
    let key = keys::database(id.as_str());
    loop {
        if !lease.is_valid() {
            return Err(TenantError::NotHolder);
        }
        if Instant::now() > *deadline {
            warn!(customer_id = %id, "the takeover kept reading the tenant's objects again (they changed under it) past its budget; giving the lease up");
            return Err(TenantError::Unavailable(format!(
                "customer {id}: the tenant's objects kept changing while this machine took it over; retry"
            )));
        }
        let writer = Writer {
            holder: holder.to_string(),
            token: lease.token().to_string(),
        };
        let reads = early.take();
        // The release this lease replaced: objects of newer epochs after
        // it are contenders' fences, not the log its holder left.
        let released = lease.previous().filter(|p| p.released).map(|p| p.epoch);
        match attempt(
            id,
            store,
            (lease.epoch(), released),
            &writer,
            path,
            &key,
            deadline,
            reads,
        )
        .await
        {
            Ok(rebuilt) => return Ok(rebuilt),
            Err(Attempt::Again(why)) => {
                warn!(customer_id = %id, why, "the tenant's objects changed while taking over; reading them again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(Attempt::Raise(epoch)) => {
                let was = lease.epoch();
                match lease.raise_epoch(epoch).await {
                    Ok(()) => {
                        warn!(customer_id = %id, was, epoch, "the tenant's objects carry this lease's epoch or a newer one from another acquisition (machine.lock deleted or reset, or two leases overlapped); raised the lease's epoch");
                    }
                    Err(e) if e.is_precondition() => {
                        warn!(customer_id = %id, was, epoch, "another acquisition wrote under an epoch as new as this lease's, and the lock is no longer this lease's; not taking over");
                        return Err(TenantError::NotHolder);
                    }
                    Err(e) => return Err(unavailable(id, e)),
                }
            }
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
}

enum Attempt {
    Again(String),
    /// Another acquisition wrote this epoch minus one or newer: raise the
    /// lease's epoch to this and take over again.
    Raise(u64),
    Failed(TenantError),
}

impl Attempt {
    fn from_log(id: &TenantId, e: LogError) -> Attempt {
        match e {
            LogError::Raced(why) => Attempt::Again(why),
            LogError::Corrupt(why) => Attempt::Failed(TenantError::Corrupt(format!(
                "customer {id}: {why}; tenantd will not overwrite anything of this tenant"
            ))),
            LogError::Store(e) => Attempt::Failed(unavailable(id, e)),
            LogError::Local(why) => {
                Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {why}")))
            }
        }
    }
}

fn unavailable(id: &TenantId, e: StoreError) -> TenantError {
    TenantError::Unavailable(format!(
        "customer {id}: the store failed while taking over: {e}"
    ))
}

/// Removes what an earlier holding left at `path`, then reads the
/// snapshot there with the log beside it ([`read_snapshot`]).
async fn read_fresh(
    id: &TenantId,
    store: &DynStore,
    key: &str,
    path: &Path,
) -> Result<SnapshotRead, Attempt> {
    let owned = path.to_path_buf();
    blocking(move || {
        remove_copy(&owned);
        Ok(())
    })
    .await
    .map_err(|e| Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {e}"))))?;
    let read = read_snapshot(store, id, key, path)
        .await
        .map_err(|e| Attempt::Failed(unavailable(id, e)))?;
    if read.changed {
        return Err(Attempt::Again(format!("{key} changed while it was read")));
    }
    Ok(read)
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    id: &TenantId,
    store: &DynStore,
    (epoch, released): (u64, Option<u64>),
    writer: &Writer,
    path: &Path,
    key: &str,
    deadline: &mut Instant,
    prefetched: Option<Prefetched>,
) -> Result<Rebuilt, Attempt> {
    let failed = |e: StoreError| Attempt::Failed(unavailable(id, e));
    let began = Instant::now();
    if let Some(p) = prefetched {
        info!(
            customer_id = %id,
            from_replica = p.from_replica,
            read_and_replayed_ms = p.read_ms,
            waited_for_the_lease_ms = p.began.elapsed().as_millis() as u64,
            "taking over from reads made while the lease was contended"
        );
        let Prefetched {
            snapshot,
            recorded,
            mut sums,
            replayed,
            ahead,
            ..
        } = p;
        let (applied, next_slot, since, previous_end, fenced_early) = fence_after(
            id,
            store,
            key,
            (epoch, released),
            writer,
            path,
            &snapshot,
            &mut sums,
            replayed,
            began,
            ahead,
        )
        .await?;
        return Ok(Rebuilt {
            previous_end,
            fenced_early,
            snapshot,
            sums,
            applied,
            next_slot,
            since,
            converting: false,
            source: Source::Snapshot,
            recorded,
        });
    }
    let read = read_fresh(id, store, key, path).await?;
    let object = read.object;
    let mut plan = read.planned.map(|(_, plan)| plan);
    let (body, snapshot, source, recorded) = match object {
        Some(object) => {
            // SQLite would open an empty file as a new, empty database:
            // starting the tenant over silently is the one thing not to do.
            if object.size == 0 {
                return Err(Attempt::Failed(corrupt(id, key, "the object is empty")));
            }
            *deadline += transfer_allowance(object.size);
            let snapshot = log::describe_snapshot(key, object.etag.clone(), &object.metadata)
                .map_err(|e| Attempt::from_log(id, e))?;
            let recorded = log::recorded_checksum(key, &object.metadata)
                .map_err(|e| Attempt::from_log(id, e))?;
            if snapshot.legacy {
                refuse_metadata_less(store, id, key).await?;
            }
            let source = match snapshot.legacy {
                false => Source::Snapshot,
                true => Source::Convert {
                    key: key.to_string(),
                    condition: Precondition::IfMatch(object.etag),
                },
            };
            (true, snapshot, source, recorded)
        }
        None => {
            let stray = log::list_slots(store, id.as_str(), 0)
                .await
                .map_err(|e| Attempt::from_log(id, e))?;
            if let Some((seq, _)) = stray.first() {
                return Err(Attempt::Failed(TenantError::Corrupt(format!(
                    "customer {id}: {} exists but the snapshot {key} does not (an interrupted delete?); finish it with `tenantd tenants delete {id}` or restore {key}",
                    keys::log_slot(id.as_str(), *seq)
                ))));
            }
            let legacy = keys::legacy_database(id.as_str());
            let body = store
                .get_to_file(&legacy, path)
                .await
                .map_err(failed)?
                .is_some();
            if body {
                info!(customer_id = %id, legacy_key = %legacy, "importing the original app's database");
            }
            let snapshot = Snapshot {
                etag: None,
                seq: 0,
                epoch: 0,
                legacy: true,
                token: None,
            };
            let source = Source::Convert {
                key: legacy,
                condition: Precondition::IfAbsent,
            };
            (body, snapshot, source, None)
        }
    };
    // Writing and hashing a database of any size is work for a blocking
    // thread, not for a runtime worker that lease renewals need.
    let owned = path.to_path_buf();
    let sums = blocking(move || {
        if !body {
            remove_copy(&owned);
        }
        // The file was written: what cannot be read as pages is the
        // object's fault.
        Ok(PageSums::of_file(&owned).map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {e}"))))?;
    let mut sums = match sums {
        Ok(sums) => sums,
        Err(reason) => {
            let source = match &source {
                Source::Snapshot => key,
                Source::Convert { key, .. } => key,
            };
            return Err(Attempt::Failed(corrupt(
                id,
                source,
                &format!("not a SQLite database: {reason}"),
            )));
        }
    };
    if let Some(recorded) = recorded
        && recorded != sums.checksum()
    {
        return Err(Attempt::Failed(corrupt(
            id,
            key,
            &format!(
                "checksum mismatch: its metadata says {recorded:016x}, its pages give {:016x}",
                sums.checksum()
            ),
        )));
    }
    let (applied, next_slot, since, previous_end, fenced_early) = match &source {
        Source::Snapshot => {
            let planned = match plan.take() {
                Some(plan) => plan,
                None => log::plan(store, id.as_str(), &snapshot, Until::End).await,
            };
            let replayed = match planned {
                Ok(plan) => {
                    log::replay_planned(
                        store,
                        id.as_str(),
                        path,
                        &snapshot,
                        &mut sums,
                        Until::End,
                        plan,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let replayed = match replayed {
                Ok(replayed) => replayed,
                Err(e @ LogError::Corrupt(_)) => {
                    recheck(store, id, key, snapshot.etag.as_ref()).await?;
                    return Err(Attempt::from_log(id, e));
                }
                Err(e) => return Err(Attempt::from_log(id, e)),
            };
            fence_after(
                id,
                store,
                key,
                (epoch, released),
                writer,
                path,
                &snapshot,
                &mut sums,
                replayed,
                began,
                None,
            )
            .await?
        }
        Source::Convert { .. } => (snapshot.seq, snapshot.seq + 1, (0, 0), snapshot.seq, false),
    };
    Ok(Rebuilt {
        previous_end,
        fenced_early,
        snapshot,
        sums,
        applied,
        next_slot,
        since,
        converting: matches!(source, Source::Convert { .. }),
        source,
        recorded,
    })
}

/// Makes the slots after a replayed run this writer's: judges the epochs
/// read, fences (applying taken slots that continue the run), and checks
/// the snapshot again once the fences are in. Returns the last slot
/// applied, the first slot this writer uses, the deltas after the
/// snapshot, and where the previous holders left the log's end.
#[allow(clippy::too_many_arguments)]
async fn fence_after(
    id: &TenantId,
    store: &DynStore,
    key: &str,
    (epoch, released): (u64, Option<u64>),
    writer: &Writer,
    path: &Path,
    snapshot: &Snapshot,
    sums: &mut PageSums,
    mut replayed: log::Replayed,
    began: Instant,
    ahead: Option<JoinHandle<Ahead>>,
) -> Result<(u64, u64, (u64, u64), u64, bool), Attempt> {
    let read_and_replayed_ms = began.elapsed().as_millis() as u64;
    // This writer's fences and commits must outrank everything
    // another acquisition wrote, or readers would skip them (fences sent
    // ahead under a lower epoch are fences written before a raise).
    let others = replayed.others_epoch(writer);
    if others >= epoch {
        return Err(Attempt::Raise(others + 1));
    }
    // Fences sent ahead count as this writer's first round when they
    // were sent after the run replayed here as the previous holders left
    // it (same snapshot, same end). Fences sent before the lock write may
    // show up in that run themselves (the listing beside them saw them):
    // then every slot of the run past that end must be one of them, and
    // the window stays the one after that end. Otherwise the rounds below
    // find them again as this writer's own.
    let before = replayed.end_before(writer);
    let mut ahead = match ahead {
        Some(task) => task.await.ok(),
        None => None,
    }
    .filter(|a| {
        a.listed.end == before
            && a.listed.snapshot == snapshot.etag
            && (before + 1..=replayed.contiguous_end).all(|seq| a.ours.contains(&seq))
    });
    // Whether the last round was the one sent ahead with its HEAD after
    // it: any round made here needs the recheck below.
    let mut fenced_ahead;
    // Whether that round went out before the lock write.
    let mut early_round;
    // Every slot after the run that a deposed writer could reach
    // becomes this writer's (see `fence_round`); taken slots that
    // continue the run are applied, and the window moves on. `end` is
    // where the run ended when the last round was sent: its window,
    // `end + 1 ..= end + WINDOW`, is this writer's or lower epochs'.
    let mut ours = BTreeSet::new();
    let end = loop {
        let (end, mut taken) = match ahead.take() {
            Some(Ahead {
                fenced: Ok(taken),
                ours: theirs,
                rechecked,
                listed,
                early,
            }) => {
                ours = theirs;
                early_round = early;
                // Fences sent before the lock write of an acquisition
                // that then replaced the release they were planned on,
                // after a run that ends where that release said: no
                // holder has acknowledged anything past that end, and the
                // run up to it was read whole, so there is nothing a
                // compaction could have taken from under this claim and
                // no HEAD to wait for (docs/protocol.md, "Fences before
                // the lock write").
                fenced_ahead = rechecked || early;
                (listed.end, judge_epochs(taken, epoch)?)
            }
            _ => {
                fenced_ahead = false;
                early_round = false;
                let end = replayed.contiguous_end;
                let taken = fence_round(store, id, epoch, writer, end, &mut ours, true).await?;
                (end, taken)
            }
        };
        let mut extended = false;
        while let Some(found) = taken.remove(&(replayed.contiguous_end + 1)) {
            match replayed.extend(id.as_str(), path, sums, found).await {
                Ok(()) => extended = true,
                Err(e @ LogError::Corrupt(_)) => {
                    recheck(store, id, key, snapshot.etag.as_ref()).await?;
                    return Err(Attempt::from_log(id, e));
                }
                Err(e) => return Err(Attempt::from_log(id, e)),
            }
        }
        if !extended {
            break end;
        }
    };
    let next = end + WINDOW + 1;
    let fenced_ms = began.elapsed().as_millis() as u64;
    // After the fences, the old holder can confirm nothing past
    // `end`, so it can compact nothing newer than what was read: a
    // snapshot unchanged now means nothing read was compacted away (a
    // delta deleted after that, before it was fetched, fails its fetch).
    // Fences sent ahead that took the whole window at once were followed
    // by that read already.
    if !fenced_ahead {
        recheck(store, id, key, snapshot.etag.as_ref()).await?;
    }
    info!(
        customer_id = %id,
        from = end + 1,
        to = end + WINDOW,
        epoch,
        read_and_replayed_ms,
        fenced_ms,
        rechecked_ms = began.elapsed().as_millis() as u64,
        fenced_ahead,
        "fenced the log for this takeover"
    );
    Ok((
        replayed.applied,
        next,
        (replayed.deltas, replayed.delta_bytes),
        replayed.end_left_at_release(writer, released),
        fenced_ahead && early_round,
    ))
}

/// A deposed holder may compact while this takeover reads: its snapshot
/// write comes before its deletes, so a log that looks broken, or a
/// snapshot that changed by the time the fences are in, means "read
/// again", not "corrupt".
///
/// The delete's tombstone is read beside the HEAD (no added round trip):
/// one naming a slot past the snapshot's was written by a delete of this
/// life that fenced under a lease that has since lapsed, and may still
/// remove the snapshot (a stalled `tenants delete`). Writes acknowledged
/// here would go with it, so the tenant is not served until the delete is
/// finished (docs/protocol.md, "Tenant existence").
async fn recheck(
    store: &DynStore,
    id: &TenantId,
    key: &str,
    snapshot: Option<&ETag>,
) -> Result<(), Attempt> {
    let tombstone_key = keys::tombstone(id.as_str());
    let (now, tombstone) = tokio::join!(store.head(key), store.get(&tombstone_key));
    let failed = |e| Attempt::Failed(unavailable(id, e));
    let meta = match now.map_err(failed)? {
        Some(meta) if Some(&meta.etag) == snapshot => meta,
        _ => {
            return Err(Attempt::Again(format!(
                "{key} was rewritten while the tenant was taken over"
            )));
        }
    };
    let deleted_to = tombstone
        .map_err(failed)?
        .and_then(|t| crate::tenant::lifecycle::tombstone_end(&t.body));
    let seq = log::describe_snapshot(key, meta.etag, &meta.metadata)
        .ok()
        .map(|s| s.seq);
    match (deleted_to, seq) {
        (Some(end), Some(seq)) if end > seq => {
            warn!(customer_id = %id, tombstone_end = end, snapshot_seq = seq, "a delete of this tenant has fenced it and not finished; not serving it");
            Err(Attempt::Failed(TenantError::Unavailable(format!(
                "customer {id} is being deleted: {tombstone_key} names log slot {end}, past its snapshot's slot {seq}, \
                 so a delete fenced it and has not finished; it is not served meanwhile. \
                 Run `tenantd tenants delete {id}` to finish the delete"
            ))))
        }
        _ => Ok(()),
    }
}

/// One round of making the slots after the run ending at `end` this
/// writer's (every takeover, whatever the previous lock says): fences go
/// into `end + 1 ..= end + WINDOW` at once. A slot found taken is read
/// directly, never by listing again (a listing that lags would hide it on
/// every try), and returned: the caller applies (or, deleting, passes) the
/// object right after the run and calls again, until the slot after the
/// run holds its own fence. Objects of other acquisitions then left in the
/// window lie after that fence: with an epoch as new as `epoch` (judged
/// when `judge_epochs`) they would not be skipped, so the epoch is raised
/// first.
async fn fence_round(
    store: &DynStore,
    id: &TenantId,
    epoch: u64,
    writer: &Writer,
    end: u64,
    ours: &mut BTreeSet<u64>,
    judge: bool,
) -> Result<BTreeMap<u64, Fetched>, Attempt> {
    let taken = log::fence_window(store, id.as_str(), epoch, writer, end, ours)
        .await
        .map_err(|e| Attempt::from_log(id, e))?;
    match judge {
        true => judge_epochs(taken, epoch),
        false => Ok(taken),
    }
}

/// Objects of other acquisitions found in the window with an epoch as new
/// as `epoch` would not be skipped after this writer's fence: raise first.
fn judge_epochs(
    taken: BTreeMap<u64, Fetched>,
    epoch: u64,
) -> Result<BTreeMap<u64, Fetched>, Attempt> {
    match taken.values().map(|f| f.delta.epoch).max() {
        Some(newest) if newest >= epoch => Err(Attempt::Raise(newest + 1)),
        _ => Ok(taken),
    }
}

/// The first fence round of a takeover that read ahead, sent as soon as
/// the listing told where the run ends, while the deltas are still being
/// fetched and replayed; when the whole window became this writer's at
/// once, the snapshot's HEAD follows at once too (the recheck).
pub(crate) struct Ahead {
    listed: Listed,
    fenced: Result<BTreeMap<u64, Fetched>, LogError>,
    ours: BTreeSet<u64>,
    /// The HEAD after the fences showed the snapshot that was listed.
    rechecked: bool,
    /// Sent before the lock write ([`fence_early`]), with no HEAD after.
    early: bool,
}

impl Ahead {
    /// Every fence of the window landed as this writer's.
    #[cfg(test)]
    pub(crate) fn took_the_window(&self) -> bool {
        matches!(&self.fenced, Ok(taken) if taken.is_empty()) && self.ours.len() as u64 == WINDOW
    }
}

/// Fences may go out before the run's epochs are read only when this
/// lease's epoch is surely above all of them: the lock it replaced was
/// released by a holder that had completed its claim (it names the log's
/// end; a failed claim's release does not), so its epoch was above every
/// epoch in the log, and ours is above that. Otherwise a fence under a
/// lower epoch than a deposed holder's deltas would be skipped by readers
/// and break the chain after it (the model simulation finds this with a
/// lock deleted by hand).
fn may_fence_ahead(lease: &Lease, listed: &Listed) -> bool {
    let epoch = lease.epoch();
    lease
        .previous()
        .is_some_and(|p| p.released && p.log_end.is_some() && p.epoch < epoch)
        && listed.snapshot_epoch < epoch
}

fn fence_ahead(
    id: &TenantId,
    store: &DynStore,
    epoch: u64,
    writer: Writer,
    listed: Listed,
) -> JoinHandle<Ahead> {
    let (store, id) = (store.clone(), id.clone());
    tokio::spawn(async move { fence_once(&store, &id, epoch, &writer, listed, true).await })
}

/// One fence round after `listed.end`, and (`recheck_after`) the
/// snapshot's HEAD right after it when the whole window became this
/// writer's.
async fn fence_once(
    store: &DynStore,
    id: &TenantId,
    epoch: u64,
    writer: &Writer,
    listed: Listed,
    recheck_after: bool,
) -> Ahead {
    let key = keys::database(id.as_str());
    let mut ours = BTreeSet::new();
    let fenced = log::fence_window(store, id.as_str(), epoch, writer, listed.end, &mut ours).await;
    let rechecked = match &fenced {
        Ok(taken) if taken.is_empty() && recheck_after => {
            recheck(store, id, &key, listed.snapshot.as_ref())
                .await
                .is_ok()
        }
        _ => false,
    };
    Ahead {
        listed,
        fenced,
        ours,
        rechecked,
        early: !recheck_after,
    }
}

/// Fences sent before the lock write (docs/protocol.md, "Fences before
/// the lock write"): a contender that read a lock released by a holder
/// naming `log_end` fences `log_end + 1 ..= log_end + WINDOW` under the
/// acquisition it is about to attempt (its epoch, one above the release's,
/// and its token) beside its heartbeat's start, once the snapshot's HEAD
/// shows an epoch below that one and a slot no later than `log_end`.
///
/// Safe whether or not the lock write then wins: every slot up to
/// `log_end` exists, and no writer puts a commit at or below `log_end +
/// WINDOW` after that release (the next acquisition's claim fences that
/// window before it commits, and finds any fence of these there by
/// reading its slot). So these fences land only in slots no commit will
/// ever use, and a contender that lost leaves fences the winner reads and
/// outranks (a raise when its epoch is the same). `None` when the HEAD
/// rules them out: the claim fences after the run, as without them.
pub(crate) fn fence_early(
    store: &DynStore,
    id: &TenantId,
    holder: &str,
    planned: &crate::lease::Planned,
    described: impl std::future::Future<Output = Option<Snapshot>> + Send + 'static,
) -> JoinHandle<Ahead> {
    let (store, id) = (store.clone(), id.clone());
    let (epoch, end) = (planned.epoch, planned.log_end);
    let writer = Writer {
        holder: holder.to_string(),
        token: planned.token.to_string(),
    };
    tokio::spawn(async move {
        let snapshot = described.await;
        let listed = Listed {
            snapshot: snapshot.as_ref().and_then(|s| s.etag.clone()),
            snapshot_epoch: snapshot.as_ref().map_or(0, |s| s.epoch),
            end,
        };
        match snapshot {
            Some(snapshot) if snapshot.epoch < epoch && snapshot.seq <= end => {
                fence_once(&store, &id, epoch, &writer, listed, false).await
            }
            _ => Ahead {
                listed,
                fenced: Err(LogError::Raced(
                    "no fences before the lock write: the snapshot rules them out".into(),
                )),
                ours: BTreeSet::new(),
                rechecked: false,
                early: true,
            },
        }
    })
}

/// Fences a tenant's log for its deletion, under the deleter's lease: the
/// slots a paused holder could still reach become the deleter's fences,
/// which the delete keeps, so a late upload finds its slot taken. Reads no
/// log object's content (a tenant whose log is unusable can still be
/// deleted). Returns the fences' keys.
pub(crate) async fn fence_for_delete(
    store: &DynStore,
    id: &TenantId,
    lease: &Lease,
    holder: &str,
) -> Result<Vec<String>, TenantError> {
    let key = keys::database(id.as_str());
    let writer = Writer {
        holder: holder.to_string(),
        token: lease.token().to_string(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !lease.is_valid() || Instant::now() > deadline {
            return Err(TenantError::NotHolder);
        }
        let base = match store.head(&key).await.map_err(|e| unavailable(id, e))? {
            Some(meta) => log::describe_snapshot(&key, meta.etag, &meta.metadata)
                .ok()
                .map(|s| s.seq),
            None => None,
        };
        let listed = log::list_slots(store, id.as_str(), 0)
            .await
            .map_err(|e| unavailable(id, store_error(e)))?;
        // Without a readable snapshot, the run starts at the oldest slot left.
        let base = base.unwrap_or_else(|| listed.first().map_or(0, |(seq, _)| seq - 1));
        let mut end = base;
        for (seq, _) in listed.iter().filter(|(seq, _)| *seq > base) {
            if *seq != end + 1 {
                break;
            }
            end = *seq;
        }
        let mut ours = BTreeSet::new();
        let fenced = loop {
            let before = end;
            match fence_round(store, id, lease.epoch(), &writer, end, &mut ours, false).await {
                Ok(taken) => {
                    while taken.contains_key(&(end + 1)) {
                        end += 1;
                    }
                    if end == before {
                        break Ok(end);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match fenced {
            Ok(end) => {
                return Ok((end + 1..=end + WINDOW)
                    .map(|seq| keys::log_slot(id.as_str(), seq))
                    .collect());
            }
            Err(Attempt::Again(why)) => {
                warn!(customer_id = %id, why, "the log changed while it was fenced for deletion; fencing again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Raise(_)) => unreachable!("epochs are not judged for a delete"),
        }
    }
}

fn store_error(e: LogError) -> StoreError {
    match e {
        LogError::Store(e) => e,
        other => StoreError::Fatal {
            message: other.to_string(),
        },
    }
}

/// Opens the rebuilt file as the working copy, and converts a snapshot
/// not yet in the commit-log format.
async fn open(
    id: &TenantId,
    ctx: &ActorContext,
    lease: &Lease,
    path: &Path,
    rebuilt: Rebuilt,
) -> Result<Claimed, Attempt> {
    let store = &ctx.store;
    let failed = |e: StoreError| Attempt::Failed(unavailable(id, e));
    let key = keys::database(id.as_str());
    let epoch = lease.epoch();
    let Rebuilt {
        snapshot,
        sums,
        applied,
        next_slot,
        since,
        source,
        recorded,
        previous_end,
        fenced_early,
        ..
    } = rebuilt;
    let (owned, source_key) = (
        path.to_path_buf(),
        match &source {
            Source::Snapshot => key.clone(),
            Source::Convert { key, .. } => key.clone(),
        },
    );
    let owned_id = id.clone();
    let how = match (&source, recorded) {
        (Source::Convert { .. }, _) => Opening::Convert,
        // A snapshot that matched its recorded checksum was sound when
        // written, and every delta since was checked the same way.
        (Source::Snapshot, Some(_)) => Opening::Verified,
        (Source::Snapshot, None) => Opening::Unverified,
    };
    let copy =
        blocking(move || open_and_claim(&owned_id, &owned, &source_key, epoch, sums, applied, how))
            .await
            .map_err(|e| Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {e}"))))?
            .map_err(Attempt::Failed)?;
    let mut copy = copy;
    let count = copy
        .db
        .count()
        .map_err(|e| Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {e}"))))?;
    let Source::Convert { condition, .. } = source else {
        return Ok(Claimed {
            copy,
            count,
            snapshot,
            next_slot,
            since_snapshot: since,
            previous_end,
            fenced_early,
        });
    };
    // Converted once, by writing the database back as a commit-log
    // snapshot under the old fencing (If-Match on the object a writer of
    // the old format would write next): after this, no such writer can
    // write again.
    let (copy_back, job) = blocking(move || {
        copy.capture(epoch, applied, log::unix_ms(std::time::SystemTime::now()))
            .and_then(|_| copy.snapshot().map_err(|e| e.to_string()))
            .map(|job| (copy, job))
    })
    .await
    .map_err(|e| Attempt::Failed(TenantError::Unavailable(format!("customer {id}: {e}"))))?;
    copy = copy_back;
    let (seq, body, checksum) = job;
    let writer = Writer {
        holder: ctx.machine_id.clone(),
        token: lease.token().to_string(),
    };
    let metadata = log::snapshot_metadata(epoch, seq, checksum, &writer);
    let written = ctx.metrics.upload_bytes.with_label_values(&["snapshot"]);
    let len = body.len();
    match store.put_file(&key, body.path(), metadata, condition).await {
        Ok(etag) => {
            written.inc_by(len);
            info!(customer_id = %id, seq, "converted the database to the commit-log format");
            Ok(Claimed {
                copy,
                count,
                snapshot: Snapshot {
                    etag: Some(etag),
                    seq,
                    epoch,
                    legacy: false,
                    token: Some(writer.token.clone()),
                },
                next_slot: next_slot.max(seq + 1),
                since_snapshot: since,
                previous_end,
                fenced_early,
            })
        }
        Err(e) if e.is_precondition() => Err(Attempt::Again(format!(
            "{key} changed while it was converted (a late upload of the previous holder)"
        ))),
        Err(e) => Err(failed(e)),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("taking over failed: {e}"))?
}

/// How much of a rebuilt file is already known to be sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    /// Not in the commit-log format yet: checked, and uploaded whole.
    Convert,
    /// Its snapshot matched the recorded checksum.
    Verified,
    Unverified,
}

/// Opens and checks the rebuilt file, and writes this holder's epoch into
/// it (a commit that the first batch's delta carries).
fn open_and_claim(
    id: &TenantId,
    path: &Path,
    source: &str,
    epoch: u64,
    sums: PageSums,
    slot: u64,
    how: Opening,
) -> Result<Result<WorkingCopy, TenantError>, String> {
    let converting = how == Opening::Convert;
    // Opening switches a database that is not in WAL mode yet, which
    // rewrites its header in place: a conversion uploads the whole file
    // anyway, but a commit-log snapshot must come out of it unchanged, or
    // the next delta would not chain onto what the log holds. A file in WAL
    // mode already is left as it is (changes go to the WAL), so only other
    // files are hashed again after opening.
    let wal_mode = wal_mode(path);
    let opened = if how == Opening::Verified && wal_mode {
        Db::open_verified(path)
    } else {
        Db::open(path)
    };
    let mut db = match opened {
        Ok(db) => db,
        Err(Corrupt(reason)) => return Ok(Err(corrupt(id, source, &reason))),
    };
    let sums = if converting || !wal_mode {
        let actual =
            PageSums::of_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !converting && actual.checksum() != sums.checksum() {
            return Ok(Err(TenantError::Unavailable(format!(
                "customer {id}: opening the rebuilt database changed it (checksum {:016x} -> {:016x}); this is a tenantd bug, nothing was written",
                sums.checksum(),
                actual.checksum()
            ))));
        }
        actual
    } else {
        sums
    };
    let previous = match db.epoch() {
        Ok(previous) => previous,
        Err(e) => return Ok(Err(corrupt(id, source, &e.to_string()))),
    };
    if previous >= epoch {
        // Only possible if the lock object was deleted or reset by hand:
        // the log still fences writers, so carry on, but say so.
        warn!(customer_id = %id, previous, epoch, "database was written under a newer epoch than this lease's: was machine.lock deleted? epochs restart");
    }
    // The object opened fine, so a failure to write the local copy is
    // this machine's problem, not the object's.
    if let Err(e) = db.claim(epoch) {
        return Ok(Err(TenantError::Unavailable(format!(
            "customer {id}: cannot write the working copy {}: {e}",
            path.display()
        ))));
    }
    Ok(Ok(WorkingCopy::new(db, sums, path, slot)))
}

/// Whether a database file's header says WAL mode (read and write
/// versions 2, bytes 18 and 19).
fn wal_mode(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|_| header[18] == 2 && header[19] == 2)
}

/// A `db.sqlite3` without `tenantd-format` is converted only while the log
/// is empty. With objects in the log it is a snapshot whose metadata was
/// lost (copied down and up by hand): converting it would start a new
/// history at slot 0 that skips every later delta by epoch, dropping
/// acknowledged writes without a word.
async fn refuse_metadata_less(
    store: &crate::store::DynStore,
    id: &TenantId,
    key: &str,
) -> Result<(), Attempt> {
    let slots = log::list_slots(store, id.as_str(), 0)
        .await
        .map_err(|e| Attempt::from_log(id, e))?;
    let (Some((first, _)), Some((last, _))) = (slots.first(), slots.last()) else {
        return Ok(());
    };
    Err(Attempt::Failed(TenantError::Corrupt(format!(
        "customer {id}: {key} has no tenantd metadata ({format}), but the log {log} holds {n} object(s) ({first_key} to {last_key}): \
         the snapshot probably lost its metadata (copied down and up by hand, e.g. `aws s3 cp`), and taking it as a database from before the commit log would drop the log's commits. \
         tenantd will not overwrite anything of this tenant. Repair: put {key} back with its metadata (tenantd-format, tenantd-seq, tenantd-epoch, tenantd-checksum), \
         or rebuild the tenant's state with `tenantd restore --customer-id {id} --at <slot or time> --output <file>` from an archived snapshot and the log, then make it current (`tenantd restore --customer-id {id} --in-place --yes`)",
        format = log::FORMAT_KEY,
        log = keys::log_prefix(id.as_str()),
        n = slots.len(),
        first_key = keys::log_slot(id.as_str(), *first),
        last_key = keys::log_slot(id.as_str(), *last),
    ))))
}

pub fn corrupt(id: &TenantId, key: &str, reason: &str) -> TenantError {
    TenantError::Corrupt(format!(
        "customer {id}: the database object {key} is unusable ({reason}); tenantd will not overwrite it: restore a good copy of that object, or delete it to start the tenant over"
    ))
}

pub fn remove_copy(path: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
}
