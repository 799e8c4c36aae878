//! `tenantd fly`: provision, scale and destroy tenants' machines through the
//! Fly Machines API.
//!
//! Machines are created only in a process group that fly.toml declares
//! (`customer<ID> = "serve --customer-id <ID>"`, served by `http_service`):
//! `fly deploy` destroys the machines of every group fly.toml does not list
//! and replaces their env, so a machine outside fly.toml's groups would not
//! survive the next deploy. Provision refuses until fly.toml has the group,
//! printing the lines to add. New machines run the group's command from
//! fly.toml and carry metadata `fly_process_group=customer<ID>` and
//! `customer_id=<ID>`, under the deterministic names `customer<ID>-<n>`, so
//! that two concurrent runs create each machine once.
//!
//! Destroying stops a machine (skipped when it is stopped already), waits
//! for `stopped` (its kill signal made it release its leases), then deletes
//! it without force.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use tenantd_core::TenantId;
use tenantd_core::fly::api::{Api, Created, Machine};
use tenantd_core::fly::{group_of, of_customer};

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
    /// API token (`fly tokens create deploy`), with or without its `FlyV1 ` prefix.
    #[arg(long, env = "FLY_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The app's fly.toml: machines are created only in its process groups.
    #[arg(long, default_value = "fly.toml", global = true)]
    config: PathBuf,
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
    /// Destroy every machine of a tenant, or one machine: each is stopped,
    /// waited for until `stopped`, then deleted.
    Destroy {
        #[arg(long, required_unless_present = "machine", conflicts_with = "machine")]
        customer: Option<String>,
        #[arg(long)]
        machine: Option<String>,
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
            let cmd = group_command(&args.config, &app, &customer)?;
            let machines = api.list().await?;
            let have = of_customer(&machines, &customer).len();
            let created = create(
                &api,
                &machines,
                &customer,
                &cmd,
                count.saturating_sub(have),
                image,
                region,
            )
            .await?;
            println!(
                "customer {customer}: {} machine(s), {created} created",
                have.max(count)
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
                let cmd = group_command(&args.config, &app, &customer)?;
                let created = create(
                    &api,
                    &machines,
                    &customer,
                    &cmd,
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
                api.destroy(machine).await?;
                println!("destroyed {} ({})", machine.id, machine.state);
            }
            println!("customer {customer}: {count} machine(s), {excess} destroyed");
            Ok(())
        }
        FlyCommand::Destroy { customer, machine } => {
            let machines = api.list().await?;
            let targets: Vec<&Machine> = match (&customer, &machine) {
                (Some(customer), _) => {
                    let customer = TenantId::parse(customer)?;
                    of_customer(&machines, &customer)
                }
                (None, Some(id)) => machines.iter().filter(|m| &m.id == id).collect(),
                (None, None) => bail!("pass --customer or --machine"),
            };
            if targets.is_empty() {
                println!("nothing to destroy");
            }
            for machine in targets {
                api.destroy(machine).await?;
                println!("destroyed {} ({})", machine.id, machine.state);
            }
            Ok(())
        }
    }
}

/// The command of `customer<ID>` in fly.toml's `[processes]`, as words; an
/// error that prints the lines to add when fly.toml lacks the group (or
/// does not give it the HTTP service).
fn group_command(config: &Path, app: &str, customer: &TenantId) -> anyhow::Result<Vec<String>> {
    let group = group_of(customer);
    let text = std::fs::read_to_string(config).with_context(|| {
        format!(
            "cannot read {}: run in the app's folder or pass --config (machines are created only in a process group of fly.toml, since `fly deploy` destroys the others)",
            config.display()
        )
    })?;
    let toml: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", config.display()))?;
    if let Some(name) = toml.get("app").and_then(|a| a.as_str())
        && name != app
    {
        bail!(
            "{} is for app {name:?}, not {app:?}: pass the app's own fly.toml with --config",
            config.display()
        );
    }
    let line = format!("{group} = \"serve --customer-id {customer}\"");
    let command = toml
        .get("processes")
        .and_then(|p| p.get(&group))
        .and_then(|c| c.as_str());
    let Some(command) = command else {
        bail!(
            "{} has no process group {group}: the next `fly deploy` would destroy machines created for customer {customer}. Add under [processes]:\n  {line}\nand \"{group}\" to http_service.processes, then run `fly deploy` (it creates the group's first machines) and provision again",
            config.display()
        );
    };
    let words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
    let names_customer = words
        .windows(2)
        .any(|w| w[0] == "--customer-id" && w[1] == customer.as_str())
        || words
            .iter()
            .any(|w| *w == format!("--customer-id={customer}"));
    if words.first().map(String::as_str) != Some("serve") || !names_customer {
        bail!(
            "process group {group} in {} runs {command:?}, not `serve --customer-id {customer}`: make it\n  {line}",
            config.display()
        );
    }
    let served = toml
        .get("http_service")
        .and_then(|s| s.get("processes"))
        .and_then(|p| p.as_array())
        .is_none_or(|p| p.iter().any(|g| g.as_str() == Some(group.as_str())));
    if !served {
        bail!(
            "process group {group} gets no HTTP service in {}: add \"{group}\" to http_service.processes and run `fly deploy`",
            config.display()
        );
    }
    Ok(words)
}

/// `customer<ID>-<n>`, as a machine name allows (lower case, digits, dashes).
fn machine_name(customer: &TenantId, n: usize) -> String {
    let id: String = customer
        .as_str()
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' => c,
            _ => '-',
        })
        .collect();
    format!("customer{id}-{n}")
}

async fn create(
    api: &Api,
    machines: &[Machine],
    customer: &TenantId,
    cmd: &[String],
    count: usize,
    image: Option<String>,
    region: Option<String>,
) -> anyhow::Result<usize> {
    if count == 0 {
        return Ok(0);
    }
    // Clone a machine of the same tenant if there is one (same image,
    // services, size, release metadata), else any machine of the app.
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
    config["metadata"]["fly_process_group"] = Value::String(group_of(customer));
    // fly.toml's command for the group: what `fly deploy` will set too (a
    // cloned command may name another customer).
    config["init"]["cmd"] = json!(cmd);
    let region = region.or_else(|| template.map(|t| t.region.clone()).filter(|r| !r.is_empty()));
    let taken: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
    let mut created = 0;
    let mut n = 0;
    while created < count {
        n += 1;
        let name = machine_name(customer, n);
        if taken.contains(&name.as_str()) {
            continue;
        }
        match api.create(&name, region.as_deref(), config.clone()).await? {
            Created::New(machine) => {
                println!("created {} ({name}) for customer {customer}", machine.id)
            }
            Created::Exists(machine) => {
                if machine.process_group() != Some(group_of(customer).as_str()) {
                    bail!(
                        "machine name {name} is taken by {} of another group: rename or destroy it",
                        machine.id
                    );
                }
                println!("{} ({name}) was created by a concurrent run", machine.id)
            }
        }
        created += 1;
    }
    Ok(created)
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
