//! The claim of the model, one store request per step: read the snapshot,
//! list the log after it, read the contiguous run, replay it, check epochs
//! (R3), fence the window after the run resolving taken slots by reading
//! them (R2), re-check the snapshot, complete. The old rules are kept
//! beside the new ones, chosen by [`Rules`](super::Rules).

use std::collections::BTreeSet;

use rand::RngExt;

use super::{
    EarlyFences, FORMAT_KEY, FenceAhead, Phase, Position, Recheck, Role, Sim, TENANT, WINDOW,
    counter_of, slot_metadata, snapshot_metadata, token_of,
};
use tenantd_core::store::{ETag, Precondition, keys};
use tenantd_core::tenant::delta::{Delta, Kind};

/// The snapshot a claim started from.
#[derive(Clone, Debug)]
pub(super) struct Snap {
    pos: Position,
    etag: Option<ETag>,
    token: Option<u64>,
}

/// Where a claim is; each step is one store request.
pub(super) enum ClaimStep {
    ReadSnapshot,
    /// The old rule for a snapshot without metadata: a legacy database at
    /// slot 0, written back as a snapshot.
    Convert {
        snap: Snap,
    },
    List {
        snap: Snap,
    },
    Read {
        snap: Snap,
        prefix_end: u64,
        listed: BTreeSet<u64>,
        objects: Vec<(Delta, Option<u64>)>,
        /// Fences placed before the run was read.
        ahead: Option<Ahead>,
    },
    /// Fences the window after the listed run before reading it; the
    /// HEAD after them is the recheck.
    FenceAhead {
        snap: Snap,
        prefix_end: u64,
        listed: BTreeSet<u64>,
        ahead: Ahead,
    },
    /// Fences the window after the end a released lock named, before
    /// its lock write is answered ([`EarlyFences`]): before listing the
    /// log (`listed: None`), or after (the listing's run end and slots).
    FenceEarly {
        snap: Snap,
        anchor: u64,
        ahead: Ahead,
        listed: Option<(u64, BTreeSet<u64>)>,
    },
    /// A contender whose lock write lost: it fences `anchor + 1 ..=
    /// anchor + WINDOW` (`placed` of them sent so far), then stops.
    Lose {
        anchor: u64,
        placed: u64,
    },
    Fence(Fencing),
    /// R2: reads a slot its fence found taken.
    Probe {
        fencing: Fencing,
        seq: u64,
    },
    /// Re-reads the snapshot's ETag; then reports a gap, or completes.
    Recheck {
        fencing: Fencing,
        /// A slot listed beyond the run's end plus the window (old rules:
        /// found by the listing, reported once the snapshot is unchanged).
        gap: Option<u64>,
        first_slot: u64,
        /// Increments acknowledged when the last fence landed: from then
        /// on no older holder can acknowledge anything the claim misses.
        acked_before: usize,
    },
}

/// What one request of fencing ahead leads to.
pub(super) enum AheadStep {
    Continue(Ahead),
    /// The window is the claim's and the snapshot unchanged: read the run.
    Done(Ahead),
    /// A slot of the window was taken: read the run, then fence as usual.
    Taken(Ahead),
    /// The snapshot changed: read everything again.
    Reread,
}

/// Fences a claim placed before reading the run.
#[derive(Clone, Debug, Default)]
pub(super) struct Ahead {
    mine: BTreeSet<u64>,
    sent_at: std::collections::BTreeMap<u64, usize>,
    landed_at: usize,
    /// The snapshot's HEAD showed it unchanged after the whole window
    /// became the claim's.
    rechecked: bool,
}

/// The state of a claim's fencing.
pub(super) struct Fencing {
    /// The state after the run, and the run's end `E`.
    state: Position,
    etag: Option<ETag>,
    prefix_end: u64,
    listed: BTreeSet<u64>,
    /// Slots of the window holding its own fences.
    mine: BTreeSet<u64>,
    /// Slots past `E + 1` holding another's object of a lower epoch.
    others: BTreeSet<u64>,
    /// The old rules: the slots still to fence (the empty ones of the
    /// listing); any taken slot starts the claim over.
    todo: Vec<u64>,
    /// The old restore: a taken slot fails it.
    fail_on_taken: bool,
    /// Per slot, increments acknowledged when its fence was first sent:
    /// a fence found in place later (a lost response, a late write)
    /// landed after that.
    sent_at: std::collections::BTreeMap<u64, usize>,
    /// Increments acknowledged by the time its fences had landed, as far
    /// as it can tell (a lower bound).
    landed_at: usize,
    /// The recheck was made by fencing ahead, and no fence was put since.
    rechecked: bool,
    /// Its first round was sent before the lock write.
    early: bool,
}

