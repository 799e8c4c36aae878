//! The model's paths besides the claim that write a tenant's objects:
//! compaction, release, a failed claim, `tenants delete` and creation, an
//! operator deleting the lock or re-uploading the snapshot without its
//! metadata, and a lagging LIST.

use std::time::Duration;

use bytes::Bytes;
use rand::RngExt;

use super::{EPOCH_KEY, FORMAT_KEY, Phase, Position, Role, Sim, TENANT, snapshot_metadata};
use tenantd_core::store::{DynStore, Metadata, ObjectStore, Precondition, keys};
use tenantd_core::tenant::delta::FENCE_MAX_BYTES;

pub(super) enum Compaction {
    Put {
        target: Position,
        condition: Precondition,
    },
    List {
        upto: u64,
    },
    Delete {
        keys: Vec<String>,
    },
}

impl Compaction {
    fn describe(&self) -> String {
        match self {
            Compaction::Put { target, .. } => format!("writes the snapshot {target:?}"),
            Compaction::List { upto } => format!("lists the log up to slot {upto}"),
            Compaction::Delete { keys } => format!("deletes {:?}", keys.last()),
        }
    }
}

/// Where a delete is: the snapshot first (the tenant no longer exists),
/// then the log, then the lock.
pub(super) enum Deleting {
    /// Records the last slot of the delete's fences where creation reads it
    /// directly.
    Tombstone,
    /// The lease check right before the snapshot's removal; the delete may
    /// stall after it, past its lease (the real delete's `check()`).
    Check,
    Snapshot,
    List,
    Slots(Vec<String>),
    Lock,
}

impl Sim {
    pub(super) fn start_compaction(&mut self, w: usize) {
        let writer = &mut self.writers[w];
        if !writer.active()
            || !matches!(writer.role, Role::Holder | Role::Restore { .. })
            || writer.compaction.is_some()
            || writer.acked.seq <= writer.snapshot_seq
        {
            return;
        }
        writer.compaction = Some(Compaction::Put {
            target: writer.acked,
            condition: writer
                .snapshot_etag
                .clone()
                .map_or(Precondition::IfAbsent, Precondition::IfMatch),
        });
    }

    pub(super) async fn compaction_step(&mut self, w: usize) {
        let Some(step) = self.writers[w].compaction.take() else {
            return;
        };
        let store = self.writers[w].store.clone();
        let db_key = keys::database(TENANT);
        let (epoch, token) = (self.writers[w].epoch, self.writers[w].token);
        self.event(format!("epoch {epoch}: compaction {}", step.describe()));
        let next = match step {
            Compaction::Put { target, condition } => {
                let body = Bytes::from(serde_json::to_vec(&target).expect("serializes"));
                match store
                    .put(&db_key, body, snapshot_metadata(token), condition)
                    .await
                {
                    Ok(etag) => {
                        self.outcome.snapshots += 1;
                        let writer = &mut self.writers[w];
                        writer.snapshot_etag = Some(etag);
                        writer.snapshot_seq = target.seq;
                        Some(Compaction::List { upto: target.seq })
                    }
                    Err(e) if e.is_precondition() => match store.get(&db_key).await {
                        Ok(Some(object)) => {
                            let current = serde_json::from_slice::<Position>(&object.body)
                                .map(|p| p.seq)
                                .unwrap_or(0);
                            if current < target.seq {
                                Some(Compaction::Put {
                                    target,
                                    condition: Precondition::IfMatch(object.etag),
                                })
                            } else {
                                let writer = &mut self.writers[w];
                                writer.snapshot_etag = Some(object.etag);
                                writer.snapshot_seq = current;
                                None
                            }
                        }
                        // Deleted: the tenant is gone, and a compaction
                        // must not bring it back.
                        Ok(None) | Err(_) => None,
                    },
                    // It may land later: delete nothing on an unknown outcome.
                    Err(_) => None,
                }
            }
            Compaction::List { upto } => match store.list(&keys::log_prefix(TENANT), None).await {
                Ok(listed) => {
                    let keep_fences = self.config.keep_fences;
                    let keys = listed
                        .into_iter()
                        .filter(|l| keys::log_seq(&l.key).is_some_and(|s| s <= upto))
                        .filter(|l| l.size > FENCE_MAX_BYTES || !keep_fences)
                        .map(|l| l.key)
                        .collect();
                    Some(Compaction::Delete { keys })
                }
                Err(_) => None,
            },
            Compaction::Delete { mut keys } => {
                if let Some(key) = keys.pop()
                    && store.delete(&key).await.is_ok()
                {
                    self.outcome.deleted += 1;
                    self.deleted_keys.insert(key);
                }
                (!keys.is_empty()).then_some(Compaction::Delete { keys })
            }
        };
        self.writers[w].compaction = next;
    }

