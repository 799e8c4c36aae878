//! Restore: a tenant's database as of any commit still kept (retention),
//! written to a file, or made the tenant's current state (`tenantd restore`
//! parses its flags in the binary and calls in here).
//!
//! In place, the restore is a commit like any other: it takes the tenant's
//! lease and takes the tenant over through the claim's code (fences,
//! epochs), appends the difference between the current state and the
//! restored one as the next slot (nothing when they are equal), writes the
//! snapshot and releases. Nothing acknowledged later is dropped silently:
//! it says which commits it rolls back and waits for `--yes`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use crate::TenantId;
use crate::lease::{Acquire, Contender, Lease, LeaseConfig, Session};
use crate::store::{DynStore, Precondition, keys};
use crate::tenant::TenantError;
use crate::tenant::claim::take_over;
use crate::tenant::copy::SnapshotFile;
use crate::tenant::delta::{self, Delta, Kind, PageSums};
use crate::tenant::log::{self, LogError, Materialized, Until, Writer};

/// The lease ttl of an in-place restore.
pub const RESTORE_TTL: Duration = Duration::from_secs(10);

/// [`log::materialize`], read again when a compaction removed what it
/// was reading.
pub async fn materialize_retrying(
    store: &DynStore,
    id: &str,
    path: &Path,
    until: Until,
) -> anyhow::Result<Materialized> {
    let mut attempt = 0;
    loop {
        match log::materialize(store, id, path, until).await {
            Ok(done) => {
                let owned = path.to_path_buf();
                tokio::task::spawn_blocking(move || check_database(&owned)).await??;
                return Ok(done);
            }
            Err(LogError::Raced(why)) if attempt < 5 => {
                attempt += 1;
                tracing::info!(why, "the log changed while it was read; reading it again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("customer {id}: {e}"),
        }
    }
}

/// Leaves a plain SQLite file (no WAL beside it) that passes
/// `PRAGMA integrity_check`.
fn check_database(path: &Path) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!("{} fails PRAGMA integrity_check: {check}", path.display());
    }
    Ok(())
}

fn count_of(path: &Path) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .ok()
}