impl ClaimStep {
    fn describe(&self) -> String {
        match self {
            ClaimStep::ReadSnapshot => "reads the snapshot".into(),
            ClaimStep::Convert { .. } => "converts a snapshot without metadata".into(),
            ClaimStep::List { snap } => format!("lists the log after slot {}", snap.pos.seq),
            ClaimStep::Read {
                snap,
                prefix_end,
                objects,
                ..
            } => format!(
                "reads slot {} of the run ending at {prefix_end}",
                snap.pos.seq + objects.len() as u64 + 1
            ),
            ClaimStep::FenceAhead {
                prefix_end, ahead, ..
            } => format!(
                "fences ahead after the listed {prefix_end} (mine {:?})",
                ahead.mine
            ),
            ClaimStep::FenceEarly { anchor, ahead, .. } => format!(
                "fences after the released end {anchor} before its lock write (mine {:?})",
                ahead.mine
            ),
            ClaimStep::Lose { anchor, placed } => format!(
                "fences slot {} after the released end {anchor}, its lock write lost",
                anchor + placed + 1
            ),
            ClaimStep::Fence(f) => format!("fences after {} (mine {:?})", f.prefix_end, f.mine),
            ClaimStep::Probe { seq, .. } => format!("reads the taken slot {seq}"),
            ClaimStep::Recheck {
                fencing,
                gap,
                first_slot,
                ..
            } => format!(
                "rechecks the snapshot (recovered {:?}, gap {gap:?}, first slot {first_slot})",
                fencing.state
            ),
        }
    }
}

