//! The commit log end to end, with real processes and signals on the file
//! store: acknowledged counts survive SIGKILL while deltas and compaction
//! interleave, the snapshot after SIGTERM is a sound SQLite file, restore
//! reaches every past slot (and says so when the retention removed it),
//! in-place restore, bad log objects, and the conversion of a tenant stored
//! the old way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tenantd_core::store::{FileStore, Metadata, ObjectStore, Precondition};
use tenantd_core::tenant::delta::Delta;

use crate::cluster::{BIN, FlyClient, Setup, eventually};
use crate::failover::{check_history, traffic};
use crate::routing::holder_of;

/// Compaction every three commits, nothing retained: deltas are written,
/// folded into the snapshot and deleted all the time.
/// Pool machines in these tests create tenants on their first request:
/// the tests are about the log, not about the tenant lifecycle.
const COMPACT_OFTEN_CREATING: &[&str] = &[
    "--compact-after",
    "3",
    "--retention",
    "0s",
    "--create-on-first-request",
];
const COMPACT_OFTEN: &[&str] = &["--compact-after", "3", "--retention", "0s"];

fn tenantd(setup: &Setup, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--store", &setup.store])
        .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("tenantd runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn count_in(path: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap()
}

/// `tenantd restore --at <at> --output …`: the restored count, or the
/// command's output when it failed.
fn restore_at(setup: &Setup, customer: &str, at: &str) -> Result<i64, String> {
    let path = setup.root.join(format!(
        "at-{customer}-{}.sqlite3",
        uuid::Uuid::new_v4().simple()
    ));
    let out = tenantd(
        setup,
        &[
            "restore",
            "--customer-id",
            customer,
            "--at",
            at,
            "--output",
            path.to_str().unwrap(),
        ],
    );
    if out.status.success() {
        Ok(count_in(&path))
    } else {
        Err(text(&out))
    }
}

fn store_root(setup: &Setup) -> PathBuf {
    setup.root.join("store")
}

/// The log slots in the store, read from the folder.
fn log_slots(setup: &Setup, customer: &str) -> Vec<u64> {
    let dir = store_root(setup)
        .join("customer")
        .join(customer)
        .join("log");
    let mut slots: Vec<u64> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    slots.sort_unstable();
    slots
}

fn slot_key(customer: &str, seq: u64) -> String {
    format!("customer/{customer}/log/{seq:020}")
}

/// Every file under the store with its bytes, the lease's files left out
/// (a machine that takes the tenant's lease writes it; nothing else may
/// change).
fn store_files(setup: &Setup) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                // The tenant's objects: not its lock, not the machines'
                // heartbeats, not the file store's own lock files.
                let not_data = name.contains("machine.lock")
                    || name.starts_with("machines/")
                    || name.starts_with(".tenantd/meta/machines/")
                    || name.starts_with(".tenantd/locks/");
                if !not_data {
                    out.insert(name, std::fs::read(&path).unwrap_or_default());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    let root = store_root(setup);
    walk(&root, &root, &mut out);
    out
}

fn file_store(setup: &Setup) -> FileStore {
    FileStore::new(store_root(setup)).unwrap()
}

async fn increment_ok(client: &FlyClient, first: &str, customer: &str) -> u64 {
    let reply = client.increment(first, customer).await.unwrap();
    assert_eq!(reply.status, 200, "increment answered {reply:?}");
    reply.json["count"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_counts_survive_sigkills_with_deltas_and_compaction_interleaved() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut a = setup.machine("a00000000000l1", Some("100"), COMPACT_OFTEN);
    let mut b = setup.machine("b00000000000l2", Some("100"), COMPACT_OFTEN);
    let client = FlyClient::new(&[&a, &b]);
    let stop = Arc::new(AtomicBool::new(false));
    let (history, successes, _failures, tasks) = traffic(
        &client,
        4,
        vec![a.id.clone(), b.id.clone()],
        stop.clone(),
        false,
    );

    for round in 0..3 {
        let holder = holder_of(&setup, "100").await;
        // Some commits (and so compactions) under this holder first.
        let since = Instant::now();
        eventually(
            Duration::from_secs(15),
            "commits under the holder",
            async || {
                (successes
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|t| **t > since)
                    .count()
                    >= 20)
                    .then_some(())
            },
        )
        .await;
        let victim = if holder == a.id { &mut a } else { &mut b };
        victim.signal(Signal::SIGKILL);
        victim.wait_exit(Duration::from_secs(5));
        let killed_at = Instant::now();
        // Back after a moment: the survivor or the restarted one takes over.
        victim.start();
        eventually(
            Duration::from_secs(15),
            &format!("a success after kill {round}"),
            async || {
                successes
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|t| *t > killed_at)
                    .then_some(())
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let compacted = [&a, &b]
        .iter()
        .any(|m| m.logs().contains("snapshot written"));
    drop((a, b));
    let acked: usize = history.lock().unwrap().values().map(Vec::len).sum();
    let stored = setup.stored_count("100");
    check_history(&history, stored);
    assert!(acked > 0, "nothing was acknowledged");
    // Requests whose answer was lost with a killed holder may or may not
    // have landed: at most one per client per kill.
    assert!(
        stored as usize <= acked + 4 * 3,
        "stored {stored} is more than {acked} acknowledged plus the indeterminate ones"
    );
    assert!(compacted, "no compaction ran under the traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_after_sigterm_is_a_sound_sqlite_file_with_the_last_count() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut m = setup.machine(
        "a00000000000g1",
        None,
        &["--compact-after", "3", "--create-on-first-request"],
    );
    let client = FlyClient::new(&[&m]);
    let mut last = 0;
    for _ in 0..7 {
        last = increment_ok(&client, &m.id, "snap").await;
    }
    m.signal(Signal::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(15)), Some(0));

    // The object's bytes, as the `sqlite3` shell would get them.
    let bytes = setup
        .object("customer/snap/db.sqlite3")
        .expect("a snapshot after the release");
    let copy = dir.path().join("snapshot-copy.sqlite3");
    std::fs::write(&copy, bytes).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let count: i64 = conn
        .query_row("SELECT count FROM welcome", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        count, last as i64,
        "the snapshot holds the last acknowledged count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_gives_the_count_acknowledged_at_each_slot_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = setup.machine("a00000000000r1", None, &["--create-on-first-request"]);
    let client = FlyClient::new(&[&m]);
    let mut acked = Vec::new();
    for _ in 0..6 {
        let count = increment_ok(&client, &m.id, "pitr").await;
        let slot = *log_slots(&setup, "pitr").last().expect("a log slot");
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        acked.push((slot, time, count));
        // Commit times have millisecond resolution: keep the next one apart.
        std::thread::sleep(Duration::from_millis(3));
    }
    drop(m);
    for (slot, time, count) in &acked {
        assert_eq!(
            restore_at(&setup, "pitr", &slot.to_string()),
            Ok(*count as i64),
            "--at {slot}"
        );
        assert_eq!(
            restore_at(&setup, "pitr", time),
            Ok(*count as i64),
            "--at {time}"
        );
    }
}

/// Fails today: the first compaction (here the release) overwrites the
/// snapshot the tenant began with (slot 0) without archiving it, and the
/// first archive is the new snapshot itself, so the commits before it
/// cannot be restored although their deltas are kept for the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reaches_commits_before_the_first_compaction_within_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut m = setup.machine("a00000000000r3", None, &["--create-on-first-request"]);
    let client = FlyClient::new(&[&m]);
    let mut acked = Vec::new();
    for _ in 0..4 {
        let count = increment_ok(&client, &m.id, "early").await;
        acked.push((*log_slots(&setup, "early").last().unwrap(), count));
    }
    m.signal(Signal::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(15)), Some(0));
    for (slot, count) in acked {
        assert_eq!(
            restore_at(&setup, "early", &slot.to_string()),
            Ok(count as i64),
            "--at {slot} after a release (default retention 24h)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_before_the_snapshot_without_retention_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut m = setup.machine("a00000000000r2", None, COMPACT_OFTEN_CREATING);
    let client = FlyClient::new(&[&m]);
    let mut first_slot = None;
    for _ in 0..8 {
        increment_ok(&client, &m.id, "gone").await;
        first_slot = first_slot.or(log_slots(&setup, "gone").first().copied());
    }
    m.signal(Signal::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(15)), Some(0));
    let slot = first_slot.unwrap().to_string();
    let err = restore_at(&setup, "gone", &slot).unwrap_err();
    assert!(
        err.contains("gone") && err.contains("retention"),
        "the error should name the tenant and the retention: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_in_place_asks_first_then_rolls_back_and_serving_continues() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut m = setup.machine("a00000000000i1", None, &["--create-on-first-request"]);
    // Two sessions: the first release archives a snapshot that the slots
    // of the second can be restored from.
    let mut slots = Vec::new();
    for session in 0..2 {
        if session > 0 {
            m.start();
        }
        let client = FlyClient::new(&[&m]);
        for _ in 0..3 {
            let count = increment_ok(&client, &m.id, "back").await;
            slots.push((*log_slots(&setup, "back").last().unwrap(), count));
        }
        m.signal(Signal::SIGTERM);
        assert_eq!(m.wait_exit(Duration::from_secs(15)), Some(0));
    }
    let (slot, count) = slots[3];
    let slot = slot.to_string();

    let before = store_files(&setup);
    let out = tenantd(
        &setup,
        &[
            "restore",
            "--customer-id",
            "back",
            "--in-place",
            "--at",
            &slot,
        ],
    );
    assert!(!out.status.success(), "without --yes: {}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("rolls back 2 slot(s)") && said.contains("--yes"),
        "it should say what it rolls back and ask for --yes: {said}"
    );
    assert_eq!(store_files(&setup), before, "nothing written without --yes");

    let out = tenantd(
        &setup,
        &[
            "restore",
            "--customer-id",
            "back",
            "--in-place",
            "--at",
            &slot,
            "--yes",
        ],
    );
    assert!(out.status.success(), "with --yes: {}", text(&out));
    assert_eq!(setup.stored_count("back"), count as i64);

    m.start();
    let client = FlyClient::new(&[&m]);
    assert_eq!(increment_ok(&client, &m.id, "back").await, count + 1);
}

/// Leaves `customer` with deltas after its snapshot (the holder is killed,
/// so nothing compacts them), damages one with `damage`, and checks that
/// a new machine answers 500 naming `named(slots)` and changes nothing.
async fn bad_log(customer: &str, damage: impl FnOnce(&FileStore, &[u64]) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut a = setup.machine("a00000000000b1", None, &["--create-on-first-request"]);
    let client = FlyClient::new(&[&a]);
    for _ in 0..10 {
        increment_ok(&client, &a.id, customer).await;
    }
    a.signal(Signal::SIGKILL);
    a.wait_exit(Duration::from_secs(5));
    let slots = log_slots(&setup, customer);
    assert!(slots.len() >= 10, "deltas after the snapshot: {slots:?}");
    let named = damage(&file_store(&setup), &slots);
    let before = store_files(&setup);

    let b = setup.machine("b00000000000b2", None, &["--create-on-first-request"]);
    let client = FlyClient::new(&[&b]);
    // Until the killed holder's lease is stale, b sends the request to it.
    let reply = eventually(Duration::from_secs(15), "an answer from b", async || {
        client
            .increment(&b.id, customer)
            .await
            .ok()
            .filter(|r| r.status != 503)
    })
    .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    let message = reply.json.to_string();
    assert!(
        message.contains(&named),
        "the error should name {named}: {message}"
    );
    assert_eq!(store_files(&setup), before, "nothing in the store changed");
    drop(b);
}

fn rewrite(store: &FileStore, key: &str, change: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let object = store.get(key).await.unwrap().unwrap();
            let body = change(object.body.to_vec());
            store
                .put(key, body.into(), object.metadata, Precondition::None)
                .await
                .unwrap();
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_delta_is_a_500_naming_it_and_nothing_changes() {
    bad_log("flip", |store, slots| {
        let key = slot_key("flip", slots[4]);
        rewrite(store, &key, |mut body| {
            let at = body.len() / 2;
            body[at] ^= 0xff;
            body
        });
        key
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_delta_is_a_500_naming_it_and_nothing_changes() {
    bad_log("cut", |store, slots| {
        let key = slot_key("cut", slots[4]);
        rewrite(store, &key, |mut body| {
            body.truncate(body.len() / 3);
            body
        });
        key
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_log_is_a_500_naming_it_and_nothing_changes() {
    bad_log("hole", |store, slots| {
        let key = slot_key("hole", slots[2]);
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(store.delete(&key))
        })
        .unwrap();
        key
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_mismatch_is_a_500_naming_the_delta_and_nothing_changes() {
    bad_log("sums", |store, slots| {
        let key = slot_key("sums", slots[4]);
        let owned = key.clone();
        rewrite(store, &key, move |body| {
            let mut delta = Delta::decode(&owned, &body).unwrap();
            delta.pre_checksum ^= 1;
            delta.encode().unwrap().to_vec()
        });
        key
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_stored_the_old_way_is_served_and_converted_on_its_first_claim() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let path = dir.path().join("old.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (41);",
        )
        .unwrap();
    }
    let store = file_store(&setup);
    let key = "customer/old/db.sqlite3";
    store
        .put(
            key,
            std::fs::read(&path).unwrap().into(),
            Metadata::new(),
            Precondition::None,
        )
        .await
        .unwrap();

    let mut m = setup.machine("a00000000000o1", None, &["--create-on-first-request"]);
    let client = FlyClient::new(&[&m]);
    assert_eq!(increment_ok(&client, &m.id, "old").await, 42);
    let converted = store.head(key).await.unwrap().expect("the snapshot");
    assert_eq!(
        converted.metadata.get("tenantd-format").map(String::as_str),
        Some("log"),
        "{:?}",
        converted.metadata
    );
    assert_eq!(increment_ok(&client, &m.id, "old").await, 43);
    m.signal(Signal::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(setup.stored_count("old"), 43);
}
