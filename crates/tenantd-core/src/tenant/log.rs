//! A tenant's state in the store: a snapshot plus a commit log.
//!
//! - `customer/<id>/db.sqlite3`: the snapshot, a plain SQLite file. Its
//!   metadata says which log slot it covers (`tenantd-seq`), the epoch that
//!   wrote it, and its database checksum.
//! - `customer/<id>/log/<seq>`: one immutable object per commit (the pages
//!   the commit changed, [`Delta`]), created with `If-None-Match: *`, or a
//!   fence written by a new holder.
//! - `customer/<id>/snapshots/<seq>.sqlite3`: older snapshots kept for
//!   point-in-time restore.
//!
//! Why no acknowledged write is lost and no two holders extend one history
//! (the whole argument is in docs/protocol.md, "The commit log"):
//! - A holder writes slot `s` only while fewer than [`WINDOW`] of its
//!   uploads are unconfirmed, and acknowledges a commit only when it and
//!   every slot before it are confirmed. So its unconfirmed slots all lie
//!   within `WINDOW` slots after the end of the contiguous run of objects.
//! - Every new writer (any takeover, a restore, a delete) finds the end `P`
//!   of the contiguous run after the snapshot, and makes every slot of
//!   `P+1 ..= P+WINDOW` its fence or an object it read directly (slots
//!   found taken are read, not listed, and move `P` on), with an epoch
//!   above every other acquisition's. An old holder's upload into any
//!   of them fails, so it never acknowledges anything past `P`; its objects
//!   that landed past a hole carry an older epoch than the fence before them
//!   and are skipped by every reader.
//! - Fences are never deleted: a deleted slot could be created again by a
//!   stalled writer's late PUT, which would then report success (the
//!   garbage-collection hazard of put-if-absent logs). Deltas may be
//!   deleted once a snapshot covers them: a late PUT that re-creates one
//!   below the snapshot is never read, and one of a deposed holder is
//!   behind a fence it cannot pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::copy::SnapshotFile;
use super::delta::{self, Delta, Kind, PageSums};
use crate::store::{DynStore, ETag, Metadata, Precondition, StoreError, keys};

/// Uploads a holder keeps under way at once; also the number of slots a
/// new holder fences.
pub const WINDOW: u64 = 4;

/// Log objects fetched at once while recovering.
const FETCH_PARALLELISM: usize = 128;

/// Snapshot metadata: the format marker (absent on databases written by
/// tenantd before the commit log), the slot covered, and the checksum.
pub const FORMAT_KEY: &str = "tenantd-format";
pub const FORMAT_LOG: &str = "log";
pub const SEQ_KEY: &str = "tenantd-seq";
pub const EPOCH_KEY: &str = "tenantd-epoch";
pub const CHECKSUM_KEY: &str = "tenantd-checksum";
pub const HOLDER_KEY: &str = "tenantd-holder";
/// The lease token of the acquisition that wrote a log object or snapshot:
/// what "is this slot mine?" compares (epochs and slots can repeat).
pub const TOKEN_KEY: &str = "tenantd-token";

/// Why a tenant's stored state cannot be used. Names the object.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Corrupt(String),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    /// Something changed while reading (a fence raced a late upload, a
    /// compaction removed what was listed): read again.
    #[error("the log changed while it was read: {0}")]
    Raced(String),
    #[error("{0}")]
    Local(String),
}

/// The snapshot object as a holder knows it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `None` when the object does not exist yet.
    pub etag: Option<ETag>,
    /// The last slot the snapshot contains.
    pub seq: u64,
    pub epoch: u64,
    /// Written by tenantd before the commit log (no format marker): the
    /// first holder converts it.
    pub legacy: bool,
    /// The acquisition that wrote it (absent on older snapshots).
    pub token: Option<String>,
}

/// What a holder learns from recovering a tenant.
pub struct Recovered {
    pub snapshot: Snapshot,
    pub sums: PageSums,
    /// The last slot applied to the working copy.
    pub applied: u64,
    /// The end of the contiguous run of log objects after the snapshot.
    pub contiguous_end: u64,
    /// Slots after `contiguous_end` that hold an object (a deposed
    /// holder's uploads past a hole).
    pub stray: Vec<u64>,
    /// Deltas and their bytes after the snapshot: how much compaction
    /// would save.
    pub deltas: u64,
    pub delta_bytes: u64,
}

/// Who writes: a holder's machine, and the token of its acquisition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    pub holder: String,
    pub token: String,
}

impl Writer {
    /// Whether `metadata` names this acquisition. Objects without a token
    /// (older builds) are never ours.
    pub fn wrote(&self, metadata: &Metadata) -> bool {
        metadata.get(TOKEN_KEY) == Some(&self.token)
    }

    fn owns(&self, token: Option<&str>) -> bool {
        token == Some(self.token.as_str())
    }
}