impl Sim {
    pub(super) async fn claim_step(&mut self, w: usize) {
        let Phase::Claiming(step) =
            std::mem::replace(&mut self.writers[w].phase, Phase::Stopped("claiming"))
        else {
            return;
        };
        let step = *step;
        let store = self.writers[w].store.clone();
        let (epoch, token) = (self.writers[w].epoch, self.writers[w].token);
        let db_key = keys::database(TENANT);
        self.event(format!(
            "epoch {epoch} token {token}: claim {}",
            step.describe()
        ));
        let next = match step {
            ClaimStep::ReadSnapshot => match store.get(&db_key).await {
                Ok(Some(object)) => {
                    let pos = match serde_json::from_slice::<Position>(&object.body) {
                        Ok(pos) => pos,
                        Err(e) => {
                            self.violation(format!("the snapshot is unreadable: {e}"));
                            return self.stop(w, "unreadable snapshot");
                        }
                    };
                    let snap = Snap {
                        pos,
                        etag: Some(object.etag),
                        token: token_of(&object.metadata),
                    };
                    if object.metadata.contains_key(FORMAT_KEY) {
                        // The negative control always lists after its
                        // fences (the case it gets wrong).
                        let before_listing = self.writers[w].early_anchor.is_some()
                            && (self.config.early_fences == EarlyFences::WindowAfterTheRun
                                || self.rng.random_range(0..2) == 0);
                        match before_listing.then(|| self.take_early(w, &snap)).flatten() {
                            Some(anchor) => ClaimStep::FenceEarly {
                                snap,
                                anchor,
                                ahead: Ahead::default(),
                                listed: None,
                            },
                            None => ClaimStep::List { snap },
                        }
                    } else if self.rules.refuse_bare_snapshot {
                        self.outcome.bare_refused += 1;
                        return self.claim_failed(w, "refused a snapshot without metadata");
                    } else {
                        ClaimStep::Convert { snap }
                    }
                }
                // A request for a tenant that does not exist: 404.
                Ok(None) => return self.stop(w, "tenant absent"),
                Err(_) => ClaimStep::ReadSnapshot,
            },
            ClaimStep::Convert { snap } => {
                // What the old claim did with a database file that carries
                // no commit-log metadata: slot 0, no fences, written back.
                let state = Position {
                    seq: 0,
                    epoch: 0,
                    ..snap.pos
                };
                let target = Position { epoch, ..state };
                let body = bytes::Bytes::from(serde_json::to_vec(&target).expect("serializes"));
                let condition = snap
                    .etag
                    .clone()
                    .map_or(Precondition::IfAbsent, Precondition::IfMatch);
                match store
                    .put(&db_key, body, snapshot_metadata(token), condition)
                    .await
                {
                    Ok(etag) => {
                        let acked = self.check.acked.len();
                        return self.complete_claim(w, state, Some(etag), 1, 0, acked);
                    }
                    Err(e) if e.is_precondition() => ClaimStep::ReadSnapshot,
                    Err(_) => ClaimStep::Convert { snap },
                }
            }
            ClaimStep::List { snap } => {
                let after = keys::log_slot(TENANT, snap.pos.seq);
                match store.list(&keys::log_prefix(TENANT), Some(&after)).await {
                    Ok(listed) => {
                        let listed: BTreeSet<u64> = listed
                            .iter()
                            .filter_map(|l| keys::log_seq(&l.key))
                            .collect();
                        let mut prefix_end = snap.pos.seq;
                        while listed.contains(&(prefix_end + 1)) {
                            prefix_end += 1;
                        }
                        let listed_end = prefix_end;
                        // The run read stops at the released end its fences
                        // were sent after (the listing may show them).
                        if let Some((anchor, _)) = &self.writers[w].early
                            && self.config.early_fences == EarlyFences::OnRelease
                        {
                            prefix_end = prefix_end.min(*anchor);
                        }
                        // No holder leaves a wider hole: corrupt, unless a
                        // compaction deleted slots under the listing. With
                        // R2 the listing is a hint (a lagging one hides
                        // young slots), checked after the fences instead.
                        let gap = listed.range(listed_end + WINDOW + 1..).next().copied();
                        if gap.is_some() && !self.rules.probe_taken_slots {
                            ClaimStep::Recheck {
                                fencing: self.fencing(snap.pos, snap.etag, prefix_end, listed),
                                gap,
                                first_slot: 0,
                                acked_before: 0,
                            }
                        } else if let Some(anchor) = self.take_early(w, &snap) {
                            ClaimStep::FenceEarly {
                                snap,
                                anchor,
                                ahead: Ahead::default(),
                                listed: Some((prefix_end.min(anchor), listed)),
                            }
                        } else if self.writers[w].early.is_none() && self.fences_ahead(w, &snap) {
                            ClaimStep::FenceAhead {
                                snap,
                                prefix_end,
                                listed,
                                ahead: Ahead::default(),
                            }
                        } else {
                            ClaimStep::Read {
                                snap,
                                prefix_end,
                                listed,
                                objects: vec![],
                                ahead: None,
                            }
                        }
                    }
                    Err(_) => ClaimStep::List { snap },
                }
            }
            ClaimStep::FenceAhead {
                snap,
                prefix_end,
                listed,
                ahead,
            } => {
                let read = |ahead| ClaimStep::Read {
                    snap: snap.clone(),
                    prefix_end,
                    listed: listed.clone(),
                    objects: vec![],
                    ahead: Some(ahead),
                };
                match self
                    .fence_ahead_step(w, &snap, prefix_end, ahead, true)
                    .await
                {
                    AheadStep::Continue(ahead) => ClaimStep::FenceAhead {
                        snap,
                        prefix_end,
                        listed,
                        ahead,
                    },
                    AheadStep::Done(ahead) => read(ahead),
                    // A slot taken: read the run and fence as usual (its
                    // own fences are found again as its own).
                    AheadStep::Taken(ahead) => read(ahead),
                    AheadStep::Reread => ClaimStep::ReadSnapshot,
                }
            }
            ClaimStep::FenceEarly {
                snap,
                anchor,
                ahead,
                listed,
            } => match self.fence_ahead_step(w, &snap, anchor, ahead, false).await {
                AheadStep::Continue(ahead) => ClaimStep::FenceEarly {
                    snap,
                    anchor,
                    ahead,
                    listed,
                },
                AheadStep::Done(ahead) | AheadStep::Taken(ahead) => {
                    self.writers[w].early = Some((anchor, ahead));
                    match listed {
                        None => ClaimStep::List { snap },
                        Some((prefix_end, listed)) => ClaimStep::Read {
                            snap,
                            prefix_end,
                            listed,
                            objects: vec![],
                            ahead: None,
                        },
                    }
                }
                AheadStep::Reread => unreachable!("no HEAD after early fences"),
            },
            ClaimStep::Lose { anchor, placed } => {
                if placed == WINDOW {
                    return self.stop(w, "lost the lock race");
                }
                if self.put_fence(w, anchor + placed + 1).await.is_ok() {
                    self.outcome.loser_fences += 1;
                }
                ClaimStep::Lose {
                    anchor,
                    placed: placed + 1,
                }
            }
            ClaimStep::Read {
                snap,
                prefix_end,
                listed,
                mut objects,
                ahead,
            } => {
                let seq = snap.pos.seq + objects.len() as u64 + 1;
                if seq > prefix_end {
                    return self.after_replay(w, snap, prefix_end, listed, &objects, ahead);
                }
                let key = keys::log_slot(TENANT, seq);
                match store.get(&key).await {
                    Ok(Some(object)) => match Delta::decode(&key, &object.body) {
                        Ok(delta) => {
                            objects.push((delta, token_of(&object.metadata)));
                            ClaimStep::Read {
                                snap,
                                prefix_end,
                                listed,
                                objects,
                                ahead,
                            }
                        }
                        Err(e) => {
                            self.violation(e.to_string());
                            return self.stop(w, "corrupt log");
                        }
                    },
                    // Deleted by a compaction since the listing.
                    Ok(None) => ClaimStep::ReadSnapshot,
                    Err(_) => ClaimStep::Read {
                        snap,
                        prefix_end,
                        listed,
                        objects,
                        ahead,
                    },
                }
            }
            ClaimStep::Fence(fencing) => match self.fence_step(w, fencing).await {
                Some(next) => next,
                None => return,
            },
            ClaimStep::Probe { fencing, seq } => match self.probe_step(w, fencing, seq).await {
                Some(next) => next,
                None => return,
            },
            ClaimStep::Recheck {
                fencing,
                gap,
                first_slot,
                acked_before,
            } => {
                match (fencing.rechecked, fencing.early) {
                    (true, true) => self.outcome.fenced_early += 1,
                    (true, false) => self.outcome.fenced_ahead += 1,
                    _ => {}
                }
                let unchanged = match self.config.recheck {
                    _ if fencing.rechecked => Ok(true),
                    Recheck::Never => Ok(true),
                    Recheck::AfterFences => self.snapshot_is(w, fencing.etag.as_ref()).await,
                };
                // Beside the recheck (not after fences sent before the
                // lock write, which replaced a holder's release): a delete
                // of this life that fenced it and has not finished.
                let unchanged = match unchanged {
                    Ok(true)
                        if self.rules.claims_read_tombstone
                            && !fencing.early
                            && self.writers[w].role != Role::Delete =>
                    {
                        match self.delete_unfinished(w).await {
                            Ok(true) => {
                                self.outcome.refused_for_delete += 1;
                                return self.stop(w, "a delete of this life has not finished");
                            }
                            Ok(false) => Ok(true),
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                match unchanged {
                    Ok(true) => {
                        let mine = &self.writers[w].fenced_slots;
                        // A claim on fences sent before its lock write
                        // read its run only up to the released end; its
                        // listing's run goes on through whatever it shows
                        // after (as `log::plan_hinted` checks gaps).
                        let mut listed_end = fencing.prefix_end;
                        while fencing.early
                            && (fencing.listed.contains(&(listed_end + 1))
                                || mine.contains(&(listed_end + 1)))
                        {
                            listed_end += 1;
                        }
                        let late_gap = fencing
                            .listed
                            .range(listed_end + WINDOW + 1..)
                            .find(|s| !mine.contains(s))
                            .copied();
                        if let Some(beyond) = gap.or(late_gap) {
                            self.violation(format!(
                                "claim by epoch {epoch}: slot {beyond} is in the log beyond the run's end {} + window {WINDOW}",
                                fencing.prefix_end
                            ));
                            return self.stop(w, "gap");
                        }
                        return self.complete_claim(
                            w,
                            fencing.state,
                            fencing.etag,
                            first_slot,
                            fencing.prefix_end,
                            acked_before,
                        );
                    }
                    // A compaction replaced the snapshot: what was listed
                    // may be gone, and fences may sit in deleted slots
                    // (below the new snapshot, where they are harmless).
                    Ok(false) => ClaimStep::ReadSnapshot,
                    Err(_) => ClaimStep::Recheck {
                        fencing,
                        gap,
                        first_slot,
                        acked_before,
                    },
                }
            }
        };
        self.writers[w].phase = Phase::Claiming(Box::new(next));
    }

    fn fencing(
        &self,
        state: Position,
        etag: Option<ETag>,
        prefix_end: u64,
        listed: BTreeSet<u64>,
    ) -> Fencing {
        Fencing {
            state,
            etag,
            prefix_end,
            listed,
            mine: BTreeSet::new(),
            others: BTreeSet::new(),
            todo: vec![],
            fail_on_taken: false,
            sent_at: std::collections::BTreeMap::new(),
            landed_at: 0,
            rechecked: false,
            early: false,
        }
    }

    /// The run is read: replay it, check epochs, and choose how to fence.
    fn after_replay(
        &mut self,
        w: usize,
        snap: Snap,
        prefix_end: u64,
        listed: BTreeSet<u64>,
        objects: &[(Delta, Option<u64>)],
        ahead: Option<Ahead>,
    ) {
        let early = self.writers[w].early.take();
        let Some((state, max_other)) = self.replay(w, &snap, objects) else {
            return;
        };
        let writer = &self.writers[w];
        let epoch = writer.epoch;
        if self.rules.strict_epochs {
            if max_other >= epoch {
                return self.raise_epoch(w, max_other);
            }
        } else if state.epoch > epoch {
            if writer.lock_was_absent {
                // "the lock was deleted by hand; put it back": an error,
                // released as any failed claim.
                return self.claim_failed(w, "newer epoch in the log with no lock");
            }
            self.outcome.deposed += 1;
            return self.stop(w, "deposed");
        }
        let applied = state.seq;
        let state = Position {
            seq: prefix_end,
            ..state
        };
        let acked_now = self.check.acked.len();
        let old_restore = matches!(writer.role, Role::Restore { .. }) && !self.rules.restore_claims;
        let clean = writer.clean && !self.rules.always_fence;
        let next = if old_restore {
            // The old restore fenced from the last delta it applied, not
            // from the end of the run, and failed on a taken slot.
            let mut f = self.fencing(
                Position {
                    seq: applied,
                    ..state
                },
                snap.etag,
                applied,
                listed,
            );
            f.todo = (applied + 1..=applied + WINDOW)
                .filter(|s| !f.listed.contains(s))
                .collect();
            f.fail_on_taken = true;
            ClaimStep::Fence(f)
        } else if clean {
            // The old clean path: the last holder released, so no fences;
            // anything listed after the run is a gap (an error).
            if listed.range(prefix_end + 1..).next().is_some() {
                return self.claim_failed(w, "gap after a clean release");
            }
            ClaimStep::Recheck {
                fencing: self.fencing(state, snap.etag, prefix_end, listed),
                gap: None,
                first_slot: prefix_end + 1,
                acked_before: acked_now,
            }
        } else if !self.config.fences {
            ClaimStep::Recheck {
                fencing: self.fencing(state, snap.etag, prefix_end, BTreeSet::new()),
                gap: None,
                first_slot: prefix_end + WINDOW + 1,
                acked_before: acked_now,
            }
        } else if let Some((anchor, ahead)) = early.as_ref().filter(|(anchor, ahead)| {
            self.config.early_fences == EarlyFences::WindowAfterTheRun
                && prefix_end > *anchor
                && ahead.mine.len() as u64 == WINDOW
        }) {
            let (anchor, ahead) = (*anchor, ahead.clone());
            // The negative control: the early window taken as fenced after
            // the run read, which went on through those very fences.
            self.event(format!(
                "epoch {epoch}: takes its fences after {anchor} as the window after the run's end {prefix_end}"
            ));
            let mut f = self.fencing(state, snap.etag, prefix_end, listed);
            f.mine = ahead.mine;
            f.rechecked = true;
            ClaimStep::Recheck {
                fencing: f,
                gap: None,
                first_slot: prefix_end + WINDOW + 1,
                acked_before: acked_now,
            }
        } else {
            let mut f = self.fencing(state, snap.etag, prefix_end, listed);
            if let Some((anchor, early)) = early
                && anchor == prefix_end
            {
                // Fences sent before the lock write, after the end the
                // released lock named, which is where the run read ends:
                // the claim's first round. With nothing fenced after them,
                // no recheck (no holder acknowledged anything past that
                // end, and the run up to it was read whole).
                f.mine = early.mine;
                f.sent_at = early.sent_at;
                f.landed_at = early.landed_at;
                f.rechecked = true;
                f.early = true;
            } else if let Some(ahead) = ahead {
                f.mine = ahead.mine;
                f.sent_at = ahead.sent_at;
                f.landed_at = ahead.landed_at;
                f.rechecked = ahead.rechecked;
            }
            if !self.rules.probe_taken_slots {
                f.todo = (prefix_end + 1..=prefix_end + WINDOW)
                    .filter(|s| !f.listed.contains(s))
                    .collect();
            }
            ClaimStep::Fence(f)
        };
        self.writers[w].phase = Phase::Claiming(Box::new(next));
    }

    /// The released end this claim fences after before its lock write,
    /// if it still may: once, and only when the snapshot's epoch is below
    /// its own and the snapshot does not reach past that end (as
    /// `claim.rs` `fence_early` checks the HEAD).
    fn take_early(&mut self, w: usize, snap: &Snap) -> Option<u64> {
        let writer = &mut self.writers[w];
        let anchor = writer.early_anchor.take()?;
        (snap.pos.epoch < writer.epoch && snap.pos.seq <= anchor).then_some(anchor)
    }

    /// Whether this claim, starting from `snap`, fences ahead of reading
    /// its run (the cold start of a holder; half of them, by the seed).
    /// The guard, as `claim.rs` `may_fence_ahead`: the lock it replaced was
    /// a holder's release naming the log's end, and the snapshot's epoch
    /// is below its own (negative control: no guard).
    fn fences_ahead(&mut self, w: usize, snap: &Snap) -> bool {
        use rand::RngExt;
        let writer = &self.writers[w];
        let guarded = writer.ahead_safe && snap.pos.epoch < writer.epoch;
        self.config.fence_ahead != FenceAhead::Off
            && self.config.fences
            && self.rules.probe_taken_slots
            && self.rules.strict_epochs
            && self.rules.always_fence
            && matches!(writer.role, Role::Holder)
            && (guarded || self.config.fence_ahead == FenceAhead::Unguarded)
            && self.rng.random_bool(0.5)
    }

    /// One request of fencing ahead: the next fence of the window after
    /// the listed run, then the snapshot's HEAD.
    async fn fence_ahead_step(
        &mut self,
        w: usize,
        snap: &Snap,
        prefix_end: u64,
        mut ahead: Ahead,
        recheck: bool,
    ) -> AheadStep {
        let Some(seq) = (prefix_end + 1..=prefix_end + WINDOW).find(|s| !ahead.mine.contains(s))
        else {
            if !recheck {
                return AheadStep::Done(ahead);
            }
            return match self.snapshot_is(w, snap.etag.as_ref()).await {
                Ok(true) => {
                    ahead.rechecked = true;
                    AheadStep::Done(ahead)
                }
                Ok(false) => AheadStep::Reread,
                Err(_) => AheadStep::Continue(ahead),
            };
        };
        ahead.sent_at.entry(seq).or_insert(self.check.acked.len());
        match self.put_fence(w, seq).await {
            Ok(_) => {
                ahead.mine.insert(seq);
                ahead.landed_at = self.check.acked.len();
                AheadStep::Continue(ahead)
            }
            Err(e) if e.is_precondition() => AheadStep::Taken(ahead),
            Err(_) => AheadStep::Continue(ahead),
        }
    }

    /// Whether the snapshot's HEAD, sent by writer `w` now, shows `etag`.
    /// Whether the tombstone names a slot past the snapshot's: a delete
    /// of this life fenced it and may still remove the snapshot.
    async fn delete_unfinished(&mut self, w: usize) -> tenantd_core::store::StoreResult<bool> {
        let store = self.writers[w].store.clone();
        Ok(super::paths::unfinished_delete(&store).await?.is_some())
    }

    async fn snapshot_is(
        &mut self,
        w: usize,
        etag: Option<&ETag>,
    ) -> tenantd_core::store::StoreResult<bool> {
        let now = self.writers[w].store.head(&keys::database(TENANT)).await?;
        Ok(now.as_ref().map(|m| &m.etag) == etag)
    }

    /// Puts writer `w`'s fence into slot `seq` (`If-None-Match: *`),
    /// remembering it as the writer's when it lands.
    async fn put_fence(&mut self, w: usize, seq: u64) -> tenantd_core::store::StoreResult<ETag> {
        let (epoch, token) = (self.writers[w].epoch, self.writers[w].token);
        let fence = Delta::fence(epoch, seq, self.now_ms())
            .encode()
            .expect("a fence has no pages to miss");
        let result = self.writers[w]
            .store
            .put(
                &keys::log_slot(TENANT, seq),
                fence,
                slot_metadata(token, epoch),
                Precondition::IfAbsent,
            )
            .await;
        if result.is_ok() {
            self.writers[w].fenced_slots.insert(seq);
        }
        result
    }

    /// Puts one fence. R2: into the first slot of the window that is
    /// neither its own nor (past `E + 1`) another's of a lower epoch; a
    /// taken slot is read next. The old rules: the next empty slot of the
    /// listing; a taken one starts the claim over.
    async fn fence_step(&mut self, w: usize, mut f: Fencing) -> Option<ClaimStep> {
        let probing = self.rules.probe_taken_slots && !f.fail_on_taken;
        let target = if probing {
            (f.prefix_end + 1..=f.prefix_end + WINDOW).find(|&s| {
                !f.mine.contains(&s) && (s == f.prefix_end + 1 || !f.others.contains(&s))
            })
        } else {
            f.todo.first().copied()
        };
        let Some(seq) = target else {
            let first_slot = f.prefix_end + WINDOW + 1;
            let acked_before = f.landed_at;
            return Some(ClaimStep::Recheck {
                fencing: f,
                gap: None,
                first_slot,
                acked_before,
            });
        };
        f.rechecked = false;
        f.sent_at.entry(seq).or_insert(self.check.acked.len());
        match self.put_fence(w, seq).await {
            Ok(_) => {
                f.mine.insert(seq);
                f.landed_at = self.check.acked.len();
                f.todo.retain(|s| *s != seq);
                Some(ClaimStep::Fence(f))
            }
            Err(e) if e.is_precondition() => {
                if probing {
                    Some(ClaimStep::Probe { fencing: f, seq })
                } else if f.fail_on_taken {
                    self.claim_failed(w, "restore: a slot was taken while fencing");
                    None
                } else {
                    Some(ClaimStep::ReadSnapshot)
                }
            }
            Err(_) => Some(ClaimStep::Fence(f)),
        }
    }

    /// R2: reads slot `seq`, which its fence found taken. Its own fence (a
    /// lost response) counts as placed; the object at `E + 1` extends the
    /// run when it continues the chain; another's object further on stays
    /// (readers skip it after our fence); any epoch of another acquisition
    /// not below ours raises ours (R3).
    async fn probe_step(&mut self, w: usize, mut f: Fencing, seq: u64) -> Option<ClaimStep> {
        let key = keys::log_slot(TENANT, seq);
        let object = match self.writers[w].store.get(&key).await {
            Ok(Some(object)) => object,
            // Deleted since: a compaction moved the snapshot.
            Ok(None) => return Some(ClaimStep::ReadSnapshot),
            Err(_) => return Some(ClaimStep::Probe { fencing: f, seq }),
        };
        self.outcome.probes += 1;
        let delta = match Delta::decode(&key, &object.body) {
            Ok(delta) => delta,
            Err(e) => {
                self.violation(e.to_string());
                self.stop(w, "corrupt log");
                return None;
            }
        };
        if self.is_mine(w, seq, &object.body, &object.metadata) {
            f.mine.insert(seq);
            f.landed_at = f.landed_at.max(f.sent_at.get(&seq).copied().unwrap_or(0));
            self.writers[w].fenced_slots.insert(seq);
            return Some(ClaimStep::Fence(f));
        }
        let epoch = self.writers[w].epoch;
        if self.rules.strict_epochs && delta.epoch >= epoch {
            self.raise_epoch(w, delta.epoch);
            return None;
        }
        if !self.rules.strict_epochs && delta.epoch > epoch {
            self.outcome.deposed += 1;
            self.stop(w, "deposed");
            return None;
        }
        if seq == f.prefix_end + 1 {
            match self.apply(f.state, &delta) {
                Ok(state) => {
                    f.prefix_end = seq;
                    f.state = Position { seq, ..state };
                    f.rechecked = false;
                    self.outcome.probed_applied += 1;
                }
                Err(e) => {
                    self.violation(format!("claim by epoch {epoch}: {e}"));
                    self.stop(w, "broken chain");
                    return None;
                }
            }
        } else {
            f.others.insert(seq);
        }
        Some(ClaimStep::Fence(f))
    }

    /// R3: the claim saw epoch `seen` of another acquisition, not below its
    /// own: raise its lock's epoch above it (a conditional PUT on its own
    /// lock; the lock moved on: not the holder) and claim again.
    fn raise_epoch(&mut self, w: usize, seen: u64) {
        let token = self.writers[w].token;
        if !(self.lock.present && self.lock.token == token) {
            self.outcome.deposed += 1;
            return self.stop(w, "not the holder");
        }
        let epoch = seen + 1;
        self.event(format!(
            "token {token}: saw epoch {seen}, raises its lock's epoch from {} to {epoch}",
            self.writers[w].epoch
        ));
        self.lock.epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.writers[w].epoch = epoch;
        self.writers[w].phase = Phase::Claiming(Box::new(ClaimStep::ReadSnapshot));
        self.outcome.epoch_raises += 1;
    }

    /// A claim that fails after its acquisition. The old rule released the
    /// lock as clean; now the lease is dropped and the lock runs out.
    pub(super) fn claim_failed(&mut self, w: usize, why: &'static str) {
        self.outcome.claim_failures += 1;
        if matches!(self.writers[w].role, Role::Restore { .. }) {
            self.outcome.restores_failed += 1;
        }
        if !self.rules.failed_claim_keeps_lock
            && self.lock.present
            && self.lock.token == self.writers[w].token
        {
            self.lock.released = true;
        }
        self.stop(w, why);
    }

    /// The claim holds from its last store request on: the writer is active
    /// from `first_slot`.
    fn complete_claim(
        &mut self,
        w: usize,
        state: Position,
        etag: Option<ETag>,
        first_slot: u64,
        prefix_end: u64,
        acked_before: usize,
    ) {
        let epoch = self.writers[w].epoch;
        let start = Position {
            seq: first_slot - 1,
            epoch,
            ..state
        };
        let writer = &mut self.writers[w];
        writer.head = start;
        writer.acked = start;
        writer.snapshot_etag = etag;
        writer.snapshot_seq = prefix_end;
        writer.inc = state.inc;
        writer.phase = Phase::Active;
        if writer.role == Role::Delete {
            writer.deleting = Some(match self.rules.tombstone {
                true => super::Deleting::Tombstone,
                false => super::Deleting::Check,
            });
        }
        self.outcome.claims += 1;
        self.event(format!(
            "epoch {epoch}: claim complete, recovered {state:?}, writes from slot {first_slot}"
        ));
        self.check
            .recovered(&format!("claim by epoch {epoch}"), state, acked_before);
    }

    /// The state after the snapshot and the run, and the highest epoch
    /// another acquisition wrote there; `None` when the chain broke.
    fn replay(
        &mut self,
        w: usize,
        snap: &Snap,
        objects: &[(Delta, Option<u64>)],
    ) -> Option<(Position, u64)> {
        let (epoch, token) = (self.writers[w].epoch, self.writers[w].token);
        let mut state = snap.pos;
        let mut max_other = if snap.token == Some(token) {
            0
        } else {
            snap.pos.epoch
        };
        for (delta, owner) in objects {
            if *owner != Some(token) {
                max_other = max_other.max(delta.epoch);
            }
            match self.apply(state, delta) {
                Ok(next) => state = next,
                Err(e) => {
                    self.violation(format!("claim by epoch {epoch}: {e}"));
                    self.stop(w, "broken chain");
                    return None;
                }
            }
        }
        Some((state, max_other))
    }

    /// One log object replayed onto `state`: a fence raises the epoch, a
    /// delta of a lower epoch is a deposed writer's garbage, any other
    /// delta must continue the chain.
    fn apply(&mut self, mut state: Position, delta: &Delta) -> Result<Position, String> {
        match delta.kind {
            Kind::Fence => {
                state.epoch = state.epoch.max(delta.epoch);
                Ok(state)
            }
            Kind::Delta if delta.epoch < state.epoch => {
                self.outcome.garbage_skipped += 1;
                Ok(state)
            }
            Kind::Delta if delta.pre_checksum != state.digest => Err(format!(
                "slot {} (epoch {}) does not follow the history before it (checksum {:016x}, expected {:016x})",
                delta.seq, delta.epoch, delta.pre_checksum, state.digest
            )),
            Kind::Delta => Ok(Position {
                seq: delta.seq,
                value: counter_of(&delta.pages[0].1),
                digest: delta.post_checksum,
                epoch: delta.epoch,
                inc: state.inc,
            }),
        }
    }
}
