//! The machines of the dev cluster: real child processes of `tenantd serve`,
//! each with a Fly-like identity (14-hex id, its own loopback address, the
//! env Fly sets, `customer_id` metadata), and their lifecycle:
//! `starting → started ⇄ paused`, `stopping → stopped`, and after a crash
//! `restarting` (Fly's restart policy, after `restart_delay`).
//!
//! Invariants:
//! - Every machine is in the table from creation until its process has been
//!   reaped after `destroy`; its `pid` is set only while the process runs
//!   (so a signal never reaches a reused pid of a reaped child).
//! - A child dies with the supervisor: `kill_on_drop`, and `PR_SET_PDEATHSIG`
//!   so that even a SIGKILLed `tenantd dev` leaves no orphans. Children run in
//!   their own process group, so a terminal's Ctrl-C reaches only the parent,
//!   which then stops them in order (SIGTERM, so they release their locks).
//!   The death signal follows the *thread* that spawned the child: children
//!   are spawned from runtime worker threads or the thread driving the
//!   runtime, which live as long as the cluster (no `spawn_blocking` here).
//! - `generation` increases with every start; exit and restart handlers act
//!   only on the generation they were started for.
//!
//! This file owns the machine table and the Machines API model over it
//! (states, `create`, `scale`, listing); [`process`] owns the child
//! processes and their signals, [`autostop`] what the edge needs (pick,
//! autostart, request counts, autostop).

mod autostop;
mod process;

pub use autostop::ActiveGuard;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::DevConfig;
use super::dns::{DnsMachine, DnsTable, mapped};
use super::logs::Logs;

/// A machine's state, as `fly machine list` shows it (plus `paused` and
/// `restarting`, which Fly folds into others).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Process spawned, `/healthz` not answered yet.
    Starting,
    /// Answers `/healthz`; in DNS and the edge's load balancing.
    Started,
    /// SIGSTOPped: in DNS (Fly would still list it), not load balanced.
    Paused,
    /// SIGTERM sent; waiting for the process to exit.
    Stopping,
    /// No process; the edge starts it on demand.
    Stopped,
    /// Crashed or killed; comes back after the restart delay.
    Restarting,
    /// SIGTERM sent for good; leaves the table once the process exited.
    Destroying,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Desired {
    Running,
    Stopped,
    Destroyed,
}

/// What a machine looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub id: String,
    /// `None` for pool machines.
    pub customer_id: Option<String>,
    pub state: MachineState,
    /// Where its HTTP server listens.
    pub address: SocketAddr,
    /// Its "6PN" address (FLY_PRIVATE_IP, the AAAA records).
    pub private_ip: String,
    pub pid: Option<u32>,
    /// Times it came back after a crash or kill.
    pub restarts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("no machine {0} in this app")]
    NotFound(String),
    #[error("machine {id} is {state:?}: {what}")]
    WrongState {
        id: String,
        state: MachineState,
        what: &'static str,
    },
    #[error("machine {0} did not start in time")]
    Timeout(String),
    #[error("{0}")]
    Other(String),
}

struct Machine {
    id: String,
    customer: Option<String>,
    ip: Ipv4Addr,
    port: u16,
    state: MachineState,
    desired: Desired,
    pid: Option<u32>,
    generation: u64,
    restarts: u32,
    created: u64,
    last_active: Instant,
    in_flight: u32,
}

impl Machine {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    fn info(&self) -> MachineInfo {
        MachineInfo {
            id: self.id.clone(),
            customer_id: self.customer.clone(),
            state: self.state,
            address: self.addr(),
            private_ip: mapped(self.ip).to_string(),
            pid: self.pid,
            restarts: self.restarts,
        }
    }

    fn prefix(&self) -> String {
        format!("{} {}", self.customer.as_deref().unwrap_or("pool"), self.id)
    }
}

struct Inner {
    machines: BTreeMap<String, Machine>,
    next_host: u32,
    next_created: u64,
}

pub struct Supervisor {
    cfg: Arc<DevConfig>,
    dns_addr: SocketAddr,
    admin_token: String,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    table: DnsTable,
    logs: Logs,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(
        cfg: Arc<DevConfig>,
        dns_addr: SocketAddr,
        table: DnsTable,
        logs: Logs,
        admin_token: String,
    ) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cfg,
            dns_addr,
            admin_token,
            inner: Mutex::new(Inner {
                machines: BTreeMap::new(),
                next_host: 0,
                next_created: 0,
            }),
            changed: watch::channel(0).0,
            table,
            logs,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("HTTP client builds"),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    /// Snapshot of every machine, sorted by customer then creation.
    pub fn machines(&self) -> Vec<MachineInfo> {
        let inner = self.inner.lock().unwrap();
        let mut list: Vec<&Machine> = inner.machines.values().collect();
        list.sort_by(|a, b| (&a.customer, a.created).cmp(&(&b.customer, b.created)));
        list.into_iter().map(Machine::info).collect()
    }

