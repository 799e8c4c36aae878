//! A small client for the Fly Machines API (https://api.machines.dev).
//! Fields relied on: a machine's `id`, `name`, `state`, `region`,
//! `instance_id`, `created_at` and `config` (of which `config.metadata`,
//! `config.env`, `config.init.cmd`; the rest is copied as is when cloning).
//! Endpoints: list, create (with a `name`, unique within the app), stop,
//! wait (`state=stopped` with the `instance_id`), delete.

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone, Debug, Deserialize)]
pub struct Machine {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub instance_id: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub config: Value,
}

impl Machine {
    pub fn customer_id(&self) -> Option<&str> {
        self.metadata("customer_id")
    }

    pub fn process_group(&self) -> Option<&str> {
        self.metadata("fly_process_group")
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        self.config
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    }
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    app: String,
    /// The whole `Authorization` header value.
    authorization: String,
}

/// The `Authorization` header for a token as `fly tokens create` prints it
/// (`FlyV1 fm2_...`, macaroons, sent with the `FlyV1` scheme) or without
/// that prefix, or an older plain token (sent as `Bearer`).
pub fn authorization(token: &str) -> String {
    let token = token.trim();
    let bare = token
        .strip_prefix("FlyV1 ")
        .or_else(|| token.strip_prefix("Bearer "))
        .unwrap_or(token)
        .trim();
    if token.starts_with("FlyV1 ") || bare.starts_with("fm1") || bare.starts_with("fm2") {
        format!("FlyV1 {bare}")
    } else {
        format!("Bearer {bare}")
    }
}

/// How long one call waits out 429s in all before it gives up.
const RATE_LIMIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The wait after the `refusals`+1st 429: at least its `Retry-After` (1 s
/// when it names none), doubled per earlier refusal, times a random factor
/// in [0.5, 1.5), at most 10 s.
fn backoff(response: &reqwest::Response, refusals: u32) -> std::time::Duration {
    let asked = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    let doubled = asked.max(1.0) * f64::from(1u32 << refusals.min(4));
    let jittered = doubled * (0.5 + rand::random::<f64>());
    std::time::Duration::from_secs_f64(jittered.max(asked).min(10.0))
}

/// What a create call ended with.
pub enum Created {
    New(Machine),
    /// A machine of that name exists already (a concurrent run made it).
    Exists(Machine),
}

impl Api {
    pub fn new(base: &str, app: &str, token: &str) -> anyhow::Result<Api> {
        Api::with_timeout(base, app, token, std::time::Duration::from_secs(60))
    }

    pub fn with_timeout(
        base: &str,
        app: &str,
        token: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(timeout)
                .build()?,
            base: base.trim_end_matches('/').to_string(),
            app: app.to_string(),
            authorization: authorization(token),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/apps/{}/machines{path}", self.base, self.app)
    }

    /// Sends `request`; a 429 (the API's rate limit: 1 request/s per action
    /// per app, shared by every machine of the app) is retried after the
    /// `Retry-After` it names or longer: the wait doubles with each refusal,
    /// jittered, so that machines refused together spread out instead of
    /// coming back as one herd each second.
    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let mut waited = std::time::Duration::ZERO;
        let mut refusals = 0;
        let response = loop {
            let attempt = request
                .try_clone()
                .context("a Machines API request without a replayable body")?;
            let response = attempt
                .header(reqwest::header::AUTHORIZATION, &self.authorization)
                .send()
                .await
                .with_context(|| {
                    format!(
                        "cannot reach the Fly Machines API at {} ({what})",
                        self.base
                    )
                })?;
            if response.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
                break response;
            }
            let wait = backoff(&response, refusals);
            refusals += 1;
            if waited + wait > RATE_LIMIT_PATIENCE {
                bail!(
                    "the Fly Machines API is rate-limiting {what} (429) and asked to wait {wait:?} more after {waited:?}: too many calls from this app's machines; try again shortly"
                );
            }
            tracing::warn!(
                what,
                ?wait,
                "the Fly Machines API answered 429; waiting as it asks"
            );
            tokio::time::sleep(wait).await;
            waited += wait;
        };
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

    /// Creates a machine named `name`; when the API refuses because the
    /// name is taken (names are unique within an app), the machine of that
    /// name is returned instead, so that concurrent runs converge.
    pub async fn create(
        &self,
        name: &str,
        region: Option<&str>,
        config: Value,
    ) -> anyhow::Result<Created> {
        let mut body = serde_json::json!({ "name": name, "config": config });
        if let Some(region) = region {
            body["region"] = Value::String(region.to_string());
        }
        match self
            .send(self.http.post(self.url("")).json(&body), "create machine")
            .await
        {
            Ok(value) => Ok(Created::New(
                serde_json::from_value(value).context("unexpected answer to create machine")?,
            )),
            Err(e) => match self.list().await?.into_iter().find(|m| m.name == name) {
                Some(existing) => Ok(Created::Exists(existing)),
                None => Err(e),
            },
        }
    }

    /// Stops the machine unless it is stopped already, waits until it is
    /// `stopped` (its kill signal made it release its leases), then deletes
    /// it without force.
    pub async fn destroy(&self, machine: &Machine) -> anyhow::Result<()> {
        let id = &machine.id;
        if machine.state != "stopped" {
            self.send(
                self.http.post(self.url(&format!("/{id}/stop"))),
                "stop machine",
            )
            .await?;
        }
        self.wait_stopped(machine).await?;
        self.send(
            self.http.delete(self.url(&format!("/{id}"))),
            "destroy machine",
        )
        .await?;
        Ok(())
    }

    /// `GET .../wait?state=stopped&instance_id=..&timeout=50`, a few times
    /// (the API answers 408 when its timeout passes first).
    async fn wait_stopped(&self, machine: &Machine) -> anyhow::Result<()> {
        let mut url = self.url(&format!("/{}/wait?state=stopped&timeout=50", machine.id));
        if !machine.instance_id.is_empty()
            && machine
                .instance_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            url.push_str(&format!("&instance_id={}", machine.instance_id));
        }
        for _ in 0..5 {
            let request = self.http.get(&url);
            match self.send(request, "wait for machine to stop").await {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("408") => continue,
                Err(e) => return Err(e),
            }
        }
        bail!(
            "machine {} did not reach `stopped` within 5 minutes: not destroying it",
            machine.id
        )
    }
}
