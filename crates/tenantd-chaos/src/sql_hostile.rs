//! A hostile client mixed into the SQL workload: it sends the attacks of
//! issue 20 (values of gigabytes, answers of escapes, queries that never
//! end, a trigger trap on a table of its own) to the same customers as the
//! transfers, so that they share batches with them. Every attack must be
//! refused (a 4xx naming the limit) and cost the transfers nothing: the
//! checker's invariants must hold as without it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::sql_workload::{Client, Reply};

/// What each attack is, and its SQL.
const ATTACKS: &[(&str, &str)] = &[
    ("huge_printf", "SELECT printf('%.*c', 999999999, 'x')"),
    (
        "huge_zeroblobs",
        "SELECT zeroblob(999999999), zeroblob(999999999), zeroblob(999999999)",
    ),
    (
        "escapes",
        "SELECT replace(hex(zeroblob(3000000)), '0', char(1))",
    ),
    (
        "runaway",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c",
    ),
    ("trigger_trap", "INSERT INTO chaos_hostile (b) VALUES (1)"),
];

/// The trap: an insert into `chaos_hostile` runs a join of a billion rows.
fn trap_body() -> serde_json::Value {
    json!({"statements": [
        {"sql": "CREATE TABLE IF NOT EXISTS chaos_hostile_big (x INTEGER)"},
        {"sql": "INSERT INTO chaos_hostile_big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) SELECT x FROM c WHERE (SELECT count(*) FROM chaos_hostile_big) = 0"},
        {"sql": "CREATE TABLE IF NOT EXISTS chaos_hostile (b)"},
        {"sql": "CREATE TRIGGER IF NOT EXISTS chaos_hostile_trap AFTER INSERT ON chaos_hostile BEGIN SELECT count(*) FROM chaos_hostile_big a, chaos_hostile_big b, chaos_hostile_big c; END"},
    ]})
}

/// What the hostile client saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostileReport {
    /// Per attack: answers by status (`unclear` when there was none).
    pub outcomes: BTreeMap<String, BTreeMap<String, usize>>,
    /// Attacks the service carried out (a 200): each a violation.
    pub answered: Vec<String>,
}

pub struct Hostile {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<HostileReport>,
}

impl Hostile {
    /// Sets the trap on every customer, then attacks them in turn, one
    /// request at a time with `pause` between.
    pub fn start(client: &Client, customers: &[String], pause: Duration) -> Hostile {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, customers, flag) = (client.clone(), customers.to_vec(), stop.clone());
        let task = tokio::spawn(async move {
            let mut report = HostileReport::default();
            for customer in &customers {
                // Best effort: without the table the trap is a plain 400.
                let _ = client.send(customer, &trap_body(), None).await;
            }
            let mut n = 0usize;
            while !flag.load(Ordering::Relaxed) && !customers.is_empty() {
                let (name, sql) = ATTACKS[n % ATTACKS.len()];
                let customer = &customers[(n / ATTACKS.len()) % customers.len()];
                n += 1;
                let body = json!({"statements": [{"sql": sql}]});
                let outcome = match client.send(customer, &body, None).await {
                    Reply::Ok { .. } => {
                        report
                            .answered
                            .push(format!("customer {customer}: {name} answered 200: {sql}"));
                        "200".to_string()
                    }
                    Reply::Refused { status, .. } => status.to_string(),
                    Reply::Unclear(_) => "unclear".to_string(),
                };
                *report
                    .outcomes
                    .entry(name.to_string())
                    .or_default()
                    .entry(outcome)
                    .or_default() += 1;
                tokio::time::sleep(pause).await;
            }
            report
        });
        Hostile { stop, task }
    }

    pub async fn stop(self) -> HostileReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}
