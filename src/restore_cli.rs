//! `tenantd restore`: the flags, and the choice between writing a file and
//! restoring in place ([`tenantd_core::restore`] does the work).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use tenantd_core::TenantId;
use tenantd_core::restore::{RESTORE_TTL, in_place, materialize_retrying};
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{FaultConfig, StoreUrl, open_store};
use tenantd_core::tenant::log::{self, Until};

#[derive(Args, Clone, Debug)]
pub struct RestoreArgs {
    /// The tenant to restore.
    #[arg(long, env = "CUSTOMER_ID")]
    pub customer_id: String,

    /// The commit to restore to: an RFC 3339 time (the last commit at or
    /// before it) or a log slot number [default: the newest commit].
    #[arg(long)]
    pub at: Option<String>,

    /// Write the database to this file (a plain SQLite file).
    #[arg(long, required_unless_present = "in_place")]
    pub output: Option<PathBuf>,

    /// Make the restored state the tenant's current state, as a new commit
    /// under the tenant's lease.
    #[arg(long, conflicts_with = "output")]
    pub in_place: bool,

    /// Confirm an in-place restore that rolls commits back.
    #[arg(long)]
    pub yes: bool,

    /// Object store, as for `tenantd serve`.
    #[arg(long, env = "TENANTD_STORE")]
    pub store: Option<StoreUrl>,

    /// How long an in-place restore waits for the tenant's holder to let go.
    #[arg(long, default_value = "30s", value_parser = tenantd_core::config::parse_duration)]
    pub wait: Duration,
}

/// Parses `--at`: a slot number or an RFC 3339 time.
pub fn parse_at(text: Option<&str>) -> anyhow::Result<Until> {
    let Some(text) = text else {
        return Ok(Until::End);
    };
    if let Ok(seq) = text.parse::<u64>() {
        return Ok(Until::Seq(seq));
    }
    let time = chrono::DateTime::parse_from_rfc3339(text).with_context(|| {
        format!(
            "--at {text:?} is neither a slot number nor an RFC 3339 time (2026-11-30T12:00:00Z)"
        )
    })?;
    let ms = time.timestamp_millis();
    if ms < 0 {
        bail!("--at {text:?} is before 1970");
    }
    Ok(Until::Time(ms as u64))
}

pub async fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let id = TenantId::parse(&args.customer_id)
        .map_err(|e| anyhow::anyhow!("--customer-id {:?}: {e}", args.customer_id))?;
    let until = parse_at(args.at.as_deref())?;
    tenantd_core::config::check_store_configured(args.store.as_ref())
        .map_err(anyhow::Error::msg)?;
    let url = tenantd_core::config::store_url(args.store.as_ref()).map_err(anyhow::Error::msg)?;
    let (store, _) = open_store(&url, FaultConfig::default(), RetryPolicy::default(), None)
        .await
        .with_context(|| format!("opening the store {url}"))?;
    if let Some(output) = &args.output {
        let done = materialize_retrying(&store, id.as_str(), output, until).await?;
        println!(
            "customer {id}: wrote {} as of slot {} (--at {} from {} and {} deltas{})",
            output.display(),
            done.seq,
            until,
            done.base,
            done.deltas,
            done.last_committed_at_ms
                .map(|ms| format!(", last commit at {}", log::rfc3339_ms(ms)))
                .unwrap_or_default(),
        );
        if let Until::Seq(wanted) = until
            && done.seq < wanted
        {
            println!("{}", why_earlier(&store, &id, done.seq, wanted).await);
        }
        return Ok(());
    }
    in_place(&store, &id, until, args.yes, args.wait, RESTORE_TTL).await
}

/// Why `--at <slot>` gave an earlier slot: the slots between hold no
/// commit (fences), or the log ends before it.
async fn why_earlier(
    store: &tenantd_core::store::DynStore,
    id: &TenantId,
    got: u64,
    wanted: u64,
) -> String {
    let after = match log::list_slots(store, id.as_str(), got).await {
        Ok(slots) => slots,
        Err(e) => return format!("(slots {}–{wanted} could not be listed: {e})", got + 1),
    };
    let window: Vec<&(u64, u64)> = after.iter().filter(|(seq, _)| *seq <= wanted).collect();
    if window.is_empty() {
        return format!(
            "slot {wanted} is past the newest commit of customer {id}: slot {got} is its last"
        );
    }
    let (first, last) = (got + 1, window.last().map_or(wanted, |(seq, _)| *seq));
    if window.iter().all(|(_, size)| log::is_fence_size(*size)) {
        format!(
            "slots {first}–{last} hold no commit: they are fences, which every takeover writes (a new holder reserves the next slots so that a paused former holder cannot commit into them); slot {got} is the last commit at or before slot {wanted}. The first commit of a new tenant comes after its first holder's fences."
        )
    } else {
        format!(
            "slots {first}–{last} hold no commit that can be restored on its own (fences of takeovers, or slots whose compaction folded them into a later snapshot); slot {got} is the last commit at or before slot {wanted}"
        )
    }
}
