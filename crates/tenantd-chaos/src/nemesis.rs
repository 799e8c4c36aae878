//! Nemeses: faults scheduled from the seed and applied to a `tenantd dev`
//! cluster — SIGKILL or SIGSTOP of a holder, a partition from the store,
//! store latency and error bursts, scaling, graceful stop, restart — and the
//! faults of a real S3 or Tigris, on all of a customer's machines for a few
//! seconds: transient errors, lost responses, late-applied writes, SlowDown
//! bursts, a bandwidth cap. Store faults go through each machine's
//! `/_admin/faults` and are layered over the run's baseline faults
//! (`tenantd chaos --faults`), which healing restores.

use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::history::NemesisEvent;
use tenantd_dev::Cluster;

pub const KINDS: &[&str] = &[
    "kill_holder",
    "pause_holder",
    "partition_holder",
    "slow_store",
    "scale",
    "stop_holder",
    "restart_follower",
    "store_errors",
    "lost_responses",
    "late_writes",
    "slowdown_burst",
    "bandwidth_cap",
];

/// The store nemeses: fault settings (layered over the baseline) held on
/// every machine of the customer for a while, then healed.
pub const STORE_FAULTS: &[(&str, &str, Duration)] = &[
    // 5% transient errors (never reach the store).
    (
        "store_errors",
        r#"{"error_rate":0.05}"#,
        Duration::from_secs(3),
    ),
    // 2% of puts land but the answer is lost.
    (
        "lost_responses",
        r#"{"lost_response_rate":0.02}"#,
        Duration::from_secs(3),
    ),
    // 5% of puts are answered with an error and land up to 500 ms later.
    (
        "late_writes",
        r#"{"late_apply_rate":0.05,"late_apply_delay":"500ms"}"#,
        Duration::from_secs(3),
    ),
    // 503 SlowDown and 500 InternalError, each followed by 200 ms of the same.
    (
        "slowdown_burst",
        r#"{"slowdown_rate":0.05,"internal_error_rate":0.02,"error_burst":"200ms"}"#,
        Duration::from_secs(3),
    ),
    // Bodies at 1 MB/s (per request).
    (
        "bandwidth_cap",
        r#"{"bandwidth_bytes_per_sec":1000000}"#,
        Duration::from_secs(4),
    ),
];

/// `baseline` with the fields of `overlay` set over it (both JSON objects,
/// as `/_admin/faults` takes them).
pub fn layered(baseline: &str, overlay: &str) -> String {
    let mut merged = match serde_json::from_str::<serde_json::Value>(baseline) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(overlay) {
        merged.extend(fields);
    }
    serde_json::Value::Object(merged).to_string()
}

