//! Failover after a SIGKILL at each database size: two real `tenantd
//! serve` processes of one pool, the holder killed, the other asked until
//! it answers (its wait for the stale rule, then its cold start).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::Child;

use super::load;
use super::machines::Setup;

/// A `tenantd serve` process of the bench's store, healthy.
pub struct ServeProcess {
    pub id: String,
    pub addr: SocketAddr,
    pub child: Child,
    pub log: PathBuf,
}

/// Starts `program serve` as a pool machine of `setup`'s store and waits
/// until it answers `/healthz`.
pub async fn spawn_serve(
    program: &Path,
    setup: &Setup,
    faults: &str,
    lease_ttl: Duration,
    id: &str,
    scratch: &Path,
) -> anyhow::Result<ServeProcess> {
    std::fs::create_dir_all(scratch)?;
    let data_dir = scratch.join(format!("{id}-local"));
    let log = scratch.join(format!("{id}-serve.log"));
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut child = tokio::process::Command::new(program)
        .args(["serve", "--listen", &addr.to_string()])
        .args(["--machine-id", id, "--customer-id", ""])
        .env_remove("TENANTD_ADMIN_TOKEN")
        .arg("--store")
        .arg(format!("file://{}", setup.store_root.display()))
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--lease-ttl",
            &humantime::format_duration(lease_ttl).to_string(),
        ])
        .args(["--faults", faults, "--drain-timeout", "600s"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start `{} serve`", program.display()))?;
    let http = load::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "`tenantd serve` exited at start ({status}); see {}",
                log.display()
            );
        }
        if let Ok(reply) = http.get(format!("http://{addr}/healthz")).send().await
            && reply.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "`tenantd serve` not healthy within 20 s; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(ServeProcess {
        id: id.to_string(),
        addr,
        child,
        log,
    })
}

/// Ms from a SIGKILL of `customer`'s holder to the first answer of the
/// other machine, which was up (and had not looked at the tenant) before.
pub async fn failover_after_kill_ms(
    program: &Path,
    setup: &Setup,
    faults: &str,
    lease_ttl: Duration,
    customer: &str,
    n: usize,
    scratch: &Path,
) -> anyhow::Result<f64> {
    let holder = spawn_serve(
        program,
        setup,
        faults,
        lease_ttl,
        &format!("k{n:013}"),
        scratch,
    )
    .await?;
    let next = spawn_serve(
        program,
        setup,
        faults,
        lease_ttl,
        &format!("l{n:013}"),
        scratch,
    )
    .await?;
    let http = load::client();
    let only = |p: &ServeProcess| HashMap::from([(p.id.clone(), p.addr)]);
    load::read_count(&http, &only(&holder), &holder.id, customer)
        .await
        .with_context(|| format!("the holder to be killed could not read {customer}"))?;
    let mut holder = holder;
    holder.child.start_kill()?;
    let killed = Instant::now();
    let _ = holder.child.wait().await;
    let give_up = killed + 3 * lease_ttl + Duration::from_secs(30);
    let machines = only(&next);
    loop {
        if load::read_count(&http, &machines, &next.id, customer)
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > give_up {
            bail!(
                "no answer for {customer} within {:?} of killing its holder; see {}",
                give_up - killed,
                next.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = killed.elapsed().as_secs_f64() * 1000.0;
    let mut next = next;
    if let Some(pid) = next.child.id() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(600), next.child.wait()).await;
    Ok(ms)
}