/// Snapshot metadata for a snapshot that covers slot `seq`.
pub fn snapshot_metadata(epoch: u64, seq: u64, checksum: u64, writer: &Writer) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert(FORMAT_KEY.into(), FORMAT_LOG.into());
    metadata.insert(EPOCH_KEY.into(), epoch.to_string());
    metadata.insert(SEQ_KEY.into(), seq.to_string());
    metadata.insert(CHECKSUM_KEY.into(), format!("{checksum:016x}"));
    metadata.insert(HOLDER_KEY.into(), writer.holder.clone());
    metadata.insert(TOKEN_KEY.into(), writer.token.clone());
    metadata
}

/// Metadata of a log object: enough to recognise one's own upload by a
/// HEAD after an unclear outcome (the token), and to judge its epoch
/// without reading it.
pub fn slot_metadata(epoch: u64, seq: u64, writer: &Writer) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert(EPOCH_KEY.into(), epoch.to_string());
    metadata.insert(SEQ_KEY.into(), seq.to_string());
    metadata.insert(HOLDER_KEY.into(), writer.holder.clone());
    metadata.insert(TOKEN_KEY.into(), writer.token.clone());
    metadata
}

pub fn number(metadata: &Metadata, key: &str) -> Option<u64> {
    metadata.get(key).and_then(|v| v.parse().ok())
}

/// Reads the snapshot's description from its metadata.
pub fn describe_snapshot(key: &str, etag: ETag, metadata: &Metadata) -> Result<Snapshot, LogError> {
    let legacy = metadata.get(FORMAT_KEY).is_none();
    let seq = match number(metadata, SEQ_KEY) {
        Some(seq) => seq,
        // A database put there by hand or by the original app: no slot
        // has been written on top of it yet.
        None if legacy => 0,
        None => {
            return Err(LogError::Corrupt(format!(
                "{key} has no readable {SEQ_KEY} metadata, so it is unknown which commits it holds"
            )));
        }
    };
    Ok(Snapshot {
        etag: Some(etag),
        seq,
        epoch: number(metadata, EPOCH_KEY).unwrap_or(0),
        legacy,
        token: metadata.get(TOKEN_KEY).cloned(),
    })
}

/// The checksum a snapshot's metadata records, when it records one.
pub fn recorded_checksum(key: &str, metadata: &Metadata) -> Result<Option<u64>, LogError> {
    match metadata.get(CHECKSUM_KEY) {
        None => Ok(None),
        Some(text) => u64::from_str_radix(text, 16).map(Some).map_err(|_| {
            LogError::Corrupt(format!("{key} has an unreadable {CHECKSUM_KEY} ({text:?})"))
        }),
    }
}

/// The log after `after`: slot numbers with their sizes, ascending.
pub async fn list_slots(
    store: &DynStore,
    id: &str,
    after: u64,
) -> Result<Vec<(u64, u64)>, LogError> {
    let prefix = keys::log_prefix(id);
    let start = keys::log_slot(id, after);
    let listed = store.list(&prefix, Some(&start)).await?;
    let mut slots: Vec<(u64, u64)> = listed
        .iter()
        .filter_map(|l| keys::log_seq(&l.key).map(|seq| (seq, l.size)))
        .filter(|(seq, _)| *seq > after)
        .collect();
    slots.sort_unstable();
    Ok(slots)
}

/// A log object as read: decoded, with the acquisition that wrote it.
pub struct Fetched {
    pub delta: Delta,
    pub token: Option<String>,
    pub bytes: u64,
}

/// Reads and decodes one log object; `None` when the slot is empty.
pub async fn fetch_slot(store: &DynStore, id: &str, seq: u64) -> Result<Option<Fetched>, LogError> {
    let key = keys::log_slot(id, seq);
    let Some(object) = store.get(&key).await? else {
        return Ok(None);
    };
    let token = object.metadata.get(TOKEN_KEY).cloned();
    let body = object.body;
    let bytes = body.len() as u64;
    let delta = tokio::task::spawn_blocking(move || {
        Delta::decode(&key, &body).map_err(|e| LogError::Corrupt(e.to_string()))
    })
    .await
    .map_err(|e| LogError::Local(format!("decoding failed: {e}")))??;
    Ok(Some(Fetched {
        delta,
        token,
        bytes,
    }))
}

/// Fetches and decodes log objects, in slot order, a few at a time.
pub async fn fetch_slots(
    store: &DynStore,
    id: &str,
    slots: &[u64],
) -> Result<Vec<Fetched>, LogError> {
    futures::stream::iter(slots.iter().copied())
        .map(|seq| async move {
            fetch_slot(store, id, seq).await?.ok_or_else(|| {
                LogError::Raced(format!(
                    "{} was listed but is gone",
                    keys::log_slot(id, seq)
                ))
            })
        })
        .buffered(FETCH_PARALLELISM)
        .try_collect()
        .await
}

/// Where a replay stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// Every committed slot.
    End,
    /// The state after this slot.
    Seq(u64),
    /// The last commit at or before this time (Unix milliseconds).
    Time(u64),
}

