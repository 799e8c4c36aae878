//! A small client for the Fly Machines API (https://api.machines.dev).
//! Fields relied on: a machine's `id`, `state`, `region`, `created_at` and
//! `config` (of which `config.metadata.customer_id`, `config.env`,
//! `config.init.cmd`; the rest is copied as is when cloning).

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone, Debug, Deserialize)]
pub struct Machine {
    pub id: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub config: Value,
}

impl Machine {
    pub fn customer_id(&self) -> Option<&str> {
        self.config
            .pointer("/metadata/customer_id")
            .and_then(Value::as_str)
    }
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    app: String,
    token: String,
}

impl Api {
    pub fn new(base: &str, app: &str, token: &str) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
            base: base.trim_end_matches('/').to_string(),
            app: app.to_string(),
            token: token.to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/apps/{}/machines{path}", self.base, self.app)
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the Fly Machines API at {} ({what})",
                    self.base
                )
            })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        match status.as_u16() {
            200..=299 => Ok(serde_json::from_str(&body).unwrap_or(Value::Null)),
            401 | 403 => bail!(
                "the Fly API rejected FLY_API_TOKEN ({status}): create a token with `fly tokens create deploy`"
            ),
            404 => bail!(
                "app {:?} or machine not found by the Fly API ({what}): check FLY_APP_NAME / --app",
                self.app
            ),
            _ => bail!("the Fly API answered {status} to {what}: {body}"),
        }
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Machine>> {
        let value = self
            .send(self.http.get(self.url("")), "list machines")
            .await?;
        serde_json::from_value(value).context("unexpected answer to list machines")
    }

    pub async fn create(&self, region: Option<&str>, config: Value) -> anyhow::Result<Machine> {
        let mut body = serde_json::json!({ "config": config });
        if let Some(region) = region {
            body["region"] = Value::String(region.to_string());
        }
        let value = self
            .send(self.http.post(self.url("")).json(&body), "create machine")
            .await?;
        serde_json::from_value(value).context("unexpected answer to create machine")
    }

    pub async fn destroy(&self, id: &str) -> anyhow::Result<()> {
        // Stop first so that the machine gets its kill signal and releases
        // its lease; a forced destroy of a running machine would not.
        self.send(
            self.http.post(self.url(&format!("/{id}/stop"))),
            "stop machine",
        )
        .await?;
        self.send(
            self.http.delete(self.url(&format!("/{id}?force=true"))),
            "destroy machine",
        )
        .await?;
        Ok(())
    }
}