    pub fn machine(&self, id: &str) -> Option<MachineInfo> {
        self.inner
            .lock()
            .unwrap()
            .machines
            .get(id)
            .map(Machine::info)
    }

    /// Creates a machine (not started yet) and returns its id.
    pub fn create(&self, customer: Option<String>) -> anyhow::Result<String> {
        let mut inner = self.inner.lock().unwrap();
        let id = loop {
            let id = tenantd_core::config::random_machine_id();
            if !inner.machines.contains_key(&id) {
                break id;
            }
        };
        let ip = loop {
            let host = inner.next_host;
            inner.next_host += 1;
            let ip = Ipv4Addr::from(u32::from(self.cfg.ip_base).wrapping_add(host));
            let last = ip.octets()[3];
            anyhow::ensure!(
                ip.octets()[0] == 127,
                "ran out of loopback addresses after {}",
                self.cfg.ip_base
            );
            if last != 0 && last != 255 {
                break ip;
            }
        };
        let port = match self.cfg.machine_port {
            Some(port) => port,
            None => free_port(ip)?,
        };
        let created = inner.next_created;
        inner.next_created += 1;
        inner.machines.insert(
            id.clone(),
            Machine {
                id: id.clone(),
                customer,
                ip,
                port,
                state: MachineState::Stopped,
                desired: Desired::Stopped,
                pid: None,
                generation: 0,
                restarts: 0,
                created,
                last_active: Instant::now(),
                in_flight: 0,
            },
        );
        drop(inner);
        self.notify();
        Ok(id)
    }

    /// `fly scale count`: creates or destroys machines of `customer` (`None`:
    /// pool machines) until it has `count`; returns when the new ones are
    /// started and the removed ones are gone.
    pub async fn scale(
        self: &Arc<Self>,
        customer: Option<&str>,
        count: usize,
    ) -> anyhow::Result<()> {
        let (current, mut victims): (usize, Vec<(bool, u64, String)>) = {
            let inner = self.inner.lock().unwrap();
            let mine: Vec<&Machine> = inner
                .machines
                .values()
                .filter(|m| m.customer.as_deref() == customer && m.desired != Desired::Destroyed)
                .collect();
            let victims = mine
                .iter()
                .map(|m| {
                    let running = !matches!(m.state, MachineState::Stopped);
                    (running, m.created, m.id.clone())
                })
                .collect();
            (mine.len(), victims)
        };
        let label = customer.unwrap_or("pool");
        if count > current {
            self.logs.event(format!(
                "scaling {label} from {current} to {count} machines"
            ));
            let mut ids = Vec::new();
            for _ in current..count {
                let id = self.create(customer.map(str::to_string))?;
                self.start(&id).await?;
                ids.push(id);
            }
            for id in ids {
                self.ensure_started(&id, self.cfg.start_timeout).await?;
            }
        } else if count < current {
            self.logs.event(format!(
                "scaling {label} from {current} to {count} machines"
            ));
            // Like flyctl, prefer removing stopped machines, then the newest.
            victims.sort_by_key(|v| (v.0, std::cmp::Reverse(v.1)));
            let victims: Vec<String> = victims
                .into_iter()
                .take(current - count)
                .map(|v| v.2)
                .collect();
            for id in &victims {
                self.destroy(id)?;
            }
            let wait = self.cfg.kill_timeout + Duration::from_secs(5);
            for id in &victims {
                if !self.wait_for(id, wait, |s| s.is_none()).await {
                    anyhow::bail!("machine {id} did not go away in time");
                }
            }
        }
        Ok(())
    }

    /// Publishes the DNS table and wakes every waiter.
    fn notify(&self) {
        let table: Vec<DnsMachine> = {
            let inner = self.inner.lock().unwrap();
            inner
                .machines
                .values()
                .filter(|m| matches!(m.state, MachineState::Started | MachineState::Paused))
                .map(|m| {
                    let mut metadata = vec![(
                        "fly_process_group".to_string(),
                        process_group(m.customer.as_deref()),
                    )];
                    if let Some(c) = &m.customer {
                        metadata.push(("customer_id".to_string(), c.clone()));
                    }
                    DnsMachine {
                        id: m.id.clone(),
                        ip: mapped(m.ip),
                        metadata,
                    }
                })
                .collect()
        };
        *self.table.write().unwrap() = table;
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The process group of a machine, as fly.toml names them: `customer<ID>`
/// for a tenant's machines, `app` (flyctl's default) for pool machines.
pub fn process_group(customer: Option<&str>) -> String {
    match customer {
        Some(c) => format!("customer{c}"),
        None => "app".to_string(),
    }
}

/// A port that is free on `ip` right now (the OS picks it).
fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| anyhow::anyhow!("no free port on {ip}: {e}"))?;
    Ok(listener.local_addr()?.port())
}