    /// The newest holder releases, if all its uploads are confirmed.
    pub(super) async fn release_newest(&mut self) {
        let Some(w) = (0..self.writers.len()).rev().find(|&w| {
            let writer = &self.writers[w];
            writer.live() && writer.role == Role::Holder && !writer.loser
        }) else {
            return;
        };
        let writer = &self.writers[w];
        if writer.active() && writer.slots.is_empty() && writer.compaction.is_none() {
            self.release(w).await;
        } else if writer.active() && self.rng.random_range(0..2) == 0 {
            // SIGTERM: it drains first, and hands the tenant off.
            self.writers[w].draining = true;
        }
    }

    /// A drained holder releases, and the next request reaches another
    /// machine at once (a cold start on that release: fences before its
    /// lock write, [`super::EarlyFences`]).
    pub(super) async fn release_and_hand_off(&mut self, w: usize) {
        self.release(w).await;
        if self.lock.released && self.lock.log_end {
            self.takeover(Role::Holder);
        }
    }

    /// Release: a compaction of the acknowledged prefix (one attempt, as a
    /// SIGTERM's drain has a deadline), then `released: true` on the lock
    /// if the compaction succeeded (or always, the old rule).
    pub(super) async fn release(&mut self, w: usize) {
        let writer = &self.writers[w];
        let compacted = if writer.acked.seq > writer.snapshot_seq {
            let body = Bytes::from(serde_json::to_vec(&writer.acked).expect("serializes"));
            let condition = writer
                .snapshot_etag
                .clone()
                .map_or(Precondition::IfAbsent, Precondition::IfMatch);
            let written = writer
                .store
                .put(
                    &keys::database(TENANT),
                    body,
                    snapshot_metadata(writer.token),
                    condition,
                )
                .await;
            if written.is_ok() {
                self.outcome.snapshots += 1;
            }
            written.is_ok()
        } else {
            true
        };
        let writer = &self.writers[w];
        if let Role::Restore { wrote: true } = writer.role {
            self.outcome.restores += 1;
        }
        let says_released = compacted || !self.rules.release_after_compaction;
        let ours = self.lock.present && self.lock.token == writer.token;
        if says_released && ours {
            self.lock.released = true;
            self.lock.log_end = matches!(writer.role, Role::Holder);
            self.lock.end = writer.acked.seq;
            if self.lock.log_end {
                self.releases_seen.push((self.lock.epoch, writer.acked.seq));
            }
            self.outcome.releases += 1;
        }
        if !(says_released && ours && compacted) {
            self.outcome.releases_unclean += 1;
        }
        self.event(format!(
            "epoch {} token {}: releases at slot {} (compacted {compacted}, released {says_released})",
            writer.epoch, writer.token, writer.acked.seq
        ));
        self.stop(w, "released");
    }

    /// A claim fails after its acquisition: store errors past its
    /// deadline, an anomaly in the listing.
    pub(super) fn fail_a_claim(&mut self) {
        let claiming: Vec<usize> = (0..self.writers.len())
            .filter(|&w| {
                matches!(self.writers[w].phase, Phase::Claiming(_))
                    && self.writers[w].role != Role::Final
            })
            .collect();
        if claiming.is_empty() {
            return;
        }
        let w = claiming[self.rng.random_range(0..claiming.len())];
        self.claim_failed(w, "claim failed (store errors, deadline)");
    }

