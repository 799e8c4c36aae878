//! `tenantd bench`. TODO: not implemented yet.

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("tenantd bench is not implemented yet")
}