impl std::fmt::Display for Until {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Until::End => f.write_str("the newest commit"),
            Until::Seq(seq) => write!(f, "slot {seq}"),
            Until::Time(ms) => match chrono::DateTime::from_timestamp_millis(*ms as i64) {
                Some(t) => write!(
                    f,
                    "{}",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
                None => write!(f, "{ms} ms after 1970"),
            },
        }
    }
}

/// The result of replaying a log onto a snapshot.
#[derive(Clone, Debug)]
pub struct Replayed {
    pub applied: u64,
    pub contiguous_end: u64,
    pub stray: Vec<u64>,
    pub deltas: u64,
    pub delta_bytes: u64,
    /// Commit time of the last delta applied (Unix ms), if any.
    pub last_committed_at_ms: Option<u64>,
    /// The newest epoch the snapshot or any object replayed carries: a
    /// holder with an older epoch has been superseded.
    pub max_epoch: u64,
    /// The acquisition that wrote the newest epoch so far (the last object
    /// not skipped).
    max_token: Option<String>,
    /// Each acquisition seen (snapshot and every object read, skipped ones
    /// too), with the newest epoch and the last slot it wrote.
    writers: Vec<(Option<String>, u64, u64)>,
    /// The snapshot's slot: where the run starts.
    snapshot_seq: u64,
}

impl Replayed {
    fn new(snapshot: &Snapshot, contiguous_end: u64, stray: Vec<u64>) -> Replayed {
        Replayed {
            applied: snapshot.seq,
            contiguous_end,
            stray,
            deltas: 0,
            delta_bytes: 0,
            last_committed_at_ms: None,
            max_epoch: snapshot.epoch,
            max_token: snapshot.token.clone(),
            writers: vec![(snapshot.token.clone(), snapshot.epoch, snapshot.seq)],
            snapshot_seq: snapshot.seq,
        }
    }

    /// Where the run ends when the objects of `writer`'s own acquisition
    /// are left out: the log as the previous holders left it, even when
    /// this claim reads again after its own fences went in (a snapshot
    /// rewritten meanwhile). What a released lock's `log_end` is compared
    /// with.
    pub fn end_before(&self, writer: &Writer) -> u64 {
        self.others(writer)
            .map(|(_, _, seq)| *seq)
            .fold(self.snapshot_seq, u64::max)
    }

    /// [`Self::end_before`] leaving out, too, acquisitions of epochs above
    /// `released` (when the lock this writer replaced was a release of that
    /// epoch): contenders that planned on that release and fenced its
    /// window before their lock write lost. What the release's `log_end`
    /// must equal.
    pub fn end_left_at_release(&self, writer: &Writer, released: Option<u64>) -> u64 {
        self.others(writer)
            .filter(|(_, epoch, _)| released.is_none_or(|released| *epoch <= released))
            .map(|(_, _, seq)| *seq)
            .fold(self.snapshot_seq, u64::max)
    }

    fn saw(&mut self, token: Option<&String>, epoch: u64, seq: u64) {
        match self
            .writers
            .iter_mut()
            .find(|(t, _, _)| t.as_ref() == token)
        {
            Some((_, newest, last)) => {
                *newest = (*newest).max(epoch);
                *last = (*last).max(seq);
            }
            None => self.writers.push((token.cloned(), epoch, seq)),
        }
    }

    /// The newest epoch any acquisition but `writer`'s wrote in what was
    /// read: a new writer's epoch must be above it.
    pub fn others_epoch(&self, writer: &Writer) -> u64 {
        self.others(writer)
            .map(|(_, epoch, _)| *epoch)
            .max()
            .unwrap_or(0)
    }

