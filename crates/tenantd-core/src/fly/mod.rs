//! Fly.io from inside `tenantd serve`: the Machines API client ([`api`]) and
//! [`TenantFinder`], which tells a machine where a tenant it does not serve
//! is held. The `tenantd fly` command that provisions machines lives in the
//! binary and uses the same client; nothing here parses a command line.

pub mod api;

use crate::TenantId;
use api::{Api, Machine};

pub use api::authorization;

/// Where `tenantd serve` finds the machines of a tenant it does not serve:
/// the started ones through Fly's internal DNS and, when DNS lists none
/// (all stopped, or the holder gone for good while its standbys were
/// autostopped), every machine of the tenant's group that the Machines API
/// knows, stopped ones first: Fly Proxy starts a stopped machine that a
/// replay names. The API is used only with a token (`FLY_API_TOKEN`, a
/// read-only one is enough: `fly tokens create readonly`).
pub struct TenantFinder {
    dns: crate::fly_dns::FlyDns,
    api: Option<Api>,
    cache: std::sync::Mutex<Option<(std::time::Instant, Vec<Machine>)>>,
    /// One list call at a time: the lookups that arrive while it runs (a
    /// failover storm asks for many tenants at once) wait for its answer.
    refreshing: tokio::sync::Mutex<()>,
}

/// A list this young answers lookups without a call.
const FRESH: std::time::Duration = std::time::Duration::from_secs(2);
/// A list this young still answers when the API refuses or fails (its
/// stopped machines rarely change within a minute).
const STALE_OK: std::time::Duration = std::time::Duration::from_secs(60);

/// The Machines API from inside a Fly machine.
pub const INTERNAL_API_URL: &str = "http://_api.internal:4280";

impl TenantFinder {
    pub fn new(dns: crate::fly_dns::FlyDns, api: Option<(String, String)>) -> TenantFinder {
        let api = api.and_then(|(url, token)| {
            Api::with_timeout(&url, dns.app(), &token, std::time::Duration::from_secs(5))
                .map_err(|e| tracing::warn!("Machines API client: {e:#}"))
                .ok()
        });
        TenantFinder {
            dns,
            api,
            cache: std::sync::Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The app's machines: one unfiltered list answers every tenant, so that
    /// a machine asked about fifty tenants at once makes one call of the
    /// API's shared budget (1 request/s per action per app), not fifty. At
    /// most one call every [`FRESH`]; the last list, up to [`STALE_OK`] old,
    /// when the API refuses or fails.
    async fn machines(&self, api: &Api) -> anyhow::Result<Vec<Machine>> {
        if let Some(machines) = self.cached(FRESH) {
            return Ok(machines);
        }
        let _turn = self.refreshing.lock().await;
        // Listed by the call this one waited for.
        if let Some(machines) = self.cached(FRESH) {
            return Ok(machines);
        }
        match api.list().await {
            Ok(machines) => {
                *self.cache.lock().unwrap() = Some((std::time::Instant::now(), machines.clone()));
                Ok(machines)
            }
            Err(e) => match self.cached(STALE_OK) {
                Some(machines) => {
                    tracing::warn!(error = %format!("{e:#}"), "the Machines API failed; using its last list");
                    Ok(machines)
                }
                None => Err(e),
            },
        }
    }

    fn cached(&self, within: std::time::Duration) -> Option<Vec<Machine>> {
        match &*self.cache.lock().unwrap() {
            Some((at, machines)) if at.elapsed() < within => Some(machines.clone()),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl crate::http::MachineFinder for TenantFinder {
    async fn machines_of(&self, id: &TenantId) -> anyhow::Result<Vec<String>> {
        let started = self.dns.machines_of_customer(id.as_str()).await;
        match (&started, &self.api) {
            (Ok(ids), _) if !ids.is_empty() => return started,
            (_, None) => return started,
            (Err(e), Some(_)) => {
                tracing::warn!(customer_id = %id, error = %e, "DNS lookup failed; asking the Machines API")
            }
            _ => {}
        }
        let api = self.api.as_ref().expect("checked above");
        let machines = self.machines(api).await?;
        let mut mine: Vec<&Machine> = of_customer(&machines, id)
            .into_iter()
            .filter(|m| !matches!(m.state.as_str(), "destroying" | "destroyed" | "replacing"))
            .collect();
        // DNS lists no started machine: one the API still calls started is
        // likely on a dead host; a stopped one is started by the replay.
        mine.sort_by_key(|m| (m.state != "stopped" && m.state != "suspended", m.id.clone()));
        Ok(mine.into_iter().map(|m| m.id.clone()).collect())
    }
}

/// The process group of a tenant's machines.
pub fn group_of(customer: &TenantId) -> String {
    format!("customer{customer}")
}

/// The machines of `customer`'s process group (or carrying its
/// `customer_id`), leaving out destroyed ones.
pub fn of_customer<'a>(machines: &'a [Machine], customer: &TenantId) -> Vec<&'a Machine> {
    let group = group_of(customer);
    machines
        .iter()
        .filter(|m| {
            m.process_group() == Some(group.as_str()) || m.customer_id() == Some(customer.as_str())
        })
        .filter(|m| !matches!(m.state.as_str(), "destroyed" | "destroying"))
        .collect()
}
