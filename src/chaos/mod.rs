//! `tenantd chaos`. TODO: not implemented yet.

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct ChaosArgs {}

pub async fn run(_args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::bail!("tenantd chaos is not implemented yet")
}
