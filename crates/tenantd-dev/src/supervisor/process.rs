//! Process control of the dev machines: spawning `tenantd serve` children
//! with Fly's env (death signal, own process group), watching them exit,
//! Fly's restart policy, health waits, and signals for kill, pause, resume,
//! stop and destroy. Owns the child processes; decides no placement and no
//! auto-stop.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Desired, Machine, MachineError, MachineState, Supervisor, process_group};
use crate::dns::mapped;

pub(super) fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

pub(super) fn describe_exit(status: &std::process::ExitStatus) -> String {
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

impl Supervisor {
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

    pub(super) fn terminate(
        self: &Arc<Self>,
        id: &str,
        desired: Desired,
    ) -> Result<(), MachineError> {
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

    pub(super) fn signal_running(
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
    pub(super) fn spawn_locked(self: &Arc<Self>, m: &mut Machine) -> Result<(), MachineError> {
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

    pub(super) fn command(&self, m: &Machine) -> tokio::process::Command {
        let cfg = &self.cfg;
        let mut cmd = tokio::process::Command::new(&cfg.program);
        cmd.args(&cfg.program_args);
        let listen = m.addr().to_string();
        let data_dir = cfg.data_dir.join("machines").join(&m.id);
        cmd.env("FLY_MACHINE_ID", &m.id)
            .env("FLY_ALLOC_ID", &m.id)
            .env("FLY_APP_NAME", &cfg.app_name)
            .env("FLY_PRIVATE_IP", mapped(m.ip).to_string())
            .env("FLY_REGION", crate::dns::REGION)
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
    pub(super) async fn watch_process(
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

    pub(super) async fn wait_healthy(&self, id: &str, generation: u64, addr: SocketAddr) {
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
}
