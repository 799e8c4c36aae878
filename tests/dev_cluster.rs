//! `tenantd dev` end to end: real `tenantd serve` machines as child
//! processes, the edge proxy, the internal DNS server and the admin API, as
//! the library ([`Cluster`]) and as the `tenantd dev` command.
//!
//! Every test runs its cluster on its own random 127.x.y.0/24 range and in
//! its own temporary folder, so tests may run in parallel. Machine output is
//! printed through `println!`, so the harness shows it for a failed test.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tenantd_core::fly_dns::FlyDns;
use tenantd_dev::{Cluster, DevConfig, MachineState, MachineStatus};

const BIN: &str = env!("CARGO_BIN_EXE_tenantd");

fn config(dir: &Path, customers: &[&str], per_customer: usize) -> DevConfig {
    let mut cfg = DevConfig::new(BIN, dir);
    cfg.customers = customers.iter().map(|c| c.to_string()).collect();
    cfg.machines_per_customer = per_customer;
    cfg.lease_ttl = Duration::from_millis(1500);
    cfg.restart_delay = Some(Duration::from_secs(1));
    cfg.ip_base = random_ip_base();
    cfg.extra_env = vec![("RUST_LOG".into(), "info".into())];
    cfg
}

/// 127.a.b.2 with random a, b: parallel tests (and other checkouts on the
/// same machine) do not share addresses.
fn random_ip_base() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(
        127,
        rand::random_range(1..=250),
        rand::random_range(0..=250),
        2,
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// One increment through `base`; the count on success.
async fn increment(
    http: &reqwest::Client,
    base: &str,
    customer: &str,
    key: Option<&str>,
) -> Result<(u64, reqwest::header::HeaderMap), String> {
    let mut req = http
        .post(format!("{base}/customers/{customer}/increment"))
        .header("accept", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    let json: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let count = json["count"]
        .as_u64()
        .ok_or(format!("no count in {body}"))?;
    Ok((count, headers))
}

async fn count(http: &reqwest::Client, base: &str, customer: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match http
            .get(format!("{base}/customers/{customer}/count"))
            .header("accept", "application/json")
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let json: Value = r.json().await.unwrap();
                return json["count"].as_u64().expect("count is a number");
            }
            Ok(r) => format!("{}", r.status()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "count of {customer} unavailable: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writers that retry each increment with its own Idempotency-Key until it
/// is acknowledged, so that every logical increment counts exactly once.
struct Traffic {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>,
}

impl Traffic {
    fn start(base: String, customer: &str, workers: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|w| {
                let (stop, acked, base) = (stop.clone(), acked.clone(), base.clone());
                let customer = customer.to_string();
                tokio::spawn(async move {
                    let http = client();
                    let mut counts = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{n}-{}", uuid::Uuid::new_v4());
                        n += 1;
                        let deadline = Instant::now() + Duration::from_secs(30);
                        loop {
                            match increment(&http, &base, &customer, Some(&key)).await {
                                Ok((c, _)) => {
                                    counts.push(c);
                                    acked.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Err(e) => {
                                    assert!(
                                        Instant::now() < deadline,
                                        "increment never acknowledged: {e}"
                                    );
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                    counts
                })
            })
            .collect();
        Traffic { stop, acked, tasks }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn wait_acked(&self, more_than: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked() <= more_than {
            assert!(
                Instant::now() < deadline,
                "traffic stalled at {} acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writers; every acknowledged count, sorted.
    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("writer panicked"));
        }
        all.sort();
        all
    }
}

/// No acknowledged write lost: the final count equals the number of
/// acknowledged increments, each of which got its own count.
fn assert_no_lost_writes(acked: &[u64], final_count: u64) {
    let distinct: BTreeSet<u64> = acked.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        acked.len(),
        "two increments acknowledged with the same count"
    );
    assert_eq!(
        final_count,
        acked.len() as u64,
        "final count {final_count} != {} acknowledged increments",
        acked.len()
    );
    assert_eq!(
        distinct,
        (1..=final_count).collect(),
        "acknowledged counts are not 1..=final"
    );
}

async fn holder_of(cluster: &Cluster, customer: &str) -> MachineStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let statuses = cluster.statuses().await;
        let holders: Vec<&MachineStatus> = statuses
            .iter()
            .filter(|m| {
                m.machine.customer_id.as_deref() == Some(customer) && m.holder == Some(true)
            })
            .collect();
        if holders.len() == 1 {
            return holders[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no single holder of {customer}: {statuses:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_500_requests_per_customer_all_count() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(config(dir.path(), &["100", "200"], 2))
        .await
        .unwrap();
    assert_eq!(cluster.machines().len(), 4);
    let base = cluster.edge_url();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for customer in ["100", "200"] {
        for worker in 0..8 {
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let http = client();
                let mut counts = Vec::new();
                let mut hops = 0u64;
                // 500 per customer over 8 workers: 63 for the first 4, 62 after.
                let n = 500 / 8 + usize::from(worker < 500 % 8);
                for _ in 0..n {
                    let resp = http
                        .get(format!("{base}/customers/{customer}"))
                        .header("accept", "application/json")
                        .send()
                        .await
                        .expect("edge answers");
                    assert!(
                        resp.status().is_success(),
                        "request failed: {}",
                        resp.status()
                    );
                    hops += resp.headers()["x-tenantd-edge-hops"]
                        .to_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap();
                    let json: Value = resp.json().await.unwrap();
                    assert_eq!(json["customer_id"], customer);
                    counts.push(json["count"].as_u64().unwrap());
                }
                (customer, counts, hops)
            }));
        }
    }
    let mut per_customer: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let mut hops = 0;
    for t in tasks {
        let (customer, counts, h) = t.await.unwrap();
        per_customer.entry(customer).or_default().extend(counts);
        hops += h;
    }
    let elapsed = started.elapsed();
    for (customer, mut counts) in per_customer {
        counts.sort();
        assert_eq!(
            counts,
            (1..=500).collect::<Vec<u64>>(),
            "customer {customer}"
        );
        assert_eq!(
            count(&client(), &base, customer).await,
            500,
            "customer {customer}"
        );
    }
    println!(
        "FIGURE: 1000 durable increments through the edge in {elapsed:?} ({:.0}/s), {hops} replays; edge stats {:?}",
        1000.0 / elapsed.as_secs_f64(),
        cluster.edge_stats()
    );
    // The edge load-balances over all 4 machines, so about 3 in 4 requests
    // land on a non-holder and are replayed.
    assert!(
        hops > 100,
        "requests were not spread over the machines ({hops} replays)"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_dns_metadata_and_ptr_give_every_machine_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["100", "200"], 2);
    cfg.pool_machines = 1;
    let cluster = Cluster::start(cfg).await.unwrap();
    let dns = FlyDns::new(cluster.app_name(), Some(cluster.dns_addr()));
    let machines = cluster.machines();
    assert_eq!(machines.len(), 5);
    for m in &machines {
        let ip: std::net::IpAddr = m.private_ip.parse().unwrap();
        assert_eq!(
            dns.machine_id_of(ip).await.unwrap().as_deref(),
            Some(m.id.as_str()),
            "PTR round trip of {}",
            m.private_ip
        );
        if let Some(customer) = &m.customer_id {
            let ids = dns
                .machines_with_metadata("customer_id", customer)
                .await
                .unwrap();
            assert!(ids.contains(&m.id), "{ids:?} lacks {}", m.id);
            let expected: BTreeSet<String> = machines
                .iter()
                .filter(|o| o.customer_id == m.customer_id)
                .map(|o| o.id.clone())
                .collect();
            assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), expected);
        }
    }
    // The TXT fallback lists every machine with its address.
    let instances = dns.instances().await.unwrap();
    assert_eq!(instances.len(), 5);
    for m in &machines {
        let i = instances.iter().find(|i| i.id == m.id).expect("listed");
        assert_eq!(i.ip.to_string(), m.private_ip);
        assert_eq!(i.app, cluster.app_name());
    }
    assert!(
        dns.machines_with_metadata("customer_id", "999")
            .await
            .unwrap()
            .is_empty()
    );

    // A stopped machine leaves DNS, like on Fly.
    let gone = machines
        .iter()
        .find(|m| m.customer_id.as_deref() == Some("100"))
        .unwrap();
    cluster.stop(&gone.id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fresh = FlyDns::new(cluster.app_name(), Some(cluster.dns_addr()));
        let ids = fresh
            .machines_with_metadata("customer_id", "100")
            .await
            .unwrap();
        if !ids.contains(&gone.id) {
            assert_eq!(ids.len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "stopped machine still in DNS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cross_tenant_request_ends_on_the_other_tenants_holder() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(config(dir.path(), &["100", "200"], 2))
        .await
        .unwrap();
    let http = client();
    let base = cluster.edge_url();
    increment(&http, &base, "200", None).await.unwrap();
    let holder = holder_of(&cluster, "200").await;
    let of_100 = cluster
        .machines()
        .into_iter()
        .find(|m| m.customer_id.as_deref() == Some("100"))
        .unwrap();

    // Straight to a machine of 100: it names 200's holder.
    let resp = http
        .get(format!("http://{}/customers/200/count", of_100.address))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let replay = resp.headers().get("fly-replay").expect("fly-replay answer");
    let replay = tenantd_dev::edge::parse_fly_replay(replay.to_str().unwrap());
    assert_eq!(
        replay.instance.as_deref(),
        Some(holder.machine.id.as_str()),
        "machine {} of 100 should replay to 200's holder",
        of_100.id
    );

    // The same through the edge, forced onto the machine of 100 first: the
    // request ends on 200's holder and counts there.
    let before = count(&http, &base, "200").await;
    let resp = http
        .post(format!("{base}/customers/200/increment"))
        .header("accept", "application/json")
        .header("fly-force-instance-id", &of_100.id)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(resp.headers()["fly-machine-id"], holder.machine.id.as_str());
    assert_eq!(resp.headers()["x-tenantd-edge-hops"], "1");
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["count"].as_u64().unwrap(), before + 1);
    assert_eq!(json["machine_id"], holder.machine.id.as_str());

    // With every machine of 200 stopped (locks released, nothing in DNS),
    // a request for 200 on a machine of 100 goes to the last holder, and the
    // edge auto-starts it.
    for m in cluster.machines() {
        if m.customer_id.as_deref() == Some("200") {
            cluster.stop(&m.id).unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster
        .machines()
        .iter()
        .any(|m| m.customer_id.as_deref() == Some("200") && m.state != MachineState::Stopped)
    {
        assert!(Instant::now() < deadline, "machines of 200 did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = http
        .post(format!("{base}/customers/200/increment"))
        .header("accept", "application/json")
        .header("fly-force-instance-id", &of_100.id)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{}: {}",
        resp.status(),
        resp.text().await.unwrap()
    );
    let json: Value = resp.json().await.unwrap();
    assert_eq!(
        json["count"].as_u64().unwrap(),
        before + 2,
        "no write lost over stop/start"
    );
    let restarted = cluster.machines();
    let serving = restarted
        .iter()
        .find(|m| m.id == json["machine_id"].as_str().unwrap())
        .unwrap();
    assert_eq!(serving.customer_id.as_deref(), Some("200"));
    assert_eq!(serving.state, MachineState::Started, "auto-started");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_kill_holder_takeover_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["100"], 2);
    cfg.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    // Wide enough that polling `ls` sees the machine while it waits.
    cfg.restart_delay = Some(Duration::from_secs(2));
    let cluster = Cluster::start(cfg).await.unwrap();
    let admin = tenantd_dev::admin::Client::new(&cluster.admin_url().unwrap());
    let traffic = Traffic::start(cluster.edge_url(), "100", 4);
    traffic.wait_acked(50, Duration::from_secs(30)).await;
    let holder = holder_of(&cluster, "100").await;
    let victim = holder.machine.id.clone();

    let at_kill = traffic.acked();
    let killed_at = Instant::now();
    admin.action(&victim, "kill").await.unwrap();
    // `ls` shows it restarting.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ls = admin.machines().await.unwrap();
        let m = ls
            .iter()
            .find(|m| m.machine.id == victim)
            .expect("still listed");
        if m.machine.state == MachineState::Restarting {
            assert_eq!(m.holder, Some(false));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed machine never shown restarting: {ls:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Traffic resumes: writes are acknowledged again after the kill.
    traffic
        .wait_acked(at_kill + 20, Duration::from_secs(30))
        .await;
    let resumed = killed_at.elapsed();
    // The killed machine comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = admin.machines().await.unwrap();
        let m = ls.iter().find(|m| m.machine.id == victim).unwrap();
        if m.machine.state == MachineState::Started && m.machine.restarts == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed machine did not come back: {ls:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_holder = holder_of(&cluster, "100").await;
    assert!(
        new_holder.epoch > holder.epoch,
        "{new_holder:?} vs {holder:?}"
    );
    let acked = traffic.finish().await;
    let final_count = count(&client(), &cluster.edge_url(), "100").await;
    assert_no_lost_writes(&acked, final_count);
    println!(
        "FIGURE: holder {victim} SIGKILLed; 20 more writes acknowledged {resumed:?} later (lease ttl 1.5 s); {} writes, none lost",
        acked.len()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_pool_mode_serves_any_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[], 0);
    cfg.pool_machines = 2;
    cfg.tenants = vec!["300".into(), "301".into()];
    let cluster = Cluster::start(cfg).await.unwrap();
    let http = client();
    let base = cluster.edge_url();
    for customer in ["300", "301"] {
        for i in 1..=30 {
            let (c, _) = increment(&http, &base, customer, None).await.unwrap();
            assert_eq!(c, i);
        }
    }
    assert!(
        cluster
            .statuses()
            .await
            .iter()
            .all(|m| m.machine.customer_id.is_none())
    );
    cluster.shutdown().await;
}

/// The `tenantd dev` process, killed on drop; its output goes to a file that
/// is printed if the test fails.
struct DevProcess {
    child: Child,
    log: std::path::PathBuf,
    admin: String,
    edge: String,
}

impl DevProcess {
    fn start(dir: &Path, args: &[&str]) -> DevProcess {
        let edge = free_addr();
        let admin = free_addr();
        let log = dir.join("dev.log");
        let out = std::fs::File::create(&log).unwrap();
        let ip_base = random_ip_base().to_string();
        let child = Command::new(BIN)
            .arg("dev")
            .args(["--edge", &edge.to_string(), "--admin", &admin.to_string()])
            .args(["--data-dir", &dir.join("data").display().to_string()])
            .args([
                "--lease-ttl",
                "1500ms",
                "--restart-delay",
                "1s",
                "--ip-base",
                &ip_base,
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        DevProcess {
            child,
            log,
            admin: format!("http://{admin}"),
            edge: format!("http://{edge}"),
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("dev")
            .args(args)
            .args(["--admin", &self.admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tenantd dev {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ls(&self) -> Vec<MachineStatus> {
        serde_json::from_str(&self.cli(&["ls", "--json"])).unwrap()
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            println!(
                "--- tenantd dev output ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Running (a zombie waiting for a reaper counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_command_scale_under_traffic_loses_nothing_and_ctrl_c_stops_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = DevProcess::start(
        dir.path(),
        &["--customers", "100", "--machines-per-customer", "2"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(BIN)
            .args(["dev", "ls", "--json", "--admin", &dev.admin])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok
            && dev
                .ls()
                .iter()
                .filter(|m| m.machine.state == MachineState::Started)
                .count()
                == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "tenantd dev did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let banner = std::fs::read_to_string(&dev.log).unwrap();
    assert!(
        banner.contains(&format!("curl {}/customers/100", dev.edge)),
        "{banner}"
    );

    let per_customer = |ls: &[MachineStatus]| {
        ls.iter()
            .filter(|m| m.machine.customer_id.as_deref() == Some("100"))
            .count()
    };
    let traffic = Traffic::start(dev.edge.clone(), "100", 4);
    traffic.wait_acked(30, Duration::from_secs(30)).await;

    let table = dev.cli(&["scale", "100", "3"]);
    assert!(table.contains("CUSTOMER"), "{table}");
    let ls = dev.ls();
    assert_eq!(per_customer(&ls), 3, "{ls:#?}");
    assert!(ls.iter().all(|m| m.machine.state == MachineState::Started));
    let at = traffic.acked();
    traffic.wait_acked(at + 30, Duration::from_secs(30)).await;

    dev.cli(&["scale", "100", "1"]);
    let ls = dev.ls();
    assert_eq!(per_customer(&ls), 1, "{ls:#?}");
    let at = traffic.acked();
    traffic.wait_acked(at + 30, Duration::from_secs(30)).await;
    let acked = traffic.finish().await;
    let final_count = count(&client(), &dev.edge, "100").await;
    assert_no_lost_writes(&acked, final_count);
    println!(
        "FIGURE: scale 2 → 3 → 1 under 4 writers: {} writes acknowledged, none lost",
        acked.len()
    );

    // Ctrl-C: every machine gets SIGTERM, releases its lock, and exits; so
    // does `tenantd dev`, with status 0.
    let pids: Vec<u32> = dev.ls().iter().filter_map(|m| m.machine.pid).collect();
    assert!(!pids.is_empty());
    kill(Pid::from_raw(dev.child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tenantd dev did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "tenantd dev exited with {status}");
    for pid in pids {
        assert!(!alive(pid), "machine process {pid} survived tenantd dev");
    }
    let lock: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("data/store/customer/100/machine.lock")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        lock["released"], true,
        "lock not released on Ctrl-C: {lock}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sigkilled_parent_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = DevProcess::start(
        dir.path(),
        &["--customers", "100", "--machines-per-customer", "2"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids = loop {
        if let Ok(out) = Command::new(BIN)
            .args(["dev", "ls", "--json", "--admin", &dev.admin])
            .output()
            && out.status.success()
        {
            let ls: Vec<MachineStatus> = serde_json::from_slice(&out.stdout).unwrap();
            let pids: Vec<u32> = ls.iter().filter_map(|m| m.machine.pid).collect();
            if pids.len() == 2 {
                break pids;
            }
        }
        assert!(Instant::now() < deadline, "tenantd dev did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "machines outlived a SIGKILLed tenantd dev"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tenantd dev` gives its machines an API token, and `tenantd sql`
/// through the edge reaches the tenant's holder with it: a script on
/// stdin in one request, then a statement with parameters, as a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_machines_serve_sql_through_the_edge_with_tenantd_sql() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(config(dir.path(), &["300"], 2))
        .await
        .unwrap();
    holder_of(&cluster, "300").await;
    let edge = cluster.edge_url();
    let sql = |args: &[&str], stdin: &str, token: &str| {
        let mut child = Command::new(BIN)
            .args(["sql", "--url", &edge, "--customer-id", "300"])
            .args(args)
            .env("TENANTD_API_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let token = cluster.api_token().to_string();
    let script = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);\n\
                  INSERT INTO notes(body) VALUES ('first; with a semicolon');\n";
    let (ok, out, err) = tokio::task::block_in_place(|| sql(&[], script, &token));
    assert!(ok, "{out}{err}");
    assert!(out.contains("last insert rowid: 1"), "{out}");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        sql(
            &["SELECT id, body FROM notes WHERE id >= ?", "1"],
            "",
            &token,
        )
    });
    assert!(ok, "{out}{err}");
    assert_eq!(
        out,
        "id | body\n---+------------------------\n1  | first; with a semicolon\n(1 row)\n"
    );
    let (ok, _, err) = tokio::task::block_in_place(|| sql(&["SELECT 1"], "", "not-the-token"));
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    cluster.shutdown().await;
}