/// The schedule: (offset from start, kind, customer), from the seed alone.
/// Kinds come in shuffled rounds, each kind once per round, so that a run
/// long enough for one round (about 30 s) uses every nemesis.
pub fn schedule(
    rng: &mut StdRng,
    duration: Duration,
    customers: &[String],
    kinds: &[&'static str],
) -> Vec<(Duration, &'static str, String)> {
    let mut at = Duration::from_secs(2);
    let mut out = Vec::new();
    let mut round: Vec<&'static str> = Vec::new();
    while at + Duration::from_secs(4) < duration {
        if round.is_empty() {
            round = kinds.to_vec();
            round.shuffle(rng);
        }
        let kind = round.pop().expect("refilled above");
        let customer = customers[rng.random_range(0..customers.len())].clone();
        out.push((at, kind, customer));
        at += Duration::from_millis(rng.random_range(3000..6000));
    }
    out
}

async fn holder(cluster: &Cluster, customer: &str) -> Option<String> {
    cluster
        .statuses()
        .await
        .into_iter()
        .find(|s| s.machine.customer_id.as_deref() == Some(customer) && s.holder == Some(true))
        .map(|s| s.machine.id)
}

fn customer_machines(cluster: &Cluster, customer: &str) -> Vec<String> {
    cluster
        .machines()
        .into_iter()
        .filter(|m| m.customer_id.as_deref() == Some(customer))
        .map(|m| m.id)
        .collect()
}

async fn set_faults(http: &reqwest::Client, cluster: &Cluster, machine: &str, faults: &str) {
    if let Some(m) = cluster.machines().into_iter().find(|m| m.id == machine) {
        let reply = http
            .put(format!("http://{}/_admin/faults", m.address))
            .bearer_auth(cluster.admin_token())
            .body(faults.to_string())
            .send()
            .await;
        // A machine that is down (killed, paused, restarting) cannot take
        // it: the nemesis goes on with the others. A refused setting is a
        // bug of the nemesis, so say so.
        if let Ok(reply) = reply
            && !reply.status().is_success()
        {
            eprintln!(
                "chaos: machine {machine} refused faults {faults}: {} {}",
                reply.status(),
                reply.text().await.unwrap_or_default()
            );
        }
    }
}

/// Applies one nemesis and undoes it; returns what was done, or None when
/// there was nothing to act on (e.g. no holder at that moment). `baseline`
/// is the run's fault setting (JSON, `{}` for none): healing a store fault
/// restores it.
pub async fn apply(
    cluster: &Cluster,
    kind: &str,
    customer: &str,
    ttl: Duration,
    baseline: &str,
    t0: Instant,
) -> Option<NemesisEvent> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let start_ms = t0.elapsed().as_millis() as u64;
    let mut machine = None;
    match kind {
        "kill_holder" => {
            let id = holder(cluster, customer).await?;
            cluster.kill(&id).ok()?;
            machine = Some(id);
        }
        "pause_holder" => {
            let id = holder(cluster, customer).await?;
            cluster.pause(&id).ok()?;
            tokio::time::sleep(ttl * 2 + ttl / 2).await;
            let _ = cluster.resume(&id);
            machine = Some(id);
        }
        "partition_holder" => {
            let id = holder(cluster, customer).await?;
            let partitioned = layered(baseline, r#"{"partitioned":true}"#);
            set_faults(&http, cluster, &id, &partitioned).await;
            tokio::time::sleep(ttl * 2).await;
            set_faults(&http, cluster, &id, baseline).await;
            machine = Some(id);
        }
        "slow_store" => {
            let ids = customer_machines(cluster, customer);
            let slow = layered(
                baseline,
                r#"{"latency":"100ms","jitter":"100ms","error_rate":0.2,"lost_response_rate":0.1}"#,
            );
            for id in &ids {
                set_faults(&http, cluster, id, &slow).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            for id in &ids {
                set_faults(&http, cluster, id, baseline).await;
            }
        }
        kind if STORE_FAULTS.iter().any(|(k, _, _)| *k == kind) => {
            let (_, faults, hold) = STORE_FAULTS.iter().find(|(k, _, _)| *k == kind)?;
            let ids = customer_machines(cluster, customer);
            let faulty = layered(baseline, faults);
            for id in &ids {
                set_faults(&http, cluster, id, &faulty).await;
            }
            tokio::time::sleep(*hold).await;
            for id in &ids {
                set_faults(&http, cluster, id, baseline).await;
            }
        }
        "scale" => {
            let count = cluster
                .machines()
                .iter()
                .filter(|m| m.customer_id.as_deref() == Some(customer))
                .count();
            cluster.scale(Some(customer), count + 1).await.ok()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.scale(Some(customer), count).await.ok()?;
        }
        "stop_holder" => {
            let id = holder(cluster, customer).await?;
            cluster.stop(&id).ok()?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = cluster.start_machine(&id).await;
            machine = Some(id);
        }
        "restart_follower" => {
            let id = cluster
                .statuses()
                .await
                .into_iter()
                .find(|s| {
                    s.machine.customer_id.as_deref() == Some(customer) && s.holder == Some(false)
                })
                .map(|s| s.machine.id)?;
            cluster.kill(&id).ok()?;
            machine = Some(id);
        }
        _ => return None,
    }
    Some(NemesisEvent {
        kind: kind.to_string(),
        customer: Some(customer.to_string()),
        machine,
        start_ms,
        end_ms: t0.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn a_one_minute_schedule_uses_every_nemesis_and_replays_from_its_seed() {
        let customers = vec!["100".to_string(), "200".to_string()];
        for seed in 0..50 {
            let plan = schedule(
                &mut StdRng::seed_from_u64(seed),
                Duration::from_secs(60),
                &customers,
                KINDS,
            );
            for kind in KINDS {
                assert!(
                    plan.iter().any(|(_, k, _)| k == kind),
                    "seed {seed}: no {kind} in {plan:?}"
                );
            }
            let again = schedule(
                &mut StdRng::seed_from_u64(seed),
                Duration::from_secs(60),
                &customers,
                KINDS,
            );
            assert_eq!(plan, again);
        }
    }

    #[test]
    fn store_nemeses_are_valid_fault_settings_layered_over_the_baseline() {
        for (kind, faults, _) in STORE_FAULTS {
            assert!(KINDS.contains(kind), "{kind} is not in KINDS");
            let layered = layered(r#"{"latency":"20ms","error_rate":0.02}"#, faults);
            let config: tenantd_core::store::fault::FaultConfig =
                serde_json::from_str(&layered).unwrap_or_else(|e| panic!("{kind}: {layered}: {e}"));
            assert_eq!(config.latency, Duration::from_millis(20), "{kind}");
            assert_ne!(config, tenantd_core::store::fault::FaultConfig::default());
        }
        let errors = layered(r#"{"latency":"20ms","error_rate":0.02}"#, STORE_FAULTS[0].1);
        let config: tenantd_core::store::fault::FaultConfig =
            serde_json::from_str(&errors).unwrap();
        assert_eq!(config.error_rate, 0.05, "the nemesis' setting wins");
        assert_eq!(layered("{}", "{}"), "{}");
    }
}
