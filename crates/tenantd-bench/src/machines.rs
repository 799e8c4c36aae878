//! Machines for the benchmark that run inside the bench process: the same
//! server `tenantd serve` runs, started through `server::run_with`, which is
//! the only way to reach the bench-only answer-before-upload setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tenantd_core::config::ServeConfig;
use tenantd_core::store::{DynStore, FileStore, StoreResult, StoreUrl};

/// The SQL API token every bench machine is started with
/// (`--api-token`).
pub const API_TOKEN: &str = "tenantd-bench";

/// How to start one in-process machine.
#[derive(Clone, Debug)]
pub struct Setup {
    pub store_root: PathBuf,
    pub data_dir: PathBuf,
    /// `None`: pool mode.
    pub customer: Option<String>,
    /// `FaultConfig` JSON, e.g. the store latency.
    pub faults: String,
    pub lease_ttl: Duration,
    pub idle_timeout: Duration,
    /// `--drain-timeout`: how long a stop may take to release its tenants.
    pub drain_timeout: Duration,
    /// Bench-only: answer before the upload (the upper bound).
    pub ack_before_upload: bool,
}

impl Setup {
    /// A durable pool machine storing under `scratch`, which keeps idle
    /// tenants for the whole bench.
    pub fn new(scratch: &Path, faults: &str, lease_ttl: Duration) -> Setup {
        Setup {
            store_root: scratch.join("store"),
            data_dir: scratch.join("local"),
            customer: None,
            faults: faults.into(),
            lease_ttl,
            idle_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(8),
            ack_before_upload: false,
        }
    }

    /// The machines' store, opened directly (no faults), to look at or
    /// prepare objects behind their backs.
    pub fn store(&self) -> StoreResult<DynStore> {
        Ok(Arc::new(FileStore::new(&self.store_root)?))
    }

    /// Creates the tenants a pool machine is to serve, as an operator
    /// would (`tenantd tenants create`).
    pub async fn create_tenants(&self, ids: &[&str]) -> anyhow::Result<()> {
        let store = self.store()?;
        for id in ids {
            let id = tenantd_core::TenantId::parse(id).map_err(|e| anyhow::anyhow!("{e}"))?;
            tenantd_core::tenant::lifecycle::create(&store, &id).await?;
        }
        Ok(())
    }
}

pub struct Machine {
    pub id: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Machine {
    pub async fn start(setup: &Setup, id: &str) -> anyhow::Result<Machine> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // The flags' defaults (`ServeConfig::default()` is checked against
        // them) with what an operator would pass; no admin token, since the
        // bench reads /metrics and /_status.
        let args = ServeConfig {
            listen: addr,
            machine_id: Some(id.to_string()),
            customer_id: Some(setup.customer.clone().unwrap_or_default()),
            store: Some(StoreUrl::File(absolute(&setup.store_root)?)),
            data_dir: setup.data_dir.join(id),
            lease_ttl: setup.lease_ttl,
            idle_timeout: setup.idle_timeout,
            drain_timeout: setup.drain_timeout,
            faults: Some(setup.faults.clone()),
            api_token: Some(API_TOKEN.to_string()),
            ..ServeConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tenantd_core::server::run_with(
            args,
            listener,
            async {
                let _ = stopped.await;
            },
            setup.ack_before_upload,
        ));
        let machine = Machine {
            id: id.to_string(),
            addr,
            stop: Some(stop),
            task,
        };
        machine.wait_healthy().await?;
        Ok(machine)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.task.is_finished() {
                bail!("machine {} exited at start", self.id);
            }
            if let Ok(reply) = http
                .get(format!("http://{}/healthz", self.addr))
                .send()
                .await
                && reply.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("machine {} not healthy within 20 s", self.id)
    }

    /// Graceful stop, like SIGTERM: uploads what is queued, releases leases.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.context("machine task panicked")?
    }

    /// The machine's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.addr))
            .await?
            .text()
            .await?)
    }

    /// Tenants this machine holds, from `/_status`.
    pub async fn held(&self) -> anyhow::Result<usize> {
        let status: serde_json::Value = reqwest::get(format!("http://{}/_status", self.addr))
            .await?
            .json()
            .await?;
        Ok(status["tenants"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["role"] == "holder").count())
            .unwrap_or(0))
    }
}

/// Sum of the samples of `metric` whose labels contain every one of `labels`
/// (e.g. `op="put_if_match"`).
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let bare = name.split('{').next()?;
            (bare == metric && labels.iter().all(|l| name.contains(l)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Store requests of every kind, and PUTs alone, over `machines`.
pub async fn store_requests(machines: &[Machine]) -> anyhow::Result<(f64, f64)> {
    let (mut all, mut puts) = (0.0, 0.0);
    for machine in machines {
        let text = machine.metrics().await?;
        all += metric_sum(&text, "tenantd_store_requests_total", &[]);
        puts += metric_sum(&text, "tenantd_store_requests_total", &["op=\"put"]);
    }
    Ok((all, puts))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    Ok(std::fs::canonicalize(path)?)
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn sums_matching_samples() {
        let text = "# HELP x\ntenantd_store_requests_total{op=\"get\",outcome=\"ok\"} 3\ntenantd_store_requests_total{op=\"put_if_match\",outcome=\"ok\"} 5\ntenantd_store_requests_total{op=\"put\",outcome=\"error\"} 2\ntenantd_store_request_seconds_count{op=\"put\"} 9\n";
        assert_eq!(metric_sum(text, "tenantd_store_requests_total", &[]), 10.0);
        assert_eq!(
            metric_sum(text, "tenantd_store_requests_total", &["op=\"put"]),
            7.0
        );
    }
}
