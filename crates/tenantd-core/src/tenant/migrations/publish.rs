//! `tenantd migrate push`: a folder of `NNNN_<name>.sql` files checked as a
//! whole, then published in order. Nothing is published when anything is
//! wrong: the folder is refused before the first write (numbering, text,
//! the SQL guard, a run of every file on a new tenant's database), and a
//! file is reachable only once the head lists it, which is written last
//! (`If-Match`: two pushes at once do not lose each other's files).

use std::path::Path;

use anyhow::{Context, bail};

use super::{Entry, HEAD_KEY, Migration, SHA256_KEY, file_key, read_head, sha256_hex};
use crate::store::{DynStore, Metadata, Precondition, StoreError};
use crate::tenant::db::{Db, Work};
use crate::tenant::sql::SqlLimits;

/// The folder's migrations, checked; in version order from 1.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<Migration>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut found: Vec<(u32, String, std::path::PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read the folder {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            bail!(
                "{}: a file name that is not UTF-8; migration files are named NNNN_<name>.sql",
                entry.path().display()
            );
        };
        if !name.ends_with(".sql") {
            continue;
        }
        let version = parse_name(name).with_context(|| format!("{}", entry.path().display()))?;
        if let Some((_, other, _)) = found.iter().find(|(v, _, _)| *v == version) {
            bail!(
                "{name} and {other} both have number {version}: give each migration its own number"
            );
        }
        found.push((version, name.to_string(), entry.path()));
    }
    found.sort();
    if found.is_empty() {
        bail!("{} has no NNNN_<name>.sql files", dir.display());
    }
    let mut migrations = Vec::with_capacity(found.len());
    for (i, (version, name, path)) in found.into_iter().enumerate() {
        let expected = i as u32 + 1;
        if version != expected {
            bail!(
                "{name}: expected number {expected:04} here (migrations are numbered 1, 2, 3, … without gaps); renumber it or add the missing one"
            );
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{name} is not UTF-8 text ({e}); save it as UTF-8"))?;
        if text.trim().is_empty() {
            bail!("{name} is empty: write its SQL, or remove the file");
        }
        migrations.push(Migration::new(version, &name, &text).map_err(anyhow::Error::msg)?);
    }
    check_on_new_database(&migrations)?;
    Ok(migrations)
}

/// `NNNN_<name>.sql` → NNNN.
fn parse_name(name: &str) -> anyhow::Result<u32> {
    let stem = name.strip_suffix(".sql").unwrap_or(name);
    let (digits, rest) = stem.split_once('_').unwrap_or((stem, ""));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || rest.is_empty() {
        bail!("migration files are named NNNN_<name>.sql (e.g. 0001_create_users.sql)");
    }
    let version: u32 = digits.parse().context("the number is too large")?;
    if version == 0 {
        bail!("migrations are numbered from 1");
    }
    Ok(version)
}

/// Runs every migration, in order, on a new tenant's database under the
/// tenants' SQL guard: what the guard refuses (ATTACH, tenantd_* tables,
/// VACUUM …) or what fails on an empty database (every new tenant starts
/// as one) is refused here, before anything is published.
pub fn check_on_new_database(migrations: &[Migration]) -> anyhow::Result<()> {
    let dir = super::Scratch::new()?;
    let mut db = Db::open(&dir.0.join("check.sqlite3")).map_err(|e| anyhow::anyhow!("{e}"))?;
    run_all(&mut db, migrations, &SqlLimits::default())
}

/// Applies migrations in order to an open database; the first failure is
/// the error, naming the file.
pub fn run_all(db: &mut Db, migrations: &[Migration], limits: &SqlLimits) -> anyhow::Result<()> {
    for migration in migrations {
        let applied = db
            .apply_batch(0, &[Work::Migrate(migration)], limits, false)
            .with_context(|| format!("{}: SQLite failed", migration.name))?;
        if let Some(Err(e)) = applied.replies.into_iter().next() {
            bail!(
                "{} fails on a new tenant's database: {}; nothing was published",
                migration.name,
                e.message
            );
        }
    }
    Ok(())
}

/// What a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    pub published: Vec<String>,
    pub unchanged: usize,
    pub latest: u32,
}

/// Publishes the folder's migrations that are not published yet. Every
/// published one must be in the folder with the same bytes.
pub async fn push(store: &DynStore, migrations: &[Migration]) -> anyhow::Result<Pushed> {
    loop {
        let (head, etag) = read_head(store).await?;
        for entry in &head.migrations {
            let Some(local) = migrations.iter().find(|m| m.version == entry.version) else {
                bail!(
                    "{} is published but not in the folder: a folder holds every migration from 0001 on (published ones are immutable); add it back",
                    entry.name
                );
            };
            if local.sha256 != entry.sha256 || local.name != entry.name {
                bail!(
                    "{} was changed after it was published: published {} (SHA-256 {}), the folder has {} (SHA-256 {}); published migrations are immutable: put the published text back and add the change as a new migration",
                    local.name,
                    entry.name,
                    entry.sha256,
                    local.name,
                    local.sha256
                );
            }
        }
        let new: Vec<&Migration> = migrations
            .iter()
            .filter(|m| m.version > head.latest)
            .collect();
        if new.is_empty() {
            return Ok(Pushed {
                published: Vec::new(),
                unchanged: migrations.len(),
                latest: head.latest,
            });
        }
        for migration in &new {
            put_file(store, migration).await?;
        }
        let mut next = head.clone();
        for migration in &new {
            next.migrations.push(Entry {
                version: migration.version,
                name: migration.name.clone(),
                sha256: migration.sha256.clone(),
            });
        }
        next.latest = next.migrations.len() as u32;
        let condition = match etag {
            Some(etag) => Precondition::IfMatch(etag),
            None => Precondition::IfAbsent,
        };
        let body = serde_json::to_vec_pretty(&next).expect("a head serializes");
        match store
            .put(HEAD_KEY, body.into(), Metadata::new(), condition)
            .await
        {
            Ok(_) => {
                return Ok(Pushed {
                    published: new.iter().map(|m| m.name.clone()).collect(),
                    unchanged: migrations.len() - new.len(),
                    latest: next.latest,
                });
            }
            // Another push got in first: check the folder against it.
            Err(StoreError::PreconditionFailed { .. }) => continue,
            Err(e) => return Err(anyhow::anyhow!("cannot write {HEAD_KEY}: {e}")),
        }
    }
}

/// Puts one file, once: a file left by an interrupted push with the same
/// bytes is kept, with other bytes refused.
async fn put_file(store: &DynStore, migration: &Migration) -> anyhow::Result<()> {
    let key = file_key(&migration.name);
    let text = migration.text.as_bytes().to_vec();
    let mut metadata = Metadata::new();
    metadata.insert(SHA256_KEY.into(), migration.sha256.clone());
    match store
        .put(&key, text.into(), metadata, Precondition::IfAbsent)
        .await
    {
        Ok(_) => Ok(()),
        Err(StoreError::PreconditionFailed { .. }) => {
            let there = store
                .get(&key)
                .await?
                .with_context(|| format!("{key} exists but cannot be read"))?;
            let sha = sha256_hex(&there.body);
            if sha != migration.sha256 {
                bail!(
                    "{key} is already in the store with other bytes (SHA-256 {sha}; the folder's {} has {}): another push with a different {} is under way or was interrupted; check the folder against your colleagues'",
                    migration.name,
                    migration.sha256,
                    migration.name
                );
            }
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("cannot write {key}: {e}")),
    }
}
