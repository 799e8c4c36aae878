//! How a follower reaches a tenant's holder (its confirmed position) and a
//! holder its followers (pushes). `tenantd serve` goes over HTTP on the
//! private network ([`Http`]); the service simulation passes its own, in
//! process through its simulated network, so that the follower code it
//! checks is the code that serves.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value as Json;

use super::{position_path, push, query_value};
use crate::TenantId;
use crate::lease::LockRecord;
use crate::tenant::actor::ConfirmedSlot;

#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// The confirmed slot of `id` at `holder`'s machine (ReadIndex);
    /// `follower` is the asking machine's address, for the holder to push
    /// to from then on.
    async fn position(
        &self,
        id: &TenantId,
        holder: &LockRecord,
        follower: &str,
    ) -> Result<u64, String>;

    /// Whether a holder pushes its confirmed slots at all.
    fn pushes(&self) -> bool;

    /// One confirmed slot of `id` to the follower at `addr`.
    async fn push(&self, id: &TenantId, addr: &str, slot: &ConfirmedSlot) -> Result<(), String>;
}

/// Over HTTP, with the app's API token (pushes need it).
pub struct Http {
    client: reqwest::Client,
    api_token: Option<String>,
}

impl Http {
    pub fn new(timeout: Duration, api_token: Option<String>) -> Http {
        Http {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("a client without TLS settings builds"),
            api_token,
        }
    }
}

#[async_trait]
impl Peers for Http {
    async fn position(
        &self,
        id: &TenantId,
        holder: &LockRecord,
        follower: &str,
    ) -> Result<u64, String> {
        let url = format!(
            "http://{}{}?follower={}",
            holder.addr,
            position_path(id),
            query_value(follower)
        );
        let mut request = self.client.get(&url);
        if let Some(token) = &self.api_token {
            request = request.bearer_auth(token);
        }
        let reply = request.send().await.map_err(|e| e.to_string())?;
        if !reply.status().is_success() {
            return Err(format!("{url} answered {}", reply.status()));
        }
        let body: Json = reply.json().await.map_err(|e| e.to_string())?;
        body.get("confirmed")
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("{url} answered without a confirmed slot"))
    }

    fn pushes(&self) -> bool {
        self.api_token.is_some()
    }

    async fn push(&self, id: &TenantId, addr: &str, slot: &ConfirmedSlot) -> Result<(), String> {
        let Some(token) = &self.api_token else {
            return Err("pushes need the API token".into());
        };
        let mut request = self
            .client
            .post(format!("http://{addr}{}", push::push_path(id)))
            .bearer_auth(token)
            .timeout(push::PUSH_TIMEOUT)
            .body(slot.body.clone());
        for name in push::PUSHED_HEADERS {
            if let Some(value) = slot.metadata.get(name) {
                request = request.header(name, value);
            }
        }
        request.send().await.map_err(|e| e.to_string())?;
        Ok(())
    }
}
