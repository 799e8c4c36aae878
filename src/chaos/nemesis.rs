//! Nemeses: faults scheduled from the seed and applied to a `tenantd dev`
//! cluster — SIGKILL or SIGSTOP of a holder, a partition from the store,
//! store latency and error bursts, scaling, graceful stop, restart.

use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::history::NemesisEvent;
use crate::dev::Cluster;

pub const KINDS: &[&str] = &[
    "kill_holder",
    "pause_holder",
    "partition_holder",
    "slow_store",
    "scale",
    "stop_holder",
    "restart_follower",
];

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

async fn set_faults(http: &reqwest::Client, cluster: &Cluster, machine: &str, faults: &str) {
    if let Some(m) = cluster.machines().into_iter().find(|m| m.id == machine) {
        let _ = http
            .put(format!("http://{}/_admin/faults", m.address))
            .bearer_auth(cluster.admin_token())
            .body(faults.to_string())
            .send()
            .await;
    }
}

/// Applies one nemesis and undoes it; returns what was done, or None when
/// there was nothing to act on (e.g. no holder at that moment).
pub async fn apply(
    cluster: &Cluster,
    kind: &str,
    customer: &str,
    ttl: Duration,
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
            set_faults(&http, cluster, &id, r#"{"partitioned":true}"#).await;
            tokio::time::sleep(ttl * 2).await;
            set_faults(&http, cluster, &id, "{}").await;
            machine = Some(id);
        }
        "slow_store" => {
            let ids: Vec<String> = cluster
                .machines()
                .into_iter()
                .filter(|m| m.customer_id.as_deref() == Some(customer))
                .map(|m| m.id)
                .collect();
            for id in &ids {
                set_faults(&http, cluster, id, r#"{"latency":"100ms","jitter":"100ms","error_rate":0.2,"lost_response_rate":0.1}"#).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            for id in &ids {
                set_faults(&http, cluster, id, "{}").await;
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
}