    /// What every acquisition but `writer`'s wrote in what was read.
    fn others<'a>(
        &'a self,
        writer: &'a Writer,
    ) -> impl Iterator<Item = &'a (Option<String>, u64, u64)> + 'a {
        self.writers
            .iter()
            .filter(|(token, _, _)| !writer.owns(token.as_deref()))
    }

    /// Applies the object in the slot after the run (read directly, not
    /// listed), extending the run by one slot.
    pub async fn extend(
        &mut self,
        id: &str,
        path: &Path,
        sums: &mut PageSums,
        fetched: Fetched,
    ) -> Result<(), LogError> {
        let seq = fetched.delta.seq;
        if seq != self.contiguous_end + 1 {
            return Err(LogError::Local(format!(
                "slot {seq} does not follow the run ending at {}",
                self.contiguous_end
            )));
        }
        self.contiguous_end = seq;
        self.apply(id, path, sums, fetched, Until::End).await?;
        Ok(())
    }

    /// Applies one object of the run (skipped when an older epoch than
    /// one before it); false once `until` is passed.
    async fn apply(
        &mut self,
        id: &str,
        path: &Path,
        sums: &mut PageSums,
        fetched: Fetched,
        until: Until,
    ) -> Result<bool, LogError> {
        let Fetched {
            delta,
            token,
            bytes,
        } = fetched;
        self.saw(token.as_ref(), delta.epoch, delta.seq);
        // Not history: an object older than one before it, or as old as
        // one of another acquisition before it. Two acquisitions share an
        // epoch only until the later one raises its own (a lock deleted by
        // hand), and an object after the other's slot was never
        // acknowledged: its writer reads that slot back first. A fence of
        // the other acquisition is such a slot, so it becomes the one that
        // later objects of the epoch must belong to.
        if delta.epoch < self.max_epoch {
            return Ok(true);
        }
        if delta.epoch == self.max_epoch && token != self.max_token {
            if delta.kind == Kind::Fence {
                self.max_token = token;
            }
            return Ok(true);
        }
        self.max_epoch = delta.epoch;
        self.max_token = token;
        if delta.kind == Kind::Fence {
            return Ok(true);
        }
        if let Until::Time(at) = until
            && delta.committed_at_ms > at
        {
            return Ok(false);
        }
        let key = keys::log_slot(id, delta.seq);
        if delta.pre_checksum != sums.checksum() {
            return Err(LogError::Corrupt(format!(
                "checksum mismatch at {key}: it was built on a database with checksum {:016x}, but the state before it has {:016x}; the snapshot or an earlier object does not belong to this log",
                delta.pre_checksum,
                sums.checksum()
            )));
        }
        let (path_owned, delta) = (path.to_path_buf(), delta);
        let mut owned_sums = std::mem::take(sums);
        let (delta, owned_sums) = tokio::task::spawn_blocking(move || {
            delta::apply_to_file(&path_owned, &delta)?;
            owned_sums.apply(delta.db_pages, &delta.pages);
            Ok::<_, std::io::Error>((delta, owned_sums))
        })
        .await
        .map_err(|e| LogError::Local(format!("applying {key} failed: {e}")))?
        .map_err(|e| LogError::Local(format!("cannot apply {key} to {}: {e}", path.display())))?;
        *sums = owned_sums;
        if delta.post_checksum != sums.checksum() {
            return Err(LogError::Corrupt(format!(
                "checksum mismatch after {key}: it says {:016x}, applying it gave {:016x}",
                delta.post_checksum,
                sums.checksum()
            )));
        }
        self.applied = delta.seq;
        self.deltas += 1;
        self.delta_bytes += bytes;
        self.last_committed_at_ms = Some(delta.committed_at_ms);
        Ok(true)
    }
}

/// Replays the log after `snapshot` onto the database file at `path`
/// (already holding the snapshot's bytes), keeping `sums` up to date.
///
/// Only the contiguous run of slots after the snapshot is history; within
/// it, an object of an older epoch than one seen before it is a deposed
/// holder's and is skipped. Every delta must start from the checksum the
/// state before it has.
pub async fn replay(
    store: &DynStore,
    id: &str,
    path: &Path,
    snapshot: &Snapshot,
    sums: &mut PageSums,
    until: Until,
) -> Result<Replayed, LogError> {
    let plan = plan(store, id, snapshot, until).await?;
    replay_planned(store, id, path, snapshot, sums, until, plan).await
}

/// The log after a snapshot as listed, with the first deltas to replay
/// already fetched: a new holder gets this while the snapshot downloads.
pub struct Plan {
    contiguous_end: u64,
    stray: Vec<u64>,
    /// Slots to replay, in order.
    wanted: Vec<u64>,
    /// The first of them, fetched.
    fetched: Vec<Fetched>,
}

/// Slots replayed per round of fetches: bounds memory for a long log.
const CHUNK: usize = 256;

/// Lists the log after `snapshot`, checks it for gaps and fetches the
/// first deltas to replay.
pub async fn plan(
    store: &DynStore,
    id: &str,
    snapshot: &Snapshot,
    until: Until,
) -> Result<Plan, LogError> {
    plan_hinted(store, id, snapshot, until, std::future::ready(None), |_| {}).await
}

