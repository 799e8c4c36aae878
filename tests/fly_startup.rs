//! `tenantd serve` as a Fly machine starts it: with Fly's environment
//! variables and what fly.toml / `fly storage create` set (issue 13, items 4
//! and 5). Real processes of the built binary on loopback sockets.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_tenantd");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tenantd serve` with none of the variables that choose a store or say
/// "this is Fly", whatever the test runner's environment has.
fn serve() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve");
    for key in [
        "BUCKET_NAME",
        "TENANTD_STORE",
        "FLY_APP_NAME",
        "FLY_MACHINE_ID",
        "FLY_PRIVATE_IP",
        "FLY_REGION",
        "TENANTD_LISTEN",
        "CUSTOMER_ID",
        "TENANTD_DRAIN_TIMEOUT",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn wait_healthy(url: &str) -> bool {
    for _ in 0..150 {
        if let Ok(r) = client().get(format!("{url}/healthz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn on_fly_without_a_bucket_serve_refuses_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for fly_var in ["FLY_APP_NAME", "FLY_MACHINE_ID"] {
        let out = serve()
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(dir.path().join("local"))
            .current_dir(dir.path())
            .env(fly_var, "my-tenantd")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{fly_var}: started: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{fly_var}: one line: {stderr}");
        assert!(
            lines[0].contains("BUCKET_NAME") && lines[0].contains("TENANTD_STORE"),
            "{fly_var}: {stderr}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "{fly_var}: a local store was created"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_fly_an_explicit_store_is_used_and_0_0_0_0_listens_on_ipv6_too() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = serve()
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .arg("--store")
        .arg(format!("file://{}", dir.path().join("store").display()))
        .arg("--data-dir")
        .arg(dir.path().join("local"))
        .env("FLY_APP_NAME", "my-tenantd")
        .env("FLY_MACHINE_ID", "148e21ea7d2298")
        .env("FLY_PRIVATE_IP", "::1")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let v4 = wait_healthy(&format!("http://127.0.0.1:{port}")).await;
    let v6 = wait_healthy(&format!("http://[::1]:{port}")).await;
    let status: Option<serde_json::Value> = match client()
        .get(format!("http://[::1]:{port}/_status"))
        .send()
        .await
    {
        Ok(r) => r.json().await.ok(),
        Err(_) => None,
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(v4, "not reachable over IPv4");
    assert!(v6, "not reachable over IPv6 (the 6PN network)");
    assert_eq!(status.unwrap()["machine_id"], "148e21ea7d2298");
}

/// A holder whose store stops answering cannot release its lease; it must
/// still exit within --drain-timeout (Fly kills it at kill_timeout anyway,
/// and a later exit only hides that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_drain_timeout_even_when_the_store_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut child = serve()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(format!("file://{}", dir.path().join("store").display()))
        .arg("--data-dir")
        .arg(dir.path().join("local"))
        .args(["--customer-id", "a", "--lease-ttl", "1s"])
        .args(["--drain-timeout", "3s", "--admin-token", "t"])
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(wait_healthy(&url).await);
    let http = client();
    let mut held = false;
    for _ in 0..100 {
        if let Ok(r) = http
            .post(format!("{url}/customers/a/increment"))
            .send()
            .await
            && r.status() == 200
        {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held, "never served");
    let r = http
        .put(format!("{url}/_admin/faults"))
        .bearer_auth("t")
        .json(&serde_json::json!({"latency": "60s"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let signalled = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = signalled.elapsed();
    let logs = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    // 3 s budget; the hung store would hold it for 60 s.
    assert!(took < Duration::from_secs(30), "took {took:?}: {logs}");
    assert!(status.success(), "{status:?}: {logs}");
    assert!(logs.contains("did not release within"), "{logs}");
}

#[test]
fn a_drain_timeout_too_short_for_the_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve()
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--store")
        .arg(format!("file://{}", dir.path().join("store").display()))
        .args(["--drain-timeout", "1s", "--lease-ttl", "5s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("TENANTD_DRAIN_TIMEOUT"), "{stderr}");
}
