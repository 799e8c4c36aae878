//! The file store's conditional writes are atomic across OS processes:
//! several real processes race to create one key, then to swap it from a
//! common ETag; exactly one wins each round.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tenantd::store::{ETag, FileStore, Metadata, ObjectStore, Precondition, StoreError};

const PROCESSES: usize = 6;
const ROUNDS: usize = 5;

/// Runs in a child process (started by the test below): waits for the go
/// signal, makes one conditional put, prints WIN or LOSE.
#[tokio::test]
#[ignore = "run only as a child of file_store_races_across_processes"]
async fn child_contender() {
    let root = PathBuf::from(std::env::var("CHILD_ROOT").expect("child mode"));
    let key = std::env::var("CHILD_KEY").unwrap();
    let condition = match std::env::var("CHILD_ETAG") {
        Ok(etag) => Precondition::IfMatch(ETag(etag)),
        Err(_) => Precondition::IfAbsent,
    };
    let store = FileStore::new(&root).unwrap();
    let go = root.join("go");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !go.exists() {
        assert!(Instant::now() < deadline, "no go signal");
        std::thread::sleep(Duration::from_millis(1));
    }
    let body = format!("written by pid {}", std::process::id());
    match store
        .put(&key, body.into(), Metadata::new(), condition)
        .await
    {
        Ok(_) => println!("RESULT WIN"),
        Err(StoreError::PreconditionFailed { .. }) => println!("RESULT LOSE"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn race(root: &std::path::Path, key: &str, etag: Option<&ETag>) -> usize {
    let _ = std::fs::remove_file(root.join("go"));
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--exact",
                "child_contender",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("CHILD_ROOT", root)
            .env("CHILD_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
            if let Some(etag) = etag {
                cmd.env("CHILD_ETAG", &etag.0);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(root.join("go"), b"go").unwrap();
    let mut winners = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {text}");
        if text.contains("RESULT WIN") {
            winners += 1;
        } else {
            assert!(text.contains("RESULT LOSE"), "child said neither: {text}");
        }
    }
    winners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_races_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    for round in 0..ROUNDS {
        let key = format!("customer/{round}/machine.lock");
        assert_eq!(race(dir.path(), &key, None), 1, "round {round}: create");
        let etag = store.head(&key).await.unwrap().unwrap().etag;
        assert_eq!(
            race(dir.path(), &key, Some(&etag)),
            1,
            "round {round}: swap"
        );
        assert_ne!(store.head(&key).await.unwrap().unwrap().etag, etag);
    }
}
