//! `tenantd fly`. TODO: not implemented yet.

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct FlyArgs {}

pub async fn run(_args: FlyArgs) -> anyhow::Result<()> {
    anyhow::bail!("tenantd fly is not implemented yet")
}