/// [`plan`] with a hint of where the log ends (`hint`: a released
/// lock's `log_end`, read beside the snapshot): the slots up to it are
/// fetched beside the listing rather than after it, and the run planned
/// stops there. Those fetched are known to exist, so a listing that lags
/// behind them does not shorten the run; slots past the hint are left to
/// the claim's fences, which read every slot they find taken (the listing
/// beside fences sent before the lock write may show the contender's own
/// fences there). The listing still finds gaps. `tell` learns where the
/// run planned ends before the deltas past the hint are fetched (a
/// takeover fences after it beside the fetches).
pub async fn plan_hinted(
    store: &DynStore,
    id: &str,
    snapshot: &Snapshot,
    until: Until,
    hint: impl std::future::Future<Output = Option<u64>>,
    tell: impl FnOnce(u64),
) -> Result<Plan, LogError> {
    let hinted = async {
        let end = hint.await.filter(|end| *end > snapshot.seq)?;
        let slots: Vec<u64> = (snapshot.seq + 1..=end).take(CHUNK).collect();
        Some((end, fetch_slots(store, id, &slots).await))
    };
    let (listed, hinted) = tokio::join!(list_slots(store, id, snapshot.seq), hinted);
    // A hinted slot that is gone was compacted away since the release (or
    // lost): the listing decides alone, and the replay finds out.
    let (hint, hinted) = match hinted {
        Some((end, Ok(fetched))) => (Some(end), fetched),
        _ => (None, vec![]),
    };
    let mut present: BTreeSet<u64> = listed?.iter().map(|(seq, _)| *seq).collect();
    present.extend(hinted.iter().map(|f| f.delta.seq));
    let mut listed_end = snapshot.seq;
    while present.contains(&(listed_end + 1)) {
        listed_end += 1;
    }
    if let Some(far) = present.range(listed_end + WINDOW + 1..).next() {
        return Err(LogError::Corrupt(format!(
            "gap in the log of customer {id}: {} is missing while {} exists (no holder leaves a hole wider than {WINDOW} slots): restore the missing object, or use `tenantd restore` to rebuild the tenant from what is left",
            keys::log_slot(id, listed_end + 1),
            keys::log_slot(id, *far),
        )));
    }
    let contiguous_end = hint.map_or(listed_end, |hint| hint.min(listed_end));
    let stray: Vec<u64> = present.range(contiguous_end + 1..).copied().collect();
    tell(contiguous_end);
    let last = match until {
        Until::Seq(seq) => seq.min(contiguous_end),
        _ => contiguous_end,
    };
    let wanted: Vec<u64> = ((snapshot.seq + 1)..=last).collect();
    let first = &wanted[..wanted.len().min(CHUNK)];
    let mut fetched: Vec<Fetched> = hinted
        .into_iter()
        .zip(first)
        .take_while(|(f, seq)| f.delta.seq == **seq)
        .map(|(f, _)| f)
        .collect();
    let rest = fetch_slots(store, id, &first[fetched.len()..]).await?;
    fetched.extend(rest);
    Ok(Plan {
        contiguous_end,
        stray,
        wanted,
        fetched,
    })
}

/// [`replay`] from a plan made beforehand (see [`plan`]).
pub async fn replay_planned(
    store: &DynStore,
    id: &str,
    path: &Path,
    snapshot: &Snapshot,
    sums: &mut PageSums,
    until: Until,
    plan: Plan,
) -> Result<Replayed, LogError> {
    let Plan {
        contiguous_end,
        stray,
        wanted,
        fetched,
    } = plan;
    let mut replayed = Replayed::new(snapshot, contiguous_end, stray);
    let mut prefetched = Some(fetched);
    for chunk in wanted.chunks(CHUNK) {
        let objects = match prefetched.take() {
            Some(objects) => objects,
            None => fetch_slots(store, id, chunk).await?,
        };
        for fetched in objects {
            if !replayed.apply(id, path, sums, fetched, until).await? {
                return Ok(replayed);
            }
        }
    }
    Ok(replayed)
}

/// Continues a replay where its run ended (a replica's, or one made
/// before a lease was settled): the log after it, listed and applied with
/// the same rules, slot by slot.
pub async fn replay_onward(
    store: &DynStore,
    id: &str,
    path: &Path,
    sums: &mut PageSums,
    replayed: &mut Replayed,
) -> Result<(), LogError> {
    let from = Snapshot {
        etag: None,
        seq: replayed.contiguous_end,
        epoch: 0,
        legacy: false,
        token: None,
    };
    let Plan {
        stray,
        wanted,
        fetched,
        ..
    } = plan(store, id, &from, Until::End).await?;
    replayed.stray = stray;
    let mut prefetched = Some(fetched);
    for chunk in wanted.chunks(CHUNK) {
        let objects = match prefetched.take() {
            Some(objects) => objects,
            None => fetch_slots(store, id, chunk).await?,
        };
        for fetched in objects {
            replayed.extend(id, path, sums, fetched).await?;
        }
    }
    Ok(())
}

