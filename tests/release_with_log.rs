//! A release that cannot upload the whole snapshot within `--drain-timeout`
//! hands the tenant over with its log: a real `tenantd serve` behind a
//! bandwidth-capped store (`--faults`) holds a tenant whose snapshot takes
//! seconds to upload, is stopped with SIGTERM after acknowledged writes,
//! and must exit 0 within the drain timeout with the lock `released`
//! (naming where the log ends), so that a second machine claims the tenant
//! at once with every acknowledged write.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cluster::Setup;
use nix::sys::signal::Signal;

/// A SQLite database of about `mb` MB with the counter table at 41.
fn big_database(path: &Path, mb: usize) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = DELETE;
         CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (41);
         CREATE TABLE ballast (b BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {mb})
         INSERT INTO ballast SELECT randomblob(1048576) FROM n;"
    ))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_tenant_whose_snapshot_cannot_upload_in_time_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    // Long enough that waiting it out shows: the next machine must not.
    setup.ttl = "20s".into();
    let source = dir.path().join("big.sqlite3");
    big_database(&source, 12);
    let (code, out, err) =
        setup.tenants(&["create", "big", "--from-file", source.to_str().unwrap()]);
    assert_eq!(code, 0, "import failed:\n{out}\n{err}");

    // 4 MB/s: the 12 MB snapshot needs 3 s; the drain leaves the release
    // about one (3 s minus the linger and the grace for requests).
    let faults = r#"{"bandwidth_bytes_per_sec":4000000}"#;
    let drain = Duration::from_secs(3);
    let mut a = setup.machine(
        "a00000000000r1",
        None,
        &["--faults", faults, "--drain-timeout", "3s"],
    );
    let client = cluster::FlyClient::new(&[&a]);
    let mut last = 0;
    for expected in 42..=46 {
        let reply = client.increment(&a.id, "big").await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.json);
        assert_eq!(reply.json["count"], expected);
        last = expected;
    }

    let stopped = Instant::now();
    a.signal(Signal::SIGTERM);
    assert_eq!(
        a.wait_exit(drain + Duration::from_secs(2)),
        Some(0),
        "{}",
        a.logs()
    );
    let took = stopped.elapsed();
    let lock = setup.lock("big").expect("a lock");
    assert_eq!(
        lock["released"],
        true,
        "the lock was left to expire: {lock}\n{}",
        a.logs()
    );
    assert!(
        lock["log_end"].as_u64().is_some(),
        "a release without a current snapshot names the log's end: {lock}"
    );
    assert!(
        took < drain + Duration::from_secs(1),
        "the stop took {took:?} with --drain-timeout {drain:?}"
    );

    // The next machine (a fast store) takes it over at once and has every
    // acknowledged write.
    let b = setup.machine("b00000000000r1", None, &[]);
    let client = cluster::FlyClient::new(&[&b]);
    let asked = Instant::now();
    let reply = client.increment(&b.id, "big").await.unwrap();
    eprintln!(
        "SIGTERM to exit: {took:?}; the next machine's first answer: {:?}",
        asked.elapsed()
    );
    assert_eq!(reply.status, 200, "{:?}\n{}", reply.json, b.logs());
    assert_eq!(
        reply.json["count"],
        last + 1,
        "an acknowledged write is missing"
    );
    assert!(
        !b.logs().contains("another end of the log"),
        "the released lock's log_end is where the next claim found the log to end: {lock}\n{}",
        b.logs()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the second machine waited {:?} (lease ttl 20 s): the release did not hand the tenant over",
        asked.elapsed()
    );
}
