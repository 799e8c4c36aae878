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

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
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

    /// Starts a stopped machine (or one waiting to restart). No-op for a
    /// machine that is starting or running.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<(), MachineError> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let mut inner = self.inner.lock().unwrap();
                let m = inner
                    .machines
                    .get_mut(id)
                    .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
                match m.state {
                    MachineState::Starting | MachineState::Started | MachineState::Paused => {
                        return Ok(());
                    }
                    MachineState::Destroying => {
                        return Err(MachineError::WrongState {
                            id: id.to_string(),
                            state: m.state,
                            what: "it is being destroyed",
                        });
                    }
                    MachineState::Stopped | MachineState::Restarting => {
                        let result = self.spawn_locked(m);
                        drop(inner);
                        self.notify();
                        return result;
                    }
                    // Let the old process exit first, then start afresh.
                    MachineState::Stopping => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(MachineError::Other("cluster is shutting down".into()));
            }
        }
    }

    /// Where a request for `id` can go: a stopping machine still runs and
    /// answers (it hands requests on while it drains), as on Fly; a stopped
    /// one is started first.
    pub async fn reachable(
        self: &Arc<Self>,
        id: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, MachineError> {
        if let Some(m) = self.machine(id)
            && m.state == MachineState::Stopping
        {
            return Ok(m.address);
        }
        self.ensure_started(id, timeout).await
    }

    /// Waits until `id` is started (or paused), starting it if it is stopped
    /// (the edge's auto-start). Returns its address.
    pub async fn ensure_started(
        self: &Arc<Self>,
        id: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, MachineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let state = {
                let inner = self.inner.lock().unwrap();
                let m = inner
                    .machines
                    .get(id)
                    .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
                match m.state {
                    MachineState::Started | MachineState::Paused => return Ok(m.addr()),
                    MachineState::Destroying => {
                        return Err(MachineError::WrongState {
                            id: id.to_string(),
                            state: m.state,
                            what: "it is being destroyed",
                        });
                    }
                    state => (state, m.desired),
                }
            };
            if state.0 == MachineState::Stopped {
                self.logs
                    .event(format!("auto-starting machine {id} for a request"));
                self.start(id).await?;
                continue;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(MachineError::Other("cluster is shutting down".into())),
                Err(_) => return Err(MachineError::Timeout(id.to_string())),
            }
        }
    }

    /// Waits until `id`'s state satisfies `done` (or it is gone: `None`).
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(Option<MachineState>) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let state = self.inner.lock().unwrap().machines.get(id).map(|m| m.state);
            if done(state) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// A random started machine for a new request, not in `exclude` if
    /// possible; auto-starts a stopped machine when none runs.
    pub async fn pick(
        self: &Arc<Self>,
        exclude: &[String],
        timeout: Duration,
    ) -> Result<(String, SocketAddr), MachineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let to_start = {
                let inner = self.inner.lock().unwrap();
                let started: Vec<&Machine> = inner
                    .machines
                    .values()
                    .filter(|m| m.state == MachineState::Started)
                    .collect();
                let preferred: Vec<&&Machine> = started
                    .iter()
                    .filter(|m| !exclude.contains(&m.id))
                    .collect();
                if !preferred.is_empty() {
                    let m = preferred[rand::random_range(0..preferred.len())];
                    return Ok((m.id.clone(), m.addr()));
                }
                if !started.is_empty() {
                    let m = started[rand::random_range(0..started.len())];
                    return Ok((m.id.clone(), m.addr()));
                }
                if inner.machines.is_empty() {
                    return Err(MachineError::Other("the app has no machines".into()));
                }
                let waiting = inner.machines.values().any(|m| {
                    matches!(
                        m.state,
                        MachineState::Starting | MachineState::Restarting | MachineState::Stopping
                    )
                });
                let stopped: Vec<&Machine> = inner
                    .machines
                    .values()
                    .filter(|m| m.state == MachineState::Stopped)
                    .collect();
                if !waiting && !stopped.is_empty() {
                    Some(stopped[rand::random_range(0..stopped.len())].id.clone())
                } else {
                    None
                }
            };
            if let Some(id) = to_start {
                self.logs
                    .event(format!("auto-starting machine {id}: no machine is running"));
                self.start(&id).await?;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(MachineError::Other("cluster is shutting down".into())),
                Err(_) => {
                    return Err(MachineError::Other(
                        "no machine became available in time".into(),
                    ));
                }
            }
        }
    }

    /// Marks a request routed to `id`; the guard marks its end (auto-stop
    /// never stops a machine with requests in flight).
    pub fn begin_request(self: &Arc<Self>, id: &str) -> ActiveGuard {
        if let Some(m) = self.inner.lock().unwrap().machines.get_mut(id) {
            m.in_flight += 1;
            m.last_active = Instant::now();
        }
        ActiveGuard {
            sup: self.clone(),
            id: id.to_string(),
        }
    }

    /// SIGKILL; the machine comes back after the restart delay.
    pub fn kill(&self, id: &str) -> Result<(), MachineError> {
        self.signal_running(id, &[Signal::SIGKILL], "not running, nothing to kill")?;
        self.logs.event(format!("killed machine {id} (SIGKILL)"));
        Ok(())
    }

    /// SIGSTOP: the process freezes, holding whatever it held.
    pub fn pause(&self, id: &str) -> Result<(), MachineError> {
        let mut inner = self.inner.lock().unwrap();
        let m = inner
            .machines
            .get_mut(id)
            .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
        match (m.state, m.pid) {
            (MachineState::Started | MachineState::Starting, Some(pid)) => {
                signal(pid, Signal::SIGSTOP);
                m.state = MachineState::Paused;
            }
            (MachineState::Paused, _) => {}
            (state, _) => {
                return Err(MachineError::WrongState {
                    id: id.into(),
                    state,
                    what: "only a running machine can be paused",
                });
            }
        }
        drop(inner);
        self.notify();
        self.logs.event(format!("paused machine {id} (SIGSTOP)"));
        Ok(())
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self, id: &str) -> Result<(), MachineError> {
        let mut inner = self.inner.lock().unwrap();
        let m = inner
            .machines
            .get_mut(id)
            .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
        match (m.state, m.pid) {
            (MachineState::Paused, Some(pid)) => {
                signal(pid, Signal::SIGCONT);
                m.state = MachineState::Started;
            }
            (MachineState::Started, _) => {}
            (state, _) => {
                return Err(MachineError::WrongState {
                    id: id.into(),
                    state,
                    what: "only a paused machine can be resumed",
                });
            }
        }
        drop(inner);
        self.notify();
        self.logs.event(format!("resumed machine {id} (SIGCONT)"));
        Ok(())
    }

    /// SIGTERM (the machine releases its lock and exits); it stays stopped
    /// until `start` or a request for it.
    pub fn stop(self: &Arc<Self>, id: &str) -> Result<(), MachineError> {
        self.terminate(id, Desired::Stopped)
    }

    /// Stops the machine for good and removes it once it exited.
    pub fn destroy(self: &Arc<Self>, id: &str) -> Result<(), MachineError> {
        self.terminate(id, Desired::Destroyed)
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

    /// Auto-stop: every round, SIGTERM the one machine idle longest (no
    /// requests for at least `idle`), whatever its group, like Fly Proxy.
    pub fn spawn_auto_stop(self: &Arc<Self>, idle: Duration) {
        let sup = self.clone();
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            loop {
                tokio::select! {
                    _ = sup.shutdown.cancelled() => return,
                    _ = interval.tick() => {}
                }
                // Like Fly Proxy: at most one machine per round (the one
                // idle longest), whatever its process group or tenant.
                let idle_id: Option<String> = sup
                    .inner
                    .lock()
                    .unwrap()
                    .machines
                    .values()
                    .filter(|m| {
                        m.state == MachineState::Started
                            && m.in_flight == 0
                            && m.last_active.elapsed() >= idle
                    })
                    .min_by_key(|m| m.last_active)
                    .map(|m| m.id.clone());
                if let Some(id) = idle_id {
                    sup.logs.event(format!(
                        "auto-stopping machine {id}: no requests for {}",
                        humantime::format_duration(idle)
                    ));
                    let _ = sup.stop(&id);
                }
            }
        });
    }

    /// Stops every machine (SIGTERM, so they release their locks), waits up
    /// to the kill timeout, then SIGKILLs what is left.
    pub async fn shutdown(self: &Arc<Self>) {
        self.shutdown.cancel();
        let ids: Vec<String> = self
            .inner
            .lock()
            .unwrap()
            .machines
            .keys()
            .cloned()
            .collect();
        for id in &ids {
            let _ = self.destroy(id);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.kill_timeout + Duration::from_secs(1);
        let mut rx = self.changed.subscribe();
        while !self.inner.lock().unwrap().machines.is_empty() {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        self.kill_all();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.inner.lock().unwrap().machines.is_empty() {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
    }

    /// SIGKILL to every live child, synchronously (the last resort of Drop).
    pub fn kill_all(&self) {
        // No restarts from here on.
        self.shutdown.cancel();
        let inner = self.inner.lock().unwrap();
        for m in inner.machines.values() {
            if let Some(pid) = m.pid {
                signal(pid, Signal::SIGKILL);
            }
        }
    }

    fn terminate(self: &Arc<Self>, id: &str, desired: Desired) -> Result<(), MachineError> {
        let mut inner = self.inner.lock().unwrap();
        let m = inner
            .machines
            .get_mut(id)
            .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
        if desired == Desired::Stopped && m.desired == Desired::Destroyed {
            return Ok(());
        }
        m.desired = desired;
        match m.pid {
            Some(pid) => {
                // SIGCONT too: a paused process would not act on SIGTERM.
                signal(pid, Signal::SIGTERM);
                signal(pid, Signal::SIGCONT);
                m.state = if desired == Desired::Destroyed {
                    MachineState::Destroying
                } else {
                    MachineState::Stopping
                };
                let generation = m.generation;
                let sup = self.clone();
                let id = id.to_string();
                let grace = self.cfg.kill_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let inner = sup.inner.lock().unwrap();
                    if let Some(m) = inner.machines.get(&id)
                        && m.generation == generation
                        && let Some(pid) = m.pid
                    {
                        sup.logs.event(format!(
                            "machine {id} did not exit within {}; SIGKILL",
                            humantime::format_duration(grace)
                        ));
                        signal(pid, Signal::SIGKILL);
                    }
                });
            }
            None if desired == Desired::Destroyed => {
                inner.machines.remove(id);
            }
            None => m.state = MachineState::Stopped,
        }
        drop(inner);
        self.notify();
        Ok(())
    }

    fn signal_running(
        &self,
        id: &str,
        signals: &[Signal],
        what: &'static str,
    ) -> Result<(), MachineError> {
        let inner = self.inner.lock().unwrap();
        let m = inner
            .machines
            .get(id)
            .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
        match m.pid {
            Some(pid) => {
                for s in signals {
                    signal(pid, *s);
                }
                Ok(())
            }
            None => Err(MachineError::WrongState {
                id: id.into(),
                state: m.state,
                what,
            }),
        }
    }

    /// Spawns the machine's process; called with the table locked.
    fn spawn_locked(self: &Arc<Self>, m: &mut Machine) -> Result<(), MachineError> {
        m.generation += 1;
        m.desired = Desired::Running;
        m.last_active = Instant::now();
        let mut cmd = self.command(m);
        match cmd.spawn() {
            Ok(mut child) => {
                m.pid = child.id();
                m.state = MachineState::Starting;
                let prefix = m.prefix();
                if let Some(out) = child.stdout.take() {
                    self.logs.pump(prefix.clone(), out);
                }
                if let Some(err) = child.stderr.take() {
                    self.logs.pump(prefix, err);
                }
                let sup = self.clone();
                let (id, generation, addr) = (m.id.clone(), m.generation, m.addr());
                tokio::spawn(async move { sup.watch_process(id, generation, addr, child).await });
                Ok(())
            }
            Err(e) => {
                m.state = MachineState::Stopped;
                m.desired = Desired::Stopped;
                let msg = format!(
                    "machine {}: could not run {}: {e}",
                    m.id,
                    self.cfg.program.display()
                );
                self.logs.event(&msg);
                Err(MachineError::Other(msg))
            }
        }
    }

    fn command(&self, m: &Machine) -> tokio::process::Command {
        let cfg = &self.cfg;
        let mut cmd = tokio::process::Command::new(&cfg.program);
        cmd.args(&cfg.program_args);
        let listen = m.addr().to_string();
        let data_dir = cfg.data_dir.join("machines").join(&m.id);
        cmd.env("FLY_MACHINE_ID", &m.id)
            .env("FLY_ALLOC_ID", &m.id)
            .env("FLY_APP_NAME", &cfg.app_name)
            .env("FLY_PRIVATE_IP", mapped(m.ip).to_string())
            .env("FLY_REGION", super::dns::REGION)
            .env("FLY_PROCESS_GROUP", process_group(m.customer.as_deref()))
            .env("TENANTD_LISTEN", &listen)
            // Explicit, so that the lock names an address any client here
            // can connect to, whatever the platform's IPv6 settings.
            .env("TENANTD_ADVERTISE", &listen)
            .env("TENANTD_STORE", cfg.store.to_string())
            .env("DATABASE_PATH", &data_dir)
            .env(
                "TENANTD_LEASE_TTL",
                humantime::format_duration(cfg.lease_ttl).to_string(),
            )
            .env("TENANTD_DNS_SERVER", self.dns_addr.to_string())
            .env("TENANTD_ADMIN_TOKEN", &self.admin_token);
        match &m.customer {
            Some(c) => cmd.env("CUSTOMER_ID", c),
            None => cmd.env_remove("CUSTOMER_ID"),
        };
        // As fly.toml pairs them: the drain ends a second before the kill.
        if cfg.kill_timeout >= Duration::from_secs(4) {
            cmd.env(
                "TENANTD_DRAIN_TIMEOUT",
                humantime::format_duration(cfg.kill_timeout - Duration::from_secs(1)).to_string(),
            );
        }
        if !cfg.color_logs {
            // Escape codes would only clutter the multiplexed, prefixed log.
            cmd.env("NO_COLOR", "1");
        }
        for (k, v) in &cfg.extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, setpgid,
        // _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    nix::libc::_exit(1);
                }
                nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
                Ok(())
            });
        }
        cmd
    }

    /// Owns the child: marks it started once `/healthz` answers, and handles
    /// its exit (restart policy).
    async fn watch_process(
        self: Arc<Self>,
        id: String,
        generation: u64,
        addr: SocketAddr,
        mut child: tokio::process::Child,
    ) {
        let health = self.wait_healthy(&id, generation, addr);
        tokio::pin!(health);
        let mut healthy = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = &mut health, if !healthy => healthy = true,
            }
        };
        let how = match &status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("could not be waited for: {e}"),
        };
        let mut restart_after = None;
        {
            let mut inner = self.inner.lock().unwrap();
            let Some(m) = inner.machines.get_mut(&id) else {
                return;
            };
            if m.generation != generation {
                return;
            }
            m.pid = None;
            m.in_flight = 0;
            match m.desired {
                Desired::Destroyed => {
                    inner.machines.remove(&id);
                    self.logs.event(format!("machine {id} {how}; destroyed"));
                }
                Desired::Stopped => {
                    m.state = MachineState::Stopped;
                    self.logs.event(format!("machine {id} {how}; stopped"));
                }
                Desired::Running => match self.cfg.restart_delay {
                    Some(delay) if !self.shutdown.is_cancelled() => {
                        m.state = MachineState::Restarting;
                        restart_after = Some(delay);
                        self.logs.event(format!(
                            "machine {id} {how}; restarting in {}",
                            humantime::format_duration(delay)
                        ));
                    }
                    _ => {
                        m.state = MachineState::Stopped;
                        m.desired = Desired::Stopped;
                        self.logs
                            .event(format!("machine {id} {how}; not restarted"));
                    }
                },
            }
        }
        self.notify();
        if let Some(delay) = restart_after {
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    let mut inner = self.inner.lock().unwrap();
                    if let Some(m) = inner.machines.get_mut(&id)
                        && m.generation == generation
                        && m.state == MachineState::Restarting
                        && m.desired == Desired::Running
                    {
                        m.restarts += 1;
                        let _ = self.spawn_locked(m);
                        drop(inner);
                        self.notify();
                    }
                }
            }
        }
    }

    async fn wait_healthy(&self, id: &str, generation: u64, addr: SocketAddr) {
        let url = format!("http://{addr}/healthz");
        let started = Instant::now();
        let mut warned = false;
        loop {
            if let Ok(resp) = self.http.get(&url).send().await
                && resp.status().is_success()
            {
                break;
            }
            if !warned && started.elapsed() > self.cfg.start_timeout {
                warned = true;
                self.logs.event(format!(
                    "machine {id} does not answer {url} after {}",
                    humantime::format_duration(self.cfg.start_timeout)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(m) = inner.machines.get_mut(id)
            && m.generation == generation
            && m.state == MachineState::Starting
        {
            m.state = MachineState::Started;
            m.last_active = Instant::now();
            drop(inner);
            self.logs.event(format!(
                "machine {id} started on {addr} in {} ms",
                started.elapsed().as_millis()
            ));
            self.notify();
        }
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

/// Ends a request's "in flight" mark on drop.
pub struct ActiveGuard {
    sup: Arc<Supervisor>,
    id: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(m) = self.sup.inner.lock().unwrap().machines.get_mut(&self.id) {
            m.in_flight = m.in_flight.saturating_sub(1);
            m.last_active = Instant::now();
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by {s}"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        _ => "exited".to_string(),
    }
}

/// A port that is free on `ip` right now (the OS picks it).
fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| anyhow::anyhow!("no free port on {ip}: {e}"))?;
    Ok(listener.local_addr()?.port())
}
