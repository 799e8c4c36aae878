//! What an idle tenant costs: store requests while its lease is held (the
//! renewals), and after the pool machine releases it for idleness (none).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use super::load;
use super::machines::{Machine, Setup, store_requests};
use tenantd_core::lease::{LockState, read_lock};
use tenantd_core::store::keys;

#[derive(Clone, Debug, Serialize)]
pub struct IdleResult {
    pub lease_ttl_ms: u64,
    pub idle_timeout_ms: u64,
    /// Store requests per hour of one idle, held tenant (extrapolated from
    /// the measured window).
    pub held_requests_per_hour: f64,
    /// When the machine let go of the tenant, after its last request.
    pub released_after_ms: u64,
    /// Store requests in `after_release_window_ms` after the release.
    pub requests_after_release: u64,
    pub after_release_window_ms: u64,
}

pub async fn run(
    scratch: &Path,
    faults: &str,
    lease_ttl: Duration,
    window: Duration,
) -> anyhow::Result<IdleResult> {
    let idle_timeout = window + lease_ttl;
    let setup = Setup {
        idle_timeout,
        ..Setup::new(scratch, faults, lease_ttl)
    };
    setup.create_tenants(&["idle"]).await?;
    let machine = Machine::start(&setup, "c0000000000003").await?;
    let machines = HashMap::from([(machine.id.clone(), machine.addr)]);
    let http = load::client();
    if !load::increment(&http, &machines, &machine.id, "idle").await {
        bail!("the first request to the idle tenant failed");
    }
    let last_request = Instant::now();
    let one = std::slice::from_ref(&machine);

    // Held and idle: only renewals should reach the store.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, _) = store_requests(one).await?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let (after, _) = store_requests(one).await?;
    let held_requests_per_hour = (after - before) * 3600.0 / started.elapsed().as_secs_f64();

    // Released means the lock object says so: the machine stops reporting
    // itself as holder a moment before its release reaches the store.
    let store = setup.store()?;
    let lock = keys::lock("idle");
    let deadline = last_request + idle_timeout + lease_ttl + Duration::from_secs(5);
    while !matches!(read_lock(&store, &lock).await?, LockState::Released { .. }) {
        if Instant::now() > deadline {
            bail!("the pool machine still holds the idle tenant after {idle_timeout:?} idle");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if machine.held().await? > 0 {
        bail!("the lock of the idle tenant is released but the machine reports it as held");
    }
    let released_after_ms = last_request.elapsed().as_millis() as u64;

    let (before, _) = store_requests(one).await?;
    tokio::time::sleep(window).await;
    let (after, _) = store_requests(one).await?;
    machine.stop().await?;
    Ok(IdleResult {
        lease_ttl_ms: lease_ttl.as_millis() as u64,
        idle_timeout_ms: idle_timeout.as_millis() as u64,
        held_requests_per_hour,
        released_after_ms,
        requests_after_release: (after - before) as u64,
        after_release_window_ms: window.as_millis() as u64,
    })
}
