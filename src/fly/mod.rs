//! `tenantd fly`: provision and scale tenants' machines through the Fly
//! Machines API, as the original article suggests: each tenant's machines
//! carry metadata `customer_id=<id>` (for DNS routing) and env
//! `CUSTOMER_ID=<id>` (for `tenantd serve`).

mod api;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::TenantId;
use api::{Api, Machine};

#[derive(Args, Clone, Debug)]
pub struct FlyArgs {
    #[command(subcommand)]
    command: FlyCommand,
    /// Fly app name.
    #[arg(long, env = "FLY_APP_NAME", global = true)]
    app: Option<String>,
    /// Machines API base URL.
    #[arg(
        long,
        env = "FLY_API_URL",
        default_value = "https://api.machines.dev",
        global = true
    )]
    api_url: String,
    /// API token (`fly tokens create deploy`).
    #[arg(long, env = "FLY_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Subcommand, Clone, Debug)]
enum FlyCommand {
    /// Make sure a tenant has at least --count machines (creates only the missing ones).
    Provision {
        #[arg(long)]
        customer: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Image for new machines [default: the image of an existing machine of the app].
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// Create or destroy a tenant's machines until it has exactly --count.
    Scale {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// List the app's machines with their tenant.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: FlyArgs) -> anyhow::Result<()> {
    let token = args.token.filter(|t| !t.is_empty()).context(
        "FLY_API_TOKEN is not set: create a token with `fly tokens create deploy` and export it",
    )?;
    let app = args
        .app
        .filter(|a| !a.is_empty())
        .context("no app given: set FLY_APP_NAME or pass --app")?;
    let api = Api::new(&args.api_url, &app, &token)?;
    match args.command {
        FlyCommand::Ls { json } => ls(&api, json).await,
        FlyCommand::Provision {
            customer,
            count,
            image,
            region,
        } => {
            let customer = TenantId::parse(&customer)?;
            let machines = api.list().await?;
            let have = of_customer(&machines, &customer).len();
            let created = create(
                &api,
                &machines,
                &customer,
                count.saturating_sub(have),
                image,
                region,
            )
            .await?;
            println!(
                "customer {customer}: {} machine(s), {created} created",
                have + created
            );
            Ok(())
        }
        FlyCommand::Scale {
            customer,
            count,
            image,
            region,
        } => {
            let customer = TenantId::parse(&customer)?;
            let machines = api.list().await?;
            let mut mine = of_customer(&machines, &customer);
            if mine.len() < count {
                let created = create(
                    &api,
                    &machines,
                    &customer,
                    count - mine.len(),
                    image,
                    region,
                )
                .await?;
                println!("customer {customer}: {count} machine(s), {created} created");
                return Ok(());
            }
            // Stopped machines go first (nothing to hand over), then the
            // newest; a running holder hands its lease over when stopped.
            mine.sort_by(|a, b| {
                (a.state == "stopped")
                    .cmp(&(b.state == "stopped"))
                    .reverse()
                    .then(b.created_at.cmp(&a.created_at))
            });
            let excess = mine.len() - count;
            for machine in mine.iter().take(excess) {
                api.destroy(&machine.id).await?;
                println!("destroyed {} ({})", machine.id, machine.state);
            }
            println!("customer {customer}: {count} machine(s), {excess} destroyed");
            Ok(())
        }
    }
}

fn of_customer<'a>(machines: &'a [Machine], customer: &TenantId) -> Vec<&'a Machine> {
    machines
        .iter()
        .filter(|m| m.customer_id() == Some(customer.as_str()) && m.state != "destroyed")
        .collect()
}

async fn create(
    api: &Api,
    machines: &[Machine],
    customer: &TenantId,
    count: usize,
    image: Option<String>,
    region: Option<String>,
) -> anyhow::Result<usize> {
    if count == 0 {
        return Ok(0);
    }
    // Clone a machine of the same tenant if there is one (same image,
    // services, size), else any machine of the app.
    let template = of_customer(machines, customer)
        .first()
        .copied()
        .or(machines.first());
    let mut config = match (&image, template) {
        (Some(image), template) => {
            let mut config = template
                .map(|t| t.config.clone())
                .unwrap_or_else(|| json!({}));
            config["image"] = Value::String(image.clone());
            config
        }
        (None, Some(template)) => template.config.clone(),
        (None, None) => bail!("the app has no machine to copy the image from: pass --image"),
    };
    if !config.get("env").is_some_and(Value::is_object) {
        config["env"] = json!({});
    }
    config["env"]["CUSTOMER_ID"] = Value::String(customer.to_string());
    if !config.get("metadata").is_some_and(Value::is_object) {
        config["metadata"] = json!({});
    }
    config["metadata"]["customer_id"] = Value::String(customer.to_string());
    config["metadata"]["fly_process_group"] = Value::String(format!("customer{customer}"));
    // A cloned process command may name another customer; CUSTOMER_ID decides.
    config["init"]["cmd"] = json!(["serve"]);
    let region = region.or_else(|| template.map(|t| t.region.clone()).filter(|r| !r.is_empty()));
    for _ in 0..count {
        let machine = api.create(region.as_deref(), config.clone()).await?;
        println!("created {} for customer {customer}", machine.id);
    }
    Ok(count)
}

async fn ls(api: &Api, as_json: bool) -> anyhow::Result<()> {
    let machines = api.list().await?;
    if as_json {
        let rows: Vec<Value> = machines
            .iter()
            .map(|m| json!({"id": m.id, "customer_id": m.customer_id(), "state": m.state, "region": m.region}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:<10} {:<8}",
        "ID", "CUSTOMER", "STATE", "REGION"
    );
    for m in &machines {
        println!(
            "{:<16} {:<12} {:<10} {:<8}",
            m.id,
            m.customer_id().unwrap_or("-"),
            m.state,
            m.region
        );
    }
    Ok(())
}
