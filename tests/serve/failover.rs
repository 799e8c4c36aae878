//! The holder dies, freezes or leaves under traffic: no acknowledged write
//! is lost, and a frozen ex-holder acknowledges nothing after it wakes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::cluster::{FlyClient, Setup, eventually};
use crate::routing::holder_of;

/// Acknowledged counts per client, in the order each client saw them.
pub(crate) type History = Arc<Mutex<BTreeMap<usize, Vec<u64>>>>;

/// What concurrent clients recorded: counts per client, the instants of
/// every success, the failures, and the client tasks.
pub(crate) type Traffic = (
    History,
    Arc<Mutex<Vec<Instant>>>,
    Arc<Mutex<Vec<String>>>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Runs `clients` loops of increments until `stop`; returns their history
/// and the instants of every success.
pub(crate) fn traffic(
    client: &FlyClient,
    clients: usize,
    ids: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    keyed: bool,
) -> Traffic {
    let history: History = Arc::default();
    let successes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = vec![];
    for c in 0..clients {
        let (client, ids, stop) = (client.clone(), ids.clone(), stop.clone());
        let (history, successes, failures) = (history.clone(), successes.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let first = ids[(c + i) % ids.len()].clone();
                let key = format!("client{c}-op{i}");
                // With a key a client may retry a request whose answer it
                // never saw, exactly like a careful real client.
                let attempts = if keyed { 5 } else { 1 };
                let mut outcome = Err(String::new());
                for _ in 0..attempts {
                    let headers: Vec<(&str, &str)> = if keyed {
                        vec![("idempotency-key", key.as_str())]
                    } else {
                        vec![]
                    };
                    outcome = client
                        .send(
                            &first,
                            reqwest::Method::POST,
                            "/customers/100/increment",
                            &headers,
                        )
                        .await;
                    match &outcome {
                        Ok(r) if r.status == 200 => break,
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                match outcome {
                    Ok(r) if r.status == 200 => {
                        history
                            .lock()
                            .unwrap()
                            .entry(c)
                            .or_default()
                            .push(r.json["count"].as_u64().unwrap());
                        successes.lock().unwrap().push(Instant::now());
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.json)),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    (history, successes, failures, tasks)
}

pub(crate) fn check_history(history: &History, final_count: i64) {
    let history = history.lock().unwrap();
    let mut all: Vec<u64> = history.values().flatten().copied().collect();
    let acked = all.len();
    for (client, counts) in history.iter() {
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "client {client}'s counts must strictly increase: {counts:?}"
        );
    }
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        acked,
        "two acknowledged increments returned the same count"
    );
    assert!(
        final_count as usize >= acked,
        "final count {final_count} < {acked} acknowledged increments: a write was lost"
    );
    assert!(
        all.last().is_none_or(|max| *max as i64 <= final_count),
        "an acknowledged count is above the final count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_holder_under_traffic_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let ttl = Duration::from_millis(1500);
    let mut a = setup.machine("a00000000000k1", Some("100"), &[]);
    let mut b = setup.machine("b00000000000k2", Some("100"), &[]);
    let holder = holder_of(&setup, "100").await;
    let client = FlyClient::new(&[&a, &b]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (history, successes, _failures, tasks) = traffic(
        &client,
        6,
        vec![a.id.clone(), b.id.clone()],
        stop.clone(),
        false,
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (victim, survivor) = if holder == a.id {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    victim.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    victim.wait_exit(Duration::from_secs(5));
    client.remove(&victim.id);

    let resumed = eventually(
        Duration::from_secs(15),
        "a success after the kill",
        async || {
            successes
                .lock()
                .unwrap()
                .iter()
                .copied()
                .find(|t| *t > killed_at + Duration::from_millis(50))
        },
    )
    .await;
    let gap = resumed - killed_at;
    assert!(
        gap <= ttl + Duration::from_secs(2),
        "takeover took {gap:?}, more than ttl + 2 s"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let lock = setup.lock("100").unwrap();
    assert_eq!(lock["holder"], survivor.id.as_str());
    drop((a, b));
    check_history(&history, setup.stored_count("100"));
    eprintln!("failover gap after SIGKILL: {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_acknowledges_nothing_after_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    paused_holder(Setup::file_store(dir.path())).await;
}

/// Fencing against a real S3 server: the paused ex-holder's late upload is
/// refused with 412 and the new holder's writes are intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_is_fenced_off_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    paused_holder(Setup::s3(dir.path()).await).await;
}

async fn paused_holder(setup: Setup) {
    let a = setup.machine("a00000000000p1", Some("100"), &[]);
    let b = setup.machine("b00000000000p2", Some("100"), &[]);
    let holder = holder_of(&setup, "100").await;
    let (paused, other) = if holder == a.id { (&a, &b) } else { (&b, &a) };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for _ in 0..5 {
        let r = http
            .post(paused.url("/customers/100/increment"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let epoch_before = setup.lock("100").unwrap()["epoch"].as_u64().unwrap();

    paused.signal(Signal::SIGSTOP);
    // Requests that reach the frozen holder wait in its socket backlog.
    let queued: Vec<_> = (0..5)
        .map(|_| {
            let http = http.clone();
            let url = paused.url("/customers/100/increment");
            tokio::spawn(async move {
                http.post(url)
                    .header("accept", "application/json")
                    .send()
                    .await
            })
        })
        .collect();

    // The other machine takes over once the lock has been unchanged for a ttl.
    let mut acked_by_new = Vec::new();
    eventually(
        Duration::from_secs(15),
        "the other machine to take over and serve",
        async || {
            let r = http
                .post(other.url("/customers/100/increment"))
                .header("accept", "application/json")
                .send()
                .await
                .ok()?;
            if r.status() != 200 {
                return None;
            }
            let body: serde_json::Value = r.json().await.ok()?;
            acked_by_new.push(body["count"].as_u64().unwrap());
            Some(())
        },
    )
    .await;
    for _ in 0..20 {
        let r = http
            .post(other.url("/customers/100/increment"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["machine_id"], other.id.as_str());
        assert!(body["epoch"].as_u64().unwrap() > epoch_before);
        acked_by_new.push(body["count"].as_u64().unwrap());
    }

    paused.signal(Signal::SIGCONT);
    for q in queued {
        let r = q.await.unwrap().expect("the woken machine answers");
        let status = r.status();
        let replay = r
            .headers()
            .get("fly-replay")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.text().await.unwrap();
        assert_ne!(
            status, 200,
            "the ex-holder acknowledged a write after waking: {body}"
        );
        if let Some(replay) = replay {
            assert!(
                replay.contains(&other.id),
                "woken machine must hand requests to the new holder: {replay}"
            );
        }
    }
    // Direct requests to the woken ex-holder are handed on, not served.
    for _ in 0..5 {
        let r = http
            .post(paused.url("/customers/100/increment"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 200, "the ex-holder served after waking");
    }
    let max_new = *acked_by_new.iter().max().unwrap();
    let stored = setup.stored_count("100") as u64;
    assert!(
        stored >= max_new,
        "a write acknowledged by the new holder was lost: stored {stored} < {max_new}"
    );
    assert_eq!(
        stored,
        5 + acked_by_new.len() as u64,
        "stored count = acknowledged writes (nothing else was acknowledged)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_holder_under_traffic_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut a = setup.machine("a00000000000t1", Some("100"), &[]);
    let mut b = setup.machine("b00000000000t2", Some("100"), &[]);
    let holder = holder_of(&setup, "100").await;
    let epoch_before = setup.lock("100").unwrap()["epoch"].as_u64().unwrap();
    let client = FlyClient::new(&[&a, &b]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (history, _successes, failures, tasks) = traffic(
        &client,
        6,
        vec![a.id.clone(), b.id.clone()],
        stop.clone(),
        true,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (leaving, staying) = if holder == a.id {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    leaving.signal(Signal::SIGTERM);
    let code = leaving.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "graceful shutdown exits 0:\n{}",
        leaving.logs()
    );
    client.remove(&leaving.id);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "requests failed during the handoff: {failures:?}\n--- leaving:\n{}\n--- staying:\n{}",
        leaving.logs(),
        staying.logs()
    );
    let lock = setup.lock("100").unwrap();
    assert_eq!(lock["holder"], staying.id.as_str());
    assert!(lock["epoch"].as_u64().unwrap() > epoch_before);
    // Shown only when the test fails.
    eprintln!(
        "--- leaving:\n{}\n--- staying:\n{}",
        leaving.logs(),
        staying.logs()
    );
    drop((a, b));
    let stored = setup.stored_count("100");
    check_history(&history, stored);
    let acked: usize = history.lock().unwrap().values().map(Vec::len).sum();
    assert_eq!(
        stored as usize, acked,
        "with idempotency keys every increment counts exactly once"
    );
}

/// A deploy may stop a machine that is still starting (checking the
/// store, claiming): the signal must reach the graceful shutdown, not kill
/// the process with the default action (CI found this: SIGINT during the
/// first claim left the process killed by the signal, exit code none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_the_machine_is_still_starting_is_a_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    // Every store request takes 300 ms, so the start's store check is
    // still running when the signal arrives.
    let mut a = setup.machine_starting(
        "a00000000000i2",
        Some("100"),
        &["--faults", r#"{"latency":"300ms"}"#],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.logs().contains("SQLite's heap is capped") {
        assert!(
            std::time::Instant::now() < deadline,
            "no start:\n{}",
            a.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !a.logs().contains("tenantd serving"),
        "the signal must arrive before the machine serves:\n{}",
        a.logs()
    );
    a.signal(Signal::SIGTERM);
    assert_eq!(
        a.wait_exit(Duration::from_secs(20)),
        Some(0),
        "a signal during the start exits 0 (not killed by the signal):\n{}",
        a.logs()
    );
    assert!(a.logs().contains("SIGTERM received"), "{}", a.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_releases_the_lock_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut a = setup.machine("a00000000000i1", Some("100"), &[]);
    holder_of(&setup, "100").await;
    let epoch = setup.lock("100").unwrap()["epoch"].clone();
    a.signal(Signal::SIGINT);
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
    let lock = setup.lock("100").unwrap();
    assert_eq!(lock["released"], true);
    assert_eq!(lock["epoch"], epoch, "release keeps the epoch");
    let local = dir.path().join("local").join(&a.id);
    let held_copies: Vec<_> = std::fs::read_dir(&local)
        .expect("the machine had a working copy folder")
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        held_copies.is_empty(),
        "the local copy is dropped with the lease: {held_copies:?}"
    );
}

/// A holder cut off from the store past its lease steps down without
/// releasing (it cannot write the lock). Once the store is back, the same
/// machine takes its own lock over at once instead of treating it as
/// another machine's and waiting out a ttl of observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_takes_its_own_lock_back_at_once_after_its_actor_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    setup.ttl = "4s".into();
    let m = setup.machine("a00000000000r1", Some("100"), &["--admin-token", "sesame"]);
    holder_of(&setup, "100").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let faults = |body: &'static str| {
        http.put(m.url("/_admin/faults"))
            .bearer_auth("sesame")
            .body(body)
            .send()
    };
    assert_eq!(
        http.post(m.url("/customers/100/increment"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    faults(r#"{"partitioned":true}"#).await.unwrap();
    let r = http
        .post(m.url("/customers/100/increment"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "nothing can be stored while cut off");
    eventually(
        Duration::from_secs(10),
        "the holder to step down",
        async || {
            let status = m.status();
            (status["tenants"][0]["role"] != "holder").then_some(())
        },
    )
    .await;
    faults("{}").await.unwrap();
    let healed = Instant::now();
    let body: serde_json::Value = eventually(
        Duration::from_secs(10),
        "service after healing",
        async || {
            let r = http
                .post(m.url("/customers/100/increment"))
                .header("accept", "application/json")
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())?;
            r.json().await.ok()
        },
    )
    .await;
    let waited = healed.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "served again only after {waited:?}: the machine waited out its own lock"
    );
    assert_eq!(body["count"], 2);
    assert_eq!(body["epoch"], 2, "retaken under a new epoch");
}
