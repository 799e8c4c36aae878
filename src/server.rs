//! `tenantd serve`: wires store, lease, tenants, router and HTTP together.

use crate::config::ServeArgs;

pub async fn main(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve not implemented yet")
}
