//! `tenantd tokens keygen|create`: tenant tokens (Ed25519-signed, one
//! tenant each) for apps and libSQL clients. Machines verify them with
//! `TENANTD_TOKEN_PUBLIC_KEY`; the signing key never leaves where tokens
//! are made.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};

use tenantd_core::TenantId;
use tenantd_core::config::parse_duration;
use tenantd_core::token::{self, Claims};

#[derive(Args, Debug)]
pub struct TokensArgs {
    #[command(subcommand)]
    pub command: TokensCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Print a new key pair: TENANTD_TOKEN_SIGNING_KEY (keep it secret, for
    /// `tokens create`) and TENANTD_TOKEN_PUBLIC_KEY (every machine).
    Keygen,
    /// Print a token that opens one tenant (signed with TENANTD_TOKEN_SIGNING_KEY).
    Create {
        #[arg(long, value_name = "ID")]
        customer_id: String,
        /// Reads only: writes are refused.
        #[arg(long)]
        read_only: bool,
        /// Lifetime (e.g. 1h, 30d); without it the token does not expire
        /// (rotate the key to end it).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expires_in: Option<Duration>,
        #[arg(long, env = "TENANTD_TOKEN_SIGNING_KEY", hide_env_values = true)]
        signing_key: Option<String>,
    },
}

pub async fn run(args: TokensArgs) -> anyhow::Result<()> {
    match args.command {
        TokensCommand::Keygen => {
            let (signing, public) = token::keygen();
            println!("TENANTD_TOKEN_SIGNING_KEY={signing}");
            println!("TENANTD_TOKEN_PUBLIC_KEY={public}");
            Ok(())
        }
        TokensCommand::Create {
            customer_id,
            read_only,
            expires_in,
            signing_key,
        } => {
            let id = TenantId::parse(&customer_id)?;
            let signing_key = signing_key.filter(|k| !k.is_empty()).context(
                "TENANTD_TOKEN_SIGNING_KEY is not set: make a key pair with `tenantd tokens keygen`",
            )?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let claims = Claims {
                id: id.as_str().to_string(),
                a: if read_only { "ro" } else { "rw" }.into(),
                iat: now,
                exp: expires_in.map(|d| now + d.as_secs().max(1)),
            };
            let token = token::sign(&signing_key, &claims).map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
    }
}
