//! A closed-loop load generator: `clients` tasks, each sending increments
//! one after the other for a fixed time, following `fly-replay` to the named
//! machine like Fly Proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Latencies of successful requests, and the instants they completed.
#[derive(Default)]
pub struct Samples {
    pub latencies: Vec<Duration>,
    pub completed_at: Vec<Instant>,
    pub errors: usize,
}

impl Samples {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()
        .expect("http client")
}

/// One increment through `machines` (id → address), starting at `first`.
pub async fn increment(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
) -> bool {
    let path = format!("/customers/{customer}/increment");
    match send(http, machines, first, reqwest::Method::POST, &path).await {
        Some(reply) => reply.status().is_success(),
        None => false,
    }
}

/// The tenant's count, read from its holder.
pub async fn read_count(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    customer: &str,
) -> anyhow::Result<u64> {
    let path = format!("/customers/{customer}/count");
    let reply = send(http, machines, first, reqwest::Method::GET, &path)
        .await
        .ok_or_else(|| anyhow::anyhow!("no machine answered GET {path}"))?;
    let body: serde_json::Value = reply.json().await?;
    body["count"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("GET {path} answered without a count: {body}"))
}

/// Sends one request like Fly Proxy would: to `first`, then wherever
/// `fly-replay` says, skipping machines that do not answer.
async fn send(
    http: &reqwest::Client,
    machines: &HashMap<String, SocketAddr>,
    first: &str,
    method: reqwest::Method,
    path: &str,
) -> Option<reqwest::Response> {
    let mut target = first.to_string();
    let other = |id: &str| machines.keys().find(|other| *other != id).cloned();
    for _ in 0..4 {
        let addr = machines.get(&target)?;
        let Ok(reply) = http
            .request(method.clone(), format!("http://{addr}{path}"))
            .header("accept", "application/json")
            .send()
            .await
        else {
            target = other(&target)?;
            continue;
        };
        let Some(replay) = reply.headers().get("fly-replay") else {
            return Some(reply);
        };
        target = match replay.to_str().ok().and_then(crate::replay::parse_replay) {
            Some(crate::replay::Target::Instance(id)) => id,
            _ => other(&target)?,
        };
    }
    None
}

/// Runs `clients` closed loops against `machines` for `duration`.
pub async fn run(
    machines: HashMap<String, SocketAddr>,
    customer: &str,
    clients: usize,
    duration: Duration,
) -> Samples {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let machines = Arc::new(machines);
    let ids: Vec<String> = machines.keys().cloned().collect();
    let deadline = Instant::now() + duration;
    let http = client();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (samples, machines, http) = (samples.clone(), machines.clone(), http.clone());
            let first = ids[c % ids.len()].clone();
            let customer = customer.to_string();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let ok = increment(&http, &machines, &first, &customer).await;
                    let mut s = samples.lock().unwrap();
                    if ok {
                        s.latencies.push(started.elapsed());
                        s.completed_at.push(Instant::now());
                    } else {
                        s.errors += 1;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    Arc::try_unwrap(samples)
        .ok()
        .expect("all clients done")
        .into_inner()
        .unwrap()
}
