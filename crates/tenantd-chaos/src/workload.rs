//! The workload: closed-loop clients sending increments with unique
//! `Idempotency-Key`s through the edge, recording every operation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::history::{Op, Outcome};

pub struct Workload {
    pub ops: Arc<Mutex<Vec<Op>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Workload {
    pub fn start(
        base: &str,
        customers: &[String],
        clients: usize,
        seed: u64,
        t0: Instant,
    ) -> Workload {
        let ops: Arc<Mutex<Vec<Op>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client");
        let tasks = (0..clients)
            .map(|client| {
                let (ops, stop, http) = (ops.clone(), stop.clone(), http.clone());
                let (base, customers) = (base.to_string(), customers.to_vec());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client as u64));
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let customer = customers[rng.random_range(0..customers.len())].clone();
                        let key = format!("s{seed}-c{client}-{n}");
                        let start_ms = t0.elapsed().as_millis() as u64;
                        let outcome = increment(&http, &base, &customer, &key).await;
                        let end_ms = t0.elapsed().as_millis() as u64;
                        ops.lock().unwrap().push(Op {
                            client,
                            customer,
                            key,
                            start_ms,
                            end_ms,
                            outcome,
                        });
                    }
                })
            })
            .collect();
        Workload { ops, tasks, stop }
    }

    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.ops.lock().unwrap().clone()
    }
}

async fn increment(http: &reqwest::Client, base: &str, customer: &str, key: &str) -> Outcome {
    let sent = http
        .post(format!("{base}/customers/{customer}/increment"))
        .header("accept", "application/json")
        .header("idempotency-key", key)
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Indeterminate {
                error: e.to_string(),
            };
        }
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match status {
        200 => match (body["count"].as_u64(), body["epoch"].as_u64()) {
            (Some(count), Some(epoch)) => Outcome::Ok {
                count,
                epoch,
                machine: body["machine_id"].as_str().unwrap_or_default().to_string(),
            },
            _ => Outcome::Indeterminate {
                error: format!("200 without a count: {body}"),
            },
        },
        400..=499 => Outcome::Failed {
            status,
            error: body.to_string(),
        },
        _ => Outcome::Indeterminate {
            error: format!("{status} {body}"),
        },
    }
}