/// `restore --in-place` (`yes`: confirmed) under a lease of `ttl`,
/// waiting up to `wait` for the tenant's holder to let go.
pub async fn in_place(
    store: &DynStore,
    id: &TenantId,
    until: Until,
    yes: bool,
    wait: Duration,
    ttl: Duration,
) -> anyhow::Result<()> {
    if matches!(until, Until::End) {
        bail!("--in-place needs --at: restoring the newest commit in place changes nothing");
    }
    let scratch = tempfile_dir()?;
    let (current, target) = (
        scratch.join("current.sqlite3"),
        scratch.join("target.sqlite3"),
    );
    let wanted = materialize_retrying(store, id.as_str(), &target, until).await?;
    if !yes {
        // A preview touches nothing, not even the lock.
        let now = materialize_retrying(store, id.as_str(), &current, Until::End).await?;
        report(id, &now, &current, &wanted, &target);
        let _ = std::fs::remove_dir_all(&scratch);
        bail!(
            "nothing written: run again with --yes to make slot {} the current state",
            wanted.seq
        );
    }
    // Hold the lease: no machine serves the tenant while it is rewritten.
    let machine = format!(
        "restore-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let config = LeaseConfig::new(machine.clone(), "restore", ttl);
    let session = Session::new(store.clone(), config);
    let mut contender = Contender::new(store.clone(), keys::lock(id.as_str()), session);
    let until_time = tokio::time::Instant::now() + wait;
    let mut lease = match contender.acquire_until(until_time).await? {
        Acquire::Acquired(lease) => lease,
        Acquire::HeldBy { record, .. } => bail!(
            "customer {id} is held by machine {} and it did not let go within {:?}; stop it (or scale the tenant to zero) and run this again",
            record.holder,
            wait
        ),
        Acquire::Unknown { .. } => bail!(
            "customer {id}'s machine.lock cannot be parsed and did not go stale within {:?}",
            wait
        ),
    };
    let result = rewrite(store, id, &mut lease, &current, &target, &wanted).await;
    let released = lease.release().await;
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    released.context("releasing the tenant's lease")?;
    Ok(())
}

async fn rewrite(
    store: &DynStore,
    id: &TenantId,
    lease: &mut Lease,
    current: &Path,
    target: &Path,
    wanted: &Materialized,
) -> anyhow::Result<()> {
    // Take the tenant over like any new holder (fences after the whole
    // run, epochs above every writer's): what it rolls back is what is
    // there once no one else can write.
    let holder = lease.record().holder;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rebuilt = match take_over(id, store, lease, &holder, current, &mut deadline).await {
        Ok(rebuilt) => rebuilt,
        Err(TenantError::NotHolder) => {
            bail!("customer {id}: lost the tenant's lease while taking it over; nothing restored")
        }
        Err(e) => bail!("{e}"),
    };
    let key = keys::database(id.as_str());
    if rebuilt.converting {
        bail!(
            "customer {id}: {key} is not in the commit-log format yet; let a machine take the tenant over first"
        );
    }
    let now = Materialized {
        seq: rebuilt.applied,
        base: key,
        deltas: rebuilt.since.0,
        last_committed_at_ms: None,
    };
    let rolled_back = report(id, &now, current, wanted, target);
    let epoch = lease.epoch();
    let seq = rebuilt.next_slot;
    let (cur, tgt) = (current.to_path_buf(), target.to_path_buf());
    let (pre, post, db_pages, pages, page_size, body) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let pre = PageSums::of_file(&cur)?;
            let post = PageSums::of_file(&tgt)?;
            let (db_pages, pages) = delta::diff_files(&cur, &tgt)?;
            let page_size = pages.first().map_or(4096, |(_, p)| p.len() as u32);
            let body = SnapshotFile::copy_of(&tgt)?;
            Ok((pre, post, db_pages, pages, page_size, body))
        })
        .await??;
    if pages.is_empty() && db_pages == pre.page_count() {
        println!(
            "customer {id}: slot {} is the current state already; nothing written",
            wanted.seq
        );
        return Ok(());
    }
    let delta = Delta {
        kind: Kind::Delta,
        epoch,
        seq,
        committed_at_ms: log::unix_ms(SystemTime::now()),
        page_size,
        db_pages,
        pre_checksum: pre.checksum(),
        post_checksum: post.checksum(),
        pages,
    };
    let writer = Writer {
        holder,
        token: lease.token().to_string(),
    };
    store
        .put(
            &keys::log_slot(id.as_str(), seq),
            delta.encode()?,
            log::slot_metadata(epoch, seq, &writer),
            Precondition::IfAbsent,
        )
        .await
        .with_context(|| format!("writing the restore as slot {seq}"))?;
    // The snapshot too, so that the tenant's db.sqlite3 is the restored
    // state right away.
    let job = log::Compaction {
        id: id.to_string(),
        seq,
        epoch,
        checksum: post.checksum(),
        body,
        writer,
        collect: true,
    };
    log::compact(store, &rebuilt.snapshot, job, &log::Retention::default()).await?;
    println!(
        "customer {id}: restored slot {} as slot {seq}; rolled back {rolled_back} slot(s)",
        wanted.seq
    );
    Ok(())
}

/// Says what restoring `wanted` over `now` rolls back; returns how many
/// slots.
fn report(
    id: &TenantId,
    now: &Materialized,
    current: &Path,
    wanted: &Materialized,
    target: &Path,
) -> u64 {
    let rolled_back = now.seq.saturating_sub(wanted.seq);
    println!(
        "customer {id}: now at slot {} (count {}); restoring slot {} (count {}) rolls back {} slot(s) of commits after it",
        now.seq,
        count_of(current).map_or("?".into(), |c| c.to_string()),
        wanted.seq,
        count_of(target).map_or("?".into(), |c| c.to_string()),
        rolled_back,
    );
    rolled_back
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("tenantd-restore-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
