//! Shared test support: a real S3 server (moto) for the tests of the S3
//! path. Uses `AWS_ENDPOINT_URL_S3` when set (scripts/test starts one moto
//! for the whole run); otherwise starts one `moto_server` per test process
//! from `target/moto-venv`, which scripts/test installs. Never skips: a
//! missing moto is a test failure that says how to fix it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tenantd_core::store::{DynStore, S3Store};

struct Moto {
    endpoint: String,
    _child: Option<ChildGuard>,
}

struct ChildGuard(Mutex<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let mut child = self.0.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

static MOTO: OnceLock<Moto> = OnceLock::new();
static CHILD_PID: OnceLock<u32> = OnceLock::new();

fn moto_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server")
}

extern "C" fn kill_moto_at_exit() {
    if let Some(pid) = CHILD_PID.get() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

unsafe extern "C" {
    fn atexit(f: extern "C" fn()) -> i32;
}

/// The endpoint of a running moto S3 server.
pub fn moto_endpoint() -> String {
    MOTO.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_S3")
            && !endpoint.is_empty()
        {
            return Moto {
                endpoint,
                _child: None,
            };
        }
        let (endpoint, child) = spawn_moto(&[]);
        let _ = CHILD_PID.set(child.0.lock().unwrap().id());
        // Statics are not dropped at exit: make sure moto does not outlive us.
        unsafe {
            atexit(kill_moto_at_exit);
        }
        Moto {
            endpoint,
            _child: Some(child),
        }
    })
    .endpoint
    .clone()
}

/// Starts a serialised moto (its conditional PUTs are not atomic on its
/// threaded server, see scripts/moto-s3-server.py) from target/moto-venv on
/// a free port; it is killed when the guard is dropped.
fn spawn_moto(env: &[(&str, &str)]) -> (String, ChildGuard) {
    let binary = moto_binary();
    assert!(
        binary.exists(),
        "moto is not installed at {}: run scripts/test (it installs moto into target/moto-venv)",
        binary.display()
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python = binary.with_file_name("python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/moto-s3-server.py");
    let child = Command::new(&python)
        .arg(&script)
        .args(["127.0.0.1", &port.to_string()])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let guard = ChildGuard(Mutex::new(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    (format!("http://127.0.0.1:{port}"), guard)
}

/// A moto of its own that checks credentials, as S3 and Tigris do (the
/// shared one accepts any): every request signed with an access key it
/// does not know is refused with 403. Stopped when dropped.
pub struct CheckingMoto {
    pub endpoint: String,
    _child: ChildGuard,
}

pub fn moto_checking_credentials() -> CheckingMoto {
    // moto enforces IAM authentication after this many requests.
    let (endpoint, child) = spawn_moto(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    CheckingMoto {
        endpoint,
        _child: child,
    }
}

/// Environment for a process (or this one) talking to moto.
pub fn s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL_S3".into(), moto_endpoint()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
    ]
}

fn set_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for (k, v) in s3_env() {
            // Set once, before any client is built in this process.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

/// A new, uniquely named, empty bucket on moto.
pub async fn fresh_bucket() -> String {
    set_env();
    let bucket = format!(
        "tenantd-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    client
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket on moto");
    bucket
}

/// An `S3Store` on a fresh bucket.
pub async fn s3_store() -> (DynStore, String) {
    let bucket = fresh_bucket().await;
    let store = S3Store::from_env(&bucket, "").await.expect("S3 store");
    (Arc::new(store), bucket)
}
