//! The file store's conditional writes are atomic across OS processes:
//! several real processes race to create one key, then to swap it from a
//! common ETag; exactly one wins each round.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tenantd_core::store::{ETag, FileStore, Metadata, ObjectStore, Precondition, StoreError};

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

/// Runs in a child process (started by the test below): makes one put
/// that stops the process (SIGSTOP) in its middle, and once continued
/// prints how it ended.
#[tokio::test]
#[ignore = "run only as a child of a_writer_stopped_inside_a_put_blocks_no_other_process"]
async fn child_stopped_writer() {
    let root = PathBuf::from(std::env::var("CHILD_ROOT").expect("child mode"));
    let key = std::env::var("CHILD_KEY").unwrap();
    let condition = match std::env::var("CHILD_ETAG") {
        Ok(etag) => Precondition::IfMatch(ETag(etag)),
        Err(_) => Precondition::IfAbsent,
    };
    let store = FileStore::new(&root).unwrap();
    store.stop_inside_next_put();
    match store
        .put(
            &key,
            "the stopped writer".into(),
            Metadata::new(),
            condition,
        )
        .await
    {
        Ok(_) => println!("RESULT WIN"),
        Err(StoreError::PreconditionFailed { .. }) => println!("RESULT LOSE"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Whether process `pid` is stopped (Linux: state `T` in /proc).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after) = stat.rsplit_once(") ")?;
            after.chars().next()
        })
        .is_some_and(|state| state == 'T')
}

/// Runs `f` on a thread and waits at most `limit` for it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A process stopped (SIGSTOP) in the middle of a put must not block
/// another process's requests on the same key: a paused machine would
/// otherwise hold up the takeover of its tenants until it resumes. Both
/// conditional forms: create-if-absent and replace-if-match.
#[test]
fn a_writer_stopped_inside_a_put_blocks_no_other_process() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let existing = "customer/7/machine.lock";
    let etag = runtime
        .block_on(store.put(
            existing,
            "v1".into(),
            Metadata::new(),
            Precondition::IfAbsent,
        ))
        .unwrap();
    for (key, etag) in [
        ("customer/7/log/00000000000000000005", None),
        (existing, Some(etag)),
    ] {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "child_stopped_writer",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CHILD_ROOT", dir.path())
        .env("CHILD_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(etag) = &etag {
            cmd.env("CHILD_ETAG", &etag.0);
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_stopped(pid) {
            assert!(Instant::now() < deadline, "the child never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }

        let (owned_store, owned_key) = (store.clone(), key.to_string());
        let condition = match &etag {
            Some(etag) => Precondition::IfMatch(etag.clone()),
            None => Precondition::IfAbsent,
        };
        let handle = runtime.handle().clone();
        let answer = within(Duration::from_secs(3), move || {
            handle.block_on(async {
                let read = owned_store.head(&owned_key).await;
                let write = owned_store
                    .put(
                        &owned_key,
                        "the live writer".into(),
                        Metadata::new(),
                        condition,
                    )
                    .await;
                (read, write)
            })
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (read, write) = answer.unwrap_or_else(|| {
            panic!("{key}: a request waited for the stopped writer (child: {text})")
        });
        read.unwrap();
        write.unwrap();
        assert!(out.status.success(), "child failed: {text}");
        assert!(text.contains("RESULT LOSE"), "{key}: {text}");
        let object = runtime.block_on(store.get(key)).unwrap().unwrap();
        assert_eq!(&object.body[..], b"the live writer", "{key}");
    }
}