/// Puts this writer's fence into every slot of `end + 1 ..= end + WINDOW`
/// not already in `ours`, all at once (one round trip), and adds those
/// that landed to `ours`. A slot found taken is read directly — a listing
/// may not show it yet, however long it lags — and returned: the caller
/// applies it when it continues the run (`end + 1`), or judges its epoch.
pub async fn fence_window(
    store: &DynStore,
    id: &str,
    epoch: u64,
    writer: &Writer,
    end: u64,
    ours: &mut BTreeSet<u64>,
) -> Result<BTreeMap<u64, Fetched>, LogError> {
    let now = unix_ms(SystemTime::now());
    let slots: Vec<u64> = (end + 1..=end + WINDOW)
        .filter(|s| !ours.contains(s))
        .collect();
    let puts = slots.into_iter().map(|seq| async move {
        let key = keys::log_slot(id, seq);
        let body = Delta::fence(epoch, seq, now)
            .encode()
            .expect("a fence has no pages to miss");
        let metadata = slot_metadata(epoch, seq, writer);
        match store
            .put(&key, body, metadata, Precondition::IfAbsent)
            .await
        {
            Ok(_) => Ok((seq, None)),
            Err(e) if e.is_precondition() => match fetch_slot(store, id, seq).await? {
                Some(found) => Ok((seq, Some(found))),
                None => Err(LogError::Raced(format!(
                    "{key} was taken while this holder fenced it, and then removed"
                ))),
            },
            Err(e) => Err(LogError::Store(e)),
        }
    });
    let mut taken = BTreeMap::new();
    for (seq, found) in futures::future::try_join_all(puts).await? {
        match found {
            // An earlier attempt of ours whose answer was lost.
            Some(found) if writer.owns(found.token.as_deref()) => {
                ours.insert(seq);
            }
            Some(found) => {
                taken.insert(seq, found);
            }
            None => {
                ours.insert(seq);
            }
        }
    }
    Ok(taken)
}

/// Whether a log object of this size is a fence (kept forever).
pub fn is_fence_size(size: u64) -> bool {
    size <= delta::FENCE_MAX_BYTES
}

/// A commit time (Unix milliseconds) as RFC 3339, as `--at` takes it.
pub fn rfc3339_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms after 1970"))
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long deltas and old snapshots are kept, and when compaction runs.
#[derive(Clone, Debug)]
pub struct Retention {
    /// Point-in-time restore reaches back this far.
    pub keep: Duration,
    /// Compact after this many deltas since the snapshot...
    pub max_deltas: u64,
    /// ...or after this many bytes of deltas (or a quarter of the
    /// database, whichever is more).
    pub max_delta_bytes: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            keep: Duration::from_secs(24 * 3600),
            max_deltas: 1000,
            max_delta_bytes: 16 << 20,
        }
    }
}

impl Retention {
    /// Whether the deltas since the snapshot cost enough to compact.
    pub fn due(&self, deltas: u64, delta_bytes: u64, db_bytes: u64) -> bool {
        deltas >= self.max_deltas || delta_bytes >= self.max_delta_bytes.max(db_bytes / 4)
    }

    /// False when [`Retention::due`] is false whatever the database's
    /// size (its byte threshold is never below `max_delta_bytes`).
    pub fn may_be_due(&self, deltas: u64, delta_bytes: u64) -> bool {
        deltas >= self.max_deltas || delta_bytes >= self.max_delta_bytes
    }

    /// How often an old snapshot is archived for restore: often enough
    /// that restore never replays more than a quarter of the retention.
    fn archive_every(&self) -> Duration {
        self.keep / 4
    }
}

/// A snapshot ready to upload: a consistent copy of the working database
/// at slot `seq`.
pub struct Compaction {
    pub id: String,
    pub seq: u64,
    pub epoch: u64,
    pub checksum: u64,
    /// The snapshot's bytes, uploaded from the file.
    pub body: SnapshotFile,
    pub writer: Writer,
    /// Also delete what no restore within the retention needs. Off on
    /// release, where every round trip delays the handoff: the next
    /// compaction collects it.
    pub collect: bool,
}

/// What a compaction did.
#[derive(Debug)]
pub struct Compacted {
    pub snapshot: Snapshot,
    pub archived: bool,
    pub deleted: usize,
}

