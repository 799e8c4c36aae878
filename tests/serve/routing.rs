//! Holder election, fly-replay routing and cross-tenant requests.

use std::time::Duration;

use crate::cluster::{FlyClient, Setup, eventually};

/// Waits until exactly one of `ids` holds `customer` per the lock object,
/// and returns it.
pub async fn holder_of(setup: &Setup, customer: &str) -> String {
    eventually(
        Duration::from_secs(15),
        "a holder in the lock",
        async || {
            let lock = setup.lock(customer)?;
            (lock["released"] == false).then(|| lock["holder"].as_str().unwrap().to_string())
        },
    )
    .await
}

async fn two_machines_share_one_tenant(setup: Setup) {
    let a = setup.machine("a0000000000001", Some("100"), &[]);
    let b = setup.machine("b0000000000002", Some("100"), &[]);
    let holder = holder_of(&setup, "100").await;
    let (holder_m, other_m) = if holder == a.id { (&a, &b) } else { (&b, &a) };

    // Exactly one holder, per each machine's own status (once the holder
    // has finished taking the tenant over: the lock names it first).
    let roles = |m: &crate::cluster::Machine| -> String {
        m.status()["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["customer_id"] == "100")
            .map(|t| t["role"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(10), "the holder to serve", async || {
        (roles(holder_m) == "holder").then_some(())
    })
    .await;
    assert_ne!(roles(other_m), "holder", "two machines say they hold it");
    // The other machine answers with fly-replay naming the holder.
    let direct = reqwest::Client::new()
        .post(other_m.url("/customers/100/increment"))
        .send()
        .await
        .unwrap();
    let replay = direct
        .headers()
        .get("fly-replay")
        .expect("non-holder must answer with fly-replay")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        replay.contains(&format!("instance={}", holder_m.id)),
        "{replay}"
    );

    // 1,000 increments sent alternately to both machines, 8 at a time.
    let client = FlyClient::new(&[&a, &b]);
    let ids = [a.id.clone(), b.id.clone()];
    let holder_id = holder_m.id.clone();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let client = client.clone();
        let ids = ids.clone();
        let holder_id = holder_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut counts = Vec::new();
            for i in 0..125 {
                let first = &ids[(worker + i) % 2];
                let reply = client.increment(first, "100").await.expect("request");
                assert_eq!(reply.status, 200, "{:?}", reply.json);
                assert_eq!(
                    reply.json["machine_id"],
                    holder_id.as_str(),
                    "served by the holder"
                );
                counts.push(reply.json["count"].as_u64().unwrap());
            }
            counts
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1000, "every acknowledged count is distinct");
    assert_eq!(*all.last().unwrap(), 1000);
    drop((a, b));
    assert_eq!(
        setup.stored_count("100"),
        1000,
        "the stored db.sqlite3, opened with SQLite, says 1000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_on_the_file_store_count_every_increment_once() {
    let dir = tempfile::tempdir().unwrap();
    two_machines_share_one_tenant(Setup::file_store(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_on_s3_count_every_increment_once() {
    let dir = tempfile::tempdir().unwrap();
    two_machines_share_one_tenant(Setup::s3(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_tenant_is_replayed_to_its_holder_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let a = setup.machine("a0000000000100", Some("100"), &[]);
    let b = setup.machine("b0000000000200", Some("200"), &[]);
    holder_of(&setup, "200").await;

    let http = reqwest::Client::new();
    let r = http.get(a.url("/customers/200")).send().await.unwrap();
    let replay = r
        .headers()
        .get("fly-replay")
        .expect("replay to 200's holder")
        .to_str()
        .unwrap();
    assert!(replay.contains(&format!("instance={}", b.id)), "{replay}");

    // Followed like Fly Proxy, it ends on 200's holder.
    let client = FlyClient::new(&[&a, &b]);
    let reply = client
        .send(&a.id, reqwest::Method::GET, "/customers/200", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json["machine_id"], b.id.as_str());

    // A tenant with no machine: 404, and nothing is created for it.
    let r = http
        .get(a.url("/customers/300"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("customer 300"),
        "{body}"
    );
    assert!(
        !dir.path().join("store/customer/300").exists(),
        "no object may be created for tenant 300"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_mode_proxies_to_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let a = setup.machine("a0000000000f01", Some("100"), &["--replay-mode", "forward"]);
    let b = setup.machine("b0000000000f02", Some("100"), &["--replay-mode", "forward"]);
    let holder = holder_of(&setup, "100").await;
    let other = if holder == a.id { &b } else { &a };
    let r = reqwest::Client::new()
        .post(other.url("/customers/100/increment"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("fly-replay").is_none());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["machine_id"], holder.as_str());
    assert_eq!(body["count"], 1);
}
