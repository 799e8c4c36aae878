//! `tenantd dev`. TODO: not implemented yet.

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct DevArgs {}

pub async fn run(_args: DevArgs) -> anyhow::Result<()> {
    anyhow::bail!("tenantd dev is not implemented yet")
}