/// Writes the snapshot (archiving it when due), then deletes what no
/// restore within the retention can need. Each step is safe to crash
/// after: an archive or snapshot write is one atomic PUT, the snapshot
/// never goes backwards (`If-Match`, and a newer one is left alone), and
/// deletes remove only slots that a snapshot covers.
pub async fn compact(
    store: &DynStore,
    known: &Snapshot,
    job: Compaction,
    retention: &Retention,
) -> Result<Compacted, LogError> {
    let id = job.id.as_str();
    let key = keys::database(id);
    let mut archived = false;
    let archives = if retention.keep.is_zero() {
        Vec::new()
    } else {
        store.list(&keys::archive_prefix(id), None).await?
    };
    let now = SystemTime::now();
    if !retention.keep.is_zero() && archives.is_empty() && known.seq < job.seq {
        // The snapshot about to be replaced is the only base for restoring
        // the commits between it and this one: keep it (once per tenant;
        // later compactions archive their own snapshots).
        // Through a file beside the new snapshot's: never whole in memory.
        let download = SnapshotFile::name_beside(job.body.path());
        if let Some(current) = store.get_to_file(&key, &download).await? {
            let copy = SnapshotFile::adopt(download, current.size);
            let seq = number(&current.metadata, SEQ_KEY).unwrap_or(known.seq);
            match store
                .put_file(
                    &keys::archive(id, seq),
                    copy.path(),
                    current.metadata,
                    Precondition::IfAbsent,
                )
                .await
            {
                Ok(_) => archived = true,
                Err(e) if e.is_precondition() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !retention.keep.is_zero() {
        let newest = archives
            .iter()
            .filter_map(|a| a.last_modified)
            .max()
            .map(|t| now.duration_since(t).unwrap_or_default());
        if newest.is_none_or(|age| age >= retention.archive_every()) {
            let archive = keys::archive(id, job.seq);
            let metadata = snapshot_metadata(job.epoch, job.seq, job.checksum, &job.writer);
            match store
                .put_file(&archive, job.body.path(), metadata, Precondition::IfAbsent)
                .await
            {
                Ok(_) => archived = true,
                Err(e) if e.is_precondition() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let snapshot = write_snapshot(store, &key, known, &job).await?;
    // Deletes: slots up to the newest restore base older than the
    // retention (the snapshot itself when nothing is retained); fences
    // never.
    let base = if retention.keep.is_zero() {
        Some(snapshot.seq.min(job.seq))
    } else {
        let horizon = now
            .checked_sub(retention.keep)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        archives
            .iter()
            .filter(|a| a.last_modified.is_some_and(|t| t <= horizon))
            .filter_map(|a| keys::archive_seq(&a.key))
            .max()
    };
    let mut deleted = 0;
    if let Some(base) = base.filter(|_| job.collect) {
        let old_archives = archives
            .iter()
            .filter(|a| keys::archive_seq(&a.key).is_some_and(|seq| seq < base))
            .map(|a| a.key.clone());
        let old_slots = store
            .list(&keys::log_prefix(id), None)
            .await?
            .into_iter()
            .filter(|l| !is_fence_size(l.size))
            .filter(|l| keys::log_seq(&l.key).is_some_and(|seq| seq <= base))
            .map(|l| l.key);
        let doomed: Vec<String> = old_archives.chain(old_slots).collect();
        deleted = doomed.len();
        futures::stream::iter(doomed)
            .map(|key| {
                let store = store.clone();
                async move { store.delete(&key).await }
            })
            .buffer_unordered(FETCH_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(Compacted {
        snapshot,
        archived,
        deleted,
    })
}

/// Replaces the snapshot with `job`'s, never with an older one.
async fn write_snapshot(
    store: &DynStore,
    key: &str,
    known: &Snapshot,
    job: &Compaction,
) -> Result<Snapshot, LogError> {
    let metadata = snapshot_metadata(job.epoch, job.seq, job.checksum, &job.writer);
    let mut condition = match &known.etag {
        Some(etag) => Precondition::IfMatch(etag.clone()),
        None => Precondition::IfAbsent,
    };
    for _ in 0..3 {
        match store
            .put_file(key, job.body.path(), metadata.clone(), condition.clone())
            .await
        {
            Ok(etag) => {
                return Ok(Snapshot {
                    etag: Some(etag),
                    seq: job.seq,
                    epoch: job.epoch,
                    legacy: false,
                    token: Some(job.writer.token.clone()),
                });
            }
            Err(e) if e.is_precondition() => {
                // Someone else wrote the snapshot: a deposed holder of this
                // tenant compacting what it had confirmed, or a newer holder.
                let Some(current) = store.head(key).await? else {
                    return Err(LogError::Raced(format!(
                        "{key} disappeared (tenant deleted?)"
                    )));
                };
                let theirs = describe_snapshot(key, current.etag.clone(), &current.metadata)?;
                if theirs.seq >= job.seq {
                    info!(
                        key,
                        ours = job.seq,
                        theirs = theirs.seq,
                        "snapshot already covers this compaction"
                    );
                    return Ok(theirs);
                }
                warn!(
                    key,
                    ours = job.seq,
                    theirs = theirs.seq,
                    "snapshot changed under this holder; writing over the older one"
                );
                condition = Precondition::IfMatch(current.etag);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(LogError::Raced(format!(
        "{key} kept changing while it was written"
    )))
}

/// A database rebuilt from the store: what `tenantd restore` and the
/// checkers read.
pub struct Materialized {
    /// The slot of the last commit applied.
    pub seq: u64,
    /// The snapshot it started from.
    pub base: String,
    pub deltas: u64,
    pub last_committed_at_ms: Option<u64>,
}

/// Reads of a tenant that a compaction kept overtaking before giving up.
const MATERIALIZE_TRIES: u32 = 10;

/// Writes the tenant's database as of `until` to `path`: the newest
/// snapshot that does not reach past `until` (the current one, or an
/// archived one), and the log after it. A live holder may replace the
/// snapshot and delete the slots after it at any moment: a read it
/// overtook starts over (a few times, then `Raced`).
pub async fn materialize(
    store: &DynStore,
    id: &str,
    path: &Path,
    until: Until,
) -> Result<Materialized, LogError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match materialize_once(store, id, path, until).await {
            Err(LogError::Raced(why)) if tries < MATERIALIZE_TRIES => {
                info!(
                    customer_id = id,
                    why, "the log changed while it was read; reading it again"
                );
                tokio::time::sleep(Duration::from_millis(20 * u64::from(tries))).await;
            }
            result => return result,
        }
    }
}

async fn materialize_once(
    store: &DynStore,
    id: &str,
    path: &Path,
    until: Until,
) -> Result<Materialized, LogError> {
    let key = keys::database(id);
    let current = store.head(&key).await?;
    let mut base: Option<(String, Snapshot)> = None;
    if let Some(meta) = &current {
        let snapshot = describe_snapshot(&key, meta.etag.clone(), &meta.metadata)?;
        let fits = match until {
            Until::End => true,
            Until::Seq(seq) => snapshot.seq <= seq,
            // Checked below against the archives' write times.
            Until::Time(_) => false,
        };
        if fits {
            base = Some((key.clone(), snapshot));
        }
    }
    if base.is_none() {
        let archives = store.list(&keys::archive_prefix(id), None).await?;
        let mut candidates: Vec<(u64, String, Option<SystemTime>)> = archives
            .into_iter()
            .filter_map(|a| keys::archive_seq(&a.key).map(|seq| (seq, a.key, a.last_modified)))
            .collect();
        // The current snapshot is a candidate by time too.
        if let (Until::Time(_), Some(meta)) = (until, &current) {
            let snapshot = describe_snapshot(&key, meta.etag.clone(), &meta.metadata)?;
            let listed = store.list(&key, None).await?;
            let modified = listed
                .iter()
                .find(|l| l.key == key)
                .and_then(|l| l.last_modified);
            candidates.push((snapshot.seq, key.clone(), modified));
        }
        candidates.sort();
        let chosen = candidates
            .into_iter()
            .rev()
            .find(|(seq, _, modified)| match until {
                Until::End => true,
                Until::Seq(target) => *seq <= target,
                Until::Time(at) => modified.is_some_and(|m| unix_ms(m) <= at),
            });
        if let Some((_, archive, _)) = chosen {
            let meta = store
                .head(&archive)
                .await?
                .ok_or_else(|| LogError::Raced(format!("{archive} was listed but is gone")))?;
            let snapshot = describe_snapshot(&archive, meta.etag.clone(), &meta.metadata)?;
            base = Some((archive, snapshot));
        }
    }
    let Some((base_key, _)) = base else {
        return Err(LogError::Corrupt(match current {
            None => format!("customer {id} has no snapshot ({key}): it does not exist"),
            Some(_) => format!(
                "customer {id} has no snapshot at or before {until}: nothing kept reaches back that far (--retention decides how far back restore reaches; {} holds the archived snapshots)",
                keys::archive_prefix(id)
            ),
        }));
    };
    // Streamed to `path`: a restore of any size in bounded memory.
    let object = store
        .get_to_file(&base_key, path)
        .await?
        .ok_or_else(|| LogError::Raced(format!("{base_key} disappeared while it was read")))?;
    // What was downloaded names its own slot: the snapshot looked at a
    // moment ago may have been replaced since.
    let snapshot = describe_snapshot(&base_key, object.etag.clone(), &object.metadata)?;
    if let Until::Seq(target) = until
        && snapshot.seq > target
    {
        return Err(LogError::Raced(format!(
            "{base_key} moved past slot {target} while it was read"
        )));
    }
    let recorded = recorded_checksum(&base_key, &object.metadata)?;
    let owned_path = path.to_path_buf();
    let sums = tokio::task::spawn_blocking(move || -> Result<PageSums, String> {
        PageSums::of_file(&owned_path).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| LogError::Local(e.to_string()))?
    .map_err(|e| LogError::Local(format!("cannot write {}: {e}", path.display())))?;
    if let Some(recorded) = recorded
        && recorded != sums.checksum()
    {
        return Err(LogError::Corrupt(format!(
            "checksum mismatch in {base_key}: its metadata says {recorded:016x}, its pages give {:016x}",
            sums.checksum()
        )));
    }
    let mut sums = sums;
    let replayed = replay(store, id, path, &snapshot, &mut sums, until).await;
    // A compaction deletes the slots its snapshot covers only after writing
    // it. So if the snapshot read is still the current one after the log
    // was listed, the listing saw every slot after it; if not, those slots
    // may be gone (a gap, or nothing after it at all: an older state that
    // looks complete), and the read starts over.
    if base_key == key && !matches!(replayed, Err(LogError::Store(_))) {
        let now = store.head(&key).await?;
        let same = now.as_ref().is_some_and(|m| {
            m.etag == object.etag && number(&m.metadata, SEQ_KEY) == Some(snapshot.seq)
        });
        if !same {
            return Err(LogError::Raced(format!(
                "{key} was replaced while the log after it was read"
            )));
        }
    }
    let replayed = replayed?;
    Ok(Materialized {
        seq: replayed.applied,
        base: base_key,
        deltas: replayed.deltas,
        last_committed_at_ms: replayed.last_committed_at_ms,
    })
}
