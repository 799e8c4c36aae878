//! Pipelined uploads: up to four batches' log slots are uploaded at once.
//! With store latency jitter far above the gap between uploads, they land
//! out of order; batches must still be answered in slot order, and nothing
//! may be acknowledged that is not durable.

use crate::cluster::{FlyClient, Setup};
use crate::routing::holder_of;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_landing_out_of_order_are_answered_in_order_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let faults = r#"{"latency":"1ms","jitter":"30ms"}"#;
    let m = setup.machine("a0000000000007", Some("100"), &["--faults", faults]);
    holder_of(&setup, "100").await;

    let client = FlyClient::new(&[&m]);
    let (workers, each) = (32, 40);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, id) = (client.clone(), m.id.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts = Vec::new();
            for _ in 0..each {
                let reply = client.increment(&id, "100").await.expect("request");
                assert_eq!(reply.status, 200, "{:?}", reply.json);
                counts.push(reply.json["count"].as_u64().unwrap());
            }
            counts
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let counts = t.await.unwrap();
        assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
        all.extend(counts);
    }
    all.sort();
    all.dedup();
    let total = workers * each;
    assert_eq!(all.len(), total, "every acknowledged count is distinct");
    assert_eq!(*all.last().unwrap(), total as u64);

    let metrics = reqwest::get(m.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pipelined = |outcome: &str| -> f64 {
        let label = format!("tenantd_pipelined_uploads_total{{outcome=\"{outcome}\"}}");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(label.as_str()))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    assert!(pipelined("ok") > 0.0, "no upload was pipelined:\n{metrics}");
    assert_eq!(pipelined("failed"), 0.0, "{metrics}");
    drop(m);
    assert_eq!(setup.stored_count("100"), total as i64);
}

/// Transient store errors, including on uploads pipelined behind one not
/// yet landed (whose retry cannot tell at once whether the predecessor will
/// land), are resolved by reading back, never by stepping down: every
/// request is acknowledged, by the same holder in the same epoch, and
/// nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_on_pipelined_uploads_cost_no_step_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    // The faults hit the heartbeat too. At the suite's 1.5 s ttl a session
    // has 1 s to renew: two or three injected errors in a row, plus a
    // busy 2-core runner, ended it in CI (stop 31), which is a correct step
    // down but not what this test is about. At the production ttl of 5 s a
    // session survives ~3 s of failed renewals.
    setup.ttl = "5s".into();
    let faults = r#"{"latency":"1ms","jitter":"100ms","error_rate":0.1}"#;
    let m = setup.machine("a0000000000008", Some("100"), &["--faults", faults]);
    holder_of(&setup, "100").await;
    let epoch = setup.lock("100").unwrap()["epoch"].clone();

    let client = FlyClient::new(&[&m]);
    let (workers, each) = (16, 25);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, id) = (client.clone(), m.id.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let key = format!("w{w}-{i}");
                let reply = client
                    .send(
                        &id,
                        reqwest::Method::POST,
                        "/customers/100/increment",
                        &[("idempotency-key", key.as_str())],
                    )
                    .await
                    .expect("request");
                assert_eq!(reply.status, 200, "{:?}", reply.json);
                assert_eq!(reply.json["machine_id"], id.as_str());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let lock = setup.lock("100").unwrap();
    assert_eq!(lock["epoch"], epoch, "the holder stepped down: {lock}");
    drop(m);
    assert_eq!(setup.stored_count("100"), (workers * each) as i64);
}