    /// One step of `tenants delete`. The old delete took the lock and
    /// deleted everything without fencing; the new one claimed first and
    /// keeps its fences.
    pub(super) async fn delete_step(&mut self, w: usize) {
        let Some(step) = self.writers[w].deleting.take() else {
            return;
        };
        let store = self.writers[w].store.clone();
        let token = self.writers[w].token;
        let next = match step {
            Deleting::Tombstone => {
                if !(self.lock.present && self.lock.token == token) {
                    return self.stop(w, "lost the lease while deleting");
                }
                let key = keys::tombstone(TENANT);
                // The end of the window the delete's claim closed (its own
                // fences, and slots it found taken), as the real delete.
                let fenced = self.writers[w].head.seq;
                let written = match store.get(&key).await {
                    Ok(old) => {
                        let old = old.map_or(0, |o| log_end_of(&o.body));
                        let body = serde_json::json!({ "log_end": old.max(fenced) });
                        store
                            .put(
                                &key,
                                Bytes::from(body.to_string()),
                                Metadata::new(),
                                Precondition::None,
                            )
                            .await
                            .map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                match written {
                    Ok(()) => Some(Deleting::Check),
                    Err(_) => Some(Deleting::Tombstone),
                }
            }
            Deleting::Check => {
                if !(self.lock.present && self.lock.token == token) {
                    return self.stop(w, "lost the lease while deleting");
                }
                // A stall here (a paused CLI) may outlive the lease while
                // another machine takes this same life over.
                if self.rng.random_range(0..2) == 0 {
                    self.writers[w].stalled_until = self.step + self.rng.random_range(100..800);
                    self.event(format!(
                        "token {token}: the delete stalls before removing the snapshot, until step {}",
                        self.writers[w].stalled_until
                    ));
                    // Its lease lapses, and the next request's machine
                    // takes the tenant over.
                    self.writers[w].deleting = Some(Deleting::Snapshot);
                    self.takeover(Role::Holder);
                    return;
                }
                Some(Deleting::Snapshot)
            }
            Deleting::Snapshot => {
                let deleted = store.delete(&keys::database(TENANT)).await;
                // A lost response deleted it all the same: the model's own
                // view of the store says when the incarnation ended.
                let gone = matches!(self.shared.head(&keys::database(TENANT)).await, Ok(None));
                if gone && self.exists {
                    let fenced_to = self.writers[w].head.seq;
                    self.life_deleted(&format!("token {token}"), fenced_to);
                }
                // A delete that stalls here (a paused CLI, a slow store)
                // may outlive its lease while the tenant is created again
                // and written: its deletions that follow must not reach
                // the new life.
                if deleted.is_ok() && self.rng.random_range(0..2) == 0 {
                    self.writers[w].stalled_until = self.step + self.rng.random_range(0..400);
                }
                match deleted {
                    Ok(()) => Some(Deleting::List),
                    Err(_) => Some(Deleting::Snapshot),
                }
            }
            Deleting::List => {
                let bounded = self.rules.bounded_delete;
                if bounded && !(self.lock.present && self.lock.token == token) {
                    return self.stop(w, "lost the lease while deleting");
                }
                // The whole tenant, as the real delete lists it.
                match store.list(&keys::tenant_prefix(TENANT), None).await {
                    Ok(listed) => {
                        let keep = &self.writers[w].fenced_slots;
                        let tombstone = keys::tombstone(TENANT);
                        // The end of the delete's fences: every slot of the
                        // deleted life is at or below it, every slot of a
                        // later one above it.
                        let end = self.writers[w].head.seq;
                        let keys = listed
                            .into_iter()
                            .filter(|l| {
                                let seq = keys::log_seq(&l.key);
                                l.key != tombstone
                                    && !(self.rules.delete_claims
                                        && seq.is_some_and(|s| keep.contains(&s)))
                                    && !(bounded && seq.is_none_or(|s| s > end))
                            })
                            .map(|l| l.key)
                            .collect::<Vec<_>>();
                        self.event(format!(
                            "token {token}: the delete lists the log: removes {:?}",
                            keys.iter()
                                .filter_map(|k| keys::log_seq(k))
                                .collect::<Vec<_>>()
                        ));
                        Some(Deleting::Slots(keys))
                    }
                    Err(_) => Some(Deleting::List),
                }
            }
            Deleting::Slots(mut keys) => match keys.last() {
                None => Some(Deleting::Lock),
                Some(key) => {
                    if store.delete(key).await.is_ok() {
                        self.deleted_keys.insert(keys.pop().expect("a key"));
                    }
                    Some(Deleting::Slots(keys))
                }
            },
            Deleting::Lock => {
                if !self.rules.bounded_delete || self.lock.token == token {
                    self.lock.present = false;
                    return self.stop(w, "deleted the tenant");
                }
                return self.stop(w, "deleted the tenant, but not the lock another holds");
            }
        };
        self.writers[w].deleting = next;
    }

    /// The snapshot of the current life is gone (a delete that fenced the
    /// log up to `fenced_to`): the next incarnation begins. A write of the
    /// ended life acknowledged in a slot past those fences landed after
    /// the delete fenced, and went with the snapshot.
    pub(super) fn life_deleted(&mut self, who: &str, fenced_to: u64) {
        let ended = self.incarnation;
        self.exists = false;
        self.incarnation += 1;
        self.outcome.deletes += 1;
        self.event(format!(
            "{who}: deleted the snapshot; incarnation {} begins",
            self.incarnation
        ));
        if let Some(violation) = self.check.life_deleted(ended, fenced_to) {
            self.violation(violation);
        }
    }

    /// An operator finishes a delete that fenced and wrote its tombstone
    /// but never removed the snapshot (it crashed, or was abandoned): a
    /// tombstone past the snapshot's slot.
    pub(super) async fn finish_abandoned_delete(&mut self) {
        if !self.exists {
            return;
        }
        let store: DynStore = self.shared.clone();
        let Ok(Some(end)) = unfinished_delete(&store).await else {
            return;
        };
        if store.delete(&keys::database(TENANT)).await.is_ok() {
            self.life_deleted("the operator finishing an abandoned delete", end);
        }
    }

    /// `tenants create` of a tenant that does not exist. The new rule
    /// starts the first snapshot after the highest slot left in the log,
    /// above every epoch there; the old one at slot 0, epoch 0.
    pub(super) async fn create(&mut self) {
        if self.exists {
            return;
        }
        let fault = self.fault_store(0, false);
        if !self.config.paths.create_under_lag {
            fault.handle().update(|c| c.list_lag = Duration::ZERO);
        }
        let store: DynStore = std::sync::Arc::new(fault);
        let mut pos = Position {
            inc: self.incarnation,
            ..Position::default()
        };
        if self.rules.delete_claims {
            let Ok(listed) = store.list(&keys::log_prefix(TENANT), None).await else {
                return;
            };
            let mut max_epoch = None;
            for l in &listed {
                let Ok(Some(meta)) = store.head(&l.key).await else {
                    continue;
                };
                let epoch = meta.metadata.get(EPOCH_KEY).and_then(|e| e.parse().ok());
                max_epoch = max_epoch.max(epoch);
            }
            pos.seq = listed
                .iter()
                .filter_map(|l| keys::log_seq(&l.key))
                .max()
                .unwrap_or(0);
            if self.rules.tombstone {
                let Ok(tombstone) = store.get(&keys::tombstone(TENANT)).await else {
                    return;
                };
                if let Some(tombstone) = tombstone {
                    pos.seq = pos.seq.max(log_end_of(&tombstone.body));
                }
            }
            pos.epoch = max_epoch.map_or(0, |e: u64| e + 1);
        }
        let body = Bytes::from(serde_json::to_vec(&pos).expect("serializes"));
        let created = store
            .put(
                &keys::database(TENANT),
                body,
                snapshot_metadata(0),
                Precondition::IfAbsent,
            )
            .await;
        if created.is_ok() {
            self.exists = true;
            self.outcome.creates += 1;
            self.event(format!("created the tenant: snapshot {pos:?}"));
        }
    }

    /// An operator deletes `machine.lock` while its holder lives.
    pub(super) fn delete_lock(&mut self) {
        if self.lock.present {
            self.lock.present = false;
            self.outcome.locks_deleted += 1;
            self.event("the lock is deleted by hand".into());
        }
    }

    /// LIST starts lagging (by up to 30 s) or catches up.
    pub(super) fn toggle_lag(&mut self) {
        self.lag = if self.lag.is_zero() {
            self.outcome.lags += 1;
            Duration::from_millis(self.rng.random_range(1_000..30_000))
        } else {
            Duration::ZERO
        };
        let lag = self.lag;
        self.event(format!("LIST lags by {lag:?}"));
        for writer in &self.writers {
            writer.faults.update(|c| c.list_lag = lag);
        }
    }

    /// An operator copies `db.sqlite3` down and up again: same body, no
    /// metadata.
    pub(super) async fn strip_snapshot_metadata(&mut self) {
        let key = keys::database(TENANT);
        let Ok(Some(object)) = self.shared.get(&key).await else {
            return;
        };
        let stripped = self
            .shared
            .put(
                &key,
                object.body,
                Default::default(),
                Precondition::IfMatch(object.etag),
            )
            .await;
        if stripped.is_ok() {
            self.outcome.bare_snapshots += 1;
            self.event("the snapshot is uploaded again without its metadata".into());
        }
    }

    /// The repair a refusal names: the snapshot's metadata put back.
    pub(super) async fn repair_snapshot(&mut self) {
        let key = keys::database(TENANT);
        let Ok(Some(object)) = self.shared.get(&key).await else {
            return;
        };
        if object.metadata.contains_key(FORMAT_KEY) {
            return;
        }
        let _ = self
            .shared
            .put(
                &key,
                object.body,
                snapshot_metadata(0),
                Precondition::IfMatch(object.etag),
            )
            .await;
    }
}

/// The last slot the tombstone names, when it is past the snapshot's: a
/// delete of the current life fenced it and has not removed the snapshot.
pub(super) async fn unfinished_delete(
    store: &DynStore,
) -> tenantd_core::store::StoreResult<Option<u64>> {
    let Some(tombstone) = store.get(&keys::tombstone(TENANT)).await? else {
        return Ok(None);
    };
    let Some(snapshot) = store.get(&keys::database(TENANT)).await? else {
        return Ok(None);
    };
    let end = log_end_of(&tombstone.body);
    let seq = serde_json::from_slice::<Position>(&snapshot.body).map_or(0, |p| p.seq);
    Ok((end > seq).then_some(end))
}

/// The last slot a tombstone names (0 when it names none).
pub(super) fn log_end_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["log_end"].as_u64())
        .unwrap_or(0)
}
