//! What the edge proxy asks of the machines: pick one to send a request to,
//! start a stopped one on demand (Fly's autostart), count requests under
//! way, and stop machines idle past the autostop delay. Owns the request
//! counts and the autostop loop; process control is in [`super::process`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Machine, MachineError, MachineState, Supervisor};

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

impl Supervisor {
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
}
